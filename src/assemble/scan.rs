//! Allocation-free byte scanner that finds the few JSON keys the assembler cares about
//! (`model`, generated-text keys, usage counts) in a stream of body fragments.
//!
//! Bodies arrive as fragments (reads, writes, chunks, SSE lines) and are never kept whole, so
//! the scanner keeps the last `CARRY` bytes of the previous fragment: a key that straddles two
//! fragments is found once the second arrives. A match is reported only when its value is
//! complete; an incomplete one stays in the carry and is retried. Matches that start inside
//! the carry may be reported twice; every consumer is idempotent (flag, first-wins,
//! last-wins with identical order), so that is harmless and cheaper than tracking them.

use memchr::{memchr2, memchr_iter};

/// Bytes kept across fragments: enough for `"model": "<128 bytes>"` plus some whitespace.
const CARRY: usize = 160;
/// Bytes of the new fragment joined to the carry to finish a match that began in the carry.
const JOIN: usize = 192;
/// Longest model name we keep; longer values are not names but payload.
pub(crate) const MODEL_MAX: usize = 128;

/// A complete key/value match. `Model` borrows the raw (still escaped) string value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hit<'a> {
    Model(&'a [u8]),
    /// A generated-text key whose string value is non-empty.
    Content,
    CompletionTokens(u32),
    PromptTokens(u32),
}

#[derive(Clone, Copy)]
enum Kind {
    Model,
    Content,
    Completion,
    Prompt,
}

/// Keys with their closing quote, so `"text"` never matches `"text_offset"`.
const KEYS: [(&[u8], Kind); 7] = [
    (b"model\"", Kind::Model),
    (b"content\"", Kind::Content),
    (b"text\"", Kind::Content),
    (b"reasoning_content\"", Kind::Content),
    (b"reasoning\"", Kind::Content),
    (b"completion_tokens\"", Kind::Completion),
    (b"prompt_tokens\"", Kind::Prompt),
];

enum Outcome<'a> {
    Hit(Hit<'a>),
    No,
    Incomplete,
}

#[derive(Clone)]
pub(crate) struct KeyScan {
    carry: [u8; CARRY],
    len: usize,
}

impl Default for KeyScan {
    fn default() -> Self {
        KeyScan {
            carry: [0; CARRY],
            len: 0,
        }
    }
}

impl KeyScan {
    /// Forgets the carry: the next fragment is not adjacent to the previous one.
    pub(crate) fn reset(&mut self) {
        self.len = 0;
    }

