//! JSON read exactly as Python's `json` module reads it (its C scanner, strict
//! mode), for JWT headers and payloads: what the asyncio data plane took as a
//! claim (its answers are the recorded identity vectors) this takes too,
//! including the corners `serde_json` reads
//! differently — lone surrogate escapes (kept, then removed by the key's
//! cleaning), `NaN`/`Infinity`, duplicate keys (the last wins), integers of
//! any size (more than 4300 digits is an error, Python's
//! `int_max_str_digits`), and the nesting depth (Python's recursion limit).

/// Python's `json` refuses nesting at its recursion limit (1000 frames, less
/// the caller's stack: about 995 from a shallow caller). Deeper than this is
/// refused here; between this and Python's limit the two may differ.
pub const MAX_DEPTH: usize = 900;
/// `sys.int_info.default_max_str_digits`.
pub const MAX_INT_DIGITS: usize = 4300;

/// A JSON string as Python holds it: text plus the lone surrogates a
/// `\uD800` escape (or, with `surrogatepass`, raw bytes) put in it, which a
/// Rust `String` cannot hold. Two strings are equal when both parts are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PyStr {
    /// The text with every lone surrogate left out.
    pub text: String,
    /// (byte offset in `text`, surrogate code unit), in order.
    pub surrogates: Vec<(usize, u16)>,
}

impl PyStr {
    fn push(&mut self, unit: u32) {
        match char::from_u32(unit) {
            Some(c) => self.text.push(c),
            None => self
                .surrogates
                .push((self.text.len(), u16::try_from(unit).unwrap_or(0xFFFD))),
        }
    }

    /// Equal to a string that holds no surrogate.
    pub fn is(&self, other: &str) -> bool {
        self.surrogates.is_empty() && self.text == other
    }
}

/// A JSON value as Python's `json.loads` gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// An integer as `str(int)` writes it (`-0` is `0`).
    Int(String),
    Float(f64),
    Str(PyStr),
    Array(Vec<Value>),
    /// Members in order, duplicates kept; `get` answers the last.
    Object(Vec<(PyStr, Value)>),
}

impl Value {
    /// `obj.get(name)` of a dict.
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members
                .iter()
                .rev()
                .find(|(k, _)| k.is(name))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Python truthiness (`not payload["aud"]`).
    pub fn truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Int(i) => i != "0",
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !(s.text.is_empty() && s.surrogates.is_empty()),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }
}

/// Python's decoding of the bytes: strict UTF-8, or with `surrogatepass`
/// (what `json.loads(bytes)` uses) encoded surrogates accepted too.
pub fn decode_utf8(bytes: &[u8], surrogatepass: bool) -> Option<Vec<u32>> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Some(text.chars().map(u32::from).collect());
    }
    if !surrogatepass {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let cont = |j: usize| bytes.get(j).is_some_and(|&c| c & 0xC0 == 0x80);
        let (unit, len) = match b {
            0x00..=0x7F => (u32::from(b), 1),
            0xC2..=0xDF if cont(i + 1) => (
                (u32::from(b & 0x1F) << 6) | u32::from(bytes[i + 1] & 0x3F),
                2,
            ),
            0xE0..=0xEF if cont(i + 1) && cont(i + 2) => {
                let unit = (u32::from(b & 0x0F) << 12)
                    | (u32::from(bytes[i + 1] & 0x3F) << 6)
                    | u32::from(bytes[i + 2] & 0x3F);
                if unit < 0x800 {
                    return None; // overlong
                }
                (unit, 3)
            }
            0xF0..=0xF4 if cont(i + 1) && cont(i + 2) && cont(i + 3) => {
                let unit = (u32::from(b & 0x07) << 18)
                    | (u32::from(bytes[i + 1] & 0x3F) << 12)
                    | (u32::from(bytes[i + 2] & 0x3F) << 6)
                    | u32::from(bytes[i + 3] & 0x3F);
                if !(0x10000..=0x10FFFF).contains(&unit) {
                    return None;
                }
                (unit, 4)
            }
            _ => return None,
        };
        out.push(unit);
        i += len;
    }
    Some(out)
}

const fn is_ws(c: u32) -> bool {
    matches!(c, 0x20 | 0x09 | 0x0A | 0x0D)
}

