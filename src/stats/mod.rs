//! The aggregator: turns finished `RequestRecord`s into per-label-set counters, fixed-bucket
//! Prometheus histograms and sliding-window HDR quantiles (DESIGN.md §2, §5), and renders them.

mod breakdown;
pub mod heatmap;
pub mod prom;
mod render;
mod sparse;
mod window;

#[cfg(test)]
mod tests;

use crate::record::RequestRecord;
use prom::{BucketSpec, FixedHist};
use std::collections::BTreeMap;
use window::{SlotData, Window, E2E, ITL, N_METRICS, STAGE0, TPOT, TTFT};

pub use breakdown::GROUP_FIELDS;
pub use prom::{escape_label_value, write_counter, write_counter_by, write_gauge, write_sample};

/// Label values come from untrusted request bodies (`model`) and paths; longer ones are cut.
pub const MAX_LABEL_CHARS: usize = 128;

/// The label set every request metric carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Labels {
    pub namespace: String,
    pub pod: String,
    pub model: String,
    pub route: String,
    /// Container name (Kubernetes API) or short container id (cgroup); empty: not exported.
    pub container: String,
    /// The node (set when Kubernetes enrichment is on); empty: not exported.
    pub node: String,
    /// Values of the pod labels of `AggregatorConfig::pod_labels`, in that order.
    pub pod_labels: Vec<String>,
}

impl Labels {
    /// Where records of new label sets go once `max_label_sets` is reached.
    pub fn overflow() -> Labels {
        let o = || "other".to_string();
        Labels {
            namespace: o(),
            pod: o(),
            model: o(),
            route: o(),
            ..Default::default()
        }
    }

    fn is_overflow(&self) -> bool {
        [&self.namespace, &self.pod, &self.model, &self.route]
            .iter()
            .all(|v| v.as_str() == "other")
    }

    /// Cuts every value to `MAX_LABEL_CHARS` characters (in place: no allocation).
    fn cap(&mut self) {
        for v in [
            &mut self.namespace,
            &mut self.pod,
            &mut self.model,
            &mut self.route,
            &mut self.container,
            &mut self.node,
        ]
        .into_iter()
        .chain(self.pod_labels.iter_mut())
        {
            if v.len() > MAX_LABEL_CHARS {
                if let Some((at, _)) = v.char_indices().nth(MAX_LABEL_CHARS) {
                    v.truncate(at);
                }
            }
        }
    }

    pub(crate) fn get(&self, field: &str) -> Option<&str> {
        match field {
            "namespace" => Some(&self.namespace),
            "pod" => Some(&self.pod),
            "model" => Some(&self.model),
            "route" => Some(&self.route),
            "container" => Some(&self.container),
            "node" => Some(&self.node),
            _ => None,
        }
    }

    /// `namespace="…",pod="…",model="…",route="…"` plus `container`, `node` and the pod
    /// labels (`label_…`, names in `pod_label_names`) where known, escaped once per label set.
    fn exposition(&self, pod_label_names: &[String]) -> String {
        let mut s = String::new();
        let fixed = [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("model", &self.model),
            ("route", &self.route),
        ];
        let optional = [("container", &self.container), ("node", &self.node)]
            .into_iter()
            .chain(
                pod_label_names
                    .iter()
                    .map(String::as_str)
                    .zip(self.pod_labels.iter()),
            )
            .filter(|(_, v)| !v.is_empty());
        for (i, (k, v)) in fixed.into_iter().chain(optional).enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(k);
            s.push_str("=\"");
            escape_label_value(&mut s, v);
            s.push('"');
        }
        s
    }
}

