//! Worked examples for the aggregator: quantiles, windows, label caps, routes; shared helpers
//! for the exposition and breakdown tests in the submodules.

use super::*;
use crate::record::{RequestRecord, Ts};
use serde_json::json;
use std::io::Write as _;
use std::process::{Command, Stdio};

mod breakdown;
mod exposition;

const MS: u64 = 1_000_000;

fn rec(pairs: &[(Ts, u64)], tokens: &[u64], status: u16) -> RequestRecord {
    let mut r = RequestRecord {
        streaming: !tokens.is_empty(),
        token_ns: tokens.to_vec().into(),
        status: Some(status),
        request_bytes: 100,
        response_bytes: 1000,
        ..Default::default()
    };
    for &(t, v) in pairs {
        r.timestamps.set(t, v);
    }
    if let (Some(&a), Some(&b)) = (tokens.first(), tokens.last()) {
        r.timestamps.set(Ts::Token1, a);
        r.timestamps.set(Ts::TokenN, b);
    }
    r.finish(false);
    r
}

/// A streaming request: read at 0, read done at 1 ms, tokens at `ttft_ms` then `gaps_ms`
/// apart, last byte 1 ms after the last token.
fn streaming(ttft_ms: u64, gaps_ms: &[u64]) -> RequestRecord {
    let mut t = ttft_ms * MS;
    let mut tokens = vec![t];
    for g in gaps_ms {
        t += g * MS;
        tokens.push(t);
    }
    let pairs = [
        (Ts::ReadFirst, 0),
        (Ts::ReadDone, MS),
        (Ts::RespLast, t + MS),
    ];
    rec(&pairs, &tokens, 200)
}

fn labels(ns: &str, pod: &str, model: &str, route: &str) -> Labels {
    Labels {
        namespace: ns.into(),
        pod: pod.into(),
        model: model.into(),
        route: route.into(),
        ..Default::default()
    }
}

fn l1() -> Labels {
    labels("ns", "pod-0", "m1", "/v1/chat/completions")
}

const L1: &str = r#"namespace="ns",pod="pod-0",model="m1",route="/v1/chat/completions""#;

fn render(a: &mut Aggregator, now: u64) -> String {
    let mut out = String::new();
    a.render(now, &mut out);
    out
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .map(|(_, v)| v.parse().unwrap())
}

fn quantile(text: &str, labels: &str, metric: &str, q: &str, window: &str) -> Option<f64> {
    let extra = format!("metric=\"{metric}\",quantile=\"{q}\",window=\"{window}\"");
    sample(
        text,
        &format!("llmslo_latency_quantile_seconds{{{labels},{extra}}}"),
    )
}

/// Runs `promtool check metrics`; skipped (with a note) where promtool is not installed.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("promtool not available ({e}); skipping exposition check");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn no_duplicate_series(text: &str) {
    let mut seen = std::collections::HashSet::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let series = l.rsplit_once(' ').unwrap().0;
        assert!(seen.insert(series), "duplicate series {series}");
    }
}

#[test]
fn quantiles_from_known_samples() {
    let mut a = Aggregator::new(AggregatorConfig::default());
    for i in 1..=1000 {
        a.record(&streaming(i, &[]), l1(), 1000);
    }
    let text = render(&mut a, 1000);
    for w in ["1m", "5m"] {
        let p50 = quantile(&text, L1, "ttft", "0.5", w).unwrap();
        let p99 = quantile(&text, L1, "ttft", "0.99", w).unwrap();
        assert!((p50 - 0.5).abs() <= 0.5 * 0.01, "p50 {p50}");
        assert!((p99 - 0.99).abs() <= 0.99 * 0.01, "p99 {p99}");
    }
    let b = a.breakdown(1000, 300, &[]);
    let t = &b["groups"][0]["metrics"]["ttft_ms"];
    assert!((t["p50"].as_f64().unwrap() - 500.0).abs() <= 5.0);
    assert!((t["p95"].as_f64().unwrap() - 950.0).abs() <= 9.5);
    assert!(
        (t["mean"].as_f64().unwrap() - 500.5).abs() < 1e-9,
        "mean is exact"
    );
    assert_eq!(t["count"], 1000);
    // Single-token responses: no ITL, no TPOT, so no such quantile series.
    assert_eq!(quantile(&text, L1, "itl", "0.5", "1m"), None);
    assert!(!text.contains("llmslo_tpot_seconds_count"));
}

