use super::*;
use crate::record::Ts;
use opentelemetry::Key;

const OFFSET: u64 = 1_700_000_000_000_000_000;

fn opts<'a>(ids: &'a Ids, scope: &'a InstrumentationScope, token_events: usize) -> TraceOpts<'a> {
    TraceOpts {
        clock: MonoToUnix { offset_ns: OFFSET },
        ids,
        token_events,
        scope,
    }
}

fn ids() -> Ids {
    Ids { salt: [1, 2, 3, 4] }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn attr<'a>(s: &'a SpanData, k: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key == Key::from(k.to_string()))
        .map(|kv| &kv.value)
}

/// A streamed chat request through a node: network, socket wait, read, prefill, decode,
/// egress; first on its connection (handshake and accept seen).
fn streamed() -> RequestRecord {
    let mut r = RequestRecord {
        id: 42,
        pid: 7,
        comm: "vllm".into(),
        src: "10.0.0.9:40000".parse().ok(),
        dst: "10.1.0.2:8000".parse().ok(),
        method: Some("POST".into()),
        path: Some("/v1/chat/completions".into()),
        model: Some("llama-3-8b".into()),
        status: Some(200),
        streaming: true,
        output_tokens: Some(3),
        prompt_tokens: Some(120),
        pod: Some("vllm-0".into()),
        token_ns: vec![10_000, 12_000, 15_000].into(),
        ..Default::default()
    };
    for (t, v) in [
        (Ts::Syn, 100),
        (Ts::Established, 300),
        (Ts::Accepted, 700),
        (Ts::NodeIn, 1_000),
        (Ts::NatDone, 1_200),
        (Ts::SockQueued, 2_000),
        (Ts::ReadFirst, 2_600),
        (Ts::ReadDone, 3_000),
        (Ts::RespFirst, 4_000),
        (Ts::Token1, 10_000),
        (Ts::TokenN, 15_000),
        (Ts::RespLast, 16_000),
        (Ts::NodeOut, 16_500),
    ] {
        r.timestamps.set(t, v);
    }
    r.finish(true);
    r
}

#[test]
fn root_spans_the_request_and_children_partition_it_in_order() {
    let (ids, scope) = (ids(), InstrumentationScope::builder("t").build());
    let r = streamed();
    let spans = record_spans(&r, KeptBecause::default(), &opts(&ids, &scope, 8)).unwrap();
    let root = &spans[0];
    assert_eq!(root.name, "POST /v1/chat/completions");
    assert_eq!(root.span_kind, SpanKind::Server);
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_eq!(unix_ns(root.start_time), 1_000 + OFFSET, "start = node_in");
    assert_eq!(unix_ns(root.end_time), 16_500 + OFFSET, "end = node_out");
    let names: Vec<&str> = spans[1..].iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "load_balancing",
            "container_network",
            "socket_wait",
            "request_read",
            "queue_prefill",
            "decode",
            "egress_network"
        ]
    );
    // Each child: the record's boundary timestamps, back to back from start to end.
    let bounds: Vec<(u64, u64)> = spans[1..]
        .iter()
        .map(|s| (unix_ns(s.start_time) - OFFSET, unix_ns(s.end_time) - OFFSET))
        .collect();
    assert_eq!(
        bounds,
        [
            (1_000, 1_200),
            (1_200, 2_000),
            (2_000, 2_600),
            (2_600, 3_000),
            (3_000, 10_000),
            (10_000, 16_000),
            (16_000, 16_500)
        ]
    );
    for (s, (a, b)) in spans[1..].iter().zip(&bounds) {
        assert_eq!(s.parent_span_id, root.span_context.span_id());
        assert_eq!(s.span_context.trace_id(), root.span_context.trace_id());
        assert_eq!(s.span_kind, SpanKind::Internal);
        let stage = Stage::ALL.iter().find(|st| st.name() == s.name).unwrap();
        assert_eq!(r.stages.get(*stage), Some(b - a), "{}", s.name);
    }
    let mut ids_seen: Vec<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
    ids_seen.sort_by_key(|i| i.to_string());
    ids_seen.dedup();
    assert_eq!(ids_seen.len(), spans.len(), "span ids unique");
    // Handshake and accept precede the request: attributes, not children.
    assert_eq!(
        attr(root, "llmslo.stage.tcp_handshake_ms"),
        Some(&Value::F64(0.0002))
    );
    assert_eq!(
        attr(root, "llmslo.stage.accept_wait_ms"),
        Some(&Value::F64(0.0004))
    );
}

