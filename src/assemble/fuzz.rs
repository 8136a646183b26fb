//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz) and for the stable-toolchain
//! smoke test of the same code: each takes arbitrary bytes, and must neither panic nor loop.
//! The first bytes of an input choose how the rest is cut into pieces, so one input tests a
//! parser over many different read/write boundaries.

use std::net::SocketAddr;

use super::body::{Body, Chunked};
use super::http::{self, HeadBuf, HeadStep};
use super::scan::{self, KeyScan};
use super::sse::Sse;
use super::{Assembler, AssemblerConfig};
use crate::event::{EventKind, NetStamps, SockEvent};

/// Splits `data` into pieces whose lengths cycle through `sizes` (each at least 1).
fn pieces<'a>(data: &'a [u8], sizes: &[u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![data.len().max(1)]
    } else {
        sizes.iter().map(|&s| usize::from(s).max(1)).collect()
    };
    let mut at = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let n = sizes[i % sizes.len()].min(data.len() - at);
        i += 1;
        at += n;
        Some(&data[at - n..at])
    })
}

/// The first byte says how many of the next bytes are piece sizes.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    let n = usize::from(n % 8).min(rest.len());
    rest.split_at(n)
}

/// Request and response heads: sniffing, accumulation over pieces, parsing, framing.
pub fn http_head(data: &[u8]) {
    let (sizes, body) = split(data);
    let _ = http::classify(&body[..body.len().min(http::CLASSIFY_LEN)]);
    let mut head = HeadBuf::default();
    for piece in pieces(body, sizes) {
        match head.feed(piece, 16384) {
            HeadStep::Need => continue,
            HeadStep::TooLarge => return,
            HeadStep::Done(n) => {
                let h = if head.is_empty() {
                    &piece[..n]
                } else {
                    head.bytes()
                };
                if let Some(r) = http::parse_request(h) {
                    let _ = Body::new(r.framing);
                }
                if let Some(r) = http::parse_response(h) {
                    let _ = Body::new(r.framing(false));
                    let _ = Body::new(r.framing(true));
                }
                let line = h.split(|&b| b == b'\n').next().unwrap_or(h);
                let _ = http::request_line(line);
                head.clear();
            }
        }
    }
}

