//! Per-connection state machine: request side (reads) and response side (writes) of one
//! server-side HTTP/1.x connection, the FIFO pairing them, and turning each request into a
//! `RequestRecord` when its response completes or the connection fails.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use crate::event::{EventKind, Inside, NetStamps, SockEvent};
use crate::record::{RequestRecord, Ts};

use super::arm::StreamArm;
use super::body::Body;
use super::http::{self, Class, HeadBuf};
use super::scan::{self, KeyScan};
use super::sidecar::{Fingerprint, Joiner};
use super::sse::Sse;
use super::{AssemblerConfig, AssemblerStats, UnparsedReason};

mod read;
mod write;

/// Requests read but not yet answered; HTTP/1.1 clients pipeline a handful at most.
const FIFO_MAX: usize = 64;
/// Token timestamps kept per record (the count and the last one are kept regardless).
const TOKENS_MAX: usize = 1 << 17;
const PATH_MAX: usize = 256;
/// The most packed token-time bytes reserved for a response from its connection's last one
/// (4,000–5,000 tokens at 3–4 bytes a token): longer ones grow their vector past it.
const TOKEN_BYTES_KEPT: usize = 16 * 1024;
/// Reads of a connection that predates us which may be skipped as mid-request before its
/// traffic is declared not HTTP.
const RESYNC_READS: u8 = 32;

/// Where records go, with the counters they move.
pub(crate) struct Sink<'a> {
    pub(crate) out: &'a mut dyn FnMut(RequestRecord),
    pub(crate) next_id: &'a mut u64,
    pub(crate) stats: &'a mut AssemblerStats,
    pub(crate) joiner: &'a mut Joiner,
    /// Connections to arm for counting token writes in the kernel; None: do not arm.
    pub(crate) arms: Option<&'a mut Vec<StreamArm>>,
}

impl Sink<'_> {
    fn emit(&mut self, rec: RequestRecord) {
        self.joiner
            .on_record(rec, &mut *self.out, &mut self.stats.requests);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing classified yet.
    Fresh,
    Http,
    /// The process writes requests here: the client side of a connection (a sidecar's or
    /// gateway's upstream). Its requests are parsed from the writes, for the sidecar join.
    Client,
    /// Not ours (unparsed, client side, upgraded, failed): wait for close or a new accept.
    Ignored,
}

/// The facts of one syscall that end up in records.
struct Io {
    enter: u64,
    exit: u64,
    queued: Option<u64>,
    net: NetStamps,
    tgid: u32,
    cgroup: u64,
    /// The kernel's cumulative counters as the syscall returned.
    inside: Inside,
}

/// The start of a request whose head is still arriving.
#[derive(Clone, Copy)]
struct Start {
    read_first: u64,
    queued: Option<u64>,
    /// Packet-path stamps of the request's first packet (from the read of its first byte).
    net: NetStamps,
    bytes: u64,
    tgid: u32,
    cgroup: u64,
    first_on_conn: bool,
}

/// A request whose head was read, waiting for (the rest of) its response.
struct Pending {
    seq: u64,
    rec: RequestRecord,
    first_on_conn: bool,
    head_method: bool,
    connect: bool,
    completion_tokens: Option<u32>,
    token_last: Option<u64>,
}

impl Pending {
    fn token(&mut self, ts: u64, inside: Inside) {
        // Writes of one connection are serialised; clamping only guards against clock skew
        // between CPUs so that ITLs never go negative.
        let ts = ts.max(self.token_last.unwrap_or(0));
        if self.rec.token_ns.len() < TOKENS_MAX {
            self.rec.token_ns.push(ts);
        }
        self.rec.timestamps.set_first(Ts::Token1, ts);
        self.rec.marks.token1.get_or_insert(inside);
        self.token_last = Some(ts);
        self.rec.output_events = self.rec.output_events.saturating_add(1);
    }

    fn model_fallback(&mut self, raw: &[u8]) {
        if self.rec.model.is_none() {
            self.rec.model = scan::model_name(raw);
        }
    }
}

enum ReqState {
    Head,
    Body { body: Body, seq: u64 },
}

enum RespState {
    Head,
    Body(Body),
    /// A gap hid chunk framing: count bytes and look for framing again at a write start.
    Lost,
}

struct Ident {
    sock_id: u64,
    local: SocketAddr,
    remote: SocketAddr,
    comm: [u8; 16],
    comm_len: usize,
}

