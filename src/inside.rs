//! Inside the server during a request: how long the thread serving it waited on a CPU run
//! queue, and what its cgroup (every process of the server's container) asked of the GPU, per server-side stage (`queue_prefill`,
//! `decode`, or `inference` for a non-streaming response). Every read and write carries the
//! kernel's cumulative counters as the syscall returned (`event::Inside`); a stage's figure is
//! the difference between the events that bound it: the read that completed the request, the
//! write that carried the first token, the response's last write.
//!
//! Run-queue wait is per thread, so it is only taken when one thread made both bounding
//! syscalls: it is then exactly the time that thread spent runnable but not running in between.
//! When the two ends were written by different threads (a multi-threaded runtime that moved the
//! request), nothing says which threads worked on it in between: the stage has no figure rather
//! than a guess. GPU counters are per cgroup: every launch the server's processes (an engine
//! process's too) made in the window counts, including launches for other requests in the
//! same batch.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::event::Inside;
use crate::record::{ns_to_ms, Stage, Stages};

/// The counters at the events that bound the server-side stages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    /// The read that completed the request (`read_done`).
    pub read_done: Option<Inside>,
    /// The write that carried the first token (`token_1`).
    pub token1: Option<Inside>,
    /// The response's latest write (`resp_last`).
    pub last: Option<Inside>,
}

/// The server-side stages, with their bounding marks.
const STAGES: [Stage; 3] = [Stage::QueuePrefill, Stage::Decode, Stage::Inference];

impl Marks {
    fn bounds(&self, s: Stage) -> (Option<&Inside>, Option<&Inside>) {
        match s {
            Stage::QueuePrefill => (self.read_done.as_ref(), self.token1.as_ref()),
            Stage::Decode => (self.token1.as_ref(), self.last.as_ref()),
            _ => (self.read_done.as_ref(), self.last.as_ref()),
        }
    }
}

/// Run-queue wait (ns) of the serving thread per stage, and over read_done → resp_last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunqWait {
    pub by_stage: [Option<u64>; 3],
    pub total: Option<u64>,
}

impl RunqWait {
    pub fn get(&self, s: Stage) -> Option<u64> {
        STAGES
            .iter()
            .position(|&x| x == s)
            .and_then(|i| self.by_stage[i])
    }
    /// (stage, ns) for each stage with a figure.
    pub fn iter(&self) -> impl Iterator<Item = (Stage, u64)> + '_ {
        STAGES
            .iter()
            .zip(&self.by_stage)
            .filter_map(|(&s, v)| v.map(|v| (s, v)))
    }
}

impl Serialize for RunqWait {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (st, v) in self.iter() {
            m.serialize_entry(st.name(), &ns_to_ms(v))?;
        }
        if let Some(t) = self.total {
            m.serialize_entry("total", &ns_to_ms(t))?;
        }
        m.end()
    }
}

/// The server cgroup's GPU activity during one stage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuStage {
    /// cuLaunchKernel / cuLaunchKernelEx calls.
    pub launches: u64,
    /// cuGraphLaunch calls.
    pub graph_launches: u64,
    /// (launches + graph launches) per second of the stage; null for an empty stage.
    pub launches_per_s: Option<f64>,
    /// Time the cgroup's threads spent in cuStreamSynchronize / cuCtxSynchronize.
    pub sync_wait_ms: f64,
    /// Estimate: sync wait / stage duration, clamped to [0, 1]. A host thread blocked in a
    /// synchronisation is waiting for the GPU to finish work, so the share of the stage spent
    /// there roughly bounds from below how busy the GPU was (launches without a sync, other
    /// streams and other cgroups' processes are not seen); several threads syncing at once can push the raw ratio
    /// past 1, hence the clamp. Null for an empty stage.
    pub busy_fraction: Option<f64>,
}

/// GPU activity per stage (only stages with a figure are serialized).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuStages(pub [Option<GpuStage>; 3]);

