//! Pods (netns + veth) and kubelet-style cgroups: naming, ids, reachability, process
//! placement, parallel creation, and cleanup (on Drop, on panic, and of stale runs).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use testbed::{
    cgroup2_mount, cleanup_stale, skip_unless_root, CgroupDriver, Pod, PodCgroup, PREFIX,
};

#[test]
fn pod_network_wiring() {
    if skip_unless_root("pod_network_wiring") {
        return;
    }
    let pod = Pod::create("wiring test!").unwrap();
    assert!(pod.host_veth().starts_with("lsh") && pod.host_veth().len() <= 15);
    assert!(pod
        .netns_name()
        .starts_with(&format!("{PREFIX}-{}-", std::process::id())));
    assert!(pod.netns_name().ends_with("wiring-test-"));
    assert!(pod.netns_path().exists());
    let [a, b, _, d] = pod.ip().octets();
    assert_eq!((a, b, d % 4), (10, 200, 2));
    assert_eq!(u32::from(pod.ip()) - 1, u32::from(pod.host_ip()));
    assert!(pod.host_ifindex().unwrap() > 0);

    let out = pod.exec(&["ip", "-o", "-4", "addr"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("eth0    inet {}/30", pod.ip())),
        "{text}"
    );
    assert!(text.contains("lo    inet 127.0.0.1/8"), "{text}");
    let out = pod.exec(&["ip", "route", "show", "default"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("via {}", pod.host_ip())));

    // Host -> pod over TCP: a listener in the pod (python-free: the synth server).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmslo-synth-server"));
    cmd.args(["--listen", "0.0.0.0:9001"]).stderr(Stdio::null());
    let mut srv = pod.spawn(cmd, None).unwrap();
    pod.wait_for_port(9001, Duration::from_secs(10)).unwrap();
    let mut s = TcpStream::connect(pod.addr(9001)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    // The process is in the pod's netns, not ours.
    let ns = std::fs::metadata(format!("/proc/{}/ns/net", srv.pid()))
        .unwrap()
        .ino();
    assert_eq!(ns, std::fs::metadata(pod.netns_path()).unwrap().ino());
    assert_ne!(ns, std::fs::metadata("/proc/self/ns/net").unwrap().ino());
    assert!(srv.try_wait().unwrap().is_none());

    let (path, veth) = (pod.netns_path(), pod.host_veth().to_string());
    let pid = srv.pid();
    drop(pod); // kills what runs inside before deleting the netns
    assert!(
        srv.try_wait().unwrap().is_some(),
        "pod drop must kill its processes"
    );
    assert!(!path.exists());
    assert!(!Path::new("/sys/class/net").join(&veth).exists());
    assert!(!Path::new(&format!("/proc/{pid}/ns")).exists());
}

#[test]
fn parallel_pods_get_distinct_names_and_subnets() {
    if skip_unless_root("parallel_pods_get_distinct_names_and_subnets") {
        return;
    }
    let pods: Vec<Pod> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|i| s.spawn(move || Pod::create(&format!("par{i}")).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<_> = pods.iter().map(|p| p.ip()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 6);
    // Each pod reachable from the host: a listener in every one of them.
    for p in &pods {
        let out = p.exec(&["ip", "-o", "link", "show", "eth0"]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("state UP"));
    }
}

#[test]
fn cleanup_runs_on_panic() {
    if skip_unless_root("cleanup_runs_on_panic") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let pod = Pod::create("panicky").unwrap();
        let cg = PodCgroup::create(CgroupDriver::Systemd, "burstable").unwrap();
        tx.send((pod.netns_path(), cg.path().to_path_buf()))
            .unwrap();
        panic!("deliberate");
    })
    .join();
    assert!(r.is_err());
    let (ns, cg) = rx.recv().unwrap();
    assert!(!ns.exists() && !cg.exists());
}

#[test]
fn cgroup_layouts_and_ids() {
    if skip_unless_root("cgroup_layouts_and_ids") {
        return;
    }
    let root = cgroup2_mount().unwrap();
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        for qos in ["guaranteed", "burstable", "besteffort"] {
            let cg = PodCgroup::create(driver, qos).unwrap();
            let uid = cg.pod_uid().to_string();
            let id = cg.container_id().to_string();
            assert_eq!(uid.len(), 36);
            assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
            let u_ = uid.replace('-', "_");
            let rel = match (driver, qos) {
                (CgroupDriver::Systemd, "guaranteed") => {
                    format!("kubepods.slice/kubepods-pod{u_}.slice/cri-containerd-{id}.scope")
                }
                (CgroupDriver::Systemd, q) => {
                    format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u_}.slice/cri-containerd-{id}.scope")
                }
                (CgroupDriver::Cgroupfs, "guaranteed") => format!("kubepods/pod{uid}/{id}"),
                (CgroupDriver::Cgroupfs, q) => format!("kubepods/{q}/pod{uid}/{id}"),
            };
            assert_eq!(cg.path(), root.join(&rel));
            assert_eq!(cg.cgroup_path(), format!("/{rel}"));
            assert_eq!(cg.id(), std::fs::metadata(cg.path()).unwrap().ino());

            // A sidecar container in the same pod, and processes in both.
            let side = cg.add_container().unwrap();
            assert_eq!(side.pod_uid(), cg.pod_uid());
            assert_eq!(side.path().parent(), cg.path().parent());
            let pod = Pod::create("cg").unwrap();
            let mut p1 = pod.spawn(sleeper(), Some(&cg)).unwrap();
            let p2 = pod.spawn(sleeper(), Some(&side)).unwrap();
            assert_eq!(proc_cgroup(p1.pid()), cg.cgroup_path());
            assert_eq!(proc_cgroup(p2.pid()), side.cgroup_path());
            assert_eq!(cg.procs().unwrap(), vec![p1.pid() as i32]);

            let (dir, pod_dir) = (cg.path().to_path_buf(), cg.pod_path().to_path_buf());
            drop(cg); // kills p1 via the cgroup, keeps the pod dir for the sidecar
            assert!(!dir.exists());
            assert!(p1.try_wait().unwrap().is_some());
            assert!(pod_dir.exists());
            drop(side);
            assert!(!pod_dir.exists());
            drop(p2);
        }
    }
}

