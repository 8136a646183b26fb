//! Allocations on the agent's userspace hot path (ring-buffer record → decode → assembler →
//! `Store::push`), counted by a global allocator: a streamed token event allocates nothing once
//! its connection has answered a request like it, and a request's allocations do not grow with
//! its token count. The records are the pipeline bench's (`benches/workload`), fed twice through
//! one assembler and store: the first pass warms them, the second is counted.
//! No kernel needed.

use llm_slo_agent::agent::Store;
use llm_slo_agent::assemble::{Assembler, AssemblerConfig};
use llm_slo_agent::config::Config;
use llm_slo_agent::event::EventKind;
use llm_slo_agent::record::RequestRecord;
use llm_slo_agent::ringbuf;
use llm_slo_agent::slo::SloEngine;
use llm_slo_agent::stats::{Aggregator, AggregatorConfig};
use workload::{workload, Shape};

#[path = "../benches/workload/mod.rs"]
mod workload;

#[path = "common/alloc_count.rs"]
mod alloc_count;

/// What the counted pass allocated.
#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    /// Content events (one token write each) after the first response of their connection.
    warm_tokens: u64,
    warm_token_allocs: u64,
    /// Every other event of the pass, the first responses' tokens included.
    other_events: u64,
    other_allocs: u64,
    /// `Store::push` of the pass's records.
    push_allocs: u64,
}

fn is_token(head: &[u8]) -> bool {
    memchr::memmem::find(head, b"\"content\":\"tok\"").is_some()
}

fn run(shape: Shape) -> Counts {
    let records = workload(shape);
    let mut asm = Assembler::new(AssemblerConfig::default());
    let cfg = Config::default();
    let mut store = Store::new(
        (cfg.recent_requests, cfg.recent_requests_bytes),
        Aggregator::new(AggregatorConfig::default()),
        SloEngine::new(vec![]).expect("no SLOs"),
    );
    let mut done: Vec<RequestRecord> = Vec::with_capacity(1024);
    let push = |done: &mut Vec<RequestRecord>, store: &mut Store| {
        for mut r in done.drain(..) {
            r.pod = Some(format!("vllm-{}", r.sock_id % 4));
            store.push(r, 1_700_000_000);
        }
    };
    for r in &records {
        let ev = ringbuf::decode(r).expect("decodable record");
        asm.on_event(&ev, &mut |r| done.push(r));
    }
    push(&mut done, &mut store);

    let mut c = Counts::default();
    // Reads seen per connection in this pass: a token write after the first is warm.
    let mut reads = std::collections::HashMap::with_capacity(shape.conns);
    for r in &records {
        let ev = ringbuf::decode(r).expect("decodable record");
        let warm = match ev.kind {
            EventKind::Read => {
                *reads.entry(ev.sock_id).or_insert(0u32) += 1;
                false
            }
            EventKind::Write => is_token(ev.head) && reads.get(&ev.sock_id) > Some(&1),
            _ => false,
        };
        let before = alloc_count::get();
        asm.on_event(&ev, &mut |r| done.push(r));
        let n = alloc_count::get() - before;
        if warm {
            c.warm_tokens += 1;
            c.warm_token_allocs += n;
        } else {
            c.other_events += 1;
            c.other_allocs += n;
        }
        c.requests += done.len() as u64;
        let before = alloc_count::get();
        push(&mut done, &mut store);
        c.push_allocs += alloc_count::get() - before;
    }
    assert_eq!(
        c.requests,
        (shape.conns * shape.reqs_per_conn) as u64,
        "one record a request"
    );
    eprintln!("{shape:?}: {c:?}");
    c
}

#[test]
fn token_events_allocate_nothing_and_requests_a_bounded_number() {
    let short = run(Shape {
        conns: 8,
        reqs_per_conn: 6,
        tokens: 16,
    });
    let long = run(Shape {
        conns: 8,
        reqs_per_conn: 6,
        tokens: 512,
    });
    for c in [&short, &long] {
        assert!(c.warm_tokens >= 8 * 5 * 16, "{c:?}");
        assert_eq!(c.warm_token_allocs, 0, "token events that allocated: {c:?}");
    }
    // Per request: its strings (method, path, model, command, pod) and record, the store's
    // entries; not its events, nor its addresses (kept as addresses). 12.0 on 2026-12-08.
    let per_request = |c: &Counts| (c.other_allocs + c.push_allocs) as f64 / c.requests as f64;
    assert!(
        per_request(&short) <= 16.0,
        "{:.1} allocations a 16-token request: {short:?}",
        per_request(&short)
    );
    assert!(
        per_request(&long) <= per_request(&short) + 2.0,
        "a 512-token request {:.1} allocations, a 16-token one {:.1}",
        per_request(&long),
        per_request(&short)
    );
}
