//! The `Sim` test driver and traffic builders shared by the assembler's tests, and the
//! request-side end-to-end tests: keep-alive, pipelining, split heads, large gapped bodies,
//! `model` extraction and read timestamps.

use std::net::SocketAddr;

use super::*;
use crate::event::EventKind;
use crate::record::Ts;

pub(super) const SOCK: u64 = 0xffff_8880_1234_5600;

/// The process and connection addresses of an event.
pub(super) struct Who {
    pub(super) tgid: u32,
    pub(super) comm: &'static str,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
}

impl Who {
    pub(super) fn server() -> Who {
        Who {
            tgid: 4242,
            comm: "vllm-server",
            local: "10.0.0.2:8000".parse().unwrap(),
            remote: "10.0.0.9:51234".parse().unwrap(),
        }
    }
}

/// Drives an `Assembler` with synthetic events on an advancing clock and collects records.
pub(super) struct Sim {
    pub(super) a: Assembler,
    pub(super) recs: Vec<RequestRecord>,
    pub(super) t: u64,
    /// `queued_ts` for the next read.
    pub(super) queued: Option<u64>,
    /// Packet-path stamps for the next event.
    pub(super) net: Option<crate::event::NetStamps>,
    /// Cumulative counters for the next event.
    pub(super) inside: Option<crate::event::Inside>,
}

impl Sim {
    pub(super) fn new() -> Sim {
        Sim::with(AssemblerConfig::default())
    }
    pub(super) fn with(cfg: AssemblerConfig) -> Sim {
        Sim {
            a: Assembler::new(cfg),
            recs: Vec::new(),
            t: 1_000_000,
            queued: None,
            net: None,
            inside: None,
        }
    }

    /// One event; returns its (ts_enter, ts_exit).
    pub(super) fn ev(
        &mut self,
        kind: EventKind,
        sock: u64,
        ret: i64,
        head: &[u8],
        tail: &[u8],
    ) -> (u64, u64) {
        self.ev_as(&Who::server(), kind, sock, ret, head, tail)
    }

    /// One event of process `who` on its connection `who.local`–`who.remote`.
    pub(super) fn ev_as(
        &mut self,
        who: &Who,
        kind: EventKind,
        sock: u64,
        ret: i64,
        head: &[u8],
        tail: &[u8],
    ) -> (u64, u64) {
        let (enter, exit) = (self.t, self.t + 7);
        self.t += 1000;
        let (local, remote) = (who.local, who.remote);
        let ev = SockEvent {
            kind,
            ts_enter: enter,
            ts_exit: exit,
            sock_id: sock,
            queued_ts: if kind == EventKind::Read {
                self.queued.take()
            } else {
                None
            },
            tgid: who.tgid,
            tid: who.tgid + 1,
            fd: 17,
            cgroup_id: 99,
            ret,
            local,
            remote,
            comm: who.comm,
            head,
            tail,
            net: self.net.take().unwrap_or_default(),
            inside: self.inside.take().unwrap_or_default(),
        };
        let recs = &mut self.recs;
        self.a.on_event(&ev, &mut |r| recs.push(r));
        (enter, exit)
    }
    pub(super) fn accept(&mut self, sock: u64) -> (u64, u64) {
        self.ev(EventKind::Accept, sock, 17, b"", b"")
    }
    pub(super) fn close(&mut self, sock: u64) -> (u64, u64) {
        self.ev(EventKind::Close, sock, 0, b"", b"")
    }
    pub(super) fn read(&mut self, sock: u64, b: &[u8]) -> (u64, u64) {
        self.ev(EventKind::Read, sock, b.len() as i64, b, b"")
    }
    pub(super) fn write(&mut self, sock: u64, b: &[u8]) -> (u64, u64) {
        self.ev(EventKind::Write, sock, b.len() as i64, b, b"")
    }
    /// A syscall of `ret` bytes of which only the first `head` and last `tail` were copied.
    pub(super) fn gapped(
        &mut self,
        kind: EventKind,
        sock: u64,
        data: &[u8],
        head: usize,
        tail: usize,
    ) -> (u64, u64) {
        let tail_from = data.len() - tail;
        self.ev(
            kind,
            sock,
            data.len() as i64,
            &data[..head],
            &data[tail_from..],
        )
    }
    pub(super) fn unparsed(&self, r: UnparsedReason) -> u64 {
        self.a.stats().unparsed[r as usize]
    }
    pub(super) fn total_unparsed(&self) -> u64 {
        self.a.stats().unparsed.iter().sum()
    }
}

