//! The splice: after a 101, bytes flow both ways untouched, each direction
//! watched by the core's frame watcher.
//!
//! One task per connection runs both legs as a single state machine over the
//! sockets' readiness, so every decision (who closed first, the proxy's own
//! closes, a vanished side) is made in one place. Backpressure: a leg is read only
//! while the bytes it sent last are written out to the other, so at most
//! one read (`READ_SIZE`) per direction is waiting and nothing buffers
//! without bound. Reads go through a per-thread buffer and are written on at
//! once; only what a socket does not take is kept, so idle connections hold
//! no buffer.
//!
//! Generic over each leg's stream ([`Transport`]: TCP or TLS), polled in
//! place with the task's waker: a plain leg costs what tokio's `TcpStream`
//! costs (its `poll_read` / `poll_write` are the readiness checks and the
//! syscall), and a TLS leg is the same code over rustls. What TLS adds is
//! handled as any write: bytes a TLS stream took but has not written out yet
//! count as output (`unflushed`) until its flush is done, and a closing TLS
//! leg is shut down (close_notify) before it is dropped.
//!
//! loopwatch writes a frame of its own only when it ends a connection itself
//! (`close`), and only at a frame boundary of the stream it writes into.
//!
//! A protocol error is the receiving peer's to answer, as it would be without
//! loopwatch in between (and as nginx and HAProxy, which do not parse frames,
//! leave it): from the offending frame on, that direction is passed through
//! unparsed (`Direction::Passing`), so the peer reads exactly what it would
//! read directly and fails the connection itself, after whatever it sent
//! before (Autobahn cases 3.4, 4.1.5 and 4.2.5 with octet-wise writes: the
//! echo of a valid message, then 1002). Bounded: at most `PASS_BUDGET` bytes
//! (never more than the message size limit) and `ANSWER_GRACE`; a peer that
//! has not sent its close frame by then gets loopwatch's close instead
//! (`close`). A message over the size limit is loopwatch's own refusal: it
//! never passes (1009).

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::time::{sleep_until, Instant};

use loopwatch_dataplane_core::events::{Event, EventSender, Initiator, Traffic};
use loopwatch_dataplane_core::frames::{
    build_close_frame, FrameError, FrameWatcher, Side, WatcherConfig,
};

use crate::transport::{with_scratch, Transport};

use crate::control::{CloseCommand, LiveTraffic, RelayControl};

/// Bytes read from a leg at a time.
const READ_SIZE: usize = 32 * 1024;

/// How long a proxy-initiated close waits for a frame boundary and for the
/// peers' replies.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The idle timeout is watched in this many slices of it: a connection is
/// closed after that many quiet slices in a row, so between the timeout and a
/// slice more after its last traffic (one check per slice: a timer re-armed
/// at every message would cost every message; checked once per timeout, a
/// connection could stay up to twice the timeout).
const IDLE_SLICES: u8 = 4;
/// The unsent bytes the kernel may hold for a leg beyond what its peer's
/// window lets out (TCP_NOTSENT_LOWAT). Its writability then follows the
/// peer's reading: a slow but steady reader lets output move every window
/// update (by default a third of a 2 MB send buffer had to drain first, 45 s
/// at 16 KiB/s, and the idle timeout cut the reader, output and reads still),
/// and a stalled one holds this much unsent kernel memory, not megabytes.
const NOTSENT_LOWAT: u32 = 128 * 1024;
/// Bytes a direction passes unparsed after a protocol error, from the
/// offending frame's first byte (capped by the message size limit): enough
/// for a peer to read the bad frame and fail the connection.
pub const PASS_BUDGET: u64 = 64 * 1024;
/// How long the peer of a protocol error has to fail the connection itself
/// (send its close frame) before loopwatch closes it.
pub const ANSWER_GRACE: Duration = CLOSE_GRACE;
/// Codes loopwatch sends when one leg disappears without a close frame.
const CODE_UPSTREAM_LOST: u16 = 1014;
const CODE_CLIENT_LOST: u16 = 1001;

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

fn other(i: usize) -> usize {
    1 - i
}

fn initiator(i: usize) -> Initiator {
    if i == CLIENT {
        Initiator::Client
    } else {
        Initiator::Upstream
    }
}

/// What happens to a leg once the bytes queued for it are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFlush {
    Nothing,
    /// Shut its writing half (a FIN); keep reading.
    WriteEof,
    /// Its writing half is shut.
    EofSent,
    /// Close it, once what is queued for it is written (TLS: close_notify
    /// first).
    Close,
}

/// What becomes of the bytes read from a leg: the state of one direction of
/// the splice. Its transitions (`Leg::go`, checked against `Direction::may_go`):
///
/// | from | to | when |
/// |---|---|---|
/// | Forwarding | Passing | the leg broke the protocol on an open connection (`violation`) |
/// | Forwarding | Finishing | the proxy closes (`close`): its close frame waits for the frame in flight from this leg, if any |
/// | Forwarding, Passing, Finishing | Stopped | the proxy's close frame went (or could not), the other leg is gone (`lost`), or a refusal ends the stream (`violation`) |
#[derive(Debug, PartialEq, Eq)]
enum Direction {
    /// Watched by the frame watcher and written on to the other leg.
    Forwarding,
    /// Passed on unparsed after a protocol error: the watcher stopped at the
    /// offending frame, the bytes go on as they come, `left` more at most.
    Passing { left: u64 },
    /// The proxy's close frame for the other leg, waiting for the frame in
    /// flight from this leg to end: forwarded up to that end, then the frame.
    Finishing { close_frame: Box<[u8]> },
    /// Ended by the proxy's close or the other leg's end: what comes is only
    /// watched, for this side's close reply, and dropped.
    Stopped,
}

impl Direction {
    /// The transition table: the moves `Leg::go` may make.
    fn may_go(&self, to: &Direction) -> bool {
        use Direction::*;
        matches!(
            (self, to),
            (Forwarding, Passing { .. } | Finishing { .. })
                | (Forwarding | Passing { .. } | Finishing { .. }, Stopped)
        )
    }

    /// Bytes read this way go on to the other leg (so they wait for its
    /// output: backpressure).
    fn forwards(&self) -> bool {
        !matches!(self, Direction::Stopped)
    }

    fn is_finishing(&self) -> bool {
        matches!(self, Direction::Finishing { .. })
    }
}

/// Where the connection as a whole stands. Its transitions (`Relay::enter`,
/// checked against `Phase::may_enter`):
///
/// | from | to | when |
/// |---|---|---|
/// | Open, Answering | Answering | a leg's protocol error passed on (`violation`; a second one moves the deadline) |
/// | Answering | Open | the answer's deadline (`answer_timeout`; loopwatch closes at once if nobody answered) |
/// | Open, Answering | Closing | loopwatch closes (`close`), or a side vanished between two frames (`lost`) |
/// | Open, Answering, Closing | Done | both legs are gone (`lost`) |
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// The peers talk; only the idle timeout watches.
    Open,
    /// A protocol error was passed on: by `until` the peer has sent its close
    /// frame, or loopwatch closes.
    Answering { until: Instant },
    /// loopwatch ends the connection: both legs end by `until`, answered or
    /// reset.
    Closing { until: Instant },
    /// Both legs are gone.
    Done,
}

impl Phase {
    /// The transition table: the moves `Relay::enter` may make.
    fn may_enter(&self, to: &Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (Open | Answering { .. }, Answering { .. } | Closing { .. })
                | (Answering { .. }, Open)
                | (Open | Answering { .. } | Closing { .. }, Done)
        )
    }
}

