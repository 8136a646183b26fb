//! Sidecar join (DESIGN.md §3): a request that passes a sidecar proxy in the pod produces two
//! server-side records, the sidecar's (client ↔ sidecar) and the app's (sidecar ↔ app over
//! loopback). This module pairs them into one record with the sidecar stages.
//!
//! The join uses no timing:
//! - The sidecar's own connection to the app is traced too (it writes requests: the client
//!   side of a connection). Its requests are parsed from what it writes, in byte order, so the
//!   k-th request it wrote on that connection is the k-th request the app read from the other
//!   end (the app's connection has the same 4-tuple, reversed). That ties an app request to
//!   one forwarding by one sidecar process.
//! - Which client request a forwarding carries: the request's content fingerprint (method and
//!   body; proxies rewrite headers, not bodies), matched in order within the sidecar process.
//!   The n-th request with content F the sidecar finished reading is the n-th one with content
//!   F it forwarded, whichever upstream connection of its pool it picked. Requests of equal
//!   content are thus paired in arrival order; distinct ones never mix.
//!
//! Whichever of the two records completes first waits (bounded in time and number) for the
//! other; one that finds no partner is handed out alone and counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use crate::record::{RequestRecord, SidecarInfo, Ts};

/// Longest a record waits for its partner before it is handed out alone.
const HOLD_NS: u64 = 3_000_000_000;
/// Longest a read request waits to be forwarded, and a forwarding to be answered.
const NOTE_TTL_NS: u64 = 30_000_000_000;
/// Caps on what is remembered at once (each entry is a few dozen bytes).
const MAX_READS: usize = 65536;
/// Requests read by processes not (yet) seen forwarding: a sidecar's first request is read
/// before its first forwarding shows it is one. The latest ones only, for that start.
const MAX_PROBATION: usize = 4096;
const MAX_LINKS: usize = 65536;
const MAX_HELD: usize = 16384;

/// Counters of the join, exported as metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JoinStats {
    /// Requests whose sidecar and app records were joined.
    pub joined: u64,
    /// Sidecar records handed out without an app record (and app records without a sidecar
    /// record) after waiting.
    pub unjoined: u64,
    /// Forwardings whose content matched no request the sidecar had read.
    pub unmatched_forwards: u64,
    /// Entries dropped because a cap was reached.
    pub dropped: u64,
}

/// One forwarding of a client request by a sidecar onto its connection to the app.
#[derive(Debug, Clone, Copy)]
struct Link {
    sidecar_tgid: u32,
    client: (u64, u64),
    fingerprint: u64,
    written: u64,
}

enum Held {
    /// The app's record, waiting for the sidecar's.
    App(Box<RequestRecord>, Link),
    /// The sidecar's record, waiting for the app's.
    Sidecar(Box<RequestRecord>),
}

/// A request a process read: (its connection's sock, index on the connection, read at).
type Read = (u64, u64, u64);

#[derive(Default)]
pub(crate) struct Joiner {
    /// Requests read by each (process, content fingerprint), not yet forwarded.
    reads: HashMap<(u32, u64), VecDeque<Read>>,
    n_reads: usize,
    /// Forwardings by (sidecar end, app end, request index on that connection).
    links: HashMap<(SocketAddr, SocketAddr, u64), (Link, u64)>,
    /// Client requests (sidecar's sock, seq) that were forwarded.
    forwarded: HashSet<(u64, u64)>,
    /// Records waiting for their partner, by the client request (sidecar's sock, seq).
    held: HashMap<(u64, u64), (Held, u64)>,
    /// Processes seen forwarding HTTP requests.
    proxies: HashSet<u32>,
    /// Latest requests read by other processes: (tgid, fingerprint, sock, seq, read at).
    probation: VecDeque<(u32, u64, u64, u64, u64)>,
    pub(crate) stats: JoinStats,
}

impl Joiner {
    /// A server-side connection's request was read completely.
    pub(crate) fn note_read(&mut self, tgid: u32, fingerprint: u64, conn: (u64, u64), at: u64) {
        if !self.proxies.contains(&tgid) {
            if self.probation.len() >= MAX_PROBATION {
                self.probation.pop_front();
            }
            self.probation
                .push_back((tgid, fingerprint, conn.0, conn.1, at));
            return;
        }
        if self.n_reads >= MAX_READS {
            self.stats.dropped += 1;
            return;
        }
        self.reads
            .entry((tgid, fingerprint))
            .or_default()
            .push_back((conn.0, conn.1, at));
        self.n_reads += 1;
    }

