//! Kernel tests: the agent's tc programs coexist with a CNI's own (as with Cilium): a
//! pre-existing direct-action tc BPF program on a pod's veth keeps seeing every packet and its
//! verdicts stand while the agent runs; when the agent exits, its programs are gone and the
//! other one is still there. With classic clsact filters, which outlive a killed agent, the
//! next agent removes exactly the ones the dead one left.

mod common;

use common::node::cni::{send_udp, sh, tc_chain, AgentEnv, CniCounter};
use common::node::server_pod;
use common::{kernel_tests_enabled, Agent};
use llm_slo_agent::netpath::{CLSACT_HANDLE, ENV_TC_ATTACH};
use testbed::CgroupDriver;

#[test]
fn coexists_with_a_cnis_own_tc_program() {
    if !kernel_tests_enabled("coexists_with_a_cnis_own_tc_program") {
        return;
    }
    let sp = server_pod("coexist", CgroupDriver::Systemd, "llmslo-synth-server", &[]);
    let dev = sp.pod.host_veth().to_string();
    let cni = CniCounter::attach(&dev);

    send_udp(sp.pod.ip(), 300);
    assert_eq!(
        cni.count(),
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
    let net = tc_chain(&dev);
    assert!(
        net.contains("tcx/egress:tc_pod_in") && net.contains("cni.bpf.o"),
        "both programs attached:\n{net}"
    );
    send_udp(sp.pod.ip(), 300);
    assert_eq!(
        cni.count(),
        600,
        "with the agent attached the CNI program still sees every packet"
    );

    assert!(
        agent.stop(),
        "agent exits cleanly on SIGTERM:\n{}",
        agent.log_text()
    );
    let net = tc_chain(&dev);
    assert!(
        !net.contains("tc_pod_in") && !net.contains("tc_pod_out"),
        "agent programs left behind:\n{net}"
    );
    assert!(
        net.contains("cni.bpf.o"),
        "the CNI's program was removed:\n{net}"
    );
    send_udp(sp.pod.ip(), 100);
    assert_eq!(cni.count(), 700);
}

/// Our clsact filters on `dev`, as tc(8) lists them ("handle 0x11c5"), one line per direction.
fn our_filters(dev: &str) -> Vec<String> {
    let ours = format!("handle {CLSACT_HANDLE:#x} ");
    ["ingress", "egress"]
        .into_iter()
        .flat_map(|dir| {
            sh(&["tc", "filter", "show", "dev", dev, dir])
                .lines()
                .filter(|l| l.contains(&ours))
                .map(|l| format!("{dir}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn has_clsact(dev: &str) -> bool {
    sh(&["tc", "qdisc", "show", "dev", dev]).contains("qdisc clsact")
}

#[test]
fn clsact_filters_left_by_a_killed_agent_are_removed_at_the_next_start() {
    if !kernel_tests_enabled("clsact_filters_left_by_a_killed_agent_are_removed_at_the_next_start")
    {
        return;
    }
    let _env = AgentEnv::set(&[(ENV_TC_ATTACH, "clsact")]);
    let sp = server_pod("clsact", CgroupDriver::Systemd, "llmslo-synth-server", &[]);
    let outside = testbed::topo::Outside::create().expect("client outside the node");
    let (dev, uplink) = (sp.pod.host_veth().to_string(), outside.uplink().to_string());
    // Someone else's clsact qdisc and filters on the pod veth: a CNI's bpf program on egress
    // (at our priority), a u32 filter on ingress.
    let cni = CniCounter::attach(&dev);
    sh(&[
        "tc", "filter", "add", "dev", &dev, "ingress", "prio", "3", "protocol", "ip", "u32",
        "match", "ip", "protocol", "17", "0xff", "flowid", "1:1",
    ]);
    let foreign = |dev: &str| {
        let mut f: Vec<String> = ["ingress", "egress"]
            .into_iter()
            .map(|d| sh(&["tc", "filter", "show", "dev", dev, d]))
            .collect::<Vec<_>>()
            .join("\n")
            .lines()
            .filter(|l| !l.contains(&format!("handle {CLSACT_HANDLE:#x} ")) || !l.contains("tc_"))
            .map(str::to_string)
            .collect();
        f.sort();
        f
    };
    let before = foreign(&dev);
    assert!(!has_clsact(&uplink), "the uplink starts without a qdisc");

    let args = [
        "--no-auto",
        "--target-cgroup",
        sp.cg.cgroup_path(),
        "--node-device",
        &uplink,
    ];
    let mut first = Agent::start(&args);
    let t = first.get_json("/api/v1/targets");
    for d in [&dev, &uplink] {
        assert!(
            t["interfaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["ifname"] == d.as_str()
                    && i["mechanism"] == "clsact"
                    && i["error"].is_null()),
            "{d} hooked with clsact: {t}"
        );
        assert_eq!(our_filters(d).len(), 2, "{d}: {}", tc_chain(d));
    }
    send_udp(sp.pod.ip(), 100);
    assert_eq!(
        cni.count(),
        100,
        "the CNI's program sees every packet beside ours"
    );

    // kill -9: nothing runs on the way out, and classic filters are not tied to the process.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert_eq!(
        our_filters(&dev).len(),
        2,
        "a killed agent leaves its filters"
    );
    assert_eq!(our_filters(&uplink).len(), 2);

    let mut second = Agent::start(&args);
    assert!(
        second
            .log_text()
            .contains("removing clsact filters a previous agent left behind"),
        "{}",
        second.log_text()
    );
    assert_eq!(our_filters(&dev).len(), 2, "the new agent's own filters");
    send_udp(sp.pod.ip(), 100);
    assert_eq!(cni.count(), 200);
    assert!(second.stop(), "clean exit:\n{}", second.log_text());

    assert!(our_filters(&dev).is_empty(), "{}", tc_chain(&dev));
    assert!(our_filters(&uplink).is_empty(), "{}", tc_chain(&uplink));
    assert_eq!(foreign(&dev), before, "everyone else's filters stay");
    assert!(has_clsact(&dev), "the CNI's qdisc stays");
    assert!(!has_clsact(&uplink), "the qdisc the agent created goes");
    send_udp(sp.pod.ip(), 100);
    assert_eq!(cni.count(), 300);
}
