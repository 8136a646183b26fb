//! Kubernetes API enrichment: a kube-rs watch on this node's pods (`spec.nodeName=<node>`),
//! kept as an index from pod UID to name, namespace, labels, owner, containers and ports.
//! Discovery stays node-local; the index only names what /proc and cgroupfs found.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde::Serialize;

use crate::config::KubernetesCfg;

/// What the API says about one pod.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub owner: Option<Owner>,
    pub containers: Vec<ContainerInfo>,
}

/// The workload a pod belongs to: Deployment (through its ReplicaSet), StatefulSet,
/// LeaderWorkerSet, DaemonSet, Job, or the direct owner's kind.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// The runtime's id without its `containerd://` scheme, once the container runs.
    pub id: Option<String>,
    pub ports: Vec<u16>,
}

impl PodInfo {
    /// The container with this runtime id (full, or the cgroup's prefix of it).
    pub fn container_by_id(&self, id: &str) -> Option<&ContainerInfo> {
        self.containers
            .iter()
            .find(|c| c.id.as_deref().is_some_and(|cid| cid == id))
    }
}

/// Label LeaderWorkerSet puts on its leader and worker pods (which StatefulSets own).
const LWS_NAME_LABEL: &str = "leaderworkerset.sigs.k8s.io/name";

/// The pod's workload, from its controller reference and the labels controllers set.
fn owner_of(pod: &Pod, labels: &BTreeMap<String, String>) -> Option<Owner> {
    if let Some(lws) = labels.get(LWS_NAME_LABEL) {
        return Some(Owner {
            kind: "LeaderWorkerSet".into(),
            name: lws.clone(),
        });
    }
    let refs = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let r = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or(refs.first())?;
    // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
    if r.kind == "ReplicaSet" {
        if let Some(dep) = labels
            .get("pod-template-hash")
            .and_then(|h| r.name.strip_suffix(&format!("-{h}")))
        {
            return Some(Owner {
                kind: "Deployment".into(),
                name: dep.to_string(),
            });
        }
    }
    Some(Owner {
        kind: r.kind.clone(),
        name: r.name.clone(),
    })
}

/// The index entry of one pod; `None` without a UID or name.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let m = &pod.metadata;
    let labels = m.labels.clone().unwrap_or_default();
    let statuses: HashMap<&str, &str> = pod
        .status
        .iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        })
        .filter_map(|c| Some((c.name.as_str(), c.container_id.as_deref()?)))
        .collect();
    let spec = pod.spec.as_ref();
    let containers = spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .map(|c| ContainerInfo {
            name: c.name.clone(),
            id: statuses
                .get(c.name.as_str())
                .map(|id| id.split_once("://").map_or(*id, |(_, i)| i).to_string()),
            ports: c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect(),
        })
        .collect();
    Some(PodInfo {
        uid: m.uid.clone()?,
        name: m.name.clone()?,
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        owner: owner_of(pod, &labels),
        labels,
        containers,
    })
}

/// The pod index and the watch's health, shared with discovery and the API.
#[derive(Debug, Default)]
pub struct K8sState {
    /// Whether the watch runs at all (config `kubernetes.enabled`).
    pub enabled: AtomicBool,
    pub node: RwLock<Option<String>>,
    pods: RwLock<HashMap<String, Arc<PodInfo>>>,
    /// The last list or watch call succeeded.
    pub up: AtomicBool,
    /// Failed list/watch calls (a 410 Gone re-list is not one).
    pub errors: AtomicU64,
    /// Full re-lists after the first (410 Gone, or a watch that could not resume).
    pub relists: AtomicU64,
    /// Pod add/modify/delete events applied.
    pub events: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Bumped on every change of the index (discovery re-labels its targets).
    pub generation: AtomicU64,
}

impl K8sState {
    pub fn pod(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods.read().expect("pods lock").get(uid).cloned()
    }

    pub fn pod_count(&self) -> usize {
        self.pods.read().expect("pods lock").len()
    }

    /// Why `/readyz` calls the agent degraded, if it does.
    pub fn degraded(&self) -> Option<String> {
        if !self.enabled.load(Ordering::Relaxed) || self.up.load(Ordering::Relaxed) {
            return None;
        }
        let why = self
            .last_error
            .lock()
            .expect("error lock")
            .clone()
            .unwrap_or_else(|| "not connected yet".into());
        Some(format!(
            "kubernetes API unreachable ({why}); node-local discovery only"
        ))
    }

