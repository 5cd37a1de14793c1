//! The native listener: a tokio multi-thread runtime, the accept loop, the
//! live connections and their orderly stop.
//!
//! Python starts it and stops it; nothing on the connection path ever takes
//! the GIL. Connections read the enforcement table (lock-free), emit events
//! into the bounded queue (`try_send`), and count what they refuse in
//! atomics the brain reads at scrape time.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify};

use loopwatch_dataplane_core::events::{
    Event, EventSender, LogLimiter, RefuseReason, RequestRejected, REJECTION_LOG_INTERVAL,
};
use loopwatch_dataplane_core::frames::Side;
use loopwatch_dataplane_core::head::HeadLimits;
use loopwatch_dataplane_core::identity::Identity;
use loopwatch_dataplane_core::table::EnforcementTable;
use loopwatch_dataplane_core::trace::Sampling;

use tokio_rustls::TlsAcceptor;

use crate::checks::SignatureChecks;
use crate::conn;
use crate::control::{AddressCaps, Addresses, CloseCommand, Holds, Policy, PolicyValues, Relays};
use crate::pool::{Pool, SWEEP_EVERY};
use crate::requests::RequestCounts;
use crate::tls::UpstreamTls;
use crate::transport::{out_of_descriptors, FD_LIMIT};
use crate::wire::{simple_response, Route};

/// Pending connections the kernel queues for the accept loop.
const BACKLOG: u32 = 1024;
/// The blocking pool's threads per worker (tokio's default is 512 in all).
/// Upstream name lookups (`dial::connect` resolves a host name
/// there; an address literal needs none) and JWT signature checks (at most
/// one per worker at a time: `SignatureChecks`) run there; a burst of
/// connects to a slow resolver would otherwise start up to 512 threads, each
/// with its stack. Tasks beyond the bound wait in tokio's queue (within
/// their phase's deadline).
const BLOCKING_PER_WORKER: usize = 4;
/// After an accept error (out of descriptors, say), wait this long before the
/// next accept rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Why the native listener answered (or cut) a request itself: the `reason`
/// label of loopwatch_requests_rejected_total (`RejectedReason` in
/// proxy/dataplane/boundary.py). A TLS handshake that failed on the listener
/// is one too: no request came, and an expired certificate or a flood of
/// stalled handshakes must show where the other early refusals do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    BadRequest,
    HeadTooLarge,
    HeadTimeout,
    BodyTimeout,
    UpstreamTimeout,
    ResponseTimeout,
    Version,
    UpgradeRequired,
    UpgradeWithBody,
    NotImplemented,
    NoRoute,
    Overload,
    AddressLimit,
    ShuttingDown,
    FdLimit,
    /// The client's TLS handshake failed: no common version or cipher suite,
    /// a malformed record, the client refused the certificate, or it left
    /// mid-handshake. Cut.
    TlsError,
    /// A plain request from a client `policy.deny` names: 403 (a WebSocket
    /// attempt's deny is the table's refusal, with its retry time).
    Deny,
    /// A plain request's upstream failed before its response: unreachable,
    /// its TLS handshake, closed without answering, or answered something that
    /// is no HTTP/1.1 response: 502. (An upgrade's is a HandshakeFailed.)
    UpstreamError,
    /// A plain request's upstream ended its response mid-body (closed, or
    /// broke its framing): the client's connection was cut.
    UpstreamCut,
    /// The TLS handshake not complete within `limits.handshake_timeout`: cut.
    TlsTimeout,
    /// The first byte was no TLS handshake record (plain HTTP on the TLS
    /// port): answered 400 in plain text.
    NotTls,
}

