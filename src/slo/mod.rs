//! SLO engine: service level objectives declared in the agent's config, judged per finished
//! request, with compliance, error budget, burn rates and the multiwindow, multi-burn-rate
//! alerts of the Google SRE workbook (ch. 5), for `/api/v1/slo` and `llmslo_slo_*` metrics.
//!
//! # Config
//!
//! ```yaml
//! slos:
//!   - name: chat-ttft                 # the `slo` label; unique
//!     objective: 0.99                 # fraction of counted requests that must be good
//!     window: 28d                     # whole hours: 36h, 28d, 4w (1h ..= 366d)
//!     selector: {namespace: prod, model: llama-3-8b, route: /v1/chat/completions}
//!     sli: {type: latency, metric: ttft, threshold_ms: 500}
//!   - name: chat-goodput              # good only if every threshold is met
//!     objective: 0.95
//!     window: 28d
//!     sli: {type: goodput, all: [{metric: ttft, threshold_ms: 500}, {metric: tpot, threshold_ms: 50}]}
//!   - name: availability
//!     objective: 0.999
//!     window: 30d
//!     sli: {type: availability}       # completed with status < 500
//!     aborted: bad                    # or `ignore` (see below); default bad
//! ```
//!
//! Metrics: `ttft`, `itl`, `tpot`, `e2e`, `stage:<name>` (DESIGN.md §3). Selector fields
//! (`namespace`, `pod`, `model`, `route`, each optional) match exactly; `route` is the
//! normalised route label (`stats::route_of`), and a request without a value for a selected
//! field does not match.
//!
//! # What counts
//!
//! A request is good when its value is `<=` the threshold, as `vllm bench serve --goodput`
//! judges (it has thresholds for TTFT, TPOT and E2E; ITL is ours: a request meets an ITL
//! threshold when its *largest* gap does, i.e. every gap does, the per-request reading of
//! "inter-token latency under X").
//!
//! - A completed request without the metric is not counted (neither good nor bad): TTFT of a
//!   non-streaming response, a stage whose hooks did not fire. Exception, following vLLM: a
//!   completed stream with a single token meets every ITL and TPOT threshold (no gap; vLLM
//!   counts its TPOT as 0).
//! - An aborted request (the connection ended before the response did) keeps a value that is
//!   complete once measured: TTFT, a stage; and a gap over the ITL threshold is conclusive.
//!   Otherwise, with `aborted: bad` (default), it is **bad** for every metric it would have had
//!   had it completed (TTFT/ITL/TPOT unless its response head said "not a stream"; E2E always;
//!   `queue_prefill`, `decode`, `inference` likewise; earlier stages are not counted). Why: at
//!   the socket a user's "stop" and a timeout look alike, and a server that stalls until its
//!   clients give up must burn budget; dropping such requests would make an overloaded server
//!   look better the worse it gets. `aborted: ignore` leaves them out instead (for chat front
//!   ends whose users cancel a lot) unless their value is conclusive as above.
//! - Latency SLIs judge every request with the metric, whatever its status: errors are the
//!   availability SLI's. Goodput requires availability too (vLLM counts only successful
//!   requests), so an aborted request or a 5xx is never good.
//!
//! # Windows and memory
//!
//! A request counts at the (wall-clock) time it is observed, i.e. when it finished. Counts
//! live in memory only, in aligned buckets at four resolutions; every request goes into each,
//! and a window is read from the finest ring that spans it. A window's length is
//! exact to its ring's bucket width (the oldest bucket is taken whole or not at all: the window
//! covers between `W - width` and `W`):
//!
//! | ring | spans | windows | edge exact to |
//! |---|---|---|---|
//! | 360 × 10 s | 1 h | burn 5m, 30m, 1h; SLO windows ≤ 1 h | 10 s |
//! | 360 × 1 min | 6 h | burn 2h, 6h; SLO windows ≤ 6 h | 1 min |
//! | 432 × 10 min | 3 d | burn 1d, 3d; SLO windows ≤ 3 d | 10 min |
//! | `window/1h` × 1 h | the SLO window | compliance and budget over e.g. 28d | 1 h |
//!
//! That is ~18 KiB per SLO plus 16 bytes per hour of window (28d: ~29 KiB). Every window is
//! computed exactly in the sense that every request in it is counted; only its edge is
//! quantised as above. What memory cannot give: history from before the agent started (each
//! SLO reports `covered_s`, the part of its window the agent has seen), and requests served on
//! other nodes (each agent judges its own node's). For a cluster-wide SLO that survives
//! restarts, aggregate `llmslo_slo_requests_total{slo,result}` in Prometheus
//! (`deploy/prometheus/alerts.yaml` does).
//!
//! # Alerts
//!
//! Burn rate = error ratio over a window / (1 - objective). The workbook's multiwindow,
//! multi-burn-rate alerts fire when both the long and the short window burn faster than the
//! factor (strictly `>`, as its PromQL): page at 14.4× over 1h and 5m (2 % of a 30-day budget
//! in an hour) or 6× over 6h and 30m (5 %); ticket at 3× over 1d and 2h or 1× over 3d and 6h
//! (10 %). A window with no counted request has no burn rate (`null`, `NaN` in metrics) and
//! fires nothing.

