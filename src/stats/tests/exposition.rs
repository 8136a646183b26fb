//! Exposition checks: cumulative buckets, sums and counts, hostile label values, promtool.

use super::*;

#[test]
fn histograms_are_cumulative_with_right_sum_and_count() {
    let mut a = Aggregator::new(AggregatorConfig::default());
    a.record(&streaming(1, &[2, 3]), l1(), 50); // TTFT 1 ms (on the 0.001 bound), gaps 2, 3
    a.record(&streaming(3, &[]), l1(), 50);
    a.record(&streaming(2000, &[]), l1(), 50);
    let mut aborted = streaming(5, &[1]);
    aborted.aborted = true;
    aborted.finish(false);
    a.record(&aborted, l1(), 50);
    let text = render(&mut a, 50);
    let b = |m: &str, le: &str| {
        sample(
            &text,
            &format!("llmslo_{m}_seconds_bucket{{{L1},le=\"{le}\"}}"),
        )
    };
    assert_eq!(b("ttft", "0.001"), Some(1.0));
    assert_eq!(b("ttft", "0.0025"), Some(1.0));
    assert_eq!(b("ttft", "0.005"), Some(3.0), "3 ms and the aborted 5 ms");
    assert_eq!(b("ttft", "1.0"), Some(3.0));
    assert_eq!(b("ttft", "2.5"), Some(4.0));
    assert_eq!(b("ttft", "+Inf"), Some(4.0));
    let sum = sample(&text, &format!("llmslo_ttft_seconds_sum{{{L1}}}")).unwrap();
    assert!((sum - 2.009).abs() < 1e-12, "{sum}");
    assert_eq!(
        sample(&text, &format!("llmslo_ttft_seconds_count{{{L1}}}")),
        Some(4.0)
    );
    // ITL: gaps 2, 3 and the aborted request's 1.
    assert_eq!(b("itl", "0.001"), Some(1.0));
    assert_eq!(b("itl", "0.002"), Some(2.0));
    assert_eq!(
        sample(&text, &format!("llmslo_itl_seconds_count{{{L1}}}")),
        Some(3.0)
    );
    // E2E excludes the aborted request.
    assert_eq!(
        sample(&text, &format!("llmslo_e2e_seconds_count{{{L1}}}")),
        Some(3.0)
    );
    let e2e = sample(&text, &format!("llmslo_e2e_seconds_sum{{{L1}}}")).unwrap();
    assert!((e2e - (0.007 + 0.004 + 2.001)).abs() < 1e-12, "{e2e}");
    let st = |s: &str| format!("llmslo_stage_seconds_count{{{L1},stage=\"{s}\"}}");
    assert_eq!(sample(&text, &st("request_read")), Some(4.0));
    assert_eq!(sample(&text, &st("decode")), Some(4.0));
    assert_eq!(sample(&text, &st("load_balancing")), None);
    assert_eq!(
        sample(
            &text,
            &format!("llmslo_requests_total{{{L1},status_class=\"aborted\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, &format!("llmslo_request_bytes_total{{{L1}}}")),
        Some(400.0)
    );
    assert!(
        !text.contains("llmslo_output_tokens_total{"),
        "never known: no series"
    );
    // Every _bucket run is non-decreasing and ends at _count.
    let mut last = 0.0;
    for l in text.lines().filter(|l| l.contains("_bucket{")) {
        let v: f64 = l.rsplit_once(' ').unwrap().1.parse().unwrap();
        if l.contains("le=\"+Inf\"") {
            last = 0.0;
        } else {
            assert!(v >= last, "{l}");
            last = v;
        }
    }
    no_duplicate_series(&text);
    promtool_check(&text);
}

#[test]
fn hostile_label_values_are_capped_and_escaped() {
    let model = format!("a\"b\\c\nd}}{{,x=\"y\"{}", "z".repeat(10 * 1024));
    let mut a = Aggregator::new(AggregatorConfig::default());
    let mut r = streaming(10, &[1, 1]);
    r.output_tokens = Some(3);
    r.prompt_tokens = Some(7);
    a.record(&r, labels("", "", &model, &route_of(Some("/\"x"))), 10);
    a.record(
        &streaming(10, &[]),
        labels("ns", "p", &"é".repeat(300), "r"),
        10,
    );
    let text = render(&mut a, 10);
    let capped: String = model.chars().take(MAX_LABEL_CHARS).collect();
    let mut escaped = String::new();
    escape_label_value(&mut escaped, &capped);
    let labels = format!("namespace=\"\",pod=\"\",model=\"{escaped}\",route=\"other\"");
    let want = format!("llmslo_output_tokens_total{{{labels}}} 3");
    assert!(text.lines().any(|l| l == want), "{want}");
    assert!(text.contains(&format!("model=\"{}\"", "é".repeat(MAX_LABEL_CHARS))));
    assert!(text.lines().all(|l| l.len() < 1200), "no 10 KB lines");
    no_duplicate_series(&text);
    promtool_check(&text);
}

#[test]
fn helper_output_passes_promtool() {
    let mut out = String::new();
    write_counter(
        &mut out,
        "llmslo_agent_events_lost_total",
        "Events the BPF side could not deliver.",
        &[
            (&[("program", "l7"), ("reason", "ringbuf \"full\"\n")], 3.0),
            (&[("program", "tcp"), ("reason", "")], 0.0),
        ],
    );
    write_gauge(
        &mut out,
        "llmslo_agent_targets",
        "Processes traced.",
        &[(&[], 4.0)],
    );
    promtool_check(&out);
}
