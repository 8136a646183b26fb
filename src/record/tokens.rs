//! The write times of a request's content events, packed.
//!
//! A record keeps every token's time (traces show each one; ITL histograms take every gap), and
//! the recent-request store keeps thousands of records: as `Vec<u64>` plus the derived
//! `Vec<f64>` of gaps that was 16 bytes a token (plus the vectors' doubling slack), 51 MB for
//! 16,000 records of 200 tokens. Here the first time is kept whole and each next one as the
//! zigzag LEB128 varint of its difference from the previous: 3 bytes for a gap under 1 ms,
//! 4 bytes under 134 ms. Exact (every value comes back as pushed), in order, any length.
//! The gaps (ITL) are derived on demand.

use serde::ser::{Serialize, SerializeSeq, Serializer};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTimes {
    first: u64,
    last: u64,
    len: u32,
    /// Varint differences of the 2nd..nth time from the one before.
    deltas: Vec<u8>,
}

impl TokenTimes {
    pub fn new() -> TokenTimes {
        TokenTimes::default()
    }

    /// Room for `bytes` more of packed differences (`packed_bytes` of a like response's
    /// times), so that pushing them allocates nothing.
    pub fn reserve(&mut self, bytes: usize) {
        self.deltas.reserve(bytes);
    }

    /// Bytes the packed differences take.
    pub fn packed_bytes(&self) -> usize {
        self.deltas.len()
    }

    pub fn push(&mut self, t: u64) {
        if self.len == 0 {
            self.first = t;
        } else {
            let d = t.wrapping_sub(self.last) as i64;
            let mut z = ((d << 1) ^ (d >> 63)) as u64; // zigzag: small either way
            loop {
                let b = (z & 0x7f) as u8;
                z >>= 7;
                if z == 0 {
                    self.deltas.push(b);
                    break;
                }
                self.deltas.push(b | 0x80);
            }
        }
        self.last = t;
        self.len = self.len.saturating_add(1);
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn first(&self) -> Option<u64> {
        (self.len > 0).then_some(self.first)
    }

    pub fn last(&self) -> Option<u64> {
        (self.len > 0).then_some(self.last)
    }

    /// Every time, in the order pushed.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            next: self.first(),
            bytes: &self.deltas,
        }
    }

    /// The gaps between consecutive times (ns; 0 where a time went backwards): the ITLs.
    pub fn gaps(&self) -> impl Iterator<Item = u64> + '_ {
        let mut it = self.iter();
        let mut prev = it.next();
        it.map(move |t| {
            let g = t.saturating_sub(prev.unwrap_or(t));
            prev = Some(t);
            g
        })
    }

    /// The gaps in milliseconds, as records report ITL.
    pub fn itl_ms(&self) -> impl Iterator<Item = f64> + '_ {
        self.gaps().map(super::ns_to_ms)
    }

    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }

    /// Drops the growth slack (a finished record is stored as is).
    pub fn shrink_to_fit(&mut self) {
        self.deltas.shrink_to_fit();
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.deltas.capacity()
    }
}

pub struct Iter<'a> {
    next: Option<u64>,
    bytes: &'a [u8],
}

impl Iterator for Iter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let cur = self.next?;
        self.next = if self.bytes.is_empty() {
            None
        } else {
            let (mut z, mut shift) = (0u64, 0u32);
            let mut used = 0;
            for &b in self.bytes {
                used += 1;
                z |= u64::from(b & 0x7f).wrapping_shl(shift);
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            self.bytes = &self.bytes[used..];
            let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
            Some(cur.wrapping_add(d as u64))
        };
        Some(cur)
    }
}

impl From<Vec<u64>> for TokenTimes {
    fn from(v: Vec<u64>) -> TokenTimes {
        let mut t = TokenTimes::new();
        for x in v {
            t.push(x);
        }
        t
    }
}

impl<const N: usize> PartialEq<[u64; N]> for TokenTimes {
    fn eq(&self, other: &[u64; N]) -> bool {
        self.len() == N && self.iter().eq(other.iter().copied())
    }
}

impl PartialEq<Vec<u64>> for TokenTimes {
    fn eq(&self, other: &Vec<u64>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter().copied())
    }
}

/// Serialises the gaps in ms: a record's `itl_ms` array.
pub fn serialize_itl_ms<S: Serializer>(t: &TokenTimes, s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(t.len().saturating_sub(1)))?;
    for g in t.itl_ms() {
        seq.serialize_element(&g)?;
    }
    seq.end()
}

/// Serialises the times themselves (ns), e.g. for the abnormal-request listing.
impl Serialize for TokenTimes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for t in self.iter() {
            seq.serialize_element(&t)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exactly() {
        let cases: Vec<Vec<u64>> = vec![
            vec![],
            vec![7],
            vec![0, 0, 0],
            vec![1_000, 2_000, 1_500, u64::MAX, 0, u64::MAX / 2],
            (0..1000).map(|i| 5_000_000_000 + i * 20_123_456).collect(),
            vec![u64::MAX, 0, u64::MAX],
        ];
        for v in cases {
            let t = TokenTimes::from(v.clone());
            assert_eq!(t.to_vec(), v);
            assert_eq!(t.len(), v.len());
            assert_eq!(t.first(), v.first().copied());
            assert_eq!(t.last(), v.last().copied());
            let gaps: Vec<u64> = v.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
            assert_eq!(t.gaps().collect::<Vec<_>>(), gaps);
        }
    }

    #[test]
    fn gaps_under_a_millisecond_take_three_bytes() {
        let mut t = TokenTimes::new();
        for i in 0..201u64 {
            t.push(1_000_000_000_000 + i * 999_000);
        }
        t.shrink_to_fit();
        assert_eq!(t.heap_bytes(), 200 * 3);
        assert_eq!(t.len(), 201);
    }

    #[test]
    fn itl_ms_serialises_as_the_records_array() {
        let t = TokenTimes::from(vec![10_000_000, 12_500_000, 13_000_000]);
        #[derive(serde::Serialize)]
        struct R {
            #[serde(serialize_with = "serialize_itl_ms")]
            itl_ms: TokenTimes,
        }
        let v = serde_json::to_value(R { itl_ms: t.clone() }).unwrap();
        assert_eq!(v["itl_ms"], serde_json::json!([2.5, 0.5]));
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            serde_json::json!([10_000_000u64, 12_500_000u64, 13_000_000u64])
        );
        assert_eq!(
            serde_json::to_value(R {
                itl_ms: TokenTimes::new()
            })
            .unwrap()["itl_ms"],
            serde_json::json!([])
        );
    }
}