#[test]
fn server_side_stages_carry_run_queue_and_gpu_attributes() {
    use crate::event::{GpuTotals, Inside};
    let (ids, scope) = (ids(), InstrumentationScope::builder("t").build());
    let mut r = streamed();
    let at = |runq: u64, launches: u64| {
        Some(Inside {
            tid: 9,
            runq_ns: Some(runq),
            gpu: Some(GpuTotals {
                launches,
                graph_launches: 0,
                sync_wait_ns: 0,
            }),
        })
    };
    r.marks.read_done = at(1_000, 10);
    r.marks.token1 = at(3_000, 15);
    r.marks.last = at(3_500, 18);
    r.finish(true);
    let spans = record_spans(&r, KeptBecause::default(), &opts(&ids, &scope, 8)).unwrap();
    let span = |n: &str| spans.iter().find(|s| s.name == n).unwrap();
    let qp = span("queue_prefill");
    assert_eq!(
        attr(qp, "llmslo.cpu.runqueue_wait_ms"),
        Some(&Value::F64(0.002))
    );
    assert_eq!(attr(qp, "llmslo.gpu.kernel_launches"), Some(&Value::I64(5)));
    assert_eq!(attr(qp, "llmslo.gpu.busy_fraction"), Some(&Value::F64(0.0)));
    let d = span("decode");
    assert_eq!(
        attr(d, "llmslo.cpu.runqueue_wait_ms"),
        Some(&Value::F64(0.0005))
    );
    assert_eq!(attr(d, "llmslo.gpu.kernel_launches"), Some(&Value::I64(3)));
    let net = span("container_network");
    assert!(attr(net, "llmslo.cpu.runqueue_wait_ms").is_none());
    assert!(attr(net, "llmslo.gpu.kernel_launches").is_none());
}

#[test]
fn root_carries_genai_and_http_attributes() {
    let (ids, scope) = (ids(), InstrumentationScope::builder("t").build());
    let r = streamed();
    let spans = record_spans(&r, KeptBecause::default(), &opts(&ids, &scope, 8)).unwrap();
    let root = &spans[0];
    let s = |v: &str| Some(Value::from(v.to_string()));
    assert_eq!(attr(root, "gen_ai.operation.name").cloned(), s("chat"));
    assert_eq!(attr(root, "gen_ai.request.model").cloned(), s("llama-3-8b"));
    assert_eq!(
        attr(root, "gen_ai.usage.output_tokens"),
        Some(&Value::I64(3))
    );
    assert_eq!(
        attr(root, "gen_ai.usage.input_tokens"),
        Some(&Value::I64(120))
    );
    assert_eq!(attr(root, "http.request.method").cloned(), s("POST"));
    assert_eq!(attr(root, "url.path").cloned(), s("/v1/chat/completions"));
    assert_eq!(
        attr(root, "http.response.status_code"),
        Some(&Value::I64(200))
    );
    assert_eq!(attr(root, "server.address").cloned(), s("10.1.0.2"));
    assert_eq!(attr(root, "server.port"), Some(&Value::I64(8000)));
    assert_eq!(attr(root, "client.address").cloned(), s("10.0.0.9"));
    assert_eq!(attr(root, "k8s.pod.name").cloned(), s("vllm-0"));
    assert_eq!(attr(root, "llmslo.request.id"), Some(&Value::I64(42)));
    assert_eq!(attr(root, "llmslo.ttft_ms"), Some(&Value::F64(0.009)));
    assert_eq!(attr(root, "llmslo.e2e_ms"), Some(&Value::F64(0.0155)));
    assert_eq!(attr(root, "llmslo.tpot_ms"), Some(&Value::F64(0.0025)));
    assert_eq!(
        attr(root, "llmslo.kept_because"),
        Some(&Value::Array(Array::String(vec!["sampled".into()])))
    );
    assert_eq!(root.status, Status::Unset);
    assert!(attr(root, "error.type").is_none());
    // Namespace unknown: absent, not empty.
    assert!(attr(root, "k8s.namespace.name").is_none());
}

