//! cgroup v2 plumbing: where it is mounted, a cgroup's id (what bpf_get_current_cgroup_id
//! returns: the directory's inode), and what a kubelet-made path says about its pod.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mnt = pre.split(' ').nth(4)?;
        (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mnt))
    })
}

pub fn cgroup_id(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.ino())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeCgroup {
    pub pod_uid: String,
    pub container_id: Option<String>,
    /// "containerd", "crio", "docker" when the scope names it.
    pub runtime: Option<&'static str>,
}

/// Parses kubelet cgroup paths under both drivers:
/// systemd `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`,
/// cgroupfs `/kubepods/burstable/pod<uid>/<id>`; CRI-O (`crio-<id>.scope`) and Docker
/// (`docker-<id>.scope`) scopes too.
pub fn parse_kube_cgroup(path: &str) -> Option<KubeCgroup> {
    if !path.contains("kubepods") {
        return None;
    }
    let mut pod_uid = None;
    let mut container = None;
    let mut runtime = None;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let s = seg.strip_suffix(".slice").unwrap_or(seg);
        if let Some(i) = s.rfind("pod") {
            let cand = s[i + 3..].replace('_', "-");
            if is_uuid(&cand) {
                pod_uid = Some(cand);
                continue;
            }
        }
        if pod_uid.is_some() {
            let scope = seg.strip_suffix(".scope").unwrap_or(seg);
            for (prefix, rt) in [
                ("cri-containerd-", "containerd"),
                ("crio-", "crio"),
                ("docker-", "docker"),
            ] {
                if let Some(id) = scope.strip_prefix(prefix) {
                    container = Some(id.to_string());
                    runtime = Some(rt);
                }
            }
            if container.is_none()
                && scope.len() == 64
                && scope.bytes().all(|b| b.is_ascii_hexdigit())
            {
                container = Some(scope.to_string());
            }
        }
    }
    Some(KubeCgroup {
        pod_uid: pod_uid?,
        container_id: container,
        runtime,
    })
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const CID: &str = "4c8a1f0e2b3d4c5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6";

    #[test]
    fn systemd_driver_containerd() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        let k = parse_kube_cgroup(&p).unwrap();
        assert_eq!(k.pod_uid, UID);
        assert_eq!(k.container_id.as_deref(), Some(CID));
        assert_eq!(k.runtime, Some("containerd"));
    }

    #[test]
    fn cgroupfs_driver_and_guaranteed_qos() {
        let k = parse_kube_cgroup(&format!("/kubepods/burstable/pod{UID}/{CID}")).unwrap();
        assert_eq!(
            (k.pod_uid.as_str(), k.container_id.as_deref()),
            (UID, Some(CID))
        );
        let k = parse_kube_cgroup(&format!("/kubepods/pod{UID}/{CID}")).unwrap();
        assert_eq!(k.pod_uid, UID);
    }

    #[test]
    fn crio_and_docker_scopes() {
        let u = UID.replace('-', "_");
        let k = parse_kube_cgroup(&format!(
            "/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope"
        ))
        .unwrap();
        assert_eq!(k.runtime, Some("crio"));
        let k = parse_kube_cgroup(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope")).unwrap();
        assert_eq!(k.runtime, Some("docker"));
    }

    #[test]
    fn not_kube() {
        assert_eq!(
            parse_kube_cgroup("/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(parse_kube_cgroup("/kubepods.slice/garbage"), None);
        assert_eq!(parse_kube_cgroup(""), None);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        if let Some(m) = cgroup2_mount() {
            assert!(cgroup_id(&m).is_some());
        }
    }
}
