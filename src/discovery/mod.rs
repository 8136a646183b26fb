//! Node-local discovery: which processes are inference servers, which cgroups the user named,
//! and what each one is called (pod, container) — from /proc and cgroupfs alone.

pub mod cgroup;
pub mod diag;
pub mod k8s;
pub mod net;
pub mod podnet;
pub mod procs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::loader::TargetSet;
pub use cgroup::{cgroup2_mount, cgroup_id, parse_kube_cgroup, KubeCgroup};

/// Command-line signatures of inference servers (DESIGN.md §5). Matched against argv[0]'s
/// basename and, for interpreters, against the module or script they run.
pub const DEFAULT_SIGNATURES: &[&str] = &[
    "vllm",
    "sglang",
    "text-generation-launcher",
    "text-generation-server",
    "tritonserver",
    "llama-server",
    "llama_cpp.server",
    "ollama",
    "lmdeploy",
    "trtllm-serve",
];

/// One way to pick servers besides command-line signatures (config `discovery.select`): a
/// process in a Kubernetes pod is traced when it matches every field given here. Processes
/// that listen on no TCP port (the pause container, helpers) are never picked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    /// The pod's labels (from the Kubernetes API) include all of these.
    pub pod_labels: BTreeMap<String, String>,
    /// The process listens on one of these TCP ports (its container port, in its own netns).
    /// Node-local: works without the API.
    pub ports: Vec<u16>,
}

impl Selector {
    /// Why a pod's process is picked (`pod_labels`, `port:<p>` or both), or `None`. `labels`:
    /// the pod's labels where the API knows the pod; `listening`: the process's listening ports.
    pub fn matches(
        &self,
        labels: Option<&BTreeMap<String, String>>,
        listening: &BTreeSet<u16>,
    ) -> Option<String> {
        if listening.is_empty() || (self.pod_labels.is_empty() && self.ports.is_empty()) {
            return None;
        }
        let mut why = Vec::new();
        if !self.pod_labels.is_empty() {
            let labels = labels?;
            if !self
                .pod_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
            {
                return None;
            }
            why.push("pod_labels".to_string());
        }
        if !self.ports.is_empty() {
            let p = self.ports.iter().find(|p| listening.contains(p))?;
            why.push(format!("port:{p}"));
        }
        Some(why.join("+"))
    }
}

#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    /// Where the host's /proc is (in a container: the host's /proc mounted somewhere).
    pub proc_root: PathBuf,
    pub signatures: Vec<String>,
    /// Disable command-line matching (only explicit pids/cgroups are traced).
    pub auto: bool,
    pub pids: Vec<u32>,
    /// cgroup v2 paths: absolute, or relative to the cgroup2 mount.
    pub cgroups: Vec<PathBuf>,
    /// Pods picked by label or port (any selector may match), with or without `auto`.
    pub select: Vec<Selector>,
    pub net: net::NetCfg,
}

/// One traced process or cgroup as `/api/v1/targets` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Target {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Why it is traced: "signature:<sig>", "pid", "cgroup".
    pub reason: String,
    pub cgroup_path: Option<String>,
    pub cgroup_id: Option<u64>,
    pub pod_uid: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub container: Option<String>,
    /// The workload, from the Kubernetes API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<k8s::Owner>,
    /// The pod's labels listed in `kubernetes.labels`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The container's ports, from the Kubernetes API.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// The TCP ports its processes listen on, as the last scan found them (the kernel is told
    /// them so a connection's handshake is stamped from its first SYN).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listening: Vec<u16>,
    /// Where the names come from: "kubernetes" (the API knew the pod) or "node" (cgroup path
    /// and the container's HOSTNAME).
    pub labels_from: &'static str,
}

impl Target {
    /// A target as node-local discovery finds it; the Kubernetes index fills owner, labels and
    /// ports later (`Snapshot::enrich`).
    fn node_local(
        pid: Option<u32>,
        comm: Option<String>,
        reason: String,
        cgroup: (Option<String>, Option<u64>),
        kube: Option<&KubeCgroup>,
        meta: Meta,
    ) -> Target {
        Target {
            pid,
            comm,
            reason,
            cgroup_path: cgroup.0,
            cgroup_id: cgroup.1,
            pod_uid: kube.map(|k| k.pod_uid.clone()),
            pod: meta.pod,
            namespace: meta.namespace,
            container: meta.container,
            owner: None,
            labels: BTreeMap::new(),
            ports: Vec::new(),
            listening: Vec::new(),
            labels_from: "node",
        }
    }

