//! Kubernetes enrichment against a recorded API server (tests/fixtures/k8s: a PodList and the
//! watch events of a pod's life, replayed by `common::apiserver`):
//! - `watch_follows_the_recorded_api_stream` (no kernel): the kube-rs watch lists and follows
//!   this node's pods (add, modify, bookmark, delete, 410 Gone re-list), and reports the API
//!   down and up again.
//! - `kubernetes_node_scenario` (kernel): three testbed pods in kubelet cgroups (two inference
//!   servers under the systemd and cgroupfs drivers, one web server); the agent names the two
//!   from the API and never traces the third; a pod started later is traced within 2 s; a
//!   deleted pod's series go within 60 s while an idle pod's stay; with the API gone the agent
//!   keeps tracing with node-local names.
//! - `pods_selected_by_label_or_port` (kernel): `discovery.select` by pod label or by port.
//! - `a_server_that_listens_late_is_traced_from_its_listen` (kernel): a server that listens
//!   5 s after its exec has its port traced at its `listen()`, not at the next poll.

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::apiserver::{fixture, ApiServer};
use common::{http_get, kernel_tests_enabled, metric, Agent};
use llm_slo_agent::config::KubernetesCfg;
use llm_slo_agent::discovery::k8s::{self, K8sState};
use serde_json::Value;
use testbed::{CgroupDriver, LoadConfig, Pod, PodCgroup, PodProcess};

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn events(vars: &HashMap<&str, String>) -> Vec<Value> {
    fixture("watch-events.json", vars)
        .as_array()
        .cloned()
        .unwrap()
}

fn event<'a>(evs: &'a [Value], kind: &str) -> &'a Value {
    evs.iter().find(|e| e["type"] == kind).unwrap()
}

fn uuid_and_cid(i: u8) -> (String, String) {
    (
        format!("0000000{i}-1111-4222-8333-44444444444{i}"),
        format!("{i}").repeat(64),
    )
}

