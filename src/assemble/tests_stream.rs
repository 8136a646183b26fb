//! End-to-end tests of response handling: streaming chat completions over every chunked
//! write pattern, SSE events split and merged across writes, non-streaming bodies, and the
//! guarantee that no prompt or completion text reaches a record.

use super::tests::*;
use crate::event::EventKind;
use crate::record::{Stage, Ts};

#[derive(Clone, Copy, Debug)]
enum Style {
    /// Size line, data and CRLF as three writes.
    Separate,
    /// hyper-style writev: one write per chunk.
    Writev,
    /// One write per chunk, but the size line's digits split across two writes.
    SplitSize,
}

/// A streaming chat completion: role chunk, `n` content chunks, usage chunk, [DONE].
fn streaming_case(style: Style) {
    let mut s = Sim::new();
    let (_, acc) = s.accept(SOCK);
    s.queued = Some(1_000_500);
    let (_, read_at) = s.read(SOCK, &chat_request(""));
    let (head_enter, _) = s.write(SOCK, SSE_HEAD);
    let mut events = vec![role_event()];
    for w in ["Hel", "lo", " \\\"world\\\""] {
        events.push(token_event(w));
    }
    events.push(usage_event());
    events.push(sse_event("[DONE]"));
    let mut token_ts = Vec::new();
    let mut bytes = SSE_HEAD.len() as u64;
    for (i, e) in events.iter().enumerate() {
        let c = chunk(e);
        bytes += c.len() as u64;
        let data_write = match style {
            Style::Separate => {
                let line = c.iter().position(|&b| b == b'\n').unwrap() + 1;
                s.write(SOCK, &c[..line]);
                let w = s.write(SOCK, e);
                s.write(SOCK, b"\r\n");
                w
            }
            Style::Writev => s.write(SOCK, &c),
            Style::SplitSize => {
                s.write(SOCK, &c[..1]);
                s.write(SOCK, &c[1..])
            }
        };
        if (1..=3).contains(&i) {
            token_ts.push(data_write.0);
        }
    }
    assert!(
        s.recs.is_empty(),
        "{style:?}: no record before the terminator"
    );
    let (last_enter, _) = s.write(SOCK, b"0\r\n\r\n");
    bytes += 5;
    assert_eq!(s.recs.len(), 1, "{style:?}");
    let r = &s.recs[0];
    assert_eq!(r.id, 1);
    assert_eq!(
        (r.method.as_deref(), r.path.as_deref()),
        (Some("POST"), Some("/v1/chat/completions"))
    );
    assert_eq!(r.model.as_deref(), Some("llama-3-8b"));
    assert_eq!((r.status, r.streaming, r.aborted), (Some(200), true, false));
    assert_eq!(r.output_events, 3, "{style:?}");
    assert_eq!((r.output_tokens, r.prompt_tokens), (Some(42), Some(11)));
    assert_eq!(r.token_ns, token_ts, "{style:?}");
    assert_eq!(r.request_bytes, chat_request("").len() as u64);
    assert_eq!(r.response_bytes, bytes);
    let ts = &r.timestamps;
    assert_eq!(ts.get(Ts::Accepted), Some(acc));
    assert_eq!(ts.get(Ts::SockQueued), Some(1_000_500));
    assert_eq!(
        (ts.get(Ts::ReadFirst), ts.get(Ts::ReadDone)),
        (Some(read_at), Some(read_at))
    );
    assert_eq!(ts.get(Ts::RespFirst), Some(head_enter));
    assert_eq!(ts.get(Ts::Token1), Some(token_ts[0]));
    assert_eq!(ts.get(Ts::TokenN), Some(token_ts[2]));
    assert_eq!(ts.get(Ts::RespLast), Some(last_enter));
    assert_eq!(
        (r.pid, r.comm.as_str(), r.cgroup_id, r.sock_id),
        (4242, "vllm-server", 99, SOCK)
    );
    // In the JSON record as `ip:port` strings; `""` where a record has none.
    let json = serde_json::to_value(r).unwrap();
    assert_eq!(
        (&json["src"], &json["dst"]),
        (
            &serde_json::json!("10.0.0.9:51234"),
            &serde_json::json!("10.0.0.2:8000")
        )
    );
    let none = serde_json::to_value(crate::record::RequestRecord::default()).unwrap();
    assert_eq!(
        (&none["src"], &none["dst"]),
        (&serde_json::json!(""), &serde_json::json!(""))
    );
    assert_eq!(r.origin, Some("sock_queued"));
    assert!(r.ttft_ms.is_some() && r.e2e_ms.is_some() && r.stages.get(Stage::Decode).is_some());
    assert_eq!(r.token_ns.itl_ms().count(), 2);
    s.close(SOCK);
    assert_eq!(s.recs.len(), 1);
    assert_eq!(
        (
            s.a.stats().requests,
            s.a.stats().aborted,
            s.a.stats().conns_active
        ),
        (1, 0, 0)
    );
    assert_eq!(s.total_unparsed(), 0);
}

