//! JWT verification with PyJWT's semantics (`Identifier._claims` with
//! `jwt.verify: true`): the key is chosen by loopwatch from the token's `alg`
//! (HS* only with the secret, RS*/PS* only with an RSA key, ESxxx only with
//! the key of its curve, EdDSA with an Ed25519 or Ed448 key), the signature
//! is checked by `jsonwebtoken` (RustCrypto; ES512 by `p521` and EdDSA with
//! Ed448 by `ed448-goldilocks`, which jsonwebtoken lacks), then PyJWT's header and claim checks: `kid` a string, `crit` only
//! `b64`, no detached payloads, `iat`/`nbf`/`exp` as `int()` reads them
//! against the clock with the leeway, `aud` and `iss` when configured, `sub`
//! and `jti` strings when present. Any failure yields nothing.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use jsonwebtoken::{Algorithm, DecodingKey};
use p521::ecdsa::signature::Verifier as _;

use super::json::{self, Value};
use super::{b64decode, b64json, is_py_space};

/// The `identity.jwt:` settings, as plain values.
#[derive(Debug, Clone, Default)]
pub struct JwtSpec {
    pub query_params: Vec<String>,
    pub subprotocol: bool,
    pub verify: bool,
    pub algorithms: Vec<String>,
    pub secret: Option<Vec<u8>>,
    /// PyJWT refuses an HMAC secret shaped like an asymmetric key (PEM, SSH,
    /// DER): every HS* token then fails. native.py asks PyJWT.
    pub secret_refused: bool,
    /// The contents of `public_key_file`.
    pub public_key_pem: Option<Vec<u8>>,
    pub audience: Option<Vec<String>>,
    pub issuer: Option<String>,
    pub leeway: f64,
}

const HMAC: [&str; 3] = ["HS256", "HS384", "HS512"];
const RSA: [&str; 6] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"];
const ALL: [&str; 13] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "ES512", "EdDSA",
];

fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The key checking one algorithm.
enum Key {
    /// jsonwebtoken's key for this algorithm.
    Jwt(DecodingKey, Algorithm),
    P521(p521::ecdsa::VerifyingKey),
    /// EdDSA with an Ed448 key: RFC 8032's pure Ed448, empty context (as
    /// `cryptography`'s `Ed448PublicKey.verify`, which PyJWT calls).
    Ed448(Box<ed448_goldilocks::VerifyingKey>),
    /// A secret PyJWT refuses to use: the token fails.
    Refused,
}

impl Key {
    /// Its signature check is asymmetric (RS*/PS*/ES*/EdDSA), which costs
    /// hundreds of microseconds (ES256 about 270 µs) to over a millisecond
    /// (Ed448); an HMAC costs about a microsecond, a refused secret nothing.
    fn costly(&self) -> bool {
        match self {
            Key::Jwt(_, alg) => {
                !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
            }
            Key::P521(_) | Key::Ed448(_) => true,
            Key::Refused => false,
        }
    }
}

/// The answer to a token needs an asymmetric signature check
/// ([`Verifier::verify_cheaply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costly;

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Jwt(_, alg) => write!(f, "Key({alg:?})"),
            Key::P521(_) => write!(f, "Key(ES512)"),
            Key::Ed448(_) => write!(f, "Key(EdDSA, Ed448)"),
            Key::Refused => write!(f, "Key(refused)"),
        }
    }
}

/// The public key in `public_key_file`, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    /// PKCS#1 RSAPublicKey DER.
    Rsa(Vec<u8>),
    /// The curve's OID and the SEC1 point.
    Ec(&'static str, Vec<u8>),
    Ed25519(Vec<u8>),
    /// The 57-byte encoded point (RFC 8032).
    Ed448(Vec<u8>),
}

/// Tokens that verified, remembered (`identity._VERIFIED_CACHE`): a looping
/// client resends one token many times a second, and a signature check costs
/// up to a few hundred microseconds. Only successes are kept, so forged tokens
/// cannot grow or churn it; a remembered token's claims are checked against
/// the clock again at every use, so the answer is the one a fresh check gives.
pub const VERIFIED_CACHE: usize = 4096;

#[derive(Debug, Default)]
struct Verified {
    claims: HashMap<Box<str>, Arc<Value>>,
    order: VecDeque<Box<str>>,
}

