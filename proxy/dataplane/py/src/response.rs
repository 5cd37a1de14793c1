//! The upstream's answer to a forwarded upgrade request, sans-I/O: a 101 whose
//! head is relayed byte for byte, or a refusal (401, 403, 5xx …) relayed with
//! its status, end-to-end headers and a bounded body.
//!
//! The head is parsed with httparse. What has a body follows RFC 9112 §6.3 as
//! llhttp applies it: none for 1xx, 204 and 304, nor for an answer that asks for
//! an upgrade without announcing one; `Transfer-Encoding: chunked` (decoded);
//! `Content-Length`; otherwise everything until the upstream closes. The body
//! kept is at most `max_body` bytes: the answer is relayed once that much came.

use std::borrow::Cow;
use std::fmt;

// Headers dropped from a relayed refusal besides Content-Length: the hop-by-hop
// set; the Connection header's tokens are dropped too.
use crate::wire::hop_by_hop;

/// Headers a response head may have before it is refused (beyond the size cap).
const FEW_HEADERS: usize = 64;

/// Why the upstream's answer cannot be relayed: the client gets a 502.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadResponse {
    HeadTooLarge,
    Invalid(String),
}

impl fmt::Display for BadResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadResponse::HeadTooLarge => f.write_str("upstream response head too large"),
            BadResponse::Invalid(why) => write!(f, "invalid response from upstream: {why}"),
        }
    }
}

/// The upstream refused the upgrade: its status and the bytes the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRefusal {
    pub status: u16,
    pub response: Vec<u8>,
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// More bytes are needed.
    Partial,
    /// A 101: the first `head_len` bytes of the buffer are its head, the rest
    /// are the upstream's first frames. `allowed_rsv`: the RSV bits the
    /// negotiated extensions may set.
    Upgrade {
        head_len: usize,
        allowed_rsv: u8,
    },
    Refused(UpstreamRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes of chunk data still to come, then its CRLF.
    Data(u64),
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

#[derive(Debug)]
pub(crate) struct Head {
    /// HTTP/1.1 (else 1.0).
    pub(crate) http11: bool,
    pub(crate) status: u16,
    pub(crate) reason: Vec<u8>,
    pub(crate) headers: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug)]
enum State {
    Head,
    Body {
        head: Head,
        framing: Framing,
        chunk: Chunk,
        /// Body bytes received (Content-Length) so far.
        received: u64,
        body: Vec<u8>,
    },
    Done,
}

/// Reads the upstream's answer; see the module documentation.
#[derive(Debug)]
pub struct ResponseReader {
    buf: Vec<u8>,
    /// The interim answers (100, 103 …) at the start of `buf`, in bytes.
    interim: usize,
    max_head: usize,
    max_body: usize,
    state: State,
    /// The `Sec-WebSocket-Accept` a 101 must carry (`expecting_accept`).
    accept: Option<Vec<u8>>,
}

fn lower(name: &[u8]) -> Vec<u8> {
    name.to_ascii_lowercase()
}

