//! One request record → one OTLP trace (pure): a root span from the request's start to its
//! end, a child per stage inside E2E in timeline order, GenAI/HTTP semantic-convention
//! attributes, token writes as events. No payload text: the record has none.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::abnormal::KeptBecause;
use crate::record::{ns_to_ms, RequestRecord, Stage, Stages};

/// CLOCK_MONOTONIC → Unix time by one offset taken when the exporter starts: the realtime
/// clock read between two monotonic reads, `offset = realtime − (mono₁ + mono₂)/2`. Every
/// span time is `monotonic ns + offset`, so a span's start and end are the record's
/// timestamps exactly in this mapping (a later NTP step of the wall clock is not followed).
/// The offset is sent as the resource attribute `llmslo.clock.monotonic_offset_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonoToUnix {
    pub offset_ns: u64,
}

impl MonoToUnix {
    pub fn now() -> MonoToUnix {
        let m1 = crate::agent::mono_ns();
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let m2 = crate::agent::mono_ns();
        MonoToUnix {
            offset_ns: real.saturating_sub(m1 / 2 + m2 / 2),
        }
    }

    pub fn unix(self, mono_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(mono_ns.saturating_add(self.offset_ns))
    }
}

/// Trace and span ids derived from the record id and a per-agent random salt: unique across
/// agents and restarts, stable for one record (a retried export sends the same ids).
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub salt: [u64; 4],
}

/// splitmix64: a bijective mixer, so distinct inputs give distinct outputs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Ids {
    pub fn random() -> Ids {
        let mut b = [0u8; 32];
        let ok = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .is_ok();
        if !ok {
            let t = crate::agent::mono_ns() ^ (std::process::id() as u64) << 40;
            b[..8].copy_from_slice(&mix(t).to_le_bytes());
            b[8..16].copy_from_slice(&mix(!t).to_le_bytes());
        }
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Ids {
            salt: [w(0), w(1), w(2), w(3)],
        }
    }

    pub fn trace_id(&self, rec_id: u64) -> TraceId {
        let hi = mix(self.salt[0] ^ rec_id) as u128;
        let lo = mix(self.salt[1] ^ rec_id.rotate_left(32)) as u128;
        TraceId::from((hi << 64 | lo).max(1))
    }

    /// Span `n` of the record's trace (0: the root); n < 64.
    pub fn span_id(&self, rec_id: u64, n: u64) -> SpanId {
        SpanId::from(
            mix(self.salt[2]
                .wrapping_add(rec_id.wrapping_mul(64))
                .wrapping_add(n))
            .max(1),
        )
    }

    /// Whether a request that is not abnormal is sent anyway: a fixed share `ratio` of
    /// record ids, decided by hash (so the choice does not depend on timing).
    pub fn sampled(&self, rec_id: u64, ratio: f64) -> bool {
        ratio >= 1.0 || (mix(self.salt[3] ^ rec_id) as f64) < ratio * u64::MAX as f64
    }
}

/// What a trace carries besides the record.
pub struct TraceOpts<'a> {
    pub clock: MonoToUnix,
    pub ids: &'a Ids,
    /// At most this many token writes become events on the root span.
    pub token_events: usize,
    pub scope: &'a InstrumentationScope,
}

/// `gen_ai.operation.name` from the route (OpenAI, TGI, Ollama, Triton), when it says.
pub fn operation_name(path: Option<&str>) -> Option<&'static str> {
    let p = path?.split('?').next().unwrap_or("");
    if p.ends_with("/chat/completions") || p == "/api/chat" {
        Some("chat")
    } else if p.ends_with("/completions") {
        Some("text_completion")
    } else if p.ends_with("/embeddings") || p == "/api/embed" || p == "/api/embeddings" {
        Some("embeddings")
    } else if p.ends_with("/generate") || p.ends_with("/generate_stream") {
        Some("generate_content")
    } else {
        None
    }
}

fn kv(k: &'static str, v: impl Into<Value>) -> KeyValue {
    KeyValue::new(k, v)
}

fn host_port(addr: Option<std::net::SocketAddr>) -> Option<(String, i64)> {
    let a = addr?;
    Some((a.ip().to_string(), a.port() as i64))
}

