//! Token writes counted in the kernel: arming from a whole token event (arm.rs), and token
//! records continuing a response exactly as the writes they stand for would have.

use super::tests::*;
use super::{AssemblerConfig, StreamArm};
use crate::event::EventKind;
use crate::record::Ts;

/// A token record of `starts` (absolute write starts) and `bytes`, as ringbuf.rs decodes one.
fn tokens(s: &mut Sim, sock: u64, starts: &[u64], bytes: u64) {
    let deltas: Vec<u8> = starts
        .iter()
        .flat_map(|t| ((t - starts[0]) as u32).to_ne_bytes())
        .collect();
    let t = s.t;
    s.t = starts[0];
    s.ev(EventKind::Tokens, sock, bytes as i64, &deltas, b"");
    s.t = t.max(starts[starts.len() - 1] + 1000);
}

/// Accept, a chat request, the SSE head and the role event, then `first` token events as
/// chunked writes. Returns their write starts.
fn stream_start(s: &mut Sim, first: &[&str]) -> Vec<u64> {
    s.accept(SOCK);
    s.read(SOCK, &chat_request(""));
    s.write(SOCK, SSE_HEAD);
    s.write(SOCK, &chunk(&role_event()));
    first
        .iter()
        .map(|w| s.write(SOCK, &chunk(&token_event(w))).0)
        .collect()
}

/// The next request on `SOCK` and the head of its streamed response.
fn next_response(s: &mut Sim) {
    s.read(SOCK, &chat_request(""));
    s.write(SOCK, SSE_HEAD);
}

#[test]
fn the_first_whole_token_event_arms_the_connection_for_its_later_responses() {
    let arming = AssemblerConfig {
        arm_streams: true,
        ..Default::default()
    };
    let mut s = Sim::with(arming.clone());
    stream_start(&mut s, &["Hel", "lo"]);
    let arms: Vec<StreamArm> = s.a.take_arms().collect();
    assert_eq!(arms.len(), 1, "one arm per response");
    let a = &arms[0];
    let ev = token_event("Hel");
    assert_eq!((a.sock_id, a.chunked), (SOCK, true));
    assert_eq!([&a.prefix[..], b"Hel", &a.suffix[..]].concat(), ev);
    assert!(a.prefix.ends_with(b"\"content\":\""));
    assert_eq!(
        a.varying_runs(),
        ("c1".into(), String::new()),
        "the id's value may vary, nothing else"
    );
    assert_eq!(s.a.stats().streams_armed, 1);
    // The next response's token writes are counted from its first: no token event comes, and
    // the connection is not armed again.
    s.write(SOCK, b"0\r\n\r\n");
    next_response(&mut s);
    s.write(SOCK, &chunk(&role_event()));
    let c = chunk(&token_event("x"));
    let t0 = s.t;
    // The record carries its first write's counters: they mark the first token.
    let first = crate::event::Inside {
        tid: 4242,
        runq_ns: Some(31_000),
        gpu: None,
    };
    s.inside = Some(first);
    tokens(&mut s, SOCK, &[t0, t0 + 1000], 2 * c.len() as u64);
    // A token event after counted ones (say, one the kernel left out) arms nothing either.
    s.write(SOCK, &chunk(&token_event("w")));
    s.write(SOCK, &chunk(&usage_event()));
    s.write(SOCK, b"0\r\n\r\n");
    assert_eq!(s.recs.len(), 2);
    assert_eq!(
        s.recs[1].timestamps.get(Ts::Token1),
        Some(t0),
        "first token: counted"
    );
    assert_eq!(s.a.take_arms().count(), 0, "counted: not armed again");
    // A response whose token events come as events (the arm did not fit) arms it again.
    next_response(&mut s);
    s.write(SOCK, &chunk(&token_event("y")));
    assert_eq!(s.a.take_arms().count(), 1);
    // Responses that ended before the arm was taken (short streams, within one batch of
    // events): the arm serves the next one, so it is kept; of several, the last is given.
    s.write(SOCK, b"0\r\n\r\n");
    for _ in 0..3 {
        next_response(&mut s);
        s.write(SOCK, &chunk(&token_event("z")));
        s.write(SOCK, b"0\r\n\r\n");
    }
    let kept: Vec<StreamArm> = s.a.take_arms().collect();
    assert_eq!(kept.len(), 1, "one arm for the connection");
    assert_eq!(kept[0].sock_id, SOCK);
    // Not for a connection closed since: it would serve nothing.
    next_response(&mut s);
    s.write(SOCK, &chunk(&token_event("z")));
    s.write(SOCK, b"0\r\n\r\n");
    s.close(SOCK);
    assert_eq!(s.a.take_arms().count(), 0, "closed");
    assert_eq!(
        s.a.stats().streams_armed,
        6,
        "each response shown a token event"
    );
    // Not with arming off (the library's default).
    let mut off = Sim::new();
    stream_start(&mut off, &["Hel", "lo"]);
    assert_eq!(off.a.take_arms().count(), 0);
    // Arms not taken pile up to a bound, then responses go unarmed.
    let mut full = Sim::with(arming);
    for i in 0..super::arm::ARMS_PENDING as u64 + 10 {
        full.accept(SOCK + i);
        full.read(SOCK + i, &chat_request(""));
        full.write(SOCK + i, SSE_HEAD);
        full.write(SOCK + i, &chunk(&token_event("x")));
    }
    assert_eq!(full.a.take_arms().count(), super::arm::ARMS_PENDING);
    assert_eq!(
        full.a.stats().streams_armed,
        super::arm::ARMS_PENDING as u64
    );
}

