//! Kernel test of the CUDA uprobes (issue 9): a stand-in libcuda.so.1 built from
//! `tests/fixtures/fake_libcuda.c` (the driver's symbols with their real signatures) and a
//! program that dlopens it and calls each function a known number of times with known sizes.
//! The agent finds the library in that process's mappings, attaches, and its counters must
//! match exactly; the sync wait must match the time the program spent in cuStreamSynchronize.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kernel_tests_enabled, Agent};

/// One `work` command of tests/fixtures/cuda_app.c.
const WORK_LAUNCHES: u64 = 1000 + 500;
const WORK_GRAPHS: u64 = 300;
const WORK_MEMCPY_BYTES: u64 = 100 * 4096 + 50 * (1 << 20) + 25 * 12345;
const WORK_SYNCS: u64 = 20 + 10;
const BENCH_N: u64 = 200_000;

fn cc(out: &Path, args: &[&str]) {
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(out)
        .args(args)
        .status()
        .expect("running cc (install gcc or clang)");
    assert!(st.success(), "cc {args:?} failed");
}

/// Builds the fake driver as `<dir>/lib/libcuda.so.1` and the program as `<dir>/cuda_app`.
fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    let lib = dir.join("lib/libcuda.so.1");
    let app = dir.join("cuda_app");
    cc(
        &lib,
        &[
            "-shared",
            "-fPIC",
            fx.join("fake_libcuda.c").to_str().unwrap(),
        ],
    );
    cc(&app, &[fx.join("cuda_app.c").to_str().unwrap(), "-ldl"]);
    (lib, app)
}

struct App {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl App {
    fn start(app: &Path, lib: &Path) -> App {
        let mut child = Command::new(app)
            .arg(lib)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting cuda_app");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut a = App {
            child,
            stdin,
            stdout,
        };
        assert_eq!(a.read_line(), "ready");
        a
    }

