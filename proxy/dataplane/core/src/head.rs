//! A client's request head, parsed with llhttp's strictness, or a typed
//! rejection.
//!
//! The asyncio data plane this one replaced parsed heads with httptools
//! (llhttp in strict mode) and then made loopwatch's own checks. This module
//! reproduces that whole answer, byte for byte where it matters: while both
//! planes ran, a request one forwarded and the other refused would have been a
//! smuggling hole, and the answers must not change with the plane:
//!
//! * the request line and header lines follow llhttp's strict grammar (the
//!   methods it knows, one or more spaces after the method, the URL characters
//!   it allows, an `HTTP/` version of one digit, a dot and one digit (a
//!   higher 1.x is 1.1, RFC 9112 §2.3), CRLF everywhere: a bare LF or
//!   CR is refused, obsolete line folding is refused, no whitespace before a
//!   colon, header names are tokens, values are `HTAB / SP / VCHAR / obs-text`
//!   with leading whitespace dropped and trailing whitespace kept);
//! * the framing headers are llhttp's: a second `Content-Length` (even an equal
//!   one), a non-numeric or overflowing one, `Content-Length` together with
//!   `Transfer-Encoding`, `chunked` that is not the final coding, and a
//!   `Transfer-Encoding` without a final `chunked` are refused; so is any
//!   `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1: faulty
//!   framing), which llhttp would read as chunked;
//! * a head that asks for an upgrade (an `Upgrade` header and a `Connection`
//!   token `upgrade`) may not announce a body (`Transfer-Encoding`, or a
//!   `Content-Length` above 0): its next bytes would be a body to one reader
//!   and frames to another;
//! * an *upgrade* is what llhttp calls one (`Upgrade` with a value and a
//!   `Connection`/`Proxy-Connection` token `upgrade`, or `CONNECT`); it must
//!   then be a valid WebSocket upgrade (`websocket` among the Upgrade tokens,
//!   `upgrade` among the Connection tokens, `GET`, HTTP/1.1, a
//!   `Sec-WebSocket-Key` that is 16 bytes of base64, version 13, a Host);
//! * empty lines before the request line (any mix of CR and LF, as llhttp
//!   skips them; RFC 9112 §2.2) are allowed, but the head, those lines
//!   included, is at most [`HeadLimits::max_head_size`] bytes up to the blank
//!   line that ends it, looked for after them (431 beyond, 414 when the
//!   request line alone does not end within it); that is checked
//!   before anything else, on each read. There
//!   is no separate header-count limit: the size bounds the count (every
//!   header line is at least 4 bytes).
//!
//! `tests/vectors/request_heads.json` holds the asyncio data plane's answers to
//! a few thousand heads, recorded before it was deleted; `tests/vectors.rs`
//! checks this module gives the same.
//!
//! The parser is sans-I/O: [`parse_head`] takes the bytes received so far and
//! says [`HeadStatus::Partial`] until the head is complete. It re-reads the
//! buffer on each call (a head is small; the caller appends each read).

use std::borrow::Cow;
use std::fmt;

/// The default `limits.max_head_size`.
pub const DEFAULT_MAX_HEAD_SIZE: usize = 16 * 1024;

/// The WebSocket GUID of RFC 6455 §1.3 (for `Sec-WebSocket-Accept`).
pub const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Bytes of the head up to and including its blank line (`limits.max_head_size`).
    pub max_head_size: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            max_head_size: DEFAULT_MAX_HEAD_SIZE,
        }
    }
}

/// Why a head is refused: the `reason` label of
/// `loopwatch_requests_rejected_total` for the refusals this module makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// 400: malformed, ambiguous or not a valid WebSocket upgrade.
    BadRequest,
    /// 431: the head is larger than `limits.max_head_size`; 414 when its
    /// request line alone already is.
    HeadTooLarge,
    /// 505 for an HTTP major version above 1, 400 for HTTP/0.x.
    Version,
    /// 426: a WebSocket version other than 13.
    UpgradeRequired,
    /// 400: an upgrade request that announces a body.
    UpgradeWithBody,
    /// 501: a transfer coding other than `chunked` (gzip, deflate …), which
    /// loopwatch does not apply: taking the chunks off would send the data on
    /// without its coding.
    NotImplemented,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        RejectReason::BadRequest,
        RejectReason::HeadTooLarge,
        RejectReason::Version,
        RejectReason::UpgradeRequired,
        RejectReason::UpgradeWithBody,
        RejectReason::NotImplemented,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::BadRequest => "bad_request",
            RejectReason::HeadTooLarge => "head_too_large",
            RejectReason::Version => "version",
            RejectReason::UpgradeRequired => "upgrade_required",
            RejectReason::UpgradeWithBody => "upgrade_with_body",
            RejectReason::NotImplemented => "not_implemented",
        }
    }
}

/// A head loopwatch answers itself: a status line, the extra headers, a
/// one-line text body, then the connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: RejectReason,
    /// The body line (without its newline).
    pub message: Cow<'static, str>,
}

impl Rejection {
    fn new(status: u16, reason: RejectReason, message: impl Into<Cow<'static, str>>) -> Self {
        Rejection {
            status,
            reason,
            message: message.into(),
        }
    }

    fn bad(message: &'static str) -> Self {
        Rejection::new(400, RejectReason::BadRequest, message)
    }

    /// Headers the answer carries besides the standard ones.
    pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self.reason {
            RejectReason::UpgradeRequired => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }

    /// The complete response, as `proxy.http1.simple_response` writes it.
    pub fn response(&self) -> Vec<u8> {
        let status = self.status;
        let body = format!("{}\n", self.message);
        let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
        for (name, value) in self.extra_headers() {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        out.push_str("Connection: close\r\n\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

/// The status phrases of the answers loopwatch writes itself (the head
/// parser's refusals, the listener's and the plain-HTTP path's).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The protocol name of the request line. llhttp accepts RTSP and ICE request
/// lines too, and loopwatch then treats them as HTTP/1.x (as the recorded
/// vectors say): kept here so that a head re-serialises to what was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Rtsp,
    Ice,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Rtsp => "RTSP",
            Protocol::Ice => "ICE",
        }
    }
}

/// The version of an accepted head: 1.0 or 1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "1.0",
            Version::Http11 => "1.1",
        }
    }
}

/// How the body of a plain HTTP request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no framing header, or `Content-Length: 0`).
    None,
    Length(u64),
    Chunked,
}

