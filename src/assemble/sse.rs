//! Server-sent-events framing over a decoded response body: finds event boundaries (a blank
//! line, with `\n`, `\r\n` or `\r` line ends) and judges each event (generated text? usage?)
//! while it streams past, without buffering the event.

use memchr::memchr2;

use super::scan::{Hit, KeyScan};

/// What one complete event carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventInfo {
    /// Non-empty generated text: a token event.
    pub(crate) token: bool,
    pub(crate) completion_tokens: Option<u32>,
    pub(crate) prompt_tokens: Option<u32>,
}

/// What the framer reports to its owner.
pub(crate) enum SseItem<'a> {
    /// A `"model"` string seen in an event (raw, still escaped).
    Model(&'a [u8]),
    /// An event ended (its blank line was just fed).
    Event(EventInfo),
}

pub(crate) struct Sse {
    scan: KeyScan,
    /// No byte of the current line seen yet: a line end now is a blank line.
    line_start: bool,
    /// The previous byte was CR, so an LF now belongs to the same line end.
    after_cr: bool,
    /// The current event has at least one line.
    in_event: bool,
    /// Part of the current event fell into a gap: drop it and resync at its end.
    lost: bool,
    info: EventInfo,
}

impl Default for Sse {
    fn default() -> Self {
        Sse {
            scan: KeyScan::default(),
            line_start: true,
            after_cr: false,
            in_event: false,
            lost: false,
            info: EventInfo::default(),
        }
    }
}

impl Sse {
    pub(crate) fn reset(&mut self) {
        *self = Sse::default();
    }

    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut impl FnMut(SseItem<'_>)) {
        while let Some(&first) = data.first() {
            if self.after_cr {
                self.after_cr = false;
                if first == b'\n' {
                    data = &data[1..];
                    continue;
                }
            }
            let Some(k) = memchr2(b'\n', b'\r', data) else {
                self.segment(data, out);
                return;
            };
            if k > 0 {
                self.segment(&data[..k], out);
            }
            self.after_cr = data[k] == b'\r';
            data = &data[k + 1..];
            if self.line_start {
                self.end_event(out);
            } else {
                self.line_start = true;
            }
        }
    }

    /// Between events: what comes next starts a new one.
    pub(crate) fn at_boundary(&self) -> bool {
        self.line_start && !self.in_event && !self.after_cr && !self.lost
    }

    /// Bytes of the body were not copied: whatever event they were part of is lost.
    pub(crate) fn skip(&mut self) {
        self.lost = true;
        self.in_event = true;
        // The gap most likely ended mid-line, so the next line end is not a blank line.
        self.line_start = false;
        self.after_cr = false;
        self.scan.reset();
    }

    fn segment(&mut self, seg: &[u8], out: &mut impl FnMut(SseItem<'_>)) {
        self.line_start = false;
        self.in_event = true;
        if self.lost {
            return;
        }
        let info = &mut self.info;
        self.scan.feed(seg, &mut |h| match h {
            Hit::Content => info.token = true,
            Hit::CompletionTokens(n) => info.completion_tokens = Some(n),
            Hit::PromptTokens(n) => info.prompt_tokens = Some(n),
            Hit::Model(m) => out(SseItem::Model(m)),
        });
    }

    fn end_event(&mut self, out: &mut impl FnMut(SseItem<'_>)) {
        if self.in_event && !self.lost {
            out(SseItem::Event(self.info));
        }
        self.info = EventInfo::default();
        self.scan.reset();
        self.in_event = false;
        self.lost = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the parts (a `None` is a gap) and lists the events as `T` (token) / `-` (other),
    /// each tagged with the index of the part that completed it.
    fn run(parts: &[Option<&[u8]>]) -> Vec<(char, usize)> {
        let mut s = Sse::default();
        let mut v = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            match p {
                Some(p) => s.feed(p, &mut |it| {
                    if let SseItem::Event(e) = it {
                        v.push((if e.token { 'T' } else { '-' }, i));
                    }
                }),
                None => s.skip(),
            }
        }
        v
    }

    const ROLE: &[u8] =
        b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    const TOK: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    const DONE: &[u8] = b"data: [DONE]\n\n";

    #[test]
    fn boundaries_and_judgement() {
        assert_eq!(
            run(&[Some(ROLE), Some(TOK), Some(DONE)]),
            [('-', 0), ('T', 1), ('-', 2)]
        );
        let merged = [ROLE, TOK, TOK, DONE].concat();
        assert_eq!(
            run(&[Some(&merged)]),
            [('-', 0), ('T', 0), ('T', 0), ('-', 0)]
        );
        // Split inside the JSON and inside the blank line: the event ends with the later part.
        let (a, b) = TOK.split_at(TOK.len() - 1);
        assert_eq!(run(&[Some(a), Some(b)]), [('T', 1)]);
        let crlf = b"data: {\"text\":\"a\"}\r\n\r\n: comment\r\n\r\ndata: x\r\rdata: {\"content\":\"b\"}\r";
        assert_eq!(
            run(&[Some(crlf), Some(b"\n\r\n")]),
            [('T', 0), ('-', 0), ('-', 0), ('T', 1)]
        );
        // Every split point of a multi-event stream keeps the same verdicts.
        let all = [ROLE, TOK, DONE].concat();
        for cut in 0..all.len() {
            let got: Vec<char> = run(&[Some(&all[..cut]), Some(&all[cut..])])
                .iter()
                .map(|e| e.0)
                .collect();
            assert_eq!(got, ['-', 'T', '-'], "cut {cut}");
        }
        // One byte per write.
        let bytes: Vec<Option<&[u8]>> = all.chunks(1).map(Some).collect();
        let got: Vec<char> = run(&bytes).iter().map(|e| e.0).collect();
        assert_eq!(got, ['-', 'T', '-']);
    }

    #[test]
    fn gap_loses_event_then_resyncs() {
        let (a, b) = TOK.split_at(20);
        let got = run(&[Some(TOK), Some(a), None, Some(&b[10..]), Some(TOK)]);
        assert_eq!(got, [('T', 0), ('T', 4)]);
    }

    #[test]
    fn usage_chunk() {
        let mut s = Sse::default();
        let mut got = Vec::new();
        s.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
            &mut |it| {
                if let SseItem::Event(e) = it {
                    got.push(e);
                }
            },
        );
        assert_eq!(
            got,
            [EventInfo {
                token: false,
                completion_tokens: Some(3),
                prompt_tokens: Some(7)
            }]
        );
    }
}
