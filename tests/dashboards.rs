//! The Grafana dashboards in deploy/grafana (issue: dashboards).
//!
//! Without root: every dashboard parses and is well formed (unique panel ids, a `${datasource}`
//! Prometheus datasource on every panel and target, at least one PromQL expr per panel, every
//! `$variable` defined, units set).
//!
//! With root (else a loud skip, a failure under LLMSLO_REQUIRE_BPF=1): a testbed pod runs the
//! synthetic server, the agent traces it with SLOs configured and exports traces to an OTLP
//! sink (so the exporter's panels have data), and a real Prometheus server
//! (Debian's `prometheus`) scrapes the agent every second while the load generator drives a few
//! rounds of traffic. Then every metric name in every expr must be one the agent exports, and
//! every panel expr (and every template variable's query) of every dashboard is evaluated through
//! Prometheus' HTTP API and must succeed with a non-empty result.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::node::{server_pod, PORT};
use common::prom::{balanced, exposition_names, judge, metric_names, prometheus_bin, Prometheus};
use common::{kernel_tests_enabled, Agent};
use serde_json::Value;
use testbed::{CgroupDriver, LoadConfig, Route};

const DASHBOARDS: [&str; 5] = [
    "fleet-overview.json",
    "model-latency.json",
    "stage-breakdown.json",
    "slo.json",
    "agent-health.json",
];

/// Series Prometheus makes for every scrape target; dashboards may use them besides the agent's.
const PROMETHEUS_SYNTHETIC: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// Grafana's built-in interval variables, as the test substitutes them.
const BUILTINS: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "5m"),
];

struct Dashboard {
    file: String,
    json: Value,
}

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana")
}

fn load_dashboards() -> Vec<Dashboard> {
    let mut files: Vec<String> = std::fs::read_dir(grafana_dir())
        .expect("deploy/grafana")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(".json").then_some(name)
        })
        .collect();
    files.sort();
    for want in DASHBOARDS {
        assert!(
            files.iter().any(|f| f == want),
            "deploy/grafana/{want} missing"
        );
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(grafana_dir().join(&file)).unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("deploy/grafana/{file}: not JSON: {e}"));
            Dashboard { file, json }
        })
        .collect()
}