/// One side of the splice: reads from its stream (in `Streams`), whose
/// bytes go to the other leg's `out`.
struct Leg {
    /// Watches the bytes read from this leg.
    watcher: FrameWatcher,
    /// Bytes waiting to be written to this leg, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// The stream took bytes that its flush has not written out yet (TLS
    /// records rustls holds; never for TCP once its flush ran).
    unflushed: bool,
    after_flush: AfterFlush,
    /// What becomes of the bytes read from this leg.
    direction: Direction,
    /// This leg broke the protocol while the connection was open: its bytes
    /// were passed on for the other side to answer (`Direction::Passing`,
    /// until the proxy closes or the other side is gone), and its error is
    /// the code of loopwatch's close if that side does not answer.
    broke: bool,
    /// This leg shut its writing half after its close frame, and the other
    /// leg got the EOF.
    eof: bool,
    /// This leg sent its EOF: nothing more to read.
    read_done: bool,
    /// The connection is gone (closed or aborted) and `lost` ran for it.
    closed: bool,
    /// Bytes were written to this leg in the idle timeout's current slice
    /// (`check_idle`: output that does not move is no traffic).
    wrote: bool,
}

impl Leg {
    fn new(side: Side, limits: &RelayLimits) -> Leg {
        Leg {
            watcher: FrameWatcher::new(WatcherConfig {
                side,
                max_message_size: limits.max_message_size,
                allowed_rsv: limits.allowed_rsv,
            }),
            out: Vec::new(),
            out_pos: 0,
            unflushed: false,
            after_flush: AfterFlush::Nothing,
            direction: Direction::Forwarding,
            broke: false,
            eof: false,
            read_done: false,
            closed: false,
            wrote: false,
        }
    }

    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Bytes for this leg are not all written out: queued, or held by its
    /// stream until a flush.
    fn pending_output(&self) -> bool {
        self.has_output() || self.unflushed
    }

    /// Something is left to write: output, or the shutdown that follows it.
    fn needs_flush(&self) -> bool {
        self.pending_output()
            || matches!(self.after_flush, AfterFlush::WriteEof | AfterFlush::Close)
    }

    /// Move this leg's direction to `to` (one of the table's transitions);
    /// gives the state it left.
    fn go(&mut self, to: Direction) -> Direction {
        debug_assert!(
            self.direction.may_go(&to),
            "no transition {:?} -> {:?}",
            self.direction,
            to
        );
        std::mem::replace(&mut self.direction, to)
    }

    /// Stop this leg's direction (if it is not stopped yet); gives the state
    /// it left.
    fn stop(&mut self) -> Direction {
        if self.direction == Direction::Stopped {
            return Direction::Stopped;
        }
        self.go(Direction::Stopped)
    }
}

/// The legs whose connection ended, last first: each ends once, so at most
/// both (a `Vec` here cost 22 bytes more in every relay).
#[derive(Default)]
struct EndedLegs {
    legs: [u8; 2],
    len: u8,
}

impl EndedLegs {
    fn push(&mut self, i: usize) {
        let n = usize::from(self.len);
        debug_assert!(n < 2, "a leg ends once");
        if n < 2 {
            self.legs[n] = i as u8;
            self.len += 1;
        }
    }

    fn pop(&mut self) -> Option<usize> {
        self.len = self.len.checked_sub(1)?;
        Some(usize::from(self.legs[usize::from(self.len)]))
    }
}

/// Both legs' streams, of their own types; `get` lends either as a
/// `dyn Transport`, so that one code path serves every combination.
struct Streams<C, U> {
    client: Option<C>,
    upstream: Option<U>,
}

impl<C: Transport, U: Transport> Streams<C, U> {
    fn get(&mut self, i: usize) -> Option<&mut dyn Transport> {
        if i == CLIENT {
            self.client.as_mut().map(|s| s as &mut dyn Transport)
        } else {
            self.upstream.as_mut().map(|s| s as &mut dyn Transport)
        }
    }

    fn peek(&self, i: usize) -> Option<&dyn Transport> {
        if i == CLIENT {
            self.client.as_ref().map(|s| s as &dyn Transport)
        } else {
            self.upstream.as_ref().map(|s| s as &dyn Transport)
        }
    }

    fn is_open(&self, i: usize) -> bool {
        if i == CLIENT {
            self.client.is_some()
        } else {
            self.upstream.is_some()
        }
    }

    /// Drop leg `i`'s stream (closing its connection).
    fn drop_stream(&mut self, i: usize) {
        if i == CLIENT {
            self.client = None;
        } else {
            self.upstream = None;
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    pub max_message_size: Option<u64>,
    pub allowed_rsv: u8,
    pub idle_timeout: Option<Duration>,
}

/// Who the connection is, for its Closed event.
pub struct RelayIdentity {
    pub conn_id: u64,
    pub key: Arc<str>,
    pub route: Arc<str>,
    pub opened_at: std::time::Instant,
}

/// How a relayed connection ended (`Relay.close_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
    pub initiator: Initiator,
    /// The first side that broke the protocol, if one did.
    pub broken_by: Option<Side>,
}

pub struct Relay<C: Transport, U: Transport> {
    legs: [Leg; 2],
    streams: Streams<C, U>,
    /// The task's waker, for the reads and writes made while handling an
    /// event (set at every poll of `run`).
    waker: Waker,
    id: RelayIdentity,
    events: EventSender,
    /// Whose close came first: client, upstream or proxy.
    initiator: Option<Initiator>,
    /// The proxy's own close (code, reason), boxed: rare, and 24 bytes less
    /// in every idle connection.
    proxy_close: Option<Box<(u16, String)>>,
    phase: Phase,
    /// Bytes a direction may pass unparsed after a protocol error.
    pass_budget: u64,
    /// Legs whose connection ended, for `lost` (run at the poll loop's next
    /// turn, not inside the flush or abort that ended them).
    ended: EndedLegs,
    reported: bool,
    idle_timeout: Option<Duration>,
    activity: u64,
    /// The start of the idle timeout's current slice.
    idle_since: Instant,
    /// Slices in a row without traffic (`check_idle`).
    quiet: u8,
    /// Slices in a row in which output waiting for a leg did not move.
    stalled: u8,
    /// The first side that broke the protocol (a frame it had to pass on
    /// unparsed), for the listener's count of them by side.
    broken_by: Option<Side>,
    /// The counts so far, for the brain's `live()`.
    live: Arc<LiveTraffic>,
    /// The brain's close (`Listener.close`), until it came.
    commands: Option<tokio::sync::oneshot::Receiver<CloseCommand>>,
}

/// A fresh masking key for a close frame toward the upstream.
fn mask_key() -> [u8; 4] {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x6c6f6f70);
    (hasher.finish() as u32).to_be_bytes()
}

impl<C: Transport, U: Transport> Relay<C, U> {
    pub fn new(
        client: C,
        upstream: U,
        limits: RelayLimits,
        id: RelayIdentity,
        events: EventSender,
        control: RelayControl,
    ) -> Relay<C, U> {
        Relay {
            legs: [
                Leg::new(Side::Client, &limits),
                Leg::new(Side::Upstream, &limits),
            ],
            streams: Streams {
                client: Some(client),
                upstream: Some(upstream),
            },
            waker: Waker::noop().clone(),
            id,
            events,
            initiator: None,
            proxy_close: None,
            broken_by: None,
            phase: Phase::Open,
            pass_budget: limits
                .max_message_size
                .map_or(PASS_BUDGET, |limit| limit.min(PASS_BUDGET)),
            ended: EndedLegs::default(),
            reported: false,
            idle_timeout: limits.idle_timeout,
            activity: 0,
            idle_since: Instant::now(),
            quiet: 0,
            stalled: 0,
            live: control.traffic,
            commands: Some(control.commands),
        }
    }

