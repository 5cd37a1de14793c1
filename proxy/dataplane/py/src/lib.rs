//! `loopwatch.proxy.dataplane._dataplane`: the compiled data plane's face to
//! Python (issue 16), on top of the pure core (`loopwatch_dataplane_core`).
//!
//! * [`queue::EventQueue`]: the connection events, drained in batches with
//!   the GIL released;
//! * [`table::EnforcementTable`]: the brain's decisions, written from Python
//!   (each write builds the next snapshot without the GIL), read lock-free
//!   at admission;
//! * [`identity::Identity`]: the `identity:` settings, keys loaded once;
//! * `Listener`: the native listener on a tokio multi-thread runtime
//!   (`ws://`, or with a certificate `wss://`; plain HTTP too; `ws://`,
//!   `wss://`, `http://` and `https://` upstreams), started and stopped from
//!   Python; its connections never take the GIL.
//!
//! `proxy/dataplane/native.py` is the one Python module that imports this.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use loopwatch_dataplane_core::frames::close_code_valid;
use loopwatch_dataplane_core::head::HeadLimits;
use loopwatch_dataplane_core::identity::IdentitySpec;
use loopwatch_dataplane_core::trace::{Sampling, ALL_ROOTS};

mod checks;
mod conn;
pub mod control;
mod dial;
mod http;
pub mod identity;
mod listener;
mod pool;
pub mod probe;
pub mod queue;
pub mod relay;
pub mod requests;
pub mod response;
pub mod table;
pub mod tls;
pub mod tracing;
pub mod transport;
pub mod wire;

use control::{close_code_allowed, CloseCommand, PolicyValues};
use identity::Identity;
use listener::{Config, Limits, Server, Shared};
use queue::EventQueue;
use table::{duration, EnforcementTable};
use wire::{RejectWith, Route};

/// A route as native.py passes it: (prefix, name, upstream host, upstream
/// port, Host for the upstream, upstream base path, TLS to the upstream).
type RouteTuple = (Vec<u8>, String, String, u16, Vec<u8>, Vec<u8>, bool);

fn positive(name: &str, seconds: f64) -> PyResult<Duration> {
    let d = duration(name, seconds)?;
    if seconds <= 0.0 {
        return Err(PyValueError::new_err(format!(
            "{name}: expected more than 0 seconds, got {seconds}"
        )));
    }
    // Under a nanosecond is no Duration: the least one, as the settings
    // (which take any positive number) meant (check-config passed it).
    Ok(d.max(Duration::from_nanos(1)))
}

fn at_least_one(name: &str, value: usize) -> PyResult<usize> {
    if value == 0 {
        return Err(PyValueError::new_err(format!(
            "{name}: expected at least 1, got 0"
        )));
    }
    Ok(value)
}

