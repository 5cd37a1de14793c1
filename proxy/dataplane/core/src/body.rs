//! A plain request's chunked body, decoded incrementally with llhttp's
//! strictness (strict mode, as httptools ran it for the asyncio data plane
//! this one replaced), and the chunk framing loopwatch writes itself.
//!
//! loopwatch never forwards a client's chunk framing: it decodes the body and
//! frames it again (one chunk per piece decoded, `0\r\n\r\n` at the end, no
//! extensions, no trailers), as aiohttp frames a body it sends. A body that
//! loopwatch and the upstream would read differently therefore cannot reach
//! the upstream; one this decoder refuses is answered 400 (`bad_request`), with
//! llhttp's wording.
//!
//! The grammar (RFC 9112 §7.1, as llhttp applies it): a chunk size of hex
//! digits (no sign, no `0x`, no whitespace, at most 16 digits of value),
//! optional extensions `;name` or `;name=token` or `;name="quoted"`, CRLF
//! (never a bare LF); the data and CRLF; after the size-0 chunk, trailer lines
//! `name: value` up to an empty line. Lines are bounded: a size line by
//! [`MAX_LINE`], the trailers together by the caller's limit.

use std::fmt;

/// Longest chunk-size line (extensions included) accepted.
pub const MAX_LINE: usize = 4096;

/// Why a chunked body is refused (the client gets a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    Size,
    Overflow,
    Extensions,
    ExtensionName,
    MissingCr,
    MissingLf,
    DataEnd,
    Trailer,
    TooLong,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkError::Size => "malformed request: Invalid character in chunk size",
            ChunkError::Overflow => "malformed request: Chunk size overflow",
            ChunkError::Extensions => "malformed request: Invalid character in chunk extensions",
            ChunkError::ExtensionName => {
                "malformed request: Invalid character in chunk extensions name"
            }
            ChunkError::MissingCr => "malformed request: Missing expected CR after chunk size",
            ChunkError::MissingLf => "malformed request: Missing expected LF after chunk size",
            ChunkError::DataEnd => "malformed request: Expected LF after chunk data",
            ChunkError::Trailer => "malformed request: Invalid header token",
            ChunkError::TooLong => "malformed request: chunk line too long",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A chunk-size line (kept in `line` until its CRLF).
    Size,
    /// Bytes of chunk data still to come.
    Data(u64),
    /// The CRLF after chunk data; `true` once its CR came.
    DataEnd(bool),
    /// A trailer line, or the empty line that ends the body.
    Trailer,
    Done,
}

/// What one [`ChunkedDecoder::decode`] call made of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes used; the rest (when `done`) belongs to the next request.
    pub consumed: usize,
    /// The body ended (the size-0 chunk and its trailers are in).
    pub done: bool,
}

/// Decodes a chunked body fed in pieces of any size.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    line: Vec<u8>,
    trailer_bytes: usize,
    max_trailers: usize,
}

/// RFC 9110 tchar.
fn token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a chunk-size line (without its CRLF): the size, or why it is bad.
fn size_line(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkError::Size);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).expect("a hex digit") as u64;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(ChunkError::Overflow)?;
    }
    let mut rest = &line[digits..];
    while let Some((&first, after)) = rest.split_first() {
        if first != b';' {
            return Err(if rest.len() == line.len() - digits {
                ChunkError::Size
            } else {
                ChunkError::Extensions
            });
        }
        let name = after.iter().take_while(|&&b| token(b)).count();
        if name == 0 {
            return Err(ChunkError::Extensions);
        }
        rest = &after[name..];
        match rest.first() {
            None | Some(b';') => continue,
            Some(b'=') => {}
            Some(_) => return Err(ChunkError::ExtensionName),
        }
        rest = &rest[1..];
        if rest.first() == Some(&b'"') {
            let mut i = 1;
            loop {
                match rest.get(i) {
                    None => return Err(ChunkError::Extensions),
                    Some(b'"') => break,
                    Some(b'\\') if rest.get(i + 1).is_some() => i += 2,
                    Some(&b) if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => i += 1,
                    Some(_) => return Err(ChunkError::Extensions),
                }
            }
            rest = &rest[i + 1..];
        } else {
            let value = rest.iter().take_while(|&&b| token(b)).count();
            if value == 0 {
                return Err(ChunkError::Extensions);
            }
            rest = &rest[value..];
        }
    }
    Ok(size)
}

/// Checks a trailer line (without its CRLF): `name:value`.
fn trailer_line(line: &[u8]) -> Result<(), ChunkError> {
    let name = line.iter().take_while(|&&b| token(b)).count();
    if name == 0 || line.get(name) != Some(&b':') {
        return Err(ChunkError::Trailer);
    }
    if line[name + 1..]
        .iter()
        .any(|&b| b < 0x20 && b != b'\t' || b == 0x7f)
    {
        return Err(ChunkError::Trailer);
    }
    Ok(())
}

