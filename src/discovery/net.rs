//! Which interfaces get packet hooks: the `cni-adapters` crate detects the node's CNI and plans
//! hook points from sysfs and the CNI config; the agent's config can force the adapter, add
//! pod-veth prefixes, and name node devices the planner cannot guess. Of the pod veths, only
//! those of pods with a target are hooked (`podnet`).

use std::path::{Path, PathBuf};

use cni_adapters::sysfs::{read_node_view, Paths};
use cni_adapters::{detect, plan as cni_plan, Cni, HookPoint, PlanOptions};
use serde::Serialize;

use crate::netpath::{HookSpec, Role};

#[derive(Debug, Clone, Default)]
pub struct NetCfg {
    pub enabled: bool,
    /// Node ingress devices by name, on top of what the planner picks.
    pub node_devices: Vec<String>,
    /// Extra name prefixes of pods' host-side veths.
    pub pod_veth_prefixes: Vec<String>,
    /// Force an adapter instead of detecting it.
    pub cni: Option<Cni>,
    pub kernel: (u32, u32),
    pub tcx: bool,
    pub netfilter: bool,
    /// From the config; they win over the environment ([`node_paths`]).
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_state_root: Option<PathBuf>,
}

/// Where the node's CNI config lives when not at `/etc/cni/net.d`, e.g. the host's directory
/// mounted into the agent's container at `/host/etc/cni/net.d`.
pub const ENV_CNI_CONF_DIR: &str = "LLMSLO_CNI_CONF_DIR";
/// The root under which the CNI state paths (`/run/flannel/subnet.env`, `/var/run/calico`,
/// `/run/cilium`) are looked up, when not `/`.
pub const ENV_CNI_STATE_ROOT: &str = "LLMSLO_CNI_STATE_ROOT";

/// The host's paths, with the CNI config directory and state root taken from
/// [`ENV_CNI_CONF_DIR`] and [`ENV_CNI_STATE_ROOT`] where they are set. Interfaces and routes
/// always come from the agent's own sysfs and procfs: they are its network namespace's.
pub fn node_paths(env: impl Fn(&str) -> Option<String>) -> Paths {
    let mut p = Paths::host();
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = set(ENV_CNI_CONF_DIR) {
        p.cni_conf_dir = d;
    }
    if let Some(d) = set(ENV_CNI_STATE_ROOT) {
        p.state_root = d;
    }
    p
}

/// What `/api/v1/targets` says about the CNI.
#[derive(Debug, Clone, Serialize)]
pub struct CniReport {
    pub cni: Cni,
    pub confidence: &'static str,
    pub evidence: Vec<String>,
    pub notes: Vec<String>,
    /// Which pod veths are hooked, and why all of them when they are.
    pub pod_veths: super::podnet::PodVeths,
}

/// Hooks for the plan's devices, with `node_devices` forced to the node role.
pub fn hooks_from_plan(
    cfg: &NetCfg,
    plan: &cni_adapters::HookPlan,
    ifindex_of: impl Fn(&str) -> Option<u32>,
) -> Vec<HookSpec> {
    let mut out: Vec<HookSpec> = plan
        .hooks
        .iter()
        .filter(|h| {
            h.attach != cni_adapters::Attach::Passive && !cfg.node_devices.contains(&h.ifname)
        })
        .map(|h| HookSpec {
            ifindex: h.ifindex,
            ifname: h.ifname.clone(),
            role: match h.point {
                HookPoint::NodeIngress | HookPoint::Overlay => Role::Node,
                HookPoint::PodVeth => Role::PodVeth,
            },
        })
        .collect();
    out.extend(cfg.node_devices.iter().filter_map(|n| {
        Some(HookSpec {
            ifindex: ifindex_of(n)?,
            ifname: n.clone(),
            role: Role::Node,
        })
    }));
    out.sort();
    out
}

