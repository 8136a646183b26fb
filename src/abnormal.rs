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

/// One kept record: the value it was kept for, when, the record.
type Kept = (f64, u64, Arc<RequestRecord>);

fn least(v: &[Kept]) -> f64 {
    v.iter().map(|k| k.0).fold(f64::INFINITY, f64::min)
}

/// Up to `per_kind` records per kind, each with the value it was kept for and when. Every
/// finished request is offered, so a request that is not abnormal must cost little: a kind that
/// is full keeps the least value it holds (`floor`), and anything at or below it is turned away
/// without a look at the rest; the hour's expiry runs once a second, not once a request.
pub struct Abnormal {
    per_kind: usize,
    kept: [Vec<Kept>; 4],
    /// For a full slow kind: the least value it keeps (read only while it is full).
    floor: [f64; 4],
    /// The second of the last expiry sweep.
    swept_at: Option<u64>,
}

impl Abnormal {
    pub fn new(per_kind: usize) -> Abnormal {
        Abnormal {
            per_kind,
            kept: std::array::from_fn(|_| Vec::with_capacity(per_kind)),
            floor: [f64::NEG_INFINITY; 4],
            swept_at: None,
        }
    }

    fn offer(&mut self, kind: Kind, value: f64, now_s: u64, rec: &Arc<RequestRecord>) -> bool {
        let k = kind as usize;
        let v = &mut self.kept[k];
        if v.len() < self.per_kind {
            v.push((value, now_s, rec.clone()));
            if v.len() == self.per_kind && !kind.latest_first() {
                self.floor[k] = least(v);
            }
            return true;
        }
        if v.is_empty() {
            return false;
        }
        // Replace the least abnormal of this kind (for aborts and violations: the oldest).
        if !kind.latest_first() && value <= self.floor[k] {
            return false;
        }
        let key = |x: &Kept| {
            if kind.latest_first() {
                x.1 as f64
            } else {
                x.0
            }
        };
        let victim = (0..v.len())
            .min_by(|&a, &b| key(&v[a]).total_cmp(&key(&v[b])))
            .unwrap_or(0);
        v[victim] = (value, now_s, rec.clone());
        // Only the slow kinds read a floor: the latest-first ones take every offer.
        if !kind.latest_first() {
            self.floor[k] = least(v);
        }
        true
    }

    /// Drops what is older than an hour; at most once a second.
    fn sweep(&mut self, now_s: u64) {
        if self.swept_at == Some(now_s) {
            return;
        }
        self.swept_at = Some(now_s);
        // A kind left with fewer than `per_kind` takes anything until full, when its floor is
        // taken again: no floor to mend here.
        for v in &mut self.kept {
            v.retain(|k| now_s.saturating_sub(k.1) <= KEEP_S);
        }
    }

    /// Offers a finished record (`violated`: it missed at least one SLO); answers the kinds it
    /// was kept for.
    pub fn record(&mut self, rec: &Arc<RequestRecord>, violated: bool, now_s: u64) -> KeptBecause {
        self.sweep(now_s);
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

    /// Records kept, all kinds (one kept for two kinds counts twice).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.iter().map(Vec::len).sum()
    }

    /// The kept records of the last hour, slowest E2E first (a record kept for two reasons is
    /// listed once), each with its token write times (`token_ns`) for a full timeline.
    pub fn list(&self, now_s: u64, limit: usize) -> Vec<Value> {
        let mut recs: Vec<(Kind, &Kept)> = Kind::ALL
            .iter()
            .flat_map(|&kind| self.kept[kind as usize].iter().map(move |k| (kind, k)))
            .filter(|(_, k)| now_s.saturating_sub(k.1) <= KEEP_S)
            .collect();
        recs.sort_by(|a, b| {
            b.1 .2
                .e2e_ms
                .unwrap_or(f64::INFINITY)
                .total_cmp(&a.1 .2.e2e_ms.unwrap_or(f64::INFINITY))
        });
        let mut seen = std::collections::HashSet::new();
        recs.into_iter()
            .filter(|(_, k)| seen.insert(k.2.id))
            .take(limit)
            .map(|(kind, k)| {
                let mut v = serde_json::to_value(&*k.2).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("token_ns".into(), serde_json::json!(k.2.token_ns));
                    m.insert("kept_because".into(), Value::from(kind.name()));
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
        assert!(a.len() <= 9);
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

    /// The floor and the once-a-second sweep choose exactly what a scan of everything kept, on
    /// every offer, would: checked against that scan over random requests spanning three hours.
    #[test]
    fn keeps_what_a_full_scan_would() {
        // The scan: every record offered to every kind, the hour's expiry at each.
        fn scan(kept: &mut Vec<(u8, f64, u64, u64)>, per: usize, k: u8, v: f64, now: u64, id: u64, latest: bool) {
            kept.retain(|x| now.saturating_sub(x.2) <= KEEP_S);
            let mine: Vec<usize> = (0..kept.len()).filter(|&i| kept[i].0 == k).collect();
            if mine.len() < per {
                kept.push((k, v, now, id));
                return;
            }
            let key = |i: &usize| if latest { kept[*i].2 as f64 } else { kept[*i].1 };
            let i = *mine.iter().min_by(|a, b| key(a).total_cmp(&key(b))).unwrap();
            if latest || v > kept[i].1 {
                kept[i] = (k, v, now, id);
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (per, mut a, mut reference) = (5, Abnormal::new(5), Vec::new());
        let mut now = 0;
        for id in 0..20_000u64 {
            now += next() % 3; // 0-2 s apart: several offers within one second
            let e2e = (next() % 100_000) as f64 / 10.0;
            let (aborted, violated) = (next() % 50 == 0, next() % 40 == 0);
            let r = rec(id, e2e, aborted);
            a.record(&r, violated, now);
            if violated {
                scan(&mut reference, per, Kind::SloViolation as u8, 0.0, now, id, true);
            }
            if aborted {
                scan(&mut reference, per, Kind::Aborted as u8, 0.0, now, id, true);
            }
            if let Some(e) = r.e2e_ms {
                scan(&mut reference, per, Kind::SlowE2e as u8, e, now, id, false);
            }
            scan(&mut reference, per, Kind::SlowTtft as u8, r.ttft_ms.unwrap(), now, id, false);
        }
        for kind in Kind::ALL {
            let mut want: Vec<u64> = reference
                .iter()
                .filter(|x| x.0 == kind as u8)
                .map(|x| x.3)
                .collect();
            let mut got: Vec<u64> = a.kept[kind as usize].iter().map(|k| k.2.id).collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "{}", kind.name());
        }
    }

    #[test]
    fn forgets_after_an_hour() {
        let mut a = Abnormal::new(3);
        a.record(&rec(1, 500.0, false), false, 1000);
        assert_eq!(a.list(1000 + KEEP_S, 10).len(), 1);
        assert!(a.list(1001 + KEEP_S, 10).is_empty());
        a.record(&rec(2, 1.0, false), false, 1001 + KEEP_S);
        assert_eq!(
            a.len(),
            2,
            "one per kind for the new record; the old one is gone"
        );
    }
}
