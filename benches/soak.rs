//! Sustained event rate and memory over time, with the real agent and the real kernel.
//!
//! Phase 1 (rate): the synthetic server in a testbed pod streams tokens as fast as
//! `LLMSLO_SOAK_RATE_CONNS` (60) concurrent streams allow (`--decode-ms 1`, each SSE event in two
//! writes, so ~2,000 ring-buffer records per second per stream) for `LLMSLO_SOAK_RATE_S` (60) s.
//! From the agent's own counters: records the programs submitted, records userspace read, and
//! records lost (`llmslo_agent_events_lost_total{cause="ringbuf_full"}`): generated − received
//! must equal the reported loss, and the loss is expected to be 0.
//!
//! Phase 2 (soak): 1,000 keep-alive connections held open (each made one request), and requests
//! naming 200 models (200 label sets, the default `max_label_sets`) cycled through for
//! `LLMSLO_SOAK_S` (600) s, new connections each time. The agent's RSS and open fds are sampled
//! every 10 s: the report gives them after the first full cycle (everything warm) and at the end,
//! the largest RSS, and the slope of a least-squares line through the samples after warm-up.
//!
//! `LLMSLO_SOAK_RINGBUF` (bytes, a power of two) and `LLMSLO_SOAK_RECENT` run the agent with
//! another `ringbuf_bytes` and `recent_requests`.
//!
//! Needs root (skips loudly otherwise). Prints a markdown report; with LLMSLO_BENCH_WRITE=1
//! rewrites the soak section of docs/BENCHMARKS.md. `make bench-soak` runs it (~12 minutes).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{env_or, machine, server_pod, tree, write_doc, Agent, ServerPod, PORT, STOP};
use testbed::LoadConfig;

mod common;

const AGENT_CONFIG: &str = "crosscheck:\n  enabled: false\n";

struct Settings {
    rate_s: f64,
    rate_conns: usize,
    soak_s: f64,
    idle_conns: usize,
    label_sets: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            rate_s: env_or("LLMSLO_SOAK_RATE_S", 60.0),
            rate_conns: env_or("LLMSLO_SOAK_RATE_CONNS", 60),
            soak_s: env_or("LLMSLO_SOAK_S", 600.0),
            idle_conns: env_or("LLMSLO_SOAK_CONNS", 1000),
            label_sets: env_or("LLMSLO_SOAK_LABEL_SETS", 200),
        }
    }
}

fn metric(m: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

const SUBMITTED: &str = "llmslo_agent_bpf_stat_total{stat=\"events\"}";
const READ: &str = "llmslo_agent_events_read_total";
const LOST: &str = "llmslo_agent_events_lost_total{cause=\"ringbuf_full\"}";

struct RatePhase {
    secs: f64,
    requests_ok: usize,
    submitted: f64,
    read: f64,
    lost: f64,
    agent_cpu_ns: u64,
}

fn rate_phase(s: &Settings, sp: &ServerPod, agent: &Agent) -> Result<RatePhase> {
    let before = agent.metrics()?;
    let cpu0 = agent.cpu_ns()?;
    let t0 = Instant::now();
    let mut cfg = LoadConfig::new(sp.pod.addr(PORT));
    cfg.connections = s.rate_conns;
    cfg.requests = 10_000_000;
    cfg.max_tokens = Some(200);
    cfg.deadline = Duration::from_secs_f64(s.rate_s);
    cfg.model = model(0);
    let recs = testbed::loadgen::run(&cfg)?;
    let secs = t0.elapsed().as_secs_f64();
    // The reader drains every 10 ms; give it and the cut-off streams' last records a moment.
    std::thread::sleep(Duration::from_secs(2));
    let after = agent.metrics()?;
    let d = |k: &str| metric(&after, k) - metric(&before, k);
    Ok(RatePhase {
        secs,
        requests_ok: recs.iter().filter(|r| r.ok()).count(),
        submitted: d(SUBMITTED),
        read: d(READ),
        lost: d(LOST),
        agent_cpu_ns: agent.cpu_ns()? - cpu0,
    })
}

/// A new keep-alive connection with one request answered on it.
fn idle_connection(addr: SocketAddr, model: &str) -> Result<TcpStream> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    request_on(&mut c, model)?;
    Ok(c)
}

