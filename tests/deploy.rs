//! The deployment artefacts, checked without a cluster or a Docker engine:
//!
//! 1. `deploy/manifests` (plain YAML for `kubectl apply -k`): the DaemonSet's security context
//!    (not privileged, every capability dropped, exactly the documented ones added, read-only
//!    root), host namespaces, mounts, env, probes; read-only RBAC; the ConfigMap's agent config
//!    is one the agent accepts.
//! 2. The Helm chart, without Helm: `values.yaml` parses, every `.Values.x.y` a template uses
//!    exists there, and the chart's DaemonSet template and defaults agree with the manifests.
//! 3. The chart's copies of `deploy/prometheus/alerts.yaml` and `deploy/grafana/*.json` are
//!    byte-identical to the originals.
//! 4. The Dockerfile's build stage and `scripts/docker-build-steps.sh` install the same packages
//!    and run the same cargo command; the runtime stage is the slim one the docs describe.
//! 5. Every script in `kind-test/` and `scripts/` passes `bash -n` (and shellcheck, if present).
//! 6. As root: the agent binary starts with the ConfigMap's config and the DaemonSet's
//!    arguments, under exactly the DaemonSet's capability set (via `setpriv`, when present),
//!    answers /readyz, traces a server running as another user, and exits cleanly on SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml::Value;

/// The capabilities the DaemonSet adds (deploy/README.md explains each); everything else is
/// dropped.
const CAPS: [&str; 6] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "SYS_RESOURCE",
];
const NAMESPACE: &str = "llm-slo";
const CONFIG_FILE: &str = "/etc/llm-slo/agent.yaml";
const CHART: &str = "deploy/helm/llm-slo-agent";
/// The agent's state directory (its clsact ledger), on the host (see `LLMSLO_STATE_DIR`).
const STATE_DIR: &str = "/run/llm-slo-agent";
/// The kernel knob the agent turns while it detaches (`netpath::rcu`), mounted writable alone.
const RCU_KNOB: &str = "/sys/kernel/rcu_expedited";

