//! OpenTelemetry export of request traces (DESIGN.md §2 "OTLP spans"): every abnormal
//! request (whatever `abnormal.rs` keeps) and a sampled share of the rest, as OTLP traces over
//! HTTP/protobuf or gRPC. The BPF thread only hands a record over a bounded queue
//! (`try_send`: a full queue drops and counts, never waits); an exporter thread with its own
//! small runtime builds the spans (`spans.rs`) and sends them in batches, over TLS when the
//! endpoint is https (`tls.rs`), with headers that may come from files (`headers.rs`), both
//! wired into the SDK's HTTP client and gRPC channel by `client.rs`.

mod client;
pub mod headers;
pub mod spans;
pub mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::SpanExporter as _;
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::abnormal::KeptBecause;
use crate::record::RequestRecord;
use headers::Headers;
use spans::{Ids, MonoToUnix, TraceOpts};
pub use tls::TlsCfg;

/// The `otlp` section of the config (README "OpenTelemetry"). `Debug` shows header names only.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpCfg {
    pub enabled: bool,
    /// `http` (protobuf over HTTP, port 4318) or `grpc` (port 4317).
    pub protocol: OtlpProtocol,
    /// Collector URL, `http://` or `https://`. Empty: `localhost:4318/v1/traces` or
    /// `localhost:4317` (https when `tls` is set). An HTTP endpoint without a path gets
    /// `/v1/traces`.
    pub endpoint: String,
    /// TLS to the collector (CA, client certificate, server name); set, it requires https.
    pub tls: Option<TlsCfg>,
    /// Sent with every export (HTTP headers or gRPC metadata).
    pub headers: BTreeMap<String, String>,
    /// A file of `name: value` lines sent as headers too (e.g. a mounted Secret holding
    /// `authorization: Bearer …`), re-read when it changes.
    pub headers_file: Option<PathBuf>,
    /// Headers whose value is a file's content, `{authorization: /secrets/otlp/auth}`.
    pub header_files: BTreeMap<String, PathBuf>,
    /// Per export attempt.
    pub timeout_ms: u64,
    /// Share of the requests that are not abnormal exported as well (0 … 1).
    pub sample_ratio: f64,
    pub service_name: String,
    /// `host.name` and `k8s.node.name`; empty: `$NODE_NAME`, else the host name.
    pub node_name: String,
    /// Extra resource attributes (e.g. `k8s.cluster.name`).
    pub resource_attributes: BTreeMap<String, String>,
    /// Requests waiting for export; beyond that they are dropped and counted.
    pub queue_size: usize,
    /// Requests per export call.
    pub batch_size: usize,
    /// Retries of a failed export (with backoff) before its requests are dropped and counted.
    pub max_retries: usize,
    /// Token writes sent as events on the root span, at most (0: none).
    pub token_events: usize,
}

impl std::fmt::Debug for OtlpCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden: BTreeMap<&str, &str> = self
            .headers
            .keys()
            .map(|k| (k.as_str(), "<hidden>"))
            .collect();
        f.debug_struct("OtlpCfg")
            .field("enabled", &self.enabled)
            .field("protocol", &self.protocol)
            .field("endpoint", &shown_url(&self.endpoint))
            .field("tls", &self.tls)
            .field("headers", &hidden)
            .field("headers_file", &self.headers_file)
            .field("header_files", &self.header_files)
            .field("timeout_ms", &self.timeout_ms)
            .field("sample_ratio", &self.sample_ratio)
            .field("service_name", &self.service_name)
            .field("node_name", &self.node_name)
            .field("resource_attributes", &self.resource_attributes)
            .field("queue_size", &self.queue_size)
            .field("batch_size", &self.batch_size)
            .field("max_retries", &self.max_retries)
            .field("token_events", &self.token_events)
            .finish()
    }
}

/// A URL as it may be logged or quoted in an error: without its query and fragment, where
/// some hosted collectors take an API key.
pub fn shown_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or("")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    Http,
    Grpc,
}

impl Default for OtlpCfg {
    fn default() -> Self {
        OtlpCfg {
            enabled: false,
            protocol: OtlpProtocol::Http,
            endpoint: String::new(),
            tls: None,
            headers: BTreeMap::new(),
            headers_file: None,
            header_files: BTreeMap::new(),
            timeout_ms: 10_000,
            sample_ratio: 0.01,
            service_name: "llm-slo-agent".into(),
            node_name: String::new(),
            resource_attributes: BTreeMap::new(),
            queue_size: 2048,
            batch_size: 256,
            max_retries: 3,
            token_events: 64,
        }
    }
}