    /// With the ports of these (netns, port) listening sockets.
    fn listening_on(mut self, sockets: &BTreeSet<(u32, u16)>) -> Target {
        let ports: BTreeSet<u16> = sockets.iter().map(|&(_, port)| port).collect();
        self.listening = ports.into_iter().collect();
        self
    }
}

/// Sidecar proxies recognised in an inference pod's other containers, by process name (comm or
/// argv[0]'s base name).
pub const SIDECAR_NAMES: &[&str] = &[
    "envoy",
    "pilot-agent",
    "istio-proxy",
    "linkerd2-proxy",
    "linkerd-proxy",
    "nginx",
    "haproxy",
];

/// The sidecar a process is, from its comm and argv[0].
pub fn sidecar_name(comm: &str, argv0: Option<&str>) -> Option<&'static str> {
    let base = argv0.map(|a| a.rsplit('/').next().unwrap_or(a));
    SIDECAR_NAMES.iter().copied().find(|&n| {
        comm == n
            || comm.starts_with(&format!("{n}:"))
            || base.is_some_and(|b| b == n || b.starts_with(&format!("{n}:")))
    })
}

/// Labels for records of one process or cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub owner: Option<k8s::Owner>,
    pub ports: Vec<u16>,
    /// From the cgroup path, to look the pod up in the Kubernetes index.
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
}

impl Meta {
    /// Names from the Kubernetes index where it knows the pod; node-local ones otherwise.
    pub fn enrich(&mut self, k8s: &k8s::K8sState, label_keys: &[String], node: Option<&str>) {
        self.node = node.map(str::to_string);
        let Some(pod) = self.pod_uid.as_deref().and_then(|u| k8s.pod(u)) else {
            return;
        };
        self.namespace = Some(pod.namespace.clone());
        self.pod = Some(pod.name.clone());
        self.owner.clone_from(&pod.owner);
        if let Some(c) = self
            .container_id
            .as_deref()
            .and_then(|id| pod.container_by_id(id))
        {
            self.container = Some(c.name.clone());
            self.ports.clone_from(&c.ports);
        }
        self.labels = label_keys
            .iter()
            .filter_map(|k| Some((k.clone(), pod.labels.get(k)?.clone())))
            .collect();
    }

    pub fn from_kubernetes(&self) -> bool {
        self.owner.is_some() || self.namespace.is_some()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub targets: Vec<Target>,
    pub cni: Option<net::CniReport>,
    pub set: TargetSet,
    pub by_tgid: BTreeMap<u32, Meta>,
    pub by_cgroup: BTreeMap<u64, Meta>,
    /// The processes of the target cgroups when the snapshot was taken, with their cgroup id
    /// (the CPU run-queue counters read their threads).
    pub cgroup_members: BTreeMap<u32, u64>,
}

impl Snapshot {
    pub fn meta(&self, tgid: u32, cgroup_id: u64) -> Option<&Meta> {
        self.by_tgid
            .get(&tgid)
            .or_else(|| self.by_cgroup.get(&cgroup_id))
    }
}

/// Does this command line belong to an inference server? Returns the matching signature.
pub fn match_signature<'a>(argv: &[&str], signatures: &'a [String]) -> Option<&'a str> {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    let argv0 = base(argv.first()?);
    let interpreted = argv0.starts_with("python") || argv0 == "uv" || argv0 == "node";
    signatures.iter().map(String::as_str).find(|sig| {
        if argv0 == *sig || argv0.starts_with(&format!("{sig}-")) && sig.contains('-') {
            return true;
        }
        // `python -m vllm.entrypoints.openai.api_server`, `python -m sglang.launch_server`,
        // `python /usr/bin/vllm serve`, `python -m llama_cpp.server`: what the interpreter runs
        // is the `-m` module or the first non-flag argument, never a later flag's value.
        interpreted
            && interpreted_entry(argv).is_some_and(|a| {
                let a = base(a);
                a == *sig || a.starts_with(&format!("{sig}.")) || a.starts_with(&format!("{sig}_"))
            })
    })
}

/// The module (`-m mod`) or script an interpreter command line runs.
fn interpreted_entry<'a>(argv: &[&'a str]) -> Option<&'a str> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if *a == "-m" {
            return it.next().copied();
        }
        if let Some(m) = a.strip_prefix("-m") {
            return Some(m);
        }
        if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

/// The (netns inode, port) pairs on which `pid` has listening TCP sockets. Lets the kernel stamp
/// `sock_queued` for a connection's first request, which arrives before the server accepts it.
pub fn listen_ports(proc_root: &Path, pid: u32) -> BTreeSet<(u32, u16)> {
    Listeners::default().ports(proc_root, pid)
}

