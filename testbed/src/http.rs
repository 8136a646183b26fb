//! Minimal HTTP/1.1 and SSE parsing shared by the synthetic server and the load
//! generator. Hand-written on purpose: both sides need to know exactly which bytes
//! arrived in which read() and leave in which write(), which a full HTTP stack hides.

use anyhow::{bail, Context, Result};

/// Upper bound on a message head; larger heads are rejected rather than buffered.
pub const MAX_HEAD: usize = 64 * 1024;

/// A parsed request or response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request line or status line, without CRLF.
    pub start_line: String,
    /// Headers in order; names as sent (compare case-insensitively via [`Head::header`]).
    pub headers: Vec<(String, String)>,
    /// Bytes of the head including the blank line that ends it.
    pub len: usize,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(usize),
    Chunked,
    /// Response without length: the body runs until the peer closes.
    UntilClose,
}

impl Head {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether header `name` holds `token` in its comma-separated list.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Body framing of a request (no body unless Content-Length or chunked).
    pub fn request_framing(&self) -> Result<BodyFraming> {
        if self.header_has_token("transfer-encoding", "chunked") {
            return Ok(BodyFraming::Chunked);
        }
        match self.header("content-length") {
            Some(v) => Ok(BodyFraming::Length(
                v.trim().parse().context("bad Content-Length")?,
            )),
            None => Ok(BodyFraming::None),
        }
    }

    /// Body framing of a response with `status` (RFC 9112 §6.3).
    pub fn response_framing(&self, status: u16) -> Result<BodyFraming> {
        if status / 100 == 1 || status == 204 || status == 304 {
            return Ok(BodyFraming::None);
        }
        match self.request_framing()? {
            BodyFraming::None => Ok(BodyFraming::UntilClose),
            f => Ok(f),
        }
    }

    /// Status code of a response head.
    pub fn status(&self) -> Result<u16> {
        let mut parts = self.start_line.split(' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            bail!("not an HTTP/1 status line: {:?}", self.start_line);
        }
        parts
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", self.start_line))
    }

    /// HTTP version of the start line is 1.0 (request line ends in it, status line
    /// begins with it).
    pub fn is_http10(&self) -> bool {
        self.start_line.starts_with("HTTP/1.0") || self.start_line.ends_with("HTTP/1.0")
    }

    /// Whether the connection closes after this message (HTTP/1.1 keeps alive unless
    /// told otherwise; 1.0 closes unless told to keep alive).
    pub fn wants_close(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return true;
        }
        self.is_http10() && !self.header_has_token("connection", "keep-alive")
    }
}

/// Index just past the `\r\n\r\n` that ends the head, if it has arrived.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parse the head at the start of `buf`; `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let Some(end) = find_head_end(&buf[..buf.len().min(MAX_HEAD + 4)]) else {
        if buf.len() > MAX_HEAD {
            bail!("message head larger than {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end - 4]).context("head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let start_line = lines.next().unwrap_or("").to_string();
    if start_line.is_empty() {
        bail!("empty start line");
    }
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(Some(Head {
        start_line,
        headers,
        len: end,
    }))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
}

/// Incremental decoder of a chunked body: feed bytes as they arrive, get the payload
/// and how many input bytes belonged to the body (the rest is the next message).
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            line: Vec::new(),
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consume from `input`, appending payload to `out`. Returns bytes consumed; stops
    /// at the end of the body (after the terminating blank line).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Size | ChunkState::Trailer | ChunkState::DataEnd => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        self.line.push(b);
                        if self.line.len() > 4096 {
                            bail!("chunk size or trailer line too long");
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let text = std::str::from_utf8(line).context("chunk size")?;
                            let hex = text.split(';').next().unwrap_or("").trim();
                            let size = usize::from_str_radix(hex, 16)
                                .with_context(|| format!("bad chunk size {text:?}"))?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => bail!("chunk data not followed by CRLF"),
                        _ if line.is_empty() => ChunkState::Done,
                        _ => ChunkState::Trailer, // a trailer field: ignored
                    };
                }
                ChunkState::Data(left) => {
                    let n = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::Done => unreachable!(),
            }
        }
        Ok(i)
    }
}

