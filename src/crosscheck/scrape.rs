//! Reaching a server's `/metrics`: where it is (127.0.0.1 when it shares the agent's network
//! namespace, else its pod's address read from `/proc/<pid>/net/`), and a small blocking
//! HTTP/1.1 GET with a deadline and a size bound.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// How a GET ended.
#[derive(Debug, PartialEq)]
pub enum Fetch {
    /// 200 with this body.
    Ok(Vec<u8>),
    /// 404: the server has no metrics there.
    NotFound,
    /// Anything else, said in a few words.
    Failed(String),
}

/// The response head is never longer than this.
const MAX_HEAD: usize = 16 * 1024;

/// GET `path` from `addr` (`Connection: close`). `on_connect` gets the socket's local address
/// before the request is sent: the agent marks the connection as its own there, before the
/// server can answer it. The whole exchange must finish within `timeout`; a body beyond
/// `max_bytes` fails.
pub fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
    on_connect: impl FnOnce(SocketAddr),
) -> Fetch {
    let deadline = Instant::now() + timeout;
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Fetch::Failed(format!("connect {addr}: {e}")),
    };
    if let Ok(local) = s.local_addr() {
        on_connect(local);
    }
    let host = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: llm-slo-agent-crosscheck\r\nAccept: text/plain;version=0.0.4\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s
        .set_write_timeout(Some(timeout))
        .and_then(|_| s.write_all(req.as_bytes()))
    {
        return Fetch::Failed(format!("send: {e}"));
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = [0u8; 64 * 1024];
    let limit = max_bytes + MAX_HEAD;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Fetch::Failed("timed out".into());
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return Fetch::Failed(format!("socket: {e}"));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > limit {
                    return Fetch::Failed(format!("response larger than {max_bytes} bytes"));
                }
                // Done early when a Content-Length body is complete (servers may keep the
                // connection open despite `Connection: close`).
                if let Ok(Some(done)) = complete_len(&buf) {
                    if buf.len() >= done {
                        buf.truncate(done);
                        break;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Fetch::Failed("timed out".into())
            }
            Err(e) => return Fetch::Failed(format!("read: {e}")),
        }
    }
    parse_response(&buf, max_bytes)
}

/// Where a response head ends and what it says: (head length, status, content length, chunked).
type Head = (usize, u16, Option<usize>, bool);

fn head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err("response head too long".into())
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not text")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    if !parts.next().unwrap_or("").starts_with("HTTP/1.") {
        return Err("not an HTTP/1 response".into());
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or("bad status line")?;
    let (mut len, mut chunked) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = Some(v.parse().map_err(|_| "bad content-length")?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(Some((end + 4, status, len, chunked)))
}

/// The total length of a response with a Content-Length, once its head is in.
fn complete_len(buf: &[u8]) -> Result<Option<usize>, String> {
    Ok(match head(buf)? {
        Some((h, _, Some(len), false)) => Some(h + len),
        _ => None,
    })
}

/// Interprets a complete response (read until close or Content-Length).
pub fn parse_response(buf: &[u8], max_bytes: usize) -> Fetch {
    let (h, status, len, chunked) = match head(buf) {
        Ok(Some(x)) => x,
        Ok(None) => return Fetch::Failed("connection closed before a response".into()),
        Err(e) => return Fetch::Failed(e),
    };
    match status {
        200 => {}
        404 => return Fetch::NotFound,
        s => return Fetch::Failed(format!("HTTP {s}")),
    }
    let raw = &buf[h..];
    let body = if chunked {
        match dechunk(raw, max_bytes) {
            Ok(b) => b,
            Err(e) => return Fetch::Failed(e),
        }
    } else {
        match len {
            Some(n) if raw.len() < n => return Fetch::Failed("body cut short".into()),
            Some(n) => raw[..n].to_vec(),
            None => raw.to_vec(),
        }
    };
    if body.len() > max_bytes {
        return Fetch::Failed(format!("response larger than {max_bytes} bytes"));
    }
    Fetch::Ok(body)
}

