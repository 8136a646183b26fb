//! The running agent: the BPF thread (ring buffer → assembler → store), the discovery loop,
//! and the state the HTTP API reads.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use libbpf_rs::RingBufferBuilder;

use crate::assemble::{Assembler, AssemblerConfig, AssemblerStats};
use crate::config::Config;
use crate::discovery::k8s::K8sState;
use crate::discovery::{self, DiscoveryConfig, Snapshot};
use crate::loader::{AttachedProg, TargetSet, L7, STAT_NAMES};
use crate::netpath::{AttachedHook, NetPath};
use crate::probe::ProbeReport;
use crate::record::RequestRecord;
use crate::stats::{route_of, Aggregator, AggregatorConfig, Labels};

/// Finished requests: the recent ones for the API, and the aggregates.
pub struct Store {
    pub recent: VecDeque<Arc<RequestRecord>>,
    cap: usize,
    /// Most bytes (`RequestRecord::heap_bytes`) the recent records may hold together.
    byte_cap: usize,
    /// What they hold now.
    pub recent_bytes: usize,
    pub agg: Aggregator,
    pub slo: crate::slo::SloEngine,
    pub heatmap: crate::stats::heatmap::Heatmap,
    pub abnormal: crate::abnormal::Abnormal,
    /// `kubernetes.labels`: the pod labels request series carry, in order.
    pod_label_keys: Vec<String>,
}

impl Store {
    /// Keeps at most `cap` recent records holding at most `byte_cap` bytes together.
    pub fn new(
        (cap, byte_cap): (usize, usize),
        agg: Aggregator,
        slo: crate::slo::SloEngine,
    ) -> Store {
        Store {
            recent: VecDeque::with_capacity(cap.min(4096)),
            cap,
            byte_cap,
            recent_bytes: 0,
            agg,
            slo,
            heatmap: Default::default(),
            abnormal: crate::abnormal::Abnormal::new(100),
            pod_label_keys: Vec::new(),
        }
    }

    /// Stores a finished record; answers it and why the abnormal store kept it.
    pub fn push(
        &mut self,
        rec: RequestRecord,
        now_s: u64,
    ) -> (Arc<RequestRecord>, crate::abnormal::KeptBecause) {
        let labels = Labels {
            namespace: rec.namespace.clone().unwrap_or_default(),
            pod: rec.pod.clone().unwrap_or_default(),
            model: rec.model.clone().unwrap_or_default(),
            route: route_of(rec.path.as_deref()),
            container: rec.container.clone().unwrap_or_default(),
            node: rec.node.clone().unwrap_or_default(),
            pod_labels: self
                .pod_label_keys
                .iter()
                .map(|k| rec.labels.get(k).cloned().unwrap_or_default())
                .collect(),
        };
        let violated = self.slo.observe(&rec, &labels.route, now_s);
        self.agg.record(&rec, labels, now_s);
        // Oldest out until both the count and the bytes fit (a record of many tokens weighs
        // more: memory stays bounded whatever the generations' length).
        let bytes = rec.heap_bytes();
        while self.recent.len() >= self.cap
            || (!self.recent.is_empty() && self.recent_bytes + bytes > self.byte_cap)
        {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            self.recent_bytes = self.recent_bytes.saturating_sub(old.heap_bytes());
        }
        self.heatmap.record(&rec, now_s);
        let rec = Arc::new(rec);
        let why = self.abnormal.record(&rec, violated, now_s);
        self.recent.push_back(rec.clone());
        self.recent_bytes += bytes;
        (rec, why)
    }
}

/// Agent health, refreshed by the BPF thread.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub bpf: [u64; STAT_NAMES.len()],
    pub conn_map: crate::loader::ConnMapHealth,
    pub events_read: u64,
    pub decode_errors: u64,
    pub assembler: AssemblerStats,
}

/// Wakes the discovery loop before its interval is up (a new server exec'd, a target exited,
/// the Kubernetes index changed).
#[derive(Default)]
pub struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn wake(&self) {
        *self.pending.lock().expect("wake lock") = true;
        self.cv.notify_all();
    }

    /// Waits up to `d` for a wake-up; true when woken.
    pub fn wait(&self, d: Duration) -> bool {
        let g = self.pending.lock().expect("wake lock");
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, d, |p| !*p)
            .expect("wake lock");
        std::mem::replace(&mut *g, false)
    }
}

