//! HTTP/1.x message heads: protocol sniffing of a connection's first bytes, head
//! accumulation over many reads/writes, and request/response head parsing. Body framing is
//! in `body`.

use memchr::{memchr, memchr_iter};

/// What the first bytes of a connection say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Every candidate is still possible: wait for more bytes.
    Need,
    Http1,
    Http2,
    Tls,
    NotHttp,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Longest prefix `classify` ever needs.
pub(crate) const CLASSIFY_LEN: usize = 16;

pub(crate) fn classify(p: &[u8]) -> Class {
    let Some(&first) = p.first() else {
        return Class::Need;
    };
    // TLS record types handshake (0x16, a ClientHello on a new connection) and, for a
    // connection that predates us, change-cipher-spec/alert/application data (0x14..0x17).
    if (0x14..=0x17).contains(&first) {
        return match p.get(1) {
            None => Class::Need,
            Some(0x03) => Class::Tls,
            Some(_) => Class::NotHttp,
        };
    }
    let mut need = false;
    for cand in METHODS.iter().chain(std::iter::once(&H2_PREFACE)) {
        if p.len() >= cand.len() {
            if p.starts_with(cand) {
                return if *cand == H2_PREFACE {
                    Class::Http2
                } else {
                    Class::Http1
                };
            }
        } else if cand.starts_with(p) {
            need = true;
        }
    }
    if need {
        Class::Need
    } else {
        Class::NotHttp
    }
}

pub(crate) enum HeadStep {
    /// All of the input was taken; the head goes on in later bytes.
    Need,
    /// The head ends after this many input bytes. If the buffer is empty the head lies
    /// wholly in the input (`input[..n]`) and was not copied.
    Done(usize),
    TooLarge,
}

/// Accumulates a head that arrives over several reads or writes; reused across messages.
#[derive(Default)]
pub(crate) struct HeadBuf {
    buf: Vec<u8>,
}

impl HeadBuf {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }
    /// Clears and gives back an unusually large allocation, for a connection slot's reuse.
    pub(crate) fn release(&mut self) {
        self.buf.clear();
        self.buf.shrink_to(1024);
    }

    pub(crate) fn feed(&mut self, data: &[u8], max: usize) -> HeadStep {
        let end = find_end(&self.buf, data);
        let take = end.unwrap_or(data.len());
        if self.buf.len() + take > max {
            return HeadStep::TooLarge;
        }
        match end {
            Some(n) if self.buf.is_empty() => HeadStep::Done(n),
            Some(n) => {
                self.buf.extend_from_slice(&data[..n]);
                HeadStep::Done(n)
            }
            None => {
                self.buf.extend_from_slice(data);
                HeadStep::Need
            }
        }
    }
}

