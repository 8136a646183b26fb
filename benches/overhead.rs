//! What the agent costs the server it watches, measured from the client side.
//!
//! A testbed pod (netns + kubelet-style cgroup) runs the synthetic streaming server; the
//! load generator drives it from the root netns. First the server's saturation throughput
//! is found (closed loop). Then, at 70 % of it, OPEN-LOOP blocks alternate without and with
//! the agent (`llm-slo-agent run --no-auto --target-cgroup <pod>`, started before and
//! SIGTERMed after each "on" block), each block replaying the same seeded Poisson schedule.
//! Per block: client-side p50/p99 of TTFT, ITL and E2E; then on ÷ off per pair of blocks.
//! Then closed-loop saturated throughput, off and on, interleaved. Agent cost: its CPU time
//! (its threads' time on a CPU, /proc/<pid>/task/*/schedstat) per request and per event, and the BPF programs' own run
//! time from `kernel.bpf_stats_enabled` + `bpftool prog show -j` during the open-loop blocks
//! (the sysctl goes back to its previous value, normally 0, for the saturated blocks: its
//! clock reads per program run are the measurement's cost, not the agent's). How much of a run
//! those clock reads are: one more open-loop block, without the agent, with programs that do
//! nothing (`src/bpf/floor.bpf.c`, one of each type the agent uses, on its hooks) attached;
//! their ns a run is the floor set beside each of the agent's programs.
//!
//! Needs root (skips loudly otherwise). Prints a markdown report; with LLMSLO_BENCH_WRITE=1
//! rewrites the results section of docs/BENCHMARKS.md. Knobs (env): LLMSLO_BENCH_PAIRS (4),
//! LLMSLO_BENCH_BLOCK_S (8), LLMSLO_BENCH_SAT_PAIRS (3), LLMSLO_BENCH_SAT_S (5),
//! LLMSLO_BENCH_LOAD (0.7). Everything is bounded to about 6 minutes and cleaned up on
//! error, panic and Ctrl-C (pods, agent, synthetic server, the bpf_stats sysctl).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{
    env_or, machine, server_pod, sh, tree, write_doc, Agent, BpfStats, ServerPod, PORT, STOP,
};
use llm_slo_agent::netpath::TC_PROGRAMS;
use testbed::{ClientRecord, LoadConfig};

mod common;