pub(crate) struct Conn {
    ident: Ident,
    mode: Mode,
    accepted: Option<u64>,
    /// The handshake's stamps, from the accept event.
    handshake: NetStamps,
    /// Reads still allowed to be skipped while waiting for one that starts a request.
    resync: u8,
    seen_request: bool,
    next_seq: u64,
    req: ReqState,
    req_head: HeadBuf,
    start: Option<Start>,
    model_scan: KeyScan,
    fifo: VecDeque<Pending>,
    resp: RespState,
    resp_head: HeadBuf,
    resp_head_ts: u64,
    sse: Sse,
    body_scan: KeyScan,
    /// Content fingerprint of the request being read.
    fp: Fingerprint,
    /// Requests before this index were handed to the joiner.
    noted_seq: u64,
    arm: ArmState,
    /// The packed size of the token times of the last response this slot completed (its
    /// connection's, or on a reused slot the previous connection's, likely to the same
    /// server): a streamed response reserves that and an eighth more when its head arrives,
    /// so that like responses grow no vector token by token. Capped (TOKEN_BYTES_KEPT);
    /// `finish` trims what a shorter one leaves unused.
    token_bytes: usize,
}

/// Arming the kernel for the current response (arm.rs).
#[derive(Default)]
struct ArmState {
    /// Whole token events that gave no template.
    tries: u8,
    /// Armed, or given up on, for this response.
    done: bool,
}

fn unspecified(a: &SocketAddr) -> bool {
    a.ip().is_unspecified() && a.port() == 0
}

/// Transient results of non-blocking or interrupted syscalls (EINTR, EAGAIN, ENOMEM,
/// ENOBUFS, and the kernel's restart codes, which a sys_exit tracepoint can see).
fn hard_error(ret: i64) -> bool {
    !matches!(ret.unsigned_abs(), 4 | 11 | 12 | 105 | 512..=516)
}

fn path_string(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(&p[..p.len().min(PATH_MAX * 4)]);
    match s.char_indices().nth(PATH_MAX) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.into_owned(),
    }
}

impl Conn {
    pub(crate) fn new() -> Conn {
        let none = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        Conn {
            ident: Ident {
                sock_id: 0,
                local: none,
                remote: none,
                comm: [0; 16],
                comm_len: 0,
            },
            mode: Mode::Fresh,
            accepted: None,
            handshake: NetStamps::default(),
            resync: 0,
            seen_request: false,
            next_seq: 0,
            req: ReqState::Head,
            req_head: HeadBuf::default(),
            start: None,
            model_scan: KeyScan::default(),
            fifo: VecDeque::new(),
            resp: RespState::Head,
            resp_head: HeadBuf::default(),
            resp_head_ts: 0,
            sse: Sse::default(),
            body_scan: KeyScan::default(),
            fp: Fingerprint::default(),
            noted_seq: 0,
            arm: ArmState::default(),
            token_bytes: 0,
        }
    }

    /// Starts tracking a connection from its first event, reusing this slot's buffers.
    pub(crate) fn open(&mut self, ev: &SockEvent<'_>, accepted: bool) {
        self.clear();
        self.mode = Mode::Fresh;
        self.accepted = accepted.then_some(ev.ts_exit);
        self.handshake = if accepted {
            ev.net
        } else {
            NetStamps::default()
        };
        self.resync = if accepted { 0 } else { RESYNC_READS };
        self.seen_request = false;
        self.next_seq = 0;
        self.noted_seq = 0;
        self.ident.sock_id = ev.sock_id;
        self.ident.local = ev.local;
        self.ident.remote = ev.remote;
        self.set_comm(ev.comm);
    }

    /// Gives back large buffers before the slot waits on the free list.
    pub(crate) fn release(&mut self) {
        self.clear();
        self.req_head.release();
        self.resp_head.release();
        self.fifo.shrink_to(4);
    }

    fn clear(&mut self) {
        self.req = ReqState::Head;
        self.req_head.clear();
        self.start = None;
        self.model_scan.reset();
        self.fifo.clear();
        self.reset_response();
    }

    fn reset_response(&mut self) {
        self.resp = RespState::Head;
        self.resp_head.clear();
        self.sse.reset();
        self.body_scan.reset();
        self.arm = ArmState::default();
    }

    fn set_comm(&mut self, comm: &str) {
        let n = comm.len().min(16);
        self.ident.comm[..n].copy_from_slice(&comm.as_bytes()[..n]);
        self.ident.comm_len = n;
    }

    /// The connection closed: a close-delimited response is complete, the rest is aborted.
    pub(crate) fn close(&mut self, sink: &mut Sink<'_>) {
        self.end(true, sink);
    }

    /// The connection is gone without a proper end (error, eviction, expiry, reuse).
    pub(crate) fn abort(&mut self, sink: &mut Sink<'_>) {
        self.end(false, sink);
    }

