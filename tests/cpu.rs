//! CPU starvation (issue: inside the server): the run-queue waits of a traced server's threads,
//! from the sched tracepoints. The same load, first with the server's CPU to itself, then with
//! two busy loops pinned to that CPU: the waits must grow by far, and be there in the metrics
//! of its pod only.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::{server_pod, PORT};
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

/// (wait seconds, waits) of the traced pods, after the agent's next refresh.
fn runq(agent: &Agent) -> (f64, f64) {
    std::thread::sleep(Duration::from_millis(1200));
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
    // Everything else of the test on CPU 1: the agent, and this thread (the load generator's
    // threads inherit it), so CPU 0 is the server's alone until the busy loops come.
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
