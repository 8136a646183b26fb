//! CNI adapters: decide which CNI wires this node's pods and where the packet-timestamp hooks go.
//!
//! Everything here except [`sysfs`] is pure: it reads a [`NodeView`] (interfaces, CNI config
//! files, a few state files, kernel capabilities) and returns a [`Detection`] and a
//! [`HookPlan`]. The agent's loader applies the plan (tcx or clsact tc programs, netfilter BPF
//! links, or passive `net/*` tracepoints) and re-plans when pod veths come and go ([`diff`]).
//! Keeping the decisions pure is what lets every CNI's rules be tested without root.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

mod detect;
mod plan;
pub mod sysfs;

pub use detect::detect;
pub use plan::{
    diff, plan, Attach, Hook, HookPlan, HookPoint, PlanOptions, DEFAULT_CLSACT_PRIORITY,
};

/// The CNI adapters we know. `Generic` covers every other CNI through the node's ingress
/// device and the pods' host-side veths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cni {
    Calico,
    Cilium,
    Flannel,
    Generic,
}

impl Cni {
    pub const ALL: [Cni; 4] = [Cni::Calico, Cni::Cilium, Cni::Flannel, Cni::Generic];

    pub fn as_str(self) -> &'static str {
        match self {
            Cni::Calico => "calico",
            Cni::Cilium => "cilium",
            Cni::Flannel => "flannel",
            Cni::Generic => "generic",
        }
    }
}

impl fmt::Display for Cni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An adapter name in the agent's configuration that we do not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CNI adapter {0:?}: use calico, cilium, flannel, generic or auto")]
pub struct UnknownCni(pub String);

impl FromStr for Cni {
    type Err = UnknownCni;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Cni::ALL
            .into_iter()
            .find(|c| c.as_str() == t)
            .ok_or_else(|| UnknownCni(s.to_string()))
    }
}

/// Parses the agent's `cni` configuration value: `auto` or empty means detect, anything else
/// forces that adapter (the value to pass to [`detect`] as `force`).
pub fn parse_force(value: &str) -> Result<Option<Cni>, UnknownCni> {
    match value.trim() {
        "" => Ok(None),
        v if v.eq_ignore_ascii_case("auto") => Ok(None),
        v => v.parse().map(Some),
    }
}

/// One network interface of the node's (host) network namespace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    /// "veth", "bridge", "vxlan", "ipip", "device" (physical), "dummy", or "" for anything else
    /// (loopback, wireguard, tun, ...).
    pub kind: String,
    /// The device this one is enslaved to (a bridge for bridge-based CNIs).
    pub master: Option<String>,
    pub up: bool,
    pub has_default_route: bool,
    /// For a veth whose peer lives in another network namespace: that namespace's id as this
    /// namespace sees it, or -1 when the peer is elsewhere but its id is not known (sysfs cannot
    /// tell it; rtnetlink's IFLA_LINK_NETNSID can). `None`: not a veth, the peer is in this
    /// namespace, or unknown.
    pub peer_netns_id: Option<i32>,
    pub addrs: Vec<String>,
}

/// What the planner knows about the node. Built by [`sysfs::read_node_view`] on a real node,
/// or by hand in tests.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeView {
    pub ifaces: Vec<Iface>,
    /// CNI config files from `/etc/cni/net.d`: (file name, contents).
    pub cni_configs: Vec<(String, String)>,
    /// Which of the CNI state paths we look for exist, e.g. "/run/flannel/subnet.env".
    pub files_present: Vec<String>,
    /// Running kernel (major, minor).
    pub kernel: (u32, u32),
    /// The kernel supports netfilter BPF links (>= 6.4), as probed by the agent.
    pub netfilter_links: bool,
    /// The kernel supports tcx attachment (>= 6.6), as probed by the agent.
    pub tcx: bool,
}

impl NodeView {
    pub fn iface(&self, name: &str) -> Option<&Iface> {
        self.ifaces.iter().find(|i| i.name == name)
    }
}

/// The CNI the node runs, how sure we are, and what we saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detection {
    pub cni: Cni,
    /// "forced" (configuration named the adapter), "config" (CNI config or state files),
    /// "interfaces" (interface names only), or "fallback" (nothing recognised: generic).
    pub confidence: &'static str,
    /// Human-readable lines, one per thing seen, for `llm-slo-agent probe` and the targets API.
    pub evidence: Vec<String>,
}