fn parse_routes(items: Vec<RouteTuple>) -> PyResult<Vec<Route>> {
    if items.is_empty() {
        return Err(PyValueError::new_err("routes: expected at least one route"));
    }
    let mut routes = Vec::with_capacity(items.len());
    for (prefix, name, host, port, authority, base_path, tls) in items {
        if !prefix.starts_with(b"/") {
            return Err(PyValueError::new_err(format!(
                "routes: a prefix must start with \"/\", got {:?}",
                String::from_utf8_lossy(&prefix)
            )));
        }
        if host.is_empty() || port == 0 {
            return Err(PyValueError::new_err(format!(
                "routes: upstream of {name:?}: expected a host and a port, got {host:?}:{port}"
            )));
        }
        routes.push(Route {
            prefix,
            name: Arc::from(name),
            host,
            port,
            authority,
            base_path,
            tls,
            requests: Default::default(),
        });
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    Ok(routes)
}

/// The native listener: `Listener.start(...)` binds and starts accepting;
/// `stop(grace_s)` ends it (see `proxy/dataplane/native.py`).
#[pyclass(frozen, module = "loopwatch.proxy.dataplane._dataplane")]
struct Listener {
    /// Held by `stop()` for the whole grace: nothing else takes it, so that
    /// `running`, `stats()` and the brain's commands answer meanwhile.
    server: Mutex<Server>,
    /// `stop()` was called (it may still be waiting out the grace).
    stopped: AtomicBool,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: usize,
}

fn parse_reject_with(text: &str) -> PyResult<RejectWith> {
    RejectWith::parse(text).ok_or_else(|| {
        PyValueError::new_err(format!(
            "reject_with: expected \"close-1013\" or \"http-429\", got {text:?}"
        ))
    })
}

fn check_close_code(code: u16) -> PyResult<u16> {
    if !close_code_allowed(code) {
        return Err(PyValueError::new_err(format!(
            "close_code: expected 1013 or an application code from 4000 to 4999, got {code}"
        )));
    }
    Ok(code)
}

/// The listener's configuration (routes, `limits:`, `identity:`, `tls:`,
/// `upstream_tls:`), checked and with its files read (certificates, keys)
/// when it is made: `Listener.start` takes one, `Listener.reload` swaps the
/// running one for another. Bad values are a ValueError naming the setting
/// (and the file).
#[pyclass(frozen, module = "loopwatch.proxy.dataplane._dataplane")]
struct ListenerConfig {
    inner: Config,
}

#[pymethods]
impl ListenerConfig {
    /// Connections are routed by `routes`, under these limits, keyed by
    /// `identity` (the peer address when None); with `tls_cert_file` and
    /// `tls_key_file` the listener terminates TLS; `wss://` and `https://`
    /// routes are verified as `upstream_*` say, and with `upstream_cert_file`
    /// and `upstream_key_file` loopwatch presents that client certificate.
    /// `access_log_share` of the plain requests make an `access` line (an
    /// `http_request` event).
    #[new]
    #[pyo3(signature = (
        routes, *,
        max_head_size = 16 * 1024,
        early_data_size = 64 * 1024,
        error_body_size = 64 * 1024,
        max_message_size = Some(64 * 1024 * 1024),
        handshake_timeout = 10.0,
        keepalive_timeout = 75.0,
        connect_timeout = 5.0,
        idle_timeout = Some(3600.0),
        body_timeout = 30.0,
        response_timeout = 60.0,
        response_idle_timeout = 60.0,
        max_connections = 10_000,
        max_connections_per_address = None,
        max_heads_per_address = None,
        identity = None,
        tls_cert_file = None,
        tls_key_file = None,
        upstream_verify = true,
        upstream_ca_file = None,
        upstream_server_name = None,
        upstream_cert_file = None,
        upstream_key_file = None,
        access_log_share = 0.0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        routes: Vec<RouteTuple>,
        max_head_size: usize,
        early_data_size: usize,
        error_body_size: usize,
        max_message_size: Option<u64>,
        handshake_timeout: f64,
        keepalive_timeout: f64,
        connect_timeout: f64,
        idle_timeout: Option<f64>,
        body_timeout: f64,
        response_timeout: f64,
        response_idle_timeout: f64,
        max_connections: usize,
        max_connections_per_address: Option<usize>,
        max_heads_per_address: Option<usize>,
        identity: Option<&Bound<'_, Identity>>,
        tls_cert_file: Option<String>,
        tls_key_file: Option<String>,
        upstream_verify: bool,
        upstream_ca_file: Option<String>,
        upstream_server_name: Option<String>,
        upstream_cert_file: Option<String>,
        upstream_key_file: Option<String>,
        access_log_share: f64,
    ) -> PyResult<ListenerConfig> {
        if !(0.0..=1.0).contains(&access_log_share) {
            return Err(PyValueError::new_err(format!(
                "access_log_share: expected a share from 0 to 1, got {access_log_share}"
            )));
        }
        let limits = Limits {
            head: HeadLimits {
                max_head_size: at_least_one("max_head_size", max_head_size)?,
            },
            early_data_size,
            error_body_size,
            max_message_size: match max_message_size {
                Some(0) => {
                    return Err(PyValueError::new_err(
                        "max_message_size: expected at least 1 byte, or None for no limit",
                    ))
                }
                other => other,
            },
            handshake_timeout: positive("handshake_timeout", handshake_timeout)?,
            keepalive_timeout: positive("keepalive_timeout", keepalive_timeout)?,
            connect_timeout: positive("connect_timeout", connect_timeout)?,
            idle_timeout: idle_timeout
                .map(|s| positive("idle_timeout", s))
                .transpose()?,
            body_timeout: positive("body_timeout", body_timeout)?,
            response_timeout: positive("response_timeout", response_timeout)?,
            response_idle_timeout: positive("response_idle_timeout", response_idle_timeout)?,
            max_connections: at_least_one("max_connections", max_connections)?,
            max_connections_per_address,
            max_heads_per_address,
        };
        let identity = match identity {
            Some(identity) => Arc::clone(&identity.get().inner),
            // Without identity settings the key is the peer address.
            None => Arc::new(
                loopwatch_dataplane_core::identity::Identity::new(&IdentitySpec::by_address())
                    .map_err(PyValueError::new_err)?,
            ),
        };
        let routes = parse_routes(routes)?;
        // Files are read and checked now (without the GIL): a bad one is a
        // ValueError naming the setting and the file, not a failure later.
        let tls = match (tls_cert_file, tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(
                py.detach(|| tls::listener_acceptor(&cert, &key))
                    .map_err(PyValueError::new_err)?,
            ),
            _ => {
                return Err(PyValueError::new_err(
                    "tls: expected both tls_cert_file and tls_key_file, or neither",
                ))
            }
        };
        // The client certificate for upstreams is read whenever it is set, as
        // the listener's is: a file that cannot serve fails now, not once a
        // wss:// or https:// route is added.
        let client_certificate = match (upstream_cert_file, upstream_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(
                py.detach(|| tls::client_certificate(&cert, &key))
                    .map_err(PyValueError::new_err)?,
            ),
            _ => return Err(PyValueError::new_err(
                "upstream_tls: expected both upstream_cert_file and upstream_key_file, or neither",
            )),
        };
        // So is a CA bundle: a wrong one fails now, not at the reload that
        // adds the first wss:// or https:// route.
        let upstream_tls = if routes.iter().any(|r| r.tls) || upstream_ca_file.is_some() {
            let tls = py
                .detach(|| {
                    tls::UpstreamTls::new(
                        upstream_verify,
                        upstream_ca_file.as_deref(),
                        upstream_server_name.as_deref(),
                        client_certificate,
                    )
                })
                .map_err(PyValueError::new_err)?;
            for route in routes.iter().filter(|r| r.tls) {
                tls.server_name(&route.host).map_err(|e| {
                    PyValueError::new_err(format!(
                        "routes: upstream of {:?}: {e}: it cannot be a TLS server name",
                        &*route.name
                    ))
                })?;
            }
            Some(Arc::new(tls))
        } else {
            None
        };
        Ok(ListenerConfig {
            inner: Config {
                routes,
                limits,
                identity,
                tls,
                upstream_tls,
                access_log_share,
            },
        })
    }
}