/// Decodes a chunked body (extensions and trailers ignored).
fn dechunk(mut raw: &[u8], max_bytes: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let nl = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short")?;
        let size_txt = std::str::from_utf8(&raw[..nl]).map_err(|_| "bad chunk size")?;
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16).map_err(|_| "bad chunk size")?;
        raw = &raw[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > max_bytes || out.len() + size > max_bytes {
            return Err(format!("response larger than {max_bytes} bytes"));
        }
        if raw.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// The first non-loopback IPv4 address marked `/32 host LOCAL` in a `/proc/<pid>/net/fib_trie`:
/// an address of the namespace's own interfaces (the pod IP in a pod).
pub fn local_ipv4(fib_trie: &str) -> Option<Ipv4Addr> {
    let mut last: Option<Ipv4Addr> = None;
    for l in fib_trie.lines() {
        let t = l.trim_start().trim_start_matches(['|', '+', '-', ' ']);
        if let Ok(ip) = t
            .split_whitespace()
            .next()
            .unwrap_or("")
            .parse::<Ipv4Addr>()
        {
            last = Some(ip);
            continue;
        }
        if t.starts_with("/32 host LOCAL") {
            if let Some(ip) = last.filter(|ip| !ip.is_loopback() && !ip.is_unspecified()) {
                return Some(ip);
            }
        }
    }
    None
}

/// The first global-scope IPv6 address of a `/proc/<pid>/net/if_inet6` (not `lo`).
pub fn global_ipv6(if_inet6: &str) -> Option<Ipv6Addr> {
    if_inet6.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || f[3] != "00" || f[5] == "lo" || f[0].len() != 32 {
            return None;
        }
        let n = u128::from_str_radix(f[0], 16).ok()?;
        let ip = Ipv6Addr::from(n);
        (!ip.is_loopback()).then_some(ip)
    })
}

/// The address to reach `pid`'s server on `port` from the agent's network namespace.
pub fn address_of(proc_root: &Path, pid: u32, port: u16) -> Result<SocketAddr, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = proc_root.join(pid.to_string());
    let theirs = std::fs::metadata(dir.join("ns/net"))
        .map_err(|e| format!("netns of pid {pid}: {e}"))?
        .ino();
    let ours = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    if ours == Some(theirs) {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    let read = |f: &str| std::fs::read_to_string(dir.join("net").join(f)).unwrap_or_default();
    if let Some(ip) = local_ipv4(&read("fib_trie")) {
        return Ok(SocketAddr::from((ip, port)));
    }
    if let Some(ip) = global_ipv6(&read("if_inet6")) {
        return Ok(SocketAddr::from((ip, port)));
    }
    Err(format!("no address of pid {pid}'s network namespace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.77.1.0/24 2 0 2
        |-- 10.77.1.0
           /24 link UNICAST
        |-- 10.77.1.7
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
";

    #[test]
    fn pod_address_from_proc_net() {
        assert_eq!(local_ipv4(FIB), Some(Ipv4Addr::new(10, 77, 1, 7)));
        assert_eq!(
            local_ipv4("Local:\n  |-- 127.0.0.1\n     /32 host LOCAL\n"),
            None
        );
        assert_eq!(local_ipv4("garbage\n/32 host LOCAL\n"), None);
        let v6 = "00000000000000000000000000000001 01 80 10 80       lo\n\
                  fe800000000000000000000000000001 02 40 20 80     eth0\n\
                  fd000000000000000000000000000007 02 40 00 80     eth0\n";
        assert_eq!(global_ipv6(v6), Some("fd00::7".parse().unwrap()));
        assert_eq!(global_ipv6("short line\n"), None);
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(ok, 100), Fetch::Ok(b"hello".to_vec()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked, 100), Fetch::Ok(b"abcde".to_vec()));
        assert_eq!(
            parse_response(chunked, 4),
            Fetch::Failed("response larger than 4 bytes".into())
        );
        let close = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(
            parse_response(close, 100),
            Fetch::Ok(b"until close".to_vec())
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n", 10),
            Fetch::NotFound
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 500 Oops\r\n\r\n", 10),
            Fetch::Failed("HTTP 500".into())
        );
        for bad in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab",
        ] {
            assert!(
                matches!(parse_response(bad, 100), Fetch::Failed(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn get_against_a_local_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = c.read(&mut req).unwrap();
            let req = String::from_utf8_lossy(&req[..n]).to_string();
            // Keeps the connection open: the Content-Length ends the read.
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            std::thread::sleep(Duration::from_millis(500));
            req
        });
        let mut seen = None;
        let got = get(addr, "/metrics", Duration::from_secs(5), 1024, |a| {
            seen = Some(a)
        });
        assert_eq!(got, Fetch::Ok(b"ok".to_vec()));
        let req = t.join().unwrap();
        assert!(req.starts_with("GET /metrics HTTP/1.1\r\n"), "{req}");
        assert_eq!(seen.unwrap().ip(), addr.ip());
        // A server that accepts and never answers: the deadline holds.
        let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        let got = get(
            mute.local_addr().unwrap(),
            "/metrics",
            Duration::from_millis(300),
            10,
            |_| {},
        );
        assert_eq!(got, Fetch::Failed("timed out".into()));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // A body beyond the bound fails, whatever it says it is.
        let big = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let big_addr = big.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = big.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let _ = c.write_all(&vec![b'x'; 200_000]);
        });
        let got = get(big_addr, "/metrics", Duration::from_secs(5), 1000, |_| {});
        assert_eq!(got, Fetch::Failed("response larger than 1000 bytes".into()));
        t.join().unwrap();
        // Nothing listens on a port we just released.
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            get(gone, "/metrics", Duration::from_secs(1), 10, |_| {}),
            Fetch::Failed(_)
        ));
    }
}
