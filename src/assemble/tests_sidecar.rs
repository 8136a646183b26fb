//! The sidecar join: a proxy in the pod (its client connection and its upstream pool to the
//! app) and the app behind it, as the kernel reports their syscalls.

use super::tests::*;
use crate::event::EventKind;
use crate::record::{Stage, Ts};

const NGINX: u32 = 500;

/// The sidecar's connection from client `n`.
fn front(n: u16) -> Who {
    Who {
        tgid: NGINX,
        comm: "nginx",
        local: "10.0.0.2:15006".parse().unwrap(),
        remote: format!("10.0.0.9:{}", 40000 + n).parse().unwrap(),
    }
}
/// The sidecar's upstream connection `n` to the app, and the app's end of it.
fn upstream(n: u16) -> Who {
    Who {
        tgid: NGINX,
        comm: "nginx",
        local: format!("127.0.0.1:{}", 50000 + n).parse().unwrap(),
        remote: "127.0.0.1:8000".parse().unwrap(),
    }
}
fn app(n: u16) -> Who {
    let u = upstream(n);
    Who {
        tgid: 4242,
        comm: "vllm",
        local: u.remote,
        remote: u.local,
    }
}
const FRONT: u64 = 0x1000;
const UP: u64 = 0x2000;
const APP: u64 = 0x3000;

