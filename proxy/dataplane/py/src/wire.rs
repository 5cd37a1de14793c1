//! The bytes the native listener writes itself: its one-line answers, the
//! refusals of docs/refusals.md, and the upgrade request it forwards.
//!
//! The bytes are those of the asyncio data plane this one replaced (and the
//! wording of `refusal_for` in proxy/brain.py, for refusals): a client of
//! loopwatch saw no change when the planes swapped, and the refusal grammar
//! is a contract (docs/refusals.md).

use loopwatch_dataplane_core::events::RefuseReason;
use loopwatch_dataplane_core::frames::build_close_frame;
use loopwatch_dataplane_core::head::{accept_key, reason_phrase, RequestHead};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the
/// historic Proxy-Connection.
pub(crate) const HOP_BY_HOP: [&[u8]; 9] = [
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

/// Headers loopwatch sets itself on the upstream request (the client's are dropped).
const REPLACED: [&[u8]; 4] = [
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
];

pub const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";

/// A complete response with a one-line text body, then the connection closes.
pub fn simple_response(status: u16, message: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    use std::fmt::Write;
    let phrase = reason_phrase(status);
    let body = if message.is_empty() { phrase } else { message };
    // One allocation: the fixed lines, the headers and the body fit.
    let headers_len: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    let mut out = String::with_capacity(160 + headers_len + body.len());
    // Writing to a String cannot fail.
    let _ = write!(out, "HTTP/1.1 {status} {phrase}\r\n");
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    let _ = write!(out, "Content-Length: {}\r\n", body.len() + 1);
    out.push_str("Connection: close\r\n\r\n");
    out.push_str(body);
    out.push('\n');
    out.into_bytes()
}

/// How refusals are answered (`policy.reject_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectWith {
    /// Accept the upgrade, then close 1013 with the reason (browsers can read it).
    Close1013,
    /// HTTP 429 (503 for an open breaker) with Retry-After, before any upgrade.
    Http429,
}

impl RejectWith {
    pub fn parse(text: &str) -> Option<RejectWith> {
        match text {
            "close-1013" => Some(RejectWith::Close1013),
            "http-429" => Some(RejectWith::Http429),
            _ => None,
        }
    }
}

/// The phrase of a refusal reason (`REASON_TEXT` in proxy/brain.py).
pub fn phrase(reason: RefuseReason) -> &'static str {
    match reason {
        RefuseReason::Cooldown => "cooldown",
        RefuseReason::MinInterval => "too soon after the last attempt",
        RefuseReason::MaxConcurrent => "too many connections",
        RefuseReason::Deny => "denied",
        RefuseReason::CircuitOpen => "upstream unavailable",
    }
}

/// Whole seconds told to the client: rounded up, never less than 1.
pub fn retry_secs(retry_after: std::time::Duration) -> u64 {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    secs.max(1)
}

/// The refusal reason of docs/refusals.md: `loopwatch: PHRASE, retry in Ns`.
pub fn refusal_text(reason: RefuseReason, retry_after: std::time::Duration) -> String {
    format!(
        "loopwatch: {}, retry in {}s",
        phrase(reason),
        retry_secs(retry_after)
    )
}

