//! A pod of the testbed with the synthetic server in it, for the kernel tests; [`cni`] has the
//! rest of a CNI's node (config files, a CNI's own tc program).

pub mod cni;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use testbed::netns::Wiring;
use testbed::{CgroupDriver, Pod, PodCgroup, PodProcess, ServerRecord};

pub const PORT: u16 = 8000;

pub struct ServerPod {
    // Field order is drop order: the server dies before its cgroup and netns go.
    pub server: PodProcess,
    pub cg: PodCgroup,
    pub pod: Pod,
    pub log: PathBuf,
    pub name: String,
}

/// A pod (netns + kubelet-style cgroup) running the synthetic server. `arg0` is what the
/// server's command line says it is (e.g. "vllm" for discovery by signature).
pub fn server_pod(name: &str, driver: CgroupDriver, arg0: &str, server_args: &[&str]) -> ServerPod {
    server_pod_wired(name, Wiring::Subnet, driver, arg0, server_args)
}

/// [`server_pod`] with the pod wired the way `wiring`'s CNI does it.
pub fn server_pod_wired(
    name: &str,
    wiring: Wiring,
    driver: CgroupDriver,
    arg0: &str,
    server_args: &[&str],
) -> ServerPod {
    let pod = Pod::create_wired(name, wiring).expect("creating pod netns");
    start_server(pod, name, driver, arg0, server_args)
}

/// A dual-stack pod (IPv4 and IPv6) whose server listens on both; returns its IPv6 address.
#[allow(dead_code)]
pub fn server_pod_dual_stack(
    name: &str,
    driver: CgroupDriver,
    server_args: &[&str],
) -> (ServerPod, std::net::Ipv6Addr) {
    let pod = Pod::create(name).expect("creating pod netns");
    let ip6 = pod.enable_ipv6().expect("IPv6 in the pod");
    let listen = format!("[::]:{PORT}");
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(server_args);
    let sp = start_server(pod, name, driver, "llmslo-synth-server", &args);
    (sp, ip6)
}

fn start_server(
    pod: Pod,
    name: &str,
    driver: CgroupDriver,
    arg0: &str,
    server_args: &[&str],
) -> ServerPod {
    let cg = PodCgroup::create(driver, "burstable").expect("creating pod cgroup");
    let log = std::env::temp_dir().join(format!(
        "llmslo-synth-{}-{}.jsonl",
        std::process::id(),
        pod.netns_name()
    ));
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(super::agent_bin());
    cmd.arg0(arg0).arg("synth-server");
    if !server_args.contains(&"--listen") {
        cmd.args(["--listen", &format!("0.0.0.0:{PORT}")]);
    }
    cmd.arg("--log")
        .arg(&log)
        .args(server_args)
        .env("HOSTNAME", name)
        .stdout(std::process::Stdio::null());
    let server = pod
        .spawn(cmd, Some(&cg))
        .expect("spawning the synthetic server");
    // The port of a `--listen` given in the arguments, else the default.
    let port = server_args
        .iter()
        .position(|a| *a == "--listen")
        .and_then(|i| server_args.get(i + 1)?.rsplit(':').next()?.parse().ok())
        .unwrap_or(PORT);
    pod.wait_for_port(port, Duration::from_secs(10))
        .expect("server listening");
    ServerPod {
        server,
        cg,
        pod,
        log,
        name: name.to_string(),
    }
}

impl ServerPod {
    pub fn server_log(&self) -> Vec<ServerRecord> {
        testbed::read_server_log(&self.log).expect("reading server log")
    }

    /// The server's own log of its requests, by request id (those that sent one).
    pub fn server_log_by_id(&self) -> std::collections::BTreeMap<String, ServerRecord> {
        self.server_log()
            .into_iter()
            .filter_map(|s| Some((s.request_id.clone()?, s)))
            .collect()
    }
}