impl Rejected {
    pub const ALL: [Rejected; 21] = [
        Rejected::BadRequest,
        Rejected::HeadTooLarge,
        Rejected::HeadTimeout,
        Rejected::BodyTimeout,
        Rejected::UpstreamTimeout,
        Rejected::ResponseTimeout,
        Rejected::Version,
        Rejected::UpgradeRequired,
        Rejected::UpgradeWithBody,
        Rejected::NotImplemented,
        Rejected::NoRoute,
        Rejected::Overload,
        Rejected::AddressLimit,
        Rejected::ShuttingDown,
        Rejected::FdLimit,
        Rejected::TlsError,
        Rejected::TlsTimeout,
        Rejected::NotTls,
        Rejected::Deny,
        Rejected::UpstreamError,
        Rejected::UpstreamCut,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejected::BadRequest => "bad_request",
            Rejected::HeadTooLarge => "head_too_large",
            Rejected::HeadTimeout => "head_timeout",
            Rejected::BodyTimeout => "body_timeout",
            Rejected::UpstreamTimeout => "upstream_timeout",
            Rejected::ResponseTimeout => "response_timeout",
            Rejected::Version => "version",
            Rejected::UpgradeRequired => "upgrade_required",
            Rejected::UpgradeWithBody => "upgrade_with_body",
            Rejected::NotImplemented => "not_implemented",
            Rejected::NoRoute => "no_route",
            Rejected::Overload => "overload",
            Rejected::AddressLimit => "address_limit",
            Rejected::ShuttingDown => "shutting_down",
            Rejected::FdLimit => "fd_limit",
            Rejected::TlsError => "tls_error",
            Rejected::TlsTimeout => "tls_timeout",
            Rejected::NotTls => "not_tls",
            Rejected::Deny => "deny",
            Rejected::UpstreamError => "upstream_error",
            Rejected::UpstreamCut => "upstream_cut",
        }
    }

    /// The headers its answer carries: `Retry-After: 1` for the refusals of
    /// a capacity that frees up (connections, an address's share, open
    /// files), none for the others (a bad request is not better later; a
    /// draining replica will not come back).
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Rejected::Overload | Rejected::AddressLimit | Rejected::FdLimit => {
                &[("Retry-After", "1")]
            }
            _ => &[],
        }
    }

    pub fn from_head(reason: loopwatch_dataplane_core::head::RejectReason) -> Rejected {
        use loopwatch_dataplane_core::head::RejectReason as R;
        match reason {
            R::BadRequest => Rejected::BadRequest,
            R::HeadTooLarge => Rejected::HeadTooLarge,
            R::Version => Rejected::Version,
            R::UpgradeRequired => Rejected::UpgradeRequired,
            R::UpgradeWithBody => Rejected::UpgradeWithBody,
            R::NotImplemented => Rejected::NotImplemented,
        }
    }

    fn index(self) -> usize {
        Rejected::ALL
            .iter()
            .position(|&r| r == self)
            .expect("every label is in ALL")
    }
}

fn refuse_index(reason: RefuseReason) -> usize {
    RefuseReason::ALL
        .iter()
        .position(|&r| r == reason)
        .expect("every reason is in ALL")
}

/// Which rejections also make a `request_rejected` log line: at most one per
/// reason per `REJECTION_LOG_INTERVAL`, decided here, on the connection's
/// task, so that a flood of bad requests costs an atomic each and puts at
/// most one line per reason per interval in the event queue (the brain writes them:
/// `NativePlane` in proxy/app/planes.py).
#[derive(Debug)]
pub struct RejectionLog(LogLimiter<{ Rejected::ALL.len() }>);

impl Default for RejectionLog {
    fn default() -> Self {
        RejectionLog(LogLimiter::new(REJECTION_LOG_INTERVAL))
    }
}

/// What the listener did, read by the brain at scrape time.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Client connections now, in any state.
    pub active: AtomicUsize,
    /// Relayed WebSockets now.
    pub relays: AtomicUsize,
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub handshake_failed: AtomicU64,
    rejected: [AtomicU64; Rejected::ALL.len()],
    refused: [AtomicU64; RefuseReason::ALL.len()],
    /// Relayed connections a side broke the protocol on (a frame passed on
    /// unparsed for the other side to answer): client, upstream.
    protocol_errors: [AtomicU64; 2],
    rejection_log: RejectionLog,
}

