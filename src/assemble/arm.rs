//! Arming the kernel to count a stream's token writes itself (l7.bpf.c: `token_take`).
//!
//! A token event of a streamed response gives the bytes that every token event of that
//! response starts with (id, model, the generated-text key, the opening quote) and ends with (the
//! closing quote, `finish_reason: null`, the blank line). A write that is exactly such an event,
//! with another non-empty JSON string between them, is one the assembler would judge a token
//! event with nothing else in it: the kernel may count it (its start stamp and size) instead of
//! sending its bytes. Everything else — the response head, the role and finish events, usage,
//! `[DONE]`, an event that differs anywhere but in its text — still comes as an event.
//!
//! The arm outlives its response: the values of `"id"` and `"created"` are marked as bytes that
//! may vary (any bytes but a quote, a backslash or a control byte, which keep every JSON string
//! where it is), so the next responses of the same shape on a keep-alive connection are counted
//! from their first token without waiting for userspace to see one. A value of another length
//! (an id counter past 9, 99, …) or another model does not fit: those writes come as events, and
//! the first whole token event among them arms the connection again.

/// What the kernel's `llmslo_stream_arm` holds (llmslo.h): the caps are its array sizes.
pub const PREFIX_CAP: usize = 256;
pub const SUFFIX_CAP: usize = 128;
/// The longest write the kernel judges (LLMSLO_TAKE_MAX).
pub const TAKE_MAX: usize = 512;
/// Arms waiting for the caller to take them (`Assembler::take_arms`), at most.
pub const ARMS_PENDING: usize = 4096;
/// The kernel compares eight bytes at a time and needs at least one word of each.
const MIN_LEN: usize = 8;
/// Compared words with bytes that may vary, per part, at most (LLMSLO_ARM_VARY_MAX).
pub const VARY_MAX: usize = 6;

/// A connection to arm: token events of its responses look like `prefix`, a JSON string body,
/// `suffix`, where the bytes that `prefix_fixed` / `suffix_fixed` mark 0 may differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamArm {
    pub sock_id: u64,
    /// Each event is one chunk of a chunked body (else the body is not chunked).
    pub chunked: bool,
    pub prefix: Vec<u8>,
    pub suffix: Vec<u8>,
    /// One byte per byte of `prefix` / `suffix`: 0xff must be the same, 0 may vary.
    pub prefix_fixed: Vec<u8>,
    pub suffix_fixed: Vec<u8>,
    /// The compared words (`words`) of each part that hold bytes that may vary: the kernel checks
    /// only those for bytes that would reshape the JSON.
    pub prefix_vary: Vec<u8>,
    pub suffix_vary: Vec<u8>,
}

/// Where the kernel compares the words of a template part of `len` bytes (8..=256): every
/// eighth byte, then the word that ends where the part ends (it may overlap the one before).
fn words(len: usize) -> impl Iterator<Item = usize> {
    (0..len / 8)
        .map(|i| i * 8)
        .chain((!len.is_multiple_of(8)).then_some(len - 8))
}

/// The compared words of a part with a byte that may vary; None past `VARY_MAX`.
fn vary_words(fixed: &[u8]) -> Option<Vec<u8>> {
    let v: Vec<u8> = words(fixed.len())
        .filter(|&o| fixed[o..o + 8].contains(&0))
        .map(|o| o as u8)
        .collect();
    (v.len() <= VARY_MAX).then_some(v)
}

impl StreamArm {
    /// The arm for the token event `ev` whose text lies between `plen` and `ev.len() - slen`
    /// (`template`): the values of `VARYING_KEYS` in either part may vary.
    pub(crate) fn new(
        sock_id: u64,
        chunked: bool,
        ev: &[u8],
        (plen, slen): (usize, usize),
    ) -> StreamArm {
        let sfrom = ev.len() - slen;
        let (mut prefix_fixed, mut suffix_fixed) = (vec![0xff; plen], vec![0xff; slen]);
        for r in varying(ev) {
            if r.end < plen {
                prefix_fixed[r].fill(0);
            } else if r.start >= sfrom {
                suffix_fixed[r.start - sfrom..r.end - sfrom].fill(0);
            }
        }
        // Values too long to check in the kernel's few words stay as they are: the arm then
        // fits this response's events only.
        let (prefix_vary, suffix_vary) =
            match (vary_words(&prefix_fixed), vary_words(&suffix_fixed)) {
                (Some(p), Some(s)) => (p, s),
                _ => {
                    prefix_fixed.fill(0xff);
                    suffix_fixed.fill(0xff);
                    (Vec::new(), Vec::new())
                }
            };
        StreamArm {
            sock_id,
            chunked,
            prefix: ev[..plen].to_vec(),
            suffix: ev[sfrom..].to_vec(),
            prefix_fixed,
            suffix_fixed,
            prefix_vary,
            suffix_vary,
        }
    }
}

#[cfg(test)]
impl StreamArm {
    /// The runs of bytes that may vary, in the prefix and in the suffix, each joined by ','.
    pub(crate) fn varying_runs(&self) -> (String, String) {
        let runs = |t: &[u8], f: &[u8]| {
            let mut out: Vec<String> = Vec::new();
            let mut open = false;
            for (&c, &m) in t.iter().zip(f) {
                match (m == 0, open) {
                    (true, true) => out.last_mut().unwrap().push(c as char),
                    (true, false) => out.push((c as char).to_string()),
                    _ => {}
                }
                open = m == 0;
            }
            out.join(",")
        };
        (
            runs(&self.prefix, &self.prefix_fixed),
            runs(&self.suffix, &self.suffix_fixed),
        )
    }
}

