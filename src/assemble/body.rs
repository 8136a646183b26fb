//! HTTP/1.x body framing (Content-Length, chunked, close-delimited) over a byte stream that
//! arrives as fed bytes and skipped (uncopied) gaps, yielding the decoded content.

use memchr::memchr;

use super::http::Framing;

/// Bytes of a chunk-size line's extensions, and of all trailers, we tolerate.
const EXT_MAX: u32 = 4096;
const TRAILER_MAX: u32 = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    Done,
}

#[derive(Debug, Clone)]
pub(crate) struct Chunked {
    st: CState,
    size: u64,
    digits: u8,
    line: u32,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            st: CState::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Body {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl Body {
    /// None for messages without a body.
    pub(crate) fn new(f: Framing) -> Option<Body> {
        match f {
            Framing::None | Framing::Length(0) => None,
            Framing::Length(n) => Some(Body::Length(n)),
            Framing::Chunked => Some(Body::Chunked(Chunked::default())),
            Framing::Close => Some(Body::Close),
        }
    }
}

/// One step of body decoding: `consumed` input bytes (framing included), of which `data`
/// (the last ones) are body content.
pub(crate) struct Step<'a> {
    pub(crate) consumed: usize,
    pub(crate) data: &'a [u8],
    pub(crate) done: bool,
}

/// Invalid chunked framing, or framing bytes lost in a gap.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FramingError;

impl Body {
    /// Makes progress on `input` (non-empty); stops after the first piece of content.
    pub(crate) fn step<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, FramingError> {
        match self {
            Body::Length(rem) => {
                let n = (*rem).min(input.len() as u64) as usize;
                *rem -= n as u64;
                let done = *rem == 0;
                Ok(Step {
                    consumed: n,
                    data: &input[..n],
                    done,
                })
            }
            Body::Close => Ok(Step {
                consumed: input.len(),
                data: input,
                done: false,
            }),
            Body::Chunked(c) => c.step(input),
        }
    }

    /// Passes over `n` uncopied bytes. Returns how many belonged to this body and whether it
    /// ended; fails when the gap hides chunk framing.
    pub(crate) fn skip(&mut self, n: u64) -> Result<(u64, bool), FramingError> {
        match self {
            Body::Length(rem) => {
                let used = (*rem).min(n);
                *rem -= used;
                Ok((used, *rem == 0))
            }
            Body::Close => Ok((n, false)),
            Body::Chunked(c) if n == 0 => Ok((0, c.st == CState::Done)),
            Body::Chunked(c) if c.st == CState::Data && n <= c.size => {
                c.size -= n;
                if c.size == 0 {
                    c.st = CState::DataCr;
                }
                Ok((n, false))
            }
            Body::Chunked(_) => Err(FramingError),
        }
    }

    /// Whether `n` bytes of whole events (each a chunk of its own when chunked) can follow
    /// from here: a chunked body between chunks, a Content-Length body with that much left.
    pub(crate) fn can_take_whole(&self, n: u64) -> bool {
        match self {
            Body::Length(rem) => *rem >= n,
            Body::Close => true,
            Body::Chunked(c) => c.st == CState::Size && c.digits == 0,
        }
    }

    /// Passes over `n` bytes that `can_take_whole` allowed. Returns whether the body ended.
    pub(crate) fn take_whole(&mut self, n: u64) -> bool {
        match self {
            Body::Length(rem) => {
                *rem = rem.saturating_sub(n);
                *rem == 0
            }
            Body::Close | Body::Chunked(_) => false,
        }
    }

    pub(crate) fn is_chunked(&self) -> bool {
        matches!(self, Body::Chunked(_))
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// Whether `data` opens with a complete chunk-size line (`HEX[;ext]\r\n`). Used to regain
/// chunk framing after a gap hid it: servers write whole chunks, so a write that starts with
/// one is very likely at a chunk boundary, while SSE or JSON content never looks like one.
pub(crate) fn starts_with_size_line(data: &[u8]) -> bool {
    let digits = data.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return false;
    }
    match data.get(digits) {
        Some(b'\r') => data.get(digits + 1) == Some(&b'\n'),
        Some(b';') => {
            let line = &data[digits..data.len().min(digits + EXT_MAX as usize)];
            memchr(b'\n', line).is_some_and(|i| line[..i].ends_with(b"\r"))
        }
        _ => false,
    }
}

impl Chunked {
    fn size_line_done(&mut self) {
        self.st = if self.size == 0 {
            CState::TrailerStart
        } else {
            CState::Data
        };
        self.digits = 0;
        self.line = 0;
    }

