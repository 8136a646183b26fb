//! Kernel test of SLOs (issue: SLOs): a server that queues every request past a TTFT objective
//! burns the error budget; `/api/v1/slo` shows the fast-burn page condition true and the
//! `llmslo_slo_*` metrics carry it, while a loose objective stays within budget.

mod common;

use std::time::Duration;

use common::node::{server_pod, PORT};
use common::{kernel_tests_enabled, promtool_check, Agent};
use testbed::{CgroupDriver, LoadConfig};

#[test]
fn a_queueing_server_burns_the_ttft_budget() {
    if !kernel_tests_enabled("a_queueing_server_burns_the_ttft_budget") {
        return;
    }
    // Every request queues 30 ms before prefill: TTFT > 20 ms always, < 500 ms always.
    let sp = server_pod(
        "slo",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--queue-delay-ms", "30", "--decode-ms", "1"],
    );
    let agent = Agent::start_with_config(
        "slos:\n\
         - name: ttft-tight\n  objective: 0.99\n  window: 28d\n  selector: {model: synth-llm}\n  sli: {type: latency, metric: ttft, threshold_ms: 20}\n\
         - name: ttft-loose\n  objective: 0.99\n  window: 28d\n  sli: {type: latency, metric: ttft, threshold_ms: 500}\n\
         - name: other-model\n  objective: 0.99\n  window: 28d\n  selector: {model: not-served}\n  sli: {type: latency, metric: ttft, threshold_ms: 1}\n",
        &["--no-auto", "--target-cgroup", sp.cg.cgroup_path()],
    );
    let mut load = LoadConfig::new(sp.pod.addr(PORT));
    load.connections = 4;
    load.requests = 60;
    load.max_tokens = Some(4);
    testbed::loadgen::run(&load).unwrap();
    agent.wait_requests(Duration::from_secs(10), |r| r.len() >= 60);

    let v = agent.get_json("/api/v1/slo");
    let slo = |name: &str| {
        v["slos"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {v}"))
    };
    let tight = slo("ttft-tight");
    assert_eq!(tight["total"], 60, "{tight}");
    assert_eq!(tight["bad"], 60, "{tight}");
    assert!(
        tight["burn_rates"]["5m"].as_f64().unwrap() > 14.4,
        "{tight}"
    );
    let page = tight["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["short"] == "5m")
        .unwrap();
    assert_eq!(page["firing"], true, "fast-burn page condition: {tight}");
    let loose = slo("ttft-loose");
    assert_eq!(
        (loose["good"].as_u64(), loose["bad"].as_u64()),
        (Some(60), Some(0)),
        "{loose}"
    );
    assert!(
        loose["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["firing"] == false),
        "{loose}"
    );
    assert_eq!(
        slo("other-model")["total"],
        0,
        "the selector keeps other models out"
    );

    // The heatmap holds every request's TTFT; the slow list keeps whole timelines.
    let hm = agent.get_json("/api/v1/heatmap?metric=ttft&window=5m&step=10s");
    let total: u64 = hm["columns"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
        })
        .sum();
    assert_eq!(total, 60, "{hm}");
    let slow = agent.get_json("/api/v1/requests?slow=true&limit=5");
    let slow = slow["requests"].as_array().unwrap();
    assert!(!slow.is_empty() && slow.len() <= 5);
    assert!(slow
        .iter()
        .all(|r| r["token_ns"].as_array().is_some_and(|t| t.len() == 4)
            && r["timestamps"]["token_1"].is_u64()));
    let e2e: Vec<f64> = slow.iter().map(|r| r["e2e_ms"].as_f64().unwrap()).collect();
    assert!(
        e2e.windows(2).all(|w| w[0] >= w[1]),
        "slowest first: {e2e:?}"
    );

    let metrics = agent.get("/metrics");
    promtool_check(&metrics);
    assert!(
        metrics.contains("llmslo_slo_burn_rate{slo=\"ttft-tight\",window=\"5m\"}"),
        "burn-rate series"
    );
    assert!(
        metrics.contains(
            "llmslo_slo_alert_firing{slo=\"ttft-tight\",alert=\"page_fast\",severity=\"page\"} 1"
        ),
        "page_fast firing in /metrics"
    );
}

#[test]
fn violation_analysis_names_long_prompts_queueing() {
    if !kernel_tests_enabled("violation_analysis_names_long_prompts_queueing") {
        return;
    }
    // Prefill costs 2 ms per KiB: 24 KiB prompts queue ~50 ms, 300-byte ones under 1 ms.
    let sp = server_pod(
        "violation",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--prefill-us-per-kb", "2000", "--decode-ms", "1"],
    );
    let agent = Agent::start_with_config(
        "slos:\n- name: ttft\n  objective: 0.95\n  window: 1h\n  sli: {type: latency, metric: ttft, threshold_ms: 25}\n",
        &["--no-auto", "--target-cgroup", sp.cg.cgroup_path()],
    );
    let mut load = LoadConfig::new(sp.pod.addr(PORT));
    load.connections = 4;
    load.requests = 80;
    load.max_tokens = Some(3);
    load.prompt_bytes_fn = Some(std::sync::Arc::new(|n| {
        if n % 4 == 0 {
            24 * 1024
        } else {
            300
        }
    }));
    testbed::loadgen::run(&load).unwrap();
    let recs = agent.wait_requests(Duration::from_secs(10), |r| r.len() >= 80);
    // The 20 long prompts violate; a short one only if the machine stalled it by ~25 ms.
    let over = |long: bool| {
        recs.iter()
            .filter(|r| (r["request_bytes"].as_u64().unwrap_or(0) > 8 * 1024) == long)
            .filter(|r| r["ttft_ms"].as_f64().is_some_and(|t| t > 25.0))
            .count()
    };
    let (long_over, short_over) = (over(true), over(false));

    let a = agent.get_json("/api/v1/slo/analysis?slo=ttft&window=15m");
    eprintln!("diagnosis: {}", a["diagnosis"]);
    assert_eq!(a["requests"], 80, "{a}");
    assert_eq!(long_over, 20, "the 20 long prompts violate: {a}");
    assert_eq!(
        a["violations"],
        long_over + short_over,
        "each record over the threshold is a violation ({short_over} short ones): {a}"
    );
    assert!(
        short_over <= 2,
        "{short_over} short prompts over 25 ms: {a}"
    );
    assert_eq!(a["dominant_stage"], "queue_prefill", "{a}");
    assert_eq!(a["class"]["dimension"], "prompt_size", "{a}");
    assert_eq!(a["class"]["value"], "8-64KiB", "{a}");
    assert!(
        a["class_stage_ratio"].as_f64().unwrap() > 4.0,
        "long-context requests queue far longer: {a}"
    );
    // The burn-rate alert's condition is true as well (25 % bad against a 5 % budget).
    let slo = agent.get_json("/api/v1/slo");
    assert!(
        slo["slos"][0]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["firing"] == true),
        "{slo}"
    );
    assert_eq!(
        common::http_get(agent.addr, "/api/v1/slo/analysis?slo=nope")
            .unwrap()
            .0,
        404
    );
}
