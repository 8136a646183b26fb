//! Load generator: keep-alive connections, each driven by its own thread with blocking
//! sockets, recording per request when it sent and when each response byte and SSE
//! event arrived (CLOCK_MONOTONIC right after the read() that delivered it).
//! Client-side ground truth, measured like `vllm bench serve` measures (DESIGN.md §3).

use crate::loadgen_conn::{Conn, Outcome};
use crate::rng::SplitMix64;
use crate::{http, mono_ns};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which OpenAI endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }
}

/// Prompt size (bytes of prompt text) for request `n`.
pub type PromptFn = Arc<dyn Fn(u64) -> usize + Send + Sync>;

/// What load to send where. `LoadConfig::new(addr)` gives sane defaults.
#[derive(Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Keep-alive connections, one thread each.
    pub connections: usize,
    /// Requests in total, handed to whichever connection is free next.
    pub requests: usize,
    /// Fraction of requests with `"stream": true`.
    pub streaming_ratio: f64,
    /// Prompt text sizes to pick from (seeded), unless `prompt_bytes_fn` is set.
    pub prompt_bytes: Vec<usize>,
    pub prompt_bytes_fn: Option<PromptFn>,
    /// `max_tokens` sent; None leaves it to the server.
    pub max_tokens: Option<u64>,
    /// Ask for the usage chunk on streamed responses.
    pub include_usage: bool,
    pub model: String,
    /// Models the requests take in turn (request i the i-th, modulo): each is echoed in the
    /// response's events, so a keep-alive connection's responses change shape. Empty: `model`.
    pub models: Vec<String>,
    pub route: Route,
    /// Close the socket after this many SSE events (any kind) have arrived ...
    pub abort_after_events: Option<usize>,
    /// ... on this fraction of the streamed requests.
    pub abort_ratio: f64,
    /// Send two requests back-to-back before reading (no aborts on those).
    pub pipeline: bool,
    /// Send request bodies with chunked transfer encoding instead of Content-Length.
    pub chunked_body: bool,
    /// Open-loop arrivals per second (seeded Poisson schedule); None: closed loop.
    pub rate: Option<f64>,
    pub seed: u64,
    /// Hard stop for the whole run, including connects and reads.
    pub deadline: Duration,
    /// Text embedded in every prompt (privacy tests look for it in the agent output).
    pub marker: Option<String>,
    /// `x-request-id` of request n is `request_id_base + n`.
    pub request_id_base: u64,
    /// Targets other than loopback and the testbed's pod range (10.200.0.0/16) are
    /// refused unless set, e.g. for a service VIP that the test itself DNATs.
    pub allow_other_targets: bool,
    /// Run the connections from inside this network namespace (a client "outside the node").
    pub netns: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for LoadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadConfig")
            .field("target", &self.target)
            .field("connections", &self.connections)
            .field("requests", &self.requests)
            .field("streaming_ratio", &self.streaming_ratio)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl LoadConfig {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            connections: 1,
            requests: 1,
            streaming_ratio: 1.0,
            prompt_bytes: vec![200],
            prompt_bytes_fn: None,
            max_tokens: Some(16),
            include_usage: true,
            model: "synth-llm".into(),
            models: Vec::new(),
            route: Route::Chat,
            abort_after_events: None,
            abort_ratio: 0.1,
            pipeline: false,
            chunked_body: false,
            rate: None,
            seed: 1,
            deadline: Duration::from_secs(60),
            marker: None,
            request_id_base: 0,
            allow_other_targets: false,
            netns: None,
        }
    }
}

