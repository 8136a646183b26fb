//! End to end: the synthetic server in a pod (netns + kubelet-style cgroup), the load
//! generator in the root netns, and the two ground truths checked against each other.

mod common;

use common::*;
use std::time::Duration;
use testbed::{loadgen, skip_unless_root, CgroupDriver, LoadConfig, Route};

const TOKENS: u64 = 12;

fn mixed_load(sp: &ServerPod) -> LoadConfig {
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.connections = 8;
    cfg.requests = 250;
    cfg.streaming_ratio = 0.8;
    cfg.prompt_bytes = vec![200, 2000];
    cfg.max_tokens = Some(TOKENS);
    cfg.include_usage = true;
    cfg.abort_after_events = Some(4);
    cfg.abort_ratio = 0.03;
    cfg.seed = 42;
    cfg.deadline = Duration::from_secs(60);
    cfg
}

fn full_run(driver: CgroupDriver, qos: &str, write_mode: &str, syscall: &str) {
    let sp = start_server(
        &format!("e2e-{write_mode}"),
        driver,
        qos,
        &[
            "--decode-ms",
            "1",
            "--write-mode",
            write_mode,
            "--syscall",
            syscall,
        ],
    );
    // The server is in the pod's cgroup and netns from its first instruction.
    assert_eq!(proc_cgroup(sp.server.pid()), sp.cg.cgroup_path());
    assert!(sp.pod.pids().contains(&(sp.server.pid() as i32)));

    let cfg = mixed_load(&sp);
    let clients = loadgen::run(&cfg).expect("load");
    assert_eq!(clients.len(), 250);
    let streamed = clients.iter().filter(|c| c.streaming).count();
    let aborted = clients.iter().filter(|c| c.aborted).count();
    assert!((150..=230).contains(&streamed), "{streamed} streamed");
    assert!(aborted >= 1, "seed should abort a few");
    assert!(clients.iter().filter(|c| !c.aborted).all(|c| c.ok()));
    // Connections are reused: many requests ride on one TCP connection.
    assert!(clients.iter().any(|c| c.seq_on_conn >= 10));

    let servers = server_log(&sp, clients.len());
    let lags = check_truth(&clients, &servers, TOKENS);
    eprintln!(
        "{driver:?}/{qos}/{write_mode}/{syscall}: {} lags: p50 {} us, p99 {} us, max {} us",
        lags.0.len(),
        lags.pct(0.5) / 1000,
        lags.pct(0.99) / 1000,
        lags.pct(1.0) / 1000
    );
    // Loopback-like veth hop: a few ms covers scheduling noise on a busy 2-core box.
    assert!(lags.pct(0.5) < 2_000_000, "median lag {}", lags.pct(0.5));
    assert!(lags.pct(0.99) < 25_000_000, "p99 lag {}", lags.pct(0.99));

    let (netns, cg_dir, veth) = (
        sp.pod.netns_path(),
        sp.cg.path().to_path_buf(),
        sp.pod.host_veth().to_string(),
    );
    let pod_dir = sp.cg.pod_path().to_path_buf();
    drop(sp);
    assert!(!netns.exists(), "netns left behind");
    assert!(!cg_dir.exists() && !pod_dir.exists(), "cgroup left behind");
    assert!(
        !std::path::Path::new("/sys/class/net").join(veth).exists(),
        "veth left behind"
    );
}

#[test]
fn systemd_driver_one_write_per_event() {
    if skip_unless_root("systemd_driver_one_write_per_event") {
        return;
    }
    full_run(CgroupDriver::Systemd, "burstable", "one", "write");
}

#[test]
fn cgroupfs_driver_one_write_per_event() {
    if skip_unless_root("cgroupfs_driver_one_write_per_event") {
        return;
    }
    full_run(CgroupDriver::Cgroupfs, "besteffort", "one", "write");
}

#[test]
fn split_writes_with_send() {
    if skip_unless_root("split_writes_with_send") {
        return;
    }
    full_run(CgroupDriver::Systemd, "guaranteed", "split", "send");
}

