//! CPU starvation of target processes: how long their threads waited on a run queue between
//! becoming runnable (woken, or preempted) and getting a CPU. The scheduler already keeps this
//! per thread (`sched_info.run_delay` and `pcount`, what `/proc/<pid>/task/<tid>/schedstat`
//! shows), so the agent runs no program on the scheduler's paths, which every context switch
//! of the node would pay: requests read it at their syscalls (`l7.bpf.c`, `fill_inside`), and
//! the per-pod counters here read the targets' threads' `schedstat` every [`EVERY`]. A server
//! whose event loop waits for a CPU adds that wait to every request it is serving, in whatever
//! stage they are.
//!
//! Per process, only what its threads waited since the agent first saw it counts; a thread
//! born later counts from its start. Differences are summed per process, so a thread that ends
//! keeps what it added (less its last interval's part, which its exit takes with it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::discovery::Snapshot;
use crate::podtotals::{PodLabels, PodTotals};

/// How often the targets' threads are read (the housekeeping tick, 0.5 s, may add to it):
/// counters lag by about this. One `schedstat` read (open, read, close) is 5–12 µs here, so
/// 1,000 target threads cost 3–6 ms of CPU a second.
pub const EVERY: Duration = Duration::from_secs(2);
/// Threads read per process at most: a process with more has its first ones counted.
const MAX_THREADS: usize = 4096;
/// Threads' `schedstat` files open at once, at most: they are kept open and read again at
/// offset 0 (one `pread` instead of open, read and close: 1.5–1.9 µs against 9–10 here). Each
/// open one holds a page of the kernel's seq_file buffer: past this many, files are opened for
/// each reading. The count takes in, during a reading, the files kept from the last one not yet
/// read again (those of threads that ended since are among them) and the one just opened to be
/// read. At most a quarter of the agent's open-file limit (`RLIMIT_NOFILE`'s soft value, often
/// 1,024): the rest stays for everything else it opens.
const KEEP_OPEN: usize = 512;

/// How many files to keep open under an open-file limit of `nofile`.
fn keep_open(nofile: u64) -> usize {
    usize::try_from(nofile / 4).unwrap_or(usize::MAX).min(KEEP_OPEN)
}

/// This process's soft open-file limit (1,024, the usual default, when it cannot be read).
fn nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid, initialised struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_cur
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunqCounts {
    pub wait_ns: u64,
    pub waits: u64,
}

impl std::ops::AddAssign for RunqCounts {
    fn add_assign(&mut self, o: RunqCounts) {
        self.wait_ns += o.wait_ns;
        self.waits += o.waits;
    }
}

/// One thread's `schedstat`: (run-queue wait ns, times it got a CPU).
fn parse_schedstat(text: &str) -> Option<RunqCounts> {
    let mut f = text.split_ascii_whitespace().skip(1);
    let wait_ns = f.next()?.parse().ok()?;
    let waits = f.next()?.parse().ok()?;
    Some(RunqCounts { wait_ns, waits })
}

#[derive(Default)]
struct Proc {
    cgroup: Option<u64>,
    /// Each live thread's counters when last read.
    threads: HashMap<u32, RunqCounts>,
    /// What the process's threads waited since it was first seen.
    total: RunqCounts,
    /// The process is gone (its /proc entry): its total stays until it is no longer targeted.
    gone: bool,
}

impl Proc {
    /// Folds a reading of its threads in. `first`: the process was just found, so what its
    /// threads waited before is not counted.
    fn update(&mut self, now: impl IntoIterator<Item = (u32, RunqCounts)>, first: bool) {
        let mut seen = HashMap::with_capacity(self.threads.len());
        for (tid, c) in now {
            if !first {
                let was = self.threads.get(&tid).copied().unwrap_or_default();
                // A tid reused by a new thread reads lower: it counts from its own start.
                let base = if c.wait_ns < was.wait_ns || c.waits < was.waits {
                    RunqCounts::default()
                } else {
                    was
                };
                self.total += RunqCounts {
                    wait_ns: c.wait_ns - base.wait_ns,
                    waits: c.waits - base.waits,
                };
            }
            seen.insert(tid, c);
        }
        self.threads = seen;
    }
}

