//! Events as the assembler sees them: a borrowed, decoded view of one ring-buffer record.
//! The kernel layout lives in `src/bpf/llmslo.h`; `ringbuf.rs` turns raw bytes into `SockEvent`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What the traced syscall did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// accept/accept4 returned this connection's fd.
    Accept,
    /// The server read bytes from the connection (or the read failed hard).
    Read,
    /// The server wrote bytes to the connection (or the write failed hard).
    Write,
    /// The server closed the fd.
    Close,
    /// Token writes the kernel counted instead of sending each (an armed stream): `head`
    /// holds one native-endian u32 per write, its start minus `ts_enter`; `ret` is their bytes,
    /// `ts_exit` when the last one returned.
    Tokens,
}

/// One traced syscall on a TCP socket of a target process.
#[derive(Debug, Clone)]
pub struct SockEvent<'a> {
    pub kind: EventKind,
    /// CLOCK_MONOTONIC ns at syscall entry and exit.
    pub ts_enter: u64,
    pub ts_exit: u64,
    /// Opaque connection id (the kernel's `struct sock` address); reused after close.
    pub sock_id: u64,
    /// For reads: the first time data became ready on the socket since the previous read.
    pub queued_ts: Option<u64>,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub cgroup_id: u64,
    /// Bytes moved by the syscall, or `-errno`.
    pub ret: i64,
    /// The server's address and the peer's.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub comm: &'a str,
    /// Copied bytes from the start of the payload (`head`) and from its end (`tail`).
    /// When `head.len() + tail.len() < ret`, the bytes in between were not copied: a gap.
    pub head: &'a [u8],
    pub tail: &'a [u8],
    /// Packet-path and TCP-lifecycle stamps the kernel joined to this syscall.
    pub net: NetStamps,
    /// Reads and writes: what had happened inside the server by the time the syscall returned.
    pub inside: Inside,
}

/// Cumulative counters read by the kernel as a read or write returned (`fill_inside` in
/// l7.bpf.c). The difference between two events of a request is what happened between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inside {
    /// The thread that made the syscall.
    pub tid: u32,
    /// That thread's run-queue wait so far (ns); `None` with `cpu_runqueue: false`.
    pub runq_ns: Option<u64>,
    /// Its cgroup's CUDA activity so far; `None` when it has no GPU counters (no libcuda).
    pub gpu: Option<GpuTotals>,
}

/// A cgroup's CUDA totals at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuTotals {
    pub launches: u64,
    pub graph_launches: u64,
    pub sync_wait_ns: u64,
}

/// Stamps from the packet hooks and TCP tracepoints (DESIGN.md §3), as carried by one event:
/// reads carry the request's arrival (node_in, nat_done, pod_in), writes the latest response
/// departure (pod_out, node_out), accepts the handshake (syn, established).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStamps {
    pub syn: Option<u64>,
    pub established: Option<u64>,
    pub node_in: Option<u64>,
    pub nat_done: Option<u64>,
    pub pod_in: Option<u64>,
    pub pod_out: Option<u64>,
    pub node_out: Option<u64>,
    /// Reads: the latest arrival of data on the socket before the read returned (at the read
    /// that completes a request, when its last bytes were queued).
    pub queued_last: Option<u64>,
}

impl NetStamps {
    /// From the kernel's `net_ts` array (enum llmslo_net_ts order); 0 means not seen.
    pub fn from_array(a: &[u64; 8]) -> NetStamps {
        let o = |v: u64| (v != 0).then_some(v);
        NetStamps {
            syn: o(a[0]),
            established: o(a[1]),
            node_in: o(a[2]),
            nat_done: o(a[3]),
            pod_in: o(a[4]),
            pod_out: o(a[5]),
            node_out: o(a[6]),
            queued_last: o(a[7]),
        }
    }
}

impl SockEvent<'_> {
    /// Bytes the syscall moved (0 for errors, accept and close).
    pub fn len(&self) -> u64 {
        if self.ret > 0 && matches!(self.kind, EventKind::Read | EventKind::Write) {
            self.ret as u64
        } else {
            0
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes between head and tail that were not copied.
    pub fn gap(&self) -> u64 {
        self.len()
            .saturating_sub(self.head.len() as u64 + self.tail.len() as u64)
    }

    /// A token record's writes: their start stamps (each a native-endian u32 delta from
    /// `ts_enter` in `head`). Empty for any other kind.
    pub fn token_starts(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        let deltas = if self.kind == EventKind::Tokens {
            self.head
        } else {
            &[]
        };
        deltas
            .chunks_exact(4)
            .map(|d| self.ts_enter + u64::from(u32::from_ne_bytes([d[0], d[1], d[2], d[3]])))
    }
}

/// Builds a socket address from the kernel's fixed 16-byte address field.
pub fn sockaddr(family: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    const AF_INET6: u16 = 10;
    let ip = if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_mapped_v6_addresses() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 244, 1, 2]);
        assert_eq!(sockaddr(2, &a, 8000).to_string(), "10.244.1.2:8000");
        let mapped: [u8; 16] = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        assert_eq!(sockaddr(10, &mapped, 80).to_string(), "127.0.0.1:80");
        let v6 = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(sockaddr(10, &v6, 80).to_string(), "[::1]:80");
    }
}
