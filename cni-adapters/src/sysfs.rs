//! Builds a [`NodeView`] from a live node (or a fixture tree): /sys/class/net, /proc/net, the CNI config directory and CNI state paths.
//!
//! This is the only module that touches the filesystem. It reads the network namespace the
//! agent runs in (hostNetwork: the node's), so `/proc/net` must be the agent's own. Interfaces
//! come and go while we read (pods start and stop), so a vanished or half-readable interface is
//! skipped, not an error.

use crate::{Iface, NodeView};
use std::fs;
use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

/// CNI state paths whose presence names a CNI (see the detection rules). Each is also tried
/// in its `/var/run` <-> `/run` twin; only the one found is reported.
pub const STATE_PATHS: [&str; 3] = ["/run/flannel/subnet.env", "/var/run/calico", "/run/cilium"];

/// Config files larger than this are not CNI configs we can use; skipping them bounds memory.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

const IFF_UP: u32 = 0x1;
const RTF_UP: u32 = 0x1;
const RTF_REJECT: u32 = 0x200;
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_TUNNEL: u32 = 768;
const ARPHRD_TUNNEL6: u32 = 769;

/// Where to read from. [`Paths::host`] for a real node; [`Paths::under`] for a fixture tree or a
/// host filesystem mounted elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub sys_class_net: PathBuf,
    /// Holds `route`, `ipv6_route` and `if_inet6`.
    pub proc_net: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// Prefix for [`STATE_PATHS`].
    pub state_root: PathBuf,
}

impl Paths {
    pub fn host() -> Self {
        Paths::under(Path::new("/"))
    }

    pub fn under(root: &Path) -> Self {
        Paths {
            sys_class_net: root.join("sys/class/net"),
            proc_net: root.join("proc/net"),
            cni_conf_dir: root.join("etc/cni/net.d"),
            state_root: root.to_path_buf(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("cannot list network interfaces in {path}: {source} (is sysfs mounted?)")]
    NetClass { path: PathBuf, source: io::Error },
}

/// Reads the node. `kernel`, `tcx` and `netfilter_links` come from the agent's kernel probe:
/// whether an attach type works is learnt by trying it, not from files.
pub fn read_node_view(
    paths: &Paths,
    kernel: (u32, u32),
    tcx: bool,
    netfilter_links: bool,
) -> Result<NodeView, SysfsError> {
    let raws = read_raw_ifaces(&paths.sys_class_net)?;
    let defaults = default_route_devices(&paths.proc_net);
    let addrs6 = ipv6_addrs(&paths.proc_net);
    let ifaces = raws
        .iter()
        .map(|r| Iface {
            name: r.name.clone(),
            ifindex: r.ifindex,
            kind: r.kind().to_string(),
            master: r.master.clone(),
            up: r.up(),
            has_default_route: defaults.contains(&r.name),
            peer_netns_id: peer_netns(r, &raws),
            addrs: addrs6
                .iter()
                .filter(|(d, _)| *d == r.name)
                .map(|(_, a)| a.clone())
                .collect(),
        })
        .collect();
    Ok(NodeView {
        ifaces,
        cni_configs: read_cni_configs(&paths.cni_conf_dir),
        files_present: state_files(&paths.state_root),
        kernel,
        netfilter_links,
        tcx,
    })
}

/// What of the files [`read_node_view`] reads can be seen changing cheaply: the CNI config
/// directory's modification time (a config written, renamed or removed) and which state paths
/// exist. Interfaces, routes and addresses are not in it (the kernel announces those changes
/// over rtnetlink); nor are the configs' contents rewritten in place, or through a symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesStamp {
    conf_dir_mtime: Option<std::time::SystemTime>,
    state_files: Vec<String>,
}

pub fn files_stamp(paths: &Paths) -> FilesStamp {
    FilesStamp {
        conf_dir_mtime: fs::metadata(&paths.cni_conf_dir)
            .and_then(|m| m.modified())
            .ok(),
        state_files: state_files(&paths.state_root),
    }
}

/// "6.8.0-45-generic" -> (6, 8), for `/proc/sys/kernel/osrelease` or `uname -r`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// What sysfs says about one interface, before it is boiled down to an [`Iface`].
#[derive(Debug, Default)]
struct Raw {
    name: String,
    ifindex: u32,
    iflink: u32,
    arphrd: u32,
    devtype: Option<String>,
    master: Option<String>,
    flags: Option<u32>,
    operstate: String,
    physical: bool,
    bridge_dir: bool,
    stacked: bool,
    tun: bool,
}

impl Raw {
    /// sysfs has no "kind" file, so it is inferred: DEVTYPE in `uevent` names bridges and VXLAN;
    /// the ARP type names IP tunnels; a `device` link means hardware. What is left is an Ethernet
    /// device without hardware: a veth when its iflink points at another device (its peer), and
    /// is not stacked on a lower device (macvlan and vlan point iflink at their lower device,
    /// and have `lower_*` links); otherwise a dummy-like device.
    fn kind(&self) -> &'static str {
        match (self.devtype.as_deref(), self.arphrd) {
            (Some("bridge"), _) => "bridge",
            _ if self.bridge_dir => "bridge",
            (Some("vxlan"), _) => "vxlan",
            (_, ARPHRD_TUNNEL | ARPHRD_TUNNEL6) => "ipip",
            _ if self.physical => "device",
            (Some(_), _) => "",
            (None, ARPHRD_ETHER) if self.tun || self.stacked => "",
            (None, ARPHRD_ETHER) if self.iflink != 0 && self.iflink != self.ifindex => "veth",
            (None, ARPHRD_ETHER) => "dummy",
            _ => "",
        }
    }