/// Index just past the blank line (`\r\n\r\n` or bare `\n\n`) ending a head, looking back
/// into the bytes buffered before `data`.
fn find_end(prev: &[u8], data: &[u8]) -> Option<usize> {
    let at = |k: usize, back: usize| -> Option<u8> {
        if k >= back {
            data.get(k - back).copied()
        } else {
            let j = prev.len().checked_sub(back - k)?;
            prev.get(j).copied()
        }
    };
    for i in memchr_iter(b'\n', data) {
        match at(i, 1) {
            Some(b'\n') => return Some(i + 1),
            Some(b'\r') if at(i, 2) == Some(b'\n') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Header fields the assembler acts on.
#[derive(Default)]
struct Fields {
    length: Option<u64>,
    /// Some(last coding is chunked) when Transfer-Encoding was present.
    te_chunked: Option<bool>,
    event_stream: bool,
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn fields<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Option<Fields> {
    let mut f = Fields::default();
    for line in lines {
        if line.is_empty() {
            break;
        }
        // Obsolete line folding continues the previous field; none we read is folded.
        if matches!(line[0], b' ' | b'\t') {
            continue;
        }
        let colon = memchr(b':', line)?;
        let name = &line[..colon];
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return None;
        }
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            // A repeated or comma-listed length must agree with itself (RFC 9110 §8.6).
            for v in value.split(|&b| b == b',') {
                let n = parse_length(trim(v))?;
                if f.length.is_some_and(|l| l != n) {
                    return None;
                }
                f.length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().map(trim).unwrap_or(b"");
            f.te_chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-type") {
            f.event_stream =
                value.len() >= 17 && value[..17].eq_ignore_ascii_case(b"text/event-stream");
        }
    }
    Some(f)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

#[derive(Debug)]
pub(crate) struct ReqHead<'a> {
    pub(crate) method: &'a [u8],
    /// Request target without scheme/authority, query or fragment.
    pub(crate) path: &'a [u8],
    pub(crate) framing: Framing,
}

/// Splits `METHOD SP target SP HTTP/1.x`; also used on a partial head of an aborted request.
pub(crate) fn request_line(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut parts = line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    let token = |b: &u8| b.is_ascii_uppercase() || *b == b'-' || *b == b'_';
    if method.len() > 20 || !method.iter().all(token) || parts.next().is_some() {
        return None;
    }
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    Some((method, strip_target(target)))
}

fn strip_target(t: &[u8]) -> &[u8] {
    let mut t = t;
    for scheme in [&b"http://"[..], b"https://"] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &t[scheme.len()..];
            t = memchr(b'/', rest).map_or(b"/", |i| &rest[i..]);
            break;
        }
    }
    let end = t
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(t.len());
    &t[..end]
}

pub(crate) fn parse_request(head: &[u8]) -> Option<ReqHead<'_>> {
    let mut it = lines(head);
    let (method, path) = request_line(it.next()?)?;
    let f = fields(it)?;
    let framing = match (f.te_chunked, f.length) {
        (Some(true), _) => Framing::Chunked,
        // A request body must be chunked when any transfer coding is applied (RFC 9112 §6.3).
        (Some(false), _) => return None,
        (None, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::None,
    };
    Some(ReqHead {
        method,
        path,
        framing,
    })
}

#[derive(Debug)]
pub(crate) struct RespHead {
    pub(crate) status: u16,
    pub(crate) event_stream: bool,
    length: Option<u64>,
    chunked: bool,
}

impl RespHead {
    /// Body framing of a final response (RFC 9112 §6.3).
    pub(crate) fn framing(&self, head_request: bool) -> Framing {
        if head_request || self.status < 200 || self.status == 204 || self.status == 304 {
            Framing::None
        } else if self.chunked {
            Framing::Chunked
        } else {
            match self.length {
                Some(0) => Framing::None,
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        }
    }
}

pub(crate) fn parse_response(head: &[u8]) -> Option<RespHead> {
    let mut it = lines(head);
    let line = it.next()?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (&minor, rest) = rest.split_first()?;
    if !minor.is_ascii_digit() || rest.first() != Some(&b' ') {
        return None;
    }
    let code = rest.get(1..4)?;
    if !code.iter().all(u8::is_ascii_digit) || !matches!(rest.get(4), None | Some(b' ')) {
        return None;
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let f = fields(it)?;
    Some(RespHead {
        status,
        event_stream: f.event_stream,
        length: f.length,
        chunked: f.te_chunked == Some(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(b"POST /v1"), Class::Http1);
        assert_eq!(classify(b"PO"), Class::Need);
        assert_eq!(classify(b"P"), Class::Need);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Class::Http2);
        assert_eq!(classify(b"PRI * HT"), Class::Need);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Class::Tls);
        assert_eq!(classify(&[0x16]), Class::Need);
        assert_eq!(classify(&[0x17, 0x03, 0x03]), Class::Tls);
        assert_eq!(classify(b"GETX /"), Class::NotHttp);
        assert_eq!(classify(b"get /"), Class::NotHttp);
        assert_eq!(classify(&[0, 1, 2, 0xff]), Class::NotHttp);
    }

    #[test]
    fn head_end_across_any_split() {
        let head = b"POST /a HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        for cut in 0..head.len() {
            let mut hb = HeadBuf::default();
            let (a, b) = head.split_at(cut);
            let got = match hb.feed(a, 1000) {
                HeadStep::Done(n) => n,
                HeadStep::Need => match hb.feed(b, 1000) {
                    HeadStep::Done(n) => cut + n,
                    _ => panic!("no end at cut {cut}"),
                },
                HeadStep::TooLarge => unreachable!(),
            };
            assert_eq!(got, head.len() - 4, "cut {cut}");
        }
        let mut hb = HeadBuf::default();
        assert!(matches!(
            hb.feed(b"GET / HTTP/1.0\n\nx", 100),
            HeadStep::Done(16)
        ));
        assert!(matches!(
            hb.feed(b"GET / HTTP/1.0\r\nA: b", 10),
            HeadStep::TooLarge
        ));
    }

    #[test]
    fn request_heads() {
        let r = parse_request(b"POST http://h:8000/v1/chat?x=1 HTTP/1.1\r\nContent-Length: 5, 5\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert_eq!((r.method, r.path), (&b"POST"[..], &b"/v1/chat"[..]));
        assert_eq!(r.framing, Framing::Length(5));
        let r = parse_request(
            b"POST /a HTTP/1.1\nTransfer-Encoding: gzip, chunked\nContent-Length: 3\n\n",
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(parse_request(b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").is_none());
        assert!(parse_request(
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        .is_none());
        assert!(parse_request(b"POST /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n").is_none());
        assert!(parse_request(b"POST /a HTTP/1.1\r\nno colon\r\n\r\n").is_none());
        assert!(parse_request(b"POST /a HTTP/2\r\n\r\n").is_none());
        assert!(parse_request(b"POST /a\r\n\r\n").is_none());
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n").unwrap().framing,
            Framing::None
        );
    }

    #[test]
    fn response_heads() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(r.event_stream);
        assert_eq!(r.framing(false), Framing::Chunked);
        assert_eq!(r.framing(true), Framing::None);
        let r = parse_response(b"HTTP/1.0 204\r\n\r\n").unwrap();
        assert_eq!((r.status, r.framing(false)), (204, Framing::None));
        let r = parse_response(b"HTTP/1.1 500 Oops\r\n\r\n").unwrap();
        assert_eq!(r.framing(false), Framing::Close);
        assert!(parse_response(b"HTTP/1.1 20 OK\r\n\r\n").is_none());
        assert!(parse_response(b"HTTP/2 200\r\n\r\n").is_none());
        assert!(parse_response(b"POST / HTTP/1.1\r\n\r\n").is_none());
    }
}
