"""What sharing state through Redis costs a handshake (run on demand, not by pytest).

    .venv/bin/python -m tests.benchmarks.bench_redis [--rounds 3] [--seconds 3] [--concurrency 32]

In one run, interleaved round by round: the echo backend alone (`direct`), two
loopwatch replicas with `state.backend: memory`, and two with
`state.backend: redis` sharing one redis-server. Each replica is a real
`loopwatch run` process; the client (this process, uvloop, raw sockets)
alternates between the two replicas, and every handshake is a distinct client
(an unsigned JWT `sub`), so the replicas' rules stay quiet and each replica
must learn about the other half of the clients through Redis.

Per configuration: handshakes per second (upgrade → 101 → close handshake →
TCP close, `--concurrency` at a time) and handshake latency p50/p99 (request
sent → 101 head read) under that load and one handshake at a time, the
latency *added* over `direct`, and the replicas' CPU per handshake (from /proc). Target: the Redis
rate at least 0.7× the memory rate (median of the per-round ratios; exit
status 1 below it). As a check that
sharing really ran, each replica's tracked clients are read from the admin
API: with Redis both track every client, with memory each tracks its half.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.test_redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TARGET_RATIO = 0.7
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
CLOSE_1000 = b"\x88\x82\x37\xfa\x21\x3d" + bytes(a ^ b for a, b in zip((1000).to_bytes(2, "big"), b"\x37\xfa", strict=True))
_JWT_HEAD = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()


# --- processes ------------------------------------------------------------------


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        assert proc is None or proc.poll() is None, f"process exited with {proc and proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {port}") from None
            time.sleep(0.05)


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Replica:
    port: int
    admin: int
    pid: int

    def api(self, path: str, method: str = "GET") -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())


def start_replica(stack: ExitStack, workdir: Path, name: str, backend_port: int, state: dict) -> Replica:
    port, admin = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "upstream": f"ws://127.0.0.1:{backend_port}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "logging": {"level": "warning"},
        "detection": {"max_clients": 1_000_000},
        "state": state,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    args = [PY, "-m", "loopwatch", "run", "--config", str(path)]
    profile = os.environ.get("BENCH_REDIS_PROFILE")  # a file: cProfile the first Redis replica
    if profile and name == "redis-a":
        args[1:2] = ["-m", "cProfile", "-o", profile, "-m"]
    proc = stack.enter_context(process(args, port))
    wait_port(admin)
    return Replica(port, admin, proc.pid)


def wait_shared(a: Replica, b: Replica, timeout: float = 15.0) -> None:
    """Both stores connected: a cooldown forced on a is seen by b."""
    deadline = time.monotonic() + timeout
    while True:
        a.api("/api/clients/bench-probe/cooldown?duration=1s", "POST")
        try:
            if b.api("/api/clients/bench-probe")["cooldown"]["remaining"] > 0:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the replicas never shared a cooldown: is Redis reachable?")
        time.sleep(0.2)


# --- the client -------------------------------------------------------------------


def token(sub: str) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"sub": sub}).encode()).rstrip(b"=").decode()
    return f"{_JWT_HEAD}.{body}.c2ln"


class Handshake(asyncio.Protocol):
    """Upgrade, read the 101, send close 1000, wait for the server to close."""

    def __init__(self, request: bytes, done: asyncio.Future[float | None]) -> None:
        self.request = request
        self.done = done
        self.buf = b""
        self.t0 = 0.0
        self.latency: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.t0 = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.latency is not None:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            if self.buf.startswith(b"HTTP/1.1 101"):
                self.latency = time.perf_counter() - self.t0
            self.transport.write(CLOSE_1000)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.latency)


@dataclass
class Trial:
    handshakes: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.handshakes / self.seconds if self.seconds else 0.0


async def trial(ports: list[int], seconds: float, concurrency: int, prefix: str) -> Trial:
    loop = asyncio.get_running_loop()
    out = Trial()
    counter = iter(range(10**9))
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            i = next(counter)
            port = ports[i % len(ports)]
            request = (
                f"GET /ws?token={token(f'{prefix}{i}')} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
            done: asyncio.Future[float | None] = loop.create_future()
            try:
                await loop.create_connection(functools.partial(Handshake, request, done), "127.0.0.1", port)
                async with asyncio.timeout(10):
                    latency = await done
            except (OSError, TimeoutError):
                latency = None
            if latency is None:
                out.failures += 1
            else:
                out.handshakes += 1
                out.latencies.append(latency)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.seconds = time.perf_counter() - started
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# --- the run ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-delay", default="10ms", help="state.redis.batch_delay of the Redis pair")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    assert shutil.which("redis-server"), "redis-server is required (.ci/system-deps installs it)"

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis = RedisServer(workdir)
        redis.start()
        stack.callback(redis.stop)
        backend_port = free_port()
        stack.enter_context(
            process([PY, "-m", "tests.benchmarks.backend", "--port", str(backend_port)], backend_port)
        )
        memory = {"backend": "memory"}
        shared = {
            "backend": "redis",
            "redis": {"url": redis.url, "key_prefix": "bench:", "batch_delay": args.batch_delay},
        }
        pairs = {
            "memory": [start_replica(stack, workdir, f"memory-{n}", backend_port, memory) for n in "ab"],
            "redis": [
                start_replica(stack, workdir, f"redis-{n}", backend_port, {**shared, "replica_id": n})
                for n in "ab"
            ],
        }
        wait_shared(*pairs["redis"])
        targets = {"direct": [backend_port], **{k: [r.port for r in v] for k, v in pairs.items()}}

        import uvloop

        results: dict[str, list[Trial]] = {name: [] for name in targets}
        idle: dict[str, list[float]] = {name: [] for name in targets}
        # CPU per handshake of the replicas (and of redis-server for the Redis
        # pair): what sharing costs, apart from how busy this machine is.
        pids = {name: [rep.pid for rep in reps] for name, reps in pairs.items()}
        pids["redis"].append(redis.pid)
        cpu: dict[str, list[float]] = {name: [0.0] * len(p) for name, p in pids.items()}
        order = list(targets)
        for r in range(args.rounds):
            random.Random(r).shuffle(order)
            for name in order:
                before = [cpu_seconds(pid) for pid in pids.get(name, [])]
                t = uvloop.run(trial(targets[name], args.seconds, args.concurrency, f"{name}-{r}-"))
                for i, pid in enumerate(pids.get(name, [])):
                    cpu[name][i] += cpu_seconds(pid) - before[i]
                results[name].append(t)
                # One at a time: latency without queueing behind other handshakes.
                idle[name] += uvloop.run(trial(targets[name], args.seconds / 2, 1, f"{name}-{r}-1-")).latencies
                print(f"round {r + 1} {name:7} {t.rate:8.0f} handshakes/s  p50 {pct(t.latencies, 0.5) * 1e3:6.2f} ms"
                      f"  p99 {pct(t.latencies, 0.99) * 1e3:6.2f} ms  failures {t.failures}", file=sys.stderr)

        tracked = {
            name: [rep.api("/api/clients?limit=1")["total"] for rep in reps] for name, reps in pairs.items()
        }

    summary: dict[str, dict[str, float]] = {}
    for name, trials in results.items():
        lat = [x for t in trials for x in t.latencies]
        summary[name] = {
            "rate": statistics.median(t.rate for t in trials),
            "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3,
            "failures": sum(t.failures for t in trials),
            "idle_p50_ms": pct(idle[name], 0.5) * 1e3,
            "idle_p99_ms": pct(idle[name], 0.99) * 1e3,
        }
    direct = summary["direct"]
    for name in ("memory", "redis"):
        summary[name]["added_p50_ms"] = summary[name]["p50_ms"] - direct["p50_ms"]
        summary[name]["added_p99_ms"] = summary[name]["p99_ms"] - direct["p99_ms"]
        summary[name]["idle_added_p50_ms"] = summary[name]["idle_p50_ms"] - direct["idle_p50_ms"]
        summary[name]["idle_added_p99_ms"] = summary[name]["idle_p99_ms"] - direct["idle_p99_ms"]
        handshakes = sum(t.handshakes for t in results[name])
        summary[name]["replica_cpu_us"] = sum(cpu[name][:2]) / handshakes * 1e6
        if name == "redis":
            summary[name]["redis_server_cpu_us"] = cpu[name][2] / handshakes * 1e6
    # Each round runs the configurations back to back, so a per-round ratio
    # cancels most of the drift of a shared machine's load; the median of those
    # is the figure held against the target.
    ratio = statistics.median(
        r.rate / m.rate for r, m in zip(results["redis"], results["memory"], strict=True)
    )
    # What the ratio would be if the replicas' CPU alone were the limit.
    cpu_ratio = summary["memory"]["replica_cpu_us"] / summary["redis"]["replica_cpu_us"]

    print(f"\n{args.rounds} rounds × {args.seconds:g} s, {args.concurrency} concurrent handshakes, "
          f"{os.cpu_count()} CPUs\n")
    print("| configuration | handshakes/s | p50 | p99 | added p50 | added p99 | failures |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        added = (f"{s['added_p50_ms']:+.2f} ms | {s['added_p99_ms']:+.2f} ms"
                 if "added_p50_ms" in s else "— | —")
        print(f"| {name} | {s['rate']:.0f} | {s['p50_ms']:.2f} ms | {s['p99_ms']:.2f} ms | {added} | {s['failures']:.0f} |")
    print("\none handshake at a time:\n")
    print("| configuration | p50 | p99 | added p50 | added p99 |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        added = (f"{s['idle_added_p50_ms']:+.2f} ms | {s['idle_added_p99_ms']:+.2f} ms"
                 if "idle_added_p50_ms" in s else "— | —")
        print(f"| {name} | {s['idle_p50_ms']:.2f} ms | {s['idle_p99_ms']:.2f} ms | {added} |")
    print(
        f"\nreplica CPU per handshake (both replicas): memory {summary['memory']['replica_cpu_us']:.0f} µs, "
        f"redis {summary['redis']['replica_cpu_us']:.0f} µs (+ redis-server "
        f"{summary['redis']['redis_server_cpu_us']:.0f} µs)"
    )
    print(f"redis / memory handshake rate, median of rounds: {ratio:.2f} (target ≥ {TARGET_RATIO})")
    print(f"memory / redis replica CPU per handshake: {cpu_ratio:.2f}")
    print(f"clients tracked per replica: memory {tracked['memory']}, redis {tracked['redis']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"summary": summary, "ratio": ratio, "cpu_ratio": cpu_ratio, "tracked": tracked}, indent=2)
        )
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