    /// Administratively up and not known to be down. Tunnels and VXLAN devices report
    /// operstate "unknown" while working, so only explicit down states count against.
    fn up(&self) -> bool {
        let down = matches!(
            self.operstate.as_str(),
            "down" | "lowerlayerdown" | "notpresent"
        );
        match self.flags {
            Some(f) => f & IFF_UP != 0 && !down,
            None => matches!(self.operstate.as_str(), "up" | "unknown"),
        }
    }
}

fn read_raw_ifaces(dir: &Path) -> Result<Vec<Raw>, SysfsError> {
    let entries = fs::read_dir(dir).map_err(|source| SysfsError::NetClass {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<Raw> = entries
        .filter_map(Result::ok)
        .filter_map(|e| read_raw(&e.path(), &e.file_name().to_string_lossy()))
        .collect();
    out.sort_by_key(|r| r.ifindex);
    Ok(out)
}

fn read_raw(dir: &Path, name: &str) -> Option<Raw> {
    // An interface without a readable ifindex is gone (or not an interface): skip it.
    let ifindex = read_num(&dir.join("ifindex"))?;
    let devtype = fs::read_to_string(dir.join("uevent")).ok().and_then(|u| {
        u.lines()
            .find_map(|l| l.strip_prefix("DEVTYPE=").map(|v| v.trim().to_string()))
    });
    let master = fs::read_link(dir.join("master"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
    let stacked = fs::read_dir(dir)
        .map(|es| {
            es.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("lower_"))
        })
        .unwrap_or(false);
    Some(Raw {
        name: name.to_string(),
        ifindex,
        iflink: read_num(&dir.join("iflink")).unwrap_or(ifindex),
        arphrd: read_num(&dir.join("type")).unwrap_or(0),
        devtype,
        master,
        flags: read_hex(&dir.join("flags")),
        operstate: read_trim(&dir.join("operstate")).unwrap_or_default(),
        physical: dir.join("device").exists(),
        bridge_dir: dir.join("bridge").is_dir(),
        stacked,
        tun: dir.join("tun_flags").exists(),
    })
}

/// A veth's peer is local when the device at its iflink points back at it. Otherwise the
/// peer is in another namespace, whose id sysfs does not show: -1 (see [`Iface::peer_netns_id`]).
/// Ifindexes are per namespace, so a local device can share the peer's number; requiring the
/// link to point back makes a false "local" unlikely.
fn peer_netns(r: &Raw, all: &[Raw]) -> Option<i32> {
    if r.kind() != "veth" {
        return None;
    }
    let local = all
        .iter()
        .any(|p| p.ifindex == r.iflink && p.iflink == r.ifindex && p.name != r.name);
    if local {
        None
    } else {
        Some(-1)
    }
}

/// Devices with an up, non-reject default route in the main IPv4 or IPv6 table.
fn default_route_devices(proc_net: &Path) -> Vec<String> {
    let mut devs = Vec::new();
    if let Ok(text) = fs::read_to_string(proc_net.join("route")) {
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        for f in text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
        {
            let flags = f
                .get(3)
                .and_then(|x| u32::from_str_radix(x, 16).ok())
                .unwrap_or(0);
            if f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000" && flags & RTF_UP != 0 {
                devs.push(f[0].to_string());
            }
        }
    }
    if let Ok(text) = fs::read_to_string(proc_net.join("ipv6_route")) {
        // dest dest_len src src_len nexthop metric refcnt use flags dev
        for f in text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
        {
            if f.len() < 10 || f[1] != "00" || f[0].bytes().any(|b| b != b'0') {
                continue;
            }
            let flags = u32::from_str_radix(f[8], 16).unwrap_or(0);
            // The kernel keeps a reject ::/0 route on lo; it is not a way out.
            if flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && f[9] != "lo" {
                devs.push(f[9].to_string());
            }
        }
    }
    devs.sort();
    devs.dedup();
    devs
}

/// IPv6 addresses per device from `if_inet6`, as "addr/len". IPv4 addresses are not in
/// /proc per device (only rtnetlink has them); the planner does not need them.
fn ipv6_addrs(proc_net: &Path) -> Vec<(String, String)> {
    let Ok(text) = fs::read_to_string(proc_net.join("if_inet6")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            // addr ifindex prefixlen scope flags dev
            let f: Vec<&str> = l.split_whitespace().collect();
            let addr = Ipv6Addr::from(u128::from_str_radix(f.first()?, 16).ok()?);
            let len = u8::from_str_radix(f.get(2)?, 16).ok()?;
            Some((f.get(5)?.to_string(), format!("{addr}/{len}")))
        })
        .collect()
}

/// Only files libcni would load are read: the directory also holds kubeconfigs (Calico's,
/// Multus'), whose contents must not end up in a NodeView that `probe` prints. Other names
/// are listed with empty contents so detection can say they were ignored.
fn read_cni_configs(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        // metadata() follows links: configs are often symlinks into a ConfigMap mount.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let loadable = [".conf", ".conflist", ".json"]
            .iter()
            .any(|x| name.ends_with(x));
        if !loadable {
            out.push((name, String::new()));
        } else if meta.len() <= MAX_CONFIG_BYTES {
            if let Ok(body) = fs::read_to_string(&path) {
                out.push((name, body));
            }
        }
    }
    out.sort();
    out
}

fn state_files(root: &Path) -> Vec<String> {
    let twin = |p: &str| match p.strip_prefix("/var/run/") {
        Some(rest) => format!("/run/{rest}"),
        None => format!("/var{p}"),
    };
    STATE_PATHS
        .iter()
        .filter_map(|&p| {
            let alt = twin(p);
            [p.to_string(), alt]
                .into_iter()
                .find(|c| root.join(c.trim_start_matches('/')).exists())
        })
        .collect()
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_num(p: &Path) -> Option<u32> {
    read_trim(p)?.parse().ok()
}

fn read_hex(p: &Path) -> Option<u32> {
    let s = read_trim(p)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}