/// Whole-run budget: blocks that would not fit are skipped (and the report says so).
const BUDGET: Duration = Duration::from_secs(330);
/// How long each "on" block measures the agent with no load before the load starts.
const IDLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
struct Settings {
    pairs: usize,
    block_s: f64,
    sat_pairs: usize,
    sat_s: f64,
    load: f64,
    decode_ms: f64,
    tokens: u64,
    prompt_bytes: usize,
    sat_conns: usize,
    open_conns: usize,
    seed: u64,
    /// `kernel_token_counting` of the agent under test.
    kernel_tokens: bool,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            pairs: env_or("LLMSLO_BENCH_PAIRS", 4usize).max(1),
            block_s: env_or("LLMSLO_BENCH_BLOCK_S", 8.0f64).max(1.0),
            sat_pairs: env_or("LLMSLO_BENCH_SAT_PAIRS", 3usize).max(1),
            sat_s: env_or("LLMSLO_BENCH_SAT_S", 5.0f64).max(1.0),
            load: env_or("LLMSLO_BENCH_LOAD", 0.7f64).clamp(0.05, 1.0),
            decode_ms: env_or("LLMSLO_BENCH_DECODE_MS", 2.0f64).max(0.0),
            tokens: env_or("LLMSLO_BENCH_TOKENS", 16u64).max(1),
            prompt_bytes: 400,
            sat_conns: 64,
            open_conns: 128,
            seed: 42,
            kernel_tokens: env_or("LLMSLO_BENCH_KERNEL_TOKENS", 1u8) != 0,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cleanup guards: everything undoes itself on Drop (normal return, error, panic).

/// Enables `kernel.bpf_stats_enabled` and restores the previous value on Drop.

// ---------------------------------------------------------------------------------------
// BPF program statistics.

#[derive(Debug, Clone, Default)]
struct ProgStat {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
    /// bpftool's program type: tracing, tracepoint, raw_tracepoint, sched_cls, netfilter, ….
    kind: String,
    /// Processes holding the program, when bpftool was built to tell.
    pids: Option<Vec<u32>>,
}

fn bpf_progs() -> Result<BTreeMap<u64, ProgStat>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool (apt-get install bpftool / linux-tools)")?;
    if !out.status.success() {
        bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["id"].as_u64()?,
                        ProgStat {
                            name: p["name"].as_str().unwrap_or("?").to_string(),
                            run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                            run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                            kind: prog_type(&p["type"]),
                            pids: p["pids"].as_array().map(|a| {
                                a.iter()
                                    .filter_map(|x| x["pid"].as_u64().map(|v| v as u32))
                                    .collect()
                            }),
                        },
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// bpftool's name for a program type; an older bpftool gives the number of a type newer than
/// itself (netfilter is 32).
fn prog_type(v: &serde_json::Value) -> String {
    match (v.as_str(), v.as_u64()) {
        (Some(name), _) => name.to_string(),
        (None, Some(32)) => "netfilter".into(),
        (None, Some(n)) => format!("type {n}"),
        (None, None) => "?".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Client-side numbers.

#[derive(Debug, Clone, Default)]
struct Block {
    on: bool,
    /// Requests sent, completed without error, failed.
    sent: usize,
    ok: usize,
    errors: usize,
    /// Completed requests per second over the block's span.
    throughput: f64,
    ttft: Vec<u64>,
    itl: Vec<u64>,
    e2e: Vec<u64>,
    cost: Option<Cost>,
}

/// What one "on" block cost the machine, and what the agent saw.
#[derive(Debug, Clone, Default)]
struct Cost {
    wall_s: f64,
    cpu_ns: u64,
    /// The agent's CPU a second with it attached and no load (measured just before the block):
    /// discovery's scans, the reader's drain ticks, housekeeping.
    idle_ns_per_s: f64,
    wakeups: u64,
    events: f64,
    assembled: f64,
    lost: f64,
    unparsed: f64,
    clean_exit: bool,
    /// Per program name: its run time and runs over the block, and its type.
    progs: BTreeMap<String, ProgRuns>,
    /// What the agent itself reported over the block on /metrics: its process's CPU
    /// (`process_cpu_seconds_total`) and its programs' run time
    /// (`llmslo_agent_bpf_program_run_seconds_total`, summed), both seconds.
    own_cpu_s: f64,
    own_bpf_s: f64,
}

/// One program's run time and run count (deltas), and its type as bpftool names it.
#[derive(Debug, Clone, Default)]
struct ProgRuns {
    ns: u64,
    cnt: u64,
    kind: String,
}

/// The run-time accounting's floor: what programs that do nothing reported, by program type,
/// over a block of the same load without the agent.
#[derive(Debug, Clone, Default)]
struct FloorBlock {
    /// Per program type: (run_time_ns, run_cnt) deltas.
    by_kind: BTreeMap<String, (u64, u64)>,
    /// Hooks the floor programs could not attach to.
    errors: Vec<String>,
}

impl FloorBlock {
    /// ns a run of an empty program of `kind`, if one ran.
    fn ns_per_run(&self, kind: &str) -> Option<f64> {
        let &(ns, cnt) = self.by_kind.get(kind)?;
        (cnt > 0).then(|| ns as f64 / cnt as f64)
    }
}

impl Block {
    fn from_records(on: bool, recs: &[ClientRecord]) -> Block {
        let mut b = Block {
            on,
            sent: recs.len(),
            ..Default::default()
        };
        let (mut first, mut last) = (u64::MAX, 0u64);
        for r in recs {
            if !r.ok() || r.status != 200 {
                b.errors += 1;
                continue;
            }
            b.ok += 1;
            let end = r.end_ns.unwrap_or(r.send_ns);
            first = first.min(r.send_ns);
            last = last.max(end);
            if let Some(t) = r.ttft_ns {
                b.ttft.push(t);
            }
            b.e2e.push(end - r.send_ns);
            let ct = r.content_times();
            b.itl
                .extend(ct.windows(2).map(|w| w[1].saturating_sub(w[0])));
        }
        if last > first {
            b.throughput = b.ok as f64 / ((last - first) as f64 / 1e9);
        }
        for v in [&mut b.ttft, &mut b.itl, &mut b.e2e] {
            v.sort_unstable();
        }
        b
    }
}

/// Quantile of a sorted sample, in ms (nearest rank).
fn q_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

fn merged(blocks: &[&Block], f: impl Fn(&Block) -> &Vec<u64>) -> Vec<u64> {
    let mut v: Vec<u64> = blocks.iter().flat_map(|b| f(b).iter().copied()).collect();
    v.sort_unstable();
    v
}

/// (min, median, max).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], med, v[n - 1])
}

// ---------------------------------------------------------------------------------------
// The run.

struct Run {
    s: Settings,
    t0: Instant,
    sp: ServerPod,
    notes: Vec<String>,
}

impl Run {
    fn left(&self) -> Duration {
        BUDGET.saturating_sub(self.t0.elapsed())
    }

    fn load(&self, rate: Option<f64>, secs: f64) -> LoadConfig {
        let mut cfg = LoadConfig::new(self.sp.pod.addr(PORT));
        cfg.streaming_ratio = 1.0;
        cfg.max_tokens = Some(self.s.tokens);
        cfg.prompt_bytes = vec![self.s.prompt_bytes];
        cfg.seed = self.s.seed;
        cfg.rate = rate;
        match rate {
            Some(r) => {
                cfg.connections = self.s.open_conns;
                cfg.requests = ((r * secs).round() as usize).max(1);
                // The schedule spans `secs`; the tail gets time to finish.
                cfg.deadline = Duration::from_secs_f64(secs + 10.0);
            }
            None => {
                cfg.connections = self.s.sat_conns;
                cfg.requests = 100_000;
                cfg.deadline = Duration::from_secs_f64(secs);
            }
        }
        cfg
    }

    /// One block of load, with or without the agent.
    fn block(&self, on: bool, cfg: &LoadConfig) -> Result<Block> {
        if !on {
            let recs = testbed::loadgen::run(cfg)?;
            return Ok(Block::from_records(false, &recs));
        }
        let before = bpf_progs()?;
        let config = (!self.s.kernel_tokens).then_some("kernel_token_counting: false\n");
        let mut agent = Agent::start_with(self.sp.cg.cgroup_path(), config)?;
        let names = agent.programs();
        // Let start-up work (discovery's first rescans) settle before counting.
        std::thread::sleep(Duration::from_millis(500));
        // What it costs with nothing to trace: the fixed part of the cost below.
        let (idle0, i0) = (agent.cpu_ns()?, Instant::now());
        std::thread::sleep(IDLE);
        let idle_ns_per_s =
            agent.cpu_ns()?.saturating_sub(idle0) as f64 / i0.elapsed().as_secs_f64();
        let progs0 = bpf_progs()?;
        let cpu0 = agent.cpu_ns()?;
        let wk0 = agent.wakeups();
        let m0 = agent.metrics()?;
        let w0 = Instant::now();
        let recs = testbed::loadgen::run(cfg)?;
        // The agent publishes its counters every 500 ms: give it time to drain and publish.
        std::thread::sleep(Duration::from_millis(1200));
        let wall_s = w0.elapsed().as_secs_f64();
        let cpu1 = agent.cpu_ns()?;
        let wk1 = agent.wakeups();
        let m1 = agent.metrics()?;
        let progs1 = bpf_progs()?;
        let clean_exit = agent.stop();
        if !clean_exit {
            eprintln!(
                "agent did not exit cleanly on SIGTERM:\n{}",
                agent.log_text()
            );
        }
        let d = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
        let sum_prefix = |m: &BTreeMap<String, f64>, p: &str| -> f64 {
            m.iter()
                .filter(|(k, _)| k.starts_with(p))
                .map(|(_, v)| v)
                .sum()
        };
        let mut progs: BTreeMap<String, ProgRuns> = BTreeMap::new();
        for (id, p1) in &progs1 {
            // The agent's programs: loaded while it started (other agents on the machine
            // load programs of the same names) and held by its pid where bpftool can tell
            // (the tc programs on the pod veths included: they run for every packet), else
            // named as in its objects.
            let ours = match &p1.pids {
                Some(p) => p.contains(&agent.pid()),
                None => {
                    names.is_empty()
                        || names.contains(&p1.name)
                        || TC_PROGRAMS.contains(&p1.name.as_str())
                }
            };
            if before.contains_key(id) || !ours {
                continue;
            }
            let Some(p0) = progs0.get(id) else { continue };
            let e = progs.entry(p1.name.clone()).or_default();
            e.ns += p1.run_time_ns.saturating_sub(p0.run_time_ns);
            e.cnt += p1.run_cnt.saturating_sub(p0.run_cnt);
            e.kind.clone_from(&p1.kind);
        }
        let mut b = Block::from_records(true, &recs);
        b.cost = Some(Cost {
            wall_s,
            cpu_ns: cpu1.saturating_sub(cpu0),
            idle_ns_per_s,
            wakeups: wk1.saturating_sub(wk0),
            events: d("llmslo_agent_events_read_total"),
            assembled: d("llmslo_agent_requests_assembled_total"),
            lost: sum_prefix(&m1, "llmslo_agent_events_lost_total")
                - sum_prefix(&m0, "llmslo_agent_events_lost_total"),
            unparsed: sum_prefix(&m1, "llmslo_agent_requests_unparsed_total")
                - sum_prefix(&m0, "llmslo_agent_requests_unparsed_total"),
            clean_exit,
            progs,
            own_cpu_s: d("process_cpu_seconds_total"),
            own_bpf_s: sum_prefix(&m1, "llmslo_agent_bpf_program_run_seconds_total")
                - sum_prefix(&m0, "llmslo_agent_bpf_program_run_seconds_total"),
        });
        Ok(b)
    }

    /// One block of the load without the agent, with `src/bpf/floor.bpf.c`'s empty programs on
    /// its hooks (the pod's veth both ways, the socket hooks, the DNAT hook).
    fn floor_block(&self, cfg: &LoadConfig) -> Result<FloorBlock> {
        let veth = self.sp.pod.host_ifindex()? as i32;
        let attached = llm_slo_agent::floor::Floor::attach(&[(veth, self.sp.pod.host_veth())])?;
        let runs0 = attached.runs()?;
        testbed::loadgen::run(cfg)?;
        let runs1 = attached.runs()?;
        let mut f = FloorBlock {
            errors: attached.errors.clone(),
            ..Default::default()
        };
        for (a, b) in runs0.iter().zip(&runs1) {
            let e = f.by_kind.entry(b.kind.to_string()).or_default();
            e.0 += b.run_time_ns.saturating_sub(a.run_time_ns);
            e.1 += b.run_cnt.saturating_sub(a.run_cnt);
        }
        f.by_kind.retain(|_, v| v.1 > 0);
        Ok(f)
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "\n!!!!!!!! SKIPPING the overhead benchmark: it needs root (BPF, network namespaces, \
             cgroups). Run it as root: sudo make bench !!!!!!!!\n"
        );
        return;
    }
    common::catch_signals();
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(|| run(t0));
    match result {
        Ok(Ok(report)) => {
            println!("{report}");
            if std::env::var("LLMSLO_BENCH_WRITE").as_deref() == Ok("1") {
                match write_doc("overhead", &report) {
                    Ok(p) => eprintln!("results written to {}", p.display()),
                    Err(e) => {
                        eprintln!("could not write the results: {e:#}");
                        std::process::exit(1);
                    }
                }
            }
            eprintln!(
                "overhead benchmark done in {:.0} s",
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(Err(e)) => {
            eprintln!("overhead benchmark failed: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("overhead benchmark panicked (everything it set up has been undone)");
            std::process::exit(101);
        }
    }
}

fn run(t0: Instant) -> Result<String> {
    let s = Settings::from_env();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let stats = BpfStats::enable()?;
    let (decode, tokens) = (s.decode_ms.to_string(), s.tokens.to_string());
    let sp = server_pod("bench", &["--decode-ms", &decode, "--tokens", &tokens])?;
    let mut r = Run {
        s: s.clone(),
        t0,
        sp,
        notes: Vec::new(),
    };

    // Warm up (connections, page cache, the server's allocator), then saturation.
    eprintln!("[overhead] warm-up and saturation search");
    testbed::loadgen::run(&r.load(None, 1.5))?;
    let sat = Block::from_records(false, &testbed::loadgen::run(&r.load(None, 4.0))?);
    if sat.ok < 100 {
        bail!("saturation run completed only {} requests", sat.ok);
    }
    let rate = s.load * sat.throughput;
    eprintln!(
        "[overhead] saturation {:.0} req/s (closed loop, {} connections); open loop at {:.0} req/s",
        sat.throughput, s.sat_conns, rate
    );

    // Open loop at `load` × saturation: off, on, off, on, ...
    let open_cfg = r.load(Some(rate), s.block_s);
    let mut open: Vec<(Block, Block)> = Vec::new();
    // Per pair: two blocks, the agent's start/stop and drain, the tail.
    let pair_cost = Duration::from_secs_f64(2.0 * (s.block_s + 1.0) + 6.0);
    let sat_cost = Duration::from_secs_f64(s.sat_pairs as f64 * (2.0 * s.sat_s + 6.0));
    for i in 0..s.pairs {
        if STOP.load(Ordering::SeqCst) {
            r.notes
                .push("interrupted: fewer blocks than planned".into());
            break;
        }
        if r.left() < pair_cost + sat_cost && i >= 3.min(s.pairs) {
            r.notes.push(format!(
                "time budget: {i} open-loop pairs instead of {}",
                s.pairs
            ));
            break;
        }
        eprintln!("[overhead] open-loop pair {}/{}", i + 1, s.pairs);
        let off = r.block(false, &open_cfg)?;
        let on = r.block(true, &open_cfg)?;
        open.push((off, on));
    }

    // The accounting's own share of those run times: empty programs on the same hooks, under
    // the same load, without the agent.
    let mut floor = None;
    if !STOP.load(Ordering::SeqCst)
        && r.left() > Duration::from_secs_f64(s.block_s + 4.0) + sat_cost
    {
        eprintln!(
            "[overhead] the run-time accounting's floor: empty programs on the agent's hooks"
        );
        match r.floor_block(&open_cfg) {
            Ok(f) => floor = Some(f),
            Err(e) => r
                .notes
                .push(format!("the accounting's floor was not measured: {e:#}")),
        }
    }

    // Saturated throughput, off and on, interleaved, with the kernel's run-time accounting
    // back as it was (off, unless someone had it on): bpf_stats adds two clock reads to every
    // program run, a cost of this measurement that no production node pays, and the open-loop
    // blocks above have measured the programs' time already.
    drop(stats);
    let sat_bpf_stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|v| v.trim() == "1");
    let sat_cfg = r.load(None, s.sat_s);
    let mut satp: Vec<(Block, Block)> = Vec::new();
    for i in 0..s.sat_pairs {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        if r.left() < Duration::from_secs_f64(2.0 * s.sat_s + 6.0) {
            r.notes.push(format!(
                "time budget: {i} saturated pairs instead of {}",
                s.sat_pairs
            ));
            break;
        }
        eprintln!("[overhead] saturated pair {}/{}", i + 1, s.sat_pairs);
        let off = r.block(false, &sat_cfg)?;
        let on = r.block(true, &sat_cfg)?;
        satp.push((off, on));
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = report(
        &r,
        (&sat, rate),
        &open,
        (&satp, sat_bpf_stats),
        floor.as_ref(),
        &load_before,
        &load_after,
    );
    drop(r);
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// The report.

fn f2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "n/a".into()
    }
}

fn report(
    r: &Run,
    (sat, rate): (&Block, f64),
    open: &[(Block, Block)],
    (satp, sat_bpf_stats): (&[(Block, Block)], bool),
    floor: Option<&FloorBlock>,
    load_before: &str,
    load_after: &str,
) -> String {
    let s = &r.s;
    let mut o = String::new();
    let cmd = {
        let mut knobs: Vec<String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("LLMSLO_BENCH_") && k != "LLMSLO_BENCH_WRITE")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        knobs.push("LLMSLO_BENCH_WRITE=1".into());
        format!("{} cargo bench --bench overhead", knobs.join(" "))
    };
    let _ = writeln!(o, "### Overhead benchmark (`benches/overhead.rs`)\n");
    let _ = writeln!(
        o,
        "- date: {}\n- machine: {}; kernel {}\n- tree: {}\n- command (as root): `{cmd}` (what `make bench` runs after the pipeline bench)\n- load average before / after: {} / {}",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
        sh("uname", &["-r"]),
        tree(),
        load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    let _ = writeln!(
        o,
        "- workload: synthetic streaming server in a testbed pod (`--decode-ms {}`, {} content events per response, {}-byte prompts), load generator in the root netns, everything on the same machine; the agent's `kernel_token_counting`: {}",
        s.decode_ms, s.tokens, s.prompt_bytes, s.kernel_tokens
    );
    let _ = writeln!(
        o,
        "- saturation: **{:.0} req/s** (closed loop, {} connections, 4 s); open loop at {:.0} % of it = **{:.0} req/s** (seeded Poisson, {} connections), {} s blocks, {} off/on pairs, interleaved off, on, off, on, …",
        sat.throughput,
        s.sat_conns,
        s.load * 100.0,
        rate,
        s.open_conns,
        s.block_s,
        open.len()
    );
    let _ = writeln!(
        o,
        "- `kernel.bpf_stats_enabled=1` during the warm-up and the open-loop blocks (the \"on\" latencies include the cost of the kernel's own run-time accounting); {}\n",
        if sat_bpf_stats {
            "it was already 1 before the run, so it stayed on for the saturated blocks too"
        } else {
            "back to 0, as on a production node, for the saturated blocks (their BPF time is not measured)"
        }
    );
    for n in &r.notes {
        let _ = writeln!(o, "- **note:** {n}");
    }

    // Latency ratios.
    let _ = writeln!(
        o,
        "#### Client-side latency at {:.0} % of saturation, with ÷ without the agent\n",
        s.load * 100.0
    );
    let _ = writeln!(
        o,
        "Per pair of blocks: ratio on/off; min / median / max over the pairs. \"pooled\": all blocks of a kind merged. Goal ≤ 1.02.\n"
    );
    let _ = writeln!(
        o,
        "| metric | off (pooled, ms) | on (pooled, ms) | on − off (ms) | pooled ratio | ratio min | ratio median | ratio max |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|");
    type Sel = fn(&Block) -> &Vec<u64>;
    let sels: [(&str, Sel); 3] = [
        ("TTFT", |b| &b.ttft),
        ("ITL", |b| &b.itl),
        ("E2E", |b| &b.e2e),
    ];
    let offs: Vec<&Block> = open.iter().map(|p| &p.0).collect();
    let ons: Vec<&Block> = open.iter().map(|p| &p.1).collect();
    for (name, sel) in sels {
        for (qn, q) in [("p50", 0.5), ("p99", 0.99)] {
            let a = q_ms(&merged(&offs, sel), q);
            let b = q_ms(&merged(&ons, sel), q);
            let per: Vec<f64> = open
                .iter()
                .map(|(x, y)| q_ms(sel(y), q) / q_ms(sel(x), q))
                .collect();
            let (mn, md, mx) = spread(per);
            let _ = writeln!(
                o,
                "| {name} {qn} | {} | {} | {} | {} | {} | {} | {} |",
                f2(a),
                f2(b),
                f2(b - a),
                f2(b / a),
                f2(mn),
                f2(md),
                f2(mx)
            );
        }
    }
    let _ = writeln!(
        o,
        "\nBlocks in order (requests ok/sent, achieved req/s, p50/p99 ms):\n"
    );
    let _ = writeln!(
        o,
        "| # | agent | ok/sent | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, b) in open.iter().flat_map(|p| [&p.0, &p.1]).enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {}/{} | {:.0} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            if b.on { "on" } else { "off" },
            b.ok,
            b.sent,
            b.throughput,
            f2(q_ms(&b.ttft, 0.5)),
            f2(q_ms(&b.ttft, 0.99)),
            f2(q_ms(&b.itl, 0.5)),
            f2(q_ms(&b.itl, 0.99)),
            f2(q_ms(&b.e2e, 0.5)),
            f2(q_ms(&b.e2e, 0.99)),
        );
    }

    // Saturated throughput.
    let _ = writeln!(
        o,
        "\n#### Saturated throughput (closed loop, {} connections, {} s blocks), with ÷ without\n",
        s.sat_conns, s.sat_s
    );
    let per: Vec<f64> = satp
        .iter()
        .map(|(x, y)| y.throughput / x.throughput)
        .collect();
    let (mn, md, mx) = spread(per.clone());
    let tot_off: f64 = satp.iter().map(|p| p.0.throughput).sum();
    let tot_on: f64 = satp.iter().map(|p| p.1.throughput).sum();
    let _ = writeln!(
        o,
        "| pair | off req/s | on req/s | ratio |\n|---|---:|---:|---:|"
    );
    for (i, ((x, y), q)) in satp.iter().zip(&per).enumerate() {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.0} | {} |",
            i + 1,
            x.throughput,
            y.throughput,
            f2(*q)
        );
    }
    let _ = writeln!(
        o,
        "\nRatio (goal ≥ 0.98): mean-of-blocks **{}**, per pair min / median / max {} / {} / {}.\n",
        f2(tot_on / tot_off),
        f2(mn),
        f2(md),
        f2(mx)
    );

    // Agent cost.
    let _ = writeln!(o, "#### Agent cost\n");
    let _ = writeln!(
        o,
        "Userspace: the agent's threads' time on a CPU (schedstat, ns) over the block (load + 1.2 s drain), per request the client completed (and the same less the agent's fixed cost: its CPU a second over {IDLE:?} with no load just before the block, times the block's length) and per ring-buffer event the agent read. Kernel: the BPF programs' run time (bpf_stats), which is charged to whichever task made the syscall — the server, the load generator, anything on the machine. The last two columns are the agent's own report of the same over the block, from its /metrics (`process_cpu_seconds_total`, and `llmslo_agent_bpf_program_run_seconds_total` summed over its programs).\n"
    );
    let _ = writeln!(
        o,
        "| block | requests (client ok) | agent assembled | events read | lost | unparsed | clean exit | agent CPU % of a core | idle agent CPU ms / s | µs CPU / request | µs CPU / request above idle | ns CPU / event | agent wake-ups / event | BPF ns / request | agent's own: µs CPU / request | agent's own: BPF ns / request |"
    );
    let _ = writeln!(
        o,
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut all_progs: BTreeMap<String, ProgRuns> = BTreeMap::new();
    let on_blocks: Vec<(&str, usize, &Block)> = open
        .iter()
        .enumerate()
        .map(|(i, p)| ("open", i, &p.1))
        .chain(satp.iter().enumerate().map(|(i, p)| ("saturated", i, &p.1)))
        .collect();
    for (kind, i, b) in &on_blocks {
        let Some(c) = &b.cost else { continue };
        let bpf_ns: u64 = c.progs.values().map(|v| v.ns).sum();
        let (bpf, own_bpf) = if *kind == "open" || sat_bpf_stats {
            (
                format!("{:.0}", bpf_ns as f64 / b.ok.max(1) as f64),
                format!("{:.0}", c.own_bpf_s * 1e9 / b.ok.max(1) as f64),
            )
        } else {
            ("— (stats off)".to_string(), "—".to_string())
        };
        if *kind == "open" {
            for (k, v) in &c.progs {
                let e = all_progs.entry(k.clone()).or_default();
                e.ns += v.ns;
                e.cnt += v.cnt;
                e.kind.clone_from(&v.kind);
            }
        }
        let _ = writeln!(
            o,
            "| {kind} {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2} | {bpf} | {:.1} | {own_bpf} |",
            i + 1,
            b.ok,
            c.assembled,
            c.events,
            c.lost,
            c.unparsed,
            if c.clean_exit { "yes" } else { "**no**" },
            c.cpu_ns as f64 / 1e9 / c.wall_s * 100.0,
            c.idle_ns_per_s / 1e6,
            c.cpu_ns as f64 / 1e3 / b.ok.max(1) as f64,
            (c.cpu_ns as f64 - c.idle_ns_per_s * c.wall_s).max(0.0) / 1e3 / b.ok.max(1) as f64,
            c.cpu_ns as f64 / c.events.max(1.0),
            c.wakeups as f64 / c.events.max(1.0),
            c.own_cpu_s * 1e6 / b.ok.max(1) as f64,
        );
    }
    let open_ok: usize = open.iter().map(|p| p.1.ok).sum();
    let _ = writeln!(
        o,
        "\nBPF programs over the open-loop \"on\" blocks ({} requests); each run is one hook invocation, for any process on the machine (the target filter runs inside the program):\n",
        open_ok
    );
    let _ = writeln!(
        o,
        "| program | type | runs | ns / run | runs / request | ns / request | ns / run above an empty program | ns / request above |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|");
    let per_req = |v: f64| v / open_ok.max(1) as f64;
    let (mut tns, mut tcnt, mut tfloor, mut floored) = (0u64, 0u64, 0f64, true);
    let mut rows: Vec<_> = all_progs.iter().collect();
    rows.sort_by_key(|(_, v)| std::cmp::Reverse(v.ns));
    for (name, v) in rows {
        let (ns, cnt, kind) = (v.ns, v.cnt, v.kind.as_str());
        tns += ns;
        tcnt += cnt;
        // Below the floor (a rarely run program, a noisy block): nothing above it.
        let fl = floor.and_then(|f| f.ns_per_run(kind));
        let (above_run, above_req) = match fl {
            Some(f) if cnt > 0 => {
                let run = (ns as f64 / cnt as f64 - f).max(0.0);
                tfloor += f.min(ns as f64 / cnt as f64) * cnt as f64;
                (
                    format!("{run:.0}"),
                    format!("{:.0}", per_req(run * cnt as f64)),
                )
            }
            _ if cnt == 0 => ("—".into(), "0".into()),
            _ => {
                floored = false;
                ("?".into(), "?".into())
            }
        };
        let _ = writeln!(
            o,
            "| {name} | {kind} | {cnt} | {:.0} | {:.1} | {:.0} | {above_run} | {above_req} |",
            ns as f64 / cnt.max(1) as f64,
            per_req(cnt as f64),
            per_req(ns as f64),
        );
    }
    let above_all = if floored && floor.is_some() {
        format!("**{:.0}**", per_req(tns as f64 - tfloor))
    } else {
        "?".into()
    };
    let _ = writeln!(
        o,
        "| **all** | | {tcnt} | {:.0} | {:.1} | **{:.0}** | | {above_all} |",
        tns as f64 / tcnt.max(1) as f64,
        per_req(tcnt as f64),
        per_req(tns as f64)
    );
    match floor {
        Some(f) => {
            let _ = writeln!(
                o,
                "\nThe run-time accounting's floor: with `kernel.bpf_stats_enabled` every run is timed by two clock reads, part of which lands in the time it reports. Programs that do nothing (`src/bpf/floor.bpf.c`: one of each type, on the agent's hooks: tp_btf, raw_tp and tracepoint at the socket layer, tcx both ways on the pod's veth, netfilter at the DNAT hook), in one more block of the same open-loop load without the agent:\n"
            );
            let _ = writeln!(
                o,
                "| program type | empty runs | ns / run |\n|---|---:|---:|"
            );
            for (kind, &(ns, cnt)) in &f.by_kind {
                let _ = writeln!(
                    o,
                    "| {kind} | {cnt} | {:.0} |",
                    ns as f64 / cnt.max(1) as f64
                );
            }
            for e in &f.errors {
                let _ = writeln!(o, "\n- not attached: {e}");
            }
            let _ = writeln!(
                o,
                "\nThe agent's programs' time less that floor, a run for a run (what they cost a node with the accounting off, as production nodes run): {} ns a request of the {:.0} measured. The goals are read against the measured figure.",
                above_all.trim_matches('*'),
                per_req(tns as f64)
            );
        }
        None => {
            let _ = writeln!(
                o,
                "\nThe run-time accounting's floor was not measured in this run."
            );
        }
    }
    o
}
