//! Tests of the assembler's failure paths and limits: unparsed traffic, gaps, aborts,
//! interim and bodiless responses, connection reuse, eviction, expiry, and arbitrary input.

use super::tests::*;
use super::*;
use crate::event::EventKind;
use crate::record::Ts;

const EPIPE: i64 = -32;
const EAGAIN: i64 = -11;

#[test]
fn gap_inside_request_head_is_truncated() {
    let mut s = Sim::new();
    s.accept(SOCK);
    let req = chat_request("");
    s.gapped(EventKind::Read, SOCK, &req, 20, 10);
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    s.read(SOCK, &req);
    s.close(SOCK);
    assert!(s.recs.is_empty());
    assert_eq!(
        (s.unparsed(UnparsedReason::Truncated), s.total_unparsed()),
        (1, 1)
    );
}

#[test]
fn gap_inside_response_head_is_truncated() {
    let mut s = Sim::new();
    s.read(SOCK, b"GET / HTTP/1.1\r\n\r\n");
    s.gapped(
        EventKind::Write,
        SOCK,
        &[
            b"HTTP/1.1 200 OK\r\nX: ".as_ref(),
            &[b'y'; 500],
            b"\r\n\r\n",
        ]
        .concat(),
        10,
        10,
    );
    s.close(SOCK);
    assert!(s.recs.is_empty());
    assert_eq!(s.unparsed(UnparsedReason::Truncated), 1);
}

#[test]
fn foreign_protocols_counted_once_without_records() {
    let mut tls = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    tls.extend([0xab; 64]);
    let garbage: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut long_line = b"GET /".to_vec();
    long_line.extend(vec![b'a'; 64 * 1024]);
    let cases: [(&[u8], UnparsedReason); 4] = [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", UnparsedReason::Http2),
        (&tls, UnparsedReason::Tls),
        (&garbage, UnparsedReason::NotHttp),
        (&long_line, UnparsedReason::HeaderTooLarge),
    ];
    for (bytes, why) in cases {
        let mut s = Sim::new();
        s.accept(SOCK);
        // Byte by byte first, then the rest, then more: still one count.
        s.read(SOCK, &bytes[..1]);
        s.read(SOCK, &bytes[1..]);
        s.read(SOCK, b" HTTP/1.1\r\n\r\n");
        s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        s.close(SOCK);
        assert!(s.recs.is_empty(), "{why:?}");
        assert_eq!((s.unparsed(why), s.total_unparsed()), (1, 1), "{why:?}");
    }
}

#[test]
fn chunked_request_with_lying_sizes() {
    for body in [
        &b"5\r\nhello, world\r\n0\r\n\r\n"[..],
        b"fffffffffffffffffff\r\n",
        b"3\r\nab",
        b"g\r\n",
    ] {
        let mut s = Sim::new();
        s.accept(SOCK);
        let mut req =
            b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        s.read(SOCK, &req);
        s.read(SOCK, b"\r\nGET / HTTP/1.1\r\n\r\n");
        s.write(
            SOCK,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        );
        s.close(SOCK);
        assert!(s.recs.is_empty());
        assert_eq!(s.unparsed(UnparsedReason::ChunkedFraming), 1, "{body:?}");
    }
}

#[test]
fn client_disconnect_mid_stream_is_aborted_with_tokens_so_far() {
    let mut s = Sim::new();
    sse_prefix(&mut s);
    s.write(SOCK, &chunk(&role_event()));
    let t1 = s.write(SOCK, &chunk(&token_event("a"))).0;
    let t2 = s.write(SOCK, &chunk(&token_event("b"))).0;
    s.write(SOCK, &chunk(&token_event("c")[..20]));
    s.ev(EventKind::Write, SOCK, EPIPE, b"", b"");
    assert_eq!(s.recs.len(), 1, "the error itself ends the request");
    s.close(SOCK);
    let r = &s.recs[0];
    assert!(r.aborted && r.e2e_ms.is_none());
    assert_eq!(r.token_ns, [t1, t2]);
    assert_eq!(
        (r.output_events, r.output_tokens, r.status),
        (2, Some(2), Some(200))
    );
    assert_eq!((s.a.stats().requests, s.a.stats().aborted), (1, 1));
}

#[test]
fn transient_errors_do_not_abort() {
    let mut s = Sim::new();
    s.ev(EventKind::Read, SOCK, EAGAIN, b"", b"");
    assert_eq!(
        s.a.stats().conns_active,
        0,
        "errors do not create connections"
    );
    s.read(SOCK, b"GET / HTTP/1.1\r\n\r\n");
    for e in [EAGAIN, -4, -512] {
        s.ev(EventKind::Read, SOCK, e, b"", b"");
        s.ev(EventKind::Write, SOCK, e, b"", b"");
    }
    s.ev(EventKind::Read, SOCK, 0, b"", b"");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((s.recs.len(), s.recs[0].aborted), (1, false));
}

