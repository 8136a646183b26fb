//! Loads and attaches the L7 BPF programs, owns their maps, and applies target-set changes.
//! One thread owns this (libbpf objects are not shared); others talk to it through channels.

use std::collections::BTreeSet;
use std::mem::MaybeUninit;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject};

use crate::skel::l7::{types, L7Skel, L7SkelBuilder};

/// Per-CPU counter names, in `enum llmslo_stat` order (pinned by a test against the skeleton).
pub const STAT_NAMES: [&str; types::llmslo_stat::LLMSLO_ST_MAX.0 as usize] = [
    "events",
    "ringbuf_full",
    "active_map_full",
    "copy_failed",
    "sock_resolve_failed",
    "conn_map_full",
    "syscall_error",
    "payload_truncated",
    "flow_map_full",
    "packet_unparsed",
    "retransmit_ignored",
    "gpu_map_full",
    "conn_map_inserts",
    "conn_map_deletes",
    "token_writes_counted",
    "token_records",
    "stream_slots_busy",
];

/// Indexes of the connection map's counters in [`STAT_NAMES`].
pub const STAT_CONN_INSERT: usize = types::llmslo_stat::LLMSLO_ST_CONN_INSERT.0 as usize;
pub const STAT_CONN_DELETE: usize = types::llmslo_stat::LLMSLO_ST_CONN_DELETE.0 as usize;

/// What the agent traces: processes by tgid and cgroups by cgroup v2 id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetSet {
    pub tgids: BTreeSet<u32>,
    pub cgroups: BTreeSet<u64>,
    /// (netns inode, port) of the targets' listening sockets.
    pub listen: BTreeSet<(u32, u16)>,
    /// Interfaces that get packet hooks.
    pub hooks: Vec<crate::netpath::HookSpec>,
    /// The targets' own cgroup v2 ids: the CUDA calls of every process in them are counted,
    /// per cgroup (GPU uprobes).
    pub gpu_cgroups: BTreeSet<u64>,
    /// libcuda files the processes of those cgroups map.
    pub cuda: std::collections::BTreeMap<crate::gpu::LibKey, crate::gpu::CudaLib>,
}

/// What the verifier did with one loaded program (`bpf_prog_info`), for `/api/v1/targets`,
/// a metric, and the CI check that programs do not grow unnoticed.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct VerifierStats {
    pub object: &'static str,
    pub program: String,
    /// Instructions the verifier processed (all paths): what limits a program's complexity.
    pub verified_insns: u32,
    /// Size after verification (BPF instructions) and after JIT (bytes).
    pub xlated_insns: u32,
    pub jited_bytes: u32,
    /// A handle on the program for its run counters (`selfcost`: `/metrics`).
    #[serde(skip)]
    pub fd: Option<crate::selfcost::ProgFd>,
}

/// The verifier statistics of every loaded program of `obj`, each with a handle on it.
pub fn verifier_stats(obj: &libbpf_rs::Object, object: &'static str) -> Vec<VerifierStats> {
    use std::os::fd::AsFd;
    obj.progs()
        .filter_map(|p| {
            if !p.autoload() {
                return None; // not loaded: no fd
            }
            let info = crate::selfcost::prog_info(p.as_fd())?;
            Some(VerifierStats {
                object,
                program: p.name().to_string_lossy().into_owned(),
                verified_insns: info.verified_insns,
                xlated_insns: info.xlated_prog_len / 8,
                jited_bytes: info.jited_prog_len,
                fd: crate::selfcost::ProgFd::dup(p.as_fd()),
            })
        })
        .collect()
}

/// An attached program, for `/api/v1/targets` and `probe`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachedProg {
    pub name: String,
    pub section: String,
    pub attached: bool,
    pub error: Option<String>,
}

pub struct L7 {
    pub skel: L7Skel<'static>,
    _links: Vec<Link>,
    pub progs: Vec<AttachedProg>,
    pub verifier: Vec<VerifierStats>,
    /// Where reads and writes are taken from.
    pub hooks: SyscallHooks,
    /// Owned handles, usable while the ring buffer borrows `skel`.
    pub targets: TargetMaps,
    pub stats: StatsMap,
    pub conns: ConnMap,
    pub arms: StreamArms,
    /// `reader_idle` in the object's mmapped .bss.
    pub reader_idle: ReaderIdle,
}