fn body(prompt: &str) -> String {
    format!(r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#)
}
/// The request as the client sends it, and as the proxy forwards it (other headers).
fn client_req(prompt: &str) -> Vec<u8> {
    let b = body(prompt);
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: pod\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}
fn proxied_req(prompt: &str) -> Vec<u8> {
    let b = body(prompt);
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: backend\r\nX-Forwarded-For: 10.0.0.9\r\nConnection: \r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}
const DONE: &[u8] = b"data: [DONE]\n\n";

impl Sim {
    fn io(&mut self, who: &Who, kind: EventKind, sock: u64, b: &[u8]) -> (u64, u64) {
        self.ev_as(who, kind, sock, b.len() as i64, b, b"")
    }
    fn accept_as(&mut self, who: &Who, sock: u64) {
        self.ev_as(who, EventKind::Accept, sock, 17, b"", b"");
    }
    /// A streamed response of `tokens` content events written by `who` on `sock`; returns
    /// the write time of the first token and of the last byte.
    fn stream(&mut self, who: &Who, sock: u64, tokens: usize) -> (u64, u64) {
        self.io(who, EventKind::Write, sock, SSE_HEAD);
        let mut first = 0;
        for i in 0..tokens {
            let t = self
                .io(who, EventKind::Write, sock, &chunk(&token_event("x")))
                .0;
            if i == 0 {
                first = t;
            }
        }
        self.io(who, EventKind::Write, sock, &chunk(DONE));
        let last = self.io(who, EventKind::Write, sock, b"0\r\n\r\n").0;
        (first, last)
    }
}

#[test]
fn a_request_through_a_sidecar_is_one_record_with_both_sidecar_stages() {
    let mut s = Sim::new();
    let (f, u, a) = (front(1), upstream(1), app(1));
    s.accept_as(&f, FRONT);
    s.queued = Some(s.t);
    let sidecar_read = s.io(&f, EventKind::Read, FRONT, &client_req("hi")).1;
    let sidecar_write = s.io(&u, EventKind::Write, UP, &proxied_req("hi")).0;
    s.accept_as(&a, APP);
    let app_read = s.io(&a, EventKind::Read, APP, &proxied_req("hi")).1;
    let (app_tok1, app_last) = s.stream(&a, APP, 3);
    // The proxy relays the response (its reads of the upstream are not requests).
    s.io(&u, EventKind::Read, UP, SSE_HEAD);
    assert!(
        s.recs.is_empty(),
        "the app's record waits for the sidecar's"
    );
    let (client_tok1, client_last) = s.stream(&f, FRONT, 3);

    assert_eq!(s.recs.len(), 1, "one record per request: {:#?}", s.recs);
    let r = &s.recs[0];
    let sc = r.sidecar.as_ref().expect("sidecar info");
    assert_eq!((sc.pid, sc.comm.as_str()), (NGINX, "nginx"));
    assert_eq!(sc.upstream, u.local.to_string());
    assert_eq!(r.pid, 4242, "the app's request");
    assert_eq!(r.src, Some(f.remote), "the real client");
    let ts = &r.timestamps;
    assert_eq!(ts.get(Ts::SidecarRead), Some(sidecar_read));
    assert_eq!(ts.get(Ts::SidecarWrite), Some(sidecar_write));
    assert_eq!(ts.get(Ts::ReadFirst), Some(app_read));
    assert_eq!(ts.get(Ts::Token1), Some(app_tok1));
    assert_eq!(ts.get(Ts::SidecarToken1), Some(client_tok1));
    assert_eq!(ts.get(Ts::SidecarLast), Some(client_last));
    assert!(ts.get(Ts::SidecarQueued).is_some());
    let start = r.start_ns.unwrap();
    assert_eq!(r.origin, Some("sidecar_queued"));
    assert_eq!(r.ttft_ms, Some((client_tok1 - start) as f64 / 1e6));
    assert_eq!(r.e2e_ms, Some((client_last - start) as f64 / 1e6));
    assert_eq!(
        r.stages.get(Stage::SidecarInbound),
        Some(app_read - ts.get(Ts::SidecarQueued).unwrap())
    );
    assert_eq!(
        r.stages.get(Stage::SidecarOutbound),
        Some(client_last - app_last)
    );
    assert_eq!(
        sc.outbound_first_token_ms,
        Some((client_tok1 - app_tok1) as f64 / 1e6)
    );
    assert_eq!(
        r.stages.in_e2e_sum(),
        client_last - start,
        "stages partition E2E"
    );
    assert_eq!(r.token_ns.itl_ms().count(), 2, "ITL as the client saw it");
    assert_eq!(s.a.stats().sidecar.joined, 1);
    assert_eq!(s.a.stats().requests, 1);
}

#[test]
fn requests_multiplexed_over_an_upstream_pool_join_by_content_not_by_time() {
    let mut s = Sim::new();
    let (f1, f2) = (front(1), front(2));
    let (u1, u2) = (upstream(1), upstream(2));
    let (a1, a2) = (app(1), app(2));
    s.accept_as(&f1, FRONT + 1);
    s.accept_as(&f2, FRONT + 2);
    s.accept_as(&a1, APP + 1);
    s.accept_as(&a2, APP + 2);
    // Client 1 asks "one", client 2 "two"; the proxy forwards "two" first, on upstream 1.
    s.io(&f1, EventKind::Read, FRONT + 1, &client_req("one"));
    s.io(&f2, EventKind::Read, FRONT + 2, &client_req("two"));
    s.io(&u1, EventKind::Write, UP + 1, &proxied_req("two"));
    s.io(&u2, EventKind::Write, UP + 2, &proxied_req("one"));
    s.io(&a1, EventKind::Read, APP + 1, &proxied_req("two"));
    s.io(&a2, EventKind::Read, APP + 2, &proxied_req("one"));
    // The app answers "one" with 2 tokens, "two" with 5; the clients get them in turn.
    s.stream(&a2, APP + 2, 2);
    s.stream(&a1, APP + 1, 5);
    s.stream(&f2, FRONT + 2, 5);
    s.stream(&f1, FRONT + 1, 2);
    assert_eq!(s.recs.len(), 2);
    for r in &s.recs {
        let sc = r.sidecar.as_ref().expect("joined");
        let (client, up) = if r.output_events == 2 {
            (&f1, &u2)
        } else {
            (&f2, &u1)
        };
        assert_eq!(r.src, Some(client.remote));
        assert_eq!(sc.upstream, up.local.to_string());
        assert_eq!(r.token_ns.len() as u32, r.output_events, "{r:?}");
    }
    assert_eq!(s.a.stats().sidecar.joined, 2);
}

#[test]
fn identical_requests_pair_in_the_order_the_sidecar_read_and_forwarded_them() {
    let mut s = Sim::new();
    let fronts = [front(1), front(2), front(3)];
    let ups = [upstream(1), upstream(2), upstream(3)];
    let apps = [app(1), app(2), app(3)];
    for i in 0..3 {
        s.accept_as(&fronts[i], FRONT + i as u64);
        s.accept_as(&apps[i], APP + i as u64);
    }
    for (i, f) in fronts.iter().enumerate() {
        s.io(f, EventKind::Read, FRONT + i as u64, &client_req("same"));
    }
    // Forwarded in read order, over the pool in reverse.
    for i in 0..3 {
        let j = 2 - i;
        s.io(
            &ups[j],
            EventKind::Write,
            UP + j as u64,
            &proxied_req("same"),
        );
        s.io(
            &apps[j],
            EventKind::Read,
            APP + j as u64,
            &proxied_req("same"),
        );
    }
    // Completions in yet another order: client i's request went to upstream 2 - i.
    for i in [1usize, 0, 2] {
        s.stream(&apps[2 - i], APP + (2 - i) as u64, 1);
        s.stream(&fronts[i], FRONT + i as u64, 1);
    }
    assert_eq!(s.recs.len(), 3);
    for r in &s.recs {
        let i = fronts.iter().position(|f| r.src == Some(f.remote)).unwrap();
        assert_eq!(
            r.sidecar.as_ref().unwrap().upstream,
            ups[2 - i].local.to_string()
        );
    }
}

#[test]
fn the_sidecars_record_may_complete_first() {
    let mut s = Sim::new();
    let (f, u, a) = (front(1), upstream(1), app(1));
    s.accept_as(&f, FRONT);
    s.accept_as(&a, APP);
    s.io(&f, EventKind::Read, FRONT, &client_req("race"));
    s.io(&u, EventKind::Write, UP, &proxied_req("race"));
    s.io(&a, EventKind::Read, APP, &proxied_req("race"));
    // The app's last write is reported after the proxy already relayed everything.
    s.io(&a, EventKind::Write, APP, SSE_HEAD);
    s.io(&a, EventKind::Write, APP, &chunk(&token_event("x")));
    s.stream(&f, FRONT, 1);
    assert!(
        s.recs.is_empty(),
        "the sidecar's record waits for the app's"
    );
    s.io(&a, EventKind::Write, APP, &chunk(DONE));
    s.io(&a, EventKind::Write, APP, b"0\r\n\r\n");
    assert_eq!(s.recs.len(), 1);
    assert!(s.recs[0].sidecar.is_some());
}

#[test]
fn without_a_partner_a_record_is_handed_out_alone_after_waiting() {
    let mut s = Sim::new();
    let (f, u) = (front(1), upstream(1));
    s.accept_as(&f, FRONT);
    s.io(&f, EventKind::Read, FRONT, &client_req("lonely"));
    // Forwarded to an upstream that is not traced: no app record will come.
    s.io(&u, EventKind::Write, UP, &proxied_req("lonely"));
    s.stream(&f, FRONT, 2);
    assert!(s.recs.is_empty());
    let now = s.t + 10_000_000_000;
    let recs = &mut s.recs;
    s.a.expire(now, &mut |r| recs.push(r));
    assert_eq!(s.recs.len(), 1);
    let r = &s.recs[0];
    assert_eq!(r.pid, NGINX);
    assert!(r.sidecar.is_none());
    assert_eq!(r.stages.get(Stage::SidecarInbound), None);
    assert_eq!(s.a.stats().sidecar.unjoined, 1);
    assert_eq!(s.a.held(), 0);
}

#[test]
fn a_server_without_a_sidecar_has_no_sidecar_stages() {
    let mut s = Sim::new();
    sse_prefix(&mut s);
    s.write(SOCK, &chunk(&token_event("x")));
    s.write(SOCK, b"0\r\n\r\n");
    assert_eq!(s.recs.len(), 1, "handed out at once");
    let r = &s.recs[0];
    assert!(r.sidecar.is_none());
    for st in [Stage::SidecarInbound, Stage::SidecarOutbound] {
        assert_eq!(r.stages.get(st), None);
    }
    let json = serde_json::to_value(r).unwrap();
    assert!(json.get("sidecar").is_none());
}

#[test]
fn a_request_body_split_differently_has_the_same_fingerprint() {
    use super::sidecar::Fingerprint;
    let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut a = Fingerprint::default();
    a.start("POST", "/v1/completions", true);
    a.feed(&big[..4096]);
    a.gap(10_000 - 4096 - 512);
    a.feed(&big[10_000 - 512..]);
    let mut b = Fingerprint::default();
    b.start("POST", "/rewritten", true);
    for part in big.chunks(1000) {
        b.feed(part);
    }
    assert_eq!(a.finish(), b.finish());
    let mut c = Fingerprint::default();
    c.start("POST", "/v1/completions", true);
    let mut other = big.clone();
    other[9_990] ^= 1;
    c.feed(&other);
    assert_ne!(a.finish(), c.finish(), "the end of the body counts");
}
