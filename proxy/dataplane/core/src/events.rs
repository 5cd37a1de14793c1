//! The connection events the data plane emits, and the bounded queue that
//! carries them to the brain.
//!
//! The events mirror `detectors/events.py` (the engine's input): one per step
//! of an upgrade attempt's life, each with its connection's id. They carry an
//! [`Instant`]; the Python face turns it into the brain's `time.monotonic()`
//! seconds with one reference pair taken at start (both are CLOCK_MONOTONIC on
//! Linux).
//!
//! The queue never makes traffic wait: producers (tokio tasks) only
//! `try_send`, and an event that finds the queue full is dropped and counted.
//! The brain drains it in batches ([`EventReceiver::try_batch`] from its
//! event loop, or [`EventReceiver::recv_batch`] from a thread of its own with
//! the GIL released), and reads the drop count at scrape time (and logs once
//! per burst of drops with [`EventSender::drops`]). A consumer that sleeps in
//! a poll of its own parks ([`EventReceiver::park`]) when it finds the queue
//! empty; the next event makes [`EventReceiver::wake_fd`] readable.
//!
//! Besides the attempts' events, the queue carries the `request_rejected`
//! log lines of the requests loopwatch answered itself
//! ([`Event::RequestRejected`]), already rate-limited at the source by a
//! [`LogLimiter`]: at most one per reason per [`REJECTION_LOG_INTERVAL`],
//! so a flood of bad requests (thousands a second, each counted in an
//! atomic) puts a handful of lines in the queue, never enough to crowd out
//! the engine's events. And, when `telemetry.access_log` asks for them, the
//! `access` lines of plain HTTP requests ([`Event::HttpRequest`]), sampled
//! where they are made.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::trace::SpanContext;

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    Client,
    Upstream,
    Proxy,
}

impl Initiator {
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Upstream => "upstream",
            Initiator::Proxy => "proxy",
        }
    }
}

/// Why the enforcement table refused an attempt (`RejectReason` in
/// detectors/decisions.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    Cooldown,
    MinInterval,
    MaxConcurrent,
    Deny,
    CircuitOpen,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 5] = [
        RefuseReason::Cooldown,
        RefuseReason::MinInterval,
        RefuseReason::MaxConcurrent,
        RefuseReason::Deny,
        RefuseReason::CircuitOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::Cooldown => "cooldown",
            RefuseReason::MinInterval => "min_interval",
            RefuseReason::MaxConcurrent => "max_concurrent",
            RefuseReason::Deny => "deny",
            RefuseReason::CircuitOpen => "circuit_open",
        }
    }
}

/// Why no HTTP answer came back from the upstream (`HandshakeFailed.error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeError {
    /// The connection was refused or the name did not resolve.
    Connect,
    /// Connect or answer slower than its timeout.
    Timeout,
    /// TLS to the upstream failed (verification, handshake).
    Tls,
    /// The upstream's answer was not a valid HTTP head.
    BadResponse,
    /// The upstream closed before answering.
    Closed,
    /// The client left before the upstream answered.
    ClientClosed,
    /// loopwatch itself was out of open files for the upstream's socket
    /// (EMFILE/ENFILE): neither the upstream's failure nor the client's.
    FdLimit,
    /// loopwatch began draining before the upstream answered (the client is
    /// answered 503): neither the upstream's failure nor the client's.
    ShuttingDown,
}

impl HandshakeError {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeError::Connect => "connect",
            HandshakeError::Timeout => "timeout",
            HandshakeError::Tls => "tls",
            HandshakeError::BadResponse => "bad_response",
            HandshakeError::Closed => "closed",
            HandshakeError::ClientClosed => "client_closed",
            HandshakeError::FdLimit => "fd_limit",
            HandshakeError::ShuttingDown => "shutting_down",
        }
    }
}

/// How the upstream handshake failed: its HTTP answer, or no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    Status(u16),
    Error(HandshakeError),
}

