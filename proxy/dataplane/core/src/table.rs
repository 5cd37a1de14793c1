//! The enforcement table: what the brain decided, in the form the data plane
//! reads at admission without ever waiting.
//!
//! The data plane decides *how* to refuse, in microseconds, from this table;
//! the brain (the engine in `detectors/`, in Python) decides *who*, a batch
//! later.
//! The table holds only restrictions:
//!
//! * per client key: a cooldown (until when, the rule that started it), a
//!   min-interval deadline (no attempt before), and whether the key is at its
//!   max-concurrent limit (`reject-new`);
//! * allow and deny lists (exact keys, or CIDRs matched against the key's
//!   address part and the peer address);
//! * the circuit breakers, each route's own (`upstream` and `auth` of every
//!   route, by its name): closed, open until an instant, or half-open, each
//!   with a probe budget the data plane takes from atomically;
//! * the hold of each refusal reason ([`HoldPolicy`]: `policy.hold` for each
//!   of `policy.hold_reasons`; a deny is never held).
//!
//! The reason of a refusal is decided here, at lookup, from the entry and the
//! breakers as they stand now, and its hold follows from the reason: the
//! reason's hold, never past the retry time the refusal announces (the rule
//! of `refusal_for` in proxy/brain.py). So a min-interval
//! refusal a moment before its deadline is held only for what is left, and
//! the hold of every reason changes with one write on a reload.//!
//! The decisions mirror the engine's `admit` (detectors/engine.py): deny first
//! (it holds even in observe mode); then, unless the key is allow-listed, its
//! cooldown, min-interval and max-concurrent; then every breaker of the
//! attempt's route that is not closed, in order (another route's breakers
//! never refuse it: a dead backend behind one route must not refuse the
//! clients of another; an open breaker refuses; after its open wait, or
//! half-open, it lets through as many probes as its budget holds and refuses
//! the rest). What is only *observed* (observe mode, outside the rollout)
//! never enters the table: the brain writes enforced restrictions only, so
//! the data plane never needs to know the mode (breakers carry `enforced`,
//! because an observed breaker still takes probes, as the engine's does).
//!
//! # How the brain writes it
//!
//! Readers `load()` the current [`Snapshot`] lock-free (`arc-swap`) and copy
//! out what they need; no guard is ever held across an await. The brain
//! publishes a new snapshot after each drained event batch, engine wake-up,
//! operator action or reload, with [`EnforcementTable::update`] (read-copy-
//! update of the previous snapshot): cooldowns started become key entries
//! (`until = now + remaining`, from durations, on the Rust side's clock);
//! released or ended ones are removed; breaker transitions replace the
//! breaker's entry (a half-open breaker gets a fresh [`ProbeBudget`]; a
//! breaker whose state did not change keeps its `Arc`, so probes already
//! taken stay taken); the min-interval deadline and the max-concurrent flag
//! follow the engine's per-client state. Entries exist only for restricted
//! keys (the clients in cooldown, not every client), so a copy per batch is
//! small; [`Snapshot::prune`] drops the expired ones on the next publish, and
//! lookups ignore them meanwhile. A batch is drained in well under a
//! millisecond, so a restriction takes effect within one batch of the event
//! that caused it (the incident's 4th attempt comes 150 ms after the 1st).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

pub use crate::events::RefuseReason;

/// The rule of an operator's cooldown (`POST /api/clients/{key}/cooldown`).
pub const MANUAL: &str = "manual";

/// A client in cooldown: refused until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    pub until: Instant,
    /// The rule that started it ("auth_failure_loop", "manual", …).
    pub rule: Arc<str>,
    /// Hold a refused attempt this long before answering it, instead of the
    /// cooldown reason's hold in [`Snapshot::holds`] (still never past the
    /// retry time). None: the policy's.
    pub hold: Option<Duration>,
    /// When the retry time told to a refused client runs out, if not at
    /// `until` (an operator's cooldown may announce another time).
    pub retry_until: Option<Instant>,
}

/// The restrictions on one client key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyEntry {
    pub cooldown: Option<Cooldown>,
    /// min-interval: no attempt before this instant.
    pub not_before: Option<Instant>,
    /// max-concurrent (`reject-new`): the key has its limit of open connections.
    pub at_capacity: bool,
}

impl KeyEntry {
    /// Whether anything in the entry still restricts at `now`.
    pub fn is_live(&self, now: Instant) -> bool {
        self.cooldown.as_ref().is_some_and(|c| c.until > now)
            || self.not_before.is_some_and(|t| t > now)
            || self.at_capacity
    }
}

/// Probes a breaker lets through while half-open; taken atomically by every
/// data-plane thread.
#[derive(Debug, Default)]
pub struct ProbeBudget {
    remaining: AtomicU32,
}

impl ProbeBudget {
    pub fn new(probes: u32) -> Arc<Self> {
        Arc::new(ProbeBudget {
            remaining: AtomicU32::new(probes),
        })
    }

    pub fn remaining(&self) -> u32 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Take one probe; false when none is left.
    pub fn take(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
            .is_ok()
    }

    /// Give back a probe taken for an attempt that was refused after all.
    pub fn give_back(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }
}