pub struct Shared {
    pub store: Mutex<Store>,
    pub k8s: Arc<K8sState>,
    pub wake: Arc<Wake>,
    /// Exec/exit events that woke discovery (the `sched_process_exec` watcher).
    pub exec_wakes: std::sync::atomic::AtomicU64,
    /// The pids that exec'd since discovery's last scan (the same watcher).
    pub execs: Arc<crate::discovery::procs::Execs>,
    /// The kernel's count of TCP sockets that started or stopped listening, copied from the
    /// L7 object every tick of the BPF thread ([`UNKNOWN`] until it is loaded).
    pub listen_changes: Arc<std::sync::atomic::AtomicU64>,
    /// `listen()` calls the process watcher has seen (it wakes discovery at once, before the
    /// BPF thread's next copy of `listen_changes`): a scan re-reads the listener tables when
    /// either count moved.
    pub listens_seen: Arc<std::sync::atomic::AtomicU64>,
    pub health: Mutex<Health>,
    pub snapshot: RwLock<Snapshot>,
    pub probe: ProbeReport,
    pub programs: RwLock<Vec<AttachedProg>>,
    /// What the verifier did with each loaded program.
    pub verifier: RwLock<Vec<crate::loader::VerifierStats>>,
    /// Where reads and writes are taken from (`LLMSLO_SYSCALL_HOOKS`: sock, tracepoint, raw).
    pub syscall_hooks: RwLock<&'static str>,
    pub hooks: RwLock<Vec<AttachedHook>>,
    pub gpu: RwLock<crate::gpu::GpuView>,
    /// Run-queue waits of the targets, per pod.
    pub runq: RwLock<BTreeMap<crate::podtotals::PodLabels, crate::runq::RunqCounts>>,
    /// How long a pod's series (requests, run-queue, GPU) outlive its last target.
    pub forget_after: Duration,
    pub ready: AtomicBool,
    pub stop: Arc<AtomicBool>,
    pub started: Instant,
    /// The kernel's run-time accounting, held on for the agent's life (`bpf_stats: true`).
    pub bpf_stats: Option<std::os::fd::OwnedFd>,
    /// OTLP trace export, when configured.
    pub otlp: Option<crate::otlp::Otlp>,
    /// Cross-check against the servers' own metrics, when enabled.
    pub crosscheck: Option<Arc<crate::crosscheck::Crosscheck>>,
    /// The threads that hold attached programs and detach them once `stop` is set.
    hook_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Event fds that [`Shared::request_stop`] makes readable: a thread that waits in epoll
    /// (the exec watcher) wakes at once instead of polling `stop`.
    stop_fds: Mutex<Vec<std::os::fd::OwnedFd>>,
    /// An event fd in the BPF reader's epoll set: discovery makes it readable when it hands
    /// over new targets, so a reader asleep on its long quiet-time timer applies them at once.
    reader_fd: std::sync::OnceLock<std::os::fd::OwnedFd>,
}

impl Shared {
    /// Sets `stop` and wakes the threads that wait for something else than a timeout.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.wake();
        for fd in self.stop_fds.lock().expect("stop fds lock").iter() {
            signal_eventfd(fd);
        }
    }

    /// The reader's wake-up event fd (created once, owned here; the reader adds it to its
    /// epoll set and reads it empty after each wait).
    pub fn reader_eventfd(&self) -> std::io::Result<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        if let Some(fd) = self.reader_fd.get() {
            return Ok(fd.as_raw_fd());
        }
        let owned = new_eventfd()?;
        Ok(self.reader_fd.get_or_init(|| owned).as_raw_fd())
    }

    /// Wakes the BPF reader if it waits (no-op before it made its event fd).
    pub fn wake_reader(&self) {
        if let Some(fd) = self.reader_fd.get() {
            signal_eventfd(fd);
        }
    }

    /// An event fd that becomes readable at [`Shared::request_stop`] (or at once, when that
    /// has been asked already). Owned here; the caller adds it to its epoll set.
    pub fn stop_eventfd(&self) -> std::io::Result<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let owned = new_eventfd()?;
        let raw = owned.as_raw_fd();
        self.stop_fds.lock().expect("stop fds lock").push(owned);
        if self.stop.load(Ordering::SeqCst) {
            self.request_stop();
        }
        Ok(raw)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Shared {
    /// `cfg` must have passed `Config::validate` (which builds the SLO engine once).
    pub fn new(cfg: &Config, probe: ProbeReport) -> Result<Arc<Shared>> {
        let slo = crate::slo::SloEngine::new(cfg.slos.clone())?;
        let agg = Aggregator::new(AggregatorConfig {
            max_label_sets: cfg.max_label_sets,
            pod_labels: cfg.kubernetes.labels.clone(),
            ..Default::default()
        });
        let mut store = Store::new((cfg.recent_requests, cfg.recent_requests_bytes), agg, slo);
        store.pod_label_keys.clone_from(&cfg.kubernetes.labels);
        Ok(Arc::new(Shared {
            store: Mutex::new(store),
            k8s: Arc::default(),
            wake: Arc::default(),
            exec_wakes: Default::default(),
            execs: Default::default(),
            listen_changes: Arc::new(std::sync::atomic::AtomicU64::new(UNKNOWN)),
            listens_seen: Default::default(),
            health: Mutex::new(Health::default()),
            snapshot: RwLock::new(Snapshot::default()),
            probe,
            programs: RwLock::new(Vec::new()),
            verifier: RwLock::new(Vec::new()),
            syscall_hooks: RwLock::new(""),
            hooks: RwLock::new(Vec::new()),
            gpu: RwLock::new(Default::default()),
            runq: RwLock::new(Default::default()),
            forget_after: Duration::from_secs(cfg.discovery.forget_after_s),
            ready: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            bpf_stats: cfg
                .bpf_stats
                .then(|| {
                    crate::selfcost::stats_on()
                        .inspect(|_| tracing::info!("bpf_stats: the kernel counts BPF program run time while the agent runs"))
                        .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "bpf_stats: the kernel's run-time accounting could not be turned on (BPF_ENABLE_STATS needs CAP_SYS_ADMIN, which the DaemonSet does not add: set kernel.bpf_stats_enabled=1 on the node instead)"))
                        .ok()
                })
                .flatten(),
            otlp: crate::otlp::Otlp::start_if_enabled(&cfg.otlp)?,
            crosscheck: cfg.crosscheck.enabled.then(|| {
                Arc::new(crate::crosscheck::Crosscheck::new(
                    cfg.crosscheck.clone(),
                    cfg.max_label_sets,
                ))
            }),
            hook_threads: Mutex::new(Vec::new()),
            stop_fds: Mutex::new(Vec::new()),
            reader_fd: std::sync::OnceLock::new(),
        }))
    }

    /// Labels the finished records from discovery and stores them, leaving `recs` empty with
    /// its capacity (the reader's batch, reused every drain: taken by value it was grown from
    /// nothing, a realloc and a copy of every record so far at each doubling).
    fn accept(&self, recs: &mut Vec<RequestRecord>) {
        // The agent's own scrapes of a server's /metrics are no one's latency.
        if let Some(x) = &self.crosscheck {
            recs.retain(|r| !x.is_own(r));
        }
        if recs.is_empty() {
            return;
        }
        {
            let snap = self.snapshot.read().expect("snapshot lock");
            for r in recs.iter_mut() {
                if let Some(m) = snap.meta(r.pid, r.cgroup_id) {
                    r.namespace.clone_from(&m.namespace);
                    r.pod.clone_from(&m.pod);
                    r.container.clone_from(&m.container);
                    r.node.clone_from(&m.node);
                    r.labels.clone_from(&m.labels);
                }
            }
        }
        let now = unix_now();
        let mut store = self.store.lock().expect("store lock");
        for r in recs.drain(..) {
            let (rec, why) = store.push(r, now);
            if let Some(x) = &self.otlp {
                x.offer(&rec, why);
            }
        }
    }
}

