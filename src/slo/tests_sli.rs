//! What counts as good, bad or not counted, request by request ("What counts" in `super`).

use super::sli::{availability, goodput, latency, Metric, Verdict};
use crate::record::{RequestRecord, Stage, Ts};
use Verdict::{Bad, Good, Skip};

const MS: u64 = 1_000_000;
const T0: u64 = 1_000 * MS;

/// A finished streaming request: read at T0, tokens at `ttft` then after each gap (ms).
pub(super) fn stream(ttft_ms: u64, gaps_ms: &[u64]) -> RequestRecord {
    streamed(ttft_ms, gaps_ms, true)
}

fn streamed(ttft_ms: u64, gaps_ms: &[u64], complete: bool) -> RequestRecord {
    let mut tokens = vec![T0 + ttft_ms * MS];
    for g in gaps_ms {
        tokens.push(tokens[tokens.len() - 1] + g * MS);
    }
    let last = tokens[tokens.len() - 1];
    let mut r = base(true);
    r.timestamps.set(Ts::Token1, tokens[0]);
    r.timestamps.set(Ts::TokenN, last);
    if complete {
        r.timestamps.set(Ts::RespLast, last + MS);
    }
    r.aborted = !complete;
    r.token_ns = tokens.into();
    r.finish(false);
    r
}

/// A finished non-streaming request answered after `e2e_ms`.
pub(super) fn plain(e2e_ms: u64, status: u16) -> RequestRecord {
    let mut r = base(false);
    r.status = Some(status);
    r.timestamps.set(Ts::RespLast, T0 + e2e_ms * MS);
    r.finish(false);
    r
}

fn base(streaming: bool) -> RequestRecord {
    let mut r = RequestRecord {
        streaming,
        status: Some(200),
        ..Default::default()
    };
    r.timestamps.set(Ts::SockQueued, T0);
    r.timestamps.set(Ts::ReadFirst, T0);
    r.timestamps.set(Ts::ReadDone, T0 + MS);
    r.timestamps.set(Ts::RespFirst, T0 + 2 * MS);
    r
}

/// Cut before any response byte: kind of response unknown.
fn aborted_before_head() -> RequestRecord {
    let mut r = RequestRecord {
        aborted: true,
        ..Default::default()
    };
    r.timestamps.set(Ts::ReadFirst, T0);
    r.timestamps.set(Ts::ReadDone, T0 + MS);
    r.finish(false);
    r
}

/// Cut mid-stream after `ttft` and `gaps`: no resp_last.
fn aborted_stream(ttft_ms: u64, gaps_ms: &[u64]) -> RequestRecord {
    streamed(ttft_ms, gaps_ms, false)
}

fn lat(m: &str, thr: f64, r: &RequestRecord) -> (Verdict, Verdict) {
    let m = Metric::parse(m).unwrap();
    (latency(m, thr, r, true), latency(m, thr, r, false))
}

#[test]
fn threshold_is_inclusive_as_vllm_goodput() {
    let r = stream(500, &[20, 30]);
    assert_eq!(r.ttft_ms, Some(500.0));
    assert_eq!(lat("ttft", 500.0, &r).0, Good);
    assert_eq!(lat("ttft", 499.999, &r).0, Bad);
    // TPOT = 25 ms, largest gap 30 ms.
    assert_eq!(lat("tpot", 25.0, &r).0, Good);
    assert_eq!(lat("itl", 29.0, &r).0, Bad, "one gap over: bad");
    assert_eq!(lat("itl", 30.0, &r).0, Good, "every gap within");
    assert_eq!(lat("e2e", 551.0, &r).0, Good);
    assert_eq!(lat("e2e", 550.0, &r).0, Bad);
    assert_eq!(lat("stage:queue_prefill", 499.0, &r).0, Good);
    assert_eq!(lat("stage:queue_prefill", 498.0, &r).0, Bad);
}

#[test]
fn missing_metric_on_completed_request_is_not_counted() {
    let r = plain(800, 200);
    assert_eq!(
        lat("ttft", 500.0, &r),
        (Skip, Skip),
        "non-streaming: no TTFT"
    );
    assert_eq!(lat("itl", 50.0, &r), (Skip, Skip));
    assert_eq!(lat("tpot", 50.0, &r), (Skip, Skip));
    assert_eq!(lat("e2e", 500.0, &r).0, Bad);
    assert_eq!(lat("stage:inference", 800.0, &r).0, Good);
    assert_eq!(lat("stage:container_network", 1.0, &r), (Skip, Skip));
    // A stream that ended without content: no token metric applies.
    let mut empty = base(true);
    empty.timestamps.set(Ts::RespLast, T0 + 5 * MS);
    empty.finish(false);
    assert_eq!(lat("ttft", 500.0, &empty), (Skip, Skip));
    assert_eq!(lat("itl", 50.0, &empty), (Skip, Skip));
}

#[test]
fn single_token_stream_meets_itl_and_tpot() {
    let r = stream(100, &[]);
    assert_eq!(r.tpot_ms, None);
    assert_eq!(r.token_ns.itl_ms().count(), 0);
    assert_eq!(lat("itl", 1.0, &r), (Good, Good));
    assert_eq!(lat("tpot", 1.0, &r), (Good, Good));
}