/// What the head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A plain HTTP request, forwarded as such.
    Http(BodyFraming),
    /// A valid WebSocket upgrade: the bytes after the head are frames.
    WebSocket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// As sent (original case).
    pub name: &'a [u8],
    /// As sent, leading whitespace dropped (trailing whitespace kept, as llhttp does).
    pub value: &'a [u8],
}

/// An accepted request head, borrowing from the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The request-target exactly as sent.
    pub raw_target: &'a [u8],
    /// The target for the upstream: `raw_target` in origin-form; the path and
    /// query of an absolute-form target (its authority replaces Host).
    pub target: Cow<'a, [u8]>,
    /// The path (`/` when an absolute-form target has none).
    pub path: &'a [u8],
    /// The query without its `?` (empty when there is none).
    pub query: &'a [u8],
    pub protocol: Protocol,
    pub version: Version,
    /// Every header as sent, in order.
    pub headers: Vec<Header<'a>>,
    /// The host the client asked for: the absolute-form target's authority,
    /// else Host; None for HTTP/1.0 without Host.
    pub authority: Option<Cow<'a, [u8]>>,
    /// Whether the client keeps the connection open after this exchange.
    pub keep_alive: bool,
    pub kind: RequestKind,
    /// Bytes of the head, its blank line included: the body or the first
    /// frames start at this offset of the buffer.
    pub head_len: usize,
}

impl<'a> RequestHead<'a> {
    /// The value of a header (name compared case-insensitively), duplicates
    /// joined with ", " in order, as `RequestHead.get` does in Python.
    pub fn header(&self, name: &str) -> Option<Cow<'a, [u8]>> {
        header_value(&self.headers, name.as_bytes())
    }

    /// The lower-cased, whitespace-trimmed, non-empty comma-separated tokens of
    /// a header (duplicates joined).
    pub fn tokens(&self, name: &str) -> Vec<Vec<u8>> {
        match self.header(name) {
            Some(value) => tokens(&value),
            None => Vec::new(),
        }
    }

    /// The head serialised again: request line, headers as parsed, blank line.
    /// Parsing it gives an equal head (whitespace llhttp drops is not restored).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head_len + 16);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.raw_target);
        out.push(b' ');
        out.extend_from_slice(self.protocol.as_str().as_bytes());
        out.push(b'/');
        out.extend_from_slice(self.version.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in &self.headers {
            out.extend_from_slice(h.name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// What [`parse_head`] makes of the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadStatus<'a> {
    Complete(RequestHead<'a>),
    /// Valid so far; more bytes are needed.
    Partial,
    Rejected(Rejection),
}

/// Parse the request head at the start of `buf` (everything received so far).
pub fn parse_head<'a>(buf: &'a [u8], limits: &HeadLimits) -> HeadStatus<'a> {
    // The size limit comes first: each read is measured before it is parsed
    // (kept from the asyncio data plane, whose answers the vectors hold).
    if head_extent(buf) > limits.max_head_size {
        return HeadStatus::Rejected(too_large(buf, limits));
    }
    let raw = match scan(buf) {
        Ok(raw) => raw,
        Err(Stop::Partial) => return HeadStatus::Partial,
        Err(Stop::Bad(why)) => {
            return HeadStatus::Rejected(Rejection::new(
                400,
                RejectReason::BadRequest,
                format!("malformed request: {why}"),
            ))
        }
    };
    match finish(raw) {
        Ok(head) => HeadStatus::Complete(head),
        Err(rejection) => HeadStatus::Rejected(rejection),
    }
}

/// Bytes of the head as the size limit counts them: up to and including the
/// first CRLF CRLF after any leading blank lines, else everything received.
/// The answer to a head over the limit: 414 when its request line does not
/// end within the limit (a long URL, as nginx answers it), 431 otherwise (the
/// header fields, or nothing but blank lines). Same reason label for both.
fn too_large(buf: &[u8], limits: &HeadLimits) -> Rejection {
    let lead = leading_blank_lines(buf);
    let end = buf.len().min(limits.max_head_size);
    let request_line_too_long = lead < end && !buf[lead..end].contains(&b'\n');
    if request_line_too_long {
        Rejection::new(414, RejectReason::HeadTooLarge, "request line too long")
    } else {
        Rejection::new(
            431,
            RejectReason::HeadTooLarge,
            "request header fields too large",
        )
    }
}

fn leading_blank_lines(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

fn head_extent(buf: &[u8]) -> usize {
    let lead = leading_blank_lines(buf);
    match find(&buf[lead..], b"\r\n\r\n") {
        Some(at) => lead + at + 4,
        None => buf.len(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// --- character classes ----------------------------------------------------

/// A 256-entry table built at compile time from a predicate on one byte.
macro_rules! class {
    (|$b:ident| $pred:expr) => {{
        let mut table = [false; 256];
        let mut i = 0;
        while i < 256 {
            let $b = i as u8;
            table[i] = $pred;
            i += 1;
        }
        table
    }};
}

const fn is_alpha(b: u8) -> bool {
    b.is_ascii_alphabetic()
}

const fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// RFC 9110 tchar: what a header name is made of.
const TOKEN: [bool; 256] = class!(|b| {
    is_alnum(b)
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
});

/// HTAB / SP / VCHAR / obs-text: what a header value is made of.
const HEADER_CHAR: [bool; 256] = class!(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));

/// URL characters in llhttp's strict mode, `?` and `#` aside.
const URL_CHAR: [bool; 256] = class!(|b| b >= 0x21 && b <= 0x7e && b != b'?' && b != b'#');

/// RFC 3986 userinfo characters (the server part of an absolute URL).
const USERINFO_CHAR: [bool; 256] = class!(|b| {
    is_alnum(b)
        || matches!(
            b,
            b'-' | b'_'
                | b'.'
                | b'!'
                | b'~'
                | b'*'
                | b'\''
                | b'('
                | b')'
                | b'%'
                | b';'
                | b':'
                | b'&'
                | b'='
                | b'+'
                | b'$'
                | b','
        )
});

/// What `_valid_authority` in proxy/http1.py allows in a Host.
const AUTHORITY_CHAR: [bool; 256] = class!(|b| {
    is_alnum(b)
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b';'
                | b'='
                | b':'
                | b'['
                | b']'
                | b'%'
        )
});

// --- methods ----------------------------------------------------------------

/// The methods llhttp accepts on an `HTTP/x.y` request line.
const HTTP_METHODS: &[&str] = &[
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
    "QUERY",
    "PRI",
];

/// The methods llhttp accepts on an `RTSP/x.y` request line.
const RTSP_METHODS: &[&str] = &[
    "OPTIONS",
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
    "GET",
    "POST",
];

fn known_method(token: &[u8]) -> Option<&'static str> {
    HTTP_METHODS
        .iter()
        .chain(RTSP_METHODS)
        .find(|m| m.as_bytes() == token)
        .copied()
}

fn method_prefix(token: &[u8]) -> bool {
    HTTP_METHODS
        .iter()
        .chain(RTSP_METHODS)
        .any(|m| m.as_bytes().starts_with(token))
}

fn method_allowed(method: &str, protocol: Protocol) -> bool {
    match protocol {
        Protocol::Http => HTTP_METHODS.contains(&method),
        Protocol::Rtsp => RTSP_METHODS.contains(&method),
        Protocol::Ice => method == "SOURCE",
    }
}

// --- the scanner: llhttp's grammar ------------------------------------------

/// Why scanning stopped short of a complete head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Partial,
    Bad(&'static str),
}

type Scanned<T> = Result<T, Stop>;

/// The framing and connection flags llhttp collects from the headers.
#[derive(Debug, Default, Clone, Copy)]
struct Flags {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    /// A coding besides `chunked` (gzip, deflate …).
    other_coding: bool,
    upgrade_header: bool,
    connection_upgrade: bool,
    connection_close: bool,
    connection_keep_alive: bool,
}

/// A head that passed llhttp's grammar, before loopwatch's own checks.
struct RawHead<'a> {
    method: &'static str,
    raw_target: &'a [u8],
    protocol: Protocol,
    major: u8,
    minor: u8,
    headers: Vec<Header<'a>>,
    flags: Flags,
    head_len: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Scanned<u8> {
        self.buf.get(self.pos).copied().ok_or(Stop::Partial)
    }

    fn next(&mut self) -> Scanned<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn expect(&mut self, byte: u8, why: &'static str) -> Scanned<()> {
        if self.next()? == byte {
            Ok(())
        } else {
            Err(Stop::Bad(why))
        }
    }

    /// Match `literal` (ASCII, compared as is); Partial when the buffer ends
    /// inside a matching prefix.
    fn literal(&mut self, literal: &[u8], why: &'static str) -> Scanned<()> {
        for &want in literal {
            self.expect(want, why)?;
        }
        Ok(())
    }
}

fn scan(buf: &[u8]) -> Scanned<RawHead<'_>> {
    let mut c = Cursor { buf, pos: 0 };
    while matches!(c.peek()?, b'\r' | b'\n') {
        c.pos += 1;
    }
    let method = scan_method(&mut c)?;
    while c.peek()? == b' ' {
        c.pos += 1;
    }
    let (raw_target, http09) = scan_target(&mut c, method == "CONNECT")?;
    let (protocol, major, minor) = if http09 {
        (Protocol::Http, 0, 9)
    } else {
        scan_version(&mut c, method)?
    };
    let (headers, flags) = scan_headers(&mut c)?;
    Ok(RawHead {
        method,
        raw_target,
        protocol,
        major,
        minor,
        headers,
        flags,
        head_len: c.pos,
    })
}

