//! Sliding-window latency data of one label set: a ring of time slots, each holding HDR
//! histograms (µs) and exact sums per metric, plus running 1m/5m aggregates of the full slots
//! behind the current one, so that a query reads two histograms (aggregate + current slot)
//! instead of merging up to 31, and a record touches only the current slot's.

use super::sparse::SparseHist;
use crate::record::Stage;

pub(crate) const TTFT: usize = 0;
pub(crate) const ITL: usize = 1;
pub(crate) const TPOT: usize = 2;
pub(crate) const E2E: usize = 3;
/// Stage `s` lives at `STAGE0 + s as usize`.
pub(crate) const STAGE0: usize = 4;
pub(crate) const N_STAGES: usize = Stage::ALL.len();
pub(crate) const N_METRICS: usize = STAGE0 + N_STAGES;

/// 1 h: longer values are clamped so one bogus timestamp cannot grow a histogram (and the
/// memory of every slot it is merged into) without bound.
const MAX_US: u64 = 3_600_000_000;

/// What one slot (or a merge of slots) knows.
#[derive(Clone)]
pub(crate) struct SlotData {
    /// Created on first use: most label sets never see most stages.
    pub hists: [Option<SparseHist>; N_METRICS],
    /// Exact sums (ns) for means; HDR means are only as exact as its buckets.
    pub sum_ns: [u64; N_METRICS],
    /// Stage time of records that also have an E2E: the numerator of `share_of_e2e`, so that
    /// aborted requests (stages but no E2E) cannot push shares past 1.
    pub stage_e2e_ns: [u64; N_STAGES],
    /// Of TTFT's sum, the time spent in a sidecar (inbound + first token outbound).
    pub sidecar_ttft_ns: u64,
    pub requests: u64,
}

impl Default for SlotData {
    fn default() -> Self {
        SlotData {
            hists: std::array::from_fn(|_| None),
            sum_ns: [0; N_METRICS],
            stage_e2e_ns: [0; N_STAGES],
            sidecar_ttft_ns: 0,
            requests: 0,
        }
    }
}

impl SlotData {
    pub fn observe(&mut self, m: usize, ns: u64, sig_figs: u8) {
        let us = ns.saturating_add(500).div_euclid(1000).min(MAX_US);
        self.hists[m]
            .get_or_insert_with(|| SparseHist::new(sig_figs))
            .record(us);
        self.sum_ns[m] = self.sum_ns[m].saturating_add(ns);
    }

    /// Empties the slot but keeps its histograms' memory for reuse.
    fn reset(&mut self) {
        for h in self.hists.iter_mut().flatten() {
            h.reset();
        }
        self.sum_ns = [0; N_METRICS];
        self.stage_e2e_ns = [0; N_STAGES];
        self.sidecar_ttft_ns = 0;
        self.requests = 0;
    }

    pub fn add(&mut self, o: &SlotData) {
        for (mine, theirs) in self.hists.iter_mut().zip(&o.hists) {
            let Some(theirs) = theirs.as_ref().filter(|h| !h.is_empty()) else {
                continue;
            };
            match mine {
                Some(h) => h.add(theirs),
                None => *mine = Some(theirs.clone()),
            }
        }
        for (a, b) in self.sum_ns.iter_mut().zip(&o.sum_ns) {
            *a = a.saturating_add(*b);
        }
        for (a, b) in self.stage_e2e_ns.iter_mut().zip(&o.stage_e2e_ns) {
            *a = a.saturating_add(*b);
        }
        self.sidecar_ttft_ns = self.sidecar_ttft_ns.saturating_add(o.sidecar_ttft_ns);
        self.requests = self.requests.saturating_add(o.requests);
    }

    /// Removes `o`, which must have been added before; false when it was not (the caller
    /// then rebuilds instead of trusting a corrupted aggregate).
    fn subtract(&mut self, o: &SlotData) -> bool {
        let mut ok = true;
        for (mine, theirs) in self.hists.iter_mut().zip(&o.hists) {
            let Some(theirs) = theirs.as_ref().filter(|h| !h.is_empty()) else {
                continue;
            };
            ok &= match mine {
                Some(h) => h.subtract(theirs),
                _ => false,
            };
        }
        for (a, b) in self.sum_ns.iter_mut().zip(&o.sum_ns) {
            ok &= *a >= *b;
            *a = a.saturating_sub(*b);
        }
        for (a, b) in self.stage_e2e_ns.iter_mut().zip(&o.stage_e2e_ns) {
            ok &= *a >= *b;
            *a = a.saturating_sub(*b);
        }
        ok &= self.sidecar_ttft_ns >= o.sidecar_ttft_ns;
        self.sidecar_ttft_ns = self.sidecar_ttft_ns.saturating_sub(o.sidecar_ttft_ns);
        ok &= self.requests >= o.requests;
        self.requests = self.requests.saturating_sub(o.requests);
        ok
    }