    /// Begin the splice (`Relay.start`): `to_client` is written to the client
    /// first (the 101's head), then what each side sent before the splice
    /// began is handled as if just read. Only what is still unwritten is
    /// kept (in the legs' `out`), so the handshake's buffers can be dropped
    /// before `run`: they would otherwise live as long as the connection.
    pub fn start(
        &mut self,
        to_client: &[u8],
        upstream_early: &[u8],
        client_early: &[u8],
        client_eof: bool,
    ) {
        for i in [CLIENT, UPSTREAM] {
            if let Some(stream) = self.streams.peek(i) {
                // Best effort: a kernel without it keeps its default.
                let _ = socket2::SockRef::from(stream.tcp()).set_tcp_notsent_lowat(NOTSENT_LOWAT);
            }
        }
        self.write(CLIENT, to_client);
        self.flush(CLIENT);
        if !upstream_early.is_empty() {
            self.data(UPSTREAM, upstream_early);
        }
        if !client_early.is_empty() && !self.legs[UPSTREAM].closed {
            self.data(CLIENT, client_early);
        }
        if client_eof && self.streams.is_open(CLIENT) {
            self.eof(CLIENT);
        }
        self.publish(CLIENT);
        self.publish(UPSTREAM);
    }

    /// Splice until both legs are gone (after `start`), then give how it
    /// ended to `then` (the connection's last step). A plain fn returning an
    /// `async move` block rather than an `async fn`: an async fn's future
    /// keeps its arguments twice (as given, and moved into its body), and the
    /// relay is most of an idle connection's task (`listener::size_tests`:
    /// 2336 bytes as an async fn, 1456 so with two timers, 912 now).
    #[allow(clippy::manual_async_fn)]
    pub fn run<T: FnOnce(CloseInfo)>(mut self, then: T) -> impl std::future::Future<Output = ()> {
        async move {
            // One timer for the connection's life, armed at the earliest of
            // its deadlines and re-armed only when that moves (a timer made
            // per loop turn costs a registration; a second one, 112 bytes
            // more in every idle connection's task). The drain's 1001 comes
            // as a close command (`Relays::close_all`), as the brain's.
            // Unarmed, the timer waits a year (a deadline far enough never to come).
            let far = || Instant::now() + Duration::from_secs(86_400 * 365);
            let timer = sleep_until(far());
            tokio::pin!(timer);
            let mut armed = false;
            // One hand-written poll per wake-up, not a select! of fresh futures:
            // the sockets' readiness is polled in place (its wakers registered
            // only where it is pending), and every ready leg is served in turn.
            std::future::poll_fn(|cx| loop {
                if !self.waker.will_wake(cx.waker()) {
                    self.waker = cx.waker().clone();
                }
                while let Some(i) = self.ended.pop() {
                    self.lost(i);
                }
                // The phase's deadline (the proxy's close grace, or a peer's
                // answer to a protocol error passed on); the idle timeout,
                // until the proxy closes.
                let idle = || {
                    self.idle_timeout
                        .map(|t| self.idle_since + t / u32::from(IDLE_SLICES))
                };
                let (deadline, idle_at) = match self.phase {
                    Phase::Done => return Poll::Ready(()),
                    Phase::Closing { until } => (Some(until), None),
                    Phase::Answering { until } => (Some(until), idle()),
                    Phase::Open => (None, idle()),
                };
                let due = match (deadline, idle_at) {
                    (Some(d), Some(i)) => Some(d.min(i)),
                    (d, i) => d.or(i),
                };
                match due {
                    Some(due) if !armed || timer.deadline() != due => {
                        timer.as_mut().reset(due);
                        armed = true;
                    }
                    None if armed => {
                        timer.as_mut().reset(far());
                        armed = false;
                    }
                    _ => {}
                }
                if let Some(commands) = self.commands.as_mut() {
                    if let Poll::Ready(command) = std::pin::Pin::new(commands).poll(cx) {
                        self.commands = None;
                        if let Ok(CloseCommand {
                            code,
                            reason,
                            grace,
                        }) = command
                        {
                            self.close_within(code, &reason, grace);
                        }
                        continue;
                    }
                }
                if due.is_some() && timer.as_mut().poll(cx).is_ready() {
                    // The earliest deadline came: the grace's (or the
                    // answer's) when it is the earlier, else the idle one's.
                    if deadline.is_some() && deadline == due {
                        if self.closing() {
                            self.abort_all();
                        } else {
                            self.answer_timeout();
                        }
                    } else {
                        self.check_idle();
                    }
                    continue;
                }
                // Each stream is polled where there is work for it; what is
                // pending registers the waker.
                let mut progress = false;
                for i in [CLIENT, UPSTREAM] {
                    if self.legs[i].needs_flush() && self.streams.is_open(i) {
                        progress |= self.flush(i);
                    }
                }
                for i in [CLIENT, UPSTREAM] {
                    if self.can_read(i) {
                        progress |= self.read(i);
                    }
                }
                if !progress {
                    return Poll::Pending;
                }
            })
            .await;
            then(self.report());
        }
    }

    /// Move the connection to phase `to` (one of the table's transitions).
    fn enter(&mut self, to: Phase) {
        debug_assert!(
            self.phase.may_enter(&to),
            "no transition {:?} -> {:?}",
            self.phase,
            to
        );
        self.phase = to;
    }

    /// loopwatch is ending the connection (its grace runs).
    fn closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    fn can_read(&self, i: usize) -> bool {
        let leg = &self.legs[i];
        if !self.streams.is_open(i) || leg.read_done || leg.after_flush == AfterFlush::Close {
            return false;
        }
        // Backpressure: a forwarding leg waits until its last bytes are out.
        !leg.direction.forwards() || !self.legs[other(i)].pending_output()
    }

    /// Takes writes: open, not closing, its writing half not shut.
    fn writable(&self, i: usize) -> bool {
        self.streams.is_open(i) && self.legs[i].after_flush == AfterFlush::Nothing
    }

    // --- reading -------------------------------------------------------------

    /// One read from leg `i`; whether it got anything (data, EOF, error).
    fn read(&mut self, i: usize) -> bool {
        // Read into this thread's scratch buffer (no await until it is let go,
        // so the task cannot move meanwhile); `write` sends from it straight
        // away and keeps only what the socket did not take. No allocation per
        // read, and an idle connection holds no buffer. (tokio's TcpStream
        // clears its readiness after a read that did not fill the buffer, so
        // the next turn waits for epoll rather than trying a read that can
        // only say EAGAIN.)
        let got = with_scratch(READ_SIZE, |scratch| {
            let mut cx = Context::from_waker(&self.waker);
            let Some(stream) = self.streams.get(i) else {
                return false;
            };
            let mut buf = ReadBuf::new(scratch);
            let polled = Pin::new(stream).poll_read(&mut cx, &mut buf);
            let n = buf.filled().len();
            match polled {
                Poll::Pending => return false,
                Poll::Ready(Ok(())) if n == 0 => self.eof(i),
                Poll::Ready(Ok(())) => self.data(i, &scratch[..n]),
                // A TLS peer that closed its TCP connection without
                // close_notify: an EOF, as for TCP (the frame watcher tells
                // a cut frame from a clean end).
                Poll::Ready(Err(e)) if e.kind() == ErrorKind::UnexpectedEof => self.eof(i),
                Poll::Ready(Err(_)) => self.abort(i),
            }
            true
        });
        if got {
            self.publish(i);
        }
        got
    }

