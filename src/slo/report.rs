//! The SLO math (compliance, error budget, burn rates, alert conditions) and its two views:
//! JSON for `/api/v1/slo` and `llmslo_slo_*` Prometheus text exposition.

use super::window::Counts;
use super::{Slo, SloEngine};
use serde_json::{json, Value};

/// Burn-rate windows: the four pairs of the workbook's alerts need all of them.
pub const BURN_WINDOWS: [(&str, u64); 7] = [
    ("5m", 300),
    ("30m", 1800),
    ("1h", 3600),
    ("2h", 7200),
    ("6h", 21_600),
    ("1d", 86_400),
    ("3d", 259_200),
];

/// One multiwindow, multi-burn-rate alert: fires when both windows burn faster than `factor`.
#[derive(Debug, Clone, Copy)]
pub struct AlertRule {
    pub name: &'static str,
    pub severity: &'static str,
    pub long: &'static str,
    pub short: &'static str,
    pub factor: f64,
}

/// The SRE workbook's recommended pairs (ch. 5, table 5-8 and the PromQL after it).
pub const ALERTS: [AlertRule; 4] = [
    AlertRule {
        name: "page_fast",
        severity: "page",
        long: "1h",
        short: "5m",
        factor: 14.4,
    },
    AlertRule {
        name: "page_slow",
        severity: "page",
        long: "6h",
        short: "30m",
        factor: 6.0,
    },
    AlertRule {
        name: "ticket_fast",
        severity: "ticket",
        long: "1d",
        short: "2h",
        factor: 3.0,
    },
    AlertRule {
        name: "ticket_slow",
        severity: "ticket",
        long: "3d",
        short: "6h",
        factor: 1.0,
    },
];

/// The allowed error ratio, `1 - objective`, rounded to 12 decimals: objectives are written
/// in decimal, and `1 - 0.99` in binary is 0.010000000000000009, which would show up as burn
/// rates of 2.499999999999998 instead of 2.5.
pub fn budget_ratio(objective: f64) -> f64 {
    ((1.0 - objective) * 1e12).round() / 1e12
}

/// Error ratio over the window divided by the budget ratio; `None` without requests.
pub fn burn_rate(c: Counts, objective: f64) -> Option<f64> {
    (c.total > 0).then(|| c.bad() as f64 / (c.total as f64 * budget_ratio(objective)))
}

/// `1 - bad / allowed_bad`, allowed_bad = (1 - objective) × total. 1 when nothing was
/// counted (nothing spent); negative once the budget is overspent.
pub fn budget_remaining(c: Counts, objective: f64) -> f64 {
    1.0 - burn_rate(c, objective).unwrap_or(0.0)
}

/// One SLO's numbers at one instant.
struct Snapshot {
    window: Counts,
    burn: [Option<f64>; BURN_WINDOWS.len()],
    firing: [bool; ALERTS.len()],
    covered_s: u64,
}

fn window_index(name: &str) -> usize {
    BURN_WINDOWS
        .iter()
        .position(|(n, _)| *n == name)
        .expect("alert windows are burn windows")
}

impl Slo {
    fn snapshot(&mut self, now_s: u64, started_s: u64) -> Snapshot {
        self.tiers.advance(now_s);
        let obj = self.spec.objective;
        let burn = BURN_WINDOWS.map(|(_, secs)| burn_rate(self.tiers.sum(secs), obj));
        let firing = ALERTS.map(|a| {
            let over = |w: &str| burn[window_index(w)].is_some_and(|b| b > a.factor);
            over(a.long) && over(a.short)
        });
        Snapshot {
            window: self.tiers.sum(self.window_s),
            burn,
            firing,
            covered_s: now_s.saturating_sub(started_s).min(self.window_s),
        }
    }
}

/// `# HELP`/`# TYPE` in the order this module lists them (kind before help).
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    crate::stats::prom::write_header(out, name, help, kind);
}

use crate::stats::prom::write_sample as sample;

impl SloEngine {
    fn snapshots(&mut self, now_s: u64) -> Vec<Snapshot> {
        let started = *self.started_s.get_or_insert(now_s);
        self.slos
            .iter_mut()
            .map(|s| s.snapshot(now_s, started))
            .collect()
    }

