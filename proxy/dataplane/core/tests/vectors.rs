//! Parity with the Python data plane it replaced: the vectors in
//! `tests/vectors/` (recorded from its head parser and frame parser, frozen
//! when it was deleted) replayed through this crate. Every case must give the
//! recorded answer.

mod common;

use loopwatch_dataplane_core::frames::{
    build_close_frame, unmask, FrameWatcher, Side, WatcherConfig,
};
use loopwatch_dataplane_core::head::{
    parse_head, BodyFraming, HeadLimits, HeadStatus, RequestKind,
};
use serde_json::Value;

use common::{latin1, latin1_opt, load};

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A stream stored as hex pieces and [pattern, count] repeats.
fn unpack(pieces: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces.as_array().expect("pieces") {
        match piece {
            Value::String(h) => out.extend(hex(h)),
            Value::Array(repeat) => {
                let pattern = hex(repeat[0].as_str().expect("pattern"));
                for _ in 0..repeat[1].as_u64().expect("count") {
                    out.extend_from_slice(&pattern);
                }
            }
            other => panic!("bad stream piece {other}"),
        }
    }
    out
}

/// Compares one field; collects a readable description of every mismatch.
struct Check<'a> {
    case: &'a str,
    failures: &'a mut Vec<String>,
}

impl Check<'_> {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, ours: T, python: T) {
        if ours != python {
            self.failures.push(format!(
                "{}: {what}: rust {ours:?}, python {python:?}",
                self.case
            ));
        }
    }
}

fn report(failures: Vec<String>, total: usize, what: &str) {
    if !failures.is_empty() {
        let shown: Vec<_> = failures.iter().take(40).cloned().collect();
        panic!(
            "{} of {total} {what} differ from the Python data plane:\n{}",
            failures.len(),
            shown.join("\n")
        );
    }
}

#[test]
fn request_heads_answer_as_the_python_data_plane() {
    let vectors = load("request_heads.json");
    let default_max = vectors["default_max_head_size"].as_u64().unwrap() as usize;
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() > 1000, "the vectors cover a few thousand heads");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let input = latin1(&case["input"]);
        let limits = HeadLimits {
            max_head_size: case["max_head_size"]
                .as_u64()
                .map_or(default_max, |n| n as usize),
        };
        let expect = &case["expect"];
        let mut c = Check {
            case: name,
            failures: &mut failures,
        };
        match (
            expect["outcome"].as_str().unwrap(),
            parse_head(&input, &limits),
        ) {
            ("partial", HeadStatus::Partial) => {}
            ("reject", HeadStatus::Rejected(r)) => {
                c.eq(
                    "status",
                    u64::from(r.status),
                    expect["status"].as_u64().unwrap(),
                );
                c.eq(
                    "reason",
                    r.reason.label(),
                    expect["reason"].as_str().unwrap(),
                );
                let headers: Vec<Vec<String>> = r
                    .extra_headers()
                    .iter()
                    .map(|(n, v)| vec![n.to_string(), v.to_string()])
                    .collect();
                let python: Vec<Vec<String>> =
                    serde_json::from_value(expect["headers"].clone()).unwrap();
                c.eq("headers", headers, python);
                if let Some(message) = expect.get("message") {
                    c.eq("message", r.message.as_ref(), message.as_str().unwrap());
                    c.eq("response", r.response(), latin1(&expect["response"]));
                }
            }
            ("accept", HeadStatus::Complete(head)) => {
                let websocket = head.kind == RequestKind::WebSocket;
                c.eq(
                    "kind",
                    if websocket { "websocket" } else { "http" },
                    expect["kind"].as_str().unwrap(),
                );
                c.eq("method", head.method, expect["method"].as_str().unwrap());
                c.eq("target", head.target.to_vec(), latin1(&expect["target"]));
                c.eq("path", head.path.to_vec(), latin1(&expect["path"]));
                c.eq("query", head.query.to_vec(), latin1(&expect["query"]));
                c.eq(
                    "version",
                    head.version.as_str(),
                    expect["version"].as_str().unwrap(),
                );
                c.eq(
                    "authority",
                    head.authority.as_deref().map(<[u8]>::to_vec),
                    latin1_opt(&expect["authority"]),
                );
                c.eq(
                    "keep_alive",
                    head.keep_alive,
                    expect["keep_alive"].as_bool().unwrap(),
                );
                let headers: Vec<(Vec<u8>, Vec<u8>)> = head
                    .headers
                    .iter()
                    .map(|h| (h.name.to_vec(), h.value.to_vec()))
                    .collect();
                let python: Vec<(Vec<u8>, Vec<u8>)> = expect["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| (latin1(&h[0]), latin1(&h[1])))
                    .collect();
                c.eq("headers", headers, python);
                c.eq(
                    "head_len",
                    head.head_len as u64,
                    expect["head_len"].as_u64().unwrap(),
                );
                let after = &input[head.head_len.min(input.len())..];
                if websocket {
                    c.eq("rest", after.to_vec(), latin1(&expect["rest"]));
                } else if expect.get("body_error").is_none() {
                    // The framing must delimit the body the Python parser read
                    // (a body it refused is the body reader's business).
                    let body = latin1(&expect["body"]);
                    match head.kind {
                        RequestKind::Http(BodyFraming::None) => c.eq("body", Vec::new(), body),
                        RequestKind::Http(BodyFraming::Length(n)) => {
                            let n = (n as usize).min(after.len());
                            c.eq("body", after[..n].to_vec(), body);
                        }
                        // Chunked bodies are decoded by the body reader, not here:
                        // the Python parser read one, so it is chunked.
                        _ => {}
                    }
                }
                // Accepted heads re-serialise to a head that parses the same.
                let again = head.to_bytes();
                match parse_head(
                    &again,
                    &HeadLimits {
                        max_head_size: usize::MAX,
                    },
                ) {
                    HeadStatus::Complete(other) => {
                        c.eq(
                            "reparsed headers",
                            other.headers.clone(),
                            head.headers.clone(),
                        );
                        c.eq("reparsed target", other.target.clone(), head.target.clone());
                        c.eq("reparsed kind", other.kind, head.kind);
                    }
                    other => c.eq(
                        "reparsed",
                        format!("{other:?}"),
                        "a complete head".to_string(),
                    ),
                }
            }
            (outcome, ours) => c.eq("outcome", format!("{ours:?}"), outcome.to_string()),
        }
    }
    report(failures, cases.len(), "request heads");
}

