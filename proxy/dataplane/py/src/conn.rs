//! One client connection: its TLS handshake (when the listener has `tls:`),
//! its request head, admission, the upstream handshake, then the splice; or
//! its plain HTTP requests, one at a time (`http`), kept alive between them.
//!
//! Every phase has a deadline: the TLS handshake, the head and the upstream's
//! answer together `limits.handshake_timeout` from accept (the TLS handshake
//! cut and counted as `tls_timeout`, then 408, then 504), or from the end of
//! the previous response (an idle keep-alive connection is closed quietly),
//! the connect (TCP and TLS) `limits.connect_timeout` (504), an answer
//! loopwatch writes itself and the wait for the client's close after it
//! `ANSWER_GRACE`.
//!
//! Every phase after the TLS handshake is generic over the client's stream
//! and the upstream's ([`Transport`]): plain and TLS share one code path.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;

use loopwatch_dataplane_core::events::{
    Event, HandshakeError, HandshakeFailure, HttpAccess, HttpOutcome,
};
use loopwatch_dataplane_core::frames::{FrameWatcher, Side, WatcherConfig};
use loopwatch_dataplane_core::head::{
    accept_key, parse_head, BodyFraming, HeadStatus, RequestHead, RequestKind, Version,
};
use loopwatch_dataplane_core::identity::{
    CheckedSignature, Client, Identification, Identity, SignatureCheck,
};
use loopwatch_dataplane_core::table::{Admission, Refusal};

use crate::control::{AddressAdmission, AddressSlot};
use crate::http::{self, Exchanged, Outcome};
use crate::identity::wall_clock;
use crate::listener::{stopping, Config, ConnGuard, Limits, Rejected, Shared};
use crate::relay::{CloseInfo, Relay, RelayIdentity, RelayLimits};
use crate::response::{Answer, ResponseReader, UpstreamRefusal};
use crate::tls::UpstreamTls;
use crate::tracing::{attempt_trace, latin1, sampled};
use crate::transport::{
    connect_upstream, open_upstream, read_appending, tls_failure, ConnectError, Transport,
    UpstreamStream,
};
use crate::wire::{
    has_dot_dot_segment, refusal_bytes, route_for, simple_response, upstream_request_head,
    Forwarded, RejectWith, Route,
};

/// Writing an answer loopwatch makes itself, and waiting for the client to
/// close after it (its close reply to a close-1013, say), takes at most this.
const ANSWER_GRACE: Duration = Duration::from_secs(2);
/// Bytes read from a client after an answer, while waiting for it to close.
const LINGER_BYTES: usize = 64 * 1024;
/// Bytes read at a time during the handshake.
const HEAD_READ: usize = 4096;

pub const SHUTTING_DOWN: &str = "loopwatch: shutting down";
const OVERLOADED: &str = "loopwatch: too many connections";
/// The log line's message for a plain response cut mid-body (no answer is
/// written: the client has its head already).
const RESPONSE_STALLED: &str = "loopwatch: response stalled";
const UPSTREAM_CUT: &str = "loopwatch: the upstream ended its response mid-body";
/// One address holds its share of the connections or of the half-open heads
/// (the 503's body line).
const ADDRESS_LIMIT: &str = "loopwatch: too many connections from your address";
const NOT_TLS: &str = "loopwatch: this port speaks TLS: use https:// or wss://";
const TLS_TIMEOUT: &str = "loopwatch: TLS handshake timeout";
const DENIED: &str = "loopwatch: denied";
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A failed TLS handshake, for the operator: rustls' reason ("received
/// fatal alert: CertificateUnknown": the client refused the certificate;
/// "peer is incompatible: …"), but for a client offering only protocols the
/// listener does not speak, which rustls words as if TLS versions differed
/// (the tls probe: an `h2`-only client).
fn client_tls_failure(e: &std::io::Error) -> String {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::NoApplicationProtocol) = rustls_error {
        return "loopwatch: TLS handshake failed: the client offered no ALPN protocol loopwatch speaks \
(it offers http/1.1 only; h2 is not served)"
            .to_owned();
    }
    format!("loopwatch: TLS handshake failed: {e}")
}

/// The most connections a TLS listener holds, handshakes included: over
/// `max_connections` by a tenth (at least one), each answered a 503 once its
/// handshake is done; the rest are closed before it.
fn handshakes_bound(max_connections: usize) -> usize {
    max_connections.saturating_add((max_connections / 10).max(1))
}

/// What the client's head asks for, decided at once (no await) while the
/// head's buffer is borrowed; owned but for the route (the listener's
/// configuration's, which the connection keeps), so the buffer can go.
enum Plan<'c> {
    /// Answer it ourselves and close.
    Answer {
        status: u16,
        message: &'static str,
        label: Rejected,
    },
    /// The enforcement table refused it (its events are out).
    Refuse {
        refusal: Refusal,
        ws_key: Vec<u8>,
        key: Arc<str>,
        route: Arc<str>,
    },
    /// Forward the upgrade upstream.
    Forward {
        key: Arc<str>,
        route: &'c Route,
        request: Vec<u8>,
        early: Vec<u8>,
        /// For the recheck before the request goes upstream, and the
        /// refusal it may make: the client's address (allow/deny), its
        /// Sec-WebSocket-Key, the attempt's arrival.
        address: IpAddr,
        ws_key: Vec<u8>,
        at: std::time::Instant,
    },
    /// Forward a plain request (no admission: it is no WebSocket attempt).
    Http {
        route: &'c Route,
        request: http::Request,
        /// The client a trusted proxy's X-Forwarded-For names (the peer
        /// otherwise): its address's share caps the request while it runs.
        client: IpAddr,
    },
}

/// How the upstream handshake ended.
enum Upstream {
    Accepted {
        stream: UpstreamStream,
        buffer: Vec<u8>,
        head_len: usize,
        allowed_rsv: u8,
    },
    Refused(UpstreamRefusal),
    /// The table refuses the attempt now (the recheck, after the connect):
    /// the upstream connection was closed, the request never written.
    Recheck(Refusal),
    Failed {
        status: u16,
        message: String,
        error: HandshakeError,
        /// For the operator's log (`HandshakeFailed.detail`).
        detail: Option<Box<str>>,
    },
}

