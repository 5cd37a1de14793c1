//! The connection span's trace context, decided at the attempt (tracing on):
//! the client's `traceparent` continued or a new trace begun, sampled as the
//! configured sampler would (`core::trace`), the ids drawn here, on the tokio
//! worker. The upstream request carries its `traceparent`; the Attempt event
//! carries the context and the request's values, and the brain's tracing
//! observer makes the span with exactly these ids. Nothing waits for Python.

use std::cell::RefCell;

use loopwatch_dataplane_core::events::AttemptTrace;
use loopwatch_dataplane_core::head::RequestHead;
use loopwatch_dataplane_core::trace::{Ids, Sampling, SpanContext, TraceParent};

thread_local! {
    /// Each runtime thread's id generator, seeded once from the system's
    /// random source.
    static IDS: RefCell<Option<Ids>> = const { RefCell::new(None) };
}

fn seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if getrandom::getrandom(&mut seed).is_err() {
        // No system random source (never on Linux since 3.17): the clock and
        // the thread, which still gives distinct ids per thread and start.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let thread = format!("{:?}", std::thread::current().id());
        seed[..16].copy_from_slice(&nanos.to_le_bytes());
        for (i, b) in thread.bytes().enumerate().take(16) {
            seed[16 + i] = b;
        }
    }
    seed
}

/// The most bytes of a client's value (path, Host, User-Agent) a span keeps.
/// Spans wait in queues bounded in spans (the event queue, the exporter's), so
/// each must be bounded in bytes too: a head may carry 16 KiB in one header.
pub const MAX_ATTRIBUTE: usize = 1024;
/// W3C Trace Context: a vendor need not keep a `tracestate` over 512
/// characters; a longer one is dropped (the span keeps its parent).
pub const MAX_TRACESTATE: usize = 512;

/// The span of this attempt and the values of its request, and the
/// `traceparent` to send upstream.
pub fn attempt_trace(sampling: &Sampling, head: &RequestHead<'_>) -> AttemptTrace {
    let traceparent = head.header("traceparent");
    let parent = traceparent.as_deref().and_then(TraceParent::parse);
    let context = with_ids(|ids| SpanContext::new(sampling, parent, ids));
    let tracestate = match parent {
        Some(_) => head
            .header("tracestate")
            .filter(|v| v.len() <= MAX_TRACESTATE)
            .map(|v| latin1(&v)),
        None => None,
    };
    AttemptTrace {
        context,
        tracestate,
        path: latin1(bounded(head.path)),
        authority: head.authority.as_deref().map(|v| Box::from(bounded(v))),
        user_agent: head
            .header("user-agent")
            .as_deref()
            .map(|v| Box::from(bounded(v))),
    }
}

/// At most MAX_ATTRIBUTE bytes of `value`, its start.
fn bounded(value: &[u8]) -> &[u8] {
    &value[..value.len().min(MAX_ATTRIBUTE)]
}

/// Whether this one of many (a plain request's access line) is in a random
/// `share` of them (0 none, 1 all), drawn from the thread's generator.
pub fn sampled(share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    if share <= 0.0 {
        return false;
    }
    let draw = with_ids(Ids::span_id);
    (draw as f64) < share * (u64::MAX as f64)
}

/// `f` with this runtime thread's generator (seeded at its first use).
fn with_ids<R>(f: impl FnOnce(&mut Ids) -> R) -> R {
    IDS.with(|cell| {
        f(cell
            .borrow_mut()
            .get_or_insert_with(|| Ids::from_seed(seed())))
    })
}

/// Bytes as Python's `decode("latin-1")` reads them (one character each).
pub(crate) fn latin1(bytes: &[u8]) -> Box<str> {
    bytes
        .iter()
        .map(|&b| char::from(b))
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus};
    use loopwatch_dataplane_core::trace::{ALL_ROOTS, RANDOM_TRACE_ID, SAMPLED};

    fn head(raw: &[u8]) -> RequestHead<'_> {
        match parse_head(raw, &HeadLimits::default()) {
            HeadStatus::Complete(head) => head,
            other => panic!("not a complete head: {other:?}"),
        }
    }

    const ON: Sampling = Sampling {
        root_bound: ALL_ROOTS,
        parent_based: true,
    };

    #[test]
    fn a_client_traceparent_is_continued_with_its_tracestate() {
        let raw = b"GET /chat?token=secret HTTP/1.1\r\nHost: example.test:8080\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
            User-Agent: tab/1.0\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n\
            tracestate: a=1\r\ntracestate: b=\xe9\r\n\r\n";
        let t = attempt_trace(&ON, &head(raw));
        assert_eq!(t.context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(
            t.context.parent.map(|p| p.span_id),
            Some(0x00f067aa0ba902b7)
        );
        assert_eq!(t.context.flags, 0, "the parent was not sampled");
        assert_eq!(t.tracestate.as_deref(), Some("a=1, b=\u{e9}"));
        assert_eq!(&*t.path, "/chat");
        assert_eq!(t.authority.as_deref(), Some(&b"example.test:8080"[..]));
        assert_eq!(t.user_agent.as_deref(), Some(&b"tab/1.0"[..]));
    }

    #[test]
    fn without_a_valid_traceparent_a_new_trace_begins() {
        let raw = b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
            traceparent: ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
            tracestate: a=1\r\n\r\n";
        let (a, b) = (
            attempt_trace(&ON, &head(raw)),
            attempt_trace(&ON, &head(raw)),
        );
        assert_eq!(a.context.parent, None);
        assert_eq!(
            a.tracestate, None,
            "no parent: the tracestate is not the span's"
        );
        assert_eq!(a.context.flags, SAMPLED | RANDOM_TRACE_ID);
        assert_ne!(a.context.trace_id, b.context.trace_id);
        assert_ne!(a.context.span_id, b.context.span_id);
        assert_eq!(a.user_agent, None);
    }

    #[test]
    fn the_clients_values_are_bounded_in_bytes() {
        let long = "x".repeat(5000); // three of them: within the 16 KiB head
        let state = format!("a={}", "s".repeat(MAX_TRACESTATE));
        let raw = format!(
            "GET /{long} HTTP/1.1\r\nHost: {long}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             User-Agent: {long}\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
             tracestate: {state}\r\n\r\n"
        );
        let t = attempt_trace(&ON, &head(raw.as_bytes()));
        assert_eq!(t.path.len(), MAX_ATTRIBUTE);
        assert!(t.path.starts_with("/xxx"));
        assert_eq!(t.authority.as_deref().map(<[u8]>::len), Some(MAX_ATTRIBUTE));
        assert_eq!(
            t.user_agent.as_deref().map(<[u8]>::len),
            Some(MAX_ATTRIBUTE)
        );
        assert_eq!(t.tracestate, None, "over 512 characters: dropped");
        assert!(t.context.parent.is_some(), "the parent is kept");
        let short = raw.replace(&state, "a=1");
        assert_eq!(
            attempt_trace(&ON, &head(short.as_bytes()))
                .tracestate
                .as_deref(),
            Some("a=1")
        );
    }
}
