//! What each process's command line said, kept across scans. Reading `/proc/<pid>/cmdline` of
//! every process every second was most of the idle agent's CPU (a path walk, open, read and
//! close per process: ~65 processes cost ~1.5 ms a scan on the benchmark VM, and a Kubernetes
//! node runs hundreds). A command line changes at `exec`, which the `sched_process_exec`
//! watcher (`procwatch`) sees for every process, or when the process rewrites it
//! (`setproctitle`), which nothing announces: so a process's verdict is kept until its pid
//! exec's, its `/proc` entry is a new one (pid reuse: another inode), or [`REREAD`] passes,
//! and only while the watcher runs, has lost nothing, and sees the pids this `/proc` shows.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every command line is read again at least this often (one set by `setproctitle`).
pub const REREAD: Duration = Duration::from_secs(10);

/// Exec'd pids waiting for the next scan; past this many the next scan reads everything.
const MAX_PENDING: usize = 4096;

/// The pid namespace of the host (`PROC_PID_INIT_INO`): the exec watcher's pids are its.
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// The exec watcher's side: pids that exec'd since the last scan took them.
#[derive(Debug, Default)]
pub struct Execs(Mutex<ExecsInner>);

#[derive(Debug, Default)]
struct ExecsInner {
    /// The watcher is attached: an exec it does not report did not happen.
    watching: bool,
    /// Some exec may have gone unreported (a lost event, too many pending).
    missed: bool,
    pids: Vec<u32>,
}

impl Execs {
    /// The watcher's tracepoint is attached and its events are being read. Execs before that
    /// went unreported: the next scan reads everything.
    pub fn watching(&self) {
        let mut g = self.0.lock().expect("execs lock");
        g.watching = true;
        g.missed = true;
    }

    /// `pid` exec'd: its command line is read again at the next scan.
    pub fn exec(&self, pid: u32) {
        let mut g = self.0.lock().expect("execs lock");
        if g.pids.len() >= MAX_PENDING {
            g.missed = true;
        } else {
            g.pids.push(pid);
        }
    }

    /// Some exec was not reported (the kernel could not queue its event).
    pub fn missed(&self) {
        self.0.lock().expect("execs lock").missed = true;
    }

    /// The pids that exec'd since the last call, or `None` when that is not known (no
    /// watcher, or it missed some): then every command line is to be read again.
    pub fn take(&self) -> Option<Vec<u32>> {
        let mut g = self.0.lock().expect("execs lock");
        let pids = std::mem::take(&mut g.pids);
        let missed = std::mem::take(&mut g.missed);
        (g.watching && !missed).then_some(pids)
    }
}

/// Per pid: the inode of its `/proc` directory when its command line was read, and the
/// signature it matched.
#[derive(Debug, Default)]
pub struct ProcCache {
    by_pid: HashMap<u32, (u64, Option<String>)>,
    /// When every entry was last dropped.
    since: Option<Instant>,
    /// Whether the `/proc` scanned is the host pid namespace's (`None`: not looked yet).
    host_pids: Option<bool>,
    /// Entries seen in the current scan (the rest are dropped at its end).
    seen: HashSet<u32>,
    /// Command lines read in the current scan, and in all scans.
    pub reads: u64,
    pub reads_total: u64,
}

impl ProcCache {
    /// Starts a scan of `proc_root`. `execs` is what [`Execs::take`] gave: the verdicts of
    /// those pids are dropped, or all of them when it is `None` or [`REREAD`] has passed.
    pub fn begin_scan(&mut self, proc_root: &Path, execs: Option<Vec<u32>>) {
        use std::os::unix::fs::MetadataExt;
        let host = *self.host_pids.get_or_insert_with(|| {
            // This process is in the host's namespace and this /proc shows it (so it is that
            // namespace's /proc: a child namespace's would not show it).
            std::fs::metadata(proc_root.join("self/ns/pid"))
                .is_ok_and(|m| m.ino() == INIT_PID_NS_INO)
        });
        let stale = self.since.is_none_or(|t| t.elapsed() >= REREAD);
        match execs {
            Some(pids) if host && !stale => {
                for p in pids {
                    self.by_pid.remove(&p);
                }
            }
            _ => {
                self.by_pid.clear();
                self.since = Some(Instant::now());
            }
        }
        self.seen.clear();
        self.reads = 0;
    }

    /// The signature `pid`'s command line matches, read from `proc_root` unless a verdict for
    /// the same `/proc` entry (`ino`) is kept.
    pub fn signature(
        &mut self,
        proc_root: &Path,
        pid: u32,
        ino: u64,
        signatures: &[String],
    ) -> Option<String> {
        self.seen.insert(pid);
        if let Some((i, sig)) = self.by_pid.get(&pid) {
            if *i == ino {
                return sig.clone();
            }
        }
        self.reads += 1;
        self.reads_total += 1;
        let sig = super::read_cmdline(proc_root, pid).and_then(|argv| {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            super::match_signature(&refs, signatures).map(str::to_string)
        });
        self.by_pid.insert(pid, (ino, sig.clone()));
        sig
    }

