//! Plain HTTP requests forwarded to the route's upstream: one exchange, its
//! request body streamed up and its response streamed back, each phase under
//! its own timeout.
//!
//! * The request goes up with the client's end-to-end headers and
//!   X-Forwarded-* (`wire::upstream_request_head`); a Content-Length body as
//!   it came, a chunked body decoded (`core::body`, llhttp's strictness) and
//!   framed again by loopwatch.
//! * The response comes back with its status, reason and end-to-end headers
//!   as the upstream sent them; its body unchanged: as it came with a
//!   Content-Length, else chunked by loopwatch to an HTTP/1.1 client, else
//!   until the connection closes. No body for HEAD, 1xx, 204 and 304;
//!   interim 1xx answers are dropped, as aiohttp drops them; a 101 (no
//!   upgrade was asked for) is a bad answer, 502.
//! * Timeouts ([`Phase`]), measured as silence from the latest progress, one
//!   watchdog per exchange re-armed only when it fires or the phase moves:
//!   the body `limits.body_timeout` (408, or 504 when it is the upstream
//!   that takes none of it), the response head `limits.response_timeout`
//!   (504), the response body `limits.response_idle_timeout` (the connection
//!   is cut). The connect has `limits.connect_timeout` (504).
//! * Backpressure: at most [`BODY_BUFFER`] bytes are read from one side
//!   before they are written to the other; nothing is read ahead.
//! * Whatever ends an exchange early drops the upstream connection: the
//!   backend sees its request cancelled and gets its slot back.
//!
//! The upstream is any `AsyncRead + AsyncWrite` stream: [`connect`] opens a
//! plain TCP one (the place a TLS connector goes). A connection the exchange
//! leaves fit for another request is handed back ([`Exchanged::upstream`],
//! for the pool); a request that a reused connection's upstream closes before
//! answering is retried once on a new connection when it may be (`retryable`).

use std::future::Future;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};

use loopwatch_dataplane_core::body::{encode_chunk, ChunkError, ChunkedDecoder, LAST_CHUNK};
use loopwatch_dataplane_core::head::{BodyFraming, Version};

use crate::listener::{Limits, Rejected};
use crate::response::{decode_chunks, parse_response_head, BadResponse, Chunk, Framing};
use crate::transport::{
    out_of_descriptors, read_appending, tls_failure, UpstreamTlsError, FD_LIMIT,
};
use crate::wire::{connection_named, hop_by_hop};

/// Bytes read from one side at a time, written to the other before the next
/// read.
pub const BODY_BUFFER: usize = 64 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// At most this much of a client's next request is read while the response
/// to its last is awaited (the watch for its leaving).
const WATCH_READ: usize = 4096;
const UPSTREAM_TIMEOUT: &str = "loopwatch: upstream timeout";
const UNREACHABLE: &str = "loopwatch: upstream unreachable";
/// An upstream reached that closed before a whole response head: not
/// "unreachable" (it may have taken the body), nginx's "upstream prematurely
/// closed connection".
const UPSTREAM_CLOSED: &str = "loopwatch: upstream closed the connection";
const UPSTREAM_ERROR: &str = "loopwatch: upstream error";
const UPSTREAM_TLS: &str = "loopwatch: upstream TLS handshake failed";

/// A plain request as the listener decided it (owned: the head's buffer is gone).
#[derive(Debug, Clone)]
pub struct Request {
    /// The request head for the upstream.
    pub head: Vec<u8>,
    pub framing: BodyFraming,
    /// Bytes that came after the client's head: the start of the body (and
    /// beyond it, a pipelined request).
    pub early: Vec<u8>,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// Answer the client's `Expect: 100-continue` once the upstream is there.
    pub expect_continue: bool,
    /// A HEAD request: the response has no body, whatever it announces.
    pub head_only: bool,
    pub version: Version,
    /// Idempotent and without a body: may be sent again on a new connection
    /// when a reused one turns out closed (aiohttp's rule).
    pub retryable: bool,
    /// Its method and path (without the query) when it makes an access line
    /// (`telemetry.access_log`, sampled when the request came).
    pub logged: Option<Logged>,
}

/// What a plain request's access line says of it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: Box<str>,
    pub path: Box<str>,
}

/// Idempotent methods (RFC 9110 §9.2.2), those aiohttp retries.
pub const IDEMPOTENT: [&str; 6] = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"];