#[test]
fn watch_follows_the_recorded_api_stream() {
    let mut vars: HashMap<&str, String> = HashMap::new();
    for (i, key) in ["VLLM", "SGLANG", "WEB", "LWS"].iter().enumerate() {
        let (uid, cid) = uuid_and_cid(i as u8 + 1);
        vars.insert(Box::leak(format!("UID_{key}").into_boxed_str()), uid);
        vars.insert(Box::leak(format!("CID_{key}").into_boxed_str()), cid);
    }
    vars.insert("NODE", "node-a".into());
    let mut api = ApiServer::start(fixture("pods.json", &vars));
    let evs = events(&vars);
    let cfg = KubernetesCfg {
        api_url: api.url(),
        ..Default::default()
    };
    let state = Arc::new(K8sState::default());
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ch = changes.clone();
    let t = k8s::spawn(
        cfg,
        "node-a".into(),
        state.clone(),
        stop.clone(),
        move || {
            ch.fetch_add(1, Ordering::SeqCst);
        },
    )
    .unwrap();
    let limit = Duration::from_secs(10);
    assert!(
        wait_until(limit, || state.pod_count() == 3).is_some(),
        "the initial list"
    );
    assert!(state.up.load(Ordering::SeqCst));
    let list = api.requests().into_iter().find(|r| r.starts_with("list"));
    assert!(
        list.as_deref()
            .is_some_and(|l| l.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "the list asks for this node's pods only: {list:?}"
    );
    let vllm = state.pod(&vars["UID_VLLM"]).unwrap();
    assert_eq!(
        (vllm.name.as_str(), vllm.namespace.as_str()),
        ("vllm-chat-7d9c5b8f4-x2x9q", "llm-prod")
    );
    let owner = vllm.owner.clone().unwrap();
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Deployment", "vllm-chat")
    );
    assert_eq!(
        vllm.container_by_id(&vars["CID_VLLM"]).unwrap().ports,
        vec![8000]
    );
    let sgl = state.pod(&vars["UID_SGLANG"]).unwrap();
    assert_eq!(sgl.owner.clone().unwrap().kind, "StatefulSet");

    // ADDED (pending: no container id yet), then MODIFIED (running).
    api.push(event(&evs, "ADDED"));
    assert!(wait_until(limit, || state.pod(&vars["UID_LWS"]).is_some()).is_some());
    assert!(state.pod(&vars["UID_LWS"]).unwrap().containers[0]
        .id
        .is_none());
    api.push(event(&evs, "MODIFIED"));
    assert!(
        wait_until(limit, || state
            .pod(&vars["UID_LWS"])
            .is_some_and(|p| p.container_by_id(&vars["CID_LWS"]).is_some()))
        .is_some(),
        "MODIFIED carries the running container's id"
    );
    let lws = state.pod(&vars["UID_LWS"]).unwrap();
    assert_eq!(
        lws.owner.clone().unwrap(),
        k8s::Owner {
            kind: "LeaderWorkerSet".into(),
            name: "llama-lws".into()
        }
    );
    api.push(event(&evs, "BOOKMARK"));
    api.push(event(&evs, "DELETED"));
    assert!(wait_until(limit, || state.pod(&vars["UID_LWS"]).is_none()).is_some());
    // 410 Gone: a re-list, not an error.
    api.push(event(&evs, "ERROR"));
    assert!(
        wait_until(limit, || state.relists.load(Ordering::SeqCst) >= 1).is_some(),
        "410 Gone makes the watch re-list: {:?}",
        api.requests()
    );
    assert!(
        wait_until(limit, || api
            .requests()
            .iter()
            .filter(|r| r.starts_with("list"))
            .count()
            >= 2)
        .is_some(),
        "a second list after the 410: {:?}",
        api.requests()
    );
    assert_eq!(state.errors.load(Ordering::SeqCst), 0);
    assert!(state.up.load(Ordering::SeqCst));
    assert_eq!(state.pod_count(), 3);
    assert!(
        changes.load(Ordering::SeqCst) >= 4,
        "every change was signalled"
    );

    // The API goes away: down, counted, degraded; it comes back on the same address: up again.
    let addr = api.addr;
    api.stop();
    assert!(
        wait_until(Duration::from_secs(20), || !state.up.load(Ordering::SeqCst)).is_some(),
        "the watch notices the API is gone"
    );
    assert!(state.errors.load(Ordering::SeqCst) >= 1);
    assert!(state
        .degraded()
        .unwrap()
        .contains("node-local discovery only"));
    assert_eq!(state.pod_count(), 3, "the last known pods are kept");
    let api2 = ApiServer::start_on(&addr.to_string(), fixture("pods.json", &vars));
    assert!(
        wait_until(Duration::from_secs(45), || state.up.load(Ordering::SeqCst)).is_some(),
        "the watch reconnects: {:?}",
        api2.requests()
    );
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
}

/// The fixture's placeholders: `UID_<KEY>`/`CID_<KEY>` from each pod's cgroup, and `NODE`.
fn fixture_vars(node: &str, pods: &[(&str, &PodCgroup)]) -> HashMap<&'static str, String> {
    let mut vars: HashMap<&'static str, String> = HashMap::new();
    for (key, cg) in pods {
        vars.insert(
            Box::leak(format!("UID_{key}").into_boxed_str()),
            cg.pod_uid().to_string(),
        );
        vars.insert(
            Box::leak(format!("CID_{key}").into_boxed_str()),
            cg.container_id().to_string(),
        );
    }
    vars.insert("NODE", node.to_string());
    vars
}

/// A testbed pod running the synthetic server as `arg0` with `HOSTNAME=hostname`.
struct TestPod {
    server: Option<PodProcess>,
    cg: PodCgroup,
    pod: Pod,
    port: u16,
}

const PORT: u16 = 8000;

fn pod_with_cgroup(name: &str, driver: CgroupDriver) -> (Pod, PodCgroup) {
    (
        Pod::create(name).expect("pod netns"),
        PodCgroup::create(driver, "burstable").expect("pod cgroup"),
    )
}

fn start_server(pod: &Pod, cg: &PodCgroup, arg0: &str, hostname: &str) -> PodProcess {
    start_server_on(pod, cg, arg0, hostname, PORT)
}

