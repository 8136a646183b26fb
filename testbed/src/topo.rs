//! Node topologies for the network-path tests: a client outside the node (its own netns,
//! reaching the node through an uplink veth the agent treats as the node's NIC), server pods
//! behind host-side veths, kube-proxy-style DNAT from a ClusterIP to a pod, a cni0-style
//! bridge, and a VXLAN overlay to another node (Flannel's `flannel.<VNI>` on port 8472).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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

    /// Gives the client an IPv6 address and lets the node forward IPv6 that enters through the
    /// uplink (per device, `force_forwarding`: the host's global IPv6 forwarding stays off).
    pub fn enable_ipv6(&self) -> Result<Ipv6Addr> {
        let ip = self.client.enable_ipv6()?;
        self.client.force_ipv6_forwarding()?;
        Ok(ip)
    }
}

/// A ClusterIP-style service: iptables DNAT in the root netns's PREROUTING, removed on drop.
pub struct Service {
    pub vip: SocketAddr,
    rule: Vec<String>,
}

fn iptables(tool: &str, args: &[String]) -> Result<()> {
    let out = Command::new(tool)
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("running iptables")?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
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
        Service::add(SocketAddr::new(vip_ip.into(), vip_port), backend)
    }

    /// The IPv6 ClusterIP of a dual-stack service: a fresh address in fd00:96::/64 DNATed
    /// (ip6tables) to the IPv6 `backend`.
    pub fn dnat6(vip_port: u16, backend: SocketAddr) -> Result<Service> {
        let n = (std::process::id() % 0xffff) << 16 | SVC.fetch_add(1, Ordering::Relaxed) & 0xffff;
        let vip_ip = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, (n >> 16) as u16, n as u16 | 1);
        Service::add(SocketAddr::new(vip_ip.into(), vip_port), backend)
    }

    fn add(vip: SocketAddr, backend: SocketAddr) -> Result<Service> {
        let (tool, plen) = if vip.is_ipv6() {
            ("ip6tables", 128)
        } else {
            ("iptables", 32)
        };
        let rule: Vec<String> = [
            "PREROUTING",
            "-d",
            &format!("{}/{plen}", vip.ip()),
            "-p",
            "tcp",
            "--dport",
            &vip.port().to_string(),
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
        iptables(tool, &add)?;
        Ok(Service { vip, rule })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let mut del = vec!["-t".to_string(), "nat".into(), "-D".into()];
        del.extend(self.rule.iter().cloned());
        let tool = if self.vip.is_ipv6() {
            "ip6tables"
        } else {
            "iptables"
        };
        let _ = iptables(tool, &del);
    }
}

static VX: AtomicU32 = AtomicU32::new(0);
static BR: AtomicU32 = AtomicU32::new(0);

/// A cni0-style bridge in the root netns for [`crate::netns::Wiring::Bridge`] pods, which put
/// their gateway address on it. Named `cni<pid hex>x<n>` (stale runs are swept by the pid);
/// deleted on drop, after its pods (drop them first).
pub struct Bridge {
    pub name: String,
}

impl Bridge {
    pub fn create() -> Result<Bridge> {
        crate::require_root()?;
        let name = crate::netns::device_name("cni", BR.fetch_add(1, Ordering::Relaxed));
        run_ip(&["link", "add", &name, "type", "bridge"])?;
        let br = Bridge { name };
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", br.name),
            "1",
        );
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{}/rp_filter", br.name),
            "0",
        );
        run_ip(&["link", "set", &br.name, "up"])?;
        Ok(br)
    }

    pub fn wiring(&self) -> crate::netns::Wiring {
        crate::netns::Wiring::Bridge(self.name.clone())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run_ip(&["link", "del", &self.name]);
    }
}

/// Flannel-style: the client is on another node reached over a VXLAN overlay. The underlay is
/// the client's link to this node (`Outside::uplink`); the overlay devices carry inner
/// addresses in 10.201.0.0/16, and the client routes pod traffic through its VXLAN device.
pub struct Overlay {
    pub device: String,
    underlay_client_ip: Ipv4Addr,
}

