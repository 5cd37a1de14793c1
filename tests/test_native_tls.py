"""TLS in the native listener (proxy/dataplane/py, issue 16): it terminates
TLS for wss:// clients (`tls:`) and reaches wss:// upstreams over TLS,
verified as `upstream_tls:` says, with the Python data plane's semantics
(docs/relay.md, docs/configuration.md).

Black-box: the listener runs on its own tokio threads in this process, in
front of independent peers (the `websockets` library with `ssl` contexts made
from conftest's self-signed certificates, and raw sockets); the test only
talks to sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loopwatch.detectors import events as ev
from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    ListenerStats,
    NativeListener,
    RequestRejected,
    listener_config,
)
from loopwatch.proxy.dataplane.settings import Limits, ListenerTLS, UpstreamTLS
from tests.conftest import self_signed_cert, server_context, websockets_backend
from tests.hardening import no_descriptor_left
from tests.wsraw import CLOSE, RawClient, close_payload, frame

MiB = 1 << 20


@dataclass(frozen=True)
class Cert:
    cert: str
    key: str


@pytest.fixture(scope="module")
def local_cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """For 127.0.0.1 and localhost: the listener's and a backend's."""
    return Cert(*self_signed_cert(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"]))


@pytest.fixture(scope="module")
def named_cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """For backend.internal only: reached at 127.0.0.1, verified by server_name."""
    return Cert(*self_signed_cert(tmp_path_factory.mktemp("named"), ["backend.internal"]))


@dataclass
class Native:
    listener: NativeListener
    queue: EventQueue
    table: Any
    events: list[ev.Event] = field(default_factory=list)

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.listener.port}{path}"

    async def until(self, done: Callable[[list[ev.Event]], bool], timeout: float = 5.0) -> list[ev.Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.events):
            if loop.time() > deadline:
                raise AssertionError(f"events not reached in time: {self.events}")
            self.events += [r.event for r in await asyncio.to_thread(self.queue.recv_batch, 1024, 0.05)]
        return self.events

    async def idle_stats(self, timeout: float = 5.0) -> ListenerStats:
        """The listener's stats once no connection is active (bounded): the
        HandshakeFailed event is sent before its connection task has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (stats := self.listener.stats()).active != 0:
            if loop.time() > deadline:
                raise AssertionError(f"connections still active after {timeout} s: {stats}")
            await asyncio.sleep(0.01)
        return stats


@contextlib.asynccontextmanager
async def native(
    upstream: str,
    *,
    tls: ListenerTLS | None = None,
    upstream_tls: UpstreamTLS | None = None,
    reject_with: str = "close-1013",
    **limits: Any,
) -> AsyncIterator[Native]:
    queue, table = EventQueue(4096), EnforcementTable()
    listener = NativeListener.start(
        [("/", upstream)], queue=queue, table=table, limits=Limits(**limits), threads=2,
        reject_with=reject_with, tls=tls, upstream_tls=upstream_tls,
    )  # fmt: skip
    try:
        yield Native(listener, queue, table)
    finally:
        await asyncio.to_thread(listener.stop, 3.0)


def tls_rejections(stats: ListenerStats) -> dict[str, int]:
    """The listener's failed TLS handshakes (loopwatch_requests_rejected_total)."""
    return {reason: stats.rejected[reason] for reason in ("tls_error", "tls_timeout", "not_tls")}


