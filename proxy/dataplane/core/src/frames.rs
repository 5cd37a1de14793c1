//! The splice relay's frame-header watcher (RFC 6455 §5), and the close frames
//! loopwatch writes itself.
//!
//! The relay forwards every byte unchanged; a [`FrameWatcher`] watches one
//! direction of the stream, header by header. It never copies or unmasks a
//! payload: payloads are skipped arithmetically, so a 1 MiB frame costs what an
//! empty one does. The only payload it reads is a close frame's (at most 125
//! bytes, unmasked in a copy), for the close code and reason.
//!
//! It gives exactly the answers of the asyncio data plane's frame parser it
//! replaced (what to forward, count and refuse, and the wording):
//! `tests/vectors/frames.json` holds that parser's answers, recorded before it
//! was deleted, and `tests/vectors.rs` replays them here:
//!
//! * [`FrameWatcher::feed`] says how many leading bytes of a chunk may be
//!   forwarded: all of them, or, on a violation, the offset where the
//!   offending frame starts (0 when it started in an earlier chunk, whose first
//!   bytes are already gone: then [`FrameWatcher::at_boundary`] is false and
//!   the relay must not append a close frame of its own).
//! * A header cut by the end of a chunk is kept (at most 13 bytes) and
//!   completed with the next chunk's first bytes; one whose available bytes
//!   already prove it invalid is refused at once, never forwarded.
//! * Violations: reserved opcodes; RSV bits not allowed by the negotiated
//!   extensions (and RSV1 on a continuation); control frames fragmented, with
//!   RSV bits or longer than 125 bytes; continuation rules; client frames
//!   unmasked or server frames masked; a 64-bit length with its top bit set;
//!   a message larger than the limit (close 1009); a close payload of 1 byte,
//!   with a code that may not be sent, or a reason that is not UTF-8 (1007).
//!   Every other violation closes 1002.

use std::fmt;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The RSV bit permessage-deflate uses, as a 3-bit RSV value.
pub const RSV1: u8 = 0b100;

/// Largest possible header: 2 bytes, an 8-byte length, a 4-byte mask key.
pub const MAX_HEADER_SIZE: usize = 14;
/// Control frames carry at most 125 payload bytes (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// A close reason fits the control payload after its 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Which end sends the stream a watcher reads: client frames are masked,
/// server frames are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherConfig {
    pub side: Side,
    /// Largest data message in bytes (`limits.max_message_size`); None: no limit.
    pub max_message_size: Option<u64>,
    /// RSV bits the negotiated extensions may set (3 bits; RSV1 for
    /// permessage-deflate alone, which also refuses it on continuations; all
    /// three for an extension loopwatch does not know; 0 without extensions).
    pub allowed_rsv: u8,
}

/// A violation of RFC 6455 (or of the size limit) found in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    ReservedOpcode(u8),
    FragmentedControl,
    RsvOnControl,
    RsvWithoutExtension,
    ContinuationWithoutMessage,
    Rsv1OnContinuation,
    DataInsideFragmentedMessage,
    UnmaskedClientFrame,
    MaskedServerFrame,
    ControlTooLong,
    OneByteClosePayload,
    LengthTopBitSet,
    MessageTooBig { limit: u64 },
    InvalidCloseCode(u16),
    CloseReasonNotUtf8,
}

impl FrameError {
    /// The close code the relay answers with.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::MessageTooBig { .. } => 1009,
            FrameError::CloseReasonNotUtf8 => 1007,
            _ => 1002,
        }
    }
}

impl fmt::Display for FrameError {
    /// The wording the recorded vectors hold (it ends up in close reasons and
    /// logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            FrameError::FragmentedControl => f.write_str("fragmented control frame"),
            FrameError::RsvOnControl => f.write_str("RSV bits set on a control frame"),
            FrameError::RsvWithoutExtension => {
                f.write_str("RSV bits set without a negotiated extension")
            }
            FrameError::ContinuationWithoutMessage => {
                f.write_str("continuation frame without a message in progress")
            }
            FrameError::Rsv1OnContinuation => f.write_str("RSV1 set on a continuation frame"),
            FrameError::DataInsideFragmentedMessage => {
                f.write_str("new data frame inside a fragmented message")
            }
            FrameError::UnmaskedClientFrame => f.write_str("unmasked client frame"),
            FrameError::MaskedServerFrame => f.write_str("masked server frame"),
            FrameError::ControlTooLong => {
                f.write_str("control frame payload longer than 125 bytes")
            }
            FrameError::OneByteClosePayload => f.write_str("close frame with a 1-byte payload"),
            FrameError::LengthTopBitSet => {
                f.write_str("64-bit payload length with the most significant bit set")
            }
            FrameError::MessageTooBig { limit } => write!(f, "message larger than {limit} bytes"),
            FrameError::InvalidCloseCode(code) => write!(f, "invalid close code {code}"),
            FrameError::CloseReasonNotUtf8 => f.write_str("close reason is not valid UTF-8"),
        }
    }
}

