//! Time × latency-bucket counts for `/api/v1/heatmap`: one fixed ring of 10 s columns covering
//! the last hour per metric (node-wide), with the histograms' bucket bounds as rows.

use serde_json::{json, Value};

use super::prom::{BucketSpec, E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS};
use crate::record::RequestRecord;

pub const COLUMN_S: u64 = 10;
/// One hour of columns (plus the current one).
pub const COLUMNS: usize = 361;
const METRICS: [&str; 4] = ["ttft", "itl", "tpot", "e2e"];
/// Rows: the widest bucket spec has 22 bounds, plus `+Inf`.
const ROWS: usize = 23;

fn spec(metric: usize) -> &'static BucketSpec {
    match metric {
        0 => &TTFT_BUCKETS,
        1 | 2 => &ITL_BUCKETS,
        _ => &E2E_BUCKETS,
    }
}

/// Counts per metric, column (ring slot) and row; `epoch[slot]` says which 10 s column a slot
/// holds, so a slot is cleared when reused. Fixed size: about 130 KiB whatever the traffic.
pub struct Heatmap {
    counts: Vec<[u32; ROWS]>,
    epoch: [u64; COLUMNS],
}

impl Default for Heatmap {
    fn default() -> Self {
        Heatmap {
            counts: vec![[0; ROWS]; METRICS.len() * COLUMNS],
            epoch: [u64::MAX; COLUMNS],
        }
    }
}

impl Heatmap {
    fn slot(&mut self, now_s: u64) -> usize {
        let col = now_s / COLUMN_S;
        let slot = (col % COLUMNS as u64) as usize;
        if self.epoch[slot] != col {
            self.epoch[slot] = col;
            for m in 0..METRICS.len() {
                self.counts[m * COLUMNS + slot] = [0; ROWS];
            }
        }
        slot
    }

    fn add(&mut self, m: usize, slot: usize, seconds: f64) {
        let row = spec(m)
            .le
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(spec(m).le.len());
        let c = &mut self.counts[m * COLUMNS + slot][row];
        *c = c.saturating_add(1);
    }

    pub fn record(&mut self, rec: &RequestRecord, now_s: u64) {
        let slot = self.slot(now_s);
        if let Some(v) = rec.ttft_ms {
            self.add(0, slot, v / 1e3);
        }
        for g in rec.token_ns.itl_ms() {
            self.add(1, slot, g / 1e3);
        }
        if let Some(v) = rec.tpot_ms {
            self.add(2, slot, v / 1e3);
        }
        if let Some(v) = rec.e2e_ms {
            self.add(3, slot, v / 1e3);
        }
    }

    /// `{"metric","window_s","step_s","buckets_le":[…,"+Inf"],"columns":[{"start_s","counts":[…]}]}`;
    /// `step_s` is rounded to a multiple of 10 s; the oldest column first.
    pub fn query(
        &self,
        metric: &str,
        now_s: u64,
        window_s: u64,
        step_s: u64,
    ) -> Result<Value, String> {
        let m = METRICS
            .iter()
            .position(|&x| x == metric)
            .ok_or_else(|| format!("unknown metric {metric:?}: use ttft, itl, tpot or e2e"))?;
        let max = (COLUMNS as u64 - 1) * COLUMN_S;
        if window_s == 0 || window_s > max {
            return Err(format!("window must be between 10s and {max}s"));
        }
        let step = step_s.max(COLUMN_S) / COLUMN_S * COLUMN_S;
        let now_col = now_s / COLUMN_S;
        let first_col = (now_s.saturating_sub(window_s)) / COLUMN_S + 1;
        let per = step / COLUMN_S;
        let mut columns = Vec::new();
        let mut col = first_col;
        while col <= now_col {
            let mut sum = [0u64; ROWS];
            for c in col..(col + per).min(now_col + 1) {
                let slot = (c % COLUMNS as u64) as usize;
                if self.epoch[slot] == c {
                    for (s, v) in sum.iter_mut().zip(self.counts[m * COLUMNS + slot]) {
                        *s += u64::from(v);
                    }
                }
            }
            let n = spec(m).le.len() + 1;
            columns.push(json!({ "start_s": col * COLUMN_S, "counts": &sum[..n] }));
            col += per;
        }
        let mut le: Vec<Value> = spec(m).le.iter().map(|&v| json!(v)).collect();
        le.push(json!("+Inf"));
        Ok(
            json!({ "metric": metric, "window_s": window_s, "step_s": step, "buckets_le": le, "columns": columns }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ttft_ms: f64, itl: &[f64]) -> RequestRecord {
        // Token times whose gaps are `itl` (ms).
        let mut t = 1_000_000_000u64;
        let mut times = vec![t];
        for g in itl {
            t += (g * 1e6).round() as u64;
            times.push(t);
        }
        RequestRecord {
            ttft_ms: Some(ttft_ms),
            token_ns: times.into(),
            e2e_ms: Some(100.0),
            ..Default::default()
        }
    }

    #[test]
    fn counts_land_in_the_right_column_and_row() {
        let mut h = Heatmap::default();
        h.record(&rec(3.0, &[1.5, 1.5]), 1000); // column 100
        h.record(&rec(3.0, &[]), 1005);
        h.record(&rec(700.0, &[]), 1012); // column 101
        let v = h.query("ttft", 1015, 30, 10).unwrap();
        let cols = v["columns"].as_array().unwrap();
        assert_eq!(cols.len(), 3);
        let c100 = cols.iter().find(|c| c["start_s"] == 1000).unwrap();
        // 3 ms falls in le=0.005 (index 2).
        assert_eq!(c100["counts"][2], 2);
        let c101 = cols.iter().find(|c| c["start_s"] == 1010).unwrap();
        assert_eq!(c101["counts"][12], 1, "700 ms in le=0.75");
        let itl = h.query("itl", 1015, 30, 30).unwrap();
        let total: u64 = itl["columns"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| {
                c["counts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
            })
            .sum();
        assert_eq!(total, 2);
    }

    #[test]
    fn old_columns_are_cleared_and_bad_queries_refused() {
        let mut h = Heatmap::default();
        h.record(&rec(3.0, &[]), 1000);
        h.record(&rec(3.0, &[]), 1000 + COLUMNS as u64 * COLUMN_S); // same slot, an hour later
        let v = h
            .query("ttft", 1000 + COLUMNS as u64 * COLUMN_S, 20, 10)
            .unwrap();
        let total: u64 = v["columns"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| {
                c["counts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
            })
            .sum();
        assert_eq!(total, 1);
        assert!(h.query("bogus", 0, 60, 10).is_err());
        assert!(h.query("ttft", 0, 0, 10).is_err());
        assert!(h.query("ttft", 0, 10 * 3600, 10).is_err());
    }
}