/// One non-streamed request on `c`, its whole response read (the connection stays open).
fn request_on(c: &mut TcpStream, model: &str) -> Result<()> {
    let body = format!(
        "{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"max_tokens\":1,\"stream\":false}}"
    );
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            bail!("server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .context("response without Content-Length")?;
            if rest.len() >= len {
                return Ok(());
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Sample {
    t_s: f64,
    rss_kib: u64,
    /// The agent's own memory (heap, stacks): RSS less its binary's pages and the BPF maps it
    /// has mapped (the ring buffer's data pages are mapped twice and counted twice).
    anon_kib: u64,
    fds: usize,
}

fn sample(pid: u32, t0: Instant) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| name.to_string())
    };
    let (rss_kib, anon_kib) = (field("VmRSS:")?, field("RssAnon:")?);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Sample {
        t_s: t0.elapsed().as_secs_f64(),
        rss_kib,
        anon_kib,
        fds,
    })
}

/// Least-squares slope of RSS over time, in KiB per minute.
fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mx = samples.iter().map(|s| s.t_s).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let sxy: f64 = samples
        .iter()
        .map(|s| (s.t_s - mx) * (s.rss_kib as f64 - my))
        .sum();
    let sxx: f64 = samples.iter().map(|s| (s.t_s - mx).powi(2)).sum();
    if sxx == 0.0 {
        return f64::NAN;
    }
    sxy / sxx * 60.0
}

struct SoakPhase {
    held: usize,
    cycles: usize,
    requests: usize,
    warm: Option<Sample>,
    samples: Vec<Sample>,
    label_sets: usize,
    overflow: bool,
    active_conns: f64,
    lost: f64,
}

fn model(i: usize) -> String {
    format!("soak-m{i:03}")
}

fn soak_phase(s: &Settings, sp: &ServerPod, agent: &Agent) -> Result<SoakPhase> {
    let addr = sp.pod.addr(PORT);
    let before = agent.metrics()?;
    let mut held = Vec::with_capacity(s.idle_conns);
    for i in 0..s.idle_conns {
        held.push(
            idle_connection(addr, &model(i % s.label_sets))
                .with_context(|| format!("idle connection {i}"))?,
        );
    }
    eprintln!("[soak] {} connections held open", held.len());
    let t0 = Instant::now();
    let mut samples = vec![sample(agent.pid(), t0)?];
    let mut last = Instant::now();
    let mut last_reuse = Instant::now();
    let (mut cycles, mut requests, mut warm) = (0, 0, None);
    'run: while t0.elapsed().as_secs_f64() < s.soak_s {
        for i in 0..s.label_sets {
            if STOP.load(Ordering::SeqCst) || t0.elapsed().as_secs_f64() >= s.soak_s {
                break 'run;
            }
            let mut cfg = LoadConfig::new(addr);
            cfg.connections = 2;
            cfg.requests = 4;
            cfg.max_tokens = Some(16);
            cfg.model = model(i);
            cfg.seed = (cycles * s.label_sets + i) as u64;
            cfg.deadline = Duration::from_secs(10);
            requests += testbed::loadgen::run(&cfg)?
                .iter()
                .filter(|r| r.ok())
                .count();
            if last.elapsed() >= Duration::from_secs(10) {
                last = Instant::now();
                samples.push(sample(agent.pid(), t0)?);
            }
            // The held connections are used now and then, as a client's pool is: the agent
            // forgets a connection idle for 5 minutes.
            if last_reuse.elapsed() >= Duration::from_secs(60) {
                last_reuse = Instant::now();
                for (j, c) in held.iter_mut().enumerate() {
                    request_on(c, &model(j % s.label_sets))
                        .with_context(|| format!("request on held connection {j}"))?;
                }
                requests += held.len();
            }
        }
        cycles += 1;
        if cycles == 1 {
            warm = Some(sample(agent.pid(), t0)?);
        }
    }
    samples.push(sample(agent.pid(), t0)?);
    std::thread::sleep(Duration::from_secs(2));
    let after = agent.metrics()?;
    let (code, body) = common::http_get(agent.addr, "/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    // Distinct label sets of one request family, as /metrics shows them.
    let mut sets = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("llmslo_e2e_seconds_count{") {
            if let Some(labels) = rest.split_once('}').map(|(l, _)| l) {
                sets.insert(labels.to_string());
            }
        }
    }
    let overflow = sets.iter().any(|l| l.contains("model=\"other\""));
    Ok(SoakPhase {
        held: held.len(),
        cycles,
        requests,
        warm,
        samples,
        label_sets: sets.len(),
        overflow,
        active_conns: metric(&after, "llmslo_agent_connections_active"),
        lost: metric(&after, LOST) - metric(&before, LOST),
    })
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "\n!!!!!!!! SKIPPING the soak benchmark: it needs root (BPF, network namespaces, \
             cgroups). Run it as root: sudo make bench-soak !!!!!!!!\n"
        );
        return;
    }
    common::catch_signals();
    // 1,000 held connections plus the load generator's: the soft fd limit up to the hard one.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct; failure leaves the old limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let t0 = Instant::now();
    match std::panic::catch_unwind(run) {
        Ok(Ok(report)) => {
            println!("{report}");
            if std::env::var("LLMSLO_BENCH_WRITE").as_deref() == Ok("1") {
                match write_doc("soak", &report) {
                    Ok(p) => eprintln!("results written to {}", p.display()),
                    Err(e) => {
                        eprintln!("could not write the results: {e:#}");
                        std::process::exit(1);
                    }
                }
            }
            eprintln!("soak benchmark done in {:.0} s", t0.elapsed().as_secs_f64());
        }
        Ok(Err(e)) => {
            eprintln!("soak benchmark failed: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("soak benchmark panicked (everything it set up has been undone)");
            std::process::exit(101);
        }
    }
}

