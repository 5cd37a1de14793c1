"""Write the shared test vectors from today's Python data plane.

    .venv/bin/python -m tests.vectors.generate

request_heads.json: request heads (named shapes from docs/relay.md and
tests/test_bad_input.py, byte sweeps of every position of the grammar, every
method, size limits, and seeded mutations of valid heads) with the answer of
proxy/dataplane/heads.py + the listener's upgrade checks. frames.json: WebSocket streams
(every violation, every length form, close payloads, fragmentation, size
limits, seeded random streams) cut at chosen places, with what
proxy/dataplane/frames.py forwarded, counted and refused; and close frames built by
build_close_frame. identity.json: request heads under several `identity:`
configurations (tests/vectors/identity_cases.py) with the client key and
address proxy/dataplane/identity.py gives them. The Python code is the reference: tests/test_vectors.py
checks the files still hold its answers, the Rust core's tests replay them.

Deterministic (seeded): running it again on unchanged code rewrites the same
files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tests.test_bad_input import BAD_REQUESTS
from tests.test_frames import frame  # the tests' own frame encoder, lying headers included
from tests.vectors import identity_cases
from tests.vectors.reference import (
    FRAME_BUILDS,
    close_frame_answer,
    expand_cuts,
    frames_answer,
    head_answer,
    identity_answer,
    native_spec,
    text,
    unpack,
)

HERE = Path(__file__).parent
DEFAULT_MAX = 16 * 1024

HOST = b"Host: example.test\r\n"
KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + KEY + b"Sec-WebSocket-Version: 13\r\n"
WS = b"GET /ws?room=1 HTTP/1.1\r\n" + HOST + UPGRADE + b"\r\n"
GET = b"GET /api/items?id=7 HTTP/1.1\r\n" + HOST + b"Accept: */*\r\n\r\n"

# Every method llhttp knows, and a few it does not.
METHODS = [
    "DELETE",
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "COPY",
    "LOCK",
    "MKCOL",
    "MOVE",
    "PROPFIND",
    "PROPPATCH",
    "SEARCH",
    "UNLOCK",
    "BIND",
    "REBIND",
    "UNBIND",
    "ACL",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PATCH",
    "PURGE",
    "MKCALENDAR",
    "LINK",
    "UNLINK",
    "SOURCE",
    "PRI",
    "DESCRIBE",
    "ANNOUNCE",
    "SETUP",
    "PLAY",
    "PAUSE",
    "TEARDOWN",
    "GET_PARAMETER",
    "SET_PARAMETER",
    "REDIRECT",
    "RECORD",
    "FLUSH",
    "QUERY",
    "get",
    "Get",
    "GETS",
    "GE",
    "POS",
    "M-SEARCHX",
    "FOO",
]


def named_heads() -> dict[str, bytes]:
    """Shapes a reader recognises: docs/relay.md's table, test_bad_input's
    requests, smuggling and framing shapes, upgrade variants, targets."""
    cases: dict[str, bytes] = {f"bad-input/{k}": v[0] for k, v in BAD_REQUESTS.items()}
    up = UPGRADE
    cases.update(
        {
            "ws/ok": WS + b"\x81\x85abcd\x29\x07\x0f\x08\x0e",
            "ws/ok-bare": WS,
            "ws/connection-list": WS.replace(
                b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"
            ),
            "ws/upgrade-case": WS.replace(b"Upgrade: websocket", b"Upgrade: WebSocket"),
            "ws/upgrade-list": WS.replace(b"Upgrade: websocket", b"Upgrade: h2c, websocket"),
            "ws/connection-close-upgrade": WS.replace(
                b"Connection: Upgrade", b"Connection: close, upgrade"
            ),
            "ws/connection-twice": WS.replace(
                b"Connection: Upgrade", b"Connection: keep-alive\r\nConnection: upgrade"
            ),
            "ws/proxy-connection": WS.replace(b"Connection: Upgrade", b"Proxy-Connection: Upgrade"),
            "ws/no-connection": WS.replace(b"Connection: Upgrade\r\n", b""),
            "ws/no-upgrade": WS.replace(b"Upgrade: websocket\r\n", b""),
            "ws/empty-upgrade": WS.replace(b"Upgrade: websocket", b"Upgrade:"),
            "ws/upgrade-other": WS.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
            "ws/connection-upgrade2": WS.replace(b"Connection: Upgrade", b"Connection: Upgrade2"),
            "ws/connection-xupgrade": WS.replace(b"Connection: Upgrade", b"Connection: xupgrade"),
            "ws/connection-cupgrade": WS.replace(b"Connection: Upgrade", b"Connection: cupgrade"),
            "ws/connection-keep-upgrade": WS.replace(
                b"Connection: Upgrade", b"Connection: keep-upgrade"
            ),
            "ws/connection-upgrade-space": WS.replace(
                b"Connection: Upgrade", b"Connection: Upgrade  "
            ),
            "ws/connection-upgrade-tab-comma": WS.replace(
                b"Connection: Upgrade", b"Connection: upgrade\t,close"
            ),
            "ws/connection-upgrade-semicolon": WS.replace(
                b"Connection: Upgrade", b"Connection: upgrade;x"
            ),
            "ws/connection-commas": WS.replace(b"Connection: Upgrade", b"Connection: ,upgrade,"),
            "ws/connection-upgrade-then-word": WS.replace(
                b"Connection: Upgrade", b"Connection: upgrade x, close"
            ),
            "ws/version-8": WS.replace(b"Version: 13", b"Version: 8"),
            "ws/version-missing": WS.replace(b"Sec-WebSocket-Version: 13\r\n", b""),
            "ws/version-twice": WS.replace(
                b"Version: 13\r\n", b"Version: 13\r\nSec-WebSocket-Version: 13\r\n"
            ),
            "ws/version-13-space": WS.replace(b"Version: 13", b"Version: 13 "),
            "ws/key-twice": WS.replace(KEY, KEY + KEY),
            "ws/key-spaces": WS.replace(
                KEY, b"Sec-WebSocket-Key:   dGhlIHNhbXBsZSBub25jZQ==  \r\n"
            ),
            "ws/key-noncanonical": WS.replace(
                KEY, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAB==\r\n"
            ),
            "ws/key-one-pad": WS.replace(KEY, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=\r\n"),
            "ws/key-17-bytes": WS.replace(KEY, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=\r\n"),
            "ws/key-excess": WS.replace(
                KEY, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==AAAA\r\n"
            ),
            "ws/key-urlsafe": WS.replace(KEY, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA-_==\r\n"),
            "ws/key-empty": WS.replace(KEY, b"Sec-WebSocket-Key:\r\n"),
            "ws/http-1.0-host": WS.replace(b"HTTP/1.1", b"HTTP/1.0"),
            "ws/http-1.0-no-host": WS.replace(b"HTTP/1.1", b"HTTP/1.0").replace(HOST, b""),
            "ws/post": WS.replace(b"GET ", b"POST "),
            "ws/with-content-length": WS.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
            + b"hello",
            "ws/with-content-length-0": WS.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
            "ws/with-chunked": WS.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            + b"0\r\n\r\n",
            "ws/with-gzip": WS.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "ws/absolute-form": WS.replace(b"/ws?room=1", b"ws://example.test:8080/ws?room=1"),
            "ws/absolute-form-wss-v6": WS.replace(b"/ws?room=1", b"wss://[::1]/ws").replace(
                HOST, b""
            ),
            "connect/authority": b"CONNECT example.test:443 HTTP/1.1\r\n" + HOST + b"\r\n",
            "connect/path": b"CONNECT /x HTTP/1.1\r\n" + HOST + b"\r\n",
            "connect/path-ws": b"CONNECT /x HTTP/1.1\r\n" + HOST + up + b"\r\n",
            "plain/get": GET,
            "plain/get-pipelined": GET + GET,
            "plain/upgrade-without-connection": b"GET / HTTP/1.1\r\n"
            + HOST
            + b"Upgrade: websocket\r\n\r\n",
            "plain/connection-upgrade-only": b"GET / HTTP/1.1\r\n"
            + HOST
            + b"Connection: upgrade\r\n\r\n",
            "plain/http-1.0": b"GET /p HTTP/1.0\r\n\r\n",
            "plain/http-1.0-keep-alive": b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            "plain/http-1.1-close": b"GET /p HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n",
            "plain/rtsp-line": b"OPTIONS / RTSP/1.0\r\n" + HOST + b"\r\n",
            "plain/rtsp-describe": b"DESCRIBE / RTSP/1.0\r\n" + HOST + b"\r\n",
            "plain/rtsp-method-on-http": b"DESCRIBE / HTTP/1.1\r\n" + HOST + b"\r\n",
            "plain/ice-source": b"SOURCE / ICE/1.0\r\n" + HOST + b"\r\n",
            "plain/ice-get": b"GET / ICE/1.0\r\n" + HOST + b"\r\n",
            "plain/pri-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "plain/pri-other": b"PRI / HTTP/1.1\r\n" + HOST + b"\r\n",
            "plain/leading-crlf": b"\r\n" + GET,
            "plain/leading-lf": b"\n" + GET,
            "plain/leading-cr": b"\r" + GET,
            "plain/leading-crlfcrlf": b"\r\n\r\n" + GET,
            "plain/two-spaces-after-method": GET.replace(b"GET ", b"GET   "),
            "plain/two-spaces-after-target": GET.replace(b"=7 ", b"=7   "),
            "plain/tab-after-method": GET.replace(b"GET ", b"GET\t"),
            "plain/space-before-method": b" " + GET,
            "plain/trailing-space-version": GET.replace(b"HTTP/1.1\r\n", b"HTTP/1.1 \r\n"),
            "plain/lower-http": GET.replace(b"HTTP/1.1", b"http/1.1"),
            "plain/http-0.9-line": b"GET /p\r\n" + HOST + b"\r\n",
            "plain/http-0.9-bare-lf": b"GET /p\n\n",
            "plain/version-1.2": GET.replace(b"HTTP/1.1", b"HTTP/1.2"),
            "plain/version-0.9": GET.replace(b"HTTP/1.1", b"HTTP/0.9"),
            "plain/version-3.0": GET.replace(b"HTTP/1.1", b"HTTP/3.0"),
            "plain/version-2.0-with-bad-te": b"GET / HTTP/2.0\r\n"
            + HOST
            + b"Transfer-Encoding: gzip\r\n\r\n",
            "plain/version-2.0-with-bad-cl": b"GET / HTTP/2.0\r\n"
            + HOST
            + b"Content-Length: x\r\n\r\n",
            "plain/version-x": GET.replace(b"HTTP/1.1", b"HTTP/x.1"),
            "plain/version-11": GET.replace(b"HTTP/1.1", b"HTTP/11"),
            "plain/value-trailing-whitespace": b"GET / HTTP/1.1\r\n" + HOST + b"X: a \t \r\n\r\n",
            "plain/value-leading-whitespace": b"GET / HTTP/1.1\r\n" + HOST + b"X: \t a\r\n\r\n",
            "plain/value-only-whitespace": b"GET / HTTP/1.1\r\n" + HOST + b"X:  \t \r\n\r\n",
            "plain/value-empty": b"GET / HTTP/1.1\r\n" + HOST + b"X:\r\n\r\n",
            "plain/value-empty-then-fold": b"GET / HTTP/1.1\r\n" + HOST + b"X:\r\n y\r\n\r\n",
            "plain/value-tab-fold": b"GET / HTTP/1.1\r\n" + HOST + b"X: a\r\n\ty\r\n\r\n",
            "plain/value-obs-text": b"GET / HTTP/1.1\r\n" + HOST + b"X: caf\xc3\xa9 \xff\r\n\r\n",
            "plain/value-del": b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x7fb\r\n\r\n",
            "plain/value-cr-without-lf": b"GET / HTTP/1.1\r\n" + HOST + b"X: a\rb\r\n\r\n",
            "plain/empty-name": b"GET / HTTP/1.1\r\n" + HOST + b": x\r\n\r\n",
            "plain/name-colon-in-value": b"GET / HTTP/1.1\r\n" + HOST + b"X:Y: v\r\n\r\n",
            "plain/end-cr-without-lf": b"GET / HTTP/1.1\r\n" + HOST + b"\rX",
            "plain/end-bare-lf": b"GET / HTTP/1.1\r\n" + HOST + b"\n",
            "plain/request-line-bare-cr": b"GET / HTTP/1.1\r" + HOST + b"\r\n",
            "host/empty": b"GET /p HTTP/1.1\r\nHost:\r\n\r\n",
            "host/port": b"GET /p HTTP/1.1\r\nHost: a:80\r\n\r\n",
            "host/v6": b"GET /p HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            "host/trailing-space": b"GET /p HTTP/1.1\r\nHost: a \r\n\r\n",
            "host/underscore": b"GET /p HTTP/1.1\r\nHost: a_b\r\n\r\n",
            "host/at": b"GET /p HTTP/1.1\r\nHost: u@a\r\n\r\n",
            "host/lowercase-twice": b"GET /p HTTP/1.1\r\nhost: a\r\nHOST: a\r\n\r\n",
            "target/asterisk": b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/fragment": b"GET /p#frag HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/query-question-marks": b"GET /p??a?b HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/empty-query": b"GET /p? HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/double-slash": b"GET //p HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/relative": b"GET p HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/question-first": b"GET ?a HTTP/1.1\r\n" + HOST + b"\r\n",
            "target/high-byte": b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + HOST + b"\r\n",
        }
    )
    for target in [
        b"http://ex.com:81/p?q",
        b"HTTP://EX.com/p",
        b"ws://[::1]/p",
        b"wss://[fe80::1%25eth0]:8443/x?y#z",
        b"https://u:p@ex.com/x",
        b"http://ex.com?only=query",
        b"http://ex.com",
        b"http://ex.com:0080/p",
        b"http://ex.com:65535/",
        b"http://ex.com:65536/",
        b"http://ex.com:/p",
        b"http://:80/p",
        b"http:///p",
        b"http://a_b/p",
        b"http://a@b@c/p",
        b"http://a@@b/p",
        b"http://[::1/p",
        b"http://[]/p",
        b"http://ex.com#frag",
        b"ftp://ex.com/p",
        b"http:/ex.com/p",
        b"http:ex.com/p",
        b"h2c://ex.com/p",
        b"x://y/",
        b"http://ex.com:8a/p",
        b"http://[::1]x/p",
        b"http://1.2.3.4.5/p",
    ]:
        cases[f"target/{text(target)}"] = b"GET " + target + b" HTTP/1.1\r\n" + HOST + b"\r\n"
    for value in [
        b"0", b"5", b"007", b"+5", b"-5", b"5 ", b"5\t", b" 5", b"5, 5", b"5 6", b"0x5", b"five", b"",
        b"18446744073709551615", b"18446744073709551616", b"99999999999999999999999",
    ]:  # fmt: skip
        body = b"hello" if value.strip() in (b"5", b"007") else b""
        cases[f"content-length/{text(value)}"] = (
            b"POST /api HTTP/1.1\r\n" + HOST + b"Content-Length: " + value + b"\r\n\r\n" + body
        )
    for value in [
        b"chunked", b"Chunked", b"CHUNKED", b"chunked ", b"chunked\t", b" chunked", b"gzip, chunked",
        b"gzip,chunked", b"gzip,\tchunked", b"gzip,,chunked", b"gzip;q=1, chunked", b"chunked, gzip",
        b"chunked, chunked", b"chunked , gzip", b"chunked\t, chunked", b"gzip", b"xchunked", b"chunkedx",
        b"cchunked", b"chchunked", b"chunk,chunked", b"gzip, chunked x", b"identity", b"",
    ]:  # fmt: skip
        cases[f"transfer-encoding/{text(value)}"] = (
            b"POST /api HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n"
        )
    for first, second in [
        (b"gzip", b"chunked"), (b"chunked", b"gzip"), (b"chunked", b"chunked"), (b"gzip", b"gzip"),
    ]:  # fmt: skip
        cases[f"transfer-encoding-twice/{text(first)}+{text(second)}"] = (
            b"POST /api HTTP/1.1\r\n"
            + HOST
            + b"Transfer-Encoding: "
            + first
            + b"\r\nTransfer-Encoding: "
            + second
            + b"\r\n\r\n0\r\n\r\n"
        )
    cases["transfer-encoding/http-1.0"] = (
        b"POST /api HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing.
    te = b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    post = b"POST /api HTTP/1.0\r\n"
    for name, head in {
        "host": post + HOST + te,
        "lower-case-name": post + te.lower(),
        "gzip-chunked": post + te.replace(b"chunked", b"gzip, chunked"),
        "gzip": post + b"Transfer-Encoding: gzip\r\n\r\n",
        "identity": b"GET /api HTTP/1.0\r\nTransfer-Encoding: identity\r\n\r\n",
        "chunked-gzip": post + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        "empty": post + b"Transfer-Encoding:\r\n\r\n",
        "keep-alive": b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n" + te,
        "and-content-length": post + b"Content-Length: 5\r\n" + te,
        "upgrade": WS.replace(b"HTTP/1.1", b"HTTP/1.0").replace(b"\r\n\r\n", b"\r\n" + te),
        "bad-target": b"POST p HTTP/1.0\r\n" + te,
        "bad-host": post + b"Host: a b\r\n" + te,
        "rtsp": b"OPTIONS / RTSP/1.0\r\n" + HOST + te,
        "http-1.1-same": b"POST /api HTTP/1.1\r\n" + HOST + te,
        "http-0.9-line": b"POST /api\r\n" + te,
    }.items():
        cases[f"transfer-encoding/http-1.0-{name}"] = head
    cases["transfer-encoding/body"] = (
        b"POST /api HTTP/1.1\r\n"
        + HOST
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    cases["content-length/then-te-empty"] = (
        b"POST /api HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nTransfer-Encoding:\r\n\r\nx"
    )
    for m in METHODS:
        for proto in (b"HTTP/1.1", b"HTTP/1.0", b"RTSP/1.0", b"ICE/1.0"):
            cases[f"method/{m} {text(proto)}"] = (
                m.encode() + b" / " + proto + b"\r\n" + HOST + b"\r\n"
            )
    return cases


def sweeps() -> dict[str, bytes]:
    """Every byte value at every position class of the grammar."""
    positions = {
        "before-method": lambda c: c + GET,
        "after-method": lambda c: b"GET" + c + GET[4:],
        "target-first": lambda c: b"GET " + c + b"a HTTP/1.1\r\n" + HOST + b"\r\n",
        "path": lambda c: b"GET /a" + c + b"b HTTP/1.1\r\n" + HOST + b"\r\n",
        "query": lambda c: b"GET /a?x" + c + b"b HTTP/1.1\r\n" + HOST + b"\r\n",
        "fragment": lambda c: b"GET /a#x" + c + b"b HTTP/1.1\r\n" + HOST + b"\r\n",
        "after-target": lambda c: b"GET /a" + c + b"HTTP/1.1\r\n" + HOST + b"\r\n",
        "version-minor": lambda c: b"GET / HTTP/1." + c + b"\r\n" + HOST + b"\r\n",
        "after-version": lambda c: b"GET / HTTP/1.1" + c + b"\n" + HOST + b"\r\n",
        "name-first": lambda c: b"GET / HTTP/1.1\r\n" + HOST + c + b"Y: v\r\n\r\n",
        "name": lambda c: b"GET / HTTP/1.1\r\n" + HOST + b"X" + c + b"Y: v\r\n\r\n",
        "before-colon": lambda c: b"GET / HTTP/1.1\r\n" + HOST + b"XY" + c + b": v\r\n\r\n",
        "value-first": lambda c: b"GET / HTTP/1.1\r\n" + HOST + b"X: " + c + b"b\r\n\r\n",
        "value": lambda c: b"GET / HTTP/1.1\r\n" + HOST + b"X: a" + c + b"b\r\n\r\n",
        "value-last": lambda c: b"GET / HTTP/1.1\r\n" + HOST + b"X: a" + c + b"\r\n\r\n",
        "host": lambda c: b"GET / HTTP/1.1\r\nHost: a" + c + b"b\r\n\r\n",
        "absolute-server": lambda c: b"GET http://a" + c + b"b/p HTTP/1.1\r\n\r\n",
        "connection": lambda c: WS.replace(b"Connection: Upgrade", b"Connection: Upgrade" + c),
        "content-length": lambda c: (
            b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1" + c + b"\r\n\r\nx"
        ),
        "key": lambda c: WS.replace(
            b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25j" + c + b"Q=="
        ),
    }
    out = {}
    for name, make in positions.items():
        for b in range(256):
            out[f"sweep/{name}/{b:#04x}"] = make(bytes([b]))
    return out


def size_limits() -> list[tuple[str, bytes, int]]:
    """Heads around the size limit (the limit counts the head up to its blank line)."""

    def head_of_size(size: int) -> bytes:
        start = b"GET /ws HTTP/1.1\r\n" + HOST + UPGRADE + b"X-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    out = []
    for size in (DEFAULT_MAX - 1, DEFAULT_MAX, DEFAULT_MAX + 1):
        out.append((f"size/ws-{size}", head_of_size(size) + b"\x81\x80abcd", DEFAULT_MAX))
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(400))
    out.append(
        (
            "size/many-headers",
            b"GET /ws HTTP/1.1\r\n" + HOST + UPGRADE + many + b"\r\n",
            DEFAULT_MAX,
        )
    )
    few = b"".join(b"a:\r\n" for _ in range(3000))
    out.append(
        ("size/3000-minimal-headers", b"GET / HTTP/1.1\r\n" + HOST + few + b"\r\n", DEFAULT_MAX)
    )
    out.append(
        ("size/incomplete-over", b"GET /ws HTTP/1.1\r\nX-Long: " + b"z" * 20000, DEFAULT_MAX)
    )
    out.append(
        (
            "size/incomplete-over-with-bad-byte",
            b"GET /ws\x01 HTTP/1.1\r\nX: " + b"z" * 20000,
            DEFAULT_MAX,
        )
    )
    out.append(
        (
            "size/bad-head-over",
            b"GET / HTTP/1.1\r\nX\x01: " + b"z" * 20000 + b"\r\n\r\n",
            DEFAULT_MAX,
        )
    )
    for limit in (1, 16, 64, 1024):
        for delta in (-1, 0, 1):
            out.append(
                (f"size/limit-{limit}{delta:+d}", head_of_size(max(len(WS), limit + delta)), limit)
            )
        out.append((f"size/limit-{limit}-get", GET, limit))
    out.append(("size/leading-blank-line", b"\r\n" + head_of_size(1024), 1026))
    out.append(("size/leading-blank-line-over", b"\r\n" + head_of_size(1024), 1025))
    # Leading blank lines count towards the limit, and the blank line that ends
    # the head is looked for after them (a leading CRLF CRLF once made the limit
    # measure 4 bytes): RFC 9112 §2.2 lets a server skip them, not for free.
    for lead in (b"\r\n\r\n", b"\r\n" * 3, b"\n\r\n\r\n", b"\r\r\n\n", b"\n\n", b"\r\n\r\n\r"):
        name = text(lead).replace("\r", "cr").replace("\n", "lf")
        out.append(
            (
                f"size/leading-{name}-at-limit",
                lead + head_of_size(DEFAULT_MAX - len(lead)),
                DEFAULT_MAX,
            )
        )
        out.append(
            (
                f"size/leading-{name}-over",
                lead + head_of_size(DEFAULT_MAX - len(lead) + 1),
                DEFAULT_MAX,
            )
        )
        out.append((f"size/leading-{name}-30k", lead + head_of_size(30 * 1024), DEFAULT_MAX))
        out.append((f"size/leading-{name}-get-at-limit", lead + GET, len(lead + GET)))
        out.append((f"size/leading-{name}-get-over", lead + GET, len(lead + GET) - 1))
    out.append(("size/only-blank-lines-at-limit", b"\r\n" * (DEFAULT_MAX // 2), DEFAULT_MAX))
    out.append(("size/only-blank-lines-over", b"\r\n" * (DEFAULT_MAX // 2) + b"\n", DEFAULT_MAX))
    out.append(("size/only-blank-lines-limit-4", b"\r\n\r\n\r\n", 4))
    out.append(
        (
            "size/blank-lines-then-partial-over",
            b"\r\n\r\nGET /ws HTTP/1.1\r\nX: " + b"z" * 20000,
            DEFAULT_MAX,
        )
    )
    return out


def prefixes() -> dict[str, bytes]:
    """Incomplete heads: the answer is to wait, or an error already visible."""
    out = {}
    for name, whole in (("ws", WS), ("get", GET)):
        for end in range(0, len(whole), 7):
            out[f"prefix/{name}-{end}"] = whole[:end]
    out["prefix/method-prefix-M-SEA"] = b"M-SEA"
    out["prefix/pri-preface-part"] = b"PRI * HTTP/2.0\r\n\r\nS"
    out["prefix/not-a-method"] = b"XYZ"
    return out


_PIECES = [
    b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b":", b",", b";", b"=", b"/", b"?", b"#", b"@", b"[", b"]",
    b"\x00", b"\x7f", b"\x80", b"\xff", b"chunked", b"upgrade", b"websocket", b"close", b"keep-alive",
    b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: h\r\n", b"Connection: upgrade\r\n",
    b"Upgrade: websocket\r\n", b"HTTP/1.0", b"HTTP/2.0", b"0", b"9", b"%", b"A", b"a",
]  # fmt: skip


def mutations(count: int, seed: int = 16) -> dict[str, bytes]:
    """Seeded mutations of valid heads: a byte replaced, inserted or deleted, a
    piece of grammar inserted, a span duplicated."""
    rng = random.Random(seed)
    seeds = [
        WS,
        GET,
        b"POST /api HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc",
        b"POST /api HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET http://ex.com:81/p?q HTTP/1.1\r\n\r\n",
        b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        WS.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"),
    ]
    out: dict[str, bytes] = {}
    while len(out) < count:
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op = rng.randrange(5)
            at = rng.randrange(len(data) + 1)
            if op == 0 and at < len(data):
                data[at] = rng.randrange(256)
            elif op == 1:
                data[at:at] = bytes([rng.randrange(256)])
            elif op == 2 and at < len(data):
                del data[at]
            elif op == 3:
                data[at:at] = rng.choice(_PIECES)
            else:
                end = min(len(data), at + rng.randrange(1, 12))
                data[at:at] = data[at:end]
        out[f"mutation/{len(out)}"] = bytes(data)
    return out


def head_vectors() -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    seen: set[tuple[bytes, int]] = set()

    def add(name: str, data: bytes, max_head_size: int = DEFAULT_MAX) -> None:
        if (data, max_head_size) in seen:
            return
        seen.add((data, max_head_size))
        case: dict[str, Any] = {"name": name, "input": text(data)}
        if max_head_size != DEFAULT_MAX:
            case["max_head_size"] = max_head_size
        case["expect"] = head_answer(data, max_head_size)
        cases.append(case)

    for name, data in named_heads().items():
        add(name, data)
    for name, data, limit in size_limits():
        add(name, data, limit)
    for name, data in prefixes().items():
        add(name, data)
    for name, data in sweeps().items():
        add(name, data)
    for name, data in mutations(1500).items():
        add(name, data)
    return {
        "about": "Request heads and the Python data plane's answer (proxy/dataplane/heads.py + the "
        "listener's upgrade checks), one read each. Bytes are latin-1 code points. "
        "Written by tests/vectors/generate.py; checked by tests/test_vectors.py and "
        "proxy/dataplane/core/tests/vectors.rs.",
        "default_max_head_size": DEFAULT_MAX,
        "cases": cases,
    }


# --- frames ----------------------------------------------------------------------

CLIENT_KEY = bytes.fromhex("37fa213d")


def close(code: int | None, reason: bytes = b"", *, mask: bytes | None = None) -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return frame(0x8, payload, mask=mask)


def config(side: str, max_message_size: int | None = None, allowed_rsv: int = 0) -> dict[str, Any]:
    return {"side": side, "max_message_size": max_message_size, "allowed_rsv": allowed_rsv}


def named_streams() -> list[tuple[str, dict[str, Any], bytes]]:
    k = CLIENT_KEY
    c, u = config("client"), config("upstream")
    out: list[tuple[str, dict[str, Any], bytes]] = []

    def both(name: str, make: Any, **cfg: Any) -> None:
        out.append((f"client/{name}", config("client", **cfg), make(k)))
        out.append((f"upstream/{name}", config("upstream", **cfg), make(None)))

    both("text", lambda m: frame(0x1, b"hello", mask=m))
    both("empty-binary", lambda m: frame(0x2, mask=m))
    for length in (125, 126, 127, 65535, 65536, 70000):
        both(f"length-{length}", lambda m, n=length: frame(0x2, bytes(n), mask=m))
    both("non-minimal-16", lambda m: frame(0x1, b"hello", form=16, mask=m))
    both("non-minimal-64", lambda m: frame(0x1, b"hello", form=64, mask=m))
    both(
        "fragmented-with-controls",
        lambda m: (
            frame(0x1, b"hel", fin=False, mask=m)
            + frame(0x9, b"ping", mask=m)
            + frame(0x0, b"l", fin=False, mask=m)
            + frame(0xA, mask=m)
            + frame(0x0, b"o", mask=m)
            + frame(0x2, b"next", mask=m)
        ),
    )
    both("close-normal", lambda m: close(1000, b"bye", mask=m))
    both("close-no-code", lambda m: close(None, mask=m))
    both("close-123-byte-reason", lambda m: close(4999, "é".encode() * 61 + b"x", mask=m))
    both("close-utf8", lambda m: close(4001, "token expired ✓".encode(), mask=m))
    for code in (
        999,
        1000,
        1003,
        1004,
        1005,
        1006,
        1007,
        1011,
        1012,
        1014,
        1015,
        1016,
        2999,
        3000,
        4999,
        5000,
        65535,
    ):
        both(f"close-code-{code}", lambda m, cc=code: close(cc, b"r", mask=m))
    both("close-bad-utf8", lambda m: close(1000, b"\xff\xfe", mask=m))
    both("close-truncated-utf8", lambda m: close(1000, "é".encode()[:1], mask=m))
    both("close-1-byte", lambda m: frame(0x8, b"\x03", mask=m))
    both("close-then-data", lambda m: close(1001, mask=m) + frame(0x1, b"late", mask=m))
    both("ping-125", lambda m: frame(0x9, bytes(125), mask=m))
    both("ping-126", lambda m: frame(0x9, bytes(126), mask=m))
    both("ping-16-bit-form", lambda m: frame(0x9, b"p", form=16, mask=m))
    both("close-16-bit-form", lambda m: frame(0x8, b"\x03\xe8", form=16, mask=m))
    both("pong-fragmented", lambda m: frame(0xA, b"p", fin=False, mask=m))
    both("ping-rsv1", lambda m: frame(0x9, b"p", rsv=0b100, mask=m), allowed_rsv=0b100)
    for op in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF):
        both(
            f"reserved-opcode-{op:#x}",
            lambda m, o=op: frame(0x1, b"ok", mask=m) + frame(o, b"x", mask=m),
        )
    for rsv in range(1, 8):
        for allowed in (0, 0b100, 0b111):
            both(
                f"rsv-{rsv:03b}-allowed-{allowed:03b}",
                lambda m, r=rsv: frame(0x1, b"z", rsv=r, mask=m),
                allowed_rsv=allowed,
            )
    both(
        "rsv1-on-continuation",
        lambda m: (
            frame(0x1, b"a", fin=False, rsv=0b100, mask=m) + frame(0x0, b"b", rsv=0b100, mask=m)
        ),
        allowed_rsv=0b100,
    )
    both("continuation-without-message", lambda m: frame(0x0, b"x", mask=m))
    both(
        "data-inside-fragmented",
        lambda m: frame(0x1, b"a", fin=False, mask=m) + frame(0x1, b"b", mask=m),
    )
    both("length-msb-set", lambda m: frame(0x2, b"", form=64, length=1 << 63, mask=m))
    both("length-huge-pending", lambda m: frame(0x2, b"abc", form=64, length=1 << 40, mask=m))
    out.append(("client/unmasked", c, frame(0x1, b"hi")))
    out.append(("upstream/masked", u, frame(0x1, b"hi", mask=k)))
    out.append(("client/good-then-unmasked", c, frame(0x1, b"ok", mask=k) + frame(0x1, b"hi")))
    for limit in (0, 5, 6, 100):
        both(
            f"limit-{limit}-whole", lambda m: frame(0x1, b"hello!", mask=m), max_message_size=limit
        )
        both(
            f"limit-{limit}-fragments",
            lambda m: (
                frame(0x1, b"hel", fin=False, mask=m)
                + frame(0x0, b"lo", fin=False, mask=m)
                + frame(0x0, b"!", mask=m)
                + frame(0x2, b"123456", mask=m)
            ),
            max_message_size=limit,
        )
        both(
            f"limit-{limit}-controls-exempt",
            lambda m: frame(0x9, b"1234567", mask=m),
            max_message_size=limit,
        )
    both(
        "limit-64-bit-header",
        lambda m: frame(0x2, b"", form=64, length=1000, mask=m),
        max_message_size=999,
    )
    return out


def random_stream(rng: random.Random, side: str, allowed_rsv: int) -> bytes:
    """A random valid stream, possibly corrupted at one byte."""
    mask_of = (
        (lambda: bytes(rng.randrange(256) for _ in range(4)))
        if side == "client"
        else (lambda: None)
    )
    out = b""
    in_message = False
    for _ in range(rng.randrange(1, 8)):
        roll = rng.random()
        if roll < 0.15:
            out += frame(rng.choice((0x9, 0xA)), bytes(rng.randrange(0, 10)), mask=mask_of())
        elif roll < 0.2:
            out += close(rng.choice((1000, 1001, 4000)), b"why", mask=mask_of())
        else:
            n = (
                rng.choice((0, 1, 5, 125, 126, 300, 70000))
                if rng.random() < 0.3
                else rng.randrange(0, 40)
            )
            fin = rng.random() < 0.6
            op = 0x0 if in_message else rng.choice((0x1, 0x2))
            rsv = (allowed_rsv & 0b100) if (op and allowed_rsv and rng.random() < 0.5) else 0
            out += frame(
                op,
                bytes(rng.randrange(256) for _ in range(min(n, 50))) + bytes(max(0, n - 50)),
                fin=fin,
                rsv=rsv,
                mask=mask_of(),
            )
            in_message = not fin
    if rng.random() < 0.4 and out:
        data = bytearray(out)
        data[rng.randrange(len(data))] = rng.randrange(256)
        out = bytes(data)
    return out


def random_cuts(rng: random.Random, n: int) -> list[int]:
    if n <= 1:
        return []
    return sorted(rng.sample(range(1, n), min(n - 1, rng.randrange(1, 6))))


def pack(stream: bytes) -> list[Any]:
    """A stream as pieces: hex strings, and [4-byte pattern in hex, count] for
    long repeats (big payloads are zeros, masked or not), so that a 70 000-byte
    frame costs a few bytes of JSON. `reference.unpack` is the inverse."""
    pieces: list[Any] = []
    literal = bytearray()
    i = 0
    while i < len(stream):
        pattern = stream[i : i + 4]
        count = 0
        while len(pattern) == 4 and stream[i + 4 * count : i + 4 * count + 4] == pattern:
            count += 1
        if count >= 16:
            if literal:
                pieces.append(literal.hex())
                literal = bytearray()
            pieces.append([pattern.hex(), count])
            i += 4 * count
        else:
            literal.append(stream[i])
            i += 1
    if literal:
        pieces.append(literal.hex())
    assert unpack(pieces) == stream
    return pieces


def frame_vectors() -> dict[str, Any]:
    rng = random.Random(6455)
    streams = named_streams()
    for i in range(250):
        side = rng.choice(("client", "upstream"))
        allowed = rng.choice((0, 0b100, 0b111))
        limit = rng.choice((None, None, 64, 1000))
        streams.append(
            (f"random/{i}", config(side, limit, allowed), random_stream(rng, side, allowed))
        )
    cases = []
    for name, cfg, stream in streams:
        splits: list[Any] = [[]]
        if len(stream) <= 400:
            splits.append("bytewise")
        splits.extend(random_cuts(rng, len(stream)) for _ in range(3))
        if len(stream) > 1:
            splits.append([1])  # cut inside the first header: split headers are the delicate part
        answers = []
        for split in splits:
            cuts = expand_cuts(split, len(stream))
            per_build = {
                b: frames_answer(build, cfg, stream, cuts) for b, build in FRAME_BUILDS.items()
            }
            for build, answer in per_build.items():
                assert answer == per_build["python"], f"{name} {split}: the {build} build disagrees"
            answers.append(per_build["python"])
        whole = answers[0]
        cases.append(
            {
                "name": name,
                "config": cfg,
                "stream": pack(stream),
                "expect": whole,
                # Per split, only what differs from the whole stream's answer.
                "splits": [
                    {"cuts": split, "expect": {k: v for k, v in answer.items() if whole[k] != v}}
                    for split, answer in zip(splits[1:], answers[1:], strict=True)
                ],
            }
        )
    close_frames = []
    for code, reason in [
        (1000, ""), (1001, "loopwatch: shutting down"), (1013, "loopwatch: cooldown, retry in 5s"),
        (1009, "x" * 200), (4000, "é" * 80), (4999, "€" * 50), (1002, "a" * 122 + "é"),
        (1005, ""), (999, "x"), (5000, ""), (1016, ""),
    ]:  # fmt: skip
        for masked in (False, True):
            close_frames.append(
                {
                    "code": code,
                    "reason": reason,
                    "masked": masked,
                    "expect": close_frame_answer(code, reason, masked),
                }
            )
    return {
        "about": "WebSocket streams and what proxy/dataplane/frames.py (both builds) forwarded per chunk, "
        "counted and refused, fed whole and cut at each split (a split lists only what "
        'differs from the whole stream\'s answer; cuts are offsets, or "bytewise"); close frames from build_close_frame '
        "(masked ones shown unmasked). Written by tests/vectors/generate.py; checked by "
        "tests/test_vectors.py and proxy/dataplane/core/tests/vectors.rs.",
        "cases": cases,
        "close_frames": close_frames,
    }


def dump(path: Path, data: dict[str, Any]) -> None:
    """One case per line: diffs of a regenerated file stay readable."""
    lines = ["{"]
    keys = list(data)
    for i, key in enumerate(keys):
        value = data[key]
        comma = "," if i < len(keys) - 1 else ""
        if isinstance(value, list):
            lines.append(f"  {json.dumps(key)}: [")
            lines.extend(
                "    " + json.dumps(item, ensure_ascii=True) + ("," if j < len(value) - 1 else "")
                for j, item in enumerate(value)
            )
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def identity_vectors() -> dict[str, Any]:
    configs = identity_cases.configs()
    cases = [
        {
            "config": config,
            "name": name,
            "head": text(data),
            "peer": peer,
            "expect": identity_answer(configs[config], data, peer, identity_cases.NOW),
        }
        for config, name, data, peer in identity_cases.cases()
    ]
    return {
        "about": "Client identity: for each configuration (as IdentitySettings takes it, and as "
        "native.identity_spec passes it to the Rust Identity), request heads from a peer and "
        "proxy/dataplane/identity.py's answer at the clock `now` (seconds since the epoch). "
        "Written by tests/vectors/generate.py (inputs in tests/vectors/identity_cases.py), "
        "checked by tests/test_vectors.py and proxy/dataplane/core/tests/vectors.rs.",
        "now": identity_cases.NOW,
        "configs": {
            name: {"settings": config, "native": native_spec(config)}
            for name, config in configs.items()
        },
        "cases": cases,
    }


def main() -> None:
    dump(HERE / "request_heads.json", head_vectors())
    dump(HERE / "frames.json", frame_vectors())
    dump(HERE / "identity.json", identity_vectors())


if __name__ == "__main__":
    main()
