//! The comparison itself: over the scrapes of one server in the window, the increase of each
//! of its histograms, its quantiles, and the agent's own quantiles of the same requests (same
//! pod, same model, finished between the first and the last scrape).

use serde::Serialize;

use super::hist::{increase_over, Hist};
use super::source::{Metric, ServerView};

/// One scrape of one server.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// CLOCK_MONOTONIC when the response was in (the clock of the agent's records).
    pub mono_ns: u64,
    pub unix_s: u64,
    pub view: ServerView,
}

/// One finished request of the pod, as the agent measured it (seconds).
#[derive(Debug, Clone, Default)]
pub struct AgentObs {
    pub end_ns: u64,
    pub model: String,
    pub ttft: Option<f64>,
    pub e2e: Option<f64>,
    /// Our `queue_prefill` stage, compared with the server's queue time.
    pub queue_prefill: Option<f64>,
}

pub const QUANTILES: [(&str, f64); 3] = [("0.5", 0.5), ("0.95", 0.95), ("0.99", 0.99)];

/// Quantiles of one side, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Side {
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Side {
    pub fn get(&self, q: &str) -> Option<f64> {
        match q {
            "0.5" => self.p50_ms,
            "0.95" => self.p95_ms,
            "0.99" => self.p99_ms,
            _ => None,
        }
    }

    fn set(&mut self, q: &str, v: Option<f64>) {
        match q {
            "0.5" => self.p50_ms = v,
            "0.95" => self.p95_ms = v,
            _ => self.p99_ms = v,
        }
    }
}

/// Server vs agent for one metric of one model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricCompare {
    pub metric: Metric,
    /// What the agent side is: `ttft`, `e2e`, or the stage `queue_prefill` (for `queue`).
    pub agent_measure: &'static str,
    pub server: Side,
    /// Per quantile, the server bucket it was interpolated in ([lo, hi] ms; hi may be null
    /// for +Inf): the server cannot resolve it finer, so a difference within the bucket's
    /// width is agreement.
    pub server_bucket_ms: std::collections::BTreeMap<&'static str, (f64, Option<f64>)>,
    pub agent: Side,
    /// agent − server, per quantile (and `mean`).
    pub diff_ms: std::collections::BTreeMap<&'static str, f64>,
    /// (agent − server) / server × 100.
    pub diff_pct: std::collections::BTreeMap<&'static str, f64>,
    /// Whether the agent's quantile falls inside the server's bucket for it.
    pub agent_in_server_bucket: std::collections::BTreeMap<&'static str, bool>,
    /// The window this comparison covers (monotonic ns of the first and last scrape).
    #[serde(skip)]
    pub from_ns: u64,
    #[serde(skip)]
    pub to_ns: u64,
    pub window_s: f64,
}

/// Nearest-rank quantile of sorted values.
fn rank_quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

