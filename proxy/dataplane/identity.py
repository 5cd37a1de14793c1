"""Client identity: which key the engine tracks for an upgrade request.

The proxy calls `Identifier.identify` synchronously for every request head,
before admission, so the default path (`jwt:sub` without verification, then
`ip`) must stay in the low microseconds: no PyJWT, no URL-parsing helpers, and
address parsing is cached.

Anything a client sends can be forged, and a forged key could put somebody
else in a cooldown. Hence: keys from client-controlled sources are bound to the
client's address ("value@address") unless turned off, and a JWT that fails
verification yields nothing, so the key falls back to the next source.
See docs/identity.md.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .settings import HMAC_ALGORITHMS, RSA_ALGORITHMS, IdentitySettings, JwtSettings

__all__ = ["ClientKey", "Identifier"]


_EC = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass(frozen=True, slots=True)
class ClientKey:
    key: str  # what the engine tracks, e.g. "alice@10.0.0.5" or "10.0.0.5"
    source: str  # "jwt:sub", "ip", …
    address: str  # effective client address (after trusted X-Forwarded-For)
    verified: bool  # the key is a claim of a JWT whose signature was verified


@dataclass(frozen=True, slots=True)
class _Remembered:
    """A token that verified: its claims, and its `exp` read as PyJWT reads it."""

    claims: dict[str, Any]
    expires: int | None  # int(claims["exp"]); None when the token has no exp


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# C0/C1 controls, invisible format characters (bidi overrides, zero-width) and
# lone surrogates: they would let a key spoof another in logs and the admin view,
# or fail to encode as UTF-8 on its way to Redis or an exporter.
_UNSAFE_RE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
# JWS compact form; both header and payload are JSON objects, so base64url "ey…".
_JWT_RE = re.compile(r"ey[A-Za-z0-9_-]*\.ey[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_MAX_TOKEN = 16384  # bounds the decode work a client can ask for
_SUBPROTOCOL_PREFIXES = ("bearer.", "access_token.")
# A looping client resends the same token tens of times a second, and a signature
# check costs 50-120 µs: remember tokens that verified. Only successes are kept,
# so a flood of forged tokens cannot grow or churn it.
_VERIFIED_CACHE = 4096


@functools.lru_cache(maxsize=8192)
def _parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For entry, or None if malformed."""
    text = text.strip()
    if text.startswith("["):  # "[2001:db8::1]:443"
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # "10.0.0.5:443"
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; one client, one key.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=8192)
def _ip_str(ip: IPAddress) -> str:
    return str(ip)


_URLSAFE = bytes.maketrans(b"-_", b"+/")
_JSON_SPACE = " \t\n\r"
# The C scanner json.loads ends up in.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set by JSONDecoder.__init__; typeshed omits it


# Deeper JSON is refused, as the native data plane refuses it
# (core/src/identity/json.rs MAX_DEPTH): the C scanner's own limit is the
# recursion limit minus the caller's stack depth, so without a bound of its own
# a token nested ~900-1000 deep would be read or not depending on the call site.
MAX_JSON_DEPTH = 900