mod report;
mod sli;
mod window;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_sli;

use crate::record::RequestRecord;
use serde::{Deserialize, Serialize};
use sli::Metric;
use window::Tiers;

pub mod analysis;
pub use report::{AlertRule, ALERTS, BURN_WINDOWS};
pub use sli::Verdict;

/// One SLO as the config declares it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SloSpec {
    pub name: String,
    /// Target fraction of good requests, in (0, 1): 0.99.
    pub objective: f64,
    /// Compliance window: a whole number of hours written as `<n>h`, `<n>d` or `<n>w`.
    pub window: String,
    #[serde(default)]
    pub selector: Selector,
    pub sli: Sli,
    #[serde(default)]
    pub aborted: AbortedPolicy,
}

/// Which requests an SLO covers; every field given must match exactly.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

impl Selector {
    fn matches(&self, rec: &RequestRecord, route: &str) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| match want {
            None => true,
            Some(w) => have == Some(w.as_str()),
        };
        eq(&self.namespace, rec.namespace.as_deref())
            && eq(&self.pod, rec.pod.as_deref())
            && eq(&self.model, rec.model.as_deref())
            && eq(&self.route, Some(route))
    }
}

/// What makes a request good.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sli {
    /// `metric` (ttft, itl, tpot, e2e, stage:<name>) at most `threshold_ms`.
    Latency { metric: String, threshold_ms: f64 },
    /// Served and every threshold met, as `vllm bench serve --goodput`.
    Goodput { all: Vec<Threshold> },
    /// Completed with a status below 500.
    Availability,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub metric: String,
    pub threshold_ms: f64,
}

/// What an aborted request without a conclusive value counts as.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AbortedPolicy {
    #[default]
    Bad,
    Ignore,
}

/// The compiled SLI.
#[derive(Debug)]
enum Judge {
    Latency(Metric, f64),
    Goodput(Vec<(Metric, f64)>),
    Availability,
}

/// One SLO's state.
#[derive(Debug)]
struct Slo {
    spec: SloSpec,
    judge: Judge,
    window_s: u64,
    tiers: Tiers,
    /// Since the engine started (the `llmslo_slo_requests_total` counters).
    good: u64,
    bad: u64,
    /// Matched by the selector but not counted (see "What counts").
    skipped: u64,
}

pub struct SloEngine {
    slos: Vec<Slo>,
    /// First time seen, for how much of each window has data.
    started_s: Option<u64>,
}

/// Longest window accepted: a year and a day's worth of hourly buckets is ~140 KiB.
const MAX_WINDOW_S: u64 = 366 * 86_400;

