"""Allow and deny lists: exact client keys, or CIDRs matched against an address.

A key is "sub@1.2.3.4" (identity bound to the address) or "1.2.3.4" (keyed by
address); a CIDR entry matches the address part of the key, written as identity
writes addresses, or the attempt's peer address. Parsing addresses costs a microsecond or two, so a list without
CIDRs never parses anything, and a list with CIDRs remembers its answer per
address text (a bounded table: a looping client asks about the same address
tens of times a second).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_of(key: str) -> str:
    """The address part of a key: after the last "@" (the whole of an ``ip``
    key). An address only in the one spelling identity writes (``_parse``)."""
    return key.rpartition("@")[2]


def key_address(key: str) -> str | None:
    """The client address a key was made with (an ``ip`` key, or the part of a
    bound key after its last "@", as identity writes it); None for an unbound
    key, whose text says nothing of where its client is. Never an IPv4-mapped
    address or one with a zone: identity writes the first as IPv4, and keeps
    the text of an unbound value that looks like either as it came (the
    new-changes probe: `a1@::ffff:7f00:2` charged its lines to 127.0.0.2)."""
    text = address_of(key)
    ip = _parse(text)
    if ip is None or (isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped is not None or ip.scope_id)):
        return None
    return text


def _parse(text: str) -> Address | None:
    """The address ``text`` is when identity wrote it: any other spelling
    (``[10.9.9.9]``, ``2001:DB8::1``) is a value the client wrote itself, an
    unbound key's, and put the client on an allow list (the injection probe)."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip if str(ip) == text else None


# Address texts whose CIDR answer is remembered; the table starts over when full,
# so a flood of distinct addresses costs bounded memory and only re-parsing.
_MEMO_SIZE = 4096


class AccessList:
    __slots__ = ("keys", "networks", "_memo")

    def __init__(self, entries: Iterable[str]) -> None:
        keys: set[str] = set()
        networks: list[Network] = []
        for entry in entries:
            if "/" in entry:
                networks.append(ipaddress.ip_network(entry, strict=False))
            else:
                keys.add(entry)
        self.keys = frozenset(keys)
        self.networks = tuple(networks)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.keys or self.networks)

    def matches(self, key: str, addr: str = "") -> bool:
        if key in self.keys:
            return True
        if not self.networks:
            return False
        return self._in_networks(address_of(key)) or (bool(addr) and self._in_networks(addr))

    def _in_networks(self, text: str) -> bool:
        hit = self._memo.get(text)
        if hit is None:
            ip = _parse(text)
            hit = ip is not None and any(ip in net for net in self.networks)
            memo = self._memo
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[text] = hit
        return hit
