//! CUDA driver activity of target servers: finds libcuda in the mappings of every process in a
//! target's cgroup (the processes that drive the GPU — vLLM V1's engine core, SGLang's scheduler
//! and TP workers — are not the one that serves HTTP), attaches the `gpu.bpf.c` uprobes per
//! distinct library file and process (detached when no such process maps it any more), and
//! turns the kernel's per-cgroup counters into per-pod totals for `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject, UprobeOpts};
use serde::Serialize;

use crate::discovery::{Meta, Snapshot};
use crate::skel::gpu::{types, GpuSkel, GpuSkelBuilder};
use crate::skel::l7::L7Skel;

/// A library file, as the kernel knows it: the device (`major:minor` as `/proc/<pid>/maps`
/// writes it) and inode. Uprobes live on the inode, so one attachment serves every process
/// that maps the file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LibKey {
    pub dev: String,
    pub inode: u64,
}

/// A libcuda file mapped by processes of targets' cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CudaLib {
    /// The path inside the process's mount namespace.
    pub path: String,
    /// Where the agent opens it: through `<proc_root>/<pid>/root` of the lowest such pid.
    pub open_path: PathBuf,
    /// The processes that map it: tgid → the target cgroup (id) it is in and counts under.
    pub procs: BTreeMap<u32, u64>,
}

/// The libcuda files `pid` maps: `libcuda.so`, `libcuda.so.1`, or the versioned file they link
/// to (`libcuda.so.535.104.05`), which is the name the maps show for a driver install.
pub fn find_libcuda(proc_root: &Path, pid: u32) -> Vec<(LibKey, String)> {
    let Ok(maps) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("maps")) else {
        return Vec::new();
    };
    let mut out: Vec<(LibKey, String)> = maps.lines().filter_map(parse_maps_line).collect();
    out.sort();
    out.dedup();
    out
}

/// `addr perms offset dev inode path` → the library, when the path is a libcuda.
fn parse_maps_line(line: &str) -> Option<(LibKey, String)> {
    let mut f = line.splitn(6, ' ');
    let (_addr, _perms, _off) = (f.next()?, f.next()?, f.next()?);
    let dev = f.next()?;
    let inode: u64 = f.next()?.parse().ok()?;
    let path = f.next()?.trim_start();
    let base = path.rsplit('/').next()?;
    let libcuda = base == "libcuda.so" || base.starts_with("libcuda.so.");
    // A deleted file (driver upgraded under a running process) cannot be opened by path.
    if inode == 0 || !path.starts_with('/') || !libcuda || path.ends_with(" (deleted)") {
        return None;
    }
    let key = LibKey {
        dev: dev.to_string(),
        inode,
    };
    Some((key, path.to_string()))
}

/// At most this many processes of one target cgroup are looked at (its `cgroup.procs`).
pub const MAX_CGROUP_PROCS: usize = 1024;
/// A process whose mappings showed no libcuda is read again after this long: an engine process
/// initialises CUDA some seconds after it starts.
pub const RECHECK: Duration = Duration::from_secs(5);
/// At most this many `maps` files are read per discovery pass (one of a big Python process
/// costs a millisecond or more); the rest wait for the next pass, longest-waiting first.
pub const MAX_READS: usize = 32;

/// A process of a target cgroup whose mappings were read: its cgroup then, what they showed,
/// and when.
#[derive(Debug, Clone)]
struct Seen {
    cgroup: u64,
    libs: Vec<(LibKey, String)>,
    read_at: Instant,
}

/// Which processes map libcuda, kept from one discovery pass to the next so that a pass reads
/// few `maps` files: a process that maps libcuda keeps it until it exits (the driver is not
/// unloaded), so its answer is kept while it stays in its cgroup; one without is read again
/// every [`RECHECK`], at most [`MAX_READS`] per pass.
#[derive(Debug, Default)]
pub struct CudaScan {
    seen: BTreeMap<u32, Seen>,
}

impl CudaScan {
    /// Forgets processes gone from `members` (tgid → cgroup id) or moved to another cgroup;
    /// answers those due for a read: never read first, then the longest unread.
    fn due(&mut self, members: &BTreeMap<u32, u64>, now: Instant) -> Vec<u32> {
        self.seen
            .retain(|pid, s| members.get(pid) == Some(&s.cgroup));
        let mut due: Vec<(Option<Instant>, u32)> = members
            .keys()
            .filter_map(|&pid| match self.seen.get(&pid) {
                None => Some((None, pid)),
                Some(s) if s.libs.is_empty() && now.duration_since(s.read_at) >= RECHECK => {
                    Some((Some(s.read_at), pid))
                }
                Some(_) => None,
            })
            .collect();
        due.sort();
        due.truncate(MAX_READS);
        due.into_iter().map(|(_, pid)| pid).collect()
    }

