//! Planning rules: which devices get which hook, attached how, per CNI and kernel.

mod common;

use cni_adapters::{
    detect, diff, plan, Attach, Cni, HookPlan, HookPoint, NodeView, PlanOptions,
    DEFAULT_CLSACT_PRIORITY,
};
use common::*;

fn auto(view: &NodeView) -> HookPlan {
    plan(view, &detect(view, None), &PlanOptions::default())
}

fn at(p: &HookPlan, point: HookPoint) -> Vec<&str> {
    names(p.at(point))
}

fn noted(p: &HookPlan, needle: &str) -> bool {
    p.notes.iter().any(|n| n.contains(needle))
}

#[test]
fn calico_ipip_hooks_uplink_tunnel_and_cali_veths() {
    let p = auto(&calico_ipip());
    assert_eq!(p.cni, Cni::Calico);
    assert_eq!(at(&p, HookPoint::NodeIngress), ["eth0"]);
    assert_eq!(at(&p, HookPoint::Overlay), ["tunl0"]);
    assert_eq!(
        at(&p, HookPoint::PodVeth),
        ["cali1a2b3c4d5e6", "cali9f8e7d6c5b4"]
    );
    assert!(p
        .hooks
        .iter()
        .all(|h| h.attach == Attach::Tcx && h.ingress && h.egress));
    assert!(p.netfilter_dnat);
    assert!(noted(&p, "/32 routes and proxy ARP"));
    let tunl0 = p.hook("tunl0").unwrap();
    assert_eq!(tunl0.ifindex, 3);
    assert!(tunl0.why.contains("Calico IPIP tunnel"), "{}", tunl0.why);
}

#[test]
fn calico_vxlan_hooks_vxlan_calico_and_not_the_idle_tunl0() {
    let p = auto(&calico_vxlan());
    assert_eq!(at(&p, HookPoint::NodeIngress), ["ens5"]);
    assert_eq!(at(&p, HookPoint::Overlay), ["vxlan.calico"]);
    assert_eq!(at(&p, HookPoint::PodVeth), ["cali1a2b3c4d5e6"]);
    assert!(p.hook("tunl0").is_none());
}

#[test]
fn cilium_hooks_lxc_pods_only_and_notes_coexistence() {
    let p = auto(&cilium());
    assert_eq!(p.cni, Cni::Cilium);
    assert_eq!(at(&p, HookPoint::NodeIngress), ["eth0"]);
    assert_eq!(at(&p, HookPoint::Overlay), ["cilium_vxlan"]);
    // cilium_host/cilium_net are Cilium's own veth pair; lxc_health carries only health probes.
    assert_eq!(at(&p, HookPoint::PodVeth), ["lxc12345"]);
    for never in ["cilium_host", "cilium_net", "lxc_health"] {
        assert!(p.hook(never).is_none(), "{never} must not be hooked");
    }
    assert!(
        noted(&p, "BPF_F_BEFORE") && noted(&p, "TCX_NEXT"),
        "{:?}",
        p.notes
    );
    assert!(noted(&p, "Cilium: its tcx programs"), "{:?}", p.notes);
    assert!(noted(&p, "bpf_redirect_peer"), "{:?}", p.notes);
}

#[test]
fn cilium_on_clsact_shares_priority_one_and_warns_when_told_otherwise() {
    let view = on_5_15(cilium());
    let p = auto(&view);
    assert!(p
        .hooks
        .iter()
        .all(|h| h.attach == Attach::ClsAct { priority: 1 }));
    assert!(
        noted(
            &p,
            "ours join that priority with another handle and run first"
        ),
        "{:?}",
        p.notes
    );
    let opts = PlanOptions {
        clsact_priority: 0xfff0,
        ..PlanOptions::default()
    };
    let p = plan(&view, &detect(&view, None), &opts);
    assert!(p
        .hooks
        .iter()
        .all(|h| h.attach == Attach::ClsAct { priority: 0xfff0 }));
    assert!(
        noted(&p, "run after Cilium's (priority 1)"),
        "{:?}",
        p.notes
    );
}

#[test]
fn flannel_hooks_flannel_1_and_bridge_ports_not_the_bridge() {
    let p = auto(&flannel());
    assert_eq!(p.cni, Cni::Flannel);
    assert_eq!(at(&p, HookPoint::NodeIngress), ["eth0"]);
    assert_eq!(at(&p, HookPoint::Overlay), ["flannel.1"]);
    assert_eq!(at(&p, HookPoint::PodVeth), ["veth1a2b3c4d", "veth5e6f7a8b"]);
    assert!(p.hook("cni0").is_none());
    assert!(noted(&p, "cni0 bridge is not hooked"));
}