def _too_deep(text: str) -> bool:
    """Whether `text` nests arrays/objects deeper than MAX_JSON_DEPTH (outside
    strings). Scans only when there are that many brackets at all."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _payload_too_deep(segment: str) -> bool:
    """Whether a token segment's JSON nests past MAX_JSON_DEPTH (structure only:
    brackets, quotes and backslashes are ASCII, never inside a UTF-8 sequence)."""
    try:
        raw = binascii.a2b_base64((segment + "=" * (-len(segment) % 4)).encode("ascii").translate(_URLSAFE))
    except (ValueError, UnicodeEncodeError):
        return False  # not base64: PyJWT refuses it on its own
    return _too_deep(raw.decode("latin-1"))


def _b64json(segment: str) -> dict[str, Any] | None:
    """What json.loads(base64.urlsafe_b64decode(segment)) gives, if a dict, else
    None — without their Python layers (this runs for every upgrade with a token)."""
    try:
        text = binascii.a2b_base64((segment + "=" * (-len(segment) % 4)).encode("ascii").translate(_URLSAFE)).decode()
        if text.startswith("\ufeff"):
            text = text[1:]  # json.loads takes bytes with a UTF-8 BOM
        if _too_deep(text):
            return None
        start = len(text) - len(text.lstrip(_JSON_SPACE))
        obj, end = _scan_json(text, start)
    except (ValueError, RecursionError, StopIteration):  # binascii, Unicode, JSON
        return None
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        return None  # extra data after the value
    return obj if isinstance(obj, dict) else None


def _jwt_shaped(text: str) -> bool:
    return len(text) <= _MAX_TOKEN and _JWT_RE.fullmatch(text) is not None


def _query_get(query: str, name: str) -> str | None:
    """First value of `name` in a raw query string (a few times cheaper than parse_qsl)."""
    if name not in query and "%" not in query:
        return None
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if key == name:
            return unquote_plus(value) if "%" in value or "+" in value else value
    return None


def _cookie_get(header: str | None, name: str) -> str | None:
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def _subprotocol_token(header: str) -> str | None:
    """A JWT in Sec-WebSocket-Protocol, which browsers can set.

    Shapes: the token as an item of its own ("bearer, <jwt>", "access_token, <jwt>",
    or just "<jwt>"), or prefixed in one item ("bearer.<jwt>", "access_token.<jwt>").
    """
    for item in header.split(","):
        item = item.strip()
        for prefix in _SUBPROTOCOL_PREFIXES:
            if item[: len(prefix)].lower() == prefix:
                item = item[len(prefix) :]
                break
        if _jwt_shaped(item):
            return item
    return None


class Identifier:
    """Turns a request head into a ClientKey. Keys and networks are loaded once."""

    def __init__(self, settings: IdentitySettings):
        self._sources = [(s.partition(":")[0], s.partition(":")[2], s) for s in settings.sources]
        self._trusted = [
            ipaddress.ip_network(c.strip(), strict=False) for c in settings.trusted_proxies
        ]
        # Per-instance cache: the XFF walk asks about the same few proxy addresses.
        self._is_trusted = functools.lru_cache(maxsize=4096)(self._in_trusted)
        self._bind = settings.bind_to_address
        self._bind_verified = settings.bind_verified
        self._max = settings.max_key_length
        js = settings.jwt
        self._query_params = js.query_params
        self._subprotocol = js.subprotocol
        self._keys: dict[str, Any] = _load_keys(js) if js.verify else {}
        self._verified: dict[str, _Remembered] = {}  # token -> what verified, oldest first
        self._leeway = js.leeway
        self._decode_kwargs: dict[str, Any] = {
            "audience": js.audience,
            "issuer": js.issuer,
            "leeway": js.leeway,
            # PyJWT rejects any token with "aud" when no audience is given; unset means unchecked.
            "options": {"verify_aud": js.audience is not None},
        }

    def identify(self, headers: Mapping[str, str], query: str, peer: str) -> ClientKey:
        address = self.client_address(headers, peer)
        claims: dict[str, Any] | None = None
        verified = False
        token_read = False
        for kind, arg, label in self._sources:
            if kind == "ip":
                return ClientKey(address, "ip", address, False)
            raw: object = None
            from_verified = False
            if kind == "jwt":
                if not token_read:  # several jwt:CLAIM sources share one decode
                    claims, verified = self._claims(headers, query)
                    token_read = True
                if claims is not None:
                    raw = claims.get(arg)
                    from_verified = verified
            elif kind == "header":
                raw = headers.get(arg)
            elif kind == "cookie":
                raw = _cookie_get(headers.get("cookie"), arg)
            else:
                raw = _query_get(query, arg)
            value = self._clean(raw)
            if value is None:
                continue
            if self._bind_verified if from_verified else self._bind:
                value = f"{value}@{address}"
            return ClientKey(value, label, address, from_verified)
        # Every source came up empty and ip was not listed: the address is all we have.
        return ClientKey(address, "ip", address, False)

    def client_address(self, headers: Mapping[str, str], peer: str) -> str:
        """The peer, or with a trusted peer the rightmost untrusted X-Forwarded-For hop."""
        ip = _parse_ip(peer)
        if ip is None:  # not an IP socket (e.g. a Unix socket): keep what we were given
            return _UNSAFE_RE.sub("", peer) or "unknown"
        if not self._trusted or not self._is_trusted(ip):
            return _ip_str(ip)
        xff = headers.get("x-forwarded-for")
        if xff:
            # Each trusted hop appends the address it saw, so read from the right;
            # entries left of the first untrusted hop are whatever the client wrote.
            for entry in reversed(xff.split(",")):
                hop = _parse_ip(entry)
                if hop is None:
                    break
                ip = hop
                if not self._is_trusted(ip):
                    break
        return _ip_str(ip)

    def _in_trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._trusted)

    def _clean(self, raw: object) -> str | None:
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            return None  # absent, or a claim that is not a scalar identifier
        value = raw if isinstance(raw, str) else str(raw)
        if not value.isprintable():
            value = _UNSAFE_RE.sub("", value)
        value = value.strip()
        if not value:
            return None
        if len(value) > self._max:  # keeps per-client state bounded whatever clients send
            value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:32]
        return value

    def _token(self, headers: Mapping[str, str], query: str) -> str | None:
        auth = headers.get("authorization")
        if auth and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
            if _jwt_shaped(token):
                return token
        if query:
            for name in self._query_params:
                found = _query_get(query, name)
                if found and _jwt_shaped(found):
                    return found
        if self._subprotocol:
            protocols = headers.get("sec-websocket-protocol")
            if protocols:
                return _subprotocol_token(protocols)
        return None

    def _claims(self, headers: Mapping[str, str], query: str) -> tuple[dict[str, Any] | None, bool]:
        token = self._token(headers, query)
        if token is None:
            return None, False
        if not self._keys:  # verify is off: read the payload, trust nothing
            return _b64json(token.split(".")[1]), False
        cached = self._verified.get(token)
        if cached is not None:
            # The test a fresh verification makes (PyJWT: expired if exp <= now - leeway).
            if cached.expires is None or cached.expires > time.time() - self._leeway:
                return cached.claims, True
            del self._verified[token]
            return None, False
        header = _b64json(token.partition(".")[0])
        alg = header.get("alg") if header else None
        if not isinstance(alg, str):
            return None, False
        key = self._keys.get(alg)
        if key is None:  # an algorithm we have no key for, or did not allow
            return None, False
        if _payload_too_deep(token.split(".")[1]):
            return None, False  # PyJWT's json.loads would answer by the recursion limit
        try:
            claims = pyjwt.decode(token, key, algorithms=[alg], **self._decode_kwargs)
        except (pyjwt.PyJWTError, ValueError, TypeError):
            return None, False  # forged, expired, wrong audience …: nothing from this source
        expires: int | None = None
        if "exp" in claims:
            try:  # PyJWT accepted int(exp): a number, or a numeric string such as "1900000000"
                expires = int(claims["exp"])
            except (ValueError, TypeError, OverflowError):
                return None, False  # not reachable with PyJWT's exp check; never trust it blindly
        if len(self._verified) >= _VERIFIED_CACHE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Remembered(claims, expires)
        return claims, True


def _load_keys(settings: JwtSettings) -> dict[str, Any]:
    """Algorithm -> key, only for allowed algorithms that have a matching key.

    Picking the key by algorithm ourselves also rules out the classic confusion
    attack (an HS256 token "signed" with the RSA public key).
    """
    keys: dict[str, Any] = {}
    if settings.secret is not None:
        secret = settings.secret.encode()
        keys.update({alg: secret for alg in settings.algorithms if alg in HMAC_ALGORITHMS})
    if settings.public_key_file is not None:
        key = _read_public_key(settings.public_key_file)
        for alg in settings.algorithms:
            if (
                (alg in RSA_ALGORITHMS and isinstance(key, rsa.RSAPublicKey))
                or (
                    alg in _EC
                    and isinstance(key, ec.EllipticCurvePublicKey)
                    and isinstance(key.curve, _EC[alg])
                )
                or (
                    alg == "EdDSA"
                    and isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
                )
            ):
                keys[alg] = key
    if not keys:
        raise ValueError(
            "identity.jwt: verify is true but no key matches any of algorithms "
            f"{settings.algorithms} (HS* need secret; RS*/PS* an RSA key, ES256/384/512 "
            "a P-256/384/521 key, EdDSA an Ed25519/Ed448 key in public_key_file)"
        )
    return keys


def _read_public_key(path: Path) -> Any:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"identity.jwt.public_key_file: cannot read {path}: {exc.strerror}"
        ) from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(
            f"identity.jwt.public_key_file: {path} is not a PEM public key or certificate ({exc})"
        ) from None
