//! Client identity: the key the engine tracks for an upgrade request, and the
//! client's address (docs/identity.md), exactly as the asyncio data plane this
//! one replaced computed them (its answers are the frozen vectors of
//! `tests/vectors/identity.json`).
//!
//! Pure: the configuration (sources, trusted proxies, binding, the JWT keys as
//! PEM bytes) goes in once, then `identify(head, peer, now)` answers. The clock
//! is an argument, so the shared vectors (`tests/vectors/identity.json`) can
//! hold expired and not-yet-valid tokens.
//!
//! Strings are Python's, as in the recorded answers: header values and the
//! query are latin-1 text (one char per byte), JWT claims come from
//! Python-compatible JSON ([`json`]), "whitespace" is `str.isspace`, and a
//! length is in code points.

pub mod json;
pub mod jwt;

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::head::RequestHead;
use crate::table::IpNet;
use json::{PyStr, Value};

/// A token longer than this is not a token (bounds the decoding work).
pub const MAX_TOKEN: usize = 16384;
const SUBPROTOCOL_PREFIXES: [&str; 2] = ["bearer.", "access_token."];

/// One identity source (`identity.sources`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A request header, its lower-cased name.
    Header(String),
    Cookie(String),
    Query(String),
    /// A claim of the JWT.
    Jwt(String),
    Ip,
}

impl Source {
    /// A source as the settings normalise it: `header:NAME` (NAME lower-cased
    /// here too), `cookie:NAME`, `query:NAME`, `jwt:CLAIM`, `ip`.
    pub fn parse(text: &str) -> Result<Source, String> {
        let (kind, arg) = text.split_once(':').unwrap_or((text, ""));
        let named = |make: fn(String) -> Source| {
            if arg.is_empty() {
                Err(format!("{text:?}: {kind} needs a name, e.g. {kind}:NAME"))
            } else {
                Ok(make(arg.to_owned()))
            }
        };
        match kind {
            "header" => named(|a| Source::Header(a.to_ascii_lowercase())),
            "cookie" => named(Source::Cookie),
            "query" => named(Source::Query),
            "jwt" => named(Source::Jwt),
            "ip" if arg.is_empty() => Ok(Source::Ip),
            _ => Err(format!(
                "unknown source {text:?}; expected header:NAME, cookie:NAME, query:NAME, jwt:CLAIM or ip"
            )),
        }
    }

    /// Its label (`ClientKey.source`).
    pub fn label(&self) -> String {
        match self {
            Source::Header(n) => format!("header:{n}"),
            Source::Cookie(n) => format!("cookie:{n}"),
            Source::Query(n) => format!("query:{n}"),
            Source::Jwt(n) => format!("jwt:{n}"),
            Source::Ip => "ip".to_owned(),
        }
    }
}

/// The `identity:` settings, as plain values.
#[derive(Debug, Clone)]
pub struct IdentitySpec {
    pub sources: Vec<String>,
    /// CIDRs, `ADDRESS/PREFIX`.
    pub trusted_proxies: Vec<String>,
    pub bind_to_address: bool,
    pub bind_verified: bool,
    pub max_key_length: usize,
    pub jwt: jwt::JwtSpec,
}

impl IdentitySpec {
    /// The settings without an `identity:` section: the key is the client's
    /// address (source `ip`, no trusted proxies, the defaults of
    /// config/loopwatch.yaml otherwise).
    pub fn by_address() -> IdentitySpec {
        IdentitySpec {
            sources: vec!["ip".to_owned()],
            trusted_proxies: Vec::new(),
            bind_to_address: true,
            bind_verified: false,
            max_key_length: 256,
            jwt: jwt::JwtSpec::default(),
        }
    }
}

/// The identity configuration, built once.
#[derive(Debug)]
pub struct Identity {
    sources: Vec<(Source, String)>,
    trusted: Vec<IpNet>,
    bind: bool,
    bind_verified: bool,
    max_key_length: usize,
    query_params: Vec<String>,
    subprotocol: bool,
    verifier: Option<jwt::Verifier>,
}

/// A client address: an IP (an IPv4-mapped IPv6 address as IPv4) and, for
/// IPv6, the scope Python keeps (`fe80::1%eth0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub scope: Option<String>,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(scope) => write!(f, "{}%{scope}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

