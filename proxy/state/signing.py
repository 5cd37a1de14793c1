"""Sealing what replicas share through Redis with the fleet's key (`state.redis.signing_key`).

Without a key, whoever can publish on loopwatch's channel or write its keys
speaks for a replica (docs/replicas.md, "Who can change what"): it can cool any
client down, release one, or close a connection. With a key, every replica
seals what it publishes and what it stores with an HMAC-SHA256 under that key,
and takes nothing that is not sealed so:

* a batch on the channel starts with a line of its own, `lwsig <ms> <mac>`:
  the sender's wall clock (milliseconds) and the MAC over that time and the
  batch. A batch older or newer than MAX_SKEW is refused too, so one captured
  off the channel cannot be played back later (a release replayed after the
  client was cooled down again);
* a cooldown key's value carries `until_ms` (the wall-clock time its TTL ends
  at when written) and `mac`, over the key's name and the rest of the value: a
  forged or altered value is skipped, and a TTL stretched in Redis (`PEXPIRE`)
  does not stretch the cooldown.

Redis cannot be kept from deleting keys or dropping messages: that is
fail-open's case already (each replica goes on deciding alone).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

SEAL = b"lwsig"
MAX_SKEW = 60.0  # seconds a batch may be older (or newer) than this replica's clock


class Seal:
    """HMAC-SHA256 seals under one key; `wall` is the clock of the seals' times."""

    __slots__ = ("_key", "_wall")

    def __init__(self, key: str, wall: Callable[[], float] = time.time):
        self._key = key.encode()
        self._wall = wall

    def _mac(self, *parts: bytes) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            # Each part with its length: no two splits of the same bytes agree.
            mac.update(b"%d:" % len(part))
            mac.update(part)
        return mac.hexdigest()

    # --- batches on the channel ----------------------------------------------------------

    def seal_batch(self, batch: bytes) -> bytes:
        ms = b"%d" % int(self._wall() * 1000)
        return b"%s %s %s\n%s" % (SEAL, ms, self._mac(ms, batch).encode(), batch)

    @staticmethod
    def inner(sealed: bytes) -> bytes:
        """The batch a sealed payload carries, unchecked (to recognise one's own)."""
        return sealed.partition(b"\n")[2]

    def open_batch(self, sealed: bytes) -> bytes:
        """The batch, if sealed under this key within MAX_SKEW of now; else
        ValueError saying why (it came off the network)."""
        line, sep, batch = sealed.partition(b"\n")
        parts = line.split(b" ")
        if not sep or len(parts) != 3 or parts[0] != SEAL or not parts[1].isdigit():
            raise ValueError(f"expected a batch sealed with state.redis.signing_key, got {sealed[:40]!r}")
        ms, mac = parts[1], parts[2]
        if not hmac.compare_digest(mac, self._mac(ms, batch).encode()):
            raise ValueError("a batch whose seal does not match state.redis.signing_key")
        age = self._wall() - int(ms) / 1000
        if abs(age) > MAX_SKEW:
            raise ValueError(f"a sealed batch {age:.0f} s old: played back, or a clock off by that much")
        return batch

    # --- cooldown keys -------------------------------------------------------------------

    def seal_value(self, name: str, value: dict[str, Any], ttl_ms: int) -> dict[str, Any]:
        """`value` to be stored under key `name` for `ttl_ms`, sealed."""
        sealed = {**value, "until_ms": int(self._wall() * 1000) + ttl_ms}
        return {**sealed, "mac": self._mac(name.encode(), _canonical(sealed))}

    def open_value(self, name: str, value: dict[str, Any], pttl_ms: int) -> int:
        """The milliseconds left of the key `name` holding `value` (the least of
        Redis's TTL and the sealed end); ValueError if the seal is missing or
        wrong."""
        rest = dict(value)
        mac = rest.pop("mac", None)
        until = rest.get("until_ms")
        if not isinstance(mac, str) or type(until) is not int:
            raise ValueError("a cooldown key not sealed with state.redis.signing_key")
        if not hmac.compare_digest(mac.encode(), self._mac(name.encode(), _canonical(rest)).encode()):
            raise ValueError("a cooldown key whose seal does not match state.redis.signing_key")
        return min(pttl_ms, until - int(self._wall() * 1000))


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


__all__ = ["MAX_SKEW", "Seal"]