/// Why a request is exported: the abnormal kinds it was kept for, else `sampled`.
pub fn reasons(why: KeptBecause) -> Vec<&'static str> {
    let r: Vec<&'static str> = why.names().collect();
    if r.is_empty() {
        vec!["sampled"]
    } else {
        r
    }
}

fn root_attributes(rec: &RequestRecord, why: KeptBecause) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(40);
    a.push(kv("llmslo.request.id", rec.id as i64));
    let reasons: Vec<StringValue> = reasons(why).into_iter().map(StringValue::from).collect();
    a.push(kv(
        "llmslo.kept_because",
        Value::Array(Array::String(reasons)),
    ));
    if let Some(op) = operation_name(rec.path.as_deref()) {
        a.push(kv("gen_ai.operation.name", op));
    }
    if let Some(m) = &rec.model {
        a.push(kv("gen_ai.request.model", m.clone()));
    }
    if let Some(t) = rec.prompt_tokens {
        a.push(kv("gen_ai.usage.input_tokens", t as i64));
    }
    if let Some(t) = rec.output_tokens {
        a.push(kv("gen_ai.usage.output_tokens", t as i64));
    }
    if let Some(m) = &rec.method {
        a.push(kv("http.request.method", m.clone()));
    }
    if let Some(p) = &rec.path {
        a.push(kv(
            "url.path",
            p.split('?').next().unwrap_or("").to_string(),
        ));
        let route = crate::stats::route_of(Some(p));
        if route != "other" {
            a.push(kv("http.route", route));
        }
    }
    if let Some(s) = rec.status {
        a.push(kv("http.response.status_code", s as i64));
    }
    if let Some((h, p)) = host_port(rec.dst) {
        a.push(kv("server.address", h));
        a.push(kv("server.port", p));
    }
    if let Some((h, p)) = host_port(rec.src) {
        a.push(kv("client.address", h));
        a.push(kv("client.port", p));
    }
    for (k, v) in [
        ("k8s.namespace.name", &rec.namespace),
        ("k8s.pod.name", &rec.pod),
        ("container.id", &rec.container),
    ] {
        if let Some(v) = v {
            a.push(kv(k, v.clone()));
        }
    }
    a.push(kv("process.pid", rec.pid as i64));
    a.push(kv("process.executable.name", rec.comm.clone()));
    a.push(kv("llmslo.streaming", rec.streaming));
    a.push(kv("llmslo.aborted", rec.aborted));
    if let Some(o) = rec.origin {
        a.push(kv("llmslo.origin", o));
    }
    for (k, v) in [
        ("llmslo.ttft_ms", rec.ttft_ms),
        ("llmslo.tpot_ms", rec.tpot_ms),
        ("llmslo.e2e_ms", rec.e2e_ms),
        ("llmslo.ttfb_ms", rec.ttfb_ms),
    ] {
        if let Some(v) = v {
            a.push(kv(k, v));
        }
    }
    if let Some(max) = rec.token_ns.itl_ms().reduce(f64::max) {
        a.push(kv("llmslo.itl_max_ms", max));
    }
    a.push(kv("llmslo.request_bytes", rec.request_bytes as i64));
    a.push(kv("llmslo.response_bytes", rec.response_bytes as i64));
    a.push(kv("llmslo.output_events", rec.output_events as i64));
    // Connection set-up happens before the request's start: not a child, an attribute.
    for s in [Stage::TcpHandshake, Stage::AcceptWait] {
        if let Some(ns) = rec.stages.get(s) {
            let key = match s {
                Stage::TcpHandshake => "llmslo.stage.tcp_handshake_ms",
                _ => "llmslo.stage.accept_wait_ms",
            };
            a.push(kv(key, ns_to_ms(ns)));
        }
    }
    if let Some(sc) = &rec.sidecar {
        a.push(kv("llmslo.sidecar.comm", sc.comm.clone()));
        a.push(kv("llmslo.sidecar.pid", sc.pid as i64));
    }
    if rec.aborted {
        a.push(kv("error.type", "aborted"));
    } else if let Some(s) = rec.status.filter(|s| *s >= 500) {
        a.push(kv("error.type", s.to_string()));
    }
    a
}