fn start_server_on(pod: &Pod, cg: &PodCgroup, arg0: &str, hostname: &str, port: u16) -> PodProcess {
    let mut cmd = Command::new(common::agent_bin());
    cmd.arg0(arg0)
        .arg("synth-server")
        .args(["--listen", &format!("0.0.0.0:{port}"), "--decode-ms", "1"])
        .env("HOSTNAME", hostname)
        .stdout(std::process::Stdio::null());
    pod.spawn(cmd, Some(cg))
        .expect("spawning the synthetic server")
}

impl TestPod {
    fn new(name: &str, driver: CgroupDriver, arg0: &str) -> TestPod {
        TestPod::new_on(name, driver, arg0, PORT)
    }

    fn new_on(name: &str, driver: CgroupDriver, arg0: &str, port: u16) -> TestPod {
        let (pod, cg) = pod_with_cgroup(name, driver);
        let server = start_server_on(&pod, &cg, arg0, name, port);
        pod.wait_for_port(port, Duration::from_secs(10))
            .expect("server listening");
        TestPod {
            server: Some(server),
            cg,
            pod,
            port,
        }
    }

    fn load(&self, n: usize) {
        let mut cfg = LoadConfig::new(self.pod.addr(self.port));
        cfg.connections = 1;
        cfg.requests = n;
        cfg.max_tokens = Some(4);
        let res = testbed::loadgen::run(&cfg).expect("load");
        assert!(res.iter().all(|c| c.status == 200), "requests answered");
    }

    fn dst(&self) -> String {
        format!("{}:{}", self.pod.ip(), self.port)
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        self.server.take();
    }
}

fn targets(agent: &Agent) -> Vec<Value> {
    agent.get_json("/api/v1/targets")["targets"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn records_to<'a>(recs: &'a [Value], dst: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["dst"] == dst).collect()
}

