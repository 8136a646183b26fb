//! Hook planning: which devices get packet-timestamp hooks, in which direction, attached how.

use crate::{Cni, Detection, Iface, NodeView};
use serde::Serialize;
use std::collections::HashSet;

/// Default clsact filter priority. In a clsact chain lower numbers run first, and a
/// direct-action program that returns a verdict (TC_ACT_OK, SHOT, REDIRECT) ends the walk:
/// filters after it never see the packet. Cilium's filters (priority 1, its default) return
/// TC_ACT_OK for nearly every packet, so a filter of ours at a higher number would see almost
/// nothing on Cilium's devices. So we go first, at 1, and our programs always return
/// TC_ACT_UNSPEC (-1), which is no verdict: the walk continues to the next filter and the CNI's
/// programs decide every packet's fate exactly as without us. At the same priority as Cilium our
/// filter joins its cls_bpf instance (same kind, protocol all, another handle), where a newer
/// filter runs before older ones.
pub const DEFAULT_CLSACT_PRIORITY: u16 = 1;

/// Kernel that introduced tcx, for the note when the probe and the version disagree.
const TCX_KERNEL: (u32, u32) = (6, 6);
/// Kernel that introduced netfilter BPF links.
const NETFILTER_LINK_KERNEL: (u32, u32) = (6, 4);

/// Veths that are never a pod's host side. cilium_host/cilium_net are the veth pair Cilium
/// routes host traffic through (both ends in the host). lxc_health is the host side of
/// cilium-health's endpoint: it carries only Cilium's node-to-node health probes, never a
/// workload's requests, so hooking it would cost per-packet work for stamps nothing consumes.
const NEVER_POD_VETH: [&str; 3] = ["cilium_host", "cilium_net", "lxc_health"];

/// Where a hook sits on the request's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    /// The NIC (or uplink) with the default route: node_in on ingress, node_out on egress.
    NodeIngress,
    /// Host side of a pod's veth: pod_in on egress (toward the pod), pod_out on ingress (from it).
    PodVeth,
    /// A VXLAN/IPIP/Geneve device: inner headers of pod traffic between nodes.
    Overlay,
}

/// How the loader attaches the hook's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// A tcx link, prepended (BPF_F_BEFORE, no anchor) so ours runs first; our programs return
    /// TCX_NEXT, so the programs after ours (the CNI's) still run and decide.
    Tcx,
    /// A clsact direct-action filter at this priority (see [`DEFAULT_CLSACT_PRIORITY`]).
    ClsAct { priority: u16 },
    /// Nothing attached to the device: `net/netif_receive_skb` and `net/net_dev_xmit`
    /// tracepoints, filtered to this ifindex.
    Passive,
}

/// One device to hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hook {
    pub ifname: String,
    pub ifindex: u32,
    pub point: HookPoint,
    pub ingress: bool,
    pub egress: bool,
    pub attach: Attach,
    /// Why this device was chosen, for `probe` and the targets API.
    pub why: String,
}

impl Hook {
    /// What identifies an attachment: everything but `why`. The ifindex is part of it because a
    /// pod veth re-created under the same name is a new device that needs a new attachment.
    fn key(&self) -> (&str, u32, HookPoint, bool, bool, Attach) {
        let h = self;
        (&h.ifname, h.ifindex, h.point, h.ingress, h.egress, h.attach)
    }
}

/// The hooks for one node, and what the loader should know about them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookPlan {
    pub cni: Cni,
    pub hooks: Vec<Hook>,
    /// Attach netfilter BPF links before and after DNAT (the load-balancing hop).
    pub netfilter_dnat: bool,
    pub notes: Vec<String>,
}

impl HookPlan {
    pub fn hook(&self, ifname: &str) -> Option<&Hook> {
        self.hooks.iter().find(|h| h.ifname == ifname)
    }