    /// `{"slos": [...]}`: per SLO its spec, counts and compliance over the window, error budget
    /// remaining, burn rates and the four alerts. Unknown values (no requests) are `null`.
    pub fn status(&mut self, now_s: u64) -> Value {
        let snaps = self.snapshots(now_s);
        let slos: Vec<Value> = self
            .slos
            .iter()
            .zip(snaps)
            .map(|(s, snap)| {
                let obj = s.spec.objective;
                let w = snap.window;
                let burn: serde_json::Map<String, Value> = BURN_WINDOWS
                    .iter()
                    .zip(snap.burn)
                    .map(|((n, _), b)| (n.to_string(), json!(b)))
                    .collect();
                let alerts: Vec<Value> = ALERTS
                    .iter()
                    .zip(snap.firing)
                    .map(|(a, firing)| {
                        json!({"name": a.name, "severity": a.severity, "long": a.long,
                               "short": a.short, "factor": a.factor, "firing": firing})
                    })
                    .collect();
                json!({
                    "name": s.spec.name,
                    "objective": obj,
                    "window": s.spec.window,
                    "window_s": s.window_s,
                    "window_precision_s": s.tiers.precision_s(s.window_s),
                    "covered_s": snap.covered_s,
                    "selector": s.spec.selector,
                    "sli": s.spec.sli,
                    "aborted": s.spec.aborted,
                    "total": w.total,
                    "good": w.good,
                    "bad": w.bad(),
                    "compliance": (w.total > 0).then(|| w.good as f64 / w.total as f64),
                    "error_budget_remaining": budget_remaining(w, obj),
                    "burn_rates": burn,
                    "alerts": alerts,
                    "since_start": {"good": s.good, "bad": s.bad, "not_counted": s.skipped},
                })
            })
            .collect();
        json!({ "slos": slos })
    }

    /// Appends the `llmslo_slo_*` families (nothing when no SLO is configured).
    pub fn render(&mut self, now_s: u64, out: &mut String) {
        if self.slos.is_empty() {
            return;
        }
        let snaps = self.snapshots(now_s);
        let rows: Vec<(&Slo, Snapshot)> = self.slos.iter().zip(snaps).collect();
        let gauge =
            |out: &mut String, name: &str, help: &str, f: &dyn Fn(&Slo, &Snapshot) -> f64| {
                header(out, name, "gauge", help);
                for (s, snap) in &rows {
                    sample(out, name, &[("slo", &s.spec.name)], f(s, snap));
                }
            };
        gauge(
            out,
            "llmslo_slo_objective",
            "Target fraction of good requests.",
            &|s, _| s.spec.objective,
        );
        gauge(
            out,
            "llmslo_slo_window_seconds",
            "Length of the SLO's compliance window.",
            &|s, _| s.window_s as f64,
        );
        gauge(
            out,
            "llmslo_slo_compliance",
            "Fraction of counted requests that were good over the SLO window (NaN: none).",
            &|_, n| {
                let w = n.window;
                if w.total == 0 {
                    f64::NAN
                } else {
                    w.good as f64 / w.total as f64
                }
            },
        );
        gauge(
            out,
            "llmslo_slo_error_budget_remaining",
            "1 - bad / allowed bad over the SLO window; negative when overspent.",
            &|s, n| budget_remaining(n.window, s.spec.objective),
        );
        let name = "llmslo_slo_burn_rate";
        header(
            out,
            name,
            "gauge",
            "Error ratio over the window / (1 - objective) (NaN: no requests in the window).",
        );
        for (s, snap) in &rows {
            for ((w, _), b) in BURN_WINDOWS.iter().zip(snap.burn) {
                let labels = [("slo", s.spec.name.as_str()), ("window", w)];
                sample(out, name, &labels, b.unwrap_or(f64::NAN));
            }
        }
        let name = "llmslo_slo_alert_firing";
        header(
            out,
            name,
            "gauge",
            "1 when both windows of a multiwindow, multi-burn-rate alert burn faster than its factor.",
        );
        for (s, snap) in &rows {
            for (a, firing) in ALERTS.iter().zip(snap.firing) {
                let labels = [
                    ("slo", s.spec.name.as_str()),
                    ("alert", a.name),
                    ("severity", a.severity),
                ];
                sample(out, name, &labels, if firing { 1.0 } else { 0.0 });
            }
        }
        let name = "llmslo_slo_requests_total";
        header(
            out,
            name,
            "counter",
            "Requests judged against the SLO since the agent started, by result.",
        );
        for (s, _) in &rows {
            for (result, v) in [("good", s.good), ("bad", s.bad)] {
                let labels = [("slo", s.spec.name.as_str()), ("result", result)];
                sample(out, name, &labels, v as f64);
            }
        }
    }
}