pub fn discovery_config(cfg: &Config, probe: &ProbeReport) -> DiscoveryConfig {
    DiscoveryConfig {
        proc_root: cfg.discovery.proc_root.clone(),
        signatures: discovery::signatures(&cfg.discovery.extra_signatures),
        auto: cfg.discovery.auto,
        pids: cfg.discovery.target_pids.clone(),
        cgroups: cfg.discovery.target_cgroups.clone(),
        select: cfg.discovery.select.clone(),
        net: crate::discovery::net::NetCfg {
            enabled: cfg.network.enabled && probe.has("tc_program"),
            node_devices: cfg.network.node_devices.clone(),
            pod_veth_prefixes: cfg.network.pod_veth_prefixes.clone(),
            cni: cni_adapters::parse_force(&cfg.network.cni).ok().flatten(),
            kernel: crate::probe::kernel_version(&probe.kernel).unwrap_or((0, 0)),
            tcx: probe.has("tcx"),
            netfilter: probe.has("netfilter_link"),
            cni_conf_dir: cfg.network.cni_conf_dir.clone(),
            cni_state_root: cfg.network.cni_state_root.clone(),
        },
    }
}

/// Where the run-queue counters read the targets' threads (`discovery.proc_root`), when
/// `cpu_runqueue` is on and the kernel keeps per-thread run-queue waits.
fn runq_root(cfg: &Config) -> Option<std::path::PathBuf> {
    if !cfg.cpu_runqueue {
        return None;
    }
    if !crate::runq::kernel_keeps_waits() {
        tracing::warn!(
            "cpu_runqueue: this kernel keeps no per-thread run-queue waits (no \
             /proc/self/schedstat: CONFIG_SCHED_INFO off); the run-queue figures are absent"
        );
        return None;
    }
    Some(cfg.discovery.proc_root.clone())
}

/// Starts the BPF thread and waits until its programs are attached (or failed).
pub fn start_bpf(
    cfg: &Config,
    shared: Arc<Shared>,
    targets: mpsc::Receiver<Snapshot>,
) -> Result<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
    let ringbuf_bytes = cfg.ringbuf_bytes;
    let conn_entries = cfg.max_kernel_connections;
    let runq = runq_root(cfg);
    let gpu_uprobes = cfg.gpu_uprobes;
    let network = cfg.network.enabled;
    let asm_cfg = AssemblerConfig {
        max_conns: cfg.max_connections,
        arm_streams: cfg.kernel_token_counting,
        ..Default::default()
    };
    let handle = std::thread::Builder::new()
        .name("llmslo-bpf".into())
        .spawn(move || {
            let sizes = (ringbuf_bytes, conn_entries, runq);
            let hooks = (network, gpu_uprobes);
            if let Err(e) = bpf_thread(hooks, sizes, asm_cfg, &shared, targets, &ready_tx) {
                let _ = ready_tx.try_send(Err(e));
            }
        })?;
    ready_rx
        .recv()
        .context("BPF thread died during start-up")??;
    Ok(handle)
}

