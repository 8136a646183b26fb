//! A latency histogram that holds only the buckets it has counts in.
//!
//! Same buckets as an HDR histogram of the same significant digits (lowest discernible value 1):
//! the same index for every value, the same quantiles, so the sliding windows answer exactly
//! what they answered with `hdrhistogram`. The difference is memory: an HDR histogram is a dense
//! array up to its largest value (~4–5 KiB for a few tens of ms at 2 digits, for every metric of
//! every 10 s slot of every label set: ~1.2 MB for a busy label set), while a slot of a label set
//! sees tens of distinct values. Here the counts are a sorted list of (bucket, count), 8 bytes a
//! bucket in use.

/// Counts per bucket: a slot's bucket cannot reach 2^32; aggregates saturate rather than wrap.
pub(crate) type Count = u32;

/// The HDR bucket layout for `sig_figs` digits and a lowest discernible value of 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    sub_bucket_count: u32,
    sub_bucket_half_count: u32,
    sub_bucket_half_count_magnitude: u8,
    sub_bucket_mask: u64,
    leading_zero_count_base: u8,
}

/// The layouts for 1 to 5 significant digits: a histogram names its own by its digits, one
/// byte instead of a copy of the layout in each of the windows' tens of thousands of them.
static LAYOUTS: [Layout; 5] = [
    Layout::new(1),
    Layout::new(2),
    Layout::new(3),
    Layout::new(4),
    Layout::new(5),
];

impl Layout {
    const fn new(sig_figs: u8) -> Layout {
        let largest = 2 * 10u64.pow(sig_figs as u32);
        // ceil(log2(largest)), largest > 1.
        let magnitude = (u64::BITS - (largest - 1).leading_zeros()) as u8;
        let half_magnitude = magnitude - 1;
        let count = 1u32 << magnitude;
        Layout {
            sub_bucket_count: count,
            sub_bucket_half_count: count / 2,
            sub_bucket_half_count_magnitude: half_magnitude,
            sub_bucket_mask: count as u64 - 1,
            leading_zero_count_base: 64 - half_magnitude - 1,
        }
    }

    fn bucket_for(&self, v: u64) -> u8 {
        self.leading_zero_count_base - (v | self.sub_bucket_mask).leading_zeros() as u8
    }

    fn index_for(&self, v: u64) -> u32 {
        let b = self.bucket_for(v);
        let sb = (v >> b) as u32;
        // Bucket 0 uses its lower half too: its offset is then negative by at most half a
        // bucket, which its base (half a bucket in) absorbs.
        ((u32::from(b) + 1) << self.sub_bucket_half_count_magnitude) + sb
            - self.sub_bucket_half_count
    }

    fn value_for(&self, index: u32) -> u64 {
        let mut b = (index >> self.sub_bucket_half_count_magnitude) as i32 - 1;
        let mut sb = (index & (self.sub_bucket_half_count - 1)) + self.sub_bucket_half_count;
        if b < 0 {
            sb -= self.sub_bucket_half_count;
            b = 0;
        }
        u64::from(sb) << b
    }

    fn lowest_equivalent(&self, v: u64) -> u64 {
        let b = self.bucket_for(v);
        (v >> b) << b
    }

    fn highest_equivalent(&self, v: u64) -> u64 {
        if v == u64::MAX {
            return u64::MAX;
        }
        let b = self.bucket_for(v);
        let sb = (v >> b) as u32;
        let size = 1u64
            << if sb >= self.sub_bucket_count {
                b + 1
            } else {
                b
            };
        self.lowest_equivalent(v).saturating_add(size) - 1
    }
}

/// 32 bytes: every metric of every 10 s slot of every label set has one (16 × 33 × 200 at the
/// default label-set cap), so its size is a measurable part of the agent's memory.
#[derive(Clone, Debug)]
pub(crate) struct SparseHist {
    /// (bucket index, count), sorted by index, no zero counts.
    counts: Vec<(u32, Count)>,
    /// Sum of the counts, saturating like them: a slot, or a 5-minute aggregate of one label
    /// set, would need 14 million values a second to reach it.
    total: Count,
    /// 1..=5: which of `LAYOUTS`.
    sig_figs: u8,
}

