//! Good/total counts in aligned time buckets at four resolutions, so a 5-minute burn rate and
//! a 28-day compliance both come from a few kilobytes per SLO (the table is in `super`'s docs).

/// Requests judged good, and all requests judged (good + bad).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub good: u64,
    pub total: u64,
}

impl Counts {
    pub fn bad(&self) -> u64 {
        self.total - self.good
    }
}

/// A ring of buckets `width_s` wide, aligned to multiples of `width_s` (bucket index =
/// `t / width_s`). `head` is the index of the newest bucket; the ring holds `head - len + 1
/// ..= head`.
#[derive(Debug)]
pub struct Ring {
    width_s: u64,
    buckets: Box<[Counts]>,
    head: u64,
}

impl Ring {
    pub fn new(width_s: u64, len: usize) -> Ring {
        assert!(width_s > 0 && len > 0);
        Ring {
            width_s,
            buckets: vec![Counts::default(); len].into_boxed_slice(),
            head: 0,
        }
    }

    pub fn width_s(&self) -> u64 {
        self.width_s
    }

    /// Seconds the ring spans.
    pub fn span_s(&self) -> u64 {
        self.width_s * self.buckets.len() as u64
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn slot(&self, idx: u64) -> usize {
        (idx % self.len()) as usize
    }

    /// Makes the bucket holding `t_s` the newest, clearing the buckets it passes (they hold
    /// counts from one ring length ago). A clock that steps back leaves the ring as it is:
    /// the newest bucket stays where the latest time put it.
    pub fn advance(&mut self, t_s: u64) {
        let idx = t_s / self.width_s;
        if idx <= self.head {
            return;
        }
        // A gap longer than the ring clears it once, not once per missed bucket.
        let steps = (idx - self.head).min(self.len());
        for k in 1..=steps {
            let s = self.slot(self.head + k);
            self.buckets[s] = Counts::default();
        }
        self.head = idx;
    }

    /// Counts one request at `t_s`. A time older than the ring (a clock stepped back by more
    /// than its span) is dropped rather than added to a bucket that now means another time.
    pub fn add(&mut self, t_s: u64, good: bool) {
        self.advance(t_s);
        let idx = t_s / self.width_s;
        if self.head - idx >= self.len() {
            return;
        }
        let s = self.slot(idx);
        let b = &mut self.buckets[s];
        b.total += 1;
        b.good += u64::from(good);
    }

    /// The newest `n` buckets, the current (partial) one included: a window whose oldest edge
    /// lies between `(n - 1) * width_s` and `n * width_s` before the newest time seen.
    pub fn sum(&self, n: u64) -> Counts {
        let n = n.min(self.len());
        let head = self.head % self.len();
        let mut c = Counts::default();
        for k in 0..n {
            let b = self.buckets[((head + self.len() - k) % self.len()) as usize];
            c.good += b.good;
            c.total += b.total;
        }
        c
    }
}

/// Bucket width and length of the fixed rings; the SLO window gets one more ring of hours.
/// Each window is read from the finest ring that spans it, so its edge is exact to that
/// ring's width.
const FIXED: [(u64, usize); 3] = [
    (10, 360),  // 1 h: the 5m, 30m and 1h burn windows, edges to 10 s
    (60, 360),  // 6 h: 2h and 6h, edges to 1 min
    (600, 432), // 3 d: 1d and 3d, edges to 10 min
];
const HOUR: u64 = 3600;

/// Every observation goes into every ring; reading picks the finest that spans the window.
#[derive(Debug)]
pub struct Tiers {
    rings: Vec<Ring>,
}

impl Tiers {
    /// Rings for burn windows up to 3 d and for an SLO window of `window_s` (a whole number
    /// of hours, checked by the caller).
    pub fn new(window_s: u64) -> Tiers {
        let mut rings: Vec<Ring> = FIXED.iter().map(|&(w, n)| Ring::new(w, n)).collect();
        rings.push(Ring::new(HOUR, (window_s / HOUR).max(1) as usize));
        Tiers { rings }
    }

    pub fn advance(&mut self, now_s: u64) {
        for r in &mut self.rings {
            r.advance(now_s);
        }
    }

    pub fn add(&mut self, now_s: u64, good: bool) {
        for r in &mut self.rings {
            r.add(now_s, good);
        }
    }

    /// The ring a window of `secs` is read from: the finest that spans it. Burn windows and
    /// whole-hour SLO windows are whole numbers of its buckets (`sum` rounds any other up).
    fn ring_for(&self, secs: u64) -> &Ring {
        self.rings
            .iter()
            .find(|r| r.span_s() >= secs)
            .unwrap_or(&self.rings[self.rings.len() - 1])
    }

    /// Counts over the last `secs` (see `Ring::sum` for the edge).
    pub fn sum(&self, secs: u64) -> Counts {
        let r = self.ring_for(secs);
        r.sum(secs.div_ceil(r.width_s()))
    }

    /// How exactly the edge of a window of `secs` is placed: the width of its ring.
    pub fn precision_s(&self, secs: u64) -> u64 {
        self.ring_for(secs).width_s()
    }

    /// Heap held, for sizing claims.
    pub fn heap_bytes(&self) -> usize {
        self.rings
            .iter()
            .map(|r| r.buckets.len() * std::mem::size_of::<Counts>())
            .sum()
    }
}
