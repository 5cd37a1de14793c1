//! What the brain can see and change of a running listener, besides the
//! enforcement table: the refusal policy a reload may change, the held
//! refusals (and their release), the live relays (their counts, and a close
//! on command), and what each client address holds (its caps).
//!
//! Every structure is bounded by the connections it describes
//! (`limits.max_connections`), touched by a connection only with short
//! critical sections (never across an `.await`), and read or written by
//! Python from outside the runtime: nothing here takes the GIL.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, Notify};

use loopwatch_dataplane_core::events::{RefuseReason, Traffic};
use loopwatch_dataplane_core::table::IpNet;

use crate::wire::RejectWith;

/// Shards of the relay and address maps: a connection locks one of them.
const SHARDS: usize = 16;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn refuse_index(reason: RefuseReason) -> usize {
    RefuseReason::ALL
        .iter()
        .position(|&r| r == reason)
        .expect("every reason is in ALL")
}

// --- the refusal policy --------------------------------------------------------

/// `policy.close_code`: 1013, or an application code from 4000 to 4999.
pub fn close_code_allowed(code: u16) -> bool {
    code == 1013 || (4000..=4999).contains(&code)
}

/// The refusal policy a reload may change (`policy.reject_with`,
/// `policy.close_code`, `policy.max_held`, `policy.max_held_per_key`), read
/// by each refusal.
#[derive(Debug)]
pub struct Policy {
    reject_with: AtomicU8,
    close_code: AtomicU16,
    max_holds: AtomicUsize,
    max_held_per_key: AtomicUsize,
}

/// One value of each knob (`Policy::snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyValues {
    pub reject_with: RejectWith,
    pub close_code: u16,
    pub max_holds: usize,
    pub max_held_per_key: usize,
}

fn reject_with_code(how: RejectWith) -> u8 {
    match how {
        RejectWith::Close1013 => 0,
        RejectWith::Http429 => 1,
    }
}

impl Policy {
    pub fn new(values: PolicyValues) -> Policy {
        Policy {
            reject_with: AtomicU8::new(reject_with_code(values.reject_with)),
            close_code: AtomicU16::new(values.close_code),
            max_holds: AtomicUsize::new(values.max_holds),
            max_held_per_key: AtomicUsize::new(values.max_held_per_key),
        }
    }

    pub fn snapshot(&self) -> PolicyValues {
        PolicyValues {
            reject_with: if self.reject_with.load(Ordering::Relaxed) == 0 {
                RejectWith::Close1013
            } else {
                RejectWith::Http429
            },
            close_code: self.close_code.load(Ordering::Relaxed),
            max_holds: self.max_holds.load(Ordering::Relaxed),
            max_held_per_key: self.max_held_per_key.load(Ordering::Relaxed),
        }
    }

    /// Set every knob (each refusal from now on reads the new values; holds
    /// already taken are kept).
    pub fn set(&self, values: PolicyValues) {
        self.reject_with
            .store(reject_with_code(values.reject_with), Ordering::Relaxed);
        self.close_code.store(values.close_code, Ordering::Relaxed);
        self.max_holds.store(values.max_holds, Ordering::Relaxed);
        self.max_held_per_key
            .store(values.max_held_per_key, Ordering::Relaxed);
    }
}

// --- held refusals ----------------------------------------------------------------

/// Why a hold was not taken: the bound that was reached (the `limit` label of
/// `loopwatch_holds_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldBound {
    MaxHeld,
    MaxHeldPerKey,
}

impl HoldBound {
    pub const ALL: [HoldBound; 2] = [HoldBound::MaxHeld, HoldBound::MaxHeldPerKey];

    pub fn label(self) -> &'static str {
        match self {
            HoldBound::MaxHeld => "max_held",
            HoldBound::MaxHeldPerKey => "max_held_per_key",
        }
    }
}

struct Held {
    conn_id: u64,
    release: Arc<Notify>,
}

#[derive(Default)]
struct HeldByKey {
    by_key: HashMap<Box<str>, Vec<Held>>,
    count: usize,
}