/// Serve one accepted connection: TLS first when the listener has it. The
/// listener's configuration is read here, and again for each next request of
/// a keep-alive connection (`serve_stream`); a WebSocket keeps the one it
/// was upgraded with for its life, whatever a reload changes meanwhile.
pub async fn serve(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, guard: ConnGuard) {
    // An IPv4 client of a dual-stack `[::]` listener arrives as ::ffff:a.b.c.d:
    // taken as the IPv4 address it is, once, for everything after (the caps
    // and `trusted_proxies`, X-Forwarded-For, the deny list, the logs), as the
    // client's key already was.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let _ = client.set_nodelay(true);
    let config = shared.config();
    let deadline = Instant::now() + config.limits.handshake_timeout;
    match &config.tls {
        None => {
            serve_stream(
                &shared,
                Arc::clone(&config),
                client,
                peer,
                deadline,
                "http",
                guard,
                None,
            )
            .await
        }
        // Boxed, as the TLS stream: a plain connection's future does not
        // carry the TLS variants' state (a rustls connection is over 1 KiB,
        // and a splice of two of them over 3 KiB).
        Some(acceptor) => {
            Box::pin(async {
                // The per-address caps before the handshake: a handshake that
                // never ends is a head that never comes, and one address could
                // otherwise fill `max_connections` with them. Over its cap there
                // is no TLS yet to answer in: closed at once (as `fd_limit`).
                // And the whole listener's: over `max_connections` a handshake
                // costs a signature to answer a 503, which a tenth over the cap
                // still get; beyond it closed at once, so that handshakes under
                // way are bounded as a plain listener's connections are.
                if guard.active_at_accept() > handshakes_bound(config.limits.max_connections) {
                    shared.rejected(Rejected::Overload, None, peer.ip(), OVERLOADED);
                    return;
                }
                let address = shared.addresses.admit(peer.ip());
                if let AddressAdmission::OverCap = address {
                    shared.rejected(Rejected::AddressLimit, None, peer.ip(), ADDRESS_LIMIT);
                    return;
                }
                if let Some(client) = accept_tls(&shared, acceptor, client, peer, deadline).await {
                    let admitted = Some(address);
                    serve_stream(
                        &shared,
                        Arc::clone(&config),
                        client,
                        peer,
                        deadline,
                        "https",
                        guard,
                        admitted,
                    )
                    .await;
                }
            })
            .await
        }
    }
}

/// How the TLS handshake's first step ended.
enum FirstByte {
    Stop,
    Timeout,
    Gone,
    Byte(u8),
}

