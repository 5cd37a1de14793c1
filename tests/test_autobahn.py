"""The Autobahn|Testsuite through loopwatch must equal the results without it.

`kosoku` (an Autobahn-compatible fuzzing client, from PyPI) runs cases 1-7, 9
and 10 twice: directly against a compliant echo server (the `websockets`
library, tests/autobahn_echo.py) and through loopwatch, in front of the same
server: the Python data plane (`loopwatch run`, the real command line) and the
native one (proxy/dataplane/native.py's NativeListener, in this process). Any
case whose `behavior` or `behaviorClose` differs between the two runs fails
the test, unless the case is one whose result depends on timing on the
reference server too: a differing case is run again on both paths, and fails
if the two never agree.

A second runner is kosoku sending octet by octet (tests/autobahn_octets.py, a
relay in front of each path): cases 1-7, where a valid message followed by a
protocol error (3.4, 4.1.5, 4.2.5, ...) shows whether the server's answer to
the message gets through before the connection fails (issue 16). Those
outcomes race on the direct path too, so the same relay also paces those
cases frame by frame by the clock, in front of an echo server that answers
after a delay: directly, the echo then always comes before the failure, and
must through loopwatch too. The native data plane passes the protocol error
on for the server to answer; the Python data plane still fails the
connection itself at the bad frame's first octet (NON-STRICT on those cases)
and is not run octet by octet (proxy/dataplane/README.md).

The echo server and `loopwatch run` are separate processes that cannot be
told to listen on port 0 and report it, so they listen on fixed loopback ports
below 32768 (outside Linux's ephemeral range), each checked free first,
taking the next one when it is not.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from loopwatch.proxy.dataplane.native import EnforcementTable, EventQueue, NativeListener
from tests.wsraw import blocking_exchange

ROOT = Path(__file__).resolve().parent.parent
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
# Octet by octet: the framing, control frame, fragmentation, UTF-8 and close
# cases (9 and 10 are bulk transfers, whose octets past the relay's budget go
# as they come anyway).
OCTET_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"]
# A valid message, then a frame with a reserved RSV bit or opcode, a ping, or (5.15)
# a continuation with nothing to continue: paced by frame, PAUSE apart, in front of
# an echo that answers 2 x PAUSE after a message.
MESSAGE_THEN_ERROR_CASES = ["3.2", "3.3", "3.4", "4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4", "4.2.5", "5.15"]
PAUSE = 0.1
PORTS = range(19101, 19400)
PARALLELISM = 4
KOSOKU_TIMEOUT = 150  # seconds per run; a whole run takes about 10 s here
# Extra runs of a case whose results differ, on both paths: 3.4 differs at the
# first run about one time in two, and once (a CI run) did on 5 runs in a row.
RERUNS = 8
BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:  # and nothing listens there on another address family
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_listener(
    stack: ExitStack, argv_for_port, name: str, tmp: Path, taken: set[int], env: dict[str, str]
) -> int:  # noqa: ANN001
    """Start a server subprocess on the first free port of PORTS that it manages
    to listen on; registered with `stack` to be stopped by PID. Its port."""
    for port in PORTS:
        if port in taken or not port_is_free(port):
            continue
        log = open(tmp / f"{name}-{port}.log", "wb")  # noqa: SIM115 - closed by the stack
        stack.callback(log.close)
        proc = subprocess.Popen(
            argv_for_port(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        stack.callback(stop, proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break  # it could not listen (the port was taken meanwhile?): next port
            if accepting(port):
                taken.add(port)
                return port
            time.sleep(0.05)
        else:
            raise AssertionError(f"{name} did not listen on {port} within 15 s: see {log.name}")
        stop(proc)
    raise AssertionError(f"no free port for {name} in {PORTS}")


def upgrades(port: int) -> bool:
    """One WebSocket handshake and close on 127.0.0.1:port, on raw bytes."""
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            head = blocking_exchange(s, request)
            if b"\r\n\r\n" not in head:
                return False
            s.sendall(b"\x88\x82abcd" + bytes(a ^ b for a, b in zip(b"\x03\xe8", b"ab", strict=True)))
            return head.startswith(b"HTTP/1.1 101 ") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # this PID only
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


KOSOKU_TRIES = 3  # runs of kosoku when it dies of a signal (its own crash)


def kosoku(port: int, outdir: Path, cases: list[str] = CASES) -> tuple[dict[str, dict], float]:
    """Run `cases` against 127.0.0.1:port; the per-case results and the wall time."""
    exe = Path(sys.executable).parent / "kosoku"
    argv = [str(exe), "-m", "fuzzingclient", f"127.0.0.1:{port}", "-p", str(PARALLELISM), "-o", str(outdir)]
    for case in cases:
        argv += ["-i", case]
    # kosoku itself now and then dies of a signal after its cases are done (it
    # aborted once in a CI run, "1 cases passed" printed, SIGABRT): the client
    # crashing says nothing of the server, so it gets up to KOSOKU_TRIES runs.
    for _ in range(KOSOKU_TRIES):
        t0 = time.monotonic()
        run = subprocess.run(argv, capture_output=True, timeout=KOSOKU_TIMEOUT, cwd=outdir.parent)
        elapsed = time.monotonic() - t0
        if run.returncode >= 0:
            break
    # Exit status 1 means "a case FAILED", which a compliant server may do too:
    # the comparison decides. Anything else is kosoku itself failing.
    assert run.returncode in (0, 1), (run.returncode, run.stderr.decode(errors="replace"))
    index = json.loads((outdir / "index.json").read_text())
    assert len(index) == 1, list(index)  # one agent: the echo server's Server header
    (results,) = index.values()
    return results, elapsed


def summary(name: str, results: dict[str, dict], elapsed: float) -> str:
    behavior = collections.Counter(r["behavior"] for r in results.values())
    close = collections.Counter(r["behaviorClose"] for r in results.values())
    cells = " ".join(f"{b}={behavior.get(b, 0)}" for b in BEHAVIORS)
    other = sorted(set(behavior) - set(BEHAVIORS))
    closes = " ".join(f"{b}={n}" for b, n in sorted(close.items()))
    return f"{name:<14} {len(results):>4} cases {elapsed:6.1f} s  {cells} {other or ''}  close: {closes}"


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case.split("."))


def outcome(result: dict) -> tuple[str, str]:
    return result["behavior"], result["behaviorClose"]


def start_echo(
    stack: ExitStack, tmp: Path, taken: set[int], env: dict[str, str], delay: float = 0.0
) -> int:
    return start_listener(
        stack,
        lambda port: [sys.executable, "-m", "tests.autobahn_echo", "127.0.0.1", str(port), str(delay)],
        "echo",
        tmp,
        taken,
        env,
    )


def start_octets(
    stack: ExitStack,
    target: int,
    name: str,
    tmp: Path,
    taken: set[int],
    env: dict[str, str],
    pause: float | None = None,
) -> int:
    """The octet-by-octet relay (tests/autobahn_octets.py) in front of `target`;
    paced by frame, `pause` apart, when given."""
    extra = [] if pause is None else [str(pause)]
    return start_listener(
        stack,
        lambda port: [
            sys.executable, "-m", "tests.autobahn_octets", "127.0.0.1", str(port), str(target), *extra
        ],
        name,
        tmp,
        taken,
        env,
    )


class NativePath:
    """The native listener in this process, in front of the echo server (the
    enforcement table empty: everyone is admitted; the limits' defaults)."""

    def __init__(self, stack: ExitStack, echo_port: int):
        self.queue = EventQueue(1 << 16)
        self.listener = NativeListener.start(
            [("/", f"ws://127.0.0.1:{echo_port}")], queue=self.queue, table=EnforcementTable(), threads=2
        )
        stack.callback(self.listener.stop, 5.0)

    @property
    def port(self) -> int:
        return self.listener.port

    def assert_every_connection_ended(self, at_least: int) -> None:
        """Each case's connection ended (none left spliced), and no event was
        dropped."""
        deadline = time.monotonic() + 15
        while self.listener.stats().relays and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = self.listener.stats()
        assert stats.relays == 0, stats
        assert stats.opened == stats.closed >= at_least, stats
        assert self.queue.dropped == 0


def assert_answers_upgrades(ports: dict[str, int], tmp: Path) -> None:
    for name, port in ports.items():
        if not upgrades(port):
            time.sleep(0.5)  # let the server log why
            logs = "".join(p.read_text(errors="replace")[-3000:] for p in tmp.glob(f"{name}-*.log"))
            raise AssertionError(f"{name} on {port} accepts TCP but answers no upgrade:\n{logs}")


def assert_equal_to_direct(
    direct_port: int, proxied_port: int, name: str, tmp: Path, cases: list[str], at_least: int,
    judged_elsewhere: tuple[str, ...] = (),
) -> None:
    """Run `cases` directly and through the proxy on `proxied_port`; every
    case's outcome must be equal, or become equal when run again (below).
    `judged_elsewhere`: cases compared by a deterministic runner instead."""
    direct, t_direct = kosoku(direct_port, tmp / f"{name}-direct", cases)
    proxied, t_proxied = kosoku(proxied_port, tmp / name, cases)
    table = "\n".join([summary("direct", direct, t_direct), summary(name, proxied, t_proxied)])
    print(f"\nAutobahn (kosoku) cases {' '.join(cases)}\n{table}")
    assert set(proxied) == set(direct), set(proxied) ^ set(direct)
    assert len(direct) >= at_least  # the selection really ran

    # A few cases race the echo of a message against the failure a later
    # frame causes (3.2-3.4, 4.x: OK when the echo wins, NON-STRICT when the
    # close does), and the reference server itself goes either way from run
    # to run. A differing case is run again on both paths: it passes once
    # both paths have produced a common result, and fails if they never do.
    seen_direct = {c: {outcome(direct[c])} for c in direct}
    seen_proxied = {c: {outcome(proxied[c])} for c in direct}
    differing = sorted(
        (c for c in direct if outcome(direct[c]) != outcome(proxied[c]) and c not in judged_elsewhere), key=case_key
    )
    for attempt in range(RERUNS):
        pending = [c for c in differing if not seen_direct[c] & seen_proxied[c]]
        if not pending:
            break
        again_direct, _ = kosoku(direct_port, tmp / f"{name}-direct-again-{attempt}", pending)
        again_proxied, _ = kosoku(proxied_port, tmp / f"{name}-again-{attempt}", pending)
        for c in pending:
            seen_direct[c].add(outcome(again_direct[c]))
            seen_proxied[c].add(outcome(again_proxied[c]))

    timing = [c for c in differing if seen_direct[c] & seen_proxied[c]]
    if timing:
        print("differed once, then matched (timing-dependent on the reference server too): " + ", ".join(timing))
    differences = [
        f"{c}: direct {sorted(seen_direct[c])}, through {name} {sorted(seen_proxied[c])}"
        for c in differing
        if not seen_direct[c] & seen_proxied[c]
    ]
    assert not differences, "results differ:\n" + "\n".join(differences) + "\n" + table


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_autobahn_results_through_loopwatch_equal_direct(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # kosoku opens ~300 short connections from one address in seconds: exactly
    # what detection is for. Observe only, breakers off: the relay is under test.
    proxy_env = {
        **env,
        "LOOPWATCH_POLICY__MODE": "observe",
        "LOOPWATCH_BREAKERS__UPSTREAM__ENABLED": "false",
        "LOOPWATCH_BREAKERS__AUTH__ENABLED": "false",
    }
    taken: set[int] = set()
    with ExitStack() as stack:
        echo_port = start_echo(stack, tmp_path, taken, env)
        proxy_port = start_listener(
            stack,
            lambda port: [
                sys.executable, "-m", "loopwatch", "run",
                "--upstream", f"ws://127.0.0.1:{echo_port}",
                "--listen", f"127.0.0.1:{port}",
                "--admin-listen", "127.0.0.1:0",
                "--log-level", "warning",
            ],
            "loopwatch",
            tmp_path,
            taken,
            proxy_env,
        )
        assert_answers_upgrades({"echo": echo_port, "loopwatch": proxy_port}, tmp_path)
        assert_equal_to_direct(echo_port, proxy_port, "loopwatch", tmp_path, CASES, at_least=250)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_autobahn_results_through_the_native_listener_equal_direct(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    taken: set[int] = set()
    with ExitStack() as stack:
        echo_port = start_echo(stack, tmp_path, taken, env)
        native = NativePath(stack, echo_port)
        assert_answers_upgrades({"echo": echo_port, "native": native.port}, tmp_path)
        assert_equal_to_direct(echo_port, native.port, "native", tmp_path, CASES, at_least=250)
        native.assert_every_connection_ended(at_least=250)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_autobahn_octet_by_octet_through_the_native_listener_equal_direct(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    taken: set[int] = set()
    with ExitStack() as stack:
        echo_port = start_echo(stack, tmp_path, taken, env)
        native = NativePath(stack, echo_port)
        direct_octets = start_octets(stack, echo_port, "octets-direct", tmp_path, taken, env)
        native_octets = start_octets(stack, native.port, "octets-native", tmp_path, taken, env)
        assert_answers_upgrades({"octets-direct": direct_octets, "octets-native": native_octets}, tmp_path)
        # A valid message then a bad frame races the server's echo against the
        # bad frame's octets on this unpaced runner, one event-loop turn apart:
        # under load the extra hop lost that race in every rerun of one CI run.
        # Those cases are compared paced by the clock, deterministically, below
        # (test_autobahn_a_message_then_a_protocol_error_…).
        assert_equal_to_direct(
            direct_octets, native_octets, "native-octets", tmp_path, OCTET_CASES, at_least=200,
            judged_elsewhere=tuple(MESSAGE_THEN_ERROR_CASES),
        )
        native.assert_every_connection_ended(at_least=200)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_autobahn_a_message_then_a_protocol_error_through_the_native_listener_as_direct(
    tmp_path: Path,
) -> None:
    """The issue's finding, made deterministic: the server answers a message
    2 x PAUSE after it, and the bad frame's first octet comes PAUSE after the
    message, its second 2 x PAUSE later. Directly, every case is OK (the echo,
    then 1002); through a proxy that fails the connection at the bad frame's
    first octet, NON-STRICT (the echo lost). Through the native listener: as
    directly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    taken: set[int] = set()
    cases = MESSAGE_THEN_ERROR_CASES
    with ExitStack() as stack:
        echo_port = start_echo(stack, tmp_path, taken, env, delay=2 * PAUSE)
        native = NativePath(stack, echo_port)
        direct_frames = start_octets(stack, echo_port, "frames-direct", tmp_path, taken, env, PAUSE)
        native_frames = start_octets(stack, native.port, "frames-native", tmp_path, taken, env, PAUSE)
        assert_answers_upgrades({"frames-direct": direct_frames, "frames-native": native_frames}, tmp_path)
        # The pacing separates the echo from the failure by PAUSE on each side;
        # a machine too loaded for that shows on the direct path: run it again.
        for attempt in range(3):
            direct, t_direct = kosoku(direct_frames, tmp_path / f"direct-{attempt}", cases)
            if all(outcome(r) == ("OK", "OK") for r in direct.values()):
                break
        else:
            raise AssertionError(f"the direct path is not OK on every case: {direct}")
        proxied, t_proxied = kosoku(native_frames, tmp_path / "native", cases)
        print("\n" + summary("direct", direct, t_direct) + "\n" + summary("native", proxied, t_proxied))
        assert set(direct) == set(proxied) == set(cases)
        assert {c: outcome(r) for c, r in proxied.items()} == {c: ("OK", "OK") for c in cases}
        native.assert_every_connection_ended(at_least=len(cases))
