//! The three CNI node topologies in miniature. Nothing tells the agent which CNI it is on: it
//! reads the CNI config (a realistic conflist in a directory it is pointed at) and the node's
//! interfaces, and picks the hooks itself. Only the stand-in for the node's NIC, the client's
//! uplink, is named with `--node-device`.
//! - Calico: `cali*` veths without a bridge or host address, /32 routes, proxy ARP, the pod's
//!   gateway 169.254.1.1; a kube-proxy-style ClusterIP in front.
//! - Cilium: `lxc*` veths with Cilium's own tc program on them, which must count the same
//!   packets with and without the agent, and keep its filter after the agent exits.
//! - Flannel: the pod is on node B behind a cni0-style bridge of `veth*` ports; the client is on
//!   node A and reaches it over the VXLAN device `flannel.<VNI>` (port 8472).

use serde_json::Value;
use testbed::netns::Wiring;
use testbed::topo::{Bridge, Outside, Overlay, Service};
use testbed::CgroupDriver;

use super::{agent_with_uplink, load_and_check};
use crate::common::kernel_tests_enabled;
use crate::common::node::cni::{send_udp, tc_chain, CniCounter, CniFiles};
use crate::common::node::{server_pod_wired, ServerPod, PORT};
use crate::common::Agent;

/// As Calico's installer writes it (calico-node's `install-cni`).
const CALICO_CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-b",
      "mtu": 0,
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

/// As the cilium agent writes it.
const CILIUM_CONFLIST: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {
      "type": "cilium-cni",
      "enable-debug": false,
      "log-file": "/var/run/cilium/cilium-cni.log"
    }
  ]
}"#;

/// As kube-flannel's ConfigMap ships it.
const FLANNEL_CONFLIST: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

/// The detected CNI (from its config) and the pod's host veth hooked as a pod veth.
fn assert_detected(agent: &Agent, cni: &str, sp: &ServerPod) -> Value {
    let t = agent.get_json("/api/v1/targets");
    assert_eq!(t["cni"]["cni"], cni, "{t}");
    assert_eq!(t["cni"]["confidence"], "config", "{t}");
    let ifs = t["interfaces"].as_array().unwrap();
    assert!(
        ifs.iter().any(|i| i["ifname"] == sp.pod.host_veth()
            && i["role"] == "pod_veth"
            && i["error"].is_null()),
        "{} hooked as the pod's veth: {t}",
        sp.pod.host_veth()
    );
    t
}

fn pod(name: &str, wiring: Wiring) -> ServerPod {
    server_pod_wired(
        name,
        wiring,
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "2"],
    )
}

#[test]
fn calico_style_node_behind_a_cluster_ip() {
    if !kernel_tests_enabled("calico_style_node_behind_a_cluster_ip") {
        return;
    }
    let files = CniFiles::new("calico");
    files.write("/etc/cni/net.d/10-calico.conflist", CALICO_CONFLIST);
    let sp = pod("calico", Wiring::Calico);
    let outside = Outside::create().expect("client outside the node");
    let svc = Service::dnat(80, sp.pod.addr(PORT)).expect("ClusterIP DNAT");
    // This node's CNI paths come from the agent's config (the other tests use the environment).
    let agent = Agent::start_with_config(
        &format!(
            "network:\n  cni_conf_dir: {}\n  cni_state_root: {}\n",
            files.conf_dir().display(),
            files.root.display()
        ),
        &[
            "--no-auto",
            "--target-cgroup",
            sp.cg.cgroup_path(),
            "--node-device",
            outside.uplink(),
        ],
    );
    let t = assert_detected(&agent, "calico", &sp);
    assert!(sp.pod.host_veth().starts_with("cali"), "{t}");
    load_and_check(&agent, sp.pod.addr(PORT), &outside, svc.vip, 150);
}

#[test]
fn cilium_style_node_keeps_ciliums_tc_program_whole() {
    if !kernel_tests_enabled("cilium_style_node_keeps_ciliums_tc_program_whole") {
        return;
    }
    let files = CniFiles::new("cilium");
    files.write("/etc/cni/net.d/05-cilium.conflist", CILIUM_CONFLIST);
    let _env = files.agent_env();
    let sp = pod("cilium", Wiring::Cilium);
    let dev = sp.pod.host_veth().to_string();
    let cilium = CniCounter::attach(&dev);
    let outside = Outside::create().expect("client outside the node");

    send_udp(sp.pod.ip(), 300);
    let without = cilium.count();
    assert_eq!(without, 300, "Cilium's program counts every packet");

    let mut agent = agent_with_uplink(&sp, &outside);
    assert_detected(&agent, "cilium", &sp);
    let chain = tc_chain(&dev);
    assert!(
        chain.contains("tc_pod_in") && chain.contains("cni.bpf.o"),
        "both programs on {dev}:\n{chain}"
    );
    send_udp(sp.pod.ip(), 300);
    assert_eq!(
        cilium.count() - without,
        without,
        "the same traffic counts the same with the agent attached"
    );
    load_and_check(&agent, sp.pod.addr(PORT), &outside, sp.pod.addr(PORT), 100);

    assert!(agent.stop(), "clean exit:\n{}", agent.log_text());
    let chain = tc_chain(&dev);
    assert!(
        !chain.contains("tc_pod_in") && !chain.contains("tc_pod_out"),
        "the agent's programs are gone:\n{chain}"
    );
    assert!(chain.contains("cni.bpf.o"), "Cilium's stays:\n{chain}");
    let before = cilium.count();
    send_udp(sp.pod.ip(), 300);
    assert_eq!(cilium.count() - before, 300, "and still counts");
}

#[test]
fn flannel_style_nodes_joined_by_vxlan() {
    if !kernel_tests_enabled("flannel_style_nodes_joined_by_vxlan") {
        return;
    }
    // Locals drop in reverse: the agent first, the pod before its bridge, the overlay before
    // node A.
    let files = CniFiles::new("flannel");
    files.write("/etc/cni/net.d/10-flannel.conflist", FLANNEL_CONFLIST);
    let bridge = Bridge::create().expect("cni0-style bridge");
    let sp = pod("flannel", bridge.wiring());
    files.write(
        "/run/flannel/subnet.env",
        &format!(
            "FLANNEL_NETWORK=10.200.0.0/16\nFLANNEL_SUBNET={}/30\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            sp.pod.host_ip()
        ),
    );
    let _env = files.agent_env();
    // Node A: the client's namespace, with its own VXLAN end; node B: this one.
    let outside = Outside::create().expect("node A");
    let overlay = Overlay::flannel(&outside, sp.pod.ip()).expect("VXLAN between the nodes");
    let agent = agent_with_uplink(&sp, &outside);
    let t = assert_detected(&agent, "flannel", &sp);
    assert!(
        t["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["ifname"] == overlay.device.as_str() && i["role"] == "node"),
        "{} hooked as the node's overlay: {t}",
        overlay.device
    );
    assert!(
        t["cni"]["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("/run/flannel/subnet.env")),
        "{t}"
    );
    load_and_check(&agent, sp.pod.addr(PORT), &outside, sp.pod.addr(PORT), 150);
}
