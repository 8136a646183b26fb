//! `GET /metrics` of the synthetic server (`--metrics vllm`): the latency histograms vLLM
//! exposes, with vLLM's names, labels and bucket boundaries (`vllm/v1/metrics/loggers.py`,
//! `PrometheusStatLogger`), in the text format `prometheus_client` writes, filled with what
//! this server measured of each request on its own clock, as vLLM does: TTFT when the first
//! token goes out, E2E and queue time when the request finishes.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::Mutex;

/// What `GET /metrics` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MetricsFormat {
    /// No metrics: 404, like a server that exposes none.
    #[default]
    None,
    /// vLLM's latency histograms.
    Vllm,
    /// 200 with bytes that are not a Prometheus exposition (for scrapers' error paths).
    Garbage,
}

/// `vllm:time_to_first_token_seconds` buckets.
pub const VLLM_TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// `request_latency_buckets`: `vllm:e2e_request_latency_seconds`,
/// `vllm:request_queue_time_seconds` and the other per-phase request histograms.
pub const VLLM_REQUEST_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

struct Hist {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Hist {
    fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Hist {
        Hist {
            name,
            help,
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        // prometheus_client: the first bucket whose bound is >= v (le is inclusive).
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// As prometheus_client writes a labelled histogram: labels in declaration order
    /// (`model_name`, `engine`) then `le`; floats with a decimal point; a `_created` gauge.
    fn render(&self, out: &mut String, model: &str, created: f64) {
        let l = format!("model_name=\"{}\",engine=\"0\"", escape(model));
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        let _ = writeln!(out, "{}_sum{{{l}}} {}", self.name, float(self.sum));
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(
                out,
                "{}_bucket{{{l},le=\"{}\"}} {}",
                self.name,
                float(*b),
                float(cum as f64)
            );
        }
        let _ = writeln!(
            out,
            "{}_bucket{{{l},le=\"+Inf\"}} {}",
            self.name,
            float(self.count as f64)
        );
        let _ = writeln!(
            out,
            "{}_count{{{l}}} {}",
            self.name,
            float(self.count as f64)
        );
        let _ = writeln!(out, "# HELP {}_created {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {}_created gauge", self.name);
        let _ = writeln!(out, "{}_created{{{l}}} {}", self.name, float(created));
    }
}

/// Python's `repr(float)`: integral values keep a `.0`.
fn float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct State {
    ttft: Hist,
    e2e: Hist,
    queue: Hist,
    success: u64,
}

/// The server's metrics (one served model, one engine, as `vllm serve` has by default).
pub struct VllmMetrics {
    model: String,
    created: f64,
    state: Mutex<State>,
}

impl VllmMetrics {
    pub fn new(model: &str) -> VllmMetrics {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        VllmMetrics {
            model: model.to_string(),
            created,
            state: Mutex::new(State {
                ttft: Hist::new(
                    "vllm:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    &VLLM_TTFT_BUCKETS,
                ),
                e2e: Hist::new(
                    "vllm:e2e_request_latency_seconds",
                    "Histogram of e2e request latency in seconds.",
                    &VLLM_REQUEST_BUCKETS,
                ),
                queue: Hist::new(
                    "vllm:request_queue_time_seconds",
                    "Histogram of time spent in WAITING phase for request.",
                    &VLLM_REQUEST_BUCKETS,
                ),
                success: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first token went out `secs` after the request arrived.
    pub fn observe_ttft(&self, secs: f64) {
        self.lock().ttft.observe(secs);
    }

    /// A request finished: its end-to-end latency and the time it waited for a slot.
    pub fn observe_finished(&self, e2e_secs: f64, queue_secs: f64) {
        let mut s = self.lock();
        s.e2e.observe(e2e_secs);
        s.queue.observe(queue_secs);
        s.success += 1;
    }

    pub fn render(&self) -> String {
        let s = self.lock();
        let mut out = String::with_capacity(8 * 1024);
        let l = format!("model_name=\"{}\",engine=\"0\"", escape(&self.model));
        out.push_str(
            "# HELP vllm:request_success_total Count of successfully processed requests.\n",
        );
        out.push_str("# TYPE vllm:request_success_total counter\n");
        let _ = writeln!(
            out,
            "vllm:request_success_total{{{l},finished_reason=\"length\"}} {}",
            float(s.success as f64)
        );
        for h in [&s.ttft, &s.e2e, &s.queue] {
            h.render(&mut out, &self.model, self.created);
        }
        out
    }
}

/// What `--metrics garbage` serves: bytes no exposition parser accepts.
pub fn garbage() -> Vec<u8> {
    let mut v =
        b"vllm:time_to_first_token_seconds_bucket{le=\"0.1\" 3\n{{{ \x00\xff\xfe\n".to_vec();
    v.extend((0..2048u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_prometheus_client() {
        let m = VllmMetrics::new("my \"model\"");
        m.observe_ttft(0.3);
        m.observe_ttft(0.25);
        m.observe_finished(0.4, 0.31);
        let t = m.render();
        assert!(t.contains("# TYPE vllm:time_to_first_token_seconds histogram\n"));
        assert!(t.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"my \\\"model\\\"\",engine=\"0\",le=\"0.25\"} 1.0\n"
        ), "{t}");
        assert!(t.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"my \\\"model\\\"\",engine=\"0\",le=\"0.5\"} 2.0\n"
        ));
        assert!(t.contains("vllm:time_to_first_token_seconds_count{model_name=\"my \\\"model\\\"\",engine=\"0\"} 2.0\n"));
        assert!(t.contains("vllm:e2e_request_latency_seconds_bucket{model_name=\"my \\\"model\\\"\",engine=\"0\",le=\"0.3\"} 0.0\n"));
        assert!(t.contains("vllm:request_queue_time_seconds_bucket{model_name=\"my \\\"model\\\"\",engine=\"0\",le=\"+Inf\"} 1.0\n"));
        assert!(t.contains("vllm:request_queue_time_seconds_sum{model_name=\"my \\\"model\\\"\",engine=\"0\"} 0.31\n"));
        assert_eq!(float(2.0), "2.0");
        assert_eq!(float(0.001), "0.001");
    }
}