/// The listener's TLS handshake, by `deadline`. None when it did not
/// complete: counted and logged as a rejection (`tls_error`, `tls_timeout`,
/// `not_tls`), except for a client that left before sending anything (as a
/// plain client that leaves before its head) and a stop (`shutting_down`). A
/// client speaking plain HTTP to the TLS port gets a plain-text 400 saying so
/// (as nginx does).
async fn accept_tls(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    mut client: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<Box<tokio_rustls::server::TlsStream<TcpStream>>> {
    let mut shutdown = shared.shutdown.clone();
    let timer = sleep_until(deadline);
    let stop = stopping(&mut shutdown);
    tokio::pin!(timer, stop);
    let mut first = [0u8; 1];
    let step = tokio::select! {
        biased;
        _ = &mut stop => FirstByte::Stop,
        _ = &mut timer => FirstByte::Timeout,
        peeked = client.peek(&mut first) => match peeked {
            Ok(0) | Err(_) => FirstByte::Gone,
            Ok(_) => FirstByte::Byte(first[0]),
        },
    };
    let ip = peer.ip();
    match step {
        FirstByte::Stop => shared.rejected(Rejected::ShuttingDown, None, ip, SHUTTING_DOWN),
        FirstByte::Timeout => shared.rejected(Rejected::TlsTimeout, None, ip, TLS_TIMEOUT),
        FirstByte::Gone => {}
        FirstByte::Byte(TLS_HANDSHAKE_RECORD) => {
            return tokio::select! {
                biased;
                _ = &mut stop => {
                    shared.rejected(Rejected::ShuttingDown, None, ip, SHUTTING_DOWN);
                    None
                }
                _ = &mut timer => {
                    shared.rejected(Rejected::TlsTimeout, None, ip, TLS_TIMEOUT);
                    None
                }
                accepted = acceptor.accept(client) => match accepted {
                    Ok(stream) => Some(Box::new(stream)),
                    Err(e) => {
                        let message = client_tls_failure(&e);
                        shared.rejected(Rejected::TlsError, None, ip, &message);
                        None
                    }
                },
            };
        }
        FirstByte::Byte(_) => {
            shared.rejected(Rejected::NotTls, Some(400), ip, NOT_TLS);
            let response = simple_response(400, NOT_TLS, &[]);
            answer(&mut client, &response, Then::Close).await;
        }
    }
    None
}

/// Everything after the TLS handshake, whatever the client's stream: the
/// first request's head by `deadline` (from accept), the next ones' each
/// within `limits.handshake_timeout` of the previous response. `admitted`:
/// the address's admission when it was taken before the TLS handshake.
/// Each next request of a keep-alive connection is served by the
/// configuration in force when it comes: after a reload, a route removed
/// (or re-pointed) is so for every connection, as after nginx's reload.
#[allow(clippy::too_many_arguments)]
async fn serve_stream<C: Transport + 'static>(
    shared: &Arc<Shared>,
    mut config: Arc<Config>,
    mut client: C,
    peer: SocketAddr,
    first_deadline: Instant,
    scheme: &'static str,
    guard: ConnGuard,
    admitted: Option<AddressAdmission>,
) {
    if shared.closing() {
        reject(
            shared,
            &mut client,
            peer.ip(),
            Rejected::ShuttingDown,
            503,
            SHUTTING_DOWN,
        )
        .await;
        return;
    }
    if guard.active_at_accept() > config.limits.max_connections {
        reject(
            shared,
            &mut client,
            peer.ip(),
            Rejected::Overload,
            503,
            OVERLOADED,
        )
        .await;
        return;
    }
    // Per address (the peer's; on a TLS listener counted before the
    // handshake): its connections and its half-open first head, the TLS
    // handshake included (released when `address` drops, at the end of this
    // connection: the splice's task's end for a WebSocket).
    let admission = admitted.unwrap_or_else(|| shared.addresses.admit(peer.ip()));
    let mut address = match admission {
        AddressAdmission::Counted(slot) => Some(slot),
        AddressAdmission::Exempt => None,
        AddressAdmission::OverCap => {
            reject(
                shared,
                &mut client,
                peer.ip(),
                Rejected::AddressLimit,
                503,
                ADDRESS_LIMIT,
            )
            .await;
            return;
        }
    };
    // One id for the connection's events (an upgrade ends its plain requests).
    let conn_id = shared.conn_id();
    let mut shutdown = shared.shutdown.clone();
    let peer_ip = peer.ip();
    // Between two plain requests of a keep-alive connection.
    let mut idle = false;
    // What of the next request came while the last one's response was awaited.
    let mut carried: Vec<u8> = Vec::new();
    loop {
        let head_limits = config.limits.head;
        // Idle between two plain requests: `keepalive_timeout` until the next
        // request's first byte, then `handshake_timeout` for its head.
        let deadline = if idle {
            Instant::now() + config.limits.keepalive_timeout
        } else {
            first_deadline
        };
        // 1. The request head. (One timer per phase, armed once: a timer made
        // per loop turn would be registered and dropped on every read.)
        let mut buf: Vec<u8> = std::mem::take(&mut carried);
        // Bytes carried over are parsed before anything more is read.
        let mut read_first = buf.is_empty();
        let head_timer = sleep_until(deadline);
        let stop = stopping(&mut shutdown);
        tokio::pin!(head_timer, stop);
        // Nothing of a next request yet (empty lines are skipped by the parser).
        let quiet = |buf: &[u8]| idle && buf.iter().all(|&b| b == b'\r' || b == b'\n');
        // The idle wait ended: a byte of the next request came.
        let mut waking = false;
        let plan = loop {
            if read_first {
                tokio::select! {
                    biased;
                    _ = &mut stop => {
                        if quiet(&buf) {
                            return; // idle between requests: just close
                        }
                        reject(shared, &mut client, peer_ip, Rejected::ShuttingDown, 503, SHUTTING_DOWN).await;
                        return;
                    }
                    _ = &mut head_timer => {
                        if quiet(&buf) {
                            // RFC 9112 §9.8: an unsolicited 408 could race the
                            // client's next request on this connection.
                            return;
                        }
                        let message = "loopwatch: request head timeout";
                        reject(shared, &mut client, peer_ip, Rejected::HeadTimeout, 408, message).await;
                        return;
                    }
                    read = read_appending(&mut client, &mut buf, HEAD_READ) => match read {
                        Ok(0) | Err(_) => return, // gone before its head was complete
                        Ok(_) => {}
                    },
                }
            }
            read_first = true;
            if idle && !waking && !quiet(&buf) {
                // The next request began: its head has `handshake_timeout`.
                waking = true;
                head_timer
                    .as_mut()
                    .reset(Instant::now() + config.limits.handshake_timeout);
            }
            let status = parse_head(&buf, &head_limits);
            if !matches!(status, HeadStatus::Partial) {
                if let Some(slot) = address.as_mut() {
                    slot.head_done();
                }
            }
            match status {
                HeadStatus::Partial => continue,
                HeadStatus::Rejected(rejection) => {
                    let label = Rejected::from_head(rejection.reason);
                    shared.rejected(label, Some(rejection.status), peer_ip, &rejection.message);
                    answer(&mut client, &rejection.response(), Then::Close).await;
                    return;
                }
                HeadStatus::Complete(head) => {
                    if idle {
                        // A next request: served by the configuration now.
                        config = shared.config();
                    }
                    let route = match route_head(shared, &config, &head, &buf, peer_ip, scheme) {
                        Routed::Planned(plan) => {
                            // Behind a trusted proxy, the client it names has
                            // its address's share while its request runs (a
                            // proxy's kept-alive connection carries many
                            // clients' requests): held in `address`, free for
                            // it (the proxy was not counted), until the
                            // response is through. Taken here, not where the
                            // request is forwarded: a refusal awaited there,
                            // with the request's state live, grew every
                            // connection's future by 104 bytes.
                            if let (
                                Plan::Http {
                                    client: forwarded, ..
                                },
                                None,
                            ) = (&*plan, &address)
                            {
                                match forwarded_share(shared, &mut client, peer_ip, *forwarded)
                                    .await
                                {
                                    Ok(slot) => address = slot,
                                    Err(Refused) => return,
                                }
                            }
                            break *plan;
                        }
                        Routed::Upgrade(route) => route,
                    };
                    // Identity: the key the engine tracks and the client
                    // address (after a trusted proxy's X-Forwarded-For),
                    // which allow/deny networks are matched on. A token's
                    // asymmetric signature check (not remembered) runs off
                    // this worker, within the head's deadline.
                    let identity = &config.identity;
                    let identified = match identity.identify_cheaply(&head, peer_ip, wall_clock()) {
                        Identification::Known(client) => client,
                        Identification::NeedsSignature(check) => tokio::select! {
                            biased;
                            _ = &mut stop => {
                                reject(shared, &mut client, peer_ip, Rejected::ShuttingDown, 503, SHUTTING_DOWN).await;
                                return;
                            }
                            _ = &mut head_timer => {
                                let message = "loopwatch: request head timeout";
                                reject(shared, &mut client, peer_ip, Rejected::HeadTimeout, 408, message).await;
                                return;
                            }
                            // Boxed: a connection's future does not carry it.
                            checked = Box::pin(check_signature(shared, identity, check)) => {
                                identity.identify_checked(&head, peer_ip, &checked)
                            }
                        },
                    };
                    // Behind a trusted proxy, the client it names has its
                    // address's share until the connection ends.
                    if address.is_none() {
                        let forwarded = identified.address.ip;
                        match forwarded_share(shared, &mut client, peer_ip, forwarded).await {
                            Ok(slot) => address = slot,
                            Err(Refused) => return,
                        }
                    }
                    break admit(
                        shared, route, &head, &buf, identified, peer_ip, scheme, conn_id,
                    );
                }
            }
        };
        drop(buf);

        match plan {
            Plan::Answer {
                status,
                message,
                label,
            } => {
                shared.rejected(label, Some(status), peer_ip, message);
                let response = simple_response(status, message, &[]);
                answer(&mut client, &response, Then::Close).await;
            }
            Plan::Refuse {
                refusal,
                ws_key,
                key,
                route,
            } => {
                let attempt = RefusedAttempt {
                    key,
                    route,
                    conn_id,
                };
                refuse(shared, client, refusal, ws_key, attempt).await
            }
            Plan::Forward {
                key,
                route,
                request,
                early,
                address: client_address,
                ws_key,
                at,
            } => {
                let upgrade = Upgrade {
                    key,
                    route,
                    request,
                    early,
                    deadline,
                    conn_id,
                    peer: peer_ip,
                    address: client_address,
                    ws_key,
                    at,
                };
                // Boxed: the upstream's connect and handshake are the largest
                // state of a connection's future (3 KiB), and every connection
                // would carry it, waiting for its head or held in a refusal.
                Box::pin(forward(shared, &config, client, upgrade, guard, address)).await
            }
            Plan::Http { route, request, .. } => {
                let next = forward_http(
                    shared,
                    &config,
                    &mut client,
                    peer_ip,
                    route,
                    &request,
                    conn_id,
                );
                let next = next.await;
                if address.as_ref().is_some_and(|slot| slot.ip() != peer_ip) {
                    address = None; // through: the forwarded client's share back
                }
                if let Some(carry) = next {
                    idle = true;
                    carried = carry;
                    continue;
                }
            }
        }
        return;
    }
}