fn scan_method(c: &mut Cursor<'_>) -> Scanned<&'static str> {
    let start = c.pos;
    loop {
        match c.buf.get(c.pos) {
            Some(b) if b.is_ascii_uppercase() || *b == b'_' || *b == b'-' => c.pos += 1,
            Some(_) => break,
            None if method_prefix(&c.buf[start..]) => return Err(Stop::Partial),
            None => return Err(Stop::Bad("Invalid method encountered")),
        }
    }
    let method =
        known_method(&c.buf[start..c.pos]).ok_or(Stop::Bad("Invalid method encountered"))?;
    c.expect(b' ', "Expected space after method")?;
    Ok(method)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UrlState {
    Start,
    Schema,
    Server,
    ServerWithAt,
    Path,
    Query,
    Fragment,
}

/// The request-target up to the space before the protocol, or up to CRLF for
/// an HTTP/0.9 request line (then `true`).
fn scan_target<'a>(c: &mut Cursor<'a>, connect: bool) -> Scanned<(&'a [u8], bool)> {
    use UrlState::*;
    let start = c.pos;
    let mut state = if connect { Server } else { Start };
    loop {
        let b = c.peek()?;
        if matches!(state, Server | ServerWithAt | Path | Query | Fragment) {
            match b {
                b' ' => {
                    let target = &c.buf[start..c.pos];
                    c.pos += 1;
                    return Ok((target, false));
                }
                b'\r' => {
                    let target = &c.buf[start..c.pos];
                    c.pos += 1;
                    c.expect(b'\n', "Expected CRLF")?;
                    return Ok((target, true));
                }
                b'\n' => return Err(Stop::Bad("Missing expected CR after request line")),
                _ => {}
            }
        }
        state = match (state, b) {
            (Start, b'/' | b'*') => Path,
            (Start, _) if is_alpha(b) => Schema,
            (Start, _) => return Err(Stop::Bad("Unexpected start char in url")),
            (Schema, _) if is_alpha(b) => Schema,
            (Schema, b':') => {
                c.pos += 1;
                c.literal(b"//", "Unexpected char in url schema")?;
                state = Server;
                continue;
            }
            (Schema, _) => return Err(Stop::Bad("Unexpected char in url schema")),
            (Server | ServerWithAt, b'/') => Path,
            (Server | ServerWithAt, b'?') => Query,
            (Server, b'@') => ServerWithAt,
            (ServerWithAt, b'@') => return Err(Stop::Bad("Double @ in url")),
            (Server | ServerWithAt, _) if USERINFO_CHAR[b as usize] || b == b'[' || b == b']' => {
                Server
            }
            (Server | ServerWithAt, _) => return Err(Stop::Bad("Unexpected char in url server")),
            (Path, b'?') => Query,
            (Path | Query, b'#') => Fragment,
            (Path, _) if URL_CHAR[b as usize] => Path,
            (Path, _) => return Err(Stop::Bad("Invalid char in url path")),
            (Query, b'?') => Query,
            (Query, _) if URL_CHAR[b as usize] => Query,
            (Query, _) => return Err(Stop::Bad("Invalid char in url query")),
            (Fragment, b'?' | b'#') => Fragment,
            (Fragment, _) if URL_CHAR[b as usize] => Fragment,
            (Fragment, _) => return Err(Stop::Bad("Invalid char in url fragment start")),
        };
        c.pos += 1;
    }
}

/// `HTTP/x.y` (or RTSP/ICE) after the target, then CRLF.
fn scan_version(c: &mut Cursor<'_>, method: &str) -> Scanned<(Protocol, u8, u8)> {
    while c.peek()? == b' ' {
        c.pos += 1;
    }
    const EXPECTED: &str = "Expected HTTP/, RTSP/ or ICE/";
    let protocol = match c.peek()? {
        b'H' => Protocol::Http,
        b'R' => Protocol::Rtsp,
        b'I' => Protocol::Ice,
        _ => return Err(Stop::Bad(EXPECTED)),
    };
    c.literal(protocol.as_str().as_bytes(), EXPECTED)?;
    if !method_allowed(method, protocol) {
        return Err(Stop::Bad("Invalid method for the protocol"));
    }
    c.expect(b'/', EXPECTED)?;
    let major = c.next()?;
    if !major.is_ascii_digit() {
        return Err(Stop::Bad("Invalid major version"));
    }
    c.expect(b'.', "Expected dot")?;
    let minor = c.next()?;
    if !minor.is_ascii_digit() {
        return Err(Stop::Bad("Invalid minor version"));
    }
    let (major, minor) = (major - b'0', minor - b'0');
    if method == "PRI" {
        // The HTTP/2 connection preface: llhttp pauses on it, an error here.
        c.literal(b"\r\n\r\nSM\r\n\r\n", "Expected HTTP/2 Connection Preface")?;
        return Err(Stop::Bad("Pause on PRI/Upgrade"));
    }
    c.expect(b'\r', "Expected CRLF after version")?;
    c.expect(b'\n', "Expected CRLF after version")?;
    Ok((protocol, major, minor))
}

/// Headers llhttp gives meaning to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    General,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
}