/// What the client saw of one request. All `*_ns` are CLOCK_MONOTONIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The `x-request-id` sent.
    pub request_id: u64,
    /// Which connection thread ran it.
    pub conn: usize,
    /// Ephemeral port of the connection it went on (0 if never connected).
    pub local_port: u16,
    /// Index of the request on its TCP connection (0 = first).
    pub seq_on_conn: u32,
    pub streaming: bool,
    /// Prompt text bytes and whole request bytes on the wire.
    pub prompt_bytes: usize,
    pub request_bytes: usize,
    /// Open loop: when the schedule said to send.
    pub scheduled_ns: Option<u64>,
    /// When the request left: the kernel's transmit stamp (SO_TIMESTAMPING, packet handed to
    /// the device's queue) for requests up to 64 KiB, else just before the write.
    pub send_ns: u64,
    /// After the read that delivered the response's first byte.
    pub first_byte_ns: Option<u64>,
    /// Each SSE event when its terminating blank line arrived; true = carries content.
    pub events: Vec<(u64, bool)>,
    /// When the first content event shared its read with later events: the earliest it can
    /// have arrived (the previous read's stamp) minus `send_ns`; `ttft_ns` is then an upper bound.
    #[serde(default)]
    pub ttft_floor_ns: Option<u64>,
    /// First content event minus `send_ns`.
    pub ttft_ns: Option<u64>,
    /// After the read that delivered the response's last byte.
    pub end_ns: Option<u64>,
    /// HTTP status; 0 when no status line arrived.
    pub status: u16,
    /// The client closed the connection mid-stream on purpose.
    pub aborted: bool,
    pub response_bytes: u64,
    /// From the usage chunk / body, when the server sent usage.
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    /// Why the request failed (I/O error, deadline), if it did.
    pub error: Option<String>,
}

impl ClientRecord {
    /// Arrival times of the content (token) events.
    pub fn content_times(&self) -> Vec<u64> {
        self.events.iter().filter(|e| e.1).map(|e| e.0).collect()
    }

    /// Completed without error or abort.
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.aborted && self.end_ns.is_some()
    }
}

/// Per-request choices, fixed by seed and request index.
struct Plan {
    streaming: bool,
    abort: Option<usize>,
    prompt_bytes: usize,
    scheduled_at: Option<Duration>,
}

fn plans(cfg: &LoadConfig) -> Vec<Plan> {
    let mut arrivals = SplitMix64::new(cfg.seed ^ 0x5EED);
    let mut t = 0.0f64;
    (0..cfg.requests as u64)
        .map(|i| {
            let mut g = SplitMix64::for_item(cfg.seed, i);
            let streaming = g.next_f64() < cfg.streaming_ratio;
            let abort_roll = g.next_f64();
            let prompt_bytes = match &cfg.prompt_bytes_fn {
                Some(f) => f(i),
                None => cfg.prompt_bytes[g.below(cfg.prompt_bytes.len() as u64) as usize],
            };
            let abort = cfg
                .abort_after_events
                .filter(|_| streaming && !cfg.pipeline && abort_roll < cfg.abort_ratio);
            let scheduled_at = cfg.rate.map(|r| {
                // Exponential gaps: Poisson arrivals, like `vllm bench serve --request-rate`.
                let at = Duration::from_secs_f64(t);
                t += -(1.0 - arrivals.next_f64()).ln() / r;
                at
            });
            Plan {
                streaming,
                abort,
                prompt_bytes,
                scheduled_at,
            }
        })
        .collect()
}

fn check_config(cfg: &LoadConfig) -> Result<()> {
    if cfg.connections == 0 {
        bail!("connections must be at least 1");
    }
    if cfg.prompt_bytes.is_empty() && cfg.prompt_bytes_fn.is_none() {
        bail!("prompt_bytes is empty and no prompt_bytes_fn is set");
    }
    if cfg.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("rate must be positive");
    }
    let in_testbed = match cfg.target.ip() {
        IpAddr::V4(a) => {
            a.is_loopback()
                || (u32::from(a) >> 16) == (u32::from(Ipv4Addr::new(10, 200, 0, 0)) >> 16)
        }
        // Pods' IPv6 addresses (Pod::enable_ipv6): fd00:200::/48.
        IpAddr::V6(a) => a.is_loopback() || a.segments()[..3] == [0xfd00, 0x200, 0],
    };
    if !in_testbed && !cfg.allow_other_targets {
        bail!(
            "refusing to send load to {}: only loopback and testbed pods (10.200.0.0/16, fd00:200::/48) \
             unless allow_other_targets is set for an address the test created",
            cfg.target
        );
    }
    Ok(())
}