    pub fn at(&self, point: HookPoint) -> impl Iterator<Item = &Hook> {
        self.hooks.iter().filter(move |h| h.point == point)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// Attach nothing to the packet path: tracepoints only (no tc, no netfilter links).
    pub passive_only: bool,
    /// clsact filter priority on kernels without tcx; 0 means the default.
    pub clsact_priority: u16,
    /// Extra host-side veth name prefixes that are pods' (for CNIs we do not know by name).
    pub extra_pod_veth_prefixes: Vec<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            passive_only: false,
            clsact_priority: DEFAULT_CLSACT_PRIORITY,
            extra_pod_veth_prefixes: Vec::new(),
        }
    }
}

/// Plans the hooks for the detected CNI. Each device gets at most one hook; where a device
/// fits two roles, Overlay beats NodeIngress beats PodVeth (a kind node's uplink is a veth
/// that carries the default route: it is the node's ingress, not a pod).
pub fn plan(view: &NodeView, det: &Detection, opts: &PlanOptions) -> HookPlan {
    let cni = det.cni;
    let mut notes = Vec::new();
    let attach = choose_attach(view, opts, &mut notes);

    let mut hooks = Vec::new();
    let mut taken: HashSet<&str> = HashSet::new();
    for i in view.ifaces.iter().filter(|i| i.up) {
        if let Some(why) = overlay_why(i, cni) {
            hooks.push(hook(i, HookPoint::Overlay, attach, why));
            taken.insert(&i.name);
        }
    }
    let routed: Vec<&Iface> = view
        .ifaces
        .iter()
        .filter(|i| i.has_default_route && i.name != "lo" && !taken.contains(i.name.as_str()))
        .collect();
    if routed.is_empty() {
        // Policy routing can keep the default route out of the main table; the physical NICs
        // are then the best guess for where requests enter.
        let nics: Vec<&Iface> = view
            .ifaces
            .iter()
            .filter(|i| i.up && i.kind == "device")
            .collect();
        if !nics.is_empty() {
            notes.push(
                "no default route in the main table: hooking the physical devices as node ingress"
                    .into(),
            );
        }
        for i in nics.into_iter().filter(|i| taken.insert(&i.name)) {
            let why =
                "physical device (no default route found): node_in on ingress, node_out on egress";
            hooks.push(hook(i, HookPoint::NodeIngress, attach, why.into()));
        }
    }
    for i in routed {
        taken.insert(&i.name);
        let why = "carries the default route: node_in on ingress, node_out on egress";
        hooks.push(hook(i, HookPoint::NodeIngress, attach, why.into()));
    }
    for i in &view.ifaces {
        if taken.contains(i.name.as_str()) {
            continue;
        }
        if let Some(why) = pod_veth_why(view, i, cni, opts) {
            hooks.push(hook(i, HookPoint::PodVeth, attach, why));
        }
    }
    hooks.sort_by(|a, b| (rank(a.point), &a.ifname).cmp(&(rank(b.point), &b.ifname)));

    if hooks.iter().all(|h| h.point != HookPoint::NodeIngress) {
        notes.push("no node ingress device found: node_in/node_out will be missing".into());
    }
    if hooks.iter().all(|h| h.point != HookPoint::PodVeth) {
        notes.push(format!(
            "no {cni} pod veths yet: they are added as pods start (diff)"
        ));
    }
    cni_notes(cni, attach, &mut notes);
    let netfilter_dnat = view.netfilter_links && !opts.passive_only;
    if !view.netfilter_links {
        let (maj, min) = view.kernel;
        let (nmaj, nmin) = NETFILTER_LINK_KERNEL;
        notes.push(format!(
            "no netfilter BPF links (kernel {maj}.{min}; they need >= {nmaj}.{nmin}): \
             load_balancing is not measured and container_network starts at node_in"
        ));
    }
    HookPlan {
        cni,
        hooks,
        netfilter_dnat,
        notes,
    }
}

