//! Cross-check against the server's own metrics (README "Cross-check"): where a traced server
//! exposes Prometheus histograms we know (vLLM, SGLang, TGI), a thread of its own scrapes
//! them, takes the increase over the window, and sets the server's TTFT/E2E quantiles next to
//! the agent's for the same pod and window, and the server's queue time next to our
//! `queue_prefill`. The agent's own scrape requests are recognised by their socket and kept
//! out of every record, histogram and SLO.

pub mod compare;
pub mod expo;
pub mod hist;
mod run;
pub mod scrape;
pub mod source;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

pub use run::spawn;

use crate::record::RequestRecord;
use crate::stats::{write_counter, MAX_LABEL_CHARS};
use compare::{MetricCompare, Scrape, QUANTILES};
use source::Source;

/// The `crosscheck` section of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrosscheckCfg {
    pub enabled: bool,
    /// Seconds between two scrapes of one server.
    pub interval_s: u64,
    /// The comparison covers the scrapes of the last this many seconds.
    pub window_s: u64,
    /// Scrape this port; unset: the server's listening ports, lowest first, until one answers.
    pub port: Option<u16>,
    pub path: String,
    /// Connect + request + response, per scrape.
    pub timeout_ms: u64,
    /// Larger responses fail the scrape.
    pub max_bytes: usize,
    /// Servers (network namespaces) scraped at most.
    pub max_targets: usize,
}

impl Default for CrosscheckCfg {
    fn default() -> Self {
        CrosscheckCfg {
            enabled: true,
            interval_s: 15,
            window_s: 300,
            port: None,
            path: "/metrics".into(),
            timeout_ms: 2000,
            max_bytes: 4 << 20,
            max_targets: 64,
        }
    }
}

impl CrosscheckCfg {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.interval_s >= 1, "crosscheck.interval_s must be >= 1");
        anyhow::ensure!(
            self.window_s >= 2 * self.interval_s,
            "crosscheck.window_s must be at least two intervals (a window is the increase between scrapes)"
        );
        anyhow::ensure!(
            self.path.starts_with('/')
                && self.path.len() <= 256
                && self.path.bytes().all(|b| b.is_ascii_graphic()),
            "crosscheck.path must be an absolute path without spaces or control characters"
        );
        anyhow::ensure!(self.port != Some(0), "crosscheck.port: 0 is not a port");
        anyhow::ensure!(self.timeout_ms >= 10, "crosscheck.timeout_ms must be >= 10");
        anyhow::ensure!(
            self.max_bytes >= 4096,
            "crosscheck.max_bytes must be >= 4096"
        );
        anyhow::ensure!(self.max_targets >= 1, "crosscheck.max_targets must be >= 1");
        Ok(())
    }
}

/// Cuts a label value from a server to `MAX_LABEL_CHARS`.
pub(crate) fn cap_label(v: &str) -> String {
    match v.char_indices().nth(MAX_LABEL_CHARS) {
        Some((at, _)) => v[..at].to_string(),
        None => v.to_string(),
    }
}

/// How a scrape ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrapeResult {
    Ok,
    /// 404, or a valid exposition without any histogram we know.
    NotFound,
    /// Connection, timeout, HTTP status, size, or nothing parseable.
    Error,
}

impl ScrapeResult {
    pub const ALL: [ScrapeResult; 3] = [
        ScrapeResult::Ok,
        ScrapeResult::Error,
        ScrapeResult::NotFound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScrapeResult::Ok => "ok",
            ScrapeResult::NotFound => "not_found",
            ScrapeResult::Error => "error",
        }
    }
}

/// A scrape connection of the agent's: our socket's local address is the client address of
/// the server's record of it (the pod IP is reached without NAT). The server's port is not
/// compared: behind a sidecar that REDIRECTs inbound traffic the record's local port is the
/// sidecar's.
#[derive(Debug, Clone)]
struct OwnConn {
    local: std::net::SocketAddr,
    until: Instant,
}

/// An address as a record writes it, IPv4-mapped IPv6 taken as IPv4.
fn canonical(a: std::net::SocketAddr) -> (std::net::IpAddr, u16) {
    (a.ip().to_canonical(), a.port())
}

/// How long a scrape connection is remembered when no record of it shows up.
const OWN_CONN_TTL: Duration = Duration::from_secs(30);
/// Scrape connections remembered at most (one per scrape; far more than needed).
const MAX_OWN_CONNS: usize = 4096;

/// Per traced server (network namespace).
#[derive(Debug, Clone, Default)]
pub(crate) struct TargetState {
    pub namespace: String,
    pub pod: String,
    pub pid: u32,
    pub address: Option<String>,
    /// The port that answered with known metrics last.
    pub port: Option<u16>,
    pub ring: std::collections::VecDeque<Scrape>,
    pub last_result: Option<ScrapeResult>,
    pub last_error: Option<String>,
    pub last_unix: u64,
    pub next_try: Option<Instant>,
    pub compared: Vec<(String, MetricCompare)>,
}

