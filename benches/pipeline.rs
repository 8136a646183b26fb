//! The agent's userspace hot path on one core, fed with realistic ring-buffer records built
//! in memory: streaming chat completions (vLLM-shaped: one chunked SSE event per write) over
//! several keep-alive connections, interleaved by time as the ring buffer would deliver them.
//!
//! Groups (see docs/BENCHMARKS.md):
//! - `decode`    ring-buffer bytes → `SockEvent` (`ringbuf::decode`)
//! - `assemble`  decode → `Assembler::on_event` (records collected into a reused Vec)
//! - `full`      decode → assembler → `Store::push` (labels + `Aggregator::record`), as the
//!   agent's BPF thread does
//! - `render`    `/metrics` request metrics (`Aggregator::render`) for 5, 50 and 200 label sets
//! - `breakdown` `/api/v1/breakdown?window=5m&group_by=model` over 50 label sets
//!
//! Run: `cargo bench --bench pipeline` (≈ 1 minute). Throughput is in events (syscalls).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};

use llm_slo_agent::agent::Store;
use llm_slo_agent::assemble::{Assembler, AssemblerConfig};
use llm_slo_agent::record::RequestRecord;
use llm_slo_agent::ringbuf;
use llm_slo_agent::skel::l7::types::llmslo_event_hdr;
use llm_slo_agent::stats::{route_of, Aggregator, AggregatorConfig, Labels};

/// Keep-alive connections open at once, requests per connection, content events per request.
const CONNS: usize = 8;
const REQS_PER_CONN: usize = 25;
const TOKENS: usize = 128;
/// Records kept by the agent for `/api/v1/requests` (config default).
const RECENT: usize = 10_000;
/// A fixed wall clock (unix seconds) for the aggregator's time slots.
const NOW_S: u64 = 1_700_000_000;

const KIND_ACCEPT: u16 = 1;
const KIND_READ: u16 = 2;
const KIND_WRITE: u16 = 3;
const KIND_CLOSE: u16 = 4;
const HEAD_CAP: usize = 4096;
const TAIL_CAP: usize = 512;

/// One event before serialisation.
struct Ev {
    ts: u64,
    conn: usize,
    kind: u16,
    ret: i64,
    queued_ts: u64,
    payload: Vec<u8>,
}

/// Serialises one record exactly as the BPF side submits it: the header, then the copied
/// head bytes and tail bytes (`bpf_ringbuf_output(.., sizeof(hdr) + n, ..)`).
fn raw(ev: &Ev) -> Vec<u8> {
    let n = ev.payload.len();
    let (head, tail): (&[u8], &[u8]) = if n <= HEAD_CAP {
        (&ev.payload, &[])
    } else {
        (
            &ev.payload[..HEAD_CAP],
            &ev.payload[n - TAIL_CAP.min(n - HEAD_CAP)..],
        )
    };
    let mut h = llmslo_event_hdr {
        ts_enter: ev.ts,
        ts_exit: ev.ts + 4_000,
        sock_id: 0xffff_8881_0a3c_0000 + (ev.conn as u64) * 0x1000,
        queued_ts: ev.queued_ts,
        cgroup_id: 4242,
        ret: ev.ret,
        tgid: 3100,
        tid: 3100 + (ev.conn as u32 % 4),
        fd: 20 + ev.conn as u32,
        head_len: head.len() as u32,
        tail_len: tail.len() as u32,
        kind: ev.kind,
        family: 2,
        lport: 8000,
        rport: 40_000 + ev.conn as u16,
        ..Default::default()
    };
    h.laddr[..4].copy_from_slice(&[10, 200, 0, 2]);
    h.raddr[..4].copy_from_slice(&[10, 200, 0, 1]);
    for (d, s) in h.comm.iter_mut().zip(b"python3") {
        *d = *s as _;
    }
    // SAFETY: reading the bytes of a plain repr(C) value (`plain::Plain` is implemented for
    // it in src/ringbuf.rs).
    let bytes = unsafe { plain::as_bytes(&h) };
    [bytes, head, tail].concat()
}