/// A breaker's state as the data plane needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Refusing until `until`; half-open (probes) after it, even before the
    /// brain has written the transition.
    Open {
        until: Instant,
    },
    /// Probes out; the rest is refused with `retry_after` (about when the
    /// probes' outcome is due).
    HalfOpen {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct BreakerEntry {
    /// The route (its name: the path prefix) whose attempts it judges.
    pub route: Arc<str>,
    pub name: Arc<str>,
    pub state: BreakerState,
    /// The budget for the half-open phase (the next one, while open).
    pub probes: Arc<ProbeBudget>,
    /// Whether a refusal is enforced (policy mode `enforce`); an observed
    /// breaker still takes probes.
    pub enforced: bool,
    /// Clients whose probe failed since the breaker last closed: they get no
    /// probe (the engine's `failed_probers`) until a while into the half-open
    /// phase. A looping client is first in at every half-open: were it given a
    /// probe here that the engine refuses, it would spend the budget and keep
    /// the breaker shut for everyone.
    pub no_probe: Arc<NoProbe>,
}

/// The clients a breaker gives no probe, as the engine names them
/// (detectors/breaker.py `party`): by address (an IPv6 address's /64), since
/// a key may be minted anew at every attempt; by key for a client without one.
/// Barred `until` a time (the engine's grace: after it, with no one else come to
/// probe, they may; every client behind one NAT is one party), or for good.
#[derive(Debug, Default)]
pub struct NoProbe {
    addresses: HashSet<IpAddr>,
    keys: HashSet<Arc<str>>,
    until: Option<Instant>,
}

impl NoProbe {
    /// From the engine's names: an address (of a /64, for IPv6), or a key.
    pub fn new<S: AsRef<str>>(parties: &[S]) -> NoProbe {
        let mut no_probe = NoProbe::default();
        for party in parties {
            let party = party.as_ref();
            match party.parse::<IpAddr>() {
                Ok(ip) => no_probe.addresses.insert(party_of(ip)),
                Err(_) => no_probe.keys.insert(Arc::from(party)),
            };
        }
        no_probe
    }

    /// Barred only before `until`.
    pub fn until(mut self, until: Instant) -> NoProbe {
        self.until = Some(until);
        self
    }

    /// Whether this client may not take a probe at `now`.
    pub fn bars(&self, key: &str, peer: Option<IpAddr>, now: Instant) -> bool {
        self.until.is_none_or(|until| now < until)
            && (peer.is_some_and(|ip| self.addresses.contains(&party_of(ip)))
                || self.keys.contains(key))
    }
}

/// The address a breaker counts a client by: IPv4 (an IPv4-mapped IPv6
/// address as IPv4), or an IPv6 address's /64, which one host holds.
fn party_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// An IPv4 or IPv6 network, `addr/prefix` (host bits ignored, as Python's
/// `ip_network(strict=False)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let bad = || format!("invalid network {text:?}: expected ADDRESS/PREFIX");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), self.prefix, 32)
                    == masked(u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(net.into(), self.prefix, 128) == masked(ip.into(), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// Exact client keys and CIDRs (detectors/access.py).
#[derive(Debug, Clone, Default)]
pub struct AccessList {
    keys: HashSet<Box<str>>,
    networks: Vec<IpNet>,
}

impl AccessList {
    /// Entries as in the config: a CIDR when it contains "/", else a key.
    pub fn parse<'e>(entries: impl IntoIterator<Item = &'e str>) -> Result<AccessList, String> {
        let mut list = AccessList::default();
        for entry in entries {
            if entry.contains('/') {
                list.networks.push(IpNet::parse(entry)?);
            } else {
                list.keys.insert(entry.into());
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.networks.is_empty()
    }

    /// The key itself, or a network containing the key's address or the
    /// peer address.
    pub fn matches(&self, key: &str, peer: Option<IpAddr>) -> bool {
        if self.keys.contains(key) {
            return true;
        }
        if self.networks.is_empty() {
            return false;
        }
        let inside = |ip: IpAddr| self.networks.iter().any(|n| n.contains(ip));
        address_of(key).is_some_and(inside) || peer.is_some_and(inside)
    }
}

/// The address of a key as identity writes one: an `ip` key, or the part of
/// a bound key after its last "@", in the one spelling identity writes. No
/// other text is an address: an unbound value such as `loop@[10.9.9.9]` or
/// `2001:DB8::1` is the client's own writing, and matched an allow list's
/// network (the injection probe).
pub fn address_of(key: &str) -> Option<IpAddr> {
    let text = key.rsplit('@').next().unwrap_or(key);
    let ip: IpAddr = text.parse().ok()?;
    (ip.to_string() == text).then_some(ip)
}

/// How long a refusal is held before it is answered, by its reason
/// (`policy.hold` for each of `policy.hold_reasons`). A deny is never held:
/// [`HoldPolicy::set`] refuses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldPolicy {
    by_reason: [Option<Duration>; RefuseReason::ALL.len()],
}

fn reason_slot(reason: RefuseReason) -> usize {
    RefuseReason::ALL
        .iter()
        .position(|&r| r == reason)
        .expect("every reason is in ALL")
}

impl HoldPolicy {
    /// Hold `reason`'s refusals `hold` (None or zero: answer them at once).
    pub fn set(&mut self, reason: RefuseReason, hold: Option<Duration>) -> Result<(), String> {
        let hold = hold.filter(|h| !h.is_zero());
        if reason == RefuseReason::Deny && hold.is_some() {
            return Err("deny: a denied client is never held".to_string());
        }
        self.by_reason[reason_slot(reason)] = hold;
        Ok(())
    }

    /// The hold configured for `reason`.
    pub fn get(&self, reason: RefuseReason) -> Option<Duration> {
        self.by_reason[reason_slot(reason)]
    }

    /// The hold of one refusal: `hold` (the reason's unless given), never
    /// past its `retry_after`; None when that leaves nothing to hold.
    pub fn of(
        &self,
        reason: RefuseReason,
        hold: Option<Duration>,
        retry_after: Duration,
    ) -> Option<Duration> {
        if reason == RefuseReason::Deny {
            return None;
        }
        hold.or(self.get(reason))
            .map(|h| h.min(retry_after))
            .filter(|h| !h.is_zero())
    }
}

/// How an attempt is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefuseReason,
    /// For the close-1013 reason or Retry-After.
    pub retry_after: Duration,
    /// Hold the attempt this long before answering (None: answer at once);
    /// never past `retry_after`, never for a deny.
    pub hold: Option<Duration>,
    /// The breaker that refused (circuit_open), or the cooldown's rule.
    pub detail: Option<Arc<str>>,
}

/// The answer of [`EnforcementTable::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let it through; it is a probe for the breakers named.
    Admit { probes: Vec<Arc<str>> },
    /// Refuse it; it never reaches the upstream.
    Refuse(Refusal),
    /// On the allow list: per-client restrictions do not apply (breakers do).
    AllowListed { probes: Vec<Arc<str>> },
}

/// What the brain decided, as of one publish. Immutable once published.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Incremented by every publish (for tests and the status page).
    pub generation: u64,
    /// The highest connection id whose events the brain had handled when it
    /// wrote this snapshot's restrictions (0: none, or a table written by
    /// hand): an attempt with a higher id is not in them ([`Snapshot::recheck`]).
    pub judged: u64,
    pub keys: HashMap<Box<str>, KeyEntry>,
    pub allow: AccessList,
    pub deny: AccessList,
    pub breakers: Vec<BreakerEntry>,
    /// Retry time told to a denied client (the engine uses the cooldown max).
    pub deny_retry_after: Duration,
    /// Retry time told at max-concurrent (the engine uses the cooldown base).
    pub max_concurrent_retry_after: Duration,
    /// The hold of each refusal reason.
    pub holds: HoldPolicy,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            generation: 0,
            judged: 0,
            keys: HashMap::new(),
            allow: AccessList::default(),
            deny: AccessList::default(),
            breakers: Vec::new(),
            deny_retry_after: Duration::from_secs(300),
            max_concurrent_retry_after: Duration::from_secs(5),
            holds: HoldPolicy::default(),
        }
    }
}