/// Flannel names its device `flannel.<VNI>`. Ours carry VNI = 2 × pid + (0 or 1), which fits the
/// 15-character limit (pid_max is at most 2^22) and tells the stale sweep the creating pid.
fn flannel_device() -> (String, String) {
    let vni = 2 * std::process::id() + VX.load(Ordering::Relaxed) % 2;
    (format!("flannel.{vni}"), vni.to_string())
}

/// The pid that created a leftover `flannel.<VNI>` of ours: only for a VXLAN device whose
/// underlay address is in the testbed's 10.200.0.0/16, so a real node's Flannel is never swept.
pub(crate) fn overlay_owner(name: &str) -> Option<i32> {
    let vni: u32 = name.strip_prefix("flannel.")?.parse().ok()?;
    let out = Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", name])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let info = &v[0]["linkinfo"];
    let ours = info["info_kind"] == "vxlan"
        && info["info_data"]["local"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.200."));
    ours.then_some((vni / 2) as i32)
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Overlay {
    /// Builds the overlay between `outside`'s client and this node and routes `pod_ip` over it.
    /// The node's device is named `lsvx…`, which names no CNI.
    pub fn create(outside: &Outside, pod_ip: Ipv4Addr) -> Result<Overlay> {
        let device = crate::netns::device_name("lsvx", VX.load(Ordering::Relaxed));
        Overlay::build(outside, pod_ip, device, None)
    }

    /// As [`Overlay::create`], with the node's device named like Flannel's: `flannel.<VNI>`.
    pub fn flannel(outside: &Outside, pod_ip: Ipv4Addr) -> Result<Overlay> {
        let (device, vni) = flannel_device();
        Overlay::build(outside, pod_ip, device, Some(vni))
    }

    fn build(
        outside: &Outside,
        pod_ip: Ipv4Addr,
        device: String,
        vni: Option<String>,
    ) -> Result<Overlay> {
        let n = (std::process::id() % 250) * 64 + VX.fetch_add(1, Ordering::Relaxed) % 64;
        let vni = vni.unwrap_or_else(|| (n + 100).to_string());
        let (node_under, client_under) = (outside.client.host_ip(), outside.client.ip());
        let (node_inner, client_inner) = (
            Ipv4Addr::new(10, 201, (n >> 6) as u8, ((n & 63) * 4 + 1) as u8),
            Ipv4Addr::new(10, 201, (n >> 6) as u8, ((n & 63) * 4 + 2) as u8),
        );
        let ns = outside.client.netns_name().to_string();
        // Node side (like flannel.1): VXLAN on 8472, Linux's and flannel's port.
        run_ip(&[
            "link",
            "add",
            &device,
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            &node_under.to_string(),
            "remote",
            &client_under.to_string(),
            "dstport",
            "8472",
            "dev",
            outside.uplink(),
        ])?;
        let ov = Overlay {
            device: device.clone(),
            underlay_client_ip: client_under,
        };
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{device}/rp_filter"), "0");
        run_ip(&["addr", "add", &format!("{node_inner}/30"), "dev", &device])?;
        run_ip(&["link", "set", &device, "up"])?;
        // Client side.
        run_ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            &client_under.to_string(),
            "remote",
            &node_under.to_string(),
            "dstport",
            "8472",
            "dev",
            "eth0",
        ])?;
        run_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{client_inner}/30"),
            "dev",
            "vx0",
        ])?;
        run_ip(&["-n", &ns, "link", "set", "vx0", "up"])?;
        run_ip(&[
            "-n",
            &ns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "via",
            &node_inner.to_string(),
            "dev",
            "vx0",
        ])?;
        Ok(ov)
    }

    pub fn underlay_client_ip(&self) -> Ipv4Addr {
        self.underlay_client_ip
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = run_ip(&["link", "del", &self.device]);
    }
}
