//! `EventQueue`: the connection events of the native data plane, drained by
//! the brain in batches with the GIL released.
//!
//! Tokio tasks only `try_send` into the core's bounded queue (a queue full
//! in events or in the bytes they carry drops the event and counts it); `recv_batch` waits for the first event
//! inside `py.detach`, takes what else is queued, and only then builds Python
//! objects: one plain tuple per event, which `proxy/dataplane/native.py` turns
//! into the detectors' event dataclasses.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use loopwatch_dataplane_core::events::{
    bounded_event_queue, AttemptTrace, Event, EventReceiver, EventSender, HandshakeFailure,
    DEFAULT_MAX_BYTES,
};

/// How `recv_batch` waits: it polls the queue, sleeping between looks (the
/// GIL released) from `FIRST_TICK`, doubling while the queue stays empty, up
/// to `MAX_TICK`. A blocking receive would make every event a wake-up of the
/// draining thread, and crossbeam spins (`sched_yield`) before it blocks;
/// polling costs the producers nothing and the brain one look per batch. An
/// event waits at most `MAX_TICK` after a quiet spell.
const FIRST_TICK: Duration = Duration::from_millis(1);
pub const MAX_TICK: Duration = Duration::from_millis(10);
/// The longest a `recv_batch` waits before it looks at Python's signals
/// (Ctrl-C in the main thread) again.
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

/// The brain's clock for events: `time.monotonic()` seconds. Rust's `Instant`
/// is opaque, so one pair of readings taken together maps one onto the other
/// (both are CLOCK_MONOTONIC on Linux).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    at: Instant,
    monotonic: f64,
}

impl Clock {
    pub fn new(py: Python<'_>) -> PyResult<Clock> {
        let time = py.import("time")?;
        let at = Instant::now();
        let monotonic: f64 = time.call_method0("monotonic")?.extract()?;
        Ok(Clock { at, monotonic })
    }

    pub fn seconds(&self, instant: Instant) -> f64 {
        if instant >= self.at {
            self.monotonic + (instant - self.at).as_secs_f64()
        } else {
            self.monotonic - (self.at - instant).as_secs_f64()
        }
    }
}

/// A bounded queue of connection events (Rust producers, one Python consumer).
///
/// `EventQueue(capacity, max_bytes=32 MiB)`: at most `capacity` events and
/// `max_bytes` of what they carry (the client's key, address, path...; an
/// event that finds the queue empty always has room); `recv_batch(max, timeout_s)` returns a list of
/// tuples (an event waits in the queue at most `MAX_TICK` once the consumer
/// is waiting), by type:
///
/// * `("attempt", key, route, t, addr, conn_id)`
/// * `("rejected", key, route, t, reason, conn_id)`
/// * `("answered", key, route, t, conn_id)` (a held refusal answered, or its
///   client gone during the hold)
/// * `("handshake_failed", key, route, t, status, error, conn_id)` (one of
///   status and error is None)
/// * `("opened", key, route, t, conn_id)`
/// * `("closed", key, route, t, conn_id, code, reason, initiator, duration,
///   messages_in, messages_out, bytes_in, bytes_out)`
/// * `("request_rejected", reason, status, peer, message, suppressed, t)`: a
///   request the listener answered (`status`; None when it cut it) before
///   the engine saw it, at most one per reason every 10 s, `suppressed`
///   counting the ones left out since the previous (not an attempt's event:
///   no key, no id)
/// * `("http_request", route, peer, method, path, status, outcome, duration,
///   bytes_in, bytes_out, conn_id, t)`: a plain request's `access` line
///   (sampled at the source as `telemetry.access_log` says; not an attempt's
///   event)
///
/// `t` is `time.monotonic()` seconds, `duration` seconds; `conn_id` is the
/// connection's id, the same on every event of one accepted connection.
#[pyclass(frozen, module = "loopwatch.proxy.dataplane._dataplane")]
pub struct EventQueue {
    sender: EventSender,
    receiver: EventReceiver,
    capacity: usize,
    clock: Clock,
    routes: RouteNames,
}

/// The most route names `RouteNames` keeps; past it, it starts over (routes
/// change only at a reload).
const ROUTES_KEPT: usize = 64;

/// The routes' names as Python strings, each made once: every event carries
/// its route and the brain keeps an open connection's, so one string per
/// route rather than one per event (56 bytes per open connection for "/chat").
struct RouteNames(Mutex<Vec<(Arc<str>, Py<PyString>)>>);

impl RouteNames {
    fn new() -> RouteNames {
        RouteNames(Mutex::new(Vec::new()))
    }

