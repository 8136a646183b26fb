//! Shared pieces of the kernel tests: the root/BPF gate, the agent as a child process, and a
//! tiny HTTP client for its API.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when the test may use the kernel. Without root it skips loudly, unless
/// LLMSLO_REQUIRE_BPF=1 (CI), where it fails.
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("LLMSLO_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("{test}: LLMSLO_REQUIRE_BPF=1 but not running as root: cannot load BPF programs");
    }
    eprintln!("\n!!! SKIPPING {test}: needs root to load BPF and build network namespaces !!!\n");
    false
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llm-slo-agent"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The agent running as a child process; SIGTERM on drop.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// A config file written for this agent, removed on drop.
    config: Option<PathBuf>,
}

impl Agent {
    /// Starts the agent with `yaml` as its `--config` file, plus `args`.
    pub fn start_with_config(yaml: &str, args: &[&str]) -> Agent {
        let mut a = Agent::launch_with_config(yaml, args);
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn start(args: &[&str]) -> Agent {
        Agent::start_env(args, &[])
    }

    /// `start` with extra environment variables (`LLMSLO_*` switches).
    pub fn start_env(args: &[&str], envs: &[(&str, &str)]) -> Agent {
        let mut a = Agent::launch_env(args, envs);
        a.wait_ready(Duration::from_secs(30));
        a
    }

    /// Starts the agent without waiting for it to be ready (for agents that serve TLS, or
    /// that are expected to fail).
    pub fn launch(args: &[&str]) -> Agent {
        Agent::launch_env(args, &[])
    }

    /// `launch` with extra environment variables.
    pub fn launch_env(args: &[&str], envs: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log =
            std::env::temp_dir().join(format!("llmslo-agent-{}-{port}.log", std::process::id()));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawning the agent");
        Agent {
            child,
            addr,
            log,
            config: None,
        }
    }

    /// `launch` with `yaml` as the `--config` file.
    pub fn launch_with_config(yaml: &str, args: &[&str]) -> Agent {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "llmslo-agent-launch-{}-{n}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, yaml).unwrap();
        let mut all = vec!["--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut a = Agent::launch(&all);
        a.config = Some(path);
        a
    }

    fn wait_ready(&mut self, within: Duration) {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("agent exited during start-up ({st}):\n{}", self.log_text());
            }
            if let Ok((200, _)) = http_get(self.addr, "/readyz") {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "agent not ready after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> String {
        let (code, body) = http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path)).unwrap()
    }

    /// Polls /api/v1/requests until `pred` holds for the record list or the time is up.
    pub fn wait_requests(
        &self,
        within: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let t0 = Instant::now();
        loop {
            let v = self.get_json("/api/v1/requests?limit=100000");
            let recs = v["requests"].as_array().cloned().unwrap_or_default();
            if pred(&recs) || t0.elapsed() > within {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls /metrics until `pred` holds for the exposition or the time is up (counters the
    /// reader refreshes at its housekeeping, every 500 ms, lag the records).
    pub fn wait_metrics(&self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let m = self.get("/metrics");
            if pred(&m) || t0.elapsed() > within {
                return m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then how long the agent took to exit, and whether it exited cleanly (`None`:
    /// not within 10 s, then killed).
    pub fn stop_timed(&mut self) -> Option<(Duration, bool)> {
        // SAFETY: kill with a valid pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some((t0.elapsed(), st.success()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        None
    }

    /// SIGTERM and wait; returns the exit status success.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill with a valid pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        if let Some(p) = &self.config {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// GET over a fresh connection; returns (status, body), a chunked body decoded.
pub use testbed::http::get as http_get;

/// The sum over its label sets of a labelled metric family in an exposition.
pub fn family_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `promtool check metrics` on an exposition; panics with its complaints.
pub fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool missing: make test installs Debian's prometheus package");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub mod apiserver;
pub mod node;
pub mod prom;
pub mod tls;

/// The agent's TTFT agrees with the client's within 1 ms + 2 %. When the client read its first
/// content event together with later ones, it only knows the arrival to within an interval
/// (`ttft_floor_ns`, `ttft_ns`]: then the agent must fall inside that interval, widened alike.
pub fn ttft_agrees(agent_ms: f64, c: &testbed::ClientRecord) -> bool {
    let Some(upper) = c.ttft_ns.map(|v| v as f64 / 1e6) else {
        return false;
    };
    let tol = |v: f64| 1.0 + 0.02 * v;
    if (agent_ms - upper).abs() <= tol(upper) {
        return true;
    }
    match c.ttft_floor_ns.map(|v| v as f64 / 1e6) {
        Some(floor) => agent_ms >= floor - tol(floor) && agent_ms <= upper + tol(upper),
        None => false,
    }
}

/// The value of the first exposition line that starts with `series` (name and labels).
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A number field of `/proc/<pid>/status` (`key` with its colon, e.g. `"VmRSS:"`; kB for sizes).
pub fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// An agent's open file descriptors, those it keeps on target threads' `schedstat` files (the
/// run-queue counters keep up to 512 open, one a live target thread) counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fds {
    /// Every other open fd: sockets, the BPF objects, event fds, ...
    pub other: usize,
    /// `schedstat` files of threads that still exist.
    pub schedstat: usize,
    /// `schedstat` files of threads that have ended (closed at the next reading, 2 s).
    pub ended: usize,
}

/// `pid`'s open fds, sorted as [`Fds`] says.
pub fn fds_apart(pid: u32) -> Fds {
    let mut f = Fds {
        other: 0,
        schedstat: 0,
        ended: 0,
    };
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(link) = std::fs::read_link(e.path()) else {
            f.other += 1; // closed since the listing
            continue;
        };
        let link = link.to_string_lossy();
        let path = link.strip_suffix(" (deleted)").unwrap_or(&link);
        match path.strip_suffix("/schedstat") {
            Some(task) if path.starts_with("/proc/") && task.contains("/task/") => {
                if std::path::Path::new(task).exists() {
                    f.schedstat += 1;
                } else {
                    f.ended += 1;
                }
            }
            _ => f.other += 1,
        }
    }
    f
}