/// What crossed a relayed connection, per direction (`RelayStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client to upstream.
    pub messages_in: u64,
    /// Upstream to client.
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// At most one `request_rejected` line per reason this often
/// (`REJECTION_LOG_INTERVAL` in proxy/dataplane/boundary.py).
pub const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A request loopwatch answered (or cut) itself before the engine saw it,
/// as its `request_rejected` log line says (`log_rejection` in
/// proxy/dataplane/boundary.py). Not an attempt's event: no key, no id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRejected {
    /// The `reason` label of loopwatch_requests_rejected_total.
    pub reason: &'static str,
    /// The answer's status; None for a connection cut without one.
    pub status: Option<u16>,
    /// The client's address.
    pub peer: Box<str>,
    /// The answer's body line (or what a cut means).
    pub message: Box<str>,
    /// Rejections of this reason left unlogged since the previous line.
    pub suppressed: u64,
    pub at: Instant,
}

/// A plain HTTP request a route forwarded, for its `access` log line
/// (`telemetry.access_log`; sampled at the source, so that with access lines
/// off none is made). Not an attempt's event: the engine never sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAccess {
    pub route: Arc<str>,
    /// The client's address (the socket's peer).
    pub peer: Box<str>,
    pub method: Box<str>,
    /// The request's path, without the query (which may carry tokens).
    pub path: Box<str>,
    /// The status the client got: the upstream's, or loopwatch's own answer
    /// (a 502, 504, 408); None when none went out (the client left first).
    pub status: Option<u16>,
    /// How it ended ([`HttpOutcome`]).
    pub outcome: HttpOutcome,
    /// From the request's head to the end of its response.
    pub duration: Duration,
    /// Request body bytes that went to the upstream.
    pub bytes_in: u64,
    /// Response bytes (head and body) that went to the client.
    pub bytes_out: u64,
    pub conn_id: u64,
    pub at: Instant,
}

/// How a forwarded plain request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpOutcome {
    /// The upstream's response went out whole.
    Forwarded,
    /// loopwatch answered itself (the upstream failed or was too slow, or
    /// the request body stalled): `status` is its answer.
    Answered,
    /// The response was cut mid-body (the upstream ended it early or
    /// stalled, or it broke its framing).
    Cut,
    /// The client left before the response was through.
    ClientGone,
}

impl HttpOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpOutcome::Forwarded => "forwarded",
            HttpOutcome::Answered => "answered",
            HttpOutcome::Cut => "cut",
            HttpOutcome::ClientGone => "client_gone",
        }
    }
}

/// What the tracing observer needs of an attempt when tracing is on: the
/// span's context as this plane decided it (and sent upstream in
/// `traceparent`), the client's `tracestate` with a parent, and the request's
/// values for the span's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptTrace {
    pub context: SpanContext,
    /// The client's `tracestate` (duplicates joined with ", "), only when the
    /// span continues the client's trace.
    pub tracestate: Option<Box<str>>,
    /// The request's path, without the query (`url.path`).
    pub path: Box<str>,
    /// The Host the client asked for (`server.address`).
    pub authority: Option<Box<[u8]>>,
    /// The client's User-Agent (`user_agent.original`).
    pub user_agent: Option<Box<[u8]>>,
}

