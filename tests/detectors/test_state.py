"""Per-client state and its bounded store; the ring and window primitives."""

from __future__ import annotations

from array import array

from loopwatch.detectors import ring
from loopwatch.detectors.events import Attempt, Closed, HandshakeFailed, Rejected
from loopwatch.detectors.history import pack, unpack
from loopwatch.detectors.state import Addresses, ClientState, MemoryStore
from loopwatch.detectors.window import SlidingCounter


def _fill(store: MemoryStore, keys: list[str], t: float) -> list[ClientState]:
    evicted: list[ClientState] = []
    for k in keys:
        evicted += store.put(ClientState(k, t), t)
    return evicted


def test_ring_keeps_the_newest_values_and_counts_by_time() -> None:
    r = None
    for t in range(10):
        r = ring.push(r, float(t), 4)
    assert r is not None and list(r) == [6.0, 7.0, 8.0, 9.0]
    assert ring.count_since(r, 7.5) == 2
    assert ring.count_since(r, 0.0) == 4
    assert ring.count_since(None, 0.0) == 0
    assert ring.count_since(array("d"), 0.0) == 0


def test_sliding_counter_forgets_buckets_older_than_the_window() -> None:
    c = SlidingCounter(10.0, fields=2, buckets=10)
    for t in range(20):
        c.add(float(t), 0)
        c.add(float(t), 1, 2)
    assert c.total(19.5, 0) == 10  # seconds 10..19
    assert c.total(19.5, 1) == 20
    assert c.total(100.0, 0) == 0
    c.clear()
    assert c.total(19.5, 0) == 0


def test_store_evicts_least_recently_used_beyond_the_cap() -> None:
    store = MemoryStore(max_clients=3, ttl=60.0)
    _fill(store, ["a", "b", "c"], 0.0)
    a = store.get("a")
    assert a is not None
    store.touch(a, 1.0)  # a is now the most recently used
    evicted = _fill(store, ["d"], 2.0)
    assert [s.key for s in evicted] == ["b"]
    assert sorted(s.key for s in store) == ["a", "c", "d"]
    assert store.evictions == 1
    assert [s.key for s in store.recent()] == ["d", "a", "c"]


def test_a_full_store_prefers_evicting_a_client_that_is_not_pinned() -> None:
    store = MemoryStore(max_clients=2, ttl=60.0)
    _fill(store, ["offender", "idle"], 0.0)
    offender = store.get("offender")
    assert offender is not None
    offender.cool_until = 100.0  # in cooldown: forgetting it would let it loop again
    evicted = _fill(store, ["new"], 1.0)
    assert [s.key for s in evicted] == ["idle"]
    assert store.get("offender") is offender


def test_memory_stays_bounded_even_if_every_client_is_pinned() -> None:
    store = MemoryStore(max_clients=2, ttl=60.0)
    _fill(store, ["a", "b"], 0.0)
    for state in store:
        state.open = {1: 0.0}
    evicted = _fill(store, ["c"], 1.0)
    assert [s.key for s in evicted] == ["a"]
    assert len(store) == 2


def test_ttl_forgets_idle_clients_but_keeps_pinned_ones() -> None:
    store = MemoryStore(max_clients=10, ttl=600.0)
    _fill(store, ["idle", "connected", "cooling", "remembered", "fresh"], 0.0)
    store.get("connected").open = {7: 0.0}  # type: ignore[union-attr]
    store.get("cooling").cool_until = 700.0  # type: ignore[union-attr]
    store.get("remembered").keep_until = 3600.0  # type: ignore[union-attr]
    fresh = store.get("fresh")
    assert fresh is not None
    store.touch(fresh, 500.0)
    assert store.next_expiry() == 600.0
    assert store.expire(599.0) == []
    expired = store.expire(600.0)
    assert [s.key for s in expired] == ["idle"]
    assert store.evictions == 1
    assert sorted(s.key for s in store) == ["connected", "cooling", "fresh", "remembered"]
    # pinned clients had their TTL restarted, so the next expiry is the fresh one
    assert store.next_expiry() == 1100.0


def test_resize_evicts_down_to_the_new_cap() -> None:
    store = MemoryStore(max_clients=10, ttl=60.0)
    _fill(store, [str(i) for i in range(10)], 0.0)
    evicted = store.resize(4, 60.0, 1.0)
    assert [s.key for s in evicted] == ["0", "1", "2", "3", "4", "5"]
    assert len(store) == 4 and store.evictions == 6
    assert store.evict("9") is not None and store.evict("9") is None
    assert store.evictions == 6  # removing on purpose is not an eviction


def test_resize_gives_clients_in_cooldown_the_second_chance_put_gives() -> None:
    """A lower cap evicts idle clients first, as a new client's eviction does:
    the oldest here are in cooldown (an operator's included) or connected."""
    store = MemoryStore(max_clients=10, ttl=60.0)
    _fill(store, [str(i) for i in range(10)], 0.0)
    for key in ("0", "1", "2"):
        store.get(key).cool_until = 120.0  # type: ignore[union-attr]
    store.get("3").open = {7: 0.0}  # type: ignore[union-attr]
    evicted = store.resize(5, 60.0, 1.0)
    assert [s.key for s in evicted] == ["4", "5", "6", "7", "8"]
    assert sorted(s.key for s in store) == ["0", "1", "2", "3", "9"]
    # No room left but for pinned clients: the cap still holds, oldest first.
    evicted = store.resize(2, 60.0, 1.0)
    assert len(evicted) == 3 and len(store) == 2


def test_client_state_is_slotted_and_its_rate_decays() -> None:
    s = ClientState("k", 0.0)
    assert not hasattr(s, "__dict__")
    s.rate, s.rate_t = 10.0, 0.0
    assert s.rate_at(0.0, 10.0) == 10.0
    assert abs(s.rate_at(10.0, 10.0) - 10.0 / 2.718281828) < 1e-6