/// The client was answered (and the connection is to close).
struct Refused;

/// The share of `forwarded`, the client a trusted proxy at `peer` names, for
/// a connection not counted at accept (the proxy is exempt: it carries many
/// clients): its slot (None when nothing counts it: no proxy, no cap, an
/// exempt network), or `Refused` once answered 503 `address_limit` for a
/// client over `max_connections_per_address`. nginx (realip and
/// `limit_conn`) and HAProxy (stick tables on the header) cap the real
/// client likewise.
async fn forwarded_share<C: Transport>(
    shared: &Shared,
    client: &mut C,
    peer: IpAddr,
    forwarded: IpAddr,
) -> Result<Option<AddressSlot>, Refused> {
    if forwarded == peer {
        return Ok(None);
    }
    match shared.addresses.admit_forwarded(forwarded) {
        AddressAdmission::Counted(slot) => Ok(Some(slot)),
        AddressAdmission::Exempt => Ok(None),
        AddressAdmission::OverCap => {
            let (label, message) = (Rejected::AddressLimit, ADDRESS_LIMIT);
            reject(shared, client, forwarded, label, 503, message).await;
            Err(Refused)
        }
    }
}

/// One plain exchange; the start of the next request (what came of it so
/// far) when the connection stays open for it, None when it closes.
/// The upstream connection is opened as a WebSocket's is (`open_upstream`:
/// TLS for an `https://` route), within `limits.connect_timeout`
/// (`http::exchange` bounds it).
async fn forward_http<C: Transport>(
    shared: &Shared,
    config: &Config,
    client: &mut C,
    peer: IpAddr,
    route: &Route,
    request: &http::Request,
    conn_id: u64,
) -> Option<Vec<u8>> {
    let began = Instant::now();
    let key = (route.host.clone(), route.port, route.tls);
    let pooled = shared.pool.checkout(&key);
    let tls = config.upstream_tls.as_deref();
    // Boxed: a connection's future does not carry a plain exchange's state
    // (the WebSockets' memory per connection; one allocation per request).
    let exchanged = Box::pin(http::exchange(
        client,
        || async move {
            open_upstream(route, tls)
                .await
                .map_err(std::io::Error::from)
        },
        pooled,
        request,
        &config.limits,
        || shared.closing(),
    ))
    .await;
    let Exchanged {
        outcome,
        upstream,
        sent,
        carry,
    } = exchanged;
    if let Some(upstream) = upstream {
        if !shared.closing() {
            shared.pool.checkin(&key, upstream);
        }
    }
    let (status, ended) = match &outcome {
        Outcome::KeepAlive | Outcome::Close => (sent.status, HttpOutcome::Forwarded),
        Outcome::Answer { status, .. } => (Some(*status), HttpOutcome::Answered),
        Outcome::Cut(_) => (sent.status, HttpOutcome::Cut),
        Outcome::Gone => (sent.status, HttpOutcome::ClientGone),
    };
    let duration = began.elapsed();
    route.requests.count(status, duration);
    if let Some(logged) = &request.logged {
        let line = HttpAccess {
            route: Arc::clone(&route.name),
            peer: peer.to_string().into(),
            method: logged.method.clone(),
            path: logged.path.clone(),
            status,
            outcome: ended,
            duration,
            bytes_in: sent.bytes_in,
            bytes_out: sent.bytes_out,
            conn_id,
            at: std::time::Instant::now(),
        };
        // A line a full queue loses is counted with the other lost events.
        shared.events.send(Event::HttpRequest(Box::new(line)));
    }
    match outcome {
        Outcome::KeepAlive => return Some(carry),
        Outcome::Close => answer(client, &[], Then::Close).await,
        Outcome::Answer {
            status,
            message,
            counted,
            why,
        } => {
            if let (Some(label), Some(why)) = (counted, &why) {
                // The line says why the upstream failed; the client gets the
                // answer's one line (below, uncounted a second time).
                shared.rejected(label, Some(status), peer, &format!("{message}: {why}"));
                answer_status(shared, client, peer, None, status, &message).await;
            } else {
                answer_status(shared, client, peer, counted, status, &message).await;
            }
        }
        Outcome::Cut(counted) => {
            if let Some(label) = counted {
                let message = match label {
                    Rejected::UpstreamCut => UPSTREAM_CUT,
                    _ => RESPONSE_STALLED,
                };
                shared.rejected(label, None, peer, message);
            }
            // An abortive close (RST): the client must not take the cut
            // response for a complete one.
            let _ = socket2::SockRef::from(client.tcp()).set_linger(Some(Duration::ZERO));
        }
        Outcome::Gone => {}
    }
    None
}

