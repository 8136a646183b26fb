//! Arming the kernel to count a stream's token writes itself (l7.bpf.c: `token_take`).
//!
//! A token event of a streamed response gives the bytes that every token event of that
//! response starts with (id, model, the generated-text key, the opening quote) and ends with (the
//! closing quote, `finish_reason: null`, the blank line). A write that is exactly such an event,
//! with another non-empty JSON string between them, is one the assembler would judge a token
//! event with nothing else in it: the kernel may count it (its start stamp and size) instead of
//! sending its bytes. Everything else — the response head, the role and finish events, usage,
//! `[DONE]`, an event that differs anywhere but in its text — still comes as an event.

/// What the kernel's `llmslo_stream_arm` holds (llmslo.h): the caps are its array sizes.
pub const PREFIX_CAP: usize = 256;
pub const SUFFIX_CAP: usize = 128;
/// The longest write the kernel judges (LLMSLO_TAKE_MAX).
pub const TAKE_MAX: usize = 512;
/// Arms waiting for the caller to take them (`Assembler::take_arms`), at most.
pub const ARMS_PENDING: usize = 4096;
/// The kernel compares eight bytes at a time and needs at least one word of each.
const MIN_LEN: usize = 8;

/// A connection to arm: token events of its current response look like `prefix`, a JSON
/// string body, `suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamArm {
    pub sock_id: u64,
    /// Read events the connection had when armed (the kernel counts them too): the arm
    /// applies only until the next request is read.
    pub reads: u32,
    /// Each event is one chunk of a chunked body (else the body is not chunked).
    pub chunked: bool,
    pub prefix: Vec<u8>,
    pub suffix: Vec<u8>,
}

/// Generated-text keys whose string value makes an event a token event (scan.rs `KEYS`),
/// with their quotes and colon.
const CONTENT_KEYS: [&[u8]; 4] = [
    b"\"content\":",
    b"\"text\":",
    b"\"reasoning_content\":",
    b"\"reasoning\":",
];

/// The body of a JSON string as the kernel accepts it: non-empty, no raw quote, no control
/// byte, no escape left open.
pub(crate) fn string_body_ok(x: &[u8]) -> bool {
    if x.is_empty() {
        return false;
    }
    let mut esc = false;
    for &c in x {
        if c < 0x20 {
            return false;
        }
        if esc {
            esc = false;
        } else if c == b'\\' {
            esc = true;
        } else if c == b'"' {
            return false;
        }
    }
    !esc
}

/// The JSON strings of `ev`: (index of the opening quote, of the closing quote).
fn strings(ev: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < ev.len() && ev[i] != b'"' {
            i += 1;
        }
        let open = i;
        i += 1;
        while i < ev.len() && ev[i] != b'"' {
            i += if ev[i] == b'\\' { 2 } else { 1 };
        }
        if i >= ev.len() {
            return None;
        }
        i += 1;
        Some((open, i - 1))
    })
}