    /// A process wrote a complete request on a client-side connection `(local, remote)`,
    /// as the connection's `seq`-th request, starting at `written`.
    pub(crate) fn note_forward(
        &mut self,
        tgid: u32,
        fingerprint: u64,
        addrs: (SocketAddr, SocketAddr),
        seq: u64,
        written: u64,
    ) {
        if self.proxies.insert(tgid) {
            // A new proxy: what it read before it was known as one waits to be forwarded.
            let (mine, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.probation)
                .into_iter()
                .partition(|e| e.0 == tgid);
            self.probation = rest;
            for (_, fp, sock, seq, at) in mine {
                self.note_read(tgid, fp, (sock, seq), at);
            }
        }
        let key = (tgid, fingerprint);
        let Some(q) = self.reads.get_mut(&key) else {
            self.stats.unmatched_forwards += 1;
            return;
        };
        let (sock, cseq, _) = q.pop_front().expect("queues are never left empty");
        if q.is_empty() {
            self.reads.remove(&key);
        }
        self.n_reads -= 1;
        if self.links.len() >= MAX_LINKS {
            self.stats.dropped += 1;
            return;
        }
        let link = Link {
            sidecar_tgid: tgid,
            client: (sock, cseq),
            fingerprint,
            written,
        };
        self.links.insert((addrs.0, addrs.1, seq), (link, written));
        self.forwarded.insert((sock, cseq));
    }

    /// Routes a finished record: joined with its partner, held for it, or handed out.
    pub(crate) fn on_record(
        &mut self,
        rec: RequestRecord,
        out: &mut dyn FnMut(RequestRecord),
        requests: &mut u64,
    ) {
        // The app's side: its peer is a sidecar's end of a forwarding.
        if let Some((local, remote)) = rec.conn_addrs {
            if let Some((link, _)) = self.links.remove(&(remote, local, rec.conn_seq)) {
                self.forwarded.remove(&link.client);
                if link.fingerprint != rec.fingerprint {
                    // The connection's request order is not what the sidecar wrote (e.g. a
                    // request the agent missed): no join rather than a wrong one.
                    self.stats.unmatched_forwards += 1;
                    return out(rec);
                }
                match self.held.remove(&link.client) {
                    Some((Held::Sidecar(front), _)) => {
                        *requests = requests.saturating_sub(1);
                        self.stats.joined += 1;
                        return out(merge(*front, rec, &link));
                    }
                    Some(other) => {
                        self.held.insert(link.client, other);
                        self.stats.unjoined += 1;
                        return out(rec);
                    }
                    None => return self.hold(link.client, Held::App(Box::new(rec), link), out),
                }
            }
        }
        // The sidecar's side: a request of a forwarding process.
        if self.proxies.contains(&rec.pid) {
            let key = (rec.sock_id, rec.conn_seq);
            match self.held.remove(&key) {
                Some((Held::App(app, link), _)) => {
                    *requests = requests.saturating_sub(1);
                    self.stats.joined += 1;
                    return out(merge(rec, *app, &link));
                }
                Some(other) => {
                    self.held.insert(key, other);
                }
                None if self.forwarded.remove(&key) => {
                    return self.hold(key, Held::Sidecar(Box::new(rec)), out);
                }
                None => {}
            }
        }
        out(rec)
    }

    fn hold(&mut self, key: (u64, u64), h: Held, out: &mut dyn FnMut(RequestRecord)) {
        if self.held.len() >= MAX_HELD {
            self.stats.dropped += 1;
            return release(h, out);
        }
        let since = match &h {
            Held::App(r, _) | Held::Sidecar(r) => r.end_ns.unwrap_or(0),
        };
        self.held.insert(key, (h, since));
    }

    /// Hands out records that waited too long and forgets stale notes.
    pub(crate) fn expire(&mut self, now_ns: u64, out: &mut dyn FnMut(RequestRecord)) {
        let hold_cut = now_ns.saturating_sub(HOLD_NS);
        let note_cut = now_ns.saturating_sub(NOTE_TTL_NS);
        let stale: Vec<(u64, u64)> = self
            .held
            .iter()
            .filter(|(_, (_, since))| *since < hold_cut)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some((h, _)) = self.held.remove(&k) {
                self.stats.unjoined += 1;
                release(h, out);
            }
        }
        let mut n = 0;
        self.reads.retain(|_, q| {
            q.retain(|&(_, _, at)| at >= note_cut);
            n += q.len();
            !q.is_empty()
        });
        self.n_reads = n;
        self.probation.retain(|e| e.4 >= note_cut);
        let forwarded = &mut self.forwarded;
        self.links.retain(|_, (link, at)| {
            let keep = *at >= note_cut;
            if !keep {
                forwarded.remove(&link.client);
            }
            keep
        });
    }

    /// Records waiting for a partner.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }
}

