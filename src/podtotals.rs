//! Kernel counters per process or cgroup (hash maps keyed by tgid: per-CPU run-queue waits; by
//! cgroup id: GPU activity) summed per pod for `/metrics`. A process's or cgroup's totals stay
//! with its pod after it is no target any more: they are folded into `retired` and its kernel
//! entry can be deleted, so pods' counters never go back and the kernel maps hold live targets
//! only. A pod's totals go once no target has carried its labels for `forget_after`, the rule
//! of its request series (`agent::forget_series`): pods churned through the node leave nothing
//! behind.

use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::discovery::{Meta, Snapshot};

/// (namespace, pod): the only labels these metrics carry.
pub type PodLabels = (String, String);

#[derive(Debug)]
pub struct PodTotals<K, C> {
    labels: BTreeMap<K, PodLabels>,
    retired: BTreeMap<PodLabels, C>,
    /// Retired pods without a target, since when.
    gone_since: BTreeMap<PodLabels, Instant>,
    forget_after: Duration,
}

impl<K, C> Default for PodTotals<K, C> {
    /// Forgets after 30 s, the default of `discovery.forget_after_s`.
    fn default() -> Self {
        PodTotals::new(Duration::from_secs(30))
    }
}

impl<K, C> PodTotals<K, C> {
    /// Totals whose pods are dropped once no target has carried their labels for
    /// `forget_after`.
    pub fn new(forget_after: Duration) -> Self {
        PodTotals {
            labels: BTreeMap::new(),
            retired: BTreeMap::new(),
            gone_since: BTreeMap::new(),
            forget_after,
        }
    }

    /// Pods whose totals are kept (live ones and retired ones not yet forgotten).
    pub fn retired_pods(&self) -> usize {
        self.retired.len()
    }

    /// Drops the retired totals of pods that no target has carried for `forget_after`.
    fn forget(&mut self, snap: &Snapshot, now: Instant) {
        let targeted = snap.pod_keys();
        let retired = &self.retired;
        self.gone_since
            .retain(|k, _| retired.contains_key(k) && !targeted.contains(k));
        let mut forgotten = Vec::new();
        for k in self.retired.keys().filter(|k| !targeted.contains(*k)) {
            let since = *self.gone_since.entry(k.clone()).or_insert(now);
            if now.duration_since(since) >= self.forget_after {
                forgotten.push(k.clone());
            }
        }
        for k in forgotten {
            self.retired.remove(&k);
            self.gone_since.remove(&k);
        }
    }
}

impl<K: Ord + Clone, C: Copy + Default + AddAssign> PodTotals<K, C> {
    /// Folds the kernel map's entries (key, the labels the snapshot has for it if any, whether
    /// it is still targeted, its counts) into per-pod totals. Answers them and the keys that are
    /// no longer targeted, whose entries the caller deletes (their counts are kept here).
    pub fn fold_keyed<'m>(
        &mut self,
        entries: impl IntoIterator<Item = (K, Option<&'m Meta>, bool, C)>,
        snap: &Snapshot,
    ) -> (BTreeMap<PodLabels, C>, Vec<K>) {
        let mut live: BTreeMap<PodLabels, C> = BTreeMap::new();
        let mut gone = Vec::new();
        for (key, meta, targeted, c) in entries {
            if let Some(m) = meta {
                let l = (
                    m.namespace.clone().unwrap_or_default(),
                    m.pod.clone().unwrap_or_default(),
                );
                self.labels.insert(key.clone(), l);
            }
            let labels = self.labels.get(&key).cloned().unwrap_or_default();
            if targeted {
                *live.entry(labels).or_default() += c;
            } else {
                *self.retired.entry(labels).or_default() += c;
                self.labels.remove(&key);
                gone.push(key);
            }
        }
        self.forget(snap, Instant::now());
        for (l, c) in &self.retired {
            *live.entry(l.clone()).or_default() += *c;
        }
        (live, gone)
    }
}

impl<C: Copy + Default + AddAssign> PodTotals<u32, C> {
    /// [`PodTotals::fold_keyed`] for maps keyed by tgid: (tgid, the process's cgroup id if
    /// known, its counts); a process is targeted by its tgid or its cgroup.
    pub fn fold(
        &mut self,
        entries: impl IntoIterator<Item = (u32, Option<u64>, C)>,
        snap: &Snapshot,
    ) -> (BTreeMap<PodLabels, C>, Vec<u32>) {
        let entries: Vec<_> = entries
            .into_iter()
            .map(|(tgid, cgroup, c)| {
                let meta = match cgroup {
                    Some(cg) => snap.meta(tgid, cg),
                    None => snap.by_tgid.get(&tgid),
                };
                let targeted = snap.set.tgids.contains(&tgid)
                    || cgroup.is_some_and(|cg| snap.set.cgroups.contains(&cg));
                (tgid, meta, targeted, c)
            })
            .collect();
        self.fold_keyed(entries, snap)
    }
}

