//! The classic clsact filters (and qdiscs) the agent owns on kernels without tcx: attaching
//! them, writing down what was attached in a ledger file, and removing exactly those — on exit,
//! and at the next start after a crash left them behind (unlike tcx links, filters outlive the
//! process). A filter is removed only when the ledger names its device and the kernel still
//! shows it at our handle and priority running one of our programs; a qdisc only when we
//! created it and no filter of anyone's is left on it.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::libbpf_sys;
use libbpf_rs::{TcHookBuilder, TC_EGRESS, TC_INGRESS};
use serde::{Deserialize, Serialize};

use super::tcdump::{self, Filter, PARENT_EGRESS, PARENT_INGRESS};

/// A fixed handle lets a restarted agent recognise its filters. Priority 1: see
/// `cni_adapters::DEFAULT_CLSACT_PRIORITY` for why ours go first.
pub const HANDLE: u32 = 0x11c5;
pub const PRIORITY: u32 = 1;
/// The programs we attach as clsact filters (libbpf names a filter "<prog name>:[<prog id>]").
pub const OUR_PROGS: [&str; 4] = [
    "tc_node_ingress",
    "tc_node_egress",
    "tc_pod_out",
    "tc_pod_in",
];
/// Where ledgers live unless [`ENV_STATE_DIR`] says otherwise. In a container it must be a
/// hostPath: the ledger has to outlive the container to serve the next one.
pub const DEFAULT_STATE_DIR: &str = "/run/llm-slo-agent";
pub const ENV_STATE_DIR: &str = "LLMSLO_STATE_DIR";

/// One device our filters sit on (always both directions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Device {
    ifindex: i32,
    ifname: String,
    /// We created the clsact qdisc (it was not there before us).
    qdisc_created: bool,
}

/// What one agent process attached: `clsact-<pid>.json` in the state directory.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LedgerFile {
    pid: u32,
    /// The process's start time (clock ticks after boot, /proc/<pid>/stat field 22): a pid
    /// reused by another process does not make a dead agent's ledger look alive.
    start_time: u64,
    devices: Vec<Device>,
}

/// This process's clsact attachments and their ledger file.
pub struct Ledger {
    path: PathBuf,
    me: (u32, u64),
    devices: BTreeMap<i32, Device>,
}

pub fn state_dir() -> PathBuf {
    std::env::var_os(ENV_STATE_DIR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

impl Ledger {
    pub fn new(dir: &Path) -> Ledger {
        let pid = std::process::id();
        Ledger {
            path: dir.join(format!("clsact-{pid}.json")),
            me: (pid, start_time(pid).unwrap_or(0)),
            devices: BTreeMap::new(),
        }
    }

    /// Attaches `ingress` and `egress` as our filters on `ifindex`, creating the clsact qdisc
    /// when there is none, and records it before returning.
    pub fn attach(
        &mut self,
        ifindex: i32,
        ifname: &str,
        ingress: BorrowedFd<'_>,
        egress: BorrowedFd<'_>,
    ) -> Result<()> {
        let qdisc_created = create_qdisc(ifindex).with_context(|| format!("clsact on {ifname}"))?;
        // Recorded first: a crash between here and the attach still leaves a ledger entry.
        let dev = Device {
            ifindex,
            ifname: ifname.to_string(),
            qdisc_created,
        };
        self.devices.insert(ifindex, dev);
        self.save();
        for (fd, point) in [(ingress, TC_INGRESS), (egress, TC_EGRESS)] {
            let mut hook = TcHookBuilder::new(fd)
                .ifindex(ifindex)
                .replace(true)
                .handle(HANDLE)
                .priority(PRIORITY)
                .hook(point);
            if let Err(e) = hook.attach() {
                self.detach(ifindex);
                return Err(e).with_context(|| format!("clsact attach on {ifname}"));
            }
        }
        Ok(())
    }

    /// Removes our filters from `ifindex` (and the qdisc, if ours and now empty).
    pub fn detach(&mut self, ifindex: i32) {
        if let Some(dev) = self.devices.remove(&ifindex) {
            remove(&dev);
            self.save();
        }
    }

    fn save(&self) {
        if self.devices.is_empty() {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        let file = LedgerFile {
            pid: self.me.0,
            start_time: self.me.1,
            devices: self.devices.values().cloned().collect(),
        };
        if let Err(e) = write_atomic(&self.path, &file) {
            tracing::warn!(path = %self.path.display(), error = %format!("{e:#}"),
                "cannot record the clsact filters: after a crash they would stay behind");
        }
    }
}

impl Ledger {
    /// Removes every filter (and qdisc of ours) the ledger holds; the ledger file goes too.
    pub fn release_all(&mut self) {
        for dev in std::mem::take(&mut self.devices).into_values() {
            remove(&dev);
        }
        self.save();
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.release_all();
    }
}

fn write_atomic(path: &Path, file: &LedgerFile) -> Result<()> {
    let dir = path.parent().context("ledger path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(file)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Removes what agents that are no longer running left in `dir`: their filters, their empty
/// qdiscs, their ledgers. Returns how many devices were cleaned.
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut cleaned = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("clsact-") && name.ends_with(".json")) {
            continue;
        }
        let file: LedgerFile = match std::fs::read(e.path())
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
        {
            Ok(f) => f,
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "unreadable clsact ledger left alone");
                continue;
            }
        };
        // Our own pid in a ledger we did not write yet: a previous container's agent.
        if another_live_agent(file.pid, file.start_time) {
            continue;
        }
        for dev in &file.devices {
            tracing::info!(ifname = %dev.ifname, pid = file.pid,
                "removing clsact filters a previous agent left behind");
            remove(dev);
            cleaned += 1;
        }
        let _ = std::fs::remove_file(e.path());
    }
    cleaned
}