/// Verifies tokens; built once from the settings.
#[derive(Debug)]
pub struct Verifier {
    keys: Vec<(&'static str, Key)>,
    audience: Option<Vec<String>>,
    issuer: Option<String>,
    leeway: f64,
    verified: Mutex<Verified>,
}

impl Verifier {
    pub fn new(spec: &JwtSpec) -> Result<Verifier, String> {
        if spec.algorithms.is_empty() {
            return Err("identity.jwt.algorithms: expected at least one algorithm".into());
        }
        let mut allowed: Vec<&'static str> = Vec::new();
        for (i, alg) in spec.algorithms.iter().enumerate() {
            match ALL.iter().find(|a| **a == alg) {
                Some(a) => allowed.push(a),
                None => {
                    return Err(format!(
                        "identity.jwt.algorithms[{i}]: unknown or refused algorithm {alg:?}, expected one of {}",
                        ALL.join(", ")
                    ))
                }
            }
        }
        if !spec.leeway.is_finite() || spec.leeway < 0.0 {
            return Err(format!(
                "identity.jwt.leeway: expected seconds >= 0, got {}",
                spec.leeway
            ));
        }
        let mut keys: Vec<(&'static str, Key)> = Vec::new();
        if let Some(secret) = &spec.secret {
            if secret.is_empty() {
                return Err("identity.jwt.secret: expected a non-empty secret".into());
            }
            for alg in allowed.iter().filter(|a| HMAC.contains(a)) {
                let key = if spec.secret_refused {
                    Key::Refused
                } else {
                    let decoding = DecodingKey::from_secret(secret)
                        .map_err(|e| format!("identity.jwt.secret: {e}"))?;
                    Key::Jwt(decoding, algorithm(alg).expect("an HMAC algorithm"))
                };
                keys.push((alg, key));
            }
        }
        if let Some(pem) = &spec.public_key_pem {
            let public = read_public_key(pem)?;
            for alg in &allowed {
                let key = match (&public, *alg) {
                    (PublicKey::Rsa(der), a) if RSA.contains(&a) => Key::Jwt(
                        DecodingKey::from_rsa_der(der),
                        algorithm(a).expect("an RSA algorithm"),
                    ),
                    (PublicKey::Ec(P256, point), "ES256") => {
                        Key::Jwt(DecodingKey::from_ec_der(point), Algorithm::ES256)
                    }
                    (PublicKey::Ec(P384, point), "ES384") => {
                        Key::Jwt(DecodingKey::from_ec_der(point), Algorithm::ES384)
                    }
                    (PublicKey::Ec(P521, point), "ES512") => Key::P521(
                        p521::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| {
                            "identity.jwt.public_key_file: not a valid P-521 public key".to_owned()
                        })?,
                    ),
                    (PublicKey::Ed25519(raw), "EdDSA") => {
                        Key::Jwt(DecodingKey::from_ed_der(raw), Algorithm::EdDSA)
                    }
                    (PublicKey::Ed448(raw), "EdDSA") => Key::Ed448(Box::new(ed448_key(raw)?)),
                    _ => continue,
                };
                keys.push((alg, key));
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "identity.jwt: verify is true but no key matches any of algorithms {:?} (HS* need \
                 secret; RS*/PS* an RSA key, ES256/384/512 a P-256/384/521 key, EdDSA an Ed25519 \
                 or Ed448 key in public_key_file)",
                spec.algorithms
            ));
        }
        Ok(Verifier {
            keys,
            audience: spec.audience.clone(),
            issuer: spec.issuer.clone(),
            leeway: spec.leeway,
            verified: Mutex::default(),
        })
    }

    /// The claims of a verified token (JWT-shaped already) that are valid at
    /// `now`, or None.
    pub fn verify(&self, token: &str, now: f64) -> Option<Arc<Value>> {
        match self.verify_cheaply(token, now) {
            Ok(claims) => claims,
            Err(Costly) => self.verify_costly(token, now),
        }
    }

    /// [`Verifier::verify`]'s answer when it costs little: a remembered
    /// token (its claims checked against `now` again), an HMAC signature, or
    /// a token whose header names no key of ours (it fails before any
    /// signature check). `Err(Costly)` when the answer needs an asymmetric
    /// signature check (RS*/PS*/ES*/EdDSA: a few hundred microseconds to a
    /// millisecond), which [`Verifier::verify_costly`] does.
    pub fn verify_cheaply(&self, token: &str, now: f64) -> Result<Option<Arc<Value>>, Costly> {
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .claims
            .get(token)
            .cloned();
        if let Some(claims) = remembered {
            return Ok(self.check_claims(&claims, now).map(|()| claims));
        }
        match self.key_for(token) {
            Some(key) if key.costly() => Err(Costly),
            _ => Ok(self.verify_costly(token, now)),
        }
    }

