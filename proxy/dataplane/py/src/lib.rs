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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use loopwatch_dataplane_core::head::HeadLimits;
use loopwatch_dataplane_core::identity::IdentitySpec;

mod conn;
mod http;
pub mod identity;
mod listener;
mod pool;
pub mod queue;
pub mod relay;
pub mod response;
pub mod table;
pub mod tls;
pub mod transport;
pub mod wire;

use identity::Identity;
use listener::{Config, Limits, Server};
use queue::EventQueue;
use table::{duration, EnforcementTable};
use wire::{RejectWith, Route};

/// A route as native.py passes it: (prefix, name, upstream host, upstream
/// port, Host for the upstream, upstream base path, TLS to the upstream).
type RouteTuple = (Vec<u8>, String, String, u16, Vec<u8>, Vec<u8>, bool);

fn positive(name: &str, seconds: f64) -> PyResult<Duration> {
    let d = duration(name, seconds)?;
    if d.is_zero() {
        return Err(PyValueError::new_err(format!(
            "{name}: expected more than 0 seconds, got {seconds}"
        )));
    }
    Ok(d)
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
        });
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    Ok(routes)
}

/// The native listener: `Listener.start(...)` binds and starts accepting;
/// `stop(grace_s)` ends it (see `proxy/dataplane/native.py`).
#[pyclass(frozen, module = "loopwatch.proxy.dataplane._dataplane")]
struct Listener {
    server: Mutex<Server>,
    local_addr: SocketAddr,
    threads: usize,
}

#[pymethods]
impl Listener {
    /// Bind `host:port` (0: any free port), build the runtime with `threads`
    /// workers (default: one per core) and start accepting. Connections are
    /// routed by `routes`, keyed by `identity` (the peer address when None),
    /// admitted by `table`, and their events go to `queue`.
    #[staticmethod]
    #[pyo3(signature = (
        host, port, routes, queue, table, *,
        max_head_size = 16 * 1024,
        early_data_size = 64 * 1024,
        error_body_size = 64 * 1024,
        max_message_size = Some(64 * 1024 * 1024),
        handshake_timeout = 10.0,
        connect_timeout = 5.0,
        idle_timeout = Some(3600.0),
        body_timeout = 30.0,
        response_timeout = 60.0,
        response_idle_timeout = 60.0,
        max_connections = 10_000,
        max_holds = 1024,
        reject_with = "close-1013",
        threads = None,
        identity = None,
        tls_cert_file = None,
        tls_key_file = None,
        upstream_verify = true,
        upstream_ca_file = None,
        upstream_server_name = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        host: &str,
        port: u16,
        routes: Vec<RouteTuple>,
        queue: &Bound<'_, EventQueue>,
        table: &Bound<'_, EnforcementTable>,
        max_head_size: usize,
        early_data_size: usize,
        error_body_size: usize,
        max_message_size: Option<u64>,
        handshake_timeout: f64,
        connect_timeout: f64,
        idle_timeout: Option<f64>,
        body_timeout: f64,
        response_timeout: f64,
        response_idle_timeout: f64,
        max_connections: usize,
        max_holds: usize,
        reject_with: &str,
        threads: Option<usize>,
        identity: Option<&Bound<'_, Identity>>,
        tls_cert_file: Option<String>,
        tls_key_file: Option<String>,
        upstream_verify: bool,
        upstream_ca_file: Option<String>,
        upstream_server_name: Option<String>,
    ) -> PyResult<Listener> {
        let reject_with = RejectWith::parse(reject_with).ok_or_else(|| {
            PyValueError::new_err(format!(
                "reject_with: expected \"close-1013\" or \"http-429\", got {reject_with:?}"
            ))
        })?;
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
            connect_timeout: positive("connect_timeout", connect_timeout)?,
            idle_timeout: idle_timeout
                .map(|s| positive("idle_timeout", s))
                .transpose()?,
            body_timeout: positive("body_timeout", body_timeout)?,
            response_timeout: positive("response_timeout", response_timeout)?,
            response_idle_timeout: positive("response_idle_timeout", response_idle_timeout)?,
            max_connections: at_least_one("max_connections", max_connections)?,
            max_holds,
        };
        let threads = match threads {
            Some(n) => at_least_one("threads", n)?,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let identity = match identity {
            Some(identity) => Arc::clone(&identity.get().inner),
            // Without identity settings the key is the peer address.
            None => Arc::new(
                loopwatch_dataplane_core::identity::Identity::new(&IdentitySpec {
                    sources: vec!["ip".to_owned()],
                    trusted_proxies: Vec::new(),
                    bind_to_address: true,
                    bind_verified: false,
                    max_key_length: 256,
                    jwt: Default::default(),
                })
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
        let upstream_tls = if routes.iter().any(|r| r.tls) {
            let tls = py
                .detach(|| {
                    tls::UpstreamTls::new(
                        upstream_verify,
                        upstream_ca_file.as_deref(),
                        upstream_server_name.as_deref(),
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
        let config = Config {
            routes,
            limits,
            reject_with,
            identity,
            tls,
            upstream_tls,
        };
        let table = table.get().shared();
        let events = queue.get().sender();
        let host = host.to_owned();
        let server = py.detach(move || {
            let addr = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host:?} has no address"))?;
            Server::start(addr, threads, config, table, events)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))
        });
        let server = server.map_err(PyOSError::new_err)?;
        Ok(Listener {
            local_addr: server.local_addr,
            server: Mutex::new(server),
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

    /// Accepting (not stopped yet).
    #[getter]
    fn running(&self) -> bool {
        self.server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running()
    }

    /// Stop accepting, close live WebSockets with 1001 on both legs (answer
    /// handshakes in progress with 503), wait up to `grace_s` seconds for
    /// every connection to end, then drop what is left. Blocks without the
    /// GIL. Returns how many connections were still open at the end of the
    /// grace (0: all ended cleanly). Idempotent.
    fn stop(&self, py: Python<'_>, grace_s: f64) -> PyResult<usize> {
        let grace = duration("grace_s", grace_s)?;
        Ok(py.detach(|| {
            self.server
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stop(grace)
        }))
    }

    /// Counters at this instant: connections now, what was refused and why.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = Arc::clone(
            &self
                .server
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .shared,
        );
        let c = &shared.counters;
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
        out.set_item("holding", c.holding.load(Ordering::Relaxed))?;
        out.set_item("held", c.held.load(Ordering::Relaxed))?;
        out.set_item("rejected", c.rejected().into_iter().collect::<Vec<_>>())?;
        out.set_item("refused", c.refused().into_iter().collect::<Vec<_>>())?;
        out.set_item("tls_failed", c.tls_failures())?;
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
    m.add_class::<Identity>()?;
    m.add("CLOSE_GRACE", relay::CLOSE_GRACE.as_secs_f64())?;
    Ok(())
}
