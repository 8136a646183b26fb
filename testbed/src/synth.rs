//! Synthetic OpenAI-compatible inference server (vLLM-shaped responses) that logs, per
//! request, CLOCK_MONOTONIC just before each write syscall: the ground truth the
//! agent's kernel timestamps are checked against (DESIGN.md §3, §6).
//!
//! Hand-written HTTP/1.1 on tokio, so that every chunk leaves in exactly one write().

use crate::http::{self, BodyFraming, ChunkedDecoder, Head};
use crate::mono_ns;
use crate::synth_handle::{handle, simple_response};
use crate::synth_metrics::{MetricsFormat, VllmMetrics};
use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request body accepted (Content-Length or chunked); prompts of a few MiB
/// are realistic for long-context models.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// How SSE events map onto write syscalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// One write (one chunk) per event, as uvicorn does.
    One,
    /// Each event in two writes (two chunks) cut mid-event.
    Split,
    /// Two events per write (one chunk holding both).
    Merge,
}

/// Which syscall carries response bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Syscall {
    Write,
    Send,
    Writev,
    Sendmsg,
}

/// Command-line flags of `llmslo-synth-server`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "llmslo-synth-server",
    about = "Synthetic OpenAI-compatible streaming server with a ground-truth log"
)]
pub struct SynthArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// JSON-lines ground-truth log, one line per request.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Fixed wait after the request is read, before it queues for a slot.
    #[arg(long, default_value_t = 0.0)]
    pub queue_delay_ms: f64,
    /// Requests processed at once; the rest wait FIFO (a saturated server's queue).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Prefill time per KiB of request body, in microseconds.
    #[arg(long, default_value_t = 0.0)]
    pub prefill_us_per_kb: f64,
    /// Time per generated token.
    #[arg(long, default_value_t = 2.0)]
    pub decode_ms: f64,
    /// Output tokens when the request has no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub tokens: u64,
    /// How SSE events are cut into write syscalls.
    #[arg(long, value_enum, default_value_t = WriteMode::One)]
    pub write_mode: WriteMode,
    /// Syscall for response writes: write(2) like uvloop, send(2) like asyncio,
    /// writev(2) with two iovecs, or sendmsg(2) with the same two.
    #[arg(long, value_enum, default_value_t = Syscall::Write)]
    pub syscall: Syscall,
    /// recv(MSG_PEEK) before every read, like servers that sniff the protocol first: the
    /// peeked bytes are read again by the read that follows.
    #[arg(long)]
    pub peek: bool,
    /// Ids of equal length, three in four with a JSON escape (`\"`, `\\`) where the others
    /// have digits: responses whose varying bytes hold a quote or a backslash.
    #[arg(long)]
    pub escaped_ids: bool,
    /// Model name reported when the request names none.
    #[arg(long, default_value = "synth-llm")]
    pub model: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Block the worker thread this long per request before answering (a CPU-bound event loop:
    /// with one worker, other connections' requests wait unread in their socket buffers).
    #[arg(long, default_value_t = 0.0)]
    pub busy_ms: f64,
    /// What `GET /metrics` serves: nothing (404), vLLM's latency histograms, or garbage.
    #[arg(long, value_enum, default_value_t = MetricsFormat::None)]
    pub metrics: MetricsFormat,
    /// Exit by itself after this many seconds (a safety net for demos).
    #[arg(long)]
    pub max_runtime_s: Option<f64>,
    /// Wait this long before binding the listening socket, like a server that loads its model
    /// first (vLLM listens only once its weights are in GPU memory).
    #[arg(long, default_value_t = 0.0)]
    pub startup_delay_ms: f64,
}

