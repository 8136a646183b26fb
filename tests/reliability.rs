//! Kernel tests of the agent's own reliability (issue: reliability): exact loss accounting when
//! the ring buffer overflows, and a kill -9 under load followed by a restart that leaves no
//! duplicate hooks and records again.

mod common;

use std::time::{Duration, Instant};

use common::node::{server_pod, PORT};
use common::{kernel_tests_enabled, Agent};
use testbed::{CgroupDriver, LoadConfig};

fn metric(m: &str, series: &str) -> f64 {
    common::metric(m, series).unwrap_or_else(|| panic!("{series} missing"))
}

#[test]
fn ring_buffer_overflow_is_accounted_exactly() {
    if !kernel_tests_enabled("ring_buffer_overflow_is_accounted_exactly") {
        return;
    }
    let sp = server_pod(
        "loss",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "0.2", "--tokens", "64"],
    );
    // A 16 KiB ring drained every 10 ms cannot hold a burst of 64-token streams.
    let agent = Agent::start_with_config(
        "ringbuf_bytes: 16384\n",
        &[
            "--no-auto",
            "--target-cgroup",
            sp.cg.cgroup_path(),
            "--no-network",
        ],
    );
    let mut load = LoadConfig::new(sp.pod.addr(PORT));
    load.connections = 8;
    load.requests = 200;
    load.max_tokens = Some(64);
    testbed::loadgen::run(&load).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // health is refreshed every 500 ms
    let m = agent.get("/metrics");
    let submitted = metric(&m, "llmslo_agent_bpf_stat_total{stat=\"events\"}");
    let full = metric(&m, "llmslo_agent_bpf_stat_total{stat=\"ringbuf_full\"}");
    let read = metric(&m, "llmslo_agent_events_read_total");
    let lost = metric(&m, "llmslo_agent_events_lost_total{cause=\"ringbuf_full\"}");
    eprintln!("submitted {submitted} read {read} ringbuf_full {full}");
    assert!(full > 0.0, "the burst overflowed the ring");
    assert_eq!(read, submitted, "everything submitted was read");
    assert_eq!(lost, full, "generated - received = reported lost");
}

fn agent_tcx_programs(dev: &str) -> usize {
    use libbpf_rs::libbpf_sys as sys;
    let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut total = 0;
    for at in [sys::BPF_TCX_EGRESS, sys::BPF_TCX_INGRESS] {
        let mut ids = [0u32; 32];
        // SAFETY: zero is bpf_prog_query_opts' documented initial state.
        let mut opts: sys::bpf_prog_query_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<sys::bpf_prog_query_opts>() as _;
        opts.prog_ids = ids.as_mut_ptr();
        opts.__bindgen_anon_1.count = ids.len() as u32;
        // SAFETY: opts points at `count` ids that outlive the call.
        if unsafe { sys::bpf_prog_query_opts(ifindex, at, &mut opts) } == 0 {
            // SAFETY: the kernel wrote the count.
            total += unsafe { opts.__bindgen_anon_1.count } as usize;
        }
    }
    total
}

#[test]
fn kill_9_under_load_then_restart() {
    if !kernel_tests_enabled("kill_9_under_load_then_restart") {
        return;
    }
    let sp = server_pod(
        "kill9",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "1"],
    );
    let dev = sp.pod.host_veth().to_string();
    let args = ["--no-auto", "--target-cgroup", sp.cg.cgroup_path()];
    let mut first = Agent::start(&args);
    assert_eq!(
        agent_tcx_programs(&dev),
        2,
        "tc_pod_in + tc_pod_out on the pod veth"
    );
    let addr = sp.pod.addr(PORT);
    let load = std::thread::spawn(move || {
        let mut cfg = LoadConfig::new(addr);
        cfg.connections = 4;
        cfg.requests = 400;
        cfg.deadline = Duration::from_secs(30);
        testbed::loadgen::run(&cfg).unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    first.child.kill().unwrap(); // SIGKILL: no cleanup code runs
    let _ = first.child.wait();
    // tcx links are owned by the process's fds: they die with it.
    let t0 = Instant::now();
    while agent_tcx_programs(&dev) != 0 && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        agent_tcx_programs(&dev),
        0,
        "a killed agent's programs are gone"
    );
    let t0 = Instant::now();
    let second = Agent::start(&args);
    let ready = t0.elapsed();
    assert_eq!(agent_tcx_programs(&dev), 2, "no duplicates after restart");
    eprintln!("restarted agent ready in {ready:?}");
    assert!(
        ready < Duration::from_secs(2),
        "attached within 2 s: {ready:?}"
    );
    load.join().unwrap();
    let mut cfg = LoadConfig::new(addr);
    cfg.requests = 20;
    cfg.request_id_base = 9000;
    testbed::loadgen::run(&cfg).unwrap();
    let recs = second.wait_requests(Duration::from_secs(10), |r| r.len() >= 20);
    assert!(recs.len() >= 20, "records again after the restart");
}