/// `36h`, `28d`, `4w` → seconds; a whole number of hours from 1h to 366d.
pub fn parse_window(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let mult = match unit {
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => anyhow::bail!("window {s:?}: expected <n>h, <n>d or <n>w (whole hours), e.g. 28d"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("window {s:?}: expected a whole number before the unit"))?;
    let secs = n.saturating_mul(mult);
    anyhow::ensure!(
        (3600..=MAX_WINDOW_S).contains(&secs),
        "window {s:?}: must be between 1h and 366d"
    );
    Ok(secs)
}

fn compile_threshold(metric: &str, threshold_ms: f64) -> anyhow::Result<(Metric, f64)> {
    let m = Metric::parse(metric)?;
    anyhow::ensure!(
        threshold_ms.is_finite() && threshold_ms > 0.0,
        "threshold_ms for {metric} must be a positive number of milliseconds (got {threshold_ms})"
    );
    Ok((m, threshold_ms))
}

impl Slo {
    fn new(spec: SloSpec) -> anyhow::Result<Slo> {
        anyhow::ensure!(
            !spec.name.is_empty() && !spec.name.chars().any(char::is_control),
            "an SLO name must be non-empty and free of control characters"
        );
        anyhow::ensure!(
            spec.objective > 0.0 && spec.objective < 1.0,
            "objective must be in (0, 1), e.g. 0.99 (got {})",
            spec.objective
        );
        let window_s = parse_window(&spec.window)?;
        let judge = match &spec.sli {
            Sli::Latency {
                metric,
                threshold_ms,
            } => {
                let (m, t) = compile_threshold(metric, *threshold_ms)?;
                Judge::Latency(m, t)
            }
            Sli::Goodput { all } => {
                anyhow::ensure!(
                    !all.is_empty(),
                    "a goodput SLI needs at least one threshold"
                );
                let list = all
                    .iter()
                    .map(|t| compile_threshold(&t.metric, t.threshold_ms))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Judge::Goodput(list)
            }
            Sli::Availability => Judge::Availability,
        };
        Ok(Slo {
            spec,
            judge,
            window_s,
            tiers: Tiers::new(window_s),
            good: 0,
            bad: 0,
            skipped: 0,
        })
    }

    fn judge(&self, rec: &RequestRecord) -> Verdict {
        let aborted_bad = self.spec.aborted == AbortedPolicy::Bad;
        match &self.judge {
            Judge::Latency(m, t) => sli::latency(*m, *t, rec, aborted_bad),
            Judge::Goodput(list) => sli::goodput(list, rec, aborted_bad),
            Judge::Availability => sli::availability(rec, aborted_bad),
        }
    }
}

impl SloEngine {
    /// Validates every spec (objective in (0, 1), known metrics, positive thresholds, window,
    /// unique names); the error names the SLO at fault.
    pub fn new(specs: Vec<SloSpec>) -> anyhow::Result<Self> {
        let mut slos: Vec<Slo> = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = spec.name.clone();
            anyhow::ensure!(
                slos.iter().all(|s| s.spec.name != name),
                "SLO {name:?} is declared twice"
            );
            let slo = Slo::new(spec).map_err(|e| anyhow::anyhow!("SLO {name:?}: {e}"))?;
            slos.push(slo);
        }
        Ok(SloEngine {
            slos,
            started_s: None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.slos.is_empty()
    }

    /// Judges one finished request against every SLO whose selector it matches, at wall
    /// time `now_s` (unix seconds). `route` is the request's route label (`stats::route_of`).
    /// Counts one finished request against every SLO it falls under; answers whether it
    /// violated at least one.
    pub fn observe(&mut self, rec: &RequestRecord, route: &str, now_s: u64) -> bool {
        self.started_s.get_or_insert(now_s);
        let mut violated = false;
        for slo in &mut self.slos {
            if !slo.spec.selector.matches(rec, route) {
                continue;
            }
            let good = match slo.judge(rec) {
                Verdict::Good => true,
                Verdict::Bad => false,
                Verdict::Skip => {
                    slo.skipped += 1;
                    continue;
                }
            };
            if good {
                slo.good += 1;
            } else {
                slo.bad += 1;
                violated = true;
            }
            slo.tiers.add(now_s, good);
        }
        violated
    }

    /// How the SLO called `name` judges one request: `None` when there is no such SLO,
    /// `Some(Skip)` when its selector or SLI does not apply.
    pub fn verdict(&self, name: &str, rec: &RequestRecord, route: &str) -> Option<Verdict> {
        let slo = self.slos.iter().find(|s| s.spec.name == name)?;
        if !slo.spec.selector.matches(rec, route) {
            return Some(Verdict::Skip);
        }
        Some(slo.judge(rec))
    }

    /// Heap held by the buckets of every SLO.
    pub fn heap_bytes(&self) -> usize {
        self.slos.iter().map(|s| s.tiers.heap_bytes()).sum()
    }
}