/// Run the load to completion (or `deadline`) and return one record per request that
/// was started, sorted by request id.
pub fn run(cfg: &LoadConfig) -> Result<Vec<ClientRecord>> {
    check_config(cfg)?;
    let plans = plans(cfg);
    let next = AtomicUsize::new(0);
    let records = Mutex::new(Vec::with_capacity(cfg.requests));
    let start = Instant::now();
    let start_ns = mono_ns();
    let deadline = start + cfg.deadline;
    std::thread::scope(|s| {
        for conn in 0..cfg.connections {
            let (plans, next, records) = (&plans, &next, &records);
            s.spawn(move || {
                if let Some(ns) = &cfg.netns {
                    if let Err(e) = enter_netns(ns) {
                        let mut r = records.lock().unwrap_or_else(|e| e.into_inner());
                        r.push(ClientRecord {
                            error: Some(format!("{e:#}")),
                            ..Default::default()
                        });
                        return;
                    }
                }
                let ctx = Worker {
                    cfg,
                    plans,
                    conn,
                    start,
                    start_ns,
                    deadline,
                };
                let mine = ctx.drive(next);
                records
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(mine);
            });
        }
    });
    let mut out = records.into_inner().unwrap_or_else(|e| e.into_inner());
    out.sort_by_key(|r| r.request_id);
    Ok(out)
}

/// Moves the calling thread (only) into a network namespace: sockets it creates afterwards
/// live there.
fn enter_netns(path: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd affects only this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

struct Worker<'a> {
    cfg: &'a LoadConfig,
    plans: &'a [Plan],
    conn: usize,
    start: Instant,
    start_ns: u64,
    deadline: Instant,
}

impl Worker<'_> {
    fn drive(&self, next: &AtomicUsize) -> Vec<ClientRecord> {
        let mut out = Vec::new();
        let mut conn: Option<Conn> = None;
        let batch = if self.cfg.pipeline { 2 } else { 1 };
        while Instant::now() < self.deadline {
            let first = next.fetch_add(batch, Ordering::Relaxed);
            if first >= self.plans.len() {
                break;
            }
            let idxs: Vec<usize> = (first..(first + batch).min(self.plans.len())).collect();
            if let Some(at) = self.plans[first].scheduled_at {
                let due = self.start + at;
                if due > self.deadline {
                    break;
                }
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            let mut recs: Vec<ClientRecord> = idxs.iter().map(|&i| self.record(i)).collect();
            if conn.is_none() {
                match Conn::connect(self.cfg.target, self.deadline) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        for r in &mut recs {
                            r.error = Some(format!("connect: {e:#}"));
                        }
                        out.extend(recs);
                        // Do not spin on a dead target: the deadline bounds the rest.
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            let keep = self.exchange(c, &idxs, &mut recs);
            if !keep {
                conn = None; // dropping closes the socket
            }
            out.extend(recs);
        }
        out
    }

    fn record(&self, i: usize) -> ClientRecord {
        let p = &self.plans[i];
        ClientRecord {
            request_id: self.cfg.request_id_base + i as u64,
            conn: self.conn,
            streaming: p.streaming,
            prompt_bytes: p.prompt_bytes,
            scheduled_ns: p.scheduled_at.map(|d| self.start_ns + d.as_nanos() as u64),
            ..Default::default()
        }
    }

    /// Send the batch's requests back-to-back, then read their responses in order.
    /// False when the connection cannot be reused.
    fn exchange(&self, c: &mut Conn, idxs: &[usize], recs: &mut [ClientRecord]) -> bool {
        for (k, &i) in idxs.iter().enumerate() {
            let req = build_request(self.cfg, i, &self.plans[i]);
            let r = &mut recs[k];
            r.local_port = c.local_port;
            r.seq_on_conn = c.next_seq();
            r.request_bytes = req.len();
            r.send_ns = mono_ns();
            match c.send(&req, r.send_ns, self.deadline) {
                // The kernel's stamp of the request leaving (one GSO segment up to 64 KiB):
                // immune to this thread being preempted between the clock read and write().
                Ok(Some(tx)) if req.len() <= 64 * 1024 && tx >= r.send_ns => r.send_ns = tx,
                Ok(_) => {}
                Err(e) => {
                    for r in recs.iter_mut().skip(k) {
                        r.error = Some(format!("send: {e:#}"));
                    }
                    return false;
                }
            }
        }
        for (k, &i) in idxs.iter().enumerate() {
            match c.read_response(&mut recs[k], self.plans[i].abort, self.deadline) {
                Ok(Outcome::KeepAlive) => {}
                Ok(Outcome::Close) => {
                    for r in recs.iter_mut().skip(k + 1) {
                        r.error = Some("connection closed before the response".into());
                    }
                    return false;
                }
                Err(e) => {
                    for r in recs.iter_mut().skip(k) {
                        r.error.get_or_insert_with(|| format!("{e:#}"));
                    }
                    return false;
                }
            }
        }
        true
    }
}

const FILLER: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
];