fn bpf_thread(
    (network, gpu_uprobes): (bool, bool),
    (ringbuf_bytes, conn_entries, runq): (u32, u32, Option<std::path::PathBuf>),
    asm_cfg: AssemblerConfig,
    shared: &Shared,
    targets: mpsc::Receiver<Snapshot>,
    ready: &mpsc::SyncSender<Result<()>>,
) -> Result<()> {
    let mut l7 = L7::load(ringbuf_bytes, conn_entries, runq.is_some())?;
    let mut conn_map = crate::loader::ConnMapHealth {
        capacity: l7.conns.capacity,
        ..Default::default()
    };
    let mut last_conn_walk: Option<Instant> = None;
    let mut last_trim = Instant::now();
    let mut progs = l7.progs.clone();
    let mut verifier = l7.verifier.clone();
    let mut netpath = if network {
        let tcx = shared.probe.has("tcx");
        match NetPath::load(&l7.skel, tcx, shared.probe.has("netfilter_link")) {
            Ok(n) => {
                progs.extend(n.progs.clone());
                verifier.extend(n.verifier.clone());
                Some(n)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "network-path programs not loaded: network stages absent");
                None
            }
        }
    } else {
        None
    };
    let mut gpu = if gpu_uprobes {
        crate::gpu::Gpu::load(&l7.skel)
            .map(|g| g.forget_after(shared.forget_after))
            .inspect(|g| verifier.extend(g.verifier.clone()))
            .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "GPU uprobes not loaded"))
            .ok()
    } else {
        tracing::info!("gpu_uprobes: false: the CUDA driver is not probed");
        None
    };
    let mut runq = runq.map(|root| crate::runq::RunQueue::new(&root, shared.forget_after));
    *shared.programs.write().expect("programs lock") = progs;
    // The exec watcher adds its own programs to the list.
    shared
        .verifier
        .write()
        .expect("verifier lock")
        .extend(verifier);
    *shared.syscall_hooks.write().expect("syscall hooks lock") = l7.hooks.name();
    let asm = RefCell::new(Assembler::new(asm_cfg));
    let pending: RefCell<Vec<RequestRecord>> = RefCell::new(Vec::with_capacity(256));
    let counters = RefCell::new((0u64, 0u64)); // (events read, decode errors)
    let mut builder = RingBufferBuilder::new();
    builder.add(&l7.skel.maps.events, |data: &[u8]| {
        match crate::ringbuf::decode(data) {
            Ok(ev) => {
                counters.borrow_mut().0 += 1;
                let mut p = pending.borrow_mut();
                asm.borrow_mut().on_event(&ev, &mut |r| p.push(r));
            }
            Err(e) => {
                counters.borrow_mut().1 += 1;
                tracing::debug!(error = %e, "undecodable ring buffer record");
            }
        }
        0
    })?;
    let rb = builder.build()?;
    // A snapshot is published (/api/v1/targets, pod labels) only once its targets are in the
    // BPF maps: whoever sees a server listed can rely on its traffic being traced.
    type Gpu = Option<crate::gpu::Gpu>;
    // Hooks go on before the target maps are filled: a new server's first connection is then
    // stamped on its pod veth as soon as its port makes it traced.
    let apply = |snap: Snapshot, l7: &mut L7, np: &mut Option<NetPath>, gpu: &mut Gpu| {
        if let Some(np) = np.as_mut() {
            np.apply(&snap.set.hooks);
            *shared.hooks.write().expect("hooks lock") = np.hooks.clone();
        }
        let res = l7.targets.apply(&snap.set);
        if let Some(g) = gpu.as_mut() {
            g.apply(&snap.set.cuda, &snap.set.gpu_cgroups);
            if g.probing() {
                l7.targets.gpu_probed();
            }
        }
        *shared.snapshot.write().expect("snapshot lock") = snap;
        res
    };
    if let Ok(snap) = targets.try_recv() {
        apply(snap, &mut l7, &mut netpath, &mut gpu)?;
    }
    shared.ready.store(true, Ordering::SeqCst);
    let _ = ready.try_send(Ok(()));
    tracing::info!("BPF programs attached; tracing");

    // Shutdown and new targets end a wait at once through event fds in the ring buffer's epoll
    // set (libbpf reads an event's data as a ring index: 0, the one ring, which it drains), so
    // a quiet reader may sleep long. Without them it keeps the short tick.
    let reader_fd = shared.reader_eventfd().ok();
    let may_idle = reader_fd.is_some_and(|r| {
        [Some(r), shared.stop_eventfd().ok()]
            .into_iter()
            .all(|fd| fd.is_some_and(|fd| epoll_add(rb.epoll_fd(), fd)))
    });
    let mut quiet = Quiet::new(may_idle);
    let mut last_housekeeping = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        // Events are submitted without wake-ups (BPF_RB_NO_WAKEUP) unless a backlog builds, or
        // the ring was empty while the reader is idle, so the poll mostly times out: drain
        // explicitly every tick.
        if let Err(e) = rb.poll(quiet.tick()) {
            tracing::warn!(error = %e, "ring buffer poll failed");
        }
        if let Err(e) = rb.consume() {
            tracing::warn!(error = %e, "ring buffer consume failed");
        }
        if let Some(fd) = reader_fd {
            let mut n = 0u64;
            // SAFETY: an 8-byte read into a live u64 from a non-blocking eventfd we own.
            unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
        }
        match quiet.after_drain(counters.borrow().0, Instant::now()) {
            Some(Transition::Busy) => l7.reader_idle.set(false),
            Some(Transition::Idle) => {
                l7.reader_idle.set(true);
                // A record written between the drain above and the flag woke no one: take it
                // now (and stay on the short tick if there was one).
                let _ = rb.consume();
                if quiet.after_drain(counters.borrow().0, Instant::now()) == Some(Transition::Busy)
                {
                    l7.reader_idle.set(false);
                }
            }
            None => {}
        }
        for arm in asm.borrow_mut().take_arms() {
            if let Err(e) = l7.arms.arm(&arm) {
                tracing::debug!(error = %e, "could not arm a stream");
            }
        }
        shared.accept(&mut pending.borrow_mut());
        shared
            .listen_changes
            .store(l7.targets.listen_changes(), Ordering::Release);
        while let Ok(snap) = targets.try_recv() {
            if let Err(e) = apply(snap, &mut l7, &mut netpath, &mut gpu) {
                tracing::warn!(error = %e, "could not update target maps");
            }
        }
        if last_housekeeping.elapsed() >= Duration::from_millis(500) {
            last_housekeeping = Instant::now();
            if let Some(np) = netpath.as_mut() {
                np.log_churn();
            }
            if let Some(g) = gpu.as_mut() {
                let view = g.refresh(&shared.snapshot.read().expect("snapshot lock"));
                *shared.gpu.write().expect("gpu lock") = view;
            }
            if let Some(view) = runq
                .as_mut()
                .and_then(|r| r.refresh(&shared.snapshot.read().expect("snapshot lock")))
            {
                *shared.runq.write().expect("runq lock") = view;
            }
            asm.borrow_mut()
                .expire(mono_ns(), &mut |r| pending.borrow_mut().push(r));
            shared.accept(&mut pending.borrow_mut());
            let (read, bad) = *counters.borrow();
            let counters = l7.stats.read();
            if last_trim.elapsed() >= TRIM_EVERY {
                last_trim = Instant::now();
                release_free_heap();
            }
            // Walking the connection map costs a syscall per entry: every 5 s.
            if last_conn_walk.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                last_conn_walk = Some(Instant::now());
                let live = l7.conns.live();
                let after = l7.stats.read();
                let ins_del = |c: &[u64; STAT_NAMES.len()]| {
                    (
                        c[crate::loader::STAT_CONN_INSERT],
                        c[crate::loader::STAT_CONN_DELETE],
                    )
                };
                conn_map.update(ins_del(&counters), ins_del(&after), live);
            }
            let mut h = shared.health.lock().expect("health lock");
            h.bpf = counters;
            h.conn_map = conn_map;
            h.events_read = read;
            h.decode_errors = bad;
            h.assembler = asm.borrow().stats().clone();
        }
    }
    // Drain what is left so nothing read is dropped on shutdown.
    let _ = rb.consume();
    shared.accept(&mut pending.borrow_mut());
    drop(netpath);
    drop(gpu);
    tracing::info!("BPF thread stopped; detaching programs");
    Ok(())
}