impl OtlpCfg {
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.sample_ratio),
            "otlp.sample_ratio must be within 0 … 1 (got {})",
            self.sample_ratio
        );
        anyhow::ensure!(self.queue_size > 0, "otlp.queue_size must be > 0");
        anyhow::ensure!(self.batch_size > 0, "otlp.batch_size must be > 0");
        anyhow::ensure!(self.timeout_ms > 0, "otlp.timeout_ms must be > 0");
        anyhow::ensure!(self.max_retries <= 10, "otlp.max_retries must be <= 10");
        anyhow::ensure!(
            self.token_events <= 1000,
            "otlp.token_events must be <= 1000"
        );
        self.endpoint_uri()?;
        if let Some(t) = &self.tls {
            t.validate()?;
        }
        for (k, v) in &self.headers {
            axum::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .with_context(|| format!("otlp.headers: invalid header name {k:?}"))?;
            axum::http::HeaderValue::from_str(v)
                .map_err(|_| anyhow::anyhow!("otlp.headers: invalid value of {k:?}"))?;
        }
        for k in self.header_files.keys() {
            axum::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .with_context(|| format!("otlp.header_files: invalid header name {k:?}"))?;
        }
        Ok(())
    }

    /// The endpoint with the defaults applied.
    pub fn endpoint_uri(&self) -> Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let e = match (self.endpoint.trim(), self.protocol) {
            ("", OtlpProtocol::Http) => format!("{scheme}://localhost:4318/v1/traces"),
            ("", OtlpProtocol::Grpc) => format!("{scheme}://localhost:4317"),
            (e, _) => e.to_string(),
        };
        // Not echoed: a password there would end up in the log. hyper would not send it anyway.
        let authority = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
        anyhow::ensure!(
            !authority.split('/').next().unwrap_or("").contains('@'),
            "otlp.endpoint: credentials in the URL (user:password@) are not sent; put an \
             authorization header in otlp.headers_file or otlp.header_files"
        );
        let uri: axum::http::Uri = e
            .parse()
            .with_context(|| format!("otlp.endpoint: not a URL: {:?}", shown_url(&e)))?;
        anyhow::ensure!(
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some(),
            "otlp.endpoint must be http(s)://host:port[/path]: {:?}",
            shown_url(&e)
        );
        anyhow::ensure!(
            self.tls.is_none() || uri.scheme_str() == Some("https"),
            "otlp.tls is set but otlp.endpoint is not https:// (traces would go in clear text): {:?}",
            shown_url(&e)
        );
        if self.protocol == OtlpProtocol::Http && matches!(uri.path(), "" | "/") {
            return Ok(format!("{}/v1/traces", e.trim_end_matches('/')));
        }
        Ok(e)
    }

    fn node(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|n| n.trim().to_string())
            .unwrap_or_default()
    }
}

/// What the exporter did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub queued: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_export_failed: AtomicU64,
    pub dropped_shutdown: AtomicU64,
    pub dropped_no_start: AtomicU64,
    pub exported_traces: AtomicU64,
    pub exported_spans: AtomicU64,
    pub export_errors: AtomicU64,
}

/// Whether the transport is encrypted, for `/metrics`.
#[derive(Debug, Clone, Copy)]
struct Transport {
    tls: bool,
    mtls: bool,
}

type Job = (Arc<RequestRecord>, KeptBecause);

/// The exporter: a bounded queue and the thread that drains it.
pub struct Otlp {
    tx: mpsc::Sender<Job>,
    ids: Ids,
    sample_ratio: f64,
    pub clock: MonoToUnix,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    headers: Arc<Headers>,
    transport: Transport,
}

impl Otlp {
    /// Starts the exporter thread when `cfg.enabled`.
    pub fn start_if_enabled(cfg: &OtlpCfg) -> Result<Option<Otlp>> {
        if !cfg.enabled {
            return Ok(None);
        }
        Otlp::start(cfg).map(Some)
    }

