//! The request side of a connection: what the server reads. Classifies the connection,
//! accumulates and parses request heads, frames request bodies and scans them for `model`.

use super::super::body::Body;
use super::super::http::{self, Class, Framing, HeadStep};
use super::super::scan::{self, Hit};
use super::super::sidecar::Fingerprint;
use super::super::{AssemblerConfig, UnparsedReason};
use super::{path_string, Conn, Io, Mode, Pending, ReqState, Sink, Start, FIFO_MAX};
use crate::record::Ts;

impl Conn {
    pub(super) fn read(
        &mut self,
        mut data: &[u8],
        io: &Io,
        cfg: &AssemblerConfig,
        sink: &mut Sink<'_>,
    ) {
        while !data.is_empty() && self.mode != Mode::Ignored {
            match &mut self.req {
                ReqState::Head => {
                    if self.start.is_none() {
                        // Blank lines before a request line are allowed (RFC 9112 §2.2).
                        let n = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        data = &data[n..];
                        if data.is_empty() {
                            return;
                        }
                        self.start = Some(Start {
                            read_first: io.exit,
                            queued: io.queued.filter(|&q| q <= io.exit),
                            net: io.net,
                            bytes: 0,
                            tgid: io.tgid,
                            cgroup: io.cgroup,
                            first_on_conn: self.accepted.is_some() && !self.seen_request,
                        });
                        self.seen_request = true;
                    }
                    if self.mode == Mode::Fresh {
                        let mut p = [0u8; http::CLASSIFY_LEN];
                        let have = self.req_head.bytes();
                        let a = have.len().min(p.len());
                        p[..a].copy_from_slice(&have[..a]);
                        let b = data.len().min(p.len() - a);
                        p[a..a + b].copy_from_slice(&data[..b]);
                        let why = match http::classify(&p[..a + b]) {
                            Class::Need => None,
                            Class::Http1 => {
                                self.mode = Mode::Http;
                                None
                            }
                            Class::Http2 => Some(UnparsedReason::Http2),
                            Class::Tls => Some(UnparsedReason::Tls),
                            Class::NotHttp => Some(UnparsedReason::NotHttp),
                        };
                        if let Some(why) = why {
                            return self.fail(why, sink);
                        }
                    }
                    let Some(start) = self.start.as_mut() else {
                        return;
                    };
                    match self.req_head.feed(data, cfg.max_head_bytes) {
                        HeadStep::Need => {
                            start.bytes += data.len() as u64;
                            return;
                        }
                        HeadStep::TooLarge => {
                            return self.fail(UnparsedReason::HeaderTooLarge, sink)
                        }
                        HeadStep::Done(n) => {
                            start.bytes += n as u64;
                            let head = if self.req_head.is_empty() {
                                &data[..n]
                            } else {
                                self.req_head.bytes()
                            };
                            let parsed = http::parse_request(head).map(|h| {
                                let m = String::from_utf8_lossy(h.method).into_owned();
                                (m, path_string(h.path), h.framing)
                            });
                            self.req_head.clear();
                            data = &data[n..];
                            match parsed {
                                Some((m, p, framing)) => self.head_done(m, p, framing, io, sink),
                                None => return self.fail(UnparsedReason::MalformedRequest, sink),
                            }
                        }
                    }
                }
                ReqState::Body { body, seq } => {
                    let Ok(st) = body.step(data) else {
                        return self.fail(UnparsedReason::ChunkedFraming, sink);
                    };
                    let seq = *seq;
                    let mut owner = self.fifo.back_mut().filter(|p| p.seq == seq);
                    self.fp.feed(st.data);
                    if let Some(p) = owner.as_deref_mut() {
                        p.rec.request_bytes =
                            p.rec.request_bytes.saturating_add(st.consumed as u64);
                        if p.rec.model.is_none() && !st.data.is_empty() {
                            self.model_scan.feed(st.data, &mut |h| {
                                if let (Hit::Model(m), None) = (h, &p.rec.model) {
                                    p.rec.model = scan::model_name(m);
                                }
                            });
                        }
                    }
                    data = &data[st.consumed..];
                    if st.done {
                        if let Some(p) = owner {
                            read_done(p, io, &self.fp);
                        }
                        self.req = ReqState::Head;
                        self.model_scan.reset();
                    }
                }
            }
        }
    }

    fn head_done(
        &mut self,
        method: String,
        path: String,
        framing: Framing,
        io: &Io,
        sink: &mut Sink<'_>,
    ) {
        let Some(st) = self.start.take() else { return };
        if self.fifo.len() >= FIFO_MAX {
            return self.abort(sink);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let (head, connect) = (method == "HEAD", method == "CONNECT");
        let body = Body::new(framing);
        self.fp.start(&method, &path, body.is_some());
        let mut p = self.pending(seq, st, Some(method), Some(path), head, connect);
        match body {
            None => read_done(&mut p, io, &self.fp),
            Some(body) => {
                self.req = ReqState::Body { body, seq };
                self.model_scan.reset();
            }
        }
        self.fifo.push_back(p);
    }

    pub(super) fn read_gap(&mut self, n: u64, io: &Io, sink: &mut Sink<'_>) {
        if self.mode == Mode::Ignored {
            return;
        }
        let ReqState::Body { body, seq } = &mut self.req else {
            return self.fail(UnparsedReason::Truncated, sink);
        };
        let Ok((used, done)) = body.skip(n) else {
            return self.fail(UnparsedReason::Truncated, sink);
        };
        let seq = *seq;
        self.model_scan.reset();
        self.fp.gap(used);
        let owner = self.fifo.back_mut().filter(|p| p.seq == seq);
        if let Some(p) = owner {
            p.rec.request_bytes = p.rec.request_bytes.saturating_add(used);
            if done {
                read_done(p, io, &self.fp);
            }
        }
        if done {
            self.req = ReqState::Head;
            // The rest of the gap hides the next request's head.
            if used < n {
                self.fail(UnparsedReason::Truncated, sink);
            }
        }
    }
}

/// The request's last byte was read by `io`: read_done, its content fingerprint, and when its
/// last bytes reached the socket (the latest arrival before that read returned, when it is
/// after the first bytes' arrival: a request that came in several pieces).
fn read_done(p: &mut Pending, io: &Io, fp: &Fingerprint) {
    let ts = &mut p.rec.timestamps;
    ts.set(Ts::ReadDone, io.exit);
    p.rec.marks.read_done = Some(io.inside);
    p.rec.fingerprint = fp.finish();
    let first = ts.get(Ts::SockQueued).or(ts.get(Ts::ReadFirst));
    if let (Some(last), Some(first)) = (io.net.queued_last, first) {
        if last > first && last <= io.exit {
            ts.set(Ts::SockQueuedLast, last);
        }
    }
}
