//! Kernel test: the agent's tc programs coexist with a CNI's own (as with Cilium): a
//! pre-existing direct-action tc BPF program on a pod's veth keeps seeing every packet and its
//! verdicts stand while the agent runs; when the agent exits, its programs are gone and the
//! other one is still there.

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::node::server_pod;
use common::{kernel_tests_enabled, Agent};
use testbed::CgroupDriver;

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

fn sh(args: &[&str]) -> String {
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

fn count(map: &str) -> u64 {
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

fn send_udp(to: std::net::Ipv4Addr, n: usize) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    for _ in 0..n {
        s.send_to(b"x", (to, 9)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// Names of the programs in the interface's tcx chain (egress and ingress), in order, plus the
/// classic clsact filters bpftool lists.
fn tcx_progs(dev: &str) -> String {
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

#[test]
fn coexists_with_a_cnis_own_tc_program() {
    if !kernel_tests_enabled("coexists_with_a_cnis_own_tc_program") {
        return;
    }
    let sp = server_pod("coexist", CgroupDriver::Systemd, "llmslo-synth-server", &[]);
    let dev = sp.pod.host_veth().to_string();
    let map = format!("cnt{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("llmslo-coexist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("cni.bpf.c");
    std::fs::write(&src, COUNTER_C.replace("MAPNAME", &map)).unwrap();
    let obj = dir.join("cni.bpf.o");
    let arch_inc = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    sh(&[
        "clang",
        "-O2",
        "-g",
        "-target",
        "bpf",
        "-I",
        &arch_inc,
        "-c",
        src.to_str().unwrap(),
        "-o",
        obj.to_str().unwrap(),
    ]);
    // The CNI's program, direct-action on the pod veth's egress (traffic into the pod).
    sh(&["tc", "qdisc", "add", "dev", &dev, "clsact"]);
    sh(&[
        "tc",
        "filter",
        "add",
        "dev",
        &dev,
        "egress",
        "prio",
        "1",
        "handle",
        "1",
        "bpf",
        "da",
        "obj",
        obj.to_str().unwrap(),
        "sec",
        "tc",
    ]);

    send_udp(sp.pod.ip(), 300);
    assert_eq!(
        count(&map),
        300,
        "baseline: the CNI program counts every packet"
    );

    let mut agent = Agent::start(&["--no-auto", "--target-cgroup", sp.cg.cgroup_path()]);
    let t = agent.get_json("/api/v1/targets");
    assert!(
        t["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["ifname"] == dev.as_str() && i["error"].is_null()),
        "{t}"
    );
    let net = tcx_progs(&dev);
    assert!(
        net.contains("tcx/egress:tc_pod_in") && net.contains("cni.bpf.o"),
        "both programs attached:\n{net}"
    );
    send_udp(sp.pod.ip(), 300);
    assert_eq!(
        count(&map),
        600,
        "with the agent attached the CNI program still sees every packet"
    );

    assert!(
        agent.stop(),
        "agent exits cleanly on SIGTERM:\n{}",
        agent.log_text()
    );
    let net = tcx_progs(&dev);
    assert!(
        !net.contains("tc_pod_in") && !net.contains("tc_pod_out"),
        "agent programs left behind:\n{net}"
    );
    assert!(
        net.contains("cni.bpf.o"),
        "the CNI's program was removed:\n{net}"
    );
    send_udp(sp.pod.ip(), 100);
    assert_eq!(count(&map), 700);
    let _ = std::fs::remove_dir_all(&dir);
}