#[derive(Clone, Debug)]
pub struct AggregatorConfig {
    /// Distinct label sets kept before new ones go to the `other` set.
    pub max_label_sets: usize,
    pub slot_secs: u64,
    /// Ring length: the 5m window needs `300 / slot_secs + 1` (5 min plus the current slot).
    pub slots: usize,
    /// Pod labels (Kubernetes keys) whose values `Labels::pod_labels` holds, in order.
    pub pod_labels: Vec<String>,
    /// HDR significant digits (bucket layout of the windows' sparse histograms). 2: quantiles
    /// within 1%. A slot holds only the buckets its values fell in, so memory grows with the
    /// distinct values seen, ~8× more of them per extra digit.
    pub sig_figs: u8,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            max_label_sets: 200,
            slot_secs: 10,
            slots: 31,
            sig_figs: 2,
            pod_labels: Vec::new(),
        }
    }
}

/// Quantile windows exported as `window` label values.
const WINDOWS: [(&str, u64); 2] = [("1m", 60), ("5m", 300)];
const QUANTILES: [(&str, f64); 3] = [("0.5", 0.5), ("0.95", 0.95), ("0.99", 0.99)];
/// Headline metrics: index in `SlotData`, `metric` label, Prometheus family, buckets, help.
const HEADLINE: [(usize, &str, &str, &BucketSpec, &str); 4] = [
    (
        TTFT,
        "ttft",
        "llmslo_ttft_seconds",
        &prom::TTFT_BUCKETS,
        "Time to first token: from the request's arrival to its first SSE event with content.",
    ),
    (
        ITL,
        "itl",
        "llmslo_itl_seconds",
        &prom::ITL_BUCKETS,
        "Inter-token latency: one observation per gap between consecutive content events.",
    ),
    (
        TPOT,
        "tpot",
        "llmslo_tpot_seconds",
        &prom::ITL_BUCKETS,
        "Time per output token after the first: (last token - first token) / (tokens - 1).",
    ),
    (
        E2E,
        "e2e",
        "llmslo_e2e_seconds",
        &prom::E2E_BUCKETS,
        "End-to-end latency of requests that completed (aborted ones excluded).",
    ),
];
/// Server-side stages with a per-request run-queue wait (`llmslo_request_cpu_runqueue_wait_seconds`).
const RUNQ_STAGES: [crate::record::Stage; 3] = [
    crate::record::Stage::QueuePrefill,
    crate::record::Stage::Decode,
    crate::record::Stage::Inference,
];
const STATUS_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "5xx", "aborted", "unknown"];

fn status_class(rec: &RequestRecord) -> usize {
    match (rec.aborted, rec.status) {
        (true, _) => 4,
        (false, Some(s @ 200..=599)) => (s / 100 - 2) as usize,
        _ => 5,
    }
}

/// Milliseconds to ns; negative or non-finite values are treated as unknown.
fn ms_to_ns(ms: f64) -> Option<u64> {
    (ms.is_finite() && ms >= 0.0).then(|| (ms * 1e6).round() as u64)
}

/// Everything kept for one label set.
struct Series {
    labels: Labels,
    exposition: String,
    requests: [u64; STATUS_CLASSES.len()],
    output_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    request_bytes: u64,
    response_bytes: u64,
    /// Cumulative since start, indexed like `SlotData` metrics.
    hists: [FixedHist; N_METRICS],
    /// Run-queue wait of the serving thread per server-side stage (`RUNQ_STAGES` order).
    runq_hists: [FixedHist; RUNQ_STAGES.len()],
    window: Window,
}

impl Series {
    fn new(labels: Labels, cfg: &AggregatorConfig) -> Box<Series> {
        let n_backs = WINDOWS.map(|(_, secs)| n_back(cfg, secs));
        Box::new(Series {
            exposition: labels.exposition(
                &cfg.pod_labels
                    .iter()
                    .map(|k| crate::discovery::k8s::prom_label_name(k))
                    .collect::<Vec<_>>(),
            ),
            labels,
            requests: [0; STATUS_CLASSES.len()],
            output_tokens: None,
            prompt_tokens: None,
            request_bytes: 0,
            response_bytes: 0,
            hists: std::array::from_fn(|_| FixedHist::default()),
            runq_hists: std::array::from_fn(|_| FixedHist::default()),
            window: Window::new(cfg.slots, cfg.sig_figs, n_backs),
        })
    }