    /// Leg `i`'s counts so far, for `live()` (two relaxed stores).
    fn publish(&self, i: usize) {
        let watcher = &self.legs[i].watcher;
        if i == CLIENT {
            self.live.set_in(watcher.messages, watcher.message_bytes);
        } else {
            self.live.set_out(watcher.messages, watcher.message_bytes);
        }
    }

    /// Bytes read from leg `i` (`Leg.data_received`).
    fn data(&mut self, i: usize, data: &[u8]) {
        let o = other(i);
        let leg = &mut self.legs[i];
        match leg.direction {
            Direction::Forwarding => match leg.watcher.feed(data) {
                Ok(_) => {
                    self.write(o, data);
                    self.note_close_seen(i);
                }
                Err(v) => {
                    self.write(o, &data[..v.forward]);
                    self.violation(i, &data[v.forward..]);
                }
            },
            Direction::Passing { .. } => self.pass_on(i, data),
            Direction::Finishing { .. } => self.finish_frame(i, data),
            Direction::Stopped => self.discard(i, data),
        }
    }

    fn note_close_seen(&mut self, i: usize) {
        if self.initiator.is_none() && self.legs[i].watcher.close().is_some() {
            self.initiator = Some(initiator(i));
        }
    }

    /// Leg `i` sent its EOF (`Relay.half_close`).
    fn eof(&mut self, i: usize) {
        self.legs[i].read_done = true;
        if self.half_close(i) {
            return;
        }
        let o = other(i);
        if self.legs[i].pending_output() && !self.closing() && self.can_tell_lost(i) {
            // Gone without a close frame while bytes wait for it: the other
            // side is told now, not once they are written, which a side that
            // reads nothing never lets happen (its upstream waited for the
            // idle timeout, an hour by default; nginx and HAProxy end it at
            // the FIN). The bytes get the close's grace.
            self.initiator.get_or_insert(initiator(i));
            self.legs[o].stop();
            self.tell_lost(i);
        }
        self.close_leg(i);
    }

    /// Whether leg `i` stays open after its EOF: it sent its close frame (or
    /// its stream is passed unparsed: then it may have) and the EOF could be
    /// passed on.
    fn half_close(&mut self, i: usize) -> bool {
        let leg = &self.legs[i];
        if self.closing() || (leg.watcher.close().is_none() && !leg.broke) {
            // Closing: that side is done. No close frame: the side is gone.
            return false;
        }
        let o = other(i);
        let half_closes = self.streams.peek(o).is_some_and(|s| s.can_write_eof());
        let handshake_done =
            leg.watcher.close().is_some() && self.legs[o].watcher.close().is_some();
        if self.legs[o].closed || self.legs[o].eof || !half_closes || handshake_done {
            // Both halves are shut; or the other stream cannot shut one (TLS);
            // or both close frames went by, so nothing may follow (RFC 6455
            // §5.5.1) and a TCP end closes the connection (§7.1.1; nginx and
            // HAProxy close both): a peer that keeps its socket open would
            // otherwise hold both, and its address's share, until the idle
            // timeout.
            self.close_leg(o);
            return false;
        }
        if self.legs[i].watcher.close().is_none() {
            // A stream passed unparsed ends with no close frame: this side
            // ended the connection, whoever drops it next (the access line
            // named the client after an upstream's broken frames and FIN).
            self.initiator.get_or_insert(initiator(i));
        }
        self.legs[i].eof = true;
        self.write_eof(o);
        true
    }

    // --- writing -------------------------------------------------------------

