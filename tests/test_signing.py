"""The seals replicas put on what they share through Redis (proxy/state/signing.py)."""

from __future__ import annotations

import pytest

from loopwatch.proxy.state.signing import MAX_SKEW, REPLAY_WINDOW, Replays, Seal

KEY = "a-fleet-secret-0123456789"


class Wall:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_sealed_batch_opens_under_the_key_and_nowhere_else() -> None:
    wall = Wall()
    seal = Seal(KEY, wall)
    batch = b'lw2 replica-a\n[["X","client"]]'
    sealed = seal.seal_batch(batch)
    assert Seal.inner(sealed) == batch
    assert seal.open_batch(sealed).batch == batch
    with pytest.raises(ValueError, match="does not match"):
        Seal("another-fleets-secret-xyz", wall).open_batch(sealed)
    with pytest.raises(ValueError, match="sealed with state.redis.signing_key"):
        seal.open_batch(batch)  # unsealed: a publisher without the key


def test_a_batch_altered_in_any_byte_is_refused() -> None:
    seal = Seal(KEY, Wall())
    sealed = seal.seal_batch(b'lw2 a\n[["X","client"]]')
    for i in range(len(sealed)):
        if sealed[i : i + 1] == b"\n":
            continue
        altered = sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :]
        with pytest.raises(ValueError):
            seal.open_batch(altered)


def test_a_batch_played_back_later_is_refused() -> None:
    wall = Wall()
    seal = Seal(KEY, wall)
    sealed = seal.seal_batch(b'lw2 a\n[["X","client"]]')
    wall.t += MAX_SKEW - 1
    seal.open_batch(sealed)  # late, within the clocks' tolerance
    wall.t += 2
    with pytest.raises(ValueError, match="played back"):
        seal.open_batch(sealed)


def test_a_sealed_cooldown_value_bounds_its_time_whatever_the_ttl_says() -> None:
    wall = Wall()
    seal = Seal(KEY, wall)
    name = "loopwatch:cool:jwt:tab@10.0.0.1"
    value = seal.seal_value(name, {"rule": "manual", "repeat": 1, "enforced": True, "tail_ms": 0}, 60_000)
    assert seal.open_value(name, value, 60_000) == 60_000
    wall.t += 10
    # Someone stretched the key's TTL in Redis (PEXPIRE): the seal's end holds.
    assert seal.open_value(name, value, 3_600_000) == 50_000
    with pytest.raises(ValueError, match="does not match"):
        seal.open_value("loopwatch:cool:someone-else", value, 60_000)  # moved to another client
    with pytest.raises(ValueError, match="does not match"):
        seal.open_value(name, {**value, "repeat": 9}, 60_000)
    with pytest.raises(ValueError, match="not sealed"):
        seal.open_value(name, {"rule": "manual", "repeat": 1, "enforced": True, "tail_ms": 0}, 60_000)


def test_each_batch_is_numbered_and_a_number_is_taken_once() -> None:
    """Within the 60 s a sealed batch could be played back at once, as often as
    anyone likes: a release replayed undid an operator's cooldown, a failure
    replayed made a loop (the probe). Each origin's (run, number) is taken once;
    a later run (the replica restarted) starts afresh, an earlier one is refused;
    publishes that overtook each other are taken in any order."""
    wall = Wall()
    seal = Seal(KEY, wall)
    first, second = (seal.open_batch(seal.seal_batch(b"lw1 a\n[]")) for _ in range(2))
    assert (first.seq, second.seq) == (1, 2) and first.run == second.run
    replays = Replays()
    assert replays.fresh("a", first.run, 2) and replays.fresh("a", first.run, 1)  # overtaken: once each
    assert not replays.fresh("a", first.run, 1) and not replays.fresh("a", first.run, 2)
    assert replays.fresh("b", first.run, 1)  # another origin's numbers are its own
    assert replays.fresh("a", first.run, 2 + REPLAY_WINDOW)
    assert not replays.fresh("a", first.run, 2)  # too far back to tell: refused
    wall.t += 5
    restarted = Seal(KEY, wall).open_batch(Seal(KEY, wall).seal_batch(b"lw1 a\n[]"))
    assert restarted.run > first.run and restarted.seq == 1
    assert replays.fresh("a", restarted.run, 1)
    assert not replays.fresh("a", first.run, 3 + REPLAY_WINDOW)  # the run before the restart