/// Lowers the calling thread's priority to nice `target` (threads it starts afterwards inherit
/// it): never raises it, so an agent started at a lower priority keeps that. Answers the nice
/// value in effect. At nice 10 a CPU-bound server thread outweighs the agent ~9 to 1 where they
/// share a CPU: measured in docs/BENCHMARKS.md (overhead bench: the p50 and TTFT ratios).
pub fn lower_priority(target: i32) -> std::io::Result<i32> {
    // SAFETY: getpriority/setpriority on the calling thread (who = 0) touch no memory of ours;
    // errno is cleared first because -1 is a valid nice value.
    let now = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if now == -1 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error().unwrap_or(0) != 0 {
            return Err(e);
        }
    }
    if target <= now {
        return Ok(now);
    }
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(target)
}

/// `Shared::listen_changes` before the programs are loaded.
const UNKNOWN: u64 = u64::MAX;

/// How often freed heap pages go back to the kernel (see `release_free_heap`).
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// A non-blocking, close-on-exec event fd.
fn new_eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain eventfd(2); the fd is owned right away.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Makes an event fd readable.
fn signal_eventfd(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: an 8-byte write from a live u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
}

/// Adds `fd` to the epoll set `epfd` for input, with data 0 (to libbpf's ring buffer poll, ring
/// 0, which it then drains); false when it cannot.
pub(crate) fn epoll_add(epfd: std::os::fd::RawFd, fd: std::os::fd::RawFd) -> bool {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: both fds are open; ev is a valid epoll_event.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) == 0 }
}

/// The reader's pace: the short tick while records come, the long one after `QUIET_BEFORE_IDLE`
/// without any (the programs then wake it with the first record, `reader_idle`).
#[derive(Debug)]
struct Quiet {
    may_idle: bool,
    idle: bool,
    read: u64,
    since: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Transition {
    Busy,
    Idle,
}

impl Quiet {
    fn new(may_idle: bool) -> Quiet {
        Quiet {
            may_idle,
            idle: false,
            read: 0,
            since: Instant::now(),
        }
    }

    fn tick(&self) -> Duration {
        if self.idle {
            idle_drain_every()
        } else {
            DRAIN_EVERY
        }
    }

    /// After a drain that left `read` records read in all, at `now`: the change of pace due.
    fn after_drain(&mut self, read: u64, now: Instant) -> Option<Transition> {
        if read != self.read {
            self.read = read;
            self.since = now;
            if self.idle {
                self.idle = false;
                return Some(Transition::Busy);
            }
        } else if self.may_idle
            && !self.idle
            && now.saturating_duration_since(self.since) >= QUIET_BEFORE_IDLE
        {
            self.idle = true;
            return Some(Transition::Idle);
        }
        None
    }
}

/// How long without a record before the reader takes the long tick.
const QUIET_BEFORE_IDLE: Duration = Duration::from_secs(2);
/// The long tick: the housekeeping's pace (counters, expiry, GPU and run-queue views).
const IDLE_DRAIN_EVERY: Duration = Duration::from_millis(500);

/// The long tick, `LLMSLO_IDLE_DRAIN_MS` (50..=60000) where set: a test makes it long enough
/// that only the programs' wake-up can explain a prompt record.
fn idle_drain_every() -> Duration {
    static EVERY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("LLMSLO_IDLE_DRAIN_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| Duration::from_millis(ms.clamp(50, 60_000)))
            .unwrap_or(IDLE_DRAIN_EVERY)
    })
}