/// The bytes of a refusal: a 429/503 response with Retry-After, or a 101
/// answering `ws_key` followed by the close frame, with code `close_code`
/// (1013, or the application code of `policy.close_code`).
pub fn refusal_bytes(
    how: RejectWith,
    close_code: u16,
    reason: RefuseReason,
    retry_after: std::time::Duration,
    ws_key: &[u8],
) -> Vec<u8> {
    let text = refusal_text(reason, retry_after);
    match how {
        RejectWith::Http429 => {
            let status = if reason == RefuseReason::CircuitOpen {
                503
            } else {
                429
            };
            let retry = retry_secs(retry_after).to_string();
            simple_response(status, &text, &[("Retry-After", &retry)])
        }
        RejectWith::Close1013 => {
            let mut out = SWITCHING.to_vec();
            out.extend_from_slice(b"Sec-WebSocket-Accept: ");
            out.extend_from_slice(accept_key(trim(ws_key)).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            // The text is at most 64 bytes; the code is 1013 or 4000-4999
            // (checked where it is set), else 1013 rather than no answer.
            let frame = build_close_frame(close_code, &text, None)
                .or_else(|_| build_close_frame(1013, &text, None))
                .expect("1013 is sendable");
            out.extend(frame);
            out
        }
    }
}

/// `bytes.strip()` of Python (a header value holds no CR or LF).
fn trim(value: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | 0x0b | 0x0c | b'\r' | b'\n');
    let start = value.iter().position(|b| !ws(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &value[start..end]
}

/// A route of the native listener: a path prefix and its upstream.
#[derive(Debug, Clone)]
pub struct Route {
    /// The path prefix as configured (latin-1 bytes, like the path it is
    /// compared with); also the route's name in events.
    pub prefix: Vec<u8>,
    pub name: std::sync::Arc<str>,
    pub host: String,
    pub port: u16,
    /// The Host the upstream gets (`Upstream.authority`).
    pub authority: Vec<u8>,
    /// The upstream URL's path without its trailing slash; empty keeps the
    /// client's path as it is.
    pub base_path: Vec<u8>,
    /// `wss://` or `https://`: TLS to the upstream.
    pub tls: bool,
    /// Its plain requests' counts: those of its name once the listener serves
    /// it (`RequestCounts::attach`).
    pub requests: std::sync::Arc<crate::requests::RouteRequests>,
}

/// Routes are equal by what they route (their counts are not part of it).
impl PartialEq for Route {
    fn eq(&self, other: &Route) -> bool {
        (
            &self.prefix,
            &self.name,
            &self.host,
            self.port,
            &self.authority,
            &self.base_path,
            self.tls,
        ) == (
            &other.prefix,
            &other.name,
            &other.host,
            other.port,
            &other.authority,
            &other.base_path,
            other.tls,
        )
    }
}

impl Eq for Route {}

#[cfg(test)]
impl Route {
    /// A test's route: every path to a `ws://127.0.0.1:port` upstream (`wss://`
    /// with `tls`), the client's path kept as it is.
    pub(crate) fn loopback(port: u16, tls: bool) -> Route {
        Route {
            prefix: b"/".to_vec(),
            name: std::sync::Arc::from("/"),
            host: "127.0.0.1".into(),
            port,
            authority: format!("127.0.0.1:{port}").into_bytes(),
            base_path: Vec::new(),
            tls,
            requests: Default::default(),
        }
    }
}

impl Route {
    /// Whether the route serves `path`: prefixes match whole path segments.
    pub fn matches(&self, path: &[u8]) -> bool {
        let p = self.prefix.as_slice();
        if p == b"/" || path == p {
            return true;
        }
        if p.ends_with(b"/") {
            path.starts_with(p)
        } else {
            path.starts_with(p) && path.get(p.len()) == Some(&b'/')
        }
    }

    /// The request-target sent upstream: the client's, or with the prefix
    /// replaced by the upstream URL's path when it has one (`Route.target`).
    pub fn target(&self, path: &[u8], target: &[u8]) -> Vec<u8> {
        if self.base_path.is_empty() {
            return target.to_vec();
        }
        let prefix = self.prefix.strip_suffix(b"/").unwrap_or(&self.prefix);
        let rest = path.get(prefix.len()..).unwrap_or_default();
        let query = target
            .iter()
            .position(|&b| b == b'?')
            .map_or(&b""[..], |i| &target[i + 1..]);
        let mut out = [self.base_path.as_slice(), rest].concat();
        if out.is_empty() {
            out.push(b'/');
        }
        if !query.is_empty() {
            out.push(b'?');
            out.extend_from_slice(query);
        }
        out
    }
}

/// The longest prefix that matches `path` (`routes` sorted longest first).
pub fn route_for<'r>(routes: &'r [Route], path: &[u8]) -> Option<&'r Route> {
    routes.iter().find(|r| r.matches(path))
}

