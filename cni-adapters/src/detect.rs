//! CNI detection: the CNI config kubelet uses, then CNI state files, then interface names.

use crate::{Cni, Detection, Iface, NodeView};
use serde_json::Value;

/// When one source names several CNIs, the first here wins. Cilium first: in chaining mode it
/// sits beside another plugin, and its tc programs are what our hooks must coexist with.
/// Calico before Flannel: Canal is Calico's plugin (cali* veths) over Flannel's VXLAN.
const PRIORITY: [Cni; 3] = [Cni::Cilium, Cni::Calico, Cni::Flannel];

/// The extensions libcni (and so kubelet/containerd/CRI-O) loads from the config directory.
const CONFIG_EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

/// How many interface names one evidence line lists before it summarises.
const NAMES_SHOWN: usize = 5;

/// Decides which CNI the node runs. Sources, strongest first: `force`; the CNI config file in
/// use; CNI state files; interface names; else generic. Evidence lists what every source said,
/// so a disagreement (a leftover config, a stale interface) is visible in `probe`.
pub fn detect(view: &NodeView, force: Option<Cni>) -> Detection {
    let mut config_ev = Vec::new();
    let mut files_ev = Vec::new();
    let mut iface_ev = Vec::new();
    let by_config = from_configs(view, &mut config_ev);
    let by_files = from_state_files(view, &mut files_ev);
    let by_ifaces = from_interfaces(view, &mut iface_ev);

    let (cni, confidence) = match (force, by_config, by_files, by_ifaces) {
        (Some(c), ..) => (c, "forced"),
        (None, Some(c), ..) => (c, "config"),
        // State files are written by the CNI's own daemon, so they are config-grade evidence
        // even where /etc/cni/net.d is not mounted into the agent's container.
        (None, None, Some(c), _) => (c, "config"),
        (None, None, None, Some(c)) => (c, "interfaces"),
        (None, None, None, None) => (Cni::Generic, "fallback"),
    };

    let mut evidence = Vec::new();
    if let Some(c) = force {
        evidence.push(format!("forced by configuration: {c}"));
    }
    evidence.extend(config_ev);
    evidence.extend(files_ev);
    evidence.extend(iface_ev);
    for (source, said) in [
        ("the CNI config says", by_config),
        ("CNI state files say", by_files),
        ("interfaces say", by_ifaces),
    ] {
        if let Some(other) = said.filter(|&o| o != cni) {
            evidence.push(format!(
                "{source} {other}, but {cni} was chosen ({confidence})"
            ));
        }
    }
    if confidence == "fallback" {
        evidence.push("no CNI config, CNI state file or CNI interface recognised: generic".into());
    }
    Detection {
        cni,
        confidence,
        evidence,
    }
}

/// Kubelet wires pods with the first loadable config in name order, so that file decides;
/// later files are reported but do not vote (they are often leftovers of a previous CNI).
fn from_configs(view: &NodeView, ev: &mut Vec<String>) -> Option<Cni> {
    let mut files: Vec<&(String, String)> = view.cni_configs.iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut chosen = None;
    for (name, body) in files {
        if !CONFIG_EXTENSIONS.iter().any(|e| name.ends_with(e)) {
            ev.push(format!(
                "CNI config dir: {name} ignored (libcni loads only .conf, .conflist, .json)"
            ));
            continue;
        }
        let types = match plugin_types(body) {
            Ok(t) => t,
            Err(why) => {
                ev.push(format!("CNI config {name}: skipped, {why}"));
                continue;
            }
        };
        let cni = cni_of_types(&types);
        let role = if chosen.is_none() {
            "in use"
        } else {
            "not in use: a file before it wins"
        };
        ev.push(format!(
            "CNI config {name} ({role}): plugin types [{}] -> {cni}",
            types.join(", ")
        ));
        chosen.get_or_insert(cni);
    }
    chosen
}

