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
use llm_slo_agent::stats::{route_of, Aggregator, AggregatorConfig, Labels};
use workload::{workload, Shape};

mod workload;

/// 8 keep-alive connections × 25 requests × 128 content events.
const SHAPE: Shape = Shape {
    conns: 8,
    reqs_per_conn: 25,
    tokens: 128,
};
/// Records kept by the agent for `/api/v1/requests` (config default).
const RECENT: usize = 10_000;
/// A fixed wall clock (unix seconds) for the aggregator's time slots.
const NOW_S: u64 = 1_700_000_000;

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
    assert_eq!(
        recs.len(),
        SHAPE.conns * SHAPE.reqs_per_conn,
        "one record per request"
    );
    for r in &recs {
        assert!(r.streaming && !r.aborted && r.status == Some(200), "{r:?}");
        assert_eq!(r.output_events as usize, SHAPE.tokens);
        assert_eq!(r.output_tokens, Some(SHAPE.tokens as u32));
        assert_eq!(r.token_ns.itl_ms().count(), SHAPE.tokens - 1);
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
        SHAPE.conns,
        SHAPE.reqs_per_conn,
        SHAPE.tokens,
        recs.len(),
        bytes as f64 / (1 << 20) as f64
    );
}

fn hot_path(c: &mut Criterion) {
    let records = workload(SHAPE);
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
    let records = workload(SHAPE);
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