/// How long the reader sleeps between drains of the ring buffer when no backlog wakes it
/// (the programs wake it once per 256 KiB of backlog). Each wake-up costs the node a context
/// switch each way (~35 µs of CPU a wake-up on this VM, most of an idle agent's CPU); a record
/// waits at most this long to be assembled, its timestamps are the kernel's.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Hands the heap's free pages back to the kernel. Records come and go in bursts (a record's
/// token list grows while it streams, then is shrunk to size): glibc keeps what was freed in
/// its arenas. Measured in the soak benchmark: ~1 MiB of RSS back after its busy minute.
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and releases glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the discovery loop needs besides the scan config.
pub struct DiscoveryLoop {
    pub cfg: DiscoveryConfig,
    pub interval: Duration,
    /// Series of a pod that has had no target this long are dropped.
    pub forget_after: Duration,
    pub label_keys: Vec<String>,
    /// Set when Kubernetes enrichment is on.
    pub node: Option<String>,
    /// What one pass keeps for the next: which processes of targets' cgroups map libcuda;
    /// the namespaces' listening sockets, while no TCP socket of the node started or stopped
    /// listening (`Shared::listen_changes`, `Shared::listens_seen`); each process's
    /// command-line verdict, until it exec's (`Shared::execs`); the node's interfaces, until
    /// rtnetlink announces a change.
    pub cache: std::sync::Mutex<discovery::ScanCache>,
    pub listen_changes: Arc<std::sync::atomic::AtomicU64>,
    pub listens_seen: Arc<std::sync::atomic::AtomicU64>,
    pub execs: Arc<discovery::procs::Execs>,
}

impl DiscoveryLoop {
    /// One scan, labelled from the Kubernetes index.
    pub fn scan(&self, k8s: &K8sState) -> Snapshot {
        let mut cache = self.cache.lock().expect("scan cache lock");
        // Both counts only grow, so their sum moves whenever either does.
        let changes = self.listen_changes.load(Ordering::Acquire);
        let seen = self.listens_seen.load(Ordering::Acquire);
        cache
            .listeners
            .begin_scan((changes != UNKNOWN).then(|| changes.wrapping_add(seen)));
        cache
            .procs
            .begin_scan(&self.cfg.proc_root, self.execs.take());
        let mut snap = discovery::scan(&self.cfg, k8s, &mut cache);
        snap.enrich(k8s, &self.label_keys, self.node.as_deref());
        snap
    }
}

/// Gaps between the rescans that follow a wake-up.
const FOLLOWUPS_MS: [u64; 4] = [100, 400, 1000, 3000];

/// Rescans /proc and cgroups every interval, or at once when woken, and hands changed target
/// sets to the BPF thread. Drops the series of pods that are gone (see `forget_series`).
pub fn discovery_loop(dl: DiscoveryLoop, shared: Arc<Shared>, tx: mpsc::Sender<Snapshot>) {
    let mut last: Option<TargetSet> = None;
    let mut gone_since = BTreeMap::new();
    let mut followups: Vec<Duration> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let snap = dl.scan(&shared.k8s);
        let live = snap.pod_keys();
        forget_series(&shared, &live, &mut gone_since, dl.forget_after);
        if last.as_ref() != Some(&snap.set) {
            // Interfaces come and go with pods by hundreds: the BPF thread sums those up.
            let same_targets = last.as_ref().is_some_and(|l| {
                l.tgids == snap.set.tgids
                    && l.cgroups == snap.set.cgroups
                    && l.listen == snap.set.listen
            });
            if !same_targets {
                tracing::info!(tgids = ?snap.set.tgids, cgroups = ?snap.set.cgroups, "targets changed");
            }
            last = Some(snap.set.clone());
            // The BPF thread publishes it once the maps hold the new targets.
            if tx.send(snap).is_err() {
                return;
            }
            shared.wake_reader();
        } else {
            *shared.snapshot.write().expect("snapshot lock") = snap;
        }
        // After a wake-up, rescan a few more times soon: a server found at its exec opens its
        // listening sockets a little later, and those need to be in the BPF maps too.
        let mut deadline = Instant::now() + dl.interval;
        if let Some(d) = followups.pop() {
            deadline = deadline.min(Instant::now() + d);
        }
        let mut last_forget = Instant::now();
        while !shared.stop.load(Ordering::Relaxed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Shutdown wakes it too (the loop then sees `stop`).
            if shared.wake.wait(left.min(Duration::from_secs(1))) {
                followups = FOLLOWUPS_MS
                    .iter()
                    .rev()
                    .map(|&ms| Duration::from_millis(ms))
                    .collect();
                break;
            }
            // Series expire on time even when nothing wakes a rescan.
            if last_forget.elapsed() >= Duration::from_secs(1) {
                last_forget = Instant::now();
                forget_series(&shared, &live, &mut gone_since, dl.forget_after);
            }
        }
    }
}