impl std::error::Error for FrameError {}

/// `feed` stopped short: forward `forward` bytes of the chunk, then close
/// with `error.close_code()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub forward: usize,
    pub error: FrameError,
}

/// One accepted frame header, as the watcher's observer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// 3 bits, RSV1 = 0b100.
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub mask: Option<[u8; 4]>,
    pub length: u64,
    pub header_size: u8,
}

/// What a valid first byte makes of a frame, given the message state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Text/binary with FIN: a whole message.
    DataWhole,
    /// Text/binary without FIN: starts a fragmented message.
    DataFirst,
    /// Continuation with FIN: ends the fragmented message.
    ContinuationLast,
    /// Continuation without FIN.
    ContinuationMore,
    Ping,
    Pong,
    Close,
}

impl Kind {
    fn is_data(self) -> bool {
        matches!(
            self,
            Kind::DataWhole | Kind::DataFirst | Kind::ContinuationLast | Kind::ContinuationMore
        )
    }

    /// A data frame that completes a message.
    fn ends_message(self) -> bool {
        matches!(self, Kind::DataWhole | Kind::ContinuationLast)
    }

    /// A data frame after which a fragmented message is in progress.
    fn leaves_message_open(self) -> bool {
        matches!(self, Kind::DataFirst | Kind::ContinuationMore)
    }
}

/// FIN/RSV/opcode/fragmentation rules of a first byte: the single source of
/// truth for them.
fn classify(b0: u8, in_message: bool, allowed_rsv: u8) -> Result<Kind, FrameError> {
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0b111;
    let opcode = b0 & 0x0F;
    if (3..=7).contains(&opcode) || opcode >= 0xB {
        return Err(FrameError::ReservedOpcode(opcode));
    }
    if opcode >= 8 {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if rsv != 0 {
            return Err(FrameError::RsvOnControl);
        }
        return Ok(match opcode {
            OP_CLOSE => Kind::Close,
            OP_PING => Kind::Ping,
            _ => Kind::Pong,
        });
    }
    if rsv & !allowed_rsv != 0 {
        return Err(FrameError::RsvWithoutExtension);
    }
    if opcode == OP_CONT {
        if !in_message {
            return Err(FrameError::ContinuationWithoutMessage);
        }
        if rsv & RSV1 != 0 && allowed_rsv == RSV1 {
            // permessage-deflate (RSV1 alone allowed) sets RSV1 on a message's
            // first frame only (RFC 7692 §6.1). An extension loopwatch does not
            // know (every bit allowed) may set it on each frame: per-frame
            // deflate (x-webkit-deflate-frame) does, and passes nginx and HAProxy.
            return Err(FrameError::Rsv1OnContinuation);
        }
        return Ok(if fin {
            Kind::ContinuationLast
        } else {
            Kind::ContinuationMore
        });
    }
    if in_message {
        return Err(FrameError::DataInsideFragmentedMessage);
    }
    Ok(if fin {
        Kind::DataWhole
    } else {
        Kind::DataFirst
    })
}