/// `reader_idle` in the L7 object's .bss: while set, the record that finds the ring buffer
/// empty wakes the reader (l7.bpf.c `wakeup_flag`), so the reader may sleep long when quiet.
pub struct ReaderIdle(&'static mut u32);

impl ReaderIdle {
    pub fn set(&mut self, idle: bool) {
        // SAFETY: an aligned u32 of the mmapped .bss, stored whole.
        unsafe { std::ptr::write_volatile(self.0, u32::from(idle)) };
        // Seen by the programs before the reader's next look at the ring: a record the reader
        // misses after setting it then finds the flag.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// The kernel's `stream_arms` map: connections whose token writes it counts (arm.rs).
pub struct StreamArms(MapHandle);

// SAFETY: llmslo_stream_arm is a repr(C) struct of integers and byte arrays.
unsafe impl plain::Plain for types::llmslo_stream_arm {}

impl StreamArms {
    /// Arms one connection. An arm whose template does not fit the kernel's arrays is refused.
    pub fn arm(&self, a: &crate::assemble::StreamArm) -> Result<()> {
        anyhow::ensure!(
            a.prefix_fixed.len() == a.prefix.len() && a.suffix_fixed.len() == a.suffix.len(),
            "arm masks of another length than its template"
        );

        let mut v = types::llmslo_stream_arm {
            prefix_len: u16::try_from(a.prefix.len())?,
            suffix_len: u16::try_from(a.suffix.len())?,
            chunked: u32::from(a.chunked),
            prefix_vary_n: u8::try_from(a.prefix_vary.len())?,
            suffix_vary_n: u8::try_from(a.suffix_vary.len())?,
            ..Default::default()
        };
        for (to, from, what) in [
            (&mut v.prefix[..], &a.prefix, "arm prefix too long"),
            (&mut v.suffix[..], &a.suffix, "arm suffix too long"),
            (&mut v.prefix_fixed[..], &a.prefix_fixed, "arm prefix too long"),
            (&mut v.suffix_fixed[..], &a.suffix_fixed, "arm suffix too long"),
            (&mut v.prefix_vary[..], &a.prefix_vary, "arm prefix varies too much"),
            (&mut v.suffix_vary[..], &a.suffix_vary, "arm suffix varies too much"),
        ] {
            to.get_mut(..from.len())
                .context(what)?
                .copy_from_slice(from);
        }
        // SAFETY: reading the bytes of a plain repr(C) value.
        let bytes = unsafe { plain::as_bytes(&v) };
        self.0
            .update(&a.sock_id.to_ne_bytes(), bytes, MapFlags::ANY)?;
        Ok(())
    }
}

/// The kernel's connection map, an LRU: it evicts silently when full, so its evictions are
/// derived from the insert and delete counters and a walk of its keys.
pub struct ConnMap {
    map: MapHandle,
    pub capacity: u32,
}

impl ConnMap {
    /// Live entries (one syscall per key: call it every few seconds, not per event).
    pub fn live(&self) -> u64 {
        self.map.keys().count() as u64
    }
}

/// The connection map's state for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnMapHealth {
    pub capacity: u32,
    pub live: u64,
    pub evicted: u64,
}

impl ConnMapHealth {
    /// Evictions = inserts − deletes − live. The counters are read before and after the walk
    /// that counted `live`; inserts from before and deletes from after give a lower bound, so
    /// traffic during the walk never inflates the count (exact when nothing changed). The
    /// count never goes back.
    pub fn update(&mut self, before: (u64, u64), after: (u64, u64), live: u64) {
        let (inserts, _) = before;
        let (_, deletes) = after;
        let evicted = inserts.saturating_sub(deletes).saturating_sub(live);
        self.evicted = self.evicted.max(evicted);
        self.live = live;
    }
}

impl Drop for L7 {
    fn drop(&mut self) {
        detach_concurrently(std::mem::take(&mut self._links));
    }
}

/// Closes `links` from several threads at once. Each detach waits for the kernel to let
/// in-flight runs of the program finish (an RCU grace period, ~40 ms on this 2-CPU VM): one by
/// one, the L7 programs alone took 0.8 s of a SIGTERM; concurrent waits share grace periods.
pub fn detach_concurrently(links: Vec<Link>) {
    const THREADS: usize = 32;
    let mut groups: Vec<Vec<Link>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, l) in links.into_iter().enumerate() {
        groups[i % THREADS].push(l);
    }
    std::thread::scope(|s| {
        for g in groups.into_iter().filter(|g| !g.is_empty()) {
            // Without a thread (limits), close them here: slower, same result.
            if let Err(e) = std::thread::Builder::new().spawn_scoped(s, move || drop(g)) {
                tracing::debug!(error = %e, "closing links on the calling thread");
            }
        }
    });
}

/// The kernel-side target filter.
pub struct TargetMaps {
    tgids: MapHandle,
    cgroups: MapHandle,
    listen: MapHandle,
    ports: MapHandle,
    /// `n_cgroup_targets` in the object's mmapped .bss: lets untargeted tasks skip a lookup.
    n_cgroups: &'static mut u32,
    /// `target_tgid_bits` in the same .bss: the syscall programs' one-load target test.
    tgid_bits: &'static mut [u8],
    /// `target_cgroup_bits`: the same by cgroup id, over the window `cgroup_base` says
    /// (targets outside it: `target_cgroups` only, counted in `cgroup_outside`).
    cgroup_bits: &'static mut [u8],
    /// `target_cgroup_base` and `n_cgroup_outside` in the same .bss.
    cgroup_base: &'static mut u64,
    cgroup_outside: &'static mut u32,
    /// The window (`cgroup_window`, set before load) at its base now.
    window: CgroupWindow,
    /// `target_port_bits`: `target_ports` again, one bit a port, for the socket programs.
    port_bits: &'static mut [u64],
    /// `gpu_probed` in the same .bss: events carry GPU counters once it is set.
    gpu_probed: &'static mut u32,
    /// `listen_changes` in the same .bss: TCP sockets that started or stopped listening.
    listen_changes: &'static u64,
    applied: TargetSet,
}

/// The per-CPU drop/submit counters.
pub struct StatsMap(MapHandle);

impl L7 {
    /// Opens, loads and attaches every program. A program whose hook is missing on this kernel
    /// is reported and skipped unless it is essential (the syscall tracepoints are).
    /// `conn_entries`: size of the kernel's connection map (`max_kernel_connections`);
    /// `runq`: events carry their threads' run-queue wait (`cpu_runqueue`).
    pub fn load(ringbuf_bytes: u32, conn_entries: u32, runq: bool) -> Result<L7> {
        tracing::info!("loading the L7 BPF programs");
        crate::probe::ensure_mounts();
        bump_memlock_rlimit();
        let hooks = SyscallHooks::from_env()?;
        let skel = Self::open_and_load(ringbuf_bytes, conn_entries, runq, hooks)?;
        tracing::info!(syscall_hooks = hooks.name(), "L7 programs loaded");
        let loaded = std::time::Instant::now();
        let verifier = verifier_stats(skel.object(), "l7");
        // Every read/write/accept/close hook of the chosen set (its tp_btf programs included).
        let (links, progs) = attach_all(skel.object(), "L7", |section| {
            section.contains("syscalls/") || section.starts_with("tp_btf/")
        })?;
        tracing::info!(
            attach_ms = loaded.elapsed().as_millis() as u64,
            "L7 programs attached"
        );
        let mut skel = skel;
        let bss = skel
            .maps
            .bss_data
            .take()
            .context("BPF object has no mmapped .bss")?;
        let targets = TargetMaps {
            tgids: MapHandle::try_from(&skel.maps.target_tgids)?,
            cgroups: MapHandle::try_from(&skel.maps.target_cgroups)?,
            listen: MapHandle::try_from(&skel.maps.listen_ports)?,
            ports: MapHandle::try_from(&skel.maps.target_ports)?,
            n_cgroups: &mut bss.n_cgroup_targets,
            tgid_bits: &mut bss.target_tgid_bits[..],
            cgroup_bits: &mut bss.target_cgroup_bits[..],
            cgroup_base: &mut bss.target_cgroup_base,
            cgroup_outside: &mut bss.n_cgroup_outside,
            window: CgroupWindow {
                base: 0,
                width: u64::from(
                    skel.maps
                        .rodata_data
                        .context("BPF object has no .rodata")?
                        .cgroup_window,
                ),
            },
            port_bits: &mut bss.target_port_bits[..],
            gpu_probed: &mut bss.gpu_probed,
            listen_changes: &bss.listen_changes,
            applied: TargetSet::default(),
        };
        let reader_idle = ReaderIdle(&mut bss.reader_idle);
        let stats = StatsMap(MapHandle::try_from(&skel.maps.stats)?);
        let conns = ConnMap {
            map: MapHandle::try_from(&skel.maps.conns)?,
            capacity: conn_entries,
        };
        let arms = StreamArms(MapHandle::try_from(&skel.maps.stream_arms)?);
        Ok(L7 {
            skel,
            _links: links,
            progs,
            verifier,
            hooks,
            targets,
            stats,
            conns,
            arms,
            reader_idle,
        })
    }

    /// Opens the object, sizes its maps, picks the programs to load and loads them.
    fn open_and_load(
        ringbuf_bytes: u32,
        conn_entries: u32,
        runq: bool,
        hooks: SyscallHooks,
    ) -> Result<L7Skel<'static>> {
        // The skeleton borrows its OpenObject for its whole life; one per load, kept alive.
        let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = L7SkelBuilder::default()
            .open(obj)
            .context("opening the L7 BPF object")?;
        open.maps
            .events
            .set_max_entries(ringbuf_bytes)
            .context("sizing the ring buffer")?;
        open.maps
            .conns
            .set_max_entries(conn_entries)
            .context("sizing the connection map")?;
        let stream_slots = stream_slots_from_env()?;
        open.maps
            .streams
            .set_max_entries(stream_slots)
            .context("sizing the stream table")?;
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .context("BPF object has no .rodata")?;
        if runq {
            // Events then carry their thread's run-queue wait (`runq_total_ns`, the
            // scheduler's own sched_info.run_delay).
            rodata.runq_on = 1;
        }
        rodata.cgroup_window = cgroup_window_from_env()?;
        rodata.stream_slots_mask = stream_slots - 1;
        for mut prog in open.open_object_mut().progs_mut() {
            let section = prog.section().to_string_lossy().into_owned();
            if let Some(load) = hooks.loads(&section) {
                prog.set_autoload(load);
            }
        }
        let skel = open.load().map_err(|e| {
            crate::caps::explain_load_error("the L7 BPF programs", &e).context(
                "the agent needs root or CAP_BPF and CAP_PERFMON, and a kernel with BTF \
                 (/sys/kernel/btf/vmlinux)",
            )
        })?;
        if hooks == SyscallHooks::Tracepoints {
            // exit_readv, exit_recvmsg and exit_sendmsg jump to exit_writev's program (one
            // verified copy of the iovec body); before anything is attached.
            use std::os::fd::{AsFd, AsRawFd};
            let fd = skel.progs.exit_writev.as_fd().as_raw_fd();
            skel.maps
                .iov_exit
                .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
                .context("filling the iovec exits' jump table")?;
        }
        Ok(skel)
    }
}

