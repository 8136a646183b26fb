//! Least privilege: which capabilities this configuration needs, checked against the
//! process's effective set before anything loads, so a missing one is named in the error
//! instead of surfacing as a bare EPERM from bpf(2) or perf_event_open(2).

use crate::config::Config;

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// One capability the configuration needs, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub cap: u32,
    pub name: &'static str,
    /// The Kubernetes spelling (securityContext.capabilities.add).
    pub k8s: &'static str,
    pub why: &'static str,
    /// Another capability that grants the same (CAP_SYS_ADMIN covers BPF and PERFMON).
    pub or: Option<u32>,
}

/// The effective capability set (CapEff of /proc/self/status).
pub fn effective() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&s)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// What `cfg` needs on a kernel of version `kernel`.
pub fn required(cfg: &Config, kernel: (u32, u32)) -> Vec<Need> {
    let mut v = Vec::new();
    if kernel >= (5, 8) {
        v.push(Need {
            cap: CAP_BPF,
            name: "CAP_BPF",
            k8s: "BPF",
            why: "create BPF maps and load programs (bpf(2))",
            or: Some(CAP_SYS_ADMIN),
        });
        v.push(Need {
            cap: CAP_PERFMON,
            name: "CAP_PERFMON",
            k8s: "PERFMON",
            why: "attach tracepoints and read memory from programs (perf_event_open, bpf_probe_read)",
            or: Some(CAP_SYS_ADMIN),
        });
    } else {
        v.push(Need {
            cap: CAP_SYS_ADMIN,
            name: "CAP_SYS_ADMIN",
            k8s: "SYS_ADMIN",
            why: "load BPF programs on kernels before 5.8 (no CAP_BPF there)",
            or: None,
        });
    }
    if cfg.network.enabled {
        v.push(Need {
            cap: CAP_NET_ADMIN,
            name: "CAP_NET_ADMIN",
            k8s: "NET_ADMIN",
            why: "attach tc and netfilter programs (network stages; or set network.enabled: false)",
            or: None,
        });
    }
    if cfg.discovery.auto {
        v.push(Need {
            cap: CAP_SYS_PTRACE,
            name: "CAP_SYS_PTRACE",
            k8s: "SYS_PTRACE",
            why: "read other users' /proc/<pid>/environ and fd links (pod name, listening ports)",
            or: None,
        });
        v.push(Need {
            cap: CAP_DAC_READ_SEARCH,
            name: "CAP_DAC_READ_SEARCH",
            k8s: "DAC_READ_SEARCH",
            why: "read /proc and cgroupfs files owned by other users",
            or: Some(CAP_DAC_OVERRIDE),
        });
    }
    if kernel < (5, 11) {
        v.push(Need {
            cap: CAP_SYS_RESOURCE,
            name: "CAP_SYS_RESOURCE",
            k8s: "SYS_RESOURCE",
            why: "raise RLIMIT_MEMLOCK, which kernels before 5.11 charge BPF maps to",
            or: None,
        });
    }
    v
}

/// The needs `eff` does not meet.
pub fn missing(needs: &[Need], eff: u64) -> Vec<Need> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    needs
        .iter()
        .filter(|n| !has(n.cap) && !n.or.is_some_and(has))
        .cloned()
        .collect()
}

/// The start-up error for missing capabilities: one line per capability, named.
pub fn message(missing: &[Need]) -> String {
    let mut s = format!(
        "missing capabilit{}: {}.",
        if missing.len() == 1 { "y" } else { "ies" },
        missing
            .iter()
            .map(|n| n.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for n in missing {
        s.push_str(&format!("\n  {} is needed to {}", n.name, n.why));
    }
    s.push_str(&format!(
        "\nRun as root, or grant them (Kubernetes: securityContext.capabilities.add: [{}]).",
        missing.iter().map(|n| n.k8s).collect::<Vec<_>>().join(", ")
    ));
    s
}

/// Fails when the effective set lacks a capability `cfg` needs.
pub fn check(cfg: &Config, kernel: (u32, u32)) -> anyhow::Result<()> {
    let Some(eff) = effective() else {
        tracing::warn!("cannot read CapEff from /proc/self/status; not checking capabilities");
        return Ok(());
    };
    let miss = missing(&required(cfg, kernel), eff);
    anyhow::ensure!(miss.is_empty(), "{}", message(&miss));
    Ok(())
}

/// Turns a load failure into an error that says which capability is missing when the kernel
/// answered EPERM (e.g. the bounding set was changed after the start-up check).
pub fn explain_load_error(what: &str, e: &libbpf_rs::Error) -> anyhow::Error {
    let eperm = e.kind() == libbpf_rs::ErrorKind::PermissionDenied
        || e.to_string().contains("Operation not permitted");
    if !eperm {
        return anyhow::anyhow!("loading {what} failed: {e}");
    }
    let eff = effective().unwrap_or(0);
    let needs = required(&Config::default(), (6, 0));
    let bpf: Vec<Need> = missing(&needs, eff)
        .into_iter()
        .filter(|n| n.cap == CAP_BPF || n.cap == CAP_PERFMON)
        .collect();
    if bpf.is_empty() {
        anyhow::anyhow!(
            "loading {what} was refused (EPERM): {e}. Loading needs CAP_BPF and attaching \
             CAP_PERFMON (or CAP_SYS_ADMIN); a seccomp or LSM policy may also deny bpf(2)"
        )
    } else {
        anyhow::anyhow!("loading {what} was refused (EPERM): {}", message(&bpf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c001081004\n";
        let eff = parse_cap_eff(s).unwrap();
        assert!(eff & (1 << CAP_BPF) != 0 && eff & (1 << CAP_PERFMON) != 0);
        assert!(eff & (1 << CAP_SYS_ADMIN) == 0);
    }

    #[test]
    fn names_what_is_missing_and_accepts_sys_admin() {
        let cfg = Config::default();
        let needs = required(&cfg, (6, 18));
        let all: u64 = needs.iter().map(|n| 1u64 << n.cap).sum();
        assert!(missing(&needs, all).is_empty());
        let m = missing(&needs, all & !(1 << CAP_PERFMON));
        assert_eq!(m.len(), 1);
        assert!(message(&m).contains("CAP_PERFMON") && message(&m).contains("PERFMON]"));
        // SYS_ADMIN stands in for BPF and PERFMON.
        let m = missing(
            &needs,
            (all & !(1 << CAP_BPF) & !(1 << CAP_PERFMON)) | 1 << CAP_SYS_ADMIN,
        );
        assert!(m.is_empty(), "{m:?}");
        // No NET_ADMIN needed without the network path; SYS_RESOURCE only before 5.11.
        let mut off = Config::default();
        off.network.enabled = false;
        assert!(!required(&off, (6, 18))
            .iter()
            .any(|n| n.cap == CAP_NET_ADMIN));
        assert!(required(&cfg, (5, 10))
            .iter()
            .any(|n| n.cap == CAP_SYS_RESOURCE));
        assert!(!needs.iter().any(|n| n.cap == CAP_SYS_RESOURCE));
    }
}