fn trim(value: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t');
    let start = value.iter().position(|b| !ws(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &value[start..end]
}

/// The trimmed, non-empty comma-separated tokens of a header value, as sent
/// (compare them in any case).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

impl Head {
    /// Values of a header, joined with ", " as Python's `header()` does
    /// (borrowed when there is one).
    pub(crate) fn header(&self, name: &[u8]) -> Option<Cow<'_, [u8]>> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice());
        let first = values.next()?;
        let Some(second) = values.next() else {
            return Some(Cow::Borrowed(first));
        };
        let mut out = [first, second].join(&b", "[..]);
        for v in values {
            out.extend_from_slice(b", ");
            out.extend_from_slice(v);
        }
        Some(Cow::Owned(out))
    }

    /// How the body of this (non-101) answer is framed. `to_upgrade`: it
    /// answers an upgrade request (the handshake's refusal).
    pub(crate) fn framing(&self, to_upgrade: bool) -> Result<Framing, BadResponse> {
        if (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return Ok(Framing::None);
        }
        let te = self.header(b"transfer-encoding");
        let lengths: Vec<&[u8]> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
            .map(|(_, v)| trim(v))
            .collect();
        if te.is_some() && !lengths.is_empty() {
            return Err(BadResponse::Invalid(
                "Content-Length together with Transfer-Encoding".into(),
            ));
        }
        // The same value repeated is one length (RFC 9110, 8.6; nginx and
        // HAProxy deliver it, and a middleware chain that repeats the header
        // is no reason for a 502: the upstream probe); values that differ
        // are a bad response. Requests stay strict (smuggling).
        let length = match lengths.as_slice() {
            [] => None,
            [one, rest @ ..] if rest.iter().all(|other| other == one) => Some(
                std::str::from_utf8(one)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| BadResponse::Invalid("invalid Content-Length".into()))?,
            ),
            _ => {
                return Err(BadResponse::Invalid(
                    "Content-Length values that differ".into(),
                ))
            }
        };
        // Chunked alone: loopwatch takes the chunks off, and the header is
        // hop-by-hop, so any other coding (gzip, chunked) would go on unnamed,
        // a corrupted body to the client. Refused as HAProxy refuses it (502),
        // and as the request side refuses it (501).
        let chunked = match te.as_deref() {
            None => false,
            Some(v) => {
                let mut codings = tokens(v);
                let alone = codings
                    .next()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
                    && codings.next().is_none();
                if !alone {
                    return Err(BadResponse::Invalid(
                        "a transfer coding besides chunked".into(),
                    ));
                }
                true
            }
        };
        // To an upgrade request, a refusal that asks for an upgrade itself (a
        // 426 with `Connection: Upgrade`) and says no length is complete, as
        // the handshake's parser has always read it: the client gives up on a
        // non-101 at once, whatever follows. To a plain request, an `Upgrade`
        // only announces what the server supports (Apache's `Upgrade:
        // h2,h2c`): its body is framed as any other's.
        let upgrade = to_upgrade
            && self
                .header(b"upgrade")
                .is_some_and(|v| !trim(&v).is_empty())
            && self
                .header(b"connection")
                .is_some_and(|v| tokens(&v).any(|t| t.eq_ignore_ascii_case(b"upgrade")));
        if upgrade && !chunked && length.unwrap_or(0) == 0 {
            return Ok(Framing::None);
        }
        Ok(match (chunked, length) {
            (true, _) => Framing::Chunked,
            (false, Some(0)) => Framing::None,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::UntilClose,
        })
    }

    /// RSV bits the extensions of a 101 allow (the frame watcher refuses the others).
    fn allowed_rsv(&self) -> u8 {
        let extensions = lower(&self.header(b"sec-websocket-extensions").unwrap_or_default());
        if extensions.is_empty() {
            0
        } else if trim(&extensions).starts_with(b"permessage-deflate")
            && !extensions.contains(&b',')
        {
            0b100
        } else {
            0b111 // an extension loopwatch does not know may use any RSV bit
        }
    }

    /// The refusal as the client gets it: same status, reason and end-to-end
    /// headers, the bounded body, then the connection closes.
    fn refusal(&self, body: &[u8]) -> UpstreamRefusal {
        let named: Vec<&[u8]> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
            .flat_map(|(_, v)| tokens(v))
            .collect();
        let mut out = format!("HTTP/1.1 {} ", self.status).into_bytes();
        out.extend_from_slice(&self.reason);
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            if hop_by_hop(name, &named) || name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        UpstreamRefusal {
            status: self.status,
            response: out,
        }
    }
}

fn parse_head<'b>(
    buf: &'b [u8],
    slots: &mut [httparse::Header<'b>],
) -> Result<Option<(Head, usize)>, httparse::Error> {
    let mut response = httparse::Response::new(slots);
    match response.parse(buf)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) => {
            let head = Head {
                http11: response.version == Some(1),
                status: response.code.unwrap_or(0),
                reason: response.reason.unwrap_or("").as_bytes().to_vec(),
                headers: response
                    .headers
                    .iter()
                    .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
                    .collect(),
            };
            Ok(Some((head, len)))
        }
    }
}

