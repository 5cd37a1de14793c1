//! W3C Trace Context for the connection span (docs/tracing.md): the client's
//! `traceparent` read as the brain's OpenTelemetry propagator reads it, the
//! sampling decision the configured sampler would take, the connection span's
//! ids, and the `traceparent` the upstream request carries.
//!
//! The data plane decides all of this itself at the attempt, so the upstream
//! handshake never waits for Python; the Attempt event carries the ids, and
//! the brain's tracing observer makes the span with exactly them.

/// The W3C flag bit: the caller may have recorded the trace.
pub const SAMPLED: u8 = 0x01;
/// Level 2's flag bit: the trace id's right 7 bytes are random.
pub const RANDOM_TRACE_ID: u8 = 0x02;
/// Longer `traceparent` values are ignored (the propagator's limit).
pub const MAX_TRACEPARENT_LENGTH: usize = 512;
/// Bytes of a version-00 `traceparent` value, which this module writes.
pub const TRACEPARENT_LENGTH: usize = 55;
/// A root bound every trace id passes (`ALL_ROOTS` in span_export.py).
pub const ALL_ROOTS: u128 = 1 << 64;

/// A valid `traceparent` (the client's: the connection span's parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub version: u8,
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// The value of a `traceparent` header, as OpenTelemetry's
    /// TraceContextTextMapPropagator accepts it (W3C Trace Context, level 1
    /// and 2): spaces or tabs around, then `version-trace_id-span_id-flags`
    /// in lower-case hex of 2, 32, 16 and 2 digits. Version `ff` is invalid,
    /// version `00` takes nothing after the flags, a later version may go on
    /// with `-` and anything; an all-zero trace or span id is invalid. None
    /// for anything else (then the span is a root, as for no header).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        if value.len() > MAX_TRACEPARENT_LENGTH {
            return None;
        }
        let start = value.iter().position(|&b| b != b' ' && b != b'\t')?;
        let value = &value[start..];
        if value.len() < TRACEPARENT_LENGTH {
            return None;
        }
        let (fields, rest) = value.split_at(TRACEPARENT_LENGTH);
        if fields[2] != b'-' || fields[35] != b'-' || fields[52] != b'-' {
            return None;
        }
        let version = hex(&fields[0..2])? as u8;
        let trace_id = hex(&fields[3..35])?;
        let span_id = hex(&fields[36..52])? as u64;
        let flags = hex(&fields[53..55])? as u8;
        if version == 0xff || trace_id == 0 || span_id == 0 {
            return None;
        }
        let tail_ok = if rest.first() == Some(&b'-') {
            version != 0
        } else {
            rest.iter().all(|&b| b == b' ' || b == b'\t')
        };
        if !tail_ok {
            return None;
        }
        Some(TraceParent {
            version,
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// Lower-case hex digits (at most 32) as a number; None for any other byte.
fn hex(digits: &[u8]) -> Option<u128> {
    let mut n: u128 = 0;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(d);
    }
    Some(n)
}

/// How spans are sampled: the OpenTelemetry SDK's samplers of
/// `OTEL_TRACES_SAMPLER` (`SamplingPlan` in span_export.py). A trace is
/// sampled when its id's low 64 bits are below `root_bound` (`always_on`:
/// [`ALL_ROOTS`], `always_off`: 0, `traceidratio`: the SDK's bound for the
/// rate); with `parent_based`, a span with a parent follows the parent's
/// sampled flag instead (`ParentBased`'s default delegates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    pub root_bound: u128,
    pub parent_based: bool,
}

impl Sampling {
    /// The span's flags: the sampled bit as the sampler decides, and the
    /// random-trace-id bit (set for a root, whose id this plane drew at
    /// random; kept from the parent otherwise).
    pub fn flags(&self, trace_id: u128, parent: Option<&TraceParent>) -> u8 {
        let by_id = u128::from(trace_id as u64) < self.root_bound;
        match parent {
            None => RANDOM_TRACE_ID | if by_id { SAMPLED } else { 0 },
            Some(parent) => {
                let sampled = if self.parent_based {
                    parent.sampled()
                } else {
                    by_id
                };
                (parent.flags & RANDOM_TRACE_ID) | if sampled { SAMPLED } else { 0 }
            }
        }
    }
}

/// The connection span's context: its ids and flags, and its parent (the
/// client's `traceparent`) when it continues the client's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
    pub parent: Option<TraceParent>,
}

impl SpanContext {
    /// The span of a connection whose client sent `parent` (None: a root),
    /// with new ids drawn from `ids` (a trace id only for a root).
    pub fn new(sampling: &Sampling, parent: Option<TraceParent>, ids: &mut Ids) -> SpanContext {
        let trace_id = match &parent {
            Some(parent) => parent.trace_id,
            None => ids.trace_id(),
        };
        SpanContext {
            trace_id,
            span_id: ids.span_id(),
            flags: sampling.flags(trace_id, parent.as_ref()),
            parent,
        }
    }

    /// The `traceparent` value sent upstream: version 00, this span as the
    /// upstream's parent.
    pub fn traceparent(&self) -> [u8; TRACEPARENT_LENGTH] {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        );
        let mut out = [0u8; TRACEPARENT_LENGTH];
        out.copy_from_slice(text.as_bytes());
        out
    }
}

/// Random span and trace ids (xoshiro256++, seeded by the caller from the
/// system's random source; one per worker thread). Never zero. Like the
/// SDK's RandomIdGenerator (Python's `random`), not a cryptographic source.
#[derive(Debug, Clone)]
pub struct Ids {
    s: [u64; 4],
}