/// Prompt text of exactly `bytes` ASCII bytes of seeded words, with the marker (if any)
/// in the middle (adding its length).
pub fn prompt_text(bytes: usize, seed: u64, marker: Option<&str>) -> String {
    let mut g = SplitMix64::new(seed);
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        s.push_str(FILLER[g.below(FILLER.len() as u64) as usize]);
        s.push(' ');
    }
    s.truncate(bytes);
    if let Some(m) = marker {
        s.insert_str(bytes / 2, m);
    }
    s
}

/// The whole request (head + body) for request `i`, for a single write.
fn build_request(cfg: &LoadConfig, i: usize, plan: &Plan) -> Vec<u8> {
    let text = prompt_text(
        plan.prompt_bytes,
        cfg.seed.wrapping_add(i as u64),
        cfg.marker.as_deref(),
    );
    let model = match cfg.models.len() {
        0 => &cfg.model,
        n => &cfg.models[i % n],
    };
    let mut body = match cfg.route {
        Route::Chat => serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "stream": plan.streaming,
        }),
        Route::Completions => serde_json::json!({
            "model": model, "prompt": text, "stream": plan.streaming,
        }),
    };
    if let Some(m) = cfg.max_tokens {
        body["max_tokens"] = m.into();
    }
    if plan.streaming && cfg.include_usage {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let body = body.to_string().into_bytes();
    let accept = if plan.streaming {
        "text/event-stream"
    } else {
        "application/json"
    };
    let framing = if cfg.chunked_body {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let mut out = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: llmslo-loadgen\r\nContent-Type: application/json\r\n\
         Accept: {accept}\r\nx-request-id: {}\r\n{framing}\r\n\r\n",
        cfg.route.path(),
        cfg.target,
        cfg.request_id_base + i as u64,
    )
    .into_bytes();
    if cfg.chunked_body {
        for piece in body.chunks(4096) {
            out.extend_from_slice(&http::chunk(piece));
        }
        out.extend_from_slice(http::LAST_CHUNK);
    } else {
        out.extend_from_slice(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_and_marker() {
        let p = prompt_text(100, 3, None);
        assert_eq!(p.len(), 100);
        assert_eq!(p, prompt_text(100, 3, None));
        let m = prompt_text(100, 3, Some("SECRET-123"));
        assert_eq!(m.len(), 110);
        assert!(m.contains("SECRET-123"));
    }

    #[test]
    fn plans_are_seeded() {
        let mut cfg = LoadConfig::new("127.0.0.1:1".parse().unwrap());
        cfg.requests = 1000;
        cfg.streaming_ratio = 0.8;
        cfg.abort_after_events = Some(3);
        cfg.rate = Some(100.0);
        let a = plans(&cfg);
        let b = plans(&cfg);
        let s = a.iter().filter(|p| p.streaming).count();
        assert!((700..900).contains(&s), "{s}");
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.streaming == y.streaming && x.scheduled_at == y.scheduled_at));
        assert!(a.iter().all(|p| p.abort.is_none() || p.streaming));
        // 1000 arrivals at 100/s take about 10 s.
        let last = a.last().unwrap().scheduled_at.unwrap().as_secs_f64();
        assert!((8.0..12.0).contains(&last), "{last}");
    }

    #[test]
    fn refuses_outside_targets() {
        let mut cfg = LoadConfig::new("192.168.1.1:80".parse().unwrap());
        assert!(check_config(&cfg).is_err());
        cfg.target = "10.200.3.2:8000".parse().unwrap();
        assert!(check_config(&cfg).is_ok());
    }

    #[test]
    fn request_bytes() {
        let mut cfg = LoadConfig::new("127.0.0.1:8000".parse().unwrap());
        cfg.chunked_body = true;
        let plan = Plan {
            streaming: true,
            abort: None,
            prompt_bytes: 10_000,
            scheduled_at: None,
        };
        let req = build_request(&cfg, 5, &plan);
        let head = http::parse_head(&req).unwrap().unwrap();
        assert_eq!(head.header("x-request-id"), Some("5"));
        let mut body = Vec::new();
        let used = http::ChunkedDecoder::default()
            .feed(&req[head.len..], &mut body)
            .unwrap();
        assert_eq!(head.len + used, req.len());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"].as_str().unwrap().len(), 10_000);
    }
}