def of_type(events: list[ev.Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def client_context(cafile: str) -> ssl.SSLContext:
    """What a browser-like client trusting `cafile` offers, ALPN included."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


@dataclass
class Backend:
    url: str  # ws:// or wss://
    closes: asyncio.Queue[tuple[int | None, str]] = field(default_factory=asyncio.Queue)
    forwarded_proto: list[str] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    client_certs: list[Any] = field(default_factory=list)  # each connection's (getpeercert)


def mtls_context(cert: Cert, client_ca: str, maximum_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A server's context that requires a client certificate issued by (or
    being) `client_ca`; up to `maximum_version` of TLS."""
    ctx = server_context(cert.cert, cert.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return ctx


@contextlib.asynccontextmanager
async def echo_backend(cert: Cert | None = None, ctx: ssl.SSLContext | None = None) -> AsyncIterator[Backend]:
    """A `websockets` echo server, over TLS with `cert` (or `ctx`); "close
    CODE REASON" makes it close. It records each connection's
    X-Forwarded-Proto, the SNI name it was asked for, the client certificate
    it got, and the close it saw."""
    backend = Backend("")
    if cert is not None and ctx is None:
        ctx = server_context(cert.cert, cert.key)
    if ctx is not None:
        ctx.sni_callback = lambda _sock, name, _ctx: backend.sni.append(name)

    async def handler(ws: ServerConnection) -> None:
        backend.forwarded_proto.append(ws.request.headers.get("X-Forwarded-Proto", ""))
        backend.client_certs.append(ws.transport.get_extra_info("peercert"))
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close "):
                    _, code, reason = message.split(" ", 2)
                    await ws.close(int(code), reason)
                    return
                await ws.send(message)
        finally:
            await ws.wait_closed()
            backend.closes.put_nowait((ws.close_code, ws.close_reason))

    async with websockets_backend(handler, ssl=ctx) as (url, _):
        backend.url = url.replace("ws://", "wss://") if ctx else url
        yield backend


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def https_backend(ctx: ssl.SSLContext, handle: Handler | None = None) -> AsyncIterator[str]:
    """An https:// server running `handle` for each connection (by default:
    answering every request 200 with the common name of the client
    certificate it got); yields its URL."""

    async def common_name_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = common_name(writer.get_extra_info("peercert")).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle or common_name_of, "127.0.0.1", 0, ssl=ctx)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def http_get(port: int, path: str = "/") -> bytes:
    """One plain HTTP request to the listener; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode())
        return await read_until_eof(reader)
    finally:
        writer.close()


async def refused(url: str, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    return info.value


async def read_until_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


# --- the listener ---------------------------------------------------------------


async def test_a_wss_client_through_to_a_ws_backend(local_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls) as running:
        async with connect(running.url("/secure", "wss"), ssl=client_context(local_cert.cert), max_size=None) as ws:
            ssl_object = ws.transport.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "http/1.1"
            for message in ("over tls", "y" * 200_000, os.urandom(70_000)):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 10) == message
            await ws.send("close 4001 tls bye")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "tls bye")
        events = await running.until(lambda e: len(of_type(e, ev.Closed)) == 1)
        assert tls_rejections(running.listener.stats()) == {"tls_error": 0, "tls_timeout": 0, "not_tls": 0}
    assert backend.forwarded_proto == ["https"]
    closed_event = of_type(events, ev.Closed)[0]
    assert (closed_event.code, closed_event.reason, closed_event.initiator) == (4001, "tls bye", "upstream")


async def test_pem_files_saved_with_a_byte_order_mark_are_read(
    local_cert: Cert, named_cert: Cert, tmp_path: Path
) -> None:
    """An editor's UTF-8 BOM before the BEGIN line: the file read as holding
    no certificate (new8), as OpenSSL's "no start line"; in a bundle `cat`
    made of such files, that file's certificate was dropped without a word:
    a CA lost, its upstream 502 UnknownIssuer (new9)."""
    bom = b"\xef\xbb\xbf"
    cert, key = tmp_path / "bom.crt", tmp_path / "bom.key"
    cert.write_bytes(bom + Path(local_cert.cert).read_bytes())
    key.write_bytes(bom + bom + Path(local_cert.key).read_bytes())
    bundle = tmp_path / "bundle.pem"  # another CA first, then the upstream's, with its mark
    bundle.write_bytes(Path(named_cert.cert).read_bytes() + bom + Path(local_cert.cert).read_bytes())
    tls = ListenerTLS(cert_file=str(cert), key_file=str(key))
    async with (
        echo_backend(local_cert) as backend,
        native(backend.url, tls=tls, upstream_tls=UpstreamTLS(ca_file=str(bundle))) as running,
        connect(running.url("/", "wss"), ssl=client_context(local_cert.cert)) as ws,
    ):
        await ws.send("bom")
        assert await asyncio.wait_for(ws.recv(), 10) == "bom"


async def test_a_plain_http_request_to_the_tls_port_is_told_so(local_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.listener.port)
        try:
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = await read_until_eof(reader)
        finally:
            writer.close()
        stats = running.listener.stats()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"this port speaks TLS" in answer
    assert tls_rejections(stats) == {"tls_error": 0, "tls_timeout": 0, "not_tls": 1}
    assert stats.opened == 0 and backend.forwarded_proto == []


async def test_out_of_descriptors_a_tls_connection_is_closed_and_counted(local_cert: Cert) -> None:
    # The listener's reserve descriptor accepts it (tests/test_hardening_limits.py:
    # fd_limit), but a 503 would need a TLS handshake: it is closed at once.
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls) as running:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with no_descriptor_left():
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", running.listener.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            answer = await asyncio.wait_for(read_until_eof(reader), 10)
        writer.close()
        await writer.wait_closed()
        stats = running.listener.stats()
    assert answer == b""
    assert stats.rejected["fd_limit"] == 1
    assert tls_rejections(stats) == {"tls_error": 0, "tls_timeout": 0, "not_tls": 0}


async def test_a_stalled_tls_handshake_is_cut_at_the_handshake_timeout(local_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls, handshake_timeout=0.5) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.listener.port)
        try:
            # The first bytes of a ClientHello record (handshake, TLS 1.0
            # record version, 512 bytes announced), then nothing more.
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            assert await read_until_eof(reader) == b""
        finally:
            writer.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5  # counted as its task ends, just after the EOF
        while running.listener.stats().rejected["tls_timeout"] == 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        stats = running.listener.stats()
    assert tls_rejections(stats) == {"tls_error": 0, "tls_timeout": 1, "not_tls": 0}
    assert stats.active == 0


async def test_a_client_that_refuses_the_certificate_is_counted(local_cert: Cert, named_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls) as running:
        # This client trusts another certificate: it aborts the handshake.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(running.url("/", "wss"), ssl=client_context(named_cert.cert)):
                pass
        # Counted and logged (the request_rejected line), with rustls' reason.
        events = await running.until(lambda e: len(of_type(e, RequestRejected)) == 1)
        stats = running.listener.stats()
    assert tls_rejections(stats) == {"tls_error": 1, "tls_timeout": 0, "not_tls": 0}
    line = of_type(events, RequestRejected)[0]
    assert (line.reason, line.status, line.peer) == ("tls_error", None, "127.0.0.1")
    # (OpenSSL's client, refusing the certificate, leaves: "tls handshake eof".)
    assert re.fullmatch(r"loopwatch: TLS handshake failed: \w.*", line.message), line.message
    assert backend.forwarded_proto == []


async def test_a_client_offering_only_h2_is_told_why(local_cert: Cert) -> None:
    """An h2-only client is refused (no_application_protocol, as nginx without
    http2); the log said "peer doesn't support any known protocol", which
    reads as TLS versions (the tls probe)."""
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls) as running:
        h2_only = ssl.create_default_context(cafile=local_cert.cert)
        h2_only.set_alpn_protocols(["h2"])
        with pytest.raises(ssl.SSLError, match="no application protocol"):
            await asyncio.open_connection("127.0.0.1", running.listener.port, ssl=h2_only, server_hostname="127.0.0.1")
        events = await running.until(lambda e: len(of_type(e, RequestRejected)) == 1)
        stats = running.listener.stats()
    assert tls_rejections(stats) == {"tls_error": 1, "tls_timeout": 0, "not_tls": 0}
    line = of_type(events, RequestRejected)[0]
    assert line.message == (
        "loopwatch: TLS handshake failed: the client offered no ALPN protocol loopwatch speaks "
        "(it offers http/1.1 only; h2 is not served)"
    )


async def ended_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the peer closed the connection (or reset it: the bytes sent were
    left unread) within `seconds`, sending nothing."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_stalled_tls_handshakes_count_against_their_address_caps(local_cert: Cert) -> None:
    """The per-address caps were taken after the TLS handshake: one address
    stalling handshakes filled max_connections, and every other got 503."""
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    caps = {"max_connections": 12, "max_connections_per_address": 8, "max_heads_per_address": 4}
    async with echo_backend() as backend, native(backend.url, tls=tls, **caps) as running:
        stalled = []
        try:
            for _ in range(10):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", running.listener.port, local_addr=("127.0.0.2", 0)
                )
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
                stalled.append((reader, writer))
            # Its 4 half-open handshakes are all it gets: the 6 others (whichever
            # the listener's threads admitted last) are closed at once, with no TLS
            # yet to answer 503 in, long before the 10 s handshake timeout.
            ends = await asyncio.gather(*(ended_within(reader, 3.0) for reader, _ in stalled))
            assert sorted(ends) == [False] * 4 + [True] * 6
            assert running.listener.stats().rejected["address_limit"] == 6
            # Another address still gets in.
            async with connect(running.url("/ok", "wss"), ssl=client_context(local_cert.cert)) as ws:
                await ws.send("through")
                assert await asyncio.wait_for(ws.recv(), 10) == "through"
        finally:
            for _, writer in stalled:
                writer.close()
        stats = await running.idle_stats()
    assert stats.rejected["address_limit"] == 6 and stats.rejected["overload"] == 0


async def test_tls_handshakes_over_max_connections_are_bounded(local_cert: Cert) -> None:
    """max_connections was checked after the TLS handshake: with the address
    caps beside it (a fleet of addresses, an IPv6 /64), stalled handshakes held
    a descriptor each until the process had none (the tls probe: 1 000 from
    100 addresses over a cap of 100, the admin port and every client failing,
    0 counted `overload`). A tenth over the cap is answered 503 after its
    handshake; beyond it a connection is closed before the handshake."""
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    caps = {"max_connections": 10, "max_connections_per_address": None, "max_heads_per_address": None}
    async with echo_backend() as backend, native(backend.url, tls=tls, **caps) as running:
        stalled = []
        try:
            for _ in range(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", running.listener.port)
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
                stalled.append((reader, writer))
            ends = await asyncio.gather(*(ended_within(reader, 1.0) for reader, _ in stalled))
            assert ends == [False] * 10
            # The 11th is over the cap by no more than a tenth: its handshake
            # done, it is told why.
            with pytest.raises(InvalidStatus) as refused_503:
                async with connect(running.url("/", "wss"), ssl=client_context(local_cert.cert)):
                    pass
            assert refused_503.value.response.status_code == 503
            assert running.listener.stats().rejected["overload"] == 1
            # The 11th held, the next ones are closed at once, long before the
            # handshake timeout (10 s).
            for _ in range(6):
                reader, writer = await asyncio.open_connection("127.0.0.1", running.listener.port)
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                stalled.append((reader, writer))
            ends = await asyncio.gather(*(ended_within(reader, 3.0) for reader, _ in stalled[10:]))
            assert sorted(ends) == [False] + [True] * 5
            assert running.listener.stats().rejected["overload"] == 6
        finally:
            for _, writer in stalled:
                writer.close()
        # Under the cap again (once the listener has seen the stalled ones
        # go): in.
        async with asyncio.timeout(10):
            while running.listener.stats().active:
                await asyncio.sleep(0.02)
        async with connect(running.url("/ok", "wss"), ssl=client_context(local_cert.cert)) as ws:
            await ws.send("through")
            assert await asyncio.wait_for(ws.recv(), 10) == "through"
        stats = await running.idle_stats()
    assert stats.rejected["overload"] == 6 and stats.rejected["address_limit"] == 0


async def test_a_refusal_is_answered_over_tls(local_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    async with echo_backend() as backend, native(backend.url, tls=tls, reject_with="http-429") as running:
        running.table.set_cooldown("127.0.0.1", 30.0)
        err = await refused(running.url("/", "wss"), ssl=client_context(local_cert.cert))
        events = await running.until(lambda e: bool(of_type(e, ev.Rejected)))
    assert err.response.status_code == 429
    assert "Retry-After" in err.response.headers
    assert of_type(events, ev.Rejected)[0].reason == "cooldown"
    assert backend.forwarded_proto == []


# --- wss:// upstreams -------------------------------------------------------------


async def test_a_wss_upstream_verified_with_ca_file(local_cert: Cert) -> None:
    upstream_tls = UpstreamTLS(ca_file=local_cert.cert)
    async with echo_backend(local_cert) as backend, native(backend.url, upstream_tls=upstream_tls) as running:
        async with connect(running.url("/up"), max_size=None) as ws:
            await ws.send("to a wss upstream")
            assert await asyncio.wait_for(ws.recv(), 10) == "to a wss upstream"
            await ws.close(4002, "done")
        assert await asyncio.wait_for(backend.closes.get(), 5) == (4002, "done")
        events = await running.until(lambda e: len(of_type(e, ev.Closed)) == 1)
    # An IP address is verified against the certificate's IP names; no SNI.
    assert backend.sni == [None]
    assert backend.forwarded_proto == ["http"]
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (4002, "done", "client")


async def test_an_untrusted_upstream_is_502_and_a_tls_failure(local_cert: Cert, named_cert: Cert) -> None:
    # The system's CA store (no ca_file), and a ca_file of another certificate:
    # neither trusts the backend's.
    for upstream_tls in (UpstreamTLS(), UpstreamTLS(ca_file=named_cert.cert)):
        async with echo_backend(local_cert) as backend, native(backend.url, upstream_tls=upstream_tls) as running:
            err = await refused(running.url("/up"))
            events = await running.until(lambda e: bool(of_type(e, ev.HandshakeFailed)))
            stats = await running.idle_stats()
        assert err.response.status_code == 502
        assert b"TLS" in err.response.body
        failed = of_type(events, ev.HandshakeFailed)[0]
        assert (failed.status, failed.error) == (None, "tls")
        # The backend's certificate is self-signed, marked a CA: its issuer is
        # untrusted (webpki's CaUsedAsEndEntity sent operators elsewhere).
        assert failed.detail == "invalid peer certificate: UnknownIssuer", failed.detail
        assert (stats.handshake_failed, stats.opened, stats.active) == (1, 0, 0)
        assert backend.forwarded_proto == []


@contextlib.contextmanager
def alerting_tls_backend(ctx: ssl.SSLContext) -> Iterator[int]:
    """A TLS server on a thread, for handshakes that fail: it handshakes with
    blocking OpenSSL, which sends its alert when it refuses the client
    (asyncio's server closes without one), reads a request and closes.
    Yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(ssl.SSLError, OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_an_upstream_refusing_loopwatch_without_a_client_certificate_is_a_tls_failure(
    local_cert: Cert, named_cert: Cert, version: ssl.TLSVersion
) -> None:
    """An upstream that requires a client certificate, and gets none. Over
    TLS 1.2 it refuses within the handshake. Over TLS 1.3 loopwatch's side of
    the handshake is done before the upstream checks, and its refusal (the
    alert certificate_required) arrives at the first read, of the upgrade's
    answer or the response's head: that was error `closed`, "upstream closed
    during the handshake" (and "upstream unreachable: closed the connection
    without answering" for https://), sending the operator to the network."""
    upstream_tls = UpstreamTLS(ca_file=local_cert.cert)
    alert = "CertificateRequired" if version == ssl.TLSVersion.TLSv1_3 else "HandshakeFailure"
    with alerting_tls_backend(mtls_context(local_cert, named_cert.cert, maximum_version=version)) as port:
        async with native(f"wss://127.0.0.1:{port}", upstream_tls=upstream_tls) as running:
            err = await refused(running.url("/mtls"))
            events = await running.until(lambda e: bool(of_type(e, ev.HandshakeFailed)))
            stats = await running.idle_stats()
        assert err.response.status_code == 502
        assert err.response.body == b"loopwatch: upstream TLS handshake failed\n"
        assert of_type(events, ev.HandshakeFailed)[0].error == "tls"
        assert (stats.handshake_failed, stats.opened) == (1, 0)
        async with native(f"https://127.0.0.1:{port}", upstream_tls=upstream_tls) as running:
            answer = await http_get(running.listener.port)
            events = await running.until(lambda e: bool(of_type(e, RequestRejected)))
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert answer.endswith(b"\r\n\r\nloopwatch: upstream TLS handshake failed\n"), answer
    line = of_type(events, RequestRejected)[0]
    assert (line.reason, line.status) == ("upstream_error", 502)
    # With rustls' reason: the alert the upstream sent.
    assert line.message == f"loopwatch: upstream TLS handshake failed: received fatal alert: {alert}", line


def common_name(peercert: Any) -> str:
    return "".join(v for rdn in (peercert or {}).get("subject", ()) for k, v in rdn if k == "commonName")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_a_client_certificate_for_upstreams_that_require_one(
    local_cert: Cert, named_cert: Cert, version: ssl.TLSVersion
) -> None:
    """Mutual TLS: `upstream_tls.cert_file` and `key_file` are presented to
    every wss:// and https:// upstream (and to the health probe, which
    connects as they do). Without them such an upstream refuses loopwatch
    (the test above); a reload that sets them applies to the next
    connections."""
    client = UpstreamTLS(ca_file=local_cert.cert, cert_file=named_cert.cert, key_file=named_cert.key)
    ctx = mtls_context(local_cert, named_cert.cert, maximum_version=version)
    async with echo_backend(ctx=ctx) as backend:
        async with native(backend.url, upstream_tls=UpstreamTLS(ca_file=local_cert.cert)) as running:
            err = await refused(running.url("/mtls"))
            assert err.response.status_code == 502
            running.listener.reload(listener_config([("/", backend.url)], upstream_tls=client))
            async with connect(running.url("/mtls"), max_size=None) as ws:
                for message in ("with a client certificate", os.urandom(100_000)):
                    await ws.send(message)
                    assert await asyncio.wait_for(ws.recv(), 10) == message
            answer = await asyncio.to_thread(running.listener.probe, "/probe", None, 5.0)
            assert (answer.status, answer.error) == (101, "")
            events = await running.until(lambda e: len(of_type(e, ev.Closed)) == 1)
        assert [common_name(c) for c in backend.client_certs] == ["loopwatch test backend.internal"] * 2
        assert len(of_type(events, ev.HandshakeFailed)) == 1  # the refusal before the reload
    async with https_backend(ctx) as url, native(url, upstream_tls=client) as running:
        answer = await http_get(running.listener.port)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.endswith(b"\r\n\r\nloopwatch test backend.internal"), answer


async def test_verify_false_accepts_any_certificate(named_cert: Cert) -> None:
    # backend.internal's certificate, trusted by nobody, reached as 127.0.0.1.
    upstream_tls = UpstreamTLS(verify=False)
    async with (
        echo_backend(named_cert) as backend,
        native(backend.url, upstream_tls=upstream_tls) as running,
        connect(running.url("/"), max_size=None) as ws,
    ):
        await ws.send("unverified")
        assert await asyncio.wait_for(ws.recv(), 10) == "unverified"
    assert backend.forwarded_proto == ["http"]


async def test_server_name_is_the_sni_and_the_verified_name(named_cert: Cert) -> None:
    good = UpstreamTLS(ca_file=named_cert.cert, server_name="backend.internal")
    async with (
        echo_backend(named_cert) as backend,
        native(backend.url, upstream_tls=good) as running,
        connect(running.url("/sni"), max_size=None) as ws,
    ):
        await ws.send("named")
        assert await asyncio.wait_for(ws.recv(), 10) == "named"
    assert backend.sni == ["backend.internal"]
    # The URL's host (127.0.0.1) is not in that certificate; another name is not either.
    for upstream_tls in (
        UpstreamTLS(ca_file=named_cert.cert),
        UpstreamTLS(ca_file=named_cert.cert, server_name="other.example"),
    ):
        async with echo_backend(named_cert) as backend, native(backend.url, upstream_tls=upstream_tls) as running:
            err = await refused(running.url("/sni"))
            events = await running.until(lambda e: bool(of_type(e, ev.HandshakeFailed)))
        assert err.response.status_code == 502
        assert of_type(events, ev.HandshakeFailed)[0].error == "tls"


async def test_the_health_probe_verifies_as_the_connections_do(named_cert: Cert) -> None:
    """The health check's probe goes through the listener's connector: with
    `server_name` it reaches and verifies an upstream at an IP address as the
    connections do (a probe of its own, Python's ssl with the URL's host, failed
    it: /readyz 503 and the upstream breaker open in front of a healthy upstream)."""
    good = UpstreamTLS(ca_file=named_cert.cert, server_name="backend.internal")
    async with echo_backend(named_cert) as backend, native(backend.url, upstream_tls=good) as running:
        answer = await asyncio.to_thread(running.listener.probe, "/probe?x=1", "Bearer t", 5.0)
        assert (answer.status, answer.error) == (101, "")
        assert backend.sni == ["backend.internal"]
    async with echo_backend(named_cert) as backend, native(backend.url, upstream_tls=UpstreamTLS(ca_file=named_cert.cert)) as running:
        answer = await asyncio.to_thread(running.listener.probe, "/", None, 5.0)
    # The URL's host (127.0.0.1) is not in the certificate: failed, as a connection would.
    assert answer.status is None and answer.error.startswith("upstream TLS handshake failed"), answer


async def test_an_upstream_silent_after_connect_is_a_504_timeout() -> None:
    """TCP and TLS together within limits.connect_timeout: a backend that
    accepts but never answers the ClientHello is a connect timeout."""
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.setblocking(False)
        port = silent.getsockname()[1]
        async with native(f"wss://127.0.0.1:{port}", connect_timeout=0.5) as running:
            err = await refused(running.url("/"))
            events = await running.until(lambda e: bool(of_type(e, ev.HandshakeFailed)))
            with contextlib.suppress(BlockingIOError):
                accepted.append(silent.accept()[0])
        for conn in accepted:
            conn.close()
    assert err.response.status_code == 504
    assert of_type(events, ev.HandshakeFailed)[0].error == "timeout"


async def test_a_half_close_toward_a_tls_upstream_closes_both(local_cert: Cert) -> None:
    """TLS cannot half-close (docs/relay.md): a client's close frame and FIN
    reach the wss:// backend as its close frame and the end of the connection,
    and the client's connection ends too."""
    upstream_tls = UpstreamTLS(ca_file=local_cert.cert)
    async with echo_backend(local_cert) as backend, native(backend.url, upstream_tls=upstream_tls) as running:
        raw = await RawClient.connect(running.listener.port)
        await raw.send(frame(CLOSE, close_payload(1000, "done"), mask=b"abcd"))
        raw.writer.write_eof()
        await raw.read_to_eof()
        raw.writer.close()
        assert await asyncio.wait_for(backend.closes.get(), 5) == (1000, "done")
        events = await running.until(lambda e: len(of_type(e, ev.Closed)) == 1)
        assert running.listener.stats().active == 0
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1000, "done", "client")


# --- both sides ---------------------------------------------------------------------


async def test_tls_on_both_legs_a_sixteen_mib_message_and_close_codes(local_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    upstream_tls = UpstreamTLS(ca_file=local_cert.cert, server_name="localhost")
    message = os.urandom(16 * MiB)
    async with (
        echo_backend(local_cert) as backend,
        native(backend.url, tls=tls, upstream_tls=upstream_tls) as running,
    ):
        url, ctx = running.url("/both", "wss"), client_context(local_cert.cert)
        async with connect(url, ssl=ctx, max_size=None) as ws:
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 60) == message
            await ws.close(4321, "client says bye")
        assert await asyncio.wait_for(backend.closes.get(), 5) == (4321, "client says bye")
        async with connect(url, ssl=ctx) as ws:
            await ws.send("close 4002 " + "r" * 100)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "r" * 100)
        events = await running.until(lambda e: len(of_type(e, ev.Closed)) == 2)
    assert backend.sni == ["localhost", "localhost"]
    assert backend.forwarded_proto == ["https", "https"]
    codes = sorted((e.code, e.initiator) for e in of_type(events, ev.Closed))
    assert codes == [(4002, "upstream"), (4321, "client")]


async def test_stop_closes_tls_legs_with_1001(local_cert: Cert) -> None:
    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    upstream_tls = UpstreamTLS(ca_file=local_cert.cert)
    async with echo_backend(local_cert) as backend:
        queue, table = EventQueue(), EnforcementTable()
        listener = NativeListener.start(
            [("/", backend.url)], queue=queue, table=table, threads=1, tls=tls, upstream_tls=upstream_tls
        )
        try:
            url = f"wss://127.0.0.1:{listener.port}/"
            async with connect(url, ssl=client_context(local_cert.cert)) as ws:
                await ws.send("hello")
                assert await asyncio.wait_for(ws.recv(), 10) == "hello"
                stopping = asyncio.create_task(asyncio.to_thread(listener.stop, 5.0))
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert await asyncio.wait_for(stopping, 10) == 0
        finally:
            listener.stop(1.0)
        assert (await asyncio.wait_for(backend.closes.get(), 5))[0] == 1001


async def test_plain_http_over_tls_on_both_legs_reuses_the_upstream_connection(local_cert: Cert) -> None:
    """HTTPS from the client, https:// upstream: keep-alive on the client's
    connection, and one upstream TLS connection kept idle in the pool and
    reused by the next client (through the TLS session tickets the backend
    sends after its handshake)."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                proto = re.search(rb"(?i)\r\nx-forwarded-proto: *([^\r]*)", head)
                body = b"ok " + (proto.group(1) if proto else b"-")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    tls = ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.key)
    upstream_tls = UpstreamTLS(ca_file=local_cert.cert)
    async with (
        https_backend(server_context(local_cert.cert, local_cert.key), handle) as url,
        native(url, tls=tls, upstream_tls=upstream_tls) as running,
    ):
        for _ in range(2):  # two clients, one after the other, two requests each
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", running.listener.port, ssl=client_context(local_cert.cert)
            )
            try:
                for _ in range(2):
                    writer.write(b"GET /x HTTP/1.1\r\nHost: example.test\r\n\r\n")
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    assert head.startswith(b"HTTP/1.1 200 "), head
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                    assert length is not None
                    assert await reader.readexactly(int(length.group(1))) == b"ok https"
            finally:
                writer.close()
        stats = running.listener.stats()
    assert accepted == 1
    assert tls_rejections(stats) == {"tls_error": 0, "tls_timeout": 0, "not_tls": 0}


async def test_a_body_framed_by_an_upstream_close_without_close_notify_is_whole(local_cert: Cert) -> None:
    """The upstream probe: an https:// upstream answering with a body framed by
    its close, and closing TCP without a TLS close_notify (as many servers do):
    the client got the body and then an RST with no last chunk (curl exit 56),
    counted as the upstream's cut. nginx, HAProxy and the relay take that end
    as an end."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, until the close")
        await writer.drain()
        await asyncio.sleep(0.2)  # out of the TLS layer's buffers
        writer.transport.abort()  # no close_notify

    async with (
        https_backend(server_context(local_cert.cert, local_cert.key), handle) as url,
        native(url, upstream_tls=UpstreamTLS(ca_file=local_cert.cert)) as running,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.listener.port)
        try:
            writer.write(b"GET /x HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)  # to the end: a FIN, not an RST
        finally:
            writer.close()
        stats = running.listener.stats()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" in head.lower()
    assert body.endswith(b"\r\n0\r\n\r\n") and b"all of it, until the close" in body
    assert stats.rejected["upstream_cut"] == 0


# --- settings ---------------------------------------------------------------------


def test_bad_tls_settings_name_the_file(local_cert: Cert, named_cert: Cert, tmp_path: Path) -> None:
    queue, table = EventQueue(), EnforcementTable()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    missing = str(tmp_path / "missing.pem")
    encrypted = tmp_path / "encrypted-key.pem"  # was "no private key … (PEM expected)"
    key = serialization.load_pem_private_key(Path(local_cert.key).read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    # OpenSSL's traditional format, as `openssl genrsa -aes256` writes it (a
    # `Proc-Type: 4,ENCRYPTED` header): was "is not valid PEM: base64 decode error".
    traditional = tmp_path / "traditional-encrypted-key.pem"
    traditional.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    assert b"Proc-Type: 4,ENCRYPTED" in traditional.read_bytes()
    # Over 64 KiB of DER (2000 names), more than rustls reads: was "invalid
    # peer certificate: BadEncoding", blaming a peer.
    (tmp_path / "big").mkdir()
    names = [f"host-{i:05d}.a-long-enough-name.loopwatch.test" for i in range(2000)]
    big = Cert(*self_signed_cert(tmp_path / "big", names))
    pem_body = "".join(Path(big.cert).read_text().splitlines()[1:-1])
    assert len(base64.b64decode(pem_body)) > 64 * 1024
    too_large = r"the first certificate in .*: it is \d+ bytes of DER, too large for loopwatch's TLS library"

    def start(url: str = "ws://127.0.0.1:9", **kwargs: Any) -> None:
        NativeListener.start([("/", url)], queue=queue, table=table, threads=1, **kwargs).stop(1.0)

    # Valid keys of kinds rustls does not take: was "failed to parse private
    # key as RSA, ECDSA, or EdDSA", as if the file were corrupt.
    untaken = {
        "rsa-1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "p-521": ec.generate_private_key(ec.SECP521R1()),
    }
    for name, other_key in untaken.items():
        (tmp_path / f"{name}.pem").write_bytes(
            other_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    kind = "is of a kind or size loopwatch's TLS library does not take: it takes RSA keys of 2048 to 4096 bits"
    # A file cut short and one with a line that is no base64: were said in
    # Rust's debug form ("missing section end marker: [67, 69, 82, …]",
    # "InvalidCharacter(33)": the tls probe).
    lines = Path(local_cert.cert).read_text().splitlines(keepends=True)
    cut_short = tmp_path / "cut-short.pem"
    cut_short.write_text("".join(lines[:-1]))
    not_base64 = tmp_path / "not-base64.pem"
    not_base64.write_text("".join([lines[0], "!!!!" + lines[1][4:], *lines[2:]]))
    # A key whose line breaks were lost (pasted into a Secret as one line):
    # its error said the whole key (the new7 probe), whole or cut short.
    key_lines = Path(local_cert.key).read_text().split()
    one_line_key = tmp_path / "one-line-key.pem"
    one_line_key.write_text(" ".join(key_lines) + "\n")
    one_line_cut = tmp_path / "one-line-key-cut.pem"
    one_line_cut.write_text(" ".join(key_lines)[:200] + "\n")
    key_body = "".join(line for line in key_lines if not line.startswith("-") and line not in ("PRIVATE", "KEY-----"))

    cases: list[tuple[dict[str, Any], str]] = [
        *(
            ({"tls": ListenerTLS(cert_file=local_cert.cert, key_file=str(tmp_path / f"{name}.pem"))}, "tls.key_file: .* " + kind)
            for name in untaken
        ),
        (
            {"upstream_tls": UpstreamTLS(cert_file=local_cert.cert, key_file=str(tmp_path / "p-521.pem"))},
            "upstream_tls.key_file: .* " + kind,
        ),
        ({"tls": ListenerTLS(cert_file=missing, key_file=local_cert.key)}, "tls.cert_file: cannot read"),
        ({"tls": ListenerTLS(cert_file=str(not_pem), key_file=local_cert.key)}, "tls.cert_file: no certificate"),
        (
            {"tls": ListenerTLS(cert_file=str(cut_short), key_file=local_cert.key)},
            r'tls.cert_file: ".*" is not valid PEM: a BEGIN line without its END line \(the file cut short, or its '
            r"line breaks lost\?\)$",
        ),
        (
            {"tls": ListenerTLS(cert_file=local_cert.cert, key_file=str(one_line_key))},
            r'^tls.key_file: "[^"]*" is not valid PEM: a (BEGIN line without its END line|malformed BEGIN line)\b[^=]*$',
        ),
        (
            {"tls": ListenerTLS(cert_file=local_cert.cert, key_file=str(one_line_cut))},
            r'^tls.key_file: "[^"]*" is not valid PEM: a (BEGIN line without its END line|malformed BEGIN line)\b[^=]*$',
        ),
        (
            {"tls": ListenerTLS(cert_file=str(not_base64), key_file=local_cert.key)},
            r'tls.cert_file: ".*" is not valid PEM: a line between BEGIN and END is not base64$',
        ),
        ({"tls": ListenerTLS(cert_file=local_cert.cert, key_file=local_cert.cert)}, "tls.key_file: no private key"),
        ({"tls": ListenerTLS(cert_file=local_cert.cert, key_file=named_cert.key)}, "is not the key of"),
        ({"tls": ListenerTLS(cert_file=local_cert.cert, key_file=str(encrypted))}, "is an encrypted private key"),
        ({"tls": ListenerTLS(cert_file=local_cert.cert, key_file=str(traditional))}, "is an encrypted private key"),
        ({"tls": ListenerTLS(cert_file=big.cert, key_file=big.key)}, "tls.cert_file: " + too_large),
        ({"url": "wss://127.0.0.1:9", "upstream_tls": UpstreamTLS(ca_file=missing)}, "upstream_tls.ca_file"),
        (
            {"url": "wss://127.0.0.1:9", "upstream_tls": UpstreamTLS(ca_file=big.cert)},
            r"upstream_tls.ca_file: a certificate in .* cannot be a trust anchor: it is \d+ bytes of DER, too large",
        ),
        ({"url": "wss://127.0.0.1:9", "upstream_tls": UpstreamTLS(server_name="a b")}, "upstream_tls.server_name"),
        # The client certificate for upstreams: its files read whatever the routes, as tls:'s.
        ({"upstream_tls": UpstreamTLS(cert_file=missing, key_file=local_cert.key)}, "upstream_tls.cert_file: cannot read"),
        (
            {"upstream_tls": UpstreamTLS(cert_file=str(not_pem), key_file=local_cert.key)},
            "upstream_tls.cert_file: no certificate",
        ),
        (
            {"upstream_tls": UpstreamTLS(cert_file=local_cert.cert, key_file=local_cert.cert)},
            "upstream_tls.key_file: no private key",
        ),
        (
            {"upstream_tls": UpstreamTLS(cert_file=local_cert.cert, key_file=named_cert.key)},
            "upstream_tls.key_file: the key in .* is not the key of the certificate in",
        ),
        (
            {"upstream_tls": UpstreamTLS(cert_file=local_cert.cert, key_file=str(traditional))},
            "upstream_tls.key_file: .* is an encrypted private key",
        ),
        ({"upstream_tls": UpstreamTLS(cert_file=big.cert, key_file=big.key)}, "upstream_tls.cert_file: " + too_large),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            start(**kwargs)
        names_a_file = missing in str(info.value) or any(
            path in str(info.value)
            for path in (str(not_pem), str(encrypted), str(traditional), big.cert, local_cert.cert, local_cert.key, named_cert.key, str(tmp_path))
        )
        assert names_a_file or "server_name" in message, info.value
        assert key_body[:40] not in str(info.value) and key_body[-40:] not in str(info.value), info.value
    # A ca_file is read whatever the routes (a wrong one fails now, not at the
    # reload that adds the first wss:// route); not with verification off,
    # which reads no CA.
    with pytest.raises(ValueError, match="upstream_tls.ca_file: cannot read"):
        start(upstream_tls=UpstreamTLS(ca_file=missing))
    start(upstream_tls=UpstreamTLS(ca_file=missing, verify=False))
    start(upstream_tls=UpstreamTLS(ca_file=local_cert.cert))
    start(url="wss://127.0.0.1:9", upstream_tls=UpstreamTLS(ca_file=local_cert.cert))
    client = UpstreamTLS(cert_file=named_cert.cert, key_file=named_cert.key)
    start(upstream_tls=client)
    start(url="https://127.0.0.1:9", upstream_tls=client)