    fn heap_bytes(&self) -> usize {
        self.hists
            .iter()
            .flatten()
            .map(SparseHist::heap_bytes)
            .sum()
    }
}

struct Slot {
    /// Slot index (`now_s / slot_secs`) whose data this holds; `u64::MAX` when none.
    index: u64,
    data: SlotData,
}

/// A running sum of the full slots `cur - n_back ..= cur - 1`; with the current slot, the
/// window `cur - n_back ..= cur`. A slot joins when the window moves past it: records (~80
/// histogram updates per streamed request) then update one histogram, not three.
struct Agg {
    n_back: u64,
    data: SlotData,
}

/// The slot of `ring` holding index `idx`, if it still does (empty ring: none). The ring is
/// `slots` long once it exists, so its length is the modulus.
fn slot_in(ring: &[Slot], idx: u64) -> Option<&Slot> {
    let len = ring.len().max(1) as u64;
    ring.get((idx % len) as usize).filter(|s| s.index == idx)
}

pub(crate) struct Window {
    /// Empty until the first record and again after the label set sat idle for a whole
    /// ring, so idle label sets hold no histogram memory.
    ring: Vec<Slot>,
    slots: usize,
    sig_figs: u8,
    /// Newest slot index seen; records never go behind it.
    cur: Option<u64>,
    aggs: [Agg; 2],
}

impl Window {
    /// `n_backs`: full slots behind the current one in each aggregate, each `< slots`.
    pub fn new(slots: usize, sig_figs: u8, n_backs: [u64; 2]) -> Window {
        debug_assert!(n_backs.iter().all(|&n| n < slots as u64));
        Window {
            ring: Vec::new(),
            slots,
            sig_figs,
            cur: None,
            aggs: n_backs.map(|n_back| Agg {
                n_back,
                data: SlotData::default(),
            }),
        }
    }

    /// Moves the window to slot `idx`, dropping what falls out of each aggregate.
    pub fn advance(&mut self, idx: u64) {
        let slots = self.slots as u64;
        let Some(cur) = self.cur else {
            self.cur = Some(idx);
            return;
        };
        // A jump past the whole ring (idle label set, or the wall clock stepped back further
        // than the ring) leaves nothing in any window.
        if idx.abs_diff(cur) >= slots {
            self.ring = Vec::new();
            for a in &mut self.aggs {
                a.data = SlotData::default();
            }
            self.cur = Some(idx);
            return;
        }
        if idx <= cur {
            // Small backward clock steps: keep recording into the newest slot.
            return;
        }
        let mut ok = true;
        for i in cur + 1..=idx {
            // Slot i - 1 is full now: it joins every aggregate, and slot i - 1 - n_back leaves.
            let full = i - 1;
            if let Some(slot) = slot_in(&self.ring, full) {
                for a in &mut self.aggs {
                    a.data.add(&slot.data);
                }
            }
            for a in &mut self.aggs {
                let gone = full.checked_sub(a.n_back);
                if let Some(slot) = gone.and_then(|g| slot_in(&self.ring, g)) {
                    ok &= a.data.subtract(&slot.data);
                }
            }
        }
        self.cur = Some(idx);
        if !ok {
            self.rebuild_aggs();
        }
    }

    fn rebuild_aggs(&mut self) {
        let cur = self.cur.unwrap_or(0);
        for a in &mut self.aggs {
            a.data = SlotData::default();
            for s in &self.ring {
                if s.index < cur && cur - s.index <= a.n_back {
                    a.data.add(&s.data);
                }
            }
        }
    }

    /// Applies `f` to the current slot (call `advance` first).
    pub fn record(&mut self, f: impl Fn(&mut SlotData, u8)) {
        let cur = self.cur.expect("advance before record");
        if self.ring.is_empty() {
            self.ring = (0..self.slots)
                .map(|_| Slot {
                    index: u64::MAX,
                    data: SlotData::default(),
                })
                .collect();
        }
        let slot = &mut self.ring[cur as usize % self.slots];
        if slot.index != cur {
            // Its old data already left every aggregate when the window moved past it.
            slot.data.reset();
            slot.index = cur;
        }
        f(&mut slot.data, self.sig_figs);
    }

    /// The current slot, when it has had a record.
    fn current(&self) -> Option<&SlotData> {
        slot_in(&self.ring, self.cur?).map(|s| &s.data)
    }