/// A ~600-byte streaming chat completion request, as an OpenAI client sends it.
fn request(conn: usize, i: usize) -> Vec<u8> {
    let prompt = "Summarise the following paragraph about distributed inference serving in three \
                  sentences, keeping every number exact. The cluster runs eight replicas behind \
                  a load balancer and each replica batches up to sixty-four sequences.";
    let body = format!(
        r#"{{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{prompt}"}}],"stream":true,"stream_options":{{"include_usage":true}},"max_tokens":{TOKENS},"temperature":0.7}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 10.200.0.2:8000\r\nUser-Agent: OpenAI/Python 1.54.3\r\n\
         Accept: application/json\r\nContent-Type: application/json\r\nx-request-id: {conn}-{i}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ndate: Tue, 04 Nov 2025 10:00:00 GMT\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n";

/// One SSE event as one HTTP chunk (one write, like vLLM behind uvicorn).
fn chunk(event: &str) -> Vec<u8> {
    let mut c = format!("{:x}\r\n", event.len()).into_bytes();
    c.extend_from_slice(event.as_bytes());
    c.extend_from_slice(b"\r\n");
    c
}

/// The events of one connection: accept, then per request a read, the response head, a
/// role chunk, `TOKENS` content chunks, the usage chunk, `[DONE]` and the terminator; close.
fn connection(conn: usize, start: u64) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut t = start;
    let mut push = |t: u64, kind: u16, queued_ts: u64, payload: Vec<u8>| {
        let ret = if matches!(kind, KIND_READ | KIND_WRITE) {
            payload.len() as i64
        } else {
            (20 + conn) as i64
        };
        out.push(Ev {
            ts: t,
            conn,
            kind,
            ret,
            queued_ts,
            payload,
        });
    };
    push(t, KIND_ACCEPT, 0, Vec::new());
    let token = chunk(
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"}}]}\n\n",
    );
    let role = chunk(
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    );
    let usage = chunk(&format!(
        "data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":112,\"total_tokens\":{},\"completion_tokens\":{TOKENS}}}}}\n\n",
        112 + TOKENS
    ));
    let done = chunk("data: [DONE]\n\n");
    for i in 0..REQS_PER_CONN {
        t += 3_000_000 + (conn as u64 * 137_000); // think time between requests
        let queued = t;
        t += 40_000;
        push(t, KIND_READ, queued, request(conn, i));
        t += 60_000_000; // queue + prefill
        push(t, KIND_WRITE, 0, RESPONSE_HEAD.to_vec());
        t += 50_000;
        push(t, KIND_WRITE, 0, role.clone());
        for k in 0..TOKENS {
            t += 18_000_000 + (k as u64 % 7) * 300_000; // decode steps
            push(t, KIND_WRITE, 0, token.clone());
        }
        t += 100_000;
        push(t, KIND_WRITE, 0, usage.clone());
        t += 20_000;
        push(t, KIND_WRITE, 0, done.clone());
        t += 10_000;
        push(t, KIND_WRITE, 0, b"0\r\n\r\n".to_vec());
    }
    t += 5_000_000;
    push(t, KIND_CLOSE, 0, Vec::new());
    out
}

/// All connections' records, merged in time order as the ring buffer delivers them.
fn workload() -> Vec<Vec<u8>> {
    let mut evs: Vec<Ev> = (0..CONNS)
        .flat_map(|c| connection(c, 1_000_000_000 + c as u64 * 11_000_000))
        .collect();
    evs.sort_by_key(|e| (e.ts, e.conn));
    evs.iter().map(raw).collect()
}

fn pod_of(rec: &RequestRecord) -> String {
    format!("vllm-{}", (rec.sock_id >> 12) % 4)
}

/// Checks the workload assembles into what it should before anything is timed.
fn check(records: &[Vec<u8>]) {
    let mut asm = Assembler::new(AssemblerConfig::default());
    let mut recs = Vec::new();
    for r in records {
        let ev = ringbuf::decode(r).expect("decodable record");
        asm.on_event(&ev, &mut |r| recs.push(r));
    }
    assert_eq!(recs.len(), CONNS * REQS_PER_CONN, "one record per request");
    for r in &recs {
        assert!(r.streaming && !r.aborted && r.status == Some(200), "{r:?}");
        assert_eq!(r.output_events as usize, TOKENS);
        assert_eq!(r.output_tokens, Some(TOKENS as u32));
        assert_eq!(r.token_ns.itl_ms().count(), TOKENS - 1);
        assert_eq!(r.path.as_deref(), Some("/v1/chat/completions"));
        assert_eq!(r.model.as_deref(), Some("meta-llama/Llama-3.1-8B-Instruct"));
        assert!(r.ttft_ms.is_some() && r.e2e_ms.is_some());
    }
    let unparsed: u64 = asm.stats().unparsed.iter().sum();
    assert_eq!(unparsed, 0, "nothing unparsed");
    let bytes: usize = records.iter().map(Vec::len).sum();
    eprintln!(
        "workload: {} events ({} connections x {} requests x {} content events), {} records, {:.1} MiB of ring-buffer records",
        records.len(),
        CONNS,
        REQS_PER_CONN,
        TOKENS,
        recs.len(),
        bytes as f64 / (1 << 20) as f64
    );
}

fn hot_path(c: &mut Criterion) {
    let records = workload();
    check(&records);
    let n = records.len() as u64;

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(n));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for r in &records {
                let ev = ringbuf::decode(black_box(r)).unwrap();
                acc = acc.wrapping_add(ev.ret as u64 ^ ev.head.len() as u64);
            }
            black_box(acc)
        })
    });

    let mut asm = Assembler::new(AssemblerConfig::default());
    let mut out: Vec<RequestRecord> = Vec::with_capacity(256);
    g.bench_function("assemble", |b| {
        b.iter(|| {
            for r in &records {
                let ev = ringbuf::decode(black_box(r)).unwrap();
                asm.on_event(&ev, &mut |r| out.push(r));
            }
            let k = out.len();
            out.clear();
            black_box(k)
        })
    });

    // As the BPF thread: records batched per poll, labelled (pod from discovery), then
    // `Store::push` (labels + Aggregator::record + the recent-requests ring).
    let mut asm = Assembler::new(AssemblerConfig::default());
    let mut store = Store::new(
        (
            RECENT,
            llm_slo_agent::config::Config::default().recent_requests_bytes,
        ),
        Aggregator::new(AggregatorConfig::default()),
        llm_slo_agent::slo::SloEngine::new(vec![]).expect("no SLOs"),
    );
    let mut pending: Vec<RequestRecord> = Vec::with_capacity(256);
    g.bench_function("full", |b| {
        b.iter(|| {
            for r in &records {
                let ev = ringbuf::decode(black_box(r)).unwrap();
                asm.on_event(&ev, &mut |r| pending.push(r));
            }
            for mut r in pending.drain(..) {
                r.pod = Some(pod_of(&r));
                store.push(r, NOW_S);
            }
            black_box(store.recent.len())
        })
    });
    g.finish();
}