/// `json.loads` of decoded text: one value, JSON whitespace around it.
pub fn loads(text: &[u32]) -> Option<Value> {
    let mut parser = Parser { s: text, depth: 0 };
    let start = parser.skip_ws(0);
    let (value, end) = parser.value(start)?;
    (parser.skip_ws(end) == text.len()).then_some(value)
}

struct Parser<'a> {
    s: &'a [u32],
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&self, mut i: usize) -> usize {
        while i < self.s.len() && is_ws(self.s[i]) {
            i += 1;
        }
        i
    }

    fn literal(&self, i: usize, word: &str) -> bool {
        let bytes = word.as_bytes();
        self.s.len() >= i + bytes.len()
            && self.s[i..i + bytes.len()]
                .iter()
                .zip(bytes)
                .all(|(&c, &b)| c == u32::from(b))
    }

    fn value(&mut self, i: usize) -> Option<(Value, usize)> {
        let c = *self.s.get(i)?;
        match char::from_u32(c)? {
            '"' => {
                let (s, end) = self.string(i + 1)?;
                Some((Value::Str(s), end))
            }
            '{' => self.nested(i, true),
            '[' => self.nested(i, false),
            'n' if self.literal(i, "null") => Some((Value::Null, i + 4)),
            't' if self.literal(i, "true") => Some((Value::Bool(true), i + 4)),
            'f' if self.literal(i, "false") => Some((Value::Bool(false), i + 5)),
            'N' if self.literal(i, "NaN") => Some((Value::Float(f64::NAN), i + 3)),
            'I' if self.literal(i, "Infinity") => Some((Value::Float(f64::INFINITY), i + 8)),
            '-' if self.literal(i, "-Infinity") => Some((Value::Float(f64::NEG_INFINITY), i + 9)),
            _ => self.number(i),
        }
    }

    fn nested(&mut self, open: usize, object: bool) -> Option<(Value, usize)> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None; // Python: RecursionError
        }
        let close = if object { '}' } else { ']' } as u32;
        let mut i = self.skip_ws(open + 1);
        let mut members = Vec::new();
        let mut items = Vec::new();
        if self.s.get(i) == Some(&close) {
            i += 1;
        } else {
            loop {
                if object {
                    if self.s.get(i) != Some(&u32::from(b'"')) {
                        return None;
                    }
                    let (key, end) = self.string(i + 1)?;
                    i = self.skip_ws(end);
                    if self.s.get(i) != Some(&u32::from(b':')) {
                        return None;
                    }
                    i = self.skip_ws(i + 1);
                    let (value, end) = self.value(i)?;
                    members.push((key, value));
                    i = end;
                } else {
                    let (value, end) = self.value(i)?;
                    items.push(value);
                    i = end;
                }
                i = self.skip_ws(i);
                match self.s.get(i).copied() {
                    Some(c) if c == close => {
                        i += 1;
                        break;
                    }
                    Some(0x2C) => i = self.skip_ws(i + 1),
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        let value = if object {
            Value::Object(members)
        } else {
            Value::Array(items)
        };
        Some((value, i))
    }

    fn hex4(&self, i: usize) -> Option<u32> {
        let digits = self.s.get(i..i + 4)?;
        let mut unit = 0;
        for &d in digits {
            unit = unit * 16 + char::from_u32(d)?.to_digit(16)?;
        }
        Some(unit)
    }

    /// A string's body from just after its opening quote.
    fn string(&self, mut i: usize) -> Option<(PyStr, usize)> {
        let mut out = PyStr::default();
        loop {
            let c = *self.s.get(i)?;
            i += 1;
            match c {
                0x22 => return Some((out, i)),
                0x00..=0x1F => return None, // strict: no raw control characters
                0x5C => {
                    let e = *self.s.get(i)?;
                    i += 1;
                    let unit = match char::from_u32(e)? {
                        '"' => 0x22,
                        '\\' => 0x5C,
                        '/' => 0x2F,
                        'b' => 0x08,
                        'f' => 0x0C,
                        'n' => 0x0A,
                        'r' => 0x0D,
                        't' => 0x09,
                        'u' => {
                            let mut unit = self.hex4(i)?;
                            i += 4;
                            if (0xD800..=0xDBFF).contains(&unit)
                                && self.s.get(i) == Some(&0x5C)
                                && self.s.get(i + 1) == Some(&u32::from(b'u'))
                            {
                                if let Some(low) = self.hex4(i + 2) {
                                    if (0xDC00..=0xDFFF).contains(&low) {
                                        unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                                        i += 6;
                                    }
                                }
                            }
                            unit
                        }
                        _ => return None,
                    };
                    out.push(unit);
                }
                _ => out.push(c),
            }
        }
    }

    fn digits(&self, mut i: usize) -> usize {
        while self.s.get(i).is_some_and(|&c| (0x30..=0x39).contains(&c)) {
            i += 1;
        }
        i
    }

    fn number(&self, start: usize) -> Option<(Value, usize)> {
        let mut i = start;
        let negative = self.s.get(i) == Some(&0x2D);
        if negative {
            i += 1;
        }
        let int_start = i;
        match self.s.get(i).copied() {
            Some(0x30) => i += 1,
            Some(0x31..=0x39) => i = self.digits(i + 1),
            _ => return None,
        }
        let int_end = i;
        let mut float = false;
        if self.s.get(i) == Some(&0x2E)
            && self
                .s
                .get(i + 1)
                .is_some_and(|&c| (0x30..=0x39).contains(&c))
        {
            float = true;
            i = self.digits(i + 1);
        }
        if matches!(self.s.get(i), Some(0x65 | 0x45)) {
            let mut j = i + 1;
            if matches!(self.s.get(j), Some(0x2B | 0x2D)) {
                j += 1;
            }
            let end = self.digits(j);
            if end > j {
                float = true;
                i = end;
            }
        }
        let text: String = self.s[start..i]
            .iter()
            .map(|&c| char::from_u32(c).unwrap_or('0'))
            .collect();
        if float {
            return Some((Value::Float(text.parse().ok()?), i));
        }
        if int_end - int_start > MAX_INT_DIGITS {
            return None; // Python: ValueError (int_max_str_digits)
        }
        let digits = &text[usize::from(negative)..];
        let canonical = if negative && digits != "0" {
            text
        } else {
            digits.to_owned()
        };
        Some((Value::Int(canonical), i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<Value> {
        loads(&text.chars().map(u32::from).collect::<Vec<_>>())
    }

    #[test]
    fn reads_what_python_reads() {
        assert_eq!(parse(" 1 "), Some(Value::Int("1".into())));
        assert_eq!(parse("-0"), Some(Value::Int("0".into())));
        assert_eq!(parse("01"), None);
        assert_eq!(parse("1."), None);
        assert!(matches!(parse("1e5"), Some(Value::Float(_))));
        assert!(parse("1e").is_none());
        assert!(matches!(parse("NaN"), Some(Value::Float(f)) if f.is_nan()));
        assert_eq!(parse("[1,]"), None);
        assert_eq!(parse("{\"a\":1,}"), None);
        assert_eq!(parse("\"a\u{1}\""), None);
        let dup = parse(r#"{"a":1,"a":2}"#).unwrap();
        assert_eq!(dup.get("a"), Some(&Value::Int("2".into())));
        let lone = parse(r#""x\ud800y""#).unwrap();
        let Value::Str(s) = lone else { panic!() };
        assert_eq!(s.text, "xy");
        assert_eq!(s.surrogates, vec![(1, 0xD800)]);
        let pair = parse(r#""\ud83d\ude00""#).unwrap();
        assert_eq!(
            pair,
            Value::Str(PyStr {
                text: "😀".into(),
                surrogates: vec![]
            })
        );
        assert_eq!(parse(&"1".repeat(4301)), None);
        assert!(parse(&format!("-{}", "1".repeat(4300))).is_some());
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse(&deep(MAX_DEPTH)).is_some());
        assert!(parse(&deep(MAX_DEPTH + 1)).is_none());
    }

    #[test]
    fn surrogatepass_decoding() {
        assert_eq!(decode_utf8(b"\xed\xa0\x80", false), None);
        assert_eq!(decode_utf8(b"\xed\xa0\x80", true), Some(vec![0xD800]));
        assert_eq!(decode_utf8(b"\xc0\x80", true), None);
        assert_eq!(decode_utf8(b"\xe0\x80\x80", true), None);
    }
}