    fn read_line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    /// Sends one command; returns the numbers of its answer.
    fn cmd(&mut self, c: &str) -> Vec<f64> {
        writeln!(self.stdin, "{c}").unwrap();
        let l = self.read_line();
        let word = c.split(' ').next().unwrap();
        assert!(l.starts_with(word), "{c}: answered {l:?}");
        l.split(' ').skip(1).map(|v| v.parse().unwrap()).collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `llmslo_gpu_*` sample of the process's pod (no pod here: empty labels).
#[derive(Debug, Default, PartialEq)]
struct Gpu {
    launches: u64,
    graphs: u64,
    bytes: u64,
    syncs: u64,
    wait_s: f64,
}

fn gpu_metrics(agent: &Agent) -> Gpu {
    let m = agent.get("/metrics");
    let v = |name: &str| -> f64 {
        let prefix = format!("{name}{{namespace=\"\",pod=\"\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    };
    Gpu {
        launches: v("llmslo_gpu_kernel_launches_total") as u64,
        graphs: v("llmslo_gpu_graph_launches_total") as u64,
        bytes: v("llmslo_gpu_memcpy_bytes_total") as u64,
        syncs: v("llmslo_gpu_syncs_total") as u64,
        wait_s: v("llmslo_gpu_sync_wait_seconds_total"),
    }
}

/// Polls until the counters reach `launches` and `syncs` (counts only grow) or 15 s pass.
fn wait_counts(agent: &Agent, launches: u64, syncs: u64) -> Gpu {
    let t0 = Instant::now();
    loop {
        let g = gpu_metrics(agent);
        if (g.launches >= launches && g.syncs >= syncs) || t0.elapsed() > Duration::from_secs(15) {
            return g;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn gpu_libraries(agent: &Agent) -> Vec<serde_json::Value> {
    agent.get_json("/api/v1/targets")["gpu_libraries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn cuda_uprobes_count_exactly() {
    if !kernel_tests_enabled("cuda_uprobes_count_exactly") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmslo-gpu-{}", std::process::id()));
    let (lib, app_bin) = build(&dir);
    let mut app = App::start(&app_bin, &lib);
    let pid = app.child.id().to_string();
    // The cost of a call without probes, before the agent exists (not counted by it).
    let bare = app.cmd(&format!("bench {BENCH_N}"));
    // Maps the same file but is no target: the probes fire in it too and must count nothing.
    let mut other = App::start(&app_bin, &lib);

    let agent = Agent::start(&["--no-auto", "--no-network", "--target-pid", &pid]);
    let t0 = Instant::now();
    let libs = loop {
        let libs = gpu_libraries(&agent);
        if !libs.is_empty() || t0.elapsed() > Duration::from_secs(15) {
            break libs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        libs.len(),
        1,
        "libcuda not attached: {libs:?}\n{}",
        agent.log_text()
    );
    let l = &libs[0];
    assert_eq!(l["path"], lib.to_str().unwrap(), "{l}");
    assert_eq!(l["tgids"][0].as_u64(), Some(pid.parse().unwrap()), "{l}");
    assert_eq!(l["attached"].as_array().unwrap().len(), 10, "{l}");
    assert_eq!(l["errors"].as_array().unwrap().len(), 0, "{l}");

    let probed = app.cmd(&format!("bench {BENCH_N}"));
    let untargeted = other.cmd(&format!("bench {BENCH_N}"));
    other.cmd("work");
    let g = wait_counts(&agent, BENCH_N, BENCH_N);
    assert_eq!(
        (g.launches, g.syncs, g.graphs, g.bytes),
        (BENCH_N, BENCH_N, 0, 0),
        "{g:?}"
    );
    eprintln!(
        "uprobe cost per call ({BENCH_N} calls each): cuLaunchKernel {:.0} ns bare, {:.0} ns probed \
         (+{:.0} ns); cuCtxSynchronize (uprobe+uretprobe) {:.0} ns bare, {:.0} ns probed (+{:.0} ns)",
        bare[0],
        probed[0],
        probed[0] - bare[0],
        bare[1],
        probed[1],
        probed[1] - bare[1]
    );
    eprintln!(
        "untargeted process mapping the same libcuda: cuLaunchKernel {:.0} ns, cuCtxSynchronize {:.0} ns",
        untargeted[0], untargeted[1]
    );
    // Probes are attached per target pid: the kernel plants no breakpoint in other processes,
    // so they pay nothing (a uprobe trap costs microseconds).
    assert!(
        untargeted.iter().all(|&ns| ns < 1000.0),
        "a process that is not a target pays for the probes: {untargeted:?} ns per call"
    );

    let waited_ns = app.cmd("work")[0];
    let after = wait_counts(&agent, BENCH_N + WORK_LAUNCHES, BENCH_N + WORK_SYNCS);
    assert_eq!(
        (
            after.launches - g.launches,
            after.graphs,
            after.bytes,
            after.syncs - g.syncs
        ),
        (WORK_LAUNCHES, WORK_GRAPHS, WORK_MEMCPY_BYTES, WORK_SYNCS),
        "{after:?}"
    );
    // The program timed each cuStreamSynchronize (5 ms sleeps) around the call; the probes
    // time it inside, so theirs is a little shorter, plus 10 cuCtxSynchronize of ~nothing.
    let wait = after.wait_s - g.wait_s;
    let truth = waited_ns / 1e9;
    assert!(
        truth >= 0.1,
        "the fake driver slept less than 20 x 5 ms: {truth}"
    );
    assert!(
        wait <= truth + 0.001 && wait >= truth - 0.002,
        "sync wait {wait} s, program measured {truth} s"
    );

    // The process goes: the library is detached, its counts stay with its (empty) pod labels.
    writeln!(app.stdin, "quit").unwrap();
    let _ = app.child.wait();
    let t0 = Instant::now();
    while !gpu_libraries(&agent).is_empty() && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        gpu_libraries(&agent).is_empty(),
        "libcuda still attached after its process exited"
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        gpu_metrics(&agent),
        after,
        "counts changed after the process exited"
    );
    let m = agent.get("/metrics");
    common::promtool_check(&m);
    // One series per family (one pod), labelled by namespace and pod only.
    let gpu: Vec<&str> = m.lines().filter(|l| l.starts_with("llmslo_gpu_")).collect();
    assert_eq!(gpu.len(), 5, "{gpu:?}");
    for l in gpu {
        assert!(l.contains("{namespace=\"\",pod=\"\"} "), "{l}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
