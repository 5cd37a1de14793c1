//! `EnforcementTable`: the write side of the core's enforcement table, for the
//! brain, and the read side the native listener admits with.
//!
//! Every write builds the next snapshot with the GIL released (the core's
//! read-copy-update) and publishes it atomically; the listener's lookups never
//! wait for it. Durations come in as seconds and become deadlines on the
//! Rust side's clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use loopwatch_dataplane_core::table::{
    AccessList, Admission, BreakerEntry, BreakerState, Cooldown, EnforcementTable as Table,
    HoldPolicy, KeyEntry, NoProbe, ProbeBudget, RefuseReason,
};

/// The longest duration a table entry takes (ten years): beyond it a deadline
/// would overflow the clock.
const MAX_SECONDS: f64 = 10.0 * 365.0 * 86_400.0;

pub fn duration(name: &str, seconds: f64) -> PyResult<Duration> {
    if !seconds.is_finite() || !(0.0..=MAX_SECONDS).contains(&seconds) {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a number of seconds from 0 to {MAX_SECONDS}, got {seconds}"
        )));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn optional_duration(name: &str, seconds: Option<f64>) -> PyResult<Option<Duration>> {
    seconds.map(|s| duration(name, s)).transpose()
}

/// A breaker's state, as the brain names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateKind {
    Closed,
    Open,
    HalfOpen,
}

impl StateKind {
    fn parse(text: &str) -> PyResult<StateKind> {
        match text {
            "closed" => Ok(StateKind::Closed),
            "open" => Ok(StateKind::Open),
            "half_open" => Ok(StateKind::HalfOpen),
            _ => Err(PyValueError::new_err(format!(
                "state: expected \"closed\", \"open\" or \"half_open\", got {text:?}"
            ))),
        }
    }

    fn of(state: &BreakerState) -> StateKind {
        match state {
            BreakerState::Closed => StateKind::Closed,
            BreakerState::Open { .. } => StateKind::Open,
            BreakerState::HalfOpen { .. } => StateKind::HalfOpen,
        }
    }
}

/// What the brain decided, read by the native listener at admission.
///
/// Per client key: `set_cooldown`, `set_min_interval`, `set_at_capacity`,
/// `clear`; lists: `set_allow`, `set_deny` (keys, or CIDRs matched against the
/// key's address part and the peer); breakers: `set_breaker`,
/// `remove_breaker`; `set_defaults` for the retry times of refusals that
/// carry none of their own and the hold of each refusal reason.
#[pyclass(frozen, module = "loopwatch.proxy.dataplane._dataplane")]
pub struct EnforcementTable {
    inner: Arc<Table>,
}