const _: () = assert!(std::mem::size_of::<SparseHist>() == 32);

impl SparseHist {
    pub fn new(sig_figs: u8) -> SparseHist {
        SparseHist {
            counts: Vec::new(),
            total: 0,
            sig_figs: sig_figs.clamp(1, 5),
        }
    }

    fn layout(&self) -> &'static Layout {
        &LAYOUTS[usize::from(self.sig_figs - 1) % LAYOUTS.len()]
    }

    pub fn record(&mut self, v: u64) {
        let i = self.layout().index_for(v);
        match self.counts.binary_search_by_key(&i, |&(k, _)| k) {
            Ok(p) => self.counts[p].1 = self.counts[p].1.saturating_add(1),
            Err(p) => self.counts.insert(p, (i, 1)),
        }
        self.total = self.total.saturating_add(1);
    }

    pub fn len(&self) -> u64 {
        u64::from(self.total)
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Lowest value equivalent to the smallest recorded one (0 when empty).
    #[cfg(test)]
    pub fn min(&self) -> u64 {
        self.counts
            .first()
            .map_or(0, |&(i, _)| self.layout().value_for(i))
    }

    /// Highest value equivalent to the largest recorded one (0 when empty).
    #[cfg(test)]
    pub fn max(&self) -> u64 {
        self.counts.last().map_or(0, |&(i, _)| {
            self.layout().highest_equivalent(self.layout().value_for(i))
        })
    }

    /// Empties it, keeping its memory for reuse.
    pub fn reset(&mut self) {
        self.counts.clear();
        self.total = 0;
    }

    /// Adds `o`'s counts (same layout), in place: buckets new to it are merged in from the
    /// back, so an aggregate that already has them (a warm window) does not allocate.
    pub fn add(&mut self, o: &SparseHist) {
        debug_assert_eq!(self.sig_figs, o.sig_figs);
        if o.counts.is_empty() {
            return;
        }
        // How many of o's buckets self lacks (both lists sorted, no duplicates).
        let (mut p, mut new) = (0, 0);
        for &(j, _) in &o.counts {
            while p < self.counts.len() && self.counts[p].0 < j {
                p += 1;
            }
            if self.counts.get(p).is_none_or(|&(i, _)| i != j) {
                new += 1;
            }
        }
        let (mut i, mut j) = (self.counts.len(), o.counts.len());
        // Exactly what is needed, as the merge into a new list had it: there are thousands of
        // aggregates (2 per metric per label set), and doubling would let them hold twice that.
        self.counts.reserve_exact(new);
        self.counts.resize(i + new, (0, 0));
        let mut k = self.counts.len();
        // From the back: the slots written are never ones still to be read.
        while j > 0 {
            let theirs = o.counts[j - 1];
            let mine = (i > 0).then(|| self.counts[i - 1]);
            self.counts[k - 1] = match mine {
                Some(m) if m.0 > theirs.0 => {
                    i -= 1;
                    m
                }
                Some(m) if m.0 == theirs.0 => {
                    i -= 1;
                    j -= 1;
                    (m.0, m.1.saturating_add(theirs.1))
                }
                _ => {
                    j -= 1;
                    theirs
                }
            };
            k -= 1;
        }
        self.total = self.total.saturating_add(o.total);
    }

    /// Removes `o`'s counts; false when `o` was not part of it (a count it lacks), in which
    /// case it is left in an unspecified state for the caller to rebuild.
    pub fn subtract(&mut self, o: &SparseHist) -> bool {
        debug_assert_eq!(self.sig_figs, o.sig_figs);
        let mut ok = self.total >= o.total;
        let mut p = 0;
        for &(j, y) in &o.counts {
            while p < self.counts.len() && self.counts[p].0 < j {
                p += 1;
            }
            match self.counts.get_mut(p) {
                Some((i, x)) if *i == j && *x >= y => *x -= y,
                _ => ok = false,
            }
        }
        self.counts.retain(|&(_, c)| c > 0);
        self.total = self.total.saturating_sub(o.total);
        ok
    }

    /// The values at each of `quantiles` (ascending), as `hdrhistogram`'s `value_at_quantile`
    /// answers them: the highest value equivalent to the bucket where the count reaches
    /// ceil(q × total) (at least 1); the lowest for q = 0. Empty: zeros.
    pub fn value_at_quantiles<const N: usize>(&self, quantiles: [f64; N]) -> [u64; N] {
        quantiles_in(
            self.layout(),
            u64::from(self.total),
            self.counts.iter().copied(),
            quantiles,
        )
    }

    /// The same over the sum of `a` and `b` (same layout), without building the sum: a
    /// window's running aggregate and its current slot, at query time.
    pub fn value_at_quantiles_of_sum<const N: usize>(
        a: &SparseHist,
        b: &SparseHist,
        quantiles: [f64; N],
    ) -> [u64; N] {
        debug_assert_eq!(a.sig_figs, b.sig_figs);
        let (mut x, mut y) = (a.counts.iter().peekable(), b.counts.iter().peekable());
        // Both sorted by bucket: yield the lower head first (equal buckets one after the
        // other, which cumulative counts do not tell apart from one merged entry).
        let merged = std::iter::from_fn(move || match (x.peek(), y.peek()) {
            (Some(&&p), Some(&&q)) => {
                if p.0 <= q.0 {
                    x.next()
                } else {
                    y.next()
                }
            }
            (Some(_), None) => x.next(),
            (None, _) => y.next(),
        })
        .copied();
        let total = u64::from(a.total) + u64::from(b.total);
        quantiles_in(a.layout(), total, merged, quantiles)
    }

    #[cfg(test)]
    pub fn value_at_quantile(&self, q: f64) -> u64 {
        self.value_at_quantiles([q])[0]
    }

    /// Bytes of counts held.
    pub fn heap_bytes(&self) -> usize {
        self.counts.capacity() * std::mem::size_of::<(u32, Count)>()
    }
}

