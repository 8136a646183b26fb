//! What the agent reports of its own cost on `/metrics` (`src/selfcost.rs`): its BPF programs'
//! runs and run time while the kernel's run-time accounting is on (`bpf_stats: true` turns it
//! on for the agent's life and no longer), and the `process_*` series, checked against what the
//! kernel says of the agent's process.

mod common;

use std::time::Duration;

use common::node::{server_pod, PORT};
use common::{kernel_tests_enabled, metric, promtool_check, Agent};
use testbed::{CgroupDriver, LoadConfig};

/// 30 streamed responses of 8 tokens from the pod.
fn load(addr: std::net::SocketAddr) {
    let mut cfg = LoadConfig::new(addr);
    cfg.connections = 2;
    cfg.requests = 30;
    cfg.max_tokens = Some(8);
    let done = testbed::loadgen::run(&cfg).expect("load");
    assert!(
        done.iter().all(|c| c.status == 200),
        "every request answered"
    );
}

fn series(exposition: &str, name: &str, program: &str) -> Option<f64> {
    metric(
        exposition,
        &format!("{name}{{object=\"l7\",program=\"{program}\"}} "),
    )
}

/// Whether some process holds a BPF_ENABLE_STATS handle (an `anon_inode:bpf-stats` fd).
fn accounting_held_elsewhere() -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
            fds.flatten().any(|f| {
                std::fs::read_link(f.path())
                    .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-stats")
            })
        })
    })
}

#[test]
fn the_agent_reports_its_bpf_run_time_and_its_process() {
    if !kernel_tests_enabled("the_agent_reports_its_bpf_run_time_and_its_process") {
        return;
    }
    let sp = server_pod(
        "selfcost",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "1"],
    );
    let target = ["--no-auto", "--target-cgroup", sp.cg.cgroup_path()];

    // With bpf_stats: the programs' runs and their time count.
    let mut agent = Agent::start_with_config("bpf_stats: true\n", &target);
    let pid = agent.child.id();
    let m0 = agent.get("/metrics");
    assert_eq!(
        metric(&m0, "llmslo_agent_bpf_stats_enabled "),
        Some(1.0),
        "bpf_stats: true turns the accounting on"
    );
    let runs0 = series(&m0, "llmslo_agent_bpf_program_runs_total", "sock_send").unwrap();
    load(sp.pod.addr(PORT));
    // 30 responses of a head, a role event, 8 tokens, [DONE] and the terminator: ≥ 11 sends each.
    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        series(m, "llmslo_agent_bpf_program_runs_total", "sock_send")
            .is_some_and(|r| r - runs0 >= 330.0)
    });
    let runs = series(&m, "llmslo_agent_bpf_program_runs_total", "sock_send").unwrap() - runs0;
    assert!(runs >= 330.0, "sock_send ran {runs} times for 30 responses");
    let secs = series(
        &m,
        "llmslo_agent_bpf_program_run_seconds_total",
        "sock_send",
    )
    .unwrap();
    let per_run_ns =
        secs * 1e9 / series(&m, "llmslo_agent_bpf_program_runs_total", "sock_send").unwrap();
    assert!(
        (10.0..100_000.0).contains(&per_run_ns),
        "sock_send {per_run_ns:.0} ns a run"
    );
    for (object, program) in [
        ("l7", "sock_recv"),
        ("l7", "sk_data_ready"),
        ("exec", "proc_exec"),
        ("tcp", "inet_sock_set_state"),
    ] {
        let line = format!(
            "llmslo_agent_bpf_program_runs_total{{object=\"{object}\",program=\"{program}\"}} "
        );
        assert!(
            metric(&m, &line).is_some(),
            "{object}/{program} has no run counter:\n{}",
            m.lines()
                .filter(|l| l.starts_with("llmslo_agent_bpf_program_runs_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        series(&m, "llmslo_agent_bpf_program_runs_total", "sock_recv").unwrap() >= 30.0,
        "the server's reads"
    );

    // The process series agree with the kernel's view of the agent's process.
    let cpu = metric(&m, "process_cpu_seconds_total ").unwrap();
    let after = llm_slo_agent::selfcost::cpu_seconds(pid).expect("the agent's /proc stat");
    assert!(
        cpu > 0.0 && cpu <= after + 0.02,
        "process_cpu_seconds_total {cpu} against /proc/{pid}/stat {after} read after it"
    );
    let rss = metric(&m, "process_resident_memory_bytes ").unwrap();
    let vm_rss = common::proc_status(pid, "VmRSS:") as f64 * 1024.0;
    assert!(
        (rss - vm_rss).abs() <= 16.0 * 1024.0 * 1024.0 && rss > 4.0 * 1024.0 * 1024.0,
        "process_resident_memory_bytes {rss} against VmRSS {vm_rss}"
    );
    let fds = metric(&m, "process_open_fds ").unwrap();
    let now_fds = common::fds(pid) as f64;
    // Apart by the run-queue counters' schedstat files of the server's threads, kept open.
    assert!(
        fds >= 10.0 && (fds - now_fds).abs() <= 32.0,
        "process_open_fds {fds} against {now_fds} in /proc/{pid}/fd"
    );
    assert!(metric(&m, "process_max_fds ").unwrap() >= fds);
    let start = metric(&m, "process_start_time_seconds ").unwrap();
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= unix_now && start > unix_now - 120.0,
        "process_start_time_seconds {start}, now {unix_now}"
    );
    promtool_check(&m);
    assert!(agent.stop(), "clean exit");

    // Without it (and with the sysctl off) nothing is counted: the agent's handle went with it.
    if llm_slo_agent::selfcost::sysctl_on() || accounting_held_elsewhere() {
        eprintln!(
            "the kernel's BPF run-time accounting is on (sysctl, or a BPF_ENABLE_STATS handle \
             held by another process): the accounting-off half is skipped"
        );
        return;
    }
    let agent = Agent::start(&target);
    let m0 = agent.get("/metrics");
    assert_eq!(metric(&m0, "llmslo_agent_bpf_stats_enabled "), Some(0.0));
    load(sp.pod.addr(PORT));
    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        metric(m, "llmslo_agent_requests_assembled_total ").is_some_and(|n| n >= 30.0)
    });
    assert_eq!(
        series(&m, "llmslo_agent_bpf_program_runs_total", "sock_send"),
        Some(0.0),
        "runs counted with the accounting off"
    );
    assert_eq!(
        series(
            &m,
            "llmslo_agent_bpf_program_run_seconds_total",
            "sock_send"
        ),
        Some(0.0)
    );
}