/// One step of an upgrade attempt's life. `key` is the client key identity
/// gave it, `route` the route's name, `conn_id` the connection's id: given at
/// accept, unique in one listener, the same on every event of a connection
/// (so the brain can tell which Rejected, Answered or Closed follows which
/// Attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An upgrade request arrived (before admission); `addr` is the peer.
    Attempt {
        key: Arc<str>,
        route: Arc<str>,
        at: Instant,
        addr: Box<str>,
        conn_id: u64,
        /// With tracing on: the span's context and the request's values.
        trace: Option<Box<AttemptTrace>>,
    },
    /// The enforcement table refused it; it never reached the upstream.
    Rejected {
        key: Arc<str>,
        route: Arc<str>,
        at: Instant,
        reason: RefuseReason,
        conn_id: u64,
    },
    /// A refusal that was held (policy.hold for its reason) was answered, or its
    /// client left during the hold: the attempt ended now, and the engine
    /// measures retry intervals from here (`Answered` in detectors/events.py).
    Answered {
        key: Arc<str>,
        route: Arc<str>,
        at: Instant,
        conn_id: u64,
    },
    /// The upstream refused the upgrade or could not be reached.
    HandshakeFailed {
        key: Arc<str>,
        route: Arc<str>,
        at: Instant,
        failure: HandshakeFailure,
        conn_id: u64,
        /// Why no answer came, as the data plane saw it (the TLS alert or
        /// verification error, the OS error, what was wrong with the
        /// answer), for the operator's log line; None when there is no more
        /// to say than `failure`.
        detail: Option<Box<str>>,
    },
    /// Both sides are open.
    Opened {
        key: Arc<str>,
        route: Arc<str>,
        at: Instant,
        conn_id: u64,
    },
    /// The connection ended. `code` is 1005 for a close frame without a code,
    /// 1006 for no close frame; `duration` runs from Opened.
    Closed {
        key: Arc<str>,
        route: Arc<str>,
        at: Instant,
        conn_id: u64,
        code: u16,
        reason: Box<str>,
        initiator: Initiator,
        duration: Duration,
        traffic: Traffic,
    },
    /// A `request_rejected` log line (rate-limited at the source; boxed:
    /// rare, and it keeps the attempts' events small).
    RequestRejected(Box<RequestRejected>),
    /// A plain request's `access` line (sampled at the source; boxed).
    HttpRequest(Box<HttpAccess>),
}

impl Event {
    /// The `"type"` name of detectors/events.py.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Attempt { .. } => "attempt",
            Event::Rejected { .. } => "rejected",
            Event::Answered { .. } => "answered",
            Event::HandshakeFailed { .. } => "handshake_failed",
            Event::Opened { .. } => "opened",
            Event::Closed { .. } => "closed",
            Event::RequestRejected(_) => "request_rejected",
            Event::HttpRequest(_) => "http_request",
        }
    }

    /// The client's key; None for a [`Event::RequestRejected`] (refused
    /// before any key was given) and an [`Event::HttpRequest`] (no attempt).
    pub fn key(&self) -> Option<&str> {
        match self {
            Event::Attempt { key, .. }
            | Event::Rejected { key, .. }
            | Event::Answered { key, .. }
            | Event::HandshakeFailed { key, .. }
            | Event::Opened { key, .. }
            | Event::Closed { key, .. } => Some(key),
            Event::RequestRejected(_) | Event::HttpRequest(_) => None,
        }
    }

    pub fn at(&self) -> Instant {
        match self {
            Event::Attempt { at, .. }
            | Event::Rejected { at, .. }
            | Event::Answered { at, .. }
            | Event::HandshakeFailed { at, .. }
            | Event::Opened { at, .. }
            | Event::Closed { at, .. } => *at,
            Event::RequestRejected(line) => line.at,
            Event::HttpRequest(line) => line.at,
        }
    }

    /// The connection's id (the same on every event of one connection);
    /// None for a [`Event::RequestRejected`] (it may come before any id) and
    /// an [`Event::HttpRequest`] (a log line: no attempt's steps to follow).
    pub fn conn_id(&self) -> Option<u64> {
        match self {
            Event::Attempt { conn_id, .. }
            | Event::Rejected { conn_id, .. }
            | Event::Answered { conn_id, .. }
            | Event::HandshakeFailed { conn_id, .. }
            | Event::Opened { conn_id, .. }
            | Event::Closed { conn_id, .. } => Some(*conn_id),
            Event::RequestRejected(_) | Event::HttpRequest(_) => None,
        }
    }

    /// The bytes it holds beyond its own slot in the queue (which the queue
    /// allocates up front): what it carries from the client and the upstream.
    /// A key shared with the connection's other events is counted in each.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Event::Attempt {
                key, addr, trace, ..
            } => key.len() + addr.len() + trace.as_deref().map_or(0, AttemptTrace::heap_bytes),
            Event::Rejected { key, .. }
            | Event::Answered { key, .. }
            | Event::Opened { key, .. } => key.len(),
            Event::HandshakeFailed { key, detail, .. } => {
                key.len() + detail.as_deref().map_or(0, str::len)
            }
            Event::Closed { key, reason, .. } => key.len() + reason.len(),
            Event::RequestRejected(line) => {
                std::mem::size_of::<RequestRejected>() + line.peer.len() + line.message.len()
            }
            Event::HttpRequest(line) => {
                std::mem::size_of::<HttpAccess>()
                    + line.peer.len()
                    + line.method.len()
                    + line.path.len()
            }
        }
    }
}