fn special(name: &[u8]) -> Special {
    const NAMES: [(&[u8], Special); 5] = [
        (b"content-length", Special::ContentLength),
        (b"transfer-encoding", Special::TransferEncoding),
        (b"connection", Special::Connection),
        (b"proxy-connection", Special::Connection),
        (b"upgrade", Special::Upgrade),
    ];
    NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map_or(Special::General, |&(_, s)| s)
}

fn scan_headers<'a>(c: &mut Cursor<'a>) -> Scanned<(Vec<Header<'a>>, Flags)> {
    // Room for a browser's upgrade request (a dozen headers) at once, rather
    // than growing 4, 8, 16.
    let mut headers = Vec::with_capacity(16);
    let mut flags = Flags::default();
    if c.peek()? == b' ' {
        return Err(Stop::Bad("Unexpected space after start line"));
    }
    loop {
        match c.peek()? {
            b'\r' => {
                c.pos += 1;
                c.expect(b'\n', "Expected LF after headers")?;
                return Ok((headers, flags));
            }
            b'\n' => return Err(Stop::Bad("Invalid header field char")),
            _ => {}
        }
        let name_start = c.pos;
        while TOKEN[c.peek()? as usize] {
            c.pos += 1;
        }
        let name = &c.buf[name_start..c.pos];
        if name.is_empty() || c.peek()? != b':' {
            return Err(Stop::Bad("Invalid header token"));
        }
        c.pos += 1;
        let kind = special(name);
        match kind {
            Special::TransferEncoding if flags.content_length.is_some() => {
                return Err(Stop::Bad(
                    "Transfer-Encoding can't be present with Content-Length",
                ))
            }
            Special::ContentLength if flags.transfer_encoding => {
                return Err(Stop::Bad(
                    "Content-Length can't be present with Transfer-Encoding",
                ))
            }
            _ => {}
        }
        let value = scan_value(c)?;
        if value.is_empty() {
            match kind {
                Special::ContentLength => return Err(Stop::Bad("Empty Content-Length")),
                Special::TransferEncoding => return Err(Stop::Bad("Empty Transfer-Encoding")),
                _ => {}
            }
        } else {
            apply_special(kind, value, &mut flags).map_err(Stop::Bad)?;
        }
        headers.push(Header { name, value });
    }
}

/// A header value after the colon: leading SP/HTAB dropped, up to CRLF, and
/// no obsolete line folding after it.
fn scan_value<'a>(c: &mut Cursor<'a>) -> Scanned<&'a [u8]> {
    while matches!(c.peek()?, b' ' | b'\t') {
        c.pos += 1;
    }
    let start = c.pos;
    loop {
        let b = c.peek()?;
        match b {
            b'\r' => break,
            b'\n' => return Err(Stop::Bad("Missing expected CR after header value")),
            _ if HEADER_CHAR[b as usize] => c.pos += 1,
            _ => return Err(Stop::Bad("Invalid header value char")),
        }
    }
    let value = &c.buf[start..c.pos];
    c.pos += 1;
    c.expect(b'\n', "Missing expected LF after header value")?;
    if matches!(c.peek()?, b' ' | b'\t') {
        return Err(Stop::Bad("Unexpected whitespace after header value"));
    }
    Ok(value)
}

/// What a non-empty framing or connection header means to llhttp.
fn apply_special(kind: Special, value: &[u8], flags: &mut Flags) -> Result<(), &'static str> {
    match kind {
        Special::General => {}
        Special::Upgrade => flags.upgrade_header = true,
        Special::ContentLength => {
            if flags.content_length.is_some() {
                return Err("Duplicate Content-Length");
            }
            flags.content_length = Some(content_length(value)?);
        }
        Special::TransferEncoding => {
            if flags.chunked {
                // Once chunked, no other coding may follow (RFC 9112 §6.1).
                return Err("Invalid `Transfer-Encoding` header value");
            }
            flags.transfer_encoding = true;
            flags.chunked = final_chunked(value)?;
            flags.other_coding |= value.split(|&b| b == b',').map(trim_start).any(|piece| {
                !piece.is_empty() && !piece.trim_ascii_end().eq_ignore_ascii_case(b"chunked")
            });
        }
        Special::Connection => {
            for piece in value.split(|&b| b == b',') {
                let piece = trim_start(piece);
                let word = |w: &[u8]| {
                    piece.len() >= w.len()
                        && piece[..w.len()].eq_ignore_ascii_case(w)
                        && piece[w.len()..].iter().all(|&b| b == b' ' || b == b'\t')
                };
                flags.connection_close |= word(b"close");
                flags.connection_upgrade |= word(b"upgrade");
                flags.connection_keep_alive |= word(b"keep-alive");
            }
        }
    }
    Ok(())
}

