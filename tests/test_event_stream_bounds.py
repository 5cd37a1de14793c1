"""The status page's event streams cannot be turned into a memory sink: streams
that never read are held to a small kernel send buffer and a per-stream budget
in loopwatch, then dropped and counted; at most `admin.event_streams.max_streams`
are open (503 beyond, counted); a write that waits too long ends its stream; and
a healthy reader alongside gets every event throughout.

Kernel memory is measured per socket, not machine-wide (other processes share
the machine): the sum of the send queues (`tx_queue` in /proc/net/tcp, what
`ss` shows as Send-Q) of the admin port's own established sockets."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loopwatch.detectors.decisions import Outcome
from loopwatch.detectors.findings import Finding
from loopwatch.proxy.admin.status import STATUS_HUB, StatusHub
from loopwatch.proxy.app.runtime import Running
from tests.clients import demo_backend
from tests.conftest import loopwatch, wait_for
from tests.test_status_api import Stream

RUN_ON_UVLOOP = True

KiB = 1024
MiB = 1024 * KiB
# A non-reading client's socket: a small receive buffer, so the data piles up on
# loopwatch's side of the connection (where a remote attacker's would).
CLIENT_RCVBUF = 4 * KiB
# Linux doubles SO_SNDBUF for its bookkeeping, and TCP may queue one more
# segment (up to 64 KiB with GSO on loopback) past the buffer before it blocks.
SEGMENT = 64 * KiB


def kernel_send_queues(port: int) -> list[int]:
    """Send-Q of each established TCP socket whose local port is `port`."""
    queues = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues_hex = fields[1], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                queues.append(int(queues_hex.split(":")[0], 16))
    return queues


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def hub_of(lw: Running) -> StatusHub:
    return lw.admin.app[STATUS_HUB]


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{head} not in the scrape")


async def scrape(lw: Running) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lw.admin_port}/metrics") as r:
        return await r.text()


@dataclass
class NonReader:
    """A raw client that asks for the event stream and never reads a byte."""

    sock: socket.socket

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> NonReader:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return cls(sock)

    def refused(self) -> bool:
        """Whether the answer so far is the 503 of a full house (peeks, does not
        consume), or the connection was closed at accept (the admin port's
        connection cap: the 503s it answered stay open, kept alive)."""
        try:
            head = self.sock.recv(12, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        return head.startswith(b"HTTP/1.1 503") or head == b""


@contextlib.asynccontextmanager
async def healthy_reader(lw: Running) -> AsyncIterator[Stream]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{lw.admin_port}/api/events") as response,
    ):
        assert response.status == 200
        stream = Stream(response)
        assert (await stream.next())[0] == "hello"
        yield stream


def big_finding(i: int) -> Outcome:
    # The engine's own observer call, with evidence big enough to fill buffers fast.
    evidence: dict[str, Any] = {"i": i, "blob": "x" * (16 * KiB)}
    return Outcome(raised=(Finding(f"k{i}", "rapid_reconnect", "warning", evidence, float(i)),))


@dataclass
class Peak:
    kernel: int = 0
    loopwatch: int = 0


async def flood_until_dropped(lw: Running, reader: Stream, expected_drops: int, peak: Peak) -> int:
    """Publish big findings, each checked to reach the healthy reader, until
    `expected_drops` streams were dropped; track the peak of what the admin
    port's sockets hold in the kernel and what the streams hold in loopwatch."""
    hub = hub_of(lw)
    i = 0
    while hub.dropped_total < expected_drops:
        i += 1
        assert i < 2_000, f"only {hub.dropped_total} of {expected_drops} streams dropped"
        hub.on_outcome(big_finding(i), float(i))
        _, data = (await reader.until(lambda k, d: k == "finding", timeout=10))[-1]
        assert data["evidence"]["i"] == i  # in order, none lost
        await asyncio.sleep(0)
        peak.kernel = max(peak.kernel, sum(kernel_send_queues(lw.admin_port)))
        peak.loopwatch = max(peak.loopwatch, hub.buffered_bytes())
    return i


