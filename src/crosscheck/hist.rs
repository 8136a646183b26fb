//! A server's cumulative histogram as scraped, the increase between scrapes (counter resets
//! handled as Prometheus' `increase` does), and quantiles computed the way PromQL's
//! `histogram_quantile` computes them: linear interpolation inside the bucket that holds the
//! rank, the lowest bucket starting at 0, the `+Inf` bucket answering its lower bound.

/// Buckets with at most this many boundaries are accepted (servers use ~20).
pub const MAX_BUCKETS: usize = 256;

/// Cumulative counts per upper bound (ascending, the last `+Inf`), plus `_count` and `_sum`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hist {
    pub bounds: Vec<f64>,
    pub cum: Vec<f64>,
    pub count: f64,
    pub sum: f64,
}

/// A quantile and the bucket it was interpolated in: the server cannot resolve it finer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantile {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Hist {
    /// Builds from `(le, cumulative count)` pairs in any order; None without a `+Inf` bucket,
    /// with a non-numeric or repeated bound, or with too many buckets.
    pub fn from_buckets(
        mut b: Vec<(f64, f64)>,
        count: Option<f64>,
        sum: Option<f64>,
    ) -> Option<Hist> {
        if b.len() < 2
            || b.len() > MAX_BUCKETS
            || b.iter().any(|(le, c)| le.is_nan() || !c.is_finite())
        {
            return None;
        }
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        if b.windows(2).any(|w| w[0].0 == w[1].0) || b.last()?.0 != f64::INFINITY {
            return None;
        }
        // Scrapes are not atomic: a bucket may lag its neighbours. Prometheus makes the counts
        // monotonic the same way (ensureMonotonic).
        let mut max = 0f64;
        for (_, c) in b.iter_mut() {
            max = max.max(*c);
            *c = max;
        }
        let inf = b.last()?.1;
        Some(Hist {
            bounds: b.iter().map(|x| x.0).collect(),
            cum: b.iter().map(|x| x.1).collect(),
            count: count.filter(|c| c.is_finite()).unwrap_or(inf),
            sum: sum.filter(|s| s.is_finite()).unwrap_or(0.0),
        })
    }

    /// Observations in the histogram (the `+Inf` bucket).
    pub fn observations(&self) -> f64 {
        self.cum.last().copied().unwrap_or(0.0)
    }

    /// What happened between `earlier` and `self`. A counter reset (a bucket or the count went
    /// down: the server restarted) or a change of buckets means everything in `self` is new.
    pub fn increase_since(&self, earlier: &Hist) -> Hist {
        let reset = self.bounds != earlier.bounds
            || self.count < earlier.count
            || self.cum.iter().zip(&earlier.cum).any(|(a, b)| a < b);
        if reset {
            return self.clone();
        }
        Hist {
            bounds: self.bounds.clone(),
            cum: self
                .cum
                .iter()
                .zip(&earlier.cum)
                .map(|(a, b)| a - b)
                .collect(),
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
        }
    }

    /// Adds `o` (same buckets) in place; false (unchanged) when the buckets differ.
    pub fn add(&mut self, o: &Hist) -> bool {
        if self.bounds != o.bounds {
            return false;
        }
        for (a, b) in self.cum.iter_mut().zip(&o.cum) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        true
    }

    /// Mean from `_sum`/`_count`: exact, not limited by the buckets.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0 && self.sum.is_finite()).then(|| self.sum / self.count)
    }

    /// `histogram_quantile(q, …)`; None where PromQL answers NaN (no observations).
    pub fn quantile(&self, q: f64) -> Option<Quantile> {
        let n = self.bounds.len();
        let total = self.observations();
        if n < 2 || total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total;
        let b = self.cum.iter().position(|&c| c >= rank).unwrap_or(n - 1);
        if b == n - 1 {
            // In the +Inf bucket: PromQL answers the highest finite bound.
            let hi = self.bounds[n - 2];
            return Some(Quantile {
                value: hi,
                lo: hi,
                hi: f64::INFINITY,
            });
        }
        let hi = self.bounds[b];
        if b == 0 && hi <= 0.0 {
            return Some(Quantile {
                value: hi,
                lo: hi,
                hi,
            });
        }
        let (lo, below) = if b == 0 {
            (0.0, 0.0)
        } else {
            (self.bounds[b - 1], self.cum[b - 1])
        };
        let in_bucket = self.cum[b] - below;
        let frac = if in_bucket > 0.0 {
            (rank - below) / in_bucket
        } else {
            1.0
        };
        Some(Quantile {
            value: lo + (hi - lo) * frac,
            lo,
            hi,
        })
    }
}