    /// The whole check of a token that is not remembered, remembered when it
    /// verifies: the costly part, for a thread where blocking is allowed.
    pub fn verify_costly(&self, token: &str, now: f64) -> Option<Arc<Value>> {
        let claims = Arc::new(self.check(token, now)?);
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if !verified.claims.contains_key(token) {
            if verified.order.len() >= VERIFIED_CACHE {
                if let Some(oldest) = verified.order.pop_front() {
                    verified.claims.remove(&oldest);
                }
            }
            verified.order.push_back(token.into());
            verified.claims.insert(token.into(), Arc::clone(&claims));
        }
        Some(claims)
    }

    /// How many verified tokens are remembered.
    pub fn remembered(&self) -> usize {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .order
            .len()
    }

    /// The key for a token, chosen from its (unverified) header's alg, as
    /// Identifier does; None when there is none (the token fails).
    fn key_for(&self, token: &str) -> Option<&Key> {
        let (header_segment, _) = token.split_once('.')?;
        let alg = match b64json(header_segment)?.get("alg")? {
            Value::Str(s) if s.surrogates.is_empty() => s.text.clone(),
            _ => return None,
        };
        self.keys.iter().find(|(a, _)| *a == alg).map(|(_, k)| k)
    }

    /// The whole check of a token: key, header, signature, claims.
    fn check(&self, token: &str, now: f64) -> Option<Value> {
        let key = self.key_for(token)?;
        let (header_segment, _) = token.split_once('.')?;
        // PyJWT's _load: strict base64url, JSON objects.
        let (signing_input, signature) = token.rsplit_once('.')?;
        let (_, payload_segment) = signing_input.split_once('.')?;
        let header = strict_json(header_segment)?;
        check_header(&header)?;
        let payload = b64decode(payload_segment, true)?;
        let raw_signature = b64decode(signature, true)?;
        let good = match key {
            Key::Refused => false,
            Key::Jwt(key, algorithm) => {
                jsonwebtoken::crypto::verify(signature, signing_input.as_bytes(), key, *algorithm)
                    .unwrap_or(false)
            }
            Key::P521(key) => p521::ecdsa::Signature::from_slice(&raw_signature)
                .is_ok_and(|sig| key.verify(signing_input.as_bytes(), &sig).is_ok()),
            Key::Ed448(key) => ed448_goldilocks::Signature::from_slice(&raw_signature)
                .is_ok_and(|sig| key.verify_raw(&sig, signing_input.as_bytes()).is_ok()),
        };
        if !good {
            return None;
        }
        let claims = match json::loads(&json::decode_utf8(&payload, true)?)? {
            obj @ Value::Object(_) => obj,
            _ => return None,
        };
        self.check_claims(&claims, now)?;
        Some(claims)
    }

    /// PyJWT's `_validate_claims` with loopwatch's options.
    fn check_claims(&self, claims: &Value, now: f64) -> Option<()> {
        let leeway = self.leeway;
        if let Some(iat) = claims.get("iat") {
            let iat = py_int(iat)?;
            if cmp_int_float(iat, now + leeway) == Ordering::Greater {
                return None;
            }
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = py_int(nbf)?;
            if cmp_int_float(nbf, now + leeway) == Ordering::Greater {
                return None;
            }
        }
        if let Some(exp) = claims.get("exp") {
            let exp = py_int(exp)?;
            if cmp_int_float(exp, now - leeway) != Ordering::Greater {
                return None;
            }
        }
        if let Some(issuer) = &self.issuer {
            match claims.get("iss")? {
                Value::Str(iss) if iss.is(issuer) => {}
                _ => return None,
            }
        }
        if let Some(audience) = &self.audience {
            let aud = claims.get("aud").filter(|a| a.truthy())?;
            let listed: Vec<&json::PyStr> = match aud {
                Value::Str(s) => vec![s],
                Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        Value::Str(s) => Some(s),
                        _ => None,
                    })
                    .collect::<Option<_>>()?,
                _ => return None,
            };
            if !audience.iter().any(|a| listed.iter().any(|c| c.is(a))) {
                return None;
            }
        }
        for name in ["sub", "jti"] {
            if let Some(value) = claims.get(name) {
                if !matches!(value, Value::Str(_)) {
                    return None;
                }
            }
        }
        Some(())
    }
}