#[test]
fn merged_writes_with_writev() {
    if skip_unless_root("merged_writes_with_writev") {
        return;
    }
    full_run(CgroupDriver::Cgroupfs, "burstable", "merge", "writev");
}

#[test]
fn pipelined_chunked_large_bodies_completions() {
    if skip_unless_root("pipelined_chunked_large_bodies_completions") {
        return;
    }
    let sp = start_server(
        "pipeline",
        CgroupDriver::Systemd,
        "burstable",
        &["--decode-ms", "0.5"],
    );
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.connections = 3;
    cfg.requests = 30;
    cfg.pipeline = true;
    cfg.chunked_body = true;
    cfg.route = Route::Completions;
    cfg.streaming_ratio = 0.5;
    cfg.prompt_bytes = vec![100, 300_000, 2 * 1024 * 1024 + 17];
    cfg.max_tokens = Some(5);
    cfg.deadline = Duration::from_secs(60);
    let clients = loadgen::run(&cfg).expect("load");
    assert_eq!(clients.len(), 30);
    assert!(clients.iter().any(|c| c.prompt_bytes > 2 * 1024 * 1024));
    // Pipelined pairs: both requests of a pair go out on one connection, back to back, before
    // the client reads either response (the loadgen's structure). Times are kernel stamps, so
    // the first response may already have arrived when the second request leaves.
    let mut pairs = 0;
    for a in &clients {
        if let Some(b) = clients.iter().find(|b| {
            b.local_port == a.local_port
                && b.seq_on_conn == a.seq_on_conn + 1
                && a.seq_on_conn % 2 == 0
        }) {
            assert!(b.send_ns >= a.send_ns && a.end_ns.is_some() && b.end_ns.is_some());
            pairs += 1;
        }
    }
    assert_eq!(pairs, 15);
    let servers = server_log(&sp, clients.len());
    check_truth(&clients, &servers, 5);
    for s in &servers {
        let c = clients
            .iter()
            .find(|c| c.request_id.to_string() == *s.request_id.as_ref().unwrap())
            .unwrap();
        assert_eq!(s.prompt_bytes as usize, c.prompt_bytes);
        assert_eq!(s.path, "/v1/completions");
    }
}

#[test]
fn open_loop_rate_and_marker() {
    if skip_unless_root("open_loop_rate_and_marker") {
        return;
    }
    let sp = start_server(
        "openloop",
        CgroupDriver::Cgroupfs,
        "guaranteed",
        &["--decode-ms", "1", "--concurrency", "2"],
    );
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.connections = 4;
    cfg.requests = 40;
    cfg.rate = Some(200.0);
    cfg.max_tokens = Some(4);
    cfg.marker = Some("PRIVATE-MARKER-7f3a".into());
    cfg.deadline = Duration::from_secs(30);
    let clients = loadgen::run(&cfg).expect("load");
    assert_eq!(clients.len(), 40);
    for c in &clients {
        assert!(
            c.send_ns + 1_000_000 >= c.scheduled_ns.unwrap(),
            "sent before schedule"
        );
    }
    let servers = server_log(&sp, clients.len());
    check_truth(&clients, &servers, 4);
}

#[test]
fn deadline_bounds_the_run() {
    if skip_unless_root("deadline_bounds_the_run") {
        return;
    }
    // Slow server, short deadline: the run stops on time and says why.
    let sp = start_server(
        "deadline",
        CgroupDriver::Systemd,
        "besteffort",
        &["--decode-ms", "200"],
    );
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.requests = 100;
    cfg.max_tokens = Some(50);
    cfg.deadline = Duration::from_millis(700);
    let t = std::time::Instant::now();
    let clients = loadgen::run(&cfg).expect("load");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(clients.len(), 1);
    assert!(clients[0].error.as_deref().unwrap().contains("deadline"));
    assert!(!clients[0].events.is_empty());
}
