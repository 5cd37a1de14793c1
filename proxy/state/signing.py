"""Sealing what replicas share through Redis with the fleet's key (`state.redis.signing_key`).

Without a key, whoever can publish on loopwatch's channel or write its keys
speaks for a replica (docs/replicas.md, "Who can change what"): it can cool any
client down, release one, or close a connection. With a key, every replica
seals what it publishes and what it stores with an HMAC-SHA256 under that key,
and takes nothing that is not sealed so:

* a batch on the channel starts with a line of its own, `lwsig <ms> <run>
  <seq> <mac>`: the sender's wall clock (milliseconds), its run (when its
  process started, milliseconds) and the batch's number in that run, and the
  MAC over them and the batch. A batch older or newer than MAX_SKEW is
  refused, and so is one whose (run, number) its origin already used
  (`Replays`): a batch captured off the channel cannot be played back, later
  or at once (a release replayed after the client was cooled down again, a
  failure replayed until it makes a loop);
* a cooldown key's value carries `until_ms` (the wall-clock time its TTL ends
  at when written) and `mac`, over the key's name and the rest of the value: a
  forged or altered value is skipped, and a TTL stretched in Redis (`PEXPIRE`)
  stretches the cooldown by MAX_SKEW at most (the clocks of writer and reader
  may differ by that much).

Redis cannot be kept from deleting keys or dropping messages: that is
fail-open's case already (each replica goes on deciding alone).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

SEAL = b"lwsig"
MAX_SKEW = 60.0  # seconds a batch may be older (or newer) than this replica's clock
REPLAY_WINDOW = 64  # batch numbers behind an origin's latest still taken once (reordered publishes)
MAX_ORIGINS = 1024  # origins whose latest batch numbers are remembered
RUNS_PER_ORIGIN = 4  # runs of one origin remembered (restarts within MAX_SKEW, duplicate ids)
# How far below the first number heard of a run (since subscribing) a number is
# still taken: two publishes that overtook each other just then.
REORDER_SLACK = 4


class Refused(ValueError):
    """A batch or key off the network that is not taken, and why: `reason` is
    the label of loopwatch_state_store_messages_refused_total."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Sealed(NamedTuple):
    """An opened batch: its bytes, and the run and number its sender sealed it with."""

    batch: bytes
    run: int
    seq: int


class OpenedValue(NamedTuple):
    """A cooldown key's value, opened: its milliseconds left, and whether it was
    sealed with the accepted key rather than this replica's (to seal anew)."""

    left_ms: int
    reseal: bool
    # Its TTL to seal it anew with: to the sealed end exactly (a TTL stretched
    # in Redis was otherwise sealed in for good, 5 minutes made 10 days).
    reseal_ttl_ms: int