/// The violation in the (possibly incomplete) header at the start of `hdr`,
/// or None if the bytes available show none yet (`_diagnose`).
fn diagnose(
    hdr: &[u8],
    in_message: bool,
    msg_len: u64,
    config: &WatcherConfig,
) -> Option<FrameError> {
    let b0 = *hdr.first()?;
    if let Err(e) = classify(b0, in_message, config.allowed_rsv) {
        return Some(e);
    }
    let b1 = *hdr.get(1)?;
    let masked = b1 & 0x80 != 0;
    let client = config.side == Side::Client;
    if masked != client {
        return Some(if client {
            FrameError::UnmaskedClientFrame
        } else {
            FrameError::MaskedServerFrame
        });
    }
    let opcode = b0 & 0x0F;
    let mut len = u64::from(b1 & 0x7F);
    if opcode >= 8 {
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Some(FrameError::ControlTooLong);
        }
        if opcode == OP_CLOSE && len == 1 {
            return Some(FrameError::OneByteClosePayload);
        }
        return None;
    }
    if len == 126 {
        len = u64::from(u16::from_be_bytes(hdr.get(2..4)?.try_into().ok()?));
    } else if len == 127 {
        len = u64::from_be_bytes(hdr.get(2..10)?.try_into().ok()?);
        if len >> 63 != 0 {
            return Some(FrameError::LengthTopBitSet);
        }
    }
    let total = if opcode == OP_CONT {
        msg_len + len
    } else {
        len
    };
    match config.max_message_size {
        Some(limit) if total > limit => Some(FrameError::MessageTooBig { limit }),
        _ => None,
    }
}

/// Bytes of the header that starts `buf`, once its second byte is known.
fn header_size(b1: u8) -> usize {
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + mask
        + match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        }
}

/// Close codes an endpoint may send (RFC 6455 §7.4).
pub fn close_code_valid(code: u16) -> bool {
    (1000..5000).contains(&code)
        && !matches!(code, 1004 | 1005 | 1006 | 1015)
        && !(1016..=2999).contains(&code)
}

/// XOR a payload with its mask key (RFC 6455 §5.3), in place.
pub fn unmask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// The close code and reason of an unmasked close payload.
pub fn parse_close(payload: &[u8]) -> Result<(Option<u16>, String), FrameError> {
    match payload {
        [] => Ok((None, String::new())),
        [_] => Err(FrameError::OneByteClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_valid(code) {
                return Err(FrameError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::CloseReasonNotUtf8)?;
            Ok((Some(code), reason.to_owned()))
        }
    }
}

/// The close a watcher has seen: its code (None for a close frame without
/// one, recorded as 1005) and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseSeen {
    pub code: Option<u16>,
    pub reason: String,
}

/// A close frame whose payload is split across chunks, until it is whole.
#[derive(Debug, Clone)]
struct SplitClose {
    /// The (masked) payload so far.
    payload: Vec<u8>,
    mask: Option<[u8; 4]>,
    /// Stream offset of the frame.
    frame_start: u64,
}

/// Watches one direction of a WebSocket stream; see the module documentation.
#[derive(Debug, Clone)]
pub struct FrameWatcher {
    config: WatcherConfig,
    /// Data messages completed.
    pub messages: u64,
    /// Payload bytes of data frames seen so far.
    pub message_bytes: u64,
    /// Frames whose header was accepted.
    pub frames: u64,
    pub pings: u64,
    pub pongs: u64,
    /// The last valid close frame, once its payload is complete (boxed, as
    /// `split_close`: rare, and every idle connection holds two watchers).
    close: Option<Box<CloseSeen>>,
    error: Option<FrameError>,
    in_message: bool,
    /// Payload bytes of the data message in progress.
    msg_len: u64,
    /// Payload bytes of the current frame still to come.
    skip: u64,
    /// What the frame whose payload is pending is.
    pending: Kind,
    /// The start of a header cut by the end of a chunk.
    hbuf: [u8; MAX_HEADER_SIZE],
    hlen: usize,
    /// A close frame whose payload is split across chunks.
    split_close: Option<Box<SplitClose>>,
    /// Stream offset of the next chunk's first byte.
    offset: u64,
    err_boundary: bool,
}

impl FrameWatcher {
    /// Panics if `allowed_rsv` is not a 3-bit value (a bug in the caller).
    pub fn new(config: WatcherConfig) -> Self {
        assert!(
            config.allowed_rsv <= 0b111,
            "allowed_rsv must be a 3-bit value"
        );
        FrameWatcher {
            config,
            messages: 0,
            message_bytes: 0,
            frames: 0,
            pings: 0,
            pongs: 0,
            close: None,
            error: None,
            in_message: false,
            msg_len: 0,
            skip: 0,
            pending: Kind::DataWhole,
            hbuf: [0; MAX_HEADER_SIZE],
            hlen: 0,
            split_close: None,
            offset: 0,
            err_boundary: true,
        }
    }

    pub fn config(&self) -> &WatcherConfig {
        &self.config
    }

    /// The last valid close frame, once its payload is complete.
    pub fn close(&self) -> Option<&CloseSeen> {
        self.close.as_deref()
    }

