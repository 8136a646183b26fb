//! Bounded memory under pod churn (issue: reliability): 10,000 distinct pods go through the
//! running agent. Each pod is what the agent sees of a real one: a kubelet-style cgroup (pod uid
//! and container id in its path, systemd and cgroupfs drivers in turn), a Pod object in the
//! (recorded-format) Kubernetes API, and an inference server process started in that cgroup,
//! found by its command line at its exec. Requests are attributed per record from the server's
//! pid/cgroup through discovery's snapshot to the pod the API names. Then the pod is deleted:
//! DELETED in the API, its server killed, its cgroup removed.
//!
//! To fit 2 CPUs the pods come in batches of 100 (all servers of a batch at once, exec'd from two
//! threads) and share one network namespace (made by the test; each server on its own port): a
//! namespace per pod would add nothing the agent looks at for labels (`network.enabled: false`)
//! and cost more than the rest of a pod together. 10,000 pods take ~200 s here;
//! `LLMSLO_CHURN_PODS` (and `LLMSLO_CHURN_BATCH`) change the numbers for a quicker look.
//!
//! Asserted all along: request label sets never exceed `max_label_sets` (200), overflow is
//! counted (`llmslo_agent_label_set_overflow_total`, the `other` set), no series of any family of
//! a pod deleted 60 s ago or more, every request attributed to its own pod; at the end: RSS and
//! fds as after the first 2,000 pods (within a margin; the threads' `schedstat` files the
//! run-queue counters keep open counted apart: at most 512, none left once the last pod is
//! gone), /readyz, the last pods' series exact,
//! then gone within 60 s. `discovery.forget_after_s` is 5 here (30 by default) so that series
//! turn over within the run.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::{fds_apart, http_get, kernel_tests_enabled, proc_status, Agent, Fds};
use serde_json::{json, Value};
use testbed::{CgroupDriver, LoadConfig, Pod, PodCgroup, PodProcess};

const CAP: usize = 200;
const FORGET_S: u64 = 5;
/// Requests per pod (one keep-alive connection).
const REQS: usize = 2;
const BOUND: Duration = Duration::from_secs(60);
const BASE_PORT: u16 = 20000;
/// Ports are reused round-robin; more than any batch keeps alive.
const PORTS: usize = 4000;
const NAMESPACES: [&str; 2] = ["churn-a", "churn-b"];

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One pod: its server dies before its cgroup goes (field order is drop order).
struct ChurnPod {
    server: PodProcess,
    cg: PodCgroup,
    name: String,
    namespace: &'static str,
    port: u16,
}

/// The Pod object as the API serves it (the fields the agent reads, as in the fixtures).
fn pod_object(
    name: &str,
    namespace: &str,
    cg: &PodCgroup,
    port: u16,
    node: &str,
    rv: u64,
) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": cg.pod_uid(),
            "resourceVersion": rv.to_string(),
            "labels": {"app.kubernetes.io/name": "churn"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "churn-7d9c5b8f4",
                "uid": "6b1e2c0d-93a4-4f5b-8c7d-2e1f0a9b8c7d", "controller": true
            }]
        },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "server",
                "image": "synth:1",
                "ports": [{"containerPort": port, "protocol": "TCP"}]
            }]
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": "server",
                "image": "synth:1",
                "imageID": "synth@sha256:0",
                "restartCount": 0,
                "ready": true,
                "containerID": format!("containerd://{}", cg.container_id()),
                "state": {"running": {"startedAt": "2026-11-29T08:00:00Z"}}
            }]
        }
    })
}

/// The fake API and its resourceVersion.
struct Api {
    server: ApiServer,
    rv: u64,
    node: String,
}

impl Api {
    fn push_pod(&mut self, kind: &str, name: &str, namespace: &str, cg: &PodCgroup, port: u16) {
        self.rv += 1;
        let obj = pod_object(name, namespace, cg, port, &self.node, self.rv);
        self.server.push(&json!({"type": kind, "object": obj}));
    }

    fn push(&mut self, kind: &str, p: &ChurnPod) {
        self.push_pod(kind, &p.name, p.namespace, &p.cg, p.port);
    }
}

/// What the test tracks across batches.
#[derive(Default)]
struct Tally {
    pods: usize,
    requests: usize,
    /// Deleted pods (name -> when), kept to check their series are gone.
    deleted: HashMap<String, Instant>,
    /// The longest a deleted pod's series were still seen, and how many scrapes looked.
    max_lag: Duration,
    scrapes: usize,
    max_sets: usize,
    overflowed: f64,
}