    /// Quantiles of metric `m` over window `w` (0: 1m, 1: 5m): its aggregate and the current
    /// slot together. None when neither has a value.
    pub fn quantiles<const N: usize>(&self, w: usize, m: usize, qs: [f64; N]) -> Option<[u64; N]> {
        let agg = self.aggs[w].data.hists[m]
            .as_ref()
            .filter(|h| !h.is_empty());
        let now = self
            .current()
            .and_then(|d| d.hists[m].as_ref())
            .filter(|h| !h.is_empty());
        Some(match (agg, now) {
            (Some(a), Some(b)) => SparseHist::value_at_quantiles_of_sum(a, b, qs),
            (Some(h), None) | (None, Some(h)) => h.value_at_quantiles(qs),
            (None, None) => return None,
        })
    }

    /// The window `w` (0: 1m, 1: 5m) merged: its aggregate plus the current slot.
    #[cfg(test)]
    pub fn agg(&self, w: usize) -> SlotData {
        let mut d = self.aggs[w].data.clone();
        if let Some(c) = self.current() {
            d.add(c);
        }
        d
    }

    /// Adds the slots `cur - n_back ..= cur` to `acc`, from an aggregate when one matches.
    pub fn add_into(&self, n_back: u64, acc: &mut SlotData) {
        if let Some(a) = self.aggs.iter().find(|a| a.n_back == n_back) {
            acc.add(&a.data);
            if let Some(c) = self.current() {
                acc.add(c);
            }
            return;
        }
        let Some(cur) = self.cur else { return };
        for s in &self.ring {
            if s.index <= cur && cur - s.index <= n_back {
                acc.add(&s.data);
            }
        }
    }

    pub fn heap_bytes(&self) -> usize {
        let slots: usize = self.ring.iter().map(|s| s.data.heap_bytes()).sum();
        let aggs: usize = self.aggs.iter().map(|a| a.data.heap_bytes()).sum();
        slots + aggs + self.ring.capacity() * std::mem::size_of::<Slot>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(w: &mut Window, idx: u64, ms: u64) {
        w.advance(idx);
        w.record(|d, sf| {
            d.requests += 1;
            d.observe(TTFT, ms * 1_000_000, sf);
        });
    }

    #[test]
    fn aggregates_follow_the_ring() {
        for step in [1, 3, 7] {
            aggregates_follow_the_ring_by(step);
        }
    }

    /// Records every `step` slots (so the window moves past several at once when step > 1).
    fn aggregates_follow_the_ring_by(step: usize) {
        let mut w = Window::new(31, 2, [6, 30]);
        for idx in (100..200).step_by(step) {
            rec(&mut w, idx, idx);
            // Invariant: each aggregate equals the merge of its slots.
            for (i, n) in [6u64, 30].into_iter().enumerate() {
                let mut acc = SlotData::default();
                for s in &w.ring {
                    if s.index <= idx && idx - s.index <= n {
                        acc.add(&s.data);
                    }
                }
                let agg = w.agg(i);
                assert_eq!(acc.requests, agg.requests);
                let in_window = (100..=idx).step_by(step).filter(|&x| idx - x <= n).count();
                assert_eq!(acc.requests, in_window as u64);
                assert_eq!(acc.sum_ns[TTFT], agg.sum_ns[TTFT]);
                let (x, y) = (&acc.hists[TTFT], &agg.hists[TTFT]);
                let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
                assert_eq!((x.len(), x.min(), x.max()), (y.len(), y.min(), y.max()));
                assert_eq!(x.value_at_quantile(0.9), y.value_at_quantile(0.9));
                // What /metrics reads: the aggregate and the current slot, unmerged.
                let qs = [0.0, 0.5, 0.9, 0.99, 1.0];
                assert_eq!(w.quantiles(i, TTFT, qs), Some(x.value_at_quantiles(qs)));
                let mut by_add = SlotData::default();
                w.add_into(n, &mut by_add);
                assert_eq!(by_add.requests, acc.requests);
                assert_eq!(by_add.sum_ns[TTFT], acc.sum_ns[TTFT]);
            }
        }
    }

    #[test]
    fn idle_label_set_frees_memory_and_backward_clock_is_tolerated() {
        let mut w = Window::new(31, 2, [6, 30]);
        rec(&mut w, 10, 5);
        assert!(w.heap_bytes() > 0);
        w.advance(10 + 31);
        assert_eq!(w.heap_bytes(), 0);
        assert_eq!(w.agg(1).requests, 0);
        rec(&mut w, 41, 5);
        rec(&mut w, 39, 5); // small step back: lands in the newest slot
        assert_eq!(w.agg(0).requests, 2);
        rec(&mut w, 5, 5); // far back: starts over
        assert_eq!(w.agg(1).requests, 1);
    }
}
