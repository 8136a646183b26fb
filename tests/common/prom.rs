//! Prometheus for the tests: a PromQL reader (metric names a query selects, bracket balance)
//! and a real Prometheus server (Debian's package) scraping the agent, queried over its API.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, http_get};

const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OPERATOR_KEYWORDS: [&str; 8] = [
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

/// Index just past the bracket that closes the one at `open` (strings inside skipped).
fn skip_group(b: &[u8], open: usize, close: u8) -> usize {
    let opener = b[open];
    let mut depth = 0;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => i = skip_string(b, i, q) - 1,
            c if c == opener => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// Index just past the string literal that starts at `i` with quote `q`; None: unterminated.
fn string_end(b: &[u8], mut i: usize, q: u8) -> Option<usize> {
    i += 1;
    while i < b.len() {
        if b[i] == b'\\' && q != b'`' {
            i += 2;
            continue;
        }
        if b[i] == q {
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

fn skip_string(b: &[u8], i: usize, q: u8) -> usize {
    string_end(b, i, q).unwrap_or(b.len())
}

/// Metric names a PromQL expression selects: identifiers that are not functions, aggregations,
/// keywords, label names (in `{…}` or `by (…)`-style lists), numbers or durations.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_string(b, i, c),
            b'{' => i = skip_group(b, i, b'}'),
            b'[' => i = skip_group(b, i, b']'),
            b'0'..=b'9' | b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let lower = word.to_ascii_lowercase();
                let j = next_non_space(i);
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if b.get(j) == Some(&b'(') {
                        i = skip_group(b, j, b')');
                    }
                } else if AGGREGATIONS.contains(&lower.as_str())
                    || OPERATOR_KEYWORDS.contains(&lower.as_str())
                    || b.get(j) == Some(&b'(')
                {
                    // aggregation, keyword or function call
                } else {
                    out.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Brackets and quotes balance (a cheap syntax check that needs no Prometheus).
pub fn balanced(expr: &str) -> bool {
    let b = expr.as_bytes();
    let mut stack = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                match string_end(b, i, q) {
                    Some(end) => i = end,
                    None => return false,
                }
                continue;
            }
            c @ (b'(' | b'[' | b'{') => stack.push(c),
            c @ (b')' | b']' | b'}') => {
                let open = match c {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    stack.is_empty()
}

/// A Prometheus server on a temp dir; killed and the dir removed on drop (also on panic).
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

pub fn prometheus_bin() -> PathBuf {
    let from_env = std::env::var_os("PROMETHEUS").map(PathBuf::from);
    from_env
        .into_iter()
        .chain([PathBuf::from("/usr/bin/prometheus")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "prometheus not found ($PROMETHEUS, /usr/bin/prometheus): `make test` installs \
                 Debian's prometheus package (apt-get install prometheus)"
            )
        })
}

impl Prometheus {
    pub fn start(scrape: SocketAddr) -> Prometheus {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = std::env::temp_dir().join(format!("llmslo-prom-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: llm-slo-agent\n    static_configs:\n      \
                 - targets: ['{scrape}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning prometheus");
        let mut p = Prometheus { child, addr, dir };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited during start-up ({st}):\n{}", p.log());
            }
            if let Ok((200, _)) = http_get(p.addr, "/-/ready") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "prometheus not ready after 30 s:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (code, body) =
            http_get(self.addr, path).unwrap_or_else(|e| panic!("prometheus GET {path}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("prometheus GET {path}: HTTP {code}, not JSON ({e}): {body}")
        })
    }

    /// Instant query at now.
    pub fn query(&self, expr: &str) -> Value {
        self.get_json(&format!("/api/v1/query?query={}", urlencode(expr)))
    }

    /// Waits until Prometheus holds the requests the agent has counted (`sum` of
    /// `llmslo_requests_total` in the agent's exposition, read now): a scrape after the load.
    pub fn wait_caught_up(&self, agent_exposition: &str, within: Duration) {
        let want = super::family_sum(agent_exposition, "llmslo_requests_total");
        let t0 = Instant::now();
        loop {
            let v = self.query("sum(llmslo_requests_total)");
            let have = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
            if have >= want {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "prometheus has {have} requests, the agent {want}: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until Prometheus reports the agent's target healthy (scraped, up).
    pub fn wait_scraped(&self, within: Duration) {
        let t0 = Instant::now();
        loop {
            let v = self.get_json("/api/v1/targets?state=active");
            let targets = v["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if targets.iter().any(|t| t["health"] == "up") {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "prometheus never scraped the agent: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill with the pid of our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sample names in a text exposition (`name{…} value` and `name value` lines).
pub fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// What a query result holds: (ok, number of series or 1 for a scalar, message).
pub fn judge(v: &Value) -> (bool, usize, String) {
    if v["status"] != "success" {
        return (
            false,
            0,
            format!("{}: {}", v["errorType"], v["error"].as_str().unwrap_or("")),
        );
    }
    let r = &v["data"]["result"];
    let n = match v["data"]["resultType"].as_str() {
        Some("scalar") | Some("string") => usize::from(r.is_array()),
        _ => r.as_array().map_or(0, Vec::len),
    };
    (
        n > 0,
        n,
        if n > 0 {
            String::new()
        } else {
            "empty result".into()
        },
    )
}