impl Snapshot {
    /// The admission decision for `key` (peer address `peer`) at `now`, on
    /// the route named `route` (only its breakers judge the attempt).
    pub fn admission(
        &self,
        route: &str,
        key: &str,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Admission {
        if !self.deny.is_empty() && self.deny.matches(key, peer) {
            return Admission::Refuse(Refusal {
                reason: RefuseReason::Deny,
                retry_after: self.deny_retry_after,
                hold: None, // never held: the client is refused for good
                detail: None,
            });
        }
        let allowed = !self.allow.is_empty() && self.allow.matches(key, peer);
        if let Some(entry) = self.keys.get(key) {
            // The allow list lifts every per-client refusal but an operator's
            // cooldown of the key, which the engine holds whatever the policy
            // (`_cooldown_enforced`): skipped here, the attempt reached the
            // backend and the engine closed it 1013 after its 101 (the hold
            // probe).
            let refusal = if allowed {
                entry
                    .cooldown
                    .as_ref()
                    .filter(|c| &*c.rule == MANUAL && c.until > now)
                    .and_then(|_| self.per_key(entry, now))
            } else {
                self.per_key(entry, now)
            };
            if let Some(refusal) = refusal {
                return Admission::Refuse(refusal);
            }
        }
        let mut probes: Vec<Arc<str>> = Vec::new();
        let mut taken: Vec<&ProbeBudget> = Vec::new();
        for breaker in self.breakers.iter().filter(|b| &*b.route == route) {
            let refusal = match breaker.state {
                BreakerState::Closed => continue,
                BreakerState::Open { until } if now < until => Some(until - now),
                BreakerState::Open { .. } if breaker.no_probe.bars(key, peer, now) => {
                    Some(Duration::ZERO)
                }
                BreakerState::HalfOpen { retry_after } if breaker.no_probe.bars(key, peer, now) => {
                    Some(retry_after)
                }
                BreakerState::Open { .. } | BreakerState::HalfOpen { .. }
                    if breaker.probes.take() =>
                {
                    taken.push(&breaker.probes);
                    probes.push(Arc::clone(&breaker.name));
                    None
                }
                BreakerState::Open { .. } => Some(Duration::ZERO),
                BreakerState::HalfOpen { retry_after } => Some(retry_after),
            };
            if let (Some(retry_after), true) = (refusal, breaker.enforced) {
                for budget in taken {
                    budget.give_back();
                }
                return Admission::Refuse(Refusal {
                    reason: RefuseReason::CircuitOpen,
                    retry_after,
                    hold: self.holds.of(RefuseReason::CircuitOpen, None, retry_after),
                    detail: Some(Arc::clone(&breaker.name)),
                });
            }
        }
        if allowed {
            Admission::AllowListed { probes }
        } else {
            Admission::Admit { probes }
        }
    }

    /// Admitted attempt `conn_id` looked up again, just before its upgrade
    /// request goes upstream: the refusal the table has for it now, if the
    /// brain wrote it before judging that attempt (`judged < conn_id`; the
    /// engine then refuses the attempt too: a late refusal caught before the
    /// upstream). Once the brain has judged it, the table also holds what the
    /// attempt's own admission started (its min-interval, a cooldown its
    /// detection raised) and refuses nothing here. Takes no probe (the attempt
    /// took its probes at its lookup): a half-open breaker refuses nothing.
    pub fn recheck(
        &self,
        conn_id: u64,
        route: &str,
        key: &str,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Option<Refusal> {
        if self.judged >= conn_id {
            return None;
        }
        if !self.deny.is_empty() && self.deny.matches(key, peer) {
            return Some(Refusal {
                reason: RefuseReason::Deny,
                retry_after: self.deny_retry_after,
                hold: None,
                detail: None,
            });
        }
        let allowed = !self.allow.is_empty() && self.allow.matches(key, peer);
        if !allowed {
            if let Some(refusal) = self.keys.get(key).and_then(|e| self.per_key(e, now)) {
                return Some(refusal);
            }
        }
        self.breakers
            .iter()
            .filter(|b| &*b.route == route)
            .find_map(|breaker| match breaker.state {
                BreakerState::Open { until } if breaker.enforced && now < until => {
                    let retry_after = until - now;
                    Some(Refusal {
                        reason: RefuseReason::CircuitOpen,
                        retry_after,
                        hold: self.holds.of(RefuseReason::CircuitOpen, None, retry_after),
                        detail: Some(Arc::clone(&breaker.name)),
                    })
                }
                _ => None,
            })
    }

    fn per_key(&self, entry: &KeyEntry, now: Instant) -> Option<Refusal> {
        if let Some(c) = entry.cooldown.as_ref().filter(|c| c.until > now) {
            let retry_until = c.retry_until.unwrap_or(c.until);
            let retry_after = retry_until.saturating_duration_since(now);
            return Some(Refusal {
                reason: RefuseReason::Cooldown,
                retry_after,
                hold: self.holds.of(RefuseReason::Cooldown, c.hold, retry_after),
                detail: Some(Arc::clone(&c.rule)),
            });
        }
        if let Some(t) = entry.not_before.filter(|&t| t > now) {
            let retry_after = t - now;
            return Some(Refusal {
                reason: RefuseReason::MinInterval,
                retry_after,
                hold: self.holds.of(RefuseReason::MinInterval, None, retry_after),
                detail: None,
            });
        }
        if entry.at_capacity {
            return Some(Refusal {
                reason: RefuseReason::MaxConcurrent,
                retry_after: self.max_concurrent_retry_after,
                hold: self.holds.of(
                    RefuseReason::MaxConcurrent,
                    None,
                    self.max_concurrent_retry_after,
                ),
                detail: None,
            });
        }
        None
    }

    /// Drop the key entries that no longer restrict anything at `now`.
    pub fn prune(&mut self, now: Instant) {
        self.keys.retain(|_, entry| entry.is_live(now));
    }
}

/// The table: one current snapshot, swapped atomically.
pub struct EnforcementTable {
    current: ArcSwap<Snapshot>,
    /// The writers' side: the brain's batch of writes, and the lock that
    /// keeps writers one at a time (readers never take it).
    writes: Mutex<Batch>,
}

/// Writes between [`EnforcementTable::begin`] and [`EnforcementTable::commit`]:
/// made to one copy of the snapshot, taken at the first of them, and published
/// together. A copy per write cost the whole table each time: a replica
/// adopting 20 000 shared cooldowns copied it 20 000 times.
#[derive(Default)]
struct Batch {
    open: bool,
    staged: Option<Snapshot>,
    /// Prune the staged snapshot at the commit, as of this time.
    prune: Option<Instant>,
}

impl fmt::Debug for EnforcementTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.current.load();
        f.debug_struct("EnforcementTable")
            .field("generation", &s.generation)
            .field("keys", &s.keys.len())
            .field("breakers", &s.breakers.len())
            .finish()
    }
}