#[test]
fn aborted_before_first_token_is_bad_unless_ignored() {
    let r = aborted_before_head();
    assert_eq!(lat("ttft", 500.0, &r), (Bad, Skip));
    assert_eq!(lat("itl", 50.0, &r), (Bad, Skip));
    assert_eq!(lat("e2e", 500.0, &r), (Bad, Skip));
    assert_eq!(lat("stage:queue_prefill", 500.0, &r), (Bad, Skip));
    assert_eq!(
        lat("stage:inference", 500.0, &r),
        (Bad, Skip),
        "kind unknown"
    );
    // Measured before the abort: complete, judged on its value.
    assert_eq!(lat("stage:request_read", 5.0, &r), (Good, Good));
    assert_eq!(
        lat("stage:socket_wait", 5.0, &r),
        (Skip, Skip),
        "hook, not abort"
    );

    // The head said event-stream: inference would never have existed.
    let mut s = base(true);
    s.aborted = true;
    s.finish(false);
    assert_eq!(lat("ttft", 500.0, &s), (Bad, Skip));
    assert_eq!(lat("stage:inference", 500.0, &s), (Skip, Skip));
    // The head said JSON: no token metric would have existed.
    let mut p = base(false);
    p.aborted = true;
    p.finish(false);
    assert_eq!(lat("ttft", 500.0, &p), (Skip, Skip));
    assert_eq!(lat("tpot", 50.0, &p), (Skip, Skip));
    assert_eq!(lat("stage:inference", 500.0, &p), (Bad, Skip));
    assert_eq!(lat("e2e", 500.0, &p), (Bad, Skip));
}

#[test]
fn aborted_mid_stream_keeps_conclusive_values() {
    let r = aborted_stream(200, &[20, 90]);
    assert_eq!(r.e2e_ms, None);
    assert_eq!(lat("ttft", 500.0, &r), (Good, Good), "TTFT is complete");
    assert_eq!(lat("ttft", 100.0, &r), (Bad, Bad));
    assert_eq!(lat("itl", 50.0, &r), (Bad, Bad), "a 90 ms gap stays");
    assert_eq!(
        lat("itl", 100.0, &r),
        (Bad, Skip),
        "the last gap is unknown"
    );
    assert_eq!(lat("tpot", 100.0, &r), (Bad, Skip));
    assert_eq!(lat("e2e", 60_000.0, &r), (Bad, Skip));
}

#[test]
fn availability_counts_server_errors_and_aborts() {
    assert_eq!(availability(&plain(10, 200), true), Good);
    assert_eq!(availability(&plain(10, 404), true), Good, "client error");
    assert_eq!(availability(&plain(10, 503), true), Bad);
    let a = aborted_before_head();
    assert_eq!(availability(&a, true), Bad);
    assert_eq!(availability(&a, false), Skip);
    let mut unknown = plain(10, 200);
    unknown.status = None;
    assert_eq!(availability(&unknown, true), Skip);
}

#[test]
fn goodput_needs_every_threshold_and_success() {
    let all = |spec: &[(&str, f64)]| -> Vec<(Metric, f64)> {
        spec.iter()
            .map(|(m, t)| (Metric::parse(m).unwrap(), *t))
            .collect()
    };
    let ttft_tpot = all(&[("ttft", 500.0), ("tpot", 50.0)]);
    assert_eq!(goodput(&ttft_tpot, &stream(400, &[40, 40]), true), Good);
    assert_eq!(goodput(&ttft_tpot, &stream(600, &[40, 40]), true), Bad);
    assert_eq!(goodput(&ttft_tpot, &stream(400, &[40, 70]), true), Bad);
    let mut err = stream(100, &[10]);
    err.status = Some(500);
    assert_eq!(goodput(&ttft_tpot, &err, true), Bad, "fast but failed");
    // TTFT does not apply to a plain response; a missed E2E still makes it bad.
    let ttft_e2e = all(&[("ttft", 500.0), ("e2e", 1000.0)]);
    assert_eq!(goodput(&ttft_e2e, &plain(900, 200), true), Skip);
    assert_eq!(goodput(&ttft_e2e, &plain(1100, 200), true), Bad);
    // Cut short: never good. Ignored unless a threshold is conclusively missed.
    let cut = aborted_stream(100, &[10]);
    let ttft_only = all(&[("ttft", 500.0)]);
    assert_eq!(goodput(&ttft_only, &cut, true), Bad);
    assert_eq!(goodput(&ttft_only, &cut, false), Skip);
    assert_eq!(goodput(&all(&[("ttft", 50.0)]), &cut, false), Bad);
}

#[test]
fn metric_names() {
    assert_eq!(Metric::parse("ttft").unwrap(), Metric::Ttft);
    assert_eq!(
        Metric::parse("stage:queue_prefill").unwrap(),
        Metric::Stage(Stage::QueuePrefill)
    );
    for bad in ["TTFT", "e2el", "stage:", "stage:prefill", "itl_p99", ""] {
        let e = Metric::parse(bad).unwrap_err().to_string();
        assert!(e.contains("unknown metric"), "{bad}: {e}");
    }
}
