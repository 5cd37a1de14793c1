"""Client identity in the native listener (issue 16), black box: the key each
upgrade gets from the `identity:` settings (header, cookie, query, JWT claim,
trusted X-Forwarded-For, binding, verification) reaches the events and the
enforcement table's lookup, so a cooldown on a JWT subject refuses that
subject from any address, a forged token names nobody, and a trusted proxy's
X-Forwarded-For decides the client address the allow/deny networks match.

Clients connect from two loopback addresses (127.0.0.1 and 127.0.0.2) to
play two machines. The parity of every answer with proxy/dataplane/identity.py
is held by the shared vectors (tests/test_vectors.py, core/tests/identity_vectors.rs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448

from loopwatch.detectors import events as ev
from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    Identity,
    NativeListener,
    identity_spec,
)
from loopwatch.proxy.dataplane.settings import IdentitySettings, Limits
from tests.conftest import RawBackend, read_response, switching_protocols, upgrade_request
from tests.test_native_relay import Native, of_type

SECRET = "native-identity-test-secret-of-at-least-32-bytes!"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    header = b64u(b'{"alg":"HS256"}')
    signing_input = f"{header}.{b64u(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64u(signature)}"


@contextlib.asynccontextmanager
async def native_with(identity: IdentitySettings, upstream: str) -> AsyncIterator[Native]:
    queue = EventQueue(4096)
    table = EnforcementTable()
    listener = NativeListener.start(
        [("/", upstream)],
        queue=queue,
        table=table,
        limits=Limits(handshake_timeout=5.0),
        reject_with="http-429",
        threads=2,
        identity=identity,
    )
    running = Native(listener, queue, table, [])
    try:
        yield running
    finally:
        await running.stop()


async def status(
    port: int, extra: bytes = b"", *, path: str = "/", source: str = "127.0.0.1"
) -> int:
    """The status of an upgrade's answer from `source` (a loopback address),
    then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(upgrade_request(path, extra=extra))
        return (await asyncio.wait_for(read_response(reader, head_only=True), 5)).status
    finally:
        writer.close()


def attempts(events: list[ev.Event]) -> list[tuple[str, str]]:
    return [(e.key, e.addr) for e in of_type(events, ev.Attempt)]


