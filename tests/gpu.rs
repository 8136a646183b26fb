//! Kernel test of the CUDA uprobes (issue 9): a stand-in libcuda.so.1 built from
//! `tests/fixtures/fake_libcuda.c` (the driver's symbols with their real signatures) and a
//! program that dlopens it and calls each function a known number of times with known sizes.
//! The agent finds the library in that process's mappings, attaches, and its counters must
//! match exactly; the sync wait must match the time the program spent in cuStreamSynchronize.
//! Per request: an HTTP server on the same library (`tests/fixtures/cuda_server.c`) launches a
//! known number of kernels before the first token and after it; each record must say exactly
//! that many for its queue_prefill and decode. Counters are per target cgroup: in the shape of
//! vLLM V1 the HTTP process never loads libcuda and a forked engine process of the same cgroup
//! makes every call; its calls must be in the requests' records and the pod's counters, and a
//! process of another cgroup on the same library must count nothing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kernel_tests_enabled, Agent};
use testbed::{CgroupDriver, PodCgroup};

/// One `work` command of tests/fixtures/cuda_app.c.
const WORK_LAUNCHES: u64 = 1000 + 500;
const WORK_GRAPHS: u64 = 300;
const WORK_MEMCPY_BYTES: u64 = 100 * 4096 + 50 * (1 << 20) + 25 * 12345;
const WORK_SYNCS: u64 = 20 + 10;
const BENCH_N: u64 = 200_000;
/// Probes per libcuda: 6 async symbols and cuStreamSynchronize (entry and return), each also in
/// its _ptsz form, and cuCtxSynchronize (entry and return).
const PROBES: usize = 18;

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
        App::spawn(Command::new(app).arg(lib))
    }

    /// Starts a fixture program and waits for its "ready".
    fn spawn(cmd: &mut Command) -> App {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting a fixture program");
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

/// Every `llmslo_gpu_*` sample of one pod.
#[derive(Debug, Default, PartialEq)]
struct Gpu {
    launches: u64,
    graphs: u64,
    bytes: u64,
    syncs: u64,
    wait_s: f64,
}

/// The samples of the process's pod (no pod here: empty labels).
fn gpu_metrics(agent: &Agent) -> Gpu {
    gpu_metrics_of(agent, "")
}

fn gpu_metrics_of(agent: &Agent, pod: &str) -> Gpu {
    gpu_counts_in(&agent.get("/metrics"), pod)
}

/// The GPU counters of `pod` ("" for a host process) in a /metrics exposition.
fn gpu_counts_in(m: &str, pod: &str) -> Gpu {
    let v = |name: &str| -> f64 {
        let prefix = format!("{name}{{namespace=\"\",pod=\"{pod}\"}} ");
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
    wait_counts_of(agent, "", launches, syncs)
}

fn wait_counts_of(agent: &Agent, pod: &str, launches: u64, syncs: u64) -> Gpu {
    let m = agent.wait_metrics(Duration::from_secs(15), |m| {
        let g = gpu_counts_in(m, pod);
        g.launches >= launches && g.syncs >= syncs
    });
    gpu_counts_in(&m, pod)
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
    assert_eq!(l["attached"].as_array().unwrap().len(), PROBES, "{l}");
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

/// What one request to tests/fixtures/cuda_server.c makes the driver do: between reading it and
/// writing the first token, `prefill` cuLaunchKernel, `ptsz` cuLaunchKernel_ptsz, `graphs`
/// graph launches and `syncs` 5 ms synchronisations; `decode` launches between the first token
/// and the last write.
#[derive(Debug, Clone, Copy)]
struct Work {
    prefill: u64,
    ptsz: u64,
    graphs: u64,
    syncs: u64,
    decode: u64,
}

const fn work(prefill: u64, ptsz: u64, graphs: u64, syncs: u64, decode: u64) -> Work {
    Work {
        prefill,
        ptsz,
        graphs,
        syncs,
        decode,
    }
}

fn cuda_request(port: u16, w: Work) -> String {
    use std::io::Read;
    let path = format!(
        "/v1/completions?prefill={}&ptsz={}&graphs={}&syncs={}&decode={}",
        w.prefill, w.ptsz, w.graphs, w.syncs, w.decode
    );
    let body = r#"{"model":"fake","prompt":"hi","stream":true}"#;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.ends_with("data: [DONE]\n\n"), "{resp}");
    path
}

#[test]
fn per_request_gpu_activity_is_exact() {
    if !kernel_tests_enabled("per_request_gpu_activity_is_exact") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmslo-gpureq-{}", std::process::id()));
    let (lib, _) = build(&dir);
    let server = dir.join("cuda_server");
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    cc(
        &server,
        &[fx.join("cuda_server.c").to_str().unwrap(), "-ldl"],
    );
    let port = 20000 + (std::process::id() % 10000) as u16;
    let srv = App::spawn(Command::new(&server).arg(&lib).arg(port.to_string()));
    let pid = srv.child.id().to_string();
    let agent = Agent::start(&["--no-auto", "--no-network", "--target-pid", &pid]);
    let t0 = Instant::now();
    while gpu_libraries(&agent).is_empty() && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gpu_libraries(&agent).len(), 1, "{}", agent.log_text());

    // One with cuLaunchKernel_ptsz only: the per-thread-stream form is counted as a launch.
    let cases = [
        work(7, 0, 2, 1, 11),
        work(0, 0, 0, 0, 5),
        work(250, 0, 3, 2, 0),
        work(0, 13, 0, 0, 40),
    ];
    let recs = run_requests(&agent, port, &cases);
    let launches: u64 = cases.iter().map(|w| w.prefill + w.ptsz + w.decode).sum();
    let syncs: u64 = cases.iter().map(|w| w.syncs).sum();
    let g = wait_counts(&agent, launches, syncs);
    assert_eq!((g.launches, g.syncs), (launches, syncs), "{g:?}");
    for r in &recs {
        // Run-queue figures are on: the one thread that served it has figures.
        let w = &r["cpu_runqueue_wait_ms"];
        assert!(
            w["queue_prefill"].as_f64().is_some() && w["total"].as_f64().is_some(),
            "{r}"
        );
    }
    let m = agent.get("/metrics");
    assert!(
        m.contains("llmslo_request_cpu_runqueue_wait_seconds_count{namespace=\"\",pod=\"\",model=\"fake\",route=\"/v1/completions\",stage=\"decode\"} 4"),
        "{m}"
    );
    common::promtool_check(&m);
    drop(agent);

    // `gpu_uprobes: false`: the same server, nothing probed, no GPU figures (null, not 0).
    let agent = Agent::start_with_config(
        "gpu_uprobes: false\ncrosscheck:\n  enabled: false\n",
        &["--no-auto", "--no-network", "--target-pid", &pid],
    );
    cuda_request(port, work(5, 0, 1, 1, 3));
    let recs = agent.wait_requests(Duration::from_secs(10), |r| !r.is_empty());
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert!(recs[0]["gpu"]["queue_prefill"].is_null(), "{}", recs[0]);
    assert!(recs[0]["gpu"]["decode"].is_null(), "{}", recs[0]);
    assert!(gpu_libraries(&agent).is_empty(), "{}", agent.log_text());
    assert!(!agent.get("/metrics").contains("llmslo_gpu_"));
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `cases` one at a time and checks each record's per-stage GPU figures against what the
/// server was asked to do; answers the records in order.
fn run_requests(agent: &Agent, port: u16, cases: &[Work]) -> Vec<serde_json::Value> {
    let before = agent.get_json("/api/v1/requests")["requests"]
        .as_array()
        .map_or(0, Vec::len);
    let paths: Vec<String> = cases.iter().map(|&w| cuda_request(port, w)).collect();
    let mut recs =
        agent.wait_requests(Duration::from_secs(10), |r| r.len() >= before + cases.len());
    assert_eq!(recs.len(), before + cases.len(), "{recs:?}");
    // Records carry the path without its query: match them by order (one at a time).
    recs.sort_by_key(|r| r["id"].as_u64());
    let recs = recs.split_off(before);
    for ((w, path), r) in cases.iter().zip(&paths).zip(&recs) {
        assert_eq!(r["path"], "/v1/completions", "{r}");
        let (qp, d) = (&r["gpu"]["queue_prefill"], &r["gpu"]["decode"]);
        assert_eq!(
            (qp["launches"].as_u64(), qp["graph_launches"].as_u64()),
            (Some(w.prefill + w.ptsz), Some(w.graphs)),
            "{path}: {r}"
        );
        assert_eq!(
            (d["launches"].as_u64(), d["graph_launches"].as_u64()),
            (Some(w.decode), Some(0)),
            "{path}: {r}"
        );
        let qp_ms = r["stages"]["queue_prefill"].as_f64().unwrap();
        let rate = qp["launches_per_s"].as_f64().unwrap();
        let n = w.prefill + w.ptsz + w.graphs;
        assert!(
            (rate - n as f64 / (qp_ms / 1e3)).abs() <= 1e-6 * rate.max(1.0),
            "{path}: {r}"
        );
        // Each sync sleeps 5 ms inside the probes' window; queue_prefill holds them all.
        let sync = qp["sync_wait_ms"].as_f64().unwrap();
        let busy = qp["busy_fraction"].as_f64().unwrap();
        assert!(
            sync >= 5.0 * w.syncs as f64 && sync <= qp_ms,
            "{path}: sync {sync} ms in a {qp_ms} ms stage"
        );
        assert!((0.0..=1.0).contains(&busy), "{path}: {r}");
        if w.syncs > 0 {
            assert!(busy > 0.5, "{path}: mostly synchronising, busy {busy}: {r}");
        }
        assert_eq!(d["sync_wait_ms"].as_f64(), Some(0.0), "{path}: {r}");
    }
    recs
}

/// `prog` started inside `cg` (it moves itself there before exec, so its children are born in it).
fn in_cgroup(cg: &PodCgroup, prog: &Path) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
        .arg(cg.path().join("cgroup.procs"))
        .arg(prog);
    c
}

/// The tgids and cgroup ids of the one attached libcuda, once `want` says they are complete.
fn wait_lib(agent: &Agent, want: impl Fn(&[u64]) -> bool) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let libs = gpu_libraries(agent);
        let tgids: Vec<u64> = libs
            .first()
            .and_then(|l| l["tgids"].as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        if (libs.len() == 1 && want(&tgids)) || t0.elapsed() > Duration::from_secs(15) {
            assert_eq!(libs.len(), 1, "{libs:?}\n{}", agent.log_text());
            return libs[0].clone();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn engine_process_in_the_servers_cgroup_is_counted() {
    if !kernel_tests_enabled("engine_process_in_the_servers_cgroup_is_counted") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmslo-gpucg-{}", std::process::id()));
    let (lib, app_bin) = build(&dir);
    let server = dir.join("cuda_server");
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    cc(
        &server,
        &[fx.join("cuda_server.c").to_str().unwrap(), "-ldl"],
    );
    // The server's pod (a kubelet-style container cgroup) and another pod, not traced.
    let cg = PodCgroup::create(CgroupDriver::Systemd, "burstable").unwrap();
    let other_cg = PodCgroup::create(CgroupDriver::Systemd, "besteffort").unwrap();
    let pod = "vllm-engine-0";
    let port = 20000 + ((std::process::id() + 5000) % 10000) as u16;
    let mut srv = App::spawn(
        in_cgroup(&cg, &server)
            .arg(&lib)
            .arg(port.to_string())
            .arg("engine")
            .env("HOSTNAME", pod),
    );
    let srv_pid = u64::from(srv.child.id());
    let engine: u64 = srv
        .read_line()
        .strip_prefix("engine ")
        .expect("the server names its engine")
        .parse()
        .unwrap();
    // Another process of the server's cgroup on CUDA (as vLLM's TP workers are), and one of
    // another cgroup on the same library file.
    let mut helper = App::spawn(in_cgroup(&cg, &app_bin).arg(&lib));
    let helper_pid = u64::from(helper.child.id());
    let mut stranger = App::spawn(in_cgroup(&other_cg, &app_bin).arg(&lib));
    let stranger_pid = u64::from(stranger.child.id());

    let agent = Agent::start(&[
        "--no-auto",
        "--no-network",
        "--target-pid",
        &srv_pid.to_string(),
    ]);
    let l = wait_lib(&agent, |t| t.contains(&engine) && t.contains(&helper_pid));
    // Probed in the cgroup's processes that map it: not the HTTP process (it never loaded
    // libcuda), not the other cgroup's.
    let tgids: Vec<u64> = l["tgids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut want = vec![engine, helper_pid];
    want.sort();
    assert_eq!(
        tgids, want,
        "server {srv_pid}, stranger {stranger_pid}: {l}"
    );
    assert_eq!(l["cgroup_ids"], serde_json::json!([cg.id()]), "{l}");
    assert_eq!(l["attached"].as_array().unwrap().len(), PROBES, "{l}");
    assert_eq!(l["errors"].as_array().unwrap().len(), 0, "{l}");

    let cases = [
        work(7, 3, 2, 1, 11),
        work(0, 0, 0, 0, 5),
        work(250, 0, 3, 2, 0),
        work(13, 40, 0, 0, 40),
    ];
    run_requests(&agent, port, &cases);
    let launches: u64 = cases.iter().map(|w| w.prefill + w.ptsz + w.decode).sum();
    let graphs: u64 = cases.iter().map(|w| w.graphs).sum();
    let syncs: u64 = cases.iter().map(|w| w.syncs).sum();
    let g = wait_counts_of(&agent, pod, launches, syncs);
    assert_eq!(
        (g.launches, g.graphs, g.syncs, g.bytes),
        (launches, graphs, syncs, 0),
        "{g:?}"
    );
    eprintln!("engine process: {launches} launches, {graphs} graph launches, {syncs} syncs in {} requests, all counted for pod {pod}", cases.len());

    // The other cgroup's process: nothing counted, and no probe in it (it pays nothing).
    stranger.cmd("work");
    let untargeted = stranger.cmd(&format!("bench {BENCH_N}"));
    // A helper of the server's cgroup: counted with the pod.
    helper.cmd("work");
    let h = wait_counts_of(&agent, pod, launches + WORK_LAUNCHES, syncs + WORK_SYNCS);
    assert_eq!(
        (h.launches, h.graphs, h.bytes, h.syncs),
        (
            launches + WORK_LAUNCHES,
            graphs + WORK_GRAPHS,
            WORK_MEMCPY_BYTES,
            syncs + WORK_SYNCS
        ),
        "{h:?}"
    );
    assert!(
        untargeted.iter().all(|&ns| ns < 1000.0),
        "a process of another cgroup pays for the probes: {untargeted:?} ns per call"
    );
    // The helper moves to the other cgroup while its probes are still attached (until the next
    // discovery pass notices): the kernel's cgroup check keeps its calls out.
    std::fs::write(other_cg.path().join("cgroup.procs"), helper_pid.to_string()).unwrap();
    helper.cmd(&format!("bench {BENCH_N}"));
    helper.cmd("work");
    wait_lib(&agent, |t| t == [engine]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        gpu_metrics_of(&agent, pod),
        h,
        "calls from outside the target's cgroup were counted"
    );
    let m = agent.get("/metrics");
    common::promtool_check(&m);
    let series: Vec<&str> = m.lines().filter(|l| l.starts_with("llmslo_gpu_")).collect();
    // One pod: a call counted under any other cgroup would be a second, unlabelled series.
    assert_eq!(
        series.len(),
        5,
        "calls from outside the target's cgroup were counted: {series:?}"
    );
    drop((srv, helper, stranger));
    let _ = std::fs::remove_dir_all(&dir);
}