pub struct RunQueue {
    proc_root: PathBuf,
    procs: BTreeMap<u32, Proc>,
    totals: PodTotals<u32, RunqCounts>,
    last: Option<Instant>,
    /// Open `schedstat` files by tid (tids are unique in the pid namespace), those of the
    /// threads found at the last reading only.
    files: HashMap<u32, std::fs::File>,
    /// How many may be open at once ([`keep_open`]).
    keep_open: usize,
    /// The most files held open at once so far (those of `files`, those kept at the reading
    /// under way and the one in hand).
    #[cfg(test)]
    peak_open: usize,
}

impl RunQueue {
    /// A pod's totals go once no target has carried its labels for `forget_after`.
    pub fn new(proc_root: &Path, forget_after: Duration) -> RunQueue {
        RunQueue {
            proc_root: proc_root.to_path_buf(),
            procs: BTreeMap::new(),
            totals: PodTotals::new(forget_after),
            last: None,
            files: HashMap::new(),
            keep_open: keep_open(nofile_limit()),
            #[cfg(test)]
            peak_open: 0,
        }
    }

    /// Per-pod totals when [`EVERY`] has passed since the last reading; None before.
    pub fn refresh(&mut self, snap: &Snapshot) -> Option<BTreeMap<PodLabels, RunqCounts>> {
        if self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        let targets: BTreeMap<u32, Option<u64>> = snap
            .set
            .tgids
            .iter()
            .map(|&t| (t, None))
            .chain(snap.cgroup_members.iter().map(|(&t, &cg)| (t, Some(cg))))
            .collect();
        // Processes no longer listed (ended, or out of the targets): their totals retire.
        for (tgid, p) in self.procs.iter_mut() {
            p.gone |= !targets.contains_key(tgid);
        }
        let mut kept = HashMap::with_capacity(self.files.len());
        for (tgid, cgroup) in targets {
            // A process found gone stays so: its threads are not read again.
            if self.procs.get(&tgid).is_some_and(|p| p.gone) {
                continue;
            }
            let now = self.threads(tgid, &mut kept);
            let first = !self.procs.contains_key(&tgid);
            let p = self.procs.entry(tgid).or_default();
            p.cgroup = cgroup.or(p.cgroup);
            match now {
                Some(now) => p.update(now, first),
                None => p.gone = true,
            }
        }
        // Files of threads not found this time (ended, or their process no longer a target)
        // are closed.
        self.files = kept;
        let entries: Vec<(u32, Option<u64>, RunqCounts)> = self
            .procs
            .iter()
            .map(|(&tgid, p)| {
                // A process that is gone is not a target, whatever its cgroup still is.
                let cgroup = if p.gone { None } else { p.cgroup };
                (tgid, cgroup, p.total)
            })
            .collect();
        let (by_pod, gone) = self.totals.fold(entries, snap);
        for tgid in gone {
            self.procs.remove(&tgid);
        }
        Some(by_pod)
    }

