//! Verified tokens and the clock: a token is judged at every use against the
//! `now` it is identified at (remembered verifications included), at the
//! leeway's exact edges as PyJWT judges them, and the memory of verified
//! tokens stays bounded.

use jsonwebtoken::{encode, EncodingKey, Header};
use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus};
use loopwatch_dataplane_core::identity::jwt::{JwtSpec, VERIFIED_CACHE};
use loopwatch_dataplane_core::identity::{Identity, IdentitySpec};
use serde_json::json;

const SECRET: &[u8] = b"identity-clock-test-secret-of-32-bytes-at-least";
const NOW: f64 = 1_900_000_000.25;

fn identity(leeway: f64) -> Identity {
    Identity::new(&IdentitySpec {
        sources: vec!["jwt:sub".into(), "ip".into()],
        trusted_proxies: vec![],
        bind_to_address: true,
        bind_verified: false,
        max_key_length: 256,
        jwt: JwtSpec {
            query_params: vec!["token".into()],
            subprotocol: true,
            verify: true,
            algorithms: vec!["HS256".into()],
            secret: Some(SECRET.to_vec()),
            leeway,
            ..JwtSpec::default()
        },
    })
    .expect("valid settings")
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .expect("encodes")
}

fn key_at(identity: &Identity, token: &str, now: f64) -> String {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let limits = HeadLimits {
        max_head_size: 1 << 20,
    };
    let HeadStatus::Complete(head) = parse_head(request.as_bytes(), &limits) else {
        panic!("a valid head");
    };
    identity
        .identify(&head, "192.0.2.1".parse().unwrap(), now)
        .key
}

#[test]
fn exp_and_nbf_at_the_leeway_edges() {
    let id = identity(30.0);
    let at = |claims| key_at(&id, &token(claims), NOW);
    let edge = NOW as i64 - 30; // now - leeway = edge + 0.25
    assert_eq!(at(json!({"sub": "a", "exp": edge})), "192.0.2.1"); // exp <= now - leeway
    assert_eq!(at(json!({"sub": "a", "exp": edge + 1})), "a");
    let early = NOW as i64 + 30; // now + leeway = early + 0.25
    assert_eq!(at(json!({"sub": "a", "nbf": early})), "a");
    assert_eq!(at(json!({"sub": "a", "nbf": early + 1})), "192.0.2.1");
    assert_eq!(at(json!({"sub": "a", "iat": early + 1})), "192.0.2.1");
}

#[test]
fn a_remembered_token_still_expires() {
    let id = identity(0.0);
    let tok = token(json!({"sub": "alice", "exp": NOW as i64 + 10}));
    assert_eq!(key_at(&id, &tok, NOW), "alice");
    assert_eq!(id.remembered_tokens(), 1);
    assert_eq!(key_at(&id, &tok, NOW + 5.0), "alice");
    assert_eq!(key_at(&id, &tok, NOW + 10.0), "192.0.2.1");
    // Forged tokens are never remembered.
    let forged = encode(
        &Header::default(),
        &json!({"sub": "alice"}),
        &EncodingKey::from_secret(b"another-secret-entirely-of-32-bytes!!").unwrap(),
    )
    .unwrap();
    assert_eq!(key_at(&id, &forged, NOW), "192.0.2.1");
    assert_eq!(id.remembered_tokens(), 1);
}

#[test]
fn the_memory_of_verified_tokens_is_bounded() {
    let id = identity(30.0);
    for i in 0..VERIFIED_CACHE + 50 {
        assert_eq!(
            key_at(&id, &token(json!({"sub": format!("u{i}")})), NOW),
            format!("u{i}")
        );
    }
    assert_eq!(id.remembered_tokens(), VERIFIED_CACHE);
}