/// A complete head, routed.
enum Routed<'r> {
    /// Its plan is made: no route, or a plain request.
    Planned(Box<Plan<'r>>),
    /// A WebSocket attempt on this route: its client is identified, then
    /// admitted ([`admit`]).
    Upgrade(&'r Route),
}

/// Routing for a complete head: a 404, a plain request (`begin_http`), or a
/// WebSocket attempt to identify and admit.
fn route_head<'r>(
    shared: &Shared,
    config: &'r Config,
    head: &RequestHead<'_>,
    buf: &[u8],
    peer: IpAddr,
    scheme: &str,
) -> Routed<'r> {
    if has_dot_dot_segment(head.path) {
        // Routed by its path as sent, it could leave its route at a backend
        // that resolves `..`: refused rather than guessed at (docs/relay.md).
        return Routed::Planned(Box::new(Plan::Answer {
            status: 400,
            message: "dot-dot segment in the path",
            label: Rejected::BadRequest,
        }));
    }
    let Some(route) = route_for(&config.routes, head.path) else {
        return Routed::Planned(Box::new(Plan::Answer {
            status: 404,
            message: "no route for this path",
            label: Rejected::NoRoute,
        }));
    };
    if let RequestKind::Http(framing) = head.kind {
        // Not a WebSocket attempt: no event, no admission (`begin_http`),
        // but an operator's deny holds for every request.
        if denied(shared, config, head, peer) {
            return Routed::Planned(Box::new(Plan::Answer {
                status: 403,
                message: DENIED,
                label: Rejected::Deny,
            }));
        }
        let target = route.target(head.path, &head.target);
        let early = buf[head.head_len..].to_vec();
        let expect_continue = framing != BodyFraming::None
            && early.is_empty()
            && head.version == Version::Http11
            && head.tokens("expect").iter().any(|t| t == b"100-continue");
        let kind = Forwarded::Http {
            chunked: framing == BodyFraming::Chunked,
            answers_continue: expect_continue,
        };
        let request = http::Request {
            head: upstream_request_head(
                head,
                &target,
                &route.authority,
                &peer.to_string(),
                scheme,
                kind,
                None,
            ),
            framing,
            early,
            keep_alive: head.keep_alive,
            expect_continue,
            head_only: head.method == "HEAD",
            version: head.version,
            retryable: framing == BodyFraming::None && http::IDEMPOTENT.contains(&head.method),
            logged: sampled(config.access_log_share).then(|| http::Logged {
                method: head.method.into(),
                path: latin1(head.path),
            }),
        };
        let client = config.identity.client_address(head, peer).ip;
        return Routed::Planned(Box::new(Plan::Http {
            route,
            request,
            client,
        }));
    }
    Routed::Upgrade(route)
}

/// Whether `policy.deny` names a plain request's client: its address (after
/// a trusted proxy's X-Forwarded-For) or, when the list names keys, its key
/// from what costs little (a token whose signature still needs its check is
/// matched on the address alone). An operator denies a client during an
/// incident: its REST calls are refused with its WebSocket attempts.
fn denied(shared: &Shared, config: &Config, head: &RequestHead<'_>, peer: IpAddr) -> bool {
    let snapshot = shared.table.snapshot();
    let deny = &snapshot.deny;
    if deny.is_empty() {
        return false;
    }
    let identity = &config.identity;
    match identity.identify_cheaply(head, peer, wall_clock()) {
        Identification::Known(client) => deny.matches(&client.key, Some(client.address.ip)),
        Identification::NeedsSignature(_) => {
            deny.matches("", Some(identity.client_address(head, peer).ip))
        }
    }
}

/// Admission of a WebSocket attempt by its identified client
/// (`begin_upgrade`): its Attempt event, then the enforcement table.
#[allow(clippy::too_many_arguments)]
fn admit<'c>(
    shared: &Shared,
    route: &'c Route,
    head: &RequestHead<'_>,
    buf: &[u8],
    client: Client,
    peer: IpAddr,
    scheme: &str,
    conn_id: u64,
) -> Plan<'c> {
    let key: Arc<str> = client.key.into();
    let now = std::time::Instant::now();
    // Tracing on: the connection span's context, decided here (the upstream
    // request carries its traceparent; the brain makes the span with its ids).
    let trace = shared
        .tracing
        .as_ref()
        .map(|sampling| Box::new(attempt_trace(sampling, head)));
    let traceparent = trace.as_ref().map(|t| t.context.traceparent());
    let addr: Box<str> = client.address_text.as_str().into();
    // The lookup comes before the Attempt is sent: once sent, the brain may
    // judge it and write what it starts (the next min-interval, a cooldown)
    // before this thread looks, and the attempt would meet a refusal of its
    // own making (the recheck after the upstream connect guards the same way,
    // with the judged mark).
    let admission = shared
        .table
        .lookup(&route.name, &key, Some(client.address.ip), now);
    shared.events.send(Event::Attempt {
        key: Arc::clone(&key),
        route: Arc::clone(&route.name),
        at: now,
        addr: addr.clone(),
        conn_id,
        trace,
    });
    match admission {
        Admission::Refuse(refusal) => {
            shared.counters.refuse(refusal.reason);
            shared.events.send(Event::Rejected {
                key: Arc::clone(&key),
                route: Arc::clone(&route.name),
                at: now,
                reason: refusal.reason,
                conn_id,
            });
            let ws_key = head
                .header("sec-websocket-key")
                .map(|k| k.into_owned())
                .unwrap_or_default();
            Plan::Refuse {
                refusal,
                ws_key,
                key,
                route: Arc::clone(&route.name),
            }
        }
        Admission::Admit { .. } | Admission::AllowListed { .. } => {
            let target = route.target(head.path, &head.target);
            // X-Forwarded-For names the peer (formatted here only: a
            // refusal does not need it), the text just made when it is the
            // client's address.
            let same = client.address.ip == peer && client.address.scope.is_none();
            let peer_text = if same { addr } else { peer.to_string().into() };
            let request = upstream_request_head(
                head,
                &target,
                &route.authority,
                &peer_text,
                scheme,
                Forwarded::WebSocket,
                traceparent.as_ref().map(|t| &t[..]),
            );
            let ws_key = head
                .header("sec-websocket-key")
                .map(|k| k.into_owned())
                .unwrap_or_default();
            Plan::Forward {
                key,
                route,
                request,
                early: buf[head.head_len..].to_vec(),
                address: client.address.ip,
                ws_key,
                at: now,
            }
        }
    }
}

