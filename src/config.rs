//! Agent configuration: a YAML file (as a ConfigMap would hold it) overlaid by CLI flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of /metrics and the JSON API. Loopback by default: expose it deliberately.
    pub listen: SocketAddr,
    pub discovery: DiscoveryCfg,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ringbuf_bytes: u32,
    /// The agent's nice value (0–19; it only ever lowers its priority): where a CPU is
    /// contended, the servers' threads go first and the agent catches up from the ring buffer.
    /// 0 keeps the priority it was started with. Nice orders threads of one cgroup: on
    /// Kubernetes the agent's pod competes with a server's pod by their cgroups' CPU weights
    /// (the CPU requests), and this setting matters where they share one (a host install).
    pub nice: i32,
    /// Finished requests kept for /api/v1/requests.
    pub recent_requests: usize,
    /// The most memory (bytes, estimated per record) those requests may hold together: the
    /// oldest go first when either bound is reached. A record of 200 tokens is ~2.6 KB.
    pub recent_requests_bytes: usize,
    /// Distinct (namespace, pod, model, route) label sets before overflow goes to "other".
    pub max_label_sets: usize,
    /// Connections tracked by the assembler before the least recently used is evicted.
    pub max_connections: usize,
    /// Entries of the kernel's connection map (an LRU; its evictions are counted).
    pub max_kernel_connections: u32,
    /// Count the targets' run-queue waits (the scheduler's per-thread `run_delay`: read at
    /// the targets' syscalls and from their threads' `schedstat` every 2 s).
    pub cpu_runqueue: bool,
    /// Uprobe the CUDA driver of the targets' cgroups (GPU activity per pod and per request).
    /// Each probed call traps into the kernel (~1–20 µs): false where a server launches many
    /// kernels per token without CUDA graphs.
    pub gpu_uprobes: bool,
    /// Let the kernel count a streamed response's token writes (start stamp and size each)
    /// once two token events have shown their shape, instead of sending each write's bytes.
    pub kernel_token_counting: bool,
    /// Turn the kernel's BPF run-time accounting on while the agent runs, so that
    /// `llmslo_agent_bpf_program_run_seconds_total` counts (every BPF program run on the node
    /// then pays two clock reads). Needs CAP_SYS_ADMIN (not in the DaemonSet: a warning, and
    /// the counters stay still); `kernel.bpf_stats_enabled=1` on the node does the same.
    pub bpf_stats: bool,
    pub network: NetworkCfg,
    /// Service-level objectives (see README "SLOs").
    pub slos: Vec<crate::slo::SloSpec>,
    /// Bearer token and TLS of the HTTP endpoints.
    pub api: crate::serve::ApiCfg,
    /// Kubernetes API enrichment (pod names, namespaces, labels, owners).
    pub kubernetes: KubernetesCfg,
    /// OpenTelemetry trace export (see README "OpenTelemetry").
    pub otlp: crate::otlp::OtlpCfg,
    /// Cross-check against the servers' own metrics (see README "Cross-check").
    pub crosscheck: crate::crosscheck::CrosscheckCfg,
}

/// Where the Kubernetes API is and what to take from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesCfg {
    /// "auto" (on when KUBERNETES_SERVICE_HOST is set or `api_url`/`kubeconfig` is given),
    /// "true" or "false".
    pub enabled: String,
    /// This node's name (the pods watched are `spec.nodeName=<it>`); empty: $NODE_NAME, then
    /// the host name.
    pub node_name: String,
    /// API server URL; empty: in-cluster (service account) or `kubeconfig`.
    pub api_url: String,
    /// Bearer token file for `api_url` (re-read when it changes, as projected tokens do).
    pub token_file: String,
    /// PEM CA bundle for `api_url`.
    pub ca_file: String,
    /// A kubeconfig file to use instead of the in-cluster config.
    pub kubeconfig: String,
    /// Pod labels copied onto records and request metrics (as `label_<name>` with `.`, `/`,
    /// `-` turned into `_`). At most `MAX_POD_LABELS`.
    pub labels: Vec<String>,
}

/// Pod labels that may be copied onto metrics: each one multiplies the label sets.
pub const MAX_POD_LABELS: usize = 8;

impl Default for KubernetesCfg {
    fn default() -> Self {
        KubernetesCfg {
            enabled: "auto".into(),
            node_name: String::new(),
            api_url: String::new(),
            token_file: String::new(),
            ca_file: String::new(),
            kubeconfig: String::new(),
            labels: vec![],
        }
    }
}

