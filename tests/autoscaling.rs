//! The autoscaling examples in deploy/autoscaling (KEDA ScaledObject, Prometheus Adapter rules,
//! HPA): they parse, agree with each other, their PromQL passes `promtool check rules` and names
//! only metrics the agent's exposition code writes; with root, a real Prometheus scraping the
//! agent on a testbed pod evaluates every query, and the values follow the server's queueing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::node::{server_pod, PORT};
use common::prom::{balanced, exposition_names, judge, metric_names, Prometheus};
use common::{kernel_tests_enabled, Agent};
use llm_slo_agent::record::{RequestRecord, Ts};
use llm_slo_agent::stats::{Aggregator, AggregatorConfig, Labels};
use serde_yaml::Value;
use testbed::{CgroupDriver, LoadConfig};

/// The model, namespace and Prometheus placeholders of the examples.
const MODEL: &str = "llama-3-8b";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/autoscaling")
}

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(file))
        .unwrap_or_else(|e| panic!("deploy/autoscaling/{file}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("deploy/autoscaling/{file}: {e}"))
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v:?}"))
}

/// One PromQL query of the examples: where it is, and the expr as Prometheus gets it.
struct Query {
    source: String,
    expr: String,
}

/// The KEDA triggers' queries, and the adapter's external rules rendered the way the adapter
/// renders them for the HPA's metrics (`<<.Series>>`, `<<.LabelMatchers>>` from the HPA's
/// selector, `<<.GroupBy>>`).
fn queries() -> Vec<Query> {
    let mut out = Vec::new();
    let keda = yaml("keda-scaledobject.yaml");
    assert_eq!(str_at(&keda, "apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(str_at(&keda, "kind"), "ScaledObject");
    assert_eq!(str_at(&keda, "spec.scaleTargetRef.kind"), "Deployment");
    let triggers = get(&keda, "spec.triggers").as_sequence().expect("triggers");
    assert!(triggers.len() >= 2, "TTFT and queue-pressure triggers");
    for t in triggers {
        assert_eq!(str_at(t, "type"), "prometheus");
        assert!(str_at(t, "metadata.serverAddress").starts_with("http"));
        let th: f64 = str_at(t, "metadata.threshold").parse().expect("threshold");
        assert!(th > 0.0);
        assert!(matches!(str_at(t, "metricType"), "Value" | "AverageValue"));
        out.push(Query {
            source: format!("keda trigger {}", str_at(t, "name")),
            expr: str_at(t, "metadata.query").to_string(),
        });
    }

    let adapter = yaml("prometheus-adapter-values.yaml");
    let hpa = yaml("hpa.yaml");
    assert_eq!(str_at(&hpa, "apiVersion"), "autoscaling/v2");
    assert_eq!(str_at(&hpa, "kind"), "HorizontalPodAutoscaler");
    assert_eq!(
        get(&hpa, "spec.scaleTargetRef"),
        get(&keda, "spec.scaleTargetRef"),
        "both examples scale the same Deployment"
    );
    // The HPA's metrics: name → label matchers from its selector.
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for m in get(&hpa, "spec.metrics").as_sequence().expect("metrics") {
        assert_eq!(str_at(m, "type"), "External");
        let labels = get(m, "external.metric.selector.matchLabels")
            .as_mapping()
            .expect("matchLabels");
        let matchers: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{}=\"{}\"", k.as_str().unwrap(), v.as_str().unwrap()))
            .collect();
        wanted.insert(
            str_at(m, "external.metric.name").to_string(),
            matchers.join(","),
        );
    }
    let rules = get(&adapter, "rules.external")
        .as_sequence()
        .expect("rules.external");
    let mut named = BTreeSet::new();
    for r in rules {
        let name = str_at(r, "name.as").to_string();
        let series_query = str_at(r, "seriesQuery");
        let series: Vec<String> = metric_names(series_query).into_iter().collect();
        assert_eq!(series.len(), 1, "{name}: one series in {series_query}");
        let matchers = wanted
            .get(&name)
            .unwrap_or_else(|| panic!("adapter rule {name} is used by no HPA metric"));
        let expr = str_at(r, "metricsQuery")
            .replace("<<.Series>>", &series[0])
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "");
        out.push(Query {
            source: format!("adapter seriesQuery {name}"),
            expr: series_query.to_string(),
        });
        out.push(Query {
            source: format!("adapter metricsQuery {name}"),
            expr,
        });
        named.insert(name);
    }
    for m in wanted.keys() {
        assert!(named.contains(m), "HPA metric {m} has no adapter rule");
    }
    for q in &out {
        assert!(
            !q.expr.contains("<<"),
            "{}: unrendered template: {}",
            q.source,
            q.expr
        );
        assert!(balanced(&q.expr), "{}: unbalanced: {}", q.source, q.expr);
    }
    out
}