@pytest.mark.parametrize(
    "overrides",
    [{}, {"admin.event_streams.max_streams": 1_001, "admin.event_streams.max_buffer": "64KiB"}],
    ids=["defaults", "all-admitted"],
)
async def test_a_thousand_non_reading_streams_stay_within_the_bound(overrides: dict[str, Any]) -> None:
    """1 000 clients open the event stream and never read. With the defaults
    (100 streams, 256 KiB each in loopwatch, 32 KiB SO_SNDBUF) 901 are refused
    with 503; with room for all of them (and 64 KiB each) every one is admitted.
    Stated bound, from the settings: the admin port's sockets hold at most
    streams x (2 x send_buffer + one 64 KiB segment) in the kernel (12.5 MiB with
    the defaults), the streams at most streams x (max_buffer + one 17 KiB event)
    in loopwatch (26.7 MiB), and the process grows by less than that plus 32 MiB.
    Without these bounds 1 000 such streams held ~3.9 MB of kernel memory each."""
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}", **overrides) as lw:
        hub = hub_of(lw)
        settings = lw.settings.admin.event_streams
        if not overrides:
            assert (settings.max_streams, settings.max_buffer, settings.send_buffer) == (100, 256 * KiB, 32 * KiB)
        admitted = min(1_000, settings.max_streams - 1)  # the healthy reader holds one slot
        kernel_bound = (admitted + 1) * (2 * settings.send_buffer + SEGMENT)
        loopwatch_bound = (admitted + 1) * (settings.max_buffer + 17 * KiB)
        rss_before = rss_bytes()
        started = time.monotonic()
        async with healthy_reader(lw) as reader:
            clients: list[NonReader] = []
            try:
                for wave in range(10):  # in waves, within the listen backlog; an address each (gate.PEER_SHARE)
                    source = f"127.0.0.{wave + 10}"
                    clients += await asyncio.gather(*(NonReader.open(lw.admin_port, source) for _ in range(100)))
                    await asyncio.sleep(0.05)
                await wait_for(lambda: len(hub.subscribers) == admitted + 1, 20)
                await wait_for(lambda: sum(c.refused() for c in clients) == 1_000 - admitted, 20)
                text = await scrape(lw)
                assert metric(text, "loopwatch_admin_event_streams") == admitted + 1
                full = metric(text, "loopwatch_admin_requests_rejected_total", reason="streams_full")
                capped = metric(text, "loopwatch_admin_requests_rejected_total", reason="connections")
                assert full + capped == 1_000 - admitted  # a 503 closes its connection: no cap reached

                peak = Peak()
                await flood_until_dropped(lw, reader, admitted, peak)
                # Every non-reader is gone; the healthy reader is the one stream left.
                assert len(hub.subscribers) == 1 and hub.counters.streams_dropped["write_timeout"] == 0
                # Their connections were aborted: the kernel let go of their data.
                await wait_for(lambda: sum(kernel_send_queues(lw.admin_port)) < 64 * KiB, 10)
                rss_growth = rss_bytes() - rss_before
                text = await scrape(lw)
            finally:
                for c in clients:
                    c.sock.close()
            # Still streaming after the flood.
            hub.on_outcome(Outcome(raised=(Finding("after", "no_backoff", "warning", {}, 0.0),)), 0.0)
            assert (await reader.until(lambda k, d: k == "finding"))[-1][1]["key"] == "after"
        assert metric(text, "loopwatch_admin_event_streams") == 1
        assert metric(text, "loopwatch_admin_event_streams_dropped_total", reason="buffer_full") == admitted
        assert peak.kernel <= kernel_bound, f"{peak.kernel} bytes queued in the kernel, bound {kernel_bound}"
        assert peak.loopwatch <= loopwatch_bound, f"{peak.loopwatch} bytes held, bound {loopwatch_bound}"
        assert rss_growth < loopwatch_bound + 32 * MiB, f"RSS grew {rss_growth} bytes"
        assert time.monotonic() - started < 60
        print(
            f"{admitted} streams: peak kernel {peak.kernel / MiB:.1f} MiB (bound {kernel_bound / MiB:.1f}), "
            f"loopwatch {peak.loopwatch / MiB:.1f} MiB (bound {loopwatch_bound / MiB:.1f}), "
            f"RSS +{rss_growth / MiB:.1f} MiB, {time.monotonic() - started:.1f} s"
        )


async def test_streams_beyond_the_cap_get_a_clear_503_and_are_counted() -> None:
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"admin.event_streams.max_streams": 2}
    ) as lw:
        hub = hub_of(lw)
        async with healthy_reader(lw), healthy_reader(lw) as second:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lw.admin_port}/api/events") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "10"
                message = (await r.json())["error"]
            assert "too many event streams" in message and "admin.event_streams.max_streams" in message
            text = await scrape(lw)
            assert metric(text, "loopwatch_admin_event_streams") == 2
            assert metric(text, "loopwatch_admin_requests_rejected_total", reason="streams_full") == 1
            # The two open streams are unaffected.
            hub.on_outcome(big_finding(1), 1.0)
            assert (await second.until(lambda k, d: k == "finding"))[-1][1]["key"] == "k1"
        await wait_for(lambda: not hub.subscribers)
        # Room again once they are gone.
        async with healthy_reader(lw):
            assert metric(await scrape(lw), "loopwatch_admin_event_streams") == 1


async def test_a_write_that_waits_too_long_ends_its_stream() -> None:
    """A client that stops reading while events are few: its budget may never
    fill, but a write blocked for `write_timeout` drops it (counted)."""
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"admin.event_streams.write_timeout": "0.5s"}
    ) as lw:
        hub = hub_of(lw)
        async with healthy_reader(lw) as reader:
            stuck = await NonReader.open(lw.admin_port)
            try:
                await wait_for(lambda: len(hub.subscribers) == 2)
                # ~160 KiB: more than the kernel takes, less than the 256 KiB budget.
                for i in range(10):
                    hub.on_outcome(big_finding(i), float(i))
                    assert (await reader.until(lambda k, d: k == "finding"))[-1][1]["key"] == f"k{i}"
                assert hub.counters.streams_dropped["buffer_full"] == 0
                await wait_for(lambda: hub.counters.streams_dropped["write_timeout"] == 1, 5)
                assert len(hub.subscribers) == 1
            finally:
                stuck.sock.close()
            text = await scrape(lw)
            assert metric(text, "loopwatch_admin_event_streams_dropped_total", reason="write_timeout") == 1
            assert metric(text, "loopwatch_admin_event_streams_dropped_total", reason="buffer_full") == 0