impl KubernetesCfg {
    /// Whether to watch the API, given the process environment.
    pub fn active(&self) -> bool {
        match self.enabled.as_str() {
            "true" => true,
            "false" => false,
            _ => {
                !self.api_url.is_empty()
                    || !self.kubeconfig.is_empty()
                    || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            }
        }
    }

    /// `node_name`, else $NODE_NAME (downward API), else the host name.
    pub fn node(&self) -> Option<String> {
        if !self.node_name.is_empty() {
            return Some(self.node_name.clone());
        }
        if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
            return Some(n);
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
    }
}

/// Packet-path hooks (network stages).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkCfg {
    /// Attach tc/netfilter programs at all (off: server-side stages only).
    pub enabled: bool,
    /// Node ingress devices; empty: the device of the default route.
    pub node_devices: Vec<String>,
    /// Extra name prefixes of pods' host-side veths (the adapter knows cali, lxc, veth).
    pub pod_veth_prefixes: Vec<String>,
    /// Force the CNI adapter: calico, cilium, flannel, generic; "auto" or empty detects it.
    pub cni: String,
    /// CNI config directory read for detection (default: $LLMSLO_CNI_CONF_DIR, else
    /// /etc/cni/net.d), e.g. the host's mounted at /host/etc/cni/net.d.
    pub cni_conf_dir: Option<std::path::PathBuf>,
    /// Root of the CNI state paths /run/flannel, /var/run/calico, /run/cilium (default:
    /// $LLMSLO_CNI_STATE_ROOT, else /).
    pub cni_state_root: Option<std::path::PathBuf>,
}