/// A response head at the start of `buf`, and its length; None while it is
/// incomplete (and no longer than `max_head`). A head longer than `max_head`
/// is too large however it was read (one read may bring more than the limit),
/// and a status outside 100-599 (RFC 9110 §15: `000` from a broken backend)
/// is no valid answer.
pub(crate) fn parse_response_head(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<(Head, usize)>, BadResponse> {
    // On the stack: a head has few headers, most of the time.
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    let parsed = match parse_head(buf, &mut few) {
        // Every header line takes at least 4 bytes.
        Err(httparse::Error::TooManyHeaders) => {
            parse_head(buf, &mut vec![httparse::EMPTY_HEADER; buf.len() / 4 + 1])
        }
        other => other,
    };
    match parsed {
        Err(e) => Err(BadResponse::Invalid(e.to_string())),
        Ok(None) if buf.len() > max_head => Err(BadResponse::HeadTooLarge),
        Ok(Some((_, len))) if len > max_head => Err(BadResponse::HeadTooLarge),
        Ok(Some((head, _))) if !(100..=599).contains(&head.status) => Err(BadResponse::Invalid(
            format!("status {:03} outside 100-599", head.status),
        )),
        Ok(done) => Ok(done),
    }
}

impl ResponseReader {
    pub fn new(max_head: usize, max_body: usize) -> Self {
        ResponseReader {
            buf: Vec::new(),
            interim: 0,
            max_head,
            max_body,
            state: State::Head,
            accept: None,
        }
    }

    /// A 101 must answer this `Sec-WebSocket-Accept` (the client's key's) and
    /// name `upgrade` in `Connection`, or it is a bad response (502): passed
    /// on, the client failed the handshake and dropped the connection, and
    /// the engine blamed it (short-lived, reconnecting) for the upstream's
    /// fault, counted as an upstream success. HAProxy answers 502 too.
    pub fn expecting_accept(mut self, accept: String) -> Self {
        self.accept = Some(accept.into_bytes());
        self
    }

    /// The bytes received (after an Upgrade: the 101's head, then the
    /// upstream's first frames).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Take the next bytes of the answer.
    pub fn feed(&mut self, data: &[u8]) -> Result<Answer, BadResponse> {
        match self.state {
            State::Done => Ok(Answer::Partial),
            State::Head => {
                self.buf.extend_from_slice(data);
                let (head, len) = loop {
                    let room = self.max_head.saturating_sub(self.interim);
                    let (head, len) = match parse_response_head(&self.buf[self.interim..], room)? {
                        None => return Ok(Answer::Partial),
                        Some(done) => done,
                    };
                    if head.status == 101 || !(100..200).contains(&head.status) {
                        break (head, self.interim + len);
                    }
                    // An interim answer (103 Early Hints, 100 Continue): the
                    // final one follows. Passed on before a 101, as nginx
                    // does (the client's HTTP handling skips it); a refusal
                    // is written anew, without it. Counted in the head's bound.
                    self.interim += len;
                    if self.interim > self.max_head {
                        return Err(BadResponse::HeadTooLarge);
                    }
                };
                if head.status == 101 {
                    // A 101 that switches to anything but websocket answers no
                    // upgrade we sent: 502.
                    let upgrade = head.header(b"upgrade").unwrap_or_default();
                    if !tokens(&upgrade).any(|t| t.eq_ignore_ascii_case(b"websocket")) {
                        return Err(BadResponse::Invalid(
                            "a 101 without Upgrade: websocket".into(),
                        ));
                    }
                    if let Some(expected) = &self.accept {
                        let accepts = head
                            .headers
                            .iter()
                            .filter(|(n, _)| n.eq_ignore_ascii_case(b"sec-websocket-accept"))
                            .count();
                        if accepts > 1 {
                            // Joined, a right value repeated read as a wrong one: said
                            // as it is (browsers fail such a handshake too).
                            return Err(BadResponse::Invalid(
                                "a 101 with Sec-WebSocket-Accept repeated".into(),
                            ));
                        }
                        let answered = head.header(b"sec-websocket-accept");
                        if answered.as_deref().map(trim) != Some(&expected[..]) {
                            return Err(BadResponse::Invalid(
                                "a 101 whose Sec-WebSocket-Accept does not answer the key".into(),
                            ));
                        }
                        let connection = head.header(b"connection").unwrap_or_default();
                        if !tokens(&connection).any(|t| t.eq_ignore_ascii_case(b"upgrade")) {
                            return Err(BadResponse::Invalid(
                                "a 101 without Connection: upgrade".into(),
                            ));
                        }
                    }
                    self.state = State::Done;
                    return Ok(Answer::Upgrade {
                        head_len: len,
                        allowed_rsv: head.allowed_rsv(),
                    });
                }
                let framing = head.framing(true)?;
                let rest = self.buf.split_off(len);
                self.buf.clear();
                self.state = State::Body {
                    head,
                    framing,
                    chunk: Chunk::Size,
                    received: 0,
                    body: Vec::new(),
                };
                self.body(&rest)
            }
            State::Body { .. } => self.body(data),
        }
    }

    /// Whether a refusal's head has come (its body is being read).
    pub fn has_head(&self) -> bool {
        matches!(self.state, State::Body { .. })
    }

    /// The upstream closed: a body read until the close ends here. None when
    /// no complete head came (the client gets a 502).
    pub fn eof(&mut self) -> Option<UpstreamRefusal> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Body { head, body, .. } => Some(head.refusal(&body)),
            _ => None,
        }
    }

    fn body(&mut self, data: &[u8]) -> Result<Answer, BadResponse> {
        let State::Body {
            head,
            framing,
            chunk,
            received,
            body,
        } = &mut self.state
        else {
            return Ok(Answer::Partial);
        };
        let room = self.max_body - body.len().min(self.max_body);
        let complete = match *framing {
            Framing::None => true,
            Framing::UntilClose => {
                body.extend_from_slice(&data[..data.len().min(room)]);
                false
            }
            Framing::Length(n) => {
                let take = (n - *received).min(data.len() as u64) as usize;
                *received += take as u64;
                body.extend_from_slice(&data[..take.min(room)]);
                *received == n
            }
            Framing::Chunked => {
                self.buf.extend_from_slice(data);
                let (consumed, last) = decode_chunks(&self.buf, chunk, body, self.max_body)?;
                self.buf.drain(..consumed);
                // A chunk-size or trailer line is short: refuse an endless one.
                if self.buf.len() > self.max_head {
                    return Err(BadResponse::Invalid("chunk line too long".into()));
                }
                last
            }
        };
        if complete || body.len() >= self.max_body {
            let refusal = head.refusal(&body[..body.len().min(self.max_body)]);
            self.state = State::Done;
            self.buf = Vec::new();
            return Ok(Answer::Refused(refusal));
        }
        Ok(Answer::Partial)
    }
}