    fn get<'py>(&self, py: Python<'py>, route: &Arc<str>) -> Bound<'py, PyString> {
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, name)) = names
            .iter()
            .find(|(known, _)| Arc::ptr_eq(known, route) || **known == **route)
        {
            return name.bind(py).clone();
        }
        if names.len() >= ROUTES_KEPT {
            names.clear();
        }
        let name = PyString::new(py, route);
        names.push((Arc::clone(route), name.clone().unbind()));
        name
    }
}

impl EventQueue {
    /// A producer for a listener.
    pub fn sender(&self) -> EventSender {
        self.sender.clone()
    }
}

fn check_timeout(timeout_s: f64) -> PyResult<Duration> {
    if !timeout_s.is_finite() || timeout_s < 0.0 {
        return Err(PyValueError::new_err(format!(
            "timeout_s: expected a finite number of seconds >= 0, got {timeout_s}"
        )));
    }
    Ok(Duration::from_secs_f64(timeout_s))
}

#[pymethods]
impl EventQueue {
    #[new]
    #[pyo3(signature = (capacity, max_bytes = DEFAULT_MAX_BYTES))]
    fn new(py: Python<'_>, capacity: usize, max_bytes: usize) -> PyResult<Self> {
        if capacity == 0 {
            return Err(PyValueError::new_err("capacity: expected at least 1 event"));
        }
        let (sender, receiver) = bounded_event_queue(capacity, max_bytes);
        Ok(EventQueue {
            sender,
            receiver,
            capacity,
            clock: Clock::new(py)?,
            routes: RouteNames::new(),
        })
    }

    /// Up to `max` events: waits at most `timeout_s` for the first (polling
    /// with the GIL released, see `MAX_TICK`), then takes what is already
    /// queued. `[]` on timeout.
    #[pyo3(signature = (max, timeout_s))]
    fn recv_batch<'py>(
        &self,
        py: Python<'py>,
        max: usize,
        timeout_s: f64,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let timeout = check_timeout(timeout_s)?;
        let started = Instant::now();
        let mut tick = FIRST_TICK;
        let batch = loop {
            // One detached stretch of polls, at most SIGNAL_SLICE long.
            let (batch, next_tick) = py.detach(|| {
                let slice_end = started + timeout.min(started.elapsed() + SIGNAL_SLICE);
                let mut tick = tick;
                loop {
                    let batch = self.receiver.try_batch(max);
                    let now = Instant::now();
                    if !batch.is_empty() || now >= slice_end || max == 0 {
                        return (batch, tick);
                    }
                    std::thread::sleep(tick.min(slice_end - now));
                    tick = (tick * 2).min(MAX_TICK);
                }
            });
            tick = next_tick;
            if !batch.is_empty() || started.elapsed() >= timeout || max == 0 {
                break batch;
            }
            py.check_signals()?;
        };
        batch
            .into_iter()
            .map(|event| to_tuple(py, &self.clock, &self.routes, event))
            .collect()
    }

    /// The file descriptor to watch for readability while parked (made at the
    /// first call; it lives as long as the queue: never close it).
    fn wake_fd(&self) -> PyResult<i32> {
        self.receiver
            .wake_fd()
            .map_err(|e| PyOSError::new_err(format!("event queue wake-up socket: {e}")))
    }

    /// Before sleeping until `wake_fd` is readable: True when the queue is
    /// still empty (the next event makes it readable, once); False when events
    /// came meanwhile (take them), or before any `wake_fd()`.
    fn park(&self) -> bool {
        self.receiver.park()
    }

    /// Read what made `wake_fd` readable, so that it is readable again only at
    /// the next wake-up.
    fn clear_wake(&self) {
        self.receiver.clear_wake()
    }

    /// Events lost to a full queue since the start (a counter for /metrics).
    #[getter]
    fn dropped(&self) -> u64 {
        self.receiver.drops().total()
    }

    /// Drops since the last call (0 when none): the brain logs one line per
    /// burst with this number.
    fn take_unreported_drops(&self) -> u64 {
        self.receiver.drops().take_unreported()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.capacity
    }

    /// What the queued events may carry at most, in bytes.
    #[getter]
    fn max_bytes(&self) -> usize {
        self.receiver.bytes().1
    }

    /// What the events queued now carry, in bytes.
    #[getter]
    fn queued_bytes(&self) -> usize {
        self.receiver.bytes().0
    }

    fn __len__(&self) -> usize {
        self.receiver.len()
    }

    fn __repr__(&self) -> String {
        let (held, max) = self.receiver.bytes();
        format!(
            "EventQueue(capacity={}, max_bytes={max}, queued={}, queued_bytes={held}, dropped={})",
            self.capacity,
            self.receiver.len(),
            self.receiver.drops().total()
        )
    }
}