#[test]
fn kubernetes_node_scenario() {
    if !kernel_tests_enabled("kubernetes_node_scenario") {
        return;
    }
    let me = std::process::id();
    let sig = format!("llmslo-k8s-infer-{me}");
    let node = format!("llmslo-node-{me}");
    // Two inference pods (systemd and cgroupfs drivers) and a web server that is not one.
    let vllm = TestPod::new("k8svllm", CgroupDriver::Systemd, &sig);
    let sglang = TestPod::new("k8ssgl", CgroupDriver::Cgroupfs, &sig);
    let web = TestPod::new(
        "k8sweb",
        CgroupDriver::Systemd,
        &format!("llmslo-k8s-web-{me}"),
    );
    let (lws_pod, lws_cg) = pod_with_cgroup("k8slws", CgroupDriver::Systemd);
    let vars = fixture_vars(
        &node,
        &[
            ("VLLM", &vllm.cg),
            ("SGLANG", &sglang.cg),
            ("WEB", &web.cg),
            ("LWS", &lws_cg),
        ],
    );
    let mut api = ApiServer::start(fixture("pods.json", &vars));
    let evs = events(&vars);

    // Polling every 60 s: whatever is found sooner was found by a wake-up (exec tracepoint,
    // API event), not by the poll.
    let yaml = format!(
        "discovery:\n  extra_signatures: [{sig}]\n  interval_ms: 60000\n\
         network:\n  enabled: false\n\
         kubernetes:\n  api_url: {}\n  node_name: {node}\n  labels: [app.kubernetes.io/name]\n",
        api.url()
    );
    let agent = Agent::start_with_config(&yaml, &[]);
    let named = |t: &[Value], pod: &str| {
        t.iter()
            .any(|x| x["pod"] == pod && x["labels_from"] == "kubernetes")
    };
    let found = wait_until(Duration::from_secs(10), || {
        let t = targets(&agent);
        named(&t, "vllm-chat-7d9c5b8f4-x2x9q") && named(&t, "sglang-0")
    });
    let t = targets(&agent);
    assert!(
        found.is_some(),
        "both inference pods named from the API: {t:#?}"
    );
    assert!(
        !t.iter().any(|x| x["pod_uid"] == web.cg.pod_uid()),
        "the web server is never a target: {t:#?}"
    );
    let v = t
        .iter()
        .find(|x| x["pod"] == "vllm-chat-7d9c5b8f4-x2x9q")
        .unwrap();
    assert_eq!(v["namespace"], "llm-prod");
    assert_eq!(v["container"], "vllm");
    assert_eq!(v["owner"]["kind"], "Deployment");
    assert_eq!(v["owner"]["name"], "vllm-chat");
    assert_eq!(v["ports"][0], 8000);
    let s = t.iter().find(|x| x["pod"] == "sglang-0").unwrap();
    assert_eq!(s["namespace"], "llm-research");
    assert_eq!(s["owner"]["kind"], "StatefulSet");

    vllm.load(5);
    sglang.load(5);
    web.load(5);
    let recs = agent.wait_requests(Duration::from_secs(10), |r| {
        records_to(r, &vllm.dst()).len() >= 5 && records_to(r, &sglang.dst()).len() >= 5
    });
    for r in records_to(&recs, &vllm.dst()) {
        assert_eq!(r["namespace"], "llm-prod", "{r}");
        assert_eq!(r["pod"], "vllm-chat-7d9c5b8f4-x2x9q");
        assert_eq!(r["container"], "vllm");
        assert_eq!(r["node"], node.as_str());
        assert_eq!(r["labels"]["app.kubernetes.io/name"], "vllm-chat");
    }
    assert_eq!(records_to(&recs, &sglang.dst()).len(), 5);
    assert!(
        records_to(&recs, &web.dst()).is_empty(),
        "the web server's requests are not traced"
    );
    let m = agent.get("/metrics");
    let vllm_series =
        "llmslo_requests_total{namespace=\"llm-prod\",pod=\"vllm-chat-7d9c5b8f4-x2x9q\",";
    let line = m
        .lines()
        .find(|l| l.starts_with(vllm_series))
        .unwrap_or_else(|| panic!("no {vllm_series}… in /metrics:\n{m}"));
    assert!(
        line.contains(",container=\"vllm\",")
            && line.contains(&format!("node=\"{node}\""))
            && line.contains("label_app_kubernetes_io_name=\"vllm-chat\"")
            && line.ends_with(" 5"),
        "{line}"
    );
    assert_eq!(metric(&m, "llmslo_agent_kubernetes_api_up"), Some(1.0));
    let vllm_done = Instant::now();

    // A pod scheduled later: the API announces it, then its server starts. Discovery polls
    // every 60 s, so only the exec tracepoint can find it this fast.
    api.push(event(&evs, "ADDED"));
    api.push(event(&evs, "MODIFIED"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric(&agent.get("/metrics"), "llmslo_agent_kubernetes_pods") == Some(4.0)
        })
        .is_some(),
        "the agent saw the new pod in the API"
    );
    let t0 = Instant::now();
    let lws_server = start_server(&lws_pod, &lws_cg, &sig, "k8slws");
    let lws_pid = lws_server.pid();
    let mut traced_after = None;
    for _ in 0..200 {
        if t0.elapsed() > Duration::from_secs(5) {
            break;
        }
        if targets(&agent)
            .iter()
            .any(|x| x["pid"] == lws_pid && x["pod"] == "llama-lws-0")
        {
            traced_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let traced_after = traced_after.expect("the new pod's server was not traced within 5 s");
    eprintln!("new pod: server start -> traced (in the BPF maps, named) in {traced_after:?}");
    assert!(
        traced_after < Duration::from_secs(2),
        "traced {traced_after:?} after its start"
    );
    lws_pod
        .wait_for_port(PORT, Duration::from_secs(10))
        .unwrap();
    let lws = TestPod {
        server: Some(lws_server),
        cg: lws_cg,
        pod: lws_pod,
        port: PORT,
    };
    lws.load(3);
    let recs = agent.wait_requests(Duration::from_secs(10), |r| {
        records_to(r, &lws.dst()).len() >= 3
    });
    let mine = records_to(&recs, &lws.dst());
    assert_eq!(mine.len(), 3, "every request of the new pod traced");
    assert_eq!(mine[0]["pod"], "llama-lws-0");
    assert_eq!(mine[0]["container"], "llama-server");
    assert_eq!(mine[0]["labels"]["app.kubernetes.io/name"], "llama-lws");
    let t = targets(&agent);
    let l = t.iter().find(|x| x["pod"] == "llama-lws-0").unwrap();
    assert_eq!(l["owner"]["kind"], "LeaderWorkerSet");

    // The pod is deleted: the API says so, the kubelet kills it and removes its cgroup.
    api.push(event(&evs, "BOOKMARK"));
    api.push(event(&evs, "DELETED"));
    let t_del = Instant::now();
    drop(lws);
    let untargeted = wait_until(Duration::from_secs(5), || {
        !targets(&agent).iter().any(|x| x["pid"] == lws_pid)
    })
    .expect("the deleted pod's target stays");
    let gone = wait_until(Duration::from_secs(60), || {
        !agent.get("/metrics").contains("pod=\"llama-lws-0\"")
    })
    .map(|_| t_del.elapsed());
    let gone = gone.unwrap_or_else(|| panic!("series of the deleted pod still there after 60 s"));
    eprintln!(
        "deleted pod: untargeted after {untargeted:?}, series gone after {gone:?}; \
         vllm idle for {:?} and kept",
        vllm_done.elapsed()
    );
    assert!(gone < Duration::from_secs(60));
    // The vllm pod has been idle for longer than the series' expiry, but it is still there.
    while vllm_done.elapsed() < Duration::from_secs(35) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = agent.get("/metrics");
    assert!(
        m.contains(vllm_series),
        "an idle pod's series stay (idle {:?})",
        vllm_done.elapsed()
    );

    // 410 Gone: a re-list, not an outage; names unchanged.
    api.push(event(&evs, "ERROR"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric(
                &agent.get("/metrics"),
                "llmslo_agent_kubernetes_relists_total",
            )
            .is_some_and(|v| v >= 1.0)
        })
        .is_some(),
        "relist after 410"
    );
    let m = agent.get("/metrics");
    assert_eq!(
        metric(&m, "llmslo_agent_kubernetes_api_errors_total"),
        Some(0.0)
    );
    assert_eq!(metric(&m, "llmslo_agent_kubernetes_api_up"), Some(1.0));
    assert_eq!(metric(&m, "llmslo_agent_kubernetes_pods"), Some(3.0));

    // The API goes away: degraded but ready, and tracing goes on.
    api.stop();
    let degraded = wait_until(Duration::from_secs(20), || {
        http_get(agent.addr, "/readyz")
            .is_ok_and(|(code, body)| code == 200 && body.contains("degraded"))
    });
    assert!(degraded.is_some(), "/readyz names the degraded state");
    assert_eq!(
        metric(&agent.get("/metrics"), "llmslo_agent_kubernetes_api_up"),
        Some(0.0)
    );
    // A pod started now is named node-locally (HOSTNAME, short container id). Its load starts
    // once the agent lists it (the pick-up time is measured above): requests a server answers
    // before the agent has found it are not traced.
    let late = TestPod::new("k8slate", CgroupDriver::Cgroupfs, &sig);
    let late_pid = late.server.as_ref().map(|s| s.pid()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || targets(&agent)
            .iter()
            .any(|x| x["pid"] == late_pid))
        .is_some(),
        "the late pod's server listed: {:#?}",
        targets(&agent)
    );
    late.load(3);
    let recs = agent.wait_requests(Duration::from_secs(10), |r| {
        records_to(r, &late.dst()).len() >= 3
    });
    sglang.load(2);
    let recs2 = agent.wait_requests(Duration::from_secs(10), |r| {
        records_to(r, &sglang.dst()).len() >= 7
    });
    let mine = records_to(&recs, &late.dst());
    assert!(
        mine.len() == 3,
        "tracing goes on without the API ({} to {}): targets {:#?}",
        mine.len(),
        late.dst(),
        targets(&agent),
    );
    assert_eq!(mine[0]["pod"], "k8slate");
    assert!(mine[0]["namespace"].is_null());
    assert_eq!(
        mine[0]["container"],
        &late.cg.container_id()[..12],
        "node-local container id"
    );
    assert_eq!(records_to(&recs2, &sglang.dst()).len(), 7);
    assert_eq!(
        records_to(&recs2, &sglang.dst())[0]["pod"],
        "sglang-0",
        "pods seen before keep their last known names"
    );
}

