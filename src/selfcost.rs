//! What the agent costs its node, as it measures itself on `/metrics`: its process's CPU time,
//! memory and file descriptors (the `process_*` series every Prometheus client library exports,
//! so that the usual dashboards and alerts work), and each of its BPF programs' runs and run
//! time (`bpf_prog_info`), which the kernel counts only while its run-time accounting is on:
//! `kernel.bpf_stats_enabled=1`, or the agent's `bpf_stats: true`, which turns it on for as long
//! as the agent runs (BPF_ENABLE_STATS) and leaves the sysctl alone. The accounting costs every
//! BPF program run on the node two clock reads (35–90 ns a run measured here: docs/BENCHMARKS.md,
//! "The accounting's own share"), so it is off unless asked for.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{bail, Result};
use libbpf_rs::libbpf_sys;

use crate::loader::VerifierStats;
use crate::stats::prom::{write_counter, write_gauge};

/// Turns the kernel's run-time accounting on for as long as the returned fd stays open
/// (BPF_ENABLE_STATS), whatever the sysctl says.
pub fn stats_on() -> Result<OwnedFd> {
    // SAFETY: a plain syscall wrapper; a non-negative return is a new fd we then own.
    let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: the fd was just returned to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `kernel.bpf_stats_enabled` is set (the sysctl; a BPF_ENABLE_STATS handle, ours or
/// another tool's, does not show there).
pub fn sysctl_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// The kernel's `bpf_prog_info` of a loaded program.
pub fn prog_info(fd: BorrowedFd<'_>) -> Option<libbpf_sys::bpf_prog_info> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: `info` is a bpf_prog_info of `len` bytes; the kernel fills at most that.
    let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    (rc == 0).then_some(info)
}

/// A loaded program's own fd, duplicated at load (the program stays loaded while it is held):
/// its run counters are read through it at each scrape.
#[derive(Debug, Clone)]
pub struct ProgFd(Arc<OwnedFd>);

impl ProgFd {
    pub fn dup(fd: BorrowedFd<'_>) -> Option<ProgFd> {
        fd.try_clone_to_owned().ok().map(|f| ProgFd(Arc::new(f)))
    }

    /// (runs, run time in ns) so far, counted while the accounting was on.
    pub fn runs(&self) -> Option<(u64, u64)> {
        use std::os::fd::AsFd;
        prog_info(self.0.as_fd()).map(|i| (i.run_cnt, i.run_time_ns))
    }
}

impl PartialEq for ProgFd {
    fn eq(&self, o: &ProgFd) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}

impl Eq for ProgFd {}

/// The process's own figures, from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Process {
    /// User + system CPU time of all its threads, seconds.
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// This process's figures (getrusage, /proc/self/statm and fd, getrlimit); a figure that cannot
/// be read is 0.
pub fn process() -> Process {
    let mut p = Process::default();
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        p.cpu_s = tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    if let Ok(s) = std::fs::read_to_string("/proc/self/statm") {
        let mut f = s.split_ascii_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        p.vsize_bytes = f.next().unwrap_or(0) * page;
        p.rss_bytes = f.next().unwrap_or(0) * page;
    }
    // Less the read_dir's own fd.
    p.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64);
    // SAFETY: getrlimit fills the struct it is given.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        p.max_fds = rl.rlim_cur;
    }
    p
}

/// The fields of /proc/<pid>/stat from field 3 (the state) on, as numbers (0 for one that is
/// not: the state letter); `fields[n - 3]` is field `n` as proc(5) numbers them. None when
/// there is no such process.
pub fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(
        rest.split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect(),
    )
}

/// When `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat); None when
/// there is no such process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(22 - 3).copied()
}

/// The CPU time `pid` has had, user and system (fields 14 and 15 of /proc/<pid>/stat: clock
/// ticks, rounded down by the kernel), in seconds; None when there is no such process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((f.get(14 - 3)? + f.get(15 - 3)?) as f64 / hz)
}

/// When this process started (Unix seconds): its start in clock ticks after boot
/// ([`start_ticks`]) plus the boot time (/proc/stat `btime`), read once; a fixed value, as
/// restart alerts (`changes(process_start_time_seconds[…])`) expect. The first call's wall
/// clock if they cannot be read.
pub fn process_start_unix() -> f64 {
    static START: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        let from_proc = || -> Option<f64> {
            let ticks = start_ticks(std::process::id())? as f64;
            let btime: f64 = std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("btime "))?
                .trim()
                .parse()
                .ok()?;
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            (hz > 0).then(|| btime + ticks / hz as f64)
        };
        from_proc().unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        })
    })
}

