//! The SLO math against worked examples: budget, burn rates, alert pairs, window edges,
//! config validation and both views.

use super::report::{budget_remaining, burn_rate};
use super::tests_sli::{plain, stream};
use super::window::{Counts, Ring, Tiers};
use super::*;
use serde_json::Value;

const T: u64 = 1_699_999_200; // a multiple of 3600: windows start on bucket edges

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn specs(yaml: &str) -> Vec<SloSpec> {
    serde_yaml::from_str(yaml).unwrap()
}

fn engine(yaml: &str) -> SloEngine {
    SloEngine::new(specs(yaml)).unwrap()
}

fn c(good: u64, total: u64) -> Counts {
    Counts { good, total }
}

/// One request per second from `from` for `secs`, every `bad_every`-th bad (0: none), against
/// an E2E ≤ 1 s SLO.
fn feed(e: &mut SloEngine, from: u64, secs: u64, bad_every: u64) {
    let (good, bad) = (plain(100, 200), plain(2000, 200));
    for i in 0..secs {
        let r = if bad_every > 0 && i % bad_every == bad_every - 1 {
            &bad
        } else {
            &good
        };
        e.observe(r, "/v1/completions", from + i);
    }
}

const E2E_999: &str = "- {name: e2e, objective: 0.999, window: 30d, sli: {type: latency, metric: e2e, threshold_ms: 1000}}";

fn slo0(e: &mut SloEngine, now: u64) -> Value {
    e.status(now)["slos"][0].clone()
}

fn firing(s: &Value, alert: &str) -> bool {
    let a = s["alerts"].as_array().unwrap();
    a.iter().find(|a| a["name"] == alert).unwrap()["firing"]
        .as_bool()
        .unwrap()
}

#[test]
fn error_budget_worked_example() {
    // 99 % over the window, 10 000 requests: 100 may be bad.
    assert!(close(budget_remaining(c(10_000, 10_000), 0.99), 1.0));
    assert!(close(budget_remaining(c(9_950, 10_000), 0.99), 0.5));
    assert!(close(budget_remaining(c(9_900, 10_000), 0.99), 0.0));
    assert!(
        close(budget_remaining(c(9_750, 10_000), 0.99), -1.5),
        "overspent"
    );
    assert_eq!(budget_remaining(c(0, 0), 0.99), 1.0, "nothing spent");
    // 1 - 0.99 is 0.010000000000000009 in binary; the budget ratio is taken as the decimal.
    assert_eq!(budget_remaining(c(9_750, 10_000), 0.99), -1.5);
    assert_eq!(burn_rate(c(975, 1_000), 0.99), Some(2.5));
}

#[test]
fn burn_rate_worked_example() {
    // 99.9 %: 1.44 % errors burn 14.4×, a 30-day budget gone in 50 h.
    assert!(close(burn_rate(c(9_856, 10_000), 0.999).unwrap(), 14.4));
    assert!(close(burn_rate(c(999, 1_000), 0.999).unwrap(), 1.0));
    assert!(close(burn_rate(c(0, 10), 0.9).unwrap(), 10.0), "all bad");
    assert_eq!(burn_rate(c(0, 0), 0.999), None);
}

#[test]
fn ring_window_edges() {
    let mut r = Ring::new(10, 30); // 5 min
    r.add(1000, false); // bucket [1000, 1010)
    r.advance(1299);
    assert_eq!(r.sum(30), c(0, 1), "299 s later: still in the 5m window");
    r.advance(1300);
    assert_eq!(r.sum(30), c(0, 0), "300 s after its bucket began: out");
    // The oldest bucket goes whole: a request late in it leaves after 291 s.
    let mut r = Ring::new(10, 30);
    r.add(1009, true);
    r.advance(1299);
    assert_eq!(r.sum(30), c(1, 1));
    r.advance(1300);
    assert_eq!(r.sum(30), c(0, 0));
}

#[test]
fn ring_clock_steps() {
    let mut r = Ring::new(10, 30);
    r.add(1000, true);
    r.add(995, false); // back one bucket: still held
    assert_eq!(r.sum(30), c(1, 2));
    r.add(600, false); // older than the ring: dropped
    r.add(700, false); // exactly one ring back would land in the newest bucket: dropped
    assert_eq!(r.sum(30), c(1, 2));
    r.add(1_000_000, true); // far ahead: the ring is cleared once
    assert_eq!(r.sum(30), c(1, 1));
}