impl Address {
    fn of(ip: IpAddr) -> Address {
        Address {
            ip: unmap(ip),
            scope: None,
        }
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Who the client is (`ClientKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// What the engine tracks, e.g. `alice@10.0.0.5` or `10.0.0.5`.
    pub key: String,
    /// The source that gave it (`jwt:sub`, `ip`, …).
    pub source: String,
    /// The client address (after trusted X-Forwarded-For).
    pub address: Address,
    /// `address` as text, made once (the key's, the events').
    pub address_text: String,
    /// The key is a claim of a JWT whose signature was verified.
    pub verified: bool,
}

impl Identity {
    /// Checks the settings and loads the keys; an error names what is wrong.
    pub fn new(spec: &IdentitySpec) -> Result<Identity, String> {
        if spec.sources.is_empty() {
            return Err("identity.sources: expected at least one source, e.g. ip".into());
        }
        let mut sources = Vec::with_capacity(spec.sources.len());
        for (i, text) in spec.sources.iter().enumerate() {
            if sources.last().is_some_and(|(s, _)| *s == Source::Ip) {
                return Err(format!(
                    "identity.sources[{i}]: {text:?} comes after ip, which always yields"
                ));
            }
            let source = Source::parse(text).map_err(|e| format!("identity.sources[{i}]: {e}"))?;
            let label = source.label();
            sources.push((source, label));
        }
        let trusted = spec
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, c)| {
                IpNet::parse(c).map_err(|e| format!("identity.trusted_proxies[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if spec.max_key_length < 64 {
            return Err(format!(
                "identity.max_key_length: expected at least 64, got {}",
                spec.max_key_length
            ));
        }
        let verifier = if spec.jwt.verify {
            Some(jwt::Verifier::new(&spec.jwt)?)
        } else {
            None
        };
        Ok(Identity {
            sources,
            trusted,
            bind: spec.bind_to_address,
            bind_verified: spec.bind_verified,
            max_key_length: spec.max_key_length,
            query_params: spec.jwt.query_params.clone(),
            subprotocol: spec.jwt.subprotocol,
            verifier,
        })
    }

    /// The client of a request head from `peer` at `now`, when it costs
    /// little; or, when the answer needs an asymmetric signature check of a
    /// token not remembered, that check ([`SignatureCheck`]) to run where
    /// blocking is allowed ([`Identity::check_signature`]) before
    /// [`Identity::identify_checked`] answers. Same answers as
    /// [`Identity::identify`].
    pub fn identify_cheaply(
        &self,
        head: &RequestHead<'_>,
        peer: IpAddr,
        now: f64,
    ) -> Identification {
        let defer = |_: &jwt::Verifier, token: String| Err(SignatureCheck { token, now });
        match self.resolve(head, peer, now, defer) {
            Ok(client) => Identification::Known(client),
            Err(check) => Identification::NeedsSignature(check),
        }
    }

    /// The costly part of an identification: the signature check (the
    /// token is remembered when it verifies). Blocks for up to about a
    /// millisecond: not for an async worker thread.
    pub fn check_signature(&self, check: SignatureCheck) -> CheckedSignature {
        let claims = self
            .verifier
            .as_ref()
            .and_then(|v| v.verify_costly(&check.token, check.now));
        CheckedSignature {
            token: check.token,
            now: check.now,
            claims,
        }
    }

    /// The client of the head [`Identity::identify_cheaply`] asked
    /// `checked` for (same head, same peer), at the time it was asked.
    pub fn identify_checked(
        &self,
        head: &RequestHead<'_>,
        peer: IpAddr,
        checked: &CheckedSignature,
    ) -> Client {
        let use_checked = |verifier: &jwt::Verifier, token: String| {
            Ok::<_, Infallible>(if token == checked.token {
                checked.claims.clone()
            } else {
                verifier.verify(&token, checked.now)
            })
        };
        match self.resolve(head, peer, checked.now, use_checked) {
            Ok(client) => client,
            Err(never) => match never {},
        }
    }

    /// Whether JWT signatures are verified.
    pub fn verifies(&self) -> bool {
        self.verifier.is_some()
    }

    /// How many verified tokens are remembered (at most
    /// [`jwt::VERIFIED_CACHE`]).
    pub fn remembered_tokens(&self) -> usize {
        self.verifier.as_ref().map_or(0, jwt::Verifier::remembered)
    }

    /// The client of a request head from `peer` at `now` (seconds since the
    /// Unix epoch: `exp`, `nbf` and `iat` are judged against it).
    pub fn identify(&self, head: &RequestHead<'_>, peer: IpAddr, now: f64) -> Client {
        let inline = |verifier: &jwt::Verifier, token: String| {
            Ok::<_, Infallible>(verifier.verify_costly(&token, now))
        };
        match self.resolve(head, peer, now, inline) {
            Ok(client) => client,
            Err(never) => match never {},
        }
    }

    /// `identify`, with `costly` answering a token whose signature check is
    /// asymmetric and not remembered (its claims, or `E` to stop there).
    fn resolve<E>(
        &self,
        head: &RequestHead<'_>,
        peer: IpAddr,
        now: f64,
        costly: impl FnOnce(&jwt::Verifier, String) -> Result<Option<Arc<Value>>, E>,
    ) -> Result<Client, E> {
        let mut costly = Some(costly);
        let address = self.client_address(head, peer);
        let address_text = address.to_string();
        let query = latin1(head.query);
        let mut claims: Option<(Arc<Value>, bool)> = None;
        let mut token_read = false;
        for (source, label) in &self.sources {
            let mut from_verified = false;
            let raw: Option<Raw> = match source {
                Source::Ip => break,
                Source::Jwt(claim) => {
                    if !token_read {
                        claims = self.claims(head, &query, now, &mut costly)?;
                        token_read = true;
                    }
                    claims.as_ref().and_then(|(payload, verified)| {
                        from_verified = *verified;
                        Raw::of_claim(payload.get(claim)?)
                    })
                }
                // Cookie headers are joined with "; " even as a header source.
                Source::Header(name) if name == "cookie" => cookie_header(head).map(Raw::Field),
                Source::Header(name) => header_text(head, name).map(Raw::Field),
                Source::Cookie(name) => {
                    cookie_get(cookie_header(head).as_deref(), name).map(Raw::Field)
                }
                Source::Query(name) => query_value(&query, name).map(query_raw),
            };
            let Some(raw) = raw else {
                continue;
            };
            let Some((value, hashed)) = self.clean(&raw) else {
                continue;
            };
            let bind = if from_verified {
                self.bind_verified
            } else {
                self.bind
            };
            let key = if bind {
                [value.as_str(), "@", &address_text].concat()
            } else if !hashed && like_another_key(&value) {
                // Unbound, a value must not equal another client's key: a
                // verified `sub` of "203.0.113.7" was that address's `ip` key
                // (a user put everybody there in a cooldown), "x@203.0.113.7"
                // a bound key.
                hashed_bytes(&raw.sent())
            } else {
                value
            };
            return Ok(Client {
                key,
                source: label.clone(),
                address,
                address_text,
                verified: from_verified,
            });
        }
        Ok(Client {
            key: address_text.clone(),
            source: "ip".into(),
            address,
            address_text,
            verified: false,
        })
    }

    /// The peer, or with a trusted peer the rightmost untrusted
    /// X-Forwarded-For hop (`Identifier.client_address`).
    pub fn client_address(&self, head: &RequestHead<'_>, peer: IpAddr) -> Address {
        let mut address = Address::of(peer);
        if self.trusted.is_empty() || !self.is_trusted(address.ip) {
            return address;
        }
        if let Some(xff) = head.header("x-forwarded-for") {
            let xff = latin1(&xff);
            for entry in xff.rsplit(',') {
                let Some(hop) = parse_address(entry) else {
                    break;
                };
                address = hop;
                if !self.is_trusted(address.ip) {
                    break;
                }
            }
        }
        address
    }

    /// `identity.trusted_proxies`: whose X-Forwarded-For is believed (and,
    /// in the native listener, whose connections no per-address cap counts).
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    /// Unsafe characters out, whitespace trimmed, empty is nothing; and
    /// whether the value is the hash of what was sent (trimmed): when it is
    /// too long, or lost a character within it to the cleaning ("alice\u{200b}"
    /// cleaned was "alice", and a header's UTF-8 "王" and "瑋", their bytes
    /// read as latin-1 and C1 bytes left out, were both "ç", bound or not: the
    /// injection probe). Surrounding whitespace, a tab or a line separator
    /// included, is trimmed whatever it is: it changes nobody's value. The
    /// hash is what an operator computes from the name (`printf %s NAME |
    /// sha256sum`, the admin API's hint).
    fn clean(&self, raw: &Raw) -> Option<(String, bool)> {
        let strip = raw.strip();
        let whole = |t: &str| !strip(t).chars().any(is_unsafe);
        let (text, as_sent): (String, bool) = match raw {
            Raw::Field(t) | Raw::Text(t) => {
                (t.chars().filter(|&c| !is_unsafe(c)).collect(), whole(t))
            }
            // Lone surrogates are unsafe characters: leaving them out is the cleaning.
            Raw::Claim(s) => (
                s.text.chars().filter(|&c| !is_unsafe(c)).collect(),
                s.surrogates.is_empty() && whole(&s.text),
            ),
            Raw::Int(i) => (i.clone(), true),
            Raw::Bytes(_) => {
                // No text: always their hash (`sent` trims the ASCII whitespace).
                let sent = raw.sent();
                return (!sent.is_empty()).then(|| (hashed_bytes(&sent), true));
            }
        };
        let value = strip(&text);
        if value.is_empty() {
            return None;
        }
        if !as_sent || value.chars().count() > self.max_key_length {
            return Some((hashed_bytes(&raw.sent()), true));
        }
        Some((value.to_owned(), false))
    }

    /// The JWT's claims, and whether its signature was verified; `costly`
    /// answers an asymmetric signature check of a token not remembered (it
    /// is called at most once per identification: one token per head).
    #[allow(clippy::type_complexity)]
    fn claims<E>(
        &self,
        head: &RequestHead<'_>,
        query: &str,
        now: f64,
        costly: &mut Option<impl FnOnce(&jwt::Verifier, String) -> Result<Option<Arc<Value>>, E>>,
    ) -> Result<Option<(Arc<Value>, bool)>, E> {
        let Some(token) = self.token(head, query) else {
            return Ok(None);
        };
        let verified = match &self.verifier {
            None => {
                let claims = token.split('.').nth(1).and_then(b64json);
                return Ok(claims.map(|c| (Arc::new(c), false)));
            }
            Some(verifier) => match verifier.verify_cheaply(&token, now) {
                Ok(claims) => claims,
                Err(jwt::Costly) => match costly.take() {
                    Some(answer) => answer(verifier, token)?,
                    None => verifier.verify_costly(&token, now),
                },
            },
        };
        Ok(verified.map(|c| (c, true)))
    }

    /// The first JWT-shaped candidate: the bearer token, the query parameters,
    /// then Sec-WebSocket-Protocol.
    fn token(&self, head: &RequestHead<'_>, query: &str) -> Option<String> {
        if let Some(auth) = header_text(head, "authorization") {
            // Latin-1 text: the first 7 characters are "bearer " only if ASCII.
            if auth.is_char_boundary(7) && auth[..7].eq_ignore_ascii_case("bearer ") {
                let token = py_strip(&auth[7..]);
                if jwt_shaped(token) {
                    return Some(token.to_owned());
                }
            }
        }
        if !query.is_empty() {
            for name in &self.query_params {
                if let Some(found) = query_get(query, name) {
                    if jwt_shaped(&found) {
                        return Some(found);
                    }
                }
            }
        }
        if self.subprotocol {
            if let Some(protocols) = header_text(head, "sec-websocket-protocol") {
                if !protocols.is_empty() {
                    return subprotocol_token(&protocols);
                }
            }
        }
        None
    }
}

/// [`Identity::identify_cheaply`]'s answer.
#[derive(Debug)]
pub enum Identification {
    /// Answered at once.
    Known(Client),
    /// A signature check is needed first.
    NeedsSignature(SignatureCheck),
}

/// A token's asymmetric signature check, to run with
/// [`Identity::check_signature`] (where blocking is allowed).
#[derive(Debug, Clone)]
pub struct SignatureCheck {
    token: String,
    /// The time the identification was asked at (the claims are judged at it).
    now: f64,
}

impl SignatureCheck {
    /// The check not done (it could not run): the token is not verified,
    /// as a forged one.
    pub fn not_done(self) -> CheckedSignature {
        CheckedSignature {
            token: self.token,
            now: self.now,
            claims: None,
        }
    }
}

/// A signature check's result, for [`Identity::identify_checked`].
#[derive(Debug, Clone)]
pub struct CheckedSignature {
    token: String,
    now: f64,
    /// The claims when the token verified and they are valid at `now`.
    claims: Option<Arc<Value>>,
}

impl CheckedSignature {
    /// Whether the token verified.
    pub fn verified(&self) -> bool {
        self.claims.is_some()
    }
}

/// What a source found, before cleaning.
enum Raw {
    /// A header's or a cookie's value, read as latin-1: a character per byte.
    Field(String),
    /// A query parameter's whose escapes are no UTF-8, decoded: no text, so
    /// always its hash.
    Bytes(Vec<u8>),
    /// A query parameter's, percent-decoded.
    Text(String),
    Claim(PyStr),
    /// An integer claim, as `str(int)`.
    Int(String),
}

impl Raw {
    /// A claim that is a string or an integer (not a bool, a float, …).
    fn of_claim(value: &Value) -> Option<Raw> {
        match value {
            Value::Str(s) => Some(Raw::Claim(s.clone())),
            Value::Int(i) => Some(Raw::Int(i.clone())),
            _ => None,
        }
    }

    /// How its surrounding whitespace is trimmed. A header's or a cookie's
    /// bytes, read as latin-1, lose ASCII whitespace only: their 0x85 and
    /// 0xA0 (Python's spaces U+0085 and U+00A0) are, in UTF-8, the last byte
    /// of a character such as "Å" or "à", and trimmed they made "JÅ" and "Jà"
    /// one client (the identity probe: one user's loop put the other in
    /// cooldown behind a gateway's unbound header).
    fn strip(&self) -> fn(&str) -> &str {
        match self {
            Raw::Field(_) => field_strip,
            _ => py_strip,
        }
    }

    /// The value as sent, surrounding whitespace trimmed: what a key hashed
    /// "as sent" hashes. A header's or a cookie's bytes as they came (UTF-8
    /// when the client sent UTF-8); a query parameter's or a claim's text in
    /// UTF-8 (a lone surrogate as Python's `surrogatepass` writes it).
    fn sent(&self) -> Cow<'_, [u8]> {
        match self {
            // Latin-1: each character is the byte it was read from.
            Raw::Field(t) => Cow::Owned(field_strip(t).chars().map(|c| c as u8).collect()),
            Raw::Bytes(b) => Cow::Borrowed(bytes_strip(b)),
            Raw::Text(t) | Raw::Int(t) => Cow::Borrowed(py_strip(t).as_bytes()),
            Raw::Claim(s) if s.surrogates.is_empty() => Cow::Borrowed(py_strip(&s.text).as_bytes()),
            Raw::Claim(s) => {
                // The text and its surrogates in order, then trimmed: a
                // surrogate is no whitespace, so it stops the trimming.
                let mut units: Vec<Result<char, u16>> = Vec::with_capacity(s.text.len());
                let mut pending = s.surrogates.iter().peekable();
                for (at, c) in s.text.char_indices() {
                    while let Some(&(_, unit)) = pending.next_if(|&&(o, _)| o <= at) {
                        units.push(Err(unit));
                    }
                    units.push(Ok(c));
                }
                units.extend(pending.map(|&(_, unit)| Err(unit)));
                let space = |u: &Result<char, u16>| matches!(u, Ok(c) if is_py_space(*c));
                let start = units.iter().position(|u| !space(u)).unwrap_or(units.len());
                let end = units
                    .iter()
                    .rposition(|u| !space(u))
                    .map_or(start, |i| i + 1);
                let mut out = Vec::with_capacity(s.text.len() + 3 * s.surrogates.len());
                for unit in &units[start..end] {
                    match *unit {
                        Ok(c) => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        Err(unit) => {
                            let unit = u32::from(unit);
                            out.extend_from_slice(&[
                                0xE0 | (unit >> 12) as u8,
                                0x80 | ((unit >> 6) & 0x3F) as u8,
                                0x80 | (unit & 0x3F) as u8,
                            ]);
                        }
                    }
                }
                Cow::Owned(out)
            }
        }
    }
}

/// Whether an unbound value could be another client's key: an address as an
/// `ip` key writes it, `value@address` (a bound key), or `sha256:…` (a
/// hashed one); or is no key the admin API's paths can carry (`.`, `..`).
/// `1.2.3.4:80`, `[::1]` or `user@[192.0.2.1]` are nobody's.
fn like_another_key(value: &str) -> bool {
    let address_key = |text: &str| parse_address(text).is_some_and(|a| a.to_string() == text);
    // "." and "..": as a path segment (/api/clients/{key}) a browser resolves
    // them, even escaped, and the status page could not act on such a client.
    matches!(value, "." | "..")
        || value.starts_with("sha256:")
        || address_key(value)
        || value
            .rsplit_once('@')
            .is_some_and(|(_, address)| address_key(address))
}

/// `sha256:` and the first 32 hex digits of the value's SHA-256.
#[cfg(test)]
fn hashed(value: &str) -> String {
    hashed_bytes(value.as_bytes())
}

fn hashed_bytes(value: &[u8]) -> String {
    let digest = Sha256::digest(value);
    let mut out = String::with_capacity(7 + 32);
    out.push_str("sha256:");
    for byte in &digest[..16] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Bytes as latin-1 text.
pub fn latin1(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        // ASCII (nearly every header and query) is its own latin-1.
        Ok(ascii) if ascii.is_ascii() => ascii.to_owned(),
        _ => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

fn header_text(head: &RequestHead<'_>, name: &str) -> Option<String> {
    head.header(name).map(|v| latin1(&v))
}

/// Cookie headers joined with "; " (`TextHeaders.get("cookie")`).
fn cookie_header(head: &RequestHead<'_>) -> Option<String> {
    let mut out: Option<String> = None;
    for h in head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(b"cookie"))
    {
        let value = latin1(h.value);
        out = Some(match out {
            None => value,
            Some(prev) => prev + "; " + &value,
        });
    }
    out
}

/// C0/C1 controls, invisible format characters (bidi overrides and marks,
/// zero-width, the soft hyphen, tag characters) and the line and paragraph
/// separators: a key is shown to operators (tables, logs, the status page),
/// where these split a row or make one key look like another. Lone
/// surrogates are never in a Rust string (`identity._UNSAFE_RE`).
fn is_unsafe(c: char) -> bool {
    // Controls, the line and paragraph separators, and Unicode's
    // Default_Ignorable_Code_Point set (characters shown as nothing: format
    // characters, variation selectors, the Hangul fillers, tags), whose
    // "alice\u{34f}" and "alice\u{fe0f}" were rows that read "alice".
    matches!(c,
        '\u{00}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{ad}'
        | '\u{34f}'
        | '\u{61c}'
        | '\u{115f}'..='\u{1160}'
        | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{3164}'
        | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}'
        | '\u{ffa0}'
        | '\u{fff0}'..='\u{fff8}'
        | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0000}'..='\u{e0fff}')
}

/// Python's `str.isspace` (Unicode 14, as Python 3.11's).
pub fn is_py_space(c: char) -> bool {
    matches!(c,
        '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r'
        | '\u{1c}'..='\u{1f}'
        | ' ' | '\u{85}' | '\u{a0}' | '\u{1680}'
        | '\u{2000}'..='\u{200a}'
        | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// Python's `str.strip()`.
pub fn py_strip(text: &str) -> &str {
    text.trim_matches(is_py_space)
}

/// The ASCII characters `str.strip()` trims (what a byte-string's strip trims).
fn is_ascii_py_space(c: char) -> bool {
    c.is_ascii() && is_py_space(c)
}

/// Bytes trimmed of them.
fn bytes_strip(bytes: &[u8]) -> &[u8] {
    let space = |b: &u8| is_ascii_py_space(char::from(*b));
    let start = bytes.iter().position(|b| !space(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !space(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// A header's or a cookie's bytes, read as latin-1, trimmed of them.
pub fn field_strip(text: &str) -> &str {
    text.trim_matches(is_ascii_py_space)
}

fn jwt_shaped(text: &str) -> bool {
    // Bytes, not characters: a token is ASCII, and text that is not fails below.
    if text.len() > MAX_TOKEN {
        return false;
    }
    let b64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut parts = text.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    header.starts_with("ey")
        && payload.starts_with("ey")
        && b64(header)
        && b64(payload)
        && b64(signature)
}

/// `urllib.parse.unquote_plus`: "+" is a space, %XX escapes decoded as UTF-8
/// (invalid sequences become U+FFFD, malformed escapes stay as they are) in
/// each run of ASCII; other characters are kept.
pub fn unquote_plus(text: &str) -> String {
    let text = text.replace('+', " ");
    if !text.contains('%') {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut run: Vec<u8> = Vec::new();
    let flush = |run: &mut Vec<u8>, out: &mut String| {
        if !run.is_empty() {
            out.push_str(&String::from_utf8_lossy(&unquote_to_bytes(run)));
            run.clear();
        }
    };
    for c in text.chars() {
        if c.is_ascii() {
            run.push(c as u8);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

fn unquote_to_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| char::from(b).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The first value of `name` in a raw query string, decoded (`identity._query_get`).
pub fn query_get(query: &str, name: &str) -> Option<String> {
    query_value(query, name).map(|value| {
        if value.contains(['%', '+']) {
            unquote_plus(value)
        } else {
            value.to_owned()
        }
    })
}

/// The first value of `name` in a raw query string, as it is there.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    if !query.contains(name) && !query.contains('%') {
        return None;
    }
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = if key.contains(['%', '+']) {
            Cow::Owned(unquote_plus(key))
        } else {
            Cow::Borrowed(key)
        };
        if key == name {
            return Some(value);
        }
    }
    None
}

/// A query parameter's value as `unquote_plus` decodes it; or, when its
/// escapes are no UTF-8, its decoded bytes, keyed by their hash. Decoded as
/// text they were U+FFFD each: `x%FF` and `x%FE` were one client (the
/// identity probe); read as latin-1, `x%FF` was `x%C3%BF`'s "xÿ" (new7).
fn query_raw(value: &str) -> Raw {
    if !value.contains(['%', '+']) {
        return Raw::Text(value.to_owned());
    }
    let mut bytes = Vec::with_capacity(value.len());
    let mut run: Vec<u8> = Vec::new();
    for c in value.chars() {
        match c {
            '+' => run.push(b' '),
            c if c.is_ascii() => run.push(c as u8),
            c => {
                bytes.append(&mut unquote_to_bytes(&run));
                run.clear();
                bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
    }
    bytes.append(&mut unquote_to_bytes(&run));
    match String::from_utf8(bytes) {
        Ok(text) => Raw::Text(text),
        Err(not_utf8) => Raw::Bytes(not_utf8.into_bytes()),
    }
}

/// The cookie `name` (surrounding double quotes removed).
pub fn cookie_get(header: Option<&str>, name: &str) -> Option<String> {
    let header = header.filter(|h| !h.is_empty() && h.contains(name))?;
    for part in header.split(';') {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        if field_strip(key) == name {
            let value = field_strip(value);
            let mut chars = value.chars();
            let unquoted = match (chars.next(), chars.next_back()) {
                (Some('"'), Some('"')) => chars.as_str(),
                _ => value,
            };
            return Some(unquoted.to_owned());
        }
    }
    None
}

/// A JWT in Sec-WebSocket-Protocol: an item of its own, or `bearer.<jwt>` /
/// `access_token.<jwt>` (prefix case-insensitive).
pub fn subprotocol_token(header: &str) -> Option<String> {
    for item in header.split(',') {
        let mut item = py_strip(item);
        for prefix in SUBPROTOCOL_PREFIXES {
            let cut = item
                .char_indices()
                .nth(prefix.len())
                .map_or(item.len(), |(i, _)| i);
            if item[..cut].to_lowercase() == prefix {
                item = &item[cut..];
                break;
            }
        }
        if jwt_shaped(item) {
            return Some(item.to_owned());
        }
    }
    None
}

/// base64url without padding, as Python's `a2b_base64` reads it after the
/// padding is added (`strict`: the trailing bits must be zero as well, as
/// PyJWT's canonical check wants). The text is base64url already.
pub fn b64decode(segment: &str, strict: bool) -> Option<Vec<u8>> {
    let bytes = segment.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let value = |b: u8| -> Option<u32> {
        Some(match b {
            b'A'..=b'Z' => u32::from(b - b'A'),
            b'a'..=b'z' => u32::from(b - b'a') + 26,
            b'0'..=b'9' => u32::from(b - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        })
    };
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for &b in chunk {
            acc = (acc << 6) | value(b)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&acc.to_be_bytes()[1..]),
            3 => {
                if strict && acc & 0b11 != 0 {
                    return None;
                }
                out.extend_from_slice(&(acc >> 2).to_be_bytes()[2..]);
            }
            2 => {
                if strict && acc & 0b1111 != 0 {
                    return None;
                }
                out.push((acc >> 4) as u8);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `identity._b64json`: a base64url JSON object, leniently decoded, or None.
fn b64json(segment: &str) -> Option<Value> {
    let bytes = b64decode(segment, false)?;
    let mut text = json::decode_utf8(&bytes, false)?;
    if text.first() == Some(&0xFEFF) {
        text.remove(0);
    }
    match json::loads(&text)? {
        obj @ Value::Object(_) => Some(obj),
        _ => None,
    }
}

/// An address from a peer or an X-Forwarded-For entry (`identity._parse_ip`):
/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`,
/// `fe80::1%eth0`; None when malformed.
pub fn parse_address(text: &str) -> Option<Address> {
    let text = py_strip(text);
    let text = if text.starts_with('[') {
        text.find(']').map_or("", |close| &text[1..close])
    } else if text.matches(':').count() == 1 {
        text.split_once(':').map_or(text, |(host, _)| host)
    } else {
        text
    };
    if let Ok(v4) = text.parse::<std::net::Ipv4Addr>() {
        return Some(Address::of(IpAddr::V4(v4)));
    }
    let (addr, scope) = match text.split_once('%') {
        None => (text, None),
        Some((a, s)) if is_zone(s) => (a, Some(s)),
        Some(_) => return None,
    };
    let v6: Ipv6Addr = addr.parse().ok()?;
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(Address::of(IpAddr::V4(v4)));
    }
    Some(Address {
        ip: IpAddr::V6(v6),
        scope: scope.map(str::to_owned),
    })
}

/// An IPv6 zone as an interface name or index reads (Linux: at most 15
/// characters): an X-Forwarded-For entry's zone went into the client's
/// address and key whole, past `max_key_length` and the cleaning (a zone of
/// 3 000 characters, spaces, markup). nginx's realip refuses every `%`.
fn is_zone(zone: &str) -> bool {
    (1..=15).contains(&zone.len())
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquote_as_python() {
        assert_eq!(unquote_plus("a+b%20c"), "a b c");
        assert_eq!(unquote_plus("%zz%4"), "%zz%4");
        assert_eq!(unquote_plus("%ff"), "\u{fffd}");
        assert_eq!(unquote_plus("%C3%A9é"), "éé");
    }

    #[test]
    fn addresses_as_python() {
        let text = |s: &str| parse_address(s).map(|a| a.to_string());
        assert_eq!(text("10.0.0.5:443").as_deref(), Some("10.0.0.5"));
        assert_eq!(text("[2001:DB8::0:1]:443").as_deref(), Some("2001:db8::1"));
        assert_eq!(text("::ffff:192.0.2.1").as_deref(), Some("192.0.2.1"));
        assert_eq!(text("fe80::1%eth0").as_deref(), Some("fe80::1%eth0"));
        assert_eq!(text("fe80::1%"), None);
        assert_eq!(text("fe80::1%2").as_deref(), Some("fe80::1%2"));
        assert_eq!(text(&format!("fe80::1%{}", "a".repeat(16))), None);
        assert_eq!(text("fe80::1%a b"), None);
        assert_eq!(text("fe80::1%<script>"), None);
        assert_eq!(text("fe80::1%Aé"), None);
        assert_eq!(text("010.0.0.1"), None);
        assert_eq!(text("[::1"), None);
    }

    #[test]
    fn by_address_keys_on_the_peer_address_alone() {
        let identity = Identity::new(&IdentitySpec::by_address()).expect("valid settings");
        let request = b"GET /ws?token=t HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\n\
Authorization: Bearer a.b.c\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let crate::head::HeadStatus::Complete(head) =
            crate::head::parse_head(request, &crate::head::HeadLimits::default())
        else {
            panic!("a valid head");
        };
        let client = identity.identify(&head, "::ffff:192.0.2.1".parse().unwrap(), 0.0);
        assert_eq!(client.key, "192.0.2.1");
        assert_eq!(client.source, "ip");
        assert_eq!(client.address.to_string(), "192.0.2.1");
        assert!(!client.verified);
        assert!(!identity.verifies());
    }

    /// The key `identity` gives an upgrade from 192.0.2.1 with `X-User: value`.
    fn x_user_key(identity: &Identity, value: &str) -> String {
        request_key(identity, "/ws", &format!("X-User: {value}\r\n"))
    }

    /// The key of an upgrade of `target` with `headers` (each ending CRLF) from 192.0.2.1.
    fn request_key(identity: &Identity, target: &str, headers: &str) -> String {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Upgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let crate::head::HeadStatus::Complete(head) =
            crate::head::parse_head(request.as_bytes(), &crate::head::HeadLimits::default())
        else {
            panic!("a valid head");
        };
        identity
            .identify(&head, "192.0.2.1".parse().unwrap(), 0.0)
            .key
    }

    #[test]
    fn an_unbound_value_never_equals_another_clients_key() {
        // A trusted gateway's header, unbound (as a verified claim is).
        let identity = Identity::new(&IdentitySpec {
            sources: vec!["header:x-user".to_owned(), "ip".to_owned()],
            bind_to_address: false,
            ..IdentitySpec::by_address()
        })
        .expect("valid settings");
        let key = |value: &str| x_user_key(&identity, value);
        // Values that are nobody else's key are the key, as sent.
        assert_eq!(key("alice"), "alice");
        assert_eq!(key("alice@example.com"), "alice@example.com");
        // The field's whitespace is not part of the value.
        assert_eq!(key(" alice "), "alice");
        // An address (another client's `ip` key), `value@address` (a bound
        // key), `sha256:…` (a hashed key), or a value the cleaning changed:
        // the SHA-256 of the value as sent.
        for value in [
            "203.0.113.7",
            "2001:db8::1",
            "x@203.0.113.7",
            "sha256:0123",
            ".",
            "..",
        ] {
            assert_eq!(key(value), hashed(value), "{value}");
        }
        // A value the cleaning changed: the hash of its bytes as sent (here
        // UTF-8; loopwatch reads the header as latin-1, a character a byte).
        assert_eq!(key("ali\u{200b}ce"), hashed("ali\u{200b}ce"));
        assert_eq!(key("\u{141}ukasz"), hashed("\u{141}ukasz")); // Ł: C5 81, a C1 byte
                                                                 // Forms no `ip` or bound key takes are nobody's: kept as sent.
        for value in [
            "1.2.3.4:80",
            "[::1]",
            "user@[192.0.2.1]",
            "x@10.0.0.1:443",
            "127.1",
        ] {
            assert_eq!(key(value), value);
        }
    }

    #[test]
    fn query_escapes_that_are_no_utf8_keep_their_bytes() {
        // Decoded as text, every invalid escape was U+FFFD: `x%FF` and `x%FE`
        // were one client (the identity probe). Their bytes' hash keeps them
        // apart.
        let identity = Identity::new(&IdentitySpec {
            sources: vec!["query:user".to_owned(), "ip".to_owned()],
            ..IdentitySpec::by_address()
        })
        .expect("valid settings");
        let key = |query: &str| request_key(&identity, &format!("/ws?{query}"), "");
        assert_eq!(
            key("user=x%FF"),
            format!("{}@192.0.2.1", hashed_bytes(b"x\xff"))
        );
        assert_eq!(
            key("user=x%FE"),
            format!("{}@192.0.2.1", hashed_bytes(b"x\xfe"))
        );
        assert_eq!(
            key("user=+x%FE%20"),
            format!("{}@192.0.2.1", hashed_bytes(b"x\xfe"))
        );
        // Not "xÿ", which `x%C3%BF` is (new7).
        assert_eq!(key("user=x%C3%BF"), "x\u{ff}@192.0.2.1");
        assert_eq!(
            key("user=%20%FF%20"),
            format!("{}@192.0.2.1", hashed_bytes(b"\xff"))
        );
        // Valid UTF-8 escapes are text, as before.
        assert_eq!(key("user=J%C3%A0+b"), "J\u{e0} b@192.0.2.1");
    }

    #[test]
    fn a_bound_value_the_cleaning_changed_is_its_hash_at_the_address() {
        // The default: a header bound to the address. Its bytes are read as
        // latin-1, so a UTF-8 name loses its C1 bytes: "王" (E7 8E 8B), "瑋"
        // (E7 91 8B) and "珍" (E7 8F 8D) were all "ç@address", one client
        // (the injection probe).
        let identity = Identity::new(&IdentitySpec {
            sources: vec!["header:x-user".to_owned(), "ip".to_owned()],
            ..IdentitySpec::by_address()
        })
        .expect("valid settings");
        let key = |value: &str| x_user_key(&identity, value);
        for name in [
            "王",
            "瑋",
            "珍",
            "\u{141}ukasz",
            "alice\u{34f}",
            "alice\u{fe0f}",
        ] {
            assert_eq!(key(name), format!("{}@192.0.2.1", hashed(name)), "{name}");
        }
        assert_eq!(key("M\u{fc}ller"), "M\u{c3}\u{bc}ller@192.0.2.1"); // no C1 byte: its latin-1 reading
        assert_eq!(key("alice"), "alice@192.0.2.1");
        // A name's last byte 0x85 or 0xA0 is no whitespace to trim: "JÅ" (4A
        // C3 85) and "Jà" (4A C3 A0) were both "JÃ" (the identity probe). The
        // first has a C1 byte (hashed), the second keeps its latin-1 reading.
        assert_eq!(key("J\u{c5}"), format!("{}@192.0.2.1", hashed("J\u{c5}")));
        assert_eq!(key("J\u{e0}"), "J\u{c3}\u{a0}@192.0.2.1");
        assert_eq!(key("\tJ\u{e0} "), "J\u{c3}\u{a0}@192.0.2.1");
        // Too long: the hash of the bytes as sent, as the admin API's hint computes it.
        let long = "\u{fc}".repeat(300);
        assert_eq!(key(&long), format!("{}@192.0.2.1", hashed(&long)));
    }

    #[test]
    fn a_claims_surrounding_whitespace_is_trimmed_whatever_it_is() {
        let identity = Identity::new(&IdentitySpec::by_address()).expect("valid settings");
        let claim = |text: &str, surrogates: Vec<(usize, u16)>| {
            Raw::Claim(PyStr {
                text: text.to_owned(),
                surrogates,
            })
        };
        for text in [
            "alice",
            "alice ",
            "alice\t",
            "alice\n",
            "alice\u{2028}",
            "\u{85}alice",
        ] {
            let raw = claim(text, Vec::new());
            assert_eq!(
                identity.clean(&raw),
                Some(("alice".to_owned(), false)),
                "{text:?}"
            );
            assert_eq!(&*raw.sent(), b"alice");
        }
        // Inside, a character left out is a value not as sent: its hash.
        assert_eq!(
            identity.clean(&claim("ali\tce", Vec::new())),
            Some((hashed("ali\tce"), true))
        );
        // A lone surrogate (left out) stops the trimming: its bytes as
        // `surrogatepass` writes them, the whitespace before it kept.
        let raw = claim(" al", vec![(0, 0xD800)]);
        assert_eq!(
            identity.clean(&raw),
            Some((hashed_bytes(b"\xed\xa0\x80 al"), true))
        );
        assert_eq!(&*raw.sent(), b"\xed\xa0\x80 al");
        let raw = claim("al ", vec![(3, 0xDC00)]);
        assert_eq!(&*raw.sent(), b"al \xed\xb0\x80");
        // An address with whitespace around it hashes as the address does.
        assert_eq!(&*claim(" 203.0.113.7\t", Vec::new()).sent(), b"203.0.113.7");
    }

    #[test]
    fn hash_is_pythons() {
        // hashlib.sha256(b"x" * 300).hexdigest()[:32]
        assert_eq!(hashed(&"x".repeat(300)).len(), 39);
        assert!(hashed("abc").starts_with("sha256:ba7816bf8f01cfea414140de5dae2223"));
    }
}