/// Frame `data` as one chunk: size line + data + CRLF, ready for a single write().
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The last chunk of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Incremental SSE splitter: yields the `data` of each event when the blank line that
/// ends it arrives (that moment is what a client observes as "event received").
#[derive(Debug, Default, Clone)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    /// Feed body bytes; `on_event` gets each completed event's data (lines joined
    /// with '\n').
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(&[u8])) {
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if self.has_data {
                    on_event(&self.data);
                }
                self.data.clear();
                self.has_data = false;
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(rest);
                self.has_data = true;
            } // other fields (event:, id:, comments) do not matter here
        }
    }
}

/// What an OpenAI-style SSE event carries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventInfo {
    /// Non-empty generated text in `choices[].delta.content` or `choices[].text`:
    /// a token event in the sense of DESIGN.md §3.
    pub content: bool,
    pub done: bool,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
}

/// Classify one event's data.
pub fn classify_event(data: &[u8]) -> EventInfo {
    if data.trim_ascii() == b"[DONE]" {
        return EventInfo {
            done: true,
            ..Default::default()
        };
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return EventInfo::default();
    };
    let content = v["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            let text = c["delta"]["content"].as_str().or(c["text"].as_str());
            text.is_some_and(|t| !t.is_empty())
        })
    });
    EventInfo {
        content,
        done: false,
        completion_tokens: v["usage"]["completion_tokens"].as_u64(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64(),
    }
}

/// A GET over a fresh connection to `addr` (`Connection: close`): (status, body), a chunked body
/// decoded. For tests and benches reading an agent's endpoints.
pub fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::time::Duration;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// The data of a chunked body (up to the last chunk, or the first malformed one).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        let wire = b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nConnection: keep-alive, Close\r\n\r\nhello";
        let h = parse_head(wire).unwrap().unwrap();
        assert_eq!(h.start_line, "POST /v1/x HTTP/1.1");
        assert_eq!(h.header("content-length"), Some("5"));
        assert_eq!(h.request_framing().unwrap(), BodyFraming::Length(5));
        assert!(h.wants_close());
        assert_eq!(h.len, wire.len() - 5);
        let r = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.status().unwrap(), 200);
        assert!(r.wants_close());
        assert_eq!(r.response_framing(200).unwrap(), BodyFraming::UntilClose);
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 10]).is_err());
    }

    #[test]
    fn chunked_byte_by_byte_and_pipelined() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in [1, 3, wire.len()] {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            let mut pos = 0;
            while !d.is_done() {
                let end = (pos + step).min(wire.len());
                pos += d.feed(&wire[pos..end], &mut out).unwrap();
            }
            assert_eq!(out, b"hello world");
            assert_eq!(&wire[pos..], b"NEXT");
        }
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
        assert_eq!(chunk(b"abc"), b"3\r\nabc\r\n");
    }

    #[test]
    fn sse_events() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        let wire = b"data: {\"a\":1}\n\n: comment\n\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for b in wire.chunks(2) {
            p.feed(b, |d| got.push(String::from_utf8(d.to_vec()).unwrap()));
        }
        assert_eq!(got, vec!["{\"a\":1}", "x\ny", "[DONE]"]);
    }

    #[test]
    fn event_classes() {
        let role = br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        assert!(!classify_event(role).content);
        let tok = br#"{"choices":[{"delta":{"content":" hi"}}]}"#;
        assert!(classify_event(tok).content);
        let text = br#"{"choices":[{"text":"hi","index":0}]}"#;
        assert!(classify_event(text).content);
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#;
        let u = classify_event(usage);
        assert!(!u.content);
        assert_eq!(u.completion_tokens, Some(7));
        assert_eq!(u.prompt_tokens, Some(3));
        assert!(classify_event(b"[DONE]").done);
    }
}
