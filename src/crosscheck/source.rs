//! Which inference servers' metrics we know, and what they mean in our terms: the histogram
//! families of vLLM, SGLang and TGI that measure TTFT, E2E and queue time, per model.

use std::collections::BTreeMap;

use super::expo::Sample;
use super::hist::Hist;

/// A server whose metric names we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Vllm,
    Sglang,
    Tgi,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Vllm => "vllm",
            Source::Sglang => "sglang",
            Source::Tgi => "tgi",
        }
    }
}

/// Our metric a server histogram is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Ttft,
    E2e,
    /// The server's queue (waiting) time; shown next to our `queue_prefill` stage.
    Queue,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Ttft, Metric::E2e, Metric::Queue];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft",
            Metric::E2e => "e2e",
            Metric::Queue => "queue",
        }
    }
}

/// (source, family, metric). Families are histograms in seconds. vLLM: `vllm/v1/metrics/
/// loggers.py`; SGLang: `sglang/srt/metrics/collector.py` (both label `model_name`); TGI:
/// `router/src/server.rs` (no model label; no TTFT histogram).
pub const FAMILIES: &[(Source, &str, Metric)] = &[
    (
        Source::Vllm,
        "vllm:time_to_first_token_seconds",
        Metric::Ttft,
    ),
    (
        Source::Vllm,
        "vllm:e2e_request_latency_seconds",
        Metric::E2e,
    ),
    (
        Source::Vllm,
        "vllm:request_queue_time_seconds",
        Metric::Queue,
    ),
    (
        Source::Sglang,
        "sglang:time_to_first_token_seconds",
        Metric::Ttft,
    ),
    (
        Source::Sglang,
        "sglang:e2e_request_latency_seconds",
        Metric::E2e,
    ),
    (Source::Sglang, "sglang:queue_time_seconds", Metric::Queue),
    (Source::Tgi, "tgi_request_duration", Metric::E2e),
    (Source::Tgi, "tgi_request_queue_duration", Metric::Queue),
];

/// Label names that carry the model.
const MODEL_LABELS: [&str; 2] = ["model_name", "model"];
/// Models kept per scrape; the rest are dropped (a server serves a handful).
pub const MAX_MODELS: usize = 8;

fn family_of(sample_name: &str) -> Option<(usize, &'static str)> {
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(base) = sample_name.strip_suffix(suffix) {
            if let Some(i) = FAMILIES.iter().position(|f| f.1 == base) {
                return Some((i, suffix));
            }
        }
    }
    None
}

/// For `expo::parse`: is this sample one of ours?
pub fn wanted(sample_name: &str) -> bool {
    family_of(sample_name).is_some()
}

/// What one scrape says, per (metric, model): the histogram summed over every other label
/// (vLLM's `engine`, SGLang's `dp_rank`, …), as `sum by (le, model)` would.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    pub source: Source,
    pub hists: BTreeMap<(Metric, String), Hist>,
}