/// The value of `key` in a per-CPU map as `N` native-endian u64 fields, one array per CPU
/// (empty when the key is gone; a value shorter than `N` fields is skipped).
pub fn per_cpu_fields<const N: usize>(map: &MapHandle, key: &[u8]) -> Vec<[u64; N]> {
    let Ok(Some(per_cpu)) = map.lookup_percpu(key, MapFlags::ANY) else {
        return Vec::new();
    };
    per_cpu
        .iter()
        .filter(|v| v.len() >= N * 8)
        .map(|v| {
            std::array::from_fn(|i| {
                u64::from_ne_bytes(v[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
            })
        })
        .collect()
}

/// A counter family: name, help, and the field of the counts it shows.
pub type Family<'a, C> = (&'a str, &'a str, fn(&C) -> f64);

/// One counter family per entry of `families`, one sample per (namespace, pod).
pub fn render<C>(out: &mut String, by_pod: &BTreeMap<PodLabels, C>, families: &[Family<'_, C>]) {
    if by_pod.is_empty() {
        return;
    }
    let labels: Vec<[(&str, &str); 2]> = by_pod
        .keys()
        .map(|(ns, pod)| [("namespace", ns.as_str()), ("pod", pod.as_str())])
        .collect();
    for (name, help, field) in families {
        let samples: Vec<(&[(&str, &str)], f64)> = labels
            .iter()
            .zip(by_pod.values())
            .map(|(l, c)| (&l[..], field(c)))
            .collect();
        crate::stats::write_counter(out, name, help, &samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(tgids: &[(u32, &str)], cgroups: &[(u64, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        let meta = |pod: &str| Meta {
            namespace: Some("ns".into()),
            pod: Some(pod.into()),
            ..Default::default()
        };
        for (t, pod) in tgids {
            s.set.tgids.insert(*t);
            s.by_tgid.insert(*t, meta(pod));
        }
        for (c, pod) in cgroups {
            s.set.cgroups.insert(*c);
            s.by_cgroup.insert(*c, meta(pod));
        }
        s
    }

    #[test]
    fn totals_per_pod_survive_their_processes() {
        let mut t: PodTotals<u32, u64> = PodTotals::default();
        let pod = |p: &str| ("ns".to_string(), p.to_string());
        // Two processes of pod a (one by tgid, a worker by its cgroup), one of pod b.
        let s1 = snap(&[(10, "a"), (20, "b")], &[(7, "a")]);
        let (live, gone) = t.fold([(10, None, 5), (11, Some(7), 3), (20, None, 1)], &s1);
        assert_eq!(live[&pod("a")], 8);
        assert_eq!(live[&pod("b")], 1);
        assert!(gone.is_empty());
        // Pod a's worker exits (its cgroup is still targeted, its entry reads on) and pod b's
        // process is no longer a target: b's count is kept, its entry goes.
        let s2 = snap(&[(10, "a")], &[(7, "a")]);
        let (live, gone) = t.fold([(10, None, 6), (11, Some(7), 3), (20, None, 2)], &s2);
        assert_eq!(live[&pod("a")], 9);
        assert_eq!(live[&pod("b")], 2);
        assert_eq!(gone, [20]);
        // Next round the kernel no longer has 20: b stays at 2, never goes back.
        let (live, _) = t.fold([(10, None, 6), (11, Some(7), 3)], &s2);
        assert_eq!(live[&pod("b")], 2);
    }

    #[test]
    fn a_gone_pods_totals_go_after_forget_after() {
        let mut t: PodTotals<u32, u64> = PodTotals::new(Duration::from_secs(30));
        let pod = |p: &str| ("ns".to_string(), p.to_string());
        let both = snap(&[(10, "a"), (20, "b"), (21, "b")], &[]);
        t.fold([(10, None, 5), (20, None, 1), (21, None, 2)], &both);
        // b's first process exits while its second is still a target: kept however long.
        let one_b = snap(&[(10, "a"), (21, "b")], &[]);
        let (live, _) = t.fold([(10, None, 5), (20, None, 1), (21, None, 2)], &one_b);
        assert_eq!(live[&pod("b")], 3);
        let t0 = Instant::now();
        t.forget(&one_b, t0 + Duration::from_secs(3600));
        assert_eq!(t.retired_pods(), 1, "b has a target: its totals stay");
        // Then pod b is gone: its totals stay for 30 s, then go; a's are untouched.
        let a_only = snap(&[(10, "a")], &[]);
        let (live, _) = t.fold([(10, None, 5), (21, None, 2)], &a_only);
        assert_eq!(live[&pod("b")], 3);
        let since = Instant::now();
        t.forget(&a_only, since + Duration::from_secs(29));
        assert_eq!(t.retired_pods(), 1, "not yet");
        t.forget(&a_only, since + Duration::from_secs(31));
        assert_eq!(t.retired_pods(), 0, "gone after forget_after");
        let (live, _) = t.fold([(10, None, 6)], &a_only);
        assert_eq!(live.len(), 1);
        assert_eq!(live[&pod("a")], 6);
        // A pod that comes back before the time is up keeps its totals (the clock restarts).
        let mut t: PodTotals<u32, u64> = PodTotals::new(Duration::from_secs(30));
        t.fold([(30, None, 4)], &snap(&[(30, "c")], &[]));
        t.fold([(30, None, 4)], &snap(&[], &[]));
        let now = Instant::now();
        t.forget(&snap(&[], &[]), now + Duration::from_secs(20));
        t.forget(&snap(&[(31, "c")], &[]), now + Duration::from_secs(25));
        t.forget(&snap(&[], &[]), now + Duration::from_secs(40));
        assert_eq!(
            t.retired_pods(),
            1,
            "c went, came back, went again 15 s ago"
        );
        t.forget(&snap(&[], &[]), now + Duration::from_secs(80));
        assert_eq!(t.retired_pods(), 0);
    }
}