impl Dashboard {
    /// All panels, including those nested in collapsed rows.
    fn panels(&self) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in self.json["panels"].as_array().into_iter().flatten() {
            out.push(p);
            for inner in p["panels"].as_array().into_iter().flatten() {
                out.push(inner);
            }
        }
        out
    }

    /// Panels that query data (rows only group others).
    fn query_panels(&self) -> Vec<&Value> {
        self.panels()
            .into_iter()
            .filter(|p| p["type"] != "row")
            .collect()
    }

    fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .map(|l| l.iter().collect())
            .unwrap_or_default()
    }

    /// Names of the template variables other than the datasource one.
    fn query_variable_names(&self) -> Vec<String> {
        self.variables()
            .into_iter()
            .filter(|v| v["type"] != "datasource")
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// (panel title, refId, expr) of every target.
    fn exprs(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for p in self.query_panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    p["title"].as_str().unwrap_or("").to_string(),
                    t["refId"].as_str().unwrap_or("").to_string(),
                    t["expr"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }

    /// (variable, selector, label) of every `label_values(selector, label)` variable query.
    fn label_values_queries(&self) -> Vec<(String, String, String)> {
        self.variables()
            .into_iter()
            .filter(|v| v["type"] == "query")
            .map(|v| {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .or(v["definition"].as_str())
                    .unwrap_or_else(|| panic!("{}: variable without a query: {v}", self.file));
                let inner = q
                    .trim()
                    .strip_prefix("label_values(")
                    .and_then(|r| r.strip_suffix(')'))
                    .unwrap_or_else(|| panic!("{}: not a label_values() query: {q}", self.file));
                let (sel, label) = inner
                    .rsplit_once(',')
                    .unwrap_or_else(|| panic!("{}: label_values needs a selector: {q}", self.file));
                (
                    v["name"].as_str().unwrap().to_string(),
                    sel.trim().to_string(),
                    label.trim().to_string(),
                )
            })
            .collect()
    }

    /// The expr as Prometheus should see it: every variable as the "All" regex `.*`, and the
    /// interval built-ins as fixed durations.
    fn substitute(&self, expr: &str) -> String {
        let mut names = self.query_variable_names();
        // Longest first, so `$pod` does not eat the start of a `$pods`.
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        let mut e = expr.to_string();
        for (k, v) in BUILTINS {
            e = e.replace(&format!("${{{}}}", &k[1..]), v).replace(k, v);
        }
        for n in names {
            e = e
                .replace(&format!("${{{n}}}"), ".*")
                .replace(&format!("[[{n}]]"), ".*")
                .replace(&format!("${n}"), ".*");
        }
        e
    }
}

/// `$name` / `${name}` references in an expr, built-ins (`$__…`) excluded.
fn variable_refs(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let braced = b.get(i + 1) == Some(&b'{');
            let start = i + 1 + usize::from(braced);
            let mut j = start;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            let name = &expr[start..j];
            if !name.is_empty() && !name.starts_with("__") {
                out.insert(name.to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn is_our_datasource(v: &Value) -> bool {
    v["uid"] == "${datasource}" && v["type"] == "prometheus"
}

#[test]
fn dashboards_are_well_formed() {
    let dashboards = load_dashboards();
    let mut uids = BTreeSet::new();
    let mut n_panels = 0;
    let mut n_exprs = 0;
    for d in &dashboards {
        let f = &d.file;
        let j = &d.json;
        assert!(
            j["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{f}: title"
        );
        let uid = j["uid"].as_str().unwrap_or_else(|| panic!("{f}: uid"));
        assert!(
            uid.len() <= 40,
            "{f}: Grafana uids are at most 40 characters"
        );
        assert!(uids.insert(uid.to_string()), "{f}: uid {uid} used twice");
        let schema = j["schemaVersion"].as_u64().unwrap_or(0);
        assert!((36..=41).contains(&schema), "{f}: schemaVersion {schema}");
        assert!(
            j["id"].is_null(),
            "{f}: id must be null for import/provisioning"
        );

        let vars = d.variables();
        let ds: Vec<_> = vars.iter().filter(|v| v["type"] == "datasource").collect();
        assert_eq!(ds.len(), 1, "{f}: one datasource variable");
        assert_eq!(ds[0]["name"], "datasource", "{f}");
        assert_eq!(ds[0]["query"], "prometheus", "{f}");
        let var_names = d.query_variable_names();
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert!(
                is_our_datasource(&v["datasource"]),
                "{f}: variable {} must query ${{datasource}}",
                v["name"]
            );
        }
        // Variable queries may only refer to variables defined before them.
        for (i, (name, sel, _)) in d.label_values_queries().iter().enumerate() {
            for r in variable_refs(sel) {
                let pos = var_names.iter().position(|n| *n == r);
                assert!(
                    pos.is_some_and(|p| p < i),
                    "{f}: variable {name} uses ${r}, not defined before it"
                );
            }
        }
        let uses_request_metrics = d
            .exprs()
            .iter()
            .any(|(_, _, e)| e.contains("llmslo_requests_total") || e.contains("_seconds_bucket"));
        if uses_request_metrics {
            for v in ["namespace", "pod", "model"] {
                assert!(
                    var_names.iter().any(|n| n == v),
                    "{f}: request dashboards have a ${v} variable"
                );
            }
        }

        let mut ids = BTreeSet::new();
        let mut used_vars = BTreeSet::new();
        for (_, sel, _) in d.label_values_queries() {
            used_vars.extend(variable_refs(&sel));
        }
        for p in d.panels() {
            let title = p["title"].as_str().unwrap_or("?");
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{f}: panel {title:?} without a numeric id"));
            assert!(ids.insert(id), "{f}: panel id {id} used twice ({title:?})");
            let g = &p["gridPos"];
            for k in ["x", "y", "w", "h"] {
                assert!(g[k].is_u64(), "{f}: panel {title:?}: gridPos.{k}");
            }
            assert!(
                g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
                "{f}: panel {title:?} wider than the grid"
            );
            if p["type"] == "row" {
                continue;
            }
            n_panels += 1;
            assert!(
                !title.is_empty() && title != "?",
                "{f}: panel {id} has no title"
            );
            assert!(
                is_our_datasource(&p["datasource"]),
                "{f}: panel {title:?}: datasource must be the ${{datasource}} Prometheus variable, \
                 got {}",
                p["datasource"]
            );
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{f}: panel {title:?} has no targets");
            let mut refs = BTreeSet::new();
            for t in &targets {
                let r = t["refId"].as_str().unwrap_or("");
                assert!(
                    !r.is_empty() && refs.insert(r.to_string()),
                    "{f}: panel {title:?}: refIds must be set and unique"
                );
                assert!(
                    is_our_datasource(&t["datasource"]),
                    "{f}: panel {title:?} {r}: target datasource"
                );
                let expr = t["expr"].as_str().unwrap_or("");
                assert!(!expr.trim().is_empty(), "{f}: panel {title:?} {r}: no expr");
                assert!(
                    balanced(expr),
                    "{f}: panel {title:?} {r}: unbalanced: {expr}"
                );
                assert!(
                    !metric_names(expr).is_empty(),
                    "{f}: panel {title:?} {r}: selects no metric: {expr}"
                );
                // Multi-value and "All" variables expand to regexes: only `=~`/`!~` fit.
                for v in variable_refs(expr) {
                    assert!(
                        var_names.contains(&v),
                        "{f}: panel {title:?} {r}: ${v} is not a dashboard variable"
                    );
                    assert!(
                        expr.contains(&format!("=~\"${v}\""))
                            || expr.contains(&format!("!~\"${v}\"")),
                        "{f}: panel {title:?} {r}: use ${v} as a regex (label=~\"${v}\")"
                    );
                    used_vars.insert(v);
                }
                n_exprs += 1;
            }
            if p["type"] != "table" && p["type"] != "state-timeline" {
                assert!(
                    p["fieldConfig"]["defaults"]["unit"].is_string(),
                    "{f}: panel {title:?} has no unit"
                );
            }
            if p["type"] == "heatmap" {
                for t in &targets {
                    assert_eq!(
                        t["format"], "heatmap",
                        "{f}: heatmap {title:?} target format"
                    );
                    let e = t["expr"].as_str().unwrap();
                    assert!(
                        e.contains("_bucket") && e.contains("by (le)"),
                        "{f}: heatmap {title:?} wants bucket rates by le: {e}"
                    );
                }
            }
        }
        for v in &var_names {
            assert!(used_vars.contains(v), "{f}: variable ${v} is used nowhere");
        }
    }
    eprintln!(
        "{} dashboards, {n_panels} panels, {n_exprs} exprs well formed",
        dashboards.len()
    );
}

#[test]
fn metric_name_extraction() {
    let e = "sum by (stage) (rate(llmslo_stage_seconds_sum{namespace=~\"$namespace\",stage!~\"a|b\"}[$__rate_interval])) / ignoring (stage) group_left () sum(rate(llmslo_e2e_seconds_sum[5m])) or vector(0) * 1e3";
    assert_eq!(
        metric_names(e).into_iter().collect::<Vec<_>>(),
        ["llmslo_e2e_seconds_sum", "llmslo_stage_seconds_sum"]
    );
    assert_eq!(
        metric_names("count(up{job=~\".*llm\"} == 0) or vector(0)")
            .into_iter()
            .collect::<Vec<_>>(),
        ["up"]
    );
    assert_eq!(
        variable_refs("a{x=~\"$namespace\",y=~\"${pod}\"}[$__range]")
            .into_iter()
            .collect::<Vec<_>>(),
        ["namespace", "pod"]
    );
    assert!(balanced("sum(rate(a{b=\")\"}[1m]))"));
    assert!(!balanced("sum(rate(a[1m])"));
}

// ------------------------------------------------------------------ live check with Prometheus

/// Sum of an instant vector's values per label set without `stage`.
fn share_sums(v: &Value) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for s in v["data"]["result"].as_array().into_iter().flatten() {
        let mut m = s["metric"].as_object().cloned().unwrap_or_default();
        m.remove("stage");
        let val: f64 = s["value"][1]
            .as_str()
            .and_then(|x| x.parse().ok())
            .unwrap_or(f64::NAN);
        *out.entry(Value::Object(m).to_string()).or_insert(0.0) += val;
    }
    out
}

/// An OTLP/HTTP collector that accepts every export (an empty body is an empty
/// `ExportTraceServiceResponse`).
fn otlp_sink() -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|| async { ([("content-type", "application/x-protobuf")], "") }),
    );
    rt.spawn(async move { axum::serve(l, app).await });
    (addr, rt)
}