    pub(crate) fn feed(&mut self, data: &[u8], hit: &mut impl FnMut(Hit<'_>)) {
        if data.is_empty() {
            return;
        }
        if self.len > 0 {
            let j = data.len().min(JOIN);
            let mut w = [0u8; CARRY + JOIN];
            w[..self.len].copy_from_slice(&self.carry[..self.len]);
            w[self.len..self.len + j].copy_from_slice(&data[..j]);
            scan(&w[..self.len + j], self.len, hit);
        }
        scan(data, data.len(), hit);
        self.push_carry(data);
    }

    fn push_carry(&mut self, data: &[u8]) {
        if data.len() >= CARRY {
            self.carry.copy_from_slice(&data[data.len() - CARRY..]);
            self.len = CARRY;
            return;
        }
        let keep = self.len.min(CARRY - data.len());
        self.carry.copy_within(self.len - keep..self.len, 0);
        self.carry[keep..keep + data.len()].copy_from_slice(data);
        self.len = keep + data.len();
    }
}

/// Reports complete matches whose opening quote lies before `start_limit`.
fn scan(buf: &[u8], start_limit: usize, hit: &mut impl FnMut(Hit<'_>)) {
    let limit = start_limit.min(buf.len());
    for q in memchr_iter(b'"', &buf[..limit]) {
        // An escaped quote is inside a string value, never the start of a key.
        if q > 0 && buf.get(q - 1) == Some(&b'\\') {
            continue;
        }
        let rest = buf.get(q + 1..).unwrap_or(&[]);
        let Some(&first) = rest.first() else { continue };
        if !matches!(first, b'm' | b'c' | b't' | b'r' | b'p') {
            continue;
        }
        for (key, kind) in KEYS {
            if rest.starts_with(key) {
                if let Outcome::Hit(h) = value(&rest[key.len()..], kind) {
                    hit(h);
                }
                break;
            }
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// Judges what follows a key: whitespace, `:`, whitespace, then the value.
fn value(b: &[u8], kind: Kind) -> Outcome<'_> {
    let i = skip_ws(b, 0);
    match b.get(i) {
        None => return Outcome::Incomplete,
        Some(b':') => {}
        // Not followed by a colon: the quoted word was a value, not a key.
        Some(_) => return Outcome::No,
    }
    let i = skip_ws(b, i + 1);
    let Some(&c) = b.get(i) else {
        return Outcome::Incomplete;
    };
    match kind {
        Kind::Content => {
            if c != b'"' {
                return Outcome::No;
            }
            // Any byte but a closing quote (an escape included) makes the text non-empty.
            match b.get(i + 1) {
                None => Outcome::Incomplete,
                Some(b'"') => Outcome::No,
                Some(_) => Outcome::Hit(Hit::Content),
            }
        }
        Kind::Model => {
            if c != b'"' {
                return Outcome::No;
            }
            string_body(&b[i + 1..])
        }
        Kind::Completion | Kind::Prompt => {
            let digits = b[i..].iter().take_while(|d| d.is_ascii_digit()).count();
            if i + digits == b.len() {
                return Outcome::Incomplete;
            }
            if digits == 0 || digits > 10 {
                return Outcome::No;
            }
            let n = b[i..i + digits]
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match (u32::try_from(n), kind) {
                (Ok(n), Kind::Completion) => Outcome::Hit(Hit::CompletionTokens(n)),
                (Ok(n), _) => Outcome::Hit(Hit::PromptTokens(n)),
                (Err(_), _) => Outcome::No,
            }
        }
    }
}

/// Finds the closing quote of a model string; longer than any valid name → no match.
fn string_body(b: &[u8]) -> Outcome<'_> {
    // Escaped bytes take two raw bytes; allow that much before giving up.
    let window = &b[..b.len().min(2 * MODEL_MAX + 1)];
    let mut i = 0;
    while let Some(k) = memchr2(b'"', b'\\', &window[i..]) {
        let at = i + k;
        if window[at] == b'"' {
            return Outcome::Hit(Hit::Model(&b[..at]));
        }
        i = at + 2;
        if i >= window.len() {
            break;
        }
    }
    if b.len() > 2 * MODEL_MAX {
        Outcome::No
    } else {
        Outcome::Incomplete
    }
}

/// A model name fit to keep: at most `MODEL_MAX` characters of printable text. Only the
/// `\/` escape (some encoders escape slashes) is decoded; any other escape rejects it.
pub(crate) fn model_name(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.len() > 2 * MODEL_MAX {
        return None;
    }
    let mut buf = [0u8; 2 * MODEL_MAX];
    let mut n = 0;
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c == b'\\' {
            if raw.get(i + 1) != Some(&b'/') {
                return None;
            }
            i += 1;
        }
        buf[n] = raw[i];
        n += 1;
        i += 1;
    }
    let s = std::str::from_utf8(&buf[..n]).ok()?;
    let mut chars = 0;
    for ch in s.chars() {
        chars += 1;
        if ch.is_control() || chars > MODEL_MAX {
            return None;
        }
    }
    Some(s.to_owned())
}

#[cfg(test)]
fn hits(fragments: &[&[u8]]) -> Vec<String> {
    let mut s = KeyScan::default();
    let mut v: Vec<String> = Vec::new();
    for f in fragments {
        s.feed(f, &mut |h| {
            let h = match h {
                Hit::Model(m) => format!("model={}", String::from_utf8_lossy(m)),
                Hit::Content => "content".into(),
                Hit::CompletionTokens(n) => format!("completion={n}"),
                Hit::PromptTokens(n) => format!("prompt={n}"),
            };
            // Matches near a fragment end are re-reported by design; list each once.
            if !v.contains(&h) {
                v.push(h);
            }
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_judgement() {
        assert_eq!(hits(&[br#"{"delta":{"content":"hi"}}"#]), ["content"]);
        assert_eq!(hits(&[br#"{"delta":{"content" : "\"x"}}"#]), ["content"]);
        assert!(hits(&[br#"{"delta":{"role":"assistant","content":""}}"#]).is_empty());
        assert!(hits(&[br#"{"delta":{"content":null}}"#]).is_empty());
        assert!(hits(&[br#"{"choices":[],"usage":{"prompt_tokens":3}}"#]) == ["prompt=3"]);
        assert!(hits(&[b"[DONE]"]).is_empty());
        assert_eq!(hits(&[br#"{"choices":[{"text":"a"}]}"#]), ["content"]);
        assert_eq!(
            hits(&[br#"{"delta":{"reasoning_content":"t"}}"#]),
            ["content"]
        );
        assert_eq!(hits(&[br#"{"delta":{"reasoning":"t"}}"#]), ["content"]);
        // Near misses: other keys, escaped keys inside text, key-looking values.
        assert!(hits(&[br#"{"generated_text":"a","text_offset":[1]}"#]).is_empty());
        assert!(hits(&[br#"{"x":"say \"content\":\"no\""}"#]).is_empty());
        assert!(hits(&[br#"{"type":"text","y":1}"#]).is_empty());
    }

    #[test]
    fn usage_and_model() {
        let body = br#"{"model":"m-1","usage":{"prompt_tokens":12,"completion_tokens":34,"completion_tokens_details":null}}"#;
        assert_eq!(hits(&[body]), ["model=m-1", "prompt=12", "completion=34"]);
        assert!(hits(&[br#"{"completion_tokens":99999999999}"#]).is_empty());
    }

    #[test]
    fn straddles_every_split_point() {
        let body =
            br#"xx{"messages":[],"model" :	"org\/llama-3","usage":{"completion_tokens":1234}}"#;
        for cut in 0..body.len() {
            let h = hits(&[&body[..cut], &body[cut..]]);
            assert_eq!(
                h,
                [r"model=org\/llama-3", "completion=1234"],
                "cut at {cut}"
            );
        }
        // One byte per fragment.
        let frags: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(hits(&frags), [r"model=org\/llama-3", "completion=1234"]);
    }

    #[test]
    fn model_names() {
        assert_eq!(model_name(br"org\/m").as_deref(), Some("org/m"));
        assert_eq!(model_name("modèle".as_bytes()).as_deref(), Some("modèle"));
        assert_eq!(model_name(br"a\nb"), None);
        assert_eq!(model_name(b"a\x01b"), None);
        assert_eq!(model_name(&[b'a'; 129]), None);
        assert_eq!(model_name(&[0xff, 0xfe]), None);
        assert_eq!(model_name(b""), None);
        let long = format!(r#"{{"model":"{}"}}"#, "a".repeat(300));
        assert!(hits(&[long.as_bytes()]).is_empty());
    }
}
