//! Kernel compatibility (issue: reliability): every BPF program loads on this kernel, and what
//! the verifier did with each (instructions processed) is recorded in CI and compared with the
//! checked-in baseline `docs/verifier-baseline.json`, so a change that grows a program sharply
//! fails here instead of surprising a user on a kernel with tighter limits. After an intended
//! change: `LLMSLO_VERIFIER_BLESS=1 cargo test --test verifier` rewrites the baseline.

mod common;

use std::collections::BTreeMap;

use common::{kernel_tests_enabled, Agent};
use serde_json::Value;

/// Growth over the baseline that fails the test.
const MAX_GROWTH: f64 = 1.5;
/// Half of the kernel's 1M-instruction complexity limit: room left on every program.
const MAX_INSNS: u64 = 500_000;

#[test]
fn verifier_statistics_stay_near_the_baseline() {
    if !kernel_tests_enabled("verifier_statistics_stay_near_the_baseline") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let baseline: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/verifier-baseline.json")).unwrap(),
    )
    .unwrap();
    let base: BTreeMap<String, u64> = baseline["verified_insns"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    // Network programs included: the netfilter ones load where the kernel has netfilter links.
    let agent = Agent::start(&["--no-auto"]);
    let t = agent.get_json("/api/v1/targets");
    let mut now = verified(&t);
    // The default set here is the socket layer's (this kernel has its tracepoints); the other
    // two, each loaded by an agent of its own, add the programs only they load.
    assert!(
        now.contains_key("l7/sock_send") && !now.contains_key("l7/enter_write"),
        "the socket-layer programs load by default, the per-syscall read/write ones do not"
    );
    assert_eq!(t["syscall_hooks"], "sock", "/api/v1/targets names the set");
    for (hooks, own) in [
        ("raw", &["l7/sys_enter", "l7/sys_exit"][..]),
        (
            "tracepoint",
            &[
                "l7/enter_read",
                "l7/enter_recvfrom",
                "l7/enter_readv",
                "l7/enter_recvmsg",
                "l7/enter_write",
                "l7/enter_sendto",
                "l7/enter_writev",
                "l7/enter_sendmsg",
                "l7/exit_read",
                "l7/exit_recvfrom",
                "l7/exit_readv",
                "l7/exit_recvmsg",
                "l7/exit_write",
                "l7/exit_sendto",
                "l7/exit_writev",
                "l7/exit_sendmsg",
            ][..],
        ),
    ] {
        let other = Agent::start_env(
            &["--no-auto", "--no-network"],
            &[("LLMSLO_SYSCALL_HOOKS", hooks)],
        );
        let ot = other.get_json("/api/v1/targets");
        assert_eq!(ot["syscall_hooks"], hooks);
        let r = verified(&ot);
        for &p in own {
            let n = *r
                .get(p)
                .unwrap_or_else(|| panic!("{p} not loaded with LLMSLO_SYSCALL_HOOKS={hooks}"));
            now.insert(p.to_string(), n);
        }
        assert!(
            !r.contains_key("l7/sock_send"),
            "the socket-layer programs must not load with LLMSLO_SYSCALL_HOOKS={hooks}"
        );
    }
    let mut table = format!(
        "verifier: instructions processed per program (kernel {})\n{:<32} {:>10} {:>10} {:>7}\n",
        t["kernel"].as_str().unwrap_or("?"),
        "program",
        "baseline",
        "now",
        "ratio"
    );
    let mut bad = Vec::new();
    for (name, &b) in &base {
        let Some(&n) = now.get(name) else {
            bad.push(format!("{name}: not loaded (baseline {b})"));
            continue;
        };
        let ratio = n as f64 / b.max(1) as f64;
        table += &format!("{name:<32} {b:>10} {n:>10} {ratio:>7.2}\n");
        if ratio > MAX_GROWTH || n > MAX_INSNS {
            bad.push(format!(
                "{name}: {n} instructions, baseline {b} ({ratio:.2}x)"
            ));
        }
    }
    for (name, n) in now.iter().filter(|(k, _)| !base.contains_key(*k)) {
        table += &format!("{name:<32} {:>10} {n:>10}   (new)\n", "-");
        bad.push(format!("{name}: not in docs/verifier-baseline.json ({n})"));
    }
    // Recorded for CI's log (make test prints it).
    let out = root.join("target/verifier-stats.txt");
    std::fs::write(&out, &table).unwrap();
    eprintln!("{table}");
    // An intended change: LLMSLO_VERIFIER_BLESS=1 rewrites the baseline with what loaded now.
    if std::env::var_os("LLMSLO_VERIFIER_BLESS").is_some() {
        let mut b = baseline.clone();
        b["kernel"] = t["kernel"].clone();
        b["verified_insns"] = serde_json::to_value(&now).unwrap();
        std::fs::write(
            root.join("docs/verifier-baseline.json"),
            serde_json::to_string_pretty(&b).unwrap() + "\n",
        )
        .unwrap();
        eprintln!("docs/verifier-baseline.json rewritten");
        return;
    }
    assert!(
        bad.is_empty(),
        "verifier statistics off the baseline (update docs/verifier-baseline.json if intended):\n{}\n{table}",
        bad.join("\n")
    );
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("llmslo_agent_bpf_verified_insns{object=\"l7\",program=\"sock_recv\"}")
    );
}

/// `object/program` → instructions processed, from `/api/v1/targets`.
fn verified(t: &Value) -> BTreeMap<String, u64> {
    t["verifier"]
        .as_array()
        .expect("verifier stats in /api/v1/targets")
        .iter()
        .map(|v| {
            (
                format!(
                    "{}/{}",
                    v["object"].as_str().unwrap(),
                    v["program"].as_str().unwrap()
                ),
                v["verified_insns"].as_u64().unwrap(),
            )
        })
        .collect()
}