fn sleeper() -> Command {
    let mut c = Command::new("sleep");
    c.arg("30");
    c
}

#[test]
fn parallel_cgroups_share_parents_safely() {
    if skip_unless_root("parallel_cgroups_share_parents_safely") {
        return;
    }
    std::thread::scope(|s| {
        for t in 0..6 {
            s.spawn(move || {
                let driver = if t % 2 == 0 {
                    CgroupDriver::Systemd
                } else {
                    CgroupDriver::Cgroupfs
                };
                for _ in 0..15 {
                    let cg = PodCgroup::create(driver, "burstable").unwrap();
                    assert!(cg.path().is_dir());
                }
            });
        }
    });
}

#[test]
fn stale_leftovers_are_removed() {
    if skip_unless_root("stale_leftovers_are_removed") {
        return;
    }
    // A pid that surely is dead: a child we already reaped.
    let dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();

    let prefix = "llmslostale";
    let ns = format!("{prefix}-{dead_pid}-0-x");
    let veth = format!("lsh{dead_pid:x}x0");
    let run = |args: &[&str]| {
        assert!(
            Command::new("ip").args(args).status().unwrap().success(),
            "{args:?}"
        )
    };
    run(&["netns", "add", &ns]);
    run(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    let kubepods = cgroup2_mount().unwrap().join("kubepods");
    let cg_dir = kubepods.join(format!("podstale{dead_pid}"));
    let mark = |dir: &Path, owner: &str| {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (p, n) = (c(dir.to_str().unwrap()), c("trusted.llmslo.owner"));
        // SAFETY: valid C strings and a buffer with its exact length.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                owner.as_ptr().cast(),
                owner.len(),
                0,
            )
        };
        assert_eq!(r, 0);
    };
    // A parent made here is marked as the testbed's, so whichever pod leaves it last
    // (or the next stale sweep) removes it.
    let made_parent = std::fs::create_dir(&kubepods).is_ok();
    if made_parent {
        mark(&kubepods, &format!("{PREFIX}:{dead_pid}"));
    }
    std::fs::create_dir(&cg_dir).unwrap();
    mark(&cg_dir, &format!("{prefix}:{dead_pid}"));
    // And something of a live owner (us) that must survive.
    let live = Pod::create("live").unwrap();

    let removed = cleanup_stale(prefix).unwrap();
    assert!(removed >= 2, "removed {removed}");
    assert!(!Path::new("/var/run/netns").join(&ns).exists());
    assert!(!Path::new("/sys/class/net").join(&veth).exists());
    assert!(!cg_dir.exists());
    assert!(live.netns_path().exists());
    assert!(Path::new("/sys/class/net").join(live.host_veth()).exists());
    if made_parent {
        let _ = std::fs::remove_dir(&kubepods); // fails while a parallel test uses it
    }
}

/// Child half of `crashed_run_is_cleaned_up`: builds a pod with a server, prints what
/// it made, and dies without running any Drop (like a test binary killed mid-run).
#[test]
fn crash_helper() {
    if std::env::var("LLMSLO_CRASH_HELPER").is_err() {
        return;
    }
    let sp = start_server("crash", CgroupDriver::Cgroupfs, "burstable", &[]);
    println!(
        "CRASH {} {} {} {}",
        sp.pod.netns_path().display(),
        sp.pod.host_veth(),
        sp.cg.path().display(),
        sp.server.pid()
    );
    std::process::abort();
}

#[test]
fn crashed_run_is_cleaned_up() {
    if skip_unless_root("crashed_run_is_cleaned_up") {
        return;
    }
    // Read its stdout only up to our line: the orphaned server keeps the helper's
    // pipes open, so waiting for EOF would hang.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_helper", "--nocapture", "--test-threads=1"])
        .env("LLMSLO_CRASH_HELPER", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    // libtest prints "test crash_helper ... " on the same line first.
    while !line.contains("CRASH ") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0,
            "helper printed nothing"
        );
    }
    assert!(
        !child.wait().unwrap().success(),
        "helper should have aborted"
    );
    let line = line.trim().split_once("CRASH ").unwrap().1.to_string();
    let parts: Vec<&str> = line.split(' ').collect();
    let (ns, veth, cg, server) = (Path::new(parts[0]), parts[1], Path::new(parts[2]), parts[3]);
    // The crash left everything behind, the server still running in the pod.
    assert!(ns.exists() && cg.exists());
    assert!(Path::new("/sys/class/net").join(veth).exists());
    assert!(Path::new("/proc").join(server).exists());

    cleanup_stale(PREFIX).unwrap();
    assert!(!ns.exists(), "netns");
    assert!(!cg.exists(), "cgroup");
    assert!(!cg.parent().unwrap().exists(), "pod cgroup");
    assert!(!Path::new("/sys/class/net").join(veth).exists(), "veth");
    // Killed; it was the helper's child, so now init's to reap: gone or a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{server}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "server still alive: {stat}"
    );
}
