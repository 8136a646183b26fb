//! `llm-slo-agent demo`: a small simulated node (two inference pods in network namespaces and
//! kubelet-style cgroups), a steady mixed load, the agent tracing them, and a live summary.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use testbed::{CgroupDriver, LoadConfig, Pod, PodCgroup, PodProcess};

use crate::agent::{self, unix_now};
use crate::config::Config;

struct DemoPod {
    _server: PodProcess,
    _cg: PodCgroup,
    pod: Pod,
    model: &'static str,
}

fn demo_pod(name: &str, arg0: &str, model: &'static str, server_args: &[&str]) -> Result<DemoPod> {
    let pod = Pod::create(name)?;
    let cg = PodCgroup::create(CgroupDriver::Systemd, "burstable")?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg0(arg0)
        .args(["synth-server", "--listen", "0.0.0.0:8000", "--model", model])
        .args(server_args)
        .env("HOSTNAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = pod.spawn(cmd, Some(&cg))?;
    pod.wait_for_port(8000, Duration::from_secs(10))?;
    Ok(DemoPod {
        _server: server,
        _cg: cg,
        pod,
        model,
    })
}

pub fn run(listen: SocketAddr, duration: Option<Duration>) -> Result<()> {
    testbed::require_root().context("the demo builds network namespaces and cgroups")?;
    let _ = testbed::cleanup_stale(testbed::PREFIX);
    // A fast server and a slower one that queues (4 requests at a time, prefill per KiB).
    let pods = vec![
        demo_pod(
            "llama-a",
            "vllm",
            "llama-3-8b-instruct",
            &["--decode-ms", "4", "--prefill-us-per-kb", "400"],
        )?,
        demo_pod(
            "qwen-b",
            "llama-server",
            "qwen2.5-7b",
            &[
                "--decode-ms",
                "8",
                "--concurrency",
                "4",
                "--prefill-us-per-kb",
                "1500",
            ],
        )?,
    ];
    let cfg = Config {
        listen,
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shared = agent::start(&cfg)?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("binding {listen}"))?;
    let app = crate::api::router(shared.clone());
    rt.spawn(async move { axum::serve(listener, app).await });

    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let mut lc = LoadConfig::new(p.pod.addr(8000));
        lc.model = p.model.to_string();
        lc.connections = 4;
        lc.requests = 20;
        lc.rate = Some(4.0);
        lc.streaming_ratio = 0.8;
        lc.prompt_bytes = vec![400, 2_000, 16_000];
        lc.max_tokens = Some(24);
        lc.deadline = Duration::from_secs(15);
        let stop = stop.clone();
        loaders.push(std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                lc.seed = i as u64 * 1_000_003 + round;
                lc.request_id_base = round * 1000;
                if let Err(e) = testbed::loadgen::run(&lc) {
                    eprintln!("load generator: {e:#}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                round += 1;
            }
        }));
    }

    println!("llm-slo-agent demo: 2 inference pods, steady mixed load (Ctrl-C to stop)");
    println!("  metrics:   curl http://{listen}/metrics");
    println!("  requests:  curl http://{listen}/api/v1/requests?limit=5");
    println!("  breakdown: curl 'http://{listen}/api/v1/breakdown?window=1m&group_by=pod,model'");
    println!("  targets:   curl http://{listen}/api/v1/targets\n");
    let deadline = duration.map(|d| std::time::Instant::now() + d);
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(3));
        let signal = agent::wait_for_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                _ = tick.tick() => {
                    let bd = shared.store.lock().expect("store lock").agg.breakdown(unix_now(), 60, &["pod", "model"]);
                    print_summary(&bd, shared.started.elapsed().as_secs_f64().clamp(1.0, 60.0));
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) { break; }
                }
            }
        }
    });
    println!("stopping: load, agent, pods");
    stop.store(true, Ordering::SeqCst);
    shared.request_stop();
    for l in loaders {
        let _ = l.join();
    }
    drop(pods);
    Ok(())
}

fn q(v: &Value, metric: &str, p: &str) -> String {
    v["metrics"][metric][p]
        .as_f64()
        .map_or("-".into(), |x| format!("{x:.1}"))
}

/// `window_s`: how much of the 60 s window the demo has lived through (for the rate).
fn print_summary(bd: &Value, window_s: f64) {
    println!(
        "{:<28} {:>6} {:>15} {:>13} {:>15}  top stage (share of E2E)",
        "pod / model (last 60 s)", "req/s", "TTFT p50/p99", "ITL p50/p99", "E2E p50/p99"
    );
    for g in bd["groups"].as_array().into_iter().flatten() {
        let key = format!(
            "{}/{}",
            g["key"]["pod"].as_str().unwrap_or("?"),
            g["key"]["model"].as_str().unwrap_or("?")
        );
        let rate = g["count"].as_f64().unwrap_or(0.0) / window_s;
        let top = g["stages"]
            .as_object()
            .and_then(|s| {
                s.iter()
                    .filter_map(|(k, v)| v["share_of_e2e"].as_f64().map(|x| (k.clone(), x)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
            })
            .map_or("-".into(), |(k, x)| format!("{k} ({:.0}%)", x * 100.0));
        println!(
            "{key:<28} {rate:>6.1} {:>15} {:>13} {:>15}  {top}",
            format!("{}/{} ms", q(g, "ttft_ms", "p50"), q(g, "ttft_ms", "p99")),
            format!("{}/{}", q(g, "itl_ms", "p50"), q(g, "itl_ms", "p99")),
            format!("{}/{} ms", q(g, "e2e_ms", "p50"), q(g, "e2e_ms", "p99")),
        );
    }
    println!();
}
