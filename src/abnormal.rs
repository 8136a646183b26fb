//! The abnormal requests of the last hour, kept whole for `/api/v1/requests?slow=true`: the
//! slowest by E2E and by TTFT, the latest that violated an SLO, and the latest aborted ones.
//! Bounded: a fixed number per kind.

use std::sync::Arc;

use serde_json::Value;

use crate::record::RequestRecord;

pub const KEEP_S: u64 = 3600;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    SlowE2e,
    SlowTtft,
    Aborted,
    SloViolation,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::SlowE2e,
        Kind::SlowTtft,
        Kind::Aborted,
        Kind::SloViolation,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::SlowE2e => "slow_e2e",
            Kind::SlowTtft => "slow_ttft",
            Kind::Aborted => "aborted",
            Kind::SloViolation => "slo_violation",
        }
    }

    /// Kept by recency (the latest replace the oldest) rather than by how slow they were.
    fn latest_first(self) -> bool {
        matches!(self, Kind::Aborted | Kind::SloViolation)
    }
}

/// The kinds a record was kept for when it was offered (empty: not abnormal); the OTLP
/// exporter sends every record kept for at least one.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct KeptBecause(u8);

impl KeptBecause {
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// `slow_e2e`, `slow_ttft`, `aborted`, `slo_violation`: the names `kept_because` uses.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Kind::ALL
            .into_iter()
            .filter(move |k| self.0 & (1 << *k as u8) != 0)
            .map(Kind::name)
    }
    fn add(&mut self, k: Kind) {
        self.0 |= 1 << k as u8;
    }
}

/// Up to `per_kind` records per kind, each with the value it was kept for and when.
pub struct Abnormal {
    per_kind: usize,
    kept: Vec<(Kind, f64, u64, Arc<RequestRecord>)>,
}

impl Abnormal {
    pub fn new(per_kind: usize) -> Abnormal {
        Abnormal {
            per_kind,
            kept: Vec::with_capacity(per_kind * Kind::ALL.len()),
        }
    }

    fn offer(&mut self, kind: Kind, value: f64, now_s: u64, rec: &Arc<RequestRecord>) -> bool {
        let mine = self.kept.iter().filter(|k| k.0 == kind).count();
        if mine < self.per_kind {
            self.kept.push((kind, value, now_s, rec.clone()));
            return true;
        }
        // Replace the least abnormal of this kind (for aborts and violations: the oldest).
        let victim = self
            .kept
            .iter()
            .enumerate()
            .filter(|(_, k)| k.0 == kind)
            .min_by(|a, b| {
                let key = |k: &(Kind, f64, u64, Arc<RequestRecord>)| {
                    if kind.latest_first() {
                        k.2 as f64
                    } else {
                        k.1
                    }
                };
                key(a.1).total_cmp(&key(b.1))
            })
            .map(|(i, k)| (i, k.1));
        if let Some((i, v)) = victim {
            if kind.latest_first() || value > v {
                self.kept[i] = (kind, value, now_s, rec.clone());
                return true;
            }
        }
        false
    }

    /// Offers a finished record (`violated`: it missed at least one SLO); answers the kinds it
    /// was kept for.
    pub fn record(&mut self, rec: &Arc<RequestRecord>, violated: bool, now_s: u64) -> KeptBecause {
        self.kept.retain(|k| now_s.saturating_sub(k.2) <= KEEP_S);
        let mut why = KeptBecause::default();
        if violated && self.offer(Kind::SloViolation, 0.0, now_s, rec) {
            why.add(Kind::SloViolation);
        }
        if rec.aborted && self.offer(Kind::Aborted, 0.0, now_s, rec) {
            why.add(Kind::Aborted);
        }
        if let Some(e2e) = rec.e2e_ms {
            if self.offer(Kind::SlowE2e, e2e, now_s, rec) {
                why.add(Kind::SlowE2e);
            }
        }
        if let Some(ttft) = rec.ttft_ms {
            if self.offer(Kind::SlowTtft, ttft, now_s, rec) {
                why.add(Kind::SlowTtft);
            }
        }
        why
    }

