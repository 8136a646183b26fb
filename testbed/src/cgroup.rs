//! Kubelet-style pod/container cgroups on the cgroup2 hierarchy, so that the agent's
//! discovery sees the same paths (and bpf_get_current_cgroup_id the same ids) as on a
//! real node with the systemd or cgroupfs driver.

use crate::{hex, pid_alive, random_bytes, PREFIX};
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Marks directories we created with `<prefix>:<pid>`, so `cleanup_stale` can tell
/// our leftovers (creator dead) from a live test's or a real kubelet's cgroups.
const OWNER_XATTR: &str = "trusted.llmslo.owner";

/// Kubelet cgroup driver: decides the directory naming scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// Pod QoS class: decides the parent directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl FromStr for Qos {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "guaranteed" => Ok(Qos::Guaranteed),
            "burstable" => Ok(Qos::Burstable),
            "besteffort" => Ok(Qos::BestEffort),
            _ => bail!("unknown QoS class {s:?} (guaranteed, burstable, besteffort)"),
        }
    }
}

/// Mount point of the cgroup2 hierarchy, from /proc/self/mountinfo (hybrid hosts mount
/// it at /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    static MOUNT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let text =
                std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
            parse_cgroup2_mount(&text)
                .ok_or_else(|| "no cgroup2 mount in /proc/self/mountinfo".into())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape_mountinfo(left.split(' ').nth(4)?)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], oct) {
            let v =
                u16::from(d[0] - b'0') * 64 + u16::from(d[1] - b'0') * 8 + u16::from(d[2] - b'0');
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A random UUID v4 in the usual 8-4-4-4-12 form (Kubernetes pod uids look like this).
pub fn random_uuid() -> String {
    let mut b: [u8; 16] = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Directories created for one pod (pod dir and any parent this call made), deepest
/// first; shared by sibling containers and removed when the last one drops.
struct OwnedDirs {
    dirs: Vec<PathBuf>,
    root: PathBuf,
}

impl Drop for OwnedDirs {
    fn drop(&mut self) {
        for d in &self.dirs {
            remove_if_empty(d);
        }
        // Shared parents (kubepods.slice, the QoS level) may have been created by
        // another test that finished first; whoever leaves last removes them, but only
        // if they carry our mark (never a real kubelet's) and are empty (the kernel
        // refuses rmdir otherwise, so a test still using them is safe; one about to
        // mkdir under them retries on ENOENT).
        let Some(mut dir) = self
            .dirs
            .first()
            .and_then(|d| d.parent())
            .map(Path::to_path_buf)
        else {
            return;
        };
        while dir.starts_with(&self.root) && dir != self.root {
            match read_owner(&dir) {
                // Removed by a sibling walking up at the same time: keep going.
                None if !dir.exists() => {}
                Some(o) if o.rsplit_once(':').is_some_and(|(p, _)| p == PREFIX) => {
                    if !remove_if_empty(&dir) {
                        return;
                    }
                }
                _ => return,
            }
            if !dir.pop() {
                return;
            }
        }
    }
}

/// rmdir a cgroup that has no child cgroups. The kernel answers EBUSY both for
/// "has children" and, briefly, right after a child was removed; only the latter is
/// retried, the former is left to the child's owner.
fn remove_if_empty(dir: &Path) -> bool {
    for _ in 0..40 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => {
                let has_children = std::fs::read_dir(dir).is_ok_and(|rd| {
                    rd.flatten()
                        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                });
                if has_children {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    false
}

/// A container cgroup inside a kubelet-style pod cgroup. Drop kills what runs in it
/// and removes what we created.
pub struct PodCgroup {
    path: PathBuf,
    rel: String,
    id: u64,
    pod_uid: String,
    container_id: String,
    driver: CgroupDriver,
    qos: Qos,
    pod_dir: PathBuf,
    parents: Arc<OwnedDirs>,
}

impl std::fmt::Debug for PodCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCgroup")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish()
    }
}

impl PodCgroup {
    /// Create pod + container cgroups for a new random pod uid. `qos` is
    /// "burstable", "besteffort" or "guaranteed".
    pub fn create(driver: CgroupDriver, qos: &str) -> Result<PodCgroup> {
        let qos: Qos = qos.parse()?;
        let uid = random_uuid();
        let mut parts: Vec<String> = Vec::new();
        match driver {
            CgroupDriver::Systemd => {
                let uid_ = uid.replace('-', "_");
                parts.push("kubepods.slice".into());
                match qos {
                    Qos::Guaranteed => parts.push(format!("kubepods-pod{uid_}.slice")),
                    Qos::Burstable | Qos::BestEffort => {
                        let q = if qos == Qos::Burstable {
                            "burstable"
                        } else {
                            "besteffort"
                        };
                        parts.push(format!("kubepods-{q}.slice"));
                        parts.push(format!("kubepods-{q}-pod{uid_}.slice"));
                    }
                }
            }
            CgroupDriver::Cgroupfs => {
                parts.push("kubepods".into());
                match qos {
                    Qos::Guaranteed => {}
                    Qos::Burstable => parts.push("burstable".into()),
                    Qos::BestEffort => parts.push("besteffort".into()),
                }
                parts.push(format!("pod{uid}"));
            }
        }
        let root = cgroup2_mount()?;
        let owned = make_dirs(&root, &parts)?;
        let pod_dir = parts.iter().fold(root.clone(), |p, c| p.join(c));
        let parents = Arc::new(OwnedDirs {
            dirs: owned,
            root: root.clone(),
        });
        Self::new_container(root, pod_dir, uid, driver, qos, parents)
    }

    /// Another container in the same pod (e.g. a sidecar): same pod uid, new id.
    pub fn add_container(&self) -> Result<PodCgroup> {
        Self::new_container(
            cgroup2_mount()?,
            self.pod_dir.clone(),
            self.pod_uid.clone(),
            self.driver,
            self.qos,
            self.parents.clone(),
        )
    }

    fn new_container(
        root: PathBuf,
        pod_dir: PathBuf,
        pod_uid: String,
        driver: CgroupDriver,
        qos: Qos,
        parents: Arc<OwnedDirs>,
    ) -> Result<PodCgroup> {
        let container_id = hex(&random_bytes::<32>());
        let name = match driver {
            CgroupDriver::Systemd => format!("cri-containerd-{container_id}.scope"),
            CgroupDriver::Cgroupfs => container_id.clone(),
        };
        let path = pod_dir.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        mark_owner(&path);
        let id = std::fs::metadata(&path)?.ino();
        let rel = format!("/{}", path.strip_prefix(&root)?.display());
        Ok(PodCgroup {
            path,
            rel,
            id,
            pod_uid,
            container_id,
            driver,
            qos,
            pod_dir,
            parents,
        })
    }

    /// Absolute directory of the container cgroup.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as /proc/<pid>/cgroup shows it ("/kubepods.slice/...").
    pub fn cgroup_path(&self) -> &str {
        &self.rel
    }

    /// cgroup v2 id: the directory's inode number, which is what
    /// bpf_get_current_cgroup_id() returns for tasks inside.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    /// 64 hex digits, like containerd's.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    pub fn pod_path(&self) -> &Path {
        &self.pod_dir
    }

    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    pub fn qos(&self) -> Qos {
        self.qos
    }

    /// Pids now in the container cgroup.
    pub fn procs(&self) -> Result<Vec<i32>> {
        read_procs(&self.path)
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        kill_all(&self.path, Duration::from_secs(5));
        remove_dir_retry(&self.path);
        // `parents` drops after this and removes the pod dir once no sibling is left.
    }
}

fn read_procs(dir: &Path) -> Result<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kill everything in `dir` (cgroup.kill where the kernel has it, else SIGKILL per pid,
/// repeated because a dying fork bomb can add pids) and wait until it is empty.
pub(crate) fn kill_all(dir: &Path, timeout: Duration) {
    let kill_file = dir.join("cgroup.kill");
    let has_kill = kill_file.exists();
    let deadline = Instant::now() + timeout;
    loop {
        let procs = read_procs(dir).unwrap_or_default();
        if procs.is_empty() || Instant::now() > deadline {
            return;
        }
        if has_kill {
            let _ = std::fs::write(&kill_file, "1");
        } else {
            for pid in procs {
                // SAFETY: plain kill(2) on a pid read from the cgroup; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// rmdir, retrying briefly: right after the last task exits the kernel may still
/// report the cgroup busy.
fn remove_dir_retry(dir: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("testbed: could not remove cgroup {}", dir.display());
}

/// mkdir each component under `root`, returning the ones we created (deepest first).
/// A parent removed under us by a test that created it and just finished (ENOENT) is
/// retried from the top.
fn make_dirs(root: &Path, parts: &[String]) -> Result<Vec<PathBuf>> {
    let mut owned: Vec<PathBuf> = Vec::new();
    'attempt: for _ in 0..50 {
        let mut p = root.to_path_buf();
        for c in parts {
            p.push(c);
            match std::fs::create_dir(&p) {
                Ok(()) => {
                    mark_owner(&p);
                    owned.push(p.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'attempt,
                Err(e) => return Err(e).with_context(|| format!("mkdir {}", p.display())),
            }
        }
        owned.sort();
        owned.dedup();
        owned.reverse(); // deepest first
        return Ok(owned);
    }
    bail!("cgroup parents of {parts:?} kept disappearing")
}

fn mark_owner(dir: &Path) {
    let value = format!("{PREFIX}:{}", std::process::id());
    let (Ok(p), Ok(n)) = (
        CString::new(dir.as_os_str().as_bytes()),
        CString::new(OWNER_XATTR),
    ) else {
        return;
    };
    // SAFETY: valid NUL-terminated strings and a live buffer with its exact length.
    // Failure only loses stale-cleanup ability, so the result is ignored.
    unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
}

fn read_owner(dir: &Path) -> Option<String> {
    let p = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let n = CString::new(OWNER_XATTR).ok()?;
    let mut buf = [0u8; 128];
    // SAFETY: valid NUL-terminated strings; the buffer pointer/length pair is exact.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len <= 0 {
        return None;
    }
    Some(String::from_utf8_lossy(&buf[..len as usize]).into_owned())
}

/// Remove kubepods cgroups that carry `prefix`'s owner mark and whose creating process
/// is dead (killing anything left inside). Returns how many directories went.
pub fn cleanup_stale_cgroups(prefix: &str) -> Result<usize> {
    let root = cgroup2_mount()?;
    let mut removed = 0;
    for top in ["kubepods.slice", "kubepods"] {
        let dir = root.join(top);
        if dir.is_dir() {
            removed += sweep(&dir, prefix);
        }
    }
    Ok(removed)
}

/// Post-order walk: children first, so a stale pod's whole subtree can go.
fn sweep(dir: &Path, prefix: &str) -> usize {
    let mut removed = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                removed += sweep(&e.path(), prefix);
            }
        }
    }
    let stale = read_owner(dir)
        .and_then(|o| {
            let (p, pid) = o.rsplit_once(':')?;
            (p == prefix).then(|| pid.parse::<i32>().ok()).flatten()
        })
        .is_some_and(|pid| !pid_alive(pid));
    if stale {
        kill_all(dir, Duration::from_secs(2));
        if std::fs::remove_dir(dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime shared:5 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/un ified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/x rw\n"),
            None
        );
    }

    #[test]
    fn uuid_format() {
        let u = random_uuid();
        let parts: Vec<&str> = u.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!("89ab".contains(&parts[3][..1]));
        assert_ne!(u, random_uuid());
    }

    #[test]
    fn qos_parse() {
        assert_eq!("BestEffort".parse::<Qos>().unwrap(), Qos::BestEffort);
        assert!("gold".parse::<Qos>().is_err());
    }
}