/// Whether the kernel's BTF (whose string table names every tracepoint a tp_btf program can
/// attach to, as `btf_trace_<name>`) has the three tracepoints the `sock` set attaches to.
fn sock_layer_tracepoints() -> bool {
    let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
        return false;
    };
    SOCK_LAYER_TRACEPOINTS.iter().all(|tp| {
        let name = format!("\0btf_trace_{tp}\0");
        memchr::memmem::find(&btf, name.as_bytes()).is_some()
    })
}

/// The tracepoints of the `sock` set's read and write programs (sections `tp_btf/<name>`).
const SOCK_LAYER_TRACEPOINTS: [&str; 3] =
    ["tcp_sendmsg_locked", "sock_send_length", "sock_recv_length"];

/// Which hook set reads and writes are taken from: `sock` (the default where the kernel has
/// its tracepoints), `tracepoint` (one tracepoint per syscall and direction, the default
/// elsewhere) or `raw` (the raw `sys_enter`/`sys_exit` tracepoints). Measured in
/// docs/BENCHMARKS.md (`scripts/syscall-cost.sh`, the overhead bench).
pub const ENV_SYSCALL_HOOKS: &str = "LLMSLO_SYSCALL_HOOKS";

/// Narrows the window of cgroup ids the kernel's target bitmap covers (`cgroup_window` in
/// l7.bpf.c; default and most: [`CGROUP_WINDOW_MAX`]). For tests, which need a target outside
/// the window without making millions of cgroups.
pub const ENV_CGROUP_WINDOW: &str = "LLMSLO_CGROUP_WINDOW";

