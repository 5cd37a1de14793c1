//! What the vector tests (`vectors.rs`, `identity_vectors.rs`) share: the
//! files of `tests/vectors/` and the way they store bytes.

use std::path::PathBuf;

use serde_json::Value;

/// `tests/vectors/<name>`, parsed.
pub fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../tests/vectors")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

/// Bytes stored as a string of latin-1 code points.
pub fn latin1(value: &Value) -> Vec<u8> {
    value
        .as_str()
        .expect("a string")
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("a latin-1 code point"))
        .collect()
}

/// [`latin1`], or None for null.
pub fn latin1_opt(value: &Value) -> Option<Vec<u8>> {
    (!value.is_null()).then(|| latin1(value))
}