pub(super) fn chat_request(body_extra: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"llama-3-8b","stream":true,"messages":[{{"role":"user","content":"hello"}}]{body_extra}}}"#
    );
    format!("POST /v1/chat/completions?debug=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

pub(super) const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n";

pub(super) fn sse_event(json: &str) -> Vec<u8> {
    format!("data: {json}\n\n").into_bytes()
}
pub(super) fn role_event() -> Vec<u8> {
    sse_event(
        r#"{"id":"c1","object":"chat.completion.chunk","model":"llama-3-8b","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
    )
}
pub(super) fn token_event(text: &str) -> Vec<u8> {
    sse_event(&format!(
        r#"{{"id":"c1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":null}}]}}"#
    ))
}
pub(super) fn usage_event() -> Vec<u8> {
    sse_event(
        r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":11,"total_tokens":53,"completion_tokens":42}}"#,
    )
}

pub(super) fn sse_prefix(s: &mut Sim) {
    s.accept(SOCK);
    s.read(SOCK, &chat_request(""));
    s.write(SOCK, SSE_HEAD);
}

pub(super) fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

#[test]
fn keep_alive_three_requests() {
    let mut s = Sim::new();
    s.accept(SOCK);
    for i in 0..3 {
        let rd = s.read(SOCK, &chat_request("")).1;
        s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        let end = s.write(SOCK, b"{}\n").0;
        let r = &s.recs[i];
        assert_eq!(r.id, i as u64 + 1);
        assert_eq!(
            (
                r.timestamps.get(Ts::ReadFirst),
                r.timestamps.get(Ts::RespLast)
            ),
            (Some(rd), Some(end))
        );
        assert_eq!(
            r.timestamps.get(Ts::Accepted).is_some(),
            i == 0,
            "accept belongs to the first request"
        );
    }
    s.close(SOCK);
    assert_eq!(s.recs.len(), 3);
    assert!(s
        .recs
        .iter()
        .all(|r| !r.aborted && r.model.as_deref() == Some("llama-3-8b")));
}

#[test]
fn pipelined_requests_in_one_read() {
    let mut s = Sim::new();
    s.accept(SOCK);
    let both = [
        &b"GET /a HTTP/1.1\r\n\r\n"[..],
        b"HEAD /b HTTP/1.1\r\n\r\n",
        &chat_request("")[..30],
    ]
    .concat();
    let rd = s.read(SOCK, &both).1;
    s.read(SOCK, &chat_request("")[30..]);
    let w = s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nAHTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
    assert_eq!(s.recs.len(), 3);
    let paths: Vec<_> = s.recs.iter().map(|r| r.path.clone().unwrap()).collect();
    assert_eq!(paths, ["/a", "/b", "/v1/chat/completions"]);
    assert_eq!(s.recs[0].timestamps.get(Ts::ReadFirst), Some(rd));
    assert_eq!(s.recs[1].timestamps.get(Ts::ReadFirst), Some(rd));
    assert_eq!(s.recs[2].timestamps.get(Ts::ReadDone), Some(rd + 1000));
    assert!(s
        .recs
        .iter()
        .all(|r| r.timestamps.get(Ts::RespLast) == Some(w.0)));
    assert_eq!(
        s.recs[1].response_bytes, 40,
        "HEAD response has no body despite Content-Length"
    );
    assert_eq!(s.recs[2].status, Some(204));
    assert_eq!((s.recs[0].request_bytes, s.recs[1].request_bytes), (19, 20));
}

#[test]
fn request_head_one_byte_per_read() {
    let mut s = Sim::new();
    s.accept(SOCK);
    let req = chat_request("");
    s.queued = Some(999_000);
    let first = s.read(SOCK, &req[..1]).1;
    let mut last = 0;
    for b in req[1..].chunks(1) {
        last = s.read(SOCK, b).1;
    }
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let r = &s.recs[0];
    assert_eq!(
        (
            r.timestamps.get(Ts::ReadFirst),
            r.timestamps.get(Ts::ReadDone)
        ),
        (Some(first), Some(last))
    );
    assert_eq!(r.timestamps.get(Ts::SockQueued), Some(999_000));
    assert_eq!(
        (r.model.as_deref(), r.request_bytes),
        (Some("llama-3-8b"), req.len() as u64)
    );
}

#[test]
fn sock_queued_after_read_is_ignored() {
    let mut s = Sim::new();
    s.queued = Some(u64::MAX);
    s.read(SOCK, b"GET / HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(s.recs[0].timestamps.get(Ts::SockQueued), None);
    assert_eq!(s.recs[0].origin, Some("read_first"));
}

fn big_body(model_first: bool) -> Vec<u8> {
    let filler = "x".repeat(1 << 20);
    let body = if model_first {
        format!(r#"{{"model":"qwen2.5-72b","messages":[{{"role":"user","content":"{filler}"}}]}}"#)
    } else {
        format!(
            r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model" : "qwen2.5-72b"}}"#
        )
    };
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn megabyte_body_with_gap_model_at_end_and_start() {
    for model_first in [false, true] {
        let mut s = Sim::new();
        s.accept(SOCK);
        let req = big_body(model_first);
        // Two reads, each copying only 4 KiB at each end.
        let half = req.len() / 2;
        s.gapped(EventKind::Read, SOCK, &req[..half], 4096, 4096);
        let done = s.gapped(EventKind::Read, SOCK, &req[half..], 4096, 4096).1;
        s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        let r = &s.recs[0];
        assert_eq!(
            r.model.as_deref(),
            Some("qwen2.5-72b"),
            "model_first={model_first}"
        );
        assert_eq!(r.request_bytes, req.len() as u64);
        assert_eq!(r.timestamps.get(Ts::ReadDone), Some(done));
        assert_eq!(s.total_unparsed(), 0);
    }
}

#[test]
fn model_key_straddles_two_reads() {
    let req = chat_request("");
    let at = req.windows(7).position(|w| w == b"\"model\"").unwrap();
    for cut in at..at + 22 {
        let mut s = Sim::new();
        s.read(SOCK, &req[..cut]);
        s.read(SOCK, &req[cut..]);
        s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(s.recs[0].model.as_deref(), Some("llama-3-8b"), "cut {cut}");
    }
}

#[test]
fn chunked_request_body() {
    let mut s = Sim::new();
    let body = br#"{"prompt":"p","model":"m7"}"#;
    let mut req = b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend(chunk(&body[..12]));
    req.extend(chunk(&body[12..]));
    req.extend(b"0\r\n\r\n");
    s.read(SOCK, &req);
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        (s.recs[0].model.as_deref(), s.recs[0].request_bytes),
        (Some("m7"), req.len() as u64)
    );
}

#[test]
fn network_stamps_join_the_request_in_path_order() {
    use crate::event::NetStamps;
    let mut s = Sim::new();
    s.net = Some(NetStamps {
        syn: Some(10),
        established: Some(20),
        ..Default::default()
    });
    s.accept(SOCK);
    let t = s.t;
    s.queued = Some(t - 100);
    // A stale pod_in (after sock_queued) must be dropped; node_in and nat_done kept.
    s.net = Some(NetStamps {
        node_in: Some(t - 500),
        nat_done: Some(t - 400),
        pod_in: Some(t - 50),
        ..Default::default()
    });
    let req = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
    s.ev(EventKind::Read, SOCK, req.len() as i64, req, b"");
    let w = s.t;
    s.net = Some(NetStamps {
        pod_out: Some(w + 3),
        node_out: Some(w + 5),
        ..Default::default()
    });
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    s.ev(EventKind::Write, SOCK, resp.len() as i64, resp, b"");
    assert_eq!(s.recs.len(), 1);
    let ts = &s.recs[0].timestamps;
    assert_eq!(ts.get(Ts::Syn), Some(10));
    assert_eq!(ts.get(Ts::Established), Some(20));
    assert_eq!(ts.get(Ts::NodeIn), Some(t - 500));
    assert_eq!(ts.get(Ts::NatDone), Some(t - 400));
    assert_eq!(
        ts.get(Ts::PodIn),
        None,
        "a stamp after sock_queued is not this request's"
    );
    assert_eq!(ts.get(Ts::PodOut), Some(w + 3));
    assert_eq!(ts.get(Ts::NodeOut), Some(w + 5));
    assert_eq!(s.recs[0].origin, Some("node_in"));
}

#[test]
fn the_read_that_completes_a_request_says_when_its_last_bytes_arrived() {
    use crate::event::NetStamps;
    let mut s = Sim::new();
    s.accept(SOCK);
    let req = chat_request("");
    let (a, b) = req.split_at(req.len() - 10);
    s.queued = Some(s.t - 100);
    s.net = Some(NetStamps {
        queued_last: Some(s.t - 100),
        ..Default::default()
    });
    s.read(SOCK, a);
    let last = s.t + 500;
    s.t += 1000;
    s.net = Some(NetStamps {
        queued_last: Some(last),
        ..Default::default()
    });
    let done = s.read(SOCK, b).1;
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let ts = &s.recs[0].timestamps;
    assert_eq!(ts.get(Ts::SockQueuedLast), Some(last));
    assert_eq!(ts.get(Ts::ReadDone), Some(done));
    // In one piece: no separate last arrival.
    let mut s = Sim::new();
    s.accept(SOCK);
    s.queued = Some(s.t - 100);
    s.net = Some(NetStamps {
        queued_last: Some(s.t - 100),
        ..Default::default()
    });
    s.read(SOCK, &req);
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(s.recs[0].timestamps.get(Ts::SockQueuedLast), None);
}