    /// The violation found, if any; every later `feed` returns it again.
    pub fn error(&self) -> Option<&FrameError> {
        self.error.as_ref()
    }

    /// A fragmented data message is in progress.
    pub fn in_message(&self) -> bool {
        self.in_message
    }

    /// True iff the bytes accepted so far end exactly between two frames.
    /// After a violation it describes the accepted prefix: false when the
    /// offending frame started in an earlier chunk.
    pub fn at_boundary(&self) -> bool {
        if self.error.is_some() {
            self.err_boundary
        } else {
            self.skip == 0 && self.hlen == 0
        }
    }

    /// Payload bytes of the frame in progress still to come (0 at a boundary,
    /// while a header is incomplete, and after a violation), so the relay can
    /// forward exactly to the end of a frame before writing one of its own.
    pub fn frame_remaining(&self) -> u64 {
        if self.error.is_some() {
            0
        } else {
            self.skip
        }
    }

    /// Consume a chunk: Ok(len) when all of it may be forwarded.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, Violation> {
        self.feed_observed(data, &mut |_| {})
    }

    /// [`feed`](Self::feed), calling `on_frame` for every accepted header in
    /// stream order.
    pub fn feed_observed<F: FnMut(&FrameHeader)>(
        &mut self,
        data: &[u8],
        on_frame: &mut F,
    ) -> Result<usize, Violation> {
        if let Some(error) = &self.error {
            return Err(Violation {
                forward: 0,
                error: error.clone(),
            });
        }
        let n = data.len();
        let base = self.offset;
        let mut pos = 0;
        // Complete a header split across chunks: glue the kept bytes to just
        // enough of this chunk and run the same loop over that small buffer.
        // It repeats when the glued buffer ends in another partial header.
        while self.hlen > 0 && pos < n {
            let k = self.hlen;
            let take = (MAX_HEADER_SIZE - k).min(n - pos);
            let mut glued = [0u8; 2 * MAX_HEADER_SIZE];
            glued[..k].copy_from_slice(&self.hbuf[..k]);
            glued[k..k + take].copy_from_slice(&data[pos..pos + take]);
            self.hlen = 0;
            if let Some(at) = self.run(
                &glued[..k + take],
                0,
                base + pos as u64 - k as u64,
                on_frame,
            ) {
                return Err(self.fail(at, base));
            }
            pos += take;
        }
        if pos < n {
            if let Some(at) = self.run(data, pos, base, on_frame) {
                return Err(self.fail(at, base));
            }
        }
        self.offset = base + n as u64;
        Ok(n)
    }

    /// The violation at stream offset `at`, as seen from the chunk at `base`.
    fn fail(&mut self, at: u64, base: u64) -> Violation {
        let forward = if at < base {
            // Its first bytes were forwarded with an earlier chunk.
            self.err_boundary = false;
            self.offset = base;
            0
        } else {
            self.err_boundary = true;
            self.offset = at;
            (at - base) as usize
        };
        Violation {
            forward,
            error: self.error.clone().expect("a violation sets the error"),
        }
    }

    /// Parse `buf[pos..]`, where `buf[0]` is at stream offset `base`.
    /// Returns the stream offset of an invalid frame (with the error set).
    fn run<F: FnMut(&FrameHeader)>(
        &mut self,
        buf: &[u8],
        mut pos: usize,
        base: u64,
        on_frame: &mut F,
    ) -> Option<u64> {
        let n = buf.len();

        // 1. Finish the payload of a frame that started in an earlier buffer.
        if self.skip > 0 {
            let take = self.skip.min((n - pos) as u64);
            let end = pos + take as usize;
            self.skip -= take;
            let kind = self.pending;
            if kind.is_data() {
                self.message_bytes += take;
            } else if let Some(split) = self.split_close.as_mut() {
                split.payload.extend_from_slice(&buf[pos..end]);
            }
            pos = end;
            if self.skip > 0 {
                return None;
            }
            if kind.is_data() {
                if kind.ends_message() {
                    self.messages += 1;
                }
            } else if let Some(split) = self.split_close.take() {
                let SplitClose {
                    mut payload,
                    mask,
                    frame_start,
                } = *split;
                if let Some(key) = mask {
                    unmask(&mut payload, key);
                }
                match parse_close(&payload) {
                    Ok((code, reason)) => self.close = Some(Box::new(CloseSeen { code, reason })),
                    Err(e) => {
                        self.error = Some(e);
                        return Some(frame_start);
                    }
                }
            }
            if pos >= n {
                return None;
            }
        }

        // 2. Whole frames.
        let mut failed: Option<(usize, FrameError)> = None;
        while pos < n {
            let left = n - pos;
            if left < 2 || left < header_size(buf[pos + 1]) {
                break; // a header cut short by the end of the buffer
            }
            if let Some(e) = diagnose(&buf[pos..], self.in_message, self.msg_len, &self.config) {
                failed = Some((pos, e));
                break;
            }
            let b0 = buf[pos];
            let b1 = buf[pos + 1];
            let kind =
                classify(b0, self.in_message, self.config.allowed_rsv).expect("diagnosed valid");
            let hs = header_size(b1);
            let len = match b1 & 0x7F {
                126 => u64::from(u16::from_be_bytes([buf[pos + 2], buf[pos + 3]])),
                127 => u64::from_be_bytes(buf[pos + 2..pos + 10].try_into().expect("8 bytes")),
                l => u64::from(l),
            };
            let masked = b1 & 0x80 != 0;
            let key = masked.then(|| {
                let k = &buf[pos + hs - 4..pos + hs];
                [k[0], k[1], k[2], k[3]]
            });
            let header = FrameHeader {
                fin: b0 & 0x80 != 0,
                rsv: (b0 >> 4) & 0b111,
                opcode: b0 & 0x0F,
                masked,
                mask: key,
                length: len,
                header_size: hs as u8,
            };
            let avail = (n - pos - hs) as u64;
            // The payload ends in this buffer iff `len <= avail`; then
            // `pos + hs + len` fits in usize.
            let whole = len <= avail;

            if kind.is_data() {
                self.msg_len = if matches!(kind, Kind::DataWhole | Kind::DataFirst) {
                    len
                } else {
                    self.msg_len + len
                };
                self.in_message = kind.leaves_message_open();
                self.frames += 1;
                on_frame(&header);
                if whole {
                    self.message_bytes += len;
                    if kind.ends_message() {
                        self.messages += 1;
                    }
                    pos += hs + len as usize;
                    continue;
                }
                self.message_bytes += avail;
                self.skip = len - avail;
                self.pending = kind;
                pos = n;
                break;
            }

            if kind == Kind::Close {
                let start = pos + hs;
                if whole {
                    // The whole close frame is here: validate it before
                    // accepting it, so a bad one is withheld like a bad header.
                    let mut payload = buf[start..start + len as usize].to_vec();
                    if let Some(key) = key {
                        unmask(&mut payload, key);
                    }
                    match parse_close(&payload) {
                        Ok((code, reason)) => {
                            self.frames += 1;
                            on_frame(&header);
                            self.close = Some(Box::new(CloseSeen { code, reason }));
                            pos = start + len as usize;
                            continue;
                        }
                        Err(e) => {
                            failed = Some((pos, e));
                            break;
                        }
                    }
                }
                self.frames += 1;
                on_frame(&header);
                self.split_close = Some(Box::new(SplitClose {
                    payload: buf[start..n].to_vec(),
                    mask: key,
                    frame_start: base + pos as u64,
                }));
                self.skip = len - avail;
                self.pending = kind;
                pos = n;
                break;
            }

            // Ping or pong: skipped like data, not counted as message bytes.
            if kind == Kind::Ping {
                self.pings += 1;
            } else {
                self.pongs += 1;
            }
            self.frames += 1;
            on_frame(&header);
            if whole {
                pos += hs + len as usize;
                continue;
            }
            self.skip = len - avail;
            self.pending = kind;
            pos = n;
            break;
        }

        if failed.is_none() && pos < n {
            // A header cut short by the end of the buffer: refuse it now if the
            // bytes at hand already prove it invalid, so it is never forwarded;
            // otherwise keep it for the next chunk.
            match diagnose(&buf[pos..n], self.in_message, self.msg_len, &self.config) {
                None => {
                    let k = n - pos;
                    self.hbuf[self.hlen..self.hlen + k].copy_from_slice(&buf[pos..n]);
                    self.hlen += k;
                    return None;
                }
                Some(e) => failed = Some((pos, e)),
            }
        }
        let (at, error) = failed?;
        self.error = Some(error);
        Some(base + at as u64)
    }
}