    pub fn start(cfg: &OtlpCfg) -> Result<Otlp> {
        cfg.validate()?;
        let clock = MonoToUnix::now();
        let ids = Ids::random();
        let (tx, rx) = mpsc::channel::<Job>(cfg.queue_size);
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let headers = Arc::new(Headers::load(
            &cfg.headers,
            cfg.headers_file.as_deref(),
            &cfg.header_files,
        )?);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("OTLP exporter runtime")?;
        let exporter = {
            let _guard = rt.enter();
            build_exporter(cfg, clock, headers.clone())
        };
        let exporter = match exporter {
            Ok(x) => x,
            Err(e) => {
                // The caller may be async (the agent starts inside its runtime), where dropping
                // a runtime panics.
                rt.shutdown_background();
                return Err(e);
            }
        };
        let endpoint = cfg.endpoint_uri()?;
        let tls = cfg.tls.clone().unwrap_or_default();
        let transport = Transport {
            tls: endpoint.starts_with("https://"),
            mtls: tls.cert_file.is_some(),
        };
        // Header names only: their values may be secrets.
        let names: Vec<String> = headers.current().keys().map(|k| k.to_string()).collect();
        tracing::info!(
            protocol = ?cfg.protocol, endpoint = %shown_url(&endpoint), tls = transport.tls, mtls = transport.mtls,
            ca_file = ?tls.ca_file, server_name = ?tls.server_name,
            headers = ?names, headers_file = ?cfg.headers_file,
            sample_ratio = cfg.sample_ratio,
            monotonic_offset_ns = clock.offset_ns, "OTLP trace export on"
        );
        let worker = Worker {
            rx,
            exporter,
            ids,
            clock,
            counters: counters.clone(),
            stop: stop.clone(),
            batch_size: cfg.batch_size,
            token_events: cfg.token_events,
            // Each attempt is bounded by the exporter's timeout; this bounds the whole call
            // (attempts and backoff, and a server's Retry-After) as well.
            call_limit: Duration::from_millis(cfg.timeout_ms) * (cfg.max_retries as u32 + 1)
                + Duration::from_secs(2),
        };
        // The runtime runs the worker for good, so the client's connections are driven (and
        // their closing noticed) between exports too.
        let thread = std::thread::Builder::new()
            .name("llmslo-otlp".into())
            .spawn(move || rt.block_on(worker.run()))?;
        Ok(Otlp {
            tx,
            ids,
            sample_ratio: cfg.sample_ratio,
            clock,
            counters,
            stop,
            thread: Mutex::new(Some(thread)),
            headers,
            transport,
        })
    }