    fn fail(&self, e: &dyn std::fmt::Display) {
        self.up.store(false, Ordering::SeqCst);
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().expect("error lock") = Some(e.to_string());
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Applies one watcher event. `init` buffers a (re-)list until it is complete, so that a
/// re-list replaces the index at once and pods deleted meanwhile disappear.
pub fn apply(state: &K8sState, ev: Event<Pod>, init: &mut Option<HashMap<String, Arc<PodInfo>>>) {
    match ev {
        Event::Init => *init = Some(HashMap::new()),
        Event::InitApply(p) => {
            if let (Some(buf), Some(info)) = (init.as_mut(), pod_info(&p)) {
                buf.insert(info.uid.clone(), Arc::new(info));
            }
        }
        Event::InitDone => {
            let fresh = init.take().unwrap_or_default();
            tracing::info!(pods = fresh.len(), "kubernetes: listed this node's pods");
            *state.pods.write().expect("pods lock") = fresh;
            state.changed();
        }
        Event::Apply(p) => {
            if let Some(info) = pod_info(&p) {
                state.events.fetch_add(1, Ordering::Relaxed);
                let mut pods = state.pods.write().expect("pods lock");
                if pods.get(&info.uid).map(|o| &**o) != Some(&info) {
                    pods.insert(info.uid.clone(), Arc::new(info));
                    drop(pods);
                    state.changed();
                }
            }
        }
        Event::Delete(p) => {
            state.events.fetch_add(1, Ordering::Relaxed);
            if let Some(uid) = p.metadata.uid.as_deref() {
                if state.pods.write().expect("pods lock").remove(uid).is_some() {
                    state.changed();
                }
            }
        }
    }
}

/// A client from `cfg`: an explicit URL (token and CA files), a kubeconfig, or in-cluster.
pub async fn client(cfg: &KubernetesCfg) -> Result<kube::Client> {
    let kc = if !cfg.api_url.is_empty() {
        let mut c = kube::Config::new(cfg.api_url.parse().context("kubernetes.api_url")?);
        if !cfg.token_file.is_empty() {
            c.auth_info.token_file = Some(cfg.token_file.clone());
        }
        if !cfg.ca_file.is_empty() {
            c.root_cert_file = Some(cfg.ca_file.clone().into());
        }
        c
    } else if !cfg.kubeconfig.is_empty() {
        let kcfg = kube::config::Kubeconfig::read_from(&cfg.kubeconfig)
            .with_context(|| format!("reading kubeconfig {}", cfg.kubeconfig))?;
        kube::Config::from_custom_kubeconfig(kcfg, &Default::default()).await?
    } else {
        kube::Config::incluster().context("in-cluster Kubernetes config")?
    };
    Ok(kube::Client::try_from(kc)?)
}

/// Watches this node's pods into `state` until `stop`, reconnecting with backoff. Calls
/// `on_change` after every change of the index.
pub async fn watch(
    cfg: KubernetesCfg,
    node: String,
    state: Arc<K8sState>,
    stop: Arc<AtomicBool>,
    on_change: impl Fn() + Send + 'static,
) {
    let client = loop {
        match client(&cfg).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "kubernetes client not configured");
                state.fail(&format!("{e:#}"));
                if sleep_or_stop(&stop, Duration::from_secs(5)).await {
                    return;
                }
            }
        }
    };
    let api: kube::Api<Pod> = kube::Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let wc = watcher::Config::default().fields(&selector);
    let mut stream = watcher::watcher(api.clone(), wc).default_backoff().boxed();
    let mut init = None;
    let mut lists = 0u64;
    // A resumed watch that succeeds says nothing until a pod changes, so while the API is
    // marked down a one-item list every few seconds tells when it is back.
    let mut probe = tokio::time::interval(Duration::from_secs(3));
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = probe.tick() => {
                if !state.up.load(Ordering::SeqCst) && lists > 0 {
                    let lp = kube::api::ListParams::default().fields(&selector).limit(1);
                    match api.list_metadata(&lp).await {
                        Ok(_) => {
                            tracing::info!("kubernetes API reachable again");
                            state.up.store(true, Ordering::SeqCst);
                        }
                        Err(e) => state.fail(&e),
                    }
                }
                continue;
            }
            _ = stopped(&stop) => return,
        };
        let Some(item) = next else { return };
        match item {
            Ok(ev) => {
                if matches!(ev, Event::Init) {
                    lists += 1;
                    if lists > 1 {
                        state.relists.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let was_up = state.up.swap(true, Ordering::SeqCst);
                if !was_up {
                    tracing::info!(node = %node, "kubernetes API reachable; watching this node's pods");
                }
                let gen = state.generation.load(Ordering::SeqCst);
                apply(&state, ev, &mut init);
                if gen != state.generation.load(Ordering::SeqCst) {
                    on_change();
                }
            }
            // 410 Gone: our resourceVersion is too old; the watcher re-lists. Not an outage.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                tracing::info!("kubernetes watch expired (410 Gone); re-listing");
            }
            Err(e) => {
                if state.up.load(Ordering::SeqCst) {
                    tracing::warn!(error = %e, "kubernetes API unreachable; keeping node-local discovery and the last known pods");
                }
                state.fail(&e);
            }
        }
    }
}

