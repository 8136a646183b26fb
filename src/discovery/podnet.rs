//! Which pod veths get packet hooks: those whose peer sits in the network namespace of a traced
//! process, not every pod's. rtnetlink tells which namespace holds each veth's peer (its id in
//! ours, `IFLA_LINK_NETNSID`) and which id a target's namespace has (`RTM_GETNSID` on
//! `/proc/<pid>/ns/net`). Where that cannot be established, every pod veth is hooked, as
//! before, and `/api/v1/targets` says why (`cni.pod_veths`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::netpath::{HookSpec, Role};
use crate::rtnl::{attr, attrs, u32_at, Rtnl};

const IFINFOMSG_LEN: usize = 16;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_LINK_NETNSID: u16 = 37;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;

/// A traced process's network namespace, when it is not the agent's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetNetns {
    /// The namespace's inode (what `ip netns identify` and `lsns` show).
    pub ino: u64,
    /// One traced process in it.
    pub pid: u32,
    /// Its id in the agent's namespace: `Ok(None)` when it has none, which means no device of
    /// ours has its peer there; `Err` when it could not be asked.
    pub nsid: Result<Option<i32>, String>,
    /// It has a device besides `lo` (a namespace with loopback only has no path to hook).
    pub has_devices: bool,
}

/// How pod veths were chosen, for `/api/v1/targets`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PodVeths {
    /// `target_pods`: the veths of pods with a target; `all`: every pod veth the CNI plan
    /// names (the mapping could not be established: `fallback` says why).
    pub scope: &'static str,
    /// Pod veths the CNI plan names on this node, and how many of them are hooked.
    pub candidates: usize,
    pub hooked: usize,
    /// Targets' network namespaces other than the agent's.
    pub target_netns: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Targets whose namespace no pod veth of this node leads to (pod_in/pod_out absent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreached: Vec<String>,
}

/// The network namespaces of `pids` other than the agent's own, one entry per namespace.
pub fn target_netns(proc_root: &Path, pids: impl IntoIterator<Item = u32>) -> Vec<TargetNetns> {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut rtnl = None;
    for pid in pids {
        let path = proc_root.join(pid.to_string()).join("ns/net");
        // A process gone since the scan found it has no namespace to hook.
        let Ok(ino) = std::fs::metadata(&path).map(|m| m.ino()) else {
            continue;
        };
        if Some(ino) == own || !seen.insert(ino) {
            continue;
        }
        let nsid = netns_id(&mut rtnl, &path).map_err(|e| format!("{e}"));
        let has_devices = std::fs::read_to_string(proc_root.join(pid.to_string()).join("net/dev"))
            .map(|t| devices(&t).any(|d| d != "lo"))
            .unwrap_or(true);
        out.push(TargetNetns {
            ino,
            pid,
            nsid,
            has_devices,
        });
    }
    out
}

/// Interface names in a `/proc/<pid>/net/dev` text.
fn devices(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim()))
}

/// The id our namespace gives the namespace at `path` (`None`: it has none yet).
fn netns_id(rtnl: &mut Option<Rtnl>, path: &Path) -> io::Result<Option<i32>> {
    let ns = std::fs::File::open(path)?;
    if rtnl.is_none() {
        *rtnl = Some(Rtnl::open()?);
    }
    let sock = rtnl.as_ref().expect("opened above");
    let mut req = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    req.extend(attr(NETNSA_FD, &(ns.as_raw_fd() as u32).to_ne_bytes()));
    let mut id = None;
    let res = sock.call(libc::RTM_GETNSID, false, &req, |ty, body| {
        if ty == libc::RTM_NEWNSID {
            id = nsid_reply(body);
        }
    });
    if res.is_err() {
        // A fresh socket for the next target: nothing of this answer can be read as its.
        *rtnl = None;
    }
    res?;
    Ok(id.filter(|&i| i >= 0))
}

fn nsid_reply(body: &[u8]) -> Option<i32> {
    attrs(body.get(4..)?)
        .into_iter()
        .find(|(t, v)| *t == NETNSA_NSID && v.len() >= 4)
        .map(|(_, v)| u32_at(v, 0) as i32)
}