    /// Keeps what `pid`'s mappings showed.
    fn record(&mut self, pid: u32, cgroup: u64, libs: Vec<(LibKey, String)>, read_at: Instant) {
        let seen = Seen {
            cgroup,
            libs,
            read_at,
        };
        self.seen.insert(pid, seen);
    }

    /// One discovery pass: reads the mappings of the processes due and answers every libcuda
    /// file that `members` (the processes of targets' cgroups: tgid → cgroup id) map.
    pub fn scan(
        &mut self,
        proc_root: &Path,
        members: &BTreeMap<u32, u64>,
        now: Instant,
    ) -> BTreeMap<LibKey, CudaLib> {
        for pid in self.due(members, now) {
            let libs = find_libcuda(proc_root, pid);
            self.record(pid, members[&pid], libs, now);
        }
        self.libs(proc_root)
    }

    fn libs(&self, proc_root: &Path) -> BTreeMap<LibKey, CudaLib> {
        let mut out: BTreeMap<LibKey, CudaLib> = BTreeMap::new();
        for (&pid, s) in &self.seen {
            for (key, path) in &s.libs {
                let lib = out.entry(key.clone()).or_insert_with(|| CudaLib {
                    path: path.clone(),
                    open_path: proc_root
                        .join(pid.to_string())
                        .join("root")
                        .join(path.trim_start_matches('/')),
                    procs: BTreeMap::new(),
                });
                lib.procs.insert(pid, s.cgroup);
            }
        }
        out
    }
}

/// An attached libcuda, for `/api/v1/targets`.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedLib {
    #[serde(flatten)]
    pub key: LibKey,
    pub path: String,
    /// The processes it is probed in (every process of a target's cgroup that maps it).
    pub tgids: BTreeSet<u32>,
    /// The target cgroups (ids) whose counters their calls go to.
    pub cgroup_ids: BTreeSet<u64>,
    /// Symbols with a probe attached.
    pub attached: Vec<String>,
    /// Symbols that could not be probed (absent in this libcuda version, ...), with why.
    pub errors: Vec<String>,
}

/// Summed counters of one cgroup or pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuCounts {
    pub launches: u64,
    pub graph_launches: u64,
    pub memcpy_bytes: u64,
    pub syncs: u64,
    pub sync_wait_ns: u64,
}

impl std::ops::AddAssign for GpuCounts {
    fn add_assign(&mut self, o: GpuCounts) {
        self.launches += o.launches;
        self.graph_launches += o.graph_launches;
        self.memcpy_bytes += o.memcpy_bytes;
        self.syncs += o.syncs;
        self.sync_wait_ns += o.sync_wait_ns;
    }
}

pub use crate::podtotals::PodLabels;

/// What the API reads.
#[derive(Debug, Clone, Default)]
pub struct GpuView {
    pub libs: Vec<AttachedLib>,
    pub by_pod: BTreeMap<PodLabels, GpuCounts>,
}

pub struct Gpu {
    skel: GpuSkel<'static>,
    /// Per library file, its probes per process of a target cgroup: uprobes are attached with
    /// the process's pid, so the kernel plants the breakpoints only in those processes' memory
    /// and other processes mapping the same libcuda never trap.
    attached: BTreeMap<LibKey, (AttachedLib, BTreeMap<u32, Vec<Link>>)>,
    /// `gpu_cgroups`: the target cgroups whose processes' calls count, and what it holds.
    cgroups: MapHandle,
    applied_cgroups: BTreeSet<u64>,
    counts: MapHandle,
    totals: crate::podtotals::PodTotals<u64, GpuCounts>,
    pub verifier: Vec<crate::loader::VerifierStats>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.attached)
            .into_values()
            .flat_map(|(_, per_pid)| per_pid.into_values().flatten())
            .collect();
        crate::loader::detach_concurrently(links);
    }
}

/// The program a probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prog {
    Launch,
    GraphLaunch,
    MemcpyAsync,
    SyncEnter,
    SyncExit,
}