fn release(h: Held, out: &mut dyn FnMut(RequestRecord)) {
    match h {
        Held::App(r, _) | Held::Sidecar(r) => out(*r),
    }
}

/// One record from the sidecar's (`front`) and the app's (`app`) records of a request: what
/// the request is and how the app served it from `app`; where it came from, when the sidecar
/// got it and when the client got each token from `front`.
fn merge(front: RequestRecord, app: RequestRecord, link: &Link) -> RequestRecord {
    let mut r = app;
    let f = &front.timestamps;
    for t in [
        Ts::Syn,
        Ts::Established,
        Ts::Accepted,
        Ts::NodeIn,
        Ts::NatDone,
        Ts::PodIn,
        Ts::PodOut,
        Ts::NodeOut,
    ] {
        match f.get(t) {
            Some(v) => r.timestamps.set(t, v),
            None => r.timestamps.clear(t),
        }
    }
    for (from, to) in [
        (Ts::SockQueued, Ts::SidecarQueued),
        (Ts::ReadFirst, Ts::SidecarRead),
        (Ts::Token1, Ts::SidecarToken1),
        (Ts::RespLast, Ts::SidecarLast),
    ] {
        if let Some(v) = f.get(from) {
            r.timestamps.set(to, v);
        }
    }
    r.timestamps.set(Ts::SidecarWrite, link.written);
    r.sidecar = Some(SidecarInfo {
        pid: link.sidecar_tgid,
        comm: front.comm.clone(),
        upstream: r.src.map(|a| a.to_string()).unwrap_or_default(),
        outbound_first_token_ms: None,
    });
    r.src = front.src;
    r.dst = front.dst;
    r.aborted |= front.aborted;
    r.streaming |= front.streaming;
    r.request_bytes = front.request_bytes;
    r.response_bytes = front.response_bytes;
    // What the client saw: the sidecar's token writes.
    if !front.token_ns.is_empty() {
        r.token_ns = front.token_ns;
    }
    r.finish(front.first_on_conn);
    r
}

/// Bytes at each end of a body that the fingerprint covers. The kernel side copies the first
/// 4 KiB and the last 512 B of every syscall, so both ends of a body are always seen.
const FP_EDGE: usize = 256;

/// Content fingerprint of one request: method, body length, and the first and last
/// `FP_EDGE` bytes of the decoded body. The same request read by a sidecar and by the app
/// behind it gets the same fingerprint, however the two were split into syscalls.
#[derive(Clone)]
pub(crate) struct Fingerprint {
    head: u64,
    head_len: usize,
    len: u64,
    tail: [u8; FP_EDGE],
    tail_len: usize,
    tail_pos: usize,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint {
            head: FNV_OFFSET,
            head_len: 0,
            len: 0,
            tail: [0; FP_EDGE],
            tail_len: 0,
            tail_pos: 0,
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

impl Fingerprint {
    /// Starts a request; a request without a body is fingerprinted by method and path.
    pub(crate) fn start(&mut self, method: &str, path: &str, has_body: bool) {
        *self = Fingerprint::default();
        self.head = fnv(self.head, method.as_bytes());
        if !has_body {
            self.head = fnv(self.head, path.as_bytes());
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        if self.len < FP_EDGE as u64 && self.head_len == self.len as usize {
            let n = (FP_EDGE - self.head_len).min(data.len());
            self.head = fnv(self.head, &data[..n]);
            self.head_len += n;
        }
        self.len += data.len() as u64;
        let keep = &data[data.len().saturating_sub(FP_EDGE)..];
        for &b in keep {
            self.tail[self.tail_pos] = b;
            self.tail_pos = (self.tail_pos + 1) % FP_EDGE;
        }
        self.tail_len = (self.tail_len + keep.len()).min(FP_EDGE);
    }

    /// `n` body bytes the kernel did not copy.
    pub(crate) fn gap(&mut self, n: u64) {
        self.len += n;
        self.tail_len = 0;
        self.tail_pos = 0;
    }

    pub(crate) fn finish(&self) -> u64 {
        let mut h = fnv(self.head, &self.len.to_le_bytes());
        let start = (self.tail_pos + FP_EDGE - self.tail_len) % FP_EDGE;
        for i in 0..self.tail_len {
            h = fnv(h, &[self.tail[(start + i) % FP_EDGE]]);
        }
        h
    }
}
