//! Kernel tests of the cross-check against a server's own metrics (issue 9):
//! - `agrees_with_vllm_format_metrics`: the synthetic server in a pod serves vLLM's histograms
//!   (`--metrics vllm`) of what it measured on its own clock; under load with a 400 ms queue
//!   delay, `/api/v1/crosscheck` shows source vllm, the server's and the agent's TTFT and E2E
//!   p50/p95 within the width of the server's bucket (all the server's histogram can resolve),
//!   means (exact on both sides) within a few ms, the server's queue time at the configured
//!   delay next to our `queue_prefill`, and the agent's own scrapes nowhere in its records or
//!   series.
//! - `servers_without_metrics_or_with_garbage`: a server answering 404 and one answering
//!   garbage are counted as not_found and error, and their traffic is traced as usual.
//! - `a_server_in_the_agents_network_namespace_is_scraped_on_loopback`: a server sharing the
//!   agent's namespace is scraped at 127.0.0.1, and its scrapes are left out as well.

mod common;

use std::time::{Duration, Instant};

use common::node::{server_pod, ServerPod, PORT};
use common::{kernel_tests_enabled, metric, promtool_check, Agent};
use serde_json::Value;
use testbed::{CgroupDriver, LoadConfig};

const QUEUE_DELAY_MS: f64 = 400.0;

fn agent_for(pods: &[&ServerPod]) -> Agent {
    let mut args = vec!["--no-auto"];
    for p in pods {
        args.extend(["--target-cgroup", p.cg.cgroup_path()]);
    }
    Agent::start_with_config("crosscheck:\n  interval_s: 1\n  window_s: 300\n", &args)
}