/// How an exchange ended, what went through it, and its upstream connection
/// if another request may use it.
pub struct Exchanged<U> {
    pub outcome: Outcome,
    pub upstream: Option<U>,
    pub sent: Sent,
    /// Bytes the client sent after its request, read while its response was
    /// awaited (to see whether the client left): the start of its next
    /// request, for the connection's next head.
    pub carry: Vec<u8>,
}

impl<U> From<Outcome> for Exchanged<U> {
    fn from(outcome: Outcome) -> Self {
        Exchanged {
            outcome,
            upstream: None,
            sent: Sent::default(),
            carry: Vec::new(),
        }
    }
}

/// What an exchange passed on, for its access line and its counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// The upstream's status that went to the client (its response head
    /// was written); None when none did.
    pub status: Option<u16>,
    /// Request body bytes, as the client framed them, that went upstream.
    pub bytes_in: u64,
    /// Response bytes (head and body) that went to the client.
    pub bytes_out: u64,
}

/// How an exchange ended: what the listener does with the client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The response went out whole: read the client's next request.
    KeepAlive,
    /// The response went out whole with `Connection: close`: close.
    Close,
    /// loopwatch answers (no byte of a response went out yet), then closes;
    /// `counted`: its reason among the listener's rejections; `why`: what its
    /// log line says beyond the answer's message (the upstream's fault, for
    /// the operator: the TLS error, what was wrong with its response).
    Answer {
        status: u16,
        message: String,
        counted: Option<Rejected>,
        why: Option<String>,
    },
    /// Cut the connection (a response is under way: nothing honest to add).
    Cut(Option<Rejected>),
    /// The client left.
    Gone,
}

/// Where an exchange is, and so which timeout watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The client still owes request body bytes.
    Body = 0,
    /// The request is complete: waiting for the upstream's response head.
    AwaitHead = 1,
    /// The response head went to the client; its body streams.
    Response = 2,
    /// Answered, failed, timed out or the client left.
    Done = 3,
}

/// The moves an exchange may make: the table `Phase::can_move` checks.
const TRANSITIONS: [(Phase, Phase); 6] = [
    (Phase::Body, Phase::AwaitHead), // the request body ended
    (Phase::Body, Phase::Response),  // an upstream may answer before the body ends
    (Phase::Body, Phase::Done),
    (Phase::AwaitHead, Phase::Response),
    (Phase::AwaitHead, Phase::Done),
    (Phase::Response, Phase::Done),
];

impl Phase {
    fn from_u8(n: u8) -> Phase {
        match n {
            0 => Phase::Body,
            1 => Phase::AwaitHead,
            2 => Phase::Response,
            _ => Phase::Done,
        }
    }

    pub fn can_move(self, to: Phase) -> bool {
        TRANSITIONS.contains(&(self, to))
    }
}

/// The exchange's phase and its latest progress, shared by the request pump,
/// the response pump and the watchdog (one task: atomics, no lock).
struct Clock {
    base: Instant,
    /// Nanoseconds from `base` to the latest progress of the current phase.
    last: AtomicU64,
    phase: AtomicU8,
    /// Wakes the watchdog when the phase moves (its timeout changes).
    moved: Notify,
    /// The request pump holds body bytes the upstream has not taken, and does
    /// not read the client meanwhile: a silent client is not to blame.
    waiting_upstream: AtomicBool,
    /// The request body ended.
    request_done: AtomicBool,
    /// Bytes beyond the request arrived before its response was written.
    pipelined: AtomicBool,
    /// The response head went to the client: a failure can only cut now.
    started: AtomicBool,
    /// The status of the response head that went to the client (0: none).
    status: AtomicU16,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Clock {
    fn new(phase: Phase) -> Clock {
        Clock {
            base: Instant::now(),
            last: AtomicU64::new(0),
            phase: AtomicU8::new(phase as u8),
            moved: Notify::new(),
            waiting_upstream: AtomicBool::new(false),
            request_done: AtomicBool::new(phase != Phase::Body),
            pipelined: AtomicBool::new(false),
            started: AtomicBool::new(false),
            status: AtomicU16::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// `exchanged` with what this exchange passed on.
    fn ended<U>(&self, mut exchanged: Exchanged<U>) -> Exchanged<U> {
        let status = self.status.load(Ordering::Acquire);
        exchanged.sent = Sent {
            status: (status != 0).then_some(status),
            bytes_in: self.bytes_in.load(Ordering::Acquire),
            bytes_out: self.bytes_out.load(Ordering::Acquire),
        };
        exchanged
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn progress(&self) {
        let nanos = self.base.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.store(nanos, Ordering::Release);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Acquire))
    }

    /// Move to `to` if the transition table allows it from where the exchange
    /// is (the pumps race: a response may start before the body ends), and
    /// start its timeout afresh.
    fn enter(&self, to: Phase) -> bool {
        let moved = self
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Phase::from_u8(now).can_move(to).then_some(to as u8)
            })
            .is_ok();
        if moved {
            self.progress();
            self.moved.notify_one();
        }
        moved
    }
}

