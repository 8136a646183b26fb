//! CPU starvation (issue: inside the server): the run-queue waits of a traced server's threads,
//! from the scheduler's own per-thread account (`sched_info.run_delay`). The same load, first with the server's CPU to itself, then with
//! two busy loops pinned to that CPU: the waits must grow by far, and be there in the metrics
//! of its pod only, and in the requests' own figures (`cpu_runqueue_wait_ms`), which must add
//! up to no more than the pod's counter.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::{server_pod, ServerPod, PORT};
use common::{kernel_tests_enabled, Agent};
use testbed::{CgroupDriver, LoadConfig};

/// The sum over pods of a counter family.
fn family_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (wait seconds, waits) of the traced pods, after the agent's next refresh: one reading
/// interval plus the housekeeping tick (0.5 s) that may delay it, plus slack.
fn runq(agent: &Agent) -> (f64, f64) {
    std::thread::sleep(llm_slo_agent::runq::EVERY + Duration::from_millis(800));
    let m = agent.get("/metrics");
    (
        family_sum(&m, "llmslo_cpu_runqueue_wait_seconds_total"),
        family_sum(&m, "llmslo_cpu_runqueue_waits_total"),
    )
}

/// A busy loop on CPU `cpu` for at most 30 s; ended (SIGTERM to `timeout`, which passes it on
/// to the loop) when dropped.
struct Hog(Child);

