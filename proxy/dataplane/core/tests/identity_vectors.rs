//! Parity with the client identity of the Python data plane this one replaced:
//! the request heads of `tests/vectors/identity.json` (recorded from it, and
//! frozen since it was deleted) identified here under the same configurations,
//! as native.py configures the listener, at the vectors' clock. Every case
//! must give the same answer.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;

use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus, RequestHead};
use loopwatch_dataplane_core::identity::jwt::JwtSpec;
use loopwatch_dataplane_core::identity::{Client, Identification, Identity, IdentitySpec};
use serde_json::Value;

use common::{latin1, latin1_opt, load};

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// `native.identity_spec`'s arguments, as the vectors hold them.
fn spec(native: &Value) -> IdentitySpec {
    IdentitySpec {
        sources: strings(&native["sources"]),
        trusted_proxies: strings(&native["trusted_proxies"]),
        bind_to_address: native["bind_to_address"].as_bool().unwrap(),
        bind_verified: native["bind_verified"].as_bool().unwrap(),
        max_key_length: native["max_key_length"].as_u64().unwrap() as usize,
        jwt: JwtSpec {
            query_params: strings(&native["query_params"]),
            subprotocol: native["subprotocol"].as_bool().unwrap(),
            verify: native["verify"].as_bool().unwrap(),
            algorithms: strings(&native["algorithms"]),
            secret: latin1_opt(&native["secret"]),
            secret_refused: native["secret_refused"].as_bool().unwrap(),
            public_key_pem: latin1_opt(&native["public_key_pem"]),
            audience: (!native["audience"].is_null()).then(|| strings(&native["audience"])),
            issuer: native["issuer"].as_str().map(str::to_owned),
            leeway: native["leeway"].as_f64().unwrap(),
        },
    }
}

#[test]
fn identity_vectors_give_pythons_answers() {
    replay(|identity, head, peer, now| identity.identify(head, peer, now));
}

/// The data plane's way: the cheap part on the async worker, an asymmetric
/// signature check apart (`check_signature`, on the blocking pool), then the
/// answer; the same answers as `identify`, and the check is deferred for the
/// asymmetric tokens (each first seen: verified ones are remembered).
#[test]
fn identity_vectors_give_pythons_answers_with_the_check_apart() {
    let mut deferred = 0;
    replay(
        |identity, head, peer, now| match identity.identify_cheaply(head, peer, now) {
            Identification::Known(client) => client,
            Identification::NeedsSignature(check) => {
                deferred += 1;
                let checked = identity.check_signature(check);
                identity.identify_checked(head, peer, &checked)
            }
        },
    );
    assert!(deferred > 0, "no signature check was deferred");
}

fn replay(mut identify: impl FnMut(&Identity, &RequestHead<'_>, IpAddr, f64) -> Client) {
    let vectors = load("identity.json");
    let now = vectors["now"].as_f64().expect("now");
    let configs: HashMap<&str, Identity> = vectors["configs"]
        .as_object()
        .expect("configs")
        .iter()
        .map(|(name, c)| {
            let identity =
                Identity::new(&spec(&c["native"])).unwrap_or_else(|e| panic!("config {name}: {e}"));
            (name.as_str(), identity)
        })
        .collect();
    let cases = vectors["cases"].as_array().expect("cases");
    assert!(cases.len() > 1000, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let config = case["config"].as_str().unwrap();
        let name = case["name"].as_str().unwrap();
        let data = latin1(&case["head"]);
        let limits = HeadLimits {
            max_head_size: data.len(),
        };
        let HeadStatus::Complete(head) = parse_head(&data, &limits) else {
            panic!("{config} / {name}: the head does not parse");
        };
        let peer: IpAddr = case["peer"]
            .as_str()
            .unwrap()
            .parse()
            .expect("a peer address");
        let client = identify(&configs[config], &head, peer, now);
        let expect = &case["expect"];
        let got = (
            client.key.as_str(),
            client.source.as_str(),
            client.address.to_string(),
            client.verified,
        );
        let want = (
            expect["key"].as_str().unwrap(),
            expect["source"].as_str().unwrap(),
            expect["address"].as_str().unwrap().to_owned(),
            expect["verified"].as_bool().unwrap(),
        );
        if got != want {
            failures.push(format!("{config} / {name}: got {got:?}, Python {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
