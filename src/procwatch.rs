//! Wakes the discovery loop when a process exec's with an inference server's command line, a
//! traced process (or one that could be: an inference server's command line, a process in a pod
//! under port selection) opens a listening TCP socket, or a traced process exits
//! (`sched/sched_process_exec`, `sock/inet_sock_set_state` to `TCP_LISTEN`,
//! `sched/sched_process_exit`), so a new server is traced within milliseconds of starting, its
//! listening sockets are in the maps within milliseconds of its `listen()` (however long its
//! start-up takes), and a dead one's targets go at once, instead of at the next poll.

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{OpenObject, RingBufferBuilder};

use crate::agent::Shared;
use crate::discovery::match_signature;
use crate::loader::{attach_all, AttachedProg};
use crate::skel::exec::ExecSkelBuilder;

/// What an 8-byte `struct llmslo_proc_event` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    Exec(u32),
    Exit(u32),
    Listen(u32),
}

/// Decodes one ring buffer record (`struct llmslo_proc_event` in llmslo.h).
pub fn decode(data: &[u8]) -> Option<ProcEvent> {
    let tgid = u32::from_ne_bytes(data.get(0..4)?.try_into().ok()?);
    let kind = u32::from_ne_bytes(data.get(4..8)?.try_into().ok()?);
    match kind {
        1 => Some(ProcEvent::Exec(tgid)),
        2 => Some(ProcEvent::Exit(tgid)),
        3 => Some(ProcEvent::Listen(tgid)),
        _ => None,
    }
}

/// Does this event call for a rescan? With discovery on (`auto` or `select`), an exec whose
/// command line (read from `proc_root`) matches a signature; a listen of a pid the snapshot
/// traces, or of one such an exec would pick; an exit of a pid the snapshot traces.
fn wants_rescan(
    ev: ProcEvent,
    proc_root: &std::path::Path,
    sigs: &[String],
    (auto, select): (bool, bool),
    shared: &Shared,
) -> bool {
    let traced = |pid: u32| {
        shared
            .snapshot
            .read()
            .expect("snapshot lock")
            .by_tgid
            .contains_key(&pid)
    };
    match ev {
        ProcEvent::Exec(_) if !(auto || select) => false,
        // With `discovery.select`, any new process in a pod may be one (its listening socket
        // decides, at the rescans that follow).
        ProcEvent::Exec(pid)
            if select
                && crate::discovery::proc_cgroup_path(proc_root, pid)
                    .and_then(|p| crate::discovery::parse_kube_cgroup(&p))
                    .is_some() =>
        {
            true
        }
        ProcEvent::Exec(pid) => {
            let Ok(raw) = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            match_signature(&refs, sigs).is_some()
        }
        ProcEvent::Listen(pid) => {
            traced(pid)
                || wants_rescan(ProcEvent::Exec(pid), proc_root, sigs, (auto, select), shared)
        }
        ProcEvent::Exit(pid) => traced(pid),
    }
}

/// Loads and attaches the three tracepoints and starts the thread that reads their events.
/// Returns the attached programs (for `/api/v1/targets`) and the thread, which detaches them
/// once `shared.stop` is set.
pub fn spawn(
    proc_root: PathBuf,
    signatures: Vec<String>,
    auto: bool,
    select: bool,
    shared: Arc<Shared>,
) -> Result<(Vec<AttachedProg>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<AttachedProg>>>(1);
    let h = std::thread::Builder::new()
        .name("llmslo-procwatch".into())
        .spawn(move || {
            if let Err(e) = run(&proc_root, &signatures, auto, select, &shared, &tx) {
                let _ = tx.try_send(Err(e));
            }
        })?;
    let progs = rx
        .recv()
        .context("process watcher died during start-up")??;
    Ok((progs, h))
}

fn run(
    proc_root: &std::path::Path,
    sigs: &[String],
    auto: bool,
    select: bool,
    shared: &Shared,
    ready: &mpsc::SyncSender<Result<Vec<AttachedProg>>>,
) -> Result<()> {
    // The skeleton borrows its OpenObject for its whole life: one per agent, kept alive.
    let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
    let open = ExecSkelBuilder::default()
        .open(obj)
        .context("opening the exec BPF object")?;
    let mut skel = open
        .load()
        .map_err(|e| crate::caps::explain_load_error("process exec/exit programs", &e))?;
    let (links, progs) = attach_all(skel.object(), "exec", |_| true)?;
    let lost_count: &u64 = &skel
        .maps
        .bss_data
        .take()
        .context("exec BPF object has no mmapped .bss")?
        .proc_events_lost;
    let mut builder = RingBufferBuilder::new();
    builder.add(&skel.maps.proc_events, |data: &[u8]| {
        if let Some(ev) = decode(data) {
            // Before any wake-up: the scan it causes reads this command line again, or the
            // listener tables (the kernel's own count reaches discovery a tick later).
            match ev {
                ProcEvent::Exec(pid) => shared.execs.exec(pid),
                ProcEvent::Listen(_) => {
                    shared.listens_seen.fetch_add(1, Ordering::Release);
                }
                ProcEvent::Exit(_) => {}
            }
            if wants_rescan(ev, proc_root, sigs, (auto, select), shared) {
                tracing::debug!(?ev, "process event: rescanning");
                shared.exec_wakes.fetch_add(1, Ordering::Relaxed);
                shared.wake.wake();
            }
        }
        0
    })?;
    let rb = builder.build()?;
    // Shutdown ends the wait at once through an event fd in the ring buffer's epoll set, so
    // the wait can be long (each wake-up of an idle agent costs a context switch each way).
    // libbpf reads an event's data as a ring index: 0, this one ring, which it then drains.
    let mut wait = Duration::from_millis(100);
    match shared.stop_eventfd() {
        Ok(fd) => {
            if crate::agent::epoll_add(rb.epoll_fd(), fd) {
                wait = Duration::from_secs(1);
            }
        }
        Err(e) => tracing::debug!(error = %e, "no stop eventfd: polling every 100 ms"),
    }
    shared.execs.watching();
    // Listed once the watcher runs: a start that failed leaves no entry (and no fd kept).
    shared
        .verifier
        .write()
        .expect("verifier lock")
        .extend(crate::loader::verifier_stats(skel.object(), "exec"));
    let _ = ready.try_send(Ok(progs));
    let mut lost = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        if let Err(e) = rb.poll(wait) {
            tracing::warn!(error = %e, "process event ring buffer poll failed");
            shared.execs.missed();
            std::thread::sleep(Duration::from_millis(100));
        }
        // An exec the kernel could not queue: discovery reads every command line again.
        // SAFETY: a live, aligned u64 of the mmapped .bss, which the programs add to.
        let now = unsafe { std::ptr::read_volatile(lost_count) };
        if now != lost {
            lost = now;
            shared.execs.missed();
            shared.wake.wake();
        }
    }
    crate::loader::detach_concurrently(links);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_events() {
        let mut b = 4242u32.to_ne_bytes().to_vec();
        b.extend(1u32.to_ne_bytes());
        assert_eq!(decode(&b), Some(ProcEvent::Exec(4242)));
        b[4..].copy_from_slice(&2u32.to_ne_bytes());
        assert_eq!(decode(&b), Some(ProcEvent::Exit(4242)));
        b[4..].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(decode(&b), Some(ProcEvent::Listen(4242)));
        b[4..].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(decode(&b), None);
        assert_eq!(decode(&b[..6]), None);
    }
}