#[test]
fn tiers_pick_the_finest_ring() {
    let t = Tiers::new(28 * 86_400);
    assert_eq!(t.precision_s(300), 10);
    assert_eq!(t.precision_s(3600), 10);
    assert_eq!(t.precision_s(7200), 60);
    assert_eq!(t.precision_s(86_400), 600);
    assert_eq!(t.precision_s(3 * 86_400), 600);
    assert_eq!(t.precision_s(28 * 86_400), 3600);
    // ~18 KiB fixed + 16 B per hour of window.
    assert_eq!(t.heap_bytes(), (360 + 360 + 432 + 672) * 16);
}

#[test]
fn long_window_edge_is_exact_to_the_hour() {
    let mut e = engine("- {name: a, objective: 0.99, window: 28d, sli: {type: availability}}");
    e.observe(&plain(10, 503), "x", T);
    let w = 28 * 86_400;
    let s = slo0(&mut e, T + w - 1);
    assert_eq!((s["total"].as_u64(), s["bad"].as_u64()), (Some(1), Some(1)));
    assert_eq!(s["window_precision_s"], 3600);
    assert_eq!(s["covered_s"], w - 1);
    let s = slo0(&mut e, T + w);
    assert_eq!(s["total"], 0);
    assert_eq!(s["compliance"], Value::Null);
    assert_eq!(s["error_budget_remaining"], 1.0);
    assert_eq!(s["since_start"]["bad"], 1, "the counter keeps it");
    // Short windows let go long before.
    let s = slo0(&mut e, T + 3 * 86_400);
    assert_eq!(s["burn_rates"]["3d"], Value::Null);
}

#[test]
fn compliance_and_burn_over_windows() {
    let mut e = engine(E2E_999);
    // 6 h clean, then 1 h with every 50th request bad (2 %).
    feed(&mut e, T, 6 * 3600, 0);
    feed(&mut e, T + 6 * 3600, 3600, 50);
    let s = slo0(&mut e, T + 7 * 3600 - 1);
    assert_eq!(s["total"], 7 * 3600);
    assert_eq!(s["bad"], 72);
    assert!(close(
        s["compliance"].as_f64().unwrap(),
        1.0 - 72.0 / 25_200.0
    ));
    let b = &s["burn_rates"];
    let burn = |w: &str| b[w].as_f64().unwrap();
    assert!(close(burn("5m"), 20.0), "{b}");
    assert!(close(burn("1h"), 20.0));
    assert!(close(burn("2h"), 10.0));
    assert!(close(burn("6h"), 72.0 / 21_600.0 / 0.001));
    assert!(
        close(burn("1d"), 72.0 / 25_200.0 / 0.001),
        "only 7 h of data"
    );
    // 72 bad of 25.2 allowed: overspent.
    let rem = s["error_budget_remaining"].as_f64().unwrap();
    assert!(close(rem, 1.0 - 72.0 / 25.2), "{rem}");
    assert_eq!(s["covered_s"], 7 * 3600 - 1);
}

#[test]
fn page_fast_fires_on_both_windows_and_resets_with_the_short_one() {
    let mut e = engine(E2E_999);
    feed(&mut e, T, 2 * 3600, 0);
    let start = T + 2 * 3600;
    // 2 % errors (20×) for 10 min: the 5m window burns, the 1h window not yet (3.3×).
    feed(&mut e, start, 600, 50);
    let s = slo0(&mut e, start + 599);
    assert!(s["burn_rates"]["5m"].as_f64().unwrap() > 14.4);
    assert!(
        !firing(&s, "page_fast"),
        "1h burn {}",
        s["burn_rates"]["1h"]
    );
    // After 45 min: 1h burn 15×: page.
    feed(&mut e, start + 600, 2100, 50);
    let s = slo0(&mut e, start + 2699);
    assert!(close(s["burn_rates"]["1h"].as_f64().unwrap(), 15.0));
    assert!(firing(&s, "page_fast"));
    assert!(
        !firing(&s, "page_slow"),
        "6h burn {}",
        s["burn_rates"]["6h"]
    );
    // Errors stop: the 1h window still burns 15×, but 5 clean minutes end the page.
    feed(&mut e, start + 2700, 300, 0);
    let s = slo0(&mut e, start + 2999);
    assert!(s["burn_rates"]["1h"].as_f64().unwrap() > 14.4);
    assert!(!firing(&s, "page_fast"));
}

