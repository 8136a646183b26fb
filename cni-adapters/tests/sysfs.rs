//! The sysfs reader against a fixture tree shaped like a Flannel node's /sys, /proc/net and /etc/cni.

use cni_adapters::sysfs::{parse_kernel_release, read_node_view, Paths};
use cni_adapters::{detect, plan, HookPoint, PlanOptions};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempTree(PathBuf);

impl TempTree {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("cni-adapters-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempTree(dir)
    }

    fn write(&self, rel: &str, body: &str) {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One /sys/class/net/<name> directory: attribute files, plus the directories/links that
/// tell kinds apart.
#[allow(clippy::too_many_arguments)]
fn netdev(
    t: &TempTree,
    name: &str,
    ifindex: u32,
    iflink: u32,
    arphrd: u32,
    flags: &str,
    oper: &str,
    devtype: &str,
) {
    let d = format!("sys/class/net/{name}");
    t.write(&format!("{d}/ifindex"), &format!("{ifindex}\n"));
    t.write(&format!("{d}/iflink"), &format!("{iflink}\n"));
    t.write(&format!("{d}/type"), &format!("{arphrd}\n"));
    t.write(&format!("{d}/flags"), &format!("{flags}\n"));
    t.write(&format!("{d}/operstate"), &format!("{oper}\n"));
    let uevent = if devtype.is_empty() {
        format!("INTERFACE={name}\nIFINDEX={ifindex}\n")
    } else {
        format!("DEVTYPE={devtype}\nINTERFACE={name}\nIFINDEX={ifindex}\n")
    };
    t.write(&format!("{d}/uevent"), &uevent);
}

fn mkdir(t: &TempTree, rel: &str) {
    fs::create_dir_all(t.0.join(rel)).unwrap();
}

fn flannel_node_tree() -> TempTree {
    let t = TempTree::new("flannel");
    netdev(&t, "lo", 1, 1, 772, "0x9", "unknown", "");
    netdev(&t, "eth0", 2, 2, 1, "0x1003", "up", "");
    mkdir(&t, "sys/class/net/eth0/device");
    // VXLAN reports operstate "unknown" while working; its iflink is the underlay device.
    netdev(&t, "flannel.1", 3, 2, 1, "0x1043", "unknown", "vxlan");
    netdev(&t, "cni0", 4, 4, 1, "0x1003", "up", "bridge");
    mkdir(&t, "sys/class/net/cni0/bridge");
    // Pod veth: peer is ifindex 3 in the pod's namespace; the host's ifindex 3 (flannel.1)
    // does not point back, so the peer is elsewhere.
    netdev(&t, "veth1a2b3c4d", 5, 3, 1, "0x1103", "up", "");
    symlink("../cni0", t.0.join("sys/class/net/veth1a2b3c4d/master")).unwrap();
    // A veth pair with both ends on the host.
    netdev(&t, "hosta", 6, 7, 1, "0x1003", "up", "");
    netdev(&t, "hostb", 7, 6, 1, "0x1003", "up", "");
    // The ipip module's idle tunl0, and a macvlan stacked on eth0.
    netdev(&t, "tunl0", 8, 0, 768, "0x80", "down", "");
    netdev(&t, "mv0", 9, 2, 1, "0x1003", "up", "");
    symlink("../eth0", t.0.join("sys/class/net/mv0/lower_eth0")).unwrap();
    netdev(&t, "dummy0", 10, 10, 1, "0x83", "unknown", "");

    t.write(
        "proc/net/route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
         eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
         cni0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
    );
    t.write(
        "proc/net/ipv6_route",
        "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
         00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n",
    );
    t.write(
        "proc/net/if_inet6",
        "fe80000000000000020c29fffe123456 02 40 20 80     eth0\n\
         00000000000000000000000000000001 01 80 10 80       lo\n",
    );
    t.write(
        "etc/cni/net.d/10-flannel.conflist",
        r#"{"name": "cbr0", "plugins": [{"type": "flannel", "delegate": {"isDefaultGateway": true}}, {"type": "portmap"}]}"#,
    );
    t.write(
        "etc/cni/net.d/flannel-kubeconfig",
        "apiVersion: v1\nusers: [{user: {token: secret}}]\n",
    );
    mkdir(&t, "etc/cni/net.d/multus.d");
    t.write(
        "run/flannel/subnet.env",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n",
    );
    // /var/run/calico spelled through /var: found as its /run twin would be.
    mkdir(&t, "var/run/calico");
    t
}

#[test]
fn reads_a_flannel_node_from_a_fixture_tree() {
    let t = flannel_node_tree();
    let view = read_node_view(&Paths::under(&t.0), (5, 15), false, false).unwrap();
    let got: Vec<(&str, u32, &str, bool)> = view
        .ifaces
        .iter()
        .map(|i| (i.name.as_str(), i.ifindex, i.kind.as_str(), i.up))
        .collect();
    assert_eq!(
        got,
        [
            ("lo", 1, "", true),
            ("eth0", 2, "device", true),
            ("flannel.1", 3, "vxlan", true),
            ("cni0", 4, "bridge", true),
            ("veth1a2b3c4d", 5, "veth", true),
            ("hosta", 6, "veth", true),
            ("hostb", 7, "veth", true),
            ("tunl0", 8, "ipip", false),
            ("mv0", 9, "", true),
            ("dummy0", 10, "dummy", true),
        ]
    );
    let get = |n: &str| view.iface(n).unwrap();
    assert!(get("eth0").has_default_route);
    assert!(
        view.ifaces.iter().filter(|i| i.has_default_route).count() == 1,
        "lo's reject route is no way out"
    );
    assert_eq!(get("eth0").addrs, ["fe80::20c:29ff:fe12:3456/64"]);
    assert_eq!(get("veth1a2b3c4d").master.as_deref(), Some("cni0"));
    assert_eq!(get("veth1a2b3c4d").peer_netns_id, Some(-1));
    assert_eq!(get("hosta").peer_netns_id, None);
    assert_eq!(get("flannel.1").peer_netns_id, None);
    assert_eq!(
        (view.kernel, view.tcx, view.netfilter_links),
        ((5, 15), false, false)
    );

    // The kubeconfig is listed by name only: its token must not reach the view.
    assert_eq!(
        view.cni_configs
            .iter()
            .map(|(n, b)| (n.as_str(), b.is_empty()))
            .collect::<Vec<_>>(),
        [("10-flannel.conflist", false), ("flannel-kubeconfig", true)]
    );
    assert_eq!(
        view.files_present,
        ["/run/flannel/subnet.env", "/var/run/calico"]
    );

    // End to end: the config decides Flannel, and the plan hooks what a Flannel node needs.
    let det = detect(&view, None);
    assert_eq!(
        (det.cni.as_str(), det.confidence),
        ("flannel", "config"),
        "{:?}",
        det.evidence
    );
    let p = plan(&view, &det, &PlanOptions::default());
    let at = |pt| p.at(pt).map(|h| h.ifname.as_str()).collect::<Vec<_>>();
    assert_eq!(at(HookPoint::NodeIngress), ["eth0"]);
    assert_eq!(at(HookPoint::Overlay), ["flannel.1"]);
    // hosta/hostb are a veth pair local to the host: not pods.
    assert_eq!(at(HookPoint::PodVeth), ["veth1a2b3c4d"]);
}

#[test]
fn missing_sysfs_is_an_error_that_says_what_to_check() {
    let t = TempTree::new("empty");
    let err = read_node_view(&Paths::under(&t.0), (6, 8), true, true).unwrap_err();
    assert!(err.to_string().contains("is sysfs mounted"), "{err}");
}

#[test]
fn bare_sysfs_without_proc_or_cni_dir_still_reads() {
    let t = TempTree::new("bare");
    netdev(&t, "eth0", 2, 2, 1, "0x1003", "up", "");
    let view = read_node_view(&Paths::under(&t.0), (6, 8), true, true).unwrap();
    assert_eq!(view.ifaces.len(), 1);
    assert!(!view.ifaces[0].has_default_route);
    assert!(view.cni_configs.is_empty() && view.files_present.is_empty());
}

#[test]
fn host_paths_and_kernel_release() {
    let p = Paths::host();
    assert_eq!(p.sys_class_net, Path::new("/sys/class/net"));
    assert_eq!(p.cni_conf_dir, Path::new("/etc/cni/net.d"));
    assert_eq!(parse_kernel_release("6.8.0-45-generic"), Some((6, 8)));
    assert_eq!(
        parse_kernel_release("5.15.167.4-microsoft-standard-WSL2\n"),
        Some((5, 15))
    );
    assert_eq!(parse_kernel_release("6.10"), Some((6, 10)));
    assert_eq!(parse_kernel_release("garbage"), None);
}