class Seal:
    """HMAC-SHA256 seals under one key, and also opened under `accepted` (a
    rotation's other key); `wall` is the clock of the seals' times."""

    __slots__ = ("_key", "_keys", "_wall", "_run", "_seq")

    def __init__(self, key: str, wall: Callable[[], float] = time.time, *, accepted: str | None = None):
        self._key = key.encode()
        self._keys = (self._key,) if accepted is None else (self._key, accepted.encode())
        self._wall = wall
        self._run = b"%d" % int(wall() * 1000)  # a restarted replica's run is a later one
        self._seq = 0

    def _mac(self, *parts: bytes, key: bytes | None = None) -> str:
        mac = hmac.new(self._key if key is None else key, digestmod=hashlib.sha256)
        for part in parts:
            # Each part with its length: no two splits of the same bytes agree.
            mac.update(b"%d:" % len(part))
            mac.update(part)
        return mac.hexdigest()

    def _opens(self, mac: bytes, *parts: bytes) -> bytes | None:
        """The key of ours `mac` was made with over `parts`, if any."""
        for key in self._keys:
            if hmac.compare_digest(mac, self._mac(*parts, key=key).encode()):
                return key
        return None

    # --- batches on the channel ----------------------------------------------------------

    def seal_batch(self, batch: bytes) -> bytes:
        self._seq += 1
        ms, run, seq = b"%d" % int(self._wall() * 1000), self._run, b"%d" % self._seq
        return b"%s %s %s %s %s\n%s" % (SEAL, ms, run, seq, self._mac(ms, run, seq, batch).encode(), batch)

    @staticmethod
    def inner(sealed: bytes) -> bytes:
        """The batch a sealed payload carries, unchecked (to recognise one's own)."""
        return sealed.partition(b"\n")[2]

    def open_batch(self, sealed: bytes) -> Sealed:
        """The batch, if sealed under this key within MAX_SKEW of now; else
        ValueError saying why (it came off the network). Whether its run and
        number were used before is the receiver's to check (`Replays`)."""
        line, sep, batch = sealed.partition(b"\n")
        parts = line.split(b" ")
        if not sep or len(parts) != 5 or parts[0] != SEAL or not all(p.isdigit() for p in parts[1:4]):
            raise Refused("unsealed", f"expected a batch sealed with state.redis.signing_key, got {sealed[:40]!r}")
        ms, run, seq, mac = parts[1:]
        if self._opens(mac, ms, run, seq, batch) is None:
            raise Refused("bad_seal", "a batch whose seal does not match state.redis.signing_key")
        age = self._wall() - int(ms) / 1000
        if abs(age) > MAX_SKEW:
            raise Refused("clock", f"a sealed batch {age:.0f} s old: played back, or a clock off by that much")
        return Sealed(batch, int(run), int(seq))

    # --- cooldown keys -------------------------------------------------------------------

    def seal_value(self, name: str, value: dict[str, Any], ttl_ms: int) -> dict[str, Any]:
        """`value` to be stored under key `name` for `ttl_ms`, sealed."""
        sealed = {**value, "until_ms": int(self._wall() * 1000) + ttl_ms}
        return {**sealed, "mac": self._mac(name.encode(), _canonical(sealed))}

    def open_value(self, name: str, value: dict[str, Any], pttl_ms: int) -> OpenedValue:
        """The milliseconds left of the key `name` holding `value`: Redis's TTL,
        but no later than the sealed end allows, give or take MAX_SKEW (the
        writer's clock is not this one: held to the sealed end exactly, a
        reader whose clock ran 10 s ahead lost every 5 s cooldown it read); a
        TTL stretched in Redis stretches a cooldown by MAX_SKEW at most.
        Refused if the seal is missing or wrong; `reseal` if it was made with
        the accepted key (a rotation's), for the key to be sealed anew."""
        rest = dict(value)
        mac = rest.pop("mac", None)
        until = rest.get("until_ms")
        if not isinstance(mac, str) or type(until) is not int:
            raise Refused("unsealed", "a cooldown key not sealed with state.redis.signing_key")
        key = self._opens(mac.encode(), name.encode(), _canonical(rest))
        if key is None:
            raise Refused("bad_seal", "a cooldown key whose seal does not match state.redis.signing_key")
        to_end = until - int(self._wall() * 1000)
        left = min(pttl_ms, to_end + int(MAX_SKEW * 1000))
        return OpenedValue(left, reseal=key != self._key, reseal_ttl_ms=min(pttl_ms, to_end))


@dataclass(slots=True)
class RunNumbers:
    """The batch numbers heard of one run of one origin."""

    highest: int
    bits: int  # bit k: number `highest - k` came
    # Numbers below it are refused: sent before this replica heard the run (or
    # since it last subscribed), so it cannot know whether they were taken. None:
    # subscribed again; the next number heard sets it.
    floor: int | None


class Replays:
    """The batch numbers each origin used, so that none is taken twice.

    Per origin, its latest RUNS_PER_ORIGIN runs (a restart is a new run; two
    processes under one replica id are two runs, each checked on its own, not
    each other's replays), and per run the highest number seen and which of
    the REPLAY_WINDOW numbers below it came (a bit each: publishes of one
    replica may overtake each other). Refused: a number taken before, one
    further back than the window, and one below the run's floor — sent before
    this replica first heard the run, or before it last subscribed: a batch
    captured off the channel could otherwise be played back to a replica that
    started or reconnected after it went by. A run older than every one
    remembered is refused too. At most MAX_ORIGINS origins, the least recently
    heard forgotten (an origin is only remembered for a batch sealed under the
    fleet's key)."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: OrderedDict[str, dict[int, RunNumbers]] = OrderedDict()

    def fresh(self, origin: str, run: int, seq: int) -> bool:
        """Whether (run, seq) is new from `origin` (and now remembered)."""
        runs = self._seen.get(origin)
        if runs is None:
            runs = self._seen[origin] = {}
            if len(self._seen) > MAX_ORIGINS:
                self._seen.popitem(last=False)
        self._seen.move_to_end(origin)
        numbers = runs.get(run)
        if numbers is None:
            if len(runs) >= RUNS_PER_ORIGIN:
                oldest = min(runs)
                if run < oldest:
                    return False
                del runs[oldest]
            runs[run] = RunNumbers(seq, 1, seq - REORDER_SLACK)
            return True
        if numbers.floor is None:
            numbers.floor = seq - REORDER_SLACK
        if seq < numbers.floor:
            return False
        if seq > numbers.highest:
            shift = seq - numbers.highest
            numbers.bits = ((numbers.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            numbers.highest = seq
            return True
        back = numbers.highest - seq
        if back >= REPLAY_WINDOW or numbers.bits >> back & 1:
            return False
        numbers.bits |= 1 << back
        return True

    def subscribed(self) -> None:
        """This replica (re)subscribed: what went by meanwhile was not heard, so
        each run's next number heard is its floor."""
        for runs in self._seen.values():
            for numbers in runs.values():
                numbers.floor = None


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


__all__ = ["MAX_SKEW", "Refused", "Replays", "Seal", "Sealed"]