/// PyJWT's `_validate_headers` and its `b64` rules.
fn check_header(header: &Value) -> Option<()> {
    if let Some(kid) = header.get("kid") {
        if !matches!(kid, Value::Str(_)) {
            return None;
        }
    }
    if let Some(crit) = header.get("crit") {
        let Value::Array(items) = crit else {
            return None;
        };
        if items.is_empty() {
            return None;
        }
        for item in items {
            // Only "b64" is supported, and it must be in the header.
            if !matches!(item, Value::Str(s) if s.is("b64")) || header.get("b64").is_none() {
                return None;
            }
        }
    }
    if header.get("b64") == Some(&Value::Bool(false)) {
        return None; // a detached payload, which loopwatch never passes
    }
    Some(())
}

/// `json.loads(base64url_decode(segment))` as PyJWT does it: canonical
/// base64url, UTF-8 with surrogatepass, an object.
fn strict_json(segment: &str) -> Option<Value> {
    let bytes = b64decode(segment, true)?;
    match json::loads(&json::decode_utf8(&bytes, true)?)? {
        obj @ Value::Object(_) => Some(obj),
        _ => None,
    }
}

/// Python's `int(value)` of a claim (saturated to i128), or None where it
/// raises (None, lists, objects, NaN, infinities, strings that are not an
/// integer).
fn py_int(value: &Value) -> Option<i128> {
    match value {
        Value::Bool(b) => Some(i128::from(*b)),
        Value::Int(text) => Some(saturating_int(text)),
        Value::Float(f) if f.is_finite() => Some(if *f >= 1.7e38 {
            i128::MAX
        } else if *f <= -1.7e38 {
            i128::MIN
        } else {
            f.trunc() as i128
        }),
        Value::Str(s) if s.surrogates.is_empty() => int_of_str(&s.text),
        _ => None,
    }
}

fn saturating_int(text: &str) -> i128 {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let mut value: i128 = 0;
    for d in digits.bytes() {
        value = value
            .saturating_mul(10)
            .saturating_add(i128::from(d - b'0'));
    }
    if negative {
        -value
    } else {
        value
    }
}

/// The zeros of Unicode 14's decimal digit (Nd) blocks: `int()` reads every
/// such digit as its value.
const DECIMAL_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650,
    0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50,
    0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

fn decimal(c: char) -> Option<u8> {
    let c = u32::from(c);
    DECIMAL_ZEROS
        .iter()
        .find(|&&zero| (zero..zero + 10).contains(&c))
        .map(|zero| (c - zero) as u8)
}

/// Python's `int(text)`: whitespace around, a sign, decimal digits (any
/// script) with single underscores between them, at most 4300 digits.
fn int_of_str(text: &str) -> Option<i128> {
    let text = text.trim_matches(is_py_space);
    let (negative, body) = match text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let mut digits = String::new();
    let mut previous_underscore = true; // no leading underscore
    for c in body.chars() {
        if c == '_' {
            if previous_underscore {
                return None;
            }
            previous_underscore = true;
        } else {
            digits.push(char::from(b'0' + decimal(c)?));
            previous_underscore = false;
        }
    }
    if digits.is_empty() || previous_underscore || digits.len() > json::MAX_INT_DIGITS {
        return None;
    }
    let value = saturating_int(&digits);
    Some(if negative { -value } else { value })
}

/// Python's exact comparison of an int with a float.
fn cmp_int_float(i: i128, f: f64) -> Ordering {
    if f.is_nan() {
        return Ordering::Less; // never reached: the clock is a number
    }
    let floor = f.floor();
    if floor >= 1.7e38 {
        return Ordering::Less;
    }
    if floor < -1.7e38 {
        return Ordering::Greater;
    }
    match i.cmp(&(floor as i128)) {
        Ordering::Equal if f > floor => Ordering::Less,
        other => other,
    }
}

const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";
const P521: &str = "1.3.132.0.35";

/// The public key of a PEM file: the first certificate if it holds one
/// (as `identity._read_public_key` decides), else the first `PUBLIC KEY` or
/// `RSA PUBLIC KEY`.
fn read_public_key(pem_bytes: &[u8]) -> Result<PublicKey, String> {
    let bad = |why: &str| {
        format!("identity.jwt.public_key_file: not a PEM public key or certificate ({why})")
    };
    let blocks = pem::parse_many(pem_bytes).map_err(|e| bad(&e.to_string()))?;
    let is_cert = pem_bytes
        .windows(27)
        .any(|w| w == b"-----BEGIN CERTIFICATE-----");
    if is_cert {
        let cert = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE" || b.tag() == "X509 CERTIFICATE")
            .ok_or_else(|| bad("no certificate"))?;
        let spki = certificate_spki(cert.contents()).ok_or_else(|| bad("malformed certificate"))?;
        return spki_key(spki).ok_or_else(|| bad("unsupported key in the certificate"));
    }
    let block = blocks
        .iter()
        .find(|b| b.tag() == "PUBLIC KEY" || b.tag() == "RSA PUBLIC KEY")
        .ok_or_else(|| bad("no PUBLIC KEY block"))?;
    if block.tag() == "RSA PUBLIC KEY" {
        let (tag, _, rest) = der(block.contents()).ok_or_else(|| bad("malformed RSA key"))?;
        if tag != 0x30 || !rest.is_empty() {
            return Err(bad("malformed RSA key"));
        }
        return Ok(PublicKey::Rsa(block.contents().to_vec()));
    }
    spki_key(block.contents()).ok_or_else(|| bad("unsupported or malformed key"))
}