/// `CGROUP_BITS` in l7.bpf.c: the bitmap's size in bits.
pub const CGROUP_WINDOW_MAX: u32 = 4 * 1024 * 1024;

/// The number of slots in the kernel's table of counted streams (`streams` in l7.bpf.c: a
/// connection whose two slots are both held by others is not counted in the kernel, and
/// `llmslo_agent_bpf_stat_total{stat="stream_slots_busy"}` says so). A power of two from 2 to
/// 65,536; default [`STREAM_SLOTS_DEFAULT`]. For tests, which need slots held by others without
/// opening thousands of streams.
pub const ENV_STREAM_SLOTS: &str = "LLMSLO_STREAM_SLOTS";

/// 4,096 slots of 1,128 bytes: 4.6 MB of kernel memory.
pub const STREAM_SLOTS_DEFAULT: u32 = 4096;

fn stream_slots_from_env() -> Result<u32> {
    parse_stream_slots(std::env::var(ENV_STREAM_SLOTS).ok().as_deref())
}

fn parse_stream_slots(v: Option<&str>) -> Result<u32> {
    match v {
        None | Some("") => Ok(STREAM_SLOTS_DEFAULT),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (2..=65536).contains(&n) && n.is_power_of_two() => Ok(n),
            _ => anyhow::bail!("{ENV_STREAM_SLOTS}={v}: expected a power of two from 2 to 65536"),
        },
    }
}

fn cgroup_window_from_env() -> Result<u32> {
    match std::env::var(ENV_CGROUP_WINDOW).ok().as_deref() {
        None | Some("") => Ok(CGROUP_WINDOW_MAX),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=CGROUP_WINDOW_MAX).contains(&n) => Ok(n),
            _ => anyhow::bail!("{ENV_CGROUP_WINDOW}={v}: expected 1 to {CGROUP_WINDOW_MAX}"),
        },
    }
}

/// How the read/write/accept/close syscalls are hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallHooks {
    /// Two tp_btf programs on `raw_syscalls/sys_enter` and `sys_exit` that keep the syscalls
    /// they trace by number: no perf record per call, but they run for every syscall.
    Raw,
    /// One tracepoint program per syscall and direction (`syscalls/sys_enter_write`, …): the
    /// default on kernels without the socket layer's tracepoints.
    Tracepoints,
    /// Reads and writes from the socket layer: one tp_btf program per completed send or
    /// receive (`sock/sock_send_length`, `sock/sock_recv_length`) and one where TCP starts
    /// queueing a send (`tcp/tcp_sendmsg_locked`, its start stamp); accept and close from
    /// their syscall tracepoints. No fd walk and no entry program per read or write.
    Sock,
}

