//! Fuzz targets, as proptest properties (cargo-fuzz needs a nightly toolchain;
//! these run on stable). `cargo test` runs each with proptest's default case
//! count (256, a few seconds in all); for a long run:
//!
//!     PROPTEST_CASES=200000 cargo test --release -p loopwatch-dataplane-core fuzz_
//!
//! * the head parser never panics; an accepted head re-serialises to a head
//!   that parses equal, every prefix of it is Partial, and httparse (where it
//!   accepts the same bytes) reads the same method, path and headers;
//! * the frame watcher gives the same headers, counts and verdict however a
//!   stream is cut into chunks;
//! * the frame watcher reads a header as tungstenite's `FrameHeader::parse`
//!   does, and close frames it builds parse back (by both);
//! * the chunked-body decoder reads loopwatch's own framing back, and gives the
//!   same body or error however its input is cut;
//! * the `traceparent` reader never panics, and accepts exactly the W3C shapes
//!   OpenTelemetry's propagator accepts, for values built from known parts.

use std::io::Cursor;

use loopwatch_dataplane_core::body::{encode_chunk, ChunkError, ChunkedDecoder, LAST_CHUNK};
use loopwatch_dataplane_core::frames::{
    build_close_frame, close_code_valid, FrameError, FrameHeader, FrameWatcher, Side,
    WatcherConfig, MAX_CLOSE_REASON,
};
use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus};
use loopwatch_dataplane_core::trace::TraceParent;
use proptest::prelude::*;
use tungstenite::protocol::frame::FrameHeader as TungsteniteHeader;

fn config() -> ProptestConfig {
    ProptestConfig {
        // Shrunk failures are printed; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// --- request heads -------------------------------------------------------------

const SEEDS: &[&[u8]] = &[
    b"GET /ws?room=1 HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /api/items?id=7 HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n",
    b"POST /api HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /api HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"GET http://ex.com:81/p?q HTTP/1.1\r\n\r\n",
    b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
];

const PIECES: &[&[u8]] = &[
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b":",
    b",",
    b"/",
    b"?",
    b"#",
    b"@",
    b"[",
    b"]",
    b"\0",
    b"\x7f",
    b"\xff",
    b"chunked",
    b"upgrade",
    b"websocket",
    b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Host: h\r\n",
    b"Connection: upgrade\r\n",
    b"Upgrade: websocket\r\n",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"0",
];

#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Piece(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), 0..PIECES.len()).prop_map(|(i, p)| Edit::Piece(i, p)),
    ]
}

/// A valid head with a few edits: mostly near-valid input, where parsers differ.
fn mutated_head() -> impl Strategy<Value = Vec<u8>> {
    (0..SEEDS.len(), prop::collection::vec(edit(), 0..4)).prop_map(|(seed, edits)| {
        let mut data = SEEDS[seed].to_vec();
        for e in edits {
            let at = |i: usize, len: usize| i % (len + 1);
            match e {
                Edit::Replace(i, b) if !data.is_empty() => {
                    let n = data.len();
                    data[i % n] = b;
                }
                Edit::Insert(i, b) => data.insert(at(i, data.len()), b),
                Edit::Delete(i) if !data.is_empty() => {
                    let n = data.len();
                    data.remove(i % n);
                }
                Edit::Piece(i, p) => {
                    let pos = at(i, data.len());
                    data.splice(pos..pos, PIECES[p].iter().copied());
                }
                _ => {}
            }
        }
        data
    })
}