/// Whether `path` has a `..` segment as a backend that resolves dot segments
/// may read it: a dot also written `%2e` (any case); `\\`, `%2f` and `%5c` also
/// taken as separators; a segment's `;` parameters left out (Tomcat reads
/// `..;x` as `..`). Such a path may leave the route it matched (a route's
/// base path, or another route's prefix) once the backend resolves it;
/// clients resolve dot segments before they send (RFC 3986 §5.2.4).
pub fn has_dot_dot_segment(path: &[u8]) -> bool {
    let mut dots = 0; // the segment's dots so far; None: something else
    let mut dots_only = true;
    let mut params = false; // past the segment's `;`
    let mut i = 0;
    loop {
        let (unit, len) = match path.get(i) {
            None => (b'/', 0),
            Some(b'%') if i + 2 < path.len() => match (hex(path[i + 1]), hex(path[i + 2])) {
                (Some(high), Some(low)) => (high * 16 + low, 3),
                _ => (b'%', 1),
            },
            Some(&b) => (b, 1),
        };
        match unit {
            b'/' | b'\\' => {
                if dots_only && dots == 2 {
                    return true;
                }
                if len == 0 {
                    return false;
                }
                (dots, dots_only, params) = (0, true, false);
            }
            _ if params => {}
            b';' => params = true,
            b'.' => dots += 1,
            _ => dots_only = false,
        }
        i += len;
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Whether `name` is one of `names` (lower-case), in any case.
fn one_of(names: &[&[u8]], name: &[u8]) -> bool {
    names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// What kind of request goes upstream: the part of its head that is not the
/// client's end-to-end headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// A WebSocket upgrade: `Upgrade: websocket` and `Connection: Upgrade`.
    WebSocket,
    /// A plain request. `chunked`: its body goes on with loopwatch's own chunk
    /// framing (`Transfer-Encoding: chunked` last, as aiohttp adds it).
    /// `answers_continue`: loopwatch answers the client's `Expect:
    /// 100-continue` itself, so the header is not forwarded.
    Http {
        chunked: bool,
        answers_continue: bool,
    },
}

/// The header names the Connection headers of `headers` list, as sent
/// (compared in any case).
pub(crate) fn connection_named<'h>(
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) -> Vec<&'h [u8]> {
    let mut named = Vec::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"connection") {
            named.extend(
                value
                    .split(|&b| b == b',')
                    .map(trim)
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    named
}

/// Whether a header describes one hop only: the hop-by-hop set, or one the
/// Connection header names, except `Content-Length`. The message is framed by
/// it, so it is never one hop's: a sender must not name it (RFC 9110 §7.6.1),
/// and obeying a Connection that does would send the body on with no length,
/// for the next hop to read as the next request (smuggling, and a pooled
/// upstream connection that answers someone else), or a response the client
/// cannot find the end of. As nginx and HAProxy, it is kept.
pub(crate) fn hop_by_hop(name: &[u8], named: &[&[u8]]) -> bool {
    one_of(&HOP_BY_HOP, name)
        || (!name.eq_ignore_ascii_case(b"content-length")
            && named.iter().any(|n| name.eq_ignore_ascii_case(n)))
}

/// The request head sent upstream: end-to-end headers as the client sent them
/// (order and case kept), Host set to the upstream, the upgrade pair for a
/// WebSocket, then X-Forwarded-For/-Proto/-Host (for upgrades and plain
/// requests alike). With `traceparent` (tracing on: the connection span's),
/// the client's `traceparent` is dropped and this one goes last; the client's
/// `tracestate` passes as sent.
pub fn upstream_request_head(
    head: &RequestHead<'_>,
    target: &[u8],
    host: &[u8],
    peer: &str,
    scheme: &str,
    kind: Forwarded,
    traceparent: Option<&[u8]>,
) -> Vec<u8> {
    let named = connection_named(head.headers.iter().map(|h| (h.name, h.value)));
    let mut out = Vec::with_capacity(head.head_len + 128);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    let drop_expect = matches!(
        kind,
        Forwarded::Http {
            answers_continue: true,
            ..
        }
    );
    for h in &head.headers {
        if hop_by_hop(h.name, &named)
            || one_of(&REPLACED, h.name)
            || (drop_expect && h.name.eq_ignore_ascii_case(b"expect"))
            || (traceparent.is_some() && h.name.eq_ignore_ascii_case(b"traceparent"))
        {
            continue;
        }
        out.extend_from_slice(h.name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if kind == Forwarded::WebSocket {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(previous) = head.header("x-forwarded-for") {
        out.extend_from_slice(&previous);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.as_bytes());
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(scheme.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(authority) = &head.authority {
        out.extend_from_slice(b"X-Forwarded-Host: ");
        out.extend_from_slice(authority);
        out.extend_from_slice(b"\r\n");
    }
    if let Forwarded::Http { chunked: true, .. } = kind {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if let Some(traceparent) = traceparent {
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(traceparent);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus};
    use std::time::Duration;

    fn route(prefix: &str, base: &str) -> Route {
        Route {
            prefix: prefix.into(),
            name: prefix.into(),
            host: "127.0.0.1".into(),
            port: 9000,
            authority: b"127.0.0.1:9000".to_vec(),
            base_path: base.into(),
            tls: false,
            requests: Default::default(),
        }
    }

    fn parsed(raw: &[u8]) -> RequestHead<'_> {
        match parse_head(raw, &HeadLimits::default()) {
            HeadStatus::Complete(head) => head,
            other => panic!("not a complete head: {other:?}"),
        }
    }

    #[test]
    fn routes_match_whole_segments_longest_first() {
        let routes = vec![route("/chat/", ""), route("/api", ""), route("/", "")];
        let name = |path: &[u8]| route_for(&routes, path).map(|r| r.name.to_string());
        assert_eq!(name(b"/api"), Some("/api".into()));
        assert_eq!(name(b"/api/x"), Some("/api".into()));
        assert_eq!(name(b"/apix"), Some("/".into()));
        assert_eq!(name(b"/chat/room"), Some("/chat/".into()));
        assert_eq!(name(b"/chat"), Some("/".into()));
        assert_eq!(route_for(&routes[..2], b"/other"), None);
    }

    #[test]
    fn targets_keep_or_rewrite_the_path_and_keep_the_query() {
        assert_eq!(
            route("/ws", "").target(b"/ws/a", b"/ws/a?x=1"),
            b"/ws/a?x=1"
        );
        assert_eq!(
            route("/ws", "/socket").target(b"/ws/a", b"/ws/a?x=1"),
            b"/socket/a?x=1"
        );
        assert_eq!(route("/ws/", "/s").target(b"/ws/", b"/ws/"), b"/s/");
        assert_eq!(route("/", "/base").target(b"/", b"/?q"), b"/base/?q");
    }

    #[test]
    fn the_upgrade_request_keeps_end_to_end_headers_and_adds_forwarding() {
        let raw = b"GET /ws?t=1 HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n\
            Connection: Upgrade, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
            X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nCookie: a=b\r\n\r\n";
        let head = parsed(raw);
        let out = upstream_request_head(
            &head,
            b"/ws?t=1",
            b"backend:9000",
            "127.0.0.1",
            "http",
            Forwarded::WebSocket,
            None,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /ws?t=1 HTTP/1.1\r\nHost: backend:9000\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Cookie: a=b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\
             X-Forwarded-Host: example.test\r\n\r\n"
        );
    }

    #[test]
    fn the_spans_traceparent_replaces_the_clients_and_tracestate_passes() {
        let raw = b"GET /ws HTTP/1.1\r\nHost: front\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
            TraceParent: 00-ffffffffffffffffffffffffffffffff-00f067aa0ba902b7-01\r\n\
            tracestate: vendor=abc\r\n\r\n";
        let head = parsed(raw);
        let mine: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        let forward = |traceparent: Option<&[u8]>| {
            let kind = Forwarded::WebSocket;
            upstream_request_head(&head, b"/ws", b"b", "127.0.0.1", "http", kind, traceparent)
        };
        let out = forward(Some(mine));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /ws HTTP/1.1\r\nHost: b\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\ntracestate: vendor=abc\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: front\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01\r\n\r\n"
        );
        // Without tracing, the client's pass as they came.
        let text = String::from_utf8(forward(None)).unwrap();
        assert!(text
            .contains("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"));
        assert!(text.contains("TraceParent: 00-ffff"));
    }

    #[test]
    fn a_plain_request_keeps_end_to_end_headers_and_frames_its_body_anew() {
        let raw = b"POST /up HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\
            Expect: 100-continue\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\n\
            Content-Type: text/plain\r\n\r\n";
        let head = parsed(raw);
        let kind = Forwarded::Http {
            chunked: true,
            answers_continue: true,
        };
        let out = upstream_request_head(
            &head,
            b"/up",
            b"backend:9000",
            "10.1.2.3",
            "http",
            kind,
            None,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /up HTTP/1.1\r\nHost: backend:9000\r\nContent-Type: text/plain\r\n\
             X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: front\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        let kind = Forwarded::Http {
            chunked: false,
            answers_continue: false,
        };
        let out = upstream_request_head(&head, b"/up", b"b", "10.1.2.3", "http", kind, None);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Host: b\r\nExpect: 100-continue\r\nContent-Type"));
    }

    #[test]
    fn dot_dot_segments_are_found_however_written() {
        for path in [
            &b"/public/../admin"[..],
            b"/public/..",
            b"/public/%2e%2E/admin",
            b"/public/.%2e/admin",
            b"/public/..%2fadmin",
            b"/public/..%5Cadmin",
            b"/public\\..\\admin",
            b"/public/..;x=1/admin",
            b"/..",
        ] {
            assert!(
                has_dot_dot_segment(path),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
        for path in [
            &b"/"[..],
            b"/public/...",
            b"/public/..a/b",
            b"/public/a../b",
            b"/public/./x",
            b"/public/%2e",
            b"/public/%2",
            b"/public/%",
            b"/public/%zz..",
            b"/a;../b",
        ] {
            assert!(
                !has_dot_dot_segment(path),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
    }

    #[test]
    fn a_connection_naming_content_length_does_not_take_the_length_away() {
        // The body would go on without a length: the next request, for the
        // upstream (smuggling).
        let raw = b"POST /up HTTP/1.1\r\nHost: front\r\nConnection: keep-alive, Content-Length, X-Hop\r\n\
            X-Hop: 1\r\nContent-Length: 5\r\n\r\n";
        let head = parsed(raw);
        let kind = Forwarded::Http {
            chunked: false,
            answers_continue: false,
        };
        let out = upstream_request_head(&head, b"/up", b"b", "10.1.2.3", "http", kind, None);
        let text = String::from_utf8(out).unwrap();
        assert!(text
            .starts_with("POST /up HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nX-Forwarded-For"));
        assert!(!text.contains("X-Hop"));
        let named: [&[u8]; 2] = [b"content-length", b"x-hop"];
        assert!(!hop_by_hop(b"Content-Length", &named));
        assert!(hop_by_hop(b"X-HOP", &named));
    }

    #[test]
    fn refusals_follow_the_contract() {
        let retry = Duration::from_millis(4200);
        assert_eq!(
            refusal_text(RefuseReason::MinInterval, retry),
            "loopwatch: too soon after the last attempt, retry in 5s"
        );
        assert_eq!(retry_secs(Duration::ZERO), 1);
        assert_eq!(retry_secs(Duration::from_secs(3)), 3);
        let http = refusal_bytes(
            RejectWith::Http429,
            1013,
            RefuseReason::Cooldown,
            retry,
            b"",
        );
        let text = String::from_utf8(http).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 5\r\n"));
        assert!(text.ends_with("\r\n\r\nloopwatch: cooldown, retry in 5s\n"));
        let open = refusal_bytes(
            RejectWith::Http429,
            1013,
            RefuseReason::CircuitOpen,
            retry,
            b"",
        );
        assert!(open.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"));
        let close = refusal_bytes(
            RejectWith::Close1013,
            1013,
            RefuseReason::Deny,
            retry,
            b" dGhlIHNhbXBsZSBub25jZQ==",
        );
        let head_end = close.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(close[..head_end]
            .ends_with(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
        let frame = &close[head_end..];
        let text = b"loopwatch: denied, retry in 5s";
        assert_eq!(&frame[..4], &[0x88, 2 + text.len() as u8, 0x03, 0xF5]);
        assert_eq!(&frame[4..], text);
        let app = refusal_bytes(RejectWith::Close1013, 4429, RefuseReason::Deny, retry, b"k");
        let frame = &app[app.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(&frame[2..4], &4429u16.to_be_bytes());
        assert_eq!(&frame[4..], text);
    }

    #[test]
    fn simple_responses_are_one_line() {
        let out = simple_response(404, "no route for this path", &[]);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 23\r\nConnection: close\r\n\r\nno route for this path\n"
                .to_vec()
        );
    }
}