impl Hog {
    fn on(cpu: u32) -> Hog {
        let c = Command::new("taskset")
            .args([
                "-c",
                &cpu.to_string(),
                "timeout",
                "30",
                "sh",
                "-c",
                "while :; do :; done",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("busy loop");
        Hog(c)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// The server's threads pinned to CPU 0, the agent (tracing its pod) and the calling thread
/// (the load generator's threads inherit it) to CPU 1: CPU 0 is the server's alone until the
/// busy loops come.
fn pinned(sp: &ServerPod) -> Agent {
    // Every thread of the server on CPU 0.
    let st = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &sp.server.pid().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset");
    assert!(st.success(), "pinning the server");
    let agent = Agent::start(&[
        "--no-auto",
        "--target-cgroup",
        sp.cg.cgroup_path(),
        "--no-network",
    ]);
    let st = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &agent.child.id().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset");
    assert!(st.success(), "pinning the agent");
    // SAFETY: a zeroed cpu_set_t with CPU 1 set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(1, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
    agent
}

#[test]
fn run_queue_waits_grow_when_the_servers_cpu_is_shared() {
    if !kernel_tests_enabled("run_queue_waits_grow_when_the_servers_cpu_is_shared") {
        return;
    }
    let sp = server_pod(
        "runq",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "1"],
    );
    let agent = pinned(&sp);
    let load = || {
        let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
        cfg.connections = 2;
        cfg.requests = 150;
        cfg.max_tokens = Some(4);
        let t = Instant::now();
        let done = testbed::loadgen::run(&cfg).unwrap();
        assert!(done.iter().all(|c| c.status == 200));
        t.elapsed()
    };
    let before = runq(&agent);
    let quiet_took = load();
    let quiet = runq(&agent);
    let hogs = [Hog::on(0), Hog::on(0)];
    let busy_took = load();
    drop(hogs);
    let busy = runq(&agent);
    let (wq, nq) = (quiet.0 - before.0, quiet.1 - before.1);
    let (wb, nb) = (busy.0 - quiet.0, busy.1 - quiet.1);
    eprintln!(
        "150 requests alone on CPU 0: {:.1} ms waited in {nq} waits (load took {quiet_took:?}); \
         sharing CPU 0 with two busy loops: {:.1} ms in {nb} waits (load took {busy_took:?})",
        wq * 1e3,
        wb * 1e3
    );
    assert!(nq > 0.0 && nb > 0.0, "waits counted in both phases");
    // Alone, the server's own threads (all on CPU 0) still wait for each other: 27–38 ms here;
    // with the busy loops 157–165 ms.
    assert!(
        wb - wq > 0.05 && wb > 2.5 * wq,
        "waits with the CPU shared ({wb} s) vs alone ({wq} s)"
    );
}

/// The per-request run-queue waits (s) of the records not in `seen` (which it then holds):
/// each record's `total`, and its `queue_prefill` + `decode`.
fn request_waits(agent: &Agent, seen: &mut BTreeSet<u64>) -> Vec<(f64, f64)> {
    let recs = agent.get_json("/api/v1/requests?limit=10000")["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for r in recs {
        if !seen.insert(r["id"].as_u64().unwrap()) {
            continue;
        }
        assert!(r["gpu"].is_null(), "no libcuda: GPU figures null: {r}");
        let w = &r["cpu_runqueue_wait_ms"];
        let ms = |k: &str| w[k].as_f64();
        if let (Some(t), Some(q), Some(d)) = (ms("total"), ms("queue_prefill"), ms("decode")) {
            out.push((t / 1e3, (q + d) / 1e3));
        }
    }
    out
}

fn median(v: &[(f64, f64)]) -> f64 {
    let mut t: Vec<f64> = v.iter().map(|x| x.0).collect();
    t.sort_by(f64::total_cmp);
    t.get(t.len() / 2).copied().unwrap_or(0.0)
}

#[test]
fn per_request_run_queue_waits_grow_and_stay_within_the_pods() {
    if !kernel_tests_enabled("per_request_run_queue_waits_grow_and_stay_within_the_pods") {
        return;
    }
    // One tokio worker: each request is read and answered by one thread, so each has its
    // run-queue figures (a stage whose ends are on two threads has none).
    let sp = server_pod(
        "runqreq",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "1", "--workers", "1"],
    );
    let agent = pinned(&sp);
    let load = || {
        let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
        // One request at a time: the requests' windows on the worker thread do not overlap,
        // so their waits add up to at most that thread's (and so the pod's) wait.
        cfg.connections = 1;
        cfg.requests = 150;
        cfg.max_tokens = Some(16);
        let done = testbed::loadgen::run(&cfg).unwrap();
        assert!(done.iter().all(|c| c.status == 200));
    };
    let mut seen = BTreeSet::new();
    let before = runq(&agent);
    let _ = request_waits(&agent, &mut seen);
    load();
    let quiet = runq(&agent);
    let quiet_reqs = request_waits(&agent, &mut seen);
    // Four busy loops: the machine is shared, so the "alone" phase is rarely quite alone.
    let hogs = [Hog::on(0), Hog::on(0), Hog::on(0), Hog::on(0)];
    load();
    drop(hogs);
    let busy = runq(&agent);
    let busy_reqs = request_waits(&agent, &mut seen);
    let (wq, wb) = (quiet.0 - before.0, busy.0 - quiet.0);
    for (phase, reqs) in [("alone", &quiet_reqs), ("shared", &busy_reqs)] {
        assert!(
            reqs.len() >= 145,
            "{phase}: {} of 150 requests have run-queue figures",
            reqs.len()
        );
    }
    let sum = |v: &[(f64, f64)]| v.iter().map(|x| x.0).sum::<f64>();
    let (rq, rb) = (sum(&quiet_reqs), sum(&busy_reqs));
    eprintln!(
        "150 requests one at a time, read_done -> last write: alone {:.2} ms in all (median \
         {:.1} us), with four busy loops on the server's CPU {:.2} ms (median {:.1} us); the pod's \
         counter {:.1} ms and {:.1} ms",
        rq * 1e3,
        median(&quiet_reqs) * 1e6,
        rb * 1e3,
        median(&busy_reqs) * 1e6,
        wq * 1e3,
        wb * 1e3
    );
    for (t, parts) in quiet_reqs.iter().chain(&busy_reqs) {
        // queue_prefill and decode partition read_done -> last write, on one thread.
        assert!((t - parts).abs() < 1e-9, "total {t} vs stages {parts}");
    }
    // The requests' windows do not overlap and lie inside the phase the pod's counter covers,
    // and both count the same waits of the same thread (both are differences of the
    // scheduler's per-thread run_delay, which the pod's counter reads every 2 s and the
    // requests at their syscalls; the reads EVERY + 0.8 s after the load come after its last
    // refresh): the sum over requests is at most the pod's, which also holds the waits between
    // requests and those of the runtime's other threads (the blocking pool that sleeps between
    // tokens). The slack only absorbs the float rounding of the exposition and the JSON (1 µs).
    assert!(rq <= wq + 1e-6, "requests {rq} s > pod {wq} s (alone)");
    assert!(rb <= wb + 1e-6, "requests {rb} s > pod {wb} s (shared)");
    assert!(
        rb > 2.0 * rq && rb - rq > 0.005,
        "per-request waits with the CPU shared ({rb} s) vs alone ({rq} s)"
    );
}