/// A token's asymmetric signature check (RS*/PS*/ES*/EdDSA, not remembered),
/// off the async worker: on tokio's blocking pool, at most
/// `Shared::signature_checks` at a time; a connection waits for its turn,
/// counted as waiting (the caller bounds the wait by the head's deadline). A check already
/// running finishes even when its connection is gone (it is remembered
/// if it verifies), and holds its turn until then.
async fn check_signature(
    shared: &Shared,
    identity: &Arc<Identity>,
    check: SignatureCheck,
) -> CheckedSignature {
    let Some(turn) = shared.signature_checks.turn().await else {
        return check.not_done(); // never closed
    };
    let fallback = check.clone();
    let identity = Arc::clone(identity);
    let task = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        identity.check_signature(check)
    });
    // A check that panicked (a bug) verified nothing.
    task.await.unwrap_or_else(|_| fallback.not_done())
}

/// The attempt a refusal answers, for its Answered event.
struct RefusedAttempt {
    key: Arc<str>,
    route: Arc<str>,
    conn_id: u64,
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldEnd {
    /// Its time is up: answered with what is left of the retry time.
    Over,
    /// The key was released (`release_held`), or the listener stops:
    /// answered now, "retry in 1s".
    Released,
    /// The client left before its answer.
    Left,
}

/// Refuse an attempt without touching the upstream, after its hold if it has
/// one (the table's hold for its reason, `Refusal::hold`; within
/// `policy.max_held` and `max_held_per_key`): HTTP 429/503 +
/// Retry-After, or 101 then a close with `policy.close_code` (1013).
async fn refuse<C: Transport>(
    shared: &Shared,
    mut client: C,
    refusal: Refusal,
    ws_key: Vec<u8>,
    attempt: RefusedAttempt,
) {
    let policy = shared.policy.snapshot();
    let mut retry_after = refusal.retry_after;
    if let Some(hold) = refusal.hold.filter(|h| !h.is_zero()) {
        let holds = &shared.holds;
        let taken = holds.take(
            &attempt.key,
            attempt.conn_id,
            policy.max_holds,
            policy.max_held_per_key,
        );
        if let Ok(ticket) = taken {
            // The retry time is the refusal's as it was made, just now (at the
            // lookup, or at the recheck after the upstream connect): the hold
            // is what passes before the answer tells it.
            let held_at = std::time::Instant::now();
            // As long as the table says (policy.hold, at most 30 s, never past
            // the retry time): the handshake timeout no longer runs once the
            // head is in (`policy.hold` bounds the wait).
            let mut shutdown = shared.shutdown.clone();
            let mut sink = [0u8; 512];
            // Held: no upstream, no answer yet. A client that leaves ends it.
            let end = tokio::select! {
                _ = tokio::time::sleep(hold) => HoldEnd::Over,
                _ = ticket.release.notified() => HoldEnd::Released,
                _ = stopping(&mut shutdown) => HoldEnd::Released,
                _ = drain_until_closed(&mut client, &mut sink) => HoldEnd::Left,
            };
            drop(ticket);
            // The attempt ended now: the engine measures retry intervals from here.
            shared.events.send(Event::Answered {
                key: attempt.key,
                route: attempt.route,
                at: std::time::Instant::now(),
                conn_id: attempt.conn_id,
            });
            match end {
                HoldEnd::Left => return,
                HoldEnd::Released => {
                    holds.released.fetch_add(1, Ordering::Relaxed);
                    retry_after = Duration::ZERO;
                }
                HoldEnd::Over => retry_after = retry_after.saturating_sub(held_at.elapsed()),
            }
            holds.answered(refusal.reason);
        }
    }
    let bytes = refusal_bytes(
        policy.reject_with,
        policy.close_code,
        refusal.reason,
        retry_after,
        &ws_key,
    );
    let then = match policy.reject_with {
        RejectWith::Close1013 => Then::AwaitReply,
        RejectWith::Http429 => Then::Close,
    };
    answer(&mut client, &bytes, then).await;
}

/// Reads (and drops) until the peer closes; bounded by `LINGER_BYTES` per call
/// of the caller's timeout.
async fn drain_until_closed<C: AsyncRead + Unpin>(client: &mut C, sink: &mut [u8]) {
    let mut total = 0;
    loop {
        match client.read(sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                total += n;
                if total > LINGER_BYTES {
                    // A client streaming at a held refusal: stop reading it.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// What follows an answer loopwatch writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Close. If the client is still sending (bytes are waiting), read and
    /// drop them until it closes (bounded): closing with unread bytes would
    /// reset the connection, and a reset can destroy the answer before the
    /// client reads it (nginx's lingering close).
    Close,
    /// Wait (bounded) for the client's reply, its close frame after a
    /// close-1013, then close.
    AwaitReply,
}

/// Write an answer, shut the writing half, then as `then` says; at most
/// `ANSWER_GRACE` in all.
/// `write_all`, then the shutdown of the writing half (TLS: close_notify
/// first) of a client stream, plain or TLS.
async fn answer<C: Transport>(client: &mut C, bytes: &[u8], then: Then) {
    let _ = timeout(ANSWER_GRACE, async {
        if client.write_all(bytes).await.is_err() {
            return;
        }
        let _ = client.shutdown().await;
        let mut sink = [0u8; 512];
        match then {
            Then::AwaitReply => await_close_reply(client, &mut sink).await,
            Then::Close => {
                if read_now(client, &mut sink).await > 0 {
                    drain_until_closed(client, &mut sink).await;
                }
                // else nothing pending, the client's EOF, or an error: close now
            }
        }
    })
    .await;
}

/// Read (and drop) the client's frames up to its close frame, its EOF or a
/// frame that breaks the protocol, at most `LINGER_BYTES`. A client may send
/// messages on the 101 before it reads the close: closing with them unread
/// resets the connection (RFC 7230 §6.6), and its close reply, on some stacks
/// the refusal's reason with it, is lost.
async fn await_close_reply<C: AsyncRead + Unpin>(client: &mut C, sink: &mut [u8]) {
    let mut frames = FrameWatcher::new(WatcherConfig {
        side: Side::Client,
        max_message_size: None,
        allowed_rsv: 0, // the refusal's 101 negotiated no extension
    });
    let mut total = 0;
    while total <= LINGER_BYTES {
        match client.read(sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                total += n;
                if frames.feed(&sink[..n]).is_err() || frames.close().is_some() {
                    return;
                }
            }
        }
    }
}

/// What the stream has for us at once, without waiting (0: nothing, its
/// EOF or an error).
async fn read_now<C: AsyncRead + Unpin>(client: &mut C, sink: &mut [u8]) -> usize {
    let mut buf = ReadBuf::new(sink);
    std::future::poll_fn(|cx| match Pin::new(&mut *client).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => Poll::Ready(buf.filled().len()),
        Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(0),
    })
    .await
}

/// Answer a refusal of loopwatch's own (`label`: counted and logged) and close.
async fn reject<C: Transport>(
    shared: &Shared,
    client: &mut C,
    peer: IpAddr,
    label: Rejected,
    status: u16,
    message: &str,
) {
    answer_status(shared, client, peer, Some(label), status, message).await;
}

/// Answer `status` with a one-line `message` and close; when loopwatch refused
/// the request itself (`label`), counted and logged as that refusal, with its
/// headers (`Rejected::headers`).
async fn answer_status<C: Transport>(
    shared: &Shared,
    client: &mut C,
    peer: IpAddr,
    label: Option<Rejected>,
    status: u16,
    message: &str,
) {
    if let Some(label) = label {
        shared.rejected(label, Some(status), peer, message);
    }
    let headers = label.map_or(&[][..], Rejected::headers);
    answer(
        client,
        &simple_response(status, message, headers),
        Then::Close,
    )
    .await;
}

/// Connect (TCP, then TLS for a `wss://` route), look the attempt up in the
/// table again (`recheck`: the brain may have written a refusal for it since
/// its admission, while the connect took its time), send the upgrade request,
/// read the answer.
async fn upstream_handshake(
    route: &Route,
    tls: Option<&UpstreamTls>,
    request: &[u8],
    recheck: impl FnOnce() -> Option<Refusal>,
    limits: &Limits,
    deadline: Instant,
    ws_key: &[u8],
) -> Upstream {
    let closed = || Upstream::Failed {
        status: 502,
        message: "loopwatch: upstream closed during the handshake".into(),
        error: HandshakeError::Closed,
        detail: None,
    };
    let failed = |failure: ConnectError| Upstream::Failed {
        status: failure.status(),
        message: failure.message().into(),
        error: failure.handshake_error(),
        detail: failure.detail(),
    };
    // A TLS error after the connect (a TLS 1.3 upstream's refusal of the
    // client certificate comes at the first read) is the connect's `tls`.
    let broken = |e: std::io::Error| match tls_failure(&e) {
        Some(why) => failed(ConnectError::Tls(why)),
        None => closed(),
    };
    let mut stream = match connect_upstream(route, tls, limits.connect_timeout).await {
        Ok(stream) => stream,
        Err(failure) => return failed(failure),
    };
    if let Some(refusal) = recheck() {
        // Dropped unwritten: the upstream sees a connection close, never the
        // request (a late refusal caught before the backend).
        drop(stream);
        return Upstream::Recheck(refusal);
    }
    let written = match stream.write_all(request).await {
        Ok(()) => stream.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        return broken(e);
    }
    let mut reader = ResponseReader::new(limits.head.max_head_size, limits.error_body_size)
        .expecting_accept(accept_key(ws_key));
    let mut chunk = Vec::new();
    loop {
        chunk.clear();
        let read = read_appending(&mut stream, &mut chunk, HEAD_READ);
        // A refusal's head in hand, its body ends at the deadline at the latest:
        // one read until a close that never comes (no length, the connection
        // kept open) was a 504, the 401 lost and counted as an upstream failure.
        let read = if reader.has_head() {
            timeout_at(deadline, read).await.unwrap_or(Ok(0))
        } else {
            read.await
        };
        match read {
            Ok(n) if n > 0 => {}
            ended => {
                // A refusal's head in hand: its body ends with the connection.
                if let Some(refusal) = reader.eof() {
                    return Upstream::Refused(refusal);
                }
                return match ended {
                    Err(e) => broken(e),
                    Ok(_) => closed(),
                };
            }
        }
        match reader.feed(&chunk) {
            Ok(Answer::Partial) => continue,
            Ok(Answer::Upgrade {
                head_len,
                allowed_rsv,
            }) => {
                return Upstream::Accepted {
                    stream,
                    buffer: reader.into_buffer(),
                    head_len,
                    allowed_rsv,
                }
            }
            Ok(Answer::Refused(refusal)) => return Upstream::Refused(refusal),
            Err(bad) => {
                return Upstream::Failed {
                    status: 502,
                    message: format!("loopwatch: {bad}"),
                    error: HandshakeError::BadResponse,
                    detail: Some(bad.to_string().into()),
                }
            }
        }
    }
}

/// An admitted upgrade, to forward upstream.
struct Upgrade<'c> {
    key: Arc<str>,
    route: &'c Route,
    /// The upgrade request as the upstream gets it.
    request: Vec<u8>,
    /// What the client sent after its head.
    early: Vec<u8>,
    /// The handshake's deadline (from accept, or from the previous response).
    deadline: Instant,
    conn_id: u64,
    /// The client's address (its refusals' log lines name it).
    peer: IpAddr,
    /// The client's address as identified (after a trusted proxy's
    /// X-Forwarded-For: allow/deny match it), for the recheck.
    address: IpAddr,
    /// Its Sec-WebSocket-Key, for a close-1013 refusal's 101.
    ws_key: Vec<u8>,
    /// The attempt's arrival (its table lookup).
    at: std::time::Instant,
}

async fn forward<C: Transport + 'static>(
    shared: &Shared,
    config: &Config,
    mut client: C,
    upgrade: Upgrade<'_>,
    guard: ConnGuard,
    address: Option<AddressSlot>,
) {
    let Upgrade {
        key,
        route,
        request,
        mut early,
        deadline,
        conn_id,
        peer,
        address: client_address,
        ws_key,
        at,
    } = upgrade;
    let limits = &config.limits;
    let failed_with = |failure: HandshakeFailure, detail: Option<Box<str>>| {
        shared
            .counters
            .handshake_failed
            .fetch_add(1, Ordering::Relaxed);
        shared.events.send(Event::HandshakeFailed {
            key: Arc::clone(&key),
            route: Arc::clone(&route.name),
            at: std::time::Instant::now(),
            failure,
            conn_id,
            detail,
        });
    };
    let failed = |failure: HandshakeFailure| failed_with(failure, None);
    let mut client_eof = false;
    // The handshake's future and the upgrade request live in this block
    // only: nothing of them is kept while the connection is spliced.
    let outcome = {
        let mut shutdown = shared.shutdown.clone();
        let table = &shared.table;
        let recheck = || {
            table.recheck(
                conn_id,
                &route.name,
                &key,
                Some(client_address),
                std::time::Instant::now(),
            )
        };
        let handshake = upstream_handshake(
            route,
            config.upstream_tls.as_deref(),
            &request,
            recheck,
            limits,
            deadline,
            &ws_key,
        );
        tokio::pin!(handshake);
        let handshake_timer = sleep_until(deadline);
        let stop = stopping(&mut shutdown);
        tokio::pin!(handshake_timer, stop);
        // 2. The upstream handshake. The client is read meanwhile: what it sends
        // early is kept (bounded), and a client that leaves is noticed at once.
        loop {
            let room = !client_eof && early.len() < limits.early_data_size;
            tokio::select! {
                biased;
                _ = &mut stop => {
                    // The attempt's end for the brain too: its span ends, a probe goes back.
                    failed(HandshakeFailure::Error(HandshakeError::ShuttingDown));
                    reject(shared, &mut client, peer, Rejected::ShuttingDown, 503, SHUTTING_DOWN).await;
                    return;
                }
                // Before the timer: at the deadline a refusal whose head came
                // ends its body there and is answered, not timed out.
                outcome = &mut handshake => break outcome,
                _ = &mut handshake_timer => {
                    failed(HandshakeFailure::Error(HandshakeError::Timeout));
                    let response = simple_response(504, "loopwatch: upstream handshake timeout", &[]);
                    answer(&mut client, &response, Then::Close).await;
                    return;
                }
                read = read_appending(&mut client, &mut early, HEAD_READ), if room => match read {
                    // A client that ends its side having sent nothing after its
                    // head has gone (a closed tab): the attempt ends now, as the
                    // client's, not an upstream timeout later. One that sent
                    // frames first (its close among them) has them passed on
                    // after the 101, and its end with them.
                    Ok(0) if early.is_empty() => {
                        failed(HandshakeFailure::Error(HandshakeError::ClientClosed));
                        return;
                    }
                    Ok(0) => client_eof = true,
                    Ok(_) => {}
                    Err(_) => {
                        failed(HandshakeFailure::Error(HandshakeError::ClientClosed));
                        return;
                    }
                },
            }
        }
    };
    drop(request);
    let (upstream, buffer, head_len, allowed_rsv) = match outcome {
        Upstream::Failed {
            status,
            message,
            error,
            detail,
        } => {
            failed_with(HandshakeFailure::Error(error), detail);
            // loopwatch's own limit: counted and logged as the accept's is.
            let counted = (error == HandshakeError::FdLimit).then_some(Rejected::FdLimit);
            answer_status(shared, &mut client, peer, counted, status, &message).await;
            return;
        }
        Upstream::Refused(refusal) => {
            failed(HandshakeFailure::Status(refusal.status));
            answer(&mut client, &refusal.response, Then::Close).await;
            return;
        }
        Upstream::Recheck(refusal) => {
            // Answered, counted and told to the brain as a refusal at the
            // lookup is (its Rejected; Answered after a hold): the brain knows
            // it as the late refusal it judged, or as a split refusal.
            shared.counters.refuse(refusal.reason);
            shared.events.send(Event::Rejected {
                key: Arc::clone(&key),
                route: Arc::clone(&route.name),
                at,
                reason: refusal.reason,
                conn_id,
            });
            let attempt = RefusedAttempt {
                key,
                route: Arc::clone(&route.name),
                conn_id,
            };
            refuse(shared, client, refusal, ws_key, attempt).await;
            return;
        }
        Upstream::Accepted {
            stream,
            buffer,
            head_len,
            allowed_rsv,
        } => (stream, buffer, head_len, allowed_rsv),
    };

    // 3. The splice, for either kind of upstream stream, registered for the
    // brain's close and live counts. (The relay is built here and only its
    // `run` awaited, so that the plain future carries no second copy of what
    // the splice is given.)
    let (registered, control) = shared.relays.register(conn_id, Arc::clone(&route.name));
    let opened_at = std::time::Instant::now();
    shared.counters.opened.fetch_add(1, Ordering::Relaxed);
    shared.counters.relays.fetch_add(1, Ordering::AcqRel);
    shared.events.send(Event::Opened {
        key: Arc::clone(&key),
        route: Arc::clone(&route.name),
        at: opened_at,
        conn_id,
    });
    let relay_limits = RelayLimits {
        max_message_size: limits.max_message_size,
        allowed_rsv,
        idle_timeout: limits.idle_timeout,
    };
    let id = RelayIdentity {
        conn_id,
        key,
        route: Arc::clone(&route.name),
        opened_at,
    };
    let events = shared.events.clone();
    // The relay is started (the 101 written, the early bytes of both sides
    // handled) before the handshake's buffers (`early`, the upstream's read
    // `buffer`, several KiB), the upgrade request and the route's copy are
    // dropped: a connection keeps only what its splice needs. The splice is
    // a task of its own, sized to the relay: this handshake task (its future
    // sized to the largest handshake state, 5 KiB) ends here. The connection
    // stays counted (`guard`, its address's share) until the splice ends.
    let end = move |info: CloseInfo| {
        drop(registered);
        let counters = &guard.shared().counters;
        if let Some(side) = info.broken_by {
            counters.protocol_error(side);
        }
        counters.relays.fetch_sub(1, Ordering::AcqRel);
        counters.closed.fetch_add(1, Ordering::Relaxed);
        drop(address);
    };
    match upstream {
        UpstreamStream::Plain(upstream) => {
            let mut relay = Relay::new(client, upstream, relay_limits, id, events, control);
            relay.start(&buffer[..head_len], &buffer[head_len..], &early, client_eof);
            tokio::spawn(relay.run(end));
        }
        UpstreamStream::Tls(upstream) => {
            let mut relay = Relay::new(client, upstream, relay_limits, id, events, control);
            relay.start(&buffer[..head_len], &buffer[head_len..], &early, client_eof);
            tokio::spawn(relay.run(end));
        }
    }
}