/// (program, symbol, return probe) of every probe, in attach order. The `_ptsz` forms are what
/// a program built with per-thread default streams (`--default-stream per-thread`) calls; a
/// libcuda that lacks one is listed under `errors`, the others are attached all the same.
fn probe_list() -> Vec<(Prog, String, bool)> {
    let mut out = Vec::new();
    for (prog, base, ret) in [
        (Prog::Launch, "cuLaunchKernel", false),
        (Prog::Launch, "cuLaunchKernelEx", false),
        (Prog::GraphLaunch, "cuGraphLaunch", false),
        (Prog::MemcpyAsync, "cuMemcpyHtoDAsync_v2", false),
        (Prog::MemcpyAsync, "cuMemcpyDtoHAsync_v2", false),
        (Prog::MemcpyAsync, "cuMemcpyAsync", false),
        (Prog::SyncEnter, "cuStreamSynchronize", false),
        (Prog::SyncExit, "cuStreamSynchronize", true),
    ] {
        out.push((prog, base.to_string(), ret));
        out.push((prog, format!("{base}_ptsz"), ret));
    }
    out.push((Prog::SyncEnter, "cuCtxSynchronize".into(), false));
    out.push((Prog::SyncExit, "cuCtxSynchronize".into(), true));
    out
}

impl Gpu {
    /// Loads the programs (sharing the L7 object's counters and stats maps); nothing is attached
    /// until [`Gpu::apply`] is given a library.
    pub fn load(l7: &L7Skel<'static>) -> Result<Gpu> {
        let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = GpuSkelBuilder::default()
            .open(obj)
            .context("opening the GPU BPF object")?;
        open.maps
            .stats
            .reuse_fd(l7.maps.stats.as_fd())
            .context("sharing map stats")?;
        // The L7 programs read a cgroup's totals into each request event.
        open.maps
            .gpu_counts
            .reuse_fd(l7.maps.gpu_counts.as_fd())
            .context("sharing map gpu_counts")?;
        let skel = open.load().context("loading the GPU BPF programs")?;
        let verifier = crate::loader::verifier_stats(skel.object(), "gpu");
        let counts = MapHandle::try_from(&l7.maps.gpu_counts)?;
        let cgroups = MapHandle::try_from(&skel.maps.gpu_cgroups)?;
        Ok(Gpu {
            skel,
            attached: BTreeMap::new(),
            cgroups,
            applied_cgroups: BTreeSet::new(),
            counts,
            totals: Default::default(),
            verifier,
        })
    }

    /// A pod's totals go once no target has carried its labels for `d` (default 30 s).
    pub fn forget_after(mut self, d: std::time::Duration) -> Gpu {
        self.totals = crate::podtotals::PodTotals::new(d);
        self
    }

    /// Whether any process's libcuda carries probes now.
    pub fn probing(&self) -> bool {
        self.attached
            .values()
            .any(|(_, per_pid)| !per_pid.is_empty())
    }

    /// Counts the processes of `cgroups` (the targets' own cgroups) and attaches to the
    /// libraries in `want` for each process mapping them; detaches processes and libraries gone
    /// from it.
    pub fn apply(&mut self, want: &BTreeMap<LibKey, CudaLib>, cgroups: &BTreeSet<u64>) {
        for c in self.applied_cgroups.difference(cgroups) {
            let _ = self.cgroups.delete(&c.to_ne_bytes());
        }
        for c in cgroups.difference(&self.applied_cgroups) {
            if let Err(e) = self.cgroups.update(&c.to_ne_bytes(), &[1], MapFlags::ANY) {
                tracing::warn!(cgroup = c, error = %e, "GPU target cgroup not added");
            }
        }
        self.applied_cgroups.clone_from(cgroups);
        self.attached.retain(|k, (lib, _)| {
            let keep = want.contains_key(k);
            if !keep {
                tracing::info!(path = %lib.path, inode = k.inode, "libcuda no longer mapped in a target cgroup: uprobes detached");
            }
            keep
        });
        for (key, lib) in want {
            let mut entry = self.attached.remove(key).unwrap_or_else(|| {
                let info = AttachedLib {
                    key: key.clone(),
                    path: lib.path.clone(),
                    tgids: BTreeSet::new(),
                    cgroup_ids: BTreeSet::new(),
                    attached: Vec::new(),
                    errors: Vec::new(),
                };
                (info, BTreeMap::new())
            });
            entry.1.retain(|tgid, _| lib.procs.contains_key(tgid));
            for (&tgid, &cgroup) in &lib.procs {
                if entry.1.contains_key(&tgid) {
                    continue;
                }
                let (links, attached, errors) = self.attach(&lib.open_path, tgid);
                // The cgroup's counters from zero now: its requests' GPU figures are then zero,
                // not null, until the first CUDA call (NOEXIST: a probe or another process of
                // the cgroup may have created them already).
                let zero = [0u8; std::mem::size_of::<types::llmslo_gpu_counts>()];
                if let Err(e) = self
                    .counts
                    .update(&cgroup.to_ne_bytes(), &zero, MapFlags::NO_EXIST)
                {
                    tracing::debug!(cgroup, error = %e, "GPU counters not created at attach");
                }
                tracing::info!(path = %lib.path, inode = key.inode, tgid, cgroup, probes = links.len(), failed = errors.len(), "libcuda uprobes attached");
                entry.0.attached = attached;
                entry.0.errors = errors;
                entry.1.insert(tgid, links);
            }
            entry.0.tgids = lib.procs.keys().copied().collect();
            entry.0.cgroup_ids = lib.procs.values().copied().collect();
            self.attached.insert(key.clone(), entry);
        }
    }

