//! One client connection of the load generator: blocking socket, incremental response
//! parsing (status line, Content-Length or chunked body, SSE events), and the kernel's
//! receive timestamp of every read so each byte's arrival time is known.

use crate::http::{self, BodyFraming, ChunkedDecoder, Head, SseParser};
use crate::loadgen::ClientRecord;
use crate::mono_ns;
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Whether the connection can carry the next request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    KeepAlive,
    Close,
}

pub(crate) struct Conn {
    stream: TcpStream,
    pub local_port: u16,
    /// Received but not yet consumed bytes (the start of a pipelined response).
    buf: Vec<u8>,
    /// When the read that delivered `buf` returned.
    buf_ns: u64,
    seq: u32,
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("deadline reached");
    }
    Ok(left)
}

/// recvmsg with an SCM_TIMESTAMPNS control message; the stamp converted to CLOCK_MONOTONIC.
fn recv_stamped(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: the iovec and control buffers outlive the call and their lengths are right.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                let rt = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
                stamp = u64::try_from(rt - realtime_minus_mono()).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// One transmit stamp from the socket's error queue, on CLOCK_MONOTONIC.
fn tx_stamp(stream: &TcpStream) -> Option<u64> {
    let mut cbuf = [0u64; 32];
    // SAFETY: msghdr is plain data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: the control buffer outlives the call; no data buffer is needed (OPT_TSONLY).
    let n = unsafe {
        libc::recvmsg(
            stream.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return None;
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPING {
                // struct scm_timestamping { struct timespec ts[3]; }: [0] is the software stamp.
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                let rt = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
                stamp = u64::try_from(rt - realtime_minus_mono()).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // An entry without a stamp still had to be consumed; report it as "no stamp this time".
    stamp.or(Some(0)).filter(|&s| s > 0)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now, in ns (socket stamps are on the realtime clock).
///
/// The realtime read is bracketed by two monotonic reads and the tightest of a few tries is
/// kept: a thread preempted between two plain reads would make the offset short by the time it
/// was off the CPU, and every stamp converted with it that much late (seen in CI: a request's
/// transmit stamp landing after the server had read the request).
fn realtime_minus_mono() -> i128 {
    let mut best: Option<(u64, i128)> = None;
    for _ in 0..4 {
        let before = mono_ns();
        let mut rt = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid, writable timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut rt) };
        let after = mono_ns();
        let width = after.saturating_sub(before);
        let mid = before as i128 + (width / 2) as i128;
        let offset = rt.tv_sec as i128 * 1_000_000_000 + rt.tv_nsec as i128 - mid;
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, offset));
        }
        if width < 2_000 {
            break;
        }
    }
    best.map_or(0, |(_, offset)| offset)
}

impl Conn {
    pub fn connect(target: SocketAddr, deadline: Instant) -> Result<Conn> {
        let stream =
            TcpStream::connect_timeout(&target, remaining(deadline)?.min(Duration::from_secs(5)))
                .with_context(|| format!("connect {target}"))?;
        // Requests must leave in one segment when written, as a real client's do.
        stream.set_nodelay(true)?;
        // Receive timestamps from the kernel: when bytes reached this socket, independent of
        // when this thread got the CPU back (2-core machines shared with the server and agent).
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a pointer to an int of the size passed.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // Transmit stamps (when the request was handed to the device queue), delivered on the
        // error queue with no payload.
        let tx: libc::c_uint = libc::SOF_TIMESTAMPING_TX_SCHED
            | libc::SOF_TIMESTAMPING_SOFTWARE
            | libc::SOF_TIMESTAMPING_OPT_TSONLY
            | libc::SOF_TIMESTAMPING_OPT_ID;
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPING,
                (&tx as *const libc::c_uint).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        let local_port = stream.local_addr()?.port();
        Ok(Conn {
            stream,
            local_port,
            buf: Vec::new(),
            buf_ns: 0,
            seq: 0,
        })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq - 1
    }

