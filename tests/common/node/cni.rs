//! The parts of a CNI's node a kernel test needs besides pods: the CNI's config files in a
//! directory the agent is pointed at, and a CNI's own tc program on a pod's veth that counts
//! the packets it sees (a stand-in for Cilium's).

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// A stand-in for Cilium's program: counts UDP packets to port 9 in a map and returns
/// TC_ACT_OK, a verdict, like Cilium's programs do.
const COUNTER_C: &str = r#"
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } MAPNAME SEC(".maps");
SEC("tc") int cni_counter(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data; struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != 17) return TC_ACT_OK;
    struct udphdr *udp = (void *)ip + ip->ihl * 4;
    if ((void *)(udp + 1) > end || udp->dest != bpf_htons(9)) return TC_ACT_OK;
    __u32 k = 0; __u64 *v = bpf_map_lookup_elem(&MAPNAME, &k);
    if (v) __sync_fetch_and_add(v, 1);
    return TC_ACT_OK;
}
char LICENSE[] SEC("license") = "GPL";
"#;

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn map_count(map: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&["bpftool", "-j", "map", "dump", "name", map])).unwrap();
    let val = &v[0]["value"];
    val.as_u64()
        .or_else(|| {
            // Older bpftool prints the value as a byte array.
            val.as_array().map(|b| {
                b.iter().rev().fold(0u64, |acc, x| {
                    acc << 8
                        | u64::from_str_radix(x.as_str().unwrap().trim_start_matches("0x"), 16)
                            .unwrap()
                })
            })
        })
        .unwrap()
}

pub fn send_udp(to: std::net::Ipv4Addr, n: usize) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    for _ in 0..n {
        s.send_to(b"x", (to, 9)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// Names of the programs in the interface's tcx chain (egress and ingress), in order, plus the
/// classic clsact filters bpftool lists.
pub fn tc_chain(dev: &str) -> String {
    use libbpf_rs::libbpf_sys as sys;
    let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut names = Vec::new();
    for (dir, at) in [
        ("egress", sys::BPF_TCX_EGRESS),
        ("ingress", sys::BPF_TCX_INGRESS),
    ] {
        let mut ids = [0u32; 16];
        // SAFETY: bpf_prog_query_opts is plain data; zero is its documented initial state.
        let mut opts: sys::bpf_prog_query_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<sys::bpf_prog_query_opts>() as _;
        opts.prog_ids = ids.as_mut_ptr();
        opts.__bindgen_anon_1.count = ids.len() as u32;
        // SAFETY: opts points at a buffer of `count` ids that outlives the call.
        let r = unsafe { sys::bpf_prog_query_opts(ifindex, at, &mut opts) };
        assert_eq!(r, 0, "bpf_prog_query_opts on {dev}");
        // SAFETY: the kernel wrote the number of ids it returned.
        let n = unsafe { opts.__bindgen_anon_1.count } as usize;
        for id in &ids[..n] {
            let v: serde_json::Value = serde_json::from_str(&sh(&[
                "bpftool",
                "-j",
                "prog",
                "show",
                "id",
                &id.to_string(),
            ]))
            .unwrap();
            names.push(format!("tcx/{dir}:{}", v["name"].as_str().unwrap_or("?")));
        }
    }
    format!(
        "{}\n{}",
        names.join("\n"),
        sh(&["bpftool", "net", "show", "dev", dev])
    )
}

static COUNTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The CNI's counting program, attached with tc(8) as a direct-action clsact filter on `dev`'s
/// egress (toward the pod) at priority 1, handle 1, where Cilium puts its own.
pub struct CniCounter {
    pub dev: String,
    map: String,
    dir: PathBuf,
}

impl CniCounter {
    pub fn attach(dev: &str) -> CniCounter {
        let n = COUNTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // BPF object names hold 15 characters.
        let map = format!("c{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("llmslo-cni-prog-{map}"));
        std::fs::create_dir_all(&dir).unwrap();
        let c = CniCounter {
            dev: dev.to_string(),
            map,
            dir,
        };
        let src = c.dir.join("cni.bpf.c");
        std::fs::write(&src, COUNTER_C.replace("MAPNAME", &c.map)).unwrap();
        let obj = c.dir.join("cni.bpf.o");
        let arch_inc = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        let (src, obj) = (src.to_str().unwrap(), obj.to_str().unwrap());
        sh(&[
            "clang", "-O2", "-g", "-target", "bpf", "-I", &arch_inc, "-c", src, "-o", obj,
        ]);
        let qdisc = Command::new("tc")
            .args(["qdisc", "add", "dev", dev, "clsact"])
            .output()
            .unwrap();
        // A clsact qdisc already there (a CNI's) is fine.
        assert!(
            qdisc.status.success() || String::from_utf8_lossy(&qdisc.stderr).contains("exists"),
            "tc qdisc add: {}",
            String::from_utf8_lossy(&qdisc.stderr)
        );
        sh(&[
            "tc", "filter", "add", "dev", dev, "egress", "prio", "1", "handle", "1", "bpf", "da",
            "obj", obj, "sec", "tc",
        ]);
        c
    }

    /// UDP packets to port 9 the program has seen.
    pub fn count(&self) -> u64 {
        map_count(&self.map)
    }
}

impl Drop for CniCounter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Environment variables for the agents a test starts (children inherit ours), removed on drop.
/// It holds a lock, so tests of one binary that set the environment run one at a time.
pub struct AgentEnv {
    keys: Vec<String>,
    _lock: MutexGuard<'static, ()>,
}

impl AgentEnv {
    pub fn set(vars: &[(&str, &str)]) -> AgentEnv {
        let lock = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        AgentEnv {
            keys: vars.iter().map(|(k, _)| k.to_string()).collect(),
            _lock: lock,
        }
    }
}

impl Drop for AgentEnv {
    fn drop(&mut self) {
        for k in &self.keys {
            std::env::remove_var(k);
        }
    }
}

/// A node's CNI files in a temporary tree: `etc/cni/net.d/` and the state paths under a root,
/// laid out as on the host. Removed on drop.
pub struct CniFiles {
    pub root: PathBuf,
}

impl CniFiles {
    pub fn new(tag: &str) -> CniFiles {
        let root = std::env::temp_dir().join(format!("llmslo-cni-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc/cni/net.d")).unwrap();
        CniFiles { root }
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.root.join("etc/cni/net.d")
    }

    /// A file at `path` (absolute on a real node, e.g. /run/flannel/subnet.env) under the root.
    pub fn write(&self, path: &str, body: &str) -> &CniFiles {
        let p = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
        self
    }

    /// Points the agents started while the returned value lives at these files.
    pub fn agent_env(&self) -> AgentEnv {
        let conf = self.conf_dir();
        AgentEnv::set(&[
            (
                llm_slo_agent::discovery::net::ENV_CNI_CONF_DIR,
                conf.to_str().unwrap(),
            ),
            (
                llm_slo_agent::discovery::net::ENV_CNI_STATE_ROOT,
                self.root.to_str().unwrap(),
            ),
        ])
    }
}

impl Drop for CniFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
