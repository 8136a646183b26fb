//! Which interfaces get packet hooks: the `cni-adapters` crate detects the node's CNI and plans
//! hook points from sysfs and the CNI config; the agent's config can force the adapter, add
//! pod-veth prefixes, and name node devices the planner cannot guess. Of the pod veths, only
//! those of pods with a target are hooked (`podnet`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cni_adapters::sysfs::{files_stamp, read_node_view, FilesStamp, Paths};
use cni_adapters::{detect, plan as cni_plan, Cni, HookPoint, PlanOptions};
use serde::Serialize;

use crate::netpath::{HookSpec, Role};
use crate::rtnl::Watch;

#[derive(Debug, Clone, Default, PartialEq)]
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

/// The node view (interfaces, routes, CNI files) is read again at least this often.
pub const REREAD: Duration = Duration::from_secs(30);

/// The rtnetlink groups whose announcements change the plan: interfaces (a pod's veth made or
/// removed, up or down, moved under a bridge), addresses, routes (the default route's device),
/// and namespace ids (which namespace a veth's peer is in).
const GROUPS: [u32; 6] = [
    libc::RTNLGRP_LINK,
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV6_IFADDR,
    libc::RTNLGRP_IPV4_ROUTE,
    libc::RTNLGRP_IPV6_ROUTE,
    libc::RTNLGRP_NSID,
];

/// Plans hooks every scan, reading the node (sysfs, `/proc/net`, CNI files, the veths' peers)
/// only when something in it may have changed: the kernel announced a change of interfaces,
/// addresses, routes or namespace ids, the CNI files look different ([`FilesStamp`]), or
/// [`REREAD`] passed. Reading it was a third of the idle agent's CPU (eight sysfs files per
/// interface, every second, and a node has an interface per pod). What depends on the targets
/// (their namespaces, which pod veths lead there) is worked out every scan.
#[derive(Debug, Default)]
pub struct NetPlanner {
    /// `None` until first used; `Some(None)` when it cannot be opened (then nothing is kept).
    watch: Option<Option<Watch>>,
    kept: Option<Kept>,
    /// Node views read.
    pub reads: u64,
}

#[derive(Debug)]
struct Kept {
    at: Instant,
    files: FilesStamp,
    /// The same config gives the same plan; with another one the node is read again.
    cfg: NetCfg,
    hooks: Vec<HookSpec>,
    peers: Result<BTreeMap<u32, i32>, String>,
    cni: Cni,
    confidence: &'static str,
    evidence: Vec<String>,
    notes: Vec<String>,
}

impl NetPlanner {
    /// Reads the node when needed, detects the CNI and plans the hooks: the node devices, and
    /// the veths of the pods where `target_pids` (under `proc_root`) run.
    pub fn plan(
        &mut self,
        cfg: &NetCfg,
        proc_root: &Path,
        target_pids: impl IntoIterator<Item = u32>,
    ) -> (Vec<HookSpec>, Option<CniReport>) {
        if !cfg.enabled {
            self.kept = None;
            return (Vec::new(), None);
        }
        let mut paths = node_paths(|k| std::env::var(k).ok());
        if let Some(d) = &cfg.cni_conf_dir {
            paths.cni_conf_dir = d.clone();
        }
        if let Some(d) = &cfg.cni_state_root {
            paths.state_root = d.clone();
        }
        let watch = self
            .watch
            .get_or_insert_with(|| match Watch::open(&GROUPS) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::debug!(error = %e, "no rtnetlink announcements: the node is read every scan");
                    None
                }
            })
            .as_ref();
        // Drained every scan, so that what it holds is what happened since the last one.
        let announced = watch.is_none_or(Watch::changed);
        let files = files_stamp(&paths);
        let fresh = self.kept.as_ref().is_some_and(|k| {
            !announced && k.files == files && k.cfg == *cfg && k.at.elapsed() < REREAD
        });
        if !fresh {
            self.kept = None;
            // Taken before the reads: a change during them is announced for the next scan.
            let at = Instant::now();
            self.reads += 1;
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
            // Peers first: listing them gives their namespaces ids, which the targets' lookup
            // needs.
            let peers = super::podnet::peer_netns_ids().map_err(|e| e.to_string());
            self.kept = Some(Kept {
                at,
                files,
                cfg: cfg.clone(),
                hooks,
                peers,
                cni: det.cni,
                confidence: det.confidence,
                evidence: det.evidence,
                notes: p.notes,
            });
        }
        let Some(k) = &self.kept else {
            return (Vec::new(), None);
        };
        let targets = super::podnet::target_netns(proc_root, target_pids);
        let peers = k.peers.clone().map_err(std::io::Error::other);
        let (hooks, pod_veths) = super::podnet::select(k.hooks.clone(), &peers, &targets);
        if let Some(why) = &pod_veths.fallback {
            tracing::debug!(why, "hooking every pod veth");
        }
        let report = CniReport {
            cni: k.cni,
            confidence: k.confidence,
            evidence: k.evidence.clone(),
            notes: k.notes.clone(),
            pod_veths,
        };
        (hooks, Some(report))
    }
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
        let mut p = NetPlanner::default();
        assert!(p
            .plan(&NetCfg::default(), Path::new("/proc"), [])
            .0
            .is_empty());
        assert_eq!(p.reads, 0);
    }

    #[test]
    fn the_node_is_read_again_only_when_it_may_have_changed() {
        let dir = std::env::temp_dir().join(format!("llmslo-netplan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let conf = dir.join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        let cfg = NetCfg {
            enabled: true,
            kernel: (6, 8),
            cni_conf_dir: Some(conf.clone()),
            cni_state_root: Some(dir.clone()),
            ..Default::default()
        };
        let mut p = NetPlanner::default();
        let first = p.plan(&cfg, Path::new("/proc"), []);
        assert_eq!(p.reads, 1);
        // Nothing announced (this test's namespace may see others' changes: then it is read).
        let second = p.plan(&cfg, Path::new("/proc"), []);
        assert!(p.reads <= 2);
        assert_eq!(first.0, second.0);
        let before = p.reads;
        let reads_after = |p: &mut NetPlanner, cfg: &NetCfg| {
            let n = p.reads;
            p.plan(cfg, Path::new("/proc"), []);
            p.reads - n
        };
        // A CNI config written: read again, and it names the CNI.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(conf.join("10-flannel.conflist"), r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#).unwrap();
        assert_eq!(reads_after(&mut p, &cfg), 1);
        assert_eq!(p.kept.as_ref().unwrap().cni, Cni::Flannel);
        // A state path appears.
        std::fs::create_dir_all(dir.join("run/cilium")).unwrap();
        assert_eq!(reads_after(&mut p, &cfg), 1);
        // Another config.
        let other = NetCfg {
            pod_veth_prefixes: vec!["xyz".into()],
            ..cfg.clone()
        };
        assert_eq!(reads_after(&mut p, &other), 1);
        // REREAD passed.
        p.kept.as_mut().unwrap().at -= REREAD;
        assert_eq!(reads_after(&mut p, &other), 1);
        // No announcements to go by: read every time.
        p.watch = Some(None);
        assert_eq!(reads_after(&mut p, &other), 1);
        assert_eq!(reads_after(&mut p, &other), 1);
        assert!(p.reads >= before + 6);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