    /// Write bytes to leg `i`: at once as far as the socket takes them, the
    /// rest queued (dropped when the leg takes no more writes).
    fn write(&mut self, i: usize, mut data: &[u8]) {
        if data.is_empty() || !self.writable(i) {
            return;
        }
        if !self.legs[i].has_output() {
            let mut cx = Context::from_waker(&self.waker);
            let stream = self.streams.get(i).expect("writable legs are open");
            while !data.is_empty() {
                match Pin::new(&mut *stream).poll_write(&mut cx, data) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        data = &data[n..];
                        self.legs[i].wrote = true;
                    }
                    Poll::Pending => break,
                    Poll::Ready(_) => {
                        self.abort(i);
                        return;
                    }
                }
            }
            let leg = &mut self.legs[i];
            leg.unflushed = true;
            leg.out.clear();
            leg.out_pos = 0;
        }
        self.legs[i].out.extend_from_slice(data);
        self.flush(i);
    }

    /// Write what leg `i` has queued, flush its stream, then shut it down or
    /// close it if that is what comes next, as far as it goes now. Whether
    /// anything moved.
    fn flush(&mut self, i: usize) -> bool {
        let mut cx = Context::from_waker(&self.waker);
        let leg = &mut self.legs[i];
        let Some(stream) = self.streams.get(i) else {
            return false;
        };
        let mut moved = false;
        while leg.has_output() {
            match Pin::new(&mut *stream).poll_write(&mut cx, &leg.out[leg.out_pos..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    leg.out_pos += n;
                    leg.unflushed = true;
                    leg.wrote = true;
                    moved = true;
                }
                Poll::Pending => return moved,
                Poll::Ready(_) => {
                    self.abort(i);
                    return true;
                }
            }
        }
        if !leg.out.is_empty() {
            leg.out = Vec::new();
            leg.out_pos = 0;
        }
        if leg.unflushed {
            match Pin::new(&mut *stream).poll_flush(&mut cx) {
                Poll::Ready(Ok(())) => leg.unflushed = false,
                Poll::Pending => return moved,
                Poll::Ready(Err(_)) => {
                    self.abort(i);
                    return true;
                }
            }
            moved = true;
        }
        match leg.after_flush {
            AfterFlush::Nothing | AfterFlush::EofSent => moved,
            AfterFlush::WriteEof => match Pin::new(&mut *stream).poll_shutdown(&mut cx) {
                Poll::Pending => moved,
                Poll::Ready(_) => {
                    leg.after_flush = AfterFlush::EofSent;
                    true
                }
            },
            AfterFlush::Close => {
                if stream.shuts_down_on_close()
                    && Pin::new(&mut *stream).poll_shutdown(&mut cx).is_pending()
                {
                    return moved;
                }
                self.streams.drop_stream(i);
                self.ended.push(i);
                true
            }
        }
    }

    /// Shut leg `i`'s writing half once its queued bytes are out; a stream
    /// that cannot shut one half (TLS) closes.
    fn write_eof(&mut self, i: usize) {
        if !self.writable(i) {
            return;
        }
        if self.streams.peek(i).is_some_and(|s| s.can_write_eof()) {
            self.legs[i].after_flush = AfterFlush::WriteEof;
            self.flush(i);
        } else {
            self.close_leg(i);
        }
    }

    /// Close leg `i` once its queued bytes are out.
    fn close_leg(&mut self, i: usize) {
        if self.streams.is_open(i) && self.legs[i].after_flush != AfterFlush::Close {
            self.legs[i].after_flush = AfterFlush::Close;
            self.flush(i);
        }
    }

    /// Drop leg `i` at once (a reset).
    fn abort(&mut self, i: usize) {
        if let Some(stream) = self.streams.peek(i) {
            let _ = stream.tcp().set_zero_linger();
            self.streams.drop_stream(i);
            let leg = &mut self.legs[i];
            leg.out = Vec::new();
            leg.out_pos = 0;
            leg.unflushed = false;
            self.ended.push(i);
        }
    }

    /// The grace is over: both legs reset. (The phase stays `Closing`: their
    /// ends are handled at the poll loop's next turn, which reaches `Done`.)
    fn abort_all(&mut self) {
        self.abort(CLIENT);
        self.abort(UPSTREAM);
    }

    // --- a protocol error, passed on ----------------------------------------------

    /// Bytes of leg `i`, which broke the protocol: on to the other side
    /// unparsed, within the budget; past it, loopwatch closes.
    fn pass_on(&mut self, i: usize, data: &[u8]) {
        let Direction::Passing { left } = &mut self.legs[i].direction else {
            return;
        };
        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
        *left -= n as u64;
        self.write(other(i), &data[..n]);
        if n < data.len() {
            self.close_for_violation();
        }
    }

    /// `ANSWER_GRACE` after a protocol error was passed on: if the peer has
    /// not sent its close frame (it tolerates the error, or does not answer),
    /// loopwatch closes. If it has, the close handshake is the peers' own.
    fn answer_timeout(&mut self) {
        self.enter(Phase::Open);
        let answered = [CLIENT, UPSTREAM]
            .into_iter()
            .all(|i| !self.legs[i].broke || self.legs[other(i)].watcher.close().is_some());
        if !answered {
            self.close_for_violation();
        }
    }

    /// Close with the code and reason of the protocol error passed on.
    fn close_for_violation(&mut self) {
        let error = [CLIENT, UPSTREAM]
            .into_iter()
            .filter(|&i| self.legs[i].broke)
            .find_map(|i| self.legs[i].watcher.error().cloned());
        if let Some(error) = error {
            self.close(error.close_code(), &format!("loopwatch: {error}"));
        }
    }

    // --- the proxy's own close -------------------------------------------------

    /// End the connection from the proxy: a close frame into each direction
    /// at a frame boundary, then each leg closes once it answered, or at the
    /// grace deadline (`Relay.close`).
    pub fn close(&mut self, code: u16, reason: &str) {
        self.close_within(code, reason, CLOSE_GRACE);
    }

    /// `close`, the peers given `grace` to answer (and a frame in flight
    /// to end) before their connections are cut.
    fn close_within(&mut self, code: u16, reason: &str, grace: Duration) {
        if matches!(self.phase, Phase::Closing { .. } | Phase::Done) {
            return;
        }
        self.enter(Phase::Closing {
            until: Instant::now() + grace,
        });
        self.initiator.get_or_insert(Initiator::Proxy);
        self.proxy_close = Some(Box::new((code, reason.to_owned())));
        let mut skipped = false;
        for i in [CLIENT, UPSTREAM] {
            let o = other(i);
            if self.legs[o].closed || self.legs[i].eof || !self.legs[i].direction.forwards() {
                self.legs[i].stop();
                continue;
            }
            if matches!(self.legs[i].direction, Direction::Passing { .. }) {
                // An unparsed stream cannot take a close frame of loopwatch's:
                // the other side's connection ends after what was passed. If
                // that side is mid-frame toward this one, a FIN only: its
                // frame ends before loopwatch's close frame follows it.
                self.legs[i].stop();
                self.legs[i].broke = false;
                if self.legs[o].direction.forwards() && !self.legs[o].watcher.at_boundary() {
                    self.write_eof(o);
                } else {
                    self.close_leg(o);
                }
                continue;
            }
            if self.legs[i].watcher.close().is_some() {
                // This direction already carried its side's close frame: a
                // second one is a protocol error to the peer (Chromium fails
                // the connection: 1006). That close handshake ends the leg.
                skipped = true;
                continue;
            }
            // Frames toward the upstream are masked: loopwatch is its client.
            let mask = (i == CLIENT).then(mask_key);
            let frame = build_close_frame(code, reason, mask).unwrap_or_else(|_| {
                build_close_frame(1011, reason, mask).expect("1011 is sendable")
            });
            self.legs[i].go(Direction::Finishing {
                close_frame: frame.into_boxed_slice(),
            });
            if self.legs[i].watcher.at_boundary() {
                self.flush_pending(i);
            }
            // else: the direction is mid-frame; finish_frame flushes at its end.
        }
        if skipped {
            // No frame of loopwatch's to wait for there: the legs whose close
            // handshake is done end now (flush_pending does it for the others).
            self.settle(CLIENT);
            self.settle(UPSTREAM);
        }
    }

    /// The frame in flight from leg `i` ended: the proxy's close frame for
    /// the other leg goes, and this direction stops.
    fn flush_pending(&mut self, i: usize) {
        if let Direction::Finishing { close_frame } = self.legs[i].stop() {
            self.write(other(i), &close_frame);
        }
        self.settle(other(i));
    }

    /// A close frame of the proxy's waits for the frame in flight: forward up
    /// to that frame's end, write the close frame, and only watch what follows.
    fn finish_frame(&mut self, i: usize, data: &[u8]) {
        let o = other(i);
        let mut pos = 0;
        while pos < data.len() && !self.legs[i].watcher.at_boundary() {
            // The rest of the payload at once; an incomplete header byte by byte.
            let remaining = self.legs[i].watcher.frame_remaining();
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .max(1)
                .min(data.len() - pos);
            let piece = &data[pos..pos + take];
            match self.legs[i].watcher.feed(piece) {
                Ok(_) => self.write(o, piece),
                Err(v) => {
                    self.write(o, &piece[..v.forward]);
                    self.violation(i, &[]);
                    return;
                }
            }
            pos += take;
        }
        self.note_close_seen(i);
        if self.legs[i].watcher.at_boundary() {
            self.flush_pending(i);
            if pos < data.len() {
                self.discard(i, &data[pos..]);
            }
        }
    }

    /// Leg `i` sent a frame loopwatch must not forward as it is: what came
    /// before it is out, `rest` starts with it. A protocol error on an open
    /// connection is passed on (`rest` and what follows, unparsed) for the
    /// other side to answer; a message over the size limit, or any error
    /// while loopwatch is closing, closes both sides with the error's code.
    fn violation(&mut self, i: usize, rest: &[u8]) {
        let error = self.legs[i]
            .watcher
            .error()
            .cloned()
            .expect("a violation sets the watcher's error");
        let refused = matches!(error, FrameError::MessageTooBig { .. });
        if !refused {
            self.broken_by.get_or_insert(if i == CLIENT {
                Side::Client
            } else {
                Side::Upstream
            });
        }
        if !self.closing() && !refused {
            self.legs[i].go(Direction::Passing {
                left: self.pass_budget,
            });
            self.legs[i].broke = true;
            self.enter(Phase::Answering {
                until: Instant::now() + ANSWER_GRACE,
            });
            self.pass_on(i, rest);
            return;
        }
        if !self.legs[i].watcher.at_boundary() {
            // The offending frame's first bytes are out: a close frame now
            // would land inside it. End that stream.
            self.legs[i].stop();
            self.close_leg(other(i));
        }
        if self.closing() {
            if self.legs[i].direction.is_finishing() {
                self.flush_pending(i);
            }
        } else {
            self.close(error.close_code(), &format!("loopwatch: {error}"));
        }
        self.legs[i].stop();
        self.settle(i);
    }

    /// Bytes after the proxy closed this direction: watch for the side's close
    /// reply. They go to no one, so they are not counted as relayed (a peer
    /// flooding through the close grace showed gigabytes that never left).
    fn discard(&mut self, i: usize, data: &[u8]) {
        let watcher = &mut self.legs[i].watcher;
        if watcher.error().is_none() {
            let (messages, bytes) = (watcher.messages, watcher.message_bytes);
            let _ = watcher.feed(data);
            (watcher.messages, watcher.message_bytes) = (messages, bytes);
        }
        self.settle(i);
    }

    /// While closing, end leg `i` once its close handshake is done: the
    /// proxy's close frame is queued to it and its own close frame arrived.
    fn settle(&mut self, i: usize) {
        let leg = &self.legs[i];
        if !self.closing() || leg.closed || self.legs[other(i)].direction.is_finishing() {
            return;
        }
        if leg.watcher.close().is_some() {
            self.close_leg(i);
        } else if leg.watcher.error().is_some() && leg.after_flush == AfterFlush::Nothing {
            // Its stream cannot be read any more, so its close reply would go
            // unnoticed: a FIN after the close frame, and keep reading (and
            // dropping) until the peer closes. Closing outright with unread
            // bytes would reset the connection and could destroy the frame.
            self.write_eof(i);
        }
    }

    // --- ends of the connections -------------------------------------------------

    /// Leg `i`'s connection is gone (`Relay.lost`).
    fn lost(&mut self, i: usize) {
        if self.legs[i].closed {
            return;
        }
        self.legs[i].closed = true;
        self.streams.drop_stream(i);
        self.initiator.get_or_insert(initiator(i));
        let o = other(i);
        if !self.legs[o].closed {
            // Nothing reaches the side that is gone any more.
            self.legs[o].stop();
            if self.closing() {
                if self.legs[i].stop().is_finishing() {
                    // The proxy's close frame for the other side was waiting
                    // for the end of a frame this side will never finish.
                    self.abort(o);
                } else {
                    self.settle(o);
                }
            } else if self.legs[i].watcher.close().is_some() || self.legs[i].eof {
                self.close_leg(o); // an ordinary close handshake: flush, then close
            } else if self.can_tell_lost(i) {
                self.tell_lost(i);
            } else if self.legs[i].broke || self.legs[o].broke {
                // A stream passed unparsed: where it stands is unknown, so
                // the end is passed on as TCP's (flush, then close).
                self.close_leg(o);
            } else {
                self.abort(o); // mid-frame: a close frame now would corrupt the stream
            }
            return;
        }
        self.enter(Phase::Done);
    }

    /// Whether leg `i`, ended without a close frame, can be told to the other
    /// side with one of loopwatch's: it stopped at a frame boundary, and
    /// neither direction is passed on unparsed.
    fn can_tell_lost(&self, i: usize) -> bool {
        let (leg, o) = (&self.legs[i], &self.legs[other(i)]);
        leg.watcher.close().is_none()
            && !leg.broke
            && !o.broke
            && leg.watcher.at_boundary()
            && leg.watcher.error().is_none()
    }

    /// Leg `i` vanished without a close frame, at a frame boundary: tell the
    /// other side why, then wait (up to the grace) for its close reply.
    fn tell_lost(&mut self, i: usize) {
        let o = other(i);
        let (code, reason) = if i == UPSTREAM {
            (CODE_UPSTREAM_LOST, "loopwatch: upstream connection lost")
        } else {
            (CODE_CLIENT_LOST, "loopwatch: client connection lost")
        };
        self.enter(Phase::Closing {
            until: Instant::now() + CLOSE_GRACE,
        });
        self.legs[i].stop();
        let mask = (o == UPSTREAM).then(mask_key);
        let frame = build_close_frame(code, reason, mask).expect("valid close codes");
        self.write(o, &frame);
        self.settle(o);
    }

    /// The end of a slice of the idle timeout: closed once `IDLE_SLICES`
    /// slices in a row saw no traffic, or saw output waiting for a leg that
    /// did not move. A side that reads nothing is idle whatever it sends: its
    /// own pings kept a connection whose other side waited on it open for
    /// good (HAProxy's `timeout tunnel` ends it; nginx does not).
    fn check_idle(&mut self) {
        let [c, u] = &self.legs;
        let activity =
            c.watcher.frames + u.watcher.frames + c.watcher.message_bytes + u.watcher.message_bytes;
        if activity != self.activity {
            self.activity = activity;
            self.quiet = 0;
        } else {
            self.quiet += 1;
        }
        let mut stuck = false;
        for leg in &mut self.legs {
            stuck |= leg.pending_output() && !leg.wrote;
            leg.wrote = false;
        }
        self.stalled = if stuck { self.stalled + 1 } else { 0 };
        if self.quiet >= IDLE_SLICES || self.stalled >= IDLE_SLICES {
            self.close(1001, "loopwatch: idle timeout");
            return;
        }
        self.idle_since = Instant::now();
    }

    /// The first close frame seen, the proxy's own close, or 1006 when a side
    /// vanished without one (`Relay.close_info`).
    pub fn close_info(&self) -> CloseInfo {
        match self.initiator {
            Some(who @ (Initiator::Client | Initiator::Upstream)) => {
                let i = if who == Initiator::Client {
                    CLIENT
                } else {
                    UPSTREAM
                };
                match self.legs[i].watcher.close() {
                    None => CloseInfo {
                        code: 1006,
                        reason: String::new(),
                        initiator: who,
                        broken_by: self.broken_by,
                    },
                    Some(seen) => CloseInfo {
                        code: seen.code.unwrap_or(1005),
                        reason: seen.reason.clone(),
                        initiator: who,
                        broken_by: self.broken_by,
                    },
                }
            }
            Some(Initiator::Proxy) if self.proxy_close.is_some() => {
                let (code, reason) = *self.proxy_close.clone().expect("checked");
                CloseInfo {
                    code,
                    reason,
                    initiator: Initiator::Proxy,
                    broken_by: self.broken_by,
                }
            }
            other => CloseInfo {
                code: 1006,
                reason: String::new(),
                initiator: other.unwrap_or(Initiator::Client),
                broken_by: self.broken_by,
            },
        }
    }

    pub fn traffic(&self) -> Traffic {
        let [c, u] = &self.legs;
        Traffic {
            messages_in: c.watcher.messages,
            messages_out: u.watcher.messages,
            bytes_in: c.watcher.message_bytes,
            bytes_out: u.watcher.message_bytes,
        }
    }

    /// The Closed event (once).
    fn report(&mut self) -> CloseInfo {
        let info = self.close_info();
        if !self.reported {
            self.reported = true;
            self.events.send(Event::Closed {
                key: Arc::clone(&self.id.key),
                route: Arc::clone(&self.id.route),
                at: std::time::Instant::now(),
                conn_id: self.id.conn_id,
                code: info.code,
                reason: info.reason.clone().into(),
                initiator: info.initiator,
                duration: self.id.opened_at.elapsed(),
                traffic: self.traffic(),
            });
        }
        info
    }
}

