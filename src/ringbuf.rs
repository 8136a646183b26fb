//! Ring-buffer records → `SockEvent`: check the length, decode the header, hand it over.

use crate::event::{sockaddr, EventKind, GpuTotals, Inside, NetStamps, SockEvent};
use crate::skel::l7::types::{llmslo_event_hdr, llmslo_event_kind as K, llmslo_inside as I};

/// Why a ring-buffer record was rejected (counted, never fatal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record shorter than the event header")]
    Short,
    #[error("payload lengths exceed the record")]
    BadLengths,
    #[error("unknown event kind")]
    UnknownKind,
}

// SAFETY: llmslo_event_hdr is a repr(C) struct of integers and byte arrays; any bit pattern is valid.
unsafe impl plain::Plain for llmslo_event_hdr {}

/// Decodes one record. `data` is the ring buffer's bytes; the event borrows them.
pub fn decode(data: &[u8]) -> Result<SockEvent<'_>, DecodeError> {
    let hdr_len = std::mem::size_of::<llmslo_event_hdr>();
    if data.len() < hdr_len {
        return Err(DecodeError::Short);
    }
    let mut h = llmslo_event_hdr::default();
    plain::copy_from_bytes(&mut h, &data[..hdr_len]).map_err(|_| DecodeError::Short)?;
    let payload = &data[hdr_len..];
    let (hl, tl) = (h.head_len as usize, h.tail_len as usize);
    if hl.checked_add(tl).is_none_or(|n| n > payload.len()) {
        return Err(DecodeError::BadLengths);
    }
    let kind = match K(u32::from(h.kind)) {
        K::LLMSLO_EV_ACCEPT => EventKind::Accept,
        K::LLMSLO_EV_READ => EventKind::Read,
        K::LLMSLO_EV_WRITE => EventKind::Write,
        K::LLMSLO_EV_CLOSE => EventKind::Close,
        K::LLMSLO_EV_TOKENS if hl % 4 == 0 && tl == 0 => EventKind::Tokens,
        K::LLMSLO_EV_TOKENS => return Err(DecodeError::BadLengths),
        _ => return Err(DecodeError::UnknownKind),
    };
    let comm_end = h.comm.iter().position(|&c| c == 0).unwrap_or(h.comm.len());
    // The comm bytes live inside `data` at a fixed offset; borrow them rather than copy.
    let comm_off = std::mem::offset_of!(llmslo_event_hdr, comm);
    let comm = std::str::from_utf8(&data[comm_off..comm_off + comm_end]).unwrap_or("?");
    Ok(SockEvent {
        kind,
        ts_enter: h.ts_enter,
        ts_exit: h.ts_exit,
        sock_id: h.sock_id,
        queued_ts: (h.queued_ts != 0).then_some(h.queued_ts),
        tgid: h.tgid,
        tid: h.tid,
        fd: h.fd,
        cgroup_id: h.cgroup_id,
        ret: h.ret,
        local: sockaddr(h.family, &h.laddr, h.lport),
        remote: sockaddr(h.family, &h.raddr, h.rport),
        comm,
        head: &payload[..hl],
        tail: &payload[hl..hl + tl],
        net: NetStamps::from_array(&h.net_ts),
        inside: inside(&h),
    })
}