    fn step<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, FramingError> {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.st {
                CState::Size => {
                    if let Some(v) = hex(b) {
                        // 15 hex digits is a petabyte chunk; more is an attack or garbage.
                        if self.digits >= 15 {
                            return Err(FramingError);
                        }
                        self.size = self.size << 4 | v;
                        self.digits += 1;
                    } else {
                        if self.digits == 0 {
                            return Err(FramingError);
                        }
                        match b {
                            b';' | b' ' | b'\t' => self.st = CState::Ext,
                            b'\r' => self.st = CState::SizeLf,
                            b'\n' => self.size_line_done(),
                            _ => return Err(FramingError),
                        }
                    }
                    i += 1;
                }
                CState::Ext => {
                    let rest = &input[i..];
                    let (n, end) = match memchr(b'\n', rest) {
                        Some(k) => (k + 1, true),
                        None => (rest.len(), false),
                    };
                    self.line = self.line.saturating_add(n as u32);
                    if self.line > EXT_MAX {
                        return Err(FramingError);
                    }
                    i += n;
                    if end {
                        self.size_line_done();
                    }
                }
                CState::SizeLf => {
                    if b != b'\n' {
                        return Err(FramingError);
                    }
                    i += 1;
                    self.size_line_done();
                }
                CState::Data => {
                    let n = self.size.min((input.len() - i) as u64) as usize;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.st = CState::DataCr;
                    }
                    let data = &input[i..i + n];
                    return Ok(Step {
                        consumed: i + n,
                        data,
                        done: false,
                    });
                }
                CState::DataCr | CState::DataLf => {
                    match (self.st, b) {
                        (CState::DataCr, b'\r') => self.st = CState::DataLf,
                        (_, b'\n') => {
                            self.st = CState::Size;
                            self.size = 0;
                        }
                        _ => return Err(FramingError),
                    }
                    i += 1;
                }
                CState::TrailerStart => match b {
                    b'\r' => {
                        self.st = CState::TrailerLf;
                        i += 1;
                    }
                    b'\n' => {
                        self.st = CState::Done;
                        i += 1;
                    }
                    _ => self.st = CState::Trailer,
                },
                CState::Trailer => {
                    let rest = &input[i..];
                    let (n, end) = match memchr(b'\n', rest) {
                        Some(k) => (k + 1, true),
                        None => (rest.len(), false),
                    };
                    self.line = self.line.saturating_add(n as u32);
                    if self.line > TRAILER_MAX {
                        return Err(FramingError);
                    }
                    i += n;
                    if end {
                        self.st = CState::TrailerStart;
                    }
                }
                CState::TrailerLf => {
                    if b != b'\n' {
                        return Err(FramingError);
                    }
                    self.st = CState::Done;
                    i += 1;
                }
                CState::Done => break,
            }
            if self.st == CState::Done {
                break;
            }
        }
        Ok(Step {
            consumed: i,
            data: &[],
            done: self.st == CState::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &mut Body, parts: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), FramingError> {
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let mut p = *p;
            while !p.is_empty() {
                let st = body.step(p)?;
                out.extend_from_slice(st.data);
                p = &p[st.consumed..];
                if st.done {
                    let left = p.len() + parts[i + 1..].iter().map(|p| p.len()).sum::<usize>();
                    return Ok((out, true, left));
                }
            }
        }
        Ok((out, false, 0))
    }

    #[test]
    fn chunked_any_split_and_gap() {
        let wire =
            b"5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for cut in 0..wire.len() {
            let mut b = Body::new(Framing::Chunked).unwrap();
            let (data, done, left) = decode(&mut b, &[&wire[..cut], &wire[cut..]]).unwrap();
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
            assert!(done);
            assert_eq!(left, 4);
        }
        let mut b = Body::new(Framing::Chunked).unwrap();
        let (d, _, _) = decode(&mut b, &[b"1a\r\nabc"]).unwrap();
        assert_eq!(d, b"abc");
        assert_eq!(b.skip(20), Ok((20, false)));
        assert_eq!(b.skip(10), Err(FramingError));
        let (d, done, _) = decode(&mut b, &[b"xyz\n0\n\n"]).unwrap();
        assert_eq!((&d[..], done), (&b"xyz"[..], true));
    }

    #[test]
    fn size_line_sniffing() {
        assert!(starts_with_size_line(b"1f\r\ndata: x"));
        assert!(starts_with_size_line(b"0\r\n\r\n"));
        assert!(starts_with_size_line(b"a;x=1\r\n"));
        assert!(!starts_with_size_line(b"data: {\"a\":1}\n\n"));
        assert!(!starts_with_size_line(b"dead"));
        assert!(!starts_with_size_line(b"\n\r\n1f\r\n"));
        assert!(!starts_with_size_line(b"{\"id\":1}"));
    }

    #[test]
    fn chunked_rejects_lies() {
        for bad in [
            &b"5\r\nhello world\r\n0\r\n\r\n"[..],
            b"zz\r\n",
            b"\r\n",
            b"ffffffffffffffffff\r\n",
            b"3\r\nabcXY",
        ] {
            let mut b = Body::new(Framing::Chunked).unwrap();
            assert_eq!(decode(&mut b, &[bad]).err(), Some(FramingError), "{bad:?}");
        }
        let mut b = Body::new(Framing::Length(10)).unwrap();
        assert_eq!(b.skip(4), Ok((4, false)));
        assert_eq!(b.skip(100), Ok((6, true)));
    }
}
