//! CPU starvation of target processes: how long their threads waited on a run queue between
//! becoming runnable (woken, or preempted) and getting a CPU, from the `sched_wakeup`,
//! `sched_wakeup_new` and `sched_switch` programs in `l7.bpf.c`. Counted per process in the
//! kernel, summed per pod here. A server whose event loop waits for a CPU adds that wait to
//! every request it is serving, in whatever stage they are.

use std::collections::BTreeMap;

use anyhow::Result;
use libbpf_rs::{MapCore, MapHandle};

use crate::discovery::Snapshot;
use crate::podtotals::{PodLabels, PodTotals};
use crate::skel::l7::{types, L7Skel};

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

pub struct RunQueue {
    counts: MapHandle,
    totals: PodTotals<u32, RunqCounts>,
}

impl RunQueue {
    /// A pod's totals go once no target has carried its labels for `forget_after`.
    pub fn new(l7: &L7Skel<'static>, forget_after: std::time::Duration) -> Result<RunQueue> {
        Ok(RunQueue {
            counts: MapHandle::try_from(&l7.maps.runq_by_tgid)?,
            totals: PodTotals::new(forget_after),
        })
    }

    /// Per-pod totals; forgets the kernel entries of processes that are no longer targets.
    pub fn refresh(&mut self, snap: &Snapshot) -> BTreeMap<PodLabels, RunqCounts> {
        let entries: Vec<(u32, Option<u64>, RunqCounts)> = self
            .counts
            .keys()
            .filter_map(|key| {
                let tgid = u32::from_ne_bytes(key.get(..4)?.try_into().ok()?);
                let (cgroup, c) = self.read(&key);
                Some((tgid, cgroup, c))
            })
            .collect();
        let (by_pod, gone) = self.totals.fold(entries, snap);
        for tgid in gone {
            let _ = self.counts.delete(&tgid.to_ne_bytes());
        }
        by_pod
    }

    /// The per-CPU values summed, and the process's cgroup id.
    fn read(&self, key: &[u8]) -> (Option<u64>, RunqCounts) {
        const N: usize = std::mem::size_of::<types::llmslo_runq_counts>() / 8;
        let mut sum = RunqCounts::default();
        let mut cgroup = None;
        for [wait_ns, waits, cg] in crate::podtotals::per_cpu_fields::<N>(&self.counts, key) {
            sum += RunqCounts { wait_ns, waits };
            cgroup = cgroup.or((cg != 0).then_some(cg));
        }
        (cgroup, sum)
    }
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

    #[test]
    fn counts_layout_is_pinned() {
        assert_eq!(std::mem::size_of::<types::llmslo_runq_counts>(), 24);
    }
}