/// The refused attempts waiting out their hold, by client key (bounded by
/// `max_holds` in all and `max_held_per_key` per key), and their counts.
#[derive(Default)]
pub struct Holds {
    held: Mutex<HeldByKey>,
    /// Holds taken since the start.
    pub taken: AtomicU64,
    /// Answered after a hold, by refusal reason (the client still there).
    answered: [AtomicU64; RefuseReason::ALL.len()],
    /// Refusals answered at once because a bound was reached, by bound.
    skipped: [AtomicU64; HoldBound::ALL.len()],
    /// Answered early: the key was released, or the listener stops.
    pub released: AtomicU64,
}

/// A hold taken: the entry leaves the registry when this is dropped.
pub struct HoldTicket<'h> {
    holds: &'h Holds,
    key: Box<str>,
    conn_id: u64,
    /// Notified by `Holds::release`.
    pub release: Arc<Notify>,
}

impl Drop for HoldTicket<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.holds.held);
        let HeldByKey { by_key, count } = &mut *held;
        if let Some(list) = by_key.get_mut(&self.key) {
            if let Some(pos) = list.iter().position(|h| h.conn_id == self.conn_id) {
                list.swap_remove(pos);
                *count -= 1;
            }
            if list.is_empty() {
                by_key.remove(&self.key);
            }
        }
    }
}

