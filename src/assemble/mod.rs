//! Request assembler: turns the traced socket syscalls of HTTP/1.1 servers into one
//! `RequestRecord` per request. Owns the public API and the connection table (bounded, least
//! recently active evicted first); the per-connection state machine is in `conn`, the wire
//! formats in `http`, `sse` and `scan`. Pure and root-free: it only sees `SockEvent`s.

pub mod arm;
mod body;
mod conn;
#[doc(hidden)]
pub mod fuzz;
mod http;
mod scan;
mod sidecar;
mod sse;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_edge;
#[cfg(test)]
mod tests_sidecar;
#[cfg(test)]
mod tests_stream;
#[cfg(test)]
mod tests_tokens;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::event::{EventKind, SockEvent};
use crate::record::RequestRecord;

pub use arm::StreamArm;
use conn::{Conn, Sink};
pub use sidecar::JoinStats;
use sidecar::Joiner;

#[derive(Debug, Clone)]
pub struct AssemblerConfig {
    /// Connections tracked at once; past that the least recently active is evicted.
    pub max_conns: usize,
    /// A connection without events for this long is finalised by `expire`.
    pub idle_timeout_ns: u64,
    /// Longest request or response head accepted.
    pub max_head_bytes: usize,
    /// Arm streamed responses so that the kernel counts their token writes: the caller then
    /// takes the arms (`take_arms`) after each batch of events and writes them to the kernel.
    pub arm_streams: bool,
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        AssemblerConfig {
            max_conns: 65536,
            idle_timeout_ns: 300_000_000_000,
            max_head_bytes: 16384,
            arm_streams: false,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct AssemblerStats {
    /// Records handed out, aborted ones included.
    pub requests: u64,
    /// Of those, the aborted ones.
    pub aborted: u64,
    pub conns_active: u64,
    /// Connections dropped because the table was full.
    pub conns_evicted: u64,
    /// Connections given up on, by reason (index with `UnparsedReason as usize`).
    pub unparsed: [u64; UnparsedReason::COUNT],
    /// The sidecar join's counters.
    pub sidecar: JoinStats,
    /// Responses whose connection was armed for counting token writes in the kernel.
    pub streams_armed: u64,
    /// Token writes the kernel counted (received in token records).
    pub token_writes: u64,
    /// Of those, writes whose record did not continue a streamed response at an event
    /// boundary (taken as a gap), or came for a connection not followed.
    pub token_writes_misplaced: u64,
}

/// Why a connection's traffic could not be assembled into requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnparsedReason {
    NotHttp,
    Http2,
    Tls,
    HeaderTooLarge,
    MalformedRequest,
    MalformedResponse,
    ChunkedFraming,
    /// Bytes that mattered (a head, chunk framing) were not copied by the kernel side.
    Truncated,
}

impl UnparsedReason {
    pub const COUNT: usize = 8;
    pub const ALL: [UnparsedReason; UnparsedReason::COUNT] = [
        UnparsedReason::NotHttp,
        UnparsedReason::Http2,
        UnparsedReason::Tls,
        UnparsedReason::HeaderTooLarge,
        UnparsedReason::MalformedRequest,
        UnparsedReason::MalformedResponse,
        UnparsedReason::ChunkedFraming,
        UnparsedReason::Truncated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnparsedReason::NotHttp => "not_http",
            UnparsedReason::Http2 => "http2",
            UnparsedReason::Tls => "tls",
            UnparsedReason::HeaderTooLarge => "header_too_large",
            UnparsedReason::MalformedRequest => "malformed_request",
            UnparsedReason::MalformedResponse => "malformed_response",
            UnparsedReason::ChunkedFraming => "chunked_framing",
            UnparsedReason::Truncated => "truncated",
        }
    }
}

/// Sock ids are kernel pointers (aligned, so low bits are constant): mix them fully, cheaply.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

const NIL: u32 = u32::MAX;

/// A connection in the slab, linked into the recency list (newest at `newest`).
struct Slot {
    conn: Conn,
    sock_id: u64,
    last_active: u64,
    prev: u32,
    next: u32,
}

pub struct Assembler {
    cfg: AssemblerConfig,
    stats: AssemblerStats,
    next_id: u64,
    map: HashMap<u64, u32, BuildHasherDefault<IdHasher>>,
    /// Slots are reused with their buffers, so steady-state traffic allocates no memory.
    slots: Vec<Slot>,
    free: Vec<u32>,
    newest: u32,
    oldest: u32,
    joiner: Joiner,
    arms: Vec<StreamArm>,
    /// Connections already given an arm in this `take_arms` (kept between calls: no allocation).
    arms_taken: HashSet<u64, BuildHasherDefault<IdHasher>>,
}

impl Assembler {
    pub fn new(cfg: AssemblerConfig) -> Self {
        Assembler {
            cfg,
            stats: AssemblerStats::default(),
            next_id: 0,
            map: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
            joiner: Joiner::default(),
            arms: Vec::new(),
            arms_taken: HashSet::default(),
        }
    }

