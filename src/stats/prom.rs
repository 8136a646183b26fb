//! Prometheus text exposition (format 0.0.4): escaping, number formatting, family headers,
//! the helpers the agent uses for its own health metrics, and the fixed-bucket histograms
//! behind the request `_bucket` series.

use std::fmt::Write;

/// Appends `v` escaped for use inside a quoted label value.
pub fn escape_label_value(out: &mut String, v: &str) {
    // Scanning once and copying clean runs keeps the common (clean) case a single memcpy.
    let mut start = 0;
    for (i, b) in v.bytes().enumerate() {
        let esc = match b {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            b'\n' => "\\n",
            _ => continue,
        };
        out.push_str(&v[start..i]);
        out.push_str(esc);
        start = i + 1;
    }
    out.push_str(&v[start..]);
}

/// HELP text escapes only backslash and newline (format 0.0.4).
fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Writes a sample value the way Prometheus parses it (`+Inf`, `-Inf`, `NaN`).
pub fn write_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

pub(crate) fn write_u64(out: &mut String, v: u64) {
    let _ = write!(out, "{v}");
}

/// `# HELP` and `# TYPE` for one family; `kind` is counter, gauge, histogram, summary or untyped.
pub fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    escape_help(out, help);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

/// One sample line. Label names must be valid Prometheus names; values are escaped here.
pub fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    write_f64(out, value);
    out.push('\n');
}

/// A counter family: headers once, then one line per sample.
/// `write_counter(&mut out, "llmslo_agent_lost_total", "Events lost.", &[(&[("cpu", "0")], 3.0)])`
pub fn write_counter(out: &mut String, name: &str, help: &str, samples: &[(&[(&str, &str)], f64)]) {
    write_family(out, name, help, "counter", samples);
}

/// A counter family with one label, one sample per (label value, count).
pub fn write_counter_by<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, f64)>,
) {
    let labelled: Vec<([(&str, &str); 1], f64)> = samples
        .into_iter()
        .map(|(v, n)| ([(label, v)], n))
        .collect();
    let rows: Vec<(&[(&str, &str)], f64)> = labelled.iter().map(|(l, n)| (&l[..], *n)).collect();
    write_counter(out, name, help, &rows);
}

/// A gauge family: headers once, then one line per sample.
pub fn write_gauge(out: &mut String, name: &str, help: &str, samples: &[(&[(&str, &str)], f64)]) {
    write_family(out, name, help, "gauge", samples);
}

pub(crate) fn write_family(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    samples: &[(&[(&str, &str)], f64)],
) {
    write_header(out, name, help, kind);
    for (labels, v) in samples {
        write_sample(out, name, labels, *v);
    }
}

/// Upper bounds (seconds) of a fixed-bucket histogram, with their `le` spellings precomputed
/// so rendering formats no floats for them.
pub(crate) struct BucketSpec {
    pub le: &'static [f64],
    pub le_str: &'static [&'static str],
}

macro_rules! bucket_spec {
    ($($b:literal),* $(,)?) => {
        BucketSpec { le: &[$($b),*], le_str: &[$(stringify!($b)),*] }
    };
}

/// Time to first token: 1 ms up to the multi-minute prefills of long prompts under load.
pub(crate) static TTFT_BUCKETS: BucketSpec = bucket_spec!(
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0, 20.0, 40.0, 80.0, 160.0, 320.0
);
/// Inter-token gaps and TPOT: sub-millisecond decode steps up to multi-second stalls.
pub(crate) static ITL_BUCKETS: BucketSpec = bucket_spec!(
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0
);
/// Whole requests: a short completion up to a 20-minute generation.
pub(crate) static E2E_BUCKETS: BucketSpec = bucket_spec!(
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
    120.0, 180.0, 240.0, 300.0, 600.0, 1200.0
);
/// Stages range from tens of microseconds (network hops) to minutes (decode).
pub(crate) static STAGE_BUCKETS: BucketSpec = bucket_spec!(
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
);