impl Holds {
    /// Hold connection `conn_id` of `key` unless a bound is reached (then
    /// counted by bound, and the bound returned).
    pub fn take(
        &self,
        key: &str,
        conn_id: u64,
        max_held: usize,
        max_per_key: usize,
    ) -> Result<HoldTicket<'_>, HoldBound> {
        let release = Arc::new(Notify::new());
        let taken = {
            let mut held = lock(&self.held);
            let HeldByKey { by_key, count } = &mut *held;
            if *count >= max_held {
                Err(HoldBound::MaxHeld)
            } else if by_key.get(key).map_or(0, Vec::len) >= max_per_key {
                Err(HoldBound::MaxHeldPerKey)
            } else {
                by_key.entry(key.into()).or_default().push(Held {
                    conn_id,
                    release: Arc::clone(&release),
                });
                *count += 1;
                Ok(())
            }
        };
        match taken {
            Ok(()) => {
                self.taken.fetch_add(1, Ordering::Relaxed);
                Ok(HoldTicket {
                    holds: self,
                    key: key.into(),
                    conn_id,
                    release,
                })
            }
            Err(bound) => {
                let i = HoldBound::ALL
                    .iter()
                    .position(|&b| b == bound)
                    .expect("in ALL");
                self.skipped[i].fetch_add(1, Ordering::Relaxed);
                Err(bound)
            }
        }
    }

    /// Answer `key`'s held refusals now (`ProxyServer.release_held`): each is
    /// woken and answered with "retry in 1s". Returns how many.
    pub fn release(&self, key: &str) -> usize {
        let list = {
            let mut held = lock(&self.held);
            let list = held.by_key.remove(key).unwrap_or_default();
            held.count -= list.len();
            list
        };
        for h in &list {
            h.release.notify_one(); // stores a permit if the hold is not waiting yet
        }
        list.len()
    }

    pub fn answered(&self, reason: RefuseReason) {
        self.answered[refuse_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// Held right now.
    pub fn count(&self) -> usize {
        lock(&self.held).count
    }

    pub fn answered_counts(&self) -> Vec<(&'static str, u64)> {
        RefuseReason::ALL
            .iter()
            .map(|&r| {
                let n = self.answered[refuse_index(r)].load(Ordering::Relaxed);
                (r.as_str(), n)
            })
            .collect()
    }

    pub fn skipped_counts(&self) -> Vec<(&'static str, u64)> {
        HoldBound::ALL
            .iter()
            .zip(&self.skipped)
            .map(|(b, n)| (b.label(), n.load(Ordering::Relaxed)))
            .collect()
    }
}

// --- live relays ---------------------------------------------------------------------

/// What crossed a relay so far, kept up to date by the relay after each read.
#[derive(Debug, Default)]
pub struct LiveTraffic {
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl LiveTraffic {
    /// The client's side so far (client to upstream).
    pub fn set_in(&self, messages: u64, bytes: u64) {
        self.messages_in.store(messages, Ordering::Relaxed);
        self.bytes_in.store(bytes, Ordering::Relaxed);
    }

    /// The upstream's side so far (upstream to client).
    pub fn set_out(&self, messages: u64, bytes: u64) {
        self.messages_out.store(messages, Ordering::Relaxed);
        self.bytes_out.store(bytes, Ordering::Relaxed);
    }

    pub fn get(&self) -> Traffic {
        Traffic {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// A close the brain (or the drain) asks of a relay: the code and reason
/// both legs get, and how long the peers then have to answer, and a frame in
/// flight to end, before their connections are cut (`relay::CLOSE_GRACE`;
/// the drain's: `limits.shutdown_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseCommand {
    pub code: u16,
    pub reason: String,
    pub grace: Duration,
}

struct RelayEntry {
    route: Arc<str>,
    traffic: Arc<LiveTraffic>,
    /// Taken by the first close.
    close: Option<oneshot::Sender<CloseCommand>>,
}

/// One open relay as `live()` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConnection {
    pub conn_id: u64,
    pub route: Arc<str>,
    pub traffic: Traffic,
}

/// The open relays by connection id (sharded: a relay locks one shard at its
/// start and at its end).
pub struct Relays {
    shards: Vec<Mutex<HashMap<u64, RelayEntry>>>,
    /// Set by `close_all` (the drain): every relay, the ones registered
    /// after it included, gets this close. The drain reaches relays here, not
    /// through a watch of their own: a shutdown future in every idle relay's
    /// task cost 176 bytes.
    closing: OnceLock<CloseCommand>,
}

impl Default for Relays {
    fn default() -> Relays {
        Relays {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            closing: OnceLock::new(),
        }
    }
}

/// What a relay gets from its registration: its live counts and the
/// brain's close command.
pub struct RelayControl {
    pub traffic: Arc<LiveTraffic>,
    pub commands: oneshot::Receiver<CloseCommand>,
}

/// A relay in the registry: removed when this is dropped (the relay ended,
/// or its task was dropped at the runtime's end).
pub struct Registered {
    relays: Arc<Relays>,
    conn_id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(self.relays.shard(self.conn_id)).remove(&self.conn_id);
    }
}

impl Relays {
    fn shard(&self, conn_id: u64) -> &Mutex<HashMap<u64, RelayEntry>> {
        &self.shards[(conn_id % SHARDS as u64) as usize]
    }

    pub fn register(self: &Arc<Self>, conn_id: u64, route: Arc<str>) -> (Registered, RelayControl) {
        let traffic = Arc::new(LiveTraffic::default());
        let (tx, rx) = oneshot::channel();
        let mut shard = lock(self.shard(conn_id));
        // Checked under the shard's lock: `close_all` sets `closing` before it
        // locks any shard, so a relay it does not find there sees it here.
        let close = match self.closing.get() {
            Some(command) => {
                let _ = tx.send(command.clone());
                None
            }
            None => Some(tx),
        };
        shard.insert(
            conn_id,
            RelayEntry {
                route,
                traffic: Arc::clone(&traffic),
                close,
            },
        );
        drop(shard);
        (
            Registered {
                relays: Arc::clone(self),
                conn_id,
            },
            RelayControl {
                traffic,
                commands: rx,
            },
        )
    }

    /// Ask relay `conn_id` to close both legs with `command`; false when no
    /// such relay is open (unknown, or ended). A relay asked already keeps
    /// its first close (the first reason is the one reported), and this is
    /// true while it is still open.
    pub fn close(&self, conn_id: u64, command: CloseCommand) -> bool {
        let mut shard = lock(self.shard(conn_id));
        let Some(entry) = shard.get_mut(&conn_id) else {
            return false;
        };
        if let Some(tx) = entry.close.take() {
            let _ = tx.send(command); // a relay that just ended drops it: it is going anyway
        }
        true
    }

    /// Ask every relay, open now or registered from now on, to close with
    /// `command` (the drain's 1001); a relay asked already keeps its first
    /// close. Only the first call's command counts.
    pub fn close_all(&self, command: CloseCommand) {
        let command = self.closing.get_or_init(|| command);
        for shard in &self.shards {
            for entry in lock(shard).values_mut() {
                if let Some(tx) = entry.close.take() {
                    let _ = tx.send(command.clone());
                }
            }
        }
    }

    /// Every open relay with its counts so far, by connection id.
    pub fn live(&self) -> Vec<LiveConnection> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            out.extend(shard.iter().map(|(&conn_id, entry)| LiveConnection {
                conn_id,
                route: Arc::clone(&entry.route),
                traffic: entry.traffic.get(),
            }));
        }
        out.sort_by_key(|c| c.conn_id);
        out
    }
}