#[test]
fn window_edges_and_slot_reuse() {
    let mut a = Aggregator::new(AggregatorConfig::default());
    // now = 1000 is a slot start; 939 is 61 s before it, in slot 93 (1m keeps 94..=100).
    a.record(&streaming(100, &[]), l1(), 939);
    a.record(&streaming(200, &[]), l1(), 1000);
    let text = render(&mut a, 1000);
    let p = |w| quantile(&text, L1, "ttft", "0.5", w).unwrap();
    let q = |w| quantile(&text, L1, "ttft", "0.99", w).unwrap();
    assert!((p("1m") - 0.2).abs() < 0.002, "only the new sample in 1m");
    assert!((p("5m") - 0.1).abs() < 0.001 && (q("5m") - 0.2).abs() < 0.002);
    let counts =
        |a: &mut Aggregator, now, w| a.breakdown(now, w, &[])["groups"][0]["count"].clone();
    assert_eq!(counts(&mut a, 1000, 60), 1);
    assert_eq!(counts(&mut a, 1000, 300), 2);
    assert_eq!(
        counts(&mut a, 1000, 20),
        1,
        "custom window merges slots 98..=100"
    );
    assert_eq!(counts(&mut a, 1000, 70), 2, "70 s reaches slot 93");
    // 5m keeps slots 70..=100 at now=1009, so 939 (slot 93) survives until now=1240.
    assert_eq!(counts(&mut a, 1239, 300), 2);
    assert_eq!(counts(&mut a, 1240, 300), 1);
    let text = render(&mut a, 1240);
    assert_eq!(
        quantile(&text, L1, "ttft", "0.5", "1m"),
        None,
        "no samples: no series"
    );
    assert!(quantile(&text, L1, "ttft", "0.5", "5m").is_some());
    // Cumulative histograms keep everything.
    assert_eq!(
        sample(&text, &format!("llmslo_ttft_seconds_count{{{L1}}}")),
        Some(2.0)
    );

    // Ring position 0 holds slot 0, then slot 31: the old data must be gone.
    let mut a = Aggregator::new(AggregatorConfig::default());
    a.record(&streaming(900, &[]), l1(), 5);
    a.record(&streaming(10, &[]), l1(), 315);
    let b = a.breakdown(315, 300, &[]);
    assert_eq!(b["groups"][0]["count"], 1);
    assert!(
        b["groups"][0]["metrics"]["ttft_ms"]["p99"]
            .as_f64()
            .unwrap()
            < 11.0
    );
}