/// (prefix length, suffix length) around the text of one whole token event (`data: …\n\n` as
/// decoded from the body): the first generated-text key's non-empty string value. Every event
/// that has the same bytes around another non-empty text is judged as this one was (a token
/// event, the same keys and values otherwise), whatever the text: the kernel may count it.
pub(crate) fn template(ev: &[u8]) -> Option<(usize, usize)> {
    let single_line = ev.starts_with(b"data:")
        && ev.ends_with(b"\n\n")
        && !ev[..ev.len() - 2].contains(&b'\n')
        && !ev.contains(&b'\r');
    if !single_line {
        return None;
    }
    let (open, close) = strings(ev).find(|&(open, close)| {
        let key = &ev[..open];
        let key = key.strip_suffix(b" ").unwrap_or(key);
        CONTENT_KEYS.iter().any(|k| key.ends_with(k)) && string_body_ok(&ev[open + 1..close])
    })?;
    let (plen, slen) = (open + 1, ev.len() - close);
    let fits = (MIN_LEN..=PREFIX_CAP).contains(&plen) && (MIN_LEN..=SUFFIX_CAP).contains(&slen);
    fits.then_some((plen, slen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, text: &str, finish: &str) -> Vec<u8> {
        format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":{finish}}}]}}\n\n"
        )
        .into_bytes()
    }

    fn split(a: &[u8], (p, s): (usize, usize)) -> (&[u8], &[u8], &[u8]) {
        (&a[..p], &a[p..a.len() - s], &a[a.len() - s..])
    }

    #[test]
    fn a_token_event_gives_the_bytes_around_its_text() {
        let a = ev("c1", "Hello", "null");
        let t = template(&a).unwrap();
        let (p, x, s) = split(&a, t);
        assert!(p.starts_with(b"data: {\"id\":\"c1\""));
        assert!(
            p.ends_with(b"\"content\":\""),
            "{}",
            String::from_utf8_lossy(p)
        );
        assert_eq!(x, b"Hello");
        assert_eq!(s, b"\"},\"finish_reason\":null}]}\n\n");
        // Another text of the same response has the same bytes around it.
        let b = ev("c1", r#"a\"b"#, "null");
        assert_eq!(split(&b, template(&b).unwrap()), (p, &br#"a\"b"#[..], s));
        // Texts in other keys, and the first non-empty one of several.
        let r = b"data: {\"delta\":{\"reasoning_content\":\"\",\"content\":\"hi\"},\"x\":null}\n\n";
        let (p, x, _) = split(r, template(r).unwrap());
        assert!(p.ends_with(b"\"content\":\""));
        assert_eq!(x, b"hi");
        let c = b"data: {\"choices\":[{\"text\": \"hi\",\"logprobs\":null}]}\n\n";
        assert_eq!(split(c, template(c).unwrap()).1, b"hi");
    }

    #[test]
    fn events_without_one_text_to_vary_give_none() {
        // No generated text, or an empty one; text only in a key's name or another key.
        assert_eq!(template(&ev("c1", "", "null")), None);
        assert_eq!(
            template(b"data: {\"role\":\"assistant\",\"x\":\"content\"}\n\n"),
            None
        );
        assert_eq!(
            template(b"data: {\"subtext\":\"abc\",\"x\":\"yyyyyyyy\"}\n\n"),
            None
        );
        assert_eq!(template(b"data: [DONE]\n\n"), None);
        // Multi-line events, CRLF line ends, no blank line at the end.
        assert_eq!(
            template(b"event: t\ndata: {\"content\":\"aaaaaaaa\",\"x\":1}\n\n"),
            None
        );
        let mut cr = ev("c1", "a", "null");
        let n = cr.len();
        cr[n - 2] = b'\r';
        assert_eq!(template(&cr), None);
        let a = ev("c1", "a", "null");
        assert_eq!(template(&a[..a.len() - 1]), None);
    }

    #[test]
    fn templates_fit_the_kernel() {
        // A prefix past the kernel's cap (a long model name) cannot be armed.
        let long = format!(
            "data: {{\"model\":\"{}\",\"content\":\"a\",\"finish_reason\":null}}\n\n",
            "m".repeat(PREFIX_CAP)
        );
        assert_eq!(template(long.as_bytes()), None);
        // Nor a suffix shorter than a word.
        assert_eq!(template(b"data: {\"content\":\"a\"}\n\n"), None);
        assert!(template(b"data: {\"content\":\"a\",\"x\":1}\n\n").is_some());
    }

    #[test]
    fn string_bodies() {
        assert!(string_body_ok(b"Hi"));
        assert!(string_body_ok(br#"\"\n\u00e9"#));
        assert!(!string_body_ok(b""));
        assert!(!string_body_ok(b"a\"b"));
        assert!(!string_body_ok(b"a\\"));
        assert!(!string_body_ok(b"a\nb"));
    }
}