impl ChunkedDecoder {
    /// `max_trailers`: bytes of trailer lines accepted (the head size limit).
    pub fn new(max_trailers: usize) -> Self {
        ChunkedDecoder {
            state: State::Size,
            line: Vec::new(),
            trailer_bytes: 0,
            max_trailers,
        }
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode `input`, appending the body's data to `out`.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Decoded, ChunkError> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::Done => break,
                State::Data(left) => {
                    let take = left.min((input.len() - pos) as u64) as usize;
                    out.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    self.state = if take as u64 == left {
                        State::DataEnd(false)
                    } else {
                        State::Data(left - take as u64)
                    };
                }
                State::DataEnd(cr) => {
                    let b = input[pos];
                    pos += 1;
                    self.state = match (cr, b) {
                        (false, b'\r') => State::DataEnd(true),
                        (true, b'\n') => State::Size,
                        _ => return Err(ChunkError::DataEnd),
                    };
                }
                State::Size | State::Trailer => {
                    let b = input[pos];
                    pos += 1;
                    if self.line.last() == Some(&b'\r') {
                        if b != b'\n' {
                            return Err(if self.state == State::Size {
                                ChunkError::MissingLf
                            } else {
                                ChunkError::Trailer
                            });
                        }
                        self.line.pop();
                        self.end_line()?;
                        continue;
                    }
                    if b == b'\n' {
                        return Err(if self.state == State::Size {
                            ChunkError::MissingCr
                        } else {
                            ChunkError::Trailer
                        });
                    }
                    self.line.push(b);
                    if self.state == State::Size && self.line.len() > MAX_LINE {
                        return Err(ChunkError::TooLong);
                    }
                    if self.state == State::Trailer && b != b'\r' {
                        self.trailer_bytes += 1;
                        if self.trailer_bytes > self.max_trailers {
                            return Err(ChunkError::TooLong);
                        }
                    }
                }
            }
        }
        Ok(Decoded {
            consumed: pos,
            done: self.state == State::Done,
        })
    }

    fn end_line(&mut self) -> Result<(), ChunkError> {
        let line = std::mem::take(&mut self.line);
        self.state = match self.state {
            State::Size => match size_line(&line)? {
                0 => State::Trailer,
                n => State::Data(n),
            },
            State::Trailer if line.is_empty() => State::Done,
            State::Trailer => {
                trailer_line(&line)?;
                State::Trailer
            }
            other => other,
        };
        self.line = line;
        self.line.clear();
        Ok(())
    }
}

/// Append `data` as one chunk (nothing for empty data: that would end the body).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, which ends a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new(1024);
        let mut out = Vec::new();
        let r = d.decode(input, &mut out)?;
        assert!(r.done, "incomplete: {input:?}");
        Ok((out, r.consumed))
    }

    /// The same cases as httptools in strict mode answers them (see the
    /// module documentation; checked against it while the asyncio plane ran).
    #[test]
    fn accepts_and_refuses_as_llhttp() {
        let ok: [&[u8]; 7] = [
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5;a=b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x y\"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
            b"005\r\nhello\r\n000\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T:1\r\n\r\n",
            b"5;a;b=c\r\nhello\r\n0\r\n\r\n",
        ];
        for case in ok {
            assert_eq!(whole(case).unwrap().0, b"hello", "{case:?}");
        }
        let bad: [(&[u8], ChunkError); 11] = [
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5; a\r\nhello\r\n0\r\n\r\n", ChunkError::Extensions),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::MissingCr),
            (b"5\r\nhelloXX0\r\n\r\n", ChunkError::DataEnd),
            (
                b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
                ChunkError::Trailer,
            ),
            (b"ffffffffffffffffff\r\n", ChunkError::Overflow),
            (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5;\r\nhello\r\n0\r\n\r\n", ChunkError::Extensions),
            (b"5;a b\r\nhello\r\n0\r\n\r\n", ChunkError::ExtensionName),
            (b"\r\n5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
        ];
        for (case, why) in bad {
            let mut d = ChunkedDecoder::new(1024);
            assert_eq!(d.decode(case, &mut Vec::new()), Err(why), "{case:?}");
        }
    }

    #[test]
    fn byte_by_byte_is_the_same_and_stops_at_the_end() {
        let input = b"3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nGET /";
        let mut d = ChunkedDecoder::new(1024);
        let mut out = Vec::new();
        let mut used = 0;
        for (i, b) in input.iter().enumerate() {
            let r = d.decode(std::slice::from_ref(b), &mut out).unwrap();
            used += r.consumed;
            if r.done {
                assert_eq!(i + 1, used);
                break;
            }
        }
        assert_eq!(out, b"abc0123456789abcdef");
        assert_eq!(&input[used..], b"GET /");
        let (again, consumed) = whole(input).unwrap();
        assert_eq!((again, consumed), (out, used));
    }

    #[test]
    fn lines_are_bounded() {
        let mut d = ChunkedDecoder::new(1024);
        let long = [b"1;a=".as_slice(), &[b'b'; MAX_LINE]].concat();
        assert_eq!(d.decode(&long, &mut Vec::new()), Err(ChunkError::TooLong));
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(
            d.decode(b"0\r\nX-Long: 123456\r\n", &mut Vec::new()),
            Err(ChunkError::TooLong)
        );
    }

    #[test]
    fn chunks_are_framed() {
        let mut out = Vec::new();
        encode_chunk(b"", &mut out);
        encode_chunk(&[b'a'; 26], &mut out);
        out.extend_from_slice(LAST_CHUNK);
        let mut d = ChunkedDecoder::new(0);
        let mut back = Vec::new();
        assert!(d.decode(&out, &mut back).unwrap().done);
        assert_eq!(back, [b'a'; 26]);
        assert!(out.starts_with(b"1a\r\n"));
    }
}
