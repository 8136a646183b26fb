//! OTLP trace export against a real receiver that decodes the payload with the official
//! protobuf definitions (`opentelemetry-proto`'s generated types, prost): over HTTP/protobuf
//! (an axum server) and gRPC (a tonic `TraceService`). The kernel tests run the agent on a
//! testbed pod whose long prompts queue, and check every abnormal request's trace against the
//! agent's own record; the others check the exporter's queue, drops and errors without root.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;

use common::node::{server_pod, PORT};
use common::tls::{Pki, TlsFront};
use common::{kernel_tests_enabled, metric, Agent};
use llm_slo_agent::otlp::{Otlp, OtlpCfg, OtlpProtocol};
use llm_slo_agent::record::{RequestRecord, Stage, Ts};
use testbed::{CgroupDriver, LoadConfig};

const MARKER: &str = "PRIVATE-PROMPT-7f3a9c";

/// What the receiver got: each export's headers (or gRPC metadata), its protobuf bytes and
/// its decoded request.
#[derive(Default)]
struct Got {
    exports: Vec<(HashMap<String, String>, Vec<u8>, ExportTraceServiceRequest)>,
}

struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Got>>,
    // Dropping the runtime stops the server.
    _rt: tokio::runtime::Runtime,
}

fn header_map(h: &HeaderMap) -> HashMap<String, String> {
    h.iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect()
}

