//! The overhead benchmark's floor programs (`src/bpf/floor.bpf.c`, `src/floor.rs`): each
//! attaches where the agent's programs run and runs for the traffic that runs them, so the
//! floor it reports is measured on the agent's own hooks.

mod common;

use common::node::{server_pod, PORT};
use llm_slo_agent::floor::{stats_on, Floor};
use testbed::{CgroupDriver, LoadConfig};

#[test]
fn every_floor_program_attaches_on_the_agents_hooks_and_runs() {
    if !common::kernel_tests_enabled("floor") {
        return;
    }
    let sp = server_pod(
        "floor",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "1"],
    );
    let _stats = stats_on().expect("BPF_ENABLE_STATS");
    let floor = Floor::attach(&[(
        sp.pod.host_ifindex().expect("veth ifindex") as i32,
        sp.pod.host_veth(),
    )])
    .expect("loading the floor programs");
    assert!(
        floor.errors.is_empty(),
        "hooks not attached: {:?}",
        floor.errors
    );
    assert_eq!(floor.attached.len(), 6, "attached: {:?}", floor.attached);
    let before = floor.runs().expect("program info");

    // Streamed responses from the pod: every request crosses its veth both ways (tc), enters
    // it through the node's netfilter hooks, and each side sends, receives and is woken.
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.connections = 2;
    cfg.requests = 50;
    cfg.max_tokens = Some(4);
    let done = testbed::loadgen::run(&cfg).expect("load");
    assert!(done.iter().all(|c| c.status == 200));

    let after = floor.runs().expect("program info");
    assert_eq!(after.len(), 6);
    for (a, b) in before.iter().zip(&after) {
        let runs = b.run_cnt - a.run_cnt;
        assert!(
            runs >= 50,
            "{} ({}) ran {runs} times for 50 requests",
            b.name,
            b.kind
        );
        assert!(
            b.run_time_ns > a.run_time_ns,
            "{}: no run time accounted",
            b.name
        );
    }
}