impl Default for NetworkCfg {
    fn default() -> Self {
        NetworkCfg {
            enabled: true,
            node_devices: vec![],
            pod_veth_prefixes: vec![],
            cni: "auto".into(),
            cni_conf_dir: None,
            cni_state_root: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryCfg {
    /// Find inference servers by command line.
    pub auto: bool,
    /// The host's /proc (mount it into the container and point here).
    pub proc_root: PathBuf,
    /// Extra command-line signatures besides the built-in ones.
    pub extra_signatures: Vec<String>,
    pub target_pids: Vec<u32>,
    /// cgroup v2 paths, absolute or relative to the cgroup2 mount.
    pub target_cgroups: Vec<PathBuf>,
    /// Pods picked by label or listening port as well (README "Discovery"); any one matches.
    pub select: Vec<crate::discovery::Selector>,
    pub interval_ms: u64,
    /// Request series of a pod are dropped once no target has carried its labels this long.
    pub forget_after_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9464".parse().expect("literal"),
            discovery: DiscoveryCfg::default(),
            ringbuf_bytes: 4 << 20,
            nice: 10,
            recent_requests: 10_000,
            recent_requests_bytes: 16 << 20,
            max_label_sets: 200,
            max_connections: 65_536,
            max_kernel_connections: 65_536,
            cpu_runqueue: true,
            gpu_uprobes: true,
            kernel_token_counting: true,
            bpf_stats: false,
            network: NetworkCfg::default(),
            slos: Vec::new(),
            api: crate::serve::ApiCfg::default(),
            kubernetes: KubernetesCfg::default(),
            otlp: Default::default(),
            crosscheck: Default::default(),
        }
    }
}

impl Default for DiscoveryCfg {
    fn default() -> Self {
        DiscoveryCfg {
            auto: true,
            proc_root: "/proc".into(),
            extra_signatures: vec![],
            target_pids: vec![],
            target_cgroups: vec![],
            select: vec![],
            interval_ms: 1000,
            forget_after_s: 30,
        }
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Config =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.ringbuf_bytes.is_power_of_two() && self.ringbuf_bytes >= 4096,
            "ringbuf_bytes must be a power of two >= 4096 (got {})",
            self.ringbuf_bytes
        );
        anyhow::ensure!(
            (0..=19).contains(&self.nice),
            "nice must be 0..=19 (got {}): the agent only lowers its own priority",
            self.nice
        );
        anyhow::ensure!(self.recent_requests > 0, "recent_requests must be > 0");
        anyhow::ensure!(
            self.recent_requests_bytes >= 64 << 10,
            "recent_requests_bytes must be >= 65536 (got {})",
            self.recent_requests_bytes
        );
        anyhow::ensure!(self.max_label_sets > 0, "max_label_sets must be > 0");
        anyhow::ensure!(
            self.max_kernel_connections >= 256,
            "max_kernel_connections must be >= 256 (got {})",
            self.max_kernel_connections
        );
        crate::slo::SloEngine::new(self.slos.clone())?;
        self.otlp.validate()?;
        self.crosscheck.validate()?;
        cni_adapters::parse_force(&self.network.cni)
            .map_err(|e| anyhow::anyhow!("network.cni: {e}"))?;
        anyhow::ensure!(
            ["auto", "true", "false"].contains(&self.kubernetes.enabled.as_str()),
            "kubernetes.enabled must be auto, true or false (got {:?})",
            self.kubernetes.enabled
        );
        anyhow::ensure!(
            self.kubernetes.labels.len() <= MAX_POD_LABELS,
            "kubernetes.labels: at most {MAX_POD_LABELS} pod labels (each multiplies the series)"
        );
        for (i, sel) in self.discovery.select.iter().enumerate() {
            anyhow::ensure!(
                !sel.pod_labels.is_empty() || !sel.ports.is_empty(),
                "discovery.select[{i}]: give pod_labels, ports or both (an empty selector would pick every pod)"
            );
            anyhow::ensure!(
                !sel.ports.contains(&0),
                "discovery.select[{i}].ports: 0 is not a port"
            );
            if !sel.pod_labels.is_empty() && self.kubernetes.enabled == "false" {
                anyhow::bail!(
                    "discovery.select[{i}].pod_labels needs the Kubernetes API (kubernetes.enabled is false)"
                );
            }
        }
        if !self.kubernetes.api_url.is_empty() {
            self.kubernetes
                .api_url
                .parse::<axum::http::Uri>()
                .map_err(|e| anyhow::anyhow!("kubernetes.api_url: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_checked() {
        let c: Config = serde_yaml::from_str(
            "discovery:\n  select:\n    - pod_labels: {app.kubernetes.io/component: inference}\n    - ports: [8000, 30000]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.discovery.select.len(), 2);
        assert_eq!(c.discovery.select[1].ports, vec![8000, 30000]);
        for (yaml, says) in [
            (
                "discovery: {select: [{}]}",
                "give pod_labels, ports or both",
            ),
            ("discovery: {select: [{ports: [0]}]}", "0 is not a port"),
            (
                "kubernetes: {enabled: \"false\"}\ndiscovery: {select: [{pod_labels: {a: b}}]}",
                "needs the Kubernetes API",
            ),
        ] {
            let c: Config = serde_yaml::from_str(yaml).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{yaml}: {e}");
        }
        assert!(serde_yaml::from_str::<Config>("discovery: {select: [{port: [1]}]}").is_err());
    }

    #[test]
    fn parses_yaml_and_rejects_typos() {
        let c: Config = serde_yaml::from_str(
            "listen: 0.0.0.0:9464\ndiscovery:\n  extra_signatures: [my-server]\n  target_cgroups: [kubepods.slice]\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9464);
        assert_eq!(c.discovery.extra_signatures, vec!["my-server"]);
        assert!(c.discovery.auto);
        assert!(serde_yaml::from_str::<Config>("lisen: 1").is_err());
        let bad = Config {
            ringbuf_bytes: 1000,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
        let k: Config = serde_yaml::from_str(
            "kubernetes:\n  enabled: auto\n  api_url: http://127.0.0.1:1\n  labels: [app.kubernetes.io/name]\n",
        )
        .unwrap();
        assert!(k.kubernetes.active(), "an explicit api_url turns it on");
        k.validate().unwrap();
        let off: Config =
            serde_yaml::from_str("kubernetes: {enabled: \"false\", api_url: http://x}").unwrap();
        assert!(!off.kubernetes.active());
        let bad: Config = serde_yaml::from_str("kubernetes: {enabled: maybe}").unwrap();
        assert!(bad.validate().is_err());
        assert_eq!(Config::default().nice, 10);
        for (nice, ok) in [(0, true), (19, true), (-1, false), (20, false)] {
            let c: Config = serde_yaml::from_str(&format!("nice: {nice}")).unwrap();
            assert_eq!(c.validate().is_ok(), ok, "nice: {nice}");
        }
    }
}