/// Distinct request label sets (the `llmslo_requests_total` series without `status_class`),
/// the overflow set apart.
fn request_label_sets(m: &str) -> (BTreeSet<String>, bool) {
    let mut sets = BTreeSet::new();
    let mut other = false;
    for l in m.lines() {
        let Some(rest) = l.strip_prefix("llmslo_requests_total{") else {
            continue;
        };
        let labels = rest.split('}').next().unwrap_or("");
        let set: Vec<&str> = labels
            .split(',')
            .filter(|kv| !kv.starts_with("status_class="))
            .collect();
        if labels.contains("pod=\"other\"") {
            other = true;
        } else {
            sets.insert(set.join(","));
        }
    }
    (sets, other)
}

/// Pods named in any series of any family.
fn pods_in(m: &str) -> BTreeSet<String> {
    m.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let at = l.find("pod=\"churn-")? + 5;
            let end = l[at..].find('"')?;
            Some(l[at..at + end].to_string())
        })
        .collect()
}

/// One scrape: the cap holds, and no pod deleted `BOUND` ago or more has a series left.
fn check_metrics(agent: &Agent, t: &mut Tally) -> String {
    let m = agent.get("/metrics");
    let now = Instant::now();
    let (sets, _) = request_label_sets(&m);
    let gauge = common::metric(&m, "llmslo_agent_label_sets").expect("label_sets gauge");
    assert!(
        sets.len() <= CAP && gauge <= CAP as f64,
        "{} request label sets (gauge {gauge}) over the cap {CAP}",
        sets.len()
    );
    t.max_sets = t.max_sets.max(sets.len());
    for pod in pods_in(&m) {
        if let Some(at) = t.deleted.get(&pod) {
            let lag = now.duration_since(*at);
            t.max_lag = t.max_lag.max(lag);
            assert!(
                lag < BOUND,
                "{pod} deleted {lag:?} ago still has series: {:?}",
                m.lines()
                    .filter(|l| l.contains(&format!("pod=\"{pod}\"")))
                    .take(3)
                    .collect::<Vec<_>>()
            );
        }
    }
    t.overflowed =
        common::metric(&m, "llmslo_agent_label_set_overflow_total").expect("overflow counter");
    t.scrapes += 1;
    m
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// A pod before its server starts.
struct NewPod {
    cg: PodCgroup,
    name: String,
    namespace: &'static str,
    port: u16,
}

/// Starts `n` pods: cgroup and Pod object (ADDED) first, as the kubelet has them before the
/// container starts, then the servers exec'd in their cgroups (from two threads: the exec of the
/// test build of the agent binary is most of a pod's cost).
fn start_pods(n: usize, net: &Pod, api: &mut Api, sig: &str, t: &mut Tally) -> Vec<ChurnPod> {
    let mut new = Vec::with_capacity(n);
    for _ in 0..n {
        let i = t.pods;
        t.pods += 1;
        let driver = if i.is_multiple_of(2) {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        };
        let p = NewPod {
            cg: PodCgroup::create(driver, "burstable").expect("pod cgroup"),
            name: format!("churn-{i}"),
            namespace: NAMESPACES[i % NAMESPACES.len()],
            port: BASE_PORT + (i % PORTS) as u16,
        };
        api.push_pod("ADDED", &p.name, p.namespace, &p.cg, p.port);
        new.push(p);
    }
    let spawn = |p: NewPod| {
        let mut cmd = Command::new(common::agent_bin());
        cmd.arg0(sig)
            .arg("synth-server")
            .args(["--listen", &format!("0.0.0.0:{}", p.port)])
            .args(["--decode-ms", "0", "--workers", "1", "--tokens", "2"])
            .env("HOSTNAME", &p.name)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let server = net.spawn(cmd, Some(&p.cg)).expect("spawning a server");
        ChurnPod {
            server,
            cg: p.cg,
            name: p.name,
            namespace: p.namespace,
            port: p.port,
        }
    };
    let half = new.split_off(n / 2);
    let pods: Vec<ChurnPod> = std::thread::scope(|s| {
        let h = s.spawn(|| half.into_iter().map(spawn).collect::<Vec<_>>());
        let mut mine: Vec<ChurnPod> = new.into_iter().map(spawn).collect();
        mine.extend(h.join().unwrap());
        mine
    });
    for p in &pods {
        net.wait_for_port(p.port, Duration::from_secs(20))
            .expect("server listening");
    }
    pods
}

/// Waits until the agent traces every server of `pods` under its API name.
fn wait_traced(agent: &Agent, pods: &[ChurnPod]) -> Duration {
    let want: BTreeMap<u32, &str> = pods
        .iter()
        .map(|p| (p.server.pid(), p.name.as_str()))
        .collect();
    let mut missing = want.len();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let t = agent.get_json("/api/v1/targets");
        let named: BTreeSet<u32> = t["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["labels_from"] == "kubernetes")
            .filter_map(|x| {
                let pid = u32::try_from(x["pid"].as_u64()?).ok()?;
                (want.get(&pid).copied() == x["pod"].as_str()).then_some(pid)
            })
            .collect();
        missing = want.len() - named.len();
        if missing == 0 {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{missing} of {} servers not traced under their pod's name in 30 s",
        want.len()
    );
}

/// `REQS` requests to each pod's server, four pods at a time.
fn load(net: &Pod, pods: &[ChurnPod]) -> usize {
    let ports: Vec<u16> = pods.iter().map(|p| p.port).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = ports
            .chunks(ports.len().div_ceil(4).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    let mut ok = 0;
                    for &port in chunk {
                        let mut cfg = LoadConfig::new(net.addr(port));
                        cfg.requests = REQS;
                        cfg.max_tokens = Some(2);
                        cfg.prompt_bytes = vec![64];
                        cfg.deadline = Duration::from_secs(20);
                        let res = testbed::loadgen::run(&cfg).expect("load");
                        ok += res.iter().filter(|c| c.status == 200).count();
                    }
                    ok
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Waits until the agent holds `REQS` records for every pod of the batch, each labelled with
/// that pod (by destination port), and checks them.
fn check_records(agent: &Agent, net: &Pod, pods: &[ChurnPod]) {
    let by_dst: HashMap<String, (&str, &str)> = pods
        .iter()
        .map(|p| (net.addr(p.port).to_string(), (p.name.as_str(), p.namespace)))
        .collect();
    let want = pods.len() * REQS;
    let path = format!("/api/v1/requests?limit={}", want + 200);
    let mut mine: Vec<Value> = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        let v = agent.get_json(&path);
        mine = v["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["dst"].as_str().is_some_and(|d| by_dst.contains_key(d)))
            .cloned()
            .collect();
        if mine.len() >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mine.len(), want, "every request of the batch recorded");
    let mut per_pod: HashMap<&str, usize> = HashMap::new();
    for r in &mine {
        let (pod, ns) = by_dst[r["dst"].as_str().unwrap()];
        assert_eq!(r["pod"], pod, "attributed to the pod it went to: {r}");
        assert_eq!(r["namespace"], ns, "{r}");
        assert_eq!(r["container"], "server", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        *per_pod.entry(pod).or_default() += 1;
    }
    assert!(per_pod.values().all(|&n| n == REQS), "{REQS} per pod");
}

/// Deletes the pods: DELETED in the API, servers killed, cgroups removed.
fn delete_pods(pods: Vec<ChurnPod>, api: &mut Api, t: &mut Tally) {
    let now = Instant::now();
    for p in &pods {
        api.push("DELETED", p);
        t.deleted.insert(p.name.clone(), now);
    }
    drop(pods);
}

#[test]
fn ten_thousand_pods_churned_keep_series_and_memory_bounded() {
    if !kernel_tests_enabled("ten_thousand_pods_churned_keep_series_and_memory_bounded") {
        return;
    }
    let total = env_usize("LLMSLO_CHURN_PODS", 10_000);
    let batch = env_usize("LLMSLO_CHURN_BATCH", 100);
    let first = CAP + 50;
    let last = 50;
    assert!(total >= first + batch + last && batch <= PORTS / 4);
    let t_start = Instant::now();
    let me = std::process::id();
    let sig = format!("llmslo-churn-infer-{me}");
    let node = format!("llmslo-node-{me}");
    let net = Pod::create("podchurn").expect("the pods' network namespace");
    let list = json!({"kind": "PodList", "apiVersion": "v1",
                      "metadata": {"resourceVersion": "1"}, "items": []});
    let mut api = Api {
        server: ApiServer::start(list),
        rv: 1,
        node: node.clone(),
    };
    let yaml = format!(
        "max_label_sets: {CAP}\nrecent_requests: 2000\n\
         discovery:\n  extra_signatures: [{sig}]\n  forget_after_s: {FORGET_S}\n\
         network:\n  enabled: false\n\
         kubernetes:\n  api_url: {}\n  node_name: {node}\n",
        api.server.url()
    );
    let agent = Agent::start_with_config(&yaml, &[]);
    let apid = agent.child.id();
    let (rss0, fds0) = (proc_status(apid, "VmRSS:"), fds_apart(apid));
    let mut t = Tally::default();

    // First, more pods at once than the cap: 50 pods' requests overflow to `other`, counted.
    let pods = start_pods(first, &net, &mut api, &sig, &mut t);
    wait_traced(&agent, &pods);
    t.requests += load(&net, &pods);
    check_records(&agent, &net, &pods);
    let m = check_metrics(&agent, &mut t);
    let (sets, other) = request_label_sets(&m);
    assert_eq!(sets.len(), CAP, "the first {CAP} pods have their series");
    assert!(other, "the rest went to the `other` set");
    let other_reqs: f64 = m
        .lines()
        .filter(|l| l.starts_with("llmslo_requests_total{") && l.contains("pod=\"other\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        (other_reqs, t.overflowed),
        (((first - CAP) * REQS) as f64, ((first - CAP) * REQS) as f64),
        "each overflowed request counted once, in `other` and in the overflow counter"
    );
    delete_pods(pods, &mut api, &mut t);

    // Then batches until `total - last` pods have gone through.
    // The baseline: after 2,000 of 10,000 pods (a fifth of a shorter run). The heap reaches its
    // working set within the first ~2,000: one CI run had 55.0 MB after 1,050 pods, then
    // 63.4-63.5 MB from 2,050 to 9,950 (flat), and failed against the 1,000-pod baseline; 8,000
    // pods after the baseline still show a leak of 1 KiB a pod.
    let baseline_at = (total / 5).max(first + batch);
    let mut at_baseline = None;
    let mut traced_max = Duration::ZERO;
    let mut samples = Vec::new();
    let mut phases = [Duration::ZERO; 6];
    // The agent's schedstat files counted every 20 ms as well (a reading of the run-queue
    // counters, every 2 s, lasts a few ms: the batch samples alone would seldom fall in one).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut most, mut polls) = (None::<Fds>, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let f = fds_apart(apid);
                polls += 1;
                if most.is_none_or(|m| f.schedstat + f.ended > m.schedstat + m.ended) {
                    most = Some(f);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (most, polls)
        })
    };
    while t.pods < total - last {
        let n = batch.min(total - last - t.pods);
        let mut lap = Instant::now();
        let mut phase = |i: usize| {
            phases[i] += lap.elapsed();
            lap = Instant::now();
        };
        let pods = start_pods(n, &net, &mut api, &sig, &mut t);
        phase(0);
        traced_max = traced_max.max(wait_traced(&agent, &pods));
        phase(1);
        t.requests += load(&net, &pods);
        phase(2);
        check_records(&agent, &net, &pods);
        phase(3);
        check_metrics(&agent, &mut t);
        phase(4);
        let sample = (t.pods, proc_status(apid, "VmRSS:"), fds_apart(apid));
        samples.push(sample);
        if at_baseline.is_none() && t.pods >= baseline_at {
            at_baseline = Some(sample);
        }
        delete_pods(pods, &mut api, &mut t);
        phase(5);
        if t.pods % 1000 < batch {
            eprintln!(
                "{} pods, {:.0?}: RSS {} kB, fds {:?}, max label sets {}, overflowed {}, \
                 longest a deleted pod's series were seen {:.1?}",
                sample.0,
                t_start.elapsed(),
                sample.1,
                sample.2,
                t.max_sets,
                t.overflowed,
                t.max_lag
            );
        }
    }
    let end_churn = *samples.last().expect("a batch ran");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most_held, polls) = poller.join().expect("the fd poller");
    eprintln!(
        "time in: starting pods {:.1?}, until traced {:.1?}, requests {:.1?}, records {:.1?}, \
         /metrics {:.1?}, deleting {:.1?}",
        phases[0], phases[1], phases[2], phases[3], phases[4], phases[5]
    );

    // The last pods get series of their own (the earlier ones have expired), exact.
    let drained = wait_until("every earlier pod's series expired", BOUND, || {
        pods_in(&check_metrics(&agent, &mut t)).is_empty()
    });
    let pods = start_pods(last, &net, &mut api, &sig, &mut t);
    wait_traced(&agent, &pods);
    t.requests += load(&net, &pods);
    check_records(&agent, &net, &pods);
    let m = check_metrics(&agent, &mut t);
    for p in &pods {
        let series = format!(
            "llmslo_requests_total{{namespace=\"{}\",pod=\"{}\",model=\"synth-llm\",\
             route=\"/v1/chat/completions\",container=\"server\",node=\"{node}\",\
             status_class=\"2xx\"}}",
            p.namespace, p.name
        );
        assert_eq!(
            common::metric(&m, &series),
            Some(REQS as f64),
            "{series} in /metrics"
        );
    }
    let (code, body) = http_get(agent.addr, "/readyz").expect("/readyz");
    assert_eq!(code, 200, "/readyz: {body}");
    let t_del = Instant::now();
    delete_pods(pods, &mut api, &mut t);
    let gone = wait_until("the last pods' series gone", BOUND, || {
        pods_in(&check_metrics(&agent, &mut t)).is_empty()
    });
    // The run-queue counters keep live target threads' files open: those of ended threads are
    // closed at their next reading (every 2 s).
    let closed = wait_until("the ended threads' schedstat files closed", BOUND, || {
        fds_apart(apid).ended == 0
    });
    let (rss_end, fds_end) = (proc_status(apid, "VmRSS:"), fds_apart(apid));
    let m = check_metrics(&agent, &mut t);
    assert_eq!(common::metric(&m, "llmslo_agent_label_sets"), Some(0.0));
    assert_eq!(t.requests, t.pods * REQS, "every request answered");

    let (n_base, rss_base, fds_base) = at_baseline.expect("the baseline was taken");
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "{} pods churned ({} requests) in {:.0?}; request label sets at most {} (cap {CAP}), \
         {} requests overflowed; deleted pods' series seen at most {:.1?} after the deletion \
         over {} scrapes (forget_after_s {FORGET_S}); the last pods' series gone {:.1?} after \
         their deletion ({:.1?} after t_del); servers traced at most {traced_max:.1?} after they \
         listened; RSS {rss0} kB at start, {rss_base} kB after {n_base} pods, {} kB after {} pods \
         (max {rss_max}), {rss_end} kB at the end; fds {fds0:?} -> {fds_base:?} -> {:?} -> \
         {fds_end:?} (the ended threads' files closed {closed:.1?} after the series were gone); \
         all earlier series expired {drained:.1?} after the churn; schedstat files held at most \
         {most_held:?} over {polls} polls",
        t.pods,
        t.requests,
        t_start.elapsed(),
        t.max_sets,
        t.overflowed,
        t.max_lag,
        t.scrapes,
        gone,
        t_del.elapsed(),
        end_churn.1,
        end_churn.0,
        end_churn.2,
    );
    assert!(
        end_churn.1 <= rss_base + 8 * 1024,
        "RSS grew from {rss_base} kB after {n_base} pods to {} kB after {}",
        end_churn.1,
        end_churn.0
    );
    assert!(
        rss_end <= rss_base + 8 * 1024,
        "RSS {rss_end} kB at the end, {rss_base} kB after {n_base} pods"
    );
    // Kept schedstat files follow the live targets' threads (bounded): every other fd must
    // come back to what it was.
    let (base, churned) = (fds_base.other, end_churn.2.other);
    assert!(
        churned.abs_diff(base) <= 4 && fds_end.other.abs_diff(base) <= 4,
        "fds other than schedstat {base} after {n_base} pods, {churned} after {}, {} at the end",
        end_churn.0,
        fds_end.other
    );
    assert!(
        samples.iter().all(|s| s.2.schedstat + s.2.ended <= 512)
            && most_held.is_some_and(|f| f.schedstat + f.ended <= 512)
            && fds_end.schedstat == 0,
        "kept schedstat files (live threads' and ended ones'): at most 512, none at the end with \
         no target left: {:?} at most (after that many pods, those fds), {most_held:?} at most \
         polled, {fds_end:?} at the end",
        samples
            .iter()
            .max_by_key(|s| s.2.schedstat + s.2.ended)
            .map(|s| (s.0, s.2))
    );
}