/// The rule for dropping series: a pod's request series stay while the pod has a target (so
/// an idle server keeps its series however long it is idle) and are dropped once no target
/// has carried its (namespace, pod) labels for `after`. A pod that is deleted loses its
/// targets at the next scan (its processes exit: the exit tracepoint wakes discovery), so its
/// series go `after` later.
fn forget_series(
    shared: &Shared,
    live: &std::collections::BTreeSet<(String, String)>,
    gone_since: &mut BTreeMap<(String, String), Instant>,
    after: Duration,
) {
    let mut store = shared.store.lock().expect("store lock");
    let now = Instant::now();
    let with_series = store.agg.pods();
    gone_since.retain(|k, _| with_series.contains(k) && !live.contains(k));
    for k in with_series.difference(live) {
        let since = *gone_since.entry(k.clone()).or_insert(now);
        if now.duration_since(since) >= after {
            tracing::info!(namespace = %k.0, pod = %k.1, "pod gone: dropping its series");
            store.agg.forget_pod(&k.0, &k.1);
            gone_since.remove(k);
        }
    }
}

/// Runs discovery, the BPF thread and the HTTP server until SIGTERM or SIGINT, then stops
/// everything and detaches the programs.
pub async fn run_until_signal(cfg: Config) -> Result<()> {
    // Token and certificate problems fail the start, before any program is loaded.
    let auth = crate::serve::Auth::from_cfg(&cfg.api)?;
    let tls = match (&cfg.api.tls_cert_file, &cfg.api.tls_key_file) {
        (Some(c), Some(k)) => Some(crate::serve::tls_acceptor(c, k)?),
        (None, None) => None,
        _ => anyhow::bail!("api.tls_cert_file and api.tls_key_file go together"),
    };
    let shared = start(&cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(
        listen = %cfg.listen,
        tls = tls.is_some(),
        token = cfg.api.token_file.is_some(),
        "serving /metrics and /api/v1"
    );
    let stop = shared.clone();
    let app = crate::api::router(shared.clone()).layer(axum::middleware::from_fn_with_state(
        auth,
        crate::serve::require_token,
    ));
    // Detaching waits for RCU grace periods, one after another (see `netpath::Expedite`):
    // expedited from the signal until every program is detached.
    let fast = Arc::new(Mutex::new(None));
    let fast2 = fast.clone();
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        *fast2.lock().expect("expedite lock") = Some(crate::netpath::Expedite::teardown());
        stop.request_stop();
    };
    match tls {
        Some(acceptor) => {
            let l = crate::serve::TlsListener::new(listener, acceptor)?;
            axum::serve(l, app).with_graceful_shutdown(shutdown).await?
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
    }
    let t0 = Instant::now();
    shared.request_stop();
    let threads = std::mem::take(&mut *shared.hook_threads.lock().expect("thread lock"));
    for h in threads {
        let _ = h.join();
    }
    let expedited = fast
        .lock()
        .expect("expedite lock")
        .take()
        .is_some_and(|g| g.active());
    tracing::info!(
        took_ms = t0.elapsed().as_millis() as u64,
        expedited,
        "every program detached"
    );
    if let Some(x) = &shared.otlp {
        x.shutdown(Duration::from_secs(5));
    }
    Ok(())
}

/// Starts discovery and the BPF thread; returns once programs are attached.
pub fn start(cfg: &Config) -> Result<Arc<Shared>> {
    // Before the probe, which would only fail with libbpf's EPERM noise.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    crate::caps::check(
        cfg,
        crate::probe::kernel_version(release.trim()).unwrap_or((0, 0)),
    )?;
    let shared = Shared::new(cfg, crate::probe::run())?;
    let (tx, rx) = mpsc::channel();
    let k8s_on = cfg.kubernetes.active();
    let node = cfg.kubernetes.node();
    if k8s_on {
        let node = node.clone().context(
            "kubernetes: no node name (set NODE_NAME from spec.nodeName, or kubernetes.node_name)",
        )?;
        let wake = shared.wake.clone();
        crate::discovery::k8s::spawn(
            cfg.kubernetes.clone(),
            node,
            shared.k8s.clone(),
            shared.stop.clone(),
            move || wake.wake(),
        )?;
    }
    let dl = DiscoveryLoop {
        cfg: discovery_config(cfg, &shared.probe),
        interval: Duration::from_millis(cfg.discovery.interval_ms.max(50)),
        forget_after: Duration::from_secs(cfg.discovery.forget_after_s),
        label_keys: cfg.kubernetes.labels.clone(),
        node: node.filter(|_| k8s_on),
        cache: Default::default(),
        listen_changes: shared.listen_changes.clone(),
        listens_seen: shared.listens_seen.clone(),
        execs: shared.execs.clone(),
    };
    // The first scan runs before the programs attach, so targets are in place from the start.
    tx.send(dl.scan(&shared.k8s)).ok();
    let h = start_bpf(cfg, shared.clone(), rx)?;
    shared.hook_threads.lock().expect("thread lock").push(h);
    match crate::procwatch::spawn(
        dl.cfg.proc_root.clone(),
        dl.cfg.signatures.clone(),
        dl.cfg.auto,
        !dl.cfg.select.is_empty(),
        shared.clone(),
    ) {
        Ok((progs, h)) => {
            shared
                .programs
                .write()
                .expect("programs lock")
                .extend(progs);
            shared.hook_threads.lock().expect("thread lock").push(h);
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "exec/exit tracepoints not attached: new servers are found at the next poll");
        }
    }
    if shared.crosscheck.is_some() {
        crate::crosscheck::spawn(shared.clone(), dl.cfg.proc_root.clone())?;
    }
    let s2 = shared.clone();
    std::thread::Builder::new()
        .name("llmslo-discovery".into())
        .spawn(move || discovery_loop(dl, s2, tx))?;
    Ok(shared)
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    fn store(cap: usize, bytes: usize) -> Store {
        Store::new(
            (cap, bytes),
            Aggregator::new(AggregatorConfig::default()),
            crate::slo::SloEngine::new(vec![]).expect("no SLOs"),
        )
    }

    fn rec(id: u64, tokens: u64) -> RequestRecord {
        let mut r = RequestRecord {
            id,
            streaming: true,
            token_ns: (0..tokens)
                .map(|i| 1_000_000_000 + i * 20_000_000)
                .collect::<Vec<_>>()
                .into(),
            ..Default::default()
        };
        r.finish(true);
        r
    }

    #[test]
    fn the_count_bounds_short_records() {
        let mut s = store(100, 64 << 20);
        for i in 0..1_000 {
            s.push(rec(i, 2), 1);
        }
        assert_eq!(s.recent.len(), 100);
        assert_eq!(s.recent.front().unwrap().id, 900, "the oldest went first");
        let sum: usize = s.recent.iter().map(|r| r.heap_bytes()).sum();
        assert_eq!(s.recent_bytes, sum);
    }

    #[test]
    fn the_bytes_bound_long_records() {
        let long = rec(0, 4_000).heap_bytes();
        assert!(long > 16_000, "4,000 tokens weigh: {long}");
        let cap = 100 * long;
        let mut s = store(10_000, cap);
        for i in 0..1_000 {
            s.push(rec(i, 4_000), 1);
        }
        assert_eq!(s.recent.len(), 100, "the bytes bind before the count");
        assert!(s.recent_bytes <= cap);
        assert_eq!(s.recent.back().unwrap().id, 999);
        // Short ones after long ones: the long ones leave until both bounds hold.
        for i in 1_000..1_200 {
            s.push(rec(i, 2), 1);
        }
        let sum: usize = s.recent.iter().map(|r| r.heap_bytes()).sum();
        assert_eq!(s.recent_bytes, sum);
        assert!(s.recent_bytes <= cap);
        assert_eq!(s.recent.back().unwrap().id, 1_199);
    }

    #[test]
    fn one_record_over_the_bound_is_still_kept() {
        let mut s = store(10, 64 << 10);
        s.push(rec(1, 100_000), 1);
        assert_eq!(
            s.recent.len(),
            1,
            "the newest stays even alone over the bound"
        );
        s.push(rec(2, 2), 1);
        assert_eq!(s.recent.len(), 1);
        assert_eq!(s.recent[0].id, 2);
    }
}