    /// Ends a scan: pids it did not see are gone.
    pub fn end_scan(&mut self) {
        let seen = &self.seen;
        self.by_pid.retain(|p, _| seen.contains(p));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_pid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigs() -> Vec<String> {
        super::super::signatures(&[])
    }

    /// Writes `pid`'s command line into a fake /proc; the inode of its directory.
    fn write_cmdline(root: &Path, pid: u32, argv: &[&str]) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let mut raw = Vec::new();
        for a in argv {
            raw.extend_from_slice(a.as_bytes());
            raw.push(0);
        }
        std::fs::write(d.join("cmdline"), raw).unwrap();
        std::fs::metadata(&d).unwrap().ino()
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("llmslo-procs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn verdicts_are_kept_until_an_exec_or_a_new_proc_entry() {
        let root = scratch("keep");
        let ino = write_cmdline(&root, 10, &["python3", "-m", "http.server"]);
        let mut c = ProcCache {
            host_pids: Some(true),
            ..Default::default()
        };
        c.begin_scan(&root, Some(vec![]));
        assert_eq!(c.signature(&root, 10, ino, &sigs()), None);
        assert_eq!(c.reads, 1);
        c.end_scan();
        // The process rewrote its command line; nothing announced it: the verdict stays.
        write_cmdline(&root, 10, &["vllm", "serve", "m"]);
        c.begin_scan(&root, Some(vec![]));
        assert_eq!(c.signature(&root, 10, ino, &sigs()), None);
        assert_eq!(c.reads, 0, "kept: no read");
        c.end_scan();
        // Its exec is reported: read again.
        c.begin_scan(&root, Some(vec![10]));
        assert_eq!(c.signature(&root, 10, ino, &sigs()).as_deref(), Some("vllm"));
        assert_eq!(c.reads, 1);
        c.end_scan();
        // Another /proc entry under the same pid (pid reuse): read again.
        write_cmdline(&root, 10, &["sleep", "1"]);
        c.begin_scan(&root, Some(vec![]));
        assert_eq!(c.signature(&root, 10, ino + 1, &sigs()), None);
        assert_eq!(c.reads, 1);
        c.end_scan();
        assert_eq!(c.reads_total, 3);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn everything_is_read_again_without_a_watcher_a_miss_or_after_a_while() {
        let root = scratch("reread");
        let ino = write_cmdline(&root, 20, &["vllm", "serve", "m"]);
        let mut c = ProcCache {
            host_pids: Some(true),
            ..Default::default()
        };
        let execs = Execs::default();
        // No watcher: nothing is known about execs.
        for _ in 0..2 {
            c.begin_scan(&root, execs.take());
            c.signature(&root, 20, ino, &sigs());
            assert_eq!(c.reads, 1);
            c.end_scan();
        }
        execs.watching();
        c.begin_scan(&root, execs.take());
        c.signature(&root, 20, ino, &sigs());
        assert_eq!(c.reads, 1, "execs before the watcher started are not known");
        c.end_scan();
        c.begin_scan(&root, execs.take());
        c.signature(&root, 20, ino, &sigs());
        assert_eq!(c.reads, 0, "watched: kept");
        c.end_scan();
        // A lost event, or more pending execs than the bound.
        execs.missed();
        c.begin_scan(&root, execs.take());
        c.signature(&root, 20, ino, &sigs());
        assert_eq!(c.reads, 1);
        c.end_scan();
        for p in 0..=MAX_PENDING as u32 {
            execs.exec(1000 + p);
        }
        c.begin_scan(&root, execs.take());
        c.signature(&root, 20, ino, &sigs());
        assert_eq!(c.reads, 1);
        c.end_scan();
        // REREAD passed.
        c.since = Some(Instant::now() - REREAD);
        c.begin_scan(&root, execs.take());
        c.signature(&root, 20, ino, &sigs());
        assert_eq!(c.reads, 1);
        c.end_scan();
        // A /proc whose pids are not the host's (the watcher's pids mean nothing there).
        let mut guest = ProcCache {
            host_pids: Some(false),
            ..Default::default()
        };
        for _ in 0..2 {
            guest.begin_scan(&root, execs.take());
            guest.signature(&root, 20, ino, &sigs());
            assert_eq!(guest.reads, 1);
            guest.end_scan();
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn gone_pids_are_dropped_and_a_proc_of_another_pid_namespace_keeps_nothing() {
        let root = scratch("gone");
        let a = write_cmdline(&root, 30, &["a"]);
        let b = write_cmdline(&root, 31, &["b"]);
        let mut c = ProcCache {
            host_pids: Some(true),
            ..Default::default()
        };
        c.begin_scan(&root, Some(vec![]));
        c.signature(&root, 30, a, &sigs());
        c.signature(&root, 31, b, &sigs());
        c.end_scan();
        assert_eq!(c.len(), 2);
        c.begin_scan(&root, Some(vec![]));
        c.signature(&root, 30, a, &sigs());
        c.end_scan();
        assert_eq!(c.len(), 1, "31 was not seen: dropped");
        // A /proc without the host's pid namespace (this fake one has no `self/ns/pid`): the
        // watcher's pids are not its, so nothing is kept.
        let mut fake = ProcCache::default();
        fake.begin_scan(&root, Some(vec![]));
        assert_eq!(fake.host_pids, Some(false));
        for _ in 0..2 {
            fake.begin_scan(&root, Some(vec![]));
            fake.signature(&root, 30, a, &sigs());
            assert_eq!(fake.reads, 1);
            fake.end_scan();
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