#[test]
fn slow_burn_tickets() {
    let mut e = engine(E2E_999);
    // 0.4 % errors (4×) for a day: ticket_fast (1d & 2h > 3×) and ticket_slow (> 1×), no page.
    feed(&mut e, T, 86_400, 250);
    let s = slo0(&mut e, T + 86_399);
    let fired: Vec<bool> = ["page_fast", "page_slow", "ticket_fast", "ticket_slow"]
        .iter()
        .map(|a| firing(&s, a))
        .collect();
    assert_eq!(fired, [false, false, true, true], "{}", s["burn_rates"]);
}

#[test]
fn alert_threshold_is_strict() {
    // Budget 1/32 so the arithmetic is exact: 45 bad of 100 burn exactly 14.4×.
    let yaml = "- {name: s, objective: 0.96875, window: 1d, sli: {type: availability}}";
    for (bad, fires) in [(45, false), (46, true)] {
        let mut e = engine(yaml);
        for i in 0..100 {
            let status = if i < bad { 500 } else { 200 };
            e.observe(&plain(1, status), "x", T + i);
        }
        let s = slo0(&mut e, T + 100);
        assert_eq!(
            s["burn_rates"]["5m"].as_f64(),
            s["burn_rates"]["1h"].as_f64()
        );
        assert_eq!(firing(&s, "page_fast"), fires, "{bad}: {}", s["burn_rates"]);
    }
}

#[test]
fn selector_matches_exactly_and_skips_are_not_counted() {
    let mut e = engine(
        "- {name: m, objective: 0.99, window: 1d, selector: {namespace: prod, model: llama, route: /v1/chat/completions}, sli: {type: latency, metric: ttft, threshold_ms: 500}}",
    );
    let mut r = stream(100, &[10]);
    r.namespace = Some("prod".into());
    r.model = Some("llama".into());
    e.observe(&r, "/v1/chat/completions", T);
    e.observe(&r, "/v1/completions", T);
    r.model = Some("llama-2".into());
    e.observe(&r, "/v1/chat/completions", T);
    r.model = None;
    e.observe(&r, "/v1/chat/completions", T);
    let mut p = plain(100, 200);
    p.namespace = Some("prod".into());
    p.model = Some("llama".into());
    e.observe(&p, "/v1/chat/completions", T);
    let s = slo0(&mut e, T);
    assert_eq!(s["total"], 1);
    assert_eq!(s["since_start"]["not_counted"], 1, "non-streaming: no TTFT");
}