#[cfg(test)]
mod priority_tests {
    use super::lower_priority;

    #[test]
    fn priority_is_only_ever_lowered() {
        // Nice values are per thread on Linux: a thread of its own leaves the test harness's.
        std::thread::spawn(|| {
            // SAFETY: reads the calling thread's nice value.
            let start = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let lower = (start + 5).min(19);
            assert_eq!(lower_priority(start).unwrap(), start, "nothing to lower");
            assert_eq!(lower_priority(lower).unwrap(), lower);
            assert_eq!(lower_priority(start).unwrap(), lower, "never raised again");
            // SAFETY: as above.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, lower);
            // Threads started now inherit it.
            let child = std::thread::spawn(|| {
                // SAFETY: as above.
                unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
            });
            assert_eq!(child.join().unwrap(), lower);
        })
        .join()
        .unwrap();
    }
}

#[cfg(test)]
mod quiet_tests {
    use super::*;

    #[test]
    fn the_reader_slows_down_only_after_a_quiet_spell_and_speeds_up_at_the_first_record() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut q = Quiet::new(true);
        assert_eq!(q.tick(), DRAIN_EVERY);
        // Records keep coming: the short tick.
        assert_eq!(q.after_drain(5, at(50)), None);
        assert_eq!(q.after_drain(9, at(100)), None);
        // Quiet, but not for long enough yet.
        assert_eq!(q.after_drain(9, at(1_000)), None);
        assert_eq!(q.tick(), DRAIN_EVERY);
        // Two seconds after the last record: the long tick.
        assert_eq!(q.after_drain(9, at(2_100)), Some(Transition::Idle));
        assert_eq!(q.tick(), idle_drain_every());
        assert_eq!(q.after_drain(9, at(2_600)), None, "idle stays idle");
        // The first record: back to the short tick at once.
        assert_eq!(q.after_drain(10, at(2_700)), Some(Transition::Busy));
        assert_eq!(q.tick(), DRAIN_EVERY);
        assert_eq!(q.after_drain(10, at(3_000)), None, "quiet spell starts again");
        assert_eq!(q.after_drain(10, at(4_700)), Some(Transition::Idle));
    }

    #[test]
    fn without_its_wake_ups_the_reader_keeps_the_short_tick() {
        let t0 = Instant::now();
        let mut q = Quiet::new(false);
        for s in 1..10 {
            assert_eq!(q.after_drain(0, t0 + Duration::from_secs(s)), None);
            assert_eq!(q.tick(), DRAIN_EVERY);
        }
    }
}