impl Counters {
    pub fn protocol_error(&self, side: Side) {
        let i = match side {
            Side::Client => 0,
            Side::Upstream => 1,
        };
        self.protocol_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn protocol_errors(&self) -> Vec<(&'static str, u64)> {
        let [client, upstream] = &self.protocol_errors;
        vec![
            ("client", client.load(Ordering::Relaxed)),
            ("upstream", upstream.load(Ordering::Relaxed)),
        ]
    }

    pub fn reject(&self, reason: Rejected) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refuse(&self, reason: RefuseReason) {
        self.refused[refuse_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self) -> Vec<(&'static str, u64)> {
        Rejected::ALL
            .iter()
            .map(|r| (r.label(), self.rejected[r.index()].load(Ordering::Relaxed)))
            .collect()
    }

    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        RefuseReason::ALL
            .iter()
            .map(|r| {
                (
                    r.as_str(),
                    self.refused[refuse_index(*r)].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// The limits of `limits:` the native listener applies (proxy/dataplane/settings.py).
#[derive(Debug, Clone)]
pub struct Limits {
    pub head: HeadLimits,
    pub early_data_size: usize,
    pub error_body_size: usize,
    pub max_message_size: Option<u64>,
    pub handshake_timeout: Duration,
    /// A keep-alive connection idle between two plain requests: closed
    /// quietly after this long without a byte of the next one.
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// A plain request's body: silence allowed from the client (408), or
    /// from an upstream that takes none of it (504).
    pub body_timeout: Duration,
    /// A plain request's response head, once the request is sent (504).
    pub response_timeout: Duration,
    /// A plain response's body: silence allowed from the upstream, or from a
    /// client that reads none of it (the connection is cut).
    pub response_idle_timeout: Duration,
    pub max_connections: usize,
    /// `limits.max_connections_per_address` (None: off).
    pub max_connections_per_address: Option<usize>,
    /// `limits.max_heads_per_address` (None: off).
    pub max_heads_per_address: Option<usize>,
}

/// What a reload may change of the listener, swapped whole
/// (`Shared::set_config`) and read once by each accepted connection
/// (`Shared::config`): a connection keeps the configuration of its accept for
/// its life (its keep-alive requests, its splice), new connections take the
/// new one. What cannot change on a running listener: its address and its
/// threads.
#[derive(Clone)]
pub struct Config {
    /// Longest prefix first.
    pub routes: Vec<Route>,
    pub limits: Limits,
    /// Who a client is (the identity sources, trusted proxies, JWT keys);
    /// its trusted proxies are also the addresses no per-address cap counts.
    pub identity: Arc<Identity>,
    /// `tls:`: the listener terminates TLS (`https` in X-Forwarded-Proto).
    pub tls: Option<TlsAcceptor>,
    /// `upstream_tls:`, for the `wss://` and `https://` routes (None when
    /// there is none).
    pub upstream_tls: Option<Arc<UpstreamTls>>,
    /// The share of plain requests that make an `access` line (0: none, the
    /// default; 1: all): `telemetry.access_log` and its sample rate.
    pub access_log_share: f64,
}

/// What every connection task shares.
pub struct Shared {
    /// The configuration now (a reload swaps it): read with `config()` at
    /// accept, and again at each next request of a keep-alive connection.
    config: ArcSwap<Config>,
    pub table: Arc<EnforcementTable>,
    pub events: EventSender,
    pub counters: Counters,
    /// The refusal policy now (a reload changes it).
    pub policy: Policy,
    /// Tracing on: how spans are sampled (the connection span's context is
    /// decided at the attempt, `tracing`); None: off (no `traceparent` added,
    /// the client's passes as sent). From the OTEL_* environment at start:
    /// not part of `Config`, a reload keeps it.
    pub tracing: Option<Sampling>,
    pub holds: Holds,
    pub relays: Arc<Relays>,
    pub addresses: Arc<Addresses>,
    pub shutdown: watch::Receiver<bool>,
    /// Idle upstream connections of plain HTTP (`pool`).
    pub pool: Pool,
    /// The plain requests each route forwarded (by name, for the
    /// listener's life: a reload keeps them).
    pub requests: RequestCounts,
    /// Turns for asymmetric JWT signature checks on the blocking pool (as
    /// many as the data plane's threads; `conn::check_signature`).
    pub signature_checks: SignatureChecks,
    next_conn_id: AtomicU64,
    drained: Notify,
}

impl Shared {
    pub fn conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The configuration now: a connection reads it at accept (a WebSocket
    /// keeps it for its life), and at each next plain request.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// A reload: connections accepted from now on use `config`; those open
    /// keep theirs. The per-address caps and their exempt trusted proxies
    /// change at once (a connection already counted stays counted), and the
    /// idle upstream connections of plain HTTP are closed (they were opened
    /// under the old routes and `upstream_tls:`).
    pub fn set_config(&self, mut config: Config) {
        self.requests.attach(&mut config.routes);
        self.addresses.set_caps(address_caps(&config));
        self.config.store(Arc::new(config));
        self.pool.clear();
    }

    pub fn closing(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// A request loopwatch answered (`status`) or cut (None) itself, before
    /// the engine saw it: counted by `reason`, and logged when its reason's
    /// interval allows (a line lost to a full queue is retried by the next
    /// rejection of that reason, with the count it carried).
    pub fn rejected(&self, reason: Rejected, status: Option<u16>, peer: IpAddr, message: &str) {
        let counters = &self.counters;
        counters.reject(reason);
        let log = &counters.rejection_log.0;
        let Some(suppressed) = log.admit(reason.index(), Instant::now()) else {
            return;
        };
        let line = RequestRejected {
            reason: reason.label(),
            status,
            peer: peer.to_string().into(),
            message: message.into(),
            suppressed,
            at: Instant::now(),
        };
        if !self.events.send(Event::RequestRejected(Box::new(line))) {
            log.undo(reason.index(), suppressed);
        }
    }
}

/// One client connection, counted in `active` from accept to its end.
pub struct ConnGuard {
    shared: Arc<Shared>,
    /// `active` with this connection, as its accept made it: `limits.max_connections`
    /// is judged on this, in accept order. (Read later, in the connection's
    /// task, `active` may already count connections accepted after it: two
    /// tasks that ran late would both see the same excess and both refuse.)
    active_at_accept: usize,
}

impl ConnGuard {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn active_at_accept(&self) -> usize {
        self.active_at_accept
    }

    fn new(shared: &Arc<Shared>) -> ConnGuard {
        let before = shared.counters.active.fetch_add(1, Ordering::AcqRel);
        ConnGuard {
            shared: Arc::clone(shared),
            active_at_accept: before + 1,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.shared.counters.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.drained.notify_waiters();
        }
    }
}

/// Resolves once the listener is stopping (the watch's guard is not kept).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let stop = stopping(&mut shutdown);
    tokio::pin!(stop);
    let mut reserve = Reserve::taken();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let guard = ConnGuard::new(&shared);
                    tokio::spawn(conn::serve(Arc::clone(&shared), stream, peer, guard));
                }
                Err(e) => {
                    shared.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if out_of_descriptors(&e) && reserve.answer_one(&listener, &shared).await {
                        continue; // the next one in the backlog, at once
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    reserve.take();
                }
            },
        }
    }
    // The listening socket closes here: new connections are refused by the kernel.
}

/// One descriptor held in reserve for when the process runs out of them
/// (the remedy libuv and others use). Out of descriptors, the kernel keeps
/// new connections in the listen backlog, where they wait unanswered until
/// their client gives up, however many times the accept is retried. With the
/// reserve given up, one of them is accepted and answered `503` with
/// `Retry-After` (closed at once on a TLS listener: no handshake for it),
/// counted as `fd_limit`, and the reserve taken back: the backlog drains with
/// answers while the limit lasts.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn taken() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Hold the descriptor again if it is not held (it may fail while the
    /// process is out of them: tried again after the next error).
    fn take(&mut self) {
        if self.0.is_none() {
            *self = Reserve::taken();
        }
    }

    /// Give the reserve up, accept one connection with it if one is waiting,
    /// answer it, and take the reserve back. True when one was answered (the
    /// next may be waiting too). Out of descriptors, accept fails whether or
    /// not a connection waits, so this takes only one already there: a
    /// connection that comes later may find descriptors again.
    async fn answer_one(&mut self, listener: &TcpListener, shared: &Shared) -> bool {
        if self.0.take().is_none() {
            return false;
        }
        // One try with the task's own context: Pending (nothing waiting, or
        // the task's scheduling budget spent) is "none".
        let accepted = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match listener.poll_accept(cx) {
                std::task::Poll::Ready(Ok(accepted)) => Some(accepted),
                _ => None,
            })
        })
        .await;
        let answered = accepted.is_some();
        if let Some((stream, peer)) = &accepted {
            let answer = shared.config().tls.is_none();
            shared.rejected(
                Rejected::FdLimit,
                answer.then_some(503),
                peer.ip(),
                FD_LIMIT,
            );
            if answer {
                // A few hundred bytes into an empty send buffer: one try, no wait.
                let _ =
                    stream.try_write(&simple_response(503, FD_LIMIT, Rejected::FdLimit.headers()));
            }
        }
        drop(accepted); // closes it, freeing the descriptor for the reserve
        self.take();
        answered
    }
}

