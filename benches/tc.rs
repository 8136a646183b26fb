//! Cost of the agent's tc programs on the packet path: UDP packets/s from the root netns into a
//! testbed pod through its host-side veth (where the agent attaches `tc_pod_in`), with and
//! without the agent, in interleaved blocks. Root only; prints a markdown table and, with
//! LLMSLO_BENCH_WRITE=1, rewrites the tc section of docs/BENCHMARKS.md.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const BLOCK: Duration = Duration::from_secs(3);
const PAIRS: usize = 4;

fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_llm-slo-agent")
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    b.starts_with("HTTP/1.1 200").then_some(b)
}

/// The agent with `target` (a process in the pod) as its target: only target pods' veths are
/// hooked.
fn start_agent(veth: &str, target: u32) -> AgentProc {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(agent_bin())
        .args(["run", "--no-auto", "--listen", &addr.to_string()])
        .args(["--target-pid", &target.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let a = AgentProc(child);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Some(t) = get(addr, "/api/v1/targets") {
            if t.contains(&format!("\"ifname\":\"{veth}\"")) {
                return a;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("agent did not hook {veth} within 30 s");
}

/// Sends 64-byte UDP datagrams to the pod for one block; returns packets/s.
fn blast(to: SocketAddr) -> f64 {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    let payload = [0u8; 64];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < BLOCK {
        for _ in 0..1000 {
            if s.send_to(&payload, to).is_ok() {
                n += 1;
            }
        }
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n!!! SKIPPING the tc overhead benchmark: needs root (netns, BPF) !!!\n");
        return;
    }
    let pod = testbed::Pod::create("tcbench").expect("pod");
    let to = SocketAddr::new(pod.ip().into(), 9);
    let veth = pod.host_veth().to_string();
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let target = pod.spawn(sleeper, None).expect("a process in the pod");
    let mut rows = Vec::new();
    for pair in 0..PAIRS {
        let off = blast(to);
        let agent = start_agent(&veth, target.pid());
        let on = blast(to);
        drop(agent);
        rows.push((pair + 1, off, on));
    }
    let mut ratios: Vec<f64> = rows.iter().map(|r| r.2 / r.1).collect();
    ratios.sort_by(f64::total_cmp);
    let mut md = String::from("### tc programs on the packet path (`benches/tc.rs`)\n\n");
    md += &format!(
        "- date: {}; kernel {}; {} CPUs\n- command (root): `LLMSLO_BENCH_WRITE=1 cargo bench --bench tc`\n\
         - 64-byte UDP datagrams from the root netns into a pod through its host veth, {} s blocks, off/on interleaved; \
         \"on\" = the agent running with a process in the pod as its target, so its tcx programs are on the pod's veth and look at every packet (none is for a traced port) and pass it on\n\n",
        String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%F %H:%M UTC").output().unwrap().stdout).trim(),
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout).trim(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        BLOCK.as_secs()
    );
    md += "| pair | off (pkts/s) | on (pkts/s) | on ÷ off |\n|---|---:|---:|---:|\n";
    for (p, off, on) in &rows {
        md += &format!("| {p} | {off:.0} | {on:.0} | {:.3} |\n", on / off);
    }
    md += &format!(
        "\nRatio min / median / max: {:.3} / {:.3} / {:.3}\n",
        ratios[0],
        ratios[ratios.len() / 2],
        ratios[ratios.len() - 1]
    );
    println!("{md}");
    if std::env::var("LLMSLO_BENCH_WRITE").as_deref() == Ok("1") {
        match common::write_doc("tc", md.trim_end()) {
            Ok(p) => println!("results written to {}", p.display()),
            Err(e) => {
                eprintln!("could not write the results: {e:#}");
                std::process::exit(1);
            }
        }
    }
}
