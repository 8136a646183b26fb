//! Which interfaces get packet hooks: the node's ingress devices and pods' host-side veths,
//! read from /sys/class/net and /proc/net/route.

use crate::netpath::{HookSpec, Role};

#[derive(Debug, Clone, Default)]
pub struct NetCfg {
    pub enabled: bool,
    /// Node ingress devices by name; empty: the device of the default route.
    pub node_devices: Vec<String>,
    /// Name prefixes of pods' host-side veths (cali, lxc, veth, …).
    pub pod_veth_prefixes: Vec<String>,
    /// Also hook any other interface whose peer lives in another network namespace.
    pub auto_pod_veths: bool,
}

pub const DEFAULT_POD_VETH_PREFIXES: &[&str] = &["cali", "lxc", "veth"];
const NEVER: &[&str] = &[
    "lo",
    "cilium_host",
    "cilium_net",
    "lxc_health",
    "docker0",
    "cni0",
];

/// Interface carrying the IPv4 default route (from /proc/net/route).
pub fn default_route_dev(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")).then(|| f[0].to_string())
    })
}

/// One interface as `ip -j -d link show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// "veth", "vxlan", "bridge", "ipip", … ("" for physical devices).
    pub kind: String,
    /// The veth's peer lives in another network namespace.
    pub peer_elsewhere: bool,
}

/// Parses `ip -j -d link show` output.
pub fn parse_ip_links(json: &str) -> Vec<Link> {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|l| {
            Some(Link {
                ifindex: u32::try_from(l["ifindex"].as_u64()?).ok()?,
                name: l["ifname"].as_str()?.to_string(),
                kind: l["linkinfo"]["info_kind"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                peer_elsewhere: l.get("link_netnsid").is_some(),
            })
        })
        .collect()
}

pub fn list_links() -> Vec<Link> {
    std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| parse_ip_links(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

pub fn plan(cfg: &NetCfg, links: &[Link], route_table: Option<&str>) -> Vec<HookSpec> {
    if !cfg.enabled {
        return Vec::new();
    }
    let mut node = cfg.node_devices.clone();
    if node.is_empty() {
        node.extend(route_table.and_then(default_route_dev));
    }
    let mut out: Vec<HookSpec> = links
        .iter()
        .filter_map(|l| {
            let role = if node.contains(&l.name) {
                Role::Node
            } else if NEVER.contains(&l.name.as_str()) {
                return None;
            } else if cfg
                .pod_veth_prefixes
                .iter()
                .any(|pre| l.name.starts_with(pre.as_str()))
                || (cfg.auto_pod_veths && l.kind == "veth" && l.peer_elsewhere)
            {
                Role::PodVeth
            } else {
                return None;
            };
            Some(HookSpec {
                ifindex: l.ifindex,
                ifname: l.name.clone(),
                role,
            })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_dev(t).as_deref(), Some("eth0"));
        assert_eq!(default_route_dev("Iface\n"), None);
    }

    #[test]
    fn plans_from_ip_link_output() {
        let json = r#"[
          {"ifindex":1,"ifname":"lo","linkinfo":null},
          {"ifindex":2,"ifname":"eth0"},
          {"ifindex":7,"ifname":"cali1234","link_netnsid":0,"linkinfo":{"info_kind":"veth"}},
          {"ifindex":8,"ifname":"lxc_health","link_netnsid":1,"linkinfo":{"info_kind":"veth"}},
          {"ifindex":9,"ifname":"vpair","linkinfo":{"info_kind":"veth"}},
          {"ifindex":10,"ifname":"podveth","link_netnsid":3,"linkinfo":{"info_kind":"veth"}},
          {"ifindex":11,"ifname":"flannel.1","linkinfo":{"info_kind":"vxlan"}}
        ]"#;
        let links = parse_ip_links(json);
        assert_eq!(links.len(), 7);
        let route = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\neth0\t00000000\t01\t3\t0\t0\t0\t00000000\n";
        let cfg = NetCfg {
            enabled: true,
            node_devices: vec![],
            pod_veth_prefixes: vec!["cali".into(), "lxc".into()],
            auto_pod_veths: true,
        };
        let got: Vec<(String, Role)> = plan(&cfg, &links, Some(route))
            .into_iter()
            .map(|h| (h.ifname, h.role))
            .collect();
        assert_eq!(
            got,
            vec![
                ("eth0".into(), Role::Node),
                ("cali1234".into(), Role::PodVeth),
                ("podveth".into(), Role::PodVeth)
            ]
        );
        let forced = NetCfg {
            node_devices: vec!["flannel.1".into()],
            ..cfg.clone()
        };
        assert!(plan(&forced, &links, Some(route))
            .iter()
            .any(|h| h.ifname == "flannel.1" && h.role == Role::Node));
        assert!(plan(
            &NetCfg {
                enabled: false,
                ..cfg
            },
            &links,
            Some(route)
        )
        .is_empty());
        assert!(parse_ip_links("garbage").is_empty());
    }
}