/// The listening TCP sockets of each network namespace, asked once per scan (from sock_diag,
/// [`diag`]; `/proc/<pid>/net/tcp{,6}` where that fails). Every read of those files walks the
/// kernel's whole established-socket hash (the sockets of every namespace: ~6 ms here), so
/// reading them once per process made a scan of 250 targets in one namespace take 3 s; the
/// processes of a pod, its sidecars and host-network pods share a namespace.
#[derive(Debug, Default)]
pub struct Listeners {
    /// netns inode -> (socket inode, port) of its listening sockets.
    by_netns: BTreeMap<u64, Vec<(u64, u16)>>,
    /// pid -> what [`Listeners::ports`] answered for it (its socket fds were read: a readlink
    /// per fd, hundreds for a server with many connections).
    by_pid: BTreeMap<u32, BTreeSet<(u32, u16)>>,
    /// The kernel's listen-change count when the tables above began to be read, and when.
    read_at: Option<(u64, std::time::Instant)>,
}

/// Tables kept across scans are read again at least this often (a change the count missed:
/// the programs reloaded, a namespace's inode reused).
const LISTENERS_REREAD: std::time::Duration = std::time::Duration::from_secs(30);

impl Listeners {
    /// Starts a scan. `changes` is the kernel's count of TCP sockets that started or stopped
    /// listening (`None` when unknown): the tables read so far are kept only while it has not
    /// moved since they were read, for at most [`LISTENERS_REREAD`]; otherwise each namespace's
    /// tables are read again (once) in this scan.
    pub fn begin_scan(&mut self, changes: Option<u64>) {
        let keep = match (changes, self.read_at) {
            (Some(c), Some((was, at))) => c == was && at.elapsed() < LISTENERS_REREAD,
            _ => false,
        };
        if !keep {
            self.by_netns.clear();
            self.by_pid.clear();
            self.read_at = changes.map(|c| (c, std::time::Instant::now()));
        }
    }

    /// [`listen_ports`], reading each namespace's tables at most once, and each process's
    /// sockets once while the tables are kept (a process that starts or stops listening moves
    /// the kernel's count; one that gets a listening socket from another, by fork or over a
    /// unix socket, is seen at the next re-read).
    pub fn ports(&mut self, proc_root: &Path, pid: u32) -> BTreeSet<(u32, u16)> {
        if let Some(p) = self.by_pid.get(&pid) {
            return p.clone();
        }
        let p = self.read_ports(proc_root, pid);
        if self.read_at.is_some() {
            self.by_pid.insert(pid, p.clone());
        }
        p
    }

    fn read_ports(&mut self, proc_root: &Path, pid: u32) -> BTreeSet<(u32, u16)> {
        use std::os::unix::fs::MetadataExt;
        let dir = proc_root.join(pid.to_string());
        let Ok(ns) = std::fs::metadata(dir.join("ns/net")) else {
            return BTreeSet::new();
        };
        let inodes: BTreeSet<u64> = std::fs::read_dir(dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|l| {
                let l = l
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()?;
                Some(l)
            })
            .collect();
        // A process without sockets costs no table read.
        if inodes.is_empty() {
            return BTreeSet::new();
        }
        let rows = self.by_netns.entry(ns.ino()).or_insert_with(|| {
            let own = std::fs::metadata("/proc/self/ns/net").is_ok_and(|m| m.ino() == ns.ino());
            let path = dir.join("ns/net");
            match diag::listening((!own).then_some(path.as_path())) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::debug!(pid, error = %e, "sock_diag: reading /proc/<pid>/net/tcp instead");
                    ["net/tcp", "net/tcp6"]
                        .iter()
                        .filter_map(|t| std::fs::read_to_string(dir.join(t)).ok())
                        .flat_map(|text| listen_rows(&text))
                        .collect()
                }
            }
        });
        rows.iter()
            .filter(|(inode, _)| inodes.contains(inode))
            .map(|&(_, port)| (ns.ino() as u32, port))
            .collect()
    }
}

/// (socket inode, local port) of the LISTEN (state 0A) rows of /proc/net/tcp{,6}.
fn listen_rows(table: &str) -> Vec<(u64, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            (*f.get(3)? == "0A").then_some((inode, port))
        })
        .collect()
}

fn read_cmdline(proc_root: &Path, pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then_some(args)
}

fn read_comm(proc_root: &Path, pid: u32) -> Option<String> {
    let c = std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm")).ok()?;
    Some(c.trim_end().to_string())
}

/// The process's cgroup v2 path ("0::/path").
pub fn proc_cgroup_path(proc_root: &Path, pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    cgroup_path_from_proc(&s)
}

