//! CUDA driver activity of target processes: finds libcuda in their own mappings, attaches the
//! `gpu.bpf.c` uprobes once per distinct library file (detached when no target maps it any
//! more), and turns the kernel's per-tgid counters into per-pod totals for `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject, UprobeOpts};
use serde::Serialize;

use crate::discovery::Snapshot;
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

/// A libcuda file mapped by targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CudaLib {
    /// The path inside the process's mount namespace.
    pub path: String,
    /// Where the agent opens it: through `<proc_root>/<pid>/root` of the lowest such pid.
    pub open_path: PathBuf,
    pub tgids: BTreeSet<u32>,
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

/// Adds the libcuda files of target `pid` to `libs`.
pub fn add_target(libs: &mut BTreeMap<LibKey, CudaLib>, proc_root: &Path, pid: u32) {
    for (key, path) in find_libcuda(proc_root, pid) {
        let open_path = proc_root
            .join(pid.to_string())
            .join("root")
            .join(path.trim_start_matches('/'));
        let lib = libs.entry(key).or_insert_with(|| CudaLib {
            path,
            open_path,
            tgids: BTreeSet::new(),
        });
        lib.tgids.insert(pid);
    }
}

/// An attached libcuda, for `/api/v1/targets`.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedLib {
    #[serde(flatten)]
    pub key: LibKey,
    pub path: String,
    pub tgids: BTreeSet<u32>,
    /// Symbols with a probe attached.
    pub attached: Vec<String>,
    /// Symbols that could not be probed (absent in this libcuda version, ...), with why.
    pub errors: Vec<String>,
}

/// Summed counters of one process or pod.
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
    /// Per library file, its probes per target process: uprobes are attached with the
    /// process's pid, so the kernel plants the breakpoints only in targets' memory and other
    /// processes mapping the same libcuda never trap.
    attached: BTreeMap<LibKey, (AttachedLib, BTreeMap<u32, Vec<Link>>)>,
    counts: MapHandle,
    totals: crate::podtotals::PodTotals<GpuCounts>,
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

