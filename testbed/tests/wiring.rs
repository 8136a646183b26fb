//! The CNI-style pod wirings (Calico, Cilium, a bridge as under Flannel): each is wired the way
//! that CNI does it, and the pod is reachable from the node.

use std::process::Command;
use std::time::Duration;

use testbed::netns::{Wiring, CALICO_GATEWAY};
use testbed::topo::Bridge;
use testbed::{skip_unless_root, Pod};

fn out(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn reachable(pod: &Pod) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmslo-synth-server"));
    cmd.args(["--listen", "0.0.0.0:9002"])
        .stdout(std::process::Stdio::null());
    let _srv = pod.spawn(cmd, None).unwrap();
    pod.wait_for_port(9002, Duration::from_secs(10)).unwrap();
}

fn sysctl(path: String) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

#[test]
fn calico_and_cilium_style_pods_are_routed_without_a_host_address() {
    if skip_unless_root("calico_and_cilium_style_pods_are_routed_without_a_host_address") {
        return;
    }
    for (wiring, prefix) in [(Wiring::Calico, "cali"), (Wiring::Cilium, "lxc")] {
        let pod = Pod::create_wired("routed", wiring.clone()).unwrap();
        let veth = pod.host_veth();
        assert!(veth.starts_with(prefix) && veth.len() <= 15, "{veth}");
        let addrs = out(Command::new("ip").args(["-o", "-4", "addr", "show", "dev", veth]));
        assert!(addrs.trim().is_empty(), "no host-side address: {addrs}");
        assert_eq!(
            sysctl(format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp")),
            "1"
        );
        let route = out(Command::new("ip").args(["route", "show", &format!("{}/32", pod.ip())]));
        assert!(route.contains(&format!("dev {veth}")), "{route}");
        let inside = pod.exec(&["ip", "route", "show", "default"]).unwrap();
        let inside = String::from_utf8_lossy(&inside.stdout);
        assert!(
            inside.contains(&format!("via {} dev eth0", pod.host_ip()))
                && inside.contains("onlink"),
            "{inside}"
        );
        if wiring == Wiring::Calico {
            assert_eq!(pod.host_ip(), CALICO_GATEWAY);
        }
        reachable(&pod);
        let veth = veth.to_string();
        drop(pod);
        assert!(!std::path::Path::new("/sys/class/net").join(&veth).exists());
    }
}

#[test]
fn bridge_pods_are_ports_of_a_bridge_that_holds_their_gateway() {
    if skip_unless_root("bridge_pods_are_ports_of_a_bridge_that_holds_their_gateway") {
        return;
    }
    let bridge = Bridge::create().unwrap();
    let pods: Vec<Pod> = (0..2)
        .map(|_| Pod::create_wired("bridged", bridge.wiring()).unwrap())
        .collect();
    for pod in &pods {
        let veth = pod.host_veth();
        assert!(veth.starts_with("veth"), "{veth}");
        let master = std::fs::read_link(format!("/sys/class/net/{veth}/master")).unwrap();
        assert_eq!(
            master.file_name().unwrap().to_str(),
            Some(bridge.name.as_str())
        );
        let addrs = out(Command::new("ip").args(["-o", "-4", "addr", "show", "dev", &bridge.name]));
        assert!(addrs.contains(&format!("{}/30", pod.host_ip())), "{addrs}");
        reachable(pod);
    }
    let name = bridge.name.clone();
    drop(pods);
    let addrs = out(Command::new("ip").args(["-o", "-4", "addr", "show", "dev", &name]));
    assert!(
        addrs.trim().is_empty(),
        "the pods' gateways leave with them: {addrs}"
    );
    drop(bridge);
    assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
}