/// One line of the ground-truth log. Every `*_ns` is CLOCK_MONOTONIC; write times are
/// taken immediately before the write syscall that carries the byte in question.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// The `x-request-id` header, if sent.
    pub request_id: Option<String>,
    /// Client address as seen by the server.
    pub peer: String,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    /// Right after the read() that delivered the request's first / last byte.
    pub read_first_ns: u64,
    pub read_done_ns: u64,
    /// Before the write carrying the status line.
    pub resp_first_ns: Option<u64>,
    /// Per content event, before the write carrying the event's last byte (its
    /// terminating blank line). Only writes that succeeded are listed.
    pub token_ns: Vec<u64>,
    /// Per content event, before the write carrying its first byte (differs from
    /// `token_ns` only in split mode).
    pub token_start_ns: Vec<u64>,
    /// Per content event, right after the write that carried its last byte returned: the
    /// kernel saw that write begin within [token_ns, token_after_ns].
    #[serde(default)]
    pub token_after_ns: Vec<u64>,
    /// When a generation request got its slot (after the queue delay and the FIFO wait).
    #[serde(default)]
    pub scheduled_ns: Option<u64>,
    /// When decoding began (after prefill): content event `i` is scheduled `i` ×
    /// `--decode-ms` after it, so cadence checks measure from here rather than from the
    /// first token's write, which may itself leave late.
    #[serde(default)]
    pub decode_start_ns: Option<u64>,
    /// The response's `"id"` as written (its JSON string body, escapes included).
    #[serde(default)]
    pub completion_id: Option<String>,
    /// Before the write carrying the response's last byte; None when aborted.
    pub resp_last_ns: Option<u64>,
    pub status: u16,
    pub stream: bool,
    /// Output tokens generated (what `usage.completion_tokens` reports).
    pub tokens: u64,
    pub prompt_tokens: u64,
    /// Bytes of prompt text (message contents or `prompt`).
    pub prompt_bytes: u64,
    /// Bytes of the request body as decoded.
    pub body_bytes: u64,
    /// A write failed (client gone): the response was cut short.
    pub aborted: bool,
}

/// Parse `args` (without the program name; a leading non-flag word is taken as the
/// program name and skipped) and run the server until killed.
pub fn synth_main(args: Vec<String>) -> Result<()> {
    let mut argv = args;
    if argv.first().is_none_or(|a| a.starts_with('-')) {
        argv.insert(0, "llmslo-synth-server".into());
    }
    let args = match SynthArgs::try_parse_from(&argv) {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help / --version: not an error.
            e.print()?;
            return Ok(());
        }
        Err(e) => bail!("{}", e.render()),
    };
    // write(2) to a socket the client closed raises SIGPIPE; Rust binaries ignore it
    // already, but synth_main may run inside a host that did not.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

/// Bind `args.listen` and serve (forever, or until `max_runtime_s`).
pub async fn serve(args: SynthArgs) -> Result<()> {
    if args.startup_delay_ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.startup_delay_ms / 1e3)).await;
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    serve_on(listener, args).await
}

/// Serve on an already bound listener.
pub async fn serve_on(listener: TcpListener, args: SynthArgs) -> Result<()> {
    let log = match &args.log {
        Some(p) => Some(Mutex::new(
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("open log {}", p.display()))?,
        )),
        None => None,
    };
    eprintln!(
        "llmslo-synth-server listening on {}",
        listener.local_addr()?
    );
    let srv = Arc::new(Server {
        sem: Semaphore::new(args.concurrency.max(1)),
        metrics: (args.metrics == MetricsFormat::Vllm).then(|| VllmMetrics::new(&args.model)),
        args,
        log,
        next_id: AtomicU64::new(1),
    });
    let stop = srv.args.max_runtime_s.map(Duration::from_secs_f64);
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(connection(srv.clone(), stream, peer));
        }
    };
    match stop {
        Some(d) => {
            let _ = tokio::time::timeout(d, accept).await;
            Ok(())
        }
        None => accept.await,
    }
}

/// Read a ground-truth log; a torn last line (server killed mid-write) is skipped.
pub fn read_server_log(path: &Path) -> Result<Vec<ServerRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => bail!("bad log line {}: {e}: {line}", i + 1),
        }
    }
    Ok(out)
}

pub(crate) struct Server {
    pub args: SynthArgs,
    /// FIFO slots: `--concurrency` requests in prefill/decode at once.
    pub sem: Semaphore,
    /// `--metrics vllm`: what it measured, served at `GET /metrics`.
    pub metrics: Option<VllmMetrics>,
    log: Option<Mutex<File>>,
    /// Numbers the completion ids (`chatcmpl-<n>`).
    pub next_id: AtomicU64,
}