// --- per-address caps -------------------------------------------------------------

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AddressLoad {
    /// Connections in any state.
    pub connections: usize,
    /// Accepted, first request head not complete yet.
    pub heads: usize,
}

/// The caps `Addresses` admits against; a reload replaces them whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressCaps {
    max_connections: usize,
    max_heads: usize,
    exempt: Vec<IpNet>,
}

impl AddressCaps {
    /// `None` caps are off; `exempt` networks are never capped.
    pub fn new(
        max_connections: Option<usize>,
        max_heads: Option<usize>,
        exempt: Vec<IpNet>,
    ) -> AddressCaps {
        AddressCaps {
            max_connections: max_connections.unwrap_or(usize::MAX),
            max_heads: max_heads.unwrap_or(usize::MAX),
            exempt,
        }
    }

    fn capped(&self) -> bool {
        self.max_connections != usize::MAX || self.max_heads != usize::MAX
    }

    fn exempts(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|net| net.contains(ip))
    }
}

/// What each client address holds, against `limits.max_connections_per_address`
/// and `limits.max_heads_per_address` (`AddressLoad` in listener.py); an
/// entry goes at zero. Addresses in `identity.trusted_proxies` are never
/// capped (nor tracked); with neither cap set nothing is tracked. A reload
/// changes the caps (`set_caps`): they apply to connections accepted from
/// then on; a connection counted stays counted until it ends, one taken
/// while its address was not tracked is never counted.
pub struct Addresses {
    shards: Vec<Mutex<HashMap<IpAddr, AddressLoad>>>,
    caps: ArcSwap<AddressCaps>,
}

/// A connection counted against its address: released when dropped.
pub struct AddressSlot {
    addresses: Arc<Addresses>,
    ip: IpAddr,
    head_pending: bool,
}

impl AddressSlot {
    /// The address it counts a connection (or a request) of.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The first request head is complete: one half-open head fewer.
    pub fn head_done(&mut self) {
        if std::mem::take(&mut self.head_pending) {
            if let Some(load) = lock(self.addresses.shard(self.ip)).get_mut(&self.ip) {
                load.heads -= 1;
            }
        }
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut shard = lock(self.addresses.shard(self.ip));
        if let Some(load) = shard.get_mut(&self.ip) {
            if self.head_pending {
                load.heads -= 1;
            }
            load.connections -= 1;
            if load.connections == 0 {
                shard.remove(&self.ip);
            }
        }
    }
}

/// The answer of [`Addresses::admit`].
pub enum AddressAdmission {
    /// Counted (drop the slot when the connection ends).
    Counted(AddressSlot),
    /// Not tracked: no cap applies to it.
    Exempt,
    /// Its address holds its share already: answer 503.
    OverCap,
}

impl Addresses {
    pub fn new(caps: AddressCaps) -> Addresses {
        Addresses {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            caps: ArcSwap::from_pointee(caps),
        }
    }

    /// A reload's caps, for the connections accepted from now on.
    pub fn set_caps(&self, caps: AddressCaps) {
        self.caps.store(Arc::new(caps));
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, AddressLoad>> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        ip.hash(&mut hasher);
        &self.shards[(hasher.finish() % SHARDS as u64) as usize]
    }