#[pymethods]
impl Listener {
    /// Bind `host:port` (0: any free port), build the runtime with `threads`
    /// workers (default: one per core) and start accepting, as `config` says
    /// (`ListenerConfig`; `reload` replaces it), with this refusal policy
    /// (`reconfigure` changes it). Connections are admitted by `table`, and
    /// their events go to `queue`. `trace_root_bound` (None: tracing off) and
    /// `trace_parent_based` are how connection spans are sampled (the
    /// OTEL_* environment, read at start): listener-wide, a reload keeps them.
    #[staticmethod]
    #[pyo3(signature = (
        host, port, config, queue, table, *,
        max_holds = 1024,
        max_held_per_key = 4,
        reject_with = "close-1013",
        close_code = 1013,
        threads = None,
        trace_root_bound = None,
        trace_parent_based = true,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        host: &str,
        port: u16,
        config: &Bound<'_, ListenerConfig>,
        queue: &Bound<'_, EventQueue>,
        table: &Bound<'_, EnforcementTable>,
        max_holds: usize,
        max_held_per_key: usize,
        reject_with: &str,
        close_code: u16,
        threads: Option<usize>,
        trace_root_bound: Option<u128>,
        trace_parent_based: bool,
    ) -> PyResult<Listener> {
        // Tracing: on with a root bound (the sampler of OTEL_TRACES_SAMPLER,
        // read at start: a reload keeps it).
        let tracing = match trace_root_bound {
            None => None,
            Some(bound) if bound > ALL_ROOTS => {
                return Err(PyValueError::new_err(format!(
                    "trace_root_bound: expected 0 to 2**64, got {bound}"
                )))
            }
            Some(root_bound) => Some(Sampling {
                root_bound,
                parent_based: trace_parent_based,
            }),
        };
        let policy = PolicyValues {
            reject_with: parse_reject_with(reject_with)?,
            close_code: check_close_code(close_code)?,
            max_holds,
            max_held_per_key,
        };
        let threads = match threads {
            Some(n) => at_least_one("threads", n)?,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let config = config.get().inner.clone();
        let table = table.get().shared();
        let events = queue.get().sender();
        let host = host.to_owned();
        let server = py.detach(move || {
            let addr = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host:?} has no address"))?;
            Server::start(addr, threads, config, policy, tracing, table, events)
                .map_err(|e| format!("listen: cannot listen on {addr}: {e}"))
        });
        let server = server.map_err(PyOSError::new_err)?;
        Ok(Listener {
            local_addr: server.local_addr,
            shared: Arc::clone(&server.shared),
            server: Mutex::new(server),
            stopped: AtomicBool::new(false),
            threads,
        })
    }

    /// The bound port.
    #[getter]
    fn port(&self) -> u16 {
        self.local_addr.port()
    }

    #[getter]
    fn host(&self) -> String {
        self.local_addr.ip().to_string()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    /// Accepting (`stop()` not called yet). Never waits for a stop in
    /// progress.
    #[getter]
    fn running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    /// Stop accepting, close live WebSockets with 1001 on both legs (answer
    /// handshakes in progress with 503), wait up to `grace_s` seconds for
    /// every connection to end, then drop what is left. Blocks without the
    /// GIL. Returns how many connections were still open at the end of the
    /// grace (0: all ended cleanly). Idempotent.
    fn stop(&self, py: Python<'_>, grace_s: f64) -> PyResult<usize> {
        let grace = duration("grace_s", grace_s)?;
        self.stopped.store(true, Ordering::Release);
        Ok(py.detach(|| {
            self.server
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stop(grace)
        }))
    }

    /// Counters at this instant: connections now, what was refused and why.
    /// Never waits for a stop in progress (it reads the shared counters).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = &self.shared;
        let c = &shared.counters;
        let holds = &shared.holds;
        let out = PyDict::new(py);
        out.set_item("accepted", c.accepted.load(Ordering::Relaxed))?;
        out.set_item("accept_errors", c.accept_errors.load(Ordering::Relaxed))?;
        out.set_item("active", c.active.load(Ordering::Relaxed))?;
        out.set_item("relays", c.relays.load(Ordering::Relaxed))?;
        out.set_item("opened", c.opened.load(Ordering::Relaxed))?;
        out.set_item("closed", c.closed.load(Ordering::Relaxed))?;
        out.set_item(
            "handshake_failed",
            c.handshake_failed.load(Ordering::Relaxed),
        )?;
        out.set_item("holding", holds.count())?;
        out.set_item("held", holds.taken.load(Ordering::Relaxed))?;
        out.set_item("held_answered", holds.answered_counts())?;
        out.set_item("held_skipped", holds.skipped_counts())?;
        out.set_item("released", holds.released.load(Ordering::Relaxed))?;
        out.set_item("rejected", c.rejected())?;
        out.set_item("refused", c.refused())?;
        out.set_item("protocol_errors", c.protocol_errors())?;
        out.set_item("addresses", shared.addresses.tracked())?;
        out.set_item("events_dropped", shared.events.drops().total())?;
        let checks = shared.signature_checks.now();
        out.set_item("signature_checks_waiting", checks.waiting)?;
        out.set_item("signature_checks_running", checks.running)?;
        Ok(out)
    }

    /// The plain requests each route forwarded: a list of `(route, [(code,
    /// count)], [(upper bound, cumulative count)], sum of seconds)`, the last
    /// bound `inf` (`requests::RouteSnapshot`).
    fn requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for snap in self.shared.requests.snapshot() {
            out.append((&*snap.route, snap.by_code, snap.buckets, snap.sum_seconds))?;
        }
        Ok(out)
    }

    /// Close the relayed WebSocket `conn_id` (the id of its events) with
    /// `code` and `reason` (cut to 123 bytes on a character boundary, as
    /// `core::frames::build_close_frame` does) on both legs, each at a frame
    /// boundary (the engine's close-oldest, an operator's close). False when no such WebSocket is open (unknown, or ended); one
    /// asked already keeps its first close. Never waits for the close to
    /// happen: its Closed event follows, with initiator "proxy".
    #[pyo3(signature = (conn_id, code, reason = ""))]
    fn close(&self, py: Python<'_>, conn_id: u64, code: u16, reason: &str) -> PyResult<bool> {
        if !close_code_valid(code) {
            return Err(PyValueError::new_err(format!(
                "code: expected a close code a peer may receive (1000-1003, 1007-1014, 3000-4999), got {code}"
            )));
        }
        let command = CloseCommand {
            code,
            reason: reason.to_owned(),
            grace: relay::CLOSE_GRACE,
        };
        Ok(py.detach(|| self.shared.relays.close(conn_id, command)))
    }

    /// The health check's probe (`probe.rs`): a WebSocket upgrade of
    /// `target` (path and query) on the upstream of the route it takes in
    /// the configuration now, with `authorization` as that header, within
    /// `timeout_s`. Returns `(status, "")` for the upstream's final status
    /// (101: upgraded, then closed), or `(None, why)`. Blocks: call it from
    /// a thread (the GIL is released meanwhile).
    #[pyo3(signature = (target, authorization = None, timeout_s = 5.0))]
    fn probe(
        &self,
        py: Python<'_>,
        target: &str,
        authorization: Option<&str>,
        timeout_s: f64,
    ) -> PyResult<(Option<u16>, String)> {
        let deadline = positive("timeout_s", timeout_s)?;
        // try_lock: a stop holds the lock for its whole drain.
        let handle = match self.server.try_lock() {
            Ok(server) if !self.stopped.load(Ordering::Acquire) => server.handle(),
            _ => None,
        };
        let Some(handle) = handle else {
            return Ok((None, "the listener is stopped".to_owned()));
        };
        let config = self.shared.config();
        let target = target.as_bytes().to_vec();
        let authorization = authorization.map(|a| a.as_bytes().to_vec());
        let result = py.detach(move || {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            handle.spawn(async move {
                let tls = config.upstream_tls.as_deref();
                let found = probe::probe(
                    &config.routes,
                    tls,
                    &target,
                    authorization.as_deref(),
                    deadline,
                )
                .await;
                let _ = tx.send(found);
            });
            // The probe is bounded by its deadline; a runtime stopped under
            // it drops the task, and the sender with it.
            rx.recv()
                .unwrap_or_else(|_| probe::ProbeResult::Failed("the listener stopped".into()))
        });
        Ok(match result {
            probe::ProbeResult::Answered(status) => (Some(status), String::new()),
            probe::ProbeResult::Failed(why) => (None, why),
        })
    }

    /// Answer the held refusals of client `key` now, "retry in 1s", so its
    /// next attempt comes at once (`ProxyServer.release_held`; call it after
    /// clearing the key in the table). Returns how many were held.
    fn release_held(&self, py: Python<'_>, key: &str) -> usize {
        py.detach(|| self.shared.holds.release(key))
    }

    /// Every open relayed WebSocket with what crossed it so far, by id:
    /// `[(conn_id, route, messages_in, messages_out, bytes_in, bytes_out)]`
    /// (in: client to upstream; counts as of each side's last read).
    fn live(&self, py: Python<'_>) -> Vec<(u64, String, u64, u64, u64, u64)> {
        let live = py.detach(|| self.shared.relays.live());
        live.into_iter()
            .map(|c| {
                let t = c.traffic;
                (
                    c.conn_id,
                    c.route.to_string(),
                    t.messages_in,
                    t.messages_out,
                    t.bytes_in,
                    t.bytes_out,
                )
            })
            .collect()
    }

    /// A reload of the listener's configuration: connections accepted from
    /// now on are routed, limited, keyed and (TLS) served as `config` says;
    /// those open keep the configuration of their accept, untouched. The
    /// per-address caps apply the new limits and trusted proxies to the
    /// connections that come next; idle pooled upstream connections are
    /// closed. The address, the threads and the trace sampling stay as at
    /// start. `config` was
    /// checked (its files read) when it was made: this cannot fail.
    fn reload(&self, py: Python<'_>, config: &Bound<'_, ListenerConfig>) {
        let config = config.get().inner.clone();
        py.detach(|| self.shared.set_config(config));
    }

    /// What a reload may change of the refusal policy; each None keeps its
    /// value. Every value is checked before any is set. Refusals from now on
    /// use the new values, holds already taken keep theirs.
    #[pyo3(signature = (*, reject_with = None, close_code = None, max_holds = None, max_held_per_key = None))]
    fn reconfigure(
        &self,
        reject_with: Option<&str>,
        close_code: Option<u16>,
        max_holds: Option<usize>,
        max_held_per_key: Option<usize>,
    ) -> PyResult<()> {
        let now = self.shared.policy.snapshot();
        let values = PolicyValues {
            reject_with: reject_with.map_or(Ok(now.reject_with), parse_reject_with)?,
            close_code: close_code.map_or(Ok(now.close_code), check_close_code)?,
            max_holds: max_holds.unwrap_or(now.max_holds),
            max_held_per_key: max_held_per_key.unwrap_or(now.max_held_per_key),
        };
        self.shared.policy.set(values);
        Ok(())
    }

    /// The refusal policy now: reject_with, close_code, max_holds, max_held_per_key.
    fn policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.shared.policy.snapshot();
        let out = PyDict::new(py);
        let how = match p.reject_with {
            RejectWith::Close1013 => "close-1013",
            RejectWith::Http429 => "http-429",
        };
        out.set_item("reject_with", how)?;
        out.set_item("close_code", p.close_code)?;
        out.set_item("max_holds", p.max_holds)?;
        out.set_item("max_held_per_key", p.max_held_per_key)?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "Listener({}, threads={}, running={})",
            self.local_addr,
            self.threads,
            self.running()
        )
    }
}

#[pymodule]
fn _dataplane(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EventQueue>()?;
    m.add_class::<EnforcementTable>()?;
    m.add_class::<Listener>()?;
    m.add_class::<ListenerConfig>()?;
    m.add_class::<Identity>()?;
    m.add("CLOSE_GRACE", relay::CLOSE_GRACE.as_secs_f64())?;
    m.add(
        "REJECTION_LOG_INTERVAL",
        loopwatch_dataplane_core::events::REJECTION_LOG_INTERVAL.as_secs_f64(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_positive_duration_under_a_nanosecond_is_the_least_one() {
        // The settings take any positive number; check-config passed 1e-10 s,
        // and the data plane refused it as zero (the extremes probe).
        assert_eq!(positive("t", 1e-10).unwrap(), Duration::from_nanos(1));
        assert_eq!(positive("t", 2.5).unwrap(), Duration::from_millis(2500));
        assert!(positive("t", 0.0).is_err());
        assert!(positive("t", -1.0).is_err());
    }
}
