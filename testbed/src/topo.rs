//! Node topologies for the network-path tests: a client outside the node (its own netns,
//! reaching the node through an uplink veth the agent treats as the node's NIC), server pods
//! behind host-side veths, and kube-proxy-style DNAT from a ClusterIP to a pod.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::netns::Pod;

static SVC: AtomicU32 = AtomicU32::new(0);

/// A client namespace connected to the node (the root netns) through `uplink()`, with IP
/// forwarding on so it reaches pods the way traffic from outside a node does.
pub struct Outside {
    pub client: Pod,
}

impl Outside {
    pub fn create() -> Result<Outside> {
        let client = Pod::create("client")?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IP forwarding")?;
        Ok(Outside { client })
    }

    /// The node-side end of the client's link: the agent's "node ingress device".
    pub fn uplink(&self) -> &str {
        self.client.host_veth()
    }

    pub fn netns_path(&self) -> std::path::PathBuf {
        self.client.netns_path()
    }
}

/// A ClusterIP-style service: iptables DNAT in the root netns's PREROUTING, removed on drop.
pub struct Service {
    pub vip: SocketAddr,
    rule: Vec<String>,
}

fn iptables(args: &[String]) -> Result<()> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("running iptables")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Service {
    /// DNAT `vip_port` on a fresh address in 10.96.0.0/16 to `backend`.
    pub fn dnat(vip_port: u16, backend: SocketAddr) -> Result<Service> {
        let n = (std::process::id() % 200) * 256 + SVC.fetch_add(1, Ordering::Relaxed) % 256;
        let vip_ip = Ipv4Addr::new(10, 96, (n >> 8) as u8 + 1, (n & 0xff) as u8 + 1);
        let vip = SocketAddr::new(vip_ip.into(), vip_port);
        let rule: Vec<String> = [
            "PREROUTING",
            "-d",
            &format!("{vip_ip}/32"),
            "-p",
            "tcp",
            "--dport",
            &vip_port.to_string(),
            "-m",
            "comment",
            "--comment",
            "llmslo-testbed",
            "-j",
            "DNAT",
            "--to-destination",
            &backend.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut add = vec!["-t".to_string(), "nat".into(), "-A".into()];
        add.extend(rule.iter().cloned());
        iptables(&add)?;
        Ok(Service { vip, rule })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let mut del = vec!["-t".to_string(), "nat".into(), "-D".into()];
        del.extend(self.rule.iter().cloned());
        let _ = iptables(&del);
    }
}