#[test]
fn token_events_are_bounded_and_timed_like_the_writes() {
    let (ids, scope) = (ids(), InstrumentationScope::builder("t").build());
    let r = streamed();
    let spans = record_spans(&r, KeptBecause::default(), &opts(&ids, &scope, 2)).unwrap();
    let ev = &spans[0].events;
    assert_eq!(ev.events.len(), 2);
    assert_eq!(ev.dropped_count, 1);
    assert_eq!(unix_ns(ev.events[0].timestamp), 10_000 + OFFSET);
    assert_eq!(unix_ns(ev.events[1].timestamp), 12_000 + OFFSET);
    let none = record_spans(&r, KeptBecause::default(), &opts(&ids, &scope, 0)).unwrap();
    assert!(none[0].events.events.is_empty());
    assert_eq!(none[0].events.dropped_count, 3);
}

#[test]
fn aborted_request_ends_at_its_last_timestamp_with_error_status() {
    let (ids, scope) = (ids(), InstrumentationScope::builder("t").build());
    let mut r = RequestRecord {
        id: 9,
        aborted: true,
        streaming: true,
        method: Some("POST".into()),
        path: Some("/v1/completions".into()),
        token_ns: vec![5_000].into(),
        ..Default::default()
    };
    r.timestamps.set(Ts::ReadFirst, 1_000);
    r.timestamps.set(Ts::ReadDone, 1_500);
    r.timestamps.set(Ts::Token1, 5_000);
    r.finish(false);
    let mut kept = crate::abnormal::Abnormal::new(1);
    let why = kept.record(&std::sync::Arc::new(r.clone()), false, 0);
    let spans = record_spans(&r, why, &opts(&ids, &scope, 8)).unwrap();
    let root = &spans[0];
    assert_eq!(unix_ns(root.start_time) - OFFSET, 1_000);
    assert_eq!(unix_ns(root.end_time) - OFFSET, 5_000, "latest thing seen");
    assert!(matches!(root.status, Status::Error { .. }));
    assert_eq!(attr(root, "error.type"), Some(&Value::from("aborted")));
    assert_eq!(
        attr(root, "gen_ai.operation.name"),
        Some(&Value::from("text_completion"))
    );
    let Some(Value::Array(Array::String(why))) = attr(root, "llmslo.kept_because") else {
        panic!("kept_because missing");
    };
    assert!(why.iter().any(|w| w.as_str() == "aborted"), "{why:?}");
    for c in &spans[1..] {
        assert!(c.start_time >= root.start_time && c.end_time <= root.end_time);
    }
    // Nothing to place without a start.
    let r = RequestRecord::default();
    assert!(record_spans(&r, why_none(), &opts(&ids, &scope, 8)).is_none());
}

fn why_none() -> KeptBecause {
    KeptBecause::default()
}

#[test]
fn ids_are_distinct_per_record_and_sampling_follows_the_ratio() {
    let ids = ids();
    assert_ne!(ids.trace_id(1), ids.trace_id(2));
    assert_eq!(ids.trace_id(1), ids.trace_id(1));
    assert_ne!(ids.span_id(1, 0), ids.span_id(1, 1));
    assert_ne!(ids.span_id(1, 1), ids.span_id(2, 1));
    let n = (0..100_000).filter(|&i| ids.sampled(i, 0.01)).count();
    assert!((800..1200).contains(&n), "1 % of 100000: {n}");
    assert_eq!((0..1000).filter(|&i| ids.sampled(i, 0.0)).count(), 0);
    assert_eq!((0..1000).filter(|&i| ids.sampled(i, 1.0)).count(), 1000);
}

#[test]
fn clock_offset_maps_monotonic_to_now() {
    let c = MonoToUnix::now();
    let now = SystemTime::now();
    let mapped = c.unix(crate::agent::mono_ns());
    let diff = now.duration_since(mapped).unwrap_or_else(|e| e.duration());
    assert!(diff < Duration::from_millis(50), "{diff:?}");
}

#[test]
fn operation_names() {
    assert_eq!(operation_name(Some("/v1/chat/completions")), Some("chat"));
    assert_eq!(
        operation_name(Some("/v1/completions?x=1")),
        Some("text_completion")
    );
    assert_eq!(operation_name(Some("/v1/embeddings")), Some("embeddings"));
    assert_eq!(
        operation_name(Some("/generate_stream")),
        Some("generate_content")
    );
    assert_eq!(operation_name(Some("/api/chat")), Some("chat"));
    assert_eq!(operation_name(Some("/health")), None);
    assert_eq!(operation_name(None), None);
}
