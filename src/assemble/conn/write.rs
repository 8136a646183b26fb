//! The response side of a connection: what the server writes. Pairs responses with the
//! oldest unanswered request, skips interim responses, frames the body and routes it to SSE
//! event detection or a usage scan, and completes the request when the body ends.

use super::super::arm::{StreamArm, ARMS_PENDING, TAKE_MAX};
use super::super::body::{self, Body};
use super::super::http::{self, HeadStep};
use super::super::scan::{Hit, KeyScan};
use super::super::sse::{Sse, SseItem};
use super::super::{AssemblerConfig, UnparsedReason};
use super::{
    emit, set_resp_last, ArmState, Conn, Io, Mode, Pending, RespState, Sink, TOKEN_BYTES_KEPT,
};
use crate::event::{Inside, SockEvent};
use crate::record::Ts;

impl Conn {
    /// `edges`: whether `data` starts / ends the syscall's payload.
    pub(super) fn write(
        &mut self,
        mut data: &[u8],
        edges: (bool, bool),
        io: &Io,
        cfg: &AssemblerConfig,
        sink: &mut Sink<'_>,
    ) {
        while !data.is_empty() {
            if self.mode != Mode::Http {
                return;
            }
            // Bytes with no request to answer: a response to a request we never saw.
            let Some(front) = self.fifo.front_mut() else {
                return self.reset_response();
            };
            match &mut self.resp {
                RespState::Head => {
                    if self.resp_head.is_empty() {
                        self.resp_head_ts = io.enter;
                    }
                    let n = match self.resp_head.feed(data, cfg.max_head_bytes) {
                        HeadStep::Need => {
                            front.rec.response_bytes =
                                front.rec.response_bytes.saturating_add(data.len() as u64);
                            set_resp_last(&mut front.rec, io);
                            return;
                        }
                        HeadStep::TooLarge => {
                            return self.fail(UnparsedReason::HeaderTooLarge, sink)
                        }
                        HeadStep::Done(n) => n,
                    };
                    front.rec.response_bytes = front.rec.response_bytes.saturating_add(n as u64);
                    set_resp_last(&mut front.rec, io);
                    let head = if self.resp_head.is_empty() {
                        &data[..n]
                    } else {
                        self.resp_head.bytes()
                    };
                    let parsed = http::parse_response(head);
                    self.resp_head.clear();
                    data = &data[n..];
                    let Some(h) = parsed else {
                        return self.fail(UnparsedReason::MalformedResponse, sink);
                    };
                    if h.status == 101 || (front.connect && (200..300).contains(&h.status)) {
                        // The connection now speaks another protocol; this request is done.
                        front.rec.status = Some(h.status);
                        front.rec.timestamps.set(Ts::RespFirst, self.resp_head_ts);
                        self.complete_front(sink);
                        return self.abort(sink);
                    }
                    if h.status < 200 {
                        continue;
                    }
                    front.rec.status = Some(h.status);
                    front.rec.streaming = h.event_stream;
                    if h.event_stream {
                        front
                            .rec
                            .token_ns
                            .reserve(self.token_bytes + self.token_bytes / 8);
                    }
                    front.rec.timestamps.set(Ts::RespFirst, self.resp_head_ts);
                    match Body::new(h.framing(front.head_method)) {
                        None => self.complete_front(sink),
                        Some(body) => {
                            self.resp = RespState::Body(body);
                            self.sse.reset();
                            self.body_scan.reset();
                        }
                    }
                }
                RespState::Body(body) => {
                    let between_events = self.sse.at_boundary();
                    let Ok(st) = body.step(data) else {
                        return self.fail(UnparsedReason::ChunkedFraming, sink);
                    };
                    front.rec.response_bytes =
                        front.rec.response_bytes.saturating_add(st.consumed as u64);
                    set_resp_last(&mut front.rec, io);
                    if !st.data.is_empty() {
                        let (events, tokens) =
                            deliver(&mut self.sse, &mut self.body_scan, front, st.data, io);
                        // One whole token event: what the next ones may look like.
                        if (events, tokens) == (1, 1) && between_events && self.sse.at_boundary() {
                            let id = (self.ident.sock_id, body.is_chunked());
                            consider_arm(&mut self.arm, st.data, id, sink);
                        }
                    }
                    data = &data[st.consumed..];
                    if st.done {
                        self.complete_front(sink);
                    }
                }
                RespState::Lost => {
                    if edges.0 && body::starts_with_size_line(data) {
                        // One event per chunk is the norm, so a chunk start is an event start.
                        self.resp = RespState::Body(Body::Chunked(Default::default()));
                        self.sse.reset();
                        continue;
                    }
                    front.rec.response_bytes =
                        front.rec.response_bytes.saturating_add(data.len() as u64);
                    set_resp_last(&mut front.rec, io);
                    // The last chunk and the terminator ending the payload end the body.
                    if edges.1 && data.ends_with(b"\r\n0\r\n\r\n") {
                        self.complete_front(sink);
                    }
                    return;
                }
            }
        }
    }