    /// Writes the request; returns the kernel's transmit stamp of it, if one came. `sent_after`
    /// is the clock just before the write: stamps older than that, and any later than the
    /// earliest new one (a retransmission's), are not this send's.
    pub fn send(&mut self, data: &[u8], sent_after: u64, deadline: Instant) -> Result<Option<u64>> {
        self.stream.set_write_timeout(Some(remaining(deadline)?))?;
        self.stream.write_all(data)?;
        // The stamp is queued when the segment is scheduled, normally inside write() itself.
        let mut first: Option<u64> = None;
        for _ in 0..20 {
            while let Some(t) = tx_stamp(&self.stream) {
                if t >= sent_after {
                    first = Some(first.map_or(t, |f| f.min(t)));
                }
            }
            if first.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(first)
    }

    /// Read into the buffer; returns bytes read (0 = peer closed) and when they arrived: the
    /// kernel's receive timestamp of the latest segment read, on CLOCK_MONOTONIC, or the time
    /// after the read when the kernel gave none.
    fn fill(&mut self, deadline: Instant) -> Result<(usize, u64)> {
        let mut tmp = [0u8; 64 * 1024];
        loop {
            self.stream.set_read_timeout(Some(remaining(deadline)?))?;
            match recv_stamped(&self.stream, &mut tmp) {
                Ok((n, rx)) => {
                    let now = mono_ns();
                    let t = rx.filter(|&r| r <= now).unwrap_or(now);
                    self.buf.extend_from_slice(&tmp[..n]);
                    if n > 0 {
                        self.buf_ns = t;
                    }
                    return Ok((n, t));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("deadline reached while reading")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Read one response into `rec`. With `abort_after`, close (Outcome::Close) once
    /// that many SSE events have arrived.
    pub fn read_response(
        &mut self,
        rec: &mut ClientRecord,
        abort_after: Option<usize>,
        deadline: Instant,
    ) -> Result<Outcome> {
        let mut st = RespState::default();
        // Bytes left over from the previous response arrived with the previous read.
        let mut t = self.buf_ns;
        if !self.buf.is_empty() {
            rec.first_byte_ns = Some(t);
        }
        let mut prev_t = t;
        loop {
            let before = rec.events.len();
            let complete = st.advance(&self.buf, t, rec)?;
            // A read that delivers several SSE events is stamped with its latest segment: an
            // earlier event in it arrived somewhere after the previous read's stamp. Say so for
            // the first content event, so checks can use the interval rather than a point.
            let after = rec.events.len();
            if let Some(i) = rec.events.iter().position(|e| e.1) {
                if i >= before && i + 1 < after && rec.ttft_floor_ns.is_none() {
                    rec.ttft_floor_ns = Some(prev_t.saturating_sub(rec.send_ns));
                }
            }
            if complete {
                rec.end_ns = Some(t);
                rec.response_bytes = st.pos as u64;
                self.buf.drain(..st.pos);
                let close = st.head.as_ref().is_some_and(|h| h.wants_close())
                    || st.framing == Some(BodyFraming::UntilClose);
                return Ok(if close {
                    Outcome::Close
                } else {
                    Outcome::KeepAlive
                });
            }
            if abort_after.is_some_and(|k| rec.events.len() >= k) {
                rec.aborted = true;
                rec.response_bytes = st.pos as u64;
                return Ok(Outcome::Close);
            }
            let (n, at) = self.fill(deadline)?;
            prev_t = t;
            t = at;
            if n == 0 {
                if st.framing == Some(BodyFraming::UntilClose) {
                    st.eof = true;
                    continue;
                }
                bail!("server closed the connection mid-response");
            }
            rec.first_byte_ns.get_or_insert(t);
        }
    }
}

/// Parsing progress through one response inside the connection buffer.
#[derive(Default)]
struct RespState {
    head: Option<Head>,
    framing: Option<BodyFraming>,
    /// Bytes of the buffer that belong to this response so far.
    pos: usize,
    chunked: ChunkedDecoder,
    length_left: usize,
    sse: Option<SseParser>,
    /// Non-SSE body, parsed for usage at the end.
    body: Vec<u8>,
    eof: bool,
}

impl RespState {
    /// Consume what `buf` holds beyond `pos`, all of which arrived by time `t`.
    /// True once the response is complete.
    fn advance(&mut self, buf: &[u8], t: u64, rec: &mut ClientRecord) -> Result<bool> {
        if self.head.is_none() {
            let Some(head) = http::parse_head(&buf[self.pos..])? else {
                return Ok(false);
            };
            let status = head.status()?;
            if status / 100 == 1 {
                // Interim response (100 Continue): skip it, the real one follows.
                self.pos += head.len;
                return self.advance(buf, t, rec);
            }
            rec.status = status;
            self.pos += head.len;
            let framing = head.response_framing(status)?;
            if let BodyFraming::Length(n) = framing {
                self.length_left = n;
            }
            let is_sse = head.header("content-type").is_some_and(|c| {
                c.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
            self.sse = is_sse.then(SseParser::default);
            self.framing = Some(framing);
            self.head = Some(head);
        }
        let framing = self.framing.expect("set with head");
        let mut payload = Vec::new();
        let done = match framing {
            BodyFraming::None => true,
            BodyFraming::Length(_) => {
                let n = self.length_left.min(buf.len() - self.pos);
                payload.extend_from_slice(&buf[self.pos..self.pos + n]);
                self.pos += n;
                self.length_left -= n;
                self.length_left == 0
            }
            BodyFraming::Chunked => {
                self.pos += self.chunked.feed(&buf[self.pos..], &mut payload)?;
                self.chunked.is_done()
            }
            BodyFraming::UntilClose => {
                payload.extend_from_slice(&buf[self.pos..]);
                self.pos = buf.len();
                self.eof
            }
        };
        self.take_payload(&payload, t, rec);
        if done && self.sse.is_none() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.body) {
                rec.completion_tokens = v["usage"]["completion_tokens"].as_u64();
                rec.prompt_tokens = v["usage"]["prompt_tokens"].as_u64();
            }
        }
        Ok(done)
    }

    fn take_payload(&mut self, payload: &[u8], t: u64, rec: &mut ClientRecord) {
        let Some(sse) = self.sse.as_mut() else {
            self.body.extend_from_slice(payload);
            return;
        };
        sse.feed(payload, |data| {
            let info = http::classify_event(data);
            rec.events.push((t, info.content));
            if info.content && rec.ttft_ns.is_none() {
                rec.ttft_ns = Some(t.saturating_sub(rec.send_ns));
            }
            if info.completion_tokens.is_some() {
                rec.completion_tokens = info.completion_tokens;
                rec.prompt_tokens = info.prompt_tokens;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed a response in pieces with increasing timestamps, as reads would.
    fn parse_in_pieces(wire: &[u8], step: usize) -> (ClientRecord, usize) {
        let mut st = RespState::default();
        let mut rec = ClientRecord::default();
        let mut have = 0;
        loop {
            have = (have + step).min(wire.len());
            if st.advance(&wire[..have], have as u64, &mut rec).unwrap() {
                return (rec, st.pos);
            }
            assert!(have < wire.len(), "incomplete");
        }
    }

    #[test]
    fn chunked_sse_response() {
        let ev = |s: &str| http::chunk(format!("data: {s}\n\n").as_bytes());
        let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        wire.extend(ev(
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
        ));
        wire.extend(ev(r#"{"choices":[{"delta":{"content":"a"}}]}"#));
        wire.extend(ev(r#"{"choices":[{"delta":{"content":"b"}}]}"#));
        wire.extend(ev(
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        ));
        wire.extend(ev("[DONE]"));
        wire.extend_from_slice(http::LAST_CHUNK);
        let total = wire.len();
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n"); // next pipelined response
        for step in [1, 7, 100, 10_000] {
            let (rec, pos) = parse_in_pieces(&wire, step);
            assert_eq!(pos, total);
            assert_eq!(rec.status, 200);
            let kinds: Vec<bool> = rec.events.iter().map(|e| e.1).collect();
            assert_eq!(kinds, vec![false, true, true, false, false]);
            assert_eq!(rec.completion_tokens, Some(2));
            assert!(rec.events.windows(2).all(|w| w[0].0 <= w[1].0));
        }
    }

    #[test]
    fn content_length_json() {
        let body = br#"{"usage":{"prompt_tokens":4,"completion_tokens":9}}"#;
        let mut wire =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        wire.extend_from_slice(body);
        let (rec, pos) = parse_in_pieces(&wire, 5);
        assert_eq!(pos, wire.len());
        assert_eq!(rec.completion_tokens, Some(9));
        assert!(rec.events.is_empty());
    }
}