impl Ids {
    /// A generator from 32 seed bytes (an all-zero seed is replaced: the
    /// generator would only ever give 0).
    pub fn from_seed(seed: [u8; 32]) -> Ids {
        let mut s = [0u64; 4];
        for (word, chunk) in s.iter_mut().zip(seed.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *word = u64::from_le_bytes(bytes);
        }
        if s == [0; 4] {
            s = [0x9e37_79b9_7f4a_7c15, 1, 2, 3];
        }
        Ids { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    pub fn span_id(&mut self) -> u64 {
        loop {
            let id = self.next_u64();
            if id != 0 {
                return id;
            }
        }
    }

    pub fn trace_id(&mut self) -> u128 {
        loop {
            let id = (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64());
            if id != 0 {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read() {
        let p = TraceParent::parse(CLIENT).unwrap();
        assert_eq!(p.version, 0);
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(p.flags, 1);
        assert!(p.sampled());
        // Spaces and tabs around it, other flag bits, as the propagator reads them.
        assert_eq!(
            TraceParent::parse(b" \t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 \t"),
            Some(p)
        );
        let unsampled =
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02").unwrap();
        assert!(!unsampled.sampled());
        assert_eq!(unsampled.flags, RANDOM_TRACE_ID);
    }

    #[test]
    fn a_later_version_may_go_on() {
        let p = TraceParent::parse(
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
        )
        .unwrap();
        assert_eq!(p.version, 0xcc);
        assert!(
            TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .is_some()
        );
        // Version 00 takes nothing after the flags.
        assert_eq!(
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            None
        );
        // Anything but `-` after the flags (two headers joined with ", ").
        let joined = [CLIENT, b", ", CLIENT].concat();
        assert_eq!(TraceParent::parse(&joined), None);
        assert_eq!(
            TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn invalid_shapes_are_ignored() {
        for bad in [
            // version ff is invalid
            &b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            // all-zero ids
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // wrong lengths
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b77-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            b"0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"000-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // upper-case hex
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            b"0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            // not hex, wrong separators, empty
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"",
            b"   ",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Over the propagator's 512 characters, even when the start is valid.
        let long = [
            &b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-"[..],
            &[b'x'; 500],
        ]
        .concat();
        assert_eq!(TraceParent::parse(&long), None);
    }

    #[test]
    fn roots_are_sampled_by_the_low_64_bits_of_the_trace_id() {
        let ratio = Sampling {
            root_bound: 1 << 62,
            parent_based: true,
        };
        assert_eq!(
            ratio.flags((1 << 64) | ((1 << 62) - 1), None),
            SAMPLED | RANDOM_TRACE_ID
        );
        assert_eq!(ratio.flags(1 << 62, None), RANDOM_TRACE_ID);
        let on = Sampling {
            root_bound: ALL_ROOTS,
            parent_based: false,
        };
        assert_eq!(on.flags(u128::MAX, None), SAMPLED | RANDOM_TRACE_ID);
        let off = Sampling {
            root_bound: 0,
            parent_based: false,
        };
        assert_eq!(off.flags(1, None), RANDOM_TRACE_ID);
    }

    #[test]
    fn a_child_follows_its_parent_when_parent_based() {
        let parent = TraceParent::parse(CLIENT).unwrap();
        let unsampled = TraceParent { flags: 0, ..parent };
        let based = Sampling {
            root_bound: 0,
            parent_based: true,
        };
        assert_eq!(based.flags(parent.trace_id, Some(&parent)), SAMPLED);
        assert_eq!(based.flags(parent.trace_id, Some(&unsampled)), 0);
        // Not parent-based: the trace id decides, the parent's random bit stays.
        let ratio = Sampling {
            root_bound: ALL_ROOTS,
            parent_based: false,
        };
        let random = TraceParent { flags: 2, ..parent };
        assert_eq!(
            ratio.flags(parent.trace_id, Some(&random)),
            SAMPLED | RANDOM_TRACE_ID
        );
    }

    #[test]
    fn the_span_continues_the_clients_trace_and_says_so_upstream() {
        let mut ids = Ids::from_seed([7; 32]);
        let sampling = Sampling {
            root_bound: ALL_ROOTS,
            parent_based: true,
        };
        let parent = TraceParent::parse(CLIENT).unwrap();
        let child = SpanContext::new(&sampling, Some(parent), &mut ids);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        let header = child.traceparent();
        let expected = format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
            child.span_id
        );
        assert_eq!(&header[..], expected.as_bytes());
        // What it sends reads back as the same span.
        let back = TraceParent::parse(&header).unwrap();
        assert_eq!(
            (back.trace_id, back.span_id, back.flags),
            (child.trace_id, child.span_id, child.flags)
        );
        let root = SpanContext::new(&sampling, None, &mut ids);
        assert_eq!(root.parent, None);
        assert_eq!(root.flags, SAMPLED | RANDOM_TRACE_ID);
        assert_ne!(root.trace_id, parent.trace_id);
        assert_eq!(
            TraceParent::parse(&root.traceparent()).map(|p| p.trace_id),
            Some(root.trace_id)
        );
    }

    #[test]
    fn ids_are_never_zero_and_differ() {
        let mut ids = Ids::from_seed([0; 32]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (t, s) = (ids.trace_id(), ids.span_id());
            assert!(t != 0 && s != 0);
            assert!(seen.insert(s));
        }
    }
}