/// Picks the known families out of `samples`. With families of several servers (unlikely)
/// the one with the most histograms wins. None: no known histogram.
pub fn extract(samples: &[Sample]) -> Option<ServerView> {
    // (family index, model) → (le → count summed over other labels), count, sum
    type Acc = (BTreeMap<u64, (f64, f64)>, f64, f64);
    let mut acc: BTreeMap<(usize, String), Acc> = BTreeMap::new();
    let mut models: Vec<String> = Vec::new();
    for s in samples {
        let Some((fi, suffix)) = family_of(&s.name) else {
            continue;
        };
        let model = s
            .labels
            .iter()
            .find(|(k, _)| MODEL_LABELS.contains(&k.as_str()))
            .map(|(_, v)| super::cap_label(v))
            .unwrap_or_default();
        if !models.contains(&model) {
            if models.len() >= MAX_MODELS {
                continue;
            }
            models.push(model.clone());
        }
        if !s.value.is_finite() && suffix != "_sum" {
            continue;
        }
        let e = acc.entry((fi, model)).or_default();
        match suffix {
            "_bucket" => {
                let Some(le) = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .and_then(|(_, v)| super::expo::parse_value(v))
                    .filter(|le| !le.is_nan())
                else {
                    continue;
                };
                if e.0.len() >= super::hist::MAX_BUCKETS && !e.0.contains_key(&le.to_bits()) {
                    continue;
                }
                let b = e.0.entry(le.to_bits()).or_insert((le, 0.0));
                b.1 += s.value;
            }
            "_count" => e.1 += s.value,
            _ => e.2 += s.value,
        }
    }
    let mut per_source: BTreeMap<Source, BTreeMap<(Metric, String), Hist>> = BTreeMap::new();
    for ((fi, model), (buckets, count, sum)) in acc {
        let (source, _, metric) = FAMILIES[fi];
        let b: Vec<(f64, f64)> = buckets.into_values().collect();
        if let Some(h) = Hist::from_buckets(b, Some(count), Some(sum)) {
            per_source
                .entry(source)
                .or_default()
                .insert((metric, model), h);
        }
    }
    let (source, hists) = per_source.into_iter().max_by_key(|(_, h)| h.len())?;
    Some(ServerView { source, hists })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crosscheck::expo;

    #[test]
    fn vllm_histograms_summed_over_engines() {
        let text = r#"# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.5
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.5",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 1.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_created{engine="0",model_name="m"} 1.7e9
vllm:num_requests_running{engine="0",model_name="m"} 0.0
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 0.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 0.0
"#;
        let p = expo::parse(text, wanted);
        assert_eq!(p.bad_lines, 0);
        let v = extract(&p.samples).unwrap();
        assert_eq!(v.source, Source::Vllm);
        let t = &v.hists[&(Metric::Ttft, "m".to_string())];
        assert_eq!(t.cum, vec![1.0, 4.0, 4.0]);
        assert_eq!((t.count, t.sum), (4.0, 1.5));
        assert!(v.hists.contains_key(&(Metric::E2e, "m".to_string())));
        assert!(!v.hists.contains_key(&(Metric::Queue, "m".to_string())));
    }

    #[test]
    fn tgi_has_no_model_and_no_ttft() {
        let text = "tgi_request_duration_bucket{le=\"0.5\"} 2\ntgi_request_duration_bucket{le=\"+Inf\"} 2\n\
            tgi_request_duration_sum 0.6\ntgi_request_duration_count 2\n\
            tgi_request_queue_duration_bucket{le=\"0.01\"} 2\ntgi_request_queue_duration_bucket{le=\"+Inf\"} 2\n";
        let v = extract(&expo::parse(text, wanted).samples).unwrap();
        assert_eq!(v.source, Source::Tgi);
        assert_eq!(v.hists.len(), 2);
        assert!(v.hists.contains_key(&(Metric::E2e, String::new())));
    }

    #[test]
    fn nothing_known_or_no_inf_bucket_is_none() {
        assert!(extract(&expo::parse("foo_bucket{le=\"1\"} 1\n", wanted).samples).is_none());
        let no_inf =
            "sglang:queue_time_seconds_bucket{le=\"1\"} 1\nsglang:queue_time_seconds_count 1\n";
        assert!(extract(&expo::parse(no_inf, wanted).samples).is_none());
    }

    #[test]
    fn models_are_capped() {
        let mut text = String::new();
        for m in 0..(MAX_MODELS + 3) {
            text.push_str(&format!(
                "vllm:e2e_request_latency_seconds_bucket{{model_name=\"m{m}\",le=\"+Inf\"}} 1\n\
                 vllm:e2e_request_latency_seconds_bucket{{model_name=\"m{m}\",le=\"1\"}} 1\n"
            ));
        }
        let v = extract(&expo::parse(&text, wanted).samples).unwrap();
        assert_eq!(v.hists.len(), MAX_MODELS);
    }
}