impl Default for EnforcementTable {
    fn default() -> Self {
        EnforcementTable::new(Snapshot::default())
    }
}

impl EnforcementTable {
    pub fn new(snapshot: Snapshot) -> Self {
        EnforcementTable {
            current: ArcSwap::from_pointee(snapshot),
            writes: Mutex::new(Batch::default()),
        }
    }

    /// The admission decision now for an attempt on `route`; lock-free,
    /// never waits for the brain.
    pub fn lookup(&self, route: &str, key: &str, peer: Option<IpAddr>, now: Instant) -> Admission {
        self.current.load().admission(route, key, peer, now)
    }

    /// [`Snapshot::recheck`] on the current snapshot; lock-free.
    pub fn recheck(
        &self,
        conn_id: u64,
        route: &str,
        key: &str,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Option<Refusal> {
        self.current.load().recheck(conn_id, route, key, peer, now)
    }

    /// The current snapshot (an owned reference: fine to keep, unlike a guard).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn writer(&self) -> MutexGuard<'_, Batch> {
        // A writer that panicked left the batch as it was: still consistent.
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replace the whole table (its generation is set to follow the current
    /// one), ending a batch without its writes.
    pub fn publish(&self, snapshot: Snapshot) {
        let mut batch = self.writer();
        *batch = Batch::default();
        self.store(snapshot, None);
    }

    /// Publish `change` applied to a copy of the current snapshot; in a batch,
    /// apply it to the batch's copy, published at the commit.
    pub fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        self.write(&mut self.writer(), None, change);
    }

    /// [`EnforcementTable::update`], then drop the entries that no longer
    /// restrict (in a batch, once, at the commit).
    pub fn update_pruned(&self, now: Instant, change: impl FnOnce(&mut Snapshot)) {
        self.write(&mut self.writer(), Some(now), change);
    }

    /// Apply `remove` only if `present` holds of the snapshot it would change
    /// (the batch's copy in a batch, else the current one): nothing is copied
    /// for what is not there. Whether it held.
    pub fn remove_if(
        &self,
        present: impl Fn(&Snapshot) -> bool,
        remove: impl FnOnce(&mut Snapshot),
    ) -> bool {
        let mut batch = self.writer();
        let held = match &batch.staged {
            Some(staged) => present(staged),
            None => present(&self.current.load()),
        };
        if held {
            self.write(&mut batch, None, remove);
        }
        held
    }

    fn write(&self, batch: &mut Batch, prune: Option<Instant>, change: impl FnOnce(&mut Snapshot)) {
        if batch.open {
            let current = &self.current;
            change(
                batch
                    .staged
                    .get_or_insert_with(|| Snapshot::clone(&current.load())),
            );
            batch.prune = batch.prune.max(prune);
            return;
        }
        let mut next = Snapshot::clone(&self.current.load());
        change(&mut next);
        self.store(next, prune);
    }

    /// Publish `next`, pruned as of `prune`, as the generation after the
    /// current one (writers hold the lock).
    fn store(&self, mut next: Snapshot, prune: Option<Instant>) {
        if let Some(now) = prune {
            next.prune(now);
        }
        next.generation = self.current.load().generation + 1;
        self.current.store(Arc::new(next));
    }

    /// Start a batch: the writes until [`EnforcementTable::commit`] are
    /// published together, as one snapshot.
    pub fn begin(&self) {
        self.writer().open = true;
    }

    /// Publish the batch's writes, if it made any, and end it.
    pub fn commit(&self) {
        let mut batch = self.writer();
        let Batch { staged, prune, .. } = std::mem::take(&mut *batch);
        if let Some(next) = staged {
            self.store(next, prune);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route of the attempts (and of the breakers) in these tests.
    const R: &str = "/ws";

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    /// An enforced breaker's entry, no one barred from its probes.
    fn enforced(name: &str, state: BreakerState, probes: &Arc<ProbeBudget>) -> BreakerEntry {
        BreakerEntry {
            route: Arc::from(R),
            name: Arc::from(name),
            state,
            probes: Arc::clone(probes),
            enforced: true,
            no_probe: Default::default(),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn cooling(now: Instant, remaining: u64) -> KeyEntry {
        KeyEntry {
            cooldown: Some(Cooldown {
                until: now + secs(remaining),
                rule: Arc::from("auth_failure_loop"),
                hold: Some(Duration::from_millis(1500)),
                retry_until: None,
            }),
            ..KeyEntry::default()
        }
    }

    /// A key whose min-interval lets it in again at `not_before`.
    fn waiting(not_before: Instant) -> KeyEntry {
        KeyEntry {
            not_before: Some(not_before),
            ..KeyEntry::default()
        }
    }

    /// A key at its max-concurrent.
    fn at_capacity() -> KeyEntry {
        KeyEntry {
            at_capacity: true,
            ..KeyEntry::default()
        }
    }

    fn refusal(a: Admission) -> Refusal {
        match a {
            Admission::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn cooldown_refuses_until_it_ends() {
        let now = Instant::now();
        let table = EnforcementTable::default();
        table.update(|s| {
            s.keys.insert("u@10.0.0.1".into(), cooling(now, 5));
        });
        let r = refusal(table.lookup(R, "u@10.0.0.1", None, now + secs(1)));
        assert_eq!(r.reason, RefuseReason::Cooldown);
        assert_eq!(r.retry_after, secs(4));
        assert_eq!(r.hold, Some(Duration::from_millis(1500)));
        assert_eq!(r.detail.as_deref(), Some("auth_failure_loop"));
        assert_eq!(
            table.lookup(R, "u@10.0.0.1", None, now + secs(5)),
            Admission::Admit { probes: vec![] }
        );
        assert_eq!(
            table.lookup(R, "other", None, now),
            Admission::Admit { probes: vec![] }
        );
    }

    #[test]
    fn a_cooldown_may_announce_its_own_retry_time() {
        let now = Instant::now();
        let mut entry = cooling(now, 60);
        if let Some(c) = entry.cooldown.as_mut() {
            c.retry_until = Some(now + secs(10));
        }
        let mut s = Snapshot::default();
        s.keys.insert("k".into(), entry);
        let r = refusal(s.admission(R, "k", None, now + secs(4)));
        assert_eq!((r.reason, r.retry_after), (RefuseReason::Cooldown, secs(6)));
        // Past the announced time the cooldown still refuses, telling 0 s.
        let r = refusal(s.admission(R, "k", None, now + secs(30)));
        assert_eq!(r.retry_after, Duration::ZERO);
    }

    #[test]
    fn min_interval_and_max_concurrent() {
        let now = Instant::now();
        let mut s = Snapshot::default();
        s.keys
            .insert("a".into(), waiting(now + Duration::from_millis(700)));
        s.keys.insert("b".into(), at_capacity());
        let r = refusal(s.admission(R, "a", None, now));
        assert_eq!(
            (r.reason, r.retry_after),
            (RefuseReason::MinInterval, Duration::from_millis(700))
        );
        assert!(matches!(
            s.admission(R, "a", None, now + secs(1)),
            Admission::Admit { .. }
        ));
        let r = refusal(s.admission(R, "b", None, now));
        assert_eq!(
            (r.reason, r.retry_after),
            (RefuseReason::MaxConcurrent, secs(5))
        );
    }

    #[test]
    fn deny_beats_allow_and_allow_skips_per_key_restrictions_but_a_manual_cooldown() {
        let now = Instant::now();
        let mut s = Snapshot {
            deny: AccessList::parse(["bad@10.0.0.9", "192.0.2.0/24"]).unwrap(),
            allow: AccessList::parse(["10.1.0.0/16", "bad@10.0.0.9"]).unwrap(),
            ..Snapshot::default()
        };
        s.keys.insert("vip@10.1.2.3".into(), cooling(now, 60));
        assert_eq!(
            refusal(s.admission(R, "bad@10.0.0.9", None, now)).reason,
            RefuseReason::Deny
        );
        // A CIDR matches the key's address part, or the peer address.
        assert_eq!(
            refusal(s.admission(R, "sub@192.0.2.7", None, now)).reason,
            RefuseReason::Deny
        );
        let peer = "192.0.2.200".parse().ok();
        assert_eq!(
            refusal(s.admission(R, "sub", peer, now)).reason,
            RefuseReason::Deny
        );
        assert_eq!(
            s.admission(R, "vip@10.1.2.3", None, now),
            Admission::AllowListed { probes: vec![] }
        );
        // But an operator's cooldown of the key holds, as the engine judges it.
        let mut manual = cooling(now, 60);
        if let Some(c) = manual.cooldown.as_mut() {
            c.rule = Arc::from(MANUAL);
        }
        s.keys.insert("vip@10.1.2.3".into(), manual.clone());
        let r = refusal(s.admission(R, "vip@10.1.2.3", None, now));
        assert_eq!(
            (r.reason, r.detail.as_deref()),
            (RefuseReason::Cooldown, Some(MANUAL))
        );
        // … only while it lasts: its min-interval is lifted as ever.
        manual.not_before = Some(now + secs(120));
        if let Some(c) = manual.cooldown.as_mut() {
            c.until = now;
        }
        s.keys.insert("vip@10.1.2.3".into(), manual);
        assert_eq!(
            s.admission(R, "vip@10.1.2.3", None, now),
            Admission::AllowListed { probes: vec![] }
        );
        assert_eq!(address_of("sub@2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(address_of("10.1.2.3"), "10.1.2.3".parse().ok());
        // Nobody's address but the client's own writing: brackets, another spelling.
        for forged in [
            "sub@[10.1.2.3]",
            "[10.1.2.3]",
            "2001:DB8::1",
            "x@2001:db8:0::1",
        ] {
            assert_eq!(address_of(forged), None, "{forged}");
        }
    }

    #[test]
    fn open_breaker_refuses_then_probes_within_budget() {
        let now = Instant::now();
        let budget = ProbeBudget::new(2);
        let s = Snapshot {
            breakers: vec![enforced(
                "upstream",
                BreakerState::Open {
                    until: now + secs(10),
                },
                &budget,
            )],
            ..Snapshot::default()
        };
        let r = refusal(s.admission(R, "k", None, now));
        assert_eq!(
            (r.reason, r.retry_after),
            (RefuseReason::CircuitOpen, secs(10))
        );
        assert_eq!(r.detail.as_deref(), Some("upstream"));
        let later = now + secs(10);
        let names = vec![Arc::<str>::from("upstream")];
        assert_eq!(
            s.admission(R, "k", None, later),
            Admission::Admit {
                probes: names.clone()
            }
        );
        assert_eq!(
            s.admission(R, "k", None, later),
            Admission::Admit { probes: names }
        );
        assert_eq!(
            refusal(s.admission(R, "k", None, later)).reason,
            RefuseReason::CircuitOpen
        );
        assert_eq!(budget.remaining(), 0);
    }

    #[test]
    fn a_routes_breakers_judge_only_its_own_attempts() {
        // A dead backend behind /c opened /c's breaker: the clients of /a, whose
        // backend is fine, are let through (74 % of them were refused when one
        // breaker served every route), and /c's are refused and take its probes.
        let now = Instant::now();
        let budget = ProbeBudget::new(1);
        let mut open_c = enforced(
            "upstream",
            BreakerState::Open {
                until: now + secs(10),
            },
            &budget,
        );
        open_c.route = Arc::from("/c");
        let auth_budget = ProbeBudget::new(1);
        let mut auth_c = enforced(
            "auth",
            BreakerState::HalfOpen {
                retry_after: secs(2),
            },
            &auth_budget,
        );
        auth_c.route = Arc::from("/c");
        let s = Snapshot {
            breakers: vec![open_c, auth_c],
            ..Snapshot::default()
        };
        assert_eq!(
            s.admission("/a", "k", None, now),
            Admission::Admit { probes: vec![] }
        );
        assert_eq!(
            (budget.remaining(), auth_budget.remaining()),
            (1, 1),
            "/a took none of /c's probes"
        );
        let r = refusal(s.admission("/c", "k", None, now));
        assert_eq!(
            (r.reason, r.retry_after),
            (RefuseReason::CircuitOpen, secs(10))
        );
        assert_eq!(s.recheck(1, "/a", "k", None, now), None);
        assert!(s.recheck(1, "/c", "k", None, now).is_some());
        // Past the open wait: /c's attempts probe it, /a's still pass by.
        let later = now + secs(10);
        assert_eq!(
            s.admission("/a", "k", None, later),
            Admission::Admit { probes: vec![] }
        );
        assert_eq!(
            s.admission("/c", "k", None, later),
            Admission::Admit {
                probes: vec![Arc::from("upstream"), Arc::from("auth")]
            }
        );
    }

    #[test]
    fn a_client_whose_probe_failed_gets_no_probe() {
        // First in at every half-open, it would take the budget the engine
        // refuses it, and the breaker would stay shut for everyone.
        let now = Instant::now();
        let budget = ProbeBudget::new(1);
        let looper = "looper@10.0.0.1";
        let no_probe = Arc::new(NoProbe::new(&["10.0.0.1", "2001:db8:1:2::", "no-address"]));
        for state in [
            BreakerState::HalfOpen {
                retry_after: secs(2),
            },
            BreakerState::Open { until: now },
        ] {
            let s = Snapshot {
                breakers: vec![BreakerEntry {
                    route: Arc::from(R),
                    name: Arc::from("upstream"),
                    state,
                    probes: Arc::clone(&budget),
                    enforced: true,
                    no_probe: Arc::clone(&no_probe),
                }],
                ..Snapshot::default()
            };
            // By its address, whatever key it makes up; an IPv6 host by its /64;
            // a client without an address by its key.
            let v4 = Some(ip("10.0.0.1"));
            let v4_mapped = Some(ip("::ffff:10.0.0.1"));
            let v6 = Some(ip("2001:db8:1:2:aaaa::1"));
            for (key, peer) in [
                (looper, v4),
                ("fresh-key@10.0.0.1", v4),
                ("mapped", v4_mapped),
                ("other-host-same-64", v6),
                ("no-address", None),
            ] {
                let r = refusal(s.admission(R, key, peer, now));
                assert_eq!(r.reason, RefuseReason::CircuitOpen, "{key}");
                assert_eq!(budget.remaining(), 1, "no probe taken for {key}");
            }
            assert_eq!(
                s.admission(R, "other@10.0.0.2", Some(ip("10.0.0.2")), now),
                Admission::Admit {
                    probes: vec![Arc::from("upstream")]
                }
            );
            assert_eq!(budget.remaining(), 0);
            budget.give_back();
        }
    }

    #[test]
    fn a_failed_prober_may_probe_once_its_bar_is_over() {
        // Every client behind one NAT is one party: barred for good, the
        // breaker never closed once that party's probe had failed.
        let now = Instant::now();
        let budget = ProbeBudget::new(1);
        let no_probe = Arc::new(NoProbe::new(&["10.0.0.1"]).until(now + secs(5)));
        let s = Snapshot {
            breakers: vec![BreakerEntry {
                route: Arc::from(R),
                name: Arc::from("upstream"),
                state: BreakerState::HalfOpen {
                    retry_after: secs(2),
                },
                probes: Arc::clone(&budget),
                enforced: true,
                no_probe,
            }],
            ..Snapshot::default()
        };
        let nat = Some(ip("10.0.0.1"));
        let r = refusal(s.admission(R, "user-a@10.0.0.1", nat, now + secs(4)));
        assert_eq!(r.reason, RefuseReason::CircuitOpen);
        assert_eq!(budget.remaining(), 1);
        assert_eq!(
            s.admission(R, "user-b@10.0.0.1", nat, now + secs(5)),
            Admission::Admit {
                probes: vec![Arc::from("upstream")]
            }
        );
        assert_eq!(budget.remaining(), 0);
    }

    #[test]
    fn a_refusing_breaker_gives_back_the_probes_of_earlier_ones() {
        let now = Instant::now();
        let first = ProbeBudget::new(1);
        let s = Snapshot {
            breakers: vec![
                enforced(
                    "upstream",
                    BreakerState::HalfOpen {
                        retry_after: secs(2),
                    },
                    &first,
                ),
                enforced(
                    "auth",
                    BreakerState::Open {
                        until: now + secs(3),
                    },
                    &ProbeBudget::new(1),
                ),
            ],
            ..Snapshot::default()
        };
        let r = refusal(s.admission(R, "k", None, now));
        assert_eq!(r.detail.as_deref(), Some("auth"));
        assert_eq!(first.remaining(), 1);
    }

    #[test]
    fn an_observed_breaker_takes_probes_but_never_refuses() {
        let now = Instant::now();
        let s = Snapshot {
            breakers: vec![BreakerEntry {
                route: Arc::from(R),
                name: Arc::from("auth"),
                state: BreakerState::HalfOpen {
                    retry_after: secs(1),
                },
                probes: ProbeBudget::new(1),
                enforced: false,
                no_probe: Default::default(),
            }],
            ..Snapshot::default()
        };
        assert_eq!(
            s.admission(R, "k", None, now),
            Admission::Admit {
                probes: vec![Arc::from("auth")]
            }
        );
        assert_eq!(
            s.admission(R, "k", None, now),
            Admission::Admit { probes: vec![] }
        );
    }

    #[test]
    fn updates_are_atomic_and_prune_expired_entries() {
        let now = Instant::now();
        let table = EnforcementTable::default();
        let before = table.snapshot();
        table.update(|s| {
            s.keys.insert("a".into(), cooling(now, 1));
            s.keys.insert("b".into(), cooling(now, 100));
        });
        assert_eq!(before.keys.len(), 0, "a published snapshot never changes");
        table.update(|s| s.prune(now + secs(2)));
        let after = table.snapshot();
        assert_eq!(after.generation, 2);
        assert_eq!(after.keys.keys().map(|k| &**k).collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_batch_is_published_once_at_its_commit_and_pruned_then() {
        let now = Instant::now();
        let table = EnforcementTable::default();
        table.update(|s| {
            s.keys.insert("old".into(), cooling(now, 1));
        });
        table.begin();
        table.commit(); // no write: nothing published
        assert_eq!(table.snapshot().generation, 1);
        table.begin();
        for i in 0..1000 {
            table.update_pruned(now + secs(2), |s| {
                s.keys.insert(format!("k{i}").into(), cooling(now, 100));
            });
        }
        table.update(|s| s.judged = 9);
        // Nothing shows before the commit; a removal sees the batch's own writes.
        assert_eq!(table.snapshot().keys.len(), 1);
        let present = |s: &Snapshot| s.keys.contains_key("k999");
        assert!(table.remove_if(present, |s| {
            s.keys.remove("k999");
        }));
        assert!(!table.remove_if(present, |_| unreachable!("nothing to remove")));
        table.commit();
        let after = table.snapshot();
        assert_eq!((after.generation, after.judged), (2, 9), "one publish");
        // Pruned once, at the commit, as of the latest write's time: "old" ended.
        assert_eq!(after.keys.len(), 999);
        assert!(!after.keys.contains_key("old"));
        // After the batch, writes are published one by one again.
        table.update(|s| s.judged = 10);
        assert_eq!(table.snapshot().generation, 3);
    }

    #[test]
    fn recheck_refuses_only_what_the_brain_wrote_before_judging_the_attempt() {
        let now = Instant::now();
        let table = EnforcementTable::default();
        assert_eq!(table.recheck(7, R, "k", None, now), None);
        table.update(|s| {
            s.keys.insert("k".into(), cooling(now, 5));
            s.judged = 6;
        });
        let r = table
            .recheck(7, R, "k", None, now)
            .expect("written before attempt 7");
        assert_eq!(r.reason, RefuseReason::Cooldown);
        assert_eq!(r.hold, Some(Duration::from_millis(1500)));
        assert_eq!(table.recheck(7, R, "other", None, now), None);
        // Written after the brain judged attempt 7: its own admission's doing.
        table.update(|s| s.judged = 7);
        assert_eq!(table.recheck(7, R, "k", None, now), None);
        assert!(table.recheck(8, R, "k", None, now).is_some());
    }

    #[test]
    fn recheck_takes_no_probe_and_refuses_for_an_open_breaker() {
        let now = Instant::now();
        let budget = ProbeBudget::new(1);
        let s = Snapshot {
            breakers: vec![enforced(
                "auth",
                BreakerState::HalfOpen {
                    retry_after: secs(3),
                },
                &budget,
            )],
            ..Snapshot::default()
        };
        assert_eq!(s.recheck(1, R, "k", None, now), None);
        assert_eq!(budget.remaining(), 1);
        let open = Snapshot {
            breakers: vec![enforced(
                "auth",
                BreakerState::Open {
                    until: now + secs(3),
                },
                &budget,
            )],
            ..Snapshot::default()
        };
        let r = open.recheck(1, R, "k", None, now).expect("open breaker");
        assert_eq!(r.reason, RefuseReason::CircuitOpen);
        assert_eq!(r.retry_after, secs(3));
    }

    #[test]
    fn probe_budget_is_shared_by_threads_exactly() {
        let budget = ProbeBudget::new(100);
        let taken: u32 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..1000).filter(|_| budget.take()).count() as u32))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 100);
        assert_eq!(budget.remaining(), 0);
    }

    #[test]
    fn every_reason_but_deny_is_held_never_past_its_retry_time() {
        let now = Instant::now();
        let two = Some(secs(2));
        let mut holds = HoldPolicy::default();
        for reason in [
            RefuseReason::Cooldown,
            RefuseReason::MinInterval,
            RefuseReason::MaxConcurrent,
            RefuseReason::CircuitOpen,
        ] {
            holds.set(reason, two).unwrap();
        }
        assert!(holds.set(RefuseReason::Deny, two).is_err());
        holds.set(RefuseReason::Deny, None).unwrap();
        let mut s = Snapshot {
            holds,
            deny: AccessList::parse(["bad"]).unwrap(),
            breakers: vec![enforced(
                "upstream",
                BreakerState::Open {
                    until: now + secs(10),
                },
                &ProbeBudget::new(1),
            )],
            ..Snapshot::default()
        };
        s.keys.insert("cool".into(), cooling(now, 60));
        s.keys
            .get_mut("cool")
            .unwrap()
            .cooldown
            .as_mut()
            .unwrap()
            .hold = None;
        s.keys
            .insert("soon".into(), waiting(now + Duration::from_millis(700)));
        s.keys.insert("full".into(), at_capacity());
        let held = |s: &Snapshot, key: &str| {
            let r = refusal(s.admission(R, key, None, now));
            (r.reason, r.hold)
        };
        assert_eq!(held(&s, "cool"), (RefuseReason::Cooldown, two));
        // 700 ms left of the min-interval: held 700 ms, not 2 s.
        assert_eq!(
            held(&s, "soon"),
            (RefuseReason::MinInterval, Some(Duration::from_millis(700)))
        );
        assert_eq!(held(&s, "full"), (RefuseReason::MaxConcurrent, two));
        assert_eq!(held(&s, "bad"), (RefuseReason::Deny, None));
        assert_eq!(held(&s, "anyone"), (RefuseReason::CircuitOpen, two));
        // Only the reasons listed: the others are answered at once.
        s.holds.set(RefuseReason::MinInterval, None).unwrap();
        s.holds
            .set(RefuseReason::CircuitOpen, Some(Duration::ZERO))
            .unwrap();
        assert_eq!(held(&s, "soon"), (RefuseReason::MinInterval, None));
        assert_eq!(held(&s, "anyone"), (RefuseReason::CircuitOpen, None));
    }

    #[test]
    fn a_cooldowns_own_hold_wins_but_never_outlasts_it() {
        let now = Instant::now();
        let mut s = Snapshot::default();
        s.holds.set(RefuseReason::Cooldown, Some(secs(2))).unwrap();
        s.keys.insert("own".into(), cooling(now, 60)); // its own 1.5 s
        s.keys.insert("short".into(), cooling(now, 1));
        if let Some(c) = s.keys.get_mut("short").unwrap().cooldown.as_mut() {
            c.hold = None;
        }
        let hold =
            |s: &Snapshot, key: &str, at: Instant| refusal(s.admission(R, key, None, at)).hold;
        assert_eq!(hold(&s, "own", now), Some(Duration::from_millis(1500)));
        assert_eq!(hold(&s, "short", now), Some(secs(1)));
        assert_eq!(
            hold(&s, "short", now + Duration::from_millis(400)),
            Some(Duration::from_millis(600))
        );
        // A retry time of 0 (its announced time passed) leaves nothing to hold.
        let mut entry = cooling(now, 60);
        if let Some(c) = entry.cooldown.as_mut() {
            c.retry_until = Some(now);
        }
        s.keys.insert("due".into(), entry);
        assert_eq!(hold(&s, "due", now + secs(1)), None);
    }

    #[test]
    fn networks() {
        let net = IpNet::parse("10.1.2.3/8").unwrap();
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8:1::5".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("nonsense/8").is_err());
    }
}