/// Decode chunked framing from `buf` (bytes not consumed yet); the bytes
/// consumed, and whether the message ended. Body bytes beyond `max_body` are
/// dropped. A line may end in a bare LF (RFC 9112 §2.2: a recipient MAY take
/// it for CRLF), as nginx and HAProxy take it from an upstream: loopwatch
/// frames the body anew, so its client never sees the upstream's line ends.
/// (Requests are held to CRLF: there a lenient parser is a smuggling risk.)
pub(crate) fn decode_chunks(
    buf: &[u8],
    chunk: &mut Chunk,
    body: &mut Vec<u8>,
    max_body: usize,
) -> Result<(usize, bool), BadResponse> {
    let bad = |why: &str| BadResponse::Invalid(format!("invalid chunked body: {why}"));
    let mut pos = 0;
    loop {
        match *chunk {
            Chunk::Size | Chunk::Trailers => {
                let Some(end) = buf[pos..].iter().position(|&b| b == b'\n') else {
                    return Ok((pos, false));
                };
                let line = &buf[pos..pos + end];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                pos += end + 1;
                if *chunk == Chunk::Trailers {
                    if line.is_empty() {
                        return Ok((pos, true));
                    }
                    continue;
                }
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(trim(size))
                    .ok()
                    .filter(|s| !s.is_empty())
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                    .ok_or_else(|| bad("chunk size"))?;
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                let take = left.min((buf.len() - pos) as u64) as usize;
                let room = max_body - body.len().min(max_body);
                body.extend_from_slice(&buf[pos..pos + take.min(room)]);
                pos += take;
                *chunk = if take as u64 == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - take as u64)
                };
                if take == 0 {
                    return Ok((pos, false));
                }
            }
            Chunk::DataEnd => {
                let end = match buf[pos..] {
                    [] | [b'\r'] => return Ok((pos, false)),
                    [b'\n', ..] => 1,
                    [b'\r', b'\n', ..] => 2,
                    _ => return Err(bad("no CRLF after chunk data")),
                };
                pos += end;
                *chunk = Chunk::Size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(answer: Result<Answer, BadResponse>) -> UpstreamRefusal {
        match answer {
            Ok(Answer::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn text(r: &UpstreamRefusal) -> String {
        String::from_utf8(r.response.clone()).unwrap()
    }

    #[test]
    fn a_101_without_upgrade_websocket_is_a_bad_response() {
        for head in [
            &b"HTTP/1.1 101 Switching Protocols\r\nX-A: 1\r\n\r\n"[..],
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        ] {
            let mut reader = ResponseReader::new(4096, 4096);
            assert!(matches!(reader.feed(head), Err(BadResponse::Invalid(_))));
        }
    }

    #[test]
    fn interim_answers_go_before_the_101_and_not_into_a_refusal() {
        let hints =
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n";
        let switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let mut reader = ResponseReader::new(1024, 100);
        assert_eq!(reader.feed(&hints[..]), Ok(Answer::Partial));
        let answer = reader.feed(&[&switch[..], b"\x81\x00"].concat()).unwrap();
        assert_eq!(
            answer,
            Answer::Upgrade {
                head_len: hints.len() + switch.len(),
                allowed_rsv: 0
            }
        );
        let mut reader = ResponseReader::new(1024, 100);
        let refusal = refused(
            reader.feed(
                &[
                    &hints[..],
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno",
                ]
                .concat(),
            ),
        );
        assert!(text(&refusal).starts_with("HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n"));
        // Counted in the head's bound: a stream of them ends as a head too large.
        let mut reader = ResponseReader::new(100, 100);
        assert_eq!(
            reader.feed(&hints.repeat(3)),
            Err(BadResponse::HeadTooLarge)
        );
    }

    #[test]
    fn a_head_longer_than_the_limit_is_too_large_even_in_one_read() {
        // One read may bring a whole head beyond the limit: it was relayed.
        let head = format!("HTTP/1.1 200 OK\r\nX-Pad: {}\r\n\r\n", "p".repeat(150));
        assert!(head.len() > 100);
        assert_eq!(
            parse_response_head(head.as_bytes(), 100).map(|h| h.is_some()),
            Err(BadResponse::HeadTooLarge)
        );
        assert!(matches!(
            parse_response_head(head.as_bytes(), 1024),
            Ok(Some(_))
        ));
    }

    #[test]
    fn a_status_outside_100_to_599_is_no_answer() {
        // `HTTP/1.1 0 Zero` went to the client, its body dropped (a status
        // below 100 was taken for bodiless): the next response came short.
        for status in ["000", "099", "600", "999"] {
            let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok");
            assert!(
                matches!(
                    parse_response_head(head.as_bytes(), 1024),
                    Err(BadResponse::Invalid(_))
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn a_101_is_an_upgrade_with_its_extensions() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n\x81\x00";
        let mut reader = ResponseReader::new(1024, 100);
        assert_eq!(reader.feed(&head[..20]), Ok(Answer::Partial));
        let answer = reader.feed(&head[20..]).unwrap();
        let head_len = head.len() - 2;
        assert_eq!(
            answer,
            Answer::Upgrade {
                head_len,
                allowed_rsv: 0b100
            }
        );
        assert_eq!(reader.into_buffer(), head.to_vec());
    }

    #[test]
    fn a_refusal_keeps_status_headers_and_a_bounded_body() {
        let mut reader = ResponseReader::new(1024, 5);
        let r = refused(reader.feed(
            b"HTTP/1.1 403 Forbidden\r\nX-Why: token\r\nConnection: keep-alive, X-Hop\r\n\
              X-Hop: 1\r\nContent-Length: 9\r\n\r\ndenied!!!",
        ));
        assert_eq!(r.status, 403);
        assert_eq!(
            text(&r),
            "HTTP/1.1 403 Forbidden\r\nX-Why: token\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\ndenie"
        );
    }

    #[test]
    fn chunked_bodies_are_decoded_across_reads() {
        let raw = b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n\
            4;ext=1\r\nauth\r\n9\r\n required\r\n0\r\nX-T: 1\r\n\r\n";
        let mut reader = ResponseReader::new(1024, 100);
        let mut last = Ok(Answer::Partial);
        for byte in raw.iter() {
            last = reader.feed(std::slice::from_ref(byte));
            if last != Ok(Answer::Partial) {
                break;
            }
        }
        let r = refused(last);
        assert!(text(&r).ends_with("Content-Length: 13\r\nConnection: close\r\n\r\nauth required"));
        let mut bad = ResponseReader::new(1024, 100);
        assert!(bad
            .feed(b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .is_err());
    }

    /// Chunk lines ended by a bare LF, as nginx and HAProxy take them from an
    /// upstream, byte by byte (a CR may come alone at the end of a read); a
    /// CR not followed by LF is still no line end.
    #[test]
    fn chunk_lines_may_end_in_a_bare_lf() {
        let body = b"5\nhello\n6;x=1\r\n world\r\n0\nX-T: 1\n\n";
        let mut chunk = Chunk::Size;
        let (mut plain, mut pending, mut done) = (Vec::new(), Vec::new(), false);
        for &byte in body.iter() {
            pending.push(byte);
            let (used, last) = decode_chunks(&pending, &mut chunk, &mut plain, usize::MAX).unwrap();
            pending.drain(..used);
            done = last;
        }
        assert!(done && pending.is_empty());
        assert_eq!(plain, b"hello world");
        for bad in [&b"5\rhello\r\n"[..], b"5\r\nhello\rx", b"5\r\nhellox\n"] {
            let (mut chunk, mut plain) = (Chunk::Size, Vec::new());
            let got = decode_chunks(bad, &mut chunk, &mut plain, usize::MAX);
            assert!(got.is_err(), "{bad:?}: {got:?}");
        }
    }

    #[test]
    fn bodies_without_length_end_at_close_and_some_answers_have_none() {
        let mut reader = ResponseReader::new(1024, 100);
        assert_eq!(
            reader.feed(b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy"),
            Ok(Answer::Partial)
        );
        let r = reader.eof().unwrap();
        assert!(text(&r).ends_with("Content-Length: 4\r\nConnection: close\r\n\r\nbusy"));
        for head in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ] {
            let r = refused(ResponseReader::new(1024, 100).feed(head));
            assert!(text(&r).ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n"));
        }
        assert_eq!(ResponseReader::new(1024, 100).eof(), None);
    }

    #[test]
    fn bad_answers_are_refused() {
        let mut reader = ResponseReader::new(64, 100);
        assert_eq!(
            reader.feed(&[b'X'; 10]).unwrap_err().to_string(),
            "invalid response from upstream: invalid HTTP version"
        );
        let mut reader = ResponseReader::new(64, 100);
        let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(100));
        assert_eq!(reader.feed(long.as_bytes()), Err(BadResponse::HeadTooLarge));
        let mut reader = ResponseReader::new(1024, 100);
        assert!(reader
            .feed(b"HTTP/1.1 500 X\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            .is_err());
        let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("HTTP/1.1 403 Forbidden\r\n{many}Content-Length: 0\r\n\r\n");
        let r = refused(ResponseReader::new(1 << 16, 100).feed(head.as_bytes()));
        assert!(text(&r).contains("X-199: v\r\n"));
    }

    #[test]
    fn a_101_must_answer_the_key_and_name_the_upgrade() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let accept = loopwatch_dataplane_core::head::accept_key(key);
        let reader = || ResponseReader::new(1024, 100).expecting_accept(accept.clone());
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        assert!(matches!(
            reader().feed(ok.as_bytes()),
            Ok(Answer::Upgrade { .. })
        ));
        for (bad, why) in [
            (
                ok.replace(&accept, "c29tZXRoaW5nIGVsc2U="),
                "does not answer the key",
            ),
            (
                ok.replace(&format!("Sec-WebSocket-Accept: {accept}\r\n"), ""),
                "does not answer the key",
            ),
            (
                ok.replace("Connection: Upgrade", "Connection: close"),
                "without Connection: upgrade",
            ),
            (
                ok.replace(
                    &format!("Sec-WebSocket-Accept: {accept}\r\n"),
                    &format!(
                        "Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Accept: {accept}\r\n"
                    ),
                ),
                "Sec-WebSocket-Accept repeated",
            ),
        ] {
            let err = reader().feed(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.ends_with(why), "{err}");
        }
    }

    #[test]
    fn a_content_length_repeated_is_one_and_lengths_that_differ_are_a_bad_response() {
        // The upstream probe: the same value twice was a 502, where nginx and
        // HAProxy deliver it (RFC 9110, 8.6 lets a recipient take it as one).
        let repeated = b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nno";
        let r = refused(ResponseReader::new(1024, 100).feed(repeated));
        assert!(text(&r).ends_with("\r\n\r\nno"));
        let differ = b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nno";
        let err = ResponseReader::new(1024, 100).feed(differ).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid response from upstream: Content-Length values that differ"
        );
    }

    #[test]
    fn a_transfer_coding_besides_chunked_is_a_bad_response() {
        // Passed on unchunked and unnamed, a gzip body reached the client as
        // garbage; HAProxy answers 502.
        for te in ["gzip, chunked", "gzip", "chunked, chunked", "identity"] {
            let head = format!("HTTP/1.1 503 Busy\r\nTransfer-Encoding: {te}\r\n\r\n");
            let err = ResponseReader::new(1024, 100)
                .feed(head.as_bytes())
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "invalid response from upstream: a transfer coding besides chunked",
                "{te}"
            );
        }
        let head = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n";
        let r = refused(ResponseReader::new(1024, 100).feed(head));
        assert!(text(&r).ends_with("\r\n\r\nno"));
    }
}