    /// Hands a stored record over if it is abnormal or sampled. Never blocks: when the queue
    /// is full the record is dropped and counted.
    pub fn offer(&self, rec: &Arc<RequestRecord>, why: KeptBecause) {
        if why.is_empty() && !self.ids.sampled(rec.id, self.sample_ratio) {
            return;
        }
        match self.tx.try_send((rec.clone(), why)) {
            Ok(()) => &self.counters.queued,
            Err(TrySendError::Full(_)) => &self.counters.dropped_queue_full,
            Err(TrySendError::Closed(_)) => &self.counters.dropped_shutdown,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Exports what is queued within `within`, then stops the thread.
    pub fn shutdown(&self, within: Duration) {
        let deadline = Instant::now() + within;
        // Give the worker time to drain, then tell it to stop.
        while Instant::now() < deadline {
            let c = &self.counters;
            let done = c.exported_traces.load(Ordering::Relaxed)
                + c.dropped_export_failed.load(Ordering::Relaxed)
                + c.dropped_no_start.load(Ordering::Relaxed);
            if done >= c.queued.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::SeqCst);
        // An export in flight may take its whole time limit: wait for it only until the
        // deadline (plus one receive tick), then leave the thread to the process exit.
        let deadline = deadline.max(Instant::now()) + Duration::from_millis(300);
        if let Some(h) = self.thread.lock().expect("otlp thread lock").take() {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// The exporter's `llmslo_agent_otlp_*` metrics.
    pub fn render(&self, out: &mut String) {
        use crate::stats::prom::{write_counter, write_gauge};
        let c = &self.counters;
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        write_counter(
            out,
            "llmslo_agent_otlp_traces_queued_total",
            "Requests handed to the OTLP exporter (abnormal or sampled).",
            &[(&[], v(&c.queued))],
        );
        write_counter(
            out,
            "llmslo_agent_otlp_traces_exported_total",
            "Requests exported as OTLP traces (accepted by the receiver).",
            &[(&[], v(&c.exported_traces))],
        );
        write_counter(
            out,
            "llmslo_agent_otlp_spans_exported_total",
            "OTLP spans accepted by the receiver.",
            &[(&[], v(&c.exported_spans))],
        );
        write_counter(
            out,
            "llmslo_agent_otlp_traces_dropped_total",
            "Requests not exported: queue full, export failed after retries, shut down, or no start timestamp.",
            &[
                (&[("reason", "queue_full")], v(&c.dropped_queue_full)),
                (&[("reason", "export_failed")], v(&c.dropped_export_failed)),
                (&[("reason", "shutdown")], v(&c.dropped_shutdown)),
                (&[("reason", "no_start")], v(&c.dropped_no_start)),
            ],
        );
        write_counter(
            out,
            "llmslo_agent_otlp_export_errors_total",
            "OTLP export calls that failed after their retries.",
            &[(&[], v(&c.export_errors))],
        );
        write_gauge(
            out,
            "llmslo_agent_otlp_monotonic_offset_seconds",
            "Unix time minus CLOCK_MONOTONIC, as added to every span time.",
            &[(&[], self.clock.offset_ns as f64 / 1e9)],
        );
        let t = self.transport;
        let mode = match (t.tls, t.mtls) {
            (false, _) => "plaintext",
            (true, false) => "tls",
            (true, true) => "mtls",
        };
        write_gauge(
            out,
            "llmslo_agent_otlp_transport_info",
            "The exporter's transport to the collector: plaintext, tls or mtls (value 1).",
            &[(&[("transport", mode)], 1.0)],
        );
        let r = &self.headers.reloads;
        write_counter(
            out,
            "llmslo_agent_otlp_header_reloads_total",
            "Re-reads of changed OTLP header files (otlp.headers_file, otlp.header_files); failed ones keep the previous headers.",
            &[
                (&[("result", "ok")], v(&r.ok)),
                (&[("result", "failed")], v(&r.failed)),
            ],
        );
    }
}

fn build_exporter(
    cfg: &OtlpCfg,
    clock: MonoToUnix,
    headers: Arc<Headers>,
) -> Result<opentelemetry_otlp::SpanExporter> {
    let mut exporter = client::build(cfg, headers)?;
    let node = cfg.node();
    let mut attrs = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("llmslo.clock.monotonic_offset_ns", clock.offset_ns as i64),
    ];
    if !node.is_empty() {
        attrs.push(KeyValue::new("host.name", node.clone()));
        attrs.push(KeyValue::new("k8s.node.name", node));
    }
    for (k, v) in &cfg.resource_attributes {
        attrs.push(KeyValue::new(k.clone(), v.clone()));
    }
    let resource = Resource::builder_empty()
        .with_service_name(cfg.service_name.clone())
        .with_attributes(attrs)
        .build();
    exporter.set_resource(&resource);
    Ok(exporter)
}

struct Worker {
    rx: mpsc::Receiver<Job>,
    exporter: opentelemetry_otlp::SpanExporter,
    ids: Ids,
    clock: MonoToUnix,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    batch_size: usize,
    token_events: usize,
    call_limit: Duration,
}

impl Worker {
    async fn run(mut self) {
        let scope = InstrumentationScope::builder("llm-slo-agent")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let (ids, counters) = (self.ids, self.counters.clone());
        let opts = TraceOpts {
            clock: self.clock,
            ids: &ids,
            token_events: self.token_events,
            scope: &scope,
        };
        let c = &*counters;
        let mut batch: Vec<Job> = Vec::with_capacity(self.batch_size);
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            match tokio::time::timeout(Duration::from_millis(100), self.rx.recv()).await {
                Ok(Some(j)) => batch.push(j),
                Err(_) if !stopping => continue,
                _ => break,
            }
            while batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if stopping {
                c.dropped_shutdown
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                continue;
            }
            let mut spans = Vec::new();
            let mut traces = 0u64;
            for (rec, why) in batch.drain(..) {
                match spans::record_spans(&rec, why, &opts) {
                    Some(s) => {
                        spans.extend(s);
                        traces += 1;
                    }
                    None => {
                        c.dropped_no_start.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if traces == 0 {
                continue;
            }
            let n = spans.len() as u64;
            let res = tokio::time::timeout(self.call_limit, self.exporter.export(spans)).await;
            match res {
                Ok(Ok(())) => {
                    c.exported_traces.fetch_add(traces, Ordering::Relaxed);
                    c.exported_spans.fetch_add(n, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, traces, "OTLP export failed");
                    c.export_errors.fetch_add(1, Ordering::Relaxed);
                    c.dropped_export_failed.fetch_add(traces, Ordering::Relaxed);
                }
                Err(_) => {
                    tracing::warn!(limit = ?self.call_limit, traces, "OTLP export timed out");
                    c.export_errors.fetch_add(1, Ordering::Relaxed);
                    c.dropped_export_failed.fetch_add(traces, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_header_values_are_not_shown() {
        assert_eq!(
            shown_url("https://ingest.example:4318/v1/traces?api_key=SECRET#x"),
            "https://ingest.example:4318/v1/traces"
        );
        assert_eq!(shown_url("http://c:4318"), "http://c:4318");
        let cfg = OtlpCfg {
            endpoint: "https://c:4318/v1/traces?token=SECRET".into(),
            headers: [("authorization".to_string(), "Bearer SECRET".to_string())].into(),
            ..Default::default()
        };
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("SECRET") && dbg.contains("authorization"),
            "{dbg}"
        );
        let err = format!(
            "{:#}",
            OtlpCfg {
                tls: Some(TlsCfg::default()),
                endpoint: "http://c:4318/v1/traces?token=SECRET".into(),
                ..Default::default()
            }
            .endpoint_uri()
            .unwrap_err()
        );
        assert!(
            err.contains("not https://") && !err.contains("SECRET"),
            "{err}"
        );
    }
}