async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps `d` unless `stop` is set first; true when stopped.
async fn sleep_or_stop(stop: &AtomicBool, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopped(stop) => true,
    }
}

/// Runs `watch` on its own thread and runtime (the agent's HTTP runtime stays separate).
pub fn spawn(
    cfg: KubernetesCfg,
    node: String,
    state: Arc<K8sState>,
    stop: Arc<AtomicBool>,
    on_change: impl Fn() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    state.enabled.store(true, Ordering::SeqCst);
    *state.node.write().expect("node lock") = Some(node.clone());
    Ok(std::thread::Builder::new()
        .name("llmslo-k8s".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    state.fail(&e);
                    return;
                }
            };
            rt.block_on(watch(cfg, node, state, stop, on_change));
        })?)
}

/// Prometheus label name for pod label `key` (kube-state-metrics style): `label_` + the key
/// with every character outside `[a-zA-Z0-9_]` turned into `_`.
pub fn prom_label_name(key: &str) -> String {
    let mut s = String::from("label_");
    s.extend(
        key.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn deployment_owner_ports_and_container_ids() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "vllm-7d9c5b8f4-x2x9q", "namespace": "llm", "uid": "u1",
                "labels": {"app.kubernetes.io/name": "vllm", "pod-template-hash": "7d9c5b8f4"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "vllm-7d9c5b8f4", "uid": "rs", "controller": true}]},
            "spec": {"containers": [{"name": "server", "ports": [{"containerPort": 8000}]},
                                    {"name": "envoy"}]},
            "status": {"containerStatuses": [{"name": "server", "containerID": "containerd://abc",
                "image": "i", "imageID": "", "ready": true, "restartCount": 0}]}
        }));
        let i = pod_info(&p).unwrap();
        assert_eq!(
            i.owner,
            Some(Owner {
                kind: "Deployment".into(),
                name: "vllm".into()
            })
        );
        assert_eq!(i.container_by_id("abc").unwrap().name, "server");
        assert_eq!(i.containers[0].ports, vec![8000]);
        assert_eq!(i.containers[1].id, None);
    }

    #[test]
    fn statefulset_and_leaderworkerset_owners() {
        let sts = pod(serde_json::json!({
            "metadata": {"name": "sglang-0", "namespace": "a", "uid": "u2",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "name": "sglang", "uid": "s", "controller": true}]}}));
        assert_eq!(pod_info(&sts).unwrap().owner.unwrap().kind, "StatefulSet");
        let lws = pod(serde_json::json!({
            "metadata": {"name": "llama-0-1", "namespace": "a", "uid": "u3",
                "labels": {"leaderworkerset.sigs.k8s.io/name": "llama"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "name": "llama-0", "uid": "s", "controller": true}]}}));
        assert_eq!(
            pod_info(&lws).unwrap().owner,
            Some(Owner {
                kind: "LeaderWorkerSet".into(),
                name: "llama".into()
            })
        );
        // A bare ReplicaSet (no pod-template-hash) stays a ReplicaSet.
        let rs = pod(serde_json::json!({
            "metadata": {"name": "x-abcde", "namespace": "a", "uid": "u4",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "x", "uid": "r", "controller": true}]}}));
        assert_eq!(pod_info(&rs).unwrap().owner.unwrap().kind, "ReplicaSet");
    }

    #[test]
    fn relist_replaces_the_index() {
        let st = K8sState::default();
        let mk = |uid: &str| {
            pod(serde_json::json!({"metadata": {"name": uid, "namespace": "n", "uid": uid}}))
        };
        let mut init = None;
        apply(&st, Event::Init, &mut init);
        apply(&st, Event::InitApply(mk("a")), &mut init);
        apply(&st, Event::InitApply(mk("b")), &mut init);
        assert_eq!(st.pod_count(), 0, "nothing published before InitDone");
        apply(&st, Event::InitDone, &mut init);
        assert_eq!(st.pod_count(), 2);
        apply(&st, Event::Delete(mk("a")), &mut init);
        assert!(st.pod("a").is_none());
        apply(&st, Event::Init, &mut init);
        apply(&st, Event::InitApply(mk("c")), &mut init);
        apply(&st, Event::InitDone, &mut init);
        assert!(st.pod("b").is_none() && st.pod("c").is_some());
    }

    #[test]
    fn label_names() {
        assert_eq!(
            prom_label_name("app.kubernetes.io/name"),
            "label_app_kubernetes_io_name"
        );
    }
}