fn answer(status: u16, message: &str, counted: Option<Rejected>) -> Outcome {
    Outcome::Answer {
        status,
        message: message.into(),
        counted,
        why: None,
    }
}

/// The upstream failed before its response: 502, counted as `upstream_error`,
/// its log line saying why.
fn upstream_failed(message: &str, why: String) -> Outcome {
    Outcome::Answer {
        status: 502,
        message: message.into(),
        counted: Some(Rejected::UpstreamError),
        why: Some(why),
    }
}

/// The upstream made no progress for a phase's timeout: 504, counted as
/// `upstream_timeout`, its log line naming the phase and the limit, as nginx's
/// "upstream timed out ... while connecting to upstream" and HAProxy's
/// termination flags do (every phase read the same before: "backend down" and
/// "backend slow" could not be told apart).
fn upstream_timed_out(why: &str) -> Outcome {
    Outcome::Answer {
        status: 504,
        message: UPSTREAM_TIMEOUT.into(),
        counted: Some(Rejected::UpstreamTimeout),
        why: Some(why.into()),
    }
}

const CONNECT_TIMED_OUT: &str = "connect: not connected within limits.connect_timeout";
const BODY_NOT_TAKEN: &str = "request body: the upstream took none of it for limits.body_timeout";
const NO_RESPONSE_HEAD: &str = "response head: none within limits.response_timeout";

/// A connect that failed (not for time or descriptors): its TLS handshake, or
/// the TCP connection.
fn connect_failed(e: &std::io::Error) -> Outcome {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<UpstreamTlsError>());
    match tls {
        Some(UpstreamTlsError(why)) => upstream_failed(UPSTREAM_TLS, why.clone()),
        None => upstream_failed(UNREACHABLE, format!("connect: {e}")),
    }
}

/// Forward one request on `pooled` (a reused connection) or on one `connect`
/// opens (bounded by `limits.connect_timeout`), stream both ways, and say
/// how it ended. `closing`: whether the listener is stopping (the response
/// then closes the connection). The upstream connection is dropped unless it
/// is handed back in [`Exchanged::upstream`].
pub async fn exchange<C, U, F, Fut, G>(
    client: &mut C,
    mut connect: F,
    mut pooled: Option<U>,
    request: &Request,
    limits: &Limits,
    closing: G,
) -> Exchanged<U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<U>>,
    G: Fn() -> bool,
{
    let first = match request.framing {
        BodyFraming::None => Phase::AwaitHead,
        _ => Phase::Body,
    };
    let mut carry = Vec::new();
    loop {
        let clock = Clock::new(first);
        clock.progress();
        let reused = pooled.is_some();
        let upstream = match pooled.take() {
            Some(upstream) => upstream,
            None => match open(&mut connect, &clock, limits).await {
                Ok(upstream) => upstream,
                Err(outcome) => return clock.ended(outcome.into()),
            },
        };
        let attempted = attempt(
            &mut *client,
            upstream,
            request,
            &clock,
            limits,
            &closing,
            &mut carry,
        );
        match attempted.await {
            Attempt::Done(mut exchanged) => {
                exchanged.carry = carry;
                return clock.ended(exchanged);
            }
            // The upstream closed an idle connection as it was reused: again.
            Attempt::Stale if reused && request.retryable => continue,
            Attempt::Stale => {
                return clock.ended(ResponseError::Closed { stale: true }.outcome().into())
            }
        }
    }
}

/// Connect, under `limits.connect_timeout` and the phase's own timeout.
async fn open<U, F, Fut>(connect: &mut F, clock: &Clock, limits: &Limits) -> Result<U, Outcome>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<U>>,
{
    // The client is not read until the upstream is there: its silence meanwhile
    // is the upstream's doing.
    clock.waiting_upstream.store(true, Ordering::Release);
    let dog = watchdog(clock, limits);
    tokio::pin!(dog);
    let upstream = tokio::select! {
        biased;
        connected = timeout(limits.connect_timeout, connect()) => match connected {
            Err(_) => Err(upstream_timed_out(CONNECT_TIMED_OUT)),
            Ok(Err(e)) if out_of_descriptors(&e) => Err(answer(503, FD_LIMIT, Some(Rejected::FdLimit))),
            Ok(Err(e)) => Err(connect_failed(&e)),
            Ok(Ok(upstream)) => Ok(upstream),
        },
        // Still connecting: the client waited past its phase's limit for
        // the upstream, whichever limit that was.
        phase = &mut dog => Err(match expired(phase, clock) {
            Outcome::Answer { status: 504, .. } => upstream_timed_out(CONNECT_TIMED_OUT),
            other => other,
        }),
    };
    clock.waiting_upstream.store(false, Ordering::Release);
    upstream
}