async fn http_export(State(got): State<Arc<Mutex<Got>>>, h: HeaderMap, body: Bytes) -> Response {
    match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(req) => {
            got.lock()
                .unwrap()
                .exports
                .push((header_map(&h), body.to_vec(), req));
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

struct Grpc(Arc<Mutex<Got>>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let h = header_map(&request.metadata().clone().into_headers());
        let req = request.into_inner();
        let bytes = req.encode_to_vec();
        self.0.lock().unwrap().exports.push((h, bytes, req));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn start(protocol: OtlpProtocol) -> Receiver {
        Receiver::start_on(protocol, "127.0.0.1:0".parse().unwrap())
    }

    fn start_on(protocol: OtlpProtocol, addr: SocketAddr) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let got = Arc::new(Mutex::new(Got::default()));
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        match protocol {
            OtlpProtocol::Http => {
                let app = axum::Router::new()
                    .route("/v1/traces", axum::routing::post(http_export))
                    .with_state(got.clone());
                rt.spawn(async move { axum::serve(listener, app).await });
            }
            OtlpProtocol::Grpc => {
                let svc = TraceServiceServer::new(Grpc(got.clone()));
                rt.spawn(
                    tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
                );
            }
        }
        Receiver { addr, got, _rt: rt }
    }

    /// Every span received, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let got = self.got.lock().unwrap();
        let mut out = Vec::new();
        for (_, _, req) in &got.exports {
            for rs in &req.resource_spans {
                let res = rs.resource.clone().unwrap_or_default().attributes;
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((res.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }
}

fn attr<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn attr_i64(kvs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(kvs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn attr_str(kvs: &[KeyValue], key: &str) -> Option<String> {
    match attr(kvs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr_strs(kvs: &[KeyValue], key: &str) -> Vec<String> {
    match attr(kvs, key) {
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

/// One received trace: its root span and its children (by start time).
struct Trace {
    root: Span,
    children: Vec<Span>,
    resource: Vec<KeyValue>,
}

/// Groups the spans by trace; each trace must have exactly one root, and every other span
/// must be the root's child.
fn traces_by_request(spans: &[(Vec<KeyValue>, Span)]) -> HashMap<u64, Trace> {
    let mut by_trace: HashMap<Vec<u8>, Vec<&(Vec<KeyValue>, Span)>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.1.trace_id.clone()).or_default().push(s);
    }
    let mut out = HashMap::new();
    for (tid, spans) in by_trace {
        assert_eq!(tid.len(), 16, "trace id is 16 bytes");
        let roots: Vec<_> = spans
            .iter()
            .filter(|s| s.1.parent_span_id.is_empty())
            .collect();
        assert_eq!(
            roots.len(),
            1,
            "one root per trace: {:?}",
            spans.iter().map(|s| &s.1.name).collect::<Vec<_>>()
        );
        let root = roots[0].1.clone();
        let mut children: Vec<Span> = spans
            .iter()
            .filter(|s| !s.1.parent_span_id.is_empty())
            .map(|s| s.1.clone())
            .collect();
        for c in &children {
            assert_eq!(
                c.parent_span_id, root.span_id,
                "{} is the root's child",
                c.name
            );
        }
        children.sort_by_key(|c| (c.start_time_unix_nano, c.end_time_unix_nano));
        let id = attr_i64(&root.attributes, "llmslo.request.id").expect("request id") as u64;
        let prev = out.insert(
            id,
            Trace {
                root,
                children,
                resource: roots[0].0.clone(),
            },
        );
        assert!(prev.is_none(), "request {id} exported once");
    }
    out
}

/// The trace of one agent record (JSON from /api/v1/requests) has the record's timeline:
/// root = start..end, one child per stage inside E2E in timeline order, back to back, each
/// bounded by two of the record's timestamps, as long as the record's stage; and its
/// attributes. Times are Unix = CLOCK_MONOTONIC + the agent's documented offset.
fn check_trace(t: &Trace, rec: &Value, offset: u64, token_events: usize) {
    let id = rec["id"].as_u64().unwrap();
    let ns = |v: &Value| v.as_u64().unwrap() + offset;
    assert_eq!(
        t.root.start_time_unix_nano,
        ns(&rec["start_ns"]),
        "root start, request {id}"
    );
    let end = if rec["end_ns"].is_u64() {
        ns(&rec["end_ns"])
    } else {
        // Aborted before its end: the latest thing seen.
        let ts = rec["timestamps"].as_object().unwrap();
        ts.values().map(|v| v.as_u64().unwrap()).max().unwrap() + offset
    };
    if rec["end_ns"].is_u64() {
        assert_eq!(t.root.end_time_unix_nano, end, "root end, request {id}");
    } else {
        assert!(t.root.end_time_unix_nano >= end, "root end, request {id}");
    }
    let stages = rec["stages"].as_object().unwrap();
    let want: Vec<&str> = Stage::ALL
        .iter()
        .filter(|s| s.in_e2e() && stages.contains_key(s.name()))
        .map(|s| s.name())
        .collect();
    let got: Vec<&str> = t.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        got, want,
        "one child per stage, in timeline order: request {id}"
    );
    let stamps: BTreeSet<u64> = rec["timestamps"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap() + offset)
        .collect();
    let mut prev_end = None;
    for c in &t.children {
        assert!(
            c.start_time_unix_nano >= t.root.start_time_unix_nano
                && c.end_time_unix_nano <= t.root.end_time_unix_nano
                && c.start_time_unix_nano <= c.end_time_unix_nano,
            "{} inside its parent: request {id}",
            c.name
        );
        assert!(
            stamps.contains(&c.start_time_unix_nano) && stamps.contains(&c.end_time_unix_nano),
            "{} starts and ends at record timestamps: request {id}",
            c.name
        );
        if let Some(p) = prev_end {
            assert_eq!(
                c.start_time_unix_nano, p,
                "{} follows the previous stage",
                c.name
            );
        }
        prev_end = Some(c.end_time_unix_nano);
        let dur_ns = c.end_time_unix_nano - c.start_time_unix_nano;
        let ms = stages[c.name.as_str()].as_f64().unwrap();
        assert_eq!(
            (ms * 1e6).round() as u64,
            dur_ns,
            "{} duration: request {id}",
            c.name
        );
    }
    let a = &t.root.attributes;
    assert_eq!(
        attr_str(a, "gen_ai.request.model").as_deref(),
        rec["model"].as_str()
    );
    assert_eq!(
        attr_i64(a, "gen_ai.usage.output_tokens"),
        rec["output_tokens"].as_i64(),
        "request {id}"
    );
    assert_eq!(
        attr_i64(a, "gen_ai.usage.input_tokens"),
        rec["prompt_tokens"].as_i64(),
        "request {id}"
    );
    assert_eq!(
        attr_str(a, "gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(
        attr_i64(a, "http.response.status_code"),
        rec["status"].as_i64(),
        "request {id}"
    );
    assert_eq!(attr_str(a, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr_str(a, "url.path").as_deref(), rec["path"].as_str());
    assert_eq!(attr_i64(a, "server.port"), Some(PORT as i64));
    assert_eq!(t.root.name, "POST /v1/chat/completions");
    match rec["ttft_ms"].as_f64() {
        Some(v) => assert_eq!(
            attr(a, "llmslo.ttft_ms"),
            Some(&any_value::Value::DoubleValue(v))
        ),
        None => assert!(attr(a, "llmslo.ttft_ms").is_none()),
    }
    if let Some(why) = rec["kept_because"].as_str() {
        let kept = attr_strs(a, "llmslo.kept_because");
        assert!(
            kept.iter().any(|k| k == why),
            "kept_because {why} in {kept:?}"
        );
    }
    if rec["aborted"] == true {
        assert_eq!(attr_str(a, "error.type").as_deref(), Some("aborted"));
        assert_eq!(
            t.root.status.as_ref().map(|s| s.code),
            Some(2),
            "error status"
        );
    }
    if let Some(tokens) = rec["token_ns"].as_array() {
        let n = tokens.len().min(token_events);
        assert_eq!(t.root.events.len(), n, "token events, request {id}");
        for (e, tok) in t.root.events.iter().zip(tokens) {
            assert_eq!(e.time_unix_nano, ns(tok));
            assert_eq!(e.name, "llmslo.token");
        }
        assert_eq!(t.root.dropped_events_count as usize, tokens.len() - n);
    }
}

/// Polls until every id is among the received traces (or 20 s pass).
fn wait_for(rx: &Receiver, ids: &BTreeSet<u64>) -> HashMap<u64, Trace> {
    let t0 = Instant::now();
    loop {
        let traces = traces_by_request(&rx.spans());
        let missing: Vec<&u64> = ids.iter().filter(|i| !traces.contains_key(i)).collect();
        if missing.is_empty() {
            return traces;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} of {} requests have no trace (e.g. {:?})",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const TOKEN_EVENTS: usize = 2;

/// The kernel test for one protocol: long prompts queue (abnormal), some requests abort.
/// With `tls`, the collector sits behind TLS that requires a client certificate, and a bearer
/// token comes from a headers file: it must reach the collector and nothing else.
fn exports_abnormal_requests(protocol: OtlpProtocol, proto: &str, sample_ratio: f64, tls: bool) {
    let rx = Receiver::start(protocol);
    let pki = tls.then(|| Pki::new(&format!("kernel-{proto}")));
    let front = pki.as_ref().map(|pki| TlsFront::start(pki, rx.addr, true));
    let token = secret("kernel");
    let (endpoint, tls_yaml) = match (&pki, &front) {
        (Some(pki), Some(front)) => {
            let hfile = pki.path("headers");
            std::fs::write(&hfile, format!("authorization: Bearer {token}\n")).unwrap();
            (
                format!("https://{}", front.addr),
                format!(
                    "  tls: {{ca_file: {}, cert_file: {}, key_file: {}, server_name: collector.test}}\n  headers_file: {}\n",
                    pki.p("ca.pem"),
                    pki.p("client.pem"),
                    pki.p("client.key"),
                    hfile.display()
                ),
            )
        }
        _ => (format!("http://{}", rx.addr), String::new()),
    };
    let sp = server_pod(
        &format!("otlp-{proto}"),
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--prefill-us-per-kb", "2000", "--decode-ms", "1"],
    );
    let yaml = format!(
        "otlp:\n  enabled: true\n  protocol: {proto}\n  endpoint: {endpoint}\n  headers: {{x-otlp-token: secret-1}}\n  \
         sample_ratio: {sample_ratio}\n  node_name: test-node\n  resource_attributes: {{k8s.cluster.name: testbed}}\n  \
         token_events: {TOKEN_EVENTS}\n  batch_size: 64\n  timeout_ms: 3000\n{tls_yaml}\
         slos:\n  - {{name: fast-ttft, objective: 0.9, window: 1h, sli: {{type: latency, metric: ttft, threshold_ms: 20}}}}\n"
    );
    let agent = Agent::start_with_config(
        &yaml,
        &["--no-auto", "--target-cgroup", sp.cg.cgroup_path()],
    );
    let mut load = LoadConfig::new(sp.pod.addr(PORT));
    load.connections = 4;
    load.requests = 240;
    load.max_tokens = Some(4);
    load.include_usage = true;
    load.marker = Some(MARKER.into());
    load.abort_after_events = Some(2);
    load.abort_ratio = 0.03;
    load.prompt_bytes_fn = Some(Arc::new(|n| if n % 4 == 0 { 24 * 1024 } else { 300 }));
    testbed::loadgen::run(&load).unwrap();
    let all = agent.wait_requests(Duration::from_secs(15), |r| r.len() >= 240);
    assert_eq!(all.len(), 240, "every request recorded");
    let slow = agent.get_json("/api/v1/requests?slow=true&limit=10000");
    let slow = slow["requests"].as_array().unwrap().clone();
    let slow_ids: BTreeSet<u64> = slow.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(
        slow.iter().any(|r| r["aborted"] == true),
        "some aborted requests kept"
    );
    assert!(slow.len() < all.len(), "not every request is abnormal");
    let want: BTreeSet<u64> = if sample_ratio >= 1.0 {
        all.iter().map(|r| r["id"].as_u64().unwrap()).collect()
    } else {
        slow_ids.clone()
    };
    let traces = wait_for(&rx, &want);

    // The offset is the documented one: Unix − CLOCK_MONOTONIC, sent as a resource attribute.
    let any = traces.values().next().unwrap();
    let offset = attr_i64(&any.resource, "llmslo.clock.monotonic_offset_ns").unwrap() as u64;
    let now_offset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        - mono_ns();
    assert!(
        offset.abs_diff(now_offset) < 50_000_000,
        "offset {offset} vs now {now_offset}"
    );
    for t in traces.values() {
        assert_eq!(
            attr_str(&t.resource, "service.name").as_deref(),
            Some("llm-slo-agent")
        );
        assert_eq!(
            attr_str(&t.resource, "k8s.node.name").as_deref(),
            Some("test-node")
        );
        assert_eq!(
            attr_str(&t.resource, "k8s.cluster.name").as_deref(),
            Some("testbed")
        );
    }
    for rec in &slow {
        check_trace(
            &traces[&rec["id"].as_u64().unwrap()],
            rec,
            offset,
            TOKEN_EVENTS,
        );
    }
    for rec in &all {
        let id = rec["id"].as_u64().unwrap();
        match traces.get(&id) {
            Some(t) => {
                check_trace(t, rec, offset, usize::MAX);
                if !slow_ids.contains(&id) {
                    // Kept at first, or sampled; never exported without a reason.
                    assert!(!attr_strs(&t.root.attributes, "llmslo.kept_because").is_empty());
                }
            }
            None => assert!(sample_ratio < 1.0, "request {id} not sampled at ratio 1"),
        }
    }
    // The long prompts (every 4th request, ~48 ms of prefill) violate the 20 ms TTFT SLO: each
    // is kept and exported as an SLO violator; the short ones (~1 ms) are not marked so.
    let mut violators = 0;
    for rec in &all {
        let (id, ttft) = (rec["id"].as_u64().unwrap(), rec["ttft_ms"].as_f64());
        let why = traces
            .get(&id)
            .map(|t| attr_strs(&t.root.attributes, "llmslo.kept_because"))
            .unwrap_or_default();
        match ttft {
            Some(v) if v > 21.0 && rec["aborted"] == false => {
                violators += 1;
                assert!(slow_ids.contains(&id), "violator {id} ({v} ms) kept");
                assert!(
                    why.contains(&"slo_violation".to_string()),
                    "violator {id} ({v} ms) exported as one: {why:?}"
                );
            }
            Some(v) if v < 19.0 => assert!(
                !why.contains(&"slo_violation".to_string()),
                "request {id} ({v} ms) met the SLO: {why:?}"
            ),
            _ => {}
        }
    }
    assert!(violators >= 40, "{violators} long-prompt violators");
    if sample_ratio == 0.0 {
        assert!(
            traces.len() < all.len(),
            "fast requests are not sampled at ratio 0"
        );
        assert!(traces
            .values()
            .all(|t| !attr_strs(&t.root.attributes, "llmslo.kept_because")
                .contains(&"sampled".to_string())));
    } else {
        assert!(
            traces
                .values()
                .any(|t| attr_strs(&t.root.attributes, "llmslo.kept_because") == ["sampled"]),
            "sampled requests are marked so"
        );
    }

    // Headers reach the receiver; the prompt never does.
    let got = rx.got.lock().unwrap();
    assert!(!got.exports.is_empty());
    for (h, bytes, _) in &got.exports {
        assert_eq!(
            h.get("x-otlp-token").map(String::as_str),
            Some("secret-1"),
            "{h:?}"
        );
        if tls {
            assert_eq!(
                h.get("authorization"),
                Some(&format!("Bearer {token}")),
                "the token from the headers file"
            );
        }
        if protocol == OtlpProtocol::Http {
            assert_eq!(
                h.get("content-type").map(String::as_str),
                Some("application/x-protobuf")
            );
        }
        assert!(
            !String::from_utf8_lossy(bytes).contains(MARKER),
            "prompt text left the agent"
        );
    }
    let n_spans: usize = got
        .exports
        .iter()
        .flat_map(|e| &e.2.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    drop(got);
    // The receiver stores an export before it answers; the agent counts it on the answer.
    let exported = || {
        let m = agent.get("/metrics");
        let n = metric(&m, "llmslo_agent_otlp_traces_exported_total");
        (n == Some(traces.len() as f64)).then_some(m)
    };
    assert!(wait_until(Duration::from_secs(5), || exported().is_some()));
    let m = exported().unwrap();
    common::promtool_check(&m);
    assert_eq!(
        metric(&m, "llmslo_agent_otlp_traces_exported_total"),
        Some(traces.len() as f64)
    );
    assert_eq!(
        metric(&m, "llmslo_agent_otlp_spans_exported_total"),
        Some(n_spans as f64)
    );
    assert_eq!(
        metric(
            &m,
            "llmslo_agent_otlp_traces_dropped_total{reason=\"queue_full\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "llmslo_agent_otlp_export_errors_total"),
        Some(0.0)
    );
    let mode = if tls { "mtls" } else { "plaintext" };
    assert_eq!(
        metric(
            &m,
            &format!("llmslo_agent_otlp_transport_info{{transport=\"{mode}\"}}")
        ),
        Some(1.0)
    );
    if let Some(front) = &front {
        assert_eq!(front.failed_handshakes.load(Relaxed), 0);
    }
    // The token reached the collector and nothing else: not the log, the API or the metrics.
    let mut outputs = vec![("/metrics".to_string(), m.clone())];
    for path in [
        "/api/v1/requests?limit=100000",
        "/api/v1/breakdown",
        "/api/v1/targets",
        "/api/v1/slo",
        "/api/v1/slo/analysis",
        "/api/v1/heatmap",
        "/api/v1/crosscheck",
        "/readyz",
    ] {
        if let Ok((_, body)) = common::http_get(agent.addr, path) {
            outputs.push((path.to_string(), body));
        }
    }
    outputs.push(("the log".into(), agent.log_text()));
    assert!(outputs[outputs.len() - 1]
        .1
        .contains("OTLP trace export on"));
    for (what, text) in &outputs {
        assert!(!text.contains(&token), "the header secret is in {what}");
        assert!(
            !text.contains("secret-1"),
            "a configured header value is in {what}"
        );
    }
    eprintln!(
        "{proto}: {} requests, {} abnormal now, {} traces / {n_spans} spans received",
        all.len(),
        slow.len(),
        traces.len()
    );
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn http_protobuf_receiver_gets_every_abnormal_request() {
    if !kernel_tests_enabled("http_protobuf_receiver_gets_every_abnormal_request") {
        return;
    }
    exports_abnormal_requests(OtlpProtocol::Http, "http", 0.0, false);
}

#[test]
fn grpc_receiver_gets_abnormal_and_sampled_requests() {
    if !kernel_tests_enabled("grpc_receiver_gets_abnormal_and_sampled_requests") {
        return;
    }
    exports_abnormal_requests(OtlpProtocol::Grpc, "grpc", 1.0, false);
}

#[test]
fn mtls_grpc_receiver_gets_every_abnormal_request_and_only_it_sees_the_token() {
    if !kernel_tests_enabled(
        "mtls_grpc_receiver_gets_every_abnormal_request_and_only_it_sees_the_token",
    ) {
        return;
    }
    exports_abnormal_requests(OtlpProtocol::Grpc, "grpc", 0.0, true);
}

// ---- Without the kernel: the exporter's queue against real receivers ----

fn cfg(protocol: OtlpProtocol, addr: SocketAddr) -> OtlpCfg {
    OtlpCfg {
        enabled: true,
        protocol,
        endpoint: format!("http://{addr}"),
        node_name: "n1".into(),
        ..Default::default()
    }
}

fn synthetic(id: u64) -> Arc<RequestRecord> {
    let mut r = RequestRecord {
        id,
        method: Some("POST".into()),
        path: Some("/v1/chat/completions".into()),
        model: Some("m".into()),
        status: Some(200),
        streaming: true,
        output_tokens: Some(2),
        token_ns: vec![5_000_000, 6_000_000].into(),
        dst: "10.0.0.1:8000".parse().ok(),
        ..Default::default()
    };
    for (t, v) in [
        (Ts::SockQueued, 1_000_000),
        (Ts::ReadFirst, 1_100_000),
        (Ts::ReadDone, 1_200_000),
        (Ts::Token1, 5_000_000),
        (Ts::RespLast, 7_000_000),
    ] {
        r.timestamps.set(t, v);
    }
    r.finish(false);
    Arc::new(r)
}

fn wait_until(within: Duration, f: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn both_protocols_deliver_synthetic_records_exactly() {
    for protocol in [OtlpProtocol::Http, OtlpProtocol::Grpc] {
        let rx = Receiver::start(protocol);
        let mut c = cfg(protocol, rx.addr);
        c.sample_ratio = 1.0;
        let x = Otlp::start(&c).unwrap();
        for id in 1..=50 {
            x.offer(&synthetic(id), Default::default());
        }
        assert!(wait_until(Duration::from_secs(10), || rx.spans().len() >= 50 * 5));
        let traces = traces_by_request(&rx.spans());
        assert_eq!(traces.len(), 50, "{protocol:?}");
        let off = x.clock.offset_ns;
        for (id, t) in &traces {
            let rec = serde_json::to_value(&*synthetic(*id)).unwrap();
            let mut rec = rec;
            rec["token_ns"] = serde_json::json!([5_000_000u64, 6_000_000u64]);
            check_trace(t, &rec, off, 64);
        }
        x.shutdown(Duration::from_secs(2));
        assert_eq!(x.counters.exported_traces.load(Relaxed), 50);
        assert_eq!(x.counters.exported_spans.load(Relaxed), 250);
    }
}

#[test]
fn a_restarted_receiver_gets_the_next_exports() {
    for protocol in [OtlpProtocol::Http, OtlpProtocol::Grpc] {
        let rx = Receiver::start(protocol);
        let addr = rx.addr;
        let mut c = cfg(protocol, addr);
        c.sample_ratio = 1.0;
        let x = Otlp::start(&c).unwrap();
        x.offer(&synthetic(1), Default::default());
        assert!(wait_until(Duration::from_secs(10), || rx.spans().len() == 5));
        // The collector restarts: its connections close; the exporter's pooled one is stale.
        drop(rx);
        std::thread::sleep(Duration::from_millis(300));
        let rx = Receiver::start_on(protocol, addr);
        x.offer(&synthetic(2), Default::default());
        assert!(
            wait_until(Duration::from_secs(15), || rx.spans().len() == 5),
            "{protocol:?}: nothing after the restart; errors {}",
            x.counters.export_errors.load(Relaxed)
        );
        // The receiver stores before it answers: the count follows the answer.
        assert!(wait_until(Duration::from_secs(5), || x
            .counters
            .exported_traces
            .load(Relaxed)
            == 2));
        assert_eq!(x.counters.export_errors.load(Relaxed), 0);
        x.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn a_stalled_receiver_costs_drops_not_waiting() {
    // A receiver that accepts connections and never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(64).flatten() {
            h2.lock().unwrap().push(s);
        }
    });
    for protocol in [OtlpProtocol::Http, OtlpProtocol::Grpc] {
        let mut c = cfg(protocol, addr);
        c.queue_size = 8;
        c.batch_size = 4;
        c.timeout_ms = 200;
        c.max_retries = 1;
        let x = Otlp::start(&c).unwrap();
        let recs: Vec<_> = (0..2000).map(synthetic).collect();
        // Abnormal (kept by a store with room for all): always offered.
        let mut kept = llm_slo_agent::abnormal::Abnormal::new(10_000);
        let why: Vec<_> = recs.iter().map(|r| kept.record(r, false, 0)).collect();
        let t0 = Instant::now();
        for (r, why) in recs.iter().zip(why) {
            x.offer(r, why);
        }
        let took = t0.elapsed();
        eprintln!(
            "{protocol:?}: 2000 offers to a full queue took {took:?} ({:.0} ns each)",
            took.as_nanos() as f64 / 2000.0
        );
        assert!(
            took < Duration::from_millis(500),
            "{protocol:?}: offering 2000 took {took:?}"
        );
        let (q, d) = (
            x.counters.queued.load(Relaxed),
            x.counters.dropped_queue_full.load(Relaxed),
        );
        assert_eq!(q + d, 2000);
        assert!(
            d >= 2000 - 8 - 4,
            "{protocol:?}: queue bounded: {q} queued, {d} dropped"
        );
        // The worker counts the error, then the traces it dropped: wait for the second.
        assert!(
            wait_until(Duration::from_secs(10), || x
                .counters
                .dropped_export_failed
                .load(Relaxed)
                >= 1),
            "{protocol:?}: a failed export's traces counted"
        );
        assert!(
            x.counters.export_errors.load(Relaxed) >= 1,
            "{protocol:?}: export errors counted"
        );
        assert_eq!(x.counters.exported_traces.load(Relaxed), 0);
        let t0 = Instant::now();
        x.shutdown(Duration::from_millis(500));
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{protocol:?}: shutdown bounded"
        );
        let mut m = String::new();
        x.render(&mut m);
        common::promtool_check(&m);
        assert!(
            metric(
                &m,
                "llmslo_agent_otlp_traces_dropped_total{reason=\"queue_full\"}"
            )
            .is_some_and(|v| v >= 1988.0),
            "{m}"
        );
    }
}

#[test]
fn config_rejects_bad_otlp_settings() {
    let parse = |y: &str| -> anyhow::Result<()> {
        let c: llm_slo_agent::config::Config = serde_yaml::from_str(y)?;
        c.validate()
    };
    assert!(parse("otlp: {enabled: true, protocol: grpc, endpoint: 'http://c:4317'}").is_ok());
    assert!(parse("otlp: {protocol: zipkin}").is_err());
    assert!(parse("otlp: {sample_ratio: 1.5}").is_err());
    assert!(parse("otlp: {endpoint: 'not a url'}").is_err());
    assert!(parse("otlp: {headers: {'bad header': x}}").is_err());
    assert!(parse("otlp: {sample_rate: 0.1}").is_err(), "typos rejected");
    let c = OtlpCfg {
        endpoint: "http://c:4318".into(),
        ..Default::default()
    };
    assert_eq!(c.endpoint_uri().unwrap(), "http://c:4318/v1/traces");
    let c = OtlpCfg {
        endpoint: "http://c:4318/custom/traces".into(),
        ..Default::default()
    };
    assert_eq!(c.endpoint_uri().unwrap(), "http://c:4318/custom/traces");
}

// ---- TLS, mTLS and header secrets from files (without the kernel) ----

/// A secret nobody else could produce, for grepping the agent's outputs.
fn secret(tag: &str) -> String {
    format!(
        "otlp-secret-{tag}-{}-{}",
        std::process::id(),
        mono_ns() % 1_000_000_007
    )
}

/// `cfg` for a collector behind `front`, over TLS with the PKI's CA.
fn tls_cfg(protocol: OtlpProtocol, front: &TlsFront, pki: &Pki) -> OtlpCfg {
    OtlpCfg {
        enabled: true,
        protocol,
        endpoint: format!("https://{}", front.addr),
        tls: Some(llm_slo_agent::otlp::TlsCfg {
            ca_file: Some(pki.path("ca.pem")),
            ..Default::default()
        }),
        node_name: "n1".into(),
        sample_ratio: 1.0,
        timeout_ms: 2000,
        max_retries: 0,
        ..Default::default()
    }
}

fn headers_seen(rx: &Receiver, name: &str) -> Vec<Option<String>> {
    rx.got
        .lock()
        .unwrap()
        .exports
        .iter()
        .map(|e| e.0.get(name).cloned())
        .collect()
}

#[test]
fn tls_and_mtls_deliver_exactly_with_header_secrets_from_files() {
    let pki = Pki::new("deliver");
    for protocol in [OtlpProtocol::Http, OtlpProtocol::Grpc] {
        let rx = Receiver::start(protocol);
        // OTLP/HTTP: TLS, the certificate checked for the endpoint's IP address. gRPC: the
        // collector requires a client certificate, and is checked under another name.
        let mtls = protocol == OtlpProtocol::Grpc;
        let front = TlsFront::start(&pki, rx.addr, mtls);
        let mut c = tls_cfg(protocol, &front, &pki);
        let t = c.tls.as_mut().unwrap();
        if mtls {
            t.cert_file = Some(pki.path("client.pem"));
            t.key_file = Some(pki.path("client.key"));
            t.server_name = Some("collector.test".into());
        }
        let (s1, s2, s3) = (secret("a"), secret("b"), secret("c"));
        let hfile = pki.path(&format!("headers-{protocol:?}"));
        std::fs::write(&hfile, format!("# a Secret\nauthorization: Bearer {s1}\n")).unwrap();
        let kfile = pki.path(&format!("key-{protocol:?}"));
        std::fs::write(&kfile, format!("{s3}\n")).unwrap();
        c.headers_file = Some(hfile.clone());
        c.header_files = [("x-api-key".to_string(), kfile)].into();
        let x = Otlp::start(&c).unwrap();
        for id in 1..=50 {
            x.offer(&synthetic(id), Default::default());
        }
        assert!(
            wait_until(Duration::from_secs(10), || rx.spans().len() >= 50 * 5),
            "{protocol:?}: {} spans; errors {}",
            rx.spans().len(),
            x.counters.export_errors.load(Relaxed)
        );
        let traces = traces_by_request(&rx.spans());
        assert_eq!(traces.len(), 50, "{protocol:?}");
        for (id, t) in &traces {
            let mut rec = serde_json::to_value(&*synthetic(*id)).unwrap();
            rec["token_ns"] = serde_json::json!([5_000_000u64, 6_000_000u64]);
            check_trace(t, &rec, x.clock.offset_ns, 64);
        }
        let auth = format!("Bearer {s1}");
        assert!(headers_seen(&rx, "authorization")
            .iter()
            .all(|h| h.as_deref() == Some(auth.as_str())));
        assert!(headers_seen(&rx, "x-api-key")
            .iter()
            .all(|h| h.as_deref() == Some(s3.as_str())));
        assert!(front.handshakes.load(Relaxed) >= 1);
        assert_eq!(front.failed_handshakes.load(Relaxed), 0);

        // The Secret is updated (a new file renamed over the old, as the kubelet's symlink
        // swap does): the next exports carry the new token.
        let tmp = pki.path("headers.new");
        std::fs::write(&tmp, format!("authorization: Bearer {s2}\n")).unwrap();
        std::fs::rename(&tmp, &hfile).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let n = rx.got.lock().unwrap().exports.len();
        x.offer(&synthetic(51), Default::default());
        assert!(wait_until(Duration::from_secs(10), || rx
            .got
            .lock()
            .unwrap()
            .exports
            .len()
            > n));
        let auth2 = format!("Bearer {s2}");
        assert_eq!(
            headers_seen(&rx, "authorization")
                .last()
                .unwrap()
                .as_deref(),
            Some(auth2.as_str()),
            "{protocol:?}: the re-read token"
        );
        x.shutdown(Duration::from_secs(2));
        assert_eq!(x.counters.exported_traces.load(Relaxed), 51);
        assert_eq!(x.counters.export_errors.load(Relaxed), 0);
        let mut m = String::new();
        x.render(&mut m);
        common::promtool_check(&m);
        let mode = if mtls { "mtls" } else { "tls" };
        assert_eq!(
            metric(
                &m,
                &format!("llmslo_agent_otlp_transport_info{{transport=\"{mode}\"}}")
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            metric(&m, "llmslo_agent_otlp_header_reloads_total{result=\"ok\"}"),
            Some(1.0),
            "{m}"
        );
        for s in [&s1, &s2, &s3] {
            assert!(!m.contains(s.as_str()), "a secret in the metrics");
        }
    }
}

/// Waits for the exporter to count a failed export; nothing may arrive.
fn fails_counted(x: &Otlp, rx: &Receiver, what: &str) {
    for id in 1..=5 {
        x.offer(&synthetic(id), Default::default());
    }
    assert!(
        wait_until(Duration::from_secs(10), || x
            .counters
            .dropped_export_failed
            .load(Relaxed)
            >= 1),
        "{what}: a failed export is counted"
    );
    assert!(x.counters.export_errors.load(Relaxed) >= 1, "{what}");
    assert_eq!(x.counters.exported_traces.load(Relaxed), 0, "{what}");
    assert!(rx.spans().is_empty(), "{what}: nothing got through");
    let mut m = String::new();
    x.render(&mut m);
    assert!(
        metric(&m, "llmslo_agent_otlp_export_errors_total").is_some_and(|v| v >= 1.0),
        "{what}: {m}"
    );
    x.shutdown(Duration::from_secs(1));
}

#[test]
fn a_wrong_ca_or_a_missing_client_certificate_fails_exports_and_counts_them() {
    let pki = Pki::new("fail");
    for protocol in [OtlpProtocol::Http, OtlpProtocol::Grpc] {
        let rx = Receiver::start(protocol);
        let front = TlsFront::start(&pki, rx.addr, false);
        // A CA that did not sign the collector's certificate.
        let mut c = tls_cfg(protocol, &front, &pki);
        c.tls.as_mut().unwrap().ca_file = Some(pki.path("other-ca.pem"));
        fails_counted(
            &Otlp::start(&c).unwrap(),
            &rx,
            &format!("{protocol:?} wrong CA"),
        );
        assert!(front.failed_handshakes.load(Relaxed) >= 1);
        // A name the certificate does not carry.
        let mut c = tls_cfg(protocol, &front, &pki);
        c.tls.as_mut().unwrap().server_name = Some("elsewhere.test".into());
        fails_counted(
            &Otlp::start(&c).unwrap(),
            &rx,
            &format!("{protocol:?} wrong name"),
        );
        // Clear text to a TLS port.
        let mut c = tls_cfg(protocol, &front, &pki);
        c.tls = None;
        c.endpoint = format!("http://{}", front.addr);
        fails_counted(
            &Otlp::start(&c).unwrap(),
            &rx,
            &format!("{protocol:?} plaintext"),
        );

        // The collector requires a client certificate; the exporter has none.
        let mfront = TlsFront::start(&pki, rx.addr, true);
        let c = tls_cfg(protocol, &mfront, &pki);
        fails_counted(
            &Otlp::start(&c).unwrap(),
            &rx,
            &format!("{protocol:?} no client cert"),
        );
        assert!(mfront.failed_handshakes.load(Relaxed) >= 1);
        // A client certificate the collector does not trust (the other CA's own).
        let mut c = tls_cfg(protocol, &mfront, &pki);
        let t = c.tls.as_mut().unwrap();
        t.cert_file = Some(pki.path("other-ca.pem"));
        t.key_file = Some(pki.path("other-ca.key"));
        fails_counted(
            &Otlp::start(&c).unwrap(),
            &rx,
            &format!("{protocol:?} untrusted client cert"),
        );

        // insecure_skip_verify: the wrong CA no longer matters (and is warned about).
        let mut c = tls_cfg(protocol, &front, &pki);
        let t = c.tls.as_mut().unwrap();
        t.ca_file = Some(pki.path("other-ca.pem"));
        t.insecure_skip_verify = true;
        let x = Otlp::start(&c).unwrap();
        x.offer(&synthetic(7), Default::default());
        assert!(
            wait_until(Duration::from_secs(10), || rx.spans().len() == 5),
            "{protocol:?}: insecure_skip_verify delivers"
        );
        x.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn bad_tls_and_header_files_refuse_the_start_naming_the_file() {
    let pki = Pki::new("bad");
    let not_pem = pki.path("not.pem");
    std::fs::write(&not_pem, "-----BEGIN CERTIFICATE-----\nnot base64 !!\n").unwrap();
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "just text\n").unwrap();
    let missing = pki.path("missing.pem");
    let base = || OtlpCfg {
        enabled: true,
        endpoint: "https://127.0.0.1:1".into(),
        tls: Some(Default::default()),
        ..Default::default()
    };
    let start_err = |c: OtlpCfg| format!("{:#}", Otlp::start(&c).err().expect("start refused"));
    let tls = |f: &dyn Fn(&mut llm_slo_agent::otlp::TlsCfg)| {
        let mut c = base();
        f(c.tls.as_mut().unwrap());
        c
    };
    for (c, says) in [
        (
            tls(&|t| t.ca_file = Some(missing.clone())),
            format!("otlp.tls.ca_file {}", missing.display()),
        ),
        (
            tls(&|t| t.ca_file = Some(not_pem.clone())),
            format!("otlp.tls.ca_file {}: not PEM", not_pem.display()),
        ),
        (
            tls(&|t| t.ca_file = Some(empty.clone())),
            format!("otlp.tls.ca_file {}: no PEM certificate", empty.display()),
        ),
        (
            tls(&|t| {
                t.ca_file = Some(pki.path("ca.pem"));
                t.cert_file = Some(pki.path("client.pem"));
                t.key_file = Some(pki.path("server.key"));
            }),
            format!(
                "otlp.tls.cert_file {} and otlp.tls.key_file {} do not make a certificate and its key",
                pki.path("client.pem").display(),
                pki.path("server.key").display()
            ),
        ),
        (
            tls(&|t| {
                t.ca_file = Some(pki.path("ca.pem"));
                t.cert_file = Some(pki.path("client.pem"));
                t.key_file = Some(pki.path("client.pem"));
            }),
            format!(
                "otlp.tls.key_file {}: no PEM private key",
                pki.path("client.pem").display()
            ),
        ),
        (
            tls(&|t| {
                t.ca_file = Some(pki.path("ca.pem"));
                t.cert_file = Some(missing.clone());
                t.key_file = Some(pki.path("client.key"));
            }),
            format!("otlp.tls.cert_file {}", missing.display()),
        ),
        (
            OtlpCfg {
                headers_file: Some(missing.clone()),
                ..cfg(OtlpProtocol::Http, "127.0.0.1:1".parse().unwrap())
            },
            format!("otlp.headers_file {}", missing.display()),
        ),
        (
            OtlpCfg {
                header_files: [("authorization".to_string(), missing.clone())].into(),
                ..cfg(OtlpProtocol::Grpc, "127.0.0.1:1".parse().unwrap())
            },
            format!("otlp.header_files.authorization {}", missing.display()),
        ),
    ] {
        let e = start_err(c);
        assert!(e.contains(&says), "want {says:?} in: {e}");
    }
}

#[test]
fn config_checks_tls_and_header_file_keys() {
    let parse = |y: &str| -> anyhow::Result<llm_slo_agent::config::Config> {
        let c: llm_slo_agent::config::Config = serde_yaml::from_str(y)?;
        c.validate()?;
        Ok(c)
    };
    let c = parse(
        "otlp:\n  enabled: true\n  protocol: grpc\n  endpoint: https://c:4317\n  tls:\n    ca_file: /s/ca.crt\n    cert_file: /s/tls.crt\n    key_file: /s/tls.key\n    server_name: otel.example\n  headers_file: /s/headers\n  header_files: {authorization: /s/auth}\n",
    )
    .unwrap();
    let t = c.otlp.tls.as_ref().unwrap();
    assert_eq!(
        t.ca_file.as_deref(),
        Some(std::path::Path::new("/s/ca.crt"))
    );
    assert!(!t.insecure_skip_verify, "verification is on by default");
    assert!(
        parse("otlp: {endpoint: 'https://c:4318'}").is_ok(),
        "https without tls: system roots"
    );
    let e = |y: &str| {
        format!(
            "{:#}",
            parse(y).err().unwrap_or_else(|| panic!("{y} accepted"))
        )
    };
    assert!(e("otlp: {endpoint: 'http://c:4318', tls: {}}").contains("not https://"));
    assert!(e("otlp: {endpoint: 'ftp://c:4318'}").contains("http(s)://"));
    let creds = e("otlp: {endpoint: 'https://u:s3cr3t@c:4318/v1/traces'}");
    assert!(
        creds.contains("credentials in the URL") && !creds.contains("s3cr3t"),
        "{creds}"
    );
    assert!(e("otlp: {tls: {cert_file: /c}}").contains("go together"));
    assert!(e("otlp: {tls: {key_file: /k}}").contains("go together"));
    assert!(e("otlp: {tls: {server_name: 'a b'}}").contains("server_name"));
    assert!(
        e("otlp: {tls: {ca: /x}}").contains("unknown field"),
        "typos rejected"
    );
    assert!(e("otlp: {header_files: {'bad name': /x}}").contains("invalid header name"));
    // The value is not quoted back: it may be the secret.
    let bad = e("otlp: {headers: {authorization: \"Bearer s3cr3t\\u0001\"}}");
    assert!(
        bad.contains("invalid value of \"authorization\"") && !bad.contains("s3cr3t"),
        "{bad}"
    );
    let c = OtlpCfg {
        tls: Some(Default::default()),
        ..Default::default()
    };
    assert_eq!(
        c.endpoint_uri().unwrap(),
        "https://localhost:4318/v1/traces"
    );
    let c = OtlpCfg {
        protocol: OtlpProtocol::Grpc,
        tls: Some(Default::default()),
        ..Default::default()
    };
    assert_eq!(c.endpoint_uri().unwrap(), "https://localhost:4317");
}

#[test]
fn the_agent_refuses_to_start_on_a_bad_tls_file_and_names_it() {
    if !kernel_tests_enabled("the_agent_refuses_to_start_on_a_bad_tls_file_and_names_it") {
        return;
    }
    let pki = Pki::new("agent-bad");
    let yaml = format!(
        "otlp:\n  enabled: true\n  endpoint: https://127.0.0.1:4318\n  tls: {{ca_file: {}, cert_file: {}, key_file: {}}}\n",
        pki.p("ca.pem"),
        pki.p("client.pem"),
        pki.p("server.key")
    );
    let mut agent = Agent::launch_with_config(&yaml, &["--no-auto"]);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent started with a key that is not its certificate's:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = agent.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        !log.contains("panicked"),
        "a clean refusal, not a panic:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "otlp.tls.cert_file {} and otlp.tls.key_file {} do not make a certificate and its key",
            pki.p("client.pem"),
            pki.p("server.key")
        )),
        "{log}"
    );
}