    /// The counters of `tgid`'s threads; None when the process is gone. Each thread's file is
    /// taken from the open ones (else opened) and, read, moved to `kept` while the files held
    /// (the open ones not taken yet, `kept`, and one more to be opened) stay within
    /// `keep_open`: a reading after the threads changed holds the ended threads' files until its
    /// end, so the new threads' files are kept from the next one.
    fn threads(
        &mut self,
        tgid: u32,
        kept: &mut HashMap<u32, std::fs::File>,
    ) -> Option<Vec<(u32, RunqCounts)>> {
        use std::os::unix::fs::FileExt;
        let dir = self.proc_root.join(tgid.to_string()).join("task");
        let tids = std::fs::read_dir(&dir).ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 128];
        for e in tids.flatten().take(MAX_THREADS) {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // A kept file of a thread that ended reads an error (ESRCH), even when its tid
            // was reused since: the new thread's file is opened instead.
            let read = |f: &std::fs::File, buf: &mut [u8]| {
                f.read_at(buf, 0)
                    .ok()
                    .and_then(|n| std::str::from_utf8(&buf[..n]).ok())
                    .and_then(parse_schedstat)
            };
            let mut got = self
                .files
                .remove(&tid)
                .and_then(|f| read(&f, &mut buf).map(|c| (c, f)));
            if got.is_none() {
                let Ok(f) = std::fs::File::open(e.path().join("schedstat")) else {
                    continue; // the thread just ended
                };
                got = read(&f, &mut buf).map(|c| (c, f));
            }
            let held = self.files.len() + kept.len() + 1;
            #[cfg(test)]
            {
                self.peak_open = self.peak_open.max(held);
            }
            let Some((c, f)) = got else { continue };
            out.push((tid, c));
            if held < self.keep_open {
                kept.insert(tid, f);
            }
        }
        Some(out)
    }
}

/// Whether this kernel keeps per-thread run-queue waits (CONFIG_SCHED_INFO).
/// Asked of the agent's own /proc: a question of the kernel's build, whatever PID namespace
/// `discovery.proc_root` answers in.
pub fn kernel_keeps_waits() -> bool {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|t| parse_schedstat(&t))
        .is_some()
}