/// (host path, mount path in the container); every one read-only.
const HOST_MOUNTS: [(&str, &str); 9] = [
    ("/proc", "/host/proc"),
    ("/sys", "/sys"),
    ("/sys/fs/cgroup", "/sys/fs/cgroup"),
    ("/sys/kernel/tracing", "/sys/kernel/tracing"),
    ("/sys/fs/bpf", "/sys/fs/bpf"),
    ("/etc/cni/net.d", "/etc/cni/net.d"),
    ("/run/flannel", "/run/flannel"),
    ("/var/run/calico", "/var/run/calico"),
    ("/run/cilium", "/run/cilium"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Every non-empty document of a multi-document YAML text.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` at a dotted path ("spec.template.spec"; numbers index sequences); panics when missing.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for seg in path.split('.') {
        let next = match (seg.parse::<usize>(), cur) {
            (Ok(i), Value::Sequence(s)) => s.get(i),
            _ => cur.get(seg),
        };
        cur = next.unwrap_or_else(|| panic!("missing `{path}` (at `{seg}`) in {v:?}"));
    }
    cur
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    at(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("`{path}` is not a list"))
}

fn strs(v: &Value, path: &str) -> Vec<String> {
    seq(v, path)
        .iter()
        .map(|x| x.as_str().expect("string item").to_string())
        .collect()
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

/// deploy/manifests: every object of every YAML file but kustomization.yaml.
struct Manifests {
    objects: Vec<Value>,
    files: Vec<String>,
}

impl Manifests {
    fn load() -> Manifests {
        let dir = repo().join("deploy/manifests");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("deploy/manifests")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .collect();
        files.sort();
        let mut objects = Vec::new();
        for f in &files {
            let docs = yaml_docs(&read(&format!("deploy/manifests/{f}")), f);
            assert!(!docs.is_empty(), "{f} holds no document");
            if f != "kustomization.yaml" {
                for d in &docs {
                    assert!(
                        d.get("kind").is_some() && d.get("apiVersion").is_some(),
                        "{f}: a document without kind/apiVersion"
                    );
                }
                objects.extend(docs);
            }
        }
        Manifests { objects, files }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|o| o.get("kind").and_then(Value::as_str) == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let v = self.all(kind);
        assert_eq!(
            v.len(),
            1,
            "expected exactly one {kind} in deploy/manifests"
        );
        v[0]
    }

    fn pod(&self) -> &Value {
        at(self.one("DaemonSet"), "spec.template.spec")
    }

    fn agent(&self) -> &Value {
        let cs = seq(self.pod(), "containers");
        assert_eq!(cs.len(), 1, "the agent pod has one container");
        assert_eq!(s(&cs[0], "name"), "agent");
        &cs[0]
    }

    /// The ConfigMap's agent.yaml.
    fn agent_config(&self) -> String {
        at(self.one("ConfigMap"), "data")
            .get("agent.yaml")
            .and_then(Value::as_str)
            .expect("ConfigMap data.agent.yaml")
            .to_string()
    }
}

fn caps_of(sc: &Value, which: &str) -> Vec<String> {
    let mut v = strs(sc, &format!("capabilities.{which}"));
    v.sort();
    v
}

#[test]
fn manifests_daemonset_is_unprivileged_with_the_documented_capabilities() {
    let m = Manifests::load();
    let ds = m.one("DaemonSet");
    assert_eq!(s(ds, "apiVersion"), "apps/v1");
    let pod = m.pod();
    assert_eq!(at(pod, "hostNetwork").as_bool(), Some(true), "hostNetwork");
    assert_eq!(at(pod, "hostPID").as_bool(), Some(true), "hostPID");
    assert_eq!(s(pod, "dnsPolicy"), "ClusterFirstWithHostNet");

    let sc = at(m.agent(), "securityContext");
    assert_eq!(at(sc, "privileged").as_bool(), Some(false), "privileged");
    assert_eq!(
        at(sc, "readOnlyRootFilesystem").as_bool(),
        Some(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        at(sc, "allowPrivilegeEscalation").as_bool(),
        Some(false),
        "allowPrivilegeEscalation"
    );
    assert_eq!(at(sc, "runAsUser").as_u64(), Some(0), "runAsUser");
    assert_eq!(caps_of(sc, "drop"), vec!["ALL"]);
    let add = strs(sc, "capabilities.add");
    assert_eq!(
        add.iter().collect::<BTreeSet<_>>().len(),
        add.len(),
        "duplicate capabilities: {add:?}"
    );
    assert_eq!(caps_of(sc, "add"), sorted(&CAPS), "capabilities.add");
    assert!(
        !add.iter().any(|c| c.contains("SYS_ADMIN")),
        "SYS_ADMIN must not be granted"
    );

    let strategy = at(ds, "spec.updateStrategy");
    assert_eq!(s(strategy, "type"), "RollingUpdate");
    assert_eq!(s(strategy, "rollingUpdate.maxUnavailable"), "10%");
}

#[test]
fn manifests_daemonset_mounts_env_probes_and_tolerations() {
    let m = Manifests::load();
    let (pod, c) = (m.pod(), m.agent());
    let volumes: BTreeMap<&str, &Value> = seq(pod, "volumes")
        .iter()
        .map(|v| (s(v, "name"), v))
        .collect();
    // mountPath -> (volume, readOnly)
    let mounts: BTreeMap<&str, (&Value, bool)> = seq(c, "volumeMounts")
        .iter()
        .map(|mnt| {
            let vol = volumes
                .get(s(mnt, "name"))
                .unwrap_or_else(|| panic!("mount of an undeclared volume: {mnt:?}"));
            let ro = mnt.get("readOnly").and_then(Value::as_bool) == Some(true);
            (s(mnt, "mountPath"), (*vol, ro))
        })
        .collect();
    for (host, path) in HOST_MOUNTS {
        let (vol, ro) = mounts
            .get(path)
            .unwrap_or_else(|| panic!("no mount at {path}"));
        assert_eq!(s(vol, "hostPath.path"), host, "host path mounted at {path}");
        assert!(ro, "{path} must be mounted read-only");
    }
    for state in ["/run/flannel", "/var/run/calico", "/run/cilium"] {
        let (vol, _) = mounts[state];
        assert_eq!(
            s(vol, "hostPath.type"),
            "",
            "{state}: no type check (absent on other CNIs' nodes)"
        );
    }
    // Every hostPath volume is mounted read-only, but the agent's own state directory (the
    // record of the clsact filters it attached, which must outlive a crashed container) and
    // the one kernel knob it turns during its teardown, a file, not a directory.
    for (path, (vol, ro)) in &mounts {
        if vol.get("hostPath").is_some() && *path != STATE_DIR && *path != RCU_KNOB {
            assert!(ro, "hostPath mount {path} must be read-only");
        }
    }
    let (knob, ro) = mounts
        .get(RCU_KNOB)
        .unwrap_or_else(|| panic!("no mount at {RCU_KNOB}"));
    assert!(!ro, "{RCU_KNOB} is written");
    assert_eq!(s(knob, "hostPath.path"), RCU_KNOB);
    assert_eq!(
        s(knob, "hostPath.type"),
        "File",
        "a file: nothing else of /sys"
    );
    let (state, ro) = mounts
        .get(STATE_DIR)
        .unwrap_or_else(|| panic!("no mount at {STATE_DIR}"));
    assert!(!ro, "{STATE_DIR} is written");
    assert_eq!(s(state, "hostPath.path"), STATE_DIR);
    assert_eq!(s(state, "hostPath.type"), "DirectoryOrCreate");
    let (cfg_vol, ro) = mounts["/etc/llm-slo"];
    assert!(ro);
    assert_eq!(
        s(cfg_vol, "configMap.name"),
        s(m.one("ConfigMap"), "metadata.name"),
        "the config volume is the ConfigMap"
    );

    // The config's proc_root is where the host's /proc is mounted.
    let cfg: Value = serde_yaml::from_str(&m.agent_config()).expect("agent.yaml");
    assert_eq!(s(&cfg, "discovery.proc_root"), "/host/proc");
    assert_eq!(s(&cfg, "listen"), "0.0.0.0:9464");

    assert_eq!(
        strs(c, "args"),
        vec!["run", "--config", CONFIG_FILE],
        "DaemonSet args"
    );
    let env = seq(c, "env");
    let node_name = env
        .iter()
        .find(|e| s(e, "name") == "NODE_NAME")
        .expect("NODE_NAME env");
    assert_eq!(
        s(node_name, "valueFrom.fieldRef.fieldPath"),
        "spec.nodeName"
    );

    let port = &seq(c, "ports")[0];
    assert_eq!(s(port, "name"), "metrics");
    assert_eq!(at(port, "containerPort").as_u64(), Some(9464));
    assert_eq!(s(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(s(c, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(s(c, "livenessProbe.httpGet.port"), "metrics");
    assert_eq!(s(c, "readinessProbe.httpGet.port"), "metrics");
    for k in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        at(c, &format!("resources.{k}"));
    }

    let tolerations = seq(pod, "tolerations");
    assert!(
        tolerations.iter().any(|t| {
            t.get("key").and_then(Value::as_str) == Some("nvidia.com/gpu")
                && t.get("effect").and_then(Value::as_str) == Some("NoSchedule")
        }),
        "GPU nodes' nvidia.com/gpu:NoSchedule taint is tolerated"
    );
}

#[test]
fn manifests_rbac_is_read_only_and_objects_are_in_the_namespace() {
    let m = Manifests::load();
    let role = m.one("ClusterRole");
    let mut rules: Vec<(Vec<String>, Vec<String>, Vec<String>)> = seq(role, "rules")
        .iter()
        .map(|r| {
            assert!(r.get("resourceNames").is_none() && r.get("nonResourceURLs").is_none());
            let mut verbs = strs(r, "verbs");
            verbs.sort();
            (strs(r, "apiGroups"), strs(r, "resources"), verbs)
        })
        .collect();
    rules.sort();
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        vec![
            (v(&[""]), v(&["nodes"]), v(&["get"])),
            (v(&[""]), v(&["pods"]), v(&["get", "list", "watch"])),
        ],
        "RBAC: get/list/watch pods and get nodes, nothing else"
    );
    assert!(m.all("Role").is_empty() && m.all("RoleBinding").is_empty());

    let binding = m.one("ClusterRoleBinding");
    assert_eq!(s(binding, "roleRef.kind"), "ClusterRole");
    assert_eq!(s(binding, "roleRef.name"), s(role, "metadata.name"));
    let sa = m.one("ServiceAccount");
    let subject = &seq(binding, "subjects")[0];
    assert_eq!(s(subject, "kind"), "ServiceAccount");
    assert_eq!(s(subject, "name"), s(sa, "metadata.name"));
    assert_eq!(s(subject, "namespace"), NAMESPACE);
    assert_eq!(
        s(m.pod(), "serviceAccountName"),
        s(sa, "metadata.name"),
        "the DaemonSet runs as the bound ServiceAccount"
    );

    let svc = m.one("Service");
    assert_eq!(s(svc, "spec.clusterIP"), "None", "headless Service");
    let port = &seq(svc, "spec.ports")[0];
    assert_eq!(s(port, "name"), "metrics");
    assert_eq!(at(port, "port").as_u64(), Some(9464));
    let pod_labels = at(m.one("DaemonSet"), "spec.template.metadata.labels");
    for (k, v) in at(svc, "spec.selector").as_mapping().expect("selector") {
        assert_eq!(
            pod_labels.get(k.as_str().unwrap()),
            Some(v),
            "selector {k:?}"
        );
    }

    let ns = m.one("Namespace");
    assert_eq!(s(ns, "metadata.name"), NAMESPACE);
    assert_eq!(
        at(ns, "metadata.labels")
            .get("pod-security.kubernetes.io/enforce")
            .and_then(Value::as_str),
        Some("privileged")
    );
    for o in &m.objects {
        let kind = s(o, "kind");
        if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind) {
            assert_eq!(s(o, "metadata.namespace"), NAMESPACE, "{kind}'s namespace");
        }
    }
}

#[test]
fn manifests_config_is_accepted_by_the_agent() {
    let text = Manifests::load().agent_config();
    let cfg: llm_slo_agent::config::Config = serde_yaml::from_str(&text)
        .expect("the ConfigMap's agent.yaml parses as the agent's Config");
    cfg.validate().expect("and validates");
    assert_eq!(cfg.listen.to_string(), "0.0.0.0:9464");
    assert_eq!(cfg.discovery.proc_root, Path::new("/host/proc"));
    assert!(cfg.network.enabled);
}

#[test]
fn kustomization_lists_every_manifest() {
    let m = Manifests::load();
    let k = &yaml_docs(
        &read("deploy/manifests/kustomization.yaml"),
        "kustomization",
    )[0];
    assert_eq!(s(k, "kind"), "Kustomization");
    assert_eq!(s(k, "namespace"), NAMESPACE);
    let mut listed = strs(k, "resources");
    listed.sort();
    let mut files: Vec<String> = m
        .files
        .iter()
        .filter(|f| *f != "kustomization.yaml")
        .cloned()
        .collect();
    files.sort();
    assert_eq!(listed, files, "kustomization resources = the YAML files");
}

/// The `.Values.a.b` paths a template uses.
fn values_refs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(".Values.") {
        let tail = &rest[i + ".Values.".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(tail.len());
        let path = tail[..end].trim_end_matches('.');
        if !path.is_empty() {
            out.push(path.to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn chart_values() -> Value {
    serde_yaml::from_str(&read(&format!("{CHART}/values.yaml"))).expect("values.yaml parses")
}

fn template_files() -> Vec<(String, String)> {
    let dir = repo().join(CHART).join("templates");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("templates/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn chart_values_cover_every_template_reference() {
    let chart = &yaml_docs(&read(&format!("{CHART}/Chart.yaml")), "Chart.yaml")[0];
    assert_eq!(s(chart, "apiVersion"), "v2");
    assert_eq!(s(chart, "name"), "llm-slo-agent");
    assert_eq!(
        s(chart, "appVersion"),
        env!("CARGO_PKG_VERSION"),
        "appVersion = the agent's version"
    );
    let values = chart_values();
    let templates = template_files();
    for name in [
        "_helpers.tpl",
        "daemonset.yaml",
        "serviceaccount.yaml",
        "clusterrole.yaml",
        "clusterrolebinding.yaml",
        "configmap.yaml",
        "service.yaml",
        "servicemonitor.yaml",
        "prometheusrule.yaml",
    ] {
        assert!(
            templates.iter().any(|(n, _)| n == name),
            "templates/{name} missing"
        );
    }
    let mut n = 0;
    for (name, text) in &templates {
        for path in values_refs(text) {
            let mut cur = &values;
            for seg in path.split('.') {
                cur = cur.get(seg).unwrap_or_else(|| {
                    panic!("templates/{name} uses .Values.{path}, which values.yaml lacks")
                });
            }
            n += 1;
        }
        for (tag, gate) in [
            ("servicemonitor.yaml", ".Values.serviceMonitor.enabled"),
            ("prometheusrule.yaml", ".Values.prometheusRule.enabled"),
        ] {
            if name == tag {
                assert!(
                    text.trim_start()
                        .starts_with(&format!("{{{{- if {gate} }}}}")),
                    "{name} is gated by {gate}"
                );
            }
        }
        if name == "servicemonitor.yaml" {
            // The request series carry the inference pod's namespace/pod: Prometheus must not
            // rename them to exported_* (dashboards and rules select on them).
            assert!(
                text.contains("honorLabels: true"),
                "{name} keeps the series' labels"
            );
        }
        // Helm reads only files inside the chart.
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".Files.Get \"") {
            let tail = &rest[i + ".Files.Get \"".len()..];
            let f = &tail[..tail.find('"').unwrap()];
            assert!(
                repo().join(CHART).join(f).is_file(),
                "templates/{name} reads {f}, which the chart lacks"
            );
            rest = tail;
        }
    }
    assert!(n > 40, "only {n} .Values references found: scanner broken?");
    for (off, path) in [
        ("serviceMonitor", "serviceMonitor.enabled"),
        ("prometheusRule", "prometheusRule.enabled"),
        ("grafanaDashboards", "grafanaDashboards.enabled"),
    ] {
        assert_eq!(
            at(&values, path).as_bool(),
            Some(false),
            "{off} is off by default"
        );
    }
}

/// The `- NAME` items under `key:` inside the template's `capabilities:` block.
fn template_caps(text: &str, key: &str) -> Vec<String> {
    let block = &text[text
        .find("capabilities:")
        .expect("capabilities: in template")..];
    let mut lines = block.lines().skip_while(|l| l.trim() != format!("{key}:"));
    let header = lines.next().expect("key line");
    let indent = header.len() - header.trim_start().len();
    let mut out = Vec::new();
    for l in lines {
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if l.len() - l.trim_start().len() <= indent && !t.starts_with("- ") {
            break;
        }
        match t.strip_prefix("- ") {
            Some(cap) => out.push(cap.trim().to_string()),
            None => break,
        }
    }
    out.sort();
    out
}

#[test]
fn chart_daemonset_template_matches_the_manifests() {
    let text = read(&format!("{CHART}/templates/daemonset.yaml"));
    let m = Manifests::load();
    let sc = at(m.agent(), "securityContext");
    assert_eq!(template_caps(&text, "add"), caps_of(sc, "add"));
    assert_eq!(template_caps(&text, "add"), sorted(&CAPS));
    assert_eq!(template_caps(&text, "drop"), vec!["ALL"]);
    for literal in [
        "hostNetwork: true",
        "privileged: false",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "runAsUser: 0",
        "fieldPath: spec.nodeName",
        "path: /healthz",
        "path: /readyz",
        "mountPath: /host/proc",
        CONFIG_FILE,
    ] {
        assert!(
            text.contains(literal),
            "templates/daemonset.yaml lacks `{literal}`"
        );
    }
}

#[test]
fn chart_defaults_match_the_manifests() {
    let values = chart_values();
    let m = Manifests::load();
    let (pod, c) = (m.pod(), m.agent());

    // The ConfigMap = values.config plus listen = listenAddress:metricsPort.
    let mut expected = at(&values, "config").clone();
    let port = at(&values, "metricsPort").as_u64().unwrap();
    expected.as_mapping_mut().unwrap().insert(
        "listen".into(),
        format!("{}:{port}", s(&values, "listenAddress")).into(),
    );
    let actual: Value = serde_yaml::from_str(&m.agent_config()).unwrap();
    assert_eq!(actual, expected, "ConfigMap agent.yaml vs values.config");
    let cfg: llm_slo_agent::config::Config = serde_yaml::from_value(expected).unwrap();
    cfg.validate().unwrap();

    assert_eq!(at(pod, "tolerations"), at(&values, "tolerations"));
    assert_eq!(at(c, "resources"), at(&values, "resources"));
    assert_eq!(
        at(m.one("DaemonSet"), "spec.updateStrategy"),
        at(&values, "updateStrategy")
    );
    assert_eq!(at(pod, "hostPID"), at(&values, "hostPID"));
    assert_eq!(at(pod, "nodeSelector"), at(&values, "nodeSelector"));
    assert_eq!(
        at(c, "securityContext.seccompProfile"),
        at(&values, "seccompProfile")
    );
    assert_eq!(
        s(c, "image"),
        format!(
            "{}:{}",
            s(&values, "image.repository"),
            env!("CARGO_PKG_VERSION")
        )
    );
    let k = &yaml_docs(
        &read("deploy/manifests/kustomization.yaml"),
        "kustomization",
    )[0];
    assert_eq!(s(k, "images.0.newTag"), env!("CARGO_PKG_VERSION"));
    let state: Vec<String> = strs(&values, "hostPaths.cniState");
    let mounted: Vec<String> = seq(c, "volumeMounts")
        .iter()
        .map(|m| s(m, "mountPath").to_string())
        .filter(|p| state.contains(p))
        .collect();
    assert_eq!(
        mounted, state,
        "hostPaths.cniState are the mounted CNI state dirs"
    );
}

#[test]
fn chart_copies_are_identical_to_the_originals() {
    assert!(
        read("deploy/prometheus/alerts.yaml") == read(&format!("{CHART}/files/alerts.yaml")),
        "{CHART}/files/alerts.yaml differs from deploy/prometheus/alerts.yaml: \
         cp deploy/prometheus/alerts.yaml {CHART}/files/"
    );
    let json_in = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let originals = repo().join("deploy/grafana");
    let copies = repo().join(CHART).join("files/dashboards");
    let (o, c) = (json_in(&originals), json_in(&copies));
    let fix = format!("cp deploy/grafana/*.json {CHART}/files/dashboards/");
    for name in o.union(&c) {
        let (a, b) = (originals.join(name), copies.join(name));
        assert!(
            a.is_file(),
            "{CHART}/files/dashboards/{name} has no original in deploy/grafana"
        );
        assert!(
            b.is_file(),
            "deploy/grafana/{name} is not copied into the chart: {fix}"
        );
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{CHART}/files/dashboards/{name} differs from deploy/grafana/{name}: {fix}"
        );
    }
}

/// Dockerfile instructions with continuation lines joined and comments removed.
fn docker_instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part.trim());
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur).trim().to_string());
            }
        }
    }
    out
}

/// Build and runtime stages (instructions after each FROM, the FROM line first).
fn docker_stages(text: &str) -> Vec<Vec<String>> {
    let mut stages: Vec<Vec<String>> = Vec::new();
    for i in docker_instructions(text) {
        if i.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("an instruction before FROM")
            .push(i);
    }
    stages
}

/// Packages of the `apt-get install` in these shell words.
fn apt_packages(cmd: &str) -> Vec<String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let i = words
        .windows(2)
        .position(|w| w == ["apt-get", "install"])
        .unwrap_or_else(|| panic!("no apt-get install in `{cmd}`"));
    words[i + 2..]
        .iter()
        .take_while(|w| !["&&", ";", "||"].contains(w))
        .filter(|w| !w.starts_with('-'))
        .map(|w| w.to_string())
        .collect()
}

fn cargo_command(cmd: &str) -> String {
    let seg = cmd
        .split("&&")
        .find(|c| c.contains("cargo build"))
        .expect("cargo build");
    let seg = &seg[seg.find("cargo build").unwrap()..];
    seg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn json_array(instr: &str, name: &str) -> Vec<String> {
    serde_json::from_str(instr.strip_prefix(name).unwrap().trim())
        .unwrap_or_else(|e| panic!("{name} is not a JSON array: {e}"))
}

#[test]
fn dockerfile_and_build_script_agree() {
    let docker = read("Dockerfile");
    let stages = docker_stages(&docker);
    assert_eq!(stages.len(), 2, "a build and a runtime stage");
    let (build, runtime) = (&stages[0], &stages[1]);
    assert_eq!(build[0], "FROM rust:1-bookworm AS build");
    assert_eq!(runtime[0], "FROM debian:bookworm-slim");

    let runs = |st: &Vec<String>| -> Vec<String> {
        st.iter()
            .filter_map(|i| i.strip_prefix("RUN ").map(str::to_string))
            .collect()
    };
    let build_runs = runs(build);
    let apt_run = build_runs
        .iter()
        .find(|r| r.contains("apt-get install"))
        .expect("build stage installs packages");
    let docker_pkgs = apt_packages(apt_run);
    let cargo_run = build_runs
        .iter()
        .find(|r| r.contains("cargo build"))
        .expect("build stage runs cargo build");
    let docker_cargo = cargo_command(cargo_run);
    assert_eq!(
        docker_cargo,
        "cargo build --release --locked --bin llm-slo-agent"
    );
    for p in ["clang", "llvm", "libelf-dev", "zlib1g-dev", "pkg-config"] {
        assert!(docker_pkgs.iter().any(|x| x == p), "build stage lacks {p}");
    }

    let script = read("scripts/docker-build-steps.sh");
    let pkgs_line = script
        .lines()
        .find(|l| l.trim_start().starts_with("BUILD_PKGS=("))
        .expect("BUILD_PKGS=(...) in scripts/docker-build-steps.sh");
    let inner = &pkgs_line[pkgs_line.find('(').unwrap() + 1..pkgs_line.rfind(')').unwrap()];
    let script_pkgs: Vec<String> = inner.split_whitespace().map(str::to_string).collect();
    assert_eq!(
        script_pkgs, docker_pkgs,
        "apt packages: scripts/docker-build-steps.sh vs Dockerfile"
    );
    let script_cargo: Vec<String> = script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo build"))
        .map(cargo_command)
        .collect();
    assert_eq!(
        script_cargo,
        vec![docker_cargo],
        "cargo command: scripts/docker-build-steps.sh vs Dockerfile"
    );

    // Everything the build stage copies exists, and it copies what the workspace needs:
    // every member, build.rs, the BPF headers, and the files Cargo.toml names ([[bench]]).
    let mut copied = Vec::new();
    for i in build.iter().filter(|i| i.starts_with("COPY ")) {
        let words: Vec<&str> = i.split_whitespace().skip(1).collect();
        for src in &words[..words.len() - 1] {
            assert!(repo().join(src).exists(), "Dockerfile copies missing {src}");
            copied.push(src.trim_end_matches('/').to_string());
        }
    }
    let cargo_toml = read("Cargo.toml");
    let members_line = cargo_toml
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let members: Vec<&str> = members_line
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|m| *m != ".")
        .collect();
    assert!(!members.is_empty());
    let mut needed: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    needed.extend(
        ["Cargo.toml", "Cargo.lock", "build.rs", "src", "vmlinux"]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut lines = cargo_toml.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "[[bench]]" {
            let name = lines
                .next()
                .and_then(|n| n.split('"').nth(1))
                .expect("[[bench]] name");
            assert!(repo().join(format!("benches/{name}.rs")).is_file());
            needed.push("benches".into());
        }
    }
    for n in &needed {
        assert!(copied.contains(n), "the build stage does not copy {n}");
    }
    let ignore = read(".dockerignore");
    for p in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim().trim_end_matches('/') == p),
            ".dockerignore lacks {p}"
        );
    }

    // Runtime: the two libraries the binary links, CA roots, the one binary; no toolchain.
    let rt_runs = runs(runtime);
    let rt_apt = rt_runs
        .iter()
        .find(|r| r.contains("apt-get install"))
        .expect("runtime packages");
    assert_eq!(
        apt_packages(rt_apt),
        vec!["libelf1", "zlib1g", "ca-certificates"]
    );
    assert!(runtime.iter().any(
        |i| i.starts_with("COPY --from=build ") && i.ends_with(" /usr/local/bin/llm-slo-agent")
    ));
    assert!(runtime.iter().any(|i| i == "USER 0"));
    let entry = runtime
        .iter()
        .find(|i| i.starts_with("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    assert_eq!(json_array(entry, "ENTRYPOINT"), vec!["llm-slo-agent"]);
    let cmd = runtime.iter().find(|i| i.starts_with("CMD ")).expect("CMD");
    assert_eq!(
        json_array(cmd, "CMD"),
        strs(Manifests::load().agent(), "args"),
        "the image's CMD is the DaemonSet's args"
    );
}

#[test]
fn scripts_parse() {
    let mut scripts = Vec::new();
    for dir in ["kind-test", "scripts"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) == Some("sh") {
                scripts.push(p);
            }
        }
    }
    scripts.sort();
    for must in [
        "kind-test/common.sh",
        "kind-test/run-calico.sh",
        "kind-test/run-cilium.sh",
        "kind-test/run-flannel.sh",
        "scripts/docker-build-steps.sh",
    ] {
        assert!(scripts.contains(&repo().join(must)), "{must} missing");
    }
    for p in &scripts {
        let out = Command::new("bash").arg("-n").arg(p).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(p).unwrap();
        assert!(
            text.contains("set -euo pipefail"),
            "{} lacks set -euo pipefail",
            p.display()
        );
    }
    for kind in ["calico", "cilium", "flannel"] {
        let cfg = &yaml_docs(&read(&format!("kind-test/kind-{kind}.yaml")), kind)[0];
        assert_eq!(
            at(cfg, "networking.disableDefaultCNI").as_bool(),
            Some(true)
        );
        s(cfg, "networking.podSubnet");
    }
    // The scripts written for this project (not third-party ones) are shellcheck-clean when
    // shellcheck is installed (Debian: apt-get install shellcheck).
    let ours: Vec<&PathBuf> = scripts
        .iter()
        .filter(|p| p.starts_with(repo().join("kind-test")) || p.ends_with("docker-build-steps.sh"))
        .collect();
    match Command::new("shellcheck").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let out = Command::new("shellcheck")
                .arg("-x")
                .args(&ours)
                .current_dir(repo())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "shellcheck:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        _ => eprintln!("shellcheck not installed: only bash -n was run"),
    }
}

// ---- 6: the agent with the DaemonSet's config, arguments and capabilities ----

/// True when the test may load BPF. Without root it skips loudly, unless LLMSLO_REQUIRE_BPF=1.
fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LLMSLO_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("{test}: LLMSLO_REQUIRE_BPF=1 but not running as root: cannot load BPF programs");
    }
    eprintln!("\n!!! SKIPPING {test}: needs root to load BPF programs !!!\n");
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    c.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, "")
}

/// A child process, SIGKILLed on drop if still running.
struct Proc {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log when the process has exited.
    fn check_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("{} exited early ({st}):\n{}", self.what, self.log_text());
        }
    }

    /// SIGTERM, then wait up to `limit` for the exit status.
    fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "{} did not exit within {limit:?} of SIGTERM:\n{}",
                self.what,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(mut cmd: Command, what: &'static str, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    Proc { child, what, log }
}

/// A directory removed on drop (after the processes using it: declare it first).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f` every 200 ms until it is true or `limit` passes.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The DaemonSet's capabilities as a `setpriv --bounding-set` list: uid 0 holds exactly its
/// bounding set after exec, as the container's root does.
fn bounding_set() -> String {
    let mut s = String::from("-all");
    for c in CAPS {
        s.push_str(",+");
        s.push_str(&c.to_ascii_lowercase());
    }
    s
}

#[test]
fn agent_runs_with_the_daemonset_config_arguments_and_capabilities() {
    const TEST: &str = "agent_runs_with_the_daemonset_config_arguments_and_capabilities";
    if !kernel_tests_enabled(TEST) {
        return;
    }
    let m = Manifests::load();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("llmslo-deploy-{}", std::process::id())));
    let dir = scratch.0.clone();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The ConfigMap's config, but on loopback and with this machine's /proc as proc_root,
    // plus the signature of the test server below.
    const SIGNATURE: &str = "llmslo-deploy-test-server";
    let port = free_port();
    let mut cfg: Value = serde_yaml::from_str(&m.agent_config()).unwrap();
    cfg["listen"] = format!("127.0.0.1:{port}").into();
    cfg["discovery"]["proc_root"] = "/proc".into();
    cfg["discovery"]["extra_signatures"]
        .as_sequence_mut()
        .expect("extra_signatures list")
        .push(SIGNATURE.into());
    let cfg_path = dir.join("agent.yaml");
    std::fs::write(&cfg_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();

    // The DaemonSet's arguments, with the config file where this test wrote it.
    let mut args = strs(m.agent(), "args");
    let i = args.iter().position(|a| a == "--config").expect("--config");
    assert_eq!(args[i + 1], CONFIG_FILE);
    args[i + 1] = cfg_path.display().to_string();

    let bin = env!("CARGO_BIN_EXE_llm-slo-agent");
    let setpriv = have("setpriv");
    let cmd = if setpriv {
        let mut c = Command::new("setpriv");
        c.args([
            "--bounding-set",
            &bounding_set(),
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            bin,
        ]);
        c.args(&args);
        c
    } else {
        eprintln!(
            "setpriv (util-linux) not found: running the agent with all of root's capabilities"
        );
        let mut c = Command::new(bin);
        c.args(&args);
        c
    };
    let mut agent = spawn(cmd, "llm-slo-agent", dir.join("agent.log"));

    let ready = wait_for(Duration::from_secs(30), || {
        agent.check_alive();
        get(port, "/readyz").map(|r| r.0) == Some(200)
    });
    assert!(
        ready,
        "/readyz did not answer 200 within 30 s:\n{}",
        agent.log_text()
    );
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    let (st, metrics) = get(port, "/metrics").expect("/metrics");
    assert_eq!(st, 200);
    assert!(
        metrics.contains("llmslo_agent_ready 1"),
        "llmslo_agent_ready 1 in /metrics"
    );

    // The network path loads and attaches under those capabilities (NET_ADMIN): without it
    // the agent still starts, but without its tc and netfilter programs.
    let log = agent.log_text();
    assert!(
        !log.contains("network-path programs not loaded"),
        "network-path programs did not load:\n{log}"
    );
    let (_, targets) = get(port, "/api/v1/targets").expect("/api/v1/targets");
    let t: serde_json::Value = serde_json::from_str(&targets).expect("targets JSON");
    let available = |name: &str| {
        t["hooks"].as_array().is_some_and(|hs| {
            hs.iter()
                .any(|h| h["name"] == name && h["available"] == true)
        })
    };
    let programs = t["programs"].as_array().expect("programs");
    if available("netfilter_link") {
        let nf: Vec<_> = programs
            .iter()
            .filter(|p| {
                p["section"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("netfilter/")
            })
            .collect();
        assert!(
            !nf.is_empty() && nf.iter().all(|p| p["attached"] == true),
            "netfilter programs not attached (NET_ADMIN missing, or another llm-slo-agent on this \
             host holds the netfilter hook priorities): {targets}"
        );
    }
    for i in t["interfaces"].as_array().expect("interfaces") {
        assert!(i["error"].is_null(), "tc attach failed: {i}");
    }

    // Under those capabilities only, the agent traces a server run by another user (reading
    // its /proc entries needs SYS_PTRACE and DAC_READ_SEARCH).
    if setpriv && have("bash") {
        let server_bin = dir.join("llmslo-bin");
        std::fs::copy(bin, &server_bin).unwrap();
        std::fs::set_permissions(&server_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sport = free_port();
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "bash",
            "-c",
            &format!(
                "exec -a {SIGNATURE} \"$0\" synth-server --listen 127.0.0.1:{sport} \
                 --decode-ms 2 --tokens 8 --max-runtime-s 120"
            ),
        ])
        .arg(&server_bin);
        let mut server = spawn(c, "synthetic server (uid 65534)", dir.join("server.log"));
        let spid = server.child.id();
        assert!(
            wait_for(Duration::from_secs(15), || {
                server.check_alive();
                get(sport, "/health").map(|r| r.0) == Some(200)
            }),
            "the synthetic server did not come up:\n{}",
            server.log_text()
        );
        assert!(
            wait_for(Duration::from_secs(15), || {
                get(port, "/api/v1/targets")
                    .is_some_and(|(_, b)| b.contains(&format!("signature:{SIGNATURE}")))
            }),
            "the agent does not list the server (pid {spid}) in /api/v1/targets:\n{}",
            agent.log_text()
        );
        let body = r#"{"model":"synth-llm","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
        for _ in 0..5 {
            let (st, resp) =
                http(sport, "POST", "/v1/chat/completions", body).expect("chat completion");
            assert_eq!(st, 200, "{resp}");
            assert!(resp.contains("data: [DONE]"), "a full SSE stream: {resp}");
        }
        let mut last = String::new();
        let seen = wait_for(Duration::from_secs(10), || {
            last = get(port, "/api/v1/requests?limit=100")
                .map(|r| r.1)
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            v["requests"].as_array().is_some_and(|rs| {
                rs.iter()
                    .filter(|r| r["pid"] == spid && r["path"] == "/v1/chat/completions")
                    .count()
                    >= 5
            })
        });
        assert!(
            seen,
            "the agent did not record the 5 requests of pid {spid}:\n{last}\n{}",
            agent.log_text()
        );
        // The server has no SIGTERM handler: it dies of the signal.
        server.terminate(Duration::from_secs(10));
    } else {
        eprintln!("setpriv or bash missing: not checking that a server of another user is traced");
    }

    let st = agent.terminate(Duration::from_secs(20));
    assert!(
        st.success(),
        "the agent exited with {st} after SIGTERM:\n{}",
        agent.log_text()
    );
}

/// The DaemonSet's capability set minus `drop`, as a `setpriv --bounding-set` list.
fn bounding_set_without(drop: &str) -> String {
    let mut s = String::from("-all");
    for c in CAPS.iter().filter(|c| **c != drop) {
        s.push_str(",+");
        s.push_str(&c.to_ascii_lowercase());
    }
    s
}

#[test]
fn agent_names_each_missing_capability() {
    const TEST: &str = "agent_names_each_missing_capability";
    if !kernel_tests_enabled(TEST) {
        return;
    }
    assert!(
        have("setpriv"),
        "setpriv (util-linux) is needed to drop capabilities"
    );
    let m = Manifests::load();
    let scratch = Scratch(std::env::temp_dir().join(format!("llmslo-caps-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).unwrap();
    let mut cfg: Value = serde_yaml::from_str(&m.agent_config()).unwrap();
    cfg["discovery"]["proc_root"] = "/proc".into();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut nums = kernel
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    let bin = env!("CARGO_BIN_EXE_llm-slo-agent");
    for cap in CAPS {
        let port = free_port();
        cfg["listen"] = format!("127.0.0.1:{port}").into();
        let cfg_path = scratch.0.join(format!("agent-{cap}.yaml"));
        std::fs::write(&cfg_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        let mut c = Command::new("setpriv");
        c.args([
            "--bounding-set",
            &bounding_set_without(cap),
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            bin,
            "run",
            "--config",
        ])
        .arg(&cfg_path);
        let log = scratch.0.join(format!("agent-{cap}.log"));
        let mut agent = spawn(c, "llm-slo-agent", log);
        // SYS_RESOURCE only matters before 5.11 (RLIMIT_MEMLOCK); everything else is needed.
        let needed = cap != "SYS_RESOURCE" || version < (5, 11);
        if needed {
            let exited = wait_for(Duration::from_secs(20), || {
                agent.child.try_wait().unwrap().is_some()
            });
            let log = agent.log_text();
            assert!(exited, "without {cap} the agent kept running:\n{log}");
            let st = agent.child.try_wait().unwrap().unwrap();
            assert!(!st.success(), "without {cap} the agent exited 0:\n{log}");
            assert!(
                log.contains(&format!("missing capability: CAP_{cap}")),
                "without {cap} the error names it:\n{log}"
            );
            assert!(
                log.contains(&format!("capabilities.add: [{cap}]")),
                "the error says how to grant {cap}:\n{log}"
            );
        } else {
            let ready = wait_for(Duration::from_secs(30), || {
                agent.check_alive();
                get(port, "/readyz").map(|r| r.0) == Some(200)
            });
            assert!(
                ready,
                "without {cap} (not needed on {kernel}) the agent starts:\n{}",
                agent.log_text()
            );
            let st = agent.terminate(Duration::from_secs(15));
            assert!(st.success(), "clean exit:\n{}", agent.log_text());
        }
    }
}