enum Attempt<U> {
    Done(Exchanged<U>),
    /// The upstream closed before sending a byte of its answer (a reused
    /// connection it had closed meanwhile, most likely).
    Stale,
}

/// The request and its response over `upstream`. Once the request is sent
/// whole, the client is watched until the response ends: a client that
/// leaves (its end, a reset) is gone, and the upstream's request is
/// cancelled (nginx's 499), rather than its answer counted as delivered;
/// bytes it sends meanwhile (its next request) go to `carry` and the watch
/// stops.
async fn attempt<C, U, G>(
    client: &mut C,
    upstream: U,
    request: &Request,
    clock: &Clock,
    limits: &Limits,
    closing: &G,
    carry: &mut Vec<u8>,
) -> Attempt<U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    G: Fn() -> bool,
{
    let done = |outcome: Outcome| Attempt::Done(outcome.into());
    if request.expect_continue && client.write_all(CONTINUE).await.is_err() {
        return done(Outcome::Gone);
    }
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (mut upstream_in, mut upstream_out) = tokio::io::split(upstream);
    let (relayed, sent) = {
        let relay = relay_response(
            &mut upstream_in,
            &mut client_out,
            request,
            clock,
            limits,
            closing,
        );
        let dog = watchdog(clock, limits);
        tokio::pin!(relay, dog);
        // 1. The request goes up (a response may begin before it ends).
        let early = {
            let send = send_request(&mut client_in, &mut upstream_out, request, clock, limits);
            tokio::pin!(send);
            tokio::select! {
                biased;
                relayed = &mut relay => Some(relayed),
                result = &mut send => match result {
                    // The response (or the upstream's close) tells the rest.
                    Ok(()) | Err(RequestError::UpstreamGone) => None,
                    Err(RequestError::ClientGone) => return done(Outcome::Gone),
                    Err(RequestError::Bad(why)) => {
                        return done(if clock.started.load(Ordering::Acquire) {
                            Outcome::Cut(None)
                        } else {
                            answer(400, &why.to_string(), Some(Rejected::BadRequest))
                        });
                    }
                },
                phase = &mut dog => return done(expired(phase, clock)),
            }
        };
        match early {
            Some(relayed) => (relayed, false),
            None => {
                // 2. Sent: the response, the client watched (only when its
                // request was read whole: else what comes is its body).
                let mut watching = carry.is_empty() && clock.request_done.load(Ordering::Acquire);
                loop {
                    tokio::select! {
                        biased;
                        relayed = &mut relay => break (relayed, true),
                        read = read_appending(&mut client_in, carry, WATCH_READ), if watching => match read {
                            Ok(0) | Err(_) => return done(Outcome::Gone),
                            Ok(_) => watching = false, // alive: its next request, kept
                        },
                        phase = &mut dog => return done(expired(phase, clock)),
                    }
                }
            }
        }
    };
    clock.enter(Phase::Done);
    match relayed {
        Ok(end) => {
            // Reusable only if both messages ended as framed.
            let reusable = end.reusable && sent && clock.request_done.load(Ordering::Acquire);
            Attempt::Done(Exchanged {
                outcome: if end.keep_alive {
                    Outcome::KeepAlive
                } else {
                    Outcome::Close
                },
                upstream: reusable.then(|| upstream_in.unsplit(upstream_out)),
                sent: Sent::default(), // `exchange` fills it and `carry` in
                carry: Vec::new(),
            })
        }
        Err(ResponseError::Closed { stale: true }) => Attempt::Stale,
        Err(failure) => done(failure.outcome()),
    }
}

/// The phase made no progress for its timeout: what the client gets
/// (`HttpExchange.expire`).
fn expired(phase: Phase, clock: &Clock) -> Outcome {
    match phase {
        Phase::Response => Outcome::Cut(Some(Rejected::ResponseTimeout)),
        Phase::Body if !clock.waiting_upstream.load(Ordering::Acquire) => answer(
            408,
            "loopwatch: request body timeout",
            Some(Rejected::BodyTimeout),
        ),
        Phase::Body => upstream_timed_out(BODY_NOT_TAKEN),
        Phase::AwaitHead | Phase::Done => upstream_timed_out(NO_RESPONSE_HEAD),
    }
}

