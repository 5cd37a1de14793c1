"""HTTP/1.1 heads: parsing a client's request head, rebuilding it for the upstream,
and the few responses loopwatch writes itself.

Request heads are parsed with httptools (llhttp in strict mode, which already
rejects Content-Length together with Transfer-Encoding, duplicate or
non-numeric Content-Length, invalid header names, CR/LF/NUL in values and
obsolete line folding). Everything here is pure: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

# Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the
# historic Proxy-Connection. The upgrade pair is re-added for WebSockets.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HttpError(Exception):
    """A request loopwatch answers itself with `status` and a one-line body."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        reason: str = "bad_request",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.reason = reason  # its label on loopwatch_requests_rejected_total (proxy/dataplane/boundary.py)


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes  # the raw request-target, path and query as sent
    path: str
    query: str
    version: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # as sent: original case and order
    # The host the client asked for: the absolute-form target's authority, else Host.
    authority: bytes | None = None
    # Lower-case name -> value (duplicates joined with ", "), built on first use:
    # an upgrade asks for half a dozen headers, each would be a scan of them all.
    index: dict[bytes, bytes] | None = field(default=None, repr=False, compare=False)

    def get(self, name: bytes) -> bytes | None:
        """The value of header `name` (lower-case), duplicates joined with ", "."""
        index = self.index
        if index is None:
            index = self.index = header_index(self.headers)
        return index.get(name)

    def tokens(self, name: bytes) -> set[bytes]:
        value = self.get(name)
        if value is None:
            return set()
        return {t.strip().lower() for t in value.split(b",") if t.strip()}

    def header_map(self) -> dict[str, str]:
        """Lower-case names to str values (duplicates joined; Cookie with "; ")."""
        out: dict[str, str] = {}
        for n, v in self.headers:
            name = n.decode("latin-1").lower()
            value = v.decode("latin-1")
            if name in out:
                out[name] += ("; " if name == "cookie" else ", ") + value
            else:
                out[name] = value
        return out

    def text_headers(self) -> TextHeaders:
        """`header_map`'s answers, decoded only for the names asked for: identity
        asks for two or three headers of every upgrade, not for all of them."""
        return TextHeaders(self)

    @property
    def is_websocket_upgrade(self) -> bool:
        return b"websocket" in self.tokens(b"upgrade") and b"upgrade" in self.tokens(b"connection")


class TextHeaders(Mapping[str, str]):
    """A read-only view of a head's headers with lower-case str names and latin-1
    str values, equal to `RequestHead.header_map()` (duplicates joined with ", ",
    Cookie with "; ") but decoding nothing until a name is looked up."""

    __slots__ = ("_head",)

    def __init__(self, head: RequestHead):
        self._head = head

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]  # one signature for Mapping.get's overloads
        try:
            key = name.lower().encode("latin-1")
        except UnicodeEncodeError:
            return default  # no header of the head can have that name
        if key == b"cookie":
            cookies = [v for n, v in self._head.headers if n.lower() == b"cookie"]
            return b"; ".join(cookies).decode("latin-1") if cookies else default
        value = self._head.get(key)
        return default if value is None else value.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return iter(self._head.header_map())

    def __len__(self) -> int:
        return len(self._head.header_map())