impl GpuStages {
    pub fn get(&self, s: Stage) -> Option<&GpuStage> {
        STAGES
            .iter()
            .position(|&x| x == s)
            .and_then(|i| self.0[i].as_ref())
    }
}

impl Serialize for GpuStages {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (st, v) in STAGES.iter().zip(&self.0) {
            if let Some(v) = v {
                m.serialize_entry(st.name(), v)?;
            }
        }
        m.end()
    }
}

/// Run-queue wait of one thread between two of its syscalls.
fn runq_between(a: &Inside, b: &Inside) -> Option<u64> {
    if a.tid != b.tid {
        return None;
    }
    b.runq_ns?.checked_sub(a.runq_ns?)
}

/// GPU activity of the server's cgroup between two of its syscalls. A start without counters
/// (no CUDA call the probes saw yet) counts from zero; counters that went back (the cgroup's
/// entry was dropped and started again) give nothing.
fn gpu_between(a: &Inside, b: &Inside, dur_ns: u64) -> Option<GpuStage> {
    let end = b.gpu?;
    let start = a.gpu.unwrap_or_default();
    let launches = end.launches.checked_sub(start.launches)?;
    let graph_launches = end.graph_launches.checked_sub(start.graph_launches)?;
    let sync = end.sync_wait_ns.checked_sub(start.sync_wait_ns)?;
    let secs = dur_ns as f64 / 1e9;
    Some(GpuStage {
        launches,
        graph_launches,
        launches_per_s: (dur_ns > 0).then(|| (launches + graph_launches) as f64 / secs),
        sync_wait_ms: ns_to_ms(sync),
        busy_fraction: (dur_ns > 0).then(|| (sync as f64 / dur_ns as f64).clamp(0.0, 1.0)),
    })
}