fn inside(h: &llmslo_event_hdr) -> Inside {
    let has = |bit: I| h.inside & bit.0 != 0;
    Inside {
        tid: h.tid,
        runq_ns: has(I::LLMSLO_INSIDE_RUNQ).then_some(h.runq_total_ns),
        gpu: has(I::LLMSLO_INSIDE_GPU).then_some(GpuTotals {
            launches: h.gpu_launches,
            graph_launches: h.gpu_graph_launches,
            sync_wait_ns: h.gpu_sync_wait_ns,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(h: &llmslo_event_hdr, payload: &[u8]) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        let bytes = unsafe { plain::as_bytes(h) };
        [bytes, payload].concat()
    }

    #[test]
    fn decodes_a_read() {
        let mut h = llmslo_event_hdr {
            kind: 2,
            family: 2,
            lport: 8000,
            rport: 40000,
            ret: 7,
            head_len: 4,
            tail_len: 2,
            queued_ts: 5,
            ..Default::default()
        };
        h.laddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        h.raddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        h.comm[..4].copy_from_slice(&[b'v' as i8, b'l' as i8, b'l' as i8, b'm' as i8]);
        let d = raw(&h, b"POSTxy");
        let e = decode(&d).unwrap();
        assert_eq!(e.kind, EventKind::Read);
        assert_eq!(e.head, b"POST");
        assert_eq!(e.tail, b"xy");
        assert_eq!(e.gap(), 1);
        assert_eq!(e.comm, "vllm");
        assert_eq!(e.queued_ts, Some(5));
        assert_eq!(e.local.to_string(), "10.0.0.2:8000");
        assert_eq!(e.remote.to_string(), "10.0.0.1:40000");
        assert_eq!(e.inside.runq_ns, None);
        assert_eq!(e.inside.gpu, None);
    }

    #[test]
    fn decodes_the_inside_counters_only_where_flagged() {
        let mut h = llmslo_event_hdr {
            kind: 3,
            tid: 77,
            runq_total_ns: 5_000,
            gpu_launches: 9,
            gpu_graph_launches: 2,
            gpu_sync_wait_ns: 300,
            inside: I::LLMSLO_INSIDE_RUNQ.0,
            ..Default::default()
        };
        let d = raw(&h, b"");
        let e = decode(&d).unwrap();
        assert_eq!(e.inside.tid, 77);
        assert_eq!(e.inside.runq_ns, Some(5_000));
        assert_eq!(e.inside.gpu, None);
        h.inside = I::LLMSLO_INSIDE_GPU.0;
        let d = raw(&h, b"");
        let e = decode(&d).unwrap();
        assert_eq!(e.inside.runq_ns, None);
        assert_eq!(
            e.inside.gpu,
            Some(GpuTotals {
                launches: 9,
                graph_launches: 2,
                sync_wait_ns: 300
            })
        );
    }

    #[test]
    fn decodes_a_token_record() {
        let h = llmslo_event_hdr {
            kind: 5,
            ts_enter: 1_000,
            ts_exit: 9_000,
            ret: 600,
            head_len: 8,
            ..Default::default()
        };
        let deltas = [0u32.to_ne_bytes(), 4_000u32.to_ne_bytes()].concat();
        let d = raw(&h, &[&deltas[..], &[0u8; 248][..]].concat());
        let e = decode(&d).unwrap();
        assert_eq!((e.kind, e.ret, e.ts_exit), (EventKind::Tokens, 600, 9_000));
        assert_eq!(e.head, &deltas[..]);
        // Deltas are whole u32s, and a token record has no tail.
        for (head_len, tail_len) in [(6, 0), (8, 4)] {
            let bad = llmslo_event_hdr {
                head_len,
                tail_len,
                ..h
            };
            assert_eq!(decode(&raw(&bad, &d[..])).unwrap_err(), DecodeError::BadLengths);
        }
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0u8; 10]).unwrap_err(), DecodeError::Short);
        let h = llmslo_event_hdr {
            kind: 2,
            head_len: 100,
            ..Default::default()
        };
        assert_eq!(
            decode(&raw(&h, b"abc")).unwrap_err(),
            DecodeError::BadLengths
        );
        let h = llmslo_event_hdr {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(decode(&raw(&h, b"")).unwrap_err(), DecodeError::UnknownKind);
        let h = llmslo_event_hdr {
            kind: 2,
            head_len: u32::MAX,
            tail_len: 2,
            ..Default::default()
        };
        assert_eq!(decode(&raw(&h, b"")).unwrap_err(), DecodeError::BadLengths);
    }
}