/// An Ed448 public key's 57 bytes as a verifying key: refused at start when
/// they are no point of the curve (or its identity), which no signature could
/// ever match.
fn ed448_key(raw: &[u8]) -> Result<ed448_goldilocks::VerifyingKey, String> {
    let bad = || "identity.jwt.public_key_file: not a valid Ed448 public key".to_owned();
    let bytes: &[u8; 57] = raw.try_into().map_err(|_| bad())?;
    ed448_goldilocks::VerifyingKey::from_bytes(bytes).map_err(|_| bad())
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for &b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

fn oid_text(bytes: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        value = (value << 7) | u64::from(b & 0x7F);
        if b & 0x80 == 0 {
            if parts.is_empty() && i < 8 {
                let first = (value / 40).min(2);
                parts.push(first);
                parts.push(value - first * 40);
            } else {
                parts.push(value);
            }
            value = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// SubjectPublicKeyInfo → the key.
fn spki_key(spki: &[u8]) -> Option<PublicKey> {
    let (tag, body, rest) = der(spki)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (tag, algorithm, rest) = der(body)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, bits, _) = der(rest)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return None;
    }
    let key = &bits[1..];
    let (tag, oid, params) = der(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    match oid_text(oid).as_str() {
        "1.2.840.113549.1.1.1" => Some(PublicKey::Rsa(key.to_vec())),
        "1.2.840.10045.2.1" => {
            let (tag, curve, _) = der(params)?;
            if tag != 0x06 {
                return None;
            }
            let curve = match oid_text(curve).as_str() {
                P256 => P256,
                P384 => P384,
                P521 => P521,
                _ => "other",
            };
            Some(PublicKey::Ec(curve, key.to_vec()))
        }
        "1.3.101.112" if key.len() == 32 => Some(PublicKey::Ed25519(key.to_vec())),
        "1.3.101.113" if key.len() == 57 => Some(PublicKey::Ed448(key.to_vec())),
        _ => None,
    }
}

/// A certificate's SubjectPublicKeyInfo (the whole element).
fn certificate_spki(cert: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = der(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = der(body)?;
    if tag != 0x30 {
        return None;
    }
    if tbs.first() == Some(&0xA0) {
        tbs = der(tbs)?.2; // [0] version
    }
    // serial, signature, issuer, validity, subject
    for _ in 0..5 {
        tbs = der(tbs)?.2;
    }
    let (_, _, after) = der(tbs)?;
    Some(&tbs[..tbs.len() - after.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_as_python() {
        assert_eq!(int_of_str(" 12 "), Some(12));
        assert_eq!(int_of_str("1_0"), Some(10));
        assert_eq!(int_of_str("1__0"), None);
        assert_eq!(int_of_str("_1"), None);
        assert_eq!(int_of_str("1_"), None);
        assert_eq!(int_of_str("-007"), Some(-7));
        assert_eq!(int_of_str("\u{661}\u{662}"), Some(12));
        assert_eq!(int_of_str("1.5"), None);
        assert_eq!(int_of_str(""), None);
        assert_eq!(int_of_str(&"1".repeat(4301)), None);
        assert_eq!(py_int(&Value::Float(1.9)), Some(1));
        assert_eq!(py_int(&Value::Float(-1.9)), Some(-1));
        assert_eq!(py_int(&Value::Float(f64::INFINITY)), None);
        assert_eq!(py_int(&Value::Null), None);
    }

    #[test]
    fn comparisons_are_exact() {
        assert_eq!(cmp_int_float(10, 10.0), Ordering::Equal);
        assert_eq!(cmp_int_float(10, 10.5), Ordering::Less);
        assert_eq!(cmp_int_float(11, 10.5), Ordering::Greater);
        assert_eq!(cmp_int_float(-11, -10.5), Ordering::Less);
        assert_eq!(cmp_int_float(i128::MAX, 1e9), Ordering::Greater);
    }
}