impl EnforcementTable {
    pub fn shared(&self) -> Arc<Table> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl EnforcementTable {
    #[new]
    fn new() -> Self {
        EnforcementTable {
            inner: Arc::new(Table::default()),
        }
    }

    /// Refuse `key` for `seconds` from now, naming the rule (`reason`) that
    /// started it. `retry_after`: the retry time refusals announce, if not
    /// what is left of the cooldown; `hold`: hold a refused attempt this long
    /// before answering it, instead of the cooldown hold of `set_defaults`
    /// (never past the retry time either way).
    #[pyo3(signature = (key, seconds, reason="manual", retry_after=None, hold=None))]
    fn set_cooldown(
        &self,
        py: Python<'_>,
        key: &str,
        seconds: f64,
        reason: &str,
        retry_after: Option<f64>,
        hold: Option<f64>,
    ) -> PyResult<()> {
        let length = duration("seconds", seconds)?;
        let retry_after = optional_duration("retry_after", retry_after)?;
        let hold = optional_duration("hold", hold)?;
        let rule: Arc<str> = Arc::from(reason);
        py.detach(|| {
            let now = Instant::now();
            let cooldown = Cooldown {
                until: now + length,
                rule,
                hold,
                retry_until: retry_after.map(|r| now + r),
            };
            self.inner.update_pruned(now, |s| {
                let entry = s.keys.entry(key.into()).or_default();
                entry.cooldown = Some(cooldown);
            });
        });
        Ok(())
    }

    /// No attempt of `key` before `seconds` from now (min-interval).
    fn set_min_interval(&self, py: Python<'_>, key: &str, seconds: f64) -> PyResult<()> {
        let wait = duration("seconds", seconds)?;
        py.detach(|| {
            let now = Instant::now();
            self.inner.update_pruned(now, |s| {
                s.keys.entry(key.into()).or_default().not_before = Some(now + wait);
            });
        });
        Ok(())
    }

    /// Whether `key` has its max-concurrent connections open (`reject-new`).
    fn set_at_capacity(&self, py: Python<'_>, key: &str, at_capacity: bool) {
        py.detach(|| {
            let now = Instant::now();
            self.inner.update_pruned(now, |s| {
                s.keys.entry(key.into()).or_default().at_capacity = at_capacity;
            });
        });
    }

    /// Lift every restriction on `key`; whether it had any.
    fn clear(&self, py: Python<'_>, key: &str) -> bool {
        py.detach(|| {
            self.inner.remove_if(
                |s| s.keys.contains_key(key),
                |s| {
                    s.keys.remove(key);
                },
            )
        })
    }

    /// Replace the allow list: client keys, or CIDRs ("10.0.0.0/8").
    fn set_allow(&self, py: Python<'_>, entries: Vec<String>) -> PyResult<()> {
        let list = parse_list("allow", &entries)?;
        py.detach(|| self.inner.update(|s| s.allow = list.clone()));
        Ok(())
    }

    /// Replace the deny list: client keys, or CIDRs.
    fn set_deny(&self, py: Python<'_>, entries: Vec<String>) -> PyResult<()> {
        let list = parse_list("deny", &entries)?;
        py.detach(|| self.inner.update(|s| s.deny = list.clone()));
        Ok(())
    }

    /// Set the state of breaker `name` of route `route` (its name: the path
    /// prefix; an attempt meets only its own route's breakers): "closed";
    /// "open" for `seconds` (then it lets
    /// `probes` through); "half_open" with `probes` probes, the rest refused
    /// with `seconds` as their retry time. A breaker that stays in its state
    /// keeps the probes already taken; entering a state starts a fresh budget.
    /// `enforced=False` (observe mode): it takes probes but never refuses.
    /// `no_probe`: the clients given no probe (their probe failed since the
    /// breaker last closed), refused as if none were left, for
    /// `no_probe_seconds` from now (None: until the next write).
    #[pyo3(signature = (route, name, state, seconds=0.0, probes=1, enforced=true, no_probe=Vec::new(), no_probe_seconds=None))]
    #[allow(clippy::too_many_arguments)]
    fn set_breaker(
        &self,
        py: Python<'_>,
        route: &str,
        name: &str,
        state: &str,
        seconds: f64,
        probes: u32,
        enforced: bool,
        no_probe: Vec<String>,
        no_probe_seconds: Option<f64>,
    ) -> PyResult<()> {
        let kind = StateKind::parse(state)?;
        let wait = duration("seconds", seconds)?;
        let barred_for = no_probe_seconds
            .map(|s| duration("no_probe_seconds", s))
            .transpose()?;
        let route: Arc<str> = Arc::from(route);
        let name: Arc<str> = Arc::from(name);
        py.detach(|| {
            let now = Instant::now();
            let no_probe = NoProbe::new(&no_probe);
            let no_probe = Arc::new(match barred_for {
                Some(barred_for) => no_probe.until(now + barred_for),
                None => no_probe,
            });
            let state = match kind {
                StateKind::Closed => BreakerState::Closed,
                StateKind::Open => BreakerState::Open { until: now + wait },
                StateKind::HalfOpen => BreakerState::HalfOpen { retry_after: wait },
            };
            self.inner.update(|s| {
                let existing = s
                    .breakers
                    .iter()
                    .position(|b| b.route == route && b.name == name);
                let kept = existing
                    .map(|i| &s.breakers[i])
                    .filter(|b| StateKind::of(&b.state) == kind)
                    .map(|b| Arc::clone(&b.probes));
                let entry = BreakerEntry {
                    route: Arc::clone(&route),
                    name: Arc::clone(&name),
                    state,
                    probes: kept.unwrap_or_else(|| ProbeBudget::new(probes)),
                    enforced,
                    no_probe: Arc::clone(&no_probe),
                };
                match existing {
                    Some(i) => s.breakers[i] = entry,
                    None => s.breakers.push(entry),
                }
            });
        });
        Ok(())
    }

    /// Forget breaker `name` of `route`; whether it existed.
    fn remove_breaker(&self, py: Python<'_>, route: &str, name: &str) -> bool {
        let this = |b: &BreakerEntry| &*b.route == route && &*b.name == name;
        py.detach(|| {
            self.inner.remove_if(
                |s| s.breakers.iter().any(this),
                |s| s.breakers.retain(|b| !this(b)),
            )
        })
    }

    /// Probes breaker `name` of `route` has left; None for an unknown breaker.
    fn probes_left(&self, route: &str, name: &str) -> Option<u32> {
        let snapshot = self.inner.snapshot();
        let found = snapshot
            .breakers
            .iter()
            .find(|b| &*b.route == route && &*b.name == name);
        found.map(|b| b.probes.remaining())
    }

    /// Retry times of refusals that carry none (deny: the cooldown max;
    /// max-concurrent: the cooldown base) and the hold of each refusal reason
    /// (`holds`: reason name to seconds, `policy.hold` for each of
    /// `policy.hold_reasons`; a reason not named is answered at once). The
    /// listener caps each hold at the retry time its refusal announces. A
    /// deny is never held: a hold for "deny" is a `ValueError`.
    #[pyo3(signature = (deny_retry_after=300.0, max_concurrent_retry_after=5.0, holds=None))]
    fn set_defaults(
        &self,
        py: Python<'_>,
        deny_retry_after: f64,
        max_concurrent_retry_after: f64,
        holds: Option<HashMap<String, f64>>,
    ) -> PyResult<()> {
        let deny = duration("deny_retry_after", deny_retry_after)?;
        let max_concurrent = duration("max_concurrent_retry_after", max_concurrent_retry_after)?;
        let holds = hold_policy(holds.unwrap_or_default())?;
        py.detach(|| {
            self.inner.update(|s| {
                s.deny_retry_after = deny;
                s.max_concurrent_retry_after = max_concurrent;
                s.holds = holds;
            })
        });
        Ok(())
    }

    /// The hold of each refusal reason the table carries now, in seconds
    /// (the reasons held only).
    fn holds(&self) -> HashMap<&'static str, f64> {
        let holds = self.inner.snapshot().holds;
        RefuseReason::ALL
            .iter()
            .filter_map(|&r| holds.get(r).map(|h| (r.as_str(), h.as_secs_f64())))
            .collect()
    }