/// Which hooks to attach and which to detach when going from `old` to `new` (pod veths come
/// and go; a changed attach mode or CNI replaces everything it touches).
pub fn diff(old: &HookPlan, new: &HookPlan) -> (Vec<Hook>, Vec<Hook>) {
    let old_keys: HashSet<_> = old.hooks.iter().map(Hook::key).collect();
    let new_keys: HashSet<_> = new.hooks.iter().map(Hook::key).collect();
    let add = new
        .hooks
        .iter()
        .filter(|h| !old_keys.contains(&h.key()))
        .cloned()
        .collect();
    let remove = old
        .hooks
        .iter()
        .filter(|h| !new_keys.contains(&h.key()))
        .cloned()
        .collect();
    (add, remove)
}

fn choose_attach(view: &NodeView, opts: &PlanOptions, notes: &mut Vec<String>) -> Attach {
    let (maj, min) = view.kernel;
    if opts.passive_only {
        notes.push(
            "passive only: no tc programs and no netfilter links; packet times come from the \
             net/netif_receive_skb and net/net_dev_xmit tracepoints on these devices, so nothing \
             sits on the packet path"
                .into(),
        );
        return Attach::Passive;
    }
    if view.tcx {
        notes.push(
            "tcx: our programs are prepended (BPF_F_BEFORE) and return TCX_NEXT, so every \
             program after them still runs and decides the packet's fate"
                .into(),
        );
        return Attach::Tcx;
    }
    if view.kernel >= TCX_KERNEL {
        notes.push(format!(
            "kernel {maj}.{min} should have tcx but the probe found none: using clsact"
        ));
    }
    let priority = if opts.clsact_priority == 0 {
        // 0 asks the kernel to pick, which puts us wherever the existing filters happen to be.
        notes.push(format!(
            "clsact priority 0 means kernel-chosen: using {DEFAULT_CLSACT_PRIORITY}"
        ));
        DEFAULT_CLSACT_PRIORITY
    } else {
        opts.clsact_priority
    };
    notes.push(format!(
        "clsact (kernel {maj}.{min}, no tcx): direct-action filters at priority {priority} that \
         return TC_ACT_UNSPEC, so the next filter still runs and the verdict stays with it"
    ));
    Attach::ClsAct { priority }
}

fn cni_notes(cni: Cni, attach: Attach, notes: &mut Vec<String>) {
    match (cni, attach) {
        (Cni::Cilium, Attach::Tcx) => notes.push(
            "Cilium: its tcx programs on lxc*, cilium_* and the native devices run after ours and \
             keep every verdict; a link Cilium creates at the chain head later runs before ours, \
             which then sees only what Cilium passes on with TCX_NEXT: after Cilium restarts, \
             check the order and re-attach ours at the head"
                .into(),
        ),
        (Cni::Cilium, Attach::ClsAct { priority: 1 }) => notes.push(
            "Cilium: its filters sit at priority 1 (handle 1, protocol all); ours join that \
             priority with another handle and run first, returning TC_ACT_UNSPEC so Cilium's \
             verdicts stand; a filter Cilium deletes and re-adds is newer and runs first again: \
             after Cilium restarts, check the order and re-add ours"
                .into(),
        ),
        (Cni::Cilium, Attach::ClsAct { priority }) => notes.push(format!(
            "Cilium: our filters at priority {priority} run after Cilium's (priority 1), which end \
             the walk with a verdict, so they will see little on Cilium's devices; use priority 1"
        )),
        (Cni::Cilium, Attach::Passive) => {
            notes.push("Cilium: passive tracepoints leave Cilium's tc programs alone".into())
        }
        (Cni::Calico, _) => notes.push(
            "Calico: pods sit behind cali* veths with /32 routes and proxy ARP (no bridge); with \
             Calico's eBPF dataplane its tc programs share these devices with ours"
                .into(),
        ),
        (Cni::Flannel, _) => notes.push(
            "Flannel: the cni0 bridge is not hooked; its ports, the pods' host-side veths, are"
                .into(),
        ),
        (Cni::Generic, _) => notes.push(
            "generic: pod veths are veths named veth*, veths on a bridge or Open vSwitch, and \
             veths whose peer is in another network namespace"
                .into(),
        ),
    }
    if cni == Cni::Cilium {
        notes.push(
            "Cilium: with eBPF host routing, packets to a pod are redirected from the native \
             device straight into the pod (bpf_redirect_peer) and skip the host veth's egress, so \
             pod_in may be missing; with kube-proxy replacement, service DNAT happens in Cilium's \
             BPF rather than netfilter, so nat_done may be missing too"
                .into(),
        );
    }
}