    fn attach(&self, path: &Path, tgid: u32) -> (Vec<Link>, Vec<String>, Vec<String>) {
        let (mut links, mut ok, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let p = &self.skel.progs;
        for (prog, func, retprobe) in probe_list() {
            let prog = match prog {
                Prog::Launch => &p.cu_launch,
                Prog::GraphLaunch => &p.cu_graph_launch,
                Prog::MemcpyAsync => &p.cu_memcpy_async,
                Prog::SyncEnter => &p.cu_sync_enter,
                Prog::SyncExit => &p.cu_sync_exit,
            };
            let what = if retprobe { "uretprobe" } else { "uprobe" };
            let opts = UprobeOpts {
                retprobe,
                func_name: Some(func.clone()),
                ..Default::default()
            };
            match prog.attach_uprobe_with_opts(tgid as i32, path, 0, opts) {
                Ok(l) => {
                    links.push(l);
                    ok.push(format!("{what}:{func}"));
                }
                Err(e) => errors.push(format!("{what}:{func}: {e}")),
            }
        }
        (links, ok, errors)
    }

    /// Sums the kernel's counters by pod, forgetting cgroups that are no longer targets'.
    pub fn refresh(&mut self, snap: &Snapshot) -> GpuView {
        let raw: Vec<(u64, GpuCounts)> = self
            .counts
            .keys()
            .filter_map(|key| {
                let cg = u64::from_ne_bytes(key.get(..8)?.try_into().ok()?);
                Some((cg, self.read(&key)))
            })
            .collect();
        let (by_pod, gone) = self.totals.fold_keyed(cgroup_entries(snap, raw), snap);
        for cg in gone {
            let _ = self.counts.delete(&cg.to_ne_bytes());
        }
        GpuView {
            libs: self.attached.values().map(|(a, _)| a.clone()).collect(),
            by_pod,
        }
    }

    fn read(&self, key: &[u8]) -> GpuCounts {
        let Ok(Some(v)) = self.counts.lookup(key, MapFlags::ANY) else {
            return GpuCounts::default();
        };
        let f = |i: usize| {
            v.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_ne_bytes)
        };
        GpuCounts {
            launches: f(0),
            graph_launches: f(1),
            memcpy_bytes: f(2),
            syncs: f(3),
            sync_wait_ns: f(4),
        }
    }
}

/// The per-cgroup counters as [`crate::podtotals::PodTotals::fold_keyed`] takes them: each
/// cgroup's labels and whether it is still a target's.
fn cgroup_entries(
    snap: &Snapshot,
    raw: Vec<(u64, GpuCounts)>,
) -> impl Iterator<Item = (u64, Option<&Meta>, bool, GpuCounts)> {
    raw.into_iter().map(|(cg, c)| {
        let targeted = snap.set.gpu_cgroups.contains(&cg);
        (cg, snap.by_cgroup.get(&cg), targeted, c)
    })
}