impl SyscallHooks {
    /// The set `LLMSLO_SYSCALL_HOOKS` names; unset, the socket layer's where this kernel has
    /// its tracepoints, else one tracepoint per syscall.
    fn from_env() -> Result<SyscallHooks> {
        match std::env::var(ENV_SYSCALL_HOOKS).ok().as_deref() {
            None | Some("") => Ok(if sock_layer_tracepoints() {
                SyscallHooks::Sock
            } else {
                tracing::info!(
                    "this kernel lacks sock/sock_send_length, sock/sock_recv_length (Linux \
                     6.3) or tcp/tcp_sendmsg_locked (2025 kernels): reads and writes are \
                     hooked at their syscall tracepoints"
                );
                SyscallHooks::Tracepoints
            }),
            Some("tracepoint") => Ok(SyscallHooks::Tracepoints),
            Some("raw") => Ok(SyscallHooks::Raw),
            Some("sock") => Ok(SyscallHooks::Sock),
            Some(other) => anyhow::bail!(
                "{ENV_SYSCALL_HOOKS}={other}: expected `sock`, `tracepoint` or `raw` \
                 (unset: `sock` where the kernel has its tracepoints, else `tracepoint`)"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SyscallHooks::Raw => "raw",
            SyscallHooks::Tracepoints => "tracepoint",
            SyscallHooks::Sock => "sock",
        }
    }

    /// Whether the L7 program in `section` is loaded with this set; `None` for programs that
    /// every set loads.
    fn loads(self, section: &str) -> Option<bool> {
        if let Some(call) = section.strip_prefix("tracepoint/syscalls/") {
            let accept_or_close = call.ends_with("_accept")
                || call.ends_with("_accept4")
                || call == "sys_enter_close";
            return Some(match self {
                SyscallHooks::Tracepoints => true,
                SyscallHooks::Raw => false,
                SyscallHooks::Sock => accept_or_close,
            });
        }
        if section == "tp_btf/sys_enter" || section == "tp_btf/sys_exit" {
            return Some(self == SyscallHooks::Raw);
        }
        if let Some(tp) = section.strip_prefix("tp_btf/") {
            if SOCK_LAYER_TRACEPOINTS.contains(&tp) {
                return Some(self == SyscallHooks::Sock);
            }
        }
        None
    }
}

impl TargetMaps {
    /// From now on the syscall programs look up the GPU counters of each event's cgroup (set
    /// once a libcuda is probed; never cleared: counters outlive the probes).
    /// How many TCP sockets of the node started or stopped listening since the programs
    /// were attached.
    pub fn listen_changes(&self) -> u64 {
        // SAFETY: an aligned u64 of the mmapped .bss that the kernel updates atomically.
        unsafe { std::ptr::read_volatile(self.listen_changes) }
    }

    pub fn gpu_probed(&mut self) {
        if *self.gpu_probed == 0 {
            // SAFETY: an aligned u32 of the mmapped .bss, stored whole.
            unsafe { std::ptr::write_volatile(self.gpu_probed, 1) };
        }
    }

    /// Makes the kernel's target maps equal to `want`.
    pub fn apply(&mut self, want: &TargetSet) -> Result<()> {
        for t in self.applied.tgids.difference(&want.tgids) {
            set_bit(self.tgid_bits, u64::from(*t), false);
            let _ = self.tgids.delete(&t.to_ne_bytes());
        }
        for t in want.tgids.difference(&self.applied.tgids) {
            self.tgids
                .update(&t.to_ne_bytes(), &[1], MapFlags::ANY)
                .with_context(|| format!("adding target tgid {t}"))?;
            if !set_bit(self.tgid_bits, u64::from(*t), true) {
                tracing::warn!(tgid = t, "tgid beyond the kernel's pid limit: not traced");
            }
        }
        // The map first when adding and last when removing: a program finds every target in
        // the map while it may not find its bit (cgroup_is_target: the bitmap only says yes).
        for c in want.cgroups.difference(&self.applied.cgroups) {
            self.cgroups
                .update(&c.to_ne_bytes(), &[1], MapFlags::ANY)
                .with_context(|| format!("adding target cgroup {c}"))?;
        }
        for c in self.applied.cgroups.difference(&want.cgroups) {
            if let Some(i) = self.window.index(*c) {
                set_bit(self.cgroup_bits, i, false);
            }
            let _ = self.cgroups.delete(&c.to_ne_bytes());
        }
        let kept: BTreeSet<u64> = self
            .applied
            .cgroups
            .intersection(&want.cgroups)
            .copied()
            .collect();
        if let Some(base) = self.window.rebase(&kept, &want.cgroups) {
            // The bitmap holds no bit now, so no id finds a stale one at the new base; every
            // target is in the map, asked meanwhile (the outside count covers them all).
            // SAFETY: aligned words of the mmapped .bss, each stored whole.
            unsafe {
                std::ptr::write_volatile(self.cgroup_outside, want.cgroups.len() as u32);
                std::ptr::write_volatile(self.cgroup_base, base);
            }
            self.window.base = base;
            tracing::debug!(base, "target cgroup window moved");
        }
        for c in &want.cgroups {
            if let Some(i) = self.window.index(*c) {
                set_bit(self.cgroup_bits, i, true);
            }
        }
        let outside = want
            .cgroups
            .iter()
            .filter(|c| self.window.index(**c).is_none())
            .count();
        // SAFETY: an aligned u32 of the mmapped .bss, stored whole; after the bits.
        unsafe { std::ptr::write_volatile(self.cgroup_outside, outside as u32) };
        // Listening ports are only added: the kernel also learns them at accept(), and the LRU
        // map forgets stale ones by itself.
        for (netns, port) in want.listen.difference(&self.applied.listen) {
            let key = [netns.to_ne_bytes(), u32::from(*port).to_ne_bytes()].concat();
            if let Err(e) = self.listen.update(&key, &[1], MapFlags::ANY) {
                tracing::debug!(error = %e, "listen port not added");
            }
            if let Err(e) = self
                .ports
                .update(&u32::from(*port).to_ne_bytes(), &[1], MapFlags::ANY)
            {
                tracing::debug!(error = %e, "target port not added");
            }
            set_port_bit(self.port_bits, *port);
        }
        // SAFETY: a plain aligned u32 in memory the kernel shares with the program; a torn
        // read is impossible for an aligned 32-bit store.
        unsafe { std::ptr::write_volatile(self.n_cgroups, want.cgroups.len() as u32) };
        self.applied = want.clone();
        Ok(())
    }
}

/// The cgroup ids `target_cgroup_bits` covers: `[base, base + width)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CgroupWindow {
    base: u64,
    width: u64,
}