/// Digits, then optional SP/HTAB; at most 2^64 - 1.
fn content_length(value: &[u8]) -> Result<u64, &'static str> {
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || !value[digits..].iter().all(|&b| b == b' ' || b == b'\t') {
        return Err("Invalid character in Content-Length");
    }
    value[..digits].iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or("Content-Length overflow")
    })
}

/// Whether `chunked` is the final coding of one Transfer-Encoding value, the
/// way llhttp reads it: a coding is `chunked` when it is that word (any case)
/// followed by spaces only (a tab makes it another coding); `chunked` followed
/// by a comma is an error in a request.
fn final_chunked(value: &[u8]) -> Result<bool, &'static str> {
    let mut pieces = value.split(|&b| b == b',').peekable();
    let mut last_chunked = false;
    while let Some(piece) = pieces.next() {
        let piece = trim_start(piece);
        let chunked = piece.len() >= 7
            && piece[..7].eq_ignore_ascii_case(b"chunked")
            && piece[7..].iter().all(|&b| b == b' ');
        if chunked && pieces.peek().is_some() {
            return Err("Invalid `Transfer-Encoding` header value");
        }
        last_chunked = chunked;
    }
    Ok(last_chunked)
}

fn trim_start(piece: &[u8]) -> &[u8] {
    let lead = piece
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &piece[lead..]
}

/// Python's `bytes.strip()` for header values (which hold no CR, LF, VT or FF).
fn strip(value: &[u8]) -> &[u8] {
    let value = trim_start(value);
    let tail = value
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &value[..value.len() - tail]
}

fn header_value<'a>(headers: &[Header<'a>], name: &[u8]) -> Option<Cow<'a, [u8]>> {
    let mut out: Option<Cow<'a, [u8]>> = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        out = Some(match out {
            None => Cow::Borrowed(h.value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(h.value);
                Cow::Owned(joined)
            }
        });
    }
    out
}

fn tokens(value: &[u8]) -> Vec<Vec<u8>> {
    value
        .split(|&b| b == b',')
        .map(strip)
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_lowercase())
        .collect()
}