/// Resolves with the phase that stayed silent for its whole timeout.
async fn watchdog(clock: &Clock, limits: &Limits) -> Phase {
    loop {
        let moved = clock.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let phase = clock.phase();
        let limit = match phase {
            Phase::Body => limits.body_timeout,
            Phase::AwaitHead => limits.response_timeout,
            Phase::Response => limits.response_idle_timeout,
            Phase::Done => {
                moved.await;
                continue;
            }
        };
        let deadline = clock.last() + limit;
        if Instant::now() >= deadline {
            return phase;
        }
        tokio::select! {
            _ = sleep_until(deadline) => {}
            _ = moved => {}
        }
    }
}

enum RequestError {
    ClientGone,
    UpstreamGone,
    Bad(ChunkError),
}

/// How the rest of a request body is delimited.
enum BodyLeft {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// The request head, then its body, client to upstream. Returns once the
/// body ended (then the client is not read until the response is written).
async fn send_request<R, W>(
    client: &mut R,
    upstream: &mut W,
    request: &Request,
    clock: &Clock,
    limits: &Limits,
) -> Result<(), RequestError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = match request.framing {
        BodyFraming::None => None,
        BodyFraming::Length(n) => Some(BodyLeft::Length(n)),
        BodyFraming::Chunked => Some(BodyLeft::Chunked(ChunkedDecoder::new(
            limits.head.max_head_size,
        ))),
    };
    let mut out = request.head.clone();
    let mut input = request.early.clone();
    let mut plain = Vec::new();
    loop {
        // What this read holds of the body, ready for the upstream.
        let (consumed, done) = match &mut left {
            None => (0, true),
            Some(BodyLeft::Length(n)) => {
                let take = (*n).min(input.len() as u64);
                *n -= take;
                out.extend_from_slice(&input[..take as usize]);
                (take as usize, *n == 0)
            }
            Some(BodyLeft::Chunked(decoder)) => {
                let decoded = decoder
                    .decode(&input, &mut plain)
                    .map_err(RequestError::Bad)?;
                encode_chunk(&plain, &mut out);
                plain.clear();
                if decoded.done {
                    out.extend_from_slice(LAST_CHUNK);
                }
                (decoded.consumed, decoded.done)
            }
        };
        if done && consumed < input.len() {
            // A next request came before this one was answered.
            clock.pipelined.store(true, Ordering::Release);
        }
        if !out.is_empty() {
            clock.waiting_upstream.store(true, Ordering::Release);
            let written = upstream.write_all(&out).await;
            clock.waiting_upstream.store(false, Ordering::Release);
            written.map_err(|_| RequestError::UpstreamGone)?;
            clock.progress(); // the upstream takes the body
            clock.bytes_in.fetch_add(consumed as u64, Ordering::Relaxed);
            out.clear();
        }
        if done {
            upstream
                .flush()
                .await
                .map_err(|_| RequestError::UpstreamGone)?;
            clock.request_done.store(true, Ordering::Release);
            clock.enter(Phase::AwaitHead);
            return Ok(());
        }
        input.clear();
        input.reserve(BODY_BUFFER);
        match client.read_buf(&mut input).await {
            // Ended before the body's end: nothing more will come, so the
            // request can never be whole. Gone, as nginx's "client prematurely
            // closed connection": the upstream's request is cancelled now, not
            // held until the body timeout and then counted as a slow body.
            Ok(0) => return Err(RequestError::ClientGone),
            Ok(_) => clock.progress(),
            Err(_) => return Err(RequestError::ClientGone),
        }
    }
}

enum ResponseError {
    /// The upstream closed before a whole response head (502); `stale`:
    /// before a byte of it.
    Closed {
        stale: bool,
    },
    /// Its head is not HTTP/1.x, is too large, or is a 101 (502): why.
    Bad(String),
    /// TLS failed before a whole response head (502): rustls' reason. A TLS
    /// 1.3 upstream that refuses loopwatch's client certificate (or its
    /// absence) says so at the first read, after the connect.
    Tls(String),
    /// It closed or broke its framing mid-body: the client is cut.
    Cut,
    ClientGone,
}

