//! Simulated Kubernetes node for the agent's tests and `demo`: network namespaces as
//! pods, kubelet-style cgroups, a synthetic OpenAI-compatible server that logs when it
//! wrote every byte (ground truth), and a load generator that logs when it read them.
//!
//! Everything here touches the real kernel (DESIGN.md §6); most of it needs root.

pub mod cgroup;
pub mod http;
pub mod loadgen;
mod loadgen_conn;
pub mod netns;
mod rng;
pub mod sidecar;
pub mod synth;
mod synth_handle;
pub mod synth_metrics;
mod synth_plan;
pub mod topo;

pub use cgroup::{cgroup2_mount, CgroupDriver, PodCgroup, Qos};
pub use loadgen::{ClientRecord, LoadConfig, Route};
pub use netns::{cleanup_stale, Pod, PodProcess, PREFIX};
pub use synth::{read_server_log, synth_main, ServerRecord, SynthArgs, Syscall, WriteMode};

use anyhow::{bail, Result};

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` uses, so timestamps
/// taken here compare directly with the agent's kernel timestamps (DESIGN.md §3).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Err with a clear message unless we run as root (namespaces, veths, cgroups and
/// BPF all need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the testbed needs root (creates network namespaces, veths and cgroups); \
             running as uid {euid}"
        );
    }
    Ok(())
}

/// For tests: true when the test should be skipped because we are not root. Prints a
/// loud message so a skipped run is never mistaken for a pass. With
/// `LLMSLO_REQUIRE_BPF=1` a missing root is a failure instead (CI on a privileged box).
pub fn skip_unless_root(test: &str) -> bool {
    match require_root() {
        Ok(()) => false,
        Err(e) => {
            if std::env::var("LLMSLO_REQUIRE_BPF").as_deref() == Ok("1") {
                panic!("{test}: LLMSLO_REQUIRE_BPF=1 but {e:#}");
            }
            // Written to the stderr handle, not via eprintln!, which libtest captures
            // and hides for passing tests: a skip must be visible in every run.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "!!!!!!!! SKIPPED {test}: {e:#} !!!!!!!!");
            true
        }
    }
}

/// Random bytes from the kernel (getrandom(2)); used for pod uids and container ids so
/// that parallel test processes never collide.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer/length pair describes the unfilled tail of `buf`.
        let n = unsafe {
            libc::getrandom(
                buf[filled..].as_mut_ptr().cast(),
                N - filled,
                0, // blocking pool is fine: the machine has long been up
            )
        };
        if n > 0 {
            filled += n as usize;
        }
    }
    buf
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a process with this pid is running (kill(pid, 0); EPERM still means it
/// exists). A zombie counts as dead: its resources are gone, and where init does not
/// reap (some sandboxes), a crashed test's pid would otherwise look alive forever.
pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence; nothing is delivered.
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // State is the first field after the parenthesised comm (which may contain spaces).
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z') | Some('X'))
}