#[test]
fn config_yaml_and_validation() {
    let ok = specs(
        r#"
- name: chat-goodput
  objective: 0.95
  window: 4w
  selector: {model: m}
  aborted: ignore
  sli:
    type: goodput
    all:
      - {metric: ttft, threshold_ms: 500}
      - {metric: "stage:queue_prefill", threshold_ms: 400}
- {name: up, objective: 0.999, window: 36h, sli: {type: availability}}
"#,
    );
    assert_eq!(ok[0].aborted, AbortedPolicy::Ignore);
    assert_eq!(ok[1].aborted, AbortedPolicy::Bad);
    assert_eq!(parse_window(&ok[0].window).unwrap(), 28 * 86_400);
    assert!(SloEngine::new(ok).is_ok());

    let err = |yaml: &str| match serde_yaml::from_str::<Vec<SloSpec>>(yaml) {
        Err(e) => e.to_string(),
        Ok(s) => SloEngine::new(s).err().expect("rejected").to_string(),
    };
    let lat = |obj: &str, window: &str, metric: &str, thr: &str| {
        format!("- {{name: x, objective: {obj}, window: {window}, sli: {{type: latency, metric: {metric}, threshold_ms: {thr}}}}}")
    };
    for (yaml, want) in [
        (lat("1.0", "28d", "ttft", "500"), "objective"),
        (lat("0", "28d", "ttft", "500"), "objective"),
        (lat("99", "28d", "ttft", "500"), "objective"),
        (lat("0.99", "28x", "ttft", "500"), "window"),
        (lat("0.99", "90m", "ttft", "500"), "window"),
        (lat("0.99", "0h", "ttft", "500"), "window"),
        (lat("0.99", "367d", "ttft", "500"), "window"),
        (lat("0.99", "28d", "p99", "500"), "unknown metric"),
        (lat("0.99", "28d", "ttft", "-1"), "threshold_ms"),
        (lat("0.99", "28d", "ttft", ".nan"), "threshold_ms"),
        (
            "- {name: x, objective: 0.9, window: 1d, sli: {type: goodput, all: []}}".into(),
            "at least one",
        ),
        (
            "- {name: x, objective: 0.9, window: 1d, sli: {type: availability}, extra: 1}".into(),
            "unknown field",
        ),
        (
            "- {name: x, objective: 0.9, window: 1d, sli: {type: latency, metric: e2e, threshold_ms: 1, foo: 2}}".into(),
            "unknown field",
        ),
        (
            "- {name: x, objective: 0.9, window: 1d, selector: {service: a}, sli: {type: availability}}".into(),
            "unknown field",
        ),
        (
            "- {name: x, objective: 0.9, window: 1d, sli: {type: availability}}\n- {name: x, objective: 0.9, window: 1d, sli: {type: availability}}".into(),
            "declared twice",
        ),
        (
            "- {name: '', objective: 0.9, window: 1d, sli: {type: availability}}".into(),
            "name",
        ),
    ] {
        let e = err(&yaml);
        assert!(e.contains(want), "{yaml}\n  -> {e}");
    }
}

#[test]
fn status_json_shape() {
    let mut e = engine(E2E_999);
    let s = slo0(&mut e, T);
    for k in [
        "name",
        "objective",
        "window",
        "sli",
        "selector",
        "burn_rates",
        "alerts",
    ] {
        assert!(!s[k].is_null(), "{k}");
    }
    assert_eq!(s["sli"]["type"], "latency");
    assert_eq!(s["compliance"], Value::Null, "no requests yet");
    let windows: Vec<&String> = s["burn_rates"].as_object().unwrap().keys().collect();
    assert_eq!(windows.len(), 7);
    let a = &s["alerts"][0];
    assert_eq!(
        (
            &a["name"],
            &a["long"],
            &a["short"],
            &a["factor"],
            &a["severity"]
        ),
        (
            &"page_fast".into(),
            &"1h".into(),
            &"5m".into(),
            &14.4.into(),
            &"page".into()
        )
    );
}

#[test]
fn render_exposition() {
    let mut e = engine(
        "- {name: 'a\"b', objective: 0.99, window: 1d, sli: {type: availability}}\n- {name: b, objective: 0.75, window: 1d, sli: {type: availability}}",
    );
    e.observe(&plain(1, 500), "x", T);
    e.observe(&plain(1, 200), "x", T);
    let mut out = String::new();
    e.render(T, &mut out);
    for line in [
        "# TYPE llmslo_slo_objective gauge",
        "llmslo_slo_objective{slo=\"a\\\"b\"} 0.99",
        "llmslo_slo_compliance{slo=\"a\\\"b\"} 0.5",
        "llmslo_slo_burn_rate{slo=\"b\",window=\"5m\"} 2",
        "llmslo_slo_alert_firing{slo=\"b\",alert=\"page_fast\",severity=\"page\"} 0",
        "llmslo_slo_requests_total{slo=\"b\",result=\"bad\"} 1",
        "# TYPE llmslo_slo_requests_total counter",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
    }
    // Every family's samples follow its header, each family once.
    let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE")).collect();
    assert_eq!(types.len(), 7);
    let mut empty = SloEngine::new(vec![]).unwrap();
    let mut s = String::new();
    empty.render(T, &mut s);
    assert!(s.is_empty());
}