fn check_head(data: &[u8]) -> Result<(), TestCaseError> {
    let limits = HeadLimits::default();
    let HeadStatus::Complete(head) = parse_head(data, &limits) else {
        return Ok(());
    };
    // Re-serialised, it parses to an equal head.
    let again = head.to_bytes();
    match parse_head(&again, &limits) {
        HeadStatus::Complete(other) => {
            prop_assert_eq!(other.method, head.method);
            prop_assert_eq!(&other.target, &head.target);
            prop_assert_eq!(other.path, head.path);
            prop_assert_eq!(other.version, head.version);
            prop_assert_eq!(&other.headers, &head.headers);
            prop_assert_eq!(&other.authority, &head.authority);
            prop_assert_eq!(other.kind, head.kind);
            prop_assert_eq!(other.keep_alive, head.keep_alive);
            prop_assert_eq!(other.head_len, again.len());
        }
        other => prop_assert!(false, "re-serialised head not accepted: {:?}", other),
    }
    // Every prefix of an accepted head is only incomplete.
    for end in 0..head.head_len {
        prop_assert_eq!(
            parse_head(&data[..end], &limits),
            HeadStatus::Partial,
            "prefix of {}",
            end
        );
    }
    // httparse, where it accepts the same bytes, reads the same request.
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    if let Ok(httparse::Status::Complete(len)) = req.parse(data) {
        prop_assert_eq!(len, head.head_len);
        prop_assert_eq!(req.method, Some(head.method));
        prop_assert_eq!(req.path.map(str::as_bytes), Some(head.raw_target));
        prop_assert_eq!(req.headers.len(), head.headers.len());
        for (theirs, ours) in req.headers.iter().zip(&head.headers) {
            prop_assert_eq!(theirs.name.as_bytes(), ours.name);
            // httparse drops trailing whitespace; llhttp (and so loopwatch) keeps it.
            let trimmed = ours.value.trim_ascii_end();
            prop_assert_eq!(theirs.value, trimmed);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_head_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
        check_head(&data)?;
    }

    #[test]
    fn fuzz_head_mutated(data in mutated_head()) {
        check_head(&data)?;
    }

    #[test]
    fn fuzz_head_size_limit_any_limit(data in mutated_head(), limit in 0usize..300) {
        // Never panics, and a head longer than the limit is never accepted.
        if let HeadStatus::Complete(head) = parse_head(&data, &HeadLimits { max_head_size: limit }) {
            prop_assert!(head.head_len <= limit);
        }
    }
}

// --- frames ----------------------------------------------------------------------

fn encode(opcode: u8, fin: bool, rsv: u8, mask: Option<[u8; 4]>, payload_len: usize) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | (rsv << 4) | opcode];
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    match payload_len {
        0..=125 => out.push(mbit | payload_len as u8),
        126..=0xFFFF => {
            out.push(mbit | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(mbit | 127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out.extend((0..payload_len).map(|i| (i * 7) as u8));
    out
}

/// A plausible stream of frames from one side, possibly with one corrupted byte.
fn stream() -> impl Strategy<Value = (WatcherConfig, Vec<u8>)> {
    let frame = (
        prop_oneof![
            Just(0x0u8),
            Just(0x1),
            Just(0x2),
            Just(0x8),
            Just(0x9),
            Just(0xA),
            0u8..16
        ],
        any::<bool>(),
        prop_oneof![4 => Just(0u8), 1 => 0u8..8],
        prop_oneof![8 => 0usize..40, 1 => 120usize..300, 1 => Just(70_000usize)],
    );
    (
        any::<bool>(),
        prop_oneof![Just(0u8), Just(0b100), Just(0b111)],
        prop_oneof![Just(None), Just(Some(64u64)), Just(Some(1000))],
        prop::collection::vec(frame, 1..8),
        any::<[u8; 4]>(),
        prop::option::of((any::<usize>(), any::<u8>())),
    )
        .prop_map(|(client, allowed_rsv, max, frames, key, corrupt)| {
            let side = if client { Side::Client } else { Side::Upstream };
            let mut out = Vec::new();
            for (opcode, fin, rsv, len) in frames {
                let len = if opcode >= 8 { len.min(125) } else { len };
                if opcode == 0x8 && len > 0 {
                    // A valid close payload: code 1000 and a reason.
                    let mut f = encode(opcode, true, 0, client.then_some(key), len.max(2));
                    let at = f.len() - len.max(2);
                    f[at] = 0x03;
                    f[at + 1] = 0xE8;
                    for b in &mut f[at + 2..] {
                        *b = b'r';
                    }
                    if client {
                        for (i, b) in f[at..].iter_mut().enumerate() {
                            *b ^= key[i % 4];
                        }
                    }
                    out.extend(f);
                } else {
                    out.extend(encode(opcode, fin, rsv, client.then_some(key), len));
                }
            }
            if let Some((i, b)) = corrupt {
                let n = out.len();
                out[i % n] = b;
            }
            let config = WatcherConfig {
                side,
                max_message_size: max,
                allowed_rsv,
            };
            (config, out)
        })
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    headers: Vec<FrameHeader>,
    forwarded: usize,
    error: Option<FrameError>,
    counts: (u64, u64, u64, u64, u64),
    close: Option<(Option<u16>, String)>,
    in_message: bool,
    at_boundary: bool,
}

fn run(config: WatcherConfig, data: &[u8], cuts: &[usize]) -> Run {
    let mut w = FrameWatcher::new(config);
    let mut headers = Vec::new();
    let mut forwarded = 0;
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < data.len()));
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(data.len());
    for pair in bounds.windows(2) {
        if w.error().is_some() {
            break;
        }
        forwarded += match w.feed_observed(&data[pair[0]..pair[1]], &mut |h| headers.push(*h)) {
            Ok(n) => n,
            Err(v) => v.forward,
        };
    }
    Run {
        headers,
        forwarded,
        error: w.error().cloned(),
        counts: (w.messages, w.message_bytes, w.frames, w.pings, w.pongs),
        close: w.close().cloned().map(|c| (c.code, c.reason)),
        in_message: w.in_message(),
        at_boundary: w.at_boundary(),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_frames_chunk_split_invariance(
        (config, data) in stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        bytewise in any::<bool>(),
    ) {
        let whole = run(config, &data, &[]);
        let cuts: Vec<usize> = if bytewise && data.len() < 2000 {
            (1..data.len()).collect()
        } else {
            cuts.iter().map(|c| c % (data.len() + 1)).collect()
        };
        let mut split = run(config, &data, &cuts);
        prop_assert_eq!(&split.error, &whole.error);
        if matches!(whole.error, Some(FrameError::InvalidCloseCode(_) | FrameError::CloseReasonNotUtf8))
            && split.headers.len() == whole.headers.len() + 1
        {
            // A close frame whose payload is split is accepted by its header,
            // and refused once its payload is complete (as the recorded vectors
            // say): one more header seen, never forwarded whole.
            prop_assert_eq!(split.headers.last().map(|h| h.opcode), Some(0x8));
            split.headers.pop();
            split.counts.2 -= 1;
        }
        prop_assert_eq!(&split.headers, &whole.headers);
        prop_assert_eq!(split.counts, whole.counts);
        prop_assert_eq!(&split.close, &whole.close);
        prop_assert_eq!(split.in_message, whole.in_message);
        if whole.error.is_none() {
            prop_assert_eq!(split.forwarded, data.len());
            prop_assert!(split.at_boundary == whole.at_boundary);
        } else {
            // A violation is never forwarded; only what an earlier chunk had
            // already passed on (a split header or close payload) can precede it.
            prop_assert!(split.forwarded >= whole.forwarded);
            prop_assert_eq!(split.forwarded == whole.forwarded, split.at_boundary);
        }
    }

    #[test]
    fn fuzz_frames_header_vs_tungstenite(data in prop::collection::vec(any::<u8>(), 0..16)) {
        // The side follows the mask bit, every RSV bit is allowed and there is
        // no size limit: the rules tungstenite does not check are all that is left.
        let side = match data.get(1) {
            Some(b) if b & 0x80 != 0 => Side::Client,
            _ => Side::Upstream,
        };
        let config = WatcherConfig { side, max_message_size: None, allowed_rsv: 0b111 };
        let ours = run(config, &data, &[]);
        let mut cursor = Cursor::new(&data);
        match TungsteniteHeader::parse(&mut cursor) {
            Ok(Some((theirs, length))) => match ours.headers.first() {
                Some(h) => {
                    prop_assert_eq!(h.fin, theirs.is_final);
                    prop_assert_eq!(h.rsv, u8::from(theirs.rsv1) << 2 | u8::from(theirs.rsv2) << 1 | u8::from(theirs.rsv3));
                    prop_assert_eq!(h.opcode, u8::from(theirs.opcode));
                    prop_assert_eq!(h.mask, theirs.mask);
                    prop_assert_eq!(h.length, length);
                    prop_assert_eq!(u64::from(h.header_size), cursor.position());
                }
                None => prop_assert!(
                    matches!(
                        ours.error,
                        Some(
                            FrameError::ContinuationWithoutMessage
                                | FrameError::FragmentedControl
                                | FrameError::RsvOnControl
                                | FrameError::ControlTooLong
                                | FrameError::OneByteClosePayload
                                | FrameError::LengthTopBitSet
                                | FrameError::InvalidCloseCode(_)
                                | FrameError::CloseReasonNotUtf8
                        )
                    ),
                    "tungstenite read a header the watcher refused with {:?}",
                    ours.error
                ),
            },
            Ok(None) => prop_assert!(ours.headers.is_empty()),
            Err(_) => prop_assert!(matches!(ours.error, Some(FrameError::ReservedOpcode(_)))),
        }
    }

    #[test]
    fn fuzz_close_frames_parse_back(code in 1000u16..5000, reason in ".{0,80}", key in any::<[u8; 4]>(), masked in any::<bool>()) {
        let built = build_close_frame(code, &reason, masked.then_some(key));
        if !close_code_valid(code) {
            prop_assert_eq!(built, Err(FrameError::InvalidCloseCode(code)));
            return Ok(());
        }
        let frame = built.unwrap();
        let side = if masked { Side::Client } else { Side::Upstream };
        let mut w = FrameWatcher::new(WatcherConfig { side, max_message_size: None, allowed_rsv: 0 });
        prop_assert_eq!(w.feed(&frame), Ok(frame.len()));
        let seen = w.close().cloned().unwrap();
        prop_assert_eq!(seen.code, Some(code));
        prop_assert!(reason.starts_with(&seen.reason));
        prop_assert!(seen.reason.len() <= MAX_CLOSE_REASON);
        prop_assert!(seen.reason.len() == reason.len() || seen.reason.len() + 4 > MAX_CLOSE_REASON);
        let (theirs, length) = TungsteniteHeader::parse(&mut Cursor::new(&frame)).unwrap().unwrap();
        prop_assert_eq!(u8::from(theirs.opcode), 0x8);
        prop_assert_eq!(theirs.mask, masked.then_some(key));
        prop_assert_eq!(length as usize, 2 + seen.reason.len());
    }
}

// --- chunked request bodies -----------------------------------------------------

/// Decode `data` cut at `cuts`: the body, the bytes used, or the error.
fn decode_cut(data: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
    let mut decoder = ChunkedDecoder::new(1024);
    let mut out = Vec::new();
    let mut at = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    bounds.push(data.len());
    bounds.sort_unstable();
    for end in bounds {
        if end < at {
            continue;
        }
        let r = decoder.decode(&data[at..end], &mut out)?;
        at += r.consumed;
        if r.done {
            return Ok((out, at, true));
        }
    }
    Ok((out, at, false))
}

proptest! {
    #![proptest_config(config())]

    /// What loopwatch frames decodes back to the same data, however it is cut,
    /// and the bytes after the body are left for the next request.
    #[test]
    fn fuzz_chunked_round_trip(
        pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8),
        tail in prop::collection::vec(any::<u8>(), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut framed = Vec::new();
        for piece in &pieces {
            encode_chunk(piece, &mut framed);
        }
        framed.extend_from_slice(LAST_CHUNK);
        let body_len = framed.len();
        framed.extend_from_slice(&tail);
        let (out, used, done) = decode_cut(&framed, &cuts).expect("loopwatch's framing is valid");
        prop_assert!(done);
        prop_assert_eq!(used, body_len);
        prop_assert_eq!(out, pieces.concat());
    }

    /// Arbitrary bytes never panic, and the verdict does not depend on the cuts.
    #[test]
    fn fuzz_chunked_arbitrary_bytes_cut_invariance(
        data in prop::collection::vec(prop::sample::select(b"0123456789abcdefABCDEFxX;=\" \t\r\n:-".to_vec()), 0..60),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        prop_assert_eq!(decode_cut(&data, &cuts), decode_cut(&data, &[]));
    }
}

// --- traceparent ---------------------------------------------------------------

/// What may follow the flags, and whether the propagator accepts it (for
/// version 00 / for a later version).
const TAILS: &[(&str, bool, bool)] = &[
    ("", true, true),
    (" \t ", true, true),
    ("-", false, true),
    ("-what-comes-next", false, true),
    ("x", false, false),
    (
        ", 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        false,
        false,
    ),
    (" -x", false, false),
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_traceparent_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..700)) {
        if let Some(p) = TraceParent::parse(&data) {
            prop_assert!(p.version != 0xff && p.trace_id != 0 && p.span_id != 0);
        }
    }

    #[test]
    fn fuzz_traceparent_from_parts(
        version in prop_oneof![Just(0u8), Just(0xffu8), any::<u8>()],
        trace_id in prop_oneof![Just(0u128), any::<u128>()],
        span_id in prop_oneof![Just(0u64), any::<u64>()],
        flags in any::<u8>(),
        lead in "[ \t]{0,3}",
        tail in 0..TAILS.len(),
        upper in any::<bool>(),
        padding in 0usize..500,
    ) {
        let (tail, ok_00, ok_later) = TAILS[tail];
        let long_tail = if ok_later && tail.starts_with('-') { "x".repeat(padding) } else { String::new() };
        let body = format!("{version:02x}-{trace_id:032x}-{span_id:016x}-{flags:02x}");
        let body = if upper { body.to_uppercase() } else { body };
        let value = format!("{lead}{body}{tail}{long_tail}");
        let expected = version != 0xff
            && trace_id != 0
            && span_id != 0
            && !(upper && body.bytes().any(|b| b.is_ascii_alphabetic()))
            && if version == 0 { ok_00 } else { ok_later }
            && value.len() <= 512;
        let got = TraceParent::parse(value.as_bytes());
        prop_assert_eq!(got.is_some(), expected, "{}", value);
        if let Some(p) = got {
            prop_assert_eq!((p.version, p.trace_id, p.span_id, p.flags), (version, trace_id, span_id, flags));
        }
    }
}
