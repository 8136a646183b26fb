//! Fixture nodes shared by the detection and planning tests, one per CNI as each wires a node.
#![allow(dead_code)] // each test binary uses a different subset

use cni_adapters::{Iface, NodeView};

pub fn iface(name: &str, ifindex: u32, kind: &str) -> Iface {
    Iface {
        name: name.into(),
        ifindex,
        kind: kind.into(),
        master: None,
        up: true,
        has_default_route: false,
        peer_netns_id: None,
        addrs: Vec::new(),
    }
}

/// A pod's host-side veth: the peer sits in the pod's namespace `ns`.
pub fn pod_veth(name: &str, ifindex: u32, ns: i32) -> Iface {
    Iface {
        peer_netns_id: Some(ns),
        ..iface(name, ifindex, "veth")
    }
}

/// The node's uplink with the default route.
pub fn uplink(name: &str, ifindex: u32) -> Iface {
    Iface {
        has_default_route: true,
        addrs: vec!["10.0.0.5/24".into()],
        ..iface(name, ifindex, "device")
    }
}

pub fn on(mut i: Iface, master: &str) -> Iface {
    i.master = Some(master.into());
    i
}

pub fn down(mut i: Iface) -> Iface {
    i.up = false;
    i
}

pub fn lo() -> Iface {
    iface("lo", 1, "")
}

/// A node on a 6.8 kernel: tcx and netfilter links available.
pub fn node(ifaces: Vec<Iface>, configs: &[(&str, &str)], files: &[&str]) -> NodeView {
    NodeView {
        ifaces,
        cni_configs: configs
            .iter()
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect(),
        files_present: files.iter().map(|f| f.to_string()).collect(),
        kernel: (6, 8),
        netfilter_links: true,
        tcx: true,
    }
}

/// The same node on Ubuntu 22.04's 5.15: no tcx, no netfilter links.
pub fn on_5_15(mut v: NodeView) -> NodeView {
    v.kernel = (5, 15);
    v.tcx = false;
    v.netfilter_links = false;
    v
}

pub const CALICO_CONFLIST: &str = r#"{
  "name": "k8s-pod-network", "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "datastore_type": "kubernetes", "ipam": {"type": "calico-ipam"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"#;

pub const CILIUM_CONFLIST: &str = r#"{
  "cniVersion": "0.3.1", "name": "cilium",
  "plugins": [{"type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"}]
}"#;

pub const FLANNEL_CONFLIST: &str = r#"{
  "name": "cbr0", "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

pub const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0", "name": "br-x-net",
  "plugins": [
    {"type": "bridge", "bridge": "br-x", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

/// Calico in IPIP mode: cali* veths with /32 routes (no bridge), tunl0 up.
pub fn calico_ipip() -> NodeView {
    node(
        vec![
            lo(),
            uplink("eth0", 2),
            iface("tunl0", 3, "ipip"),
            pod_veth("cali1a2b3c4d5e6", 7, 0),
            pod_veth("cali9f8e7d6c5b4", 9, 1),
        ],
        &[
            ("10-calico.conflist", CALICO_CONFLIST),
            ("calico-kubeconfig", ""),
        ],
        &["/var/run/calico"],
    )
}

/// Calico in VXLAN mode: vxlan.calico up; tunl0 exists (ipip module loaded) but is down.
pub fn calico_vxlan() -> NodeView {
    node(
        vec![
            lo(),
            uplink("ens5", 2),
            down(iface("tunl0", 3, "ipip")),
            iface("vxlan.calico", 4, "vxlan"),
            pod_veth("cali1a2b3c4d5e6", 7, 0),
        ],
        &[("10-calico.conflist", CALICO_CONFLIST)],
        &["/var/run/calico"],
    )
}

/// Cilium in VXLAN tunnel mode, with the health endpoint and one pod. Cilium renames the
/// previous CNI's config to *.cilium_bak.
pub fn cilium() -> NodeView {
    node(
        vec![
            lo(),
            uplink("eth0", 2),
            iface("cilium_net", 3, "veth"),
            iface("cilium_host", 4, "veth"),
            iface("cilium_vxlan", 5, "vxlan"),
            pod_veth("lxc_health", 7, 0),
            pod_veth("lxc12345", 9, 1),
        ],
        &[
            ("05-cilium.conflist", CILIUM_CONFLIST),
            ("10-calico.conflist.cilium_bak", CALICO_CONFLIST),
        ],
        &["/run/cilium"],
    )
}

/// Flannel with the VXLAN backend: flannel.1, the cni0 bridge and veth* ports on it.
pub fn flannel() -> NodeView {
    node(
        vec![
            lo(),
            uplink("eth0", 2),
            iface("flannel.1", 3, "vxlan"),
            iface("cni0", 4, "bridge"),
            on(pod_veth("veth1a2b3c4d", 5, 0), "cni0"),
            on(pod_veth("veth5e6f7a8b", 6, 1), "cni0"),
        ],
        &[("10-flannel.conflist", FLANNEL_CONFLIST)],
        &["/run/flannel/subnet.env"],
    )
}

/// Some other CNI: a bridge br-x with a pod port not named veth*, a routed veth (peer in a pod
/// namespace, like AWS's eni*), and a veth pair that stays on the host.
pub fn generic() -> NodeView {
    node(
        vec![
            lo(),
            uplink("eth0", 2),
            iface("br-x", 3, "bridge"),
            on(pod_veth("podx1", 4, 0), "br-x"),
            pod_veth("eni0a1b2c3d", 5, 1),
            iface("hosta", 6, "veth"),
            iface("hostb", 7, "veth"),
        ],
        &[("10-bridge.conflist", BRIDGE_CONFLIST)],
        &[],
    )
}

pub fn names<'a>(hooks: impl IntoIterator<Item = &'a cni_adapters::Hook>) -> Vec<&'a str> {
    hooks.into_iter().map(|h| h.ifname.as_str()).collect()
}