fn hook(i: &Iface, point: HookPoint, attach: Attach, why: String) -> Hook {
    Hook {
        ifname: i.name.clone(),
        ifindex: i.ifindex,
        point,
        ingress: true,
        egress: true,
        attach,
        why,
    }
}

fn rank(p: HookPoint) -> u8 {
    match p {
        HookPoint::NodeIngress => 0,
        HookPoint::Overlay => 1,
        HookPoint::PodVeth => 2,
    }
}

/// Overlay devices by the names the CNIs give them, whichever CNI was detected (Canal is
/// Calico's plugin over flannel.1). On a generic node any up VXLAN/IPIP device counts. Only up
/// devices are passed in: the ipip module creates tunl0 down whether anyone uses it or not.
fn overlay_why(i: &Iface, cni: Cni) -> Option<String> {
    let n = i.name.as_str();
    let what = match n {
        "tunl0" => "Calico IPIP tunnel",
        "vxlan.calico" | "vxlan-v6.calico" => "Calico VXLAN overlay",
        "cilium_vxlan" => "Cilium VXLAN tunnel",
        "cilium_geneve" => "Cilium Geneve tunnel",
        _ if n.starts_with("flannel.") || n.starts_with("flannel-v6.") => "Flannel VXLAN overlay",
        _ if cni == Cni::Generic && matches!(i.kind.as_str(), "vxlan" | "ipip") => {
            return Some(format!(
                "{} device on a generic node: inner headers of pod traffic",
                i.kind
            ));
        }
        _ => return None,
    };
    Some(format!(
        "{what}: inner headers of pod traffic between nodes"
    ))
}

/// The host-side veth name prefix each CNI gives its pods.
fn pod_prefix(cni: Cni) -> &'static str {
    match cni {
        Cni::Calico => "cali",
        Cni::Cilium => "lxc",
        Cni::Flannel | Cni::Generic => "veth",
    }
}

/// A device is a pod's host side when it is a veth (never one of [`NEVER_POD_VETH`]) and:
/// its name has the CNI's prefix or a configured one, or it is enslaved to a bridge or Open
/// vSwitch (bridge plugin, docker0, Antrea, OVN), or, on a generic node, its peer is in
/// another namespace. Down veths are kept: a CNI creates the veth before it brings it up, and
/// attaching early avoids missing a new pod's first packets.
fn pod_veth_why(view: &NodeView, i: &Iface, cni: Cni, opts: &PlanOptions) -> Option<String> {
    if i.kind != "veth" || NEVER_POD_VETH.contains(&i.name.as_str()) {
        return None;
    }
    let prefix = pod_prefix(cni);
    if i.name.starts_with(prefix) {
        return Some(format!(
            "{cni} pod veth ({prefix}*): pod_in on egress, pod_out on ingress"
        ));
    }
    let extra = opts
        .extra_pod_veth_prefixes
        .iter()
        .filter(|p| !p.is_empty());
    if let Some(p) = extra.into_iter().find(|p| i.name.starts_with(p.as_str())) {
        return Some(format!(
            "configured pod veth prefix {p}*: pod_in on egress, pod_out on ingress"
        ));
    }
    if let Some(m) = &i.master {
        let bridge = m == "ovs-system" || view.iface(m).is_some_and(|b| b.kind == "bridge");
        if bridge {
            return Some(format!(
                "veth on bridge {m}: pod_in on egress, pod_out on ingress"
            ));
        }
    }
    if let (Cni::Generic, Some(ns)) = (cni, i.peer_netns_id) {
        let ns = if ns < 0 {
            "unknown id".to_string()
        } else {
            format!("id {ns}")
        };
        return Some(format!(
            "veth whose peer is in another network namespace ({ns}): pod_in on egress, pod_out on ingress"
        ));
    }
    None
}