/// The run-queue and GPU figures of a request whose `stages` are computed. Each is `None` when
/// no bounding event carried the counters at all (`cpu_runqueue: false`; a process without
/// GPU counters), so the record says null rather than zero.
pub fn compute(marks: &Marks, stages: &Stages) -> (Option<RunqWait>, Option<GpuStages>) {
    let all = [&marks.read_done, &marks.token1, &marks.last];
    let has_runq = all.iter().any(|m| m.is_some_and(|m| m.runq_ns.is_some()));
    let has_gpu = all.iter().any(|m| m.is_some_and(|m| m.gpu.is_some()));
    let mut runq = RunqWait::default();
    let mut gpu = GpuStages::default();
    for (i, &s) in STAGES.iter().enumerate() {
        let Some(dur) = stages.get(s) else { continue };
        let (Some(a), Some(b)) = marks.bounds(s) else {
            continue;
        };
        runq.by_stage[i] = runq_between(a, b);
        gpu.0[i] = gpu_between(a, b, dur);
    }
    if let (Some(a), Some(b)) = (&marks.read_done, &marks.last) {
        runq.total = runq_between(a, b);
    }
    (has_runq.then_some(runq), has_gpu.then_some(gpu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::GpuTotals;
    use crate::record::{Timestamps, Ts};

    fn at(tid: u32, runq: u64, gpu: Option<(u64, u64, u64)>) -> Option<Inside> {
        Some(Inside {
            tid,
            runq_ns: Some(runq),
            gpu: gpu.map(|(l, g, w)| GpuTotals {
                launches: l,
                graph_launches: g,
                sync_wait_ns: w,
            }),
        })
    }

    fn stages(token1: bool) -> Stages {
        let mut ts = Timestamps::default();
        ts.set(Ts::ReadFirst, 0);
        ts.set(Ts::ReadDone, 1_000_000);
        if token1 {
            ts.set(Ts::Token1, 11_000_000);
        }
        ts.set(Ts::RespLast, 51_000_000);
        Stages::compute(&ts, false, token1)
    }

    #[test]
    fn same_thread_takes_differences_per_stage() {
        let m = Marks {
            read_done: at(7, 1_000, Some((10, 1, 0))),
            token1: at(7, 4_000, Some((17, 3, 5_000_000))),
            last: at(7, 9_000, Some((57, 3, 45_000_000))),
        };
        let (runq, gpu) = compute(&m, &stages(true));
        let runq = runq.unwrap();
        assert_eq!(runq.get(Stage::QueuePrefill), Some(3_000));
        assert_eq!(runq.get(Stage::Decode), Some(5_000));
        assert_eq!(runq.get(Stage::Inference), None);
        assert_eq!(runq.total, Some(8_000));
        let gpu = gpu.unwrap();
        // queue_prefill is 10 ms: 7 launches, 2 graphs, 5 ms synchronising.
        let qp = gpu.get(Stage::QueuePrefill).unwrap();
        assert_eq!((qp.launches, qp.graph_launches), (7, 2));
        assert_eq!(qp.launches_per_s, Some(900.0));
        assert_eq!(qp.sync_wait_ms, 5.0);
        assert_eq!(qp.busy_fraction, Some(0.5));
        // decode is 40 ms: 40 launches, 40 ms of sync (busy all along).
        let d = gpu.get(Stage::Decode).unwrap();
        assert_eq!((d.launches, d.graph_launches), (40, 0));
        assert_eq!(d.busy_fraction, Some(1.0));
        let v = serde_json::to_value(&runq).unwrap();
        assert_eq!(v["queue_prefill"], 0.003);
        assert_eq!(v["total"], 0.008);
        assert!(v.get("inference").is_none());
        let v = serde_json::to_value(&gpu).unwrap();
        assert_eq!(v["decode"]["launches"], 40);
        assert!(v.get("inference").is_none());
    }

    #[test]
    fn different_threads_give_no_run_queue_figure() {
        // Read on thread 7, first token on thread 8, last write on 8 again.
        let m = Marks {
            read_done: at(7, 1_000, None),
            token1: at(8, 50_000, None),
            last: at(8, 52_000, None),
        };
        let (runq, gpu) = compute(&m, &stages(true));
        let runq = runq.unwrap();
        assert_eq!(runq.get(Stage::QueuePrefill), None);
        assert_eq!(runq.get(Stage::Decode), Some(2_000));
        assert_eq!(runq.total, None);
        assert_eq!(gpu, None, "no GPU counters anywhere: null, not zero");
    }

    #[test]
    fn sync_wait_past_the_window_is_clamped_and_counts_start_from_zero() {
        // Non-streaming: one inference stage of 50 ms. The process had no GPU counters at the
        // read (its first CUDA call came after it), and two threads synchronised at once.
        let m = Marks {
            read_done: at(7, 0, None),
            token1: None,
            last: at(7, 0, Some((3, 0, 80_000_000))),
        };
        let (runq, gpu) = compute(&m, &stages(false));
        assert_eq!(runq.unwrap().get(Stage::Inference), Some(0));
        let inf = gpu.unwrap().get(Stage::Inference).cloned().unwrap();
        assert_eq!(inf.launches, 3);
        assert_eq!(inf.busy_fraction, Some(1.0));
        assert_eq!(inf.sync_wait_ms, 80.0);
    }

    #[test]
    fn counters_going_back_or_switched_off_give_nothing() {
        let m = Marks {
            read_done: at(7, 5_000, Some((100, 0, 0))),
            token1: at(7, 6_000, Some((2, 0, 0))),
            last: at(7, 7_000, Some((4, 0, 0))),
        };
        let (_, gpu) = compute(&m, &stages(true));
        let gpu = gpu.unwrap();
        assert!(gpu.get(Stage::QueuePrefill).is_none());
        assert_eq!(gpu.get(Stage::Decode).unwrap().launches, 2);
        let off = Inside {
            tid: 7,
            runq_ns: None,
            gpu: None,
        };
        let m = Marks {
            read_done: Some(off),
            token1: Some(off),
            last: Some(off),
        };
        assert_eq!(compute(&m, &stages(true)), (None, None));
    }
}