/// The cross-check entry whose address is the pod's.
fn entry(agent: &Agent, sp: &ServerPod) -> Option<Value> {
    let want = format!("{}:{PORT}", sp.pod.ip());
    agent.get_json("/api/v1/crosscheck")["targets"]
        .as_array()?
        .iter()
        .find(|t| t["address"] == want.as_str())
        .cloned()
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn load(sp: &ServerPod, requests: usize, connections: usize) -> Vec<testbed::ClientRecord> {
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.connections = connections;
    cfg.requests = requests;
    cfg.streaming_ratio = 1.0;
    cfg.max_tokens = Some(16);
    cfg.deadline = Duration::from_secs(60);
    let client = testbed::loadgen::run(&cfg).expect("load");
    assert_eq!(client.len(), requests);
    assert!(
        client.iter().all(|c| c.status == 200 && c.error.is_none()),
        "client errors"
    );
    client
}

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

#[test]
fn agrees_with_vllm_format_metrics() {
    if !kernel_tests_enabled("agrees_with_vllm_format_metrics") {
        return;
    }
    let delay = QUEUE_DELAY_MS.to_string();
    let sp = server_pod(
        "xck",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &[
            "--metrics",
            "vllm",
            "--queue-delay-ms",
            &delay,
            "--decode-ms",
            "2",
        ],
    );
    let agent = agent_for(&[&sp]);
    // The first scrape is the window's start: load after it, so every request is inside.
    let first = wait_for(Duration::from_secs(15), || {
        entry(&agent, &sp).filter(|e| e["last_scrape"]["result"] == "ok")
    });
    assert!(
        first.is_some(),
        "no ok scrape of the pod: {}\n{}",
        agent.get("/api/v1/crosscheck"),
        agent.log_text()
    );
    const N: usize = 48;
    load(&sp, N, 8);
    // Wait for a scrape after the last request: then both sides count all N.
    let e = wait_for(Duration::from_secs(20), || {
        entry(&agent, &sp).filter(|e| {
            let m = &e["models"][0];
            m["ttft"]["server"]["count"] == N && m["ttft"]["agent"]["count"] == N
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "the cross-check never saw all {N} requests on both sides: {}",
            agent.get("/api/v1/crosscheck")
        )
    });
    eprintln!("{}", serde_json::to_string_pretty(&e).unwrap());
    assert_eq!(e["source"], "vllm");
    let m = &e["models"][0];
    assert_eq!(m["model"], "synth-llm");
    for metric in ["ttft", "e2e"] {
        let c = &m[metric];
        assert_eq!(c["server"]["count"], N, "{metric}");
        assert_eq!(c["agent"]["count"], N, "{metric}");
        for q in ["p50", "p95"] {
            let key = if q == "p50" { "0.5" } else { "0.95" };
            let s = f(&c["server"][format!("{q}_ms")]);
            let a = f(&c["agent"][format!("{q}_ms")]);
            // The server's histogram places a quantile inside a bucket by interpolation and
            // cannot resolve it finer: agreement is a difference within the bucket's width.
            let b = &c["server_bucket_ms"][key];
            let width = f(&b[1]) - f(&b[0]);
            assert!(
                (a - s).abs() <= width,
                "{metric} {q}: agent {a:.1} ms, server {s:.1} ms, bucket {b} ({width} ms wide)"
            );
            assert!(
                a >= f(&b[0]) - 2.0 && a <= f(&b[1]) + 2.0,
                "{metric} {q}: agent {a:.1} ms outside the server's bucket {b}"
            );
            assert!((f(&c["diff_ms"][key]) - (a - s)).abs() < 1e-6);
        }
        // Means come from _sum/_count: exact on the server's side too. The agent starts at
        // the request's first packet, the server once it has read it all: well under 5 ms here.
        let (sm, am) = (f(&c["server"]["mean_ms"]), f(&c["agent"]["mean_ms"]));
        assert!(
            (am - sm).abs() <= 5.0 + 0.02 * sm,
            "{metric} mean: agent {am:.2} ms, server {sm:.2} ms"
        );
    }
    // The server's queue time is the configured delay (its slots never ran out); ours is
    // queue_prefill, the delay plus the first token.
    let q = &m["queue"];
    assert_eq!(q["agent_measure"], "queue_prefill");
    let sq = f(&q["server"]["mean_ms"]);
    assert!(
        (sq - QUEUE_DELAY_MS).abs() <= 20.0,
        "server queue mean {sq:.1} ms, configured {QUEUE_DELAY_MS} ms"
    );
    let b = &q["server_bucket_ms"]["0.5"];
    let (lo, hi) = (f(&b[0]), f(&b[1]));
    assert!(
        lo < QUEUE_DELAY_MS && QUEUE_DELAY_MS <= hi,
        "queue p50 bucket {b}"
    );
    assert!((f(&q["server"]["p50_ms"]) - QUEUE_DELAY_MS).abs() <= hi - lo);
    let aq = f(&q["agent"]["mean_ms"]);
    assert!(
        aq >= sq - 2.0 && aq - sq <= 20.0,
        "queue_prefill mean {aq:.1} ms vs the server's queue time {sq:.1} ms"
    );

    // The agent's scrapes: traced (the server saw them), then left out of everything.
    let recs = agent.wait_requests(Duration::from_secs(5), |r| r.len() >= N);
    assert_eq!(recs.len(), N, "only the load's requests are recorded");
    assert!(recs.iter().all(|r| r["path"] != "/metrics"));
    // The cross-check speaks of the pod the records are labelled with.
    assert_eq!(
        e["pod"].as_str().unwrap_or(""),
        recs[0]["pod"].as_str().unwrap_or("")
    );
    // The agent's count read before the server's log: a scrape is logged by the server before
    // its record completes in the agent, never after; one in flight between the two reads is
    // allowed for (a second's interval), and the reads are repeated while one may be in flight.
    let read = || {
        let exp = agent.get("/metrics");
        let own = metric(&exp, "llmslo_crosscheck_own_requests_total").unwrap();
        let served = sp
            .server_log()
            .iter()
            .filter(|r| r.path == "/metrics")
            .count();
        (exp, own, served)
    };
    let (exp, own, served_metrics) = wait_for(Duration::from_secs(5), || {
        Some(read()).filter(|(_, own, served)| *own >= *served as f64 - 1.0)
    })
    .unwrap_or_else(read);
    promtool_check(&exp);
    let ok = metric(&exp, "llmslo_crosscheck_scrapes_total{result=\"ok\"}").unwrap();
    eprintln!(
        "server answered {served_metrics} scrapes; agent: {ok} ok, {own} own requests dropped"
    );
    assert!(ok >= 3.0, "{ok} ok scrapes");
    assert!(
        own >= served_metrics as f64 - 1.0 && own <= served_metrics as f64,
        "{own} own requests dropped, {served_metrics} scrapes served"
    );
    assert!(
        !exp.lines()
            .any(|l| l.starts_with("llmslo_requests_total") && l.contains("route=\"other\"")),
        "a scrape reached the request series"
    );
    let total: f64 = exp
        .lines()
        .filter(|l| l.starts_with("llmslo_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, N as f64);
    for (name, by) in [
        ("llmslo_crosscheck_server_quantile_seconds", "server"),
        ("llmslo_crosscheck_agent_quantile_seconds", "agent"),
    ] {
        let line = exp
            .lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains("metric=\"ttft\"")
                    && l.contains("quantile=\"0.5\"")
                    && l.contains("source=\"vllm\"")
            })
            .unwrap_or_else(|| panic!("no {name} ttft p50 in /metrics"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            (v * 1e3 - f(&m["ttft"][by]["p50_ms"])).abs() < 1e-3,
            "{line}"
        );
    }
    assert!(exp.contains("llmslo_crosscheck_difference_ratio{"));
}

#[test]
fn servers_without_metrics_or_with_garbage() {
    if !kernel_tests_enabled("servers_without_metrics_or_with_garbage") {
        return;
    }
    let none = server_pod("xnf", CgroupDriver::Systemd, "llmslo-synth-server", &[]);
    let junk = server_pod(
        "xgb",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--metrics", "garbage"],
    );
    let agent = agent_for(&[&none, &junk]);
    let seen = |sp: &ServerPod, result: &str| {
        wait_for(Duration::from_secs(15), || {
            entry(&agent, sp).filter(|e| e["last_scrape"]["result"] == result)
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: no {result} scrape: {}",
                sp.name,
                agent.get("/api/v1/crosscheck")
            )
        })
    };
    let e = seen(&none, "not_found");
    assert_eq!(e["last_scrape"]["error"], "HTTP 404");
    assert!(e["source"].is_null() && e["models"].as_array().unwrap().is_empty());
    let e = seen(&junk, "error");
    assert!(
        e["last_scrape"]["error"]
            .as_str()
            .unwrap()
            .contains("not a Prometheus exposition"),
        "{e}"
    );
    // Tracing goes on as usual for both.
    load(&none, 10, 2);
    load(&junk, 10, 2);
    let recs = agent.wait_requests(Duration::from_secs(10), |r| r.len() >= 20);
    assert_eq!(recs.len(), 20, "the load's requests, and no scrape");
    assert!(recs.iter().all(|r| r["path"] == "/v1/chat/completions"));
    let exp = agent.get("/metrics");
    promtool_check(&exp);
    let nf = metric(
        &exp,
        "llmslo_crosscheck_scrapes_total{result=\"not_found\"}",
    )
    .unwrap();
    let err = metric(&exp, "llmslo_crosscheck_scrapes_total{result=\"error\"}").unwrap();
    let ok = metric(&exp, "llmslo_crosscheck_scrapes_total{result=\"ok\"}").unwrap();
    assert!(
        nf >= 1.0 && err >= 1.0 && ok == 0.0,
        "not_found {nf}, error {err}, ok {ok}"
    );
    assert!(!exp.contains("llmslo_crosscheck_server_quantile_seconds{"));
    assert!(metric(&exp, "llmslo_crosscheck_own_requests_total").unwrap() >= 2.0);
    assert_eq!(common::http_get(agent.addr, "/readyz").unwrap().0, 200);
}

#[test]
fn a_server_in_the_agents_network_namespace_is_scraped_on_loopback() {
    if !kernel_tests_enabled("a_server_in_the_agents_network_namespace_is_scraped_on_loopback") {
        return;
    }
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = std::process::Command::new(common::agent_bin())
        .args(["synth-server", "--listen", &listen, "--metrics", "vllm"])
        .args(["--queue-delay-ms", "20", "--decode-ms", "1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("synthetic server");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(addr).is_ok()
    });
    assert!(up, "server not listening");
    let pid = server.id().to_string();
    let agent = Agent::start_with_config(
        "crosscheck:\n  interval_s: 1\n  window_s: 300\n",
        &["--no-auto", "--target-pid", &pid],
    );
    let find = || -> Option<Value> {
        agent.get_json("/api/v1/crosscheck")["targets"]
            .as_array()?
            .iter()
            .find(|t| t["address"] == listen.as_str())
            .cloned()
    };
    wait_for(Duration::from_secs(15), || {
        find().filter(|e| e["last_scrape"]["result"] == "ok")
    })
    .unwrap_or_else(|| {
        panic!(
            "no ok scrape on loopback: {}",
            agent.get("/api/v1/crosscheck")
        )
    });
    const N: usize = 12;
    let mut cfg = LoadConfig::new(addr);
    cfg.connections = 3;
    cfg.requests = N;
    cfg.streaming_ratio = 1.0;
    cfg.max_tokens = Some(4);
    let client = testbed::loadgen::run(&cfg).expect("load");
    assert!(client.iter().all(|c| c.status == 200 && c.error.is_none()));
    let e = wait_for(Duration::from_secs(15), || {
        find().filter(|e| {
            let m = &e["models"][0]["e2e"];
            m["server"]["count"] == N && m["agent"]["count"] == N
        })
    })
    .unwrap_or_else(|| panic!("counts never met: {}", agent.get("/api/v1/crosscheck")));
    let e2e = &e["models"][0]["e2e"];
    let (sm, am) = (f(&e2e["server"]["mean_ms"]), f(&e2e["agent"]["mean_ms"]));
    assert!(
        (am - sm).abs() <= 5.0,
        "e2e mean: agent {am:.2} ms, server {sm:.2} ms"
    );
    // The scrape that brought the server's counts is assembled (and counted as the agent's own)
    // only when its connection's record completes, after the scrape thread has read the answer:
    // wait for two of them (one a second), then ask that none reached the records.
    let own = wait_for(Duration::from_secs(10), || {
        metric(
            &agent.get("/metrics"),
            "llmslo_crosscheck_own_requests_total",
        )
        .filter(|&o| o >= 2.0)
    });
    assert!(
        own.is_some(),
        "own scrapes traced and left out: {:?}",
        metric(
            &agent.get("/metrics"),
            "llmslo_crosscheck_own_requests_total"
        )
    );
    let recs = agent.wait_requests(Duration::from_secs(3), |r| r.len() >= N);
    assert_eq!(recs.len(), N, "the load's requests only, no scrape");
    let _ = server.kill();
    let _ = server.wait();
}