/// The `llmslo_gpu_*` counters, one sample per (namespace, pod).
pub fn render(view: &GpuView, out: &mut String) {
    crate::podtotals::render(
        out,
        &view.by_pod,
        &[
            (
                "llmslo_gpu_kernel_launches_total",
                "CUDA kernel launches (cuLaunchKernel, cuLaunchKernelEx and their _ptsz forms) of the pod's server containers.",
                |c: &GpuCounts| c.launches as f64,
            ),
            (
                "llmslo_gpu_graph_launches_total",
                "CUDA graph launches (cuGraphLaunch, cuGraphLaunch_ptsz) of the pod's server containers.",
                |c| c.graph_launches as f64,
            ),
            (
                "llmslo_gpu_memcpy_bytes_total",
                "Bytes asked of cuMemcpyHtoDAsync_v2, cuMemcpyDtoHAsync_v2 and cuMemcpyAsync (and their _ptsz forms) in the pod's server containers.",
                |c| c.memcpy_bytes as f64,
            ),
            (
                "llmslo_gpu_syncs_total",
                "cuStreamSynchronize(_ptsz) and cuCtxSynchronize calls that returned, in the pod's server containers.",
                |c| c.syncs as f64,
            ),
            (
                "llmslo_gpu_sync_wait_seconds_total",
                "Time spent in cuStreamSynchronize(_ptsz) and cuCtxSynchronize in the pod's server containers.",
                |c| c.sync_wait_ns as f64 / 1e9,
            ),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let l = "7f0e1c000000-7f0e1c200000 r-xp 00000000 fd:01 1234567                    /usr/lib/x86_64-linux-gnu/libcuda.so.1";
        let (k, p) = parse_maps_line(l).unwrap();
        assert_eq!(k.dev, "fd:01");
        assert_eq!(k.inode, 1234567);
        assert_eq!(p, "/usr/lib/x86_64-linux-gnu/libcuda.so.1");
        let versioned = l.replace("libcuda.so.1", "libcuda.so.535.104.05");
        assert!(parse_maps_line(&versioned).is_some());
        assert!(parse_maps_line(&format!("{l} (deleted)")).is_none());
        assert!(parse_maps_line(&l.replace("libcuda.so.1", "libcudart.so.12")).is_none());
        assert!(parse_maps_line("7f0e-7f0f rw-p 00000000 00:00 0 ").is_none());
        let short = "7f0e-7f0f r-xp 00000000 00:2a 99 /opt/libcuda.so";
        assert_eq!(parse_maps_line(short).unwrap().1, "/opt/libcuda.so");
    }

    #[test]
    fn every_async_probe_has_its_per_thread_stream_form() {
        let probes = probe_list();
        let names: Vec<&str> = probes.iter().map(|(_, f, _)| f.as_str()).collect();
        for f in [
            "cuLaunchKernel_ptsz",
            "cuLaunchKernelEx_ptsz",
            "cuGraphLaunch_ptsz",
            "cuMemcpyAsync_ptsz",
            "cuMemcpyHtoDAsync_v2_ptsz",
            "cuMemcpyDtoHAsync_v2_ptsz",
            "cuStreamSynchronize_ptsz",
        ] {
            assert!(names.contains(&f), "{f} not probed: {names:?}");
        }
        assert_eq!(probes.len(), 18);
        // A sync is timed by an entry and a return probe on the same symbol, _ptsz too.
        let sync = |f: &str| {
            probes
                .iter()
                .filter(|(_, n, _)| n == f)
                .map(|&(p, _, r)| (p, r))
                .collect::<Vec<_>>()
        };
        let both = vec![(Prog::SyncEnter, false), (Prog::SyncExit, true)];
        assert_eq!(sync("cuStreamSynchronize_ptsz"), both);
        assert_eq!(sync("cuCtxSynchronize"), both);
        assert!(!names.contains(&"cuCtxSynchronize_ptsz"));
    }

    /// A /proc with `maps` files: pid → whether it maps the libcuda of inode 77.
    fn fake_proc(dir: &Path, pids: &[(u32, bool)]) {
        for &(pid, cuda) in pids {
            let d = dir.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let mut maps = String::from("55d0-55d1 r-xp 00000000 fd:01 12 /usr/bin/python3.12\n");
            if cuda {
                maps.push_str(
                    "7f00-7f10 r-xp 00000000 fd:01 77 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15\n",
                );
            }
            std::fs::write(d.join("maps"), maps).unwrap();
        }
    }

    #[test]
    fn cgroup_processes_are_read_once_when_they_map_libcuda_and_rechecked_otherwise() {
        let dir = std::env::temp_dir().join(format!("llmslo-cudascan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // 10: the HTTP server (no libcuda), 11: its engine process.
        fake_proc(&dir, &[(10, false), (11, true)]);
        let mut scan = CudaScan::default();
        let t0 = Instant::now();
        let members: BTreeMap<u32, u64> = [(10, 7), (11, 7)].into();
        let libs = scan.scan(&dir, &members, t0);
        assert_eq!(libs.len(), 1);
        let lib = libs.values().next().unwrap();
        assert_eq!(lib.procs, [(11, 7)].into());
        assert_eq!(
            lib.open_path,
            dir.join("11/root/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15")
        );
        // The server starts using CUDA itself: seen at the recheck, not before; the engine's
        // answer is kept meanwhile (its maps are not read again).
        fake_proc(&dir, &[(10, true), (11, false)]);
        let libs = scan.scan(&dir, &members, t0 + Duration::from_secs(1));
        assert_eq!(libs.values().next().unwrap().procs, [(11, 7)].into());
        let libs = scan.scan(&dir, &members, t0 + RECHECK);
        assert_eq!(
            libs.values().next().unwrap().procs,
            [(10, 7), (11, 7)].into()
        );
        // The engine exits (gone from the cgroup): forgotten.
        let members: BTreeMap<u32, u64> = [(10, 7)].into();
        let libs = scan.scan(&dir, &members, t0 + RECHECK);
        assert_eq!(libs.values().next().unwrap().procs, [(10, 7)].into());
        // A process moved to another target cgroup is read again (and counts under that one).
        fake_proc(&dir, &[(10, false)]);
        let members: BTreeMap<u32, u64> = [(10, 8)].into();
        assert!(scan.scan(&dir, &members, t0 + RECHECK).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn maps_reads_per_pass_are_bounded_oldest_first() {
        let mut scan = CudaScan::default();
        let t0 = Instant::now();
        let members: BTreeMap<u32, u64> = (1..=50).map(|p| (p, 7)).collect();
        let first = scan.due(&members, t0);
        assert_eq!(first.len(), MAX_READS);
        for &p in &first {
            scan.record(p, 7, Vec::new(), t0);
        }
        // The 18 never read come first, then the longest unread of the rest.
        let t1 = t0 + RECHECK;
        let second = scan.due(&members, t1);
        assert_eq!(second.len(), MAX_READS);
        assert!(
            second[..18].iter().all(|p| !first.contains(p)),
            "{second:?}"
        );
        for &p in &second {
            scan.record(p, 7, Vec::new(), t1);
        }
        // A second later only the 18 read at t0 and not since are due.
        let third = scan.due(&members, t1 + Duration::from_secs(1));
        assert_eq!(third.len(), 18);
        assert!(third
            .iter()
            .all(|p| first.contains(p) && !second.contains(p)));
        assert!(scan.due(&members, t1).iter().all(|p| !second.contains(p)));
    }

    #[test]
    fn cgroup_counters_are_labelled_and_retired_by_target_cgroup() {
        let mut snap = Snapshot::default();
        let meta = Meta {
            namespace: Some("ml".into()),
            pod: Some("vllm-0".into()),
            ..Default::default()
        };
        snap.set.gpu_cgroups.insert(7);
        snap.by_cgroup.insert(7, meta);
        let c = |launches| GpuCounts {
            launches,
            ..Default::default()
        };
        let mut totals: crate::podtotals::PodTotals<u64, GpuCounts> = Default::default();
        let pod = ("ml".to_string(), "vllm-0".to_string());
        let (by_pod, gone) = totals.fold_keyed(cgroup_entries(&snap, vec![(7, c(5))]), &snap);
        assert_eq!(by_pod[&pod].launches, 5);
        assert!(gone.is_empty());
        // The pod's server goes: its cgroup's entry is deleted, its count stays with the pod.
        snap.set.gpu_cgroups.clear();
        let (by_pod, gone) = totals.fold_keyed(cgroup_entries(&snap, vec![(7, c(9))]), &snap);
        assert_eq!((by_pod[&pod].launches, gone), (9, vec![7]));
        let (by_pod, _) = totals.fold_keyed(cgroup_entries(&snap, vec![]), &snap);
        assert_eq!(by_pod[&pod].launches, 9);
    }

    #[test]
    fn counts_layout_is_pinned() {
        use std::mem::{offset_of, size_of};
        use types::llmslo_gpu_counts as C;
        assert_eq!(size_of::<C>(), 40);
        assert_eq!(offset_of!(C, launches), 0);
        assert_eq!(offset_of!(C, graph_launches), 8);
        assert_eq!(offset_of!(C, memcpy_bytes), 16);
        assert_eq!(offset_of!(C, syncs), 24);
        assert_eq!(offset_of!(C, sync_wait_ns), 32);
    }
}