#[test]
fn generic_finds_pods_by_bridge_and_by_peer_namespace() {
    let p = auto(&generic());
    assert_eq!(p.cni, Cni::Generic);
    assert_eq!(at(&p, HookPoint::NodeIngress), ["eth0"]);
    assert!(at(&p, HookPoint::Overlay).is_empty());
    assert_eq!(at(&p, HookPoint::PodVeth), ["eni0a1b2c3d", "podx1"]);
    assert!(p.hook("podx1").unwrap().why.contains("bridge br-x"));
    assert!(p
        .hook("eni0a1b2c3d")
        .unwrap()
        .why
        .contains("another network namespace (id 1)"));
    // A veth pair with both ends on the host is not a pod; the bridge itself is not hooked.
    for not in ["hosta", "hostb", "br-x", "lo"] {
        assert!(p.hook(not).is_none(), "{not}");
    }
}

#[test]
fn generic_hooks_up_overlay_devices_by_kind() {
    let mut view = generic();
    view.ifaces.push(iface("vx100", 20, "vxlan"));
    view.ifaces.push(down(iface("ipip0", 21, "ipip")));
    assert_eq!(at(&auto(&view), HookPoint::Overlay), ["vx100"]);
    // A named CNI hooks only the overlays CNIs create.
    let mut view = calico_ipip();
    view.ifaces.push(iface("vx100", 20, "vxlan"));
    assert_eq!(at(&auto(&view), HookPoint::Overlay), ["tunl0"]);
}

#[test]
fn canal_hooks_flannel_overlay_under_calico() {
    let mut view = calico_ipip();
    view.ifaces.retain(|i| i.name != "tunl0");
    view.ifaces.push(iface("flannel.1", 3, "vxlan"));
    let p = auto(&view);
    assert_eq!(p.cni, Cni::Calico);
    assert_eq!(at(&p, HookPoint::Overlay), ["flannel.1"]);
}

#[test]
fn kernel_5_15_uses_clsact_and_no_netfilter_links() {
    for view in [calico_ipip(), flannel(), generic()] {
        let p = auto(&on_5_15(view));
        assert!(!p.hooks.is_empty());
        assert!(p.hooks.iter().all(|h| h.attach
            == Attach::ClsAct {
                priority: DEFAULT_CLSACT_PRIORITY
            }));
        assert!(!p.netfilter_dnat);
        assert!(noted(&p, "clsact (kernel 5.15, no tcx)"), "{:?}", p.notes);
        assert!(noted(&p, "load_balancing is not measured"), "{:?}", p.notes);
    }
}

#[test]
fn new_kernel_without_tcx_says_so_and_priority_zero_means_default() {
    let mut view = flannel();
    view.tcx = false;
    let opts = PlanOptions {
        clsact_priority: 0,
        ..PlanOptions::default()
    };
    let p = plan(&view, &detect(&view, None), &opts);
    assert!(p.hooks.iter().all(|h| h.attach
        == Attach::ClsAct {
            priority: DEFAULT_CLSACT_PRIORITY
        }));
    assert!(noted(&p, "kernel 6.8 should have tcx"), "{:?}", p.notes);
    assert!(noted(&p, "priority 0 means kernel-chosen"), "{:?}", p.notes);
}

#[test]
fn passive_only_attaches_nothing() {
    for view in [calico_ipip(), cilium(), flannel(), generic()] {
        let opts = PlanOptions {
            passive_only: true,
            ..PlanOptions::default()
        };
        let p = plan(&view, &detect(&view, None), &opts);
        assert!(!p.hooks.is_empty());
        assert!(p.hooks.iter().all(|h| h.attach == Attach::Passive));
        assert!(!p.netfilter_dnat, "netfilter links are attachments too");
        assert!(noted(&p, "passive only"));
    }
}

#[test]
fn empty_node_plans_nothing_and_says_why() {
    let view = NodeView::default();
    let p = auto(&view);
    assert_eq!(p.cni, Cni::Generic);
    assert!(p.hooks.is_empty());
    assert!(noted(&p, "no node ingress device found"));
    assert!(noted(&p, "no generic pod veths yet"));
}

#[test]
fn forced_adapter_changes_the_pod_rules() {
    let view = flannel();
    let forced = detect(&view, Some(Cni::Calico));
    let p = plan(&view, &forced, &PlanOptions::default());
    assert_eq!(p.cni, Cni::Calico);
    // veth* is not Calico's prefix, but these sit on a bridge, so they are still pods.
    assert_eq!(at(&p, HookPoint::PodVeth), ["veth1a2b3c4d", "veth5e6f7a8b"]);
    assert!(p.hook("veth1a2b3c4d").unwrap().why.contains("bridge cni0"));
}