/// Generated-text keys whose string value makes an event a token event (scan.rs `KEYS`),
/// with their quotes and colon.
const CONTENT_KEYS: [&[u8]; 4] = [
    b"\"content\":",
    b"\"text\":",
    b"\"reasoning_content\":",
    b"\"reasoning\":",
];

/// Keys whose values differ between the responses of one server and mean nothing to the
/// assembler (it reads the model, the generated text and usage, never these).
const VARYING_KEYS: [&[u8]; 2] = [b"id", b"created"];

/// The byte ranges of `ev` holding the values of `VARYING_KEYS`: a string's body or a number's
/// digits (an empty string: none).
fn varying(ev: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut it = strings(ev);
    let skip_spaces = |mut i: usize| {
        while ev.get(i) == Some(&b' ') {
            i += 1;
        }
        i
    };
    std::iter::from_fn(move || loop {
        let (open, close) = it.next()?;
        let colon = skip_spaces(close + 1);
        if ev.get(colon) != Some(&b':') || !VARYING_KEYS.contains(&&ev[open + 1..close]) {
            continue;
        }
        let v = skip_spaces(colon + 1);
        match ev.get(v) {
            // The value is the next string.
            Some(b'"') => match it.next() {
                Some((vo, vc)) if vo == v && vc > v + 1 => return Some(v + 1..vc),
                _ => continue,
            },
            Some(c) if c.is_ascii_digit() => {
                let n = ev[v..].iter().take_while(|c| c.is_ascii_digit()).count();
                return Some(v..v + n);
            }
            _ => continue,
        }
    })
}

/// A finish reason after the text (a string, not `null`): the last token event of a choice.
const FINISHED: [&[u8]; 2] = [b"\"finish_reason\":\"", b"\"finish_reason\": \""];

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
    // The event that ends the choice: its finish reason fits no other token event.
    if FINISHED
        .iter()
        .any(|f| memchr::memmem::find(&ev[close..], f).is_some())
    {
        return None;
    }
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
        // The last token event, with the finish reason: no other event looks like it.
        assert_eq!(template(&ev("c1", "a", "\"length\"")), None);
        assert!(template(&ev("c1", "a", "null")).is_some());
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

    /// The bytes of the arm for `ev` that may vary, by part.
    fn vary(ev: &[u8]) -> (String, String) {
        let a = StreamArm::new(7, false, ev, template(ev).unwrap());
        assert_eq!(
            (a.prefix_fixed.len(), a.suffix_fixed.len()),
            (a.prefix.len(), a.suffix.len())
        );
        a.varying_runs()
    }

    #[test]
    fn the_values_of_id_and_created_may_vary() {
        // vLLM / OpenAI: id and created before the text.
        let v = br#"data: {"id":"chatcmpl-9f3a","object":"chat.completion.chunk","created":1733000000,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}

"#;
        assert_eq!(vary(v), ("chatcmpl-9f3a,1733000000".into(), String::new()));
        // llama.cpp: after it (the suffix), with spaces around the colon's value.
        let l = br#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hi"}}],"created": 1733000001,"id": "chatcmpl-Xy","model":"q","object":"chat.completion.chunk"}

"#;
        assert_eq!(vary(l), (String::new(), "1733000001,chatcmpl-Xy".into()));
        // An empty id (TGI), the model, keys that only end in "id", an id inside a string
        // value, a created that is no number or string: all fixed.
        let t = br#"data: {"object":"chat.completion.chunk","id":"","created":null,"model":"id","tool_call_id":"t1","note":"\"id\":\"z\"","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}

"#;
        assert_eq!(vary(t), (String::new(), String::new()));
        assert_eq!(vary(&ev("c1", "Hel", "null")), ("c1".into(), String::new()));
    }

    #[test]
    fn the_kernel_checks_every_word_with_a_byte_that_may_vary_and_no_other() {
        let v = br#"data: {"id":"chatcmpl-9f3a","object":"chat.completion.chunk","created":1733000000,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}

"#;
        let l = br#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hi"}}],"created": 1733000001,"id": "chatcmpl-Xy","model":"q","object":"chat.completion.chunk"}

"#;
        for ev in [&v[..], &l[..]] {
            let a = StreamArm::new(7, false, ev, template(ev).unwrap());
            for (fixed, vary) in [
                (&a.prefix_fixed, &a.prefix_vary),
                (&a.suffix_fixed, &a.suffix_vary),
            ] {
                // Each listed word is one the kernel compares and holds a varying byte; every
                // varying byte lies in a listed word.
                let compared: Vec<usize> = words(fixed.len()).collect();
                for &o in vary.iter() {
                    assert!(compared.contains(&(o as usize)));
                    assert!(fixed[o as usize..o as usize + 8].contains(&0));
                }
                for (i, _) in fixed.iter().enumerate().filter(|x| *x.1 == 0) {
                    assert!(
                        vary.iter()
                            .any(|&o| (o as usize..o as usize + 8).contains(&i)),
                        "byte {i} unchecked"
                    );
                }
            }
            assert!(!a.prefix_vary.is_empty() || !a.suffix_vary.is_empty());
        }
        // A varying value too long for the kernel's few words: the arm is exact instead.
        let long = format!(
            "data: {{\"id\":\"{}\",\"object\":\"c\",\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}},\"finish_reason\":null}}]}}\n\n",
            "x".repeat(60)
        );
        let a = StreamArm::new(
            7,
            false,
            long.as_bytes(),
            template(long.as_bytes()).unwrap(),
        );
        assert_eq!(a.varying_runs(), (String::new(), String::new()));
        assert!(a.prefix_vary.is_empty() && a.suffix_vary.is_empty());
        // Words of a part: every eighth byte, then the one ending the part.
        assert_eq!(words(16).collect::<Vec<_>>(), [0, 8]);
        assert_eq!(words(19).collect::<Vec<_>>(), [0, 8, 11]);
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