/// The path that names a process's pod in a `/proc/<pid>/cgroup` text: the cgroup v2 path
/// (`0::…`), unless only a cgroup v1 hierarchy has the kubelet's path (cgroup v1 nodes, and
/// hybrid ones where v2 holds only systemd's tree): then that one. The BPF cgroup filter
/// only knows v2 ids, so on v1 such a process is traced by its pid alone.
pub fn cgroup_path_from_proc(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut v1_kube = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrl.is_empty() {
            v2 = Some(path);
        } else if v1_kube.is_none() && path.contains("kubepods") {
            v1_kube = Some(path);
        }
    }
    match (v2, v1_kube) {
        (Some(p), _) if p.contains("kubepods") => Some(p.to_string()),
        (_, Some(p)) => Some(p.to_string()),
        (p, None) => p.map(str::to_string),
    }
}

/// Kubernetes sets HOSTNAME to the pod name in every container; read only that variable.
fn pod_name_from_env(proc_root: &Path, pid: u32) -> Option<String> {
    let env = std::fs::read(proc_root.join(pid.to_string()).join("environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        kv.strip_prefix(b"HOSTNAME=")
            .map(|v| String::from_utf8_lossy(v).chars().take(253).collect())
    })
}

fn meta_for(kube: Option<&KubeCgroup>, pod_name: Option<String>) -> Meta {
    Meta {
        pod: pod_name.or_else(|| kube.map(|k| k.pod_uid.clone())),
        container: kube.and_then(|k| {
            k.container_id
                .as_ref()
                .map(|c| c.chars().take(12).collect())
        }),
        pod_uid: kube.map(|k| k.pod_uid.clone()),
        container_id: kube.and_then(|k| k.container_id.clone()),
        ..Default::default()
    }
}

impl Snapshot {
    /// Re-labels every target from the Kubernetes index (pods it knows get their API names)
    /// and sets the node.
    pub fn enrich(&mut self, k8s: &k8s::K8sState, label_keys: &[String], node: Option<&str>) {
        for m in self.by_tgid.values_mut().chain(self.by_cgroup.values_mut()) {
            m.enrich(k8s, label_keys, node);
        }
        for t in &mut self.targets {
            let m = t
                .pid
                .and_then(|p| self.by_tgid.get(&p))
                .or_else(|| t.cgroup_id.and_then(|c| self.by_cgroup.get(&c)));
            if let Some(m) = m {
                t.pod.clone_from(&m.pod);
                t.namespace.clone_from(&m.namespace);
                t.container.clone_from(&m.container);
                t.owner.clone_from(&m.owner);
                t.labels.clone_from(&m.labels);
                t.ports.clone_from(&m.ports);
                t.labels_from = if m.from_kubernetes() {
                    "kubernetes"
                } else {
                    "node"
                };
            }
        }
    }