/// An aggregator holding `sets` label sets (pods × models), each with `per_set` streaming
/// records spread over the last 5 minutes.
fn filled_aggregator(sets: usize, per_set: usize) -> Aggregator {
    let records = workload();
    let mut asm = Assembler::new(AssemblerConfig::default());
    let mut recs = Vec::new();
    for r in &records {
        asm.on_event(&ringbuf::decode(r).unwrap(), &mut |r| recs.push(r));
    }
    let mut agg = Aggregator::new(AggregatorConfig {
        max_label_sets: sets.max(200),
        ..Default::default()
    });
    for s in 0..sets {
        for k in 0..per_set {
            let rec = &recs[(s * 7 + k) % recs.len()];
            let labels = Labels {
                namespace: format!("team-{}", s % 5),
                pod: format!("vllm-{}-7d9c5b8f4-x{s:03}", s / 5),
                model: format!("model-{}", s % 5),
                route: route_of(rec.path.as_deref()),
                ..Default::default()
            };
            agg.record(rec, labels, NOW_S - 290 + (k as u64 * 290 / per_set as u64));
        }
    }
    agg
}

fn series_lines(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

fn queries(c: &mut Criterion) {
    let mut g = c.benchmark_group("render");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for sets in [5usize, 50, 200] {
        let mut agg = filled_aggregator(sets, 20);
        let mut out = String::new();
        agg.render(NOW_S, &mut out);
        eprintln!(
            "render: {sets} label sets -> {} series lines, {} KiB",
            series_lines(&out),
            out.len() / 1024
        );
        g.bench_with_input(BenchmarkId::new("label_sets", sets), &sets, |b, _| {
            b.iter(|| {
                let mut out = String::with_capacity(1 << 20);
                agg.render(NOW_S, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("breakdown");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut agg = filled_aggregator(50, 20);
    let v = agg.breakdown(NOW_S, 300, &["model"]);
    eprintln!(
        "breakdown: 50 label sets, window 5m, group_by=model -> {} groups",
        v["groups"].as_array().map_or(0, Vec::len)
    );
    g.bench_function("5m_by_model_50_sets", |b| {
        b.iter(|| {
            let v = agg.breakdown(NOW_S, 300, &["model"]);
            black_box(serde_json::to_vec(&v).unwrap().len())
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    hot_path(&mut c);
    queries(&mut c);
    c.final_summary();
}
