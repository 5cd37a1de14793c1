//! The plain HTTP requests each route forwarded, counted by the class of the
//! status their client got and timed, in atomics the brain reads at scrape
//! time (`loopwatch_http_requests_total`,
//! `loopwatch_http_request_duration_seconds`): the counting costs an exchange
//! two atomic additions and no event.
//!
//! A route's counts are kept by its name for the listener's life
//! ([`RequestCounts::attach`] gives every configuration's routes the counts of
//! their name): a reload that keeps a route keeps its counts, so they never go
//! back; a route a reload removed keeps its last counts until the process
//! ends. The names are the configuration's, so the series are bounded by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::wire::Route;

/// The `code` label: the class of the status the client got (the upstream's,
/// or loopwatch's own answer), or `none` when none went out (the client left
/// before its response).
pub const CODES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The duration histogram's upper bounds, seconds (the upgrade handshake's
/// buckets, and on to `limits.response_timeout`'s default).
pub const BOUNDS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One route's counts.
#[derive(Debug, Default)]
pub struct RouteRequests {
    by_code: [AtomicU64; CODES.len()],
    /// Per bucket, not cumulative; the last is beyond every bound (+Inf).
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A route's counts at one instant, as the brain exports them.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSnapshot {
    pub route: Arc<str>,
    /// (code label, count), in [`CODES`]' order.
    pub by_code: Vec<(&'static str, u64)>,
    /// (upper bound, cumulative count), +Inf last.
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
}

fn code_index(status: Option<u16>) -> usize {
    match status {
        Some(s @ 100..=599) => usize::from(s / 100) - 1,
        // A status beyond 599 (the upstream's; RFC 9110 §15 allows three
        // digits) is counted with the server errors.
        Some(_) => 4,
        None => CODES.len() - 1,
    }
}

impl RouteRequests {
    /// A request ended: `status` the client got (None: none went out), after
    /// `duration`.
    pub fn count(&self, status: Option<u16>, duration: Duration) {
        self.by_code[code_index(status)].fetch_add(1, Ordering::Relaxed);
        let seconds = duration.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn snapshot(&self, route: &Arc<str>) -> RouteSnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            buckets.push((BOUNDS.get(i).copied().unwrap_or(f64::INFINITY), total));
        }
        RouteSnapshot {
            route: Arc::clone(route),
            by_code: CODES
                .iter()
                .zip(&self.by_code)
                .map(|(&code, n)| (code, n.load(Ordering::Relaxed)))
                .collect(),
            buckets,
            sum_seconds: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

/// Every route's counts by name, for the listener's life.
#[derive(Debug, Default)]
pub struct RequestCounts {
    /// In the order the names first came; a handful (the configuration's).
    routes: Mutex<Vec<(Arc<str>, Arc<RouteRequests>)>>,
}

impl RequestCounts {
    /// Give `routes` (a configuration about to serve) the counts of their
    /// names, made for a name seen for the first time.
    pub fn attach(&self, routes: &mut [Route]) {
        let mut known = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        for route in routes {
            let counts = match known.iter().find(|(name, _)| *name == route.name) {
                Some((_, counts)) => Arc::clone(counts),
                None => {
                    let counts = Arc::new(RouteRequests::default());
                    known.push((Arc::clone(&route.name), Arc::clone(&counts)));
                    counts
                }
            };
            route.requests = counts;
        }
    }

    pub fn snapshot(&self) -> Vec<RouteSnapshot> {
        let known = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .iter()
            .map(|(name, counts)| counts.snapshot(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_counted_by_class_and_durations_in_buckets() {
        let counts = RouteRequests::default();
        counts.count(Some(200), Duration::from_micros(800));
        counts.count(Some(204), Duration::from_millis(30));
        counts.count(Some(502), Duration::from_secs(90));
        counts.count(Some(999), Duration::from_millis(1));
        counts.count(None, Duration::from_millis(1));
        let snap = counts.snapshot(&Arc::from("/api"));
        assert_eq!(
            snap.by_code,
            [
                ("1xx", 0),
                ("2xx", 2),
                ("3xx", 0),
                ("4xx", 0),
                ("5xx", 2),
                ("none", 1)
            ]
        );
        let cumulative = |le: f64| snap.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(cumulative(0.001), 3, "a bound holds what equals it");
        assert_eq!(cumulative(0.025), 3);
        assert_eq!(cumulative(0.05), 4);
        assert_eq!(cumulative(60.0), 4);
        assert_eq!(snap.buckets.last(), Some(&(f64::INFINITY, 5)));
        assert!(
            (snap.sum_seconds - 90.0328).abs() < 1e-9,
            "{}",
            snap.sum_seconds
        );
    }

    #[test]
    fn a_route_keeps_its_counts_across_configurations() {
        let counts = RequestCounts::default();
        let mut first = vec![Route::loopback(1, false)];
        counts.attach(&mut first);
        first[0].requests.count(Some(200), Duration::ZERO);
        let mut second = vec![Route::loopback(2, false)];
        counts.attach(&mut second);
        assert!(Arc::ptr_eq(&first[0].requests, &second[0].requests));
        second[0].requests.count(Some(404), Duration::ZERO);
        let snap = counts.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(&*snap[0].route, "/");
        let by_code: u64 = snap[0].by_code.iter().map(|(_, n)| n).sum();
        assert_eq!(by_code, 2);
    }
}