    /// Connections to arm (`StreamArm`) since the last call: the kernel's map is the caller's.
    /// At most `ARMS_PENDING` wait; past that, responses go unarmed (their writes stay events).
    /// An arm outlives its response (the next ones on the connection are counted from their
    /// first token), so one whose response already ended is kept while its connection is open;
    /// that of a connection closed since is dropped (a syscall and a map entry for nothing), and
    /// of several for one connection (responses within one batch) only the last is given.
    pub fn take_arms(&mut self) -> impl Iterator<Item = StreamArm> + '_ {
        let (map, taken) = (&self.map, &mut self.arms_taken);
        taken.clear();
        self.arms.reverse();
        self.arms
            .drain(..)
            .filter(move |a| map.contains_key(&a.sock_id) && taken.insert(a.sock_id))
    }

    pub fn stats(&self) -> &AssemblerStats {
        &self.stats
    }

    /// Feed one event; completed (or aborted) requests are handed to `out` in completion order.
    pub fn on_event(&mut self, ev: &SockEvent<'_>, out: &mut dyn FnMut(RequestRecord)) {
        let known = self.map.get(&ev.sock_id).copied();
        let idx = match (ev.kind, known) {
            (EventKind::Close, Some(idx)) => {
                self.map.remove(&ev.sock_id);
                self.with_sink(idx, out, |c, s| c.close(s));
                self.release(idx);
                self.stats.conns_active = self.map.len() as u64;
                return;
            }
            (EventKind::Close, None) => return,
            // Counted writes of a connection we do not follow: nothing to add them to.
            (EventKind::Tokens, None) => {
                let writes = ev.token_starts().len() as u64;
                self.stats.token_writes += writes;
                self.stats.token_writes_misplaced += writes;
                return;
            }
            (EventKind::Accept, _) if ev.ret < 0 => return,
            (EventKind::Accept, Some(idx)) => {
                // The kernel reused the socket: whatever the old one had in flight is lost.
                self.with_sink(idx, out, |c, s| c.abort(s));
                self.slots[idx as usize].conn.open(ev, true);
                idx
            }
            (EventKind::Accept, None) => self.insert(ev, true, out),
            (_, Some(idx)) => idx,
            // An error or EOF tells nothing about a connection we do not know.
            (_, None) if ev.ret <= 0 => return,
            (_, None) => self.insert(ev, false, out),
        };
        self.touch(idx, ev.ts_exit.max(ev.ts_enter));
        if matches!(
            ev.kind,
            EventKind::Read | EventKind::Write | EventKind::Tokens
        ) {
            let cfg = &self.cfg;
            let mut sink = Sink {
                out,
                next_id: &mut self.next_id,
                stats: &mut self.stats,
                joiner: &mut self.joiner,
                arms: cfg.arm_streams.then_some(&mut self.arms),
            };
            let conn = &mut self.slots[idx as usize].conn;
            if ev.kind == EventKind::Tokens {
                conn.on_tokens(ev, &mut sink);
            } else {
                conn.on_io(ev, cfg, &mut sink);
            }
            self.stats.sidecar = self.joiner.stats.clone();
        }
        self.stats.conns_active = self.map.len() as u64;
    }

    /// Finalise connections idle since before now_ns - idle_timeout (in-flight requests →
    /// aborted records), free them.
    pub fn expire(&mut self, now_ns: u64, out: &mut dyn FnMut(RequestRecord)) {
        let cutoff = now_ns.saturating_sub(self.cfg.idle_timeout_ns);
        while self.oldest != NIL {
            let idx = self.oldest;
            let slot = &self.slots[idx as usize];
            if slot.last_active >= cutoff {
                break;
            }
            self.map.remove(&slot.sock_id);
            self.with_sink(idx, out, |c, s| c.abort(s));
            self.release(idx);
        }
        self.joiner.expire(now_ns, out);
        self.stats.sidecar = self.joiner.stats.clone();
        self.stats.conns_active = self.map.len() as u64;
    }

    /// Records waiting for their sidecar partner (see `sidecar`).
    pub fn held(&self) -> usize {
        self.joiner.held()
    }

    fn with_sink(
        &mut self,
        idx: u32,
        out: &mut dyn FnMut(RequestRecord),
        f: impl FnOnce(&mut Conn, &mut Sink<'_>),
    ) {
        let mut sink = Sink {
            out,
            next_id: &mut self.next_id,
            stats: &mut self.stats,
            joiner: &mut self.joiner,
            arms: None,
        };
        f(&mut self.slots[idx as usize].conn, &mut sink);
    }

    fn insert(
        &mut self,
        ev: &SockEvent<'_>,
        accepted: bool,
        out: &mut dyn FnMut(RequestRecord),
    ) -> u32 {
        if self.map.len() >= self.cfg.max_conns.max(1) && self.oldest != NIL {
            let idx = self.oldest;
            self.map.remove(&self.slots[idx as usize].sock_id);
            self.with_sink(idx, out, |c, s| c.abort(s));
            self.release(idx);
            self.stats.conns_evicted += 1;
        }
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.slots.push(Slot {
                    conn: Conn::new(),
                    sock_id: 0,
                    last_active: 0,
                    prev: NIL,
                    next: NIL,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.sock_id = ev.sock_id;
        slot.last_active = 0;
        slot.conn.open(ev, accepted);
        self.link_newest(idx);
        self.map.insert(ev.sock_id, idx);
        idx
    }

    fn release(&mut self, idx: u32) {
        self.unlink(idx);
        self.slots[idx as usize].conn.release();
        self.free.push(idx);
    }

    fn touch(&mut self, idx: u32, ts: u64) {
        let slot = &mut self.slots[idx as usize];
        slot.last_active = slot.last_active.max(ts);
        if self.newest != idx {
            self.unlink(idx);
            self.link_newest(idx);
        }
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let s = &self.slots[idx as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.newest = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.oldest = prev,
            n => self.slots[n as usize].prev = prev,
        }
        let s = &mut self.slots[idx as usize];
        s.prev = NIL;
        s.next = NIL;
    }

    /// `prev` points to newer slots, `next` to older ones.
    fn link_newest(&mut self, idx: u32) {
        let old = self.newest;
        {
            let s = &mut self.slots[idx as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.oldest = idx,
            o => self.slots[o as usize].prev = idx,
        }
        self.newest = idx;
    }
}