    /// The decision an attempt of `key` from `peer` on `route` (the route's
    /// name, its path prefix: "/" for a lone `upstream`) gets now, as the
    /// listener makes it (a probe of a half-open breaker is taken, as for an
    /// attempt): `("admit", [probes])`, `("allow_listed", [probes])` or
    /// `("refuse", reason, retry_after, hold, detail)`.
    #[pyo3(signature = (key, peer=None, route="/"))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        peer: Option<&str>,
        route: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let peer: Option<IpAddr> = match peer {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| {
                PyValueError::new_err(format!("peer: expected an IP address, got {text:?}"))
            })?),
        };
        let names =
            |probes: Vec<Arc<str>>| probes.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        match self.inner.lookup(route, key, peer, Instant::now()) {
            Admission::Admit { probes } => ("admit", names(probes)).into_pyobject(py),
            Admission::AllowListed { probes } => ("allow_listed", names(probes)).into_pyobject(py),
            Admission::Refuse(r) => (
                "refuse",
                r.reason.as_str(),
                r.retry_after.as_secs_f64(),
                r.hold.map(|h| h.as_secs_f64()),
                r.detail.map(|d| d.to_string()),
            )
                .into_pyobject(py),
        }
    }

    /// The brain has handled the events of every connection up to `conn_id`:
    /// what it writes from now on may follow from those attempts' own
    /// admission, so the listener's second look before the upstream write
    /// (the recheck) refuses none of them. Called before a batch's writes;
    /// never lowers the mark.
    fn set_judged(&self, py: Python<'_>, conn_id: u64) {
        py.detach(|| {
            self.inner.update(|s| s.judged = s.judged.max(conn_id));
        });
    }

    /// The mark `set_judged` left (0: none).
    #[getter]
    fn judged(&self) -> u64 {
        self.inner.snapshot().judged
    }

    /// Start a batch: the writes until `commit` are published together, as
    /// one snapshot (the brain's writes of one flush).
    fn begin(&self, py: Python<'_>) {
        py.detach(|| self.inner.begin());
    }

    /// Publish the batch's writes and end it.
    fn commit(&self, py: Python<'_>) {
        py.detach(|| self.inner.commit());
    }

    /// Drop the key entries that no longer restrict anything.
    fn prune(&self, py: Python<'_>) {
        py.detach(|| {
            let now = Instant::now();
            self.inner.update(|s| s.prune(now));
        });
    }

    /// Publishes so far.
    #[getter]
    fn generation(&self) -> u64 {
        self.inner.snapshot().generation
    }

    /// Client keys with an entry (expired ones until the next write).
    fn __len__(&self) -> usize {
        self.inner.snapshot().keys.len()
    }

    fn __contains__(&self, key: &str) -> bool {
        let snapshot = self.inner.snapshot();
        snapshot
            .keys
            .get(key)
            .is_some_and(|e: &KeyEntry| e.is_live(Instant::now()))
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

fn hold_policy(holds: HashMap<String, f64>) -> PyResult<HoldPolicy> {
    let mut policy = HoldPolicy::default();
    for (name, seconds) in holds {
        let reason = RefuseReason::ALL
            .into_iter()
            .find(|r| r.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = RefuseReason::ALL.iter().map(|r| r.as_str()).collect();
                PyValueError::new_err(format!(
                    "holds: expected refusal reasons ({}), got {name:?}",
                    names.join(", ")
                ))
            })?;
        let hold = duration(&format!("holds[{name:?}]"), seconds)?;
        policy
            .set(reason, Some(hold))
            .map_err(|e| PyValueError::new_err(format!("holds: {e}")))?;
    }
    Ok(policy)
}

fn parse_list(name: &str, entries: &[String]) -> PyResult<AccessList> {
    AccessList::parse(entries.iter().map(String::as_str))
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}