/// Compares every histogram the newest scrape has with the agent's observations.
/// `ring` is oldest first; answers nothing with fewer than two scrapes.
pub fn compare(ring: &[Scrape], obs: &[AgentObs]) -> Vec<(String, MetricCompare)> {
    let Some(newest) = ring.last() else {
        return Vec::new();
    };
    if ring.len() < 2 {
        return Vec::new();
    }
    let models: std::collections::BTreeSet<&str> =
        newest.view.hists.keys().map(|(_, m)| m.as_str()).collect();
    let mut out = Vec::new();
    for ((metric, model), last) in &newest.view.hists {
        // A series that appeared later had no observations before: zeros with its buckets.
        let zero = Hist {
            bounds: last.bounds.clone(),
            cum: vec![0.0; last.cum.len()],
            count: 0.0,
            sum: 0.0,
        };
        let run: Vec<&Hist> = ring
            .iter()
            .map(|s| s.view.hists.get(&(*metric, model.clone())).unwrap_or(&zero))
            .collect();
        let Some((start, inc)) = increase_over(&run) else {
            continue;
        };
        let (from_ns, to_ns) = (ring[start].mono_ns, newest.mono_ns);
        let mut server = Side {
            count: inc.observations().max(0.0) as u64,
            mean_ms: inc.mean().map(ms),
            ..Default::default()
        };
        let mut buckets = std::collections::BTreeMap::new();
        for (name, q) in QUANTILES {
            if let Some(x) = inc.quantile(q) {
                server.set(name, Some(ms(x.value)));
                buckets.insert(name, (ms(x.lo), x.hi.is_finite().then(|| ms(x.hi))));
            }
        }
        // With one model (or none: TGI), every request of the pod is that model's; with
        // several, the request's `model` must name it.
        let mine = |o: &&AgentObs| models.len() <= 1 || o.model == *model;
        let mut vals: Vec<f64> = obs
            .iter()
            .filter(|o| o.end_ns > from_ns && o.end_ns <= to_ns)
            .filter(mine)
            .filter_map(|o| match metric {
                Metric::Ttft => o.ttft,
                Metric::E2e => o.e2e,
                Metric::Queue => o.queue_prefill,
            })
            .filter(|v| v.is_finite())
            .collect();
        vals.sort_by(f64::total_cmp);
        let mut agent = Side {
            count: vals.len() as u64,
            mean_ms: (!vals.is_empty()).then(|| ms(vals.iter().sum::<f64>() / vals.len() as f64)),
            ..Default::default()
        };
        for (name, q) in QUANTILES {
            agent.set(name, rank_quantile(&vals, q).map(ms));
        }
        let mut diff_ms = std::collections::BTreeMap::new();
        let mut diff_pct = std::collections::BTreeMap::new();
        let mut inside = std::collections::BTreeMap::new();
        let pairs = QUANTILES
            .iter()
            .map(|(n, _)| (*n, server.get(n), agent.get(n)))
            .chain([("mean", server.mean_ms, agent.mean_ms)]);
        for (name, s, a) in pairs {
            let (Some(s), Some(a)) = (s, a) else { continue };
            diff_ms.insert(name, a - s);
            if s != 0.0 {
                diff_pct.insert(name, (a - s) / s * 100.0);
            }
            if let Some((lo, hi)) = buckets.get(name) {
                inside.insert(name, a >= *lo && hi.is_none_or(|h| a <= h));
            }
        }
        out.push((
            model.clone(),
            MetricCompare {
                metric: *metric,
                agent_measure: match metric {
                    Metric::Ttft => "ttft",
                    Metric::E2e => "e2e",
                    Metric::Queue => "queue_prefill",
                },
                server,
                server_bucket_ms: buckets,
                agent,
                diff_ms,
                diff_pct,
                agent_in_server_bucket: inside,
                from_ns,
                to_ns,
                window_s: to_ns.saturating_sub(from_ns) as f64 / 1e9,
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crosscheck::source::Source;
    use std::collections::BTreeMap;

    const INF: f64 = f64::INFINITY;

    fn view(ttft_cum: [f64; 3], sum: f64) -> ServerView {
        let h = Hist::from_buckets(
            vec![(0.25, ttft_cum[0]), (0.5, ttft_cum[1]), (INF, ttft_cum[2])],
            Some(ttft_cum[2]),
            Some(sum),
        )
        .unwrap();
        ServerView {
            source: Source::Vllm,
            hists: BTreeMap::from([((Metric::Ttft, "m".to_string()), h)]),
        }
    }

    fn scrape(t_s: u64, v: ServerView) -> Scrape {
        Scrape {
            mono_ns: t_s * 1_000_000_000,
            unix_s: t_s,
            view: v,
        }
    }

    #[test]
    fn worked_example_server_vs_agent() {
        // Before the window the server had 100 requests; in it, 4 more, all in (0.25, 0.5]
        // with a sum of 1.6 s (mean 400 ms).
        let ring = [
            scrape(10, view([100.0, 100.0, 100.0], 5.0)),
            scrape(25, view([100.0, 102.0, 102.0], 5.8)),
            scrape(40, view([100.0, 104.0, 104.0], 6.6)),
        ];
        let mk = |end_s: f64, ttft: f64| AgentObs {
            end_ns: (end_s * 1e9) as u64,
            model: "alias".into(),
            ttft: Some(ttft),
            ..Default::default()
        };
        // Four inside the window, one before it, one after.
        let obs = [
            mk(12.0, 0.39),
            mk(20.0, 0.40),
            mk(30.0, 0.41),
            mk(39.0, 0.42),
            mk(5.0, 9.0),
            mk(41.0, 9.0),
        ];
        let r = compare(&ring, &obs);
        assert_eq!(r.len(), 1);
        let (model, c) = &r[0];
        assert_eq!(model, "m");
        assert_eq!(c.window_s, 30.0);
        assert_eq!(c.server.count, 4);
        // p50: rank 2 of 4 in (0.25, 0.5] → 250 + 250 × 2/4 = 375 ms.
        assert!((c.server.p50_ms.unwrap() - 375.0).abs() < 1e-9);
        // p95: rank 3.8 → 250 + 250 × 0.95 = 487.5 ms.
        assert!((c.server.p95_ms.unwrap() - 487.5).abs() < 1e-9);
        assert!((c.server.mean_ms.unwrap() - 400.0).abs() < 1e-9);
        assert_eq!(c.server_bucket_ms["0.5"], (250.0, Some(500.0)));
        assert_eq!(
            c.agent.count, 4,
            "only requests that ended inside the window"
        );
        assert!((c.agent.p50_ms.unwrap() - 400.0).abs() < 1e-9);
        assert!((c.agent.p95_ms.unwrap() - 420.0).abs() < 1e-9);
        assert!((c.diff_ms["0.5"] - 25.0).abs() < 1e-9);
        assert!((c.diff_pct["0.5"] - 25.0 / 375.0 * 100.0).abs() < 1e-9);
        assert!((c.diff_ms["mean"] - 5.0).abs() < 1e-6);
        assert!(c.agent_in_server_bucket["0.5"] && c.agent_in_server_bucket["0.95"]);
    }

    #[test]
    fn reset_inside_the_window_and_too_few_scrapes() {
        let ring = [
            scrape(0, view([50.0, 60.0, 60.0], 9.0)),
            // Restarted: 2 requests since, both under 0.25 s.
            scrape(15, view([2.0, 2.0, 2.0], 0.2)),
        ];
        let r = compare(&ring, &[]);
        let c = &r[0].1;
        assert_eq!(c.server.count, 2);
        assert!((c.server.p50_ms.unwrap() - 125.0).abs() < 1e-9);
        assert_eq!(c.agent.count, 0);
        assert!(c.diff_ms.is_empty());
        assert!(compare(&ring[..1], &[]).is_empty());
    }

    #[test]
    fn several_models_match_by_name() {
        let mut v0 = view([0.0, 0.0, 0.0], 0.0);
        let mut v1 = view([0.0, 1.0, 1.0], 0.3);
        let other = v1.hists[&(Metric::Ttft, "m".to_string())].clone();
        v0.hists
            .insert((Metric::Ttft, "n".into()), other.increase_since(&other));
        v1.hists.insert((Metric::Ttft, "n".into()), other);
        let ring = [scrape(0, v0), scrape(15, v1)];
        let obs = [
            AgentObs {
                end_ns: 5_000_000_000,
                model: "m".into(),
                ttft: Some(0.3),
                ..Default::default()
            },
            AgentObs {
                end_ns: 6_000_000_000,
                model: "x".into(),
                ttft: Some(9.0),
                ..Default::default()
            },
        ];
        let r = compare(&ring, &obs);
        let m = r.iter().find(|(m, _)| m == "m").unwrap();
        assert_eq!(m.1.agent.count, 1);
        let n = r.iter().find(|(m, _)| m == "n").unwrap();
        assert_eq!(n.1.agent.count, 0);
    }
}
