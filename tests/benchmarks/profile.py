"""Where loopwatch's time goes under one benchmark scenario: py-spy on the proxy.

    .venv/bin/pip install py-spy      # once
    .venv/bin/python -m tests.benchmarks.profile churn [--seconds 8] [--out DIR]

Starts the benchmark's echo backend and `loopwatch run` (default config; the
`refusal-429`/`refusal-1013` scenarios add the deny config), drives one
scenario with the benchmark's load generator for `--seconds` while
`py-spy record` samples the loopwatch process, and prints the functions with
the most samples: self (the function itself was running) and total (it was on
the stack), as percentages of all samples. The raw collapsed stacks are kept
in --out for flame graphs. Scenarios: latency, throughput, large, churn,
refusal-429, refusal-1013, storm.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.run import DENY_CONFIG
from tests.benchmarks.targets import HOST, LoadGen, raise_nofile, start_backend, start_loopwatch

COMMANDS = {
    "latency": {"op": "latency", "n": 10_000_000},
    "throughput": {"op": "throughput", "conns": 50, "msgs": 10_000_000, "window": 64},
    "large": {"op": "large", "n": 1_000_000, "size": 1 << 20},
    "churn": {"op": "churn", "workers": 20},
    "refusal-429": {"op": "refusal", "workers": 20, "expect": "http", "path": "/refuse"},
    "refusal-1013": {"op": "refusal", "workers": 20, "expect": "close", "path": "/refuse"},
    "storm": {"op": "storm", "loopers": 50},
}

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


IDLE = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "select", "pthread_cond_wait",
        "pthread_cond_timedwait", "__futex_abstimed_wait_common", "futex_wait", "nanosleep",
        "clock_nanosleep", "sem_timedwait", "sem_wait"}
SYSCALLS = {"write", "writev", "send", "sendmsg", "sendto", "read", "readv", "recv", "recvmsg",
            "recvfrom", "shutdown", "close", "connect", "accept", "accept4", "socket", "epoll_ctl",
            "setsockopt", "getsockopt", "getpeername", "getsockname", "syscall", "ioctl", "fcntl",
            "__close", "__libc_write", "__libc_read", "__socket", "__connect"}
OWN = ("(proxy/", "(detectors/")


def summarize(raw: Path, top: int = 20) -> str:
    """Where the busy samples went, from py-spy's collapsed stacks: self and total
    per function, a kernel/GC/Python split (with --native), and the loopwatch
    functions that were on the stack. Samples idle in epoll/poll are left out."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    mine: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    samples = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in (_name(f) for f in stack.split(";")) if f]
        if not frames:
            continue
        leaf = frames[-1].split(" (", 1)[0]
        if leaf in IDLE:
            idle += n
            continue
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
            if f.endswith(")") and any(o in f for o in OWN):
                mine[f] += n
        if leaf in SYSCALLS:
            kinds["system calls (kernel: loopback TCP, epoll)"] += n
        elif leaf.startswith(("gc_collect", "gc_", "deduce_unreachable", "visit_")):
            kinds["garbage collector"] += n
        elif any(o in frames[-1] for o in OWN):
            kinds["loopwatch Python code (self)"] += n
        else:
            kinds["interpreter, uvloop, libraries (self)"] += n
    if not samples:
        return "no samples\n"
    pct = lambda n: 100 * n / samples  # noqa: E731
    lines = [f"{samples} busy samples ({idle} idle samples left out)", ""]
    if kinds:
        lines += ["share  kind (by the innermost frame)", "-----  ----"]
        lines += [f"{pct(n):5.1f}  {k}" for k, n in kinds.most_common()]
        lines.append("")
    lines += ["self %  total %  function (innermost frame)", "------  -------  --------"]
    for func, n in own.most_common(top):
        lines.append(f"{pct(n):6.1f}  {pct(total[func]):7.1f}  {func}")
    lines += ["", "loopwatch functions by total (on the stack, callees included):", "total %  function",
              "-------  --------"]
    for func, n in mine.most_common(top):
        lines.append(f"{pct(n):7.1f}  {func}")
    return "\n".join(lines) + "\n"


def _name(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(COMMANDS))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=499, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include native (C) frames")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    raise_nofile(65536)
    tmp = Path(tempfile.mkdtemp(prefix="loopwatch-profile-"))
    out = args.out or tmp
    out.mkdir(parents=True, exist_ok=True)
    backend = start_backend(tmp)
    config = None
    if args.scenario.startswith("refusal-"):
        how = "http-429" if args.scenario.endswith("429") else "close-1013"
        config = DENY_CONFIG.format(how=how)
    lw = start_loopwatch(tmp, backend.port, config=config)
    lg = LoadGen("loadgen", tmp)
    raw = out / f"pyspy-{args.scenario}.txt"
    try:
        lg.call({"op": "churn", "workers": 4, "max_s": 0.3, "host": HOST, "port": lw.port}, 60)  # warm up
        command = {**COMMANDS[args.scenario], "host": HOST, "port": lw.port, "max_s": args.seconds + 1.0,
                   "duration": args.seconds + 1.0}
        lg.send(command)
        time.sleep(0.5)
        cpu0 = lw.cpu()
        spy = subprocess.run(
            [py_spy, "record", "-p", str(lw.proc.pid), "-d", str(int(args.seconds)), "-r", str(args.rate),
             "-f", "raw", "-o", str(raw), *(["--native"] if args.native else ["--nonblocking"])],
            capture_output=True, text=True, timeout=args.seconds + 60,
        )
        cpu = lw.cpu() - cpu0
        result = lg.receive(args.seconds + 60)
        if spy.returncode != 0:
            print(spy.stderr, file=sys.stderr)
            return 1
    finally:
        lg.stop()
        lw.stop()
        backend.stop()
    ops = result.get("ops", 0)
    print(f"scenario {args.scenario}: {ops} operations in {result.get('elapsed_s', 0):.1f} s, "
          f"loopwatch CPU {cpu:.2f} s while sampled ({args.seconds:.0f} s); raw stacks: {raw}")
    print(summarize(raw))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
