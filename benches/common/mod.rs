//! What the benches that drive the real agent share: the agent as a child process, its
//! endpoints, the kernel's BPF run-time accounting, and the report's provenance lines.
#![allow(dead_code)] // each bench uses its own part

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::{CgroupDriver, Pod, PodCgroup, PodProcess};

/// Set by SIGINT/SIGTERM (see [`catch_signals`]): the bench stops at the next block and cleans up.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`] instead of killing the bench (whose set-up must be undone).
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// The environment variable `name` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` while held; the previous value is restored on drop.
pub struct BpfStats {
    prev: String,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let prev = std::fs::read_to_string(BPF_STATS)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats { prev })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.prev) {
            eprintln!(
                "!!! could not restore kernel.bpf_stats_enabled={}: {e}",
                self.prev
            );
        }
    }
}

/// The agent this workspace built, or the one `LLMSLO_BENCH_AGENT` names (another build, to
/// compare with in the same sitting).
pub fn agent_bin() -> PathBuf {
    std::env::var_os("LLMSLO_BENCH_AGENT")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_llm-slo-agent")))
}

/// The agent, `run --no-auto --target-cgroup <cgroup>`, as a child process; SIGTERM (then
/// SIGKILL) on Drop.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    stopped_ok: Option<bool>,
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Agent {
    pub fn start(cgroup: &str) -> Result<Agent> {
        Agent::start_with(cgroup, None)
    }

    /// The same with a config file of this YAML.
    pub fn start_with(cgroup: &str, config: Option<&str>) -> Result<Agent> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = std::env::temp_dir().join(format!(
            "llmslo-bench-agent-{}-{port}.log",
            std::process::id()
        ));
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run");
        if let Some(yaml) = config {
            let file = log.with_extension("yaml");
            std::fs::write(&file, yaml).context("writing the agent's config")?;
            cmd.arg("--config").arg(file);
        }
        let child = cmd
            .args([
                "--listen",
                &addr.to_string(),
                "--no-auto",
                "--target-cgroup",
                cgroup,
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning the agent")?;
        let mut a = Agent {
            child,
            addr,
            log,
            stopped_ok: None,
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = a.child.try_wait()? {
                bail!("agent exited during start-up ({st}):\n{}", a.log_text());
            }
            if let Ok((200, _)) = http_get(a.addr, "/readyz") {
                return Ok(a);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("agent not ready after 30 s:\n{}", a.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Time on a CPU of the agent's threads, in ns.
    pub fn cpu_ns(&self) -> Result<u64> {
        // Each thread's time on a CPU in ns (`/proc/<pid>/task/<tid>/schedstat`): utime and
        // stime in `/proc/<pid>/stat` come in 10 ms ticks, too coarse for an idle second or a
        // block's ~100 ms. A thread that has exited takes its share with it: only discovery's
        // short-lived threads that enter a pod's network namespace to list its listeners do.
        let mut ns = 0;
        for t in std::fs::read_dir(format!("/proc/{}/task", self.pid()))?.flatten() {
            let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .context("parsing schedstat")?;
        }
        Ok(ns)
    }

    /// Voluntary context switches summed over the agent's threads (each is a sleep, mostly
    /// a wait for the ring buffer that some event's wake-up ended).
    pub fn wakeups(&self) -> u64 {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        dir.flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .filter_map(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }

    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let (code, body) = http_get(self.addr, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body
            .lines()
            .filter(|l| l.starts_with("llmslo_agent_") || l.starts_with("process_"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// Program names the agent reports as attached (`/api/v1/targets`).
    pub fn programs(&self) -> BTreeSet<String> {
        let Ok((200, body)) = http_get(self.addr, "/api/v1/targets") else {
            return BTreeSet::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["programs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["attached"] != false)
                    .filter_map(|p| p["name"].as_str())
                    // The kernel keeps 15 characters of a program's name.
                    .map(|n| n.chars().take(15).collect())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        if let Some(ok) = self.stopped_ok {
            return ok;
        }
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let mut ok = false;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    ok = st.success();
                    break;
                }
                Ok(None) if t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        self.stopped_ok = Some(ok);
        ok
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// GET over a fresh connection; (status, body), a chunked body decoded.
pub use testbed::http::get as http_get;

pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    format!("{} CPUs ({cpu})", sh("nproc", &[]))
}

/// The commit the agent was built from, and whether the working tree differed from it.
pub fn tree() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let head = sh("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    if head.is_empty() {
        return "unknown (not a git checkout)".into();
    }
    let dirty = !sh(
        "git",
        &["-C", dir, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    if dirty {
        format!("`{head}` with uncommitted changes")
    } else {
        format!("`{head}`")
    }
}

/// Replaces the text between the `<!-- {name}:begin -->` and `<!-- {name}:end -->` markers of
/// docs/BENCHMARKS.md (appends the markers when missing). Refuses when the text there has a
/// section heading the report does not: a section written by hand between the markers would
/// be lost (it belongs above them).
pub fn write_doc(name: &str, report: &str) -> Result<PathBuf> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let block = format!("{begin}\n{report}\n{end}");
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            let kept: Vec<&str> = report.lines().filter(|l| l.starts_with("### ")).collect();
            let lost: Vec<&str> = text[a..b]
                .lines()
                .filter(|l| l.starts_with("### ") && !kept.contains(l))
                .collect();
            if !lost.is_empty() {
                bail!(
                    "{}: the {name} markers hold sections this report would overwrite; move \
                     them above {begin}: {lost:?}",
                    path.display()
                );
            }
            format!("{}{block}{}", &text[..a], &text[b + end.len()..])
        }
        _ => format!("{text}\n{block}\n"),
    };
    std::fs::write(&path, new)?;
    Ok(path)
}

/// Where the synthetic server listens in its pod.
pub const PORT: u16 = 8000;

/// The synthetic server in a testbed pod (netns + kubelet-style cgroup). Field order is drop
/// order: the server dies before its cgroup and netns go.
pub struct ServerPod {
    _server: PodProcess,
    pub cg: PodCgroup,
    pub pod: Pod,
}

/// Starts `llmslo-synth-server` with `args` in a new pod named `name`, and waits for its port.
pub fn server_pod(name: &str, args: &[&str]) -> Result<ServerPod> {
    let pod = Pod::create(name).context("creating the pod netns")?;
    let cg = PodCgroup::create(CgroupDriver::Systemd, "burstable").context("pod cgroup")?;
    let mut cmd = Command::new(agent_bin());
    cmd.arg0("llmslo-synth-server")
        .arg("synth-server")
        .args(["--listen", &format!("0.0.0.0:{PORT}")])
        .args(args)
        // Enough slots that the CPU, not the server's queue, is what saturates.
        .args(["--concurrency", "4096"])
        // Safety net should this process die without dropping the pod.
        .args(["--max-runtime-s", "1200"])
        .env("HOSTNAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = pod.spawn(cmd, Some(&cg)).context("spawning the server")?;
    pod.wait_for_port(PORT, Duration::from_secs(10))
        .context("server listening")?;
    Ok(ServerPod {
        _server: server,
        cg,
        pod,
    })
}
