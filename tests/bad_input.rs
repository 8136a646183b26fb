//! Kernel test of hostile and broken traffic to a traced server (issue: reliability): binary
//! garbage, HTTP/2 prior knowledge, a TLS ClientHello, a 64 KiB request line, a truncated
//! request and a request written one byte at a time, interleaved with well-formed load. The
//! agent keeps running, counts what it cannot parse by reason, and records the good ones.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::node::{server_pod, PORT};
use common::{kernel_tests_enabled, Agent};
use testbed::{CgroupDriver, LoadConfig};

fn send_raw(addr: SocketAddr, bytes: &[u8], one_at_a_time: bool) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if one_at_a_time {
        for b in bytes {
            s.write_all(std::slice::from_ref(b)).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
    } else {
        let _ = s.write_all(bytes);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn metric(metrics: &str, series: &str) -> f64 {
    common::metric(metrics, series).unwrap_or(0.0)
}

#[test]
fn hostile_traffic_is_counted_and_good_requests_still_recorded() {
    if !kernel_tests_enabled("hostile_traffic_is_counted_and_good_requests_still_recorded") {
        return;
    }
    let sp = server_pod(
        "badinput",
        CgroupDriver::Systemd,
        "llmslo-synth-server",
        &["--decode-ms", "1"],
    );
    let agent = Agent::start(&["--no-auto", "--target-cgroup", sp.cg.cgroup_path()]);
    let addr = sp.pod.addr(PORT);

    let good = std::thread::spawn(move || {
        let mut cfg = LoadConfig::new(addr);
        cfg.connections = 2;
        cfg.requests = 40;
        cfg.max_tokens = Some(5);
        testbed::loadgen::run(&cfg).unwrap()
    });
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80)
        .collect();
    send_raw(addr, &garbage, false);
    send_raw(
        addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        false,
    );
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ];
    hello.extend(std::iter::repeat_n(0x42u8, 200));
    send_raw(addr, &hello, false);
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
    send_raw(addr, long_line.as_bytes(), false);
    send_raw(
        addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Le",
        false,
    );
    let body =
        r#"{"model":"synth-llm","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let slow = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = send_raw(addr, slow.as_bytes(), true);
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "server answered the byte-by-byte request"
    );
    let good = good.join().unwrap();
    assert!(good.iter().all(|c| c.status == 200));

    let dst = format!("{}:{PORT}", sp.pod.ip());
    let recs = agent.wait_requests(Duration::from_secs(10), |r| {
        r.iter()
            .filter(|x| x["dst"] == dst.as_str() && x["status"] == 200)
            .count()
            >= 41
    });
    let ok: Vec<_> = recs
        .iter()
        .filter(|x| x["dst"] == dst.as_str() && x["status"] == 200)
        .collect();
    assert_eq!(
        ok.len(),
        41,
        "40 well-formed requests + the byte-by-byte one, all recorded"
    );
    assert!(ok
        .iter()
        .all(|r| r["model"] == "synth-llm" && r["path"] == "/v1/chat/completions"));

    // The parse counters are read every 500 ms, apart from the records: wait for a reading
    // that has them all (a missing one never comes, and fails below).
    let un_in = |m: &str, reason: &str| {
        metric(
            m,
            &format!("llmslo_agent_requests_unparsed_total{{reason=\"{reason}\"}}"),
        )
    };
    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        ["http2", "tls", "not_http"]
            .iter()
            .all(|r| un_in(m, r) >= 1.0)
            && un_in(m, "header_too_large") + un_in(m, "truncated") >= 1.0
    });
    let un = |reason: &str| un_in(&m, reason);
    assert!(
        un("http2") >= 1.0,
        "HTTP/2 preface counted:\n{}",
        m.lines()
            .filter(|l| l.contains("unparsed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(un("tls") >= 1.0, "TLS ClientHello counted");
    assert!(un("not_http") >= 1.0, "binary garbage counted");
    assert!(
        un("header_too_large") + un("truncated") >= 1.0,
        "64 KiB request line counted"
    );
    assert_eq!(
        common::http_get(agent.addr, "/healthz").unwrap().0,
        200,
        "agent still alive"
    );
}