async def test_header_cookie_and_query_keys_are_bound_to_the_address() -> None:
    identity = IdentitySettings(sources=("header:X-User", "cookie:session", "query:user", "ip"))
    async with (
        RawBackend(switching_protocols) as backend,
        native_with(identity, backend.url) as running,
    ):
        assert await status(running.port, b"X-User: alice\r\n") == 101
        assert (
            await status(running.port, b'Cookie: a=1; session="s-1"\r\n', source="127.0.0.2") == 101
        )
        assert await status(running.port, path="/?user=b%20o+b") == 101
        assert await status(running.port) == 101  # nothing: the address
        # A client writing an address into its value is still keyed at its own.
        assert await status(running.port, b"X-User: mallory@10.0.0.1\r\n") == 101
        events = await running.events(lambda es: len(of_type(es, ev.Attempt)) == 5)
    assert attempts(events) == [
        ("alice@127.0.0.1", "127.0.0.1"),
        ("s-1@127.0.0.2", "127.0.0.2"),
        ("b o b@127.0.0.1", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("mallory@10.0.0.1@127.0.0.1", "127.0.0.1"),
    ]
    # The identity headers go upstream untouched.
    assert b"X-User: alice\r\n" in backend.heads[0]


async def test_a_cooldown_on_a_verified_subject_refuses_it_from_every_address() -> None:
    identity = IdentitySettings.model_validate(
        {
            "sources": ["jwt:sub", "ip"],
            "jwt": {"verify": True, "algorithms": ["HS256"], "secret": SECRET},
        }
    )
    exp = int(time.time()) + 600
    alice = f"Authorization: Bearer {hs256({'sub': 'alice', 'exp': exp})}\r\n".encode()
    forged = f"Authorization: Bearer {hs256({'sub': 'alice', 'exp': exp}, 'not-the-secret-at-all-but-long-enough')}\r\n".encode()
    expired = f"Authorization: Bearer {hs256({'sub': 'alice', 'exp': int(time.time()) - 600})}\r\n".encode()
    async with (
        RawBackend(switching_protocols) as backend,
        native_with(identity, backend.url) as running,
    ):
        running.table.set_cooldown("alice", 30.0, "auth_failure_loop")
        assert await status(running.port, alice) == 429
        assert await status(running.port, alice, source="127.0.0.2") == 429
        # A token signed with another key, or expired, names nobody: keyed by address.
        assert await status(running.port, forged) == 101
        assert await status(running.port, expired, source="127.0.0.2") == 101
        # The subprotocol and query shapes browsers use carry the same subject.
        token = hs256({"sub": "alice", "exp": exp})
        assert (
            await status(running.port, f"Sec-WebSocket-Protocol: bearer, {token}\r\n".encode())
            == 429
        )
        assert await status(running.port, path=f"/?access_token={token}", source="127.0.0.2") == 429
        assert backend.connections == 2
        events = await running.events(lambda es: len(of_type(es, ev.Attempt)) == 6)
        stats = running.listener.stats()
    assert attempts(events) == [
        ("alice", "127.0.0.1"),
        ("alice", "127.0.0.2"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("alice", "127.0.0.1"),
        ("alice", "127.0.0.2"),
    ]
    assert [e.key for e in of_type(events, ev.Rejected)] == ["alice"] * 4
    assert stats.refused["cooldown"] == 4


async def test_a_verified_subject_shaped_as_another_key_frames_nobody() -> None:
    """Keys of every source share one namespace: a user whose verified `sub`
    was 127.0.0.9 was that address's `ip` key, and its cooldown refused every
    anonymous client at 127.0.0.9 (the tlsid probe). Such a subject is now
    keyed by its hash, and the address's clients are their own."""
    identity = IdentitySettings.model_validate(
        {"sources": ["jwt:sub", "ip"], "jwt": {"verify": True, "algorithms": ["HS256"], "secret": SECRET}}
    )
    exp = int(time.time()) + 600

    def bearer(sub: str) -> bytes:
        return f"Authorization: Bearer {hs256({'sub': sub, 'exp': exp})}\r\n".encode()

    def digest(sub: str) -> str:
        return "sha256:" + hashlib.sha256(sub.encode()).hexdigest()[:32]

    async with RawBackend(switching_protocols) as backend, native_with(identity, backend.url) as running:
        for sub in ("127.0.0.9", "x@127.0.0.2", "sha256:" + "0" * 32):
            assert await status(running.port, bearer(sub), source="127.0.0.3") == 101
            running.table.set_cooldown(digest(sub), 30.0, "auth_failure_loop")
        assert await status(running.port, source="127.0.0.9") == 101  # anonymous: its own address
        assert await status(running.port, bearer("x"), source="127.0.0.2") == 101
        assert await status(running.port, bearer("127.0.0.9"), source="127.0.0.4") == 429  # the user, anywhere
        events = await running.events(lambda es: len(of_type(es, ev.Attempt)) == 6)
    assert attempts(events) == [
        (digest("127.0.0.9"), "127.0.0.3"),
        (digest("x@127.0.0.2"), "127.0.0.3"),
        (digest("sha256:" + "0" * 32), "127.0.0.3"),
        ("127.0.0.9", "127.0.0.9"),
        ("x", "127.0.0.2"),
        (digest("127.0.0.9"), "127.0.0.4"),
    ]


async def test_unverified_subjects_are_bound_so_a_forger_frames_only_itself() -> None:
    # jwt.verify false (the default): the claim is read, not trusted, so bound.
    identity = IdentitySettings()
    token = hs256({"sub": "victim"}, "anything-at-all-since-nobody-checks-it")
    bearer = f"Authorization: Bearer {token}\r\n".encode()
    async with (
        RawBackend(switching_protocols) as backend,
        native_with(identity, backend.url) as running,
    ):
        running.table.set_cooldown("victim@127.0.0.2", 30.0, "auth_failure_loop")
        assert await status(running.port, bearer, source="127.0.0.2") == 429
        assert await status(running.port, bearer) == 101  # the same value elsewhere: another key
        events = await running.events(lambda es: len(of_type(es, ev.Opened)) == 1)
        assert backend.connections == 1
    assert attempts(events) == [
        ("victim@127.0.0.2", "127.0.0.2"),
        ("victim@127.0.0.1", "127.0.0.1"),
    ]
    assert of_type(events, ev.Opened)[0].key == "victim@127.0.0.1"


async def test_a_trusted_proxys_forwarded_for_is_the_client_address() -> None:
    # 127.0.0.2 plays the load balancer; 127.0.0.1 is a client talking directly.
    identity = IdentitySettings(trusted_proxies=("127.0.0.2/32",))
    xff = b"X-Forwarded-For: 203.0.113.66, 198.51.100.7\r\n"
    async with (
        RawBackend(switching_protocols) as backend,
        native_with(identity, backend.url) as running,
    ):
        assert await status(running.port, xff, source="127.0.0.2") == 101
        # Not from the proxy: the header is the client's own writing, ignored.
        assert await status(running.port, xff) == 101
        # Deny and cooldowns apply to the forwarded client, not to the proxy.
        running.table.set_deny(["198.51.100.0/24"])
        assert await status(running.port, xff, source="127.0.0.2") == 429
        assert (
            await status(running.port, b"X-Forwarded-For: 192.0.2.8\r\n", source="127.0.0.2") == 101
        )
        running.table.set_deny([])
        running.table.set_cooldown("192.0.2.8", 30.0, "auth_failure_loop")
        assert (
            await status(running.port, b"X-Forwarded-For: 192.0.2.8\r\n", source="127.0.0.2") == 429
        )
        assert (
            await status(running.port, b"X-Forwarded-For: 192.0.2.9\r\n", source="127.0.0.2") == 101
        )
        events = await running.events(lambda es: len(of_type(es, ev.Attempt)) == 6)
        stats = running.listener.stats()
        # Upstream, the proxy's chain is extended with the peer, as the Python plane does.
        assert b"X-Forwarded-For: 203.0.113.66, 198.51.100.7, 127.0.0.2\r\n" in backend.heads[0]
    assert attempts(events) == [
        ("198.51.100.7", "198.51.100.7"),
        ("127.0.0.1", "127.0.0.1"),
        ("198.51.100.7", "198.51.100.7"),
        ("192.0.2.8", "192.0.2.8"),
        ("192.0.2.8", "192.0.2.8"),
        ("192.0.2.9", "192.0.2.9"),
    ]
    assert (stats.refused["deny"], stats.refused["cooldown"]) == (1, 1)


async def test_long_and_hostile_values_give_bounded_keys() -> None:
    identity = IdentitySettings(sources=("header:X-User", "ip"), max_key_length=64)
    async with (
        RawBackend(switching_protocols) as backend,
        native_with(identity, backend.url) as running,
    ):
        assert await status(running.port, b"X-User: " + b"a" * 8000 + b"\r\n") == 101
        # A C1 byte and 0xA0: no whitespace in a header's bytes (U+0085 and
        # U+00A0 to Python, read as latin-1, but in UTF-8 a character's end):
        # a value, hashed for its C1 byte.
        assert await status(running.port, b"X-User: \x85\xa0\r\n") == 101
        assert await status(running.port, b"X-User: a\r\nX-User: b\r\n") == 101  # joined
        events = await running.events(lambda es: len(of_type(es, ev.Attempt)) == 3)
        assert backend.connections == 3
    digest = hashlib.sha256(b"a" * 8000).hexdigest()[:32]
    c1_nbsp = hashlib.sha256(b"\x85\xa0").hexdigest()[:32]
    assert attempts(events) == [
        (f"sha256:{digest}@127.0.0.1", "127.0.0.1"),
        (f"sha256:{c1_nbsp}@127.0.0.1", "127.0.0.1"),
        ("a, b@127.0.0.1", "127.0.0.1"),
    ]


def test_identity_settings_the_native_plane_cannot_honour_are_refused(tmp_path: Path) -> None:
    # An Ed448 key is taken (EdDSA verifies with it: the shared vectors, and
    # tests/test_jwt_ed448.py end to end); 57 bytes that are no point of the
    # curve are refused at start, naming the file's setting.
    ed448_pem = tmp_path / "ed448.pem"
    ed448_pem.write_bytes(
        ed448.Ed448PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    settings = IdentitySettings.model_validate(
        {"jwt": {"verify": True, "algorithms": ["EdDSA"], "public_key_file": str(ed448_pem)}}
    )
    Identity(**identity_spec(settings))
    not_a_point = bytes.fromhex("3043300506032b6571033a00") + b"\xff" * 57  # SPKI, id-Ed448
    ed448_pem.write_text(
        "-----BEGIN PUBLIC KEY-----\n"
        + base64.encodebytes(not_a_point).decode()
        + "-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(ValueError, match="not a valid Ed448 public key"):
        Identity(**identity_spec(settings))
    missing = IdentitySettings.model_validate(
        {
            "jwt": {
                "verify": True,
                "algorithms": ["RS256"],
                "public_key_file": str(tmp_path / "nope.pem"),
            }
        }
    )
    with pytest.raises(ValueError, match="identity.jwt.public_key_file: cannot read"):
        identity_spec(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    bad = IdentitySettings.model_validate(
        {"jwt": {"verify": True, "algorithms": ["RS256"], "public_key_file": str(garbage)}}
    )
    with pytest.raises(ValueError, match="not a PEM public key or certificate"):
        Identity(**identity_spec(bad))
    # Arguments that bypass the settings' validation get clear answers too.
    with pytest.raises(ValueError, match=r"identity.sources\[1\]: .*comes after ip"):
        Identity(sources=["ip", "jwt:sub"])
    with pytest.raises(ValueError, match=r"identity.sources\[0\]: unknown source"):
        Identity(sources=["bogus:x"])
    with pytest.raises(ValueError, match=r"identity.trusted_proxies\[0\]"):
        Identity(sources=["ip"], trusted_proxies=["10.0.0.0"])
    with pytest.raises(ValueError, match="algorithms"):
        Identity(sources=["ip"], verify=True, algorithms=["none"], secret=b"x" * 32)
    with pytest.raises(ValueError, match="no key matches"):
        Identity(sources=["ip"], verify=True, algorithms=["RS256"], secret=b"x" * 32)


def test_the_admin_api_refuses_exactly_the_characters_identity_removes() -> None:
    """The admin API's check of an operator's key (`manual_key_problem`) and
    identity's cleaning name the same characters: every code point of planes
    0, 1 and 14 inside a query value (unbound, so a value that lost one is
    hashed). The injection probe found invisible ones identity kept
    (U+034F, the variation selectors, the Hangul fillers): four rows that read
    `alice`."""
    from urllib.parse import quote

    from loopwatch.proxy.admin.api import manual_key_problem

    identity = Identity(**identity_spec(IdentitySettings.model_validate(
        {"sources": ["query:user", "ip"], "bind_to_address": False}
    )))  # fmt: skip
    differ = []
    for cp in [*range(0x20000), *range(0xE0000, 0xE1000)]:
        c = chr(cp)
        if 0xD800 <= cp <= 0xDFFF or c.isspace():
            continue  # no UTF-8 for a surrogate; whitespace is trimmed, not removed, at the ends
        value = f"a{c}b"
        head = f"GET /ws?user={quote(value)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        removed = identity.identify(head, "192.0.2.1", 0.0)[0] != value
        refused = manual_key_problem(value, 256) is not None
        if removed != refused:
            differ.append(f"U+{cp:04X} identity removes it: {removed}, the admin API refuses it: {refused}")
    assert differ == []
    for invisible in ("\u034f", "\ufe0f", "\u3164", "\U000e0100"):
        head = f"GET /ws?user={quote('alice' + invisible)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert identity.identify(head, "192.0.2.1", 0.0)[0].startswith("sha256:")