def header_index(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Lower-case name -> value, duplicates joined with ", " in order."""
    index: dict[bytes, bytes] = {}
    for n, v in headers:
        name = n.lower()
        prev = index.get(name)
        index[name] = v if prev is None else prev + b", " + v
    return index


class HeadParser:
    """Incremental request-head parser with a size limit.

    feed() returns None until the head is complete, then the RequestHead. For an
    upgrade, the bytes after the head are in `rest`. Body bytes of a plain request
    go to `body_sink`, the end of the message sets `message_done` and calls
    `complete_sink`.
    """

    __slots__ = (
        "_parser", "_url", "_headers", "_size", "_lead", "_started", "_tail", "_max", "head", "rest",
        "upgrade", "headers_done", "message_done", "body_sink", "complete_sink", "pipelined",
        "keep_alive", "early_body",
    )

    def __init__(self, max_head_size: int):
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0  # bytes from the request line on
        self._lead = 0  # CR/LF bytes before the request line (RFC 9112 §2.2)
        self._started = False  # the request line has begun
        self._tail = b""
        self._max = max_head_size
        self.head: RequestHead | None = None
        self.rest = b""
        self.upgrade = False
        self.headers_done = False
        self.message_done = False
        self.body_sink: Callable[[bytes], None] | None = None
        # Body bytes that came in the same read as the head, before a sink was set.
        self.early_body: list[bytes] = []
        self.complete_sink: Callable[[], None] | None = None
        # A next request arrived before this one was answered. loopwatch answers the
        # first and then closes (clients retry), rather than queueing requests.
        self.pipelined = False
        # Whether the client keeps the connection open after this exchange.
        self.keep_alive = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.message_done:
            self.pipelined = True

    def on_url(self, url: bytes) -> None:
        if not self.pipelined:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.pipelined:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.pipelined:
            return
        self.headers_done = True
        p = self._parser
        version = p.get_http_version()
        if version not in ("1.0", "1.1"):
            if version[:1].isdigit() and int(version.split(".")[0]) >= 2:
                raise HttpError(505, "HTTP version not supported: HTTP/1.1 only", reason="version")
            raise HttpError(400, "unsupported HTTP version", reason="version")
        if version == "1.0" and any(n.lower() == b"transfer-encoding" for n, _ in self._headers):
            # RFC 9112 §6.1: faulty framing. llhttp would read the body as chunked,
            # a server behind that ignores TE in HTTP/1.0 as unframed: refused.
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        # Read here: after the message completes, httptools forgets "Connection: close".
        self.keep_alive = p.should_keep_alive()
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "invalid request target") from None
        path = (url.path or b"/").decode("latin-1")
        if not path.startswith("/"):
            raise HttpError(400, "request target must be an absolute path")
        index = header_index(self._headers)
        authority = index.get(b"host")
        # ", " in the value: joined duplicates, or one value that is no valid host.
        if (
            authority is not None
            and b", " in authority
            and sum(1 for n, _ in self._headers if n.lower() == b"host") > 1
        ):
            raise HttpError(400, "more than one Host header")
        if authority is None and version == "1.1":
            raise HttpError(400, "missing Host")
        target = self._url
        if url.schema:
            # Absolute-form (RFC 9112 §3.2.2): the target's authority replaces Host,
            # and the upstream gets the origin-form.
            if url.schema.lower() not in (b"http", b"https", b"ws", b"wss") or not url.host:
                raise HttpError(400, "invalid request target")
            host = b"[%s]" % url.host if b":" in url.host else url.host
            authority = host if url.port is None else b"%s:%d" % (host, url.port)
            target = (url.path or b"/") + (b"?" + url.query if url.query is not None else b"")
        if authority is not None and not _valid_authority(authority):
            raise HttpError(400, "invalid Host")
        if (
            b"upgrade" in index
            and (b"transfer-encoding" in index or b"content-length" in index)
            and _has_body(index)
            and _has_token(index.get(b"connection"), b"upgrade")
        ):
            # llhttp hands an upgrade over at the end of its head whatever it
            # announces, so the bytes of a body would be taken for frames (or
            # for the next protocol) on one side and for a body on the other.
            raise HttpError(400, "upgrade request with a body", reason="upgrade_with_body")
        self.head = RequestHead(
            method=p.get_method().decode("latin-1"),
            target=target,
            path=path,
            query=(url.query or b"").decode("latin-1"),
            version=version,
            headers=self._headers,
            authority=authority,
            index=index,
        )

    def on_body(self, body: bytes) -> None:
        if self.pipelined:
            return
        if self.body_sink is not None:
            self.body_sink(body)
        else:
            self.early_body.append(body)

    def on_message_complete(self) -> None:
        if self.pipelined:
            return
        self.message_done = True
        if self.complete_sink is not None:
            self.complete_sink()

    def _check_head_size(self, data: bytes) -> None:
        # The limit is on the head alone: measure up to its blank line, which may
        # straddle two reads, so the last three bytes of the previous read are kept.
        # Empty lines before the request line (any number of CR and LF, which
        # llhttp skips, as nginx and HAProxy do) count towards the limit too, and
        # the search for the blank line starts after them: "\r\n\r\n" + a 30 KiB
        # head is a 30 KiB head, not a 4-byte one.
        if not self._started:
            rest = data.lstrip(b"\r\n")
            self._lead += len(data) - len(rest)
            if not rest:
                if self._lead > self._max:
                    raise HttpError(431, "request header fields too large", reason="head_too_large")
                return
            self._started = True
            data = rest
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        head_bytes = self._lead + self._size + (end + 4 - len(self._tail) if end >= 0 else len(data))
        if head_bytes > self._max:
            raise HttpError(431, "request header fields too large", reason="head_too_large")
        self._size += len(data)
        self._tail = window[-3:]

    def feed(self, data: bytes) -> RequestHead | None:
        if not self.headers_done:
            self._check_head_size(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade = True
            self.rest = data[upgrade.args[0] :]
            return self.head
        except httptools.HttpParserError as e:
            # An HttpError raised inside a callback surfaces wrapped by httptools.
            cause = e.__context__
            if isinstance(cause, HttpError):
                raise cause from None
            raise HttpError(400, f"malformed request: {e}") from None
        return self.head if self.headers_done else None

    @property
    def received(self) -> int:
        """Bytes of the request received so far from its request line on: 0 for
        a connection that sent nothing or only empty lines, which is still idle."""
        return self._size

    def release(self) -> None:
        """Done parsing: drop the httptools parser, which holds this object's
        callbacks (a reference cycle the collector would otherwise have to find,
        with the head in it). feed() must not be called afterwards."""
        self._parser = None  # type: ignore[assignment]  # released: never fed again, so not typed Optional


def _has_body(index: dict[bytes, bytes]) -> bool:
    """Whether a request head announces a body: any Transfer-Encoding, or a
    Content-Length other than 0 (llhttp has already refused a malformed one)."""
    if b"transfer-encoding" in index:
        return True
    length = index.get(b"content-length")
    return length is not None and length.strip().lstrip(b"0") != b""


def _has_token(value: bytes | None, token: bytes) -> bool:
    return value is not None and token in {t.strip().lower() for t in value.split(b",")}


def _valid_authority(value: bytes) -> bool:
    """host[:port] as RFC 3986 allows it (reg-name, IPv4, [IPv6]): nothing that could
    smuggle a second value or a path into X-Forwarded-Host."""
    # Deleting every allowed byte leaves the disallowed ones (one C-level pass).
    return bool(value) and not value.translate(None, _AUTHORITY_CHARS)


_AUTHORITY_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;=:[]%"


def validate_websocket_upgrade(head: RequestHead) -> None:
    """RFC 6455 §4.2.1 checks a server would make, answered before any upstream work."""
    if head.method != "GET":
        raise HttpError(400, "websocket upgrade must use GET")
    if head.version != "1.1":
        raise HttpError(400, "websocket upgrade requires HTTP/1.1")
    key = head.get(b"sec-websocket-key")
    if key is None:
        raise HttpError(400, "missing Sec-WebSocket-Key")
    try:
        if len(base64.b64decode(key.strip(), validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HttpError(400, "invalid Sec-WebSocket-Key") from None
    if head.get(b"sec-websocket-version") != b"13":
        raise HttpError(
            426, "unsupported Sec-WebSocket-Version", (("Sec-WebSocket-Version", "13"),),
            reason="upgrade_required",
        )
    if head.authority is None:
        raise HttpError(400, "missing Host")


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers and any header the Connection header names."""
    named: set[bytes] = set()
    for n, v in headers:
        if n.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def upstream_request_head(
    head: RequestHead,
    *,
    target: bytes,
    host: bytes,
    peer: str,
    scheme: str,
    websocket: bool,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The request head sent to the upstream: end-to-end headers as the client sent
    them (order and case kept), Host set to the upstream, X-Forwarded-* added."""
    original_host = head.authority
    forwarded_for = head.get(b"x-forwarded-for")
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (head.method.encode(), target, host)]
    replaced = {n.lower() for n, _ in extra} if extra else ()  # the client's are dropped
    for n, v in end_to_end(head.headers):
        lower = n.lower()
        if lower in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
            continue
        if lower in replaced:
            continue
        lines.append(b"%s: %s\r\n" % (n, v))
    if websocket:
        lines.append(b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    xff = peer.encode() if forwarded_for is None else forwarded_for + b", " + peer.encode()
    lines.append(b"X-Forwarded-For: %s\r\n" % xff)
    lines.append(b"X-Forwarded-Proto: %s\r\n" % scheme.encode())
    if original_host is not None:
        lines.append(b"X-Forwarded-Host: %s\r\n" % original_host)
    for n, v in extra or ():
        lines.append(b"%s: %s\r\n" % (n, v))
    lines.append(b"\r\n")
    return b"".join(lines)


def simple_response(
    status: int,
    message: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    close: bool = True,
) -> bytes:
    """A complete response with a one-line text body."""
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    body = (message or reason).encode("utf-8", "replace") + b"\n"
    out = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
    for n, v in headers:
        out.append(f"{n}: {v}\r\n".encode("latin-1"))
    out.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    out.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


class ResponseHeadParser:
    """Reads the upstream's answer to an upgrade request: a 101 head (whose raw
    bytes are forwarded untouched) or a refusal with a bounded body."""

    __slots__ = (
        "_parser", "_buf", "_max_head", "_max_body", "status", "reason", "headers",
        "headers_done", "body", "body_truncated", "done", "upgrade", "head_bytes", "rest",
    )

    def __init__(self, max_head_size: int, max_body_size: int):
        self._parser = httptools.HttpResponseParser(self)
        self._buf = bytearray()
        self._max_head = max_head_size
        self._max_body = max_body_size
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.body = bytearray()
        self.body_truncated = False
        self.done = False
        self.upgrade = False
        self.head_bytes = b""
        self.rest = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        room = self._max_body - len(self.body)
        if len(body) > room:
            self.body_truncated = True
            body = body[:room]
        self.body += body
        if self.body_truncated:
            self.done = True

    def on_message_complete(self) -> None:
        self.done = True

    def feed(self, data: bytes) -> None:
        """Raises HttpError(502) on a malformed or oversized head."""
        if not self.headers_done:
            self._buf += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade = True
            consumed_before = len(self._buf) - len(data)
            end = consumed_before + upgrade.args[0]
            self.head_bytes = bytes(self._buf[:end])
            self.rest = bytes(self._buf[end:])
            self._buf = bytearray()
            return
        except httptools.HttpParserError as e:
            raise HttpError(502, f"invalid response from upstream: {e}") from None
        if not self.headers_done and len(self._buf) > self._max_head:
            raise HttpError(502, "upstream response head too large")
        if self.headers_done:
            self._buf = bytearray()

    def eof(self) -> None:
        """The upstream closed: a close-delimited body ends here."""
        if self.headers_done:
            self.done = True

    def refusal(self) -> bytes:
        """The upstream's refusal as the client gets it: same status, reason and
        end-to-end headers, the bounded body, then the connection closes."""
        out = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason)]
        for n, v in end_to_end(self.headers):
            if n.lower() == b"content-length":
                continue
            out.append(b"%s: %s\r\n" % (n, v))
        out.append(b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body))
        out.append(bytes(self.body))
        return b"".join(out)

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name]
        return b", ".join(values) if values else None

    def release(self) -> None:
        """Done parsing (see HeadParser.release); the fields read so far stay."""
        self._parser = None  # type: ignore[assignment]  # released: never fed again, so not typed Optional