#[test]
fn close_with_unanswered_and_partial_requests() {
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(
        SOCK,
        b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Le",
    );
    s.close(SOCK);
    let got: Vec<_> = s
        .recs
        .iter()
        .map(|r| (r.path.clone(), r.aborted, r.request_bytes))
        .collect();
    assert_eq!(
        got,
        [(Some("/a".into()), true, 19), (Some("/b".into()), true, 28)]
    );
    // Nothing read after the last response: nothing to report.
    let mut s = Sim::new();
    s.read(SOCK, b"GET / HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    s.read(SOCK, b"\r\n");
    s.close(SOCK);
    assert_eq!((s.recs.len(), s.a.stats().aborted), (1, 0));
}

#[test]
fn expect_100_continue() {
    let mut s = Sim::new();
    let body = r#"{"model":"m","prompt":"x"}"#;
    s.read(
        SOCK,
        format!(
            "POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    s.write(SOCK, b"HTTP/1.1 100 Continue\r\n\r\n");
    let done = s.read(SOCK, body.as_bytes()).1;
    let first = s
        .write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        .0;
    let r = &s.recs[0];
    assert_eq!(
        (r.status, r.model.as_deref(), r.aborted),
        (Some(200), Some("m"), false)
    );
    assert_eq!(
        (
            r.timestamps.get(Ts::RespFirst),
            r.timestamps.get(Ts::ReadDone)
        ),
        (Some(first), Some(done))
    );
    assert_eq!(r.response_bytes, 25 + 40);
}

#[test]
fn head_and_204_have_no_body() {
    let mut s = Sim::new();
    s.read(SOCK, b"HEAD /v1/models HTTP/1.1\r\n\r\n");
    s.write(
        SOCK,
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    s.read(SOCK, b"DELETE /x HTTP/1.1\r\n\r\n");
    s.write(
        SOCK,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
    );
    s.read(SOCK, b"GET /y HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 304 Not Modified\r\n\r\n");
    let st: Vec<_> = s.recs.iter().map(|r| (r.status, r.aborted)).collect();
    assert_eq!(
        st,
        [(Some(200), false), (Some(204), false), (Some(304), false)]
    );
}

#[test]
fn sock_id_reuse() {
    let mut s = Sim::new();
    s.accept(SOCK);
    s.read(SOCK, b"GET /one HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    s.close(SOCK);
    // Same sock id, a new connection speaking TLS: its own classification.
    s.accept(SOCK);
    s.read(SOCK, &[0x16, 0x03, 0x01]);
    s.close(SOCK);
    // Accept again without a close: the in-flight request is aborted, the new one is clean.
    s.accept(SOCK);
    s.read(SOCK, b"GET /two HTTP/1.1\r\n\r\n");
    let acc = s.accept(SOCK).1;
    s.read(SOCK, b"GET /three HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let got: Vec<_> = s
        .recs
        .iter()
        .map(|r| (r.path.clone().unwrap(), r.aborted))
        .collect();
    assert_eq!(
        got,
        [
            ("/one".into(), false),
            ("/two".into(), true),
            ("/three".into(), false)
        ]
    );
    assert_eq!(s.recs[2].timestamps.get(Ts::Accepted), Some(acc));
    assert_eq!(s.unparsed(UnparsedReason::Tls), 1);
}

#[test]
fn eviction_at_max_conns() {
    let mut s = Sim::with(AssemblerConfig {
        max_conns: 3,
        ..Default::default()
    });
    for i in 0..3 {
        s.accept(i);
        s.read(i, format!("GET /{i} HTTP/1.1\r\n\r\n").as_bytes());
    }
    s.write(0, b"HTTP/1.1 200"); // conn 0 is now the most recent; 1 is the oldest
    s.accept(3);
    assert_eq!(
        (s.a.stats().conns_evicted, s.a.stats().conns_active),
        (1, 3)
    );
    assert_eq!(
        (s.recs.len(), s.recs[0].path.as_deref(), s.recs[0].aborted),
        (1, Some("/1"), true)
    );
    s.write(0, b" OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        (s.recs[1].path.as_deref(), s.recs[1].aborted),
        (Some("/0"), false)
    );
}

#[test]
fn expire_idle_connections() {
    let mut s = Sim::with(AssemblerConfig {
        idle_timeout_ns: 10_000,
        ..Default::default()
    });
    s.accept(1);
    s.read(1, b"GET /idle HTTP/1.1\r\n\r\n");
    s.accept(2);
    let t = s.t;
    s.t += 20_000;
    s.read(2, b"GET /busy HTTP/1.1\r\n\r\n");
    let recs = &mut s.recs;
    s.a.expire(t + 15_000, &mut |r| recs.push(r));
    assert_eq!(
        (s.recs.len(), s.recs[0].path.as_deref(), s.recs[0].aborted),
        (1, Some("/idle"), true)
    );
    assert_eq!(
        (s.a.stats().conns_active, s.a.stats().conns_evicted),
        (1, 0)
    );
    let recs = &mut s.recs;
    s.a.expire(u64::MAX, &mut |r| recs.push(r));
    assert_eq!((s.recs.len(), s.a.stats().conns_active), (2, 0));
}

#[test]
fn client_side_connection_is_ignored_silently() {
    let mut s = Sim::new();
    s.write(
        SOCK,
        b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    );
    s.read(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    s.close(SOCK);
    assert!(s.recs.is_empty());
    assert_eq!(s.total_unparsed(), 0);
}

#[test]
fn joined_mid_stream_then_next_request() {
    let mut s = Sim::new();
    // A response to a request from before we started, then a clean request.
    s.write(SOCK, &[b"a\r\n".as_ref(), b"data: x\n\n\r\n"].concat());
    s.write(SOCK, b"0\r\n\r\n");
    s.read(SOCK, b"GET /next HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        (s.recs.len(), s.recs[0].path.as_deref()),
        (1, Some("/next"))
    );
    assert_eq!(s.recs[0].timestamps.get(Ts::Accepted), None);
}

#[test]
fn predating_connection_joined_mid_body_resyncs() {
    let mut s = Sim::new();
    // No accept: the tail of a request body, its response, then a clean request.
    s.read(SOCK, b"ssages\":[{\"role\":\"user\"}]}");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
    s.read(SOCK, b"GET /next HTTP/1.1\r\n\r\n");
    s.write(SOCK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        (s.recs.len(), s.recs[0].path.as_deref()),
        (1, Some("/next"))
    );
    assert_eq!(s.total_unparsed(), 0);
    // A predating connection that never speaks HTTP is declared so, once, eventually.
    let mut s = Sim::new();
    for _ in 0..100 {
        s.read(SOCK, b"\x00\x01binary protocol");
    }
    assert_eq!(
        (s.unparsed(UnparsedReason::NotHttp), s.total_unparsed()),
        (1, 1)
    );
}

#[test]
fn upgrade_ends_request_and_stops_parsing() {
    let mut s = Sim::new();
    s.read(
        SOCK,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    s.write(
        SOCK,
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello",
    );
    s.read(SOCK, &[0x81, 0x85, 1, 2, 3, 4, 5]);
    s.close(SOCK);
    assert_eq!(
        (s.recs.len(), s.recs[0].status, s.recs[0].aborted),
        (1, Some(101), false)
    );
    assert_eq!(s.total_unparsed(), 0);
}

/// Arbitrary bytes, splits and gaps must never panic or grow without bound.
#[test]
fn arbitrary_input_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n.max(1)
    };
    let mut valid = chat_request("");
    valid.extend_from_slice(SSE_HEAD);
    valid.extend([role_event(), token_event("x"), usage_event()].concat());
    let mut s = Sim::with(AssemblerConfig {
        max_conns: 8,
        max_head_bytes: 512,
        ..Default::default()
    });
    for _ in 0..20_000 {
        let sock = rnd(12);
        let mut buf = valid.clone();
        for _ in 0..rnd(4) {
            let i = rnd(buf.len() as u64) as usize;
            buf[i] = rnd(256) as u8;
        }
        let a = rnd(buf.len() as u64) as usize;
        let b = a + rnd((buf.len() - a) as u64) as usize;
        let piece = &buf[a..=b.min(buf.len() - 1)];
        match rnd(10) {
            0 => {
                s.accept(sock);
            }
            1 => {
                s.close(sock);
            }
            2 => {
                s.ev(EventKind::Write, sock, -(rnd(120) as i64), b"", b"");
            }
            3 | 4 => {
                let h = rnd(piece.len() as u64) as usize;
                let t = rnd((piece.len() - h) as u64) as usize;
                let kind = if rnd(2) == 0 {
                    EventKind::Read
                } else {
                    EventKind::Write
                };
                s.gapped(kind, sock, piece, h, t);
            }
            5 | 6 => {
                s.write(sock, piece);
            }
            _ => {
                s.read(sock, piece);
            }
        }
        // head + tail longer than ret: overlapping copies must be tolerated.
        if rnd(50) == 0 {
            s.ev(EventKind::Read, sock, 3, piece, piece);
        }
    }
    let recs = &mut s.recs;
    s.a.expire(u64::MAX, &mut |r| recs.push(r));
    assert_eq!(s.a.stats().conns_active, 0);
    assert_eq!(s.a.stats().requests, s.recs.len() as u64);
    assert!(s.recs.iter().enumerate().all(|(i, r)| r.id == i as u64 + 1));
}

#[test]
fn unparsed_reason_names() {
    let names: Vec<_> = UnparsedReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(
        names,
        [
            "not_http",
            "http2",
            "tls",
            "header_too_large",
            "malformed_request",
            "malformed_response",
            "chunked_framing",
            "truncated"
        ]
    );
    assert!(UnparsedReason::ALL
        .iter()
        .enumerate()
        .all(|(i, r)| *r as usize == i));
}