#[test]
fn extra_prefixes_add_pod_veths() {
    let mut view = calico_ipip();
    view.ifaces.push(iface("gke0123abcd", 30, "veth"));
    assert!(auto(&view).hook("gke0123abcd").is_none());
    let opts = PlanOptions {
        extra_pod_veth_prefixes: vec![String::new(), "gke".into()],
        ..PlanOptions::default()
    };
    let p = plan(&view, &detect(&view, None), &opts);
    assert!(p
        .hook("gke0123abcd")
        .unwrap()
        .why
        .contains("configured pod veth prefix gke*"));
    // An empty prefix matches nothing rather than everything.
    assert!(p
        .hook("tunl0")
        .is_some_and(|h| h.point == HookPoint::Overlay));
}

#[test]
fn kind_node_uplink_veth_is_ingress_not_a_pod() {
    // In a kind cluster the node is a container: its eth0 is a veth with the default route.
    let mut eth0 = pod_veth("eth0", 12, 0);
    eth0.has_default_route = true;
    let view = node(vec![lo(), eth0, pod_veth("veth8c1d2e3f", 3, 1)], &[], &[]);
    let p = auto(&view);
    assert_eq!(at(&p, HookPoint::NodeIngress), ["eth0"]);
    assert_eq!(at(&p, HookPoint::PodVeth), ["veth8c1d2e3f"]);
}

#[test]
fn without_a_default_route_physical_devices_are_the_ingress() {
    let mut view = flannel();
    view.ifaces
        .iter_mut()
        .for_each(|i| i.has_default_route = false);
    view.ifaces.push(down(iface("eth1", 40, "device")));
    let p = auto(&view);
    assert_eq!(at(&p, HookPoint::NodeIngress), ["eth0"]);
    assert!(noted(&p, "no default route in the main table"));
}

#[test]
fn down_pod_veths_are_hooked_down_overlays_are_not() {
    let mut view = flannel();
    for i in &mut view.ifaces {
        i.up = !i.name.starts_with("veth5") && i.name != "flannel.1";
    }
    let p = auto(&view);
    assert!(p.hook("veth5e6f7a8b").is_some());
    assert!(p.hook("flannel.1").is_none());
}

#[test]
fn diff_follows_pods_coming_and_going() {
    let before = flannel();
    let old = auto(&before);
    assert_eq!(diff(&old, &old), (vec![], vec![]));

    let mut after = before.clone();
    after.ifaces.retain(|i| i.name != "veth5e6f7a8b");
    after
        .ifaces
        .push(on(pod_veth("veth0c0d0e0f", 8, 2), "cni0"));
    let new = auto(&after);
    let (add, remove) = diff(&old, &new);
    assert_eq!(names(&add), ["veth0c0d0e0f"]);
    assert_eq!(names(&remove), ["veth5e6f7a8b"]);

    // Same name, new device (a pod restarted): detach the old, attach the new.
    let mut again = after.clone();
    again
        .ifaces
        .iter_mut()
        .find(|i| i.name == "veth0c0d0e0f")
        .unwrap()
        .ifindex = 11;
    let (add, remove) = diff(&new, &auto(&again));
    assert_eq!((add.len(), remove.len()), (1, 1));
    assert_eq!((add[0].ifindex, remove[0].ifindex), (11, 8));
}

#[test]
fn diff_replaces_everything_when_the_attach_mode_changes() {
    let view = flannel();
    let old = auto(&view);
    let new = auto(&on_5_15(view));
    let (add, remove) = diff(&old, &new);
    assert_eq!(add.len(), new.hooks.len());
    assert_eq!(remove.len(), old.hooks.len());
    // `why` alone is not a change.
    let mut reworded = old.clone();
    reworded.hooks[0].why = "reworded".into();
    assert_eq!(diff(&old, &reworded), (vec![], vec![]));
}

#[test]
fn plan_serializes_for_the_targets_api() {
    let p = auto(&on_5_15(flannel()));
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["cni"], "flannel");
    assert_eq!(v["hooks"][0]["point"], "node_ingress");
    assert_eq!(
        v["hooks"][0]["attach"],
        serde_json::json!({"cls_act": {"priority": 1}})
    );
    assert_eq!(v["hooks"][2]["point"], "pod_veth");
    let p = auto(&flannel());
    assert_eq!(
        serde_json::to_value(&p).unwrap()["hooks"][1]["attach"],
        "tcx"
    );
}