/// For each interface of the agent's namespace whose peer is in another namespace (a veth
/// leading into a pod): that namespace's id.
pub fn peer_netns_ids() -> io::Result<BTreeMap<u32, i32>> {
    let mut req = vec![0u8; IFINFOMSG_LEN];
    req[0] = libc::AF_UNSPEC as u8;
    req.extend(attr(IFLA_EXT_MASK, &RTEXT_FILTER_SKIP_STATS.to_ne_bytes()));
    let mut out = BTreeMap::new();
    Rtnl::open()?.call(libc::RTM_GETLINK, true, &req, |ty, body| {
        if ty == libc::RTM_NEWLINK {
            if let Some((ifindex, nsid)) = link_peer(body) {
                out.insert(ifindex, nsid);
            }
        }
    })?;
    Ok(out)
}

fn link_peer(body: &[u8]) -> Option<(u32, i32)> {
    let ifindex = u32_at(body.get(..IFINFOMSG_LEN)?, 4);
    attrs(&body[IFINFOMSG_LEN..])
        .into_iter()
        .find(|(t, v)| *t == IFLA_LINK_NETNSID && v.len() >= 4)
        .map(|(_, v)| (ifindex, u32_at(v, 0) as i32))
}

/// Keeps the node devices of `hooks` and the pod veths that lead into a target's namespace.
/// Every pod veth stays hooked when a target's namespace id is unknown, or when a target with
/// devices is reached by no veth while some pod veth's peer is unknown (it might be that one).
pub fn select(
    hooks: Vec<HookSpec>,
    peers: &io::Result<BTreeMap<u32, i32>>,
    targets: &[TargetNetns],
) -> (Vec<HookSpec>, PodVeths) {
    let (pods, mut out): (Vec<HookSpec>, Vec<HookSpec>) =
        hooks.into_iter().partition(|h| h.role == Role::PodVeth);
    let mut rep = PodVeths {
        scope: "target_pods",
        candidates: pods.len(),
        target_netns: targets.len(),
        ..Default::default()
    };
    let peer_of = |h: &HookSpec| peers.as_ref().ok().and_then(|p| p.get(&h.ifindex).copied());
    let wanted: BTreeSet<i32> = targets
        .iter()
        .filter_map(|t| t.nsid.clone().ok().flatten())
        .collect();
    let unknown_peer = pods.iter().any(|h| peer_of(h).is_none());
    let mut fallback = None;
    for t in targets.iter().filter(|t| t.has_devices) {
        let reached = |id: i32| pods.iter().any(|h| peer_of(h) == Some(id));
        match &t.nsid {
            Err(e) => {
                fallback = Some(format!(
                    "cannot tell the network namespace id of pid {}: {e}",
                    t.pid
                ));
                break;
            }
            Ok(Some(id)) if reached(*id) => {}
            Ok(_) if unknown_peer => {
                let why = match peers {
                    Err(e) => format!("cannot list the node's veth peers: {e}"),
                    Ok(_) => "some pod veths' peers are not in a namespace of their own".into(),
                };
                fallback = Some(format!(
                    "no pod veth is known to lead to pid {}'s network namespace, and {why}",
                    t.pid
                ));
                break;
            }
            Ok(_) => rep
                .unreached
                .push(format!("pid {} (netns {})", t.pid, t.ino)),
        }
    }
    let kept: Vec<HookSpec> = match &fallback {
        Some(_) => pods,
        None => pods
            .into_iter()
            .filter(|h| peer_of(h).is_some_and(|id| wanted.contains(&id)))
            .collect(),
    };
    if fallback.is_some() {
        rep.scope = "all";
        rep.unreached.clear();
    }
    rep.fallback = fallback;
    rep.hooked = kept.len();
    out.extend(kept);
    out.sort();
    (out, rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, ifindex: u32, role: Role) -> HookSpec {
        HookSpec {
            ifindex,
            ifname: name.into(),
            role,
        }
    }

    fn target(pid: u32, nsid: Result<Option<i32>, String>) -> TargetNetns {
        TargetNetns {
            ino: 4026530000 + u64::from(pid),
            pid,
            nsid,
            has_devices: true,
        }
    }

    fn names(h: &[HookSpec]) -> Vec<&str> {
        h.iter().map(|h| h.ifname.as_str()).collect()
    }

    fn node() -> Vec<HookSpec> {
        vec![
            spec("eth0", 2, Role::Node),
            spec("cali1", 10, Role::PodVeth),
            spec("cali2", 11, Role::PodVeth),
            spec("cali3", 12, Role::PodVeth),
        ]
    }

    #[test]
    fn only_the_veths_into_target_namespaces() {
        let peers = Ok([(10, 0), (11, 1), (12, 2)].into());
        let (h, r) = select(node(), &peers, &[target(100, Ok(Some(1)))]);
        assert_eq!(names(&h), ["eth0", "cali2"]);
        assert_eq!((r.scope, r.candidates, r.hooked), ("target_pods", 3, 1));
        // No target in a pod: node devices only.
        let (h, r) = select(node(), &peers, &[]);
        assert_eq!(names(&h), ["eth0"]);
        assert_eq!(r.hooked, 0);
        // A pod with two interfaces into the node: both.
        let peers = Ok([(10, 5), (11, 1), (12, 5)].into());
        let (h, _) = select(node(), &peers, &[target(7, Ok(Some(5)))]);
        assert_eq!(names(&h), ["eth0", "cali1", "cali3"]);
    }

    #[test]
    fn unknown_ids_fall_back_to_every_pod_veth() {
        let peers = Ok([(10, 0), (11, 1), (12, 2)].into());
        let (h, r) = select(node(), &peers, &[target(9, Err("EPERM".into()))]);
        assert_eq!(names(&h), ["eth0", "cali1", "cali2", "cali3"]);
        assert_eq!(r.scope, "all");
        assert!(r.fallback.unwrap().contains("pid 9"));
        // The peers could not be listed, and a target is in a namespace with devices.
        let peers = Err(io::Error::other("boom"));
        let (h, r) = select(node(), &peers, &[target(9, Ok(Some(1)))]);
        assert_eq!((h.len(), r.scope), (4, "all"));
        assert!(r.fallback.unwrap().contains("boom"));
    }

    #[test]
    fn a_target_reached_by_no_veth_is_reported_not_a_reason_to_hook_all() {
        let peers = Ok([(10, 0), (11, 1), (12, 2)].into());
        let mut lo_only = target(3, Ok(None));
        lo_only.has_devices = false;
        let (h, r) = select(
            node(),
            &peers,
            &[target(4, Ok(Some(2))), target(5, Ok(None)), lo_only],
        );
        assert_eq!(names(&h), ["eth0", "cali3"]);
        assert_eq!(r.scope, "target_pods");
        assert_eq!(r.unreached.len(), 1);
        assert!(r.unreached[0].starts_with("pid 5"));
        // …unless some pod veth's peer is unknown: that one might lead there.
        let peers = Ok([(10, 0), (11, 1)].into());
        let (h, r) = select(node(), &peers, &[target(5, Ok(None))]);
        assert_eq!((h.len(), r.scope), (4, "all"));
    }

    #[test]
    fn parses_link_and_nsid_replies() {
        let mut link = vec![0u8; IFINFOMSG_LEN];
        link[4..8].copy_from_slice(&42u32.to_ne_bytes());
        link.extend(attr(3, b"cali1\0"));
        link.extend(attr(IFLA_LINK_NETNSID, &7i32.to_ne_bytes()));
        assert_eq!(link_peer(&link), Some((42, 7)));
        link.truncate(IFINFOMSG_LEN);
        assert_eq!(link_peer(&link), None);
        let mut ns = vec![0u8; 4];
        ns.extend(attr(NETNSA_NSID, &(-1i32).to_ne_bytes()));
        assert_eq!(nsid_reply(&ns), Some(-1));
        assert_eq!(
            devices("h1\nh2\n    lo: 1 2\n  eth0: 3 4\n").collect::<Vec<_>>(),
            ["lo", "eth0"]
        );
    }

    /// The kernel answers: this process's own namespace is skipped, and the dump parses.
    #[test]
    fn asks_the_kernel() {
        let t = target_netns(Path::new("/proc"), [std::process::id()]);
        assert!(t.is_empty(), "the agent's own namespace is not a pod's");
        assert!(peer_netns_ids().is_ok());
    }
}
