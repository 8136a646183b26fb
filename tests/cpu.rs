//! CPU starvation (issue: inside the server): the run-queue waits of a traced server's threads,
//! from the scheduler's own per-thread account (`sched_info.run_delay`). The same load, first
//! with the server's CPU to itself (kept out of its idle state by a SCHED_IDLE loop, see
//! `Hog::keep_awake`), then with busy loops pinned to that CPU: the waits must grow by far,
//! and be there in the metrics of its pod only, and in the requests' own figures
//! (`cpu_runqueue_wait_ms`: 10–11 ms in all for 150 requests alone, 178–181 ms shared here),
//! which must add up to no more than the pod's counter.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::{server_pod, ServerPod, PORT};
use common::{family_sum, kernel_tests_enabled, Agent};
use testbed::{CgroupDriver, LoadConfig};

/// (wait seconds, waits) of the traced pods, after a reading that followed the load: readings
/// come every interval, late by up to the housekeeping tick (0.5 s) and by however long the
/// busy machine keeps the agent (pinned to the server's CPU) from running: two intervals and
/// slack hold one whole interval after the load's end.
fn runq(agent: &Agent) -> (f64, f64) {
    std::thread::sleep(2 * llm_slo_agent::runq::EVERY + Duration::from_millis(800));
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
        Hog::spawn(cpu, &[])
    }

    /// A busy loop in the SCHED_IDLE class: it takes only what no other thread wants (a waking
    /// thread preempts it at once), and keeps the CPU out of its idle state. On a virtual
    /// machine a thread woken on an idle vCPU waits for the host to run that vCPU again, and
    /// that wait is run-queue time too (~0.3 ms a wake-up on this VM, with the host's other
    /// tenants): this leaves in the "alone" phase only the waits the server's threads impose
    /// on each other.
    fn keep_awake(cpu: u32) -> Hog {
        Hog::spawn(cpu, &["chrt", "--idle", "0"])
    }

    fn spawn(cpu: u32, class: &[&str]) -> Hog {
        let cpu = cpu.to_string();
        let mut args = vec!["-c", &cpu];
        args.extend_from_slice(class);
        args.extend(["timeout", "30", "sh", "-c", "while :; do :; done"]);
        let c = Command::new("taskset")
            .args(&args)
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
        let done = testbed::loadgen::run(&cfg).unwrap();
        assert!(done.iter().all(|c| c.status == 200));
    };
    let mut last = runq(&agent);
    // One phase of the load with `hogs` busy loops on CPU 0: the pod's (wait s, waits).
    let mut phase = |name: &str, hogs: usize| {
        let _awake = Hog::keep_awake(0);
        let hogs: Vec<Hog> = (0..hogs).map(|_| Hog::on(0)).collect();
        let t = Instant::now();
        load();
        let took = t.elapsed();
        drop(hogs);
        let now = runq(&agent);
        let (w, n) = (now.0 - last.0, now.1 - last.1);
        last = now;
        eprintln!(
            "150 requests, {name}: {:.1} ms waited in {n} waits (load took {took:?})",
            w * 1e3
        );
        assert!(n > 0.0, "{name}: waits counted");
        w
    };
    let wq = phase("alone on CPU 0", 0);
    let wb = phase("sharing CPU 0 with two busy loops", 2);
    // Alone, the server's own threads (all on CPU 0) still wait for each other: 48–50 ms here;
    // with the busy loops 215–254 ms.
    let grew = |wq: f64| wb - wq > 0.05 && wb > 2.5 * wq;
    let wq = quietest(wq, grew, || phase("alone on CPU 0, again", 0));
    assert!(
        grew(wq),
        "waits with the CPU shared ({wb} s) vs alone ({wq} s)"
    );
}

/// The waits of an "alone" phase, measured again (at most twice) while `grew` says the shared
/// phase did not outgrow them: the machine's other tenants only ever add waits to a phase, so
/// the quietest measurement is kept.
fn quietest(mut alone: f64, grew: impl Fn(f64) -> bool, mut again: impl FnMut() -> f64) -> f64 {
    for _ in 0..2 {
        if grew(alone) {
            break;
        }
        alone = alone.min(again());
    }
    alone
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
    let _ = request_waits(&agent, &mut seen);
    let mut last = runq(&agent);
    // One phase of the load, with `hogs` busy loops on the server's CPU: the requests' waits
    // (total, stages) and the pod's counter over the phase.
    let mut phase = |name: &str, hogs: usize| {
        let _awake = Hog::keep_awake(0);
        let hogs: Vec<Hog> = (0..hogs).map(|_| Hog::on(0)).collect();
        load();
        drop(hogs);
        let now = runq(&agent);
        let reqs = request_waits(&agent, &mut seen);
        let pod = now.0 - last.0;
        last = now;
        assert!(
            reqs.len() >= 145,
            "{name}: {} of 150 requests have run-queue figures",
            reqs.len()
        );
        for (t, parts) in &reqs {
            // queue_prefill and decode partition read_done -> last write, on one thread.
            assert!(
                (t - parts).abs() < 1e-9,
                "{name}: total {t} vs stages {parts}"
            );
        }
        let sum = reqs.iter().map(|x| x.0).sum::<f64>();
        eprintln!(
            "150 requests one at a time, read_done -> last write, {name}: {:.2} ms in all \
             (median {:.1} us); the pod's counter {:.1} ms",
            sum * 1e3,
            median(&reqs) * 1e6,
            pod * 1e3
        );
        // The requests' windows do not overlap and lie inside the phase the pod's counter
        // covers, and both count the same waits of the same thread (both are differences of
        // the scheduler's per-thread run_delay, which the pod's counter reads every 2 s and the
        // requests at their syscalls; the reads 2 × EVERY + 0.8 s after the load come after its
        // last refresh): the sum over requests is at most the pod's, which also holds the
        // waits between requests and those of the runtime's other threads (the blocking pool
        // that sleeps between tokens). The slack only absorbs the float rounding of the
        // exposition and the JSON (1 µs).
        assert!(sum <= pod + 1e-6, "{name}: requests {sum} s > pod {pod} s");
        sum
    };
    let alone = phase("alone", 0);
    // Four busy loops: the machine is shared, so the "alone" phase is rarely quite alone.
    let shared = phase("with four busy loops on the server's CPU", 4);
    let grew = |alone: f64| shared > 2.0 * alone && shared - alone > 0.005;
    let alone = quietest(alone, grew, || phase("alone, again", 0));
    assert!(
        grew(alone),
        "per-request waits with the CPU shared ({shared} s) vs alone ({alone} s)"
    );
}