impl Gpu {
    /// Loads the programs (sharing the L7 object's target and stats maps); nothing is attached
    /// until [`Gpu::apply`] is given a library.
    pub fn load(l7: &L7Skel<'static>) -> Result<Gpu> {
        let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = GpuSkelBuilder::default()
            .open(obj)
            .context("opening the GPU BPF object")?;
        open.maps
            .target_tgids
            .reuse_fd(l7.maps.target_tgids.as_fd())
            .context("sharing map target_tgids")?;
        open.maps
            .stats
            .reuse_fd(l7.maps.stats.as_fd())
            .context("sharing map stats")?;
        // The L7 programs read a process's totals into each request event.
        open.maps
            .gpu_counts
            .reuse_fd(l7.maps.gpu_counts.as_fd())
            .context("sharing map gpu_counts")?;
        let skel = open.load().context("loading the GPU BPF programs")?;
        let verifier = crate::loader::verifier_stats(skel.object(), "gpu");
        let counts = MapHandle::try_from(&l7.maps.gpu_counts)?;
        Ok(Gpu {
            skel,
            attached: BTreeMap::new(),
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

    /// Attaches to the libraries in `want` for each target process mapping them; detaches
    /// processes and libraries gone from it.
    pub fn apply(&mut self, want: &BTreeMap<LibKey, CudaLib>) {
        self.attached.retain(|k, (lib, _)| {
            let keep = want.contains_key(k);
            if !keep {
                tracing::info!(path = %lib.path, inode = k.inode, "libcuda no longer mapped by a target: uprobes detached");
            }
            keep
        });
        for (key, lib) in want {
            let mut entry = self.attached.remove(key).unwrap_or_else(|| {
                let info = AttachedLib {
                    key: key.clone(),
                    path: lib.path.clone(),
                    tgids: BTreeSet::new(),
                    attached: Vec::new(),
                    errors: Vec::new(),
                };
                (info, BTreeMap::new())
            });
            entry.1.retain(|tgid, _| lib.tgids.contains(tgid));
            for &tgid in &lib.tgids {
                if entry.1.contains_key(&tgid) {
                    continue;
                }
                let (links, attached, errors) = self.attach(&lib.open_path, tgid);
                // Counters from zero now: its requests' GPU figures are then zero, not null,
                // until its first CUDA call (NOEXIST: a probe may have created it already).
                let zero = [0u8; std::mem::size_of::<types::llmslo_gpu_counts>()];
                if let Err(e) = self
                    .counts
                    .update(&tgid.to_ne_bytes(), &zero, MapFlags::NO_EXIST)
                {
                    tracing::debug!(tgid, error = %e, "GPU counters not created at attach");
                }
                tracing::info!(path = %lib.path, inode = key.inode, tgid, probes = links.len(), failed = errors.len(), "libcuda uprobes attached");
                entry.0.attached = attached;
                entry.0.errors = errors;
                entry.1.insert(tgid, links);
            }
            entry.0.tgids.clone_from(&lib.tgids);
            self.attached.insert(key.clone(), entry);
        }
    }

    fn attach(&self, path: &Path, tgid: u32) -> (Vec<Link>, Vec<String>, Vec<String>) {
        let (mut links, mut ok, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let p = &self.skel.progs;
        // (program, symbol, return probe)
        let probes = [
            (&p.cu_launch, "cuLaunchKernel", false),
            (&p.cu_launch, "cuLaunchKernelEx", false),
            (&p.cu_graph_launch, "cuGraphLaunch", false),
            (&p.cu_memcpy_async, "cuMemcpyHtoDAsync_v2", false),
            (&p.cu_memcpy_async, "cuMemcpyDtoHAsync_v2", false),
            (&p.cu_memcpy_async, "cuMemcpyAsync", false),
            (&p.cu_sync_enter, "cuStreamSynchronize", false),
            (&p.cu_sync_exit, "cuStreamSynchronize", true),
            (&p.cu_sync_enter, "cuCtxSynchronize", false),
            (&p.cu_sync_exit, "cuCtxSynchronize", true),
        ];
        for (prog, func, retprobe) in probes {
            let opts = UprobeOpts {
                retprobe,
                func_name: Some(func.to_string()),
                ..Default::default()
            };
            let what = if retprobe { "uretprobe" } else { "uprobe" };
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

    /// Sums the kernel's counters by pod, forgetting processes that are no longer targets.
    pub fn refresh(&mut self, snap: &Snapshot) -> GpuView {
        let entries: Vec<(u32, Option<u64>, GpuCounts)> = self
            .counts
            .keys()
            .filter_map(|key| {
                let tgid = u32::from_ne_bytes(key.get(..4)?.try_into().ok()?);
                Some((tgid, None, self.read(&key)))
            })
            .collect();
        let (by_pod, gone) = self.totals.fold(entries, snap);
        for tgid in gone {
            let _ = self.counts.delete(&tgid.to_ne_bytes());
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

/// The `llmslo_gpu_*` counters, one sample per (namespace, pod).
pub fn render(view: &GpuView, out: &mut String) {
    crate::podtotals::render(
        out,
        &view.by_pod,
        &[
            (
                "llmslo_gpu_kernel_launches_total",
                "CUDA kernel launches (cuLaunchKernel, cuLaunchKernelEx).",
                |c: &GpuCounts| c.launches as f64,
            ),
            (
                "llmslo_gpu_graph_launches_total",
                "CUDA graph launches (cuGraphLaunch).",
                |c| c.graph_launches as f64,
            ),
            (
                "llmslo_gpu_memcpy_bytes_total",
                "Bytes asked of cuMemcpyHtoDAsync_v2, cuMemcpyDtoHAsync_v2 and cuMemcpyAsync.",
                |c| c.memcpy_bytes as f64,
            ),
            (
                "llmslo_gpu_syncs_total",
                "cuStreamSynchronize and cuCtxSynchronize calls that returned.",
                |c| c.syncs as f64,
            ),
            (
                "llmslo_gpu_sync_wait_seconds_total",
                "Time spent in cuStreamSynchronize and cuCtxSynchronize.",
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