def test_open_connections_one_in_slots_more_in_a_dict_oldest_first() -> None:
    s = ClientState("k", 0.0)
    assert s.open_count == 0 and s.open_items() == [] and not s.pinned(0.0)
    s.add_open(1, 1.0)
    assert (s.open_id, s.open, s.open_count) == (1, None, 1)  # one: no dict
    assert s.opened_at(1) == 1.0 and s.opened_at(2) is None and s.pinned(0.0)
    s.add_open(2, 2.0)
    s.add_open(3, 3.0)
    assert s.open_id is None and s.open == {1: 1.0, 2: 2.0, 3: 3.0}
    assert s.open_items() == [(1, 1.0), (2, 2.0), (3, 3.0)] and s.opened_at(2) == 2.0
    assert s.remove_open(1) and not s.remove_open(1) and not s.remove_open(9)
    assert s.remove_open(3)  # back to one: the dict goes, the one left kept
    assert (s.open_id, s.open_t, s.open, s.open_items()) == (2, 2.0, None, [(2, 2.0)])
    s.add_open(4, 4.0)
    assert s.open_items() == [(2, 2.0), (4, 4.0)]  # still oldest first
    assert s.remove_open(2) and s.remove_open(4)
    assert s.open_count == 0 and (s.open_id, s.open) == (None, None) and not s.pinned(0.0)


def test_history_packs_what_the_admin_view_shows() -> None:
    cases = [
        (Attempt("k", "/", 1.0), {"type": "attempt", "t": 1.0}),
        (Rejected("k", "/", 2.0, "min_interval"), {"type": "rejected", "t": 2.0, "reason": "min_interval"}),
        (HandshakeFailed("k", "/", 3.0, 503), {"type": "handshake_failed", "t": 3.0, "status": 503}),
        (HandshakeFailed("k", "/", 3.0, None, "timeout"), {"type": "handshake_failed", "t": 3.0, "error": "timeout"}),
        (
            Closed("k", "/", 4.0, 9, 4003, "bye", "upstream", 0.05),
            {"type": "closed", "t": 4.0, "code": 4003, "initiator": "upstream", "duration": 0.05},
        ),
    ]
    for event, expected in cases:
        assert unpack(event.t, pack(event)).to_dict() == expected


def test_addresses_keep_one_copy_of_each_and_stay_bounded() -> None:
    shared = Addresses()
    first = "".join(("10.0.", "0.1"))  # built at run time: equal strings, distinct objects
    again = "".join(("10.0.0", ".1"))
    assert first == again and first is not again
    assert shared.share(first) is first
    assert shared.share(again) is first
    for i in range(Addresses.CAP):  # full: sharing starts over, copies already given stay valid
        shared.share(f"10.1.{i >> 8}.{i & 255}")
    assert shared.share(again) is again


def test_the_close_code_histogram_keeps_sixteen_codes_and_counts_the_rest_as_other() -> None:
    from loopwatch.detectors.rules.evidence import close_codes
    from loopwatch.detectors.settings import DetectionSettings
    from loopwatch.detectors.tracker import MAX_CODES, on_closed

    state, settings = ClientState("k", 0.0), DetectionSettings()
    codes = [1000, 1008, *range(4000, 4000 + MAX_CODES + 3), 1000]  # 16 distinct fit; then 3 more; 1000 again
    for i, code in enumerate(codes):
        on_closed(state, Closed("k", "/", float(i), i, code, "", "upstream", 1.0), settings)
    histogram = close_codes(state)
    assert histogram["1000"] == 2 and histogram["1008"] == 1
    kept = [c for c in histogram if c.startswith("40")]
    assert kept == [str(4000 + n) for n in range(MAX_CODES - 2)]  # in order of arrival
    assert histogram["other"] == 5  # the codes beyond the sixteen
    assert len(histogram) == MAX_CODES + 1 and sum(histogram.values()) == len(codes)


def test_a_flood_of_new_keys_pushes_out_idle_clients_before_cooldowns() -> None:
    """Six clients in cooldown at the front of a full store, then a wave of new
    keys: looking at the oldest four in place, the flood evicted cooldowns (and
    the clients were let in again) while idle clients stayed."""
    store = MemoryStore(max_clients=50, ttl=600.0)
    _fill(store, [f"cool{i}" for i in range(6)], 0.0)
    for i in range(6):
        store.get(f"cool{i}").cool_until = 600.0  # type: ignore[union-attr]
    _fill(store, [f"idle{i}" for i in range(44)], 1.0)
    evicted = _fill(store, [f"new{i}" for i in range(60)], 2.0)
    assert len(evicted) == 60 and not any(s.key.startswith("cool") for s in evicted)
    assert all(store.get(f"cool{i}") is not None for i in range(6))
    assert len(store) == 50
    # Once their cooldowns are over they are ordinary clients again.
    evicted = _fill(store, [f"later{i}" for i in range(50)], 700.0)
    assert sum(s.key.startswith("cool") for s in evicted) == 6


def test_the_work_per_eviction_is_bounded_when_every_client_is_pinned() -> None:
    store = MemoryStore(max_clients=1000, ttl=600.0)
    _fill(store, [str(i) for i in range(1000)], 0.0)
    for state in store:
        state.cool_until = 600.0
    touched = 0
    original = store.touch

    def counting(state: ClientState, t: float) -> None:
        nonlocal touched
        touched += 1
        original(state, t)

    store.touch = counting  # type: ignore[method-assign]
    evicted = _fill(store, ["new"], 1.0)
    assert len(evicted) == 1 and len(store) == 1000
    assert touched == MemoryStore.EVICTION_SCAN