/// Shared between the scrape thread, the BPF thread (own-connection filter) and the API.
pub struct Crosscheck {
    pub cfg: CrosscheckCfg,
    max_label_sets: usize,
    own: Mutex<Vec<OwnConn>>,
    pub(crate) targets: Mutex<BTreeMap<u64, TargetState>>,
    scrapes: [AtomicU64; 3],
    own_dropped: AtomicU64,
}

impl Crosscheck {
    pub fn new(cfg: CrosscheckCfg, max_label_sets: usize) -> Crosscheck {
        Crosscheck {
            cfg,
            max_label_sets,
            own: Mutex::new(Vec::new()),
            targets: Mutex::new(BTreeMap::new()),
            scrapes: Default::default(),
            own_dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn count(&self, r: ScrapeResult) {
        let i = ScrapeResult::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.scrapes[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers a scrape connection before its request is sent.
    pub(crate) fn mark_own(&self, local: std::net::SocketAddr) {
        let now = Instant::now();
        let mut own = self.own.lock().expect("own lock");
        own.retain(|c| c.until > now);
        if own.len() >= MAX_OWN_CONNS {
            own.remove(0);
        }
        own.push(OwnConn {
            local,
            until: now + OWN_CONN_TTL,
        });
    }

    /// True for the record of one of our scrape requests (then forgotten: one request per
    /// connection). Such records go nowhere: not to the store, histograms, SLOs or OTLP.
    pub fn is_own(&self, rec: &RequestRecord) -> bool {
        let mut own = self.own.lock().expect("own lock");
        if own.is_empty() {
            return false;
        }
        let Some(client) = rec.src else {
            return false;
        };
        let client = canonical(client);
        match own.iter().position(|c| canonical(c.local) == client) {
            Some(i) => {
                own.swap_remove(i);
                self.own_dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// `GET /api/v1/crosscheck`.
    pub fn json(&self) -> Value {
        let targets = self.targets.lock().expect("crosscheck lock");
        let list: Vec<Value> = targets
            .values()
            .map(|t| {
                let source = t.ring.back().map(|s| s.view.source.name());
                let mut models: BTreeMap<&str, BTreeMap<&str, Value>> = BTreeMap::new();
                for (model, c) in &t.compared {
                    models
                        .entry(model)
                        .or_default()
                        .insert(c.metric.name(), json!(c));
                }
                let window = t.compared.first().map(|(_, c)| {
                    json!({
                        "seconds": c.window_s,
                        "scrapes": t.ring.iter().filter(|s| s.mono_ns >= c.from_ns).count(),
                        "from_unix": t.ring.iter().find(|s| s.mono_ns >= c.from_ns).map(|s| s.unix_s),
                        "to_unix": t.ring.back().map(|s| s.unix_s),
                    })
                });
                let models: Vec<Value> = models
                    .into_iter()
                    .map(|(m, metrics)| {
                        let mut v = json!({ "model": m });
                        for (k, c) in metrics {
                            v[k] = c;
                        }
                        v
                    })
                    .collect();
                json!({
                    "namespace": t.namespace,
                    "pod": t.pod,
                    "pid": t.pid,
                    "address": t.address,
                    "source": source,
                    "last_scrape": {
                        "result": t.last_result.map(ScrapeResult::name),
                        "error": t.last_error,
                        "unix": t.last_unix,
                    },
                    "window": window,
                    "models": models,
                })
            })
            .collect();
        json!({
            "enabled": self.cfg.enabled,
            "interval_s": self.cfg.interval_s,
            "window_s": self.cfg.window_s,
            "targets": list,
        })
    }

    /// The `llmslo_crosscheck_*` families.
    pub fn render(&self, out: &mut String) {
        crate::stats::write_counter_by(
            out,
            "llmslo_crosscheck_scrapes_total",
            "Scrapes of traced servers' own metrics: ok, not_found (404 or no histogram we know), error.",
            "result",
            ScrapeResult::ALL
                .iter()
                .map(|r| r.name())
                .zip(self.scrapes.iter().map(|c| c.load(Ordering::Relaxed) as f64)),
        );
        write_counter(
            out,
            "llmslo_crosscheck_own_requests_total",
            "The agent's own scrape requests that it traced and left out of its data.",
            &[(&[], self.own_dropped.load(Ordering::Relaxed) as f64)],
        );
        type Row = (Vec<(&'static str, String)>, f64);
        let (mut server, mut agent, mut ratio): (Vec<Row>, Vec<Row>, Vec<Row>) = Default::default();
        let targets = self.targets.lock().expect("crosscheck lock");
        let mut sets = std::collections::BTreeSet::new();
        for t in targets.values() {
            let Some(src) = t.ring.back().map(|s| s.view.source) else {
                continue;
            };
            for (model, c) in &t.compared {
                // Capped like the request series: new (namespace, pod, model) sets beyond the
                // cap are left out of /metrics (the JSON still has them).
                let set = (t.namespace.clone(), t.pod.clone(), model.clone());
                if !sets.contains(&set) {
                    if sets.len() >= self.max_label_sets {
                        continue;
                    }
                    sets.insert(set);
                }
                for (q, _) in QUANTILES {
                    let labels = |q: &str| {
                        vec![
                            ("namespace", t.namespace.clone()),
                            ("pod", t.pod.clone()),
                            ("model", model.clone()),
                            ("source", Source::name(src).to_string()),
                            ("metric", c.metric.name().to_string()),
                            ("quantile", q.to_string()),
                        ]
                    };
                    let (s, a) = (c.server.get(q), c.agent.get(q));
                    if let Some(s) = s {
                        server.push((labels(q), s / 1e3));
                    }
                    if let Some(a) = a {
                        agent.push((labels(q), a / 1e3));
                    }
                    if let (Some(s), Some(a)) = (s, a) {
                        if s != 0.0 {
                            ratio.push((labels(q), (a - s) / s));
                        }
                    }
                }
            }
        }
        drop(targets);
        for (name, help, rows) in [
            (
                "llmslo_crosscheck_server_quantile_seconds",
                "The server's own quantile over the window (histogram_quantile of the increase of its histogram).",
                &server,
            ),
            (
                "llmslo_crosscheck_agent_quantile_seconds",
                "The agent's quantile of the same pod's requests over the same window (metric=queue: the queue_prefill stage).",
                &agent,
            ),
            (
                "llmslo_crosscheck_difference_ratio",
                "(agent - server) / server for the same quantile.",
                &ratio,
            ),
        ] {
            let labels: Vec<Vec<(&str, &str)>> = rows
                .iter()
                .map(|(l, _)| l.iter().map(|(k, v)| (*k, v.as_str())).collect())
                .collect();
            let vals: Vec<(&[(&str, &str)], f64)> = labels
                .iter()
                .zip(rows.iter())
                .map(|(l, (_, v))| (&l[..], *v))
                .collect();
            // Summaries (quantiles only, no _sum/_count), as llmslo_latency_quantile_seconds:
            // Prometheus' linter rejects a `quantile` label on any other type.
            crate::stats::prom::write_family(out, name, help, "summary", &vals);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(src: &str, dst: &str) -> RequestRecord {
        RequestRecord {
            src: src.parse().ok(),
            dst: dst.parse().ok(),
            ..Default::default()
        }
    }

    #[test]
    fn own_connections_are_recognised_once() {
        let c = Crosscheck::new(CrosscheckCfg::default(), 10);
        c.mark_own("10.0.0.1:40000".parse().unwrap());
        c.mark_own("10.0.0.1:40002".parse().unwrap());
        assert!(!c.is_own(&rec("10.0.0.1:40001", "10.0.0.2:8000")));
        assert!(
            !c.is_own(&rec("10.0.0.9:40000", "10.0.0.2:8000")),
            "another client"
        );
        // Behind a REDIRECTing sidecar the server side is the sidecar's port.
        assert!(c.is_own(&rec("10.0.0.1:40000", "10.0.0.2:15006")));
        assert!(
            !c.is_own(&rec("10.0.0.1:40000", "10.0.0.2:8000")),
            "forgotten once seen"
        );
        assert!(c.is_own(&rec("[::ffff:10.0.0.1]:40002", "[::ffff:10.0.0.2]:8000")));
        assert!(!c.is_own(&rec("garbage", "")));
        let mut m = String::new();
        c.render(&mut m);
        assert!(
            m.contains("llmslo_crosscheck_own_requests_total 2\n"),
            "{m}"
        );
        assert!(
            m.contains("llmslo_crosscheck_scrapes_total{result=\"ok\"} 0\n"),
            "{m}"
        );
    }

    #[test]
    fn config_is_checked() {
        CrosscheckCfg::default().validate().unwrap();
        for bad in [
            CrosscheckCfg {
                interval_s: 0,
                ..Default::default()
            },
            CrosscheckCfg {
                window_s: 20,
                ..Default::default()
            },
            CrosscheckCfg {
                path: "metrics".into(),
                ..Default::default()
            },
            CrosscheckCfg {
                path: "/m\r\nX: y".into(),
                ..Default::default()
            },
            CrosscheckCfg {
                port: Some(0),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