impl CgroupWindow {
    /// `id`'s bit, if the window covers it.
    fn index(&self, id: u64) -> Option<u64> {
        let rel = id.wrapping_sub(self.base);
        (rel < self.width).then_some(rel)
    }

    /// Where the window goes for the targets `want`, of which `kept` were targets already: at
    /// the oldest target (cgroup ids only grow, so later pods land in it), but only when it holds
    /// none of `kept` (no bit is set then: moving it cannot make a stale bit name another
    /// cgroup) and misses one of `want`. None: it stays.
    fn rebase(&self, kept: &BTreeSet<u64>, want: &BTreeSet<u64>) -> Option<u64> {
        if kept.iter().any(|c| self.index(*c).is_some())
            || want.iter().all(|c| self.index(*c).is_some())
        {
            return None;
        }
        want.first().copied()
    }
}

/// Sets or clears bit `idx` of one of the kernel's target bitmaps (`target_tgid_bits` by
/// tgid, `target_cgroup_bits` by cgroup id: byte `idx / 8`, bit `idx % 8`, as
/// `tgid_is_target` and `cgroup_is_target` in l7.bpf.c read them). The agent's BPF thread is
/// the only writer; each byte is stored whole, so a program never sees it torn. False when
/// `idx` is beyond the bitmap (a tgid cannot be: the kernel's pid limit is 4M; a cgroup's index
/// is within its window).
fn set_bit(bits: &mut [u8], idx: u64, on: bool) -> bool {
    let Some(byte) = usize::try_from(idx / 8).ok().and_then(|i| bits.get_mut(i)) else {
        return false;
    };
    let mask = 1u8 << (idx % 8);
    let v = if on { *byte | mask } else { *byte & !mask };
    // SAFETY: a byte of the mmapped .bss that the programs read concurrently; volatile so the
    // store is made now and whole.
    unsafe { std::ptr::write_volatile(byte, v) };
    true
}

/// Sets `port`'s bit of `target_port_bits` (word `port / 64`, bit `port % 64`, as `port_bit` in
/// l7.bpf.c reads it). accept() sets bits there too, with an atomic or: so does this.
fn set_port_bit(words: &mut [u64], port: u16) {
    let word = &mut words[usize::from(port / 64)];
    // SAFETY: an aligned u64 of the mmapped .bss (AtomicU64 has u64's layout), which the
    // programs update with atomic ors of their own while this runs.
    let word = unsafe { std::sync::atomic::AtomicU64::from_ptr(word) };
    word.fetch_or(1u64 << (port % 64), std::sync::atomic::Ordering::Relaxed);
}

impl StatsMap {
    /// Sums the per-CPU counters.
    pub fn read(&self) -> [u64; STAT_NAMES.len()] {
        let mut out = [0u64; STAT_NAMES.len()];
        for (i, slot) in out.iter_mut().enumerate() {
            let key = (i as u32).to_ne_bytes();
            if let Ok(Some(per_cpu)) = self.0.lookup_percpu(&key, MapFlags::ANY) {
                *slot = per_cpu
                    .iter()
                    .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
                    .map(u64::from_ne_bytes)
                    .sum();
            }
        }
        out
    }
}