/// Chunked transfer coding over pieces, with some pieces replaced by uncopied gaps.
pub fn chunked(data: &[u8]) {
    let (sizes, body) = split(data);
    let mut b = Body::Chunked(Chunked::default());
    for (i, piece) in pieces(body, sizes).enumerate() {
        // Every 7th piece is a gap the kernel did not copy.
        if i % 7 == 6 {
            if b.skip(piece.len() as u64).is_err() {
                return;
            }
            continue;
        }
        let mut rest = piece;
        while !rest.is_empty() {
            match b.step(rest) {
                Ok(st) if st.consumed == 0 && !st.done => return,
                Ok(st) => {
                    let _ = super::body::starts_with_size_line(rest);
                    rest = &rest[st.consumed..];
                    if st.done {
                        b = Body::Chunked(Chunked::default());
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// SSE event framing and the JSON key scan, over pieces, with a lost piece now and then.
pub fn sse(data: &[u8]) {
    let (sizes, body) = split(data);
    let mut s = Sse::default();
    let mut k = KeyScan::default();
    for (i, piece) in pieces(body, sizes).enumerate() {
        if i % 11 == 10 {
            s.skip();
            k.reset();
            continue;
        }
        s.feed(piece, &mut |_| {});
        k.feed(piece, &mut |_| {});
    }
    let _ = scan::model_name(body);
}

/// The whole assembler: the input is a little program of socket events (accepts, reads,
/// writes, closes, gaps) of two processes over a few connections, so connection tracking,
/// pipelining, aborts and the sidecar join all see arbitrary sequences.
pub fn assembler(data: &[u8]) {
    let mut a = Assembler::new(AssemblerConfig {
        max_conns: 4,
        arm_streams: true,
        ..Default::default()
    });
    let addrs: [(SocketAddr, SocketAddr); 3] = [
        (
            "10.0.0.2:15006".parse().unwrap(),
            "10.0.0.9:40000".parse().unwrap(),
        ),
        (
            "127.0.0.1:50000".parse().unwrap(),
            "127.0.0.1:8000".parse().unwrap(),
        ),
        (
            "127.0.0.1:8000".parse().unwrap(),
            "127.0.0.1:50000".parse().unwrap(),
        ),
    ];
    let mut t = 1_000_000u64;
    let mut rest = data;
    let mut n = 0;
    while let Some((&op, tail)) = rest.split_first() {
        n += 1;
        if n > 4096 {
            break;
        }
        let len = usize::from(tail.first().copied().unwrap_or(0)).min(tail.len().saturating_sub(1));
        let payload = &tail[tail.len().min(1)..][..len];
        rest = &tail[(1 + len).min(tail.len())..];
        let conn = usize::from(op >> 4) % addrs.len();
        let kind = match op & 3 {
            0 => EventKind::Accept,
            1 => EventKind::Read,
            2 => EventKind::Write,
            // Token records (counted writes), with the payload as their deltas.
            _ if op & 8 != 0 => EventKind::Tokens,
            _ => EventKind::Close,
        };
        let payload = if kind == EventKind::Tokens {
            &payload[..payload.len() / 4 * 4]
        } else {
            payload
        };
        // Bit 2: the syscall moved more bytes than were copied (a gap after the head).
        let gap = if op & 4 != 0 { 4096 } else { 0 };
        let ret = match kind {
            EventKind::Accept => 5,
            EventKind::Close => 0,
            EventKind::Tokens => (payload.len() * 40 + gap) as i64,
            _ if op & 8 != 0 => -104,
            _ => (payload.len() + gap) as i64,
        };
        let (local, remote) = addrs[conn];
        t += 1000 + u64::from(op);
        let ev = SockEvent {
            kind,
            ts_enter: t,
            ts_exit: t + 10,
            sock_id: 0x1000 + conn as u64,
            queued_ts: (kind == EventKind::Read).then_some(t - 5),
            tgid: if conn == 2 { 4242 } else { 500 },
            tid: 1,
            fd: 3,
            cgroup_id: 1,
            ret,
            local,
            remote,
            comm: "fuzz",
            head: payload,
            tail: if gap > 0 && kind != EventKind::Tokens {
                &payload[payload.len() / 2..]
            } else {
                &[]
            },
            net: NetStamps {
                queued_last: Some(t + 3),
                ..Default::default()
            },
            inside: Default::default(),
        };
        a.on_event(&ev, &mut |r| {
            // Every record must serialise (the API does it).
            let _ = serde_json::to_string(&r).expect("record serialises");
        });
        // Every arm fits the kernel's arrays (the loader refuses others).
        for arm in a.take_arms() {
            assert!((8..=super::arm::PREFIX_CAP).contains(&arm.prefix.len()));
            assert!((8..=super::arm::SUFFIX_CAP).contains(&arm.suffix.len()));
            assert_eq!(arm.prefix_fixed.len(), arm.prefix.len());
            assert_eq!(arm.suffix_fixed.len(), arm.suffix.len());
            assert!(arm.prefix_vary.len() <= super::arm::VARY_MAX);
            assert!(arm.suffix_vary.len() <= super::arm::VARY_MAX);
        }
        if op == 0xff {
            a.expire(t + 10_000_000_000, &mut |_| {});
        }
    }
    a.expire(u64::MAX / 2, &mut |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz targets' checked-in corpus, run on the stable toolchain in every `make test`
    /// (cargo fuzz itself runs them coverage-guided in `make fuzz`).
    #[test]
    fn the_fuzz_corpus_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut n = 0;
        for (target, f) in [
            ("http_head", http_head as fn(&[u8])),
            ("chunked", chunked),
            ("sse", sse),
            ("assembler", assembler),
        ] {
            let dir = root.join(target);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
            for e in entries {
                let data = std::fs::read(e.unwrap().path()).unwrap();
                f(&data);
                n += 1;
            }
        }
        assert!(n >= 20, "corpus too small: {n} inputs");
    }

    #[test]
    fn pieces_cover_the_input_exactly() {
        let data: Vec<u8> = (0..100).collect();
        let joined: Vec<u8> = pieces(&data, &[3, 0, 7]).flatten().copied().collect();
        assert_eq!(joined, data);
        assert_eq!(pieces(&data, &[]).count(), 1);
    }
}