/// A close frame written by loopwatch itself (`build_close_frame`): masked
/// with `mask` toward an upstream (loopwatch is its client there; the caller
/// draws a fresh key), unmasked toward a client. The reason is cut to 123
/// bytes on a character boundary so the frame stays a valid control frame.
pub fn build_close_frame(
    code: u16,
    reason: &str,
    mask: Option<[u8; 4]>,
) -> Result<Vec<u8>, FrameError> {
    if !close_code_valid(code) {
        return Err(FrameError::InvalidCloseCode(code));
    }
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    let len = payload.len() as u8; // <= 125
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | OP_CLOSE);
    match mask {
        Some(key) => {
            frame.push(0x80 | len);
            frame.extend_from_slice(&key);
            unmask(&mut payload, key);
        }
        None => frame.push(len),
    }
    frame.extend_from_slice(&payload);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> FrameWatcher {
        FrameWatcher::new(WatcherConfig {
            side: Side::Client,
            max_message_size: None,
            allowed_rsv: 0,
        })
    }

    fn masked(opcode: u8, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![
            (if fin { 0x80 } else { 0 }) | opcode,
            0x80 | payload.len() as u8,
        ];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    #[test]
    fn counts_messages_fragments_and_controls() {
        let key = [1, 2, 3, 4];
        let mut stream = masked(OP_TEXT, false, b"hel", key);
        stream.extend(masked(OP_PING, true, b"p", key));
        stream.extend(masked(OP_CONT, true, b"lo", key));
        stream.extend(masked(OP_BINARY, true, b"", key));
        let mut w = client();
        assert_eq!(w.feed(&stream), Ok(stream.len()));
        assert_eq!(
            (w.messages, w.message_bytes, w.frames, w.pings),
            (2, 5, 4, 1)
        );
        assert!(w.at_boundary());
    }

    #[test]
    fn close_payload_split_across_chunks_is_unmasked_from_a_copy() {
        let key = [9, 8, 7, 6];
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice("ça va".as_bytes());
        let frame = masked(OP_CLOSE, true, &payload, key);
        let mut w = client();
        for byte in &frame {
            assert_eq!(w.feed(std::slice::from_ref(byte)), Ok(1));
        }
        assert_eq!(
            w.close().cloned(),
            Some(CloseSeen {
                code: Some(4000),
                reason: "ça va".into()
            })
        );
    }

    #[test]
    fn a_violation_stops_forwarding_where_the_frame_starts() {
        let key = [0; 4];
        let mut stream = masked(OP_TEXT, true, b"ok", key);
        let good = stream.len();
        stream.extend([0x83, 0x80, 0, 0, 0, 0]); // reserved opcode 3
        let mut w = client();
        let v = w.feed(&stream).unwrap_err();
        assert_eq!(v.forward, good);
        assert_eq!(
            (v.error.close_code(), v.error.to_string()),
            (1002, "reserved opcode 0x3".into())
        );
        assert!(w.at_boundary());
        assert_eq!(w.feed(b"more").unwrap_err().forward, 0);
    }

    #[test]
    fn message_over_the_limit_is_1009_before_its_payload() {
        let mut w = FrameWatcher::new(WatcherConfig {
            side: Side::Upstream,
            max_message_size: Some(10),
            allowed_rsv: 0,
        });
        let v = w.feed(&[0x82, 11]).unwrap_err();
        assert_eq!((v.forward, v.error.close_code()), (0, 1009));
        assert_eq!(v.error.to_string(), "message larger than 10 bytes");
    }

    #[test]
    fn close_frames_loopwatch_writes() {
        assert_eq!(
            build_close_frame(1013, "", None).unwrap(),
            vec![0x88, 2, 0x03, 0xF5]
        );
        let long = "é".repeat(100); // 200 bytes: cut to 122, a character boundary
        let frame = build_close_frame(1001, &long, None).unwrap();
        assert_eq!(frame[1] as usize, 2 + 122);
        let key = [0xAA, 0xBB, 0xCC, 0xDD];
        let mut m = build_close_frame(1000, "bye", Some(key)).unwrap();
        assert_eq!(&m[..6], &[0x88, 0x85, 0xAA, 0xBB, 0xCC, 0xDD]);
        unmask(&mut m[6..], key);
        assert_eq!(&m[6..], b"\x03\xe8bye");
        assert_eq!(
            build_close_frame(1005, "", None),
            Err(FrameError::InvalidCloseCode(1005))
        );
    }
}
