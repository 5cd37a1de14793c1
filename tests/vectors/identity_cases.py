"""The identity vectors' inputs: configurations, keys, tokens and request heads.

Deterministic: the RSA key's primes come from a seeded generator, the EC and
Ed25519 keys from fixed scalars and seeds, ECDSA signs deterministically (RFC
6979), PSS with a seeded salt, and the certificate's fields are fixed, so
`python -m tests.vectors.generate` rewrites the same identity.json. These are
test keys, used nowhere else.

Tokens are built by hand (not with PyJWT) so that hostile ones can be: bad
JSON, wrong padding, lying headers, forged or malleated signatures.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import random
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

# The clock of every case (seconds since the epoch; 2030-03-17): tokens are
# valid, expired or not yet valid relative to it, never to the real clock.
NOW = 1_900_000_000.25
SECRET = "loopwatch-identity-vectors-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
OTHER_SECRET = "someone-else-entirely-different-secret-0123-abcdefghijklmnopqrstuvwxyz"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _probable_prime(n: int, rng: random.Random) -> bool:
    if n < 4:
        return n in (2, 3)
    if n % 2 == 0:
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for _ in range(24):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, rng: random.Random) -> int:
    while True:
        candidate = rng.getrandbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if candidate % 65537 != 1 and _probable_prime(candidate, rng):
            return candidate


def rsa_key() -> rsa.RSAPrivateKey:
    rng = random.Random(16)
    p, q = _prime(1024, rng), _prime(1024, rng)
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return numbers.private_key()


RSA = rsa_key()
EC256 = ec.derive_private_key(0x1D_2A_3B_4C_5D_6E_7F, ec.SECP256R1())
EC384 = ec.derive_private_key(0x2E_3F_40_51_62_73_84, ec.SECP384R1())
EC521 = ec.derive_private_key(0x3F_40_51_62_73_84_95, ec.SECP521R1())
EC256_OTHER = ec.derive_private_key(0x99_88_77, ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ED448 = ed448.Ed448PrivateKey.from_private_bytes(bytes(range(57)))
# The order of the Ed448 group (RFC 8032, 5.2): a signature's S must be below it.
ED448_ORDER = 2**446 - 13818066809895115352007386748515426880336692474882178609894547503885
_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVE_BYTES = {"ES256": 32, "ES384": 48, "ES512": 66}


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def certificate_pem(key: ed25519.Ed25519PrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopwatch vectors")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(16)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=36500))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def _pss_sign(
    message: bytes, key: rsa.RSAPrivateKey, bits: str, salt_seed: int, salt_len: int | None = None
) -> bytes:
    """RSASSA-PSS (salt length = digest size) with a seeded salt, so the
    vectors are the same at every run; cryptography only salts randomly."""
    name = f"sha{bits}"
    h_len = hashlib.new(name).digest_size
    salt = random.Random(salt_seed).randbytes(h_len if salt_len is None else salt_len)
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    em_bits = n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    m_hash = hashlib.new(name, message).digest()
    h = hashlib.new(name, b"\0" * 8 + m_hash + salt).digest()
    db = b"\0" * (em_len - len(salt) - h_len - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1(h, em_len - h_len - 1, name), strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    return pow(int.from_bytes(em, "big"), d, n).to_bytes((n.bit_length() + 7) // 8, "big")


def sign(alg: str, signing_input: bytes, key: Any = None) -> bytes:
    """The JWS signature of `signing_input` under `alg` with our test key for it."""
    bits = alg[2:] if alg != "EdDSA" else ""
    if alg.startswith("HS"):
        import hmac

        secret = (key if key is not None else SECRET).encode()
        return hmac.new(secret, signing_input, hashlib.new(f"sha{bits}").name).digest()
    if alg.startswith("RS"):
        from cryptography.hazmat.primitives.asymmetric import padding

        return (key or RSA).sign(signing_input, padding.PKCS1v15(), _HASH[bits]())
    if alg.startswith("PS"):
        return _pss_sign(signing_input, key or RSA, bits, salt_seed=len(signing_input))
    if alg.startswith("ES"):
        default = {"ES256": EC256, "ES384": EC384, "ES512": EC521}[alg]
        der = (key or default).sign(
            signing_input, ec.ECDSA(_HASH[bits](), deterministic_signing=True)
        )
        r, s = decode_dss_signature(der)
        size = _CURVE_BYTES[alg]
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert alg == "EdDSA"
    return (key or ED).sign(signing_input)


def token(
    payload: dict[str, Any] | bytes,
    alg: str = "HS256",
    *,
    header: dict[str, Any] | bytes | None = None,
    key: Any = None,
    signature: bytes | None = None,
) -> str:
    """A compact JWS. A bytes header or payload is used as it is (hostile JSON)."""
    if header is None:
        header = {"alg": alg, "typ": "JWT"}
    head = (
        header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    )
    body = (
        payload
        if isinstance(payload, bytes)
        else json.dumps(payload, separators=(",", ":")).encode()
    )
    signing_input = f"{b64u(head)}.{b64u(body)}".encode()
    if signature is None:
        signature = sign(alg, signing_input, key)
    return f"{signing_input.decode()}.{b64u(signature)}"


def unsigned(payload: bytes | dict[str, Any]) -> str:
    """A token whose payload is `payload` and whose signature is junk (for
    the configurations that do not verify)."""
    return token(payload, header={"alg": "HS256"}, signature=b"junk")


# --- configurations ---------------------------------------------------------------


def _jwt(**overrides: Any) -> dict[str, Any]:
    return {
        "query_params": ["token", "access_token"],
        "subprotocol": True,
        "verify": False,
        "algorithms": ["HS256", "RS256", "ES256"],
        "secret": None,
        "public_key_pem": None,
        "audience": None,
        "issuer": None,
        "leeway": 30.0,
        **overrides,
    }


def _config(**overrides: Any) -> dict[str, Any]:
    return {
        "sources": ["jwt:sub", "ip"],
        "trusted_proxies": [],
        "bind_to_address": True,
        "bind_verified": False,
        "max_key_length": 256,
        "jwt": _jwt(),
        **overrides,
    }


def configs() -> dict[str, dict[str, Any]]:
    """Named `identity:` settings (as IdentitySettings takes them, the key
    file's contents as `public_key_pem`)."""
    return {
        "default": _config(),
        "every_source": _config(
            sources=["header:X-User", "cookie:session", "query:user", "jwt:sub", "jwt:uid", "ip"],
            trusted_proxies=[
                "10.0.0.0/8",
                "2001:db8:ffff::/48",
                "192.0.2.1",
                "10.0.0.0/255.255.0.0",
            ],
            max_key_length=64,
        ),
        "unbound_no_ip": _config(
            sources=["header:x-user", "cookie:sid", "query:u+ser", "jwt:name"],
            trusted_proxies=["0.0.0.0/0", "::/0"],
            bind_to_address=False,
            jwt=_jwt(query_params=["t"], subprotocol=False),
        ),
        # The Cookie header as a whole: repeated ones joined with "; ".
        "header_cookie": _config(sources=["header:Cookie", "ip"], bind_to_address=False),
        "hs256": _config(
            sources=["jwt:sub", "jwt:tenant", "ip"],
            trusted_proxies=["10.0.0.0/8"],
            jwt=_jwt(
                verify=True,
                algorithms=["HS256", "HS512", "RS256"],
                secret=SECRET,
                audience="loopwatch",
                issuer="https://idp.test/",
                leeway=30.0,
            ),
        ),
        "rsa": _config(
            bind_verified=True,
            jwt=_jwt(
                verify=True,
                algorithms=["RS256", "RS512", "PS256", "PS384", "ES256", "HS256"],
                public_key_pem=public_pem(RSA),
                audience=["a", "b"],
                leeway=0.0,
            ),
        ),
        # The same key as PKCS#1 ("BEGIN RSA PUBLIC KEY").
        "rsa_pkcs1": _config(
            jwt=_jwt(
                verify=True,
                algorithms=["RS256", "PS512"],
                public_key_pem=RSA.public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
                .decode(),
            ),
        ),
        "ec": _config(
            jwt=_jwt(
                verify=True,
                algorithms=["ES256", "ES384", "HS256"],
                secret=SECRET,
                public_key_pem=public_pem(EC256),
                leeway=5.5,
            ),
        ),
        "p384": _config(
            jwt=_jwt(verify=True, algorithms=["ES384", "ES256"], public_key_pem=public_pem(EC384))
        ),
        "p521": _config(
            jwt=_jwt(verify=True, algorithms=["ES512"], public_key_pem=public_pem(EC521))
        ),
        "ed25519_certificate": _config(
            jwt=_jwt(verify=True, algorithms=["EdDSA", "ES256"], public_key_pem=certificate_pem(ED))
        ),
        # EdDSA with an Ed448 key (and HS256 beside it).
        "ed448": _config(
            jwt=_jwt(
                verify=True,
                algorithms=["EdDSA", "HS256"],
                secret=SECRET,
                public_key_pem=public_pem(ED448),
                audience="loopwatch",
            )
        ),
        # PyJWT refuses an HMAC secret shaped like a key: every HS* token fails.
        "pem_shaped_secret": _config(
            jwt=_jwt(
                verify=True,
                algorithms=["HS256", "RS256"],
                secret=public_pem(RSA),
                public_key_pem=public_pem(RSA),
            )
        ),
    }


# --- request heads ----------------------------------------------------------------

PEER = "203.0.113.7"
PROXY = "10.0.0.5"


def head(target: str = "/ws", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: example.test"]
    lines += [f"{n}: {v}" for n, v in headers or []]
    lines += [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def generic_heads() -> list[tuple[str, bytes, str]]:
    """(name, head, peer) for header, cookie, query, address and cleaning."""
    out: list[tuple[str, bytes, str]] = []

    def add(name: str, data: bytes, peer: str = PEER) -> None:
        out.append((name, data, peer))

    add("nothing", head())
    for peer in (
        "::ffff:203.0.113.7",
        "2001:DB8::0:1",
        "::1",
        "0.0.0.0",
        "::",
        "fe80::1",
        PROXY,
        "192.0.2.1",
    ):
        add(f"nothing from {peer}", head(), peer)
    # Headers.
    for i, value in enumerate(
        [
            "alice",
            "  alice  ",
            "\x81al\x9fice\x9b",
            "\xc3\xa9l\xc3\xa8ve",
            "\xa0alice\xa0",
            "\x85",
            "\x85\xa0bob\ta\t",
            "a" * 64,
            "a" * 65,
            "a" * 300,
            "\xe9" * 65,
            "al@ice@198.51.100.1",
            "",
            " ",
            "\t",
            "x\u00ad",
            "\x9b31m",
            "\u00ff" * 10,
        ]
    ):
        add(f"x-user {i}", head(headers=[("X-User", value)]))
    add("x-user duplicate", head(headers=[("X-User", "a"), ("x-user", "b"), ("X-USER", "")]))
    add("x-user and other", head(headers=[("X-Userx", "no"), ("X-User-Name", "no")]))
    many = [(f"X-Noise-{i}", "n" * 50) for i in range(200)]
    add("x-user after 200 headers", head(headers=[*many, ("X-User", "last")]))
    add("x-user huge", head(headers=[("X-User", "h" * 8000)]))
    # Cookies.
    for i, value in enumerate(
        [
            "session=abc",
            'a=1; session="quoted"',
            "session=",
            "session",
            "x=1;session=2;session=3",
            'session="',
            "sess=1",
            " session = v ",
            'session=""',
            "session==x",
            "a=b; session=\x9fc",
            "sid=1; session=s p a c e",
            "session=" + "c" * 100,
            'session="unterminated',
            "SESSION=upper",
            "session\t=\ttab",
            ";;;session=semi;;",
            "session=é",
        ]
    ):
        add(f"cookie {i}", head(headers=[("Cookie", value)]))
    add("cookie split", head(headers=[("Cookie", "a=1"), ("Cookie", "session=second")]))
    add("cookie sid", head(headers=[("Cookie", "sid=xyz; session=abc")]))
    # Query strings.
    for i, query in enumerate(
        [
            "user=bob",
            "user=b%20o+b",
            "user=%E9",
            "user=%C3%A9",
            "user=%zz%4",
            "a=1&user=2&user=3",
            "us%65r=x",
            "user",
            "user=",
            "u+ser=1",
            "u%20ser=2",
            "user=%00x%7F",
            "USER=caps",
            "user=%F0%9F%98",
            "user=a%2Bb",
            "&&user=amp",
            "user=" + "q" * 300,
            "x=user&user=v",
            "user=%e2%80%8bz",
            "user=%ED%A0%80x",
            "u%2Bser=3",
        ]
    ):
        add(f"query {i}", head(f"/ws?{query}"))
    add("query absolute-form", head("http://example.test/ws?user=abs"))
    # Both a header and a cookie: the order of sources decides.
    add("header and cookie", head(headers=[("X-User", "h"), ("Cookie", "session=c; sid=s")]))
    return out


def xff_heads() -> list[tuple[str, bytes, str]]:
    out: list[tuple[str, bytes, str]] = []
    chains = [
        "1.2.3.4",
        "1.2.3.4, 10.0.0.9",
        "evil, 1.2.3.4",
        "1.2.3.4:5678",
        "[2001:db8::1]:443",
        "garbage",
        "10.1.1.1, 10.2.2.2",
        " ",
        "",
        "fe80::1%eth0",
        "01.2.3.4",
        "::ffff:1.2.3.4",
        "1.2.3.4, bad, 10.0.0.2",
        "198.51.100.9,10.0.0.1,10.0.0.2",
        "2001:db8:ffff::1, 10.0.0.3",
        "2001:DB8::0:0:1",
        "[::1",
        "[::1]",
        "1.2.3.4:5:6",
        "1.2.3.4 , 10.0.0.4 ",
        "fe80::1%",
        "fe80::1%a%b",
        "::ffff:10.0.0.7, 203.0.113.50",
        "1.2.3.256",
        "1.2.3",
        "1:2:3:4:5:6:7:8",
        "1::2:3:4:5:6:7",
        "::1.2.3.4",
        "\xa01.2.3.4\x85",
        "1.2.3.4\t",
        "192.0.2.1, 192.0.2.1",
        "::ffff:192.0.2.1",
    ]
    for i, chain in enumerate(chains):
        out.append((f"xff {i} from proxy", head(headers=[("X-Forwarded-For", chain)]), PROXY))
    out.append(("xff from untrusted peer", head(headers=[("X-Forwarded-For", "1.2.3.4")]), PEER))
    out.append(
        (
            "xff from proxy over v6",
            head(headers=[("X-Forwarded-For", "1.2.3.4")]),
            "2001:db8:ffff::9",
        )
    )
    out.append(
        ("xff from mapped proxy", head(headers=[("X-Forwarded-For", "1.2.3.4")]), "::ffff:10.0.0.5")
    )
    out.append(
        (
            "xff duplicate headers",
            head(headers=[("X-Forwarded-For", "5.6.7.8"), ("X-Forwarded-For", "10.0.0.8")]),
            PROXY,
        )
    )
    long_chain = ", ".join(f"10.9.{i // 250}.{i % 250}" for i in range(500))
    out.append(("xff 500 trusted hops", head(headers=[("X-Forwarded-For", long_chain)]), PROXY))
    out.append(
        (
            "xff 500 hops then client",
            head(headers=[("X-Forwarded-For", "7.7.7.7, " + long_chain)]),
            PROXY,
        )
    )
    out.append(
        (
            "xff with user",
            head(headers=[("X-Forwarded-For", "1.2.3.4"), ("X-User", "carol")]),
            PROXY,
        )
    )
    return out


def unverified_jwt_heads() -> list[tuple[str, bytes, str]]:
    out: list[tuple[str, bytes, str]] = []

    def bearer(name: str, tok: str, scheme: str = "Bearer ") -> None:
        out.append((name, head(headers=[("Authorization", scheme + tok)]), PEER))

    payloads: list[tuple[str, bytes]] = [
        ("sub string", b'{"sub":"alice"}'),
        ("sub int", b'{"sub":12345}'),
        ("sub negative zero", b'{"sub":-0}'),
        ("sub big int", b'{"sub":123456789012345678901234567890}'),
        ("sub 4300 digits", b'{"sub":' + b"7" * 4300 + b"}"),
        ("sub 4301 digits", b'{"sub":' + b"7" * 4301 + b"}"),
        ("sub bool", b'{"sub":true}'),
        ("sub float", b'{"sub":1.5}'),
        ("sub exp float", b'{"sub":1e3}'),
        ("sub null", b'{"sub":null}'),
        ("sub list", b'{"sub":["a"]}'),
        ("sub object", b'{"sub":{"a":1}}'),
        ("sub lone surrogate", b'{"sub":"x\\ud800y"}'),
        ("sub surrogate pair", b'{"sub":"\\ud83d\\ude00"}'),
        ("sub reversed pair", b'{"sub":"\\ude00\\ud83d"}'),
        ("sub escapes", b'{"sub":"a\\tb\\n\\u0000c\\/"}'),
        ("sub controls", b'{"sub":"\\u0085\\u200bbob\\u2066"}'),
        ("sub whitespace only", b'{"sub":" \\u3000 "}'),
        ("sub unicode space inside", b'{"sub":"a\\u2028b"}'),
        ("sub long", b'{"sub":"' + b"L" * 300 + b'"}'),
        ("sub long unicode", b'{"sub":"' + "\u00e9".encode() * 257 + b'"}'),
        ("sub raw utf8", '{"sub":"j\u00fcrgen"}'.encode()),
        ("duplicate sub", b'{"sub":"first","sub":"second"}'),
        ("uid only", b'{"uid":"u-1"}'),
        ("bom", b"\xef\xbb\xbf" + b'{"sub":"bom"}'),
        ("leading space after brace", b'{ "sub" : "spaced" }'),
        ("trailing garbage", b'{"sub":"x"} x'),
        ("trailing whitespace", b'{"sub":"x"} \n'),
        ("not json", b"{sub:x}"),
        ("raw control in string", b'{"sub":"a\x01b"}'),
        ("invalid utf8", b'{"sub":"\xff"}'),
        ("encoded surrogate", b'{"sub":"\xed\xa0\x80"}'),
        ("nan", b'{"sub":NaN,"n":Infinity}'),
        ("nested 50", b'{"a":' + b"[" * 50 + b"]" * 50 + b',"sub":"deep"}'),
        ("nested 3000", b'{"a":' + b"[" * 3000 + b"]" * 3000 + b',"sub":"deeper"}'),
        ("trailing comma", b'{"sub":"x",}'),
        ("empty object", b"{}"),
        ("number 01", b'{"sub":01}'),
        ("number 1.", b'{"sub":1.}'),
        ("bad escape", b'{"sub":"\\x"}'),
        ("short unicode escape", b'{"sub":"\\u12"}'),
        ("single quotes", b"{'sub':'x'}"),
    ]
    for name, payload in payloads:
        bearer(f"jwt {name}", unsigned(payload))
    alice = unsigned(b'{"sub":"alice"}')
    bearer("bearer lower", alice, "bearer ")
    bearer("bearer caps", alice, "BEARER ")
    bearer("bearer padded", "  " + alice + " \x85", "Bearer ")
    bearer("bearer tab", alice, "Bearer\t")
    bearer("bearer no space", alice, "Bearer")
    bearer("basic", alice, "Basic ")
    bearer("bearer not a jwt", "abc.def.ghi")
    bearer("bearer two segments", alice.rsplit(".", 1)[0])
    bearer("bearer four segments", alice + ".x")
    bearer("bearer padded base64", alice.replace(".", "=.", 1))
    bearer("bearer payload len 1 mod 4", "eyJhbGciOiJIUzI1NiJ9.eyJzd.x")
    bearer("bearer latin-1", alice + "\xe9")
    huge = unsigned(b'{"sub":"big","pad":"' + b"p" * 13000 + b'"}')
    bearer("bearer over 16384", huge)
    fits = unsigned(b'{"sub":"fits","pad":"' + b"p" * 12000 + b'"}')
    bearer("bearer just fits", fits)
    # Where else the token may be.
    out.append(("query token", head(f"/ws?token={alice}"), PEER))
    out.append(("query access_token", head(f"/ws?x=1&access_token={alice}"), PEER))
    out.append(("query t", head(f"/ws?t={alice}"), PEER))
    out.append(
        (
            "query token not jwt then access_token",
            head(f"/ws?token=nope&access_token={alice}"),
            PEER,
        )
    )
    out.append(
        (
            "bearer not jwt then query",
            head(f"/ws?token={alice}", [("Authorization", "Bearer nope")]),
            PEER,
        )
    )
    bob = unsigned(b'{"sub":"bob","uid":7,"name":"Bob"}')
    out.append(
        (
            "bearer wins over query",
            head(f"/ws?token={bob}", [("Authorization", "Bearer " + alice)]),
            PEER,
        )
    )
    for i, protocols in enumerate(
        [
            f"bearer, {alice}",
            f"access_token, {alice}",
            alice,
            f"chat.v2, {alice}",
            f"bearer.{alice}",
            f"Access_Token.{alice}",
            f"BEARER.{alice}",
            f"base64url.bearer.authorization.k8s.io.{b64u(alice.encode())}",
            f"chat, nope, {bob}, {alice}",
            f"bearer.nope, {alice}",
            " , ,",
            f"  {alice}  ",
        ]
    ):
        out.append(
            (f"subprotocol {i}", head(headers=[("Sec-WebSocket-Protocol", protocols)]), PEER)
        )
    out.append(
        (
            "subprotocol split headers",
            head(headers=[("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Protocol", alice)]),
            PEER,
        )
    )
    out.append(
        (
            "query before subprotocol",
            head(f"/ws?token={bob}", [("Sec-WebSocket-Protocol", alice)]),
            PEER,
        )
    )
    out.append(
        (
            "jwt and header",
            head(headers=[("Authorization", "Bearer " + bob), ("X-User", "hdr")]),
            PEER,
        )
    )
    out.append(
        (
            "jwt from proxy",
            head(headers=[("Authorization", "Bearer " + bob), ("X-Forwarded-For", "1.2.3.4")]),
            PROXY,
        )
    )
    return out


def _claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "alice",
        "aud": "loopwatch",
        "iss": "https://idp.test/",
        "exp": int(NOW) + 600,
        **extra,
    }


def verified_jwt_heads() -> list[tuple[str, bytes, str]]:
    """Tokens for the verifying configurations: each is right for some and
    wrong for others (another key, algorithm, audience, issuer, clock)."""
    out: list[tuple[str, bytes, str]] = []
    tokens: list[tuple[str, str]] = []
    good = _claims()
    for alg in (
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    ):
        tokens.append((f"{alg} good", token(good, alg)))
        tokens.append(
            (f"{alg} aud list", token(_claims(aud=["x", "b", "loopwatch"], sub=f"{alg}-user"), alg))
        )
    tokens += [
        ("HS256 tenant", token(_claims(sub=None, tenant="t-1"))),
        ("HS256 no sub", token({k: v for k, v in good.items() if k != "sub"} | {"tenant": 42})),
        ("HS256 other secret", token(good, key=OTHER_SECRET)),
        ("HS256 alg none", token(good, header={"alg": "none"}, signature=b"")),
        ("HS256 alg None", token(good, header={"alg": "None"}, signature=b"")),
        ("HS256 no alg", token(good, header={"typ": "JWT"})),
        ("HS256 alg int", token(good, header={"alg": 256})),
        ("HS256 alg not allowed", token(good, "HS384")),
        ("HS256 expired", token(_claims(exp=int(NOW) - 100))),
        ("HS256 expired within leeway", token(_claims(exp=int(NOW) - 29))),
        ("HS256 exp at leeway", token(_claims(exp=int(NOW) - 30))),
        ("HS256 exp now", token(_claims(exp=int(NOW)))),
        ("HS256 exp string", token(_claims(exp=str(int(NOW) + 100)))),
        ("HS256 exp string spaced", token(_claims(exp=f" {int(NOW) + 100}_0 "))),
        ("HS256 exp string arabic digits", token(_claims(exp="\u0661" * 10))),
        ("HS256 exp float", token(_claims(exp=NOW + 0.5))),
        ("HS256 exp bool", token(_claims(exp=True))),
        ("HS256 exp null", token(_claims(exp=None))),
        ("HS256 exp list", token(_claims(exp=[1]))),
        ("HS256 exp huge", token(_claims(exp=10**40))),
        (
            "HS256 exp inf",
            token(b'{"sub":"alice","aud":"loopwatch","iss":"https://idp.test/","exp":1e400}'),
        ),
        (
            "HS256 exp nan",
            token(b'{"sub":"alice","aud":"loopwatch","iss":"https://idp.test/","exp":NaN}'),
        ),
        ("HS256 nbf future", token(_claims(nbf=int(NOW) + 100))),
        ("HS256 nbf within leeway", token(_claims(nbf=int(NOW) + 30))),
        ("HS256 nbf just beyond leeway", token(_claims(nbf=int(NOW) + 31))),
        ("HS256 nbf string bad", token(_claims(nbf="soon"))),
        ("HS256 iat future", token(_claims(iat=int(NOW) + 100))),
        ("HS256 iat past", token(_claims(iat=int(NOW) - 100))),
        ("HS256 iat float", token(_claims(iat=NOW))),
        ("HS256 aud missing", token({k: v for k, v in good.items() if k != "aud"})),
        ("HS256 aud empty", token(_claims(aud=""))),
        ("HS256 aud other", token(_claims(aud="other"))),
        ("HS256 aud list with int", token(_claims(aud=["loopwatch", 1]))),
        ("HS256 aud object", token(_claims(aud={"loopwatch": 1}))),
        (
            "HS256 aud surrogate",
            token(b'{"sub":"alice","aud":"loopwatch\\ud800","iss":"https://idp.test/"}'),
        ),
        ("HS256 iss missing", token({k: v for k, v in good.items() if k != "iss"})),
        ("HS256 iss other", token(_claims(iss="https://evil.test/"))),
        ("HS256 iss int", token(_claims(iss=1))),
        ("HS256 sub int", token(_claims(sub=12345))),
        ("HS256 jti int", token(_claims(jti=1))),
        ("HS256 jti string", token(_claims(jti="j"))),
        ("HS256 kid int", token(good, header={"alg": "HS256", "kid": 1})),
        ("HS256 kid string", token(good, header={"alg": "HS256", "kid": "k1"})),
        ("HS256 crit b64 true", token(good, header={"alg": "HS256", "crit": ["b64"], "b64": True})),
        ("HS256 crit exp", token(good, header={"alg": "HS256", "crit": ["exp"], "exp": 1})),
        ("HS256 crit empty", token(good, header={"alg": "HS256", "crit": []})),
        ("HS256 crit b64 missing", token(good, header={"alg": "HS256", "crit": ["b64"]})),
        ("HS256 b64 false", token(good, header={"alg": "HS256", "b64": False})),
        ("HS256 header array", token(good, header=b'{"alg":"HS256","x":[1,2]}')),
        ("HS256 header trailing space", token(good, header=b'{"alg":"HS256"} ')),
        ("HS256 header dup alg", token(good, header=b'{"alg":"none","alg":"HS256"}')),
        (
            "HS256 payload surrogatepass",
            token(b'{"sub":"al\xed\xa0\x80ice","aud":"loopwatch","iss":"https://idp.test/"}'),
        ),
        (
            "HS256 payload bom",
            token(b'\xef\xbb\xbf{"sub":"alice","aud":"loopwatch","iss":"https://idp.test/"}'),
        ),
        ("HS256 payload array", token(b"[1]")),
        ("HS256 confusion with RSA public key", token(good, "HS256", key=public_pem(RSA))),
        ("RS256 as PS256", token(good, header={"alg": "PS256"}, signature=sign("RS256", b"x"))),
        ("RS256 signed by another key", token(good, "RS256", key=rsa_other())),
        ("ES256 other key", token(good, "ES256", key=EC256_OTHER)),
        (
            "ES256 with P-384 alg header",
            token(good, header={"alg": "ES384"}, key=EC256, signature=b"\x01" * 96),
        ),
        ("ES256 short signature", token(good, "ES256", signature=b"\x01" * 63)),
        (
            "EdDSA other key",
            token(good, "EdDSA", key=ed25519.Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)),
        ),
    ]
    # Ed448: a good token, another key, a malleated S (S + L, the same point
    # equation, refused as non-canonical), a truncated signature, and an
    # Ed25519 signature's length.
    ed448_good = token(_claims(sub="ed448-user"), "EdDSA", key=ED448)
    head_b64, body_b64, sig_b64 = ed448_good.split(".")
    raw = base64.urlsafe_b64decode(sig_b64 + "==")
    s = int.from_bytes(raw[57:], "little")
    tokens += [
        ("EdDSA Ed448 good", ed448_good),
        (
            "EdDSA Ed448 other key",
            token(good, "EdDSA", key=ed448.Ed448PrivateKey.from_private_bytes(b"\x07" * 57)),
        ),
        (
            "EdDSA Ed448 S plus L",
            f"{head_b64}.{body_b64}.{b64u(raw[:57] + (s + ED448_ORDER).to_bytes(57, 'little'))}",
        ),
        ("EdDSA Ed448 short signature", f"{head_b64}.{body_b64}.{b64u(raw[:113])}"),
        (
            "EdDSA Ed448 flipped bit",
            f"{head_b64}.{body_b64}.{b64u(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])}",
        ),
    ]
    # PSS with another salt length than the digest's (PyJWT verifies with the
    # digest's length only).
    for salt_len in (0, 20, 32, 64):
        head_b64 = b64u(b'{"alg":"PS256"}')
        claims = _claims(aud="b", sub=f"salt-{salt_len}")
        body_b64 = b64u(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{head_b64}.{body_b64}".encode()
        signature = _pss_sign(signing_input, RSA, "256", 7, salt_len)
        tokens.append(
            (f"PS256 salt length {salt_len}", f"{signing_input.decode()}.{b64u(signature)}")
        )
    # Signature tampering: a malleated ECDSA signature (s -> n - s) and a
    # non-canonical base64 tail on an otherwise good token.
    es = token(good, "ES256")
    head_b64, body_b64, sig_b64 = es.split(".")
    raw = base64.urlsafe_b64decode(sig_b64 + "==")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    s = int.from_bytes(raw[32:], "big")
    tokens.append(
        ("ES256 high s", f"{head_b64}.{body_b64}.{b64u(raw[:32] + (n - s).to_bytes(32, 'big'))}")
    )
    hs = token(good)
    tail = hs[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(tail) ^ 1]
    tokens.append(("HS256 non-canonical signature tail", hs[:-1] + sibling))
    tokens.append(("HS256 non-canonical payload tail", _noncanonical_payload(good)))
    for name, tok in tokens:
        out.append((f"verify {name}", head(headers=[("Authorization", "Bearer " + tok)]), PEER))
    out.append(("verify query token", head(f"/ws?access_token={token(good)}"), PEER))
    out.append(
        (
            "verify subprotocol token",
            head(headers=[("Sec-WebSocket-Protocol", f"bearer, {token(good, 'RS256')}")]),
            PEER,
        )
    )
    out.append(
        (
            "verify from proxy",
            head(
                headers=[("Authorization", "Bearer " + token(good)), ("X-Forwarded-For", "1.2.3.4")]
            ),
            PROXY,
        )
    )
    return out


def rsa_other() -> rsa.RSAPrivateKey:
    rng = random.Random(61)
    p, q = _prime(512, rng), _prime(512, rng)
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    ).private_key()


def _noncanonical_payload(claims: dict[str, Any]) -> str:
    """A good HS256 token whose payload segment has non-zero trailing bits
    (the same bytes leniently, not canonically): signed as sent."""
    body = b64u(json.dumps(claims, separators=(",", ":")).encode())
    while len(body) % 4 == 0:  # need leftover bits
        claims = {**claims, "p": claims.get("p", "") + "x"}
        body = b64u(json.dumps(claims, separators=(",", ":")).encode())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    body = body[:-1] + alphabet[alphabet.index(body[-1]) | 1]
    head_b64 = b64u(b'{"alg":"HS256"}')
    signing_input = f"{head_b64}.{body}".encode()
    return f"{signing_input.decode()}.{b64u(sign('HS256', signing_input))}"


def cases() -> list[tuple[str, str, bytes, str]]:
    """(config, case name, head, peer) for every configuration."""
    every = generic_heads() + xff_heads() + unverified_jwt_heads()
    verified = verified_jwt_heads()
    out = []
    for name, config in configs().items():
        heads = every + verified if config["jwt"]["verify"] else every + verified[:6]
        out.extend((name, case, data, peer) for case, data, peer in heads)
    return out