    fn observe(&mut self, rec: &RequestRecord, slot: u64) {
        self.requests[status_class(rec)] += 1;
        if let Some(t) = rec.output_tokens {
            *self.output_tokens.get_or_insert(0) += u64::from(t);
        }
        if let Some(t) = rec.prompt_tokens {
            *self.prompt_tokens.get_or_insert(0) += u64::from(t);
        }
        self.request_bytes += rec.request_bytes;
        self.response_bytes += rec.response_bytes;

        let ttft = rec.ttft_ms.and_then(ms_to_ns);
        let tpot = rec.tpot_ms.and_then(ms_to_ns);
        // Prefer the exact ns difference over the ms float it was derived from.
        let e2e = match (rec.aborted, rec.e2e_ms, rec.start_ns, rec.end_ns) {
            (true, ..) | (_, None, ..) => None,
            (_, _, Some(s), Some(e)) => Some(e.saturating_sub(s)),
            (_, Some(ms), ..) => ms_to_ns(ms),
        };
        for (m, v) in [(TTFT, ttft), (TPOT, tpot), (E2E, e2e)] {
            if let Some(v) = v {
                self.hists[m].observe(spec(m), v);
            }
        }
        for g in rec.token_ns.gaps() {
            self.hists[ITL].observe(spec(ITL), g);
        }
        for (s, v) in rec.stages.iter() {
            self.hists[STAGE0 + s as usize].observe(spec(STAGE0), v);
        }
        if let Some(rq) = &rec.cpu_runqueue_wait_ms {
            for (h, &s) in self.runq_hists.iter_mut().zip(&RUNQ_STAGES) {
                if let Some(v) = rq.get(s) {
                    h.observe(&prom::STAGE_BUCKETS, v);
                }
            }
        }

        // The sidecar's part of TTFT: inbound, and the first token's way back out.
        let sidecar_ttft = match (ttft, rec.sidecar.as_ref()) {
            (Some(_), Some(sc)) => rec
                .stages
                .get(crate::record::Stage::SidecarInbound)
                .unwrap_or(0)
                .saturating_add(sc.outbound_first_token_ms.and_then(ms_to_ns).unwrap_or(0)),
            _ => 0,
        };
        self.window.advance(slot);
        self.window.record(|d: &mut SlotData, sf| {
            d.requests += 1;
            d.sidecar_ttft_ns = d.sidecar_ttft_ns.saturating_add(sidecar_ttft);
            for (m, v) in [(TTFT, ttft), (TPOT, tpot), (E2E, e2e)] {
                if let Some(v) = v {
                    d.observe(m, v, sf);
                }
            }
            for g in rec.token_ns.gaps() {
                d.observe(ITL, g, sf);
            }
            for (s, v) in rec.stages.iter() {
                d.observe(STAGE0 + s as usize, v, sf);
                if e2e.is_some() && s.in_e2e() {
                    d.stage_e2e_ns[s as usize] = d.stage_e2e_ns[s as usize].saturating_add(v);
                }
            }
        });
    }
}

fn spec(m: usize) -> &'static BucketSpec {
    match m {
        TTFT => &prom::TTFT_BUCKETS,
        ITL | TPOT => &prom::ITL_BUCKETS,
        E2E => &prom::E2E_BUCKETS,
        _ => &prom::STAGE_BUCKETS,
    }
}

/// Full slots behind the current one that cover `secs`, limited by the ring.
fn n_back(cfg: &AggregatorConfig, secs: u64) -> u64 {
    secs.div_ceil(cfg.slot_secs).min(cfg.slots as u64 - 1)
}

pub struct Aggregator {
    cfg: AggregatorConfig,
    series: BTreeMap<Labels, Box<Series>>,
    /// Kept apart from `series` so the cap check is `series.len()` and overflow records
    /// need no key allocation.
    overflow: Option<Box<Series>>,
    overflow_records: u64,
}