/// `discovery.select`: with command-line matching off, one pod is picked by its labels (from
/// the API), one by the port it listens on (node-local, started after the agent, so found
/// through its exec and the rescans after it), and a pod that matches neither is never traced.
#[test]
fn pods_selected_by_label_or_port() {
    if !kernel_tests_enabled("pods_selected_by_label_or_port") {
        return;
    }
    let me = std::process::id();
    let node = format!("llmslo-node-{me}");
    // None of these command lines is an inference server's.
    let labelled = TestPod::new(
        "k8sselv",
        CgroupDriver::Systemd,
        &format!("llmslo-app-a-{me}"),
    );
    let web = TestPod::new(
        "k8sselw",
        CgroupDriver::Cgroupfs,
        &format!("llmslo-app-w-{me}"),
    );
    let (port_pod, port_cg) = pod_with_cgroup("k8sselp", CgroupDriver::Cgroupfs);
    // The fixture's vllm pod carries app.kubernetes.io/component=inference; sglang and web
    // do not. The LeaderWorkerSet pod of the fixture is not on this node here.
    let mut vars = fixture_vars(
        &node,
        &[
            ("VLLM", &labelled.cg),
            ("SGLANG", &port_cg),
            ("WEB", &web.cg),
        ],
    );
    vars.insert("UID_LWS", "00000000-0000-0000-0000-00000000dead".into());
    vars.insert("CID_LWS", "0".repeat(64));
    let api = ApiServer::start(fixture("pods.json", &vars));
    let yaml = format!(
        "discovery:\n  auto: false\n  interval_ms: 60000\n  select:\n    \
         - pod_labels: {{app.kubernetes.io/component: inference}}\n    - ports: [30000]\n\
         network:\n  enabled: false\n\
         kubernetes:\n  api_url: {}\n  node_name: {node}\n",
        api.url()
    );
    let agent = Agent::start_with_config(&yaml, &[]);
    let picked = wait_until(Duration::from_secs(10), || {
        targets(&agent)
            .iter()
            .any(|x| x["pod"] == "vllm-chat-7d9c5b8f4-x2x9q")
    });
    assert!(
        picked.is_some(),
        "the labelled pod picked: {:#?}",
        targets(&agent)
    );
    let t0 = Instant::now();
    let server = start_server_on(
        &port_pod,
        &port_cg,
        &format!("llmslo-app-p-{me}"),
        "k8sselp",
        30000,
    );
    let by_port = wait_until(Duration::from_secs(5), || {
        targets(&agent).iter().any(|x| x["pid"] == server.pid())
    });
    eprintln!(
        "port-selected pod: server start -> traced in {by_port:?} (discovery polls every 60 s)"
    );
    assert!(
        by_port.is_some_and(|d| d < Duration::from_secs(2)),
        "the pod listening on 30000 traced within 2 s of its start ({:?}): {:#?}",
        t0.elapsed(),
        targets(&agent)
    );
    port_pod
        .wait_for_port(30000, Duration::from_secs(10))
        .unwrap();
    let by_port_pod = TestPod {
        server: Some(server),
        cg: port_cg,
        pod: port_pod,
        port: 30000,
    };
    let t = targets(&agent);
    let reason = |uid: &str| {
        t.iter()
            .find(|x| x["pod_uid"] == uid)
            .map(|x| x["reason"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(
        reason(labelled.cg.pod_uid()).as_deref(),
        Some("select:pod_labels"),
        "{t:#?}"
    );
    assert_eq!(
        reason(by_port_pod.cg.pod_uid()).as_deref(),
        Some("select:port:30000"),
        "{t:#?}"
    );
    assert_eq!(
        reason(web.cg.pod_uid()),
        None,
        "the web pod is not picked: {t:#?}"
    );

    labelled.load(3);
    by_port_pod.load(3);
    web.load(3);
    let recs = agent.wait_requests(Duration::from_secs(10), |r| {
        records_to(r, &labelled.dst()).len() >= 3 && records_to(r, &by_port_pod.dst()).len() >= 3
    });
    let a = records_to(&recs, &labelled.dst());
    let p = records_to(&recs, &by_port_pod.dst());
    assert_eq!(
        (a.len(), p.len()),
        (3, 3),
        "every request of both picked pods; theirs: {:#?}; the agent's counters:\n{}",
        a.iter().chain(&p).collect::<Vec<_>>(),
        agent
            .get("/metrics")
            .lines()
            .filter(|l| l.starts_with("llmslo_agent_") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(a[0]["pod"], "vllm-chat-7d9c5b8f4-x2x9q");
    assert_eq!(p[0]["pod"], "sglang-0");
    assert!(
        records_to(&recs, &web.dst()).is_empty(),
        "the web pod's requests are not traced"
    );
}

/// A server that loads its model before it listens (5 s here, minutes for vLLM): found at its
/// exec by its command line, its listening socket goes into the maps at its `listen()` (the
/// `inet_sock_set_state` tracepoint wakes discovery), not at the next poll (60 s here; the
/// rescans that follow the exec end 4.5 s after it). Its requests are traced.
#[test]
fn a_server_that_listens_late_is_traced_from_its_listen() {
    if !kernel_tests_enabled("a_server_that_listens_late_is_traced_from_its_listen") {
        return;
    }
    const DELAY_MS: u64 = 5000;
    let me = std::process::id();
    let sig = format!("llmslo-late-{me}");
    let (pod, cg) = pod_with_cgroup("k8slate", CgroupDriver::Systemd);
    let agent = Agent::start_with_config(
        &format!(
            "discovery:\n  extra_signatures: [{sig}]\n  interval_ms: 60000\n\
             network:\n  enabled: false\n"
        ),
        &[],
    );
    let wakes = |agent: &Agent| {
        metric(
            &agent.get("/metrics"),
            "llmslo_agent_discovery_wakeups_total",
        )
        .unwrap_or(0.0)
    };
    let wakes0 = wakes(&agent);
    let mut cmd = Command::new(common::agent_bin());
    cmd.arg0(&sig)
        .arg("synth-server")
        .args(["--listen", &format!("0.0.0.0:{PORT}"), "--decode-ms", "1"])
        .args(["--startup-delay-ms", &DELAY_MS.to_string()])
        .env("HOSTNAME", "k8slate")
        .stdout(std::process::Stdio::null());
    let t0 = Instant::now();
    let server = pod.spawn(cmd, Some(&cg)).expect("spawning the server");
    let pid = server.pid();
    let listed = |ports: bool| {
        targets(&agent).into_iter().find(|x| {
            x["pid"] == pid
                && (!ports
                    || x["listening"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p == PORT)))
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || listed(false).is_some()).is_some(),
        "found at its exec: {:#?}",
        targets(&agent)
    );
    assert!(
        listed(true).is_none(),
        "no listening port before the server binds it"
    );
    pod.wait_for_port(PORT, Duration::from_secs(DELAY_MS / 1000 + 10))
        .expect("server listening");
    let listening = t0.elapsed();
    let since_listen = Instant::now();
    let found = wait_until(Duration::from_secs(10), || listed(true).is_some());
    eprintln!(
        "exec -> listening {listening:?}; listening -> its port in the targets {found:?}; \
         discovery wake-ups {}",
        wakes(&agent) - wakes0
    );
    assert!(
        listening >= Duration::from_millis(DELAY_MS),
        "the server listened after its delay"
    );
    assert!(
        found.is_some_and(|d| d < Duration::from_secs(2)),
        "its port traced at its listen, not at the next poll ({:?} after): {:#?}",
        since_listen.elapsed(),
        targets(&agent)
    );
    assert!(
        wakes(&agent) - wakes0 >= 2.0,
        "woken by the exec and by the listen"
    );
    let mut cfg = LoadConfig::new(pod.addr(PORT));
    cfg.connections = 1;
    cfg.requests = 3;
    cfg.max_tokens = Some(4);
    let res = testbed::loadgen::run(&cfg).expect("load");
    assert!(res.iter().all(|c| c.status == 200), "requests answered");
    let dst = format!("{}:{PORT}", pod.ip());
    let recs = agent.wait_requests(Duration::from_secs(10), |r| records_to(r, &dst).len() >= 3);
    let recs = records_to(&recs, &dst);
    assert_eq!(recs.len(), 3, "the three requests traced");
    assert!(recs.iter().all(|r| r["pid"] == pid), "{recs:#?}");
    drop(server);
}