/// Attaches every program of a loaded object by its section. A program whose hook is missing on
/// this kernel is reported and skipped, unless `essential` says the agent cannot work without it.
pub fn attach_all(
    obj: &libbpf_rs::Object,
    what: &str,
    essential: impl Fn(&str) -> bool,
) -> Result<(Vec<Link>, Vec<AttachedProg>)> {
    let mut links = Vec::new();
    let mut progs = Vec::new();
    for prog in obj.progs_mut() {
        // Programs left out at load (the other syscall hook set).
        if !prog.autoload() {
            continue;
        }
        let name = prog.name().to_string_lossy().into_owned();
        let section = prog.section().to_string_lossy().into_owned();
        match prog.attach() {
            Ok(link) => {
                links.push(link);
                progs.push(AttachedProg {
                    name,
                    section,
                    attached: true,
                    error: None,
                });
            }
            Err(e) if essential(&section) => bail!(
                "attaching {name} ({section}) failed: {e}. Is tracefs mounted \
                 (mount -t tracefs tracefs /sys/kernel/tracing)?"
            ),
            Err(e) => {
                tracing::warn!(%name, %section, error = %e, "{what}: optional hook not attached");
                progs.push(AttachedProg {
                    name,
                    section,
                    attached: false,
                    error: Some(e.to_string()),
                });
            }
        }
    }
    Ok((links, progs))
}

fn bump_memlock_rlimit() {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it.
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}

#[cfg(test)]
mod tests {
    use super::CgroupWindow;
    use std::collections::BTreeSet;

