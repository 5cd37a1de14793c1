"""In-process CPU of loopwatch's per-connection paths, without sockets (run on demand).

    .venv/bin/python -m tests.benchmarks.bench_paths [refusal-429|refusal-1013|handshake] [-n N]

Drives `ClientHandshake` (the listener's protocol) with fake transports through
a real gate (engine, telemetry observers, default config), so what is timed is
loopwatch's own Python per operation: no kernel, no event-loop I/O. It is the
user-space share of the benchmark harness's "CPU per refusal" and of the
client half of a churn cycle, and moves far less between runs than the
harness's figures on a shared machine. The requests are the load generator's
(tests/benchmarks/loadgen.py): refusals carry no token (one client, keyed by
its address), admitted attempts each their own JWT `sub`.

* refusal-429 / refusal-1013: connection_made, the upgrade request, the refusal
  written, connection_lost (deny list, as in scenario 5).
* handshake: connection_made, the upgrade request admitted (the upstream
  connect is not made: its task is cancelled), connection_lost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import time

import uvloop

from loopwatch.proxy.app.runtime import start
from loopwatch.proxy.dataplane.listener import ClientHandshake
from tests.conftest import settings_for


class FakeTransport:
    __slots__ = ("out", "closing", "protocol")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False
        self.protocol = None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 65536)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def request(i: int | None) -> bytes:
    if i is None:
        return (
            b"GET /refuse HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
    claims = base64.urlsafe_b64encode(json.dumps({"sub": f"user{i}"}).encode()).rstrip(b"=")
    token = b"eyJhbGciOiJIUzI1NiJ9." + claims + b".c2ln"
    return (
        b"GET /echo?token=%s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" % token
    )


async def run(path: str, n: int) -> float:
    overrides: dict[str, object] = {}
    if path.startswith("refusal"):
        overrides = {"policy.deny": ["127.0.0.1/32"], "policy.reject_with": path.split("-", 1)[1]}
        if path == "refusal-1013":
            overrides["policy.reject_with"] = "close-1013"
        else:
            overrides["policy.reject_with"] = "http-429"
    running = await start(settings_for("ws://127.0.0.1:9", **overrides))
    server = running.proxy
    requests = [request(None if path.startswith("refusal") else i) for i in range(n)]
    loop = asyncio.get_running_loop()
    try:
        for warm in (True, False):
            count = 200 if warm else n
            gc.collect()
            t0 = time.process_time()
            for i in range(count):
                proto = ClientHandshake(server)
                transport = FakeTransport()
                proto.connection_made(transport)  # type: ignore[arg-type]
                proto.data_received(requests[i])
                proto.connection_lost(None)
                if i % 64 == 63:
                    await asyncio.sleep(0)  # let the loop run its callbacks (cancelled tasks …)
            elapsed = time.process_time() - t0
            await asyncio.sleep(0)
        del loop
        return elapsed / n * 1e6
    finally:
        await running.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="*", default=["refusal-429", "refusal-1013"])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    for path in args.path:
        best = min(uvloop.run(run(path, args.n)) for _ in range(args.reps))
        print(f"{path:<14} {best:8.2f} us CPU per operation (best of {args.reps})")


if __name__ == "__main__":
    main()