#[test]
fn every_panel_query_returns_data_from_a_real_prometheus() {
    if !kernel_tests_enabled("every_panel_query_returns_data_from_a_real_prometheus") {
        return;
    }
    let dashboards = load_dashboards();
    // Fail before the slow part when Prometheus is missing.
    let _ = prometheus_bin();

    let sp = server_pod(
        "dash",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        // 2 ms of queueing: TTFT always over the tight SLO's 1 ms, so its alerts fire.
        &["--queue-delay-ms", "2", "--decode-ms", "1"],
    );
    let (sink, _sink_rt) = otlp_sink();
    let agent = Agent::start_with_config(
        &format!(
            "slos:\n\
             - name: ttft-tight\n  objective: 0.99\n  window: 28d\n  selector: {{model: synth-llm}}\n  sli: {{type: latency, metric: ttft, threshold_ms: 1}}\n\
             - name: ttft-loose\n  objective: 0.99\n  window: 28d\n  sli: {{type: latency, metric: ttft, threshold_ms: 500}}\n\
             otlp: {{enabled: true, endpoint: 'http://{sink}', sample_ratio: 0.1}}\n"
        ),
        &["--no-auto", "--target-cgroup", sp.cg.cgroup_path()],
    );
    let prom = Prometheus::start(agent.addr);
    prom.wait_scraped(Duration::from_secs(30));

    // ~15 s of traffic in rounds: two models, both routes, streaming and not, a few aborts.
    let t0 = Instant::now();
    let mut sent = 0;
    for round in 0..5u64 {
        let mut load = LoadConfig::new(sp.pod.addr(PORT));
        load.connections = 4;
        load.requests = 90;
        load.rate = Some(30.0);
        load.seed = 100 + round;
        load.request_id_base = round * 1000;
        load.max_tokens = Some(16);
        load.streaming_ratio = 0.8;
        load.model = if round % 2 == 0 {
            "synth-llm"
        } else {
            "synth-llm-small"
        }
        .into();
        load.route = if round % 3 == 2 {
            Route::Completions
        } else {
            Route::Chat
        };
        if round == 3 {
            load.abort_after_events = Some(3);
            load.abort_ratio = 0.2;
        }
        testbed::loadgen::run(&load).unwrap();
        sent += load.requests;
    }
    eprintln!("sent {sent} requests in {:.1?}", t0.elapsed());
    agent.wait_requests(Duration::from_secs(10), |r| r.len() >= sent * 9 / 10);
    // A few more scrapes so the last round is in every rate window.
    std::thread::sleep(Duration::from_secs(3));
    prom.wait_scraped(Duration::from_secs(10));
    prom.wait_caught_up(&agent.get("/metrics"), Duration::from_secs(10));

    // Every metric an expr selects is one the agent exports (or Prometheus adds per target).
    let exposition = agent.get("/metrics");
    let mut exported = exposition_names(&exposition);
    exported.extend(PROMETHEUS_SYNTHETIC.iter().map(|s| s.to_string()));
    let mut unknown = Vec::new();
    for d in &dashboards {
        for (title, r, expr) in d.exprs() {
            for m in metric_names(&expr) {
                if !exported.contains(&m) {
                    unknown.push(format!("{}: {title:?} {r}: {m}", d.file));
                }
            }
        }
        for (name, sel, _) in d.label_values_queries() {
            for m in metric_names(&sel) {
                if !exported.contains(&m) {
                    unknown.push(format!("{}: variable {name}: {m}", d.file));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the agent does not export:\n{}\n(agent exports: {exported:?})",
        unknown.join("\n")
    );

    // Every expr, through Prometheus, returns data.
    let mut failures = Vec::new();
    let mut n_panels = 0;
    let mut n_exprs = 0;
    let mut n_vars = 0;
    for d in &dashboards {
        for (name, sel, label) in d.label_values_queries() {
            let q = format!("count by ({label}) ({})", d.substitute(&sel));
            let (ok, n, msg) = judge(&prom.query(&q));
            n_vars += 1;
            eprintln!("  {:<22} ${name:<10} {n:>3} values", d.file);
            if !ok {
                failures.push(format!("{}: variable ${name}: {msg}\n    {q}", d.file));
            }
        }
        n_panels += d.query_panels().len();
        for (title, r, expr) in d.exprs() {
            let q = d.substitute(&expr);
            assert!(
                !q.contains('$'),
                "{}: unsubstituted variable in {q}",
                d.file
            );
            let v = prom.query(&q);
            let (ok, n, msg) = judge(&v);
            if ok && q.contains("llmslo_stage_seconds_sum") && q.contains("group_left") {
                // The stages inside E2E partition it: their shares add up to about 1.
                for (group, total) in share_sums(&v) {
                    eprintln!(
                        "  {:<22} {title:<58} {r} shares of {group} sum to {total:.3}",
                        d.file
                    );
                    if !(0.8..=1.2).contains(&total) {
                        failures.push(format!(
                            "{}: {title:?} {r}: stage shares of {group} sum to {total}, not ~1\n    {q}",
                            d.file
                        ));
                    }
                }
            }
            n_exprs += 1;
            eprintln!("  {:<22} {title:<58} {r} {n:>3} series", d.file);
            if !ok {
                failures.push(format!("{}: {title:?} {r}: {msg}\n    {q}", d.file));
            }
        }
    }
    eprintln!(
        "evaluated {n_exprs} exprs of {n_panels} panels and {n_vars} variable queries in {} dashboards",
        dashboards.len()
    );
    if !failures.is_empty() {
        let mut f = std::io::stderr();
        let _ = writeln!(f, "agent /metrics:\n{exposition}");
        panic!(
            "{} of {n_exprs} dashboard queries failed or were empty:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    drop(prom);
    drop(agent);
}
