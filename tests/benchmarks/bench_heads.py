"""Memory per connection that is waiting for the rest of its request head, beside
nginx and HAProxy (run on demand, not by pytest).

    .venv/bin/python -m tests.benchmarks.bench_heads [connections]

What a slow client, a slowloris (up to `limits.max_heads_per_address`) or a burst
of reconnecting clients costs before any of them is proxied. Each target is
started fresh; 200 connections warm it up (first-use allocations are not a
connection's cost) and are closed; then N raw sockets each send half a head
(`GET / HTTP/1.1`, one header, no blank line) and the target's RSS (its
processes together) is read 1.5 s later: (RSS − RSS before) ÷ N. loopwatch runs
with its per-address caps off (all of them come from 127.0.0.1, and by default
10 % of `max_connections` may be waiting for a head per address), as the other
two have none.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.targets import (
    HOST,
    Proc,
    raise_nofile,
    start_backend,
    start_haproxy,
    start_loopwatch,
    start_nginx,
)

CONNECTIONS = 4000
WARM_UP = 200
SETTLE_S = 1.5
HALF_A_HEAD = b"GET / HTTP/1.1\r\nHost: bench\r\n"
LOOPWATCH_CONFIG = """\
limits:
  max_heads_per_address: null
  max_connections_per_address: null
  handshake_timeout: 60s
"""


def waiting(port: int, n: int) -> list[socket.socket]:
    """`n` connections to `port`, each with half a head sent."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection((HOST, port))
        sock.sendall(HALF_A_HEAD)
        socks.append(sock)
    return socks


def close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def per_connection(target: Proc, n: int) -> float:
    """Bytes of RSS per connection waiting for its head."""
    close(waiting(target.port, WARM_UP))
    time.sleep(SETTLE_S)
    base = target.rss()
    socks = waiting(target.port, n)
    try:
        time.sleep(SETTLE_S)
        assert all(sock.fileno() >= 0 for sock in socks)
        return (target.rss() - base) / n
    finally:
        close(socks)


def main(n: int) -> None:
    nofile = raise_nofile(65536)
    n = min(n, (nofile - 500) // 2)  # the client sockets and the target's, in one file table's limit
    with tempfile.TemporaryDirectory(prefix="lw-bench-heads-") as tmp_dir:
        tmp = Path(tmp_dir)
        backend = start_backend(tmp)
        starts = {
            "loopwatch": lambda: start_loopwatch(tmp, backend.port, "loopwatch", LOOPWATCH_CONFIG),
            "nginx": lambda: start_nginx(tmp, backend.port, nofile),
            "haproxy": lambda: start_haproxy(tmp, backend.port, nofile),
        }
        results: dict[str, float] = {}
        try:
            for name, start in starts.items():
                target = start()
                try:
                    results[name] = per_connection(target, n)
                finally:
                    target.stop()
        finally:
            backend.stop()
    print(f"| {n:,} connections waiting for their head | bytes per connection | ÷ nginx |")
    print("|---|---:|---:|")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} | {value / results['nginx']:.2f}× |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else CONNECTIONS)