/// Close idle upstream connections once they expire, until the listener stops.
async fn sweep_pool(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let stop = stopping(&mut shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(SWEEP_EVERY) => shared.pool.sweep(),
        }
    }
}

/// The per-address caps of a configuration (`limits:`), with the trusted
/// proxies (`identity.trusted_proxies`: they carry many clients'
/// connections) exempt.
fn address_caps(config: &Config) -> AddressCaps {
    AddressCaps::new(
        config.limits.max_connections_per_address,
        config.limits.max_heads_per_address,
        config.identity.trusted_proxies().to_vec(),
    )
}

/// A running listener: its runtime, its address and its stop switch.
pub struct Server {
    runtime: Option<Runtime>,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    pub local_addr: SocketAddr,
}

impl Server {
    /// Build the runtime with `threads` workers, bind `addr` and start
    /// accepting. Errors: the runtime could not start or the address could
    /// not be bound.
    pub fn start(
        addr: SocketAddr,
        threads: usize,
        config: Config,
        policy: PolicyValues,
        tracing: Option<Sampling>,
        table: Arc<EnforcementTable>,
        events: EventSender,
    ) -> std::io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(threads.max(1) * BLOCKING_PER_WORKER)
            .thread_name("loopwatch-dataplane")
            .enable_all()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(BACKLOG)?
        };
        let local_addr = listener.local_addr()?;
        let (stop, shutdown) = watch::channel(false);
        let addresses = Addresses::new(address_caps(&config));
        let requests = RequestCounts::default();
        let mut config = config;
        requests.attach(&mut config.routes);
        let shared = Arc::new(Shared {
            policy: Policy::new(policy),
            tracing,
            config: ArcSwap::from_pointee(config),
            table,
            events,
            counters: Counters::default(),
            holds: Holds::default(),
            relays: Arc::new(Relays::default()),
            addresses: Arc::new(addresses),
            shutdown,
            pool: Pool::default(),
            requests,
            signature_checks: SignatureChecks::new(threads.max(1)),
            next_conn_id: AtomicU64::new(1),
            drained: Notify::new(),
        });
        runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        runtime.spawn(sweep_pool(Arc::clone(&shared)));
        Ok(Server {
            runtime: Some(runtime),
            shared,
            stop,
            local_addr,
        })
    }

    /// The runtime's handle while it runs (a probe's task goes there).
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Stop accepting, end every connection as fits its state (WebSockets:
    /// close 1001 on both legs), wait up to `grace` for them, then stop the
    /// runtime (what is left is dropped). Blocks: call it without the GIL.
    /// Returns the connections that were still open at the end of the grace.
    pub fn stop(&mut self, grace: Duration) -> usize {
        let Some(runtime) = self.runtime.take() else {
            return 0;
        };
        let _ = self.stop.send(true);
        // The relays' own grace ends just before the drain's: a peer still
        // silent is reset by its relay, which reports the connection's end
        // (Closed) before the runtime stops.
        self.shared
            .relays
            .close_all(shutdown_close(grace.saturating_sub(DRAIN_MARGIN)));
        let shared = Arc::clone(&self.shared);
        let left = runtime.block_on(async move {
            shared.pool.clear(); // idle upstream connections end now
            let wait = async {
                loop {
                    let drained = shared.drained.notified();
                    tokio::pin!(drained);
                    drained.as_mut().enable();
                    if shared.counters.active.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    drained.await;
                }
            };
            let _ = tokio::time::timeout(grace, wait).await;
            shared.pool.clear(); // and any an exchange put back meanwhile
            shared.counters.active.load(Ordering::Acquire)
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        left
    }
}

/// What the relays leave of the drain's grace for their ends to be reported.
const DRAIN_MARGIN: Duration = Duration::from_millis(200);

/// The drain's close of every WebSocket, both legs: the peers' answers, and
/// a frame in flight (an upload), have `grace` (`limits.shutdown_timeout`,
/// less `DRAIN_MARGIN`).
fn shutdown_close(grace: Duration) -> CloseCommand {
    CloseCommand {
        code: 1001,
        reason: crate::conn::SHUTTING_DOWN.to_owned(),
        grace,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let _ = self.stop.send(true);
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RejectWith;

    #[test]
    fn only_refusals_of_a_capacity_that_frees_up_say_when_to_retry() {
        let retrying: Vec<&str> = Rejected::ALL
            .iter()
            .filter(|r| r.headers() == [("Retry-After", "1")])
            .map(|r| r.label())
            .collect();
        assert_eq!(retrying, ["overload", "address_limit", "fd_limit"]);
        assert!(Rejected::ALL
            .iter()
            .all(|r| r.headers().is_empty() || retrying.contains(&r.label())));
    }

    fn size_of_future<F: std::future::Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task holds its whole future for its life: TLS state
    /// (a rustls connection is over 1 KiB; a splice of two TLS streams over
    /// 3 KiB) is boxed, so that plain connections do not pay for it. Before
    /// TLS the future was 4488 bytes; with the TLS state inline, 18840; boxed,
    /// 4872 (the test profile, rustc 1.95). Since the splice is a task of its
    /// own (`conn::forward`), the relay's future is no longer part of it: 3552
    /// (release 3456), and it is freed once the connection is spliced.
    /// A listener's shared state for a test: `routes`, `identity`, the
    /// handshake timeout, and `checks` turns for signature checks.
    fn test_shared(
        events: EventSender,
        shutdown: watch::Receiver<bool>,
        routes: Vec<crate::wire::Route>,
        identity: Identity,
        handshake_timeout: Duration,
        checks: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            config: ArcSwap::from_pointee(Config {
                routes,
                limits: Limits {
                    head: HeadLimits {
                        max_head_size: 16384,
                    },
                    early_data_size: 1,
                    error_body_size: 1,
                    max_message_size: None,
                    handshake_timeout,
                    keepalive_timeout: handshake_timeout,
                    connect_timeout: Duration::from_secs(1),
                    idle_timeout: None,
                    body_timeout: Duration::from_secs(1),
                    response_timeout: Duration::from_secs(1),
                    response_idle_timeout: Duration::from_secs(1),
                    max_connections: 1024,
                    max_connections_per_address: None,
                    max_heads_per_address: None,
                },
                identity: Arc::new(identity),
                tls: None,
                upstream_tls: None,
                access_log_share: 0.0,
            }),
            table: Arc::new(EnforcementTable::default()),
            events,
            counters: Counters::default(),
            policy: Policy::new(PolicyValues {
                reject_with: RejectWith::Http429,
                close_code: 1013,
                max_holds: 1,
                max_held_per_key: 1,
            }),
            tracing: None,
            holds: Holds::default(),
            relays: Arc::new(Relays::default()),
            addresses: Arc::new(Addresses::new(AddressCaps::new(None, None, Vec::new()))),
            shutdown,
            pool: Pool::default(),
            requests: RequestCounts::default(),
            signature_checks: SignatureChecks::new(checks),
            next_conn_id: AtomicU64::new(1),
            drained: Notify::new(),
        })
    }

    /// `test_shared` with clients known by their address alone, one
    /// signature check at a time.
    fn by_address_shared(
        events: EventSender,
        shutdown: watch::Receiver<bool>,
        routes: Vec<crate::wire::Route>,
        handshake_timeout: Duration,
    ) -> Arc<Shared> {
        let identity =
            Identity::new(&loopwatch_dataplane_core::identity::IdentitySpec::by_address()).unwrap();
        test_shared(events, shutdown, routes, identity, handshake_timeout, 1)
    }

    /// A WebSocket backend for `churn_through_the_real_code`: it answers each
    /// upgrade 101, then echoes one small client frame (unmasked) and waits
    /// for the close.
    async fn echo_backend(listener: TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let key = head
                    .split(|&b| b == b'\n')
                    .find_map(|line| line.strip_prefix(b"Sec-WebSocket-Key: "))
                    .and_then(|key| key.strip_suffix(b"\r"))
                    .expect("a Sec-WebSocket-Key");
                let accept = loopwatch_dataplane_core::head::accept_key(key);
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
                // A masked two-byte text frame: 2 + 4 + 2 bytes.
                let mut frame = [0u8; 8];
                if stream.read_exact(&mut frame).await.is_err() {
                    return;
                }
                let payload = [frame[6] ^ frame[2], frame[7] ^ frame[3]];
                let _ = stream.write_all(&[0x81, 2, payload[0], payload[1]]).await;
                let _ = stream.read(&mut chunk).await;
            });
        }
    }

    /// One churn cycle, as the benchmark's (tests/benchmarks/loadgen.py):
    /// connect, upgrade with an unverified token naming the client (`jwt:sub`),
    /// one echo, close; or, for a deny-listed client (no token), the 429
    /// refusal read to its end.
    async fn churn_cycle(addr: SocketAddr, denied: bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // {"alg":"HS256","typ":"JWT"}.{"sub": "churn-1-0-17"}.sig
        const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
            eyJzdWIiOiAiY2h1cm4tMS0wLTE3In0.c2ln";
        let target = if denied {
            "/refuse".to_owned()
        } else {
            format!("/echo?token={TOKEN}")
        };
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            addr.port()
        );
        client.write_all(request.as_bytes()).await.unwrap();
        if denied {
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 429 "), "{answer:?}");
            return;
        }
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            client.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        client
            .write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
            .await
            .unwrap();
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [0x81, 2, b'h', b'i']);
    }

    /// `LOOPWATCH_CHURN` upgrades (default 20), then `LOOPWATCH_CHURN_REFUSED`
    /// deny-listed 429s (default as many), through the real connection code
    /// on one thread: the harness for
    /// instruction and allocation counts (docs/performance.md, "The data
    /// plane's user space per connection"), e.g. under
    /// `valgrind --tool=dhat` or `--tool=callgrind`.
    #[tokio::test]
    async fn churn_through_the_real_code() {
        let count_of = |name: &str, default: usize| -> usize {
            std::env::var(name)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(default)
        };
        let cycles = count_of("LOOPWATCH_CHURN", 20);
        let refusals = count_of("LOOPWATCH_CHURN_REFUSED", cycles);
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_port = backend.local_addr().unwrap().port();
        tokio::spawn(echo_backend(backend));
        let (events, rx) =
            loopwatch_dataplane_core::events::event_queue(8 * (cycles + refusals) + 64);
        let (_stop, shutdown) = watch::channel(false);
        // config/loopwatch.yaml's identity: an unverified JWT's sub, else the address.
        let identity = Identity::new(&loopwatch_dataplane_core::identity::IdentitySpec {
            sources: vec!["jwt:sub".to_owned(), "ip".to_owned()],
            jwt: loopwatch_dataplane_core::identity::jwt::JwtSpec {
                query_params: vec!["token".to_owned(), "access_token".to_owned()],
                subprotocol: true,
                leeway: 30.0,
                ..Default::default()
            },
            ..loopwatch_dataplane_core::identity::IdentitySpec::by_address()
        })
        .unwrap();
        let route = crate::wire::Route::loopback(backend_port, false);
        let shared = test_shared(
            events,
            shutdown,
            vec![route],
            identity,
            Duration::from_secs(10),
            1,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let guard = ConnGuard::new(&accepting);
                tokio::spawn(conn::serve(Arc::clone(&accepting), stream, peer, guard));
            }
        });
        let bounded = async {
            for _ in 0..cycles {
                churn_cycle(addr, false).await;
            }
            shared.table.update(|snapshot| {
                snapshot.deny =
                    loopwatch_dataplane_core::table::AccessList::parse(["127.0.0.1/32"]).unwrap();
            });
            for _ in 0..refusals {
                churn_cycle(addr, true).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), bounded)
            .await
            .expect("the cycles within the test's bound");
        let events = rx.try_batch(usize::MAX);
        let count = |name: &str| events.iter().filter(|e| e.type_name() == name).count();
        assert_eq!(count("attempt"), cycles + refusals);
        assert_eq!(count("opened"), cycles);
        assert_eq!(count("rejected"), refusals);
        // The upgrades were identified by their token, bound to the address.
        let opened = events.iter().filter(|e| e.type_name() == "opened");
        assert!(opened
            .clone()
            .all(|e| e.key() == Some("churn-1-0-17@127.0.0.1")));
    }

    /// A connection's task before its splice: waiting for its head, held in
    /// a refusal, or forwarding a plain request. It carries neither the TLS
    /// variants' state nor the upstream handshake's (both boxed): on rustc
    /// 1.95, test profile, 3 200 bytes (4 752 with the handshake inline).
    #[tokio::test]
    async fn a_plain_connection_future_carries_no_tls_state() {
        let (events, _rx) = loopwatch_dataplane_core::events::event_queue(16);
        let (_stop, shutdown) = watch::channel(false);
        let shared = by_address_shared(events, shutdown, Vec::new(), Duration::from_secs(1));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let serve = conn::serve(Arc::clone(&shared), stream, addr, ConnGuard::new(&shared));
        let size = size_of_future(&serve);
        eprintln!("a connection's future is {size} bytes");
        assert!(size <= 3328, "a connection's future is {size} bytes");
    }
    /// An IPv4 client of a dual-stack listener (its address IPv4-mapped) is
    /// told to the upstream, and judged, by its IPv4 address.
    #[tokio::test]
    async fn an_ipv4_mapped_peer_is_its_ipv4_address() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let route = crate::wire::Route::loopback(upstream.local_addr().unwrap().port(), false);
        let (events, _rx) = loopwatch_dataplane_core::events::event_queue(16);
        let (_stop, shutdown) = watch::channel(false);
        let shared = by_address_shared(events, shutdown, vec![route], Duration::from_secs(5));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let mapped = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), peer.port());
        tokio::spawn(conn::serve(
            Arc::clone(&shared),
            accepted,
            mapped,
            ConnGuard::new(&shared),
        ));
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .await
            .unwrap();
        let (mut backend, _) = tokio::time::timeout(Duration::from_secs(5), upstream.accept())
            .await
            .unwrap()
            .unwrap();
        let mut head = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), backend.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(
            head.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"),
            "{head}"
        );
    }

    /// A token whose signature check gets no turn (none is free: here there
    /// are none at all) waits within the head's deadline, then is answered
    /// 408 and counted as `head_timeout`, as a head that took too long.
    #[tokio::test]
    async fn a_signature_check_without_a_turn_ends_at_the_handshake_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const P256_PEM: &str = "-----BEGIN PUBLIC KEY-----\n\
            MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEjlM7b6C/e0YluzBmfAH7YH75+Lio\n\
            D+9bMAYocDGHsqNz6x294DMYNm0Gn4Om9ZAAU8c2M8sEGyHFXhqGwfQAtA==\n\
            -----END PUBLIC KEY-----\n";
        // alg ES256, sub alice, a signature of zeros: it needs the check.
        const TOKEN: &str = "eyJhbGciOiAiRVMyNTYifQ.eyJzdWIiOiAiYWxpY2UifQ.\
            AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let (events, _rx) = loopwatch_dataplane_core::events::event_queue(16);
        let (_stop, shutdown) = watch::channel(false);
        let identity = Identity::new(&loopwatch_dataplane_core::identity::IdentitySpec {
            sources: vec!["jwt:sub".to_owned(), "ip".to_owned()],
            jwt: loopwatch_dataplane_core::identity::jwt::JwtSpec {
                query_params: Vec::new(),
                subprotocol: false,
                verify: true,
                algorithms: vec!["ES256".to_owned()],
                public_key_pem: Some(P256_PEM.as_bytes().to_vec()),
                leeway: 30.0,
                ..Default::default()
            },
            ..loopwatch_dataplane_core::identity::IdentitySpec::by_address()
        })
        .unwrap();
        // Never connected to: the attempt ends before the upstream.
        let route = crate::wire::Route::loopback(9, false);
        let shared = test_shared(
            events,
            shutdown,
            vec![route],
            identity,
            Duration::from_millis(300),
            0,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let serve = tokio::spawn(conn::serve(
            Arc::clone(&shared),
            accepted,
            peer,
            ConnGuard::new(&shared),
        ));
        let head = format!(
            "GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.unwrap();
        // Counted as waiting for its turn (Listener.stats()) while it waits.
        let counted_waiting = async {
            while shared.signature_checks.now().waiting != 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), counted_waiting)
            .await
            .expect("counted as waiting");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("an answer within the test's bound")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        tokio::time::timeout(Duration::from_secs(10), serve)
            .await
            .unwrap()
            .unwrap();
        let counted = shared.counters.rejected();
        assert!(counted.contains(&("head_timeout", 1)), "{counted:?}");
        let now = shared.signature_checks.now();
        assert_eq!((now.waiting, now.running), (0, 0), "the wait given up");
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::relay::Relay;
    use tokio::net::TcpStream;

    /// What an idle spliced connection keeps in its task, besides the
    /// kernel's socket buffers: the relay (both legs' frame watchers, no
    /// buffer: reads go to the thread's scratch buffer, `out` is freed once
    /// written) inside the `run` future. The handshake's buffers are gone by
    /// then (`Relay::start`), and the handshake's task has ended (the splice
    /// is a task of its own). On rustc 1.95, test profile: the relay is 728
    /// bytes and its `run` future 888 (912 while a leg's direction was three
    /// fields and the connection's phase two deadlines and a flag; 2336 while `run` was an `async fn`,
    /// which keeps the relay twice; 1280 while each relay awaited the drain
    /// itself and its watchers kept a split close frame's state inline).
    /// tokio 1.54 allocates a task aligned to 128 bytes, its header and
    /// trailer around the future: a future of up to 920 bytes makes a task
    /// of 1 024 (8 blocks of 128), 1 280 made 1 408. Heap per
    /// relay beyond the task: the identity key and the registry entry
    /// (`Relays::register`: its traffic counts and close channel), a few
    /// hundred bytes.
    #[tokio::test]
    async fn an_idle_relay_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (upstream, _) = listener.accept().await.unwrap();
        let relays = Arc::new(Relays::default());
        let (_registered, mut relay) = Relay::for_test(client, upstream, &relays);
        relay.start(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"", b"", false);
        let relay_size = std::mem::size_of_val(&relay);
        let run = relay.run(|_| {});
        let run_size = std::mem::size_of_val(&run);
        eprintln!("relay {relay_size} bytes, its run future {run_size}");
        assert!(relay_size <= 760, "a relay is {relay_size} bytes");
        assert!(run_size <= 920, "a relay's run future is {run_size} bytes");
    }
}