fn run() -> Result<String> {
    let s = Settings::from_env();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // ~2,000 records a second per stream: a token each ms, each SSE event in two writes.
    let sp = server_pod("soak", &["--decode-ms", "1", "--write-mode", "split"])?;
    // `LLMSLO_SOAK_RINGBUF` (bytes): another ring buffer size than the agent's default;
    // `LLMSLO_SOAK_RECENT`: another `recent_requests`.
    let mut config = AGENT_CONFIG.to_string();
    for (var, key) in [
        ("LLMSLO_SOAK_RINGBUF", "ringbuf_bytes"),
        ("LLMSLO_SOAK_RECENT", "recent_requests"),
    ] {
        if let Ok(v) = std::env::var(var) {
            writeln!(config, "{key}: {}", v.trim())?;
        }
    }
    let mut agent = Agent::start_with(sp.cg.cgroup_path(), Some(&config))?;
    eprintln!("[soak] rate phase: {} s", s.rate_s);
    let rate = rate_phase(&s, &sp, &agent)?;
    eprintln!("[soak] soak phase: {} s", s.soak_s);
    let soak = soak_phase(&s, &sp, &agent)?;
    let clean = agent.stop();
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok(report(&s, &rate, &soak, clean, &load_before, &load_after))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn report(
    s: &Settings,
    rate: &RatePhase,
    soak: &SoakPhase,
    clean: bool,
    load_before: &str,
    load_after: &str,
) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "### Soak benchmark (`benches/soak.rs`)\n");
    let _ = writeln!(
        o,
        "- date: {}",
        common::sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(
        o,
        "- machine: {}; kernel {}",
        machine(),
        common::sh("uname", &["-r"])
    );
    let _ = writeln!(o, "- tree: {}", tree());
    // The knobs this run was given, so the command reproduces it.
    let knobs: String = std::env::vars()
        .filter(|(k, _)| k.starts_with("LLMSLO_SOAK_"))
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    let _ = writeln!(
        o,
        "- command (as root): `{knobs}LLMSLO_BENCH_WRITE=1 cargo bench --bench soak` (`make bench-soak` without knobs)"
    );
    let _ = writeln!(
        o,
        "- load average before / after: {} / {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(o, "- agent exited cleanly on SIGTERM: {clean}\n");

    let eps = rate.submitted / rate.secs;
    let _ = writeln!(o, "#### Sustained event rate\n");
    let _ = writeln!(
        o,
        "{} concurrent streams of 200 tokens, 1 ms per token, each SSE event in two writes, for {:.0} s ({} requests completed).\n",
        s.rate_conns, rate.secs, rate.requests_ok
    );
    let _ = writeln!(o, "| records submitted by the programs | records read | lost (reported) | generated − received | rate | agent CPU per record |");
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        o,
        "| {:.0} | {:.0} | {:.0} | {:.0} | **{:.0} records/s** | {:.2} µs |",
        rate.submitted + rate.lost,
        rate.read,
        rate.lost,
        rate.submitted + rate.lost - rate.read,
        eps,
        rate.agent_cpu_ns as f64 / 1000.0 / rate.read.max(1.0)
    );
    let _ = writeln!(o);

    let _ = writeln!(o, "#### Memory over time\n");
    let _ = writeln!(
        o,
        "{} keep-alive connections held open; requests naming {} models (label sets) cycled for {:.0} s: {} cycles, {} requests; RSS and fds sampled every 10 s ({} samples).\n",
        soak.held, s.label_sets, s.soak_s, soak.cycles, soak.requests, soak.samples.len()
    );
    let first = soak.samples.first().copied();
    let end = soak.samples.last().copied();
    let max = soak.samples.iter().map(|x| x.rss_kib).max().unwrap_or(0);
    let max_anon = soak.samples.iter().map(|x| x.anon_kib).max().unwrap_or(0);
    let after_warm: Vec<Sample> = match soak.warm {
        Some(w) => soak
            .samples
            .iter()
            .copied()
            .filter(|x| x.t_s >= w.t_s)
            .collect(),
        None => Vec::new(),
    };
    let slope = slope_kib_per_min(&after_warm);
    let cell = |x: Option<Sample>| {
        x.map(|x| {
            format!(
                "RSS {} MiB (anonymous {} MiB), {} fds (t = {:.0} s)",
                mib(x.rss_kib),
                mib(x.anon_kib),
                x.fds,
                x.t_s
            )
        })
        .unwrap_or_else(|| "n/a".into())
    };
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(
        o,
        "| connections held, before the cycles | {} |",
        cell(first)
    );
    let _ = writeln!(
        o,
        "| after the first full cycle (warm) | {} |",
        cell(soak.warm)
    );
    let _ = writeln!(o, "| end | {} |", cell(end));
    let _ = writeln!(
        o,
        "| largest RSS (anonymous) | {} MiB ({} MiB) |",
        mib(max),
        mib(max_anon)
    );
    let _ = writeln!(
        o,
        "| RSS slope after warm-up (least squares) | {slope:+.1} KiB per minute |"
    );
    let _ = writeln!(
        o,
        "| label sets in `/metrics` (`llmslo_e2e_seconds_count`) | {}{} |",
        soak.label_sets,
        if soak.overflow {
            " (including the overflow set)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "| `llmslo_agent_connections_active` at the end | {:.0} |",
        soak.active_conns
    );
    let _ = writeln!(o, "| records lost during the soak | {:.0} |", soak.lost);
    let _ = writeln!(o);
    let _ = writeln!(o, "Against the goals: zero loss at 100,000 records/s for 60 s — {}; RSS ≤ 64 MiB with 200 label sets and 1,000 open connections — {}.",
        if rate.lost == 0.0 && eps >= 100_000.0 && rate.secs >= 60.0 { "met" } else if rate.lost == 0.0 { "no loss, at the rate reached" } else { "not met (records lost)" },
        if max <= 64 * 1024 { "met".to_string() } else { format!("not met by RSS; the agent's own (anonymous) memory is {} MiB, the rest its binary's pages and the BPF maps it has mapped", mib(max_anon)) });
    o
}