/// Whether the headers called `name` list `token` (any case), as
/// `tokens(name)` would, without joining or lower-casing them.
fn has_token(headers: &[Header<'_>], name: &[u8], token: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| strip(t).eq_ignore_ascii_case(token))
}

// --- loopwatch's checks -------------------------------------------------------

/// The checks loopwatch makes once llhttp's grammar has the whole head (the
/// head's framing, then, for an upgrade, the WebSocket handshake's).
fn finish(raw: RawHead<'_>) -> Result<RequestHead<'_>, Rejection> {
    let version = match (raw.major, raw.minor) {
        (1, 0) => Version::Http10,
        // A higher minor version is read as the highest this end speaks
        // (RFC 9112 §2.3), as nginx and HAProxy do: HTTP/1.2 is HTTP/1.1, and
        // goes upstream as that.
        (1, _) => Version::Http11,
        (major, _) if major >= 2 => {
            return Err(Rejection::new(
                505,
                RejectReason::Version,
                "HTTP version not supported: HTTP/1.1 only",
            ))
        }
        _ => {
            return Err(Rejection::new(
                400,
                RejectReason::Version,
                "unsupported HTTP version",
            ))
        }
    };
    let flags = raw.flags;
    if version == Version::Http10 && flags.transfer_encoding {
        // RFC 9112 §6.1: a Transfer-Encoding in an HTTP/1.0 request is faulty
        // framing (llhttp would read the body as chunked, a server that ignores
        // the header in HTTP/1.0 as unframed).
        return Err(Rejection::bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    let keep_alive = match version {
        Version::Http11 => !flags.connection_close,
        Version::Http10 => flags.connection_keep_alive,
    };
    let url = parse_url(raw.raw_target).ok_or(Rejection::bad("invalid request target"))?;
    let path = url.path.unwrap_or(b"/");
    if !path.starts_with(b"/") {
        return Err(Rejection::bad("request target must be an absolute path"));
    }
    let hosts = raw
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(b"host"))
        .count();
    if hosts > 1 {
        return Err(Rejection::bad("more than one Host header"));
    }
    let mut authority = header_value(&raw.headers, b"host");
    if authority.is_none() && version == Version::Http11 {
        return Err(Rejection::bad("missing Host"));
    }
    let mut target = Cow::Borrowed(raw.raw_target);
    if let Some(schema) = url.schema {
        let known = [&b"http"[..], b"https", b"ws", b"wss"]
            .iter()
            .any(|s| s.eq_ignore_ascii_case(schema));
        let host = url.host.filter(|h| !h.is_empty());
        let Some(host) = host.filter(|_| known) else {
            return Err(Rejection::bad("invalid request target"));
        };
        if url.userinfo {
            // RFC 9110 §4.2.4: a recipient should treat userinfo as an error
            // (it obscures the authority); nginx refuses it, as loopwatch
            // refuses it in Host. It was dropped and the request forwarded.
            return Err(Rejection::bad("userinfo in the request target"));
        }
        // Absolute-form (RFC 9112 §3.2.2): the target's authority replaces
        // Host, and the upstream gets the origin-form.
        let mut a = Vec::with_capacity(host.len() + 8);
        if host.contains(&b':') {
            a.push(b'[');
            a.extend_from_slice(host);
            a.push(b']');
        } else {
            a.extend_from_slice(host);
        }
        if let Some(port) = url.port {
            a.extend_from_slice(format!(":{port}").as_bytes());
        }
        authority = Some(Cow::Owned(a));
        let mut t = path.to_vec();
        if let Some(query) = url.query {
            t.push(b'?');
            t.extend_from_slice(query);
        }
        target = Cow::Owned(t);
    }
    if let Some(a) = &authority {
        if a.is_empty() || !a.iter().all(|&b| AUTHORITY_CHAR[b as usize]) {
            return Err(Rejection::bad("invalid Host"));
        }
    }
    // An offer to upgrade to another protocol (`Upgrade: h2c` from `curl
    // --http2` or Java's HttpClient, with no WebSocket key) on an ordinary
    // request: declined, as RFC 9110 §7.8 lets a server, and the request is
    // served as plain HTTP/1.1 (its Upgrade and the Connection tokens naming
    // it are hop-by-hop: not forwarded), as nginx and HAProxy serve it. What
    // carries a WebSocket key is a WebSocket attempt, however broken.
    let declined = flags.upgrade_header
        && flags.connection_upgrade
        && raw.method != "CONNECT"
        && !has_token(&raw.headers, b"upgrade", b"websocket")
        && header_value(&raw.headers, b"sec-websocket-key").is_none();
    // A body announced by what asks to be an upgrade (an Upgrade header and a
    // Connection token `upgrade`, whatever llhttp makes of them): the bytes
    // after the head would be frames to one reader and a body to another.
    let has_body = flags.transfer_encoding || flags.content_length.is_some_and(|n| n > 0);
    if has_body
        && !declined
        && raw
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(b"upgrade"))
        && has_token(&raw.headers, b"connection", b"upgrade")
    {
        return Err(Rejection::new(
            400,
            RejectReason::UpgradeWithBody,
            "upgrade request with a body",
        ));
    }
    let upgrade =
        (flags.upgrade_header && flags.connection_upgrade && !declined) || raw.method == "CONNECT";
    let kind = if upgrade {
        check_websocket(&raw, version, authority.is_some())?;
        RequestKind::WebSocket
    } else if flags.chunked && flags.other_coding {
        return Err(Rejection::new(
            501,
            RejectReason::NotImplemented,
            "transfer coding not implemented: only chunked",
        ));
    } else if flags.chunked {
        RequestKind::Http(BodyFraming::Chunked)
    } else if flags.transfer_encoding {
        return Err(Rejection::bad(
            "malformed request: Request has invalid `Transfer-Encoding`",
        ));
    } else {
        match flags.content_length {
            Some(n) if n > 0 => RequestKind::Http(BodyFraming::Length(n)),
            _ => RequestKind::Http(BodyFraming::None),
        }
    };
    Ok(RequestHead {
        method: raw.method,
        raw_target: raw.raw_target,
        target,
        path,
        query: url.query.unwrap_or(b""),
        protocol: raw.protocol,
        version,
        headers: raw.headers,
        authority,
        keep_alive,
        kind,
        head_len: raw.head_len,
    })
}

/// RFC 6455 §4.2.1, as `validate_websocket_upgrade` checks it.
fn check_websocket(raw: &RawHead<'_>, version: Version, has_host: bool) -> Result<(), Rejection> {
    let headers = &raw.headers;
    if !has_token(headers, b"upgrade", b"websocket")
        || !has_token(headers, b"connection", b"upgrade")
    {
        return Err(Rejection::bad(
            "unsupported upgrade: only websocket is proxied",
        ));
    }
    if raw.method != "GET" {
        return Err(Rejection::bad("websocket upgrade must use GET"));
    }
    if version != Version::Http11 {
        return Err(Rejection::bad("websocket upgrade requires HTTP/1.1"));
    }
    let Some(key) = header_value(headers, b"sec-websocket-key") else {
        return Err(Rejection::bad("missing Sec-WebSocket-Key"));
    };
    if !valid_key(strip(&key)) {
        return Err(Rejection::bad("invalid Sec-WebSocket-Key"));
    }
    if header_value(headers, b"sec-websocket-version").as_deref() != Some(&b"13"[..]) {
        return Err(Rejection::new(
            426,
            RejectReason::UpgradeRequired,
            "unsupported Sec-WebSocket-Version",
        ));
    }
    if !has_host {
        return Err(Rejection::bad("missing Host"));
    }
    Ok(())
}

/// 16 bytes in strict base64: 22 alphabet characters and `==`.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key[22..] == *b"=="
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2): base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut input = strip(key).to_vec();
    input.extend_from_slice(WS_GUID);
    base64(&sha1(&input))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, &wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// --- the request-target, as http_parser_parse_url reads it --------------------

/// The parts of a request-target (as `httptools.parse_url` gave them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Url<'a> {
    schema: Option<&'a [u8]>,
    host: Option<&'a [u8]>,
    port: Option<u16>,
    /// The authority had `userinfo@`.
    userinfo: bool,
    path: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UrlField {
    Schema,
    Host,
    Path,
    Query,
    Fragment,
}

/// `http_parser_parse_url(buf, len, is_connect=0)` of nodejs/http-parser
/// (strict build), which the asyncio data plane called on every target: None
/// where it fails. The characters were already checked by the scanner; what
/// this adds is the structure of the authority of an absolute-form target.
fn parse_url(target: &[u8]) -> Option<Url<'_>> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum S {
        Start,
        Schema,
        SchemaSlash,
        SchemaSlashSlash,
        ServerStart,
        Server,
        ServerWithAt,
        Path,
        QueryStart,
        Query,
        FragmentStart,
        Fragment,
    }
    let mut s = S::Start;
    let mut spans: [Option<(usize, usize)>; 5] = [None; 5];
    let mut found_at = false;
    let mut previous: Option<UrlField> = None;
    for (i, &ch) in target.iter().enumerate() {
        if matches!(ch, b' ' | b'\r' | b'\n' | b'\t' | 0x0c) {
            return None;
        }
        let url_char = URL_CHAR[ch as usize];
        s = match s {
            S::Start if ch == b'/' || ch == b'*' => S::Path,
            S::Start if is_alpha(ch) => S::Schema,
            S::Schema if is_alpha(ch) => S::Schema,
            S::Schema if ch == b':' => S::SchemaSlash,
            S::SchemaSlash if ch == b'/' => S::SchemaSlashSlash,
            S::SchemaSlashSlash if ch == b'/' => S::ServerStart,
            S::ServerWithAt if ch == b'@' => return None,
            S::ServerStart | S::Server | S::ServerWithAt => match ch {
                b'/' => S::Path,
                b'?' => S::QueryStart,
                b'@' => S::ServerWithAt,
                _ if USERINFO_CHAR[ch as usize] || ch == b'[' || ch == b']' => S::Server,
                _ => return None,
            },
            S::Path if url_char => S::Path,
            S::Path if ch == b'?' => S::QueryStart,
            S::Path if ch == b'#' => S::FragmentStart,
            S::QueryStart | S::Query if url_char || ch == b'?' => S::Query,
            S::QueryStart | S::Query if ch == b'#' => S::FragmentStart,
            S::FragmentStart if url_char || ch == b'?' => S::Fragment,
            S::FragmentStart if ch == b'#' => S::FragmentStart,
            S::Fragment if url_char || ch == b'?' || ch == b'#' => S::Fragment,
            _ => return None,
        };
        let field = match s {
            S::SchemaSlash
            | S::SchemaSlashSlash
            | S::ServerStart
            | S::QueryStart
            | S::FragmentStart => continue,
            S::Schema => UrlField::Schema,
            S::ServerWithAt => {
                found_at = true;
                UrlField::Host
            }
            S::Server => UrlField::Host,
            S::Path => UrlField::Path,
            S::Query => UrlField::Query,
            S::Fragment => UrlField::Fragment,
            S::Start => unreachable!("no transition leads back to the start"),
        };
        let slot = &mut spans[field as usize];
        if previous == Some(field) {
            if let Some((_, end)) = slot {
                *end = i + 1;
            }
        } else {
            *slot = Some((i, i + 1));
            previous = Some(field);
        }
    }
    let part = |f: UrlField| spans[f as usize].map(|(a, b)| &target[a..b]);
    let mut url = Url {
        schema: part(UrlField::Schema),
        host: None,
        port: None,
        userinfo: found_at,
        path: part(UrlField::Path),
        query: part(UrlField::Query),
    };
    match (url.schema.is_some(), part(UrlField::Host)) {
        (true, None) => return None, // "http:///x": a schema needs a host
        (_, Some(server)) => {
            let (host, port) = parse_host(server, found_at)?;
            url.host = Some(host);
            url.port = port;
        }
        (false, None) => {}
    }
    Some(url)
}

