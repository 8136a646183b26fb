//! The synthetic server's HTTP behaviour over loopback (no root needed): routes,
//! keep-alive, pipelining, request body framings, Connection: close, aborts, and the
//! queueing knobs, each checked on the wire and in the ground-truth log.

mod common;

use common::temp_path;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use testbed::http::{parse_head, ChunkedDecoder};
use testbed::{loadgen, read_server_log, LoadConfig, ServerRecord};

/// The server bin on an ephemeral loopback port; killed on drop.
struct Local {
    child: Child,
    addr: SocketAddr,
    log: common::TempFile,
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Local {
    fn start(extra: &[&str]) -> Local {
        let log = temp_path("local.jsonl");
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmslo-synth-server"))
            .args(["--listen", "127.0.0.1:0", "--log"])
            .arg(&log.0)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
        Local { child, addr, log }
    }

    fn conn(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn log(&self, n: usize) -> Vec<ServerRecord> {
        for _ in 0..500 {
            let r = read_server_log(&self.log.0).unwrap_or_default();
            if r.len() >= n {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("server log never reached {n} lines");
    }
}

/// Read one response: (status, headers text, decoded body).
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String, Vec<u8>) {
    let mut tmp = [0u8; 65536];
    loop {
        if let Some(h) = parse_head(buf).unwrap() {
            let status = h.status().unwrap();
            let headers = String::from_utf8_lossy(&buf[..h.len]).to_lowercase();
            let mut body = Vec::new();
            if h.header_has_token("transfer-encoding", "chunked") {
                let mut d = ChunkedDecoder::default();
                let mut pos = h.len;
                loop {
                    pos += d.feed(&buf[pos..], &mut body).unwrap();
                    if d.is_done() {
                        buf.drain(..pos);
                        return (status, headers, body);
                    }
                    let n = s.read(&mut tmp).unwrap();
                    assert!(n > 0, "eof mid-body");
                    buf.extend_from_slice(&tmp[..n]);
                }
            }
            let len: usize = h.header("content-length").unwrap().parse().unwrap();
            while buf.len() < h.len + len {
                let n = s.read(&mut tmp).unwrap();
                assert!(n > 0, "eof mid-body");
                buf.extend_from_slice(&tmp[..n]);
            }
            body.extend_from_slice(&buf[h.len..h.len + len]);
            buf.drain(..h.len + len);
            return (status, headers, body);
        }
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "eof before response");
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn post(path: &str, id: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\nx-request-id: {id}\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn routes_and_errors() {
    let srv = Local::start(&["--tokens", "3", "--decode-ms", "0"]);
    let mut s = srv.conn();
    let mut buf = Vec::new();
    let reqs = [
        ("GET /health HTTP/1.1\r\nhost: t\r\n\r\n".to_string(), 200),
        ("GET /nope HTTP/1.1\r\nhost: t\r\n\r\n".to_string(), 404),
        (
            "GET /v1/completions HTTP/1.1\r\nhost: t\r\n\r\n".to_string(),
            405,
        ),
        (
            "GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n".to_string(),
            200,
        ),
    ];
    for (r, want) in &reqs {
        s.write_all(r.as_bytes()).unwrap();
        assert_eq!(read_response(&mut s, &mut buf).0, *want, "{r}");
    }
    s.write_all(&post("/v1/chat/completions", "bad", "{not json", ""))
        .unwrap();
    let (st, _, body) = read_response(&mut s, &mut buf);
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));
    // Non-streaming: JSON with usage, model echoed, default --tokens.
    s.write_all(&post(
        "/v1/chat/completions",
        "ns",
        r#"{"model":"echo-me","messages":[{"role":"user","content":"hello world!"}]}"#,
        "",
    ))
    .unwrap();
    let (st, headers, body) = read_response(&mut s, &mut buf);
    assert_eq!(st, 200);
    assert!(headers.contains("content-type: application/json"));
    assert!(headers.contains("x-request-id: ns"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["model"], "echo-me");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["message"]["content"], " the model says");
    let log = srv.log(6);
    assert_eq!(
        log.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 404, 405, 200, 400, 200]
    );
    let ns = &log[5];
    assert_eq!((ns.prompt_bytes, ns.tokens, ns.stream), (12, 3, false));
    assert_eq!(ns.resp_first_ns, ns.resp_last_ns);
}

#[test]
fn pipelined_requests_answered_in_order() {
    let srv = Local::start(&["--tokens", "4", "--decode-ms", "1"]);
    let mut s = srv.conn();
    let mut wire = Vec::new();
    for (i, stream) in [(1, true), (2, false), (3, true)] {
        let body = format!(r#"{{"prompt":"p{i}","stream":{stream},"max_tokens":{i}}}"#);
        wire.extend(post("/v1/completions", &i.to_string(), &body, ""));
    }
    s.write_all(&wire).unwrap(); // all three in one write
    let mut buf = Vec::new();
    for i in 1..=3 {
        let (st, headers, body) = read_response(&mut s, &mut buf);
        assert_eq!(st, 200);
        assert!(headers.contains(&format!("x-request-id: {i}")), "{headers}");
        let text = String::from_utf8_lossy(&body);
        if i != 2 {
            assert!(headers.contains("content-type: text/event-stream"));
            assert_eq!(text.matches("\"text\":").count(), i, "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"));
        }
    }
    let log = srv.log(3);
    let ids: Vec<_> = log.iter().map(|r| r.request_id.clone().unwrap()).collect();
    assert_eq!(ids, ["1", "2", "3"]);
    // One read delivered all three: they share its timestamp.
    assert!(log.iter().all(|r| r.read_done_ns == log[0].read_done_ns));
    assert!(log[1].resp_first_ns > log[0].resp_last_ns);
}

#[test]
fn body_framings_and_connection_close() {
    let srv = Local::start(&["--tokens", "2", "--decode-ms", "0"]);
    // 2 MiB + a bit, Content-Length.
    let big = "x".repeat(2 * 1024 * 1024 + 3);
    let body = format!(r#"{{"prompt":"{big}"}}"#);
    let mut s = srv.conn();
    let mut buf = Vec::new();
    s.write_all(&post("/v1/completions", "big", &body, ""))
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).0, 200);
    // Chunked request body, in odd pieces, with Expect: 100-continue.
    let json = r#"{"prompt":"chunky","stream":true}"#;
    let mut wire = b"POST /v1/completions HTTP/1.1\r\nhost: t\r\nx-request-id: ch\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n".to_vec();
    s.write_all(&wire).unwrap();
    let mut tmp = [0u8; 256];
    let n = s.read(&mut tmp).unwrap();
    assert_eq!(&tmp[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    wire.clear();
    for piece in json.as_bytes().chunks(7) {
        wire.extend(testbed::http::chunk(piece));
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&wire).unwrap();
    let (st, _, body) = read_response(&mut s, &mut buf);
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    // Connection: close is honoured: response says so, then EOF.
    s.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let (st, headers, _) = read_response(&mut s, &mut buf);
    assert_eq!(st, 200);
    assert!(headers.contains("connection: close"));
    assert_eq!(s.read(&mut tmp).unwrap(), 0);
    // HTTP/1.0 without keep-alive closes too.
    let mut s = srv.conn();
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(all.starts_with(b"HTTP/1.1 200 OK"));
    let log = srv.log(4);
    assert_eq!(log[0].body_bytes as usize, body_len(&big));
    assert_eq!(log[1].prompt_bytes, 6);
    assert!(log[1].stream);
}

fn body_len(big: &str) -> usize {
    big.len() + r#"{"prompt":""}"#.len()
}

#[test]
fn client_abort_stops_the_stream() {
    let srv = Local::start(&["--tokens", "2000", "--decode-ms", "1"]);
    let mut s = srv.conn();
    s.write_all(&post(
        "/v1/completions",
        "gone",
        r#"{"prompt":"x","stream":true}"#,
        "",
    ))
    .unwrap();
    let mut tmp = [0u8; 4096];
    let n = s.read(&mut tmp).unwrap();
    assert!(n > 0);
    drop(s);
    let log = srv.log(1);
    assert!(log[0].aborted);
    assert!(log[0].resp_last_ns.is_none());
    assert!(log[0].token_ns.len() < 2000);
}

#[test]
fn fifo_queue_delay_and_prefill() {
    let srv = Local::start(&[
        "--concurrency",
        "1",
        "--queue-delay-ms",
        "30",
        "--prefill-us-per-kb",
        "2000",
        "--decode-ms",
        "2",
        "--tokens",
        "5",
    ]);
    let mut cfg = LoadConfig::new(srv.addr);
    cfg.connections = 3;
    cfg.requests = 3;
    cfg.prompt_bytes = vec![50 * 1024];
    cfg.max_tokens = None;
    cfg.deadline = Duration::from_secs(20);
    let clients = loadgen::run(&cfg).unwrap();
    assert!(clients
        .iter()
        .all(|c| c.ok() && c.content_times().len() == 5));
    let mut log = srv.log(3);
    log.sort_by_key(|r| r.token_ns[0]);
    for r in &log {
        // 30 ms queue delay + 50 KiB * 2 ms/KiB prefill before the first token.
        assert!(r.token_ns[0] - r.read_done_ns >= 130_000_000, "{r:?}");
        // Decode cadence: token i is scheduled i × 2 ms after decode start, so the
        // fifth leaves ≥ 8 ms after it (measured from the start, not from the first
        // token's write, whose own delay on a busy machine would eat any margin).
        let start = r
            .decode_start_ns
            .expect("a generation request records its decode start");
        assert!(
            start >= r.scheduled_ns.unwrap() && start <= r.token_ns[0],
            "{r:?}"
        );
        for (i, t) in r.token_ns.iter().enumerate() {
            assert!(t - start >= 2_000_000 * i as u64, "token {i}: {r:?}");
        }
        // ... and the tokens are spread over the schedule, not sent in one burst: asked when
        // the first left on time (a first write late by 5 ms or more on a busy machine has the
        // next ones, already due, follow right behind it).
        if r.token_ns[0] - start < 1_000_000 {
            assert!(r.token_ns[4] - r.token_ns[0] >= 3_000_000, "{r:?}");
        }
    }
    // One slot: each request starts decoding after the previous one finished.
    for w in log.windows(2) {
        assert!(w[1].token_ns[0] > w[0].token_ns[4]);
    }
}

#[test]
fn loadgen_on_loopback() {
    let srv = Local::start(&["--decode-ms", "0.5", "--write-mode", "split"]);
    let mut cfg = LoadConfig::new(srv.addr);
    cfg.connections = 4;
    cfg.requests = 60;
    cfg.streaming_ratio = 0.7;
    cfg.max_tokens = Some(6);
    cfg.abort_after_events = Some(2);
    cfg.abort_ratio = 0.1;
    cfg.deadline = Duration::from_secs(30);
    let clients = loadgen::run(&cfg).unwrap();
    let servers = srv.log(clients.len());
    common::check_truth(&clients, &servers, 6);
}