/// Every plugin `type` in a config: the top-level `type` (.conf), `plugins[].type`
/// (.conflist), and nested ones, because Multus (`delegates`) and Flannel (`delegate`) carry the
/// real plugin inside another. IPAM types come along too; they map to no CNI, so they are harmless.
fn plugin_types(body: &str) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if !obj.contains_key("type") && !obj.get("plugins").is_some_and(Value::is_array) {
        return Err("neither `type` nor `plugins` present".into());
    }
    let mut out = Vec::new();
    collect_types(&v, &mut out);
    Ok(out)
}

fn collect_types(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(t)) = m.get("type") {
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
            m.values().for_each(|x| collect_types(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_types(x, out)),
        _ => {}
    }
}

fn plugin_cni(plugin_type: &str) -> Option<Cni> {
    match plugin_type {
        "calico" => Some(Cni::Calico),
        "cilium-cni" => Some(Cni::Cilium),
        "flannel" => Some(Cni::Flannel),
        _ => None,
    }
}

/// A config that names none of our CNIs (bridge, ptp, kindnet, aws-cni, ...) is still an
/// answer: kubelet uses it, so the node is generic.
fn cni_of_types(types: &[String]) -> Cni {
    PRIORITY
        .into_iter()
        .find(|&c| types.iter().any(|t| plugin_cni(t) == Some(c)))
        .unwrap_or(Cni::Generic)
}

/// Paths are compared with `/var/run` folded into `/run` (one is a link to the other on every
/// distribution we know) and without a trailing slash.
fn from_state_files(view: &NodeView, ev: &mut Vec<String>) -> Option<Cni> {
    let mut seen = Vec::new();
    for path in &view.files_present {
        let p = path.trim_end_matches('/');
        let p = p
            .strip_prefix("/var")
            .filter(|r| r.starts_with("/run/"))
            .unwrap_or(p);
        let cni = if p == "/run/flannel/subnet.env" {
            Cni::Flannel
        } else if under(p, "/run/calico") {
            Cni::Calico
        } else if under(p, "/run/cilium") {
            Cni::Cilium
        } else {
            continue;
        };
        ev.push(format!("state file {path} -> {cni}"));
        seen.push(cni);
    }
    PRIORITY.into_iter().find(|c| seen.contains(c))
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// Which CNI an interface belongs to, by the names each CNI gives its devices. Prefix rules
/// require a veth: `lxcbr0` (LXC's bridge) is not Cilium, a `cali*` bridge is not Calico.
pub(crate) fn iface_cni(i: &Iface) -> Option<Cni> {
    let n = i.name.as_str();
    let veth = i.kind == "veth";
    if matches!(
        n,
        "cilium_host" | "cilium_net" | "cilium_vxlan" | "cilium_geneve"
    ) || (veth && n.starts_with("lxc"))
    {
        Some(Cni::Cilium)
    } else if matches!(
        n,
        "vxlan.calico" | "vxlan-v6.calico" | "wireguard.cali" | "wg-v6.cali"
    ) || (veth && n.starts_with("cali"))
    {
        Some(Cni::Calico)
    } else if n.starts_with("flannel.") || n.starts_with("flannel-") {
        // flannel.<VNI> (VXLAN), flannel-v6.<VNI>, flannel-wg (WireGuard backend).
        Some(Cni::Flannel)
    } else {
        // tunl0 and cni0 are left out: the ipip module creates tunl0 by itself, and cni0 is the
        // default name of the reference bridge plugin, so neither names a CNI on its own.
        None
    }
}

fn from_interfaces(view: &NodeView, ev: &mut Vec<String>) -> Option<Cni> {
    let mut found = None;
    for cni in PRIORITY {
        let names: Vec<&str> = view
            .ifaces
            .iter()
            .filter(|i| iface_cni(i) == Some(cni))
            .map(|i| i.name.as_str())
            .collect();
        if names.is_empty() {
            continue;
        }
        let mut line = format!(
            "interfaces suggest {cni}: {}",
            names[..names.len().min(NAMES_SHOWN)].join(", ")
        );
        if names.len() > NAMES_SHOWN {
            line.push_str(&format!(" (+{} more)", names.len() - NAMES_SHOWN));
        }
        ev.push(line);
        found.get_or_insert(cni);
    }
    found
}