    #[test]
    fn the_cgroup_window_moves_to_the_oldest_target_only_when_it_holds_none() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        let w = CgroupWindow {
            base: 0,
            width: 4 << 20,
        };
        assert_eq!(w.index(0), Some(0));
        assert_eq!(w.index((4 << 20) - 1), Some((4 << 20) - 1));
        assert_eq!(w.index(4 << 20), None);
        // A fresh node: every target in the window from 0, which stays.
        assert_eq!(w.rebase(&set(&[]), &set(&[9_000, 12_000])), None);
        // A node up for long: the window goes to the oldest target.
        let want = set(&[5_638_978, 5_700_001]);
        assert_eq!(w.rebase(&set(&[]), &want), Some(5_638_978));
        let w = CgroupWindow {
            base: 5_638_978,
            ..w
        };
        assert_eq!(w.index(5_700_001), Some(5_700_001 - 5_638_978));
        assert_eq!(w.index(5_638_977), None, "below the base");
        // A later pod beyond the window while an earlier one is kept: it stays (that pod is
        // asked in the map).
        let later = 5_638_978 + (4 << 20) + 7;
        assert_eq!(w.rebase(&set(&[5_700_001]), &set(&[5_700_001, later])), None);
        // Once the window's targets are gone, it moves to the oldest of the rest.
        assert_eq!(w.rebase(&set(&[later]), &set(&[later, later + 50])), Some(later));
        // No target: nothing to move to.
        assert_eq!(w.rebase(&set(&[]), &set(&[])), None);
        // A width-1 window (LLMSLO_CGROUP_WINDOW=1) covers its base alone.
        let one = CgroupWindow { base: 70, width: 1 };
        assert_eq!((one.index(70), one.index(71), one.index(69)), (Some(0), None, None));
    }

    #[test]
    fn each_hook_set_loads_its_own_read_write_programs() {
        use super::SyscallHooks::{Raw, Sock, Tracepoints};
        let sets = [Sock, Tracepoints, Raw];
        let loads = |s: &str| sets.map(|h| h.loads(s));
        // (section, loaded with sock / tracepoint / raw)
        for (section, want) in [
            ("tp_btf/sock_send_length", [true, false, false]),
            ("tp_btf/sock_recv_length", [true, false, false]),
            ("tp_btf/tcp_sendmsg_locked", [true, false, false]),
            ("tracepoint/syscalls/sys_enter_write", [false, true, false]),
            ("tracepoint/syscalls/sys_exit_recvmsg", [false, true, false]),
            ("tracepoint/syscalls/sys_enter_accept4", [true, true, false]),
            ("tracepoint/syscalls/sys_exit_accept", [true, true, false]),
            ("tracepoint/syscalls/sys_enter_close", [true, true, false]),
            ("tp_btf/sys_enter", [false, false, true]),
            ("tp_btf/sys_exit", [false, false, true]),
        ] {
            assert_eq!(loads(section), want.map(Some), "{section}");
        }
        // Everything else loads with every set.
        for section in ["tracepoint/sock/sk_data_ready", "tracepoint/sock/inet_sock_set_state"] {
            assert_eq!(loads(section), [None; 3], "{section}");
        }
    }

    #[test]
    fn port_bits_are_set_in_the_word_and_bit_the_programs_read() {
        let mut words = vec![0u64; 65536 / 64];
        // Word port/64, bit port%64: what l7.bpf.c's port_bit reads.
        for port in [0u16, 63, 64, 8000, 65535] {
            super::set_port_bit(&mut words, port);
        }
        super::set_port_bit(&mut words, 8000); // again: no change
        let set: Vec<u16> = (0..=u16::MAX)
            .filter(|p| words[usize::from(p / 64)] >> (p % 64) & 1 == 1)
            .collect();
        assert_eq!(set, [0, 63, 64, 8000, 65535]);
        assert_eq!((words[0], words[1]), (1 | 1 << 63, 1));
    }

    #[test]
    fn tgid_bits_are_set_and_cleared_one_at_a_time() {
        let mut bits = vec![0u8; 4 * 1024 * 1024 / 8];
        // Byte tgid/8, bit tgid%8: what l7.bpf.c's tgid_is_target reads.
        assert!(super::set_bit(&mut bits, 13, true));
        assert_eq!(bits[1], 0b0010_0000);
        assert!(super::set_bit(&mut bits, 8, true));
        assert_eq!(bits[1], 0b0010_0001);
        assert!(super::set_bit(&mut bits, 13, false));
        assert_eq!(bits[1], 0b0000_0001, "the neighbour in the same byte stays");
        assert!(super::set_bit(&mut bits, 4 * 1024 * 1024 - 1, true));
        assert_eq!(bits[bits.len() - 1], 0x80);
        assert!(
            !super::set_bit(&mut bits, 4 * 1024 * 1024, true),
            "beyond the pid limit"
        );
        assert!(
            !super::set_bit(&mut bits, 5 << 32, true),
            "a cgroup id past the bitmap (the map holds it)"
        );
        assert_eq!(bits.iter().map(|b| b.count_ones()).sum::<u32>(), 2);
    }

    #[test]
    fn conn_map_evictions_from_counters_and_live_entries() {
        let mut h = ConnMapHealth {
            capacity: 1024,
            ..Default::default()
        };
        // 1,500 inserted, 100 closed, 1,024 live: 376 evicted.
        h.update((1500, 100), (1500, 100), 1024);
        assert_eq!((h.live, h.evicted), (1024, 376));
        // Connections opened and closed during the walk: a lower bound, never more.
        h.update((1600, 150), (1700, 260), 1024);
        assert_eq!(h.evicted, 376, "1600 - 260 - 1024 = 316 < 376: kept");
        h.update((2000, 300), (2000, 300), 1024);
        assert_eq!(h.evicted, 676);
        // Counters smaller than the live count (a walk that saw entries inserted after the
        // first read) do not underflow.
        h.update((10, 0), (10, 0), 50);
        assert_eq!(h.evicted, 676);
    }

    use super::*;

    #[test]
    fn stream_slots_are_a_power_of_two_from_2_to_65536() {
        assert_eq!(parse_stream_slots(None).unwrap(), STREAM_SLOTS_DEFAULT);
        assert_eq!(parse_stream_slots(Some("")).unwrap(), STREAM_SLOTS_DEFAULT);
        assert_eq!(parse_stream_slots(Some("2")).unwrap(), 2);
        assert_eq!(parse_stream_slots(Some("65536")).unwrap(), 65536);
        for bad in ["0", "1", "3", "4095", "131072", "-2", "x"] {
            let e = parse_stream_slots(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(ENV_STREAM_SLOTS), "{bad}: {e}");
        }
    }

    #[test]
    fn stat_names_match_the_c_enum() {
        use types::llmslo_stat as S;
        assert_eq!(STAT_NAMES.len(), S::LLMSLO_ST_MAX.0 as usize);
        assert_eq!(STAT_NAMES[S::LLMSLO_ST_RB_FULL.0 as usize], "ringbuf_full");
        assert_eq!(
            STAT_NAMES[S::LLMSLO_ST_TRUNCATED.0 as usize],
            "payload_truncated"
        );
        assert_eq!(
            STAT_NAMES[S::LLMSLO_ST_SYSCALL_ERR.0 as usize],
            "syscall_error"
        );
        assert_eq!(
            STAT_NAMES[S::LLMSLO_ST_STREAM_BUSY.0 as usize],
            "stream_slots_busy"
        );
    }

    #[test]
    fn event_layout_is_pinned() {
        use std::mem::{offset_of, size_of};
        use types::llmslo_event_hdr as H;
        assert_eq!(size_of::<H>(), 128 + 64 + 40);
        assert_eq!(offset_of!(H, ts_enter), 0);
        assert_eq!(offset_of!(H, queued_ts), 24);
        assert_eq!(offset_of!(H, ret), 40);
        assert_eq!(offset_of!(H, head_len), 60);
        assert_eq!(offset_of!(H, kind), 68);
        assert_eq!(offset_of!(H, laddr), 76);
        assert_eq!(offset_of!(H, comm), 108);
        assert_eq!(offset_of!(H, net_ts), 128);
        assert_eq!(offset_of!(H, runq_total_ns), 192);
        assert_eq!(offset_of!(H, gpu_launches), 200);
        assert_eq!(offset_of!(H, gpu_graph_launches), 208);
        assert_eq!(offset_of!(H, gpu_sync_wait_ns), 216);
        assert_eq!(offset_of!(H, inside), 224);
        assert_eq!(size_of::<types::llmslo_event>(), 232 + 4096 + 512);
        assert_eq!(size_of::<types::llmslo_flow_key>(), 40);
    }
}