#[test]
fn label_cap_overflows_to_other() {
    let cfg = AggregatorConfig {
        max_label_sets: 3,
        ..Default::default()
    };
    let mut a = Aggregator::new(cfg);
    for i in 0..5 {
        a.record(
            &streaming(10, &[]),
            labels("ns", &format!("p{i}"), "m", "r"),
            100,
        );
    }
    a.record(&streaming(10, &[]), labels("ns", "p0", "m", "r"), 100);
    assert_eq!(a.label_sets(), 3);
    assert_eq!(a.overflow_records(), 2);
    let text = render(&mut a, 100);
    let other = r#"namespace="other",pod="other",model="other",route="other""#;
    let req = |l: &str| {
        sample(
            &text,
            &format!("llmslo_requests_total{{{l},status_class=\"2xx\"}}"),
        )
    };
    assert_eq!(req(other), Some(2.0));
    assert_eq!(
        req(r#"namespace="ns",pod="p0",model="m",route="r""#),
        Some(2.0)
    );
    assert!(!text.contains("pod=\"p4\""));
    // A real set spelled like the overflow set must not become a duplicate series.
    a.record(&streaming(10, &[]), Labels::overflow(), 100);
    let text = render(&mut a, 100);
    assert_eq!(
        sample(
            &text,
            &format!("llmslo_requests_total{{{other},status_class=\"2xx\"}}")
        ),
        Some(3.0)
    );
    no_duplicate_series(&text);
    promtool_check(&text);
}

#[test]
fn forget_pod_removes_its_series() {
    let cfg = AggregatorConfig {
        max_label_sets: 2,
        ..Default::default()
    };
    let mut a = Aggregator::new(cfg);
    a.record(&streaming(10, &[5]), labels("ns", "gone", "m", "r1"), 100);
    a.record(&streaming(10, &[5]), labels("ns", "gone", "m", "r2"), 100);
    a.record(&streaming(10, &[5]), labels("ns2", "gone", "m", "r1"), 100);
    assert_eq!(a.overflow_records(), 1);
    a.forget_pod("ns", "gone");
    assert_eq!(a.label_sets(), 0);
    let text = render(&mut a, 100);
    assert!(!text.contains("pod=\"gone\""));
    a.record(&streaming(10, &[5]), labels("ns2", "gone", "m", "r1"), 100);
    assert_eq!(a.label_sets(), 1, "room again after forgetting");
    assert_eq!(
        a.breakdown(100, 300, &["pod"])["groups"][0]["key"]["pod"],
        "gone"
    );
}

#[test]
fn route_normalisation() {
    for (p, want) in [
        (Some("/v1/chat/completions"), "/v1/chat/completions"),
        (Some("/v1/completions?stream=true"), "/v1/completions"),
        (Some("/v1/embeddings"), "/v1/embeddings"),
        (Some("/v1/responses"), "/v1/responses"),
        (Some("/generate"), "/generate"),
        (Some("/generate_stream"), "/generate_stream"),
        (Some("/api/generate"), "/api/generate"),
        (Some("/api/chat"), "/api/chat"),
        (Some("/completion"), "/completion"),
        (Some("/v1/models"), "/v1/models"),
        (
            Some("/v2/models/llama-3/generate"),
            "/v2/models/:model/generate",
        ),
        (
            Some("/v2/models/ensemble/generate_stream"),
            "/v2/models/:model/generate_stream",
        ),
        (
            Some("/v2/models/m/versions/2/generate"),
            "/v2/models/:model/versions/:version/generate",
        ),
        (
            Some("http://svc:8000/v1/chat/completions"),
            "/v1/chat/completions",
        ),
        (Some("/v2/models//generate"), "other"),
        (Some("/v2/models/m/infer"), "other"),
        (Some("/v1/chat/completions/x"), "other"),
        (Some("/V1/CHAT/COMPLETIONS"), "other"),
        (Some("/admin/secret-token-123"), "other"),
        (Some(""), "other"),
        (None, "unknown"),
    ] {
        assert_eq!(route_of(p), want, "{p:?}");
    }
}

#[test]
fn aggregator_can_move_between_threads() {
    fn send<T: Send + 'static>() {}
    send::<Aggregator>();
}

#[test]
fn container_node_and_pod_labels_are_exported_when_known() {
    let mut a = Aggregator::new(AggregatorConfig {
        pod_labels: vec!["app.kubernetes.io/name".into(), "team".into()],
        ..Default::default()
    });
    let mut l = l1();
    l.container = "vllm".into();
    l.node = "node-a".into();
    l.pod_labels = vec!["chat".into(), String::new()];
    a.record(&streaming(100, &[10]), l, 1_000);
    a.record(&streaming(100, &[10]), l1(), 1_000);
    let mut out = String::new();
    a.render(1_000, &mut out);
    assert!(out.contains(
        "llmslo_requests_total{namespace=\"ns\",pod=\"pod-0\",model=\"m1\",\
         route=\"/v1/chat/completions\",container=\"vllm\",node=\"node-a\",label_app_kubernetes_io_name=\"chat\",\
         status_class=\"2xx\"} 1"
    ), "{out}");
    // Unknown values (and the label the pod lacks) are left out, not exported empty.
    assert!(out.contains(
        "llmslo_requests_total{namespace=\"ns\",pod=\"pod-0\",model=\"m1\",route=\"/v1/chat/completions\",status_class=\"2xx\"} 1"
    ), "{out}");
    assert_eq!(a.label_sets(), 2);
    assert_eq!(a.pods().len(), 1);
}