#[test]
fn streaming_three_writes_per_chunk() {
    streaming_case(Style::Separate);
}

#[test]
fn streaming_writev_chunks() {
    streaming_case(Style::Writev);
}

#[test]
fn streaming_chunk_size_line_split() {
    streaming_case(Style::SplitSize);
}

#[test]
fn sse_events_split_and_merged_across_writes() {
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(SOCK, &chat_request(""));
    s.write(SOCK, SSE_HEAD);
    let (t1, t2) = (token_event("a"), token_event("b"));
    // One chunk, one event, split over three writes mid-JSON and mid-blank-line.
    let c = chunk(&t1);
    s.write(SOCK, &c[..30]);
    s.write(SOCK, &c[30..c.len() - 3]);
    let done1 = s.write(SOCK, &c[c.len() - 3..]).0;
    // An event split across two chunks, each in its own write.
    let (x, y) = t2.split_at(10);
    s.write(SOCK, &chunk(x));
    let done2 = s.write(SOCK, &chunk(y)).0;
    // Three events merged in one chunk and one write.
    let merged = [token_event("c"), token_event("d"), sse_event("[DONE]")].concat();
    let done3 = s
        .write(SOCK, &[chunk(&merged), b"0\r\n\r\n".to_vec()].concat())
        .0;
    let r = &s.recs[0];
    assert_eq!(r.token_ns, [done1, done2, done3, done3]);
    assert_eq!(
        (r.output_events, r.output_tokens),
        (4, Some(4)),
        "no usage: tokens = events"
    );
}

#[test]
fn non_streaming_json_with_usage() {
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(SOCK, &chat_request(""));
    let body = r#"{"id":"x","object":"chat.completion","model":"llama-3-8b","choices":[{"message":{"role":"assistant","content":"Paris is"}}],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#;
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (a, b) = resp.as_bytes().split_at(resp.len() - 20);
    let first = s.write(SOCK, a).0;
    let last = s.write(SOCK, b).0;
    let r = &s.recs[0];
    assert_eq!(
        (
            r.streaming,
            r.output_events,
            r.output_tokens,
            r.prompt_tokens
        ),
        (false, 0, Some(2), Some(9))
    );
    assert!(r.token_ns.is_empty() && r.ttft_ms.is_none());
    assert_eq!(
        (
            r.timestamps.get(Ts::RespFirst),
            r.timestamps.get(Ts::RespLast)
        ),
        (Some(first), Some(last))
    );
    assert!(r.stages.get(Stage::Inference).is_some());
    assert_eq!(r.response_bytes, resp.len() as u64);
}