/// The request's root span name: `{method} {route}` (HTTP semantic conventions), the method
/// alone for an unknown route, `llm.request` without a method.
pub fn root_name(rec: &RequestRecord) -> String {
    let route = crate::stats::route_of(rec.path.as_deref());
    match &rec.method {
        Some(m) if route != "other" && route != "unknown" => format!("{m} {route}"),
        Some(m) => m.clone(),
        None => "llm.request".into(),
    }
}

/// The spans of one request, root first, or `None` when its start was never seen (nothing
/// to place on a timeline). The root runs from `start_ns` to `end_ns` (an aborted request
/// without an end: its latest timestamp); each child is a stage inside E2E with the record's
/// boundary timestamps as start and end.
pub fn record_spans(rec: &RequestRecord, why: KeptBecause, o: &TraceOpts) -> Option<Vec<SpanData>> {
    let start = rec.start_ns?;
    let latest = rec
        .timestamps
        .iter()
        .map(|(_, v)| v)
        .chain(rec.token_ns.iter())
        .max()
        .unwrap_or(start);
    let end = rec.end_ns.unwrap_or(latest).max(start);
    let trace_id = o.ids.trace_id(rec.id);
    let ctx = |n: u64| {
        SpanContext::new(
            trace_id,
            o.ids.span_id(rec.id, n),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    };
    let root_id = o.ids.span_id(rec.id, 0);
    let status = if rec.aborted {
        Status::error("request aborted")
    } else if rec.status.is_some_and(|s| s >= 500) {
        Status::error(format!("HTTP {}", rec.status.unwrap_or(0)))
    } else {
        Status::Unset
    };
    let mut events = SpanEvents::default();
    for (i, t) in rec.token_ns.iter().take(o.token_events).enumerate() {
        events.events.push(Event::new(
            "llmslo.token",
            o.clock.unix(t),
            vec![kv("llmslo.token.index", i as i64)],
            0,
        ));
    }
    events.dropped_count = rec.token_ns.len().saturating_sub(o.token_events) as u32;
    let span =
        |ctx: SpanContext, parent: SpanId, kind, name: Cow<'static, str>, a, b, attrs| SpanData {
            span_context: ctx,
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: kind,
            name,
            start_time: o.clock.unix(a),
            end_time: o.clock.unix(b),
            attributes: attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: o.scope.clone(),
        };
    let mut root = span(
        ctx(0),
        SpanId::INVALID,
        SpanKind::Server,
        root_name(rec).into(),
        start,
        end,
        root_attributes(rec, why),
    );
    root.events = events;
    root.status = status;
    let mut out = vec![root];
    let stages = Stages::intervals(&rec.timestamps, rec.first_on_conn, rec.streaming);
    for (n, (stage, a, b)) in stages.into_iter().filter(|s| s.0.in_e2e()).enumerate() {
        out.push(span(
            ctx(n as u64 + 1),
            root_id,
            SpanKind::Internal,
            stage.name().into(),
            a,
            b,
            stage_attributes(rec, stage),
        ));
    }
    Some(out)
}

/// `llmslo.stage`, and for the server-side stages what happened inside the server: the serving
/// thread's run-queue wait and the process's GPU activity, where measured.
fn stage_attributes(rec: &RequestRecord, stage: Stage) -> Vec<KeyValue> {
    let mut a = vec![kv("llmslo.stage", stage.name())];
    if let Some(w) = rec.cpu_runqueue_wait_ms.as_ref().and_then(|w| w.get(stage)) {
        a.push(kv("llmslo.cpu.runqueue_wait_ms", ns_to_ms(w)));
    }
    if let Some(g) = rec.gpu.as_ref().and_then(|g| g.get(stage)) {
        a.push(kv("llmslo.gpu.kernel_launches", g.launches as i64));
        a.push(kv("llmslo.gpu.graph_launches", g.graph_launches as i64));
        a.push(kv("llmslo.gpu.sync_wait_ms", g.sync_wait_ms));
        if let Some(f) = g.busy_fraction {
            a.push(kv("llmslo.gpu.busy_fraction", f));
        }
    }
    a
}

#[cfg(test)]
#[path = "tests_spans.rs"]
mod tests;