/// http_parser's `http_parse_host`: `[userinfo@]host[:port]` with an IPv6
/// literal in brackets (zone allowed); the host without brackets, the port
/// at most 65535.
fn parse_host(server: &[u8], found_at: bool) -> Option<(&[u8], Option<u16>)> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum H {
        UserinfoStart,
        Userinfo,
        HostStart,
        Host,
        V6Start,
        V6,
        V6ZoneStart,
        V6Zone,
        V6End,
        PortStart,
        Port,
    }
    let host_char = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    let zone_char =
        |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'%' | b'.' | b'-' | b'_' | b'~');
    let mut s = if found_at {
        H::UserinfoStart
    } else {
        H::HostStart
    };
    let mut host: Option<(usize, usize)> = None;
    let mut port: Option<(usize, usize)> = None;
    for (i, &c) in server.iter().enumerate() {
        let next = match s {
            H::UserinfoStart | H::Userinfo if c == b'@' => H::HostStart,
            H::UserinfoStart | H::Userinfo if USERINFO_CHAR[c as usize] => H::Userinfo,
            H::HostStart if c == b'[' => H::V6Start,
            H::HostStart if host_char(c) => H::Host,
            H::Host if host_char(c) => H::Host,
            H::Host | H::V6End if c == b':' => H::PortStart,
            H::V6 if c == b']' => H::V6End,
            H::V6 | H::V6Start if c.is_ascii_hexdigit() || c == b':' || c == b'.' => H::V6,
            H::V6 if c == b'%' => H::V6ZoneStart,
            H::V6Zone if c == b']' => H::V6End,
            H::V6Zone | H::V6ZoneStart if zone_char(c) => H::V6Zone,
            H::Port | H::PortStart if c.is_ascii_digit() => H::Port,
            _ => return None,
        };
        match next {
            H::Host | H::V6 if next != s => host = Some((i, i + 1)),
            H::Host | H::V6 | H::V6ZoneStart | H::V6Zone => {
                if let Some((_, end)) = host.as_mut() {
                    *end = i + 1;
                }
            }
            H::Port if next != s => port = Some((i, i + 1)),
            H::Port => {
                if let Some((_, end)) = port.as_mut() {
                    *end = i + 1;
                }
            }
            _ => {}
        }
        s = next;
    }
    if matches!(
        s,
        H::HostStart
            | H::V6Start
            | H::V6
            | H::V6ZoneStart
            | H::V6Zone
            | H::PortStart
            | H::Userinfo
            | H::UserinfoStart
    ) {
        return None;
    }
    let port = match port {
        None => None,
        Some((a, b)) => {
            let mut v: u32 = 0;
            for &d in &server[a..b] {
                v = v * 10 + u32::from(d - b'0');
                if v > 0xffff {
                    return None;
                }
            }
            Some(v as u16)
        }
    };
    let host = host.map_or(&b""[..], |(a, b)| &server[a..b]);
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /ws?x=1 HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(buf: &[u8]) -> HeadStatus<'_> {
        parse_head(buf, &HeadLimits::default())
    }

    fn rejected(buf: &[u8]) -> Rejection {
        match parse(buf) {
            HeadStatus::Rejected(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn websocket_upgrade_is_parsed_with_what_follows() {
        let mut buf = UPGRADE.to_vec();
        buf.extend_from_slice(b"\x81\x80abcd");
        let HeadStatus::Complete(head) = parse(&buf) else {
            panic!("not complete")
        };
        assert_eq!(head.kind, RequestKind::WebSocket);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, b"/ws");
        assert_eq!(head.query, b"x=1");
        assert_eq!(head.target.as_ref(), b"/ws?x=1");
        assert_eq!(head.authority.as_deref(), Some(&b"example.test"[..]));
        assert_eq!(&buf[head.head_len..], b"\x81\x80abcd");
        assert_eq!(head.headers.len(), 5);
        assert!(head.keep_alive);
    }

    #[test]
    fn every_prefix_of_a_valid_head_is_partial() {
        for end in 0..UPGRADE.len() {
            assert_eq!(
                parse(&UPGRADE[..end]),
                HeadStatus::Partial,
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn size_limit_counts_the_head_up_to_its_blank_line() {
        let limits = HeadLimits {
            max_head_size: UPGRADE.len(),
        };
        let mut buf = UPGRADE.to_vec();
        buf.extend_from_slice(&[0u8; 100]); // frames after the head do not count
        assert!(matches!(parse_head(&buf, &limits), HeadStatus::Complete(_)));
        let limits = HeadLimits {
            max_head_size: UPGRADE.len() - 1,
        };
        let r = match parse_head(&buf, &limits) {
            HeadStatus::Rejected(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!((r.status, r.reason.label()), (431, "head_too_large"));
        // Incomplete and already too long: refused without waiting for more.
        let limits = HeadLimits { max_head_size: 10 };
        assert!(matches!(
            parse_head(b"GET /aaaaaaaaaaaaaaaaaaaa", &limits),
            HeadStatus::Rejected(_)
        ));
    }

    #[test]
    fn a_request_line_over_the_limit_is_414() {
        let limits = HeadLimits { max_head_size: 64 };
        let refused = |buf: &[u8]| match parse_head(buf, &limits) {
            HeadStatus::Rejected(r) => (r.status, r.reason.label(), r.message.into_owned()),
            other => panic!("{other:?}"),
        };
        let long_url = [&b"GET /"[..], &[b'a'; 80], b" HTTP/1.1\r\nHost: a\r\n\r\n"].concat();
        assert_eq!(
            refused(&long_url),
            (414, "head_too_large", "request line too long".to_owned())
        );
        // Incomplete, already over: the same answer without waiting.
        assert_eq!(refused(&long_url[..70]).0, 414);
        // After leading blank lines, the request line is what comes next.
        assert_eq!(refused(&[&b"\r\n\r\n"[..], &long_url].concat()).0, 414);
        // A short request line with header fields over the limit: 431.
        let long_fields = [&b"GET / HTTP/1.1\r\nX-Pad: "[..], &[b'p'; 80], b"\r\n\r\n"].concat();
        assert_eq!(
            refused(&long_fields),
            (
                431,
                "head_too_large",
                "request header fields too large".to_owned()
            )
        );
        // Blank lines alone beyond the limit: 431, whatever follows them.
        let blank_then_line = [&b"\r\n".repeat(40)[..], b"GET / HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(refused(&blank_then_line).0, 431);
    }

    #[test]
    fn leading_blank_lines_count_towards_the_size_limit() {
        // A leading CRLF CRLF is not the end of the head: the limit measures
        // the blank lines and the whole head after them.
        let mut buf = b"\r\n\r\n".to_vec();
        buf.extend_from_slice(UPGRADE);
        let exact = HeadLimits {
            max_head_size: buf.len(),
        };
        let HeadStatus::Complete(head) = parse_head(&buf, &exact) else {
            panic!("not complete")
        };
        assert_eq!(head.head_len, buf.len());
        let short = HeadLimits {
            max_head_size: buf.len() - 1,
        };
        let r = match parse_head(&buf, &short) {
            HeadStatus::Rejected(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!((r.status, r.reason.label()), (431, "head_too_large"));
        // Nothing but blank lines: waited for up to the limit, refused beyond.
        let blank = b"\r\n".repeat(8);
        let limits = HeadLimits { max_head_size: 16 };
        assert_eq!(parse_head(&blank, &limits), HeadStatus::Partial);
        let limits = HeadLimits { max_head_size: 15 };
        assert!(matches!(
            parse_head(&blank, &limits),
            HeadStatus::Rejected(Rejection { status: 431, .. })
        ));
    }

    #[test]
    fn a_coding_besides_chunked_is_501() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x-custom , CHUNKED\r\n\r\n",
        ] {
            let r = rejected(head);
            assert_eq!((r.status, r.reason.label()), (501, "not_implemented"));
            assert_eq!(r.message, "transfer coding not implemented: only chunked");
        }
        // Empty list elements are no coding (RFC 9110 §5.6.1).
        let HeadStatus::Complete(head) =
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked\r\n\r\n")
        else {
            panic!("not complete")
        };
        assert_eq!(head.kind, RequestKind::Http(BodyFraming::Chunked));
        // No final chunked: the framing is unknown, 400 as before.
        let r = rejected(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!((r.status, r.reason.label()), (400, "bad_request"));
    }

    #[test]
    fn transfer_encoding_in_http_1_0_is_refused() {
        for head in [
            &b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.0\r\nHost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"GET / HTTP/1.0\r\nTransfer-Encoding: identity\r\n\r\n",
        ] {
            let r = rejected(head);
            assert_eq!((r.status, r.reason.label()), (400, "bad_request"));
            assert_eq!(r.message, "Transfer-Encoding in an HTTP/1.0 request");
        }
        // The same request in HTTP/1.1 is chunked.
        let HeadStatus::Complete(head) =
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        else {
            panic!("not complete")
        };
        assert_eq!(head.kind, RequestKind::Http(BodyFraming::Chunked));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n",
        ] {
            assert_eq!(rejected(head).status, 400, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn websocket_checks_answer_as_the_python_data_plane() {
        let v8 = String::from_utf8(UPGRADE.to_vec())
            .unwrap()
            .replace("Version: 13", "Version: 8");
        let r = rejected(v8.as_bytes());
        assert_eq!((r.status, r.reason.label()), (426, "upgrade_required"));
        assert_eq!(r.extra_headers(), &[("Sec-WebSocket-Version", "13")]);
        let with_body = String::from_utf8(UPGRADE.to_vec())
            .unwrap()
            .replace("\r\n\r\n", "\r\nContent-Length: 3\r\n\r\n");
        let r = rejected(with_body.as_bytes());
        assert_eq!((r.status, r.reason.label()), (400, "upgrade_with_body"));
        for later in [
            &b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/3.1\r\nHost: a\r\n\r\n",
        ] {
            let r = rejected(later);
            assert_eq!((r.status, r.reason.label()), (505, "version"));
        }
        let r = rejected(b"GET / HTTP/0.8\r\nHost: a\r\n\r\n");
        assert_eq!((r.status, r.reason.label()), (400, "version"));
    }

    #[test]
    fn a_later_minor_version_is_http_1_1() {
        let later = String::from_utf8(UPGRADE.to_vec())
            .unwrap()
            .replacen("HTTP/1.1", "HTTP/1.2", 1);
        let HeadStatus::Complete(head) = parse(later.as_bytes()) else {
            panic!("not complete")
        };
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.kind, RequestKind::WebSocket);
        let HeadStatus::Complete(head) = parse(b"GET /x HTTP/1.9\r\nHost: a\r\n\r\n") else {
            panic!("not complete")
        };
        assert_eq!(head.version, Version::Http11);
    }

    #[test]
    fn rejection_response_is_one_line_and_closes() {
        let r = rejected(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            String::from_utf8(r.response()).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Length: 13\r\nConnection: close\r\n\r\nmissing Host\n"
        );
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn reasons_have_distinct_labels() {
        let labels: std::collections::HashSet<_> =
            RejectReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
