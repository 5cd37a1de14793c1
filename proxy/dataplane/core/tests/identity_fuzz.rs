//! Fuzz targets for client identity, as proptest properties (run like those
//! of tests/fuzz.rs: `PROPTEST_CASES=200000 cargo test --release -p
//! loopwatch-dataplane-core fuzz_identity`):
//!
//! * identifying any accepted head (random X-Forwarded-For chains, identity
//!   headers, cookies, query strings and JWT-shaped tokens with random bytes
//!   in every segment) never panics, under a configuration that reads every
//!   source and one that verifies; the key is never longer than the bound
//!   allows and never holds a control character;
//! * the Python-compatible JSON reader never panics on any text;
//! * a key file of random bytes, or random bytes in PEM armour, is refused
//!   with an error, never a panic.

use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus};
use loopwatch_dataplane_core::identity::json;
use loopwatch_dataplane_core::identity::jwt::JwtSpec;
use loopwatch_dataplane_core::identity::{Identity, IdentitySpec};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn identity(verify: bool) -> Identity {
    Identity::new(&IdentitySpec {
        sources: vec![
            "header:x-user".into(),
            "cookie:session".into(),
            "query:user".into(),
            "jwt:sub".into(),
            "ip".into(),
        ],
        trusted_proxies: vec!["0.0.0.0/0".into(), "::/0".into()],
        bind_to_address: true,
        bind_verified: false,
        max_key_length: 64,
        jwt: JwtSpec {
            query_params: vec!["token".into()],
            subprotocol: true,
            verify,
            algorithms: vec!["HS256".into(), "ES256".into()],
            secret: verify.then(|| b"fuzzing-secret-of-at-least-32-bytes!".to_vec()),
            leeway: 30.0,
            ..JwtSpec::default()
        },
    })
    .expect("valid settings")
}

/// Header-value bytes llhttp accepts (no CTL but tab; obs-text allowed).
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(b" \t,;=\"[]:.%+@-_eyJ0123456789abcdefABCDEF".to_vec()),
            0x21u8..0x7F,
            0x80u8..=0xFF,
        ],
        0..80,
    )
}

fn segment() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".to_vec(),
        ),
        0..60,
    )
    .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

fn token() -> impl Strategy<Value = String> {
    (segment(), segment(), segment()).prop_map(|(h, p, s)| format!("ey{h}.ey{p}.{s}"))
}

fn query() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(b"user=token&%+abcEF019zZ".to_vec()),
        0..40,
    )
    .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

fn request(
    xff: &[u8],
    user: &[u8],
    cookie: &[u8],
    query: &str,
    token: &str,
    protocols: &[u8],
) -> Vec<u8> {
    let mut out = format!("GET /ws?{query} HTTP/1.1\r\nHost: h\r\n").into_bytes();
    for (name, value) in [
        (&b"X-Forwarded-For"[..], xff),
        (b"X-User", user),
        (b"Cookie", cookie),
        (b"Sec-WebSocket-Protocol", protocols),
    ] {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Authorization: Bearer {token}\r\n").as_bytes());
    out.extend_from_slice(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n",
    );
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_identity_never_panics_and_bounds_keys(
        xff in value(), user in value(), cookie in value(), query in query(),
        token in token(), protocols in value(), verify in any::<bool>(), v6 in any::<bool>(),
    ) {
        let data = request(&xff, &user, &cookie, &query, &token, &protocols);
        let limits = HeadLimits { max_head_size: 1 << 16 };
        if let HeadStatus::Complete(head) = parse_head(&data, &limits) {
            let peer = if v6 { "2001:db8::1" } else { "10.0.0.1" }.parse().unwrap();
            let client = identity(verify).identify(&head, peer, 1_900_000_000.0);
            let address = client.address.to_string();
            let value_len = client.key.chars().count().saturating_sub(address.chars().count() + 1);
            prop_assert!(client.key == address || value_len <= 64, "{client:?}");
            if client.address.scope.is_none() {
                prop_assert!(!client.key.chars().any(|c| c.is_control()), "{client:?}");
            }
        }
    }

    #[test]
    fn fuzz_identity_json_never_panics(text in prop::collection::vec(
        prop_oneof![
            prop::sample::select("{}[]\",:\\u0123456789abcdefDdEe.-+ntrufalsNIy".chars().map(u32::from).collect::<Vec<_>>()),
            0u32..0x11_0000,
        ],
        0..200,
    )) {
        let _ = json::loads(&text);
    }

    #[test]
    fn fuzz_identity_key_files_are_refused_cleanly(body in prop::collection::vec(any::<u8>(), 0..300), armour in any::<bool>()) {
        let pem = if armour {
            let mut out = b"-----BEGIN PUBLIC KEY-----\n".to_vec();
            out.extend(body.iter().map(|b| b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[usize::from(b % 64)]));
            out.extend_from_slice(b"\n-----END PUBLIC KEY-----\n");
            out
        } else {
            body
        };
        let spec = IdentitySpec {
            sources: vec!["jwt:sub".into(), "ip".into()],
            trusted_proxies: vec![],
            bind_to_address: true,
            bind_verified: false,
            max_key_length: 256,
            jwt: JwtSpec {
                verify: true,
                algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
                public_key_pem: Some(pem),
                ..JwtSpec::default()
            },
        };
        let _ = Identity::new(&spec);
    }
}