#[test]
fn token_records_continue_the_response_like_their_writes() {
    // The same stream twice: every write an event, and its middle tokens as token records.
    let words = ["a", "b", "c", "d", "e", "f"];
    let run = |counted: bool| {
        let mut s = Sim::new();
        let mut starts = stream_start(&mut s, &words[..2]);
        let mut bytes = 0;
        let mut mid = Vec::new();
        for w in &words[2..5] {
            let c = chunk(&token_event(w));
            if counted {
                mid.push(s.t);
                s.t += 1000;
                bytes += c.len() as u64;
            } else {
                starts.push(s.write(SOCK, &c).0);
            }
        }
        if counted {
            tokens(&mut s, SOCK, &mid, bytes);
            starts.extend(&mid);
        }
        starts.push(s.write(SOCK, &chunk(&token_event(words[5]))).0);
        s.write(SOCK, &chunk(&usage_event()));
        s.write(SOCK, &chunk(&sse_event("[DONE]")));
        let (last, _) = s.write(SOCK, b"0\r\n\r\n");
        assert_eq!(s.recs.len(), 1);
        let r = s.recs.pop().unwrap();
        assert_eq!(r.token_ns, starts);
        assert_eq!(r.timestamps.get(Ts::RespLast), Some(last));
        (r, s.a.stats().clone())
    };
    let (plain, _) = run(false);
    let (counted, st) = run(true);
    assert_eq!(counted.output_events, 6);
    assert_eq!(counted.output_tokens, plain.output_tokens);
    assert_eq!(counted.response_bytes, plain.response_bytes);
    assert_eq!((st.token_writes, st.token_writes_misplaced), (3, 0));
    assert_eq!(st.unparsed, [0; super::UnparsedReason::COUNT]);
}

#[test]
fn misplaced_token_records_are_a_gap() {
    // Mid-event (the last write ended inside an event): the record is a gap in the body, and
    // the event it cut is lost, not the stream.
    let mut s = Sim::new();
    stream_start(&mut s, &["a"]);
    let ev = token_event("b");
    let c = chunk(&ev);
    let cut = c.len() - 10;
    s.write(SOCK, &c[..cut]);
    let t = s.t;
    tokens(&mut s, SOCK, &[t], 10);
    s.write(SOCK, &chunk(&token_event("c")));
    s.write(SOCK, b"0\r\n\r\n");
    assert_eq!(s.recs.len(), 1);
    assert_eq!(s.recs[0].output_events, 2, "a and c; b's event was cut");
    assert_eq!(s.a.stats().token_writes_misplaced, 1);
    // Before any response head: dropped, and the connection goes on.
    let mut h = Sim::new();
    h.accept(SOCK);
    h.read(SOCK, &chat_request(""));
    let t = h.t;
    tokens(&mut h, SOCK, &[t, t + 10], 200);
    assert_eq!(h.a.stats().token_writes_misplaced, 2);
    h.write(SOCK, SSE_HEAD);
    h.write(SOCK, &chunk(&token_event("a")));
    h.write(SOCK, b"0\r\n\r\n");
    assert_eq!((h.recs.len(), h.recs[0].output_events), (1, 1));
    assert_eq!(h.total_unparsed(), 0);
    // For a connection never seen: counted, dropped, and it makes no connection.
    let mut u = Sim::new();
    let t = u.t;
    tokens(&mut u, 77, &[t], 50);
    assert_eq!(u.a.stats().conns_active, 0);
    assert_eq!(u.a.stats().token_writes_misplaced, 1);
}