impl Aggregator {
    pub fn new(mut cfg: AggregatorConfig) -> Self {
        cfg.slot_secs = cfg.slot_secs.max(1);
        cfg.slots = cfg.slots.max(1);
        cfg.sig_figs = cfg.sig_figs.clamp(1, 5);
        Aggregator {
            cfg,
            series: BTreeMap::new(),
            overflow: None,
            overflow_records: 0,
        }
    }

    /// Records one finished request at wall time `now_s` (unix seconds).
    pub fn record(&mut self, rec: &RequestRecord, mut labels: Labels, now_s: u64) {
        labels.cap();
        let slot = now_s / self.cfg.slot_secs;
        let known = self.series.contains_key(&labels);
        let series =
            if labels.is_overflow() || (!known && self.series.len() >= self.cfg.max_label_sets) {
                if !labels.is_overflow() {
                    self.overflow_records += 1;
                }
                let cfg = &self.cfg;
                self.overflow
                    .get_or_insert_with(|| Series::new(Labels::overflow(), cfg))
            } else {
                let cfg = &self.cfg;
                self.series
                    .entry(labels)
                    .or_insert_with_key(|l| Series::new(l.clone(), cfg))
            };
        series.observe(rec, slot);
    }

    fn all_series(&self) -> impl Iterator<Item = &Series> {
        self.series
            .values()
            .chain(self.overflow.as_ref())
            .map(|s| &**s)
    }

    fn advance_all(&mut self, now_s: u64) {
        let slot = now_s / self.cfg.slot_secs;
        for s in self.series.values_mut().chain(self.overflow.as_mut()) {
            s.window.advance(slot);
        }
    }

    /// Drops every series of a pod (pod gone).
    pub fn forget_pod(&mut self, namespace: &str, pod: &str) {
        self.series
            .retain(|l, _| !(l.namespace == namespace && l.pod == pod));
    }

    /// The (namespace, pod) pairs that have series.
    pub fn pods(&self) -> std::collections::BTreeSet<(String, String)> {
        self.series
            .keys()
            .map(|l| (l.namespace.clone(), l.pod.clone()))
            .collect()
    }

    /// Distinct label sets held, not counting the overflow set.
    pub fn label_sets(&self) -> usize {
        self.series.len()
    }

    /// Records that went to the overflow set because the cap was reached.
    pub fn overflow_records(&self) -> u64 {
        self.overflow_records
    }

    /// Heap held by the sliding-window histograms (for an agent health gauge).
    pub fn window_bytes(&self) -> usize {
        self.all_series().map(|s| s.window.heap_bytes()).sum()
    }
}

/// Normalises a request path to a bounded route label: known OpenAI-compatible and
/// server-native inference routes as is (Triton's model name replaced by `:model`),
/// anything else `other`, no path `unknown`.
pub fn route_of(path: Option<&str>) -> String {
    let Some(path) = path else {
        return "unknown".into();
    };
    // Absolute-form request targets (proxies) carry scheme and authority.
    let path = match path.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => path,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    const KNOWN: [&str; 10] = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/generate",
        "/generate_stream",
        "/api/generate",
        "/api/chat",
        "/completion",
        "/v1/models",
    ];
    if KNOWN.contains(&path) {
        return path.to_string();
    }
    // Triton: /v2/models/<m>[/versions/<v>]/generate[_stream]
    if let Some(rest) = path.strip_prefix("/v2/models/") {
        let parts: Vec<&str> = rest.split('/').collect();
        let tail = match parts.as_slice() {
            [m, t] if !m.is_empty() => Some(("", *t)),
            [m, "versions", v, t] if !m.is_empty() && !v.is_empty() => {
                Some(("/versions/:version", *t))
            }
            _ => None,
        };
        if let Some((ver, t @ ("generate" | "generate_stream"))) = tail {
            return format!("/v2/models/:model{ver}/{t}");
        }
    }
    "other".into()
}
