"""proxy/dataplane/identity.py: sources, fallback, binding, trusted X-Forwarded-For, JWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from loopwatch.proxy.dataplane.heads import RequestHead
from loopwatch.proxy.dataplane.identity import (
    ClientKey,
    Identifier,
    IdentitySettings,
    JwtSettings,
    _b64json,
)
from loopwatch.proxy.sections import SECRET as SECRET_MARKER
from tests.vectors.reference import frozen_jwt_clock

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"  # ≥ 32 bytes, as HS256 wants
PEER = "203.0.113.7"


def ident(**settings: Any) -> Identifier:
    return Identifier(IdentitySettings(**settings))


def unsigned(claims: dict[str, Any]) -> str:
    """A token with a garbage signature: fine for the unverified decode."""

    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg(claims)}.c2lnbmF0dXJl"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def write_pem(tmp_path: Path, private_key: Any) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


# --- sources -----------------------------------------------------------------


def test_default_is_jwt_sub_bound_to_address_then_ip() -> None:
    idf = ident()
    assert idf.identify(bearer(unsigned({"sub": "alice"})), "", PEER) == ClientKey(
        key=f"alice@{PEER}", source="jwt:sub", address=PEER, verified=False
    )
    assert idf.identify({}, "", PEER) == ClientKey(PEER, "ip", PEER, False)


def test_header_source() -> None:
    idf = ident(sources=["header:X-User-Id", "ip"])
    assert idf.identify({"x-user-id": "u42"}, "", PEER).key == f"u42@{PEER}"
    assert idf.identify({"x-user-id": "u42"}, "", PEER).source == "header:x-user-id"


def test_cookie_source() -> None:
    idf = ident(sources=["cookie:session", "ip"])
    headers = {"cookie": 'theme=dark; session="abc123"; other=1'}
    assert idf.identify(headers, "", PEER).key == f"abc123@{PEER}"
    assert idf.identify({"cookie": "theme=dark"}, "", PEER).key == PEER


def test_query_source_decodes_escapes() -> None:
    idf = ident(sources=["query:client", "ip"])
    assert idf.identify({}, "a=1&client=tab%207&client=other", PEER).key == f"tab 7@{PEER}"
    assert idf.identify({}, "clientx=1", PEER).key == PEER


def test_jwt_other_claims_and_numeric_claim() -> None:
    idf = ident(sources=["jwt:email", "jwt:uid", "ip"])
    assert idf.identify(bearer(unsigned({"email": "a@x.org"})), "", PEER).key == f"a@x.org@{PEER}"
    uid = idf.identify(bearer(unsigned({"uid": 7})), "", PEER)
    assert (uid.key, uid.source) == (f"7@{PEER}", "jwt:uid")
    # Non-scalar or boolean claims are not identities.
    assert idf.identify(bearer(unsigned({"email": ["a"], "uid": True})), "", PEER).key == PEER


def test_order_and_fallback() -> None:
    idf = ident(sources=["header:x-user", "cookie:sid", "jwt:sub", "ip"])
    headers = {"cookie": "sid=c1", **bearer(unsigned({"sub": "alice"}))}
    assert idf.identify({"x-user": "h1", **headers}, "", PEER).source == "header:x-user"
    assert idf.identify(headers, "", PEER).source == "cookie:sid"
    assert idf.identify(bearer(unsigned({"sub": "alice"})), "", PEER).source == "jwt:sub"
    assert idf.identify({"x-user": " \x00 "}, "", PEER).source == "ip"  # empty once cleaned


def test_without_ip_in_sources_the_address_is_the_last_resort() -> None:
    key = ident(sources=["header:x-user"]).identify({}, "", PEER)
    assert key == ClientKey(PEER, "ip", PEER, False)


def test_binding_off() -> None:
    idf = ident(sources=["header:x-user", "jwt:sub", "ip"], bind_to_address=False)
    assert idf.identify({"x-user": "bob"}, "", PEER).key == "bob"
    assert idf.identify(bearer(unsigned({"sub": "alice"})), "", PEER).key == "alice"


def test_forged_claim_only_affects_keys_at_the_forgers_address() -> None:
    idf = ident()
    victim = idf.identify(bearer(unsigned({"sub": "victim"})), "", "198.51.100.1")
    forger = idf.identify(bearer(unsigned({"sub": "victim"})), "", "198.51.100.2")
    assert victim.key != forger.key
    # An "@" in the value cannot fake the address part: the suffix is always the real one.
    sneaky = idf.identify(bearer(unsigned({"sub": "victim@198.51.100.1"})), "", "198.51.100.2")
    assert sneaky.key.endswith("@198.51.100.2")


# --- sanitising and bounding ---------------------------------------------------


def test_control_and_invisible_characters_are_stripped() -> None:
    idf = ident(sources=["header:x-user", "ip"], bind_to_address=False)
    assert idf.identify({"x-user": "al\x1bice\u202e\x7f"}, "", PEER).key == "alice"


def test_lone_surrogate_in_claim_is_stripped() -> None:
    idf = ident(bind_to_address=False)
    assert idf.identify(bearer(unsigned({"sub": "bo\ud800b"})), "", PEER).key == "bob"


def test_long_value_is_hashed() -> None:
    idf = ident(sources=["header:x-user", "ip"], max_key_length=64)
    long = "x" * 65
    key = idf.identify({"x-user": long}, "", PEER).key
    value, _, address = key.rpartition("@")
    assert address == PEER
    assert value.startswith("sha256:") and len(value) == len("sha256:") + 32
    assert idf.identify({"x-user": "y" * 65}, "", PEER).key != key
    assert idf.identify({"x-user": "x" * 64}, "", PEER).key == f"{'x' * 64}@{PEER}"


# --- client address and X-Forwarded-For -------------------------------------------


def test_xff_ignored_from_untrusted_peer() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8"])
    headers = {"x-forwarded-for": "1.2.3.4"}
    assert idf.client_address(headers, PEER) == PEER
    assert ident().client_address(headers, "10.0.0.1") == "10.0.0.1"  # nothing trusted


def test_xff_from_trusted_peer() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8"])
    assert idf.client_address({"x-forwarded-for": "1.2.3.4"}, "10.0.0.1") == "1.2.3.4"
    assert idf.client_address({}, "10.0.0.1") == "10.0.0.1"  # no header: the proxy itself
    key = idf.identify(
        {"x-forwarded-for": "1.2.3.4", **bearer(unsigned({"sub": "a"}))}, "", "10.0.0.1"
    )
    assert (key.key, key.address) == ("a@1.2.3.4", "1.2.3.4")


def test_xff_multi_hop_skips_trusted_hops() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8", "192.168.1.1"])
    headers = {"x-forwarded-for": "1.2.3.4, 192.168.1.1, 10.9.9.9"}
    assert idf.client_address(headers, "10.0.0.1") == "1.2.3.4"


def test_xff_spoofed_leftmost_entries_are_not_believed() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8"])
    # The client wrote "6.6.6.6, 10.0.0.99"; our proxy appended the address it saw.
    headers = {"x-forwarded-for": "6.6.6.6, 10.0.0.99, 1.2.3.4"}
    assert idf.client_address(headers, "10.0.0.1") == "1.2.3.4"


def test_xff_malformed_entry_stops_the_walk() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8"])
    assert idf.client_address({"x-forwarded-for": "1.2.3.4, junk, 10.0.0.2"}, "10.0.0.1") == (
        "10.0.0.2"
    )
    assert idf.client_address({"x-forwarded-for": "1.2.3.4, "}, "10.0.0.1") == "10.0.0.1"


def test_xff_all_trusted_gives_the_leftmost() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8"])
    assert idf.client_address({"x-forwarded-for": "10.0.0.3, 10.0.0.2"}, "10.0.0.1") == "10.0.0.3"


def test_xff_entries_with_ports() -> None:
    idf = ident(trusted_proxies=["10.0.0.0/8"])
    assert idf.client_address({"x-forwarded-for": "1.2.3.4:5678"}, "10.0.0.1") == "1.2.3.4"
    assert idf.client_address({"x-forwarded-for": "[2001:db8::1]:443"}, "10.0.0.1") == "2001:db8::1"


def test_ipv6_normalised() -> None:
    idf = ident(trusted_proxies=["2001:db8:ffff::/48"])
    assert idf.client_address({}, "2001:DB8:0:0:0:0:0:1") == "2001:db8::1"
    assert idf.client_address({}, "::ffff:192.0.2.1") == "192.0.2.1"  # dual-stack listener
    headers = {"x-forwarded-for": "2001:0db8:0000::0002"}
    assert idf.client_address(headers, "2001:db8:ffff::1") == "2001:db8::2"


def test_non_ip_peer_kept() -> None:
    assert ident().client_address({}, "unix:/run/lw.sock") == "unix:/run/lw.sock"
    assert ident().client_address({}, "") == "unknown"


# --- where the token comes from ---------------------------------------------------


def test_jwt_from_query_params() -> None:
    idf = ident()
    token = unsigned({"sub": "q"})
    assert idf.identify({}, f"v=2&access_token={token}", PEER).key == f"q@{PEER}"
    assert idf.identify({}, f"token={token}", PEER).key == f"q@{PEER}"
    custom = ident(jwt={"query_params": ["jwt"]})
    assert custom.identify({}, f"token={token}", PEER).key == PEER
    assert custom.identify({}, f"jwt={token}", PEER).key == f"q@{PEER}"


@pytest.mark.parametrize(
    "protocols",
    [
        "bearer, {t}",
        "chat.v2, access_token, {t}",
        "{t}",
        "access_token.{t}, chat.v2",
        "Bearer.{t}",
    ],
)
def test_jwt_from_subprotocol(protocols: str) -> None:
    token = unsigned({"sub": "sp"})
    headers = {"sec-websocket-protocol": protocols.format(t=token)}
    assert ident().identify(headers, "", PEER).key == f"sp@{PEER}"
    assert ident(jwt={"subprotocol": False}).identify(headers, "", PEER).key == PEER


def test_token_precedence_header_then_query_then_subprotocol() -> None:
    headers = {"sec-websocket-protocol": f"bearer, {unsigned({'sub': 'proto'})}"}
    query = f"token={unsigned({'sub': 'query'})}"
    idf = ident(bind_to_address=False)
    assert idf.identify({**headers, **bearer(unsigned({"sub": "hdr"}))}, query, PEER).key == "hdr"
    assert idf.identify(headers, query, PEER).key == "query"
    assert idf.identify(headers, "", PEER).key == "proto"
    # An opaque (non-JWT) bearer token does not hide a JWT in the query.
    assert idf.identify({"authorization": "Bearer opaque"}, query, PEER).key == "query"


@pytest.mark.parametrize(
    "token",
    [
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWI.sig",  # payload is not valid base64/JSON
        "eyJhbGciOiJIUzI1NiJ9.eyAgICAgICAgIA.sig",  # payload is whitespace, no object
        "not-a-jwt",
        "eyJhbGciOiJIUzI1NiJ9.W10.sig",  # payload is a JSON array
    ],
)
def test_malformed_token_yields_nothing(token: str) -> None:
    assert ident().identify(bearer(token), "", PEER).key == PEER


# --- verification -------------------------------------------------------------------


def test_hs256_verified_token_is_not_bound_by_default() -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET})
    # "aud" present but no audience configured: not checked (PyJWT would reject it).
    token = jwt.encode({"sub": "alice", "aud": "some-api"}, SECRET, algorithm="HS256")
    key = idf.identify(bearer(token), "", PEER)
    assert key == ClientKey("alice", "jwt:sub", PEER, True)
    bound = ident(jwt={"verify": True, "secret": SECRET}, bind_verified=True)
    assert bound.identify(bearer(token), "", PEER).key == f"alice@{PEER}"


def test_forged_token_falls_back_to_ip() -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET})
    forged = jwt.encode({"sub": "victim"}, "x" * 32, algorithm="HS256")
    assert idf.identify(bearer(forged), "", PEER) == ClientKey(PEER, "ip", PEER, False)
    assert idf.identify(bearer(unsigned({"sub": "victim"})), "", PEER).key == PEER


def test_unsigned_alg_none_rejected() -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET})
    none = jwt.encode({"sub": "victim"}, None, algorithm="none")
    assert idf.identify(bearer(none), "", PEER).key == PEER


def test_expired_token_rejected_when_verifying() -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET, "leeway": "30s"})
    now = int(time.time())
    old = jwt.encode({"sub": "alice", "exp": now - 120}, SECRET, algorithm="HS256")
    within_leeway = jwt.encode({"sub": "alice", "exp": now - 5}, SECRET, algorithm="HS256")
    assert idf.identify(bearer(old), "", PEER).key == PEER
    assert idf.identify(bearer(within_leeway), "", PEER).key == "alice"
    # Without verification an expired token still names its user (bound, unverified).
    assert ident().identify(bearer(old), "", PEER).key == f"alice@{PEER}"


def test_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET, "leeway": "0s"})
    now = time.time()
    token = jwt.encode({"sub": "alice", "exp": int(now) + 60}, SECRET, algorithm="HS256")
    assert idf.identify(bearer(token), "", PEER).key == "alice"
    assert idf.identify(bearer(token), "", PEER).key == "alice"  # from the cache
    monkeypatch.setattr(time, "time", lambda: now + 120)
    assert idf.identify(bearer(token), "", PEER).key == PEER


def test_remembered_token_with_numeric_string_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    # PyJWT reads exp with int(), so a signed "exp": "1900000000" verifies; the
    # second use (from the cache) must give the same answer, not a TypeError.
    idf = ident(jwt={"verify": True, "secret": SECRET, "leeway": "0s"})
    now = time.time()
    token = jwt.encode({"sub": "alice", "exp": str(int(now) + 60)}, SECRET, algorithm="HS256")
    assert idf.identify(bearer(token), "", PEER) == ClientKey("alice", "jwt:sub", PEER, True)
    assert idf.identify(bearer(token), "", PEER) == ClientKey("alice", "jwt:sub", PEER, True)
    monkeypatch.setattr(time, "time", lambda: now + 120)
    assert idf.identify(bearer(token), "", PEER) == ClientKey(PEER, "ip", PEER, False)


def test_remembered_token_at_the_leeway_edge_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh verification refuses exp <= now - leeway; so must the cache.
    idf = ident(jwt={"verify": True, "secret": SECRET, "leeway": "30s"})
    exp = int(time.time()) + 60
    token = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    assert idf.identify(bearer(token), "", PEER).key == "alice"
    monkeypatch.setattr(time, "time", lambda: exp + 30 - 0.5)
    assert idf.identify(bearer(token), "", PEER).key == "alice"  # from the cache, inside
    monkeypatch.setattr(time, "time", lambda: float(exp + 30))
    assert idf.identify(bearer(token), "", PEER).key == PEER  # exp == now - leeway
    fresh = ident(jwt={"verify": True, "secret": SECRET, "leeway": "30s"})
    with frozen_jwt_clock(exp + 30):  # what the cache must agree with
        assert fresh.identify(bearer(token), "", PEER).key == PEER


def test_audience_and_issuer_checked_when_set() -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET, "audience": "ws", "issuer": "https://idp"})
    good = jwt.encode({"sub": "a", "aud": "ws", "iss": "https://idp"}, SECRET, algorithm="HS256")
    wrong_aud = jwt.encode({"sub": "a", "aud": "other", "iss": "https://idp"}, SECRET)
    wrong_iss = jwt.encode({"sub": "a", "aud": "ws", "iss": "https://evil"}, SECRET)
    assert idf.identify(bearer(good), "", PEER).verified
    assert idf.identify(bearer(wrong_aud), "", PEER).key == PEER
    assert idf.identify(bearer(wrong_iss), "", PEER).key == PEER


def test_rs256_verified(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idf = ident(jwt={"verify": True, "public_key_file": str(write_pem(tmp_path, private))})
    token = jwt.encode({"sub": "rsa-user"}, private, algorithm="RS256")
    assert idf.identify(bearer(token), "", PEER) == ClientKey("rsa-user", "jwt:sub", PEER, True)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "rsa-user"}, other, algorithm="RS256")
    assert idf.identify(bearer(forged), "", PEER).key == PEER


def test_es256_verified(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    idf = ident(jwt={"verify": True, "public_key_file": str(write_pem(tmp_path, private))})
    token = jwt.encode({"sub": "ec-user"}, private, algorithm="ES256")
    assert idf.identify(bearer(token), "", PEER) == ClientKey("ec-user", "jwt:sub", PEER, True)


def test_hs256_signed_with_the_public_key_is_rejected(tmp_path: Path) -> None:
    # Algorithm confusion: the public key is public, so it must never act as an HMAC secret.
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = write_pem(tmp_path, private)
    idf = ident(jwt={"verify": True, "public_key_file": str(pem)})
    header = {"alg": "HS256", "typ": "JWT"}
    seg = [
        base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=").decode()
        for p in (header, {"sub": "victim"})
    ]
    mac = hmac.new(pem.read_bytes(), f"{seg[0]}.{seg[1]}".encode(), hashlib.sha256).digest()
    token = f"{seg[0]}.{seg[1]}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert idf.identify(bearer(token), "", PEER).key == PEER


def test_verified_token_from_subprotocol() -> None:
    idf = ident(jwt={"verify": True, "secret": SECRET})
    token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    key = idf.identify({"sec-websocket-protocol": f"bearer, {token}"}, "", PEER)
    assert (key.key, key.verified) == ("alice", True)


# --- settings validation ------------------------------------------------------------


def test_unknown_source_kind_is_named() -> None:
    with pytest.raises(ValidationError, match="unknown source kind 'bogus'"):
        IdentitySettings(sources=["bogus:x", "ip"])


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([], "at least one source"),
        (["header:", "ip"], "needs a name"),
        (["header:bad name", "ip"], "not a valid header name"),
        (["ip:x"], "takes no argument"),
        (["ip", "jwt:sub"], "never used"),
    ],
)
def test_source_validation(sources: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        IdentitySettings(sources=sources)


def test_sources_normalised() -> None:
    assert IdentitySettings(sources=[" Header:X-Foo ", "IP"]).sources == ("header:x-foo", "ip")


def test_other_validation_errors() -> None:
    with pytest.raises(ValidationError, match="expected a CIDR"):
        IdentitySettings(trusted_proxies=["10.0.0.0/33"])
    with pytest.raises(ValidationError, match="needs `secret`"):
        IdentitySettings(jwt={"verify": True})
    with pytest.raises(ValidationError, match="no HS256"):
        IdentitySettings(jwt={"verify": True, "secret": SECRET, "algorithms": ["RS256"]})
    with pytest.raises(ValidationError, match="non-empty secret"):
        IdentitySettings(jwt={"secret": ""})
    with pytest.raises(ValidationError, match="not allowed"):
        IdentitySettings(jwt={"algorithms": ["none"]})
    with pytest.raises(ValidationError, match="unknown algorithm"):
        IdentitySettings(jwt={"algorithms": ["HS257"]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        IdentitySettings(sourcez=["ip"])
    with pytest.raises(ValidationError):
        IdentitySettings(max_key_length=8)


def test_key_file_problems_are_reported_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="public_key_file: cannot read"):
        ident(jwt={"verify": True, "public_key_file": str(tmp_path / "missing.pem")})
    # An EC key while only RS256 is allowed matches no algorithm.
    pem = str(write_pem(tmp_path, ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ValueError, match="no key matches"):
        ident(jwt={"verify": True, "public_key_file": pem, "algorithms": ["RS256"]})
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ValueError, match="not a PEM public key"):
        ident(jwt={"verify": True, "public_key_file": str(tmp_path / "junk.pem")})


def test_defaults_and_redacted_secret() -> None:
    s = IdentitySettings(jwt={"secret": SECRET})
    assert s.sources == ("jwt:sub", "ip")
    assert s.trusted_proxies == () and s.bind_to_address and not s.bind_verified
    assert s.max_key_length == 256
    assert s.jwt.query_params == ("token", "access_token") and s.jwt.subprotocol
    assert not s.jwt.verify and s.jwt.algorithms == ("HS256", "RS256", "ES256")
    assert s.jwt.leeway == 30.0
    assert s.model_dump(mode="json")["jwt"]["leeway"] == "30s"
    # Marked like every other secret setting, so proxy.config.dump_settings redacts it.
    assert any(m is SECRET_MARKER for m in JwtSettings.model_fields["secret"].metadata)
    assert SECRET not in repr(s)
    assert IdentitySettings.model_validate({"jwt": None}).jwt == JwtSettings()  # "jwt:" in YAML


def test_public_key_from_certificate(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    path = tmp_path / "idp.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    idf = ident(jwt={"verify": True, "public_key_file": str(path)})
    token = jwt.encode({"sub": "c"}, private, algorithm="ES256")
    assert idf.identify(bearer(token), "", PEER).verified


def test_errors_point_at_the_list_entry() -> None:
    # proxy.config appends FieldError.loc, so the user reads "identity.sources[1]: …".
    with pytest.raises(ValidationError) as info:
        IdentitySettings(sources=["jwt:sub", "bogus:x", "ip"])
    error = info.value.errors()[0]
    assert error["loc"] == ("sources",) and error["ctx"]["error"].loc == (1,)


# --- the fast paths match the plain ones ---------------------------------------------

header_names = st.sampled_from(
    [b"Authorization", b"authorization", b"Cookie", b"cookie", b"X-Forwarded-For", b"X-User", b"x-user",
     b"Sec-WebSocket-Protocol", b"Host"]
)
header_values = st.binary(max_size=20).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00"))


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=8))
def test_text_headers_answers_as_header_map_does(headers: list[tuple[bytes, bytes]]) -> None:
    # identity reads the head through TextHeaders, which decodes only what it is asked for
    head = RequestHead("GET", b"/", "/", "", "1.1", headers)
    full = head.header_map()
    view = head.text_headers()
    for name in ["authorization", "cookie", "x-forwarded-for", "x-user", "sec-websocket-protocol", "host", "x-absent"]:
        assert view.get(name) == full.get(name)
        assert view.get(name.upper()) == full.get(name)
    assert dict(view) == full
    assert view.get("x-\u0100") is None  # a name no head can carry


@settings(max_examples=300, deadline=None)
@given(segment=st.one_of(
    st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=8), st.integers()), max_size=4).map(
        lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    ),
    st.text(alphabet="ABCxyz019-_=+/é", max_size=20),
))
def test_payload_decode_matches_urlsafe_b64decode_and_json_loads(segment: str) -> None:
    try:
        expected = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        if not isinstance(expected, dict):
            expected = None
    except (ValueError, RecursionError):
        expected = None
    assert _b64json(segment) == expected



@pytest.mark.parametrize("verify", [False, True])
def test_json_nested_past_the_bound_is_refused_whatever_the_recursion_limit(verify: bool) -> None:
    # The C scanner's own limit is the recursion limit less the caller's depth: without
    # MAX_JSON_DEPTH the same token would be read or not depending on where it is asked
    # (and the native data plane refuses past 900 levels).
    import sys

    def nested(levels: int) -> str:
        payload = '{"a":' + "[" * levels + "]" * levels + ',"sub":"deep"}'
        seg = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
        head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
        mac = hmac.new(SECRET.encode(), f"{head}.{seg}".encode(), hashlib.sha256).digest()
        return f"{head}.{seg}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    idf = ident(jwt={"verify": True, "secret": SECRET}) if verify else ident()
    limit = sys.getrecursionlimit()
    try:
        for recursion_limit in (limit, 20_000):
            sys.setrecursionlimit(recursion_limit)
            assert idf.identify(bearer(nested(899)), "", "203.0.113.7").key.startswith("deep")
            assert idf.identify(bearer(nested(900)), "", "203.0.113.7").key == "203.0.113.7"
            assert idf.identify(bearer(nested(5000)), "", "203.0.113.7").key == "203.0.113.7"
    finally:
        sys.setrecursionlimit(limit)