/// Quantiles of `total` counts listed by `counts` in ascending bucket order (see
/// `SparseHist::value_at_quantiles`). A total above what the list holds (saturated counts)
/// answers the last bucket for the quantiles it cannot reach.
fn quantiles_in<const N: usize>(
    layout: &Layout,
    total: u64,
    counts: impl Iterator<Item = (u32, Count)>,
    quantiles: [f64; N],
) -> [u64; N] {
    let mut out = [0u64; N];
    if total == 0 {
        return out;
    }
    let mut it = counts;
    let (mut seen, mut cur) = (0u64, None::<u32>);
    for (slot, &q) in out.iter_mut().zip(&quantiles) {
        let q = q.min(1.0);
        let want = ((q * total as f64).ceil() as u64).max(1);
        while seen < want {
            match it.next() {
                Some((i, c)) => {
                    seen += u64::from(c);
                    cur = Some(i);
                }
                None => break,
            }
        }
        if let Some(i) = cur {
            let v = layout.value_for(i);
            *slot = if q == 0.0 {
                layout.lowest_equivalent(v)
            } else {
                layout.highest_equivalent(v)
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    fn values(seed: u64, n: usize) -> Vec<u64> {
        // xorshift: log-spread values from 0 to ~1 h in µs, plus small exact ones.
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bits = x % 33;
                (x >> 20) & ((1u64 << bits) - 1)
            })
            .collect()
    }

    const QS: [f64; 7] = [0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0];

    fn hdr_quantiles(h: &Histogram<u32>) -> Vec<u64> {
        QS.iter().map(|&q| h.value_at_quantile(q)).collect()
    }

    #[test]
    fn same_buckets_and_quantiles_as_hdr() {
        for sig in 1..=3u8 {
            for seed in 1..6 {
                let vs = values(seed, 2_000);
                let mut s = SparseHist::new(sig);
                let mut h = Histogram::<u32>::new(sig).unwrap();
                for &v in &vs {
                    s.record(v);
                    h.record(v).unwrap();
                }
                assert_eq!(s.len(), h.len());
                assert_eq!(
                    s.value_at_quantiles(QS).to_vec(),
                    hdr_quantiles(&h),
                    "sig {sig}"
                );
                assert_eq!(s.max(), h.max(), "sig {sig}");
                assert_eq!(s.min(), h.lowest_equivalent(h.min()));
                assert_eq!(s.counts.len(), h.iter_recorded().count());
                for &v in vs.iter().take(200) {
                    assert_eq!(s.layout().highest_equivalent(v), h.highest_equivalent(v));
                    assert_eq!(s.layout().lowest_equivalent(v), h.lowest_equivalent(v));
                }
            }
        }
    }

    #[test]
    fn add_and_subtract_are_inverse_and_match_hdr() {
        let (a, b) = (values(7, 500), values(8, 700));
        let (mut sa, mut sb) = (SparseHist::new(2), SparseHist::new(2));
        let (mut ha, mut hb) = (
            Histogram::<u32>::new(2).unwrap(),
            Histogram::<u32>::new(2).unwrap(),
        );
        a.iter().for_each(|&v| {
            sa.record(v);
            ha.record(v).unwrap();
        });
        b.iter().for_each(|&v| {
            sb.record(v);
            hb.record(v).unwrap();
        });
        let before = sa.clone();
        sa.add(&sb);
        ha.add(&hb).unwrap();
        assert_eq!(sa.len(), 1_200);
        assert!(
            sa.counts.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no duplicates"
        );
        assert_eq!(sa.counts.iter().map(|c| u64::from(c.1)).sum::<u64>(), 1_200);
        assert_eq!(sa.value_at_quantiles(QS).to_vec(), hdr_quantiles(&ha));
        assert!(sa.subtract(&sb));
        assert_eq!(sa.counts, before.counts);
        assert_eq!(sa.len(), before.len());
        // Taking away what was never added is reported.
        let mut never = SparseHist::new(2);
        never.record(123_456_789);
        assert!(!sa.clone().subtract(&never));
        let mut too_many = sa.clone();
        too_many.add(&sa);
        assert!(!sa.subtract(&too_many));
    }

    #[test]
    fn quantiles_of_a_sum_without_building_it() {
        for (sa, sb) in [(7u64, 8u64), (9, 10)] {
            let (mut a, mut b) = (SparseHist::new(2), SparseHist::new(2));
            values(sa, 300).into_iter().for_each(|v| a.record(v));
            values(sb, 900).into_iter().for_each(|v| b.record(v));
            let mut sum = a.clone();
            sum.add(&b);
            let want = sum.value_at_quantiles(QS);
            assert_eq!(SparseHist::value_at_quantiles_of_sum(&a, &b, QS), want);
            assert_eq!(SparseHist::value_at_quantiles_of_sum(&b, &a, QS), want);
        }
        // One side empty: the other's own answer; both empty: zeros.
        let mut a = SparseHist::new(2);
        [5u64, 500, 50_000].into_iter().for_each(|v| a.record(v));
        let empty = SparseHist::new(2);
        let want = a.value_at_quantiles(QS);
        assert_eq!(SparseHist::value_at_quantiles_of_sum(&a, &empty, QS), want);
        assert_eq!(SparseHist::value_at_quantiles_of_sum(&empty, &a, QS), want);
        assert_eq!(
            SparseHist::value_at_quantiles_of_sum(&empty, &empty, [0.5]),
            [0]
        );
    }

    #[test]
    fn empty_and_memory() {
        let mut s = SparseHist::new(2);
        assert_eq!(s.value_at_quantiles([0.5, 0.99]), [0, 0]);
        assert!(s.is_empty());
        for v in [1_000u64, 1_001, 1_002, 30_000, 30_100] {
            s.record(v);
        }
        // 1000..1002 share a bucket at 2 digits (width 4 from 512 up), 30000 and 30100 do not.
        assert_eq!(s.counts.len(), 3);
        assert!(s.heap_bytes() <= 8 * 4);
        assert_eq!(s.value_at_quantile(0.5), 1_003);
        s.reset();
        assert!(s.is_empty() && s.max() == 0);
    }
}