/// The increase over a run of scrapes, oldest first: the sum of the increases between
/// neighbours (each with reset handling). When the buckets change inside the run, only the
/// part after the last change counts; the answer says which scrape it starts at.
pub fn increase_over(scrapes: &[&Hist]) -> Option<(usize, Hist)> {
    let mut start = scrapes.len().checked_sub(1)?;
    while start > 0 && scrapes[start - 1].bounds == scrapes[start].bounds {
        start -= 1;
    }
    let mut acc: Option<Hist> = None;
    for w in scrapes[start..].windows(2) {
        let inc = w[1].increase_since(w[0]);
        match acc.as_mut() {
            Some(a) => {
                a.add(&inc);
            }
            None => acc = Some(inc),
        }
    }
    let zero = || {
        let h = scrapes[start];
        Hist {
            bounds: h.bounds.clone(),
            cum: vec![0.0; h.cum.len()],
            count: 0.0,
            sum: 0.0,
        }
    };
    Some((start, acc.unwrap_or_else(zero)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f64 = f64::INFINITY;

    fn h(b: &[(f64, f64)], count: f64, sum: f64) -> Hist {
        Hist::from_buckets(b.to_vec(), Some(count), Some(sum)).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn quantile_interpolates_like_promql() {
        // 10 observations: 2 in (0, 0.1], 6 in (0.1, 0.5], 2 in (0.5, 1].
        let x = h(
            &[(0.1, 2.0), (0.5, 8.0), (1.0, 10.0), (INF, 10.0)],
            10.0,
            3.0,
        );
        // p50: rank 5 → 3 of the 6 in (0.1, 0.5] → 0.1 + 0.4 * 3/6 = 0.3.
        let q = x.quantile(0.5).unwrap();
        assert!(close(q.value, 0.3), "{q:?}");
        assert_eq!((q.lo, q.hi), (0.1, 0.5));
        // p95: rank 9.5 → 1.5 of the 2 in (0.5, 1] → 0.5 + 0.5 * 0.75 = 0.875.
        assert!(close(x.quantile(0.95).unwrap().value, 0.875));
        // p10: rank 1 in the first bucket, which starts at 0 → 0.1 * 1/2 = 0.05.
        let q = x.quantile(0.1).unwrap();
        assert!(close(q.value, 0.05) && q.lo == 0.0);
        // q = 0: the first bucket with count >= 0 is the first → its lower end.
        assert!(close(x.quantile(0.0).unwrap().value, 0.0));
        assert_eq!(x.mean(), Some(0.3));
        assert_eq!(x.quantile(1.5), None);
    }

    #[test]
    fn quantile_in_the_inf_bucket_is_the_highest_bound() {
        let x = h(&[(0.1, 1.0), (1.0, 1.0), (INF, 4.0)], 4.0, 40.0);
        let q = x.quantile(0.5).unwrap();
        assert_eq!((q.value, q.lo, q.hi), (1.0, 1.0, INF));
        let empty = h(&[(0.1, 0.0), (INF, 0.0)], 0.0, 0.0);
        assert_eq!(empty.quantile(0.5), None);
        assert_eq!(empty.mean(), None);
    }

    #[test]
    fn bad_bucket_sets_are_refused_and_lagging_buckets_mended() {
        assert!(Hist::from_buckets(vec![(0.1, 1.0), (1.0, 2.0)], None, None).is_none());
        assert!(Hist::from_buckets(vec![(0.1, 1.0), (0.1, 1.0), (INF, 2.0)], None, None).is_none());
        assert!(Hist::from_buckets(vec![(f64::NAN, 1.0), (INF, 2.0)], None, None).is_none());
        assert!(Hist::from_buckets(vec![(0.1, f64::NAN), (INF, 2.0)], None, None).is_none());
        // Unsorted input is sorted; a bucket below its predecessor is raised to it.
        let x = Hist::from_buckets(vec![(INF, 5.0), (0.5, 2.0), (0.1, 3.0)], None, None).unwrap();
        assert_eq!(x.bounds, vec![0.1, 0.5, INF]);
        assert_eq!(x.cum, vec![3.0, 3.0, 5.0]);
        assert_eq!(x.count, 5.0, "count from +Inf when _count is missing");
    }

    #[test]
    fn increase_between_scrapes() {
        let b = [0.1, 0.5, INF];
        let mk = |c: [f64; 3], sum| h(&[(b[0], c[0]), (b[1], c[1]), (b[2], c[2])], c[2], sum);
        let t0 = mk([10.0, 20.0, 30.0], 9.0);
        let t1 = mk([10.0, 24.0, 34.0], 10.2);
        let t2 = mk([12.0, 26.0, 36.0], 10.5);
        let d = t1.increase_since(&t0);
        assert_eq!(d.cum, vec![0.0, 4.0, 4.0]);
        assert_eq!(d.count, 4.0);
        assert!(close(d.sum, 1.2));
        // All four new observations are in (0.1, 0.5]: p50 = 0.1 + 0.4 * 2/4.
        assert!(close(d.quantile(0.5).unwrap().value, 0.3));
        // Over the run: 6 new, 2 of them in (0, 0.1].
        let (start, all) = increase_over(&[&t0, &t1, &t2]).unwrap();
        assert_eq!(start, 0);
        assert_eq!(all.cum, vec![2.0, 6.0, 6.0]);
        assert!(close(all.sum, 1.5));
    }

    #[test]
    fn counter_reset_counts_what_came_after_it() {
        let b = [0.1, 0.5, INF];
        let mk = |c: [f64; 3]| h(&[(b[0], c[0]), (b[1], c[1]), (b[2], c[2])], c[2], 0.0);
        let before = mk([10.0, 20.0, 30.0]);
        // The server restarted and has served 3 requests since.
        let after = mk([1.0, 3.0, 3.0]);
        assert_eq!(after.increase_since(&before).cum, vec![1.0, 3.0, 3.0]);
        let later = mk([1.0, 5.0, 5.0]);
        let (_, all) = increase_over(&[&before, &after, &later]).unwrap();
        assert_eq!(all.cum, vec![1.0, 5.0, 5.0], "3 after the reset + 2 more");
        // One bucket going down is a reset too, even if the count did not.
        let odd = mk([9.0, 20.0, 30.0]);
        assert_eq!(odd.increase_since(&before), odd);
    }

    #[test]
    fn bucket_change_restarts_the_run() {
        let a = h(&[(0.1, 5.0), (INF, 5.0)], 5.0, 0.1);
        let b = h(&[(0.2, 6.0), (INF, 6.0)], 6.0, 0.2);
        let c = h(&[(0.2, 8.0), (INF, 9.0)], 9.0, 0.5);
        let (start, inc) = increase_over(&[&a, &b, &c]).unwrap();
        assert_eq!(start, 1);
        assert_eq!(inc.cum, vec![2.0, 3.0]);
        let (start, inc) = increase_over(&[&a]).unwrap();
        assert_eq!((start, inc.count), (0, 0.0));
        assert!(increase_over(&[]).is_none());
    }
}
