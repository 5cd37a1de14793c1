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
    assert seal.open_value(name, value, 60_000).left_ms == 60_000
    wall.t += 10
    # Someone stretched the key's TTL in Redis (PEXPIRE): the seal's end holds,
    # give or take the clocks' tolerance.
    assert seal.open_value(name, value, 3_600_000).left_ms == 50_000 + MAX_SKEW * 1000
    # A reader whose clock runs 10 s ahead of the writer's keeps Redis's TTL: held
    # to the sealed end exactly, it lost every cooldown under 10 s (the fleet probe).
    ahead = Seal(KEY, Wall(wall.t + 10))
    assert ahead.open_value(name, value, 5_000).left_ms == 5_000
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
    assert not replays.fresh("a", first.run, 2 + REPLAY_WINDOW)  # the run before it: its numbers stay taken


def test_a_replica_restarted_with_its_clock_behind_is_heard() -> None:
    """The run is the process's start on its clock: a restart on a host whose
    clock is behind makes an earlier run. Only the latest run was remembered,
    so every batch of the new process was refused as played back, until the
    other replicas restarted (the fleet probe). Two processes under one id are
    two runs as well: each is checked against its own numbers."""
    replays = Replays()
    assert replays.fresh("a", 2_000, 1) and replays.fresh("a", 2_000, 2)
    assert replays.fresh("a", 1_000, 1) and replays.fresh("a", 1_000, 2)  # the restart, clock behind
    assert not replays.fresh("a", 1_000, 2) and not replays.fresh("a", 2_000, 2)
    assert replays.fresh("a", 2_000, 3)  # both heard on
    for run in (3_000, 4_000, 5_000):  # more runs than remembered: the oldest go
        assert replays.fresh("a", run, 1)
    assert not replays.fresh("a", 500, 1)  # older than every run remembered


def test_a_batch_sent_before_a_replica_heard_its_sender_is_refused() -> None:
    """A sealed batch captured off the channel, played back to a replica that
    started (or reconnected) after it went by: that replica had no record of
    its number and took it (the fleet probe undid an operator's release on a
    late-joining replica). Numbers well below the first heard since
    subscribing are refused."""
    replays = Replays()
    assert replays.fresh("a", 7, 20)  # the first heard of a's run: its heartbeat
    assert replays.fresh("a", 7, 19)  # one that overtook it
    assert not replays.fresh("a", 7, 4)  # captured before this replica listened
    replays.subscribed()  # a reconnect: what went by meanwhile was not heard
    assert replays.fresh("a", 7, 40)
    assert not replays.fresh("a", 7, 30)  # sent while it was away


def test_a_rotations_second_key_opens_and_never_seals() -> None:
    """Rotating the key: a replica given `accepted_signing_key` takes what the
    other key sealed, seals with its own, and says which keys it should seal
    anew (a cooldown key skipped after the rotation was a cooldown lost)."""
    wall = Wall()
    old, new = "the-old-fleet-secret-0123", "the-new-fleet-secret-4567"
    rotating = Seal(new, wall, accepted=old)
    sealed_old = Seal(old, wall).seal_batch(b"lw1 a\n[]")
    assert rotating.open_batch(sealed_old).batch == b"lw1 a\n[]"
    with pytest.raises(ValueError, match="does not match"):
        Seal(old, wall).open_batch(rotating.seal_batch(b"lw1 b\n[]"))  # sealed with the new key only
    with pytest.raises(ValueError, match="does not match"):
        rotating.open_batch(Seal("a-third-secret-not-ours-89", wall).seal_batch(b"lw1 c\n[]"))
    name = "loopwatch:cool:jwt:tab@10.0.0.1"
    fields = {"rule": "manual", "repeat": 1, "enforced": True, "tail_ms": 0}
    opened = rotating.open_value(name, Seal(old, wall).seal_value(name, fields, 60_000), 60_000)
    assert (opened.left_ms, opened.reseal, opened.reseal_ttl_ms) == (60_000, True, 60_000)
    assert not rotating.open_value(name, rotating.seal_value(name, fields, 60_000), 60_000).reseal
    # A TTL stretched in Redis is not sealed in anew: the new seal ends where the
    # old one did (it made a 5-minute cooldown 10 days: the new-features probe).
    stretched = rotating.open_value(name, Seal(old, wall).seal_value(name, fields, 60_000), 36_000_000)
    assert stretched.reseal_ttl_ms == 60_000