/// `llmslo_cpu_runqueue_*`, one sample per (namespace, pod).
pub fn render(by_pod: &BTreeMap<PodLabels, RunqCounts>, out: &mut String) {
    crate::podtotals::render(
        out,
        by_pod,
        &[
            (
                "llmslo_cpu_runqueue_wait_seconds_total",
                "Time the server's threads waited on a run queue for a CPU (woken or preempted, not yet running).",
                |c: &RunqCounts| c.wait_ns as f64 / 1e9,
            ),
            (
                "llmslo_cpu_runqueue_waits_total",
                "Run-queue waits that ended (a thread of the server got a CPU).",
                |c| c.waits as f64,
            ),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(wait_ns: u64, waits: u64) -> RunqCounts {
        RunqCounts { wait_ns, waits }
    }

    #[test]
    fn schedstat_is_run_time_wait_time_and_timeslices() {
        assert_eq!(
            parse_schedstat("241090000 34459607 1398\n"),
            Some(c(34_459_607, 1398))
        );
        assert_eq!(parse_schedstat("241090000 x 1398"), None);
        assert_eq!(parse_schedstat("1 2"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn a_process_counts_from_when_it_was_first_seen() {
        let mut p = Proc::default();
        p.update([(10, c(5_000, 50)), (11, c(7_000, 70))], true);
        assert_eq!(
            p.total,
            c(0, 0),
            "history before the first reading is not counted"
        );
        p.update([(10, c(6_000, 52)), (11, c(7_500, 71))], false);
        assert_eq!(p.total, c(1_500, 3));
    }

    #[test]
    fn threads_born_later_count_from_their_start_and_ended_ones_keep_their_part() {
        let mut p = Proc::default();
        p.update([(10, c(1_000, 1))], true);
        // 12 is new: all of its wait is since the last reading.
        p.update([(10, c(1_200, 2)), (12, c(300, 4))], false);
        assert_eq!(p.total, c(500, 5));
        // 12 ended: what it added stays; 10 goes on.
        p.update([(10, c(1_300, 3))], false);
        assert_eq!(p.total, c(600, 6));
        // A reused tid reads lower than the old thread did: a new thread, from zero.
        p.update([(10, c(1_300, 3)), (12, c(100, 1))], false);
        assert_eq!(p.total, c(700, 7));
    }

    #[test]
    fn files_kept_open_are_a_quarter_of_the_open_file_limit_at_most() {
        assert_eq!(keep_open(1024), 256);
        assert_eq!(keep_open(4096), KEEP_OPEN);
        assert_eq!(keep_open(libc::RLIM_INFINITY), KEEP_OPEN);
        assert_eq!(keep_open(3), 0);
        assert!(nofile_limit() > 0);
    }

    #[test]
    fn files_held_open_stay_within_the_bound_when_every_thread_is_replaced() {
        let root = std::env::temp_dir().join(format!("llmslo-runq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let threads = |tids: &[u32], wait: u64| {
            for &t in tids {
                let d = root.join("1/task").join(t.to_string());
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("schedstat"), format!("1 {wait} {t}\n")).unwrap();
            }
        };
        let mut snap = Snapshot::default();
        snap.set.tgids.insert(1);
        let mut rq = RunQueue::new(&root, Duration::from_secs(30));
        rq.keep_open = 4;
        let read = |rq: &mut RunQueue| {
            rq.last = None;
            rq.refresh(&snap).expect("a reading");
        };
        threads(&[10, 11, 12, 13, 14], 100);
        read(&mut rq);
        assert_eq!(rq.files.len(), 3, "one under the bound: room for one to be read");
        assert_eq!(rq.peak_open, 4);
        // Every thread ends and as many new ones start: the ended threads' files are still
        // open while the new ones are read, so none of these is kept this time.
        std::fs::remove_dir_all(root.join("1/task")).unwrap();
        threads(&[20, 21, 22, 23, 24, 25], 200);
        read(&mut rq);
        assert_eq!(rq.peak_open, 4, "3 ended threads' files and one read");
        assert!(rq.files.is_empty(), "{:?}", rq.files.keys());
        read(&mut rq);
        assert_eq!(rq.files.len(), 3, "the new threads' kept from the next reading");
        assert!(rq.files.keys().all(|t| (20..26).contains(t)));
        assert_eq!(rq.peak_open, 4);
        // Read again through the kept files: still within the bound.
        read(&mut rq);
        assert_eq!((rq.files.len(), rq.peak_open), (3, 4));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_kernel_keeps_waits_and_they_are_read_per_thread() {
        let root = Path::new("/proc");
        if !kernel_keeps_waits() {
            eprintln!("no /proc/self/schedstat (CONFIG_SCHED_INFO off): nothing to read");
            return;
        }
        let mut rq = RunQueue::new(root, Duration::from_secs(30));
        let me = std::process::id();
        // This thread's (the test's); other tests' threads may have just started and not run.
        // SAFETY: gettid(2) has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() } as u32;
        let mut kept = HashMap::new();
        let threads = rq.threads(me, &mut kept).expect("this process's threads");
        let at = |v: &[(u32, RunqCounts)], t: u32| v.iter().find(|(x, _)| *x == t).map(|(_, c)| *c);
        for t in [me, tid] {
            assert!(at(&threads, t).is_some_and(|c| c.waits > 0), "{t}: {threads:?}");
        }
        assert!(kept.contains_key(&me), "its file kept open");
        assert_eq!(
            rq.threads(u32::MAX, &mut kept),
            None,
            "a process that does not exist"
        );
        // Read again through the kept files: the counters move on.
        use std::os::fd::AsRawFd;
        let fd = kept[&tid].as_raw_fd();
        rq.files = kept;
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(spin.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
        let mut again = HashMap::new();
        let later = rq.threads(me, &mut again).expect("again");
        // This thread spun and slept in between.
        assert!(
            at(&later, tid).unwrap().waits > at(&threads, tid).unwrap().waits,
            "{threads:?} then {later:?}"
        );
        assert!(!rq.files.contains_key(&tid), "its kept file was taken");
        assert_eq!(again[&tid].as_raw_fd(), fd, "and read again, not reopened");
    }
}
