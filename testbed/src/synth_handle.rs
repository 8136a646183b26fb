//! Per-request work of the synthetic server: route, queue, prefill, decode, and the
//! timed writes whose CLOCK_MONOTONIC stamps make up the ground-truth log.

use crate::http;
use crate::mono_ns;
use crate::synth::{Request, Server, ServerRecord, Syscall, WriteMode};
use crate::synth_metrics::MetricsFormat;
use crate::synth_plan::{self, Event, PlannedWrite, RouteKind};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(crate) fn simple_response(
    status: u16,
    ctype: &str,
    body: &[u8],
    close: bool,
    request_id: Option<&str>,
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nserver: llmslo-synth\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    push_common_headers(&mut head, close, request_id);
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

fn push_common_headers(head: &mut String, close: bool, request_id: Option<&str>) {
    if let Some(id) = request_id {
        head.push_str(&format!("x-request-id: {id}\r\n"));
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    }
}

/// Serve one request; false when the connection must close (a write failed).
pub(crate) async fn handle(
    srv: &Server,
    stream: &TcpStream,
    peer: SocketAddr,
    req: Request,
    close: bool,
) -> bool {
    if srv.args.busy_ms > 0.0 {
        // Deliberately blocking: this is the saturated event loop being simulated.
        std::thread::sleep(Duration::from_secs_f64(srv.args.busy_ms / 1e3));
    }
    let mut parts = req.head.start_line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    let request_id = req.head.header("x-request-id").map(str::to_string);
    let mut rec = ServerRecord {
        request_id: request_id.clone(),
        peer: peer.to_string(),
        method: method.clone(),
        path: path.clone(),
        read_first_ns: req.read_first_ns,
        read_done_ns: req.read_done_ns,
        body_bytes: req.body.len() as u64,
        ..Default::default()
    };
    let rid = request_id.as_deref();
    let out = Out {
        stream,
        how: srv.args.syscall,
    };
    let known = [
        "/health",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
    ];
    let ok = match (method.as_str(), path.as_str()) {
        ("GET", "/health") => send_simple(out, &mut rec, 200, "", close, rid).await,
        ("GET", "/metrics") if srv.args.metrics != MetricsFormat::None => {
            let (ctype, body) = match &srv.metrics {
                Some(m) => (
                    "text/plain; version=0.0.4; charset=utf-8",
                    m.render().into_bytes(),
                ),
                None => ("text/plain", crate::synth_metrics::garbage()),
            };
            rec.status = 200;
            let resp = simple_response(200, ctype, &body, close, rid);
            match timed_write(out, &mut rec, &resp).await {
                Some((t0, t1)) => {
                    rec.resp_first_ns = Some(t0);
                    rec.resp_last_ns = Some(t1);
                    true
                }
                None => false,
            }
        }
        ("GET", "/v1/models") => {
            let body = serde_json::json!({"object": "list", "data": [{"id": srv.args.model, "object": "model", "owned_by": "llmslo"}]});
            send_simple(out, &mut rec, 200, &body.to_string(), close, rid).await
        }
        ("POST", "/v1/chat/completions") => {
            generate(srv, out, &mut rec, &req, RouteKind::Chat, close).await
        }
        ("POST", "/v1/completions") => {
            generate(srv, out, &mut rec, &req, RouteKind::Completions, close).await
        }
        (_, p) if known.contains(&p) => {
            send_simple(
                out,
                &mut rec,
                405,
                r#"{"detail":"Method Not Allowed"}"#,
                close,
                rid,
            )
            .await
        }
        _ => send_simple(out, &mut rec, 404, r#"{"detail":"Not Found"}"#, close, rid).await,
    };
    if let (Some(m), Some(end), Some(sched)) = (&srv.metrics, rec.resp_last_ns, rec.scheduled_ns) {
        // Arrival is when the request was read in full (vLLM: when it reached the engine).
        if !rec.aborted && rec.status == 200 {
            let secs = |t: u64| t.saturating_sub(rec.read_done_ns) as f64 / 1e9;
            m.observe_finished(secs(end), secs(sched));
        }
    }
    srv.log(&rec);
    ok
}

/// Where and how responses are written.
#[derive(Clone, Copy)]
struct Out<'a> {
    stream: &'a TcpStream,
    how: Syscall,
}

/// Write all of `data` with the configured syscall, returning CLOCK_MONOTONIC taken
/// just before the syscall that carried the first byte and the one that carried the
/// last (the same call unless the socket buffer was full). None (and the record marked
/// aborted) when the client is gone.
async fn timed_write(out: Out<'_>, rec: &mut ServerRecord, data: &[u8]) -> Option<(u64, u64)> {
    timed_write_after(out, rec, data)
        .await
        .map(|(a, b, _)| (a, b))
}

/// Like `timed_write`, plus the time right after the last syscall returned: the kernel entered
/// that write somewhere in [before, after] (the thread may be preempted between the clock read
/// and the syscall).
async fn timed_write_after(
    out: Out<'_>,
    rec: &mut ServerRecord,
    data: &[u8],
) -> Option<(u64, u64, u64)> {
    let (stream, how) = (out.stream, out.how);
    let (mut first, mut last, mut after, mut off) = (None, 0, 0, 0);
    while off < data.len() {
        let attempt = stream.try_io(Interest::WRITABLE, || {
            let t = mono_ns();
            raw_write(stream.as_raw_fd(), &data[off..], how).map(|n| (t, n, mono_ns()))
        });
        match attempt {
            Ok((t, n, t2)) => {
                first.get_or_insert(t);
                last = t;
                after = t2;
                off += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stream.writable().await.is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if off < data.len() {
        rec.aborted = true;
        return None;
    }
    Some((first.unwrap_or(last), last, after))
}

/// One write syscall of the chosen kind. tokio itself would use sendto(); real servers
/// differ (uvloop: write/writev, asyncio: send, others sendmsg), and the agent must see all.
fn raw_write(fd: RawFd, buf: &[u8], how: Syscall) -> std::io::Result<usize> {
    // SAFETY: fd is the live socket of `stream`; every pointer/length pair below
    // describes a sub-slice of `buf`, which outlives the call.
    let n = unsafe {
        match how {
            Syscall::Write => libc::write(fd, buf.as_ptr().cast(), buf.len()),
            Syscall::Send => libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL),
            Syscall::Writev | Syscall::Sendmsg => {
                // Two iovecs (chunk size line, rest) like libuv's header/body writes.
                let cut = buf
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(buf.len() / 2, |i| i + 1);
                let mut iov = [
                    libc::iovec {
                        iov_base: buf.as_ptr() as *mut _,
                        iov_len: cut,
                    },
                    libc::iovec {
                        iov_base: buf[cut..].as_ptr() as *mut _,
                        iov_len: buf.len() - cut,
                    },
                ];
                if how == Syscall::Writev {
                    libc::writev(fd, iov.as_ptr(), 2)
                } else {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = iov.as_mut_ptr();
                    msg.msg_iovlen = 2;
                    libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
                }
            }
        }
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn send_simple(
    out: Out<'_>,
    rec: &mut ServerRecord,
    status: u16,
    body: &str,
    close: bool,
    rid: Option<&str>,
) -> bool {
    rec.status = status;
    let resp = simple_response(status, "application/json", body.as_bytes(), close, rid);
    let Some((t0, t1)) = timed_write(out, rec, &resp).await else {
        return false;
    };
    rec.resp_first_ns = Some(t0);
    rec.resp_last_ns = Some(t1);
    true
}

/// Sleep until `at` with sub-millisecond precision. tokio's timer wheel rounds up to
/// whole milliseconds, which would bunch tokens at small `--decode-ms`; so the timer
/// covers all but the last 2 ms and a blocking-pool thread sleeps the rest.
async fn sleep_until(at: Instant) {
    let coarse = Duration::from_millis(2);
    if at.saturating_duration_since(Instant::now()) > coarse {
        tokio::time::sleep_until(at - coarse).await;
    }
    let rest = at.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

async fn generate(
    srv: &Server,
    out: Out<'_>,
    rec: &mut ServerRecord,
    req: &Request,
    route: RouteKind,
    close: bool,
) -> bool {
    let args = &srv.args;
    let rid = rec.request_id.clone();
    let params = match synth_plan::parse_params(&req.body, route) {
        Ok(p) => p,
        Err(e) => {
            let body = serde_json::json!({"error": {"message": format!("{e:#}"), "type": "BadRequestError"}});
            return send_simple(out, rec, 400, &body.to_string(), close, rid.as_deref()).await;
        }
    };
    let model = params.model.clone().unwrap_or_else(|| args.model.clone());
    let tokens = params.max_tokens.unwrap_or(args.tokens);
    rec.model = Some(model.clone());
    rec.stream = params.stream;
    rec.tokens = tokens;
    rec.prompt_bytes = params.prompt_bytes;
    rec.prompt_tokens = (params.prompt_bytes / 4).max(1);
    rec.status = 200;
    let split = args.write_mode == WriteMode::Split;

    if params.stream {
        // Like vLLM behind uvicorn: the status line goes out as soon as the handler
        // starts, before the request waits for the engine.
        let mut head = String::from(
            "HTTP/1.1 200 OK\r\nserver: llmslo-synth\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n",
        );
        push_common_headers(&mut head, close, rid.as_deref());
        let Some((t, _)) = timed_write(out, rec, head.as_bytes()).await else {
            return false;
        };
        rec.resp_first_ns = Some(t);
    }

    // Queueing: a fixed delay, then FIFO for one of `concurrency` slots (tokio's
    // semaphore is fair), then prefill proportional to the prompt size.
    sleep_until(Instant::now() + Duration::from_secs_f64(args.queue_delay_ms / 1e3)).await;
    let _permit = srv.sem.acquire().await.expect("semaphore never closed");
    rec.scheduled_ns = Some(mono_ns());
    let prefill_us = args.prefill_us_per_kb * req.body.len() as f64 / 1024.0;
    sleep_until(Instant::now() + Duration::from_secs_f64(prefill_us / 1e6)).await;

    // Read before `t0`, so every write scheduled at `t0 + at` leaves ≥ `at` after it.
    rec.decode_start_ns = Some(mono_ns());
    let t0 = Instant::now();
    let decode = Duration::from_secs_f64(args.decode_ms / 1e3);
    let n = srv.next_id.fetch_add(1, Ordering::Relaxed);
    let ctx = synth_plan::GenContext {
        id: n,
        escaped_ids: args.escaped_ids,
        model: &model,
        route,
        tokens,
        prompt_tokens: rec.prompt_tokens,
    };
    rec.completion_id = Some(ctx.completion_id());

    if !params.stream {
        sleep_until(t0 + decode * tokens as u32).await;
        let body = synth_plan::full_body(&ctx);
        let mut head = format!(
            "HTTP/1.1 200 OK\r\nserver: llmslo-synth\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        push_common_headers(&mut head, close, rid.as_deref());
        let mut writes = vec![head.into_bytes()];
        if split {
            writes.push(body);
        } else {
            writes[0].extend_from_slice(&body);
        }
        for w in &writes {
            let Some((t0, t1)) = timed_write(out, rec, w).await else {
                return false;
            };
            if let (Some(m), true) = (&srv.metrics, rec.resp_last_ns.is_none()) {
                m.observe_ttft(t0.saturating_sub(rec.read_done_ns) as f64 / 1e9);
            }
            rec.resp_first_ns.get_or_insert(t0);
            rec.resp_last_ns = Some(t1);
        }
        return true;
    }

    let events: Vec<Event> = synth_plan::stream_events(&ctx, params.include_usage, decode);
    let plan: Vec<PlannedWrite> = synth_plan::plan_writes(&events, args.write_mode);
    for w in &plan {
        sleep_until(t0 + w.at).await;
        let Some((t0, t1, t2)) = timed_write_after(out, rec, &w.data).await else {
            return false;
        };
        for _ in 0..w.content_starts {
            rec.token_start_ns.push(t0);
        }
        for _ in 0..w.content_ends {
            if rec.token_ns.is_empty() {
                if let Some(m) = &srv.metrics {
                    m.observe_ttft(t1.saturating_sub(rec.read_done_ns) as f64 / 1e9);
                }
            }
            rec.token_ns.push(t1);
            rec.token_after_ns.push(t2);
        }
    }
    let Some((_, t)) = timed_write(out, rec, http::LAST_CHUNK).await else {
        return false;
    };
    rec.resp_last_ns = Some(t);
    true
}