impl ResponseError {
    fn outcome(self) -> Outcome {
        match self {
            ResponseError::Closed { stale } => upstream_failed(
                UPSTREAM_CLOSED,
                if stale {
                    "before answering".into()
                } else {
                    "within its response head".into()
                },
            ),
            ResponseError::Bad(why) => upstream_failed(UPSTREAM_ERROR, why),
            ResponseError::Tls(why) => upstream_failed(UPSTREAM_TLS, why),
            ResponseError::Cut => Outcome::Cut(Some(Rejected::UpstreamCut)),
            ResponseError::ClientGone => Outcome::Gone,
        }
    }
}

/// What the client gets of a response head, and how its body goes on.
struct Relayed {
    head: Vec<u8>,
    framing: Framing,
    /// Chunked by loopwatch (no Content-Length, an HTTP/1.1 client).
    chunked: bool,
    keep_alive: bool,
}

/// The response head for the client (`HttpExchange.respond`).
fn client_head(
    head: &crate::response::Head,
    request: &Request,
    clock: &Clock,
    closing: bool,
) -> Result<Relayed, BadResponse> {
    let status = head.status;
    let bodiless = request.head_only || status < 200 || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::None
    } else {
        head.framing(false)?
    };
    let has_length = head.header(b"content-length").is_some();
    let chunked = !bodiless && !has_length && request.version == Version::Http11;
    let mut keep_alive = request.keep_alive;
    if !has_length && !bodiless && !chunked {
        keep_alive = false; // an HTTP/1.0 client: the body ends with the connection
    }
    if !clock.request_done.load(Ordering::Acquire) {
        keep_alive = false; // the upstream answered before the request body ended
    }
    if clock.pipelined.load(Ordering::Acquire) {
        keep_alive = false; // one request at a time, then the connection closes
    }
    if closing {
        keep_alive = false;
    }
    let mut out = format!("HTTP/1.1 {status} ").into_bytes();
    out.extend_from_slice(&head.reason);
    out.extend_from_slice(b"\r\n");
    let named = connection_named(head.headers.iter().map(|(n, v)| (&n[..], &v[..])));
    let mut length_given = false;
    for (name, value) in &head.headers {
        if hop_by_hop(name, &named) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if length_given {
                continue; // the same value repeated (framing checked it): once
            }
            length_given = true;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if request.version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n"); // HTTP/1.0 closes unless told
    }
    out.extend_from_slice(b"\r\n");
    Ok(Relayed {
        head: out,
        framing,
        chunked,
        keep_alive,
    })
}

/// A response that went out whole.
struct Ended {
    /// The client's connection stays open.
    keep_alive: bool,
    /// The upstream's connection may carry another request.
    reusable: bool,
}