impl<C: Transport, U: Transport> Drop for Relay<C, U> {
    /// A relay dropped before its end (the runtime stopped after the grace
    /// of `stop()`) still reports how far it got.
    fn drop(&mut self) {
        if !self.reported {
            self.report();
        }
    }
}

#[cfg(test)]
impl<C: Transport, U: Transport> Relay<C, U> {
    /// A relay between two streams as the tests make one: connection 1 of
    /// 127.0.0.1 on "/", no limits, registered in `relays` while the
    /// `Registered` lives.
    pub(crate) fn for_test(
        client: C,
        upstream: U,
        relays: &Arc<crate::control::Relays>,
    ) -> (crate::control::Registered, Relay<C, U>) {
        let (events, _rx) = loopwatch_dataplane_core::events::event_queue(16);
        let (registered, control) = relays.register(1, Arc::from("/"));
        let limits = RelayLimits {
            max_message_size: None,
            allowed_rsv: 0,
            idle_timeout: None,
        };
        let id = RelayIdentity {
            conn_id: 1,
            key: Arc::from("127.0.0.1"),
            route: Arc::from("/"),
            opened_at: std::time::Instant::now(),
        };
        let relay = Relay::new(client, upstream, limits, id, events, control);
        (registered, relay)
    }
}

#[cfg(test)]
mod tests {
    //! The directions' moves on real sockets, in a debug build: every move is
    //! checked against `Direction::may_go` (a move the table does not allow
    //! panics the relay's task, and the test with it).
    use super::*;
    use crate::control::Relays;
    use loopwatch_dataplane_core::frames::unmask;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the peer the test drives, and loopwatch's end.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (peer, ours)
    }

    /// A frame as a client sends it (masked).
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1, 2, 3, 4];
        let mut frame = vec![first, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    }

    /// A frame as a server sends it.
    fn unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first, payload.len() as u8];
        frame.extend_from_slice(payload);
        frame
    }

    async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
            .await
            .expect("the bytes came in time")
            .unwrap();
        got
    }

    /// Everything a stream sends until its connection ends.
    async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got))
            .await
            .expect("the connection ended in time")
            .unwrap();
        got
    }

    /// A frame with a reserved opcode from the client, passed on unparsed:
    /// what the upstream read.
    async fn bad_frame_passed(s: &mut Spliced) -> Vec<u8> {
        let bad = masked(0x83, b"x");
        s.client.write_all(&bad).await.unwrap();
        assert_eq!(read_n(&mut s.upstream, bad.len()).await, bad);
        bad
    }

    /// A close frame read from a stream: its code, and whether it was masked.
    async fn read_close(stream: &mut TcpStream) -> (u16, bool) {
        let head = read_n(stream, 2).await;
        assert_eq!(head[0], 0x88, "a close frame");
        let masked = head[1] & 0x80 != 0;
        let key = if masked {
            read_n(stream, 4).await
        } else {
            vec![0; 4]
        };
        let mut payload = read_n(stream, usize::from(head[1] & 0x7f)).await;
        unmask(&mut payload, [key[0], key[1], key[2], key[3]]);
        (u16::from_be_bytes([payload[0], payload[1]]), masked)
    }

    struct Spliced {
        client: TcpStream,
        upstream: TcpStream,
        relays: Arc<Relays>,
        ended: tokio::task::JoinHandle<CloseInfo>,
    }

    async fn splice() -> Spliced {
        let (client, client_leg) = pair().await;
        let (upstream, upstream_leg) = pair().await;
        let relays = Arc::new(Relays::default());
        let (registered, mut relay) = Relay::for_test(client_leg, upstream_leg, &relays);
        relay.start(b"", b"", b"", false);
        let ended = tokio::spawn(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            relay
                .run(move |info| {
                    let _ = tx.send(info);
                })
                .await;
            drop(registered);
            rx.await.unwrap()
        });
        Spliced {
            client,
            upstream,
            relays,
            ended,
        }
    }

    async fn ended(s: Spliced) -> CloseInfo {
        let Spliced {
            client,
            upstream,
            ended,
            ..
        } = s;
        drop((client, upstream));
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the relay ended")
            .expect("no move outside the table")
    }

    /// Both legs hold at most NOTSENT_LOWAT unsent bytes in the kernel, so that
    /// a slow reader's reading lets output move (the idle timeout cut a 16 KiB/s
    /// reader of a 20 s timeout at 28 s: a third of a 2 MB buffer had to drain
    /// before a write could succeed).
    #[tokio::test]
    async fn the_legs_hold_little_unsent_in_the_kernel() {
        let (_client, client_leg) = pair().await;
        let (_upstream, upstream_leg) = pair().await;
        let relays = Arc::new(Relays::default());
        let (_registered, mut relay) = Relay::for_test(client_leg, upstream_leg, &relays);
        relay.start(b"", b"", b"", false);
        for i in [CLIENT, UPSTREAM] {
            let stream = relay.streams.peek(i).expect("open");
            let lowat = socket2::SockRef::from(stream.tcp()).tcp_notsent_lowat();
            assert_eq!(lowat.unwrap(), NOTSENT_LOWAT);
        }
    }

    /// Forwarding → Passing: a client's bad frame goes on unparsed after its
    /// valid message, and the upstream answers it (its echo first, then 1002).
    #[tokio::test]
    async fn a_protocol_error_is_passed_on_for_the_peer_to_answer() {
        let mut s = splice().await;
        let valid = masked(0x81, b"hi");
        let bad = masked(0x83, b"x"); // a reserved opcode
        s.client
            .write_all(&[valid.as_slice(), &bad].concat())
            .await
            .unwrap();
        assert_eq!(
            read_n(&mut s.upstream, valid.len() + bad.len()).await,
            [valid, bad].concat()
        );
        let answer = [
            unmasked(0x81, b"hi"),
            unmasked(0x88, &1002u16.to_be_bytes()),
        ]
        .concat();
        s.upstream.write_all(&answer).await.unwrap();
        assert_eq!(read_n(&mut s.client, answer.len()).await, answer);
        let info = ended(s).await;
        assert_eq!((info.code, info.initiator), (1002, Initiator::Upstream));
    }

    /// The upstream breaks the protocol, then ends its side without a close
    /// frame: it ended the connection, though the client drops it last.
    #[tokio::test]
    async fn a_broken_stream_ended_by_the_upstream_is_the_upstreams_end() {
        let mut s = splice().await;
        let bad = unmasked(0x83, b"x"); // a reserved opcode
        s.upstream.write_all(&bad).await.unwrap();
        assert_eq!(read_n(&mut s.client, bad.len()).await, bad);
        s.upstream.shutdown().await.unwrap();
        assert!(read_to_end(&mut s.client).await.is_empty()); // its end, passed on
        drop(s.client);
        let info = tokio::time::timeout(Duration::from_secs(5), s.ended)
            .await
            .expect("ended")
            .unwrap();
        assert_eq!(info.initiator, Initiator::Upstream);
    }

    /// loopwatch's own close 1001 "bye", with the usual grace.
    fn bye() -> CloseCommand {
        CloseCommand {
            code: 1001,
            reason: "bye".into(),
            grace: CLOSE_GRACE,
        }
    }

    /// Forwarding → Finishing → Stopped: loopwatch's close waits for the
    /// client's frame in flight to end, then follows it to the upstream; the
    /// client gets its close at once (nothing in flight toward it).
    #[tokio::test]
    async fn a_close_of_loopwatchs_waits_for_the_frame_in_flight() {
        let mut s = splice().await;
        let frame = masked(0x82, b"0123456789");
        s.client.write_all(&frame[..9]).await.unwrap();
        assert_eq!(read_n(&mut s.upstream, 9).await, frame[..9]);
        assert!(s.relays.close(1, bye()));
        assert_eq!(read_close(&mut s.client).await, (1001, false));
        s.client.write_all(&frame[9..]).await.unwrap();
        assert_eq!(read_n(&mut s.upstream, frame.len() - 9).await, frame[9..]);
        assert_eq!(read_close(&mut s.upstream).await, (1001, true));
        s.upstream
            .write_all(&unmasked(0x88, &1001u16.to_be_bytes()))
            .await
            .unwrap();
        s.client
            .write_all(&masked(0x88, &1001u16.to_be_bytes()))
            .await
            .unwrap();
        let info = ended(s).await;
        assert_eq!(
            (info.code, info.reason.as_str(), info.initiator),
            (1001, "bye", Initiator::Proxy)
        );
    }

    /// Both close frames went by, then the upstream ends its TCP connection
    /// (RFC 6455 §7.1.1): the client's connection closes too, though the
    /// client keeps its socket open (it was kept, with the upstream's, until
    /// the idle timeout).
    #[tokio::test]
    async fn a_tcp_end_after_the_close_handshake_ends_both() {
        let mut s = splice().await;
        let from_upstream = unmasked(0x88, &1008u16.to_be_bytes());
        s.upstream.write_all(&from_upstream).await.unwrap();
        assert_eq!(
            read_n(&mut s.client, from_upstream.len()).await,
            from_upstream
        );
        let reply = masked(0x88, &1008u16.to_be_bytes());
        s.client.write_all(&reply).await.unwrap();
        assert_eq!(read_n(&mut s.upstream, reply.len()).await, reply);
        s.upstream.shutdown().await.unwrap();
        assert!(read_to_end(&mut s.client).await.is_empty()); // closed, not half-closed
        let info = tokio::time::timeout(Duration::from_secs(5), s.ended)
            .await
            .expect("ended without the client's own close")
            .unwrap();
        assert_eq!((info.code, info.initiator), (1008, Initiator::Upstream));
    }

    /// What a side sends after loopwatch's own close, while loopwatch waits
    /// for its close reply, goes to no one: not counted as relayed.
    #[tokio::test]
    async fn bytes_dropped_in_the_close_grace_are_not_counted() {
        let mut s = splice().await;
        let before = unmasked(0x82, b"relayed");
        s.upstream.write_all(&before).await.unwrap();
        assert_eq!(read_n(&mut s.client, before.len()).await, before);
        assert!(s.relays.close(1, bye()));
        assert_eq!(read_close(&mut s.client).await, (1001, false));
        assert_eq!(read_close(&mut s.upstream).await, (1001, true));
        for _ in 0..3 {
            s.upstream
                .write_all(&unmasked(0x82, &[b'x'; 100]))
                .await
                .unwrap();
        }
        s.upstream
            .write_all(&unmasked(0x88, &1001u16.to_be_bytes()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let live = s.relays.live();
        assert_eq!(
            (live[0].traffic.messages_out, live[0].traffic.bytes_out),
            (1, 7)
        );
        s.client
            .write_all(&masked(0x88, &1001u16.to_be_bytes()))
            .await
            .unwrap();
        let info = ended(s).await;
        assert_eq!(info.initiator, Initiator::Proxy);
    }

    /// A half-close before the handshake is done stays one: the client's
    /// close frame and FIN go on, and the upstream's reply still comes back.
    #[tokio::test]
    async fn a_half_close_before_the_reply_is_passed_on() {
        let mut s = splice().await;
        let close = masked(0x88, &1000u16.to_be_bytes());
        s.client.write_all(&close).await.unwrap();
        s.client.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut s.upstream).await, close); // the frame, then the FIN
        let reply = unmasked(0x88, &1000u16.to_be_bytes());
        s.upstream.write_all(&reply).await.unwrap();
        assert_eq!(read_n(&mut s.client, reply.len()).await, reply);
        let info = ended(s).await;
        assert_eq!((info.code, info.initiator), (1000, Initiator::Client));
    }

    /// The drain's close gives a frame in flight its grace, not `CLOSE_GRACE`.
    #[tokio::test]
    async fn a_close_with_a_longer_grace_lets_the_frame_in_flight_end() {
        let mut s = splice().await;
        let frame = masked(0x82, b"0123456789");
        s.client.write_all(&frame[..5]).await.unwrap();
        assert_eq!(read_n(&mut s.upstream, 5).await, frame[..5]);
        let command = CloseCommand {
            code: 1001,
            reason: "loopwatch: shutting down".into(),
            grace: CLOSE_GRACE * 2,
        };
        assert!(s.relays.close(1, command));
        assert_eq!(read_close(&mut s.client).await, (1001, false));
        tokio::time::sleep(CLOSE_GRACE + Duration::from_millis(300)).await;
        s.client.write_all(&frame[5..]).await.unwrap(); // past CLOSE_GRACE, within its grace
        assert_eq!(read_n(&mut s.upstream, frame.len() - 5).await, frame[5..]);
        assert_eq!(read_close(&mut s.upstream).await, (1001, true));
    }

    /// Answering → Open → Closing: a protocol error nobody answers within
    /// `ANSWER_GRACE` is loopwatch's to close, with the error's code; the
    /// direction passed unparsed ends without a frame of loopwatch's in it.
    #[tokio::test]
    async fn a_protocol_error_nobody_answers_is_closed_at_its_deadline() {
        let mut s = splice().await;
        bad_frame_passed(&mut s).await;
        let asked = std::time::Instant::now();
        assert_eq!(read_close(&mut s.client).await, (1002, false));
        assert!(asked.elapsed() >= ANSWER_GRACE - Duration::from_millis(100));
        let rest = read_to_end(&mut s.upstream).await;
        assert!(
            rest.is_empty(),
            "nothing of loopwatch's inside the unparsed stream"
        );
        let info = ended(s).await;
        assert_eq!((info.code, info.initiator), (1002, Initiator::Proxy));
    }

    /// Answering → Closing while the other direction is mid-frame: the
    /// upstream's frame in flight ends before loopwatch's 1002 follows it
    /// (the upstream's connection gets a FIN after what was passed, and is
    /// still read until that frame is out).
    #[tokio::test]
    async fn the_deadline_s_close_waits_for_a_frame_in_flight_the_other_way() {
        let mut s = splice().await;
        let frame = unmasked(0x82, &[7u8; 100]);
        s.upstream.write_all(&frame[..40]).await.unwrap();
        assert_eq!(read_n(&mut s.client, 40).await, frame[..40]);
        bad_frame_passed(&mut s).await;
        tokio::time::sleep(ANSWER_GRACE + Duration::from_millis(300)).await;
        // Past the deadline: the upstream's connection has its FIN, not a reset.
        let mut byte = [0u8; 1];
        let eof = tokio::time::timeout(Duration::from_secs(1), s.upstream.read(&mut byte)).await;
        assert!(
            matches!(eof, Ok(Ok(0))),
            "a FIN after what was passed: {eof:?}"
        );
        s.upstream.write_all(&frame[40..]).await.unwrap();
        assert_eq!(read_n(&mut s.client, frame.len() - 40).await, frame[40..]);
        assert_eq!(read_close(&mut s.client).await, (1002, false));
        let info = ended(s).await;
        assert_eq!((info.code, info.initiator), (1002, Initiator::Proxy));
    }

    /// Passing → Stopped: loopwatch closes a direction passed unparsed (here:
    /// past its budget) by ending the other side's connection after what was
    /// passed, with no close frame inside the unparsed stream.
    #[tokio::test]
    async fn a_direction_passed_past_its_budget_is_closed() {
        let mut s = splice().await;
        let bad = bad_frame_passed(&mut s).await;
        let flood = vec![0u8; PASS_BUDGET as usize + 4096];
        let _ = s.client.write_all(&flood).await;
        let passed = read_to_end(&mut s.upstream).await;
        assert_eq!(passed.len() as u64, PASS_BUDGET - bad.len() as u64);
        assert!(
            passed.iter().all(|&b| b == 0),
            "nothing of loopwatch's inside"
        );
        assert_eq!(read_close(&mut s.client).await, (1002, false));
        let info = ended(s).await;
        assert_eq!((info.code, info.initiator), (1002, Initiator::Proxy));
    }
}
