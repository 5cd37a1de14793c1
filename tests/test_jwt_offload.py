"""Asymmetric JWT checks run off the data plane's async workers, a bounded
number at a time (proxy/dataplane/README.md, "JWT signature checks"): a burst
of distinct Ed448-signed tokens, many more than there are turns (one per
data-plane thread), waits for its turns within the head's deadline and gets the
same answers as one at a time, while connections that need no signature check
(no token) pass beside it.

Black box: a real loopwatch, raw sockets from distinct loopback addresses,
tokens signed here with `cryptography`, the keys read back from the admin API.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from loopwatch.proxy.app.runtime import Running
from tests.conftest import loopwatch, read_response, upgrade_request, wait_for
from tests.test_jwt_ed448 import (
    OTHER_KEY,
    claims,
    ed448_token,
    ed448_verify,
    tracked,
    upgrade_status,
)

SIGNED = 24
FORGED = 8
CHEAP = 8


async def plain_upgrade_status(lw: Running, source: str) -> int:
    """An upgrade without a token (keyed by its address: nothing to verify)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lw.proxy_port, local_addr=(source, 0)
    )
    try:
        writer.write(upgrade_request("/ws"))
        return (await asyncio.wait_for(read_response(reader, head_only=True), 10)).status
    finally:
        writer.close()


def checks_scraped(lw: Running) -> dict[str, float]:
    """The signature checks' gauges on /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{lw.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    names = ("loopwatch_jwt_signature_checks_waiting", "loopwatch_jwt_signature_checks_running")
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in names
    }


async def test_a_burst_of_distinct_signed_tokens_beyond_the_turns_keeps_every_answer(
    echo_backend: str, tmp_path: Path
) -> None:
    overrides = ed448_verify(tmp_path)
    signed = [ed448_token(claims(f"user-{i}")) for i in range(SIGNED)]
    forged = [ed448_token(claims(f"forger-{i}"), OTHER_KEY) for i in range(FORGED)]
    async with loopwatch(echo_backend, **overrides) as lw:
        # The checks waiting and running, as stats() has them, while the burst lasts.
        seen: list[tuple[int, int]] = []
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                stats = lw.plane.listener.stats()  # type: ignore[attr-defined]  # NativePlane
                seen.append((stats.signature_checks_waiting, stats.signature_checks_running))
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        # All at once: far more distinct tokens than turns for their checks.
        statuses = await asyncio.gather(
            *(upgrade_status(lw, t, f"127.0.1.{i + 1}") for i, t in enumerate(signed)),
            *(upgrade_status(lw, t, f"127.0.2.{i + 1}") for i, t in enumerate(forged)),
            *(plain_upgrade_status(lw, f"127.0.3.{i + 1}") for i in range(CHEAP)),
        )
        stop.set()
        await watcher
        assert statuses == [101] * (SIGNED + FORGED + CHEAP)
        # Bounded: no more waiting than tokens to check, no more running than
        # the data plane's threads (one per core at most).
        assert seen and all(w <= SIGNED + FORGED for w, _ in seen)
        assert all(r <= (os.cpu_count() or 1) for _, r in seen)
        # Every wait and check ended: nothing left counted, in stats() and on /metrics.
        await wait_for(lambda: lw.plane.listener.stats().signature_checks_running == 0)  # type: ignore[attr-defined]
        stats = lw.plane.listener.stats()  # type: ignore[attr-defined]  # NativePlane
        assert (stats.signature_checks_waiting, stats.signature_checks_running) == (0, 0)
        assert await asyncio.to_thread(checks_scraped, lw) == {
            "loopwatch_jwt_signature_checks_waiting": 0.0,
            "loopwatch_jwt_signature_checks_running": 0.0,
        }
        await wait_for(lambda: lw.plane.settled())
        # Each verified subject is its own key (unbound); a forged token names
        # nobody (its address is the key), nor does a connection without one.
        for i in range(SIGNED):
            assert await tracked(lw, f"user-{i}"), i
        for i in range(FORGED):
            assert await tracked(lw, f"127.0.2.{i + 1}"), i
            assert not await tracked(lw, f"forger-{i}"), i
        for i in range(CHEAP):
            assert await tracked(lw, f"127.0.3.{i + 1}"), i