impl AttemptTrace {
    fn heap_bytes(&self) -> usize {
        std::mem::size_of::<AttemptTrace>()
            + self.tracestate.as_deref().map_or(0, str::len)
            + self.path.len()
            + self.authority.as_deref().map_or(0, <[u8]>::len)
            + self.user_agent.as_deref().map_or(0, <[u8]>::len)
    }
}

/// At most one log line per slot (a reason) per interval, decided without a
/// lock by whoever gets there first, and how many were left out since the
/// previous line (`LogLimiter` in proxy/dataplane/boundary.py is its
/// Python twin). Every rejection is counted elsewhere; this only
/// decides which ones also make a line.
#[derive(Debug)]
pub struct LogLimiter<const N: usize> {
    start: Instant,
    interval: u64,
    /// Per slot: nanoseconds after `start` before which no line is written.
    next: [AtomicU64; N],
    /// Per slot: left out since the last line.
    suppressed: [AtomicU64; N],
}

impl<const N: usize> LogLimiter<N> {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            start: Instant::now(),
            interval: u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
            next: std::array::from_fn(|_| AtomicU64::new(0)),
            suppressed: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    /// One occurrence in `slot` at `now`: `Some(left out since the last
    /// line)` when it gets a line, None when it is left out (and counted so).
    pub fn admit(&self, slot: usize, now: Instant) -> Option<u64> {
        let now = self.nanos(now);
        let next = self.next[slot].load(Ordering::Acquire);
        let due = now >= next
            && self.next[slot]
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok();
        if due {
            Some(self.suppressed[slot].swap(0, Ordering::AcqRel))
        } else {
            self.suppressed[slot].fetch_add(1, Ordering::AcqRel);
            None
        }
    }

    /// A line `admit` granted was lost (the queue was full): it and the
    /// `carried` ones it reported are left out again, and the next
    /// occurrence may have the line.
    pub fn undo(&self, slot: usize, carried: u64) {
        self.suppressed[slot].fetch_add(carried.saturating_add(1), Ordering::AcqRel);
        self.next[slot].store(0, Ordering::Release);
    }
}

/// Events lost to a full queue: the total (a counter for /metrics) and the
/// part not reported yet (so the brain logs once per burst, not per drop).
#[derive(Debug, Default)]
pub struct Drops {
    total: AtomicU64,
    reported: AtomicU64,
}

impl Drops {
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Drops since the last call (0 when none): the brain logs one line per
    /// burst with this number.
    pub fn take_unreported(&self) -> u64 {
        let total = self.total.load(Ordering::Relaxed);
        let before = self.reported.swap(total, Ordering::Relaxed);
        total.saturating_sub(before)
    }
}

/// How a consumer that sleeps in a poll of its own (the brain's event loop)
/// learns that events came: once it found the queue empty it parks, and the
/// first event sent after that writes one byte to a socket pair whose read end
/// it watches. Producers pay an atomic load per event and a non-blocking write
/// per wake-up (a full socket buffer means one is pending): never a wait.
#[derive(Debug)]
struct Wake {
    parked: AtomicBool,
    writer: UnixStream,
    reader: UnixStream,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        let (writer, reader) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        reader.set_nonblocking(true)?;
        Ok(Wake {
            parked: AtomicBool::new(false),
            writer,
            reader,
        })
    }

    /// After an event was queued. The fence pairs with `park`'s: either this
    /// sees the consumer parked, or the consumer sees the event.
    fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::SeqCst) {
            let _ = (&self.writer).write(&[1]);
        }
    }
}

