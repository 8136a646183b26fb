//! `/api/v1/breakdown`: per group of label sets, headline latency quantiles and where the
//! time went (stage quantiles and shares of E2E) over a recent window.

use super::window::{SlotData, E2E, ITL, STAGE0, TPOT, TTFT};
use super::Aggregator;
use crate::record::Stage;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Label names `breakdown` can group by; others are ignored (an API layer may reject them).
pub const GROUP_FIELDS: [&str; 6] = ["namespace", "pod", "container", "model", "route", "node"];

const METRICS: [(usize, &str); 4] = [
    (TTFT, "ttft_ms"),
    (ITL, "itl_ms"),
    (TPOT, "tpot_ms"),
    (E2E, "e2e_ms"),
];

/// p50/p95/p99 (HDR), exact mean and count of metric `m`, in ms; `None` without samples.
fn summary(d: &SlotData, m: usize) -> Option<Map<String, Value>> {
    let h = d.hists[m].as_ref().filter(|h| !h.is_empty())?;
    let q = h.value_at_quantiles([0.5, 0.95, 0.99]);
    let mut o = Map::new();
    for (k, us) in ["p50", "p95", "p99"].into_iter().zip(q) {
        o.insert(k.into(), json!(us as f64 / 1e3));
    }
    o.insert(
        "mean".into(),
        json!(d.sum_ns[m] as f64 / h.len() as f64 / 1e6),
    );
    o.insert("count".into(), json!(h.len()));
    Some(o)
}

impl Aggregator {
    /// `/api/v1/breakdown`: groups the label sets by `group_by` (a subset of `GROUP_FIELDS`;
    /// empty = one group, named "all") over the last `window_s` seconds, clamped to what the
    /// ring holds. The window is whole slots: `ceil(window_s / slot_secs)` full ones plus the
    /// current partial one. Groups without requests in the window are left out; the rest are
    /// sorted by request count, largest first.
    pub fn breakdown(&mut self, now_s: u64, window_s: u64, group_by: &[&str]) -> Value {
        self.advance_all(now_s);
        let slot_secs = self.cfg.slot_secs;
        let window_s = window_s.min((self.cfg.slots as u64 - 1) * slot_secs);
        let n_back = window_s.div_ceil(slot_secs);
        let fields: Vec<&str> = GROUP_FIELDS
            .into_iter()
            .filter(|f| group_by.contains(f))
            .collect();

        let mut groups: BTreeMap<Vec<&str>, SlotData> = BTreeMap::new();
        for s in self.all_series() {
            let key = fields
                .iter()
                .map(|f| s.labels.get(f).unwrap_or(""))
                .collect();
            s.window.add_into(n_back, groups.entry(key).or_default());
        }
        let mut groups: Vec<_> = groups.into_iter().filter(|(_, d)| d.requests > 0).collect();
        // Stable sort: equal counts stay in key order.
        groups.sort_by_key(|(_, d)| std::cmp::Reverse(d.requests));

        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(key, d)| {
                let name = if key.is_empty() {
                    "all".to_string()
                } else {
                    key.join("/")
                };
                let key: Map<String, Value> = fields
                    .iter()
                    .zip(&key)
                    .map(|(f, v)| (f.to_string(), json!(v)))
                    .collect();
                let metrics: Map<String, Value> = METRICS
                    .iter()
                    .filter_map(|&(m, k)| summary(&d, m).map(|o| (k.to_string(), o.into())))
                    .collect();
                // Total stage time over total E2E time, both from the records that have an
                // E2E, so the in-E2E shares add up to at most 1.
                let e2e_total = d.sum_ns[E2E];
                let stages: Map<String, Value> = Stage::ALL
                    .iter()
                    .filter_map(|&st| {
                        let mut o = summary(&d, STAGE0 + st as usize)?;
                        if st.in_e2e() && e2e_total > 0 {
                            let share = d.stage_e2e_ns[st as usize] as f64 / e2e_total as f64;
                            o.insert("share_of_e2e".into(), json!(share));
                        }
                        Some((st.name().to_string(), o.into()))
                    })
                    .collect();
                let mut g = json!({
                    "key": key,
                    "name": name,
                    "count": d.requests,
                    "metrics": metrics,
                    "stages": stages,
                });
                // Only where requests went through a sidecar: absent, not zero, without one.
                let sc = |st: Stage| d.stage_e2e_ns[st as usize];
                let sidecar_e2e = sc(Stage::SidecarInbound) + sc(Stage::SidecarOutbound);
                let has_sidecar =
                    [Stage::SidecarInbound, Stage::SidecarOutbound]
                        .iter()
                        .any(|&st| {
                            d.hists[STAGE0 + st as usize]
                                .as_ref()
                                .is_some_and(|h| !h.is_empty())
                        });
                if has_sidecar {
                    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
                    g["sidecar_share"] = json!({
                        "of_ttft": ratio(d.sidecar_ttft_ns, d.sum_ns[TTFT]),
                        "of_e2e": ratio(sidecar_e2e, e2e_total),
                    });
                }
                g
            })
            .collect();
        json!({ "window_s": window_s, "group_by": fields, "groups": groups })
    }
}