/// Reads the node, detects the CNI and plans the hooks: the node devices, and the veths of the
/// pods where `target_pids` (under `proc_root`) run.
pub fn plan(
    cfg: &NetCfg,
    proc_root: &Path,
    target_pids: impl IntoIterator<Item = u32>,
) -> (Vec<HookSpec>, Option<CniReport>) {
    if !cfg.enabled {
        return (Vec::new(), None);
    }
    let mut paths = node_paths(|k| std::env::var(k).ok());
    if let Some(d) = &cfg.cni_conf_dir {
        paths.cni_conf_dir = d.clone();
    }
    if let Some(d) = &cfg.cni_state_root {
        paths.state_root = d.clone();
    }
    let tcx = cfg.tcx && !crate::netpath::clsact_forced();
    let view = match read_node_view(&paths, cfg.kernel, tcx, cfg.netfilter) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the node's interfaces: no packet hooks");
            return (Vec::new(), None);
        }
    };
    let det = detect(&view, cfg.cni);
    let opts = PlanOptions {
        extra_pod_veth_prefixes: cfg.pod_veth_prefixes.clone(),
        ..Default::default()
    };
    let p = cni_plan(&view, &det, &opts);
    let hooks = hooks_from_plan(cfg, &p, |n| view.iface(n).map(|i| i.ifindex));
    // Peers first: listing them gives their namespaces ids, which the targets' lookup needs.
    let peers = super::podnet::peer_netns_ids();
    let targets = super::podnet::target_netns(proc_root, target_pids);
    let (hooks, pod_veths) = super::podnet::select(hooks, &peers, &targets);
    if let Some(why) = &pod_veths.fallback {
        tracing::debug!(why, "hooking every pod veth");
    }
    let report = CniReport {
        cni: det.cni,
        confidence: det.confidence,
        evidence: det.evidence,
        notes: p.notes,
        pod_veths,
    };
    (hooks, Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cni_adapters::{Attach, Hook, HookPlan};

    fn hook(name: &str, idx: u32, point: HookPoint, attach: Attach) -> Hook {
        Hook {
            ifname: name.into(),
            ifindex: idx,
            point,
            ingress: true,
            egress: true,
            attach,
            why: String::new(),
        }
    }

    #[test]
    fn plan_hooks_map_to_roles_and_node_devices_win() {
        let plan = HookPlan {
            cni: Cni::Flannel,
            hooks: vec![
                hook("eth0", 2, HookPoint::NodeIngress, Attach::Tcx),
                hook("flannel.1", 3, HookPoint::Overlay, Attach::Tcx),
                hook("veth1", 7, HookPoint::PodVeth, Attach::Tcx),
                hook("veth2", 8, HookPoint::PodVeth, Attach::Tcx),
                hook("veth3", 9, HookPoint::PodVeth, Attach::Passive),
            ],
            netfilter_dnat: true,
            notes: vec![],
        };
        let cfg = NetCfg {
            enabled: true,
            node_devices: vec!["veth2".into(), "gone0".into()],
            ..Default::default()
        };
        let got: Vec<(String, Role)> =
            hooks_from_plan(&cfg, &plan, |n| (n == "veth2").then_some(8))
                .into_iter()
                .map(|h| (h.ifname, h.role))
                .collect();
        assert_eq!(
            got,
            vec![
                ("eth0".into(), Role::Node),
                ("flannel.1".into(), Role::Node),
                ("veth1".into(), Role::PodVeth),
                ("veth2".into(), Role::Node),
            ]
        );
    }

    #[test]
    fn node_paths_take_the_cni_dirs_from_the_environment() {
        let env = |k: &str| match k {
            ENV_CNI_CONF_DIR => Some("/host/etc/cni/net.d".to_string()),
            ENV_CNI_STATE_ROOT => Some(String::new()),
            _ => None,
        };
        let p = node_paths(env);
        assert_eq!(p.cni_conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(p.state_root, Paths::host().state_root, "empty means unset");
        assert_eq!(p.sys_class_net, Paths::host().sys_class_net);
        assert_eq!(node_paths(|_| None), Paths::host());
    }

    #[test]
    fn disabled_plans_nothing() {
        assert!(plan(&NetCfg::default(), Path::new("/proc"), [])
            .0
            .is_empty());
    }
}