/// The largest spec plus its `+Inf` bucket; fixed size so a histogram never allocates.
const MAX_BUCKETS: usize = 24;

/// A Prometheus histogram with fixed buckets. Counts are per bucket (not cumulative) so an
/// observation touches one counter; rendering accumulates.
#[derive(Clone)]
pub(crate) struct FixedHist {
    counts: [u64; MAX_BUCKETS],
    count: u64,
    /// Exact nanoseconds: u128 so years of summed latency cannot wrap.
    sum_ns: u128,
}

impl Default for FixedHist {
    fn default() -> Self {
        FixedHist {
            counts: [0; MAX_BUCKETS],
            count: 0,
            sum_ns: 0,
        }
    }
}

impl FixedHist {
    pub fn observe(&mut self, spec: &BucketSpec, ns: u64) {
        debug_assert!(spec.le.len() < MAX_BUCKETS);
        let secs = ns as f64 / 1e9;
        // First bound >= value: Prometheus buckets are inclusive upper bounds.
        let i = spec.le.partition_point(|&b| b < secs);
        self.counts[i] += 1;
        self.count += 1;
        self.sum_ns += ns as u128;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Writes `_bucket` (cumulative, ending with `+Inf`), `_sum` and `_count` lines.
    /// `labels` is the pre-escaped label list without braces (never empty here).
    pub fn render(&self, out: &mut String, name: &str, labels: &str, spec: &BucketSpec) {
        let mut cum = 0;
        for i in 0..=spec.le.len() {
            cum += self.counts[i];
            out.push_str(name);
            out.push_str("_bucket{");
            out.push_str(labels);
            out.push_str(",le=\"");
            out.push_str(spec.le_str.get(i).copied().unwrap_or("+Inf"));
            out.push_str("\"} ");
            write_u64(out, cum);
            out.push('\n');
        }
        out.push_str(name);
        out.push_str("_sum{");
        out.push_str(labels);
        out.push_str("} ");
        write_f64(out, self.sum_ns as f64 / 1e9);
        out.push('\n');
        out.push_str(name);
        out.push_str("_count{");
        out.push_str(labels);
        out.push_str("} ");
        write_u64(out, self.count);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values_and_help() {
        let mut s = String::new();
        escape_label_value(&mut s, "a\\b\"c\nd");
        assert_eq!(s, r#"a\\b\"c\nd"#);
        let mut h = String::new();
        write_header(&mut h, "x_total", "line\\one\ntwo \"q\"", "counter");
        assert_eq!(
            h,
            "# HELP x_total line\\\\one\\ntwo \"q\"\n# TYPE x_total counter\n"
        );
    }

    #[test]
    fn specs_are_sorted_and_spelled_like_their_values() {
        for spec in [&TTFT_BUCKETS, &ITL_BUCKETS, &E2E_BUCKETS, &STAGE_BUCKETS] {
            assert!(spec.le.len() < MAX_BUCKETS);
            assert!(spec.le.windows(2).all(|w| w[0] < w[1]));
            for (v, s) in spec.le.iter().zip(spec.le_str) {
                assert_eq!(s.parse::<f64>().unwrap(), *v);
            }
        }
    }

    #[test]
    fn helper_families() {
        let mut out = String::new();
        write_counter(
            &mut out,
            "llmslo_agent_lost_total",
            "Events lost.",
            &[(&[("cpu", "0"), ("why", "a\"b")], 3.0), (&[], 1.0)],
        );
        write_gauge(&mut out, "llmslo_agent_up", "Up.", &[(&[], f64::INFINITY)]);
        assert_eq!(
            out,
            "# HELP llmslo_agent_lost_total Events lost.\n# TYPE llmslo_agent_lost_total counter\n\
             llmslo_agent_lost_total{cpu=\"0\",why=\"a\\\"b\"} 3\nllmslo_agent_lost_total 1\n\
             # HELP llmslo_agent_up Up.\n# TYPE llmslo_agent_up gauge\nllmslo_agent_up +Inf\n"
        );
    }
}