    /// The kept records of the last hour, slowest E2E first (a record kept for two reasons is
    /// listed once), each with its token write times (`token_ns`) for a full timeline.
    pub fn list(&self, now_s: u64, limit: usize) -> Vec<Value> {
        let mut recs: Vec<&(Kind, f64, u64, Arc<RequestRecord>)> = self
            .kept
            .iter()
            .filter(|k| now_s.saturating_sub(k.2) <= KEEP_S)
            .collect();
        recs.sort_by(|a, b| {
            b.3.e2e_ms
                .unwrap_or(f64::INFINITY)
                .total_cmp(&a.3.e2e_ms.unwrap_or(f64::INFINITY))
        });
        let mut seen = std::collections::HashSet::new();
        recs.into_iter()
            .filter(|k| seen.insert(k.3.id))
            .take(limit)
            .map(|k| {
                let mut v = serde_json::to_value(&*k.3).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("token_ns".into(), serde_json::json!(k.3.token_ns));
                    m.insert("kept_because".into(), Value::from(k.0.name()));
                }
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, e2e: f64, aborted: bool) -> Arc<RequestRecord> {
        Arc::new(RequestRecord {
            id,
            e2e_ms: (!aborted).then_some(e2e),
            ttft_ms: Some(e2e / 10.0),
            aborted,
            token_ns: vec![1, 2].into(),
            ..Default::default()
        })
    }

    #[test]
    fn keeps_the_slowest_and_the_aborted_within_bounds() {
        let mut a = Abnormal::new(3);
        for i in 0..100 {
            a.record(&rec(i, i as f64, i % 10 == 0), false, 1000);
        }
        let l = a.list(1000, 100);
        let ids: Vec<u64> = l.iter().map(|v| v["id"].as_u64().unwrap()).collect();
        for slow in [99, 98, 97] {
            assert!(ids.contains(&slow), "{ids:?}");
        }
        assert!(
            ids.iter().filter(|&&i| i % 10 == 0).count() >= 3,
            "aborted kept: {ids:?}"
        );
        assert!(l.len() <= 9, "bounded");
        assert_eq!(l[0]["token_ns"], serde_json::json!([1, 2]));
        assert!(a.kept.len() <= 9);
    }

    #[test]
    fn answers_why_a_record_was_kept() {
        let mut a = Abnormal::new(2);
        let names = |k: KeptBecause| k.names().collect::<Vec<_>>();
        assert_eq!(
            names(a.record(&rec(1, 50.0, false), false, 10)),
            ["slow_e2e", "slow_ttft"]
        );
        assert_eq!(
            names(a.record(&rec(2, 40.0, false), false, 10)),
            ["slow_e2e", "slow_ttft"]
        );
        assert!(
            a.record(&rec(3, 30.0, false), false, 10).is_empty(),
            "faster than both kept"
        );
        assert_eq!(
            names(a.record(&rec(4, 60.0, false), false, 10)),
            ["slow_e2e", "slow_ttft"]
        );
        assert_eq!(names(a.record(&rec(5, 1.0, true), false, 10)), ["aborted"]);
    }

    #[test]
    fn keeps_the_latest_slo_violators_however_fast() {
        let mut a = Abnormal::new(2);
        // Two slow requests fill the slow kinds; the violators are fast (an ITL or stage SLO).
        a.record(&rec(1, 900.0, false), false, 10);
        a.record(&rec(2, 800.0, false), false, 10);
        let names = |k: KeptBecause| k.names().collect::<Vec<_>>();
        for (id, at) in [(3, 11), (4, 12), (5, 13)] {
            assert_eq!(
                names(a.record(&rec(id, 5.0, false), true, at)),
                ["slo_violation"],
                "violator {id}"
            );
        }
        let l = a.list(13, 100);
        let violators: Vec<u64> = l
            .iter()
            .filter(|v| v["kept_because"] == "slo_violation")
            .map(|v| v["id"].as_u64().unwrap())
            .collect();
        assert_eq!(violators, [5, 4], "the latest two, bounded: {l:?}");
        assert!(
            a.record(&rec(6, 5.0, false), false, 14).is_empty(),
            "a fast request that met every SLO is not abnormal"
        );
    }

    #[test]
    fn forgets_after_an_hour() {
        let mut a = Abnormal::new(3);
        a.record(&rec(1, 500.0, false), false, 1000);
        assert_eq!(a.list(1000 + KEEP_S, 10).len(), 1);
        assert!(a.list(1001 + KEEP_S, 10).is_empty());
        a.record(&rec(2, 1.0, false), false, 1001 + KEEP_S);
        assert_eq!(
            a.kept.len(),
            2,
            "one per kind for the new record; the old one is gone"
        );
    }
}