fn config(value: &Value) -> WatcherConfig {
    WatcherConfig {
        side: match value["side"].as_str().unwrap() {
            "client" => Side::Client,
            _ => Side::Upstream,
        },
        max_message_size: value["max_message_size"].as_u64(),
        allowed_rsv: value["allowed_rsv"].as_u64().unwrap() as u8,
    }
}

/// What the watcher makes of `stream` cut at `cuts`, in the vectors' shape.
fn watch(config: WatcherConfig, stream: &[u8], cuts: &[usize]) -> Value {
    let mut w = FrameWatcher::new(config);
    let mut headers = Vec::new();
    let mut forwarded = Vec::new();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(stream.len());
    for pair in bounds.windows(2) {
        if w.error().is_some() {
            break; // the relay stops feeding a stream after a violation
        }
        let result = w.feed_observed(&stream[pair[0]..pair[1]], &mut |h| {
            headers.push(serde_json::json!([
                h.fin,
                h.rsv,
                h.opcode,
                h.masked,
                h.mask
                    .map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<String>()),
                h.length,
                h.header_size
            ]));
        });
        forwarded.push(match result {
            Ok(n) => n,
            Err(v) => v.forward,
        });
    }
    serde_json::json!({
        "forwarded": forwarded,
        "error": w.error().map(|e| serde_json::json!({"code": e.close_code(), "reason": e.to_string()})),
        "messages": w.messages,
        "message_bytes": w.message_bytes,
        "frames": w.frames,
        "pings": w.pings,
        "pongs": w.pongs,
        "in_message": w.in_message(),
        "close": w.close().map(|c| serde_json::json!({"code": c.code, "reason": c.reason})),
        "at_boundary": w.at_boundary(),
        "frame_remaining": w.frame_remaining(),
        "headers": headers,
    })
}

#[test]
fn frame_streams_answer_as_the_python_data_plane() {
    let vectors = load("frames.json");
    let cases = vectors["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let config = config(&case["config"]);
        let stream = unpack(&case["stream"]);
        let whole = &case["expect"];
        let mut splits = vec![(Value::Array(vec![]), serde_json::json!({}))];
        for split in case["splits"].as_array().unwrap() {
            splits.push((split["cuts"].clone(), split["expect"].clone()));
        }
        for (cuts, diff) in splits {
            let cuts: Vec<usize> = match &cuts {
                Value::String(s) if s == "bytewise" => (1..stream.len()).collect(),
                other => serde_json::from_value(other.clone()).unwrap(),
            };
            let mut expect = whole.clone();
            for (k, v) in diff.as_object().unwrap() {
                expect[k] = v.clone();
            }
            let ours = watch(config, &stream, &cuts);
            let label = format!("{name} cut at {cuts:?}");
            let mut c = Check {
                case: &label,
                failures: &mut failures,
            };
            for (key, python) in expect.as_object().unwrap() {
                c.eq(key, &ours[key], python);
            }
            runs += 1;
        }
    }
    assert!(runs > 1000, "the vectors cover many streams and splits");
    report(failures, runs, "frame streams");
}

#[test]
fn close_frames_are_built_as_the_python_data_plane_builds_them() {
    let vectors = load("frames.json");
    let mut failures = Vec::new();
    let cases = vectors["close_frames"].as_array().unwrap();
    for case in cases {
        let code = case["code"].as_u64().unwrap() as u16;
        let reason = case["reason"].as_str().unwrap();
        let masked = case["masked"].as_bool().unwrap();
        let label = format!("close {code} {reason:?} masked={masked}");
        let mut c = Check {
            case: &label,
            failures: &mut failures,
        };
        let key = [0x5a, 0x01, 0xc3, 0x7e];
        match (
            build_close_frame(code, reason, masked.then_some(key)),
            case["expect"].get("frame"),
        ) {
            (Ok(mut frame), Some(python)) => {
                if masked {
                    c.eq(
                        "mask bit and key",
                        (frame[1] & 0x80, frame[2..6].to_vec()),
                        (0x80, key.to_vec()),
                    );
                    let mut payload = frame.split_off(6);
                    unmask(&mut payload, key);
                    frame.truncate(2);
                    frame[1] &= 0x7F;
                    frame.extend(payload);
                }
                c.eq("frame", frame, hex(python.as_str().unwrap()));
            }
            (Err(_), None) => {}
            (ours, python) => c.eq("outcome", format!("{ours:?}"), format!("{python:?}")),
        }
    }
    report(failures, cases.len(), "close frames");
}