/// The `process_*` series (Prometheus client conventions) for `p`, started at `start_unix_s`.
pub fn render_process(p: &Process, start_unix_s: f64, out: &mut String) {
    write_counter(
        out,
        "process_cpu_seconds_total",
        "Total user and system CPU time spent by the agent, in seconds.",
        &[(&[], p.cpu_s)],
    );
    for (name, help, v) in [
        (
            "process_resident_memory_bytes",
            "Resident memory size of the agent, in bytes.",
            p.rss_bytes as f64,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size of the agent, in bytes.",
            p.vsize_bytes as f64,
        ),
        (
            "process_open_fds",
            "Open file descriptors of the agent.",
            p.open_fds as f64,
        ),
        (
            "process_max_fds",
            "The agent's limit on open file descriptors.",
            p.max_fds as f64,
        ),
        (
            "process_start_time_seconds",
            "Start time of the agent since the Unix epoch, in seconds.",
            start_unix_s,
        ),
    ] {
        write_gauge(out, name, help, &[(&[], v)]);
    }
}

/// Each loaded program's runs and run time, and whether the accounting is on (`held`: the
/// agent holds a BPF_ENABLE_STATS handle).
pub fn render_programs(progs: &[VerifierStats], held: bool, out: &mut String) {
    let on = held || sysctl_on();
    write_gauge(
        out,
        "llmslo_agent_bpf_stats_enabled",
        "1 while kernel.bpf_stats_enabled is set or the agent holds the kernel's run-time \
         accounting on (bpf_stats); another process holding it on (bpftool, bpftop) also makes \
         the run counters move, and is not seen here.",
        &[(&[], if on { 1.0 } else { 0.0 })],
    );
    // A program whose counters cannot be read has no sample (a 0 would read as a reset).
    type Labels<'a> = [(&'a str, &'a str); 2];
    let (labels, runs): (Vec<Labels>, Vec<(u64, u64)>) = progs
        .iter()
        .filter_map(|v| {
            let r = v.fd.as_ref()?.runs()?;
            Some(([("object", v.object), ("program", v.program.as_str())], r))
        })
        .unzip();
    let rows = |f: &dyn Fn(&(u64, u64)) -> f64| -> Vec<(&[(&str, &str)], f64)> {
        labels.iter().zip(&runs).map(|(l, r)| (&l[..], f(r))).collect()
    };
    write_counter(
        out,
        "llmslo_agent_bpf_program_runs_total",
        "Runs of each of the agent's BPF programs (every hook invocation, for any process on the \
         node: the target filter runs inside), counted while llmslo_agent_bpf_stats_enabled is 1.",
        &rows(&|r| r.0 as f64),
    );
    write_counter(
        out,
        "llmslo_agent_bpf_program_run_seconds_total",
        "CPU time spent in each of the agent's BPF programs (charged to whichever task ran the \
         hook), counted while llmslo_agent_bpf_stats_enabled is 1.",
        &rows(&|r| r.1 as f64 / 1e9),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_are_this_process() {
        let before = process();
        // Burn a little CPU and hold a few more fds.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        // Tests run on threads of one process that open and close files too: many more.
        let files: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/statm").unwrap())
            .collect();
        let after = process();
        assert!(after.cpu_s > before.cpu_s, "{before:?} {after:?}");
        // /proc's figure is the same time in clock ticks, rounded down: at most a tick (10 ms)
        // under getrusage's per thread, of which the test harness runs a few.
        let proc_s = cpu_seconds(std::process::id()).unwrap();
        let later = process();
        assert!(
            proc_s <= later.cpu_s + 0.01 && proc_s > after.cpu_s - 0.1,
            "/proc/self/stat {proc_s} s, getrusage {} .. {} s",
            after.cpu_s,
            later.cpu_s
        );
        assert!(cpu_seconds(u32::MAX).is_none() && start_ticks(u32::MAX).is_none());
        assert!(after.rss_bytes > 0 && after.vsize_bytes >= after.rss_bytes, "{after:?}");
        assert!(after.open_fds >= before.open_fds + 32, "{before:?} {after:?}");
        assert!(after.max_fds >= after.open_fds, "{after:?}");
        drop(files);
        let mut out = String::new();
        render_process(&after, 1_700_000_000.5, &mut out);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"), "{out}");
        assert!(out.contains("\nprocess_start_time_seconds 1700000000.5\n"), "{out}");
        let rss = out
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap();
        assert_eq!(rss.parse::<f64>().unwrap(), after.rss_bytes as f64);
    }

    #[test]
    fn the_start_time_is_this_process_and_fixed() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let s = process_start_unix();
        // Clock ticks (10 ms) and btime (whole seconds) round it.
        assert!(s <= now + 1.0 && s > now - 600.0, "start {s}, now {now}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(process_start_unix(), s);
    }

    #[test]
    fn programs_without_a_handle_have_no_sample() {
        let v = VerifierStats {
            object: "l7",
            program: "sock_send".into(),
            verified_insns: 1,
            xlated_insns: 1,
            jited_bytes: 1,
            fd: None,
        };
        let mut out = String::new();
        render_programs(&[v], true, &mut out);
        assert!(out.contains("\nllmslo_agent_bpf_stats_enabled 1\n"), "{out}");
        assert!(
            out.contains("# TYPE llmslo_agent_bpf_program_runs_total counter\n")
                && !out.contains("sock_send"),
            "{out}"
        );
    }
}
