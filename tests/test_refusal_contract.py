"""The refusal contract (docs/refusals.md), pinned on the wire.

A real loopwatch in front of the demo backend refuses attempts for each of its
reasons; an independent client (a raw socket and the hand-written frame
decoder of tests/wsraw.py, sharing no code with proxy/) reads the 101 and the
close frame, or the 429/503 response, byte for byte, and checks them against
the grammar the document states. The regular expression and the phrase table
below mirror the document, and a test checks that they still do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.app.settings import ConfigError, load_settings
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.clients import attempt, demo_backend
from tests.conftest import (
    client_key,
    free_port,
    loopwatch,
    raw_exchange,
    upgrade_request,
    wait_for,
    ws_url,
)
from tests.wsraw import CLOSE, TEXT, RawClient, close_payload, frame

# answers refusals itself, from its table, and must follow the same grammar.

DOC = Path(__file__).resolve().parent.parent / "docs" / "refusals.md"

# docs/refusals.md, "The reason grammar": the regular expression, verbatim.
REFUSAL_PATTERN = r"^loopwatch: ([\x20-\x2B\x2D-\x7E]{1,64}), retry in ([1-9][0-9]{0,9})s$"
REFUSAL_REASON = re.compile(REFUSAL_PATTERN)
# known-phrase -> the refusal reason it stands for (loopwatch_refusals_total's label).
KNOWN_PHRASES = {
    "cooldown": "cooldown",
    "too soon after the last attempt": "min_interval",
    "too many connections": "max_concurrent",
    "denied": "deny",
    "upstream unavailable": "circuit_open",
}
MAX_CLOSE_REASON = 123  # RFC 6455 §5.5: 125 bytes of control payload, 2 of them the code
MODES = ("close-1013", "http-429")


@dataclass(frozen=True)
class Refused:
    """A refusal as the client read it off the wire."""

    code: int  # the close code (close-1013) or the HTTP status (http-429)
    reason: str  # the close reason, or the body's line
    retry_header: str | None  # Retry-After (HTTP only)

    @property
    def phrase(self) -> str:
        return self.parsed.group(1)

    @property
    def retry_secs(self) -> int:
        return int(self.parsed.group(2))

    @property
    def parsed(self) -> re.Match[str]:
        match = REFUSAL_REASON.match(self.reason)
        assert match is not None, f"reason {self.reason!r} does not follow the grammar"
        return match


async def refused_by_close(port: int, path: str) -> Refused:
    """Upgrade on a raw socket, expect a 101 then loopwatch's close frame; reply
    to the close and expect the TCP connection to end with nothing more."""
    client = await RawClient.connect(
        port, path, extra=b"Sec-WebSocket-Protocol: chat.v2\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    try:
        head = client.response.lower()
        # loopwatch answered by itself: nothing negotiated.
        assert b"sec-websocket-protocol" not in head and b"sec-websocket-extensions" not in head, head
        closing = await client.read_frame(timeout=5)
        assert (closing.fin, closing.rsv, closing.opcode, closing.mask) == (True, 0, CLOSE, None), closing
        assert 2 <= len(closing.payload) <= 125
        code = int.from_bytes(closing.payload[:2], "big")
        reason = closing.payload[2:].decode("utf-8")  # strict: a valid UTF-8 reason
        assert len(closing.payload[2:]) <= MAX_CLOSE_REASON
        await client.send(frame(CLOSE, close_payload(1000), mask=os.urandom(4)))
        assert await client.read_to_eof(timeout=5) == b""  # then loopwatch closes, nothing else
        return Refused(code, reason, None)
    finally:
        await client.close()


async def refused_by_status(port: int, path: str) -> Refused:
    response, rest = await raw_exchange(port, upgrade_request(path, host=f"127.0.0.1:{port}"), timeout=5)
    assert rest == b""
    assert response.header("content-type") == "text/plain; charset=utf-8"
    assert (response.header("connection") or "").lower() == "close"
    assert response.body.endswith(b"\n") and response.body.count(b"\n") == 1, response.body
    return Refused(response.status, response.body[:-1].decode("utf-8"), response.header("retry-after"))


async def refused(lw: Running, mode: str, path: str) -> Refused:
    if mode == "close-1013":
        return await refused_by_close(lw.proxy_port, path)
    return await refused_by_status(lw.proxy_port, path)


def check_contract(got: Refused, mode: str, reason: str, close_code: int = 1013) -> None:
    """Everything docs/refusals.md promises about one refusal."""
    assert KNOWN_PHRASES[got.phrase] == reason, got
    assert len(got.reason.encode("utf-8")) <= MAX_CLOSE_REASON
    if mode == "close-1013":
        assert got.code == close_code and got.retry_header is None
    else:
        assert got.code == (503 if reason == "circuit_open" else 429), got
        assert got.retry_header == str(got.retry_secs), got  # Retry-After equals the reason's time


def token_path(sub: str) -> str:
    return "/ws?token=" + issue_token(sub, 600)


@contextlib.asynccontextmanager
async def guarded(**overrides: object) -> AsyncIterator[tuple[DemoBackend, Running]]:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}", **overrides) as lw:
        yield backend, lw


async def force_cooldown(lw: Running, key: str, duration: str) -> None:
    url = f"http://127.0.0.1:{lw.admin_port}/api/clients/{quote(key, safe='')}/cooldown?duration={duration}"
    async with aiohttp.ClientSession() as session, session.post(url) as response:
        assert response.status == 200, await response.text()


# --- the document and the test agree ------------------------------------------


def test_the_document_states_this_grammar() -> None:
    doc = DOC.read_text(encoding="utf-8")
    assert REFUSAL_PATTERN in doc  # the regular expression, verbatim
    abnf = doc.split("```abnf", 1)[1].split("```", 1)[0]
    phrases = dict(re.findall(r'%s"([^"]+)"\s+; reason: (\w+)', abnf))
    assert phrases == KNOWN_PHRASES
    # Every known phrase is an other-phrase too: a client that only knows the
    # generic pattern still reads every refusal.
    for phrase in KNOWN_PHRASES:
        assert REFUSAL_REASON.match(f"loopwatch: {phrase}, retry in 1s")


def test_every_reason_the_grammar_allows_fits_a_close_frame() -> None:
    longest_known = max(KNOWN_PHRASES, key=len)
    worst_known = f"loopwatch: {longest_known}, retry in 9999999999s"
    assert REFUSAL_REASON.match(worst_known)
    assert len(worst_known.encode()) == 64  # the figure the document gives
    worst_other = f"loopwatch: {'x' * 64}, retry in 9999999999s"
    assert REFUSAL_REASON.match(worst_other)
    assert len(worst_other.encode()) == 97 <= MAX_CLOSE_REASON
    # What the grammar excludes.
    for bad in (
        "loopwatch: cooldown, retry in 0s",
        "loopwatch: cooldown, retry in 05s",
        "loopwatch: cooldown, retry in 1.5s",
        "loopwatch: cooldown, retry in 12345678901s",
        "loopwatch: a, b, retry in 5s",
        "loopwatch: cooldown,retry in 5s",
        "Loopwatch: cooldown, retry in 5s",
        "loopwatch: cooldown, retry in 5",
        "loopwatch: , retry in 5s",
    ):
        assert not REFUSAL_REASON.match(bad), bad


# --- each refusal on the wire ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_cooldown_refusal_carries_the_remaining_cooldown(mode: str) -> None:
    async with guarded(**{"policy.reject_with": mode}) as (backend, lw):
        await force_cooldown(lw, client_key("cool"), "7s")
        got = await refused(lw, mode, token_path("cool"))
        check_contract(got, mode, "cooldown")
        assert 6 <= got.retry_secs <= 7  # the time left, rounded up
        assert backend.upgrades["cool"] == 0


async def test_an_operator_s_cooldown_is_sent_in_observe_mode_too() -> None:
    async with guarded(**{"policy.mode": "observe"}) as (backend, lw):
        await force_cooldown(lw, client_key("watched"), "30s")
        got = await refused_by_close(lw.proxy_port, token_path("watched"))
        check_contract(got, "close-1013", "cooldown")
        assert 29 <= got.retry_secs <= 30
        assert backend.upgrades["watched"] == 0


async def test_an_application_close_code_replaces_1013_and_keeps_the_reason() -> None:
    async with guarded(**{"policy.close_code": 4429}) as (backend, lw):
        await force_cooldown(lw, client_key("app"), "30s")
        got = await refused_by_close(lw.proxy_port, token_path("app"))
        check_contract(got, "close-1013", "cooldown", close_code=4429)
        assert 29 <= got.retry_secs <= 30
        assert backend.upgrades["app"] == 0


async def test_messages_sent_on_the_refusal_s_101_are_read_before_the_close() -> None:
    """An app that sends on open (a subscription) writes before it reads the
    close: loopwatch reads those messages up to the close reply, so the reply
    is taken and the connection ends with a FIN (it read one chunk and closed:
    a reset, the close reply lost, and on some stacks the reason with it)."""
    async with guarded(**{"policy.hold": 0}) as (backend, lw):
        await force_cooldown(lw, client_key("eager"), "30s")
        client = await RawClient.connect(lw.proxy_port, token_path("eager"))
        try:
            for _ in range(3):  # apart, so that each is a read of its own
                await client.send(frame(TEXT, b'{"subscribe": "prices"}', mask=os.urandom(4)))
                await asyncio.sleep(0.05)
            closing = await client.read_frame(timeout=5)
            assert closing.opcode == CLOSE and int.from_bytes(closing.payload[:2], "big") == 1013
            await asyncio.sleep(0.1)  # the app's close handler runs, then the reply goes
            await client.send(frame(CLOSE, close_payload(1013), mask=os.urandom(4)))
            assert await client.read_to_eof(timeout=5) == b""  # a FIN, not a reset
        finally:
            await client.close()
        assert backend.upgrades["eager"] == 0


@pytest.mark.parametrize("code", [1000, 1008, 1014, 3000, 5000])
def test_a_close_code_that_is_not_1013_or_an_application_code_is_refused(code: int) -> None:
    with pytest.raises(ConfigError, match="policy.close_code: expected 1013 or an application code"):
        load_settings(env={}, overrides={"upstream": "ws://127.0.0.1:1", "policy.close_code": code})


async def test_a_client_that_waits_the_retry_time_is_let_in() -> None:
    async with guarded() as (backend, lw):
        await force_cooldown(lw, client_key("patient"), "1500ms")
        got = await refused_by_close(lw.proxy_port, token_path("patient"))
        check_contract(got, "close-1013", "cooldown")
        assert got.retry_secs == 2  # 1.5 s, rounded up
        await asyncio.sleep(got.retry_secs)
        async with connect(ws_url(lw, token_path("patient")), open_timeout=5) as ws:
            await ws.send("back")
            assert await ws.recv() == "back"
        assert backend.upgrades["patient"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_min_interval_refusal_is_the_longest_reason_and_fits(mode: str) -> None:
    # The longest phrase with the longest retry time a duration allows (366 days:
    # detectors/units.py MAX_DURATION): the longest reason loopwatch sends.
    async with guarded(**{"policy.reject_with": mode, "policy.min_interval": "366d"}) as (backend, lw):
        async with connect(ws_url(lw, token_path("eager")), open_timeout=5) as ws:  # admitted
            await ws.send("first")
            assert await ws.recv() == "first"
        # The native plane admits from its table: what the brain wrote of the first.
        await wait_for(lw.plane.settled)
        got = await refused(lw, mode, token_path("eager"))
        check_contract(got, mode, "min_interval")
        assert got.retry_secs == 366 * 86400  # 31622400: eight digits
        assert len(got.reason.encode()) == 62  # within 64, the grammar's ten-digit worst case
        assert backend.upgrades["eager"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_max_concurrent_refusal_retries_after_the_base_cooldown(mode: str) -> None:
    async with guarded(**{"policy.reject_with": mode, "policy.max_concurrent": 1}) as (backend, lw):
        async with connect(ws_url(lw, token_path("twotabs")), open_timeout=5) as first:
            await first.send("x")
            assert await first.recv() == "x"
            await wait_for(lw.plane.settled)  # the brain has seen it open (native)
            got = await refused(lw, mode, token_path("twotabs"))
            check_contract(got, mode, "max_concurrent")
            assert got.retry_secs == 5  # policy.cooldown.base
        assert backend.upgrades["twotabs"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_deny_refusal_retries_after_the_longest_cooldown(mode: str) -> None:
    overrides = {"policy.reject_with": mode, "policy.deny": [client_key("blocked")], "policy.mode": "observe"}
    async with guarded(**overrides) as (backend, lw):
        got = await refused(lw, mode, token_path("blocked"))  # observe mode does not lift a deny
        check_contract(got, mode, "deny")
        assert got.retry_secs == 300  # policy.cooldown.max
        assert backend.upgrades["blocked"] == 0


@pytest.mark.parametrize("mode", MODES)
async def test_open_breaker_refusal_says_when_it_probes_again(mode: str) -> None:
    dead = free_port()  # nothing listens: every handshake fails
    overrides = {
        "policy.reject_with": mode,
        "breakers.upstream.min_calls": 3,
        "breakers.upstream.open_wait": "20s",
    }
    async with loopwatch(f"ws://127.0.0.1:{dead}", **overrides) as lw:
        for i in range(3):  # three clients: the upstream is at fault, not one of them
            code, _ = await attempt(ws_url(lw, token_path(f"user{i}")))
            assert code == 502
        # The native plane's brain judges a batch after the client saw its 502.
        await wait_for(lambda: lw.engine.breakers(time.monotonic())[0].state == "open")
        got = await refused(lw, mode, token_path("user9"))
        check_contract(got, mode, "circuit_open")
        assert 19 <= got.retry_secs <= 20


# --- loopwatch's own closes that are not refusals ---------------------------------


async def test_close_oldest_is_loopwatch_s_own_1008_and_not_a_refusal() -> None:
    overrides = {"policy.max_concurrent": 1, "policy.on_max_concurrent": "close-oldest"}
    async with guarded(**overrides) as (backend, lw):
        first = await RawClient.connect(lw.proxy_port, token_path("dup"))
        try:
            async with connect(ws_url(lw, token_path("dup")), open_timeout=5) as second:
                closing = await first.read_frame(timeout=5)
                assert closing.opcode == CLOSE
                code, reason = closing.close
                # A client tells it apart from the backend's auth 1008 by the prefix,
                # and from a refusal by the grammar.
                assert code == 1008 and reason.startswith("loopwatch: ")
                assert REFUSAL_REASON.match(reason) is None
                await second.send("still here")
                assert await second.recv() == "still here"
        finally:
            await first.close()
        assert backend.upgrades["dup"] == 2
