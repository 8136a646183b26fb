//! Prometheus itself checks what we hand it: `promtool check rules` and `promtool test rules`
//! on deploy/prometheus (the SLO alert rules and their unit tests), and `promtool check
//! metrics` on the SLO engine's exposition. No root needed. promtool is required, not optional:
//! without it these tests fail (`make test` installs Debian's `prometheus` package).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use llm_slo_agent::record::{RequestRecord, Ts};
use llm_slo_agent::slo::{SloEngine, SloSpec};

/// `$PROMTOOL`, else /usr/bin/promtool, else the first on PATH.
fn promtool() -> PathBuf {
    let from_env = std::env::var_os("PROMTOOL").map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("promtool"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_env
        .into_iter()
        .chain([PathBuf::from("/usr/bin/promtool")])
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found ($PROMTOOL, /usr/bin/promtool, PATH): `make test` installs it \
                 (Debian's prometheus package: apt-get install prometheus)"
            )
        })
}

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

/// Runs promtool in deploy/prometheus (rule files are named relative to it); panics with
/// promtool's output unless it succeeds.
fn promtool_ok(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(prometheus_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        status.success(),
        "promtool {args:?} failed ({status}):\n{out}"
    );
    out
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool_ok(&["check", "rules", "alerts.yaml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = promtool_ok(&["test", "rules", "alerts_test.yaml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_unit_test() {
    let rules = std::fs::read_to_string(prometheus_dir().join("alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(prometheus_dir().join("alerts_test.yaml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    for a in alerts {
        let evals = tests
            .lines()
            .filter(|l| l.trim() == format!("alertname: {a}"))
            .count();
        // One case where it fires and one where it does not, at least.
        assert!(
            evals >= 2,
            "{a} is evaluated {evals} times in alerts_test.yaml"
        );
    }
}

fn record(ttft_ms: u64, status: u16, namespace: &str) -> RequestRecord {
    const MS: u64 = 1_000_000;
    let mut r = RequestRecord {
        streaming: true,
        status: Some(status),
        namespace: Some(namespace.into()),
        model: Some("llama".into()),
        token_ns: vec![ttft_ms * MS, (ttft_ms + 20) * MS].into(),
        ..Default::default()
    };
    r.timestamps.set(Ts::ReadFirst, 0);
    r.timestamps.set(Ts::ReadDone, MS / 2);
    r.timestamps.set(Ts::RespFirst, MS);
    r.timestamps.set(Ts::Token1, ttft_ms * MS);
    r.timestamps.set(Ts::TokenN, (ttft_ms + 20) * MS);
    r.timestamps.set(Ts::RespLast, (ttft_ms + 21) * MS);
    r.finish(true);
    r
}

#[test]
fn slo_exposition_passes_promtool_check_metrics() {
    let specs: Vec<SloSpec> = serde_yaml::from_str(
        r#"
- {name: chat-ttft, objective: 0.99, window: 28d, selector: {namespace: prod}, sli: {type: latency, metric: ttft, threshold_ms: 500}}
- name: "odd \"name\" \\ ünïcode"
  objective: 0.9
  window: 1d
  sli: {type: goodput, all: [{metric: ttft, threshold_ms: 500}, {metric: itl, threshold_ms: 50}]}
- {name: never-seen, objective: 0.999, window: 30d, selector: {model: other}, sli: {type: availability}}
"#,
    )
    .unwrap();
    let mut engine = SloEngine::new(specs).unwrap();
    let now = 1_700_000_000;
    for i in 0..100 {
        let ttft = if i % 10 == 0 { 900 } else { 100 };
        let status = if i % 25 == 0 { 503 } else { 200 };
        engine.observe(
            &record(ttft, status, "prod"),
            "/v1/chat/completions",
            now + i,
        );
    }
    let mut out = String::new();
    engine.render(now + 100, &mut out);
    // 10 % of requests over 500 ms against a 1 % budget: burning 10x.
    let burn: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("llmslo_slo_burn_rate{slo=\"chat-ttft\",window=\"5m\"} "))
        .expect("5m burn rate of chat-ttft")
        .parse()
        .unwrap();
    assert!((burn - 10.0).abs() < 1e-9, "{burn}");
    // `never-seen` has no requests: NaN compliance and burn rates, still valid exposition.
    assert!(out.contains("llmslo_slo_compliance{slo=\"never-seen\"} NaN\n"));
    promtool_ok(&["check", "metrics"], Some(&out));
}
