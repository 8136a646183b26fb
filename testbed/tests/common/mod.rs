//! Shared helpers for the testbed's integration tests: a pod with the synthetic
//! server running in it, and the client-vs-server ground-truth checks.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use testbed::{
    read_server_log, CgroupDriver, ClientRecord, Pod, PodCgroup, PodProcess, ServerRecord,
};

pub const PORT: u16 = 8000;

/// A pod running the synthetic server. Field order = drop order: server first, then
/// the cgroup and the pod, then the log file.
pub struct ServerPod {
    pub server: PodProcess,
    pub cg: PodCgroup,
    pub pod: Pod,
    pub log: TempFile,
}

pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn temp_path(tag: &str) -> TempFile {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    TempFile(std::env::temp_dir().join(format!("llmslo-testbed-{}-{n}-{tag}", std::process::id())))
}

pub fn start_server(hint: &str, driver: CgroupDriver, qos: &str, extra: &[&str]) -> ServerPod {
    let pod = Pod::create(hint).expect("create pod");
    let cg = PodCgroup::create(driver, qos).expect("create cgroup");
    let log = temp_path("server.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmslo-synth-server"));
    cmd.args(["--listen", &format!("0.0.0.0:{PORT}"), "--log"])
        .arg(&log.0)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let server = pod.spawn(cmd, Some(&cg)).expect("spawn server");
    pod.wait_for_port(PORT, Duration::from_secs(10))
        .expect("server up");
    ServerPod {
        server,
        cg,
        pod,
        log,
    }
}

/// Server log, waiting until it has `expected` lines (aborted requests are logged
/// only once the server notices the client left).
pub fn server_log(sp: &ServerPod, expected: usize) -> Vec<ServerRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = read_server_log(&sp.log.0).unwrap_or_default();
        if recs.len() >= expected || Instant::now() > deadline {
            return recs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Delays between server write and client read, in ns, collected by `check_truth`.
#[derive(Default, Debug)]
pub struct Lags(pub Vec<u64>);

impl Lags {
    pub fn pct(&self, p: f64) -> u64 {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// Every client record against the server's ground truth: same requests, same token
/// counts, and every client observation after (and shortly after) the server's write.
pub fn check_truth(clients: &[ClientRecord], servers: &[ServerRecord], tokens: u64) -> Lags {
    let by_id: HashMap<String, &ServerRecord> = servers
        .iter()
        .map(|s| (s.request_id.clone().expect("request id logged"), s))
        .collect();
    assert_eq!(
        by_id.len(),
        servers.len(),
        "duplicate request ids in server log"
    );
    assert_eq!(servers.len(), clients.len(), "one server line per request");
    let mut lags = Lags::default();
    let mut lag = |client: u64, server: u64, what: &str, id: u64| {
        assert!(
            client >= server,
            "request {id}: client saw {what} {client} before server wrote it {server}"
        );
        lags.0.push(client - server);
    };
    for c in clients {
        let s = by_id
            .get(&c.request_id.to_string())
            .unwrap_or_else(|| panic!("no server line for {}", c.request_id));
        assert_eq!(c.error, None, "request {}", c.request_id);
        assert_eq!(c.status, 200);
        assert_eq!(s.status, 200);
        assert_eq!(s.stream, c.streaming);
        assert_eq!(s.tokens, tokens);
        let port: u16 = s.peer.rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(port, c.local_port, "request {} peer port", c.request_id);
        assert!(
            s.read_done_ns >= c.send_ns,
            "request {}: server read the request at {} before the client sent it at {}",
            c.request_id,
            s.read_done_ns,
            c.send_ns
        );
        let content = c.content_times();
        if c.aborted {
            assert!(
                content.len() <= s.token_ns.len(),
                "request {}",
                c.request_id
            );
            continue;
        }
        assert!(
            !s.aborted,
            "request {} aborted at server only",
            c.request_id
        );
        assert_eq!(
            c.completion_tokens,
            Some(tokens),
            "usage of {}",
            c.request_id
        );
        if c.streaming {
            assert_eq!(
                content.len() as u64,
                tokens,
                "content events of {}",
                c.request_id
            );
            assert_eq!(
                s.token_ns.len(),
                content.len(),
                "server token writes of {}",
                c.request_id
            );
            for (cn, sn) in content.iter().zip(&s.token_ns) {
                lag(*cn, *sn, "token", c.request_id);
            }
            assert_eq!(c.ttft_ns, Some(content[0] - c.send_ns));
        }
        lag(
            c.first_byte_ns.unwrap(),
            s.resp_first_ns.unwrap(),
            "first byte",
            c.request_id,
        );
        lag(
            c.end_ns.unwrap(),
            s.resp_last_ns.unwrap(),
            "last byte",
            c.request_id,
        );
    }
    lags
}

/// Whether `pid` is in the cgroup `path` (as /proc/<pid>/cgroup shows v2 paths).
pub fn proc_cgroup(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap()
}
