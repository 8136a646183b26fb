//! Kernel feature probing: which hooks this node really offers, and what the agent does
//! without the ones that are missing. Also mounts tracefs/bpffs when they are absent.

use std::mem::MaybeUninit;
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::OpenObject;
use serde::Serialize;

use crate::skel::probe::ProbeSkelBuilder;

#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub available: bool,
    pub detail: String,
    /// What the agent uses it for, or does instead when it is missing.
    pub role: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub kernel: String,
    pub features: Vec<Feature>,
}

impl ProbeReport {
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.available)
    }
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs and bpffs if they are missing (needs CAP_SYS_ADMIN; harmless if it fails).
pub fn ensure_mounts() {
    use nix::mount::{mount, MsFlags};
    if !Path::new(TRACEFS).join("events").exists() {
        let r = mount(
            Some("tracefs"),
            TRACEFS,
            Some("tracefs"),
            MsFlags::empty(),
            None::<&str>,
        );
        tracing::info!(ok = r.is_ok(), "mounting tracefs at {TRACEFS}");
    }
    if !is_bpffs("/sys/fs/bpf") {
        let r = mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        );
        tracing::info!(ok = r.is_ok(), "mounting bpffs at /sys/fs/bpf");
    }
}

fn is_bpffs(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(path) && l.split(' ').nth(2) == Some("bpf"))
        })
        .unwrap_or(false)
}

fn tracepoint(cat_name: &str) -> bool {
    Path::new(TRACEFS)
        .join("events")
        .join(cat_name)
        .join("id")
        .exists()
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Parses "6.18.44-foo" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Loads each probe program on its own and attaches it where that is side-effect free.
fn try_prog(name: &str) -> Result<(), String> {
    let mut obj = MaybeUninit::<OpenObject>::uninit();
    let mut open = ProbeSkelBuilder::default()
        .open(&mut obj)
        .map_err(|e| e.to_string())?;
    for mut p in open.open_object_mut().progs_mut() {
        let keep = p.name().to_string_lossy() == name;
        p.set_autoload(keep);
    }
    let skel = open.load().map_err(|e| format!("load: {e}"))?;
    let prog = skel
        .object()
        .progs_mut()
        .find(|p| p.name().to_string_lossy() == name)
        .ok_or("program missing")?;
    // tc and netfilter programs need a device or hook to attach to; loading proves support.
    if name == "probe_tc" || name == "probe_netfilter" {
        return Ok(());
    }
    prog.attach().map(drop).map_err(|e| format!("attach: {e}"))
}

pub fn run() -> ProbeReport {
    ensure_mounts();
    let kernel = kernel_release();
    let ver = kernel_version(&kernel).unwrap_or((0, 0));
    let mut f = Vec::new();
    let mut add = |name, available: bool, detail: String, role| {
        f.push(Feature {
            name,
            available,
            detail,
            role,
        })
    };
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    add(
        "btf",
        btf,
        "/sys/kernel/btf/vmlinux".into(),
        "CO-RE relocations; required",
    );
    let tracefs = Path::new(TRACEFS).join("events").exists();
    add(
        "tracefs",
        tracefs,
        TRACEFS.into(),
        "tracepoint attach; required",
    );
    for (name, tp, role) in [
        (
            "tp_syscalls",
            "syscalls/sys_enter_read",
            "request/response bytes and timing; required",
        ),
        (
            "tp_sk_data_ready",
            "sock/sk_data_ready",
            "sock_queued (socket_wait stage); without it socket_wait is absent",
        ),
        (
            "tp_inet_sock_set_state",
            "sock/inet_sock_set_state",
            "TCP lifecycle (handshake, accept_wait)",
        ),
        (
            "tp_tcp_retransmit_skb",
            "tcp/tcp_retransmit_skb",
            "retransmit counts",
        ),
        (
            "tp_netif_receive_skb",
            "net/netif_receive_skb",
            "passive packet timing where tc is not attached",
        ),
        (
            "tp_sched_process_exec",
            "sched/sched_process_exec",
            "fast discovery of new servers (else /proc polling)",
        ),
    ] {
        add(name, tracepoint(tp), tp.to_string(), role);
    }
    for (name, prog, role) in [
        (
            "tracepoint_prog",
            "probe_tracepoint",
            "all tracepoint programs",
        ),
        (
            "kprobe",
            "probe_kprobe",
            "optional faster hooks on tcp_sendmsg/tcp_recvmsg; tracepoints are used instead",
        ),
        (
            "fentry",
            "probe_fentry",
            "optional faster hooks; tracepoints are used instead",
        ),
        (
            "tp_btf",
            "probe_tp_btf",
            "typed tracepoints: reads and writes from the socket layer (the default where \
             sock/sock_send_length, sock/sock_recv_length and tcp/tcp_sendmsg_locked exist), \
             the raw syscall hooks (LLMSLO_SYSCALL_HOOKS=raw)",
        ),
        ("raw_tracepoint", "probe_raw_tp", "fallback for tp_btf"),
        (
            "tc_program",
            "probe_tc",
            "packet timestamps at CNI hook points",
        ),
        (
            "netfilter_link",
            "probe_netfilter",
            "load-balancing (DNAT) hop; without it load_balancing is absent",
        ),
    ] {
        let r = try_prog(prog);
        add(
            name,
            r.is_ok(),
            r.err().unwrap_or_else(|| "loads and attaches".into()),
            role,
        );
    }
    add(
        "tcx",
        ver >= (6, 6),
        format!("kernel {}.{} (tcx needs >= 6.6)", ver.0, ver.1),
        "ordered tc attachment that coexists with Cilium; classic clsact below 6.6",
    );
    let uprobe = Path::new("/sys/bus/event_source/devices/uprobe/type").exists();
    add(
        "uprobe",
        uprobe,
        "/sys/bus/event_source/devices/uprobe".into(),
        "CUDA and libssl uprobes",
    );
    // SAFETY: libbpf_probe_bpf_map_type only reads its arguments; a null opts is allowed.
    let rb = unsafe {
        libbpf_rs::libbpf_sys::libbpf_probe_bpf_map_type(
            libbpf_rs::libbpf_sys::BPF_MAP_TYPE_RINGBUF,
            std::ptr::null(),
        )
    } == 1;
    add(
        "ringbuf",
        rb,
        "BPF_MAP_TYPE_RINGBUF".into(),
        "event transport; required",
    );
    ProbeReport {
        kernel,
        features: f,
    }
}

pub fn print_text(r: &ProbeReport) {
    println!("kernel {}", r.kernel);
    for f in &r.features {
        println!(
            "  {:<24} {:<4} {:<48} {}",
            f.name,
            if f.available { "yes" } else { "no" },
            truncate(&f.detail, 48),
            f.role
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