    pub(super) fn write_gap(&mut self, n: u64, io: &Io, sink: &mut Sink<'_>) {
        if self.mode != Mode::Http {
            return;
        }
        let Some(front) = self.fifo.front_mut() else {
            return self.reset_response();
        };
        let body = match &mut self.resp {
            RespState::Body(body) => body,
            RespState::Head => return self.fail(UnparsedReason::Truncated, sink),
            RespState::Lost => {
                front.rec.response_bytes = front.rec.response_bytes.saturating_add(n);
                return;
            }
        };
        let Ok((used, done)) = body.skip(n) else {
            // Only chunk framing can be lost in a gap.
            front.rec.response_bytes = front.rec.response_bytes.saturating_add(n);
            set_resp_last(&mut front.rec, io);
            self.resp = RespState::Lost;
            self.sse.skip();
            return;
        };
        front.rec.response_bytes = front.rec.response_bytes.saturating_add(used);
        set_resp_last(&mut front.rec, io);
        self.sse.skip();
        self.body_scan.reset();
        if done {
            self.complete_front(sink);
            if used < n {
                if self.fifo.is_empty() {
                    self.reset_response();
                } else {
                    self.fail(UnparsedReason::Truncated, sink);
                }
            }
        }
    }

    /// Token writes the kernel counted (an armed stream): each was one whole token event, so
    /// they continue the response from an event boundary. Anywhere else they are a gap.
    pub(crate) fn on_tokens(&mut self, ev: &SockEvent<'_>, sink: &mut Sink<'_>) {
        let starts = ev.token_starts();
        let bytes = ev.ret.max(0) as u64;
        let writes = starts.len() as u64;
        sink.stats.token_writes += writes;
        let io = Io {
            enter: ev.ts_enter,
            exit: ev.ts_exit,
            queued: None,
            net: Default::default(),
            tgid: ev.tgid,
            cgroup: ev.cgroup_id,
            inside: Inside::default(),
        };
        if self.mode != Mode::Http {
            return;
        }
        let Some(front) = self.fifo.front_mut() else {
            return self.reset_response();
        };
        let body = match &mut self.resp {
            RespState::Body(b)
                if front.rec.streaming && self.sse.at_boundary() && b.can_take_whole(bytes) =>
            {
                b
            }
            // Before a response head: writes of no response we know of (counts left from an
            // earlier socket at the same address, a race): dropped, the connection kept.
            RespState::Head => {
                sink.stats.token_writes_misplaced += writes;
                return;
            }
            _ => {
                sink.stats.token_writes_misplaced += writes;
                return self.write_gap(bytes, &io, sink);
            }
        };
        // The kernel's arm fits this response: none is made from its events (its last token,
        // with the finish reason, would make one that fits no other).
        self.arm.done = true;
        // The record carries the counters of its first write: they mark the response's first
        // token if it is that write (`token` keeps the first token's marks only).
        let mut last = ev.ts_enter;
        for (i, t) in starts.enumerate() {
            front.token(t, if i == 0 { ev.inside } else { Inside::default() });
            last = t;
        }
        front.rec.response_bytes = front.rec.response_bytes.saturating_add(bytes);
        front.rec.timestamps.set(Ts::RespLast, last);
        if body.take_whole(bytes) {
            self.complete_front(sink);
        }
    }

    fn complete_front(&mut self, sink: &mut Sink<'_>) {
        self.reset_response();
        if let Some(p) = self.fifo.pop_front() {
            self.token_bytes = p.rec.token_ns.packed_bytes().min(TOKEN_BYTES_KEPT);
            emit(&self.ident, p, false, sink);
        }
    }
}

/// A whole token event of the current response (`id`: the connection's sock id, whether the
/// body is chunked): when it gives a template (arm.rs), the connection is armed for the rest of
/// this response and for the later ones of the same shape. A response whose token writes the
/// kernel counts from the start shows no whole token event here, and is not armed again.
fn consider_arm(st: &mut ArmState, event: &[u8], id: (u64, bool), sink: &mut Sink<'_>) {
    /// Events tried per response before giving up on it.
    const TRIES: u8 = 4;
    let Some(arms) = sink.arms.as_deref_mut() else {
        return;
    };
    if st.done || event.len() > TAKE_MAX || arms.len() >= ARMS_PENDING {
        return;
    }
    let Some(t) = super::super::arm::template(event) else {
        st.tries += 1;
        st.done = st.tries >= TRIES;
        return;
    };
    arms.push(StreamArm::new(id.0, id.1, event, t));
    sink.stats.streams_armed += 1;
    st.done = true;
}

/// Routes decoded response body bytes: SSE framing for event streams, a key scan otherwise.
/// Returns (events ended, token events among them).
fn deliver(
    sse: &mut Sse,
    body_scan: &mut KeyScan,
    p: &mut Pending,
    data: &[u8],
    io: &Io,
) -> (u32, u32) {
    let (mut events, mut tokens) = (0, 0);
    if p.rec.streaming {
        sse.feed(data, &mut |it| match it {
            SseItem::Model(m) => p.model_fallback(m),
            SseItem::Event(e) => {
                events += 1;
                if e.token {
                    tokens += 1;
                    p.token(io.enter, io.inside);
                }
                if e.completion_tokens.is_some() {
                    p.completion_tokens = e.completion_tokens;
                }
                if e.prompt_tokens.is_some() {
                    p.rec.prompt_tokens = e.prompt_tokens;
                }
            }
        });
    } else {
        body_scan.feed(data, &mut |h| match h {
            Hit::Model(m) => p.model_fallback(m),
            Hit::CompletionTokens(n) => p.completion_tokens = Some(n),
            Hit::PromptTokens(n) => p.rec.prompt_tokens = Some(n),
            Hit::Content => {}
        });
    }
    (events, tokens)
}
