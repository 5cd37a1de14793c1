//! Idle upstream connections of plain HTTP, kept for the next request to the
//! same upstream, as aiohttp's connector pool keeps them (its
//! `keepalive_timeout`, 15 s). Without it every plain request would
//! cost a connect, and leave a TIME_WAIT socket on loopwatch's side: about 470
//! requests a second to one backend address would exhaust the ephemeral ports.
//!
//! Bounded: at most [`MAX_IDLE_PER_UPSTREAM`] idle connections per upstream
//! (the oldest goes), none older than [`KEEP_IDLE`] (swept by the listener
//! every [`SWEEP_EVERY`], and skipped at checkout), none while stopping. A
//! connection is checked before reuse: one the upstream closed, or that has
//! bytes nobody asked for, is dropped. A request on a reused connection that
//! the upstream closes before answering is retried once on a new one when it
//! is idempotent and has no body (aiohttp's rule, RFC 9112 §9.3.1).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

use crate::transport::UpstreamStream;

/// How long an idle upstream connection is kept (aiohttp's default).
pub const KEEP_IDLE: Duration = Duration::from_secs(15);
/// Idle connections kept per upstream (aiohttp keeps any number).
pub const MAX_IDLE_PER_UPSTREAM: usize = 256;
/// How often expired idle connections are closed.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where a route's requests go: its upstream's host and port, and whether
/// over TLS (`https://`).
pub type UpstreamKey = (String, u16, bool);

struct Idle {
    stream: UpstreamStream,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<UpstreamKey, VecDeque<Idle>>>,
}

/// Whether an idle connection can carry a request: nothing to read yet
/// (neither the upstream's close nor stray bytes). Over TLS the probe reads
/// through rustls without waiting: records that carry no data (a session
/// ticket) are taken in, the peer's close_notify or data are not idle.
fn still_idle(stream: &mut UpstreamStream) -> bool {
    let mut probe = [0u8; 1];
    match stream {
        UpstreamStream::Plain(tcp) => {
            matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
        UpstreamStream::Tls(tls) => {
            let mut buf = ReadBuf::new(&mut probe);
            let mut cx = Context::from_waker(Waker::noop());
            Pin::new(tls.as_mut())
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        }
    }
}

impl Pool {
    /// The most recently used live idle connection to `key`, if any.
    pub fn checkout(&self, key: &UpstreamKey) -> Option<UpstreamStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(mut entry) = list.pop_back() {
            if now.duration_since(entry.since) < KEEP_IDLE && still_idle(&mut entry.stream) {
                return Some(entry.stream);
            }
        }
        None
    }

    /// Keep `stream` for the next request to `key`.
    pub fn checkin(&self, key: &UpstreamKey, stream: UpstreamStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(key.clone()).or_default();
        if list.len() >= MAX_IDLE_PER_UPSTREAM {
            list.pop_front();
        }
        list.push_back(Idle {
            stream,
            since: Instant::now(),
        });
    }

    /// Close the connections idle for `KEEP_IDLE` or more.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|e| now.duration_since(e.since) < KEEP_IDLE);
        }
    }

    /// Close every idle connection (the listener stops).
    pub fn clear(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