/// The upstream's response, upstream to client.
async fn relay_response<R, W, G>(
    upstream: &mut R,
    client: &mut W,
    request: &Request,
    clock: &Clock,
    limits: &Limits,
    closing: &G,
) -> Result<Ended, ResponseError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    G: Fn() -> bool,
{
    let max_head = limits.head.max_head_size;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // Not a byte from the upstream yet.
    let mut stale = true;
    // 1. The head (interim 1xx answers dropped).
    let (head, len) = loop {
        let parsed = parse_response_head(&buf, max_head);
        match parsed.map_err(|e| ResponseError::Bad(e.to_string()))? {
            // A switch nobody asked for (no upgrade was requested, RFC 9110
            // §15.2.2): no valid answer, 502 (as HAProxy; nginx tunnels).
            Some((head, _)) if head.status == 101 => {
                return Err(ResponseError::Bad("a 101 to a plain request".into()))
            }
            Some((head, len)) if (100..200).contains(&head.status) => {
                buf.drain(..len);
                continue;
            }
            Some(done) => break done,
            None => {}
        }
        buf.reserve(4096);
        match upstream.read_buf(&mut buf).await {
            Ok(0) => return Err(ResponseError::Closed { stale }),
            Err(e) => {
                return Err(match tls_failure(&e) {
                    Some(why) => ResponseError::Tls(why),
                    None => ResponseError::Closed { stale },
                })
            }
            Ok(_) => stale = false,
        }
    };
    let closing = closing();
    // The upstream's connection may carry another request after this one.
    let reusable = head.http11
        && !closing
        && !head.header(b"connection").is_some_and(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
    let relayed = client_head(&head, request, clock, closing)
        .map_err(|e| ResponseError::Bad(e.to_string()))?;
    let status = head.status;
    buf.drain(..len);
    if relayed.framing == Framing::Chunked && !buf.is_empty() {
        // Chunks that came with the head and are already malformed: a 502
        // while nothing went out yet (HAProxy's answer), not a 200 cut short.
        let mut first = Chunk::Size;
        decode_chunks(&buf, &mut first, &mut Vec::new(), 0)
            .map_err(|e| ResponseError::Bad(e.to_string()))?;
    }
    clock.started.store(true, Ordering::Release);
    clock.enter(Phase::Response);
    client
        .write_all(&relayed.head)
        .await
        .map_err(|_| ResponseError::ClientGone)?;
    clock.progress();
    clock.status.store(status, Ordering::Release);
    clock
        .bytes_out
        .fetch_add(relayed.head.len() as u64, Ordering::Relaxed);

    // 2. The body.
    let mut left = match relayed.framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunk = Chunk::Size;
    let mut plain = Vec::new();
    let mut out = Vec::new();
    let mut eof = false;
    loop {
        let done = match relayed.framing {
            Framing::None => true,
            Framing::Length(_) => {
                let take = left.min(buf.len() as u64) as usize;
                left -= take as u64;
                out.extend_from_slice(&buf[..take]);
                buf.drain(..take); // what is left is beyond the response
                left == 0
            }
            Framing::UntilClose => {
                plain.append(&mut buf);
                eof
            }
            Framing::Chunked => {
                let (consumed, last) = decode_chunks(&buf, &mut chunk, &mut plain, usize::MAX)
                    .map_err(|_| ResponseError::Cut)?;
                buf.drain(..consumed);
                if buf.len() > max_head {
                    return Err(ResponseError::Cut); // an endless chunk-size line
                }
                last
            }
        };
        if relayed.chunked {
            encode_chunk(&plain, &mut out);
        } else {
            out.append(&mut plain);
        }
        plain.clear();
        if done && relayed.chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
        if !out.is_empty() {
            client
                .write_all(&out)
                .await
                .map_err(|_| ResponseError::ClientGone)?;
            clock.progress(); // the client took it
            clock
                .bytes_out
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
        }
        if done {
            client
                .flush()
                .await
                .map_err(|_| ResponseError::ClientGone)?;
            return Ok(Ended {
                keep_alive: relayed.keep_alive,
                // Bytes beyond the response, or a body framed by the close: no.
                reusable: reusable && buf.is_empty() && relayed.framing != Framing::UntilClose,
            });
        }
        if eof {
            return Err(ResponseError::Cut); // the upstream died mid-body
        }
        buf.reserve(BODY_BUFFER.saturating_sub(buf.len()).max(4096));
        match upstream.read_buf(&mut buf).await {
            Ok(0) => eof = true,
            // A TLS upstream that closed its TCP connection without close_notify:
            // an end, as for TCP (as the relay takes it, and nginx and HAProxy
            // do). A body it ends early is still cut (its framing is not done);
            // one framed by the close was cut with an RST (the upstream probe).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => eof = true,
            Ok(_) => clock.progress(),
            Err(_) => return Err(ResponseError::Cut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopwatch_dataplane_core::head::HeadLimits;
    use tokio::io::{duplex, DuplexStream};

    fn limits(timeout: Duration) -> Limits {
        Limits {
            head: HeadLimits::default(),
            early_data_size: 1024,
            error_body_size: 1024,
            max_message_size: None,
            handshake_timeout: timeout,
            keepalive_timeout: timeout,
            connect_timeout: timeout,
            idle_timeout: None,
            body_timeout: timeout,
            response_timeout: timeout,
            response_idle_timeout: timeout,
            max_connections: 10,
            max_connections_per_address: None,
            max_heads_per_address: None,
        }
    }

    fn get(head: &[u8]) -> Request {
        Request {
            head: head.to_vec(),
            framing: BodyFraming::None,
            early: Vec::new(),
            keep_alive: true,
            expect_continue: false,
            head_only: false,
            version: Version::Http11,
            retryable: true,
            logged: None,
        }
    }

    /// A connect that hands out these streams, one per call, and counts calls.
    fn connects(
        streams: Vec<DuplexStream>,
    ) -> impl FnMut() -> std::future::Ready<std::io::Result<DuplexStream>> {
        let mut streams = streams.into_iter();
        move || std::future::ready(streams.next().ok_or(std::io::ErrorKind::NotFound.into()))
    }

    /// A backend on `stream`: reads one request head, checks it, answers.
    async fn backend(mut stream: DuplexStream, expect: &'static [u8], answer: &'static [u8]) {
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
            got.push(byte[0]);
        }
        assert_eq!(got, expect);
        stream.write_all(answer).await.unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await; // until the proxy drops it
    }

    #[tokio::test]
    async fn a_chunked_answer_broken_from_its_first_chunk_is_a_502() {
        let (mut client, mut proxy_side) = duplex(1 << 16);
        let (upstream, backend_side) = duplex(1 << 16);
        let head = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n";
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n";
        let serving = tokio::spawn(backend(backend_side, head, answer));
        let done = exchange(
            &mut proxy_side,
            connects(vec![upstream]),
            None,
            &get(head),
            &limits(Duration::from_secs(5)),
            || false,
        )
        .await;
        match done.outcome {
            Outcome::Answer { status, .. } => assert_eq!(status, 502),
            other => panic!("expected a 502, got {other:?}"),
        }
        assert_eq!(done.sent.status, None, "no byte of the 200 went out");
        drop(done);
        drop(proxy_side);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty(), "{out:?}");
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_chunked_answer_is_chunked_anew_and_the_connection_handed_back() {
        let (mut client, mut proxy_side) = duplex(1 << 16);
        let (upstream, backend_side) = duplex(1 << 16);
        let head = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n";
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n\
            3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n";
        let serving = tokio::spawn(backend(backend_side, head, answer));
        let request = get(head);
        let done = exchange(
            &mut proxy_side,
            connects(vec![upstream]),
            None,
            &request,
            &limits(Duration::from_secs(5)),
            || false,
        )
        .await;
        assert_eq!(done.outcome, Outcome::KeepAlive);
        assert!(done.upstream.is_some());
        let sent = done.sent;
        drop(done);
        drop(proxy_side);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        // What the access line says went through: the status and every byte.
        assert_eq!(
            sent,
            Sent {
                status: Some(200),
                bytes_in: 0,
                bytes_out: out.len() as u64
            }
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_reused_connection_closed_before_answering_is_retried_once() {
        let (_client, mut proxy_side) = duplex(1 << 16);
        let (stale, closed) = duplex(64);
        drop(closed); // the upstream closed it while it was idle
        let (fresh, backend_side) = duplex(1 << 16);
        let head = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n";
        let serving = tokio::spawn(backend(
            backend_side,
            head,
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ));
        let done = exchange(
            &mut proxy_side,
            connects(vec![fresh]),
            Some(stale),
            &get(head),
            &limits(Duration::from_secs(5)),
            || false,
        )
        .await;
        assert_eq!(done.outcome, Outcome::KeepAlive);
        drop(done);
        serving.await.unwrap();
        // Not idempotent and bodiless: the failure is the answer.
        let (stale, closed) = duplex(64);
        drop(closed);
        let mut post = get(b"POST / HTTP/1.1\r\nHost: b\r\n\r\n");
        post.retryable = false;
        let done = exchange(
            &mut proxy_side,
            connects(vec![]),
            Some(stale),
            &post,
            &limits(Duration::from_secs(5)),
            || false,
        )
        .await;
        assert_eq!(
            done.outcome,
            upstream_failed(UPSTREAM_CLOSED, "before answering".into())
        );
    }

    #[tokio::test]
    async fn a_silent_body_is_408_and_a_silent_upstream_504() {
        let (_client, mut proxy_side) = duplex(1 << 16);
        let (upstream, _backend_side) = duplex(1 << 16);
        let mut request = get(b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 10\r\n\r\n");
        request.framing = BodyFraming::Length(10);
        request.early = b"abc".to_vec();
        let done = exchange(
            &mut proxy_side,
            connects(vec![upstream]),
            None,
            &request,
            &limits(Duration::from_millis(50)),
            || false,
        )
        .await;
        assert_eq!(
            done.outcome,
            answer(
                408,
                "loopwatch: request body timeout",
                Some(Rejected::BodyTimeout)
            )
        );
        let (upstream, _backend_side) = duplex(1 << 16);
        let done = exchange(
            &mut proxy_side,
            connects(vec![upstream]),
            None,
            &get(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"),
            &limits(Duration::from_millis(50)),
            || false,
        )
        .await;
        assert_eq!(done.outcome, upstream_timed_out(NO_RESPONSE_HEAD));
    }

    #[test]
    fn phases_move_as_the_table_says() {
        let clock = Clock::new(Phase::Body);
        assert!(!clock.enter(Phase::Body));
        assert!(clock.enter(Phase::Response));
        assert!(!clock.enter(Phase::AwaitHead)); // the request pump, too late
        assert_eq!(clock.phase(), Phase::Response);
        assert!(clock.enter(Phase::Done));
        assert!(!clock.enter(Phase::Response));
        for (from, to) in TRANSITIONS {
            assert!(from.can_move(to));
            assert!(!to.can_move(from));
        }
    }
}