    fn end(&mut self, clean: bool, sink: &mut Sink<'_>) {
        if self.mode == Mode::Http {
            if clean && matches!(self.resp, RespState::Body(Body::Close)) {
                if let Some(p) = self.fifo.pop_front() {
                    emit(&self.ident, p, false, sink);
                }
            }
            while let Some(p) = self.fifo.pop_front() {
                emit(&self.ident, p, true, sink);
            }
            if let Some(st) = self.start.take().filter(|s| s.bytes > 0) {
                let p = self.partial(st);
                emit(&self.ident, p, true, sink);
            }
        }
        self.mode = Mode::Ignored;
        self.clear();
    }

    /// A request cut short inside its head: keep what its request line says, if complete.
    fn partial(&mut self, st: Start) -> Pending {
        let head = self.req_head.bytes();
        let line = memchr::memchr(b'\n', head)
            .map(|i| head[..i].strip_suffix(b"\r").unwrap_or(&head[..i]));
        let (method, path) = match line.and_then(http::request_line) {
            Some((m, p)) => (
                Some(String::from_utf8_lossy(m).into_owned()),
                Some(path_string(p)),
            ),
            None => (None, None),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending(seq, st, method, path, false, false)
    }

    fn pending(
        &self,
        seq: u64,
        st: Start,
        method: Option<String>,
        path: Option<String>,
        head: bool,
        connect: bool,
    ) -> Pending {
        let mut rec = RequestRecord {
            pid: st.tgid,
            cgroup_id: st.cgroup,
            method,
            path,
            request_bytes: st.bytes,
            ..Default::default()
        };
        rec.timestamps.set(Ts::ReadFirst, st.read_first);
        if let Some(q) = st.queued {
            rec.timestamps.set(Ts::SockQueued, q);
        }
        if let (true, Some(a)) = (st.first_on_conn, self.accepted) {
            rec.timestamps.set(Ts::Accepted, a);
            // The handshake precedes the accept; anything later is a stale flow entry.
            for (t, v) in [
                (Ts::Syn, self.handshake.syn),
                (Ts::Established, self.handshake.established),
            ] {
                if let Some(v) = v.filter(|&v| v <= a) {
                    rec.timestamps.set(t, v);
                }
            }
        }
        // The request's first packet at each hop: only stamps taken before the server read it,
        // in path order, belong to this request.
        let mut bound = st.queued.unwrap_or(st.read_first).min(st.read_first);
        for (t, v) in [
            (Ts::PodIn, st.net.pod_in),
            (Ts::NatDone, st.net.nat_done),
            (Ts::NodeIn, st.net.node_in),
        ] {
            if let Some(v) = v.filter(|&v| v <= bound) {
                rec.timestamps.set(t, v);
                bound = v;
            }
        }
        Pending {
            seq,
            rec,
            first_on_conn: st.first_on_conn,
            head_method: head,
            connect,
            completion_tokens: None,
            token_last: None,
        }
    }

    /// Counts the connection as unparsed once and stops following it, without records.
    fn fail(&mut self, why: UnparsedReason, sink: &mut Sink<'_>) {
        sink.stats.unparsed[why as usize] += 1;
        self.mode = Mode::Ignored;
        self.clear();
    }

    pub(crate) fn on_io(&mut self, ev: &SockEvent<'_>, cfg: &AssemblerConfig, sink: &mut Sink<'_>) {
        if self.mode == Mode::Ignored {
            return;
        }
        if ev.ret < 0 {
            if hard_error(ev.ret) {
                self.abort(sink);
            }
            return;
        }
        let len = ev.len();
        if len == 0 {
            return;
        }
        // head and tail may overlap when the payload is short; keep each byte once.
        let head = &ev.head[..(ev.head.len() as u64).min(len) as usize];
        let rest = len - head.len() as u64;
        let tail_n = (ev.tail.len() as u64).min(rest) as usize;
        let tail = &ev.tail[ev.tail.len() - tail_n..];
        let gap = rest - tail_n as u64;
        if unspecified(&self.ident.remote) {
            self.ident.remote = ev.remote;
            self.ident.local = ev.local;
        }
        self.set_comm(ev.comm);
        let io = Io {
            enter: ev.ts_enter,
            exit: ev.ts_exit,
            queued: ev.queued_ts,
            net: ev.net,
            tgid: ev.tgid,
            cgroup: ev.cgroup_id,
            inside: ev.inside,
        };
        match ev.kind {
            EventKind::Read if self.mode == Mode::Client => {}
            EventKind::Read => {
                if self.joined_mid_request(head) {
                    return;
                }
                self.read(head, &io, cfg, sink);
                if gap > 0 {
                    self.read_gap(gap, &io, sink);
                }
                self.read(tail, &io, cfg, sink);
                self.note_requests(sink);
            }
            EventKind::Write => {
                // A process that writes a request first is the client here (an upstream call):
                // parse what it writes as requests, stamped when the write began.
                if self.mode == Mode::Fresh
                    && self.start.is_none()
                    && http::classify(head) == Class::Http1
                {
                    self.mode = Mode::Client;
                }
                if self.mode == Mode::Client {
                    let io = Io {
                        exit: io.enter,
                        ..io
                    };
                    self.read(head, &io, cfg, sink);
                    if gap > 0 {
                        self.read_gap(gap, &io, sink);
                    }
                    self.read(tail, &io, cfg, sink);
                    return self.note_requests(sink);
                }
                let whole = gap == 0 && tail.is_empty();
                self.write(head, (true, whole), &io, cfg, sink);
                if gap > 0 {
                    self.write_gap(gap, &io, sink);
                }
                self.write(tail, (false, true), &io, cfg, sink);
            }
            EventKind::Accept | EventKind::Close | EventKind::Tokens => {}
        }
    }

    /// Hands requests read completely since the last call to the joiner: as requests the
    /// server read, or (client side) as requests this process forwarded.
    fn note_requests(&mut self, sink: &mut Sink<'_>) {
        let client = self.mode == Mode::Client;
        let from = self.noted_seq;
        for p in self.fifo.iter().filter(|p| p.seq >= from) {
            if p.rec.timestamps.get(Ts::ReadDone).is_none() {
                break;
            }
            self.noted_seq = p.seq + 1;
            let read_first = p.rec.timestamps.get(Ts::ReadFirst).unwrap_or(0);
            if client {
                sink.joiner.note_forward(
                    p.rec.pid,
                    p.rec.fingerprint,
                    (self.ident.local, self.ident.remote),
                    p.seq,
                    read_first,
                );
            } else {
                sink.joiner.note_read(
                    p.rec.pid,
                    p.rec.fingerprint,
                    (self.ident.sock_id, p.seq),
                    read_first,
                );
            }
        }
        if client {
            // Nothing answers these here: keep only the request still being written.
            while self.fifo.front().is_some_and(|p| p.seq < self.noted_seq) {
                self.fifo.pop_front();
            }
        }
    }

    /// A connection opened before the agent may be in the middle of a request body: skip
    /// such reads (a few) instead of writing the connection off until it closes.
    fn joined_mid_request(&mut self, head: &[u8]) -> bool {
        if self.mode != Mode::Fresh || self.start.is_some() || self.resync == 0 {
            return false;
        }
        let from = head
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let start = &head[from..head.len().min(from + http::CLASSIFY_LEN)];
        if start.is_empty() || http::classify(start) != Class::NotHttp {
            return false;
        }
        self.resync -= 1;
        true
    }
}

fn emit(id: &Ident, p: Pending, aborted: bool, sink: &mut Sink<'_>) {
    let mut rec = p.rec;
    *sink.next_id += 1;
    rec.id = *sink.next_id;
    rec.aborted = aborted;
    rec.comm = String::from_utf8_lossy(&id.comm[..id.comm_len]).into_owned();
    rec.src = Some(id.remote);
    rec.dst = Some(id.local);
    rec.sock_id = id.sock_id;
    rec.conn_addrs = Some((id.local, id.remote));
    rec.conn_seq = p.seq;
    if let Some(t) = p.token_last {
        rec.timestamps.set(Ts::TokenN, t);
    }
    rec.output_tokens = p
        .completion_tokens
        .or(rec.streaming.then_some(rec.output_events));
    rec.finish(p.first_on_conn);
    sink.stats.requests += 1;
    if aborted {
        sink.stats.aborted += 1;
    }
    sink.emit(rec);
}

/// The response's last byte left the server in this write: resp_last (when the server issued
/// it, like every other write stamp), and where the packets that carried it were seen leaving
/// the pod and the node (stamps older than the write belong to an earlier response: dropped).
fn set_resp_last(rec: &mut RequestRecord, io: &Io) {
    rec.timestamps.set(Ts::RespLast, io.enter);
    rec.marks.last = Some(io.inside);
    let mut bound = io.enter;
    for (t, v) in [(Ts::PodOut, io.net.pod_out), (Ts::NodeOut, io.net.node_out)] {
        if let Some(v) = v.filter(|&v| v >= bound) {
            rec.timestamps.set(t, v);
            bound = v;
        }
    }
}