/// The bytes the queued events carry ([`Event::heap_bytes`]) and their bound:
/// the count of events alone would let a queue of the largest ones (traced
/// attempts with a long path, Host and User-Agent) hold some 250 MB.
#[derive(Debug)]
struct ByteBudget {
    held: AtomicUsize,
    max: usize,
}

impl ByteBudget {
    /// Room for `bytes` more: always for an event that finds the queue
    /// holding none (so that no event is too large to ever pass).
    fn take(&self, bytes: usize) -> bool {
        let before = self.held.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before.saturating_add(bytes) > self.max {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// What a queue holds at most of what its events carry, beside its count:
/// 32 MiB, some 500 bytes an event at the default 65 536 (an untraced
/// attempt carries its key and address, a traced one of ordinary requests a
/// few hundred bytes more).
pub const DEFAULT_MAX_BYTES: usize = 32 << 20;

/// The producer side: cheap to clone, one per data-plane task.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: Sender<Event>,
    bytes: Arc<ByteBudget>,
    drops: Arc<Drops>,
    wake: Arc<OnceLock<Wake>>,
}

impl EventSender {
    /// Queue an event without ever waiting; false (and counted) when the
    /// queue is full (in events or in bytes) or the brain is gone.
    pub fn send(&self, event: Event) -> bool {
        let bytes = event.heap_bytes();
        if !self.bytes.take(bytes) {
            self.drops.total.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.tx.try_send(event) {
            Ok(()) => {
                if let Some(wake) = self.wake.get() {
                    wake.notify();
                }
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.bytes.give(bytes);
                self.drops.total.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn drops(&self) -> &Drops {
        &self.drops
    }
}

/// The consumer side, owned by the brain.
#[derive(Debug)]
pub struct EventReceiver {
    rx: Receiver<Event>,
    bytes: Arc<ByteBudget>,
    drops: Arc<Drops>,
    wake: Arc<OnceLock<Wake>>,
}

impl EventReceiver {
    /// Up to `max` events: waits at most `timeout` for the first, then takes
    /// what is already queued. Empty on timeout (so the caller can notice a
    /// shutdown) and once every sender is gone and the queue is drained.
    pub fn recv_batch(&self, max: usize, timeout: Duration) -> Vec<Event> {
        if max == 0 {
            return Vec::new();
        }
        let first = match self.rx.recv_timeout(timeout) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return Vec::new(),
        };
        let mut batch = Vec::with_capacity(max.min(self.rx.len() + 1));
        batch.push(first);
        batch.extend(self.rx.try_iter().take(max - 1));
        self.taken(batch)
    }

    /// A batch off the queue: its bytes are the queue's no more.
    fn taken(&self, batch: Vec<Event>) -> Vec<Event> {
        self.bytes.give(batch.iter().map(Event::heap_bytes).sum());
        batch
    }

    /// Up to `max` events already queued, without waiting (and without the
    /// spinning a blocking receive does first): for a consumer that polls.
    pub fn try_batch(&self, max: usize) -> Vec<Event> {
        self.taken(self.rx.try_iter().take(max).collect())
    }

    /// The descriptor to watch for readability while parked (the read end of
    /// a socket pair, made at the first call; it lives as long as the queue).
    pub fn wake_fd(&self) -> io::Result<RawFd> {
        if self.wake.get().is_none() {
            let _ = self.wake.set(Wake::new()?); // one consumer: nobody else sets it
        }
        Ok(self.wake.get().map_or(-1, |wake| wake.reader.as_raw_fd()))
    }

    /// Before the consumer sleeps until `wake_fd` is readable: true when the
    /// queue is still empty (the next event wakes it); false when events came
    /// meanwhile (take them; do not sleep), or before any `wake_fd`.
    pub fn park(&self) -> bool {
        let Some(wake) = self.wake.get() else {
            return false;
        };
        wake.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.rx.is_empty() {
            return true;
        }
        wake.parked.store(false, Ordering::SeqCst);
        false
    }

    /// Read the wake-up bytes written so far (after `wake_fd` turned readable),
    /// so that it is readable again only at the next wake-up.
    pub fn clear_wake(&self) {
        if let Some(wake) = self.wake.get() {
            let mut buf = [0u8; 64];
            while matches!((&wake.reader).read(&mut buf), Ok(n) if n > 0) {}
        }
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// What the events waiting now carry ([`Event::heap_bytes`]), and what
    /// they may at most.
    pub fn bytes(&self) -> (usize, usize) {
        (self.bytes.held.load(Ordering::Acquire), self.bytes.max)
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub fn drops(&self) -> &Drops {
        &self.drops
    }
}

/// A queue holding at most `capacity` events (at least 1) and at most
/// [`DEFAULT_MAX_BYTES`] of what they carry.
pub fn event_queue(capacity: usize) -> (EventSender, EventReceiver) {
    bounded_event_queue(capacity, DEFAULT_MAX_BYTES)
}

/// A queue holding at most `capacity` events (at least 1) and at most
/// `max_bytes` of what they carry ([`Event::heap_bytes`]; an event that
/// finds the queue empty always has room).
pub fn bounded_event_queue(capacity: usize, max_bytes: usize) -> (EventSender, EventReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
    let bytes = Arc::new(ByteBudget {
        held: AtomicUsize::new(0),
        max: max_bytes,
    });
    let drops = Arc::new(Drops::default());
    let wake = Arc::new(OnceLock::new());
    (
        EventSender {
            tx,
            bytes: Arc::clone(&bytes),
            drops: Arc::clone(&drops),
            wake: Arc::clone(&wake),
        },
        EventReceiver {
            rx,
            bytes,
            drops,
            wake,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn attempt(i: usize) -> Event {
        attempt_with(i, None)
    }

    fn attempt_with(i: usize, trace: Option<Box<AttemptTrace>>) -> Event {
        Event::Attempt {
            key: format!("client-{i}").into(),
            route: Arc::from("default"),
            at: Instant::now(),
            addr: "127.0.0.1".into(),
            conn_id: i as u64,
            trace,
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_waiting() {
        let (tx, rx) = event_queue(4);
        let sent = (0..10).filter(|&i| tx.send(attempt(i))).count();
        assert_eq!(sent, 4);
        assert_eq!(tx.drops().total(), 6);
        assert_eq!(rx.drops().take_unreported(), 6);
        assert_eq!(rx.drops().take_unreported(), 0); // one report per burst
        let batch = rx.recv_batch(100, Duration::from_millis(10));
        let keys: Vec<_> = batch.iter().map(Event::key).collect();
        assert_eq!(
            keys,
            [
                Some("client-0"),
                Some("client-1"),
                Some("client-2"),
                Some("client-3")
            ]
        );
        assert!(tx.send(attempt(99)), "room again after the drain");
    }

    fn traced_attempt(i: usize, user_agent_bytes: usize) -> Event {
        attempt_with(
            i,
            Some(Box::new(AttemptTrace {
                context: SpanContext {
                    trace_id: 1,
                    span_id: 1,
                    flags: 1,
                    parent: None,
                },
                tracestate: None,
                path: "/ws".into(),
                authority: Some(b"example.test".as_slice().into()),
                user_agent: Some(vec![b'u'; user_agent_bytes].into()),
            })),
        )
    }

    #[test]
    fn the_bytes_events_carry_are_bounded_too() {
        let big = traced_attempt(0, 1000).heap_bytes();
        assert!(big > 1000 && big < 1200, "{big}");
        let (tx, rx) = bounded_event_queue(1000, 3 * big);
        let sent = (0..10)
            .filter(|&i| tx.send(traced_attempt(i, 1000)))
            .count();
        assert_eq!(sent, 3, "three fit in the bytes, far below the count");
        assert_eq!(tx.drops().total(), 7);
        assert_eq!(rx.bytes(), (3 * big, 3 * big));
        assert!(!tx.send(attempt(1)), "nor a small one past the bytes");
        assert_eq!(tx.drops().total(), 8);
        assert_eq!(rx.try_batch(2).len(), 2);
        assert!(
            tx.send(traced_attempt(20, 1000)),
            "room again after the drain"
        );
        let rest = rx.recv_batch(100, Duration::from_millis(10));
        assert!(!rest.is_empty());
        assert_eq!(rx.bytes().0, 0, "every taken event gave its bytes back");

        // An event larger than the whole bound passes when the queue is empty.
        let (tx, rx) = bounded_event_queue(10, 100);
        assert!(tx.send(traced_attempt(0, 5000)));
        assert!(!tx.send(attempt(1)), "nothing beside it");
        assert_eq!(rx.try_batch(10).len(), 1);
        assert!(tx.send(attempt(1)));
        assert_eq!(rx.bytes().0, attempt(1).heap_bytes());

        // The count still bounds small events first.
        let (tx, _rx) = bounded_event_queue(4, DEFAULT_MAX_BYTES);
        assert_eq!((0..10).filter(|&i| tx.send(attempt(i))).count(), 4);
    }

    #[test]
    fn batches_are_bounded_and_ordered() {
        let (tx, rx) = event_queue(100);
        for i in 0..25 {
            assert!(tx.send(attempt(i)));
        }
        let sizes: Vec<usize> = (0..4)
            .map(|_| rx.recv_batch(10, Duration::from_millis(10)).len())
            .collect();
        assert_eq!(sizes, [10, 10, 5, 0]);
        assert_eq!(rx.recv_batch(0, Duration::ZERO).len(), 0);
        for i in 0..3 {
            assert!(tx.send(attempt(i)));
        }
        assert_eq!(rx.try_batch(2).len(), 2);
        assert_eq!(rx.try_batch(2).len(), 1);
        assert!(rx.try_batch(2).is_empty());
    }

    #[test]
    fn recv_batch_times_out_empty_and_sees_the_senders_leave() {
        let (tx, rx) = event_queue(8);
        assert!(rx.recv_batch(8, Duration::from_millis(5)).is_empty());
        let producer = thread::spawn(move || {
            for i in 0..3 {
                assert!(tx.send(attempt(i)));
            }
        });
        producer.join().unwrap();
        let batch = rx.recv_batch(8, Duration::from_secs(5));
        assert_eq!(batch.len(), 3);
        // Every sender is gone and the queue is empty: no wait at all.
        assert!(rx.recv_batch(8, Duration::from_secs(60)).is_empty());
    }

    /// Takes the wake-up bytes written so far: whether there were any.
    fn woken(rx: &EventReceiver) -> bool {
        rx.wake_fd().unwrap();
        let mut buf = [0u8; 64];
        matches!((&rx.wake.get().unwrap().reader).read(&mut buf), Ok(n) if n > 0)
    }

    #[test]
    fn a_parked_consumer_is_woken_once_by_the_next_event() {
        let (tx, rx) = event_queue(8);
        assert!(!rx.park(), "no wake-up to wait for before wake_fd");
        rx.wake_fd().unwrap();
        assert!(rx.park());
        assert!(!woken(&rx));
        assert!(tx.send(attempt(1)));
        assert!(tx.send(attempt(2)));
        assert!(woken(&rx), "the first event after park wakes");
        assert!(!woken(&rx), "one wake-up per park");
        assert!(!rx.park(), "events are waiting: do not sleep");
        assert_eq!(rx.try_batch(8).len(), 2);
        assert!(rx.park());
        let producer = thread::spawn(move || assert!(tx.send(attempt(3))));
        producer.join().unwrap();
        rx.clear_wake();
        assert!(!woken(&rx), "clear_wake read it");
        assert_eq!(rx.try_batch(8).len(), 1);
        assert!(rx.park());
    }

    #[test]
    fn names_match_the_engine() {
        let reasons: Vec<_> = RefuseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "cooldown",
                "min_interval",
                "max_concurrent",
                "deny",
                "circuit_open"
            ]
        );
        let e = Event::Closed {
            key: "k".into(),
            route: Arc::from("r"),
            at: Instant::now(),
            conn_id: 1,
            code: 1000,
            reason: "".into(),
            initiator: Initiator::Upstream,
            duration: Duration::from_millis(3),
            traffic: Traffic::default(),
        };
        assert_eq!(
            (e.type_name(), e.key(), e.conn_id()),
            ("closed", Some("k"), Some(1))
        );
        let answered = Event::Answered {
            key: "k".into(),
            route: Arc::from("r"),
            at: Instant::now(),
            conn_id: 7,
        };
        assert_eq!(
            (answered.type_name(), answered.conn_id()),
            ("answered", Some(7))
        );
        let at = Instant::now();
        let line = Event::RequestRejected(Box::new(RequestRejected {
            reason: "bad_request",
            status: Some(400),
            peer: "127.0.0.1".into(),
            message: "malformed request".into(),
            suppressed: 0,
            at,
        }));
        assert_eq!(
            (line.type_name(), line.key(), line.conn_id(), line.at()),
            ("request_rejected", None, None, at)
        );
        let access = Event::HttpRequest(Box::new(HttpAccess {
            route: Arc::from("/api"),
            peer: "127.0.0.1".into(),
            method: "GET".into(),
            path: "/api/items".into(),
            status: Some(200),
            outcome: HttpOutcome::Forwarded,
            duration: Duration::from_millis(2),
            bytes_in: 0,
            bytes_out: 120,
            conn_id: 3,
            at,
        }));
        assert_eq!(
            (
                access.type_name(),
                access.key(),
                access.conn_id(),
                access.at()
            ),
            ("http_request", None, None, at)
        );
        assert_eq!(HttpOutcome::ClientGone.as_str(), "client_gone");
        assert_eq!(Initiator::Upstream.as_str(), "upstream");
        assert_eq!(HandshakeError::ClientClosed.as_str(), "client_closed");
    }

    #[test]
    fn one_line_per_slot_per_interval_with_the_count_left_out() {
        let limiter: LogLimiter<2> = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        assert_eq!(limiter.admit(0, at(0.0)), Some(0));
        for i in 0..5 {
            assert_eq!(limiter.admit(0, at(1.0 + f64::from(i))), None);
        }
        assert_eq!(limiter.admit(1, at(4.5)), Some(0), "slots are independent");
        assert_eq!(limiter.admit(0, at(9.9)), None);
        assert_eq!(limiter.admit(0, at(10.5)), Some(6));
        assert_eq!(limiter.admit(0, at(11.0)), None);
        // A granted line lost to a full queue: counted as left out, and the
        // next occurrence gets a line at once, carrying every one of them.
        assert_eq!(limiter.admit(1, at(20.0)), Some(0));
        limiter.undo(1, 0);
        assert_eq!(limiter.admit(1, at(20.1)), Some(1));
    }

    #[test]
    fn racing_threads_write_one_line_and_lose_no_count() {
        let limiter: Arc<LogLimiter<1>> = Arc::new(LogLimiter::new(Duration::from_secs(3600)));
        let now = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                thread::spawn(move || {
                    (0..1000)
                        .filter_map(|_| limiter.admit(0, now))
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let lines: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(lines, [0], "one line in the interval");
        assert_eq!(
            limiter.admit(0, now + Duration::from_secs(3600)),
            Some(3999),
            "every other one counted"
        );
    }
}
