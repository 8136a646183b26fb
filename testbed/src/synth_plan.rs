//! What the synthetic server says and how it cuts it into writes: request parameters,
//! vLLM-shaped JSON bodies and SSE chunks, and the write plan per `WriteMode`.
//! Pure functions, so the byte layout is unit-tested without sockets.

use crate::http;
use crate::synth::WriteMode;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Generated text: short words, each one token.
const WORDS: &[&str] = &[
    " the", " model", " says", " hello", " to", " every", " token", " it", " streams", " back",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Chat,
    Completions,
}

/// The request fields the server acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub include_usage: bool,
    pub prompt_bytes: u64,
}

pub fn parse_params(body: &[u8], route: RouteKind) -> Result<Params> {
    let v: Value = serde_json::from_slice(body).context("request body is not JSON")?;
    if !v.is_object() {
        bail!("request body is not a JSON object");
    }
    let max_tokens = match v.get("max_tokens").or(v.get("max_completion_tokens")) {
        None | Some(Value::Null) => None,
        Some(m) => Some(
            m.as_u64()
                .context("max_tokens must be a non-negative integer")?,
        ),
    };
    let prompt_bytes = match route {
        RouteKind::Chat => {
            let msgs = v["messages"]
                .as_array()
                .context("'messages' must be an array")?;
            msgs.iter().map(|m| text_len(&m["content"])).sum()
        }
        RouteKind::Completions => {
            if v.get("prompt").is_none() {
                bail!("'prompt' is required");
            }
            text_len(&v["prompt"])
        }
    };
    Ok(Params {
        model: v["model"].as_str().map(str::to_string),
        stream: v["stream"].as_bool().unwrap_or(false),
        max_tokens,
        include_usage: v["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
        prompt_bytes,
    })
}

/// Bytes of text in a content value: a string, an array of strings, or an array of
/// `{"type":"text","text":..}` parts.
fn text_len(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                p.as_str()
                    .or(p["text"].as_str())
                    .map_or(0, |s| s.len() as u64)
            })
            .sum(),
        _ => 0,
    }
}

/// What one generation needs to render its output.
pub struct GenContext<'a> {
    pub id: u64,
    /// `--escaped-ids`: see [`GenContext::completion_id`].
    pub escaped_ids: bool,
    pub model: &'a str,
    pub route: RouteKind,
    pub tokens: u64,
    pub prompt_tokens: u64,
}

impl GenContext<'_> {
    /// The id's JSON string body, as written: `chatcmpl-<n>` (`cmpl-` for completions). With
    /// `escaped_ids`, four bytes after the dash of equal length whatever `n`: `n % 4 == 0`
    /// gives `n`'s last four digits, the others put a JSON escape (`\"`, `\\`, both) where
    /// digits would be — bytes a kernel-counted template must not take for varying digits.
    pub fn completion_id(&self) -> String {
        let base = match self.route {
            RouteKind::Chat => "chatcmpl-",
            RouteKind::Completions => "cmpl-",
        };
        let n = self.id;
        if !self.escaped_ids {
            return format!("{base}{n}");
        }
        match n % 4 {
            0 => format!("{base}{:04}", n % 10_000),
            1 => format!("{base}\\\"{:02}", n % 100),
            2 => format!("{base}\\\\{:02}", n % 100),
            _ => format!("{base}\\\"\\\\"),
        }
    }

    /// The fields every body and chunk starts with, in vLLM's order (serde_json
    /// would sort keys; a real server's field order is what the agent should see).
    fn prefix(&self, object: &str) -> String {
        let id = self.completion_id();
        format!(
            r#"{{"id":"{id}","object":"{object}","created":{},"model":{}"#,
            created(),
            js(self.model)
        )
    }

    fn usage(&self) -> String {
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt_tokens,
            self.tokens,
            self.prompt_tokens + self.tokens
        )
    }

    fn text(&self) -> String {
        (0..self.tokens).map(word).collect()
    }

    fn chunk_object(&self) -> &'static str {
        match self.route {
            RouteKind::Chat => "chat.completion.chunk",
            RouteKind::Completions => "text_completion",
        }
    }
}

/// A JSON string literal.
fn js(s: &str) -> String {
    Value::from(s).to_string()
}