/// Sample names the agent's request metrics code writes for a streamed request.
fn exported_by_the_agent() -> BTreeSet<String> {
    let mut r = RequestRecord {
        method: Some("POST".into()),
        path: Some("/v1/chat/completions".into()),
        model: Some(MODEL.into()),
        status: Some(200),
        streaming: true,
        token_ns: vec![40_000_000, 41_000_000].into(),
        ..Default::default()
    };
    for (t, v) in [
        (Ts::SockQueued, 1_000_000),
        (Ts::ReadFirst, 1_100_000),
        (Ts::ReadDone, 1_200_000),
        (Ts::Token1, 40_000_000),
        (Ts::RespLast, 42_000_000),
    ] {
        r.timestamps.set(t, v);
    }
    r.finish(false);
    let mut agg = Aggregator::new(AggregatorConfig::default());
    let labels = Labels {
        namespace: String::new(),
        pod: "p".into(),
        model: MODEL.into(),
        route: "/v1/chat/completions".into(),
        ..Default::default()
    };
    agg.record(&r, labels, 1_000);
    let mut out = String::new();
    agg.render(1_000, &mut out);
    exposition_names(&out)
}

#[test]
fn examples_agree_and_their_promql_passes_promtool() {
    let queries = queries();
    let exported = exported_by_the_agent();
    for q in &queries {
        let names = metric_names(&q.expr);
        assert!(!names.is_empty(), "{}: selects no metric", q.source);
        for m in names {
            assert!(
                exported.contains(&m),
                "{}: {m} is not a metric the agent exports",
                q.source
            );
        }
    }
    // promtool parses each expr as a recording rule.
    let mut rules = String::from("groups:\n  - name: autoscaling-examples\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: llmslo:autoscaling_check_{i}\n        expr: {}\n",
            serde_json::to_string(&q.expr).unwrap()
        ));
    }
    let path = std::env::temp_dir().join(format!("llmslo-autoscaling-{}.yaml", std::process::id()));
    std::fs::write(&path, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool missing: make test installs Debian's prometheus package");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{} rules found", queries.len())),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The single value of an instant query (a one-element vector).
fn value(prom: &Prometheus, expr: &str) -> f64 {
    let v = prom.query(expr);
    let (ok, n, msg) = judge(&v);
    assert!(ok && n == 1, "{expr}: {n} series, {msg}: {v}");
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{expr}: {v}"))
}

#[test]
fn autoscaling_queries_follow_the_servers_queueing_in_a_real_prometheus() {
    if !kernel_tests_enabled("autoscaling_queries_follow_the_servers_queueing_in_a_real_prometheus")
    {
        return;
    }
    let queries = queries();
    // Every request queues 30 ms before its first token: TTFT in the (25 ms, 50 ms] bucket,
    // below the examples' 0.5 s queue threshold, above a 25 ms one.
    let sp = server_pod(
        "autoscale",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--queue-delay-ms", "30", "--decode-ms", "1"],
    );
    let agent = Agent::start(&["--no-auto", "--target-cgroup", sp.cg.cgroup_path()]);
    let prom = Prometheus::start(agent.addr);
    prom.wait_scraped(Duration::from_secs(30));
    let t0 = Instant::now();
    for round in 0..3u64 {
        let mut load = LoadConfig::new(sp.pod.addr(PORT));
        load.connections = 2;
        load.requests = 60;
        load.rate = Some(30.0);
        load.seed = 7 + round;
        load.request_id_base = round * 1000;
        load.max_tokens = Some(4);
        load.streaming_ratio = 1.0;
        testbed::loadgen::run(&load).unwrap();
    }
    agent.wait_requests(Duration::from_secs(10), |r| r.len() >= 180);
    std::thread::sleep(Duration::from_secs(3));
    prom.wait_scraped(Duration::from_secs(10));
    prom.wait_caught_up(&agent.get("/metrics"), Duration::from_secs(10));
    eprintln!("load and scrapes took {:.1?}", t0.elapsed());

    let exported = exposition_names(&agent.get("/metrics"));
    for q in &queries {
        for m in metric_names(&q.expr) {
            assert!(
                exported.contains(&m),
                "{}: {m} not in the agent's /metrics",
                q.source
            );
        }
        // The examples' model is the testbed's.
        let model = format!("model=\"{MODEL}\"");
        let expr = q.expr.replace(&model, "model=\"synth-llm\"");
        if q.source.contains("seriesQuery") {
            let (ok, n, msg) = judge(&prom.query(&expr));
            assert!(ok, "{}: {n} series, {msg}: {expr}", q.source);
            continue;
        }
        assert_ne!(expr, q.expr, "{}: selects the example model", q.source);
        let v = value(&prom, &expr);
        eprintln!("  {:<45} {v:.4}", q.source);
        if q.source.contains("ttft") {
            assert!(
                v > 0.025 && v <= 0.05,
                "{}: TTFT p95 {v} s, queue 30 ms",
                q.source
            );
        } else {
            assert_eq!(v, 0.0, "{}: nothing waits 0.5 s", q.source);
            // Below the queueing the server does, every request counts as pressure.
            let low = expr.replace("le=\"0.5\"", "le=\"0.025\"");
            assert_ne!(low, expr, "{}: threshold le=\"0.5\"", q.source);
            let v = value(&prom, &low);
            assert!(v > 0.9, "{}: pressure at 25 ms is {v}, want ~1", q.source);
        }
        // Without traffic of the model, 0 rather than NaN or nothing.
        let idle = q.expr.replace(&model, "model=\"not-served\"");
        assert_eq!(value(&prom, &idle), 0.0, "{}: no traffic", q.source);
    }
}