#[test]
fn content_length_and_close_delimited_responses() {
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(SOCK, b"GET /health HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    assert_eq!((s.recs.len(), s.recs[0].output_tokens), (1, None));
    s.read(SOCK, b"GET /metrics HTTP/1.0\r\n\r\n");
    s.write(SOCK, b"HTTP/1.0 200 OK\r\n\r\npart one");
    let last = s.write(SOCK, b" and two").0;
    assert_eq!(s.recs.len(), 1, "close-delimited: not done before close");
    s.close(SOCK);
    let r = &s.recs[1];
    assert_eq!(
        (r.path.as_deref(), r.aborted, r.status),
        (Some("/metrics"), false, Some(200))
    );
    assert_eq!(r.timestamps.get(Ts::RespLast), Some(last));
    assert_eq!(r.response_bytes, 35);
    assert!(r.e2e_ms.is_some());
}

#[test]
fn prompt_and_completion_text_never_in_record() {
    const MARK: &str = "ZQXPROMPTMARKER";
    let mut s = Sim::new();
    s.accept(SOCK);
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{MARK} \"model\": \"{MARK}\""}}],"model":"m","user":"{MARK}"}}"#
    );
    let req = format!("POST /v1/chat/completions?q={MARK} HTTP/1.1\r\nX-Note: {MARK}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.read(SOCK, req.as_bytes());
    s.write(SOCK, SSE_HEAD);
    s.write(SOCK, &chunk(&token_event(MARK)));
    s.write(
        SOCK,
        &chunk(&sse_event(&format!(
            r#"{{"choices":[{{"text":"{MARK}"}}],"model":"m"}}"#
        ))),
    );
    s.write(SOCK, b"0\r\n\r\n");
    let json = serde_json::to_string(&s.recs[0]).unwrap();
    assert!(!json.contains(MARK), "{json}");
    assert_eq!(s.recs[0].model.as_deref(), Some("m"));
    assert_eq!(s.recs[0].output_events, 2);
}

#[test]
fn model_falls_back_to_response() {
    let mut s = Sim::new();
    s.read(
        SOCK,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    );
    s.write(
        SOCK,
        b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"model\":\"resp\"}\n",
    );
    assert_eq!(s.recs[0].model.as_deref(), Some("resp"));
}

#[test]
fn request_arrives_while_previous_response_streams() {
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(SOCK, &chat_request(""));
    s.write(SOCK, SSE_HEAD);
    let a1 = s.write(SOCK, &chunk(&token_event("a"))).0;
    let b_read = s.read(SOCK, b"GET /v1/models HTTP/1.1\r\n\r\n").1;
    let a2 = s.write(SOCK, &chunk(&token_event("b"))).0;
    s.write(SOCK, b"0\r\n\r\n");
    assert_eq!(s.recs.len(), 1);
    let b_first = s
        .write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        .0;
    let (a, b) = (&s.recs[0], &s.recs[1]);
    assert_eq!(
        (a.token_ns.to_vec(), a.path.as_deref()),
        (vec![a1, a2], Some("/v1/chat/completions"))
    );
    assert_eq!(
        (b.path.as_deref(), b.streaming, b.output_tokens),
        (Some("/v1/models"), false, None)
    );
    assert_eq!(b.timestamps.get(Ts::ReadFirst), Some(b_read));
    assert_eq!(b.timestamps.get(Ts::RespFirst), Some(b_first));
}

#[test]
fn response_gap_inside_sse_loses_only_that_event() {
    let mut s = Sim::new();
    sse_prefix(&mut s);
    let events = [
        token_event("a"),
        token_event("b"),
        token_event("c"),
        sse_event("[DONE]"),
    ]
    .concat();
    let c = [
        format!("{:x}\r\n", events.len()).into_bytes(),
        events,
        b"\r\n0\r\n\r\n".to_vec(),
    ]
    .concat();
    // Copy the first event and a bit, lose the middle, copy the end.
    let head = 4 + token_event("a").len() + 10;
    let w = s.gapped(EventKind::Write, SOCK, &c, head, 40).0;
    let r = &s.recs[0];
    assert_eq!(
        (r.token_ns.to_vec(), r.aborted, r.response_bytes),
        (vec![w], false, (SSE_HEAD.len() + c.len()) as u64)
    );
}

