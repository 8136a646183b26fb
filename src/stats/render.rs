//! `/metrics` rendering of the request metrics an `Aggregator` holds.

use super::prom::{self, write_f64, write_header, write_u64};
use super::window::STAGE0;
use super::{Aggregator, Series, HEADLINE, QUANTILES, RUNQ_STAGES, STATUS_CLASSES, WINDOWS};
use crate::record::Stage;

/// `name{labels` — callers append further labels, then `close`.
fn open(out: &mut String, name: &str, labels: &str) {
    out.push_str(name);
    out.push('{');
    out.push_str(labels);
}

fn close_u64(out: &mut String, v: u64) {
    out.push_str("} ");
    write_u64(out, v);
    out.push('\n');
}

type Get = fn(&Series) -> Option<u64>;

/// Plain counters per label set; `None` means the value was never known, so no series.
const COUNTERS: [(&str, &str, Get); 4] = [
    (
        "llmslo_output_tokens_total",
        "Generated tokens (usage.completion_tokens, else content events), where known.",
        |s| s.output_tokens,
    ),
    (
        "llmslo_prompt_tokens_total",
        "Prompt tokens of requests whose response reported usage.",
        |s| s.prompt_tokens,
    ),
    (
        "llmslo_request_bytes_total",
        "Request bytes read by the server.",
        |s| Some(s.request_bytes),
    ),
    (
        "llmslo_response_bytes_total",
        "Response bytes written by the server.",
        |s| Some(s.response_bytes),
    ),
];

impl Aggregator {
    /// Prometheus text exposition (format 0.0.4) of all request metrics. Every family's
    /// HELP/TYPE is written even when it has no series yet.
    pub fn render(&mut self, now_s: u64, out: &mut String) {
        self.advance_all(now_s);

        let name = "llmslo_requests_total";
        write_header(
            out,
            name,
            "Finished requests by status class (aborted: closed before the response ended).",
            "counter",
        );
        for s in self.all_series() {
            for (class, &n) in STATUS_CLASSES.iter().zip(&s.requests) {
                if n > 0 {
                    open(out, name, &s.exposition);
                    out.push_str(",status_class=\"");
                    out.push_str(class);
                    out.push('"');
                    close_u64(out, n);
                }
            }
        }

        for (name, help, get) in COUNTERS {
            write_header(out, name, help, "counter");
            for s in self.all_series() {
                if let Some(v) = get(s) {
                    open(out, name, &s.exposition);
                    close_u64(out, v);
                }
            }
        }

        for (m, _, name, spec, help) in HEADLINE {
            write_header(out, name, help, "histogram");
            for s in self.all_series().filter(|s| s.hists[m].count() > 0) {
                s.hists[m].render(out, name, &s.exposition, spec);
            }
        }

        let name = "llmslo_stage_seconds";
        write_header(
            out,
            name,
            "Duration of each request stage that could be measured (DESIGN.md section 3).",
            "histogram",
        );
        let mut labels = String::new();
        for s in self.all_series() {
            let hs = Stage::ALL.map(|st| (&s.hists[STAGE0 + st as usize], st));
            render_by_stage(out, name, &mut labels, &s.exposition, hs);
        }

        let name = "llmslo_request_cpu_runqueue_wait_seconds";
        write_header(
            out,
            name,
            "Per request: time the server thread serving it waited on a CPU run queue during the stage (queue_prefill, decode, inference).",
            "histogram",
        );
        for s in self.all_series() {
            let hs = s.runq_hists.iter().zip(RUNQ_STAGES);
            render_by_stage(out, name, &mut labels, &s.exposition, hs);
        }

        // A summary, not a gauge: Prometheus' linter (promtool check metrics) rejects a
        // `quantile` label on anything else, and a sliding-window quantile is what a summary
        // is. No _sum/_count: the cumulative ones are the histograms' above.
        let name = "llmslo_latency_quantile_seconds";
        write_header(
            out,
            name,
            "Latency quantiles over a sliding window of 1m or 5m plus the current partial slot.",
            "summary",
        );
        for s in self.all_series() {
            for (m, metric, ..) in HEADLINE {
                for (w, (window, _)) in WINDOWS.iter().enumerate() {
                    let Some(values) = s.window.quantiles(w, m, QUANTILES.map(|q| q.1)) else {
                        continue;
                    };
                    for ((q, _), us) in QUANTILES.iter().zip(values) {
                        open(out, name, &s.exposition);
                        for (k, v) in [
                            (",metric=\"", metric),
                            ("\",quantile=\"", *q),
                            ("\",window=\"", *window),
                        ] {
                            out.push_str(k);
                            out.push_str(v);
                        }
                        out.push_str("\"} ");
                        write_f64(out, us as f64 / 1e6);
                        out.push('\n');
                    }
                }
            }
        }
    }
}

/// One series' per-stage histograms (those with observations) of family `name`, each with the
/// series' labels plus `stage="<name>"`; `labels` is a buffer reused between series.
fn render_by_stage<'a>(
    out: &mut String,
    name: &str,
    labels: &mut String,
    exposition: &str,
    hists: impl IntoIterator<Item = (&'a prom::FixedHist, Stage)>,
) {
    for (h, st) in hists {
        if h.count() > 0 {
            labels.clear();
            labels.push_str(exposition);
            labels.push_str(",stage=\"");
            labels.push_str(st.name());
            labels.push('"');
            h.render(out, name, labels, &prom::STAGE_BUCKETS);
        }
    }
}