impl Server {
    pub fn log(&self, rec: &ServerRecord) {
        let Some(log) = &self.log else { return };
        let mut line = serde_json::to_vec(rec).expect("record serializes");
        line.push(b'\n');
        // One write per line on an O_APPEND file: a reader never sees half a line
        // from a live server, and nothing sits in a userspace buffer when killed.
        let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(&line) {
            eprintln!("log write: {e}");
        }
    }
}

async fn connection(srv: Arc<Server>, mut stream: TcpStream, peer: SocketAddr) {
    // Nagle would merge our deliberately separate writes into fewer segments.
    let _ = stream.set_nodelay(true);
    let mut reader = RequestReader {
        peek: srv.args.peek,
        ..Default::default()
    };
    loop {
        let req = match reader.next(&mut stream).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let body = format!("{{\"error\":{}}}", serde_json::json!(format!("{e:#}")));
                let resp = simple_response(400, "application/json", body.as_bytes(), true, None);
                let _ = stream.write_all(&resp).await;
                return;
            }
        };
        let close = req.head.wants_close();
        let keep_going = handle(&srv, &stream, peer, req, close).await;
        if !keep_going || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

pub(crate) struct Request {
    pub head: Head,
    pub body: Vec<u8>,
    pub read_first_ns: u64,
    pub read_done_ns: u64,
}

/// Buffers reads and remembers when each read returned, so that pipelined requests
/// that arrived in one read get that read's time.
#[derive(Default)]
struct RequestReader {
    buf: Vec<u8>,
    /// (end offset in `buf`, CLOCK_MONOTONIC right after the read) per read.
    reads: Vec<(usize, u64)>,
    sent_continue: bool,
    /// Peek at the socket before each read (`--peek`).
    peek: bool,
}

impl RequestReader {
    async fn next(&mut self, stream: &mut TcpStream) -> Result<Option<Request>> {
        let mut tmp = vec![0u8; 64 * 1024];
        loop {
            if let Some(head) = http::parse_head(&self.buf)? {
                if let Some(req) = self.take_request(head.clone())? {
                    return Ok(Some(req));
                }
                let expects = head
                    .header("expect")
                    .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
                if expects && !self.sent_continue {
                    stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                    self.sent_continue = true;
                }
            }
            if self.peek {
                stream.peek(&mut tmp).await?;
            }
            let n = stream.read(&mut tmp).await?;
            let t = mono_ns();
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("peer closed in the middle of a request");
            }
            self.buf.extend_from_slice(&tmp[..n]);
            self.reads.push((self.buf.len(), t));
        }
    }

    /// The complete request at the front of the buffer, if all of it has arrived.
    fn take_request(&mut self, head: Head) -> Result<Option<Request>> {
        let rest = &self.buf[head.len..];
        let (body, used) = match head.request_framing()? {
            BodyFraming::Length(n) if n > MAX_BODY => bail!("body of {n} bytes is too large"),
            BodyFraming::Length(n) if rest.len() < n => return Ok(None),
            BodyFraming::Length(n) => (rest[..n].to_vec(), n),
            BodyFraming::Chunked => {
                // Re-decoded from the start on each read: simple, and cheap enough for
                // the few-MiB bodies we accept.
                let mut dec = ChunkedDecoder::default();
                let mut out = Vec::new();
                let used = dec.feed(rest, &mut out)?;
                if out.len() > MAX_BODY {
                    bail!("chunked body too large");
                }
                if !dec.is_done() {
                    return Ok(None);
                }
                (out, used)
            }
            BodyFraming::None | BodyFraming::UntilClose => (Vec::new(), 0),
        };
        let total = head.len + used;
        let time_of = |off: usize| {
            self.reads
                .iter()
                .find(|(end, _)| *end >= off)
                .map_or(0, |r| r.1)
        };
        let read_first_ns = time_of(1);
        let read_done_ns = time_of(total);
        self.buf.drain(..total);
        self.reads.retain_mut(|(end, _)| {
            *end = end.saturating_sub(total);
            *end > 0
        });
        self.sent_continue = false;
        Ok(Some(Request {
            head,
            body,
            read_first_ns,
            read_done_ns,
        }))
    }
}