/// A Python tuple of the given values, each converted with `into_pyobject`
/// (`?` on a failed conversion): `py_tuple!(py, a, b)`.
/// Every value is an expression taken whole (`&*key` converts the `str`).
macro_rules! py_tuple {
    ($py:expr, $($value:expr),+ $(,)?) => {
        PyTuple::new($py, [$($value.into_pyobject($py)?.into_any()),+])
    };
}

/// An Attempt's trace (`native._trace`): (trace id, span id, flags, the
/// parent's span id or None, the parent's flags, tracestate, path, authority,
/// user agent).
fn trace_tuple<'py>(py: Python<'py>, trace: &AttemptTrace) -> PyResult<Bound<'py, PyTuple>> {
    let context = &trace.context;
    let parent = context.parent.as_ref();
    py_tuple!(
        py,
        context.trace_id,
        context.span_id,
        context.flags,
        parent.map(|p| p.span_id),
        parent.map_or(0, |p| p.flags),
        trace.tracestate.as_deref(),
        &*trace.path,
        trace.authority.as_deref().map(|a| PyBytes::new(py, a)),
        trace.user_agent.as_deref().map(|a| PyBytes::new(py, a)),
    )
}

fn to_tuple<'py>(
    py: Python<'py>,
    clock: &Clock,
    routes: &RouteNames,
    event: Event,
) -> PyResult<Bound<'py, PyTuple>> {
    match event {
        Event::Attempt {
            key,
            route,
            at,
            addr,
            conn_id,
            trace,
        } => py_tuple!(
            py,
            intern!(py, "attempt").clone(),
            &*key,
            routes.get(py, &route),
            clock.seconds(at),
            &*addr,
            conn_id,
            trace.map(|trace| trace_tuple(py, &trace)).transpose()?,
        ),
        Event::Rejected {
            key,
            route,
            at,
            reason,
            conn_id,
        } => py_tuple!(
            py,
            intern!(py, "rejected").clone(),
            &*key,
            routes.get(py, &route),
            clock.seconds(at),
            reason.as_str(),
            conn_id,
        ),
        Event::Answered {
            key,
            route,
            at,
            conn_id,
        } => py_tuple!(
            py,
            intern!(py, "answered").clone(),
            &*key,
            routes.get(py, &route),
            clock.seconds(at),
            conn_id
        ),
        Event::HandshakeFailed {
            key,
            route,
            at,
            failure,
            conn_id,
            detail,
        } => {
            let (status, error) = match failure {
                HandshakeFailure::Status(status) => (Some(status), None),
                HandshakeFailure::Error(error) => (None, Some(error.as_str())),
            };
            py_tuple!(
                py,
                intern!(py, "handshake_failed").clone(),
                &*key,
                routes.get(py, &route),
                clock.seconds(at),
                status,
                error,
                conn_id,
                detail.as_deref(),
            )
        }
        Event::Opened {
            key,
            route,
            at,
            conn_id,
        } => py_tuple!(
            py,
            intern!(py, "opened").clone(),
            &*key,
            routes.get(py, &route),
            clock.seconds(at),
            conn_id
        ),
        Event::Closed {
            key,
            route,
            at,
            conn_id,
            code,
            reason,
            initiator,
            duration,
            traffic,
        } => py_tuple!(
            py,
            intern!(py, "closed").clone(),
            &*key,
            routes.get(py, &route),
            clock.seconds(at),
            conn_id,
            code,
            &*reason,
            initiator.as_str(),
            duration.as_secs_f64(),
            traffic.messages_in,
            traffic.messages_out,
            traffic.bytes_in,
            traffic.bytes_out,
        ),
        Event::RequestRejected(line) => py_tuple!(
            py,
            intern!(py, "request_rejected").clone(),
            line.reason,
            line.status,
            &*line.peer,
            &*line.message,
            line.suppressed,
            clock.seconds(line.at),
        ),
        Event::HttpRequest(line) => py_tuple!(
            py,
            intern!(py, "http_request").clone(),
            routes.get(py, &line.route),
            &*line.peer,
            &*line.method,
            &*line.path,
            line.status,
            line.outcome.as_str(),
            line.duration.as_secs_f64(),
            line.bytes_in,
            line.bytes_out,
            line.conn_id,
            clock.seconds(line.at),
        ),
    }
}
