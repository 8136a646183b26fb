//! Breakdown shares and grouping, render speed, and allocation-free recording.

use super::*;

#[test]
fn breakdown_shares_and_grouping() {
    let mut a = Aggregator::new(AggregatorConfig::default());
    // Full network chain: node_in .. node_out; stages partition E2E exactly.
    let net = |extra: u64| {
        let p = [
            (Ts::Syn, 0),
            (Ts::Established, 100_000),
            (Ts::Accepted, 300_000),
            (Ts::NodeIn, MS),
            (Ts::NatDone, MS + 50_000),
            (Ts::PodIn, MS + 80_000),
            (Ts::SockQueued, MS + 200_000),
            (Ts::ReadFirst, MS + 700_000),
            (Ts::ReadDone, 2 * MS),
            (Ts::RespLast, 300 * MS + extra),
            (Ts::NodeOut, 300 * MS + extra + 123_457),
        ];
        let mut r = rec(&p, &[40 * MS + extra, 41 * MS + extra], 200);
        r.finish(true);
        r
    };
    for i in 0..5 {
        a.record(&net(i * 7_777_777), labels("ns", "p", "m1", "r"), 100);
    }
    a.record(&streaming(20, &[5, 5]), labels("ns", "p", "m2", "r"), 100);
    let b = a.breakdown(100, 300, &["model"]);
    assert_eq!(b["window_s"], 300);
    let g = &b["groups"];
    assert_eq!(g[0]["key"], json!({"model": "m1"}), "sorted by count");
    assert_eq!(g[0]["count"], 5);
    assert_eq!(g[1]["key"]["model"], "m2");
    let st = g[0]["stages"].as_object().unwrap();
    let share_sum: f64 = st.values().filter_map(|s| s["share_of_e2e"].as_f64()).sum();
    assert!(
        (share_sum - 1.0).abs() < 1e-9,
        "partition: shares sum to 1, got {share_sum}"
    );
    assert!(
        st["tcp_handshake"].get("share_of_e2e").is_none(),
        "before E2E: no share"
    );
    assert_eq!(st["tcp_handshake"]["count"], 5);
    assert!(st.get("inference").is_none() && st.get("sidecar_inbound").is_none());
    let qp = &st["queue_prefill"];
    assert!((qp["mean"].as_f64().unwrap() - (38.0 + 2.0 * 7.777777)).abs() < 1e-9);
    let lb = st["load_balancing"]["share_of_e2e"].as_f64().unwrap();
    let e2e_mean = g[0]["metrics"]["e2e_ms"]["mean"].as_f64().unwrap();
    assert!((lb - 0.05 / e2e_mean).abs() < 1e-12);
    assert!(g[0]["metrics"].get("ttft_ms").is_some());

    // Aborted requests add stage time but no E2E; requests without stages add E2E only.
    let mut ab = net(0);
    ab.aborted = true;
    ab.finish(true);
    a.record(&ab, labels("ns", "p", "m1", "r"), 100);
    let mut bare = RequestRecord {
        e2e_ms: Some(50.0),
        status: Some(500),
        ..Default::default()
    };
    bare.id = 9;
    a.record(&bare, labels("ns", "p", "m1", "r"), 100);
    let b = a.breakdown(100, 300, &[]);
    assert_eq!(b["groups"].as_array().unwrap().len(), 1);
    assert_eq!(b["groups"][0]["name"], "all");
    assert_eq!(b["groups"][0]["key"], json!({}));
    assert_eq!(b["groups"][0]["count"], 8);
    let s: f64 = b["groups"][0]["stages"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|s| s["share_of_e2e"].as_f64())
        .sum();
    assert!(s < 1.0 && s > 0.9, "{s}");
    // Unknown fields are ignored; order follows GROUP_FIELDS.
    let b = a.breakdown(100, 10_000, &["route", "bogus", "namespace"]);
    assert_eq!(b["group_by"], json!(["namespace", "route"]));
    assert_eq!(b["window_s"], 300);
    assert_eq!(b["groups"][0]["name"], "ns/r");
}

/// 50 label sets of full records render to an exposition promtool accepts. How long the
/// render takes is `benches/pipeline.rs`'s `render` group (docs/BENCHMARKS.md), not a test's.
#[test]
fn fifty_label_sets_render_a_valid_exposition() {
    let mut a = Aggregator::new(AggregatorConfig::default());
    let net = {
        let p = [
            (Ts::NodeIn, MS),
            (Ts::NatDone, MS + 50_000),
            (Ts::SockQueued, MS + 200_000),
            (Ts::ReadFirst, MS + 700_000),
            (Ts::ReadDone, 2 * MS),
            (Ts::RespLast, 300 * MS),
            (Ts::NodeOut, 301 * MS),
        ];
        let tokens: Vec<u64> = (0..200).map(|i| (40 + i) * MS).collect();
        rec(&p, &tokens, 200)
    };
    for i in 0..50 {
        for t in 0..20 {
            a.record(
                &net,
                labels("ns", &format!("pod-{i}"), "m", "/v1/completions"),
                1000 + t * 10,
            );
        }
    }
    for t in 0..1000 {
        a.record(
            &net,
            labels("ns", "pod-7", "m", "/v1/completions"),
            1200 + t % 10,
        );
    }
    let mut out = String::with_capacity(1 << 20);
    a.render(1200, &mut out);
    // Every label set has its series: the 50 pods' request counters.
    let pods = out
        .lines()
        .filter(|l| l.starts_with("llmslo_requests_total{"))
        .map(|l| {
            l.split("pod=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
        })
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(pods.len(), 50, "{pods:?}");
    promtool_check(&out);
}

#[test]
fn record_does_not_allocate_once_warm() {
    let mut a = Aggregator::new(AggregatorConfig::default());
    let r = streaming(150, &[20, 25, 30, 22]);
    let mut ls: Vec<Labels> = (0..80).map(|_| l1()).collect();
    for t in (0..400).step_by(5) {
        a.record(&r, ls.pop().unwrap(), t);
    }
    let ls: Vec<Labels> = (0..80).map(|_| l1()).collect();
    let before = alloc_count::get();
    for (t, l) in (400..800).step_by(5).zip(ls) {
        a.record(&r, l, t);
    }
    assert_eq!(
        alloc_count::get() - before,
        0,
        "allocations in warm record()"
    );
}

#[path = "../../../tests/common/alloc_count.rs"]
mod alloc_count;