#[test]
fn coalesced_chunks_with_gap_regain_framing() {
    let mut s = Sim::new();
    sse_prefix(&mut s);
    let t0 = s.write(SOCK, &chunk(&token_event("first"))).0;
    // Under backpressure the server flushes 60 chunks in one write: only its ends are copied.
    let many: Vec<u8> = (0..60).flat_map(|_| chunk(&token_event("x"))).collect();
    s.gapped(EventKind::Write, SOCK, &many, 4096, 512);
    let t1 = s.write(SOCK, &chunk(&token_event("after"))).0;
    s.write(
        SOCK,
        &[chunk(&usage_event()), chunk(b"data: [DONE]\n\n")].concat(),
    );
    let end = s.write(SOCK, b"0\r\n\r\n").0;
    let r = &s.recs[0];
    assert!(!r.aborted);
    assert_eq!(
        (r.token_ns.first(), r.token_ns.last()),
        (Some(t0), Some(t1))
    );
    assert_eq!(
        (r.output_tokens, r.timestamps.get(Ts::RespLast)),
        (Some(42), Some(end))
    );
    assert_eq!(s.total_unparsed(), 0);
    // The terminator at the end of a gapped write ends the response too.
    let mut s = Sim::new();
    sse_prefix(&mut s);
    let mut all = many.clone();
    all.extend(b"0\r\n\r\n");
    let end = s.gapped(EventKind::Write, SOCK, &all, 4096, 512).0;
    assert_eq!(
        (s.recs.len(), s.recs[0].timestamps.get(Ts::RespLast)),
        (1, Some(end))
    );
    assert_eq!(
        s.recs[0].response_bytes,
        (SSE_HEAD.len() + all.len()) as u64
    );
}

/// The kernel's cumulative counters on the read that completes the request, the first token's
/// write and the last write bound queue_prefill and decode; writes in between do not.
#[test]
fn counters_at_the_bounding_events_give_each_stage_its_share() {
    use crate::event::{GpuTotals, Inside};
    let at = |tid: u32, runq: u64, launches: u64| Inside {
        tid,
        runq_ns: Some(runq),
        gpu: Some(GpuTotals {
            launches,
            graph_launches: launches / 2,
            sync_wait_ns: 10 * launches,
        }),
    };
    for last_tid in [5, 6] {
        let mut s = Sim::new();
        s.accept(SOCK);
        s.inside = Some(at(5, 100, 0));
        s.read(SOCK, &chat_request(""));
        for (inside, data) in [
            (at(5, 150, 4), SSE_HEAD.to_vec()),
            (at(5, 200, 6), chunk(&role_event())),
            (at(5, 300, 7), chunk(&token_event("a"))),
            (at(5, 450, 9), chunk(&token_event("b"))),
            (at(last_tid, 700, 12), b"0\r\n\r\n".to_vec()),
        ] {
            s.inside = Some(inside);
            s.write(SOCK, &data);
        }
        assert_eq!(s.recs.len(), 1);
        let r = &s.recs[0];
        let w = r.cpu_runqueue_wait_ms.as_ref().unwrap();
        assert_eq!(w.get(Stage::QueuePrefill), Some(200));
        let gpu = r.gpu.as_ref().unwrap();
        let qp = gpu.get(Stage::QueuePrefill).unwrap();
        assert_eq!((qp.launches, qp.graph_launches), (7, 3));
        assert_eq!(qp.sync_wait_ms, 70e-6);
        // GPU counters are the process's: whichever thread wrote, decode has them.
        let d = gpu.get(Stage::Decode).unwrap();
        assert_eq!((d.launches, d.graph_launches), (5, 3));
        if last_tid == 5 {
            assert_eq!(w.get(Stage::Decode), Some(400));
            assert_eq!(w.total, Some(600));
        } else {
            // The last write on another thread: that thread's counter says nothing about the
            // first one's wait.
            assert_eq!((w.get(Stage::Decode), w.total), (None, None));
        }
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(v["gpu"]["queue_prefill"]["launches"], 7);
        assert!(v["cpu_runqueue_wait_ms"].is_object());
    }
    // Without the counters (`cpu_runqueue: false`, no libcuda): null, not zero.
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(SOCK, &chat_request(""));
    s.write(SOCK, SSE_HEAD);
    s.write(SOCK, &chunk(&token_event("a")));
    s.write(SOCK, b"0\r\n\r\n");
    let v = serde_json::to_value(&s.recs[0]).unwrap();
    assert!(
        v["cpu_runqueue_wait_ms"].is_null() && v["gpu"].is_null(),
        "{v}"
    );
}