/// True for a filter this agent attaches: our handle and priority, cls_bpf, one of our programs.
fn is_ours(f: &Filter) -> bool {
    let prog = f
        .bpf_name
        .as_deref()
        .and_then(|n| n.split(":[").next())
        .unwrap_or("");
    f.handle == HANDLE
        && u32::from(f.priority) == PRIORITY
        && f.kind == "bpf"
        && OUR_PROGS.contains(&prog)
}

fn remove(dev: &Device) {
    // An ifindex is reused once its device is gone: the name must match too.
    if ifname(dev.ifindex).as_deref() != Some(dev.ifname.as_str()) {
        return;
    }
    let placeholder = std::fs::File::open("/dev/null").expect("/dev/null");
    for (parent, point) in [(PARENT_INGRESS, TC_INGRESS), (PARENT_EGRESS, TC_EGRESS)] {
        match tcdump::filters(dev.ifindex, parent) {
            Ok(fs) if fs.iter().any(is_ours) => {
                // TcHook wants a program fd even to detach by handle and priority.
                let mut hook = TcHookBuilder::new(placeholder.as_fd())
                    .ifindex(dev.ifindex)
                    .handle(HANDLE)
                    .priority(PRIORITY)
                    .hook(point);
                if let Err(e) = hook.detach() {
                    tracing::warn!(ifname = %dev.ifname, error = %e, "could not remove our clsact filter");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(ifname = %dev.ifname, error = %e, "cannot list clsact filters: ours left in place");
            }
        }
    }
    if !dev.qdisc_created {
        return;
    }
    let empty = [PARENT_INGRESS, PARENT_EGRESS]
        .into_iter()
        .all(|p| tcdump::filters(dev.ifindex, p).is_ok_and(|fs| fs.is_empty()));
    if empty {
        let mut hook = TcHookBuilder::new(placeholder.as_fd())
            .ifindex(dev.ifindex)
            .hook(TC_INGRESS | TC_EGRESS);
        if let Err(e) = hook.destroy() {
            tracing::warn!(ifname = %dev.ifname, error = %e, "could not remove our clsact qdisc");
        }
    }
}

/// Creates the clsact qdisc; Ok(false) when it was already there.
fn create_qdisc(ifindex: i32) -> Result<bool> {
    let mut hook = libbpf_sys::bpf_tc_hook {
        sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
        ifindex,
        attach_point: libbpf_sys::BPF_TC_INGRESS,
        ..Default::default()
    };
    // SAFETY: a valid, initialised bpf_tc_hook that outlives the call.
    let err = unsafe { libbpf_sys::bpf_tc_hook_create(&mut hook) };
    match -err {
        0 => Ok(true),
        libc::EEXIST => Ok(false),
        e => Err(std::io::Error::from_raw_os_error(e).into()),
    }
}

fn ifname(ifindex: i32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex as u32, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// True when `pid` is another process than this one and still the process that started at
/// `start`: the holder of a ledger or note is alive (a reused pid is not). Our own pid in a
/// file we did not write is a previous container's agent.
pub(super) fn another_live_agent(pid: u32, start: u64) -> bool {
    pid != std::process::id() && start_time(pid).is_some_and(|t| t == start)
}

pub(super) use crate::selfcost::start_ticks as start_time;

#[cfg(test)]
mod tests {
    use super::*;

    fn f(handle: u32, prio: u16, kind: &str, name: Option<&str>) -> Filter {
        Filter {
            priority: prio,
            handle,
            kind: kind.into(),
            bpf_name: name.map(Into::into),
            bpf_prog_id: None,
        }
    }

    #[test]
    fn only_our_program_at_our_handle_and_priority_is_ours() {
        assert!(is_ours(&f(HANDLE, 1, "bpf", Some("tc_pod_in:[7]"))));
        assert!(is_ours(&f(HANDLE, 1, "bpf", Some("tc_node_ingress:[9]"))));
        assert!(!is_ours(&f(HANDLE, 2, "bpf", Some("tc_pod_in:[7]"))));
        assert!(!is_ours(&f(1, 1, "bpf", Some("tc_pod_in:[7]"))));
        assert!(!is_ours(&f(HANDLE, 1, "bpf", Some("cni.bpf.o:[tc]"))));
        assert!(!is_ours(&f(HANDLE, 1, "u32", None)));
        assert!(!is_ours(&f(0, 1, "bpf", None)));
    }

    #[test]
    fn a_ledger_of_a_live_process_is_kept_and_a_dead_ones_removed() {
        let dir = std::env::temp_dir().join(format!("llmslo-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dev = Device {
            ifindex: i32::MAX,
            ifname: "nonexistent0".into(),
            qdisc_created: true,
        };
        // pid 1 is alive with its own start time.
        let live = LedgerFile {
            pid: 1,
            start_time: start_time(1).unwrap(),
            devices: vec![dev.clone()],
        };
        write_atomic(&dir.join("clsact-1.json"), &live).unwrap();
        // The same pid with another start time: the process that wrote it is gone.
        let reused = LedgerFile {
            pid: 1,
            start_time: live.start_time + 1,
            devices: vec![dev],
        };
        write_atomic(&dir.join("clsact-reused.json"), &reused).unwrap();
        std::fs::write(dir.join("clsact-junk.json"), "{").unwrap();
        assert_eq!(sweep_stale(&dir), 1);
        assert!(dir.join("clsact-1.json").exists());
        assert!(!dir.join("clsact-reused.json").exists());
        assert!(
            dir.join("clsact-junk.json").exists(),
            "unreadable: left alone"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