fn word(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Body of a non-streaming response, with usage.
pub fn full_body(ctx: &GenContext) -> Vec<u8> {
    let text = js(&ctx.text());
    let (object, choice) = match ctx.route {
        RouteKind::Chat => (
            "chat.completion",
            format!(
                r#"{{"index":0,"message":{{"role":"assistant","content":{text}}},"logprobs":null,"finish_reason":"length"}}"#
            ),
        ),
        RouteKind::Completions => (
            "text_completion",
            format!(r#"{{"index":0,"text":{text},"logprobs":null,"finish_reason":"length"}}"#),
        ),
    };
    format!(
        r#"{},"choices":[{choice}],"usage":{}}}"#,
        ctx.prefix(object),
        ctx.usage()
    )
    .into_bytes()
}

/// One SSE event and when (after decode start) it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `data: ...\n\n`
    pub data: Vec<u8>,
    pub content: bool,
    pub at: Duration,
}

/// The SSE events of a streamed response, vLLM order: role chunk (chat), one chunk
/// per token (`decode` apart, the first at once), optional usage chunk, `[DONE]`.
pub fn stream_events(ctx: &GenContext, include_usage: bool, decode: Duration) -> Vec<Event> {
    let prefix = ctx.prefix(ctx.chunk_object());
    let event = |choices: &str, content: bool, at: Duration| Event {
        data: format!("data: {prefix},\"choices\":[{choices}]}}\n\n").into_bytes(),
        content,
        at,
    };
    let mut out = Vec::new();
    if ctx.route == RouteKind::Chat {
        let role = r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#;
        out.push(event(role, false, Duration::ZERO));
    }
    for i in 0..ctx.tokens {
        let finish = if i + 1 == ctx.tokens {
            r#""length""#
        } else {
            "null"
        };
        let w = js(word(i));
        let choice = match ctx.route {
            RouteKind::Chat => format!(
                r#"{{"index":0,"delta":{{"content":{w}}},"logprobs":null,"finish_reason":{finish}}}"#
            ),
            RouteKind::Completions => {
                format!(r#"{{"index":0,"text":{w},"logprobs":null,"finish_reason":{finish}}}"#)
            }
        };
        out.push(event(&choice, true, decode * i as u32));
    }
    let end = decode * ctx.tokens.saturating_sub(1) as u32;
    if include_usage {
        out.push(Event {
            data: format!(
                "data: {prefix},\"choices\":[],\"usage\":{}}}\n\n",
                ctx.usage()
            )
            .into_bytes(),
            content: false,
            at: end,
        });
    }
    out.push(Event {
        data: b"data: [DONE]\n\n".to_vec(),
        content: false,
        at: end,
    });
    out
}

/// One planned write: a whole chunk (size line + data + CRLF) for a single syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWrite {
    pub data: Vec<u8>,
    pub at: Duration,
    /// Content events whose first byte / last byte this write carries.
    pub content_starts: usize,
    pub content_ends: usize,
}

pub fn plan_writes(events: &[Event], mode: WriteMode) -> Vec<PlannedWrite> {
    let c = |e: &Event| usize::from(e.content);
    match mode {
        WriteMode::One => events
            .iter()
            .map(|e| PlannedWrite {
                data: http::chunk(&e.data),
                at: e.at,
                content_starts: c(e),
                content_ends: c(e),
            })
            .collect(),
        WriteMode::Split => events
            .iter()
            .flat_map(|e| {
                // Cut mid-JSON: the reader must join chunks before it can see the event.
                let mid = e.data.len() / 2;
                [
                    PlannedWrite {
                        data: http::chunk(&e.data[..mid]),
                        at: e.at,
                        content_starts: c(e),
                        content_ends: 0,
                    },
                    PlannedWrite {
                        data: http::chunk(&e.data[mid..]),
                        at: e.at,
                        content_starts: 0,
                        content_ends: c(e),
                    },
                ]
            })
            .collect(),
        WriteMode::Merge => events
            .chunks(2)
            .map(|pair| {
                let data: Vec<u8> = pair.iter().flat_map(|e| e.data.clone()).collect();
                let n: usize = pair.iter().map(c).sum();
                PlannedWrite {
                    data: http::chunk(&data),
                    // A merged write waits for the later of its two events.
                    at: pair.iter().map(|e| e.at).max().unwrap_or_default(),
                    content_starts: n,
                    content_ends: n,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{classify_event, ChunkedDecoder, SseParser};

    fn ctx(route: RouteKind, tokens: u64) -> GenContext<'static> {
        GenContext {
            id: 7,
            escaped_ids: false,
            model: "m1",
            route,
            tokens,
            prompt_tokens: 5,
        }
    }

    #[test]
    fn params() {
        let p = parse_params(
            br#"{"model":"x","stream":true,"max_tokens":3,"stream_options":{"include_usage":true},
                 "messages":[{"role":"user","content":"hello"},{"role":"user","content":[{"type":"text","text":"ab"}]}]}"#,
            RouteKind::Chat,
        )
        .unwrap();
        assert_eq!(
            p,
            Params {
                model: Some("x".into()),
                stream: true,
                max_tokens: Some(3),
                include_usage: true,
                prompt_bytes: 7
            }
        );
        let p = parse_params(br#"{"prompt":"abc"}"#, RouteKind::Completions).unwrap();
        assert!(!p.stream && p.max_tokens.is_none() && p.prompt_bytes == 3);
        assert!(parse_params(b"nope", RouteKind::Chat).is_err());
        assert!(parse_params(br#"{"prompt":"a"}"#, RouteKind::Chat).is_err());
        assert!(
            parse_params(br#"{"prompt":"a","max_tokens":-1}"#, RouteKind::Completions).is_err()
        );
    }

    /// Decode the planned writes as a client would and classify the events.
    fn decode(writes: &[PlannedWrite]) -> Vec<crate::http::EventInfo> {
        let wire: Vec<u8> = writes.iter().flat_map(|w| w.data.clone()).collect();
        let mut body = Vec::new();
        ChunkedDecoder::default().feed(&wire, &mut body).unwrap();
        let mut out = Vec::new();
        SseParser::default().feed(&body, |d| out.push(classify_event(d)));
        out
    }

    #[test]
    fn all_modes_carry_same_events() {
        for route in [RouteKind::Chat, RouteKind::Completions] {
            let events = stream_events(&ctx(route, 5), true, Duration::from_millis(2));
            let extra = usize::from(route == RouteKind::Chat);
            assert_eq!(events.len(), 5 + 2 + extra);
            for mode in [WriteMode::One, WriteMode::Split, WriteMode::Merge] {
                let plan = plan_writes(&events, mode);
                let infos = decode(&plan);
                assert_eq!(infos.iter().filter(|i| i.content).count(), 5);
                assert_eq!(
                    infos.iter().filter_map(|i| i.completion_tokens).next(),
                    Some(5)
                );
                assert!(infos.last().unwrap().done);
                assert_eq!(plan.iter().map(|w| w.content_ends).sum::<usize>(), 5);
                assert_eq!(plan.iter().map(|w| w.content_starts).sum::<usize>(), 5);
                let expected_writes = match mode {
                    WriteMode::One => events.len(),
                    WriteMode::Split => events.len() * 2,
                    WriteMode::Merge => events.len().div_ceil(2),
                };
                assert_eq!(plan.len(), expected_writes);
                assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
            }
        }
    }

    #[test]
    fn role_chunk_first_and_timing() {
        let events = stream_events(&ctx(RouteKind::Chat, 3), false, Duration::from_millis(10));
        assert!(!events[0].content);
        assert!(String::from_utf8_lossy(&events[0].data).contains(r#""role":"assistant""#));
        let at: Vec<u64> = events.iter().map(|e| e.at.as_millis() as u64).collect();
        assert_eq!(at, vec![0, 0, 10, 20, 20]);
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_slice(&e.data[6..]).unwrap();
            assert_eq!(v["model"], "m1");
        }
        let chat: Value = serde_json::from_slice(&full_body(&ctx(RouteKind::Chat, 2))).unwrap();
        assert_eq!(chat["choices"][0]["message"]["content"], " the model");
        let body: Value =
            serde_json::from_slice(&full_body(&ctx(RouteKind::Completions, 2))).unwrap();
        assert_eq!(body["choices"][0]["text"], " the model");
        assert_eq!(body["usage"]["completion_tokens"], 2);
        assert_eq!(body["model"], "m1");
    }

    #[test]
    fn escaped_ids_are_valid_json_of_one_length() {
        let mut seen = Vec::new();
        for id in [0, 1, 2, 3, 4, 97, 12_345] {
            let c = GenContext {
                id,
                escaped_ids: true,
                ..ctx(RouteKind::Chat, 2)
            };
            let raw = c.completion_id();
            assert_eq!(raw.len(), "chatcmpl-".len() + 4, "{raw}");
            let ev = &stream_events(&c, false, Duration::ZERO)[1];
            let v: Value = serde_json::from_slice(&ev.data[6..]).unwrap();
            let id_value = v["id"].as_str().unwrap().to_string();
            assert_eq!(id_value.contains(['"', '\\']), id % 4 != 0, "{raw}");
            seen.push(id_value);
        }
        assert_eq!(
            seen[..4],
            [
                "chatcmpl-0000",
                "chatcmpl-\"01",
                "chatcmpl-\\02",
                "chatcmpl-\"\\"
            ]
        );
        let plain = GenContext {
            id: 12_345,
            ..ctx(RouteKind::Completions, 1)
        };
        assert_eq!(plain.completion_id(), "cmpl-12345");
    }
}