    /// A new connection from `ip`: counted, or refused over its caps. An
    /// address's first connection is always taken (a cap below one would
    /// shut the address out).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> AddressAdmission {
        let caps = self.caps.load();
        if !caps.capped() || caps.exempts(ip) {
            return AddressAdmission::Exempt;
        }
        self.take(ip, &caps, true)
    }

    /// A WebSocket upgrade that a trusted proxy carries for `ip` (the client
    /// its X-Forwarded-For names), counted against
    /// `max_connections_per_address` as a connection of `ip`'s own until it
    /// ends. The proxy is exempt at accept (it carries many clients), so
    /// without this one client behind it took every slot of
    /// `limits.max_connections`; nginx (realip and `limit_conn`) and HAProxy
    /// (stick tables on the header) cap the real client likewise. Its head is
    /// complete: it takes no place among the half-open heads.
    pub fn admit_forwarded(self: &Arc<Self>, ip: IpAddr) -> AddressAdmission {
        let caps = self.caps.load();
        if caps.max_connections == usize::MAX || caps.exempts(ip) {
            return AddressAdmission::Exempt;
        }
        self.take(ip, &caps, false)
    }

    fn take(self: &Arc<Self>, ip: IpAddr, caps: &AddressCaps, head: bool) -> AddressAdmission {
        let mut shard = lock(self.shard(ip));
        let load = shard.entry(ip).or_default();
        if load.connections > 0
            && (load.connections >= caps.max_connections || (head && load.heads >= caps.max_heads))
        {
            return AddressAdmission::OverCap;
        }
        load.connections += 1;
        load.heads += usize::from(head);
        AddressAdmission::Counted(AddressSlot {
            addresses: Arc::clone(self),
            ip,
            head_pending: head,
        })
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    #[cfg(test)]
    pub fn load(&self, ip: IpAddr) -> Option<AddressLoad> {
        lock(self.shard(ip)).get(&ip).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::CLOSE_GRACE;

    #[test]
    fn holds_are_bounded_in_all_and_per_key_and_released_by_key() {
        let holds = Holds::default();
        let a1 = holds.take("a", 1, 3, 2).unwrap();
        let a2 = holds.take("a", 2, 3, 2).unwrap();
        assert_eq!(
            holds.take("a", 3, 3, 2).err(),
            Some(HoldBound::MaxHeldPerKey)
        );
        let b4 = holds.take("b", 4, 3, 2).unwrap();
        assert_eq!(holds.take("c", 5, 3, 2).err(), Some(HoldBound::MaxHeld));
        assert_eq!(holds.count(), 3);
        assert_eq!(
            holds.skipped_counts(),
            [("max_held", 1), ("max_held_per_key", 1)]
        );
        assert_eq!(holds.release("a"), 2);
        assert_eq!(holds.release("a"), 0);
        assert_eq!(holds.count(), 1);
        drop((a1, a2)); // released already: nothing left to remove
        assert_eq!(holds.count(), 1);
        drop(b4);
        assert_eq!(holds.count(), 0);
        assert_eq!(holds.taken.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_relay_keeps_its_first_close_and_leaves_the_registry_at_its_end() {
        let relays = Arc::new(Relays::default());
        let (registered, mut control) = relays.register(7, Arc::from("/chat"));
        control.traffic.set_in(2, 10);
        let live = relays.live();
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].conn_id, &*live[0].route), (7, "/chat"));
        assert_eq!(
            (live[0].traffic.messages_in, live[0].traffic.bytes_in),
            (2, 10)
        );
        let command = CloseCommand {
            code: 1008,
            reason: "bye".into(),
            grace: CLOSE_GRACE,
        };
        assert!(relays.close(7, command.clone()));
        let second = CloseCommand {
            code: 1001,
            reason: "later".into(),
            grace: CLOSE_GRACE,
        };
        assert!(
            relays.close(7, second),
            "still open: the first close stands"
        );
        assert_eq!(control.commands.try_recv().unwrap(), command);
        drop(registered);
        assert!(relays.live().is_empty());
        assert!(!relays.close(7, command));
    }

    /// The drain closes every relay open, and every one registered after it
    /// (a handshake that was ending when the drain began); a relay the brain
    /// closed first keeps the brain's close.
    #[test]
    fn the_drain_closes_every_relay_even_one_registered_after_it() {
        let relays = Arc::new(Relays::default());
        let (_open, mut open) = relays.register(1, Arc::from("/"));
        let (_asked, mut asked) = relays.register(2, Arc::from("/"));
        let brain = CloseCommand {
            code: 1008,
            reason: "policy".into(),
            grace: CLOSE_GRACE,
        };
        let drain = CloseCommand {
            code: 1001,
            reason: "loopwatch: shutting down".into(),
            grace: CLOSE_GRACE,
        };
        assert!(relays.close(2, brain.clone()));
        relays.close_all(drain.clone());
        let (_late, mut late) = relays.register(3, Arc::from("/"));
        assert_eq!(open.commands.try_recv().unwrap(), drain);
        assert_eq!(asked.commands.try_recv().unwrap(), brain);
        assert_eq!(late.commands.try_recv().unwrap(), drain);
        assert_eq!(
            relays.live().len(),
            3,
            "closing, not gone: each leaves at its end"
        );
    }

    #[test]
    fn address_caps_count_connections_and_heads_and_empty_at_zero() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted: IpAddr = "10.9.0.1".parse().unwrap();
        let addresses = Arc::new(Addresses::new(AddressCaps::new(
            Some(3),
            Some(2),
            vec![IpNet::parse("10.9.0.0/16").unwrap()],
        )));
        let admit = |ip| match addresses.admit(ip) {
            AddressAdmission::Counted(slot) => Some(slot),
            AddressAdmission::Exempt => panic!("not exempt"),
            AddressAdmission::OverCap => None,
        };
        let mut first = admit(ip).unwrap();
        let _second = admit(ip).unwrap();
        assert!(admit(ip).is_none(), "two half-open heads");
        first.head_done();
        let third = admit(ip).unwrap();
        assert_eq!(
            addresses.load(ip),
            Some(AddressLoad {
                connections: 3,
                heads: 2
            })
        );
        assert!(admit(ip).is_none(), "three connections");
        for _ in 0..10 {
            assert!(matches!(addresses.admit(trusted), AddressAdmission::Exempt));
        }
        drop((first, third, _second));
        assert_eq!(addresses.tracked(), 0);
        let off = Arc::new(Addresses::new(AddressCaps::new(None, None, Vec::new())));
        assert!(matches!(off.admit(ip), AddressAdmission::Exempt));
    }

    #[test]
    fn new_caps_apply_to_the_next_connections_and_counted_ones_stay_counted() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let addresses = Arc::new(Addresses::new(AddressCaps::new(Some(2), None, Vec::new())));
        let counted = |a: AddressAdmission| match a {
            AddressAdmission::Counted(slot) => slot,
            _ => panic!("expected a counted connection"),
        };
        let first = counted(addresses.admit(ip));
        let second = counted(addresses.admit(ip));
        assert!(matches!(addresses.admit(ip), AddressAdmission::OverCap));
        // A reload raises the cap: the two open stay counted, a third fits.
        addresses.set_caps(AddressCaps::new(Some(3), None, Vec::new()));
        let third = counted(addresses.admit(ip));
        assert!(matches!(addresses.admit(ip), AddressAdmission::OverCap));
        // The address becomes a trusted proxy: exempt from now on, and the
        // connections counted before are released as they end.
        let net = IpNet::parse("10.0.0.0/8").unwrap();
        addresses.set_caps(AddressCaps::new(Some(3), None, vec![net]));
        assert!(matches!(addresses.admit(ip), AddressAdmission::Exempt));
        assert_eq!(addresses.load(ip).map(|l| l.connections), Some(3));
        drop((first, second, third));
        assert_eq!(addresses.tracked(), 0);
    }

    #[test]
    fn a_forwarded_client_shares_its_address_cap_and_takes_no_head() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted: IpAddr = "10.9.0.1".parse().unwrap();
        let net = IpNet::parse("10.9.0.0/16").unwrap();
        let addresses = Arc::new(Addresses::new(AddressCaps::new(
            Some(3),
            Some(1),
            vec![net],
        )));
        let counted = |a: AddressAdmission| match a {
            AddressAdmission::Counted(slot) => slot,
            _ => panic!("expected a counted connection"),
        };
        // Two upgrades through the proxy and one direct head: three connections,
        // one head (the forwarded ones' heads were complete).
        let through = [
            counted(addresses.admit_forwarded(ip)),
            counted(addresses.admit_forwarded(ip)),
        ];
        let direct = counted(addresses.admit(ip));
        assert_eq!(
            addresses.load(ip),
            Some(AddressLoad {
                connections: 3,
                heads: 1
            })
        );
        assert!(matches!(
            addresses.admit_forwarded(ip),
            AddressAdmission::OverCap
        ));
        // A proxy named as the client (every hop trusted) stays exempt.
        assert!(matches!(
            addresses.admit_forwarded(trusted),
            AddressAdmission::Exempt
        ));
        drop(through);
        assert!(matches!(
            addresses.admit_forwarded(ip),
            AddressAdmission::Counted(_)
        ));
        drop(direct);
        assert_eq!(addresses.tracked(), 0);
        // Without a connection cap nothing is counted (the head cap alone
        // cannot apply to a complete head).
        let heads_only = Arc::new(Addresses::new(AddressCaps::new(None, Some(1), Vec::new())));
        assert!(matches!(
            heads_only.admit_forwarded(ip),
            AddressAdmission::Exempt
        ));
    }
}