    /// The (namespace, pod) label pairs its targets' records get.
    pub fn pod_keys(&self) -> BTreeSet<(String, String)> {
        self.by_tgid
            .values()
            .chain(self.by_cgroup.values())
            .map(|m| {
                (
                    m.namespace.clone().unwrap_or_default(),
                    m.pod.clone().unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// One full scan: explicit pids and cgroups plus command-line matches. `cuda` remembers which
/// processes of the targets' cgroups map libcuda (see [`crate::gpu::CudaScan`]).
/// What a scan keeps for the next one.
#[derive(Debug, Default)]
pub struct ScanCache {
    pub cuda: crate::gpu::CudaScan,
    pub listeners: Listeners,
    pub procs: procs::ProcCache,
    pub net: net::NetPlanner,
}

pub fn scan(cfg: &DiscoveryConfig, k8s: &k8s::K8sState, cache: &mut ScanCache) -> Snapshot {
    let ScanCache {
        cuda,
        listeners,
        procs,
        net: planner,
    } = cache;
    let mut snap = Snapshot::default();
    // GPU: each target's own cgroup (id → directory, to list its processes) and the processes
    // of those cgroups (tgid → cgroup id), whose libcuda is probed and counted per cgroup.
    let mut gpu_dirs: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut gpu_members: BTreeMap<u32, u64> = BTreeMap::new();
    let cg_mount = cgroup2_mount();
    let mut wanted_pids: BTreeMap<u32, String> =
        cfg.pids.iter().map(|&p| (p, "pid".to_string())).collect();
    if cfg.auto || !cfg.select.is_empty() {
        if let Ok(dir) = std::fs::read_dir(&cfg.proc_root) {
            use std::os::unix::fs::DirEntryExt;
            for ent in dir.flatten() {
                let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if wanted_pids.contains_key(&pid) {
                    continue;
                }
                let sig = cfg
                    .auto
                    .then(|| procs.signature(&cfg.proc_root, pid, ent.ino(), &cfg.signatures))
                    .flatten()
                    .map(|s| format!("signature:{s}"));
                if let Some(why) = sig.or_else(|| selected(cfg, k8s, listeners, pid)) {
                    wanted_pids.insert(pid, why);
                }
            }
        }
        procs.end_scan();
    }
    for (pid, reason) in wanted_pids {
        if !cfg.proc_root.join(pid.to_string()).exists() {
            continue;
        }
        let cg_path = proc_cgroup_path(&cfg.proc_root, pid);
        let kube = cg_path.as_deref().and_then(parse_kube_cgroup);
        let meta = meta_for(
            kube.as_ref(),
            kube.as_ref()
                .and_then(|_| pod_name_from_env(&cfg.proc_root, pid)),
        );
        let cg_id = match (&cg_mount, &cg_path) {
            (Some(m), Some(p)) => cgroup_id(&m.join(p.trim_start_matches('/'))),
            _ => None,
        };
        snap.set.tgids.insert(pid);
        let listening = listeners.ports(&cfg.proc_root, pid);
        snap.set.listen.extend(listening.iter().copied());
        snap.by_tgid.insert(pid, meta.clone());
        // A server in a pod is also targeted by its container's cgroup: that covers its worker
        // processes, and works where our /proc's pids are not the kernel's (a node that is
        // itself a container, as in kind).
        if let (Some(_), Some(id)) = (&kube, cg_id) {
            snap.set.cgroups.insert(id);
            snap.by_cgroup.insert(id, meta.clone());
        }
        // Its cgroup's GPU activity is its, pod or not (a server's engine process is a
        // separate process in the same cgroup); the L7 programs trace pod containers only.
        // Only the processes the agent probes count, so in the root cgroup, which holds
        // whatever the node runs outside any service or container, the target alone is probed.
        if let (Some(m), Some(p), Some(id)) = (&cg_mount, &cg_path, cg_id) {
            gpu_members.insert(pid, id);
            snap.set.gpu_cgroups.insert(id);
            if p != "/" {
                gpu_dirs
                    .entry(id)
                    .or_insert_with(|| m.join(p.trim_start_matches('/')));
            }
            snap.by_cgroup.entry(id).or_insert_with(|| meta.clone());
        }
        snap.targets.push(
            Target::node_local(
                Some(pid),
                read_comm(&cfg.proc_root, pid),
                reason,
                (cg_path, cg_id),
                kube.as_ref(),
                meta,
            )
            .listening_on(&listening),
        );
    }
    if let Some(m) = &cg_mount {
        let pods: BTreeSet<String> = snap
            .targets
            .iter()
            .filter(|t| t.pod_uid.is_some())
            .filter_map(|t| t.cgroup_path.clone())
            .collect();
        for rel in pods {
            add_sidecars(&mut snap, cfg, listeners, m, &rel);
        }
    }
    let mut cgroup_targets = Vec::new();
    for path in &cfg.cgroups {
        // "/kubepods.slice/..." as /proc/<pid>/cgroup shows it, or a full filesystem path.
        let full = if let Some(m) = cg_mount.as_ref().filter(|m| !path.starts_with(m)) {
            m.join(path.strip_prefix("/").unwrap_or(path))
        } else if cg_mount.is_some() {
            path.clone()
        } else {
            tracing::warn!(path = %path.display(), "no cgroup2 mount found; cannot target cgroup");
            continue;
        };
        let Some(id) = cgroup_id(&full) else {
            tracing::warn!(path = %full.display(), "target cgroup does not exist (yet)");
            continue;
        };
        let rel = cg_mount
            .as_ref()
            .and_then(|m| full.strip_prefix(m).ok())
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|| full.display().to_string());
        let kube = parse_kube_cgroup(&rel);
        let meta = meta_for(kube.as_ref(), None);
        snap.set.cgroups.insert(id);
        // Listed here already: not again below.
        snap.set.gpu_cgroups.insert(id);
        gpu_dirs.remove(&id);
        let mut listening = BTreeSet::new();
        for (i, pid) in cgroup_pids(&full).into_iter().enumerate() {
            listening.extend(listeners.ports(&cfg.proc_root, pid));
            cgroup_targets.push(pid);
            snap.cgroup_members.insert(pid, id);
            if i < crate::gpu::MAX_CGROUP_PROCS {
                gpu_members.entry(pid).or_insert(id);
            }
        }
        snap.by_cgroup.insert(id, meta.clone());
        snap.set.listen.extend(listening.iter().copied());
        snap.targets.push(
            Target::node_local(
                None,
                None,
                "cgroup".into(),
                (Some(rel), Some(id)),
                kube.as_ref(),
                meta,
            )
            .listening_on(&listening),
        );
    }
    for (id, dir) in gpu_dirs {
        snap.set.gpu_cgroups.insert(id);
        let traced = snap.set.cgroups.contains(&id);
        for pid in cgroup_pids(&dir)
            .into_iter()
            .take(crate::gpu::MAX_CGROUP_PROCS)
        {
            gpu_members.entry(pid).or_insert(id);
            // A pod server's container: its other processes are targets by the cgroup.
            if traced {
                snap.cgroup_members.entry(pid).or_insert(id);
            }
        }
    }
    snap.set.cuda = cuda.scan(&cfg.proc_root, &gpu_members, std::time::Instant::now());
    // In the same pass as the targets: a new server's pod veth is hooked before its traffic
    // is traced (the BPF thread attaches hooks before it fills the target maps).
    let pids = snap.set.tgids.iter().copied().chain(cgroup_targets);
    (snap.set.hooks, snap.cni) = planner.plan(&cfg.net, &cfg.proc_root, pids);
    snap
}

/// Why `pid` is picked by a `discovery.select` selector: it runs in a pod (kubelet cgroup) and
/// matches one of them.
fn selected(
    cfg: &DiscoveryConfig,
    k8s: &k8s::K8sState,
    listeners: &mut Listeners,
    pid: u32,
) -> Option<String> {
    if cfg.select.is_empty() {
        return None;
    }
    let kube = proc_cgroup_path(&cfg.proc_root, pid).and_then(|p| parse_kube_cgroup(&p))?;
    let listening: BTreeSet<u16> = listeners
        .ports(&cfg.proc_root, pid)
        .into_iter()
        .map(|(_, port)| port)
        .collect();
    if listening.is_empty() {
        return None;
    }
    let pod = k8s.pod(&kube.pod_uid);
    let labels = pod.as_ref().map(|p| &p.labels);
    cfg.select
        .iter()
        .find_map(|s| s.matches(labels, &listening))
        .map(|why| format!("select:{why}"))
}

/// Targets the sidecar proxies among the other containers of the pod of container cgroup
/// `rel`: their requests are joined with the app's (see `assemble::sidecar`).
fn add_sidecars(
    snap: &mut Snapshot,
    cfg: &DiscoveryConfig,
    listeners: &mut Listeners,
    mount: &Path,
    rel: &str,
) {
    let container = mount.join(rel.trim_start_matches('/'));
    let Some(pod_dir) = container.parent() else {
        return;
    };
    let Ok(dir) = std::fs::read_dir(pod_dir) else {
        return;
    };
    for ent in dir.flatten() {
        let path = ent.path();
        if path == container || !path.is_dir() {
            continue;
        }
        let Some(id) = cgroup_id(&path) else { continue };
        if snap.set.cgroups.contains(&id) {
            continue;
        }
        let pids = cgroup_pids(&path);
        let Some((pid, name)) = pids.iter().find_map(|&pid| {
            let comm = read_comm(&cfg.proc_root, pid)?;
            let argv = read_cmdline(&cfg.proc_root, pid);
            let argv0 = argv.as_ref().and_then(|a| a.first()).map(String::as_str);
            sidecar_name(&comm, argv0).map(|n| (pid, n))
        }) else {
            continue;
        };
        let rel = format!("/{}", path.strip_prefix(mount).unwrap_or(&path).display());
        let kube = parse_kube_cgroup(&rel);
        let meta = meta_for(kube.as_ref(), pod_name_from_env(&cfg.proc_root, pid));
        snap.set.cgroups.insert(id);
        snap.by_cgroup.insert(id, meta.clone());
        let mut listening = BTreeSet::new();
        for &p in &pids {
            snap.set.tgids.insert(p);
            snap.by_tgid.insert(p, meta.clone());
            listening.extend(listeners.ports(&cfg.proc_root, p));
        }
        snap.set.listen.extend(listening.iter().copied());
        snap.targets.push(
            Target::node_local(
                Some(pid),
                read_comm(&cfg.proc_root, pid),
                format!("sidecar:{name}"),
                (Some(rel), Some(id)),
                kube.as_ref(),
                meta,
            )
            .listening_on(&listening),
        );
    }
}

/// The processes of a cgroup (its `cgroup.procs`).
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Signatures: the defaults plus the user's.
pub fn signatures(extra: &[String]) -> Vec<String> {
    let mut s: BTreeSet<String> = DEFAULT_SIGNATURES.iter().map(|s| s.to_string()).collect();
    s.extend(extra.iter().cloned());
    s.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_cgroup_paths_under_cgroup_v1_v2_and_hybrid() {
        let v2 = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice/cri-containerd-abc.scope\n";
        assert!(cgroup_path_from_proc(v2)
            .unwrap()
            .ends_with("cri-containerd-abc.scope"));
        // cgroup v1 (cgroupfs driver, Docker): no 0:: line.
        let v1 = "12:pids:/kubepods/besteffort/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0/1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c\n\
                  11:memory:/kubepods/besteffort/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0/1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c\n\
                  1:name=systemd:/kubepods/besteffort/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0/1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c\n";
        let p = cgroup_path_from_proc(v1).unwrap();
        let k = parse_kube_cgroup(&p).unwrap();
        assert_eq!(k.pod_uid, "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0");
        assert_eq!(
            k.container_id.as_deref(),
            Some("1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c1f2e3d4c")
        );
        // Hybrid: v2 holds systemd's view only; the v1 controllers carry the pod.
        let hybrid = "13:cpu,cpuacct:/kubepods.slice/kubepods-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice/crio-9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b.scope\n\
                      0::/system.slice/containerd.service\n";
        let k = parse_kube_cgroup(&cgroup_path_from_proc(hybrid).unwrap()).unwrap();
        assert_eq!(
            k.container_id.as_deref(),
            Some("9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b9a8b")
        );
        // Not in a pod: the v2 path as it is.
        assert_eq!(
            cgroup_path_from_proc("0::/user.slice/session-1.scope\n").as_deref(),
            Some("/user.slice/session-1.scope")
        );
        assert_eq!(cgroup_path_from_proc("garbage\n"), None);
    }

    #[test]
    fn selectors_need_every_field_and_a_listener() {
        let labels: BTreeMap<String, String> = [
            ("app.kubernetes.io/component", "inference"),
            ("app.kubernetes.io/name", "vllm-chat"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let listening: BTreeSet<u16> = [8000, 9090].into();
        let by_label = Selector {
            pod_labels: [("app.kubernetes.io/component".into(), "inference".into())].into(),
            ports: vec![],
        };
        let by_port = Selector {
            pod_labels: BTreeMap::new(),
            ports: vec![30000, 8000],
        };
        let both = Selector {
            pod_labels: by_label.pod_labels.clone(),
            ports: vec![9090],
        };
        assert_eq!(
            by_label.matches(Some(&labels), &listening).as_deref(),
            Some("pod_labels")
        );
        // Without the API the labels are unknown: no match.
        assert_eq!(by_label.matches(None, &listening), None);
        let mut other = labels.clone();
        other.insert("app.kubernetes.io/component".into(), "web".into());
        assert_eq!(by_label.matches(Some(&other), &listening), None);
        // Ports work node-locally; the first configured port that listens names the match.
        assert_eq!(
            by_port.matches(None, &listening).as_deref(),
            Some("port:8000")
        );
        assert_eq!(by_port.matches(None, &[8080].into()), None);
        assert_eq!(
            both.matches(Some(&labels), &listening).as_deref(),
            Some("pod_labels+port:9090")
        );
        assert_eq!(both.matches(Some(&labels), &[8000].into()), None);
        // A process with no listening socket (pause, helpers) is never picked.
        assert_eq!(by_label.matches(Some(&labels), &BTreeSet::new()), None);
        assert_eq!(Selector::default().matches(Some(&labels), &listening), None);
    }

    #[test]
    fn sidecars_are_recognised_by_comm_or_argv0() {
        assert_eq!(
            sidecar_name("envoy", Some("/usr/local/bin/envoy")),
            Some("envoy")
        );
        assert_eq!(
            sidecar_name("nginx", Some("nginx: worker process")),
            Some("nginx")
        );
        assert_eq!(sidecar_name("linkerd2-proxy", None), Some("linkerd2-proxy"));
        assert_eq!(
            sidecar_name("pilot-agent", Some("/usr/local/bin/pilot-agent")),
            Some("pilot-agent")
        );
        assert_eq!(
            sidecar_name("python3", Some("/usr/bin/haproxy")),
            Some("haproxy")
        );
        assert_eq!(sidecar_name("python3", Some("python3")), None);
        assert_eq!(sidecar_name("nginxish", Some("nginxish")), None);
    }

    use super::*;

    fn sigs() -> Vec<String> {
        signatures(&[])
    }

    #[test]
    fn matches_real_server_command_lines() {
        let s = sigs();
        let m = |a: &[&str]| match_signature(a, &s).map(str::to_string);
        assert_eq!(
            m(&["/usr/local/bin/vllm", "serve", "m"]).as_deref(),
            Some("vllm")
        );
        assert_eq!(
            m(&["python3", "-m", "vllm.entrypoints.openai.api_server"]).as_deref(),
            Some("vllm")
        );
        assert_eq!(
            m(&["python", "-m", "sglang.launch_server", "--model", "x"]).as_deref(),
            Some("sglang")
        );
        assert_eq!(
            m(&["text-generation-launcher", "--model-id", "x"]).as_deref(),
            Some("text-generation-launcher")
        );
        assert_eq!(
            m(&["/opt/tritonserver/bin/tritonserver"]).as_deref(),
            Some("tritonserver")
        );
        assert_eq!(
            m(&["./llama-server", "-m", "a.gguf"]).as_deref(),
            Some("llama-server")
        );
        assert_eq!(
            m(&["python3", "-m", "llama_cpp.server"]).as_deref(),
            Some("llama_cpp.server")
        );
        assert_eq!(m(&["/bin/ollama", "serve"]).as_deref(), Some("ollama"));
        assert_eq!(
            m(&["python", "-m", "lmdeploy", "serve"]).as_deref(),
            Some("lmdeploy")
        );
        assert_eq!(m(&["trtllm-serve", "x"]).as_deref(), Some("trtllm-serve"));
    }

    #[test]
    fn does_not_match_bystanders() {
        let s = sigs();
        assert_eq!(match_signature(&["nginx", "-g", "daemon off;"], &s), None);
        assert_eq!(
            match_signature(&["python3", "app.py", "--model", "vllm"], &s),
            None
        );
        assert_eq!(match_signature(&["vim", "vllm.py"], &s), None);
        assert_eq!(match_signature(&["grep", "vllm"], &s), None);
    }

    #[test]
    fn parses_listening_sockets() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0\n\
   2: 0200F40A:1F40 0100F40A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0\n";
        // LISTEN rows only (the established 4243 is not one), with their socket inodes.
        assert_eq!(listen_rows(t), vec![(4242, 8000), (999, 8001)]);
    }

    #[test]
    fn listeners_read_a_namespace_once_per_scan() {
        let me = std::process::id();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pa = a.local_addr().unwrap().port();
        let mut l = Listeners::default();
        let ports: Vec<u16> = l
            .ports(Path::new("/proc"), me)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        // Other tests of this process may listen too.
        assert!(ports.contains(&pa), "{ports:?}");
        assert_eq!(l.by_netns.len(), 1, "one namespace read");
        // A socket that starts listening after the namespace was read waits for the next scan.
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pb = b.local_addr().unwrap().port();
        assert!(!l
            .ports(Path::new("/proc"), me)
            .iter()
            .any(|&(_, p)| p == pb));
        let fresh = listen_ports(Path::new("/proc"), me);
        assert!(fresh.iter().any(|&(_, p)| p == pa) && fresh.iter().any(|&(_, p)| p == pb));
    }

    #[test]
    fn listeners_are_kept_across_scans_until_the_kernel_counts_a_change() {
        let me = std::process::id();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pa = a.local_addr().unwrap().port();
        let has = |l: &mut Listeners, p: u16| {
            l.ports(Path::new("/proc"), me).iter().any(|&(_, q)| q == p)
        };
        let mut l = Listeners::default();
        l.begin_scan(Some(5));
        assert!(has(&mut l, pa));
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pb = b.local_addr().unwrap().port();
        // The count did not move: the next scan keeps the tables (and misses b).
        l.begin_scan(Some(5));
        assert!(!has(&mut l, pb), "kept from the scan before");
        assert_eq!(l.by_pid.len(), 1, "this process's sockets were not read again");
        // It moved (b started listening): read again.
        l.begin_scan(Some(6));
        assert!(has(&mut l, pb));
        // Unknown count (programs not loaded): every scan reads.
        l.begin_scan(None);
        assert!(l.by_netns.is_empty());
        // A stale read is refreshed after LISTENERS_REREAD whatever the count says.
        l.begin_scan(Some(6));
        assert!(has(&mut l, pb));
        l.read_at = Some((6, std::time::Instant::now() - LISTENERS_REREAD));
        l.begin_scan(Some(6));
        assert!(l.by_netns.is_empty(), "re-read after {LISTENERS_REREAD:?}");
    }

    #[test]
    fn finds_this_process_by_pid() {
        let cfg = DiscoveryConfig {
            proc_root: "/proc".into(),
            pids: vec![std::process::id()],
            ..Default::default()
        };
        let snap = scan(&cfg, &k8s::K8sState::default(), &mut ScanCache::default());
        assert!(snap.set.tgids.contains(&std::process::id()));
        assert_eq!(snap.targets[0].reason, "pid");
    }
}
