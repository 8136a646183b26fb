//! A recorded Kubernetes API server for tests: serves `GET /api/v1/pods` (a PodList) and its
//! watch (`?watch=true`, chunked JSON lines) from fixtures under tests/fixtures/k8s, the way
//! kube-apiserver does: events after the client's resourceVersion, bookmarks, and a 410 Gone
//! ERROR that makes the client re-list. Loopback only; stops (and drops every connection) on
//! `stop` or drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Reads `tests/fixtures/k8s/<name>` with `${KEY}` placeholders replaced.
pub fn fixture(name: &str, vars: &HashMap<&str, String>) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(name);
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    for (k, v) in vars {
        text = text.replace(&format!("${{{k}}}"), v);
    }
    assert!(
        !text.contains("${"),
        "{name}: a placeholder was left unfilled"
    );
    serde_json::from_str(&text).unwrap()
}

#[derive(Default)]
struct State {
    /// uid -> pod, as the list answers.
    pods: Vec<Value>,
    rv: u64,
    /// (resourceVersion, event); an ERROR event ends the watch that sends it.
    log: Vec<(u64, Value)>,
    /// Requests seen ("list" or "watch rv=N"), for assertions.
    requests: Vec<String>,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl ApiServer {
    /// Serves `list` (a PodList) until stopped.
    pub fn start(list: Value) -> ApiServer {
        ApiServer::start_on("127.0.0.1:0", list)
    }

    pub fn start_on(addr: &str, list: Value) -> ApiServer {
        let listener = TcpListener::bind(addr).expect("bind fixture API server");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let st = State {
            pods: list["items"].as_array().cloned().unwrap_or_default(),
            rv: rv_of(&list),
            ..Default::default()
        };
        let state = Arc::new((Mutex::new(st), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (s2, st2, c2) = (state.clone(), stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !st2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        if let Ok(c) = conn.try_clone() {
                            c2.lock().unwrap().push(c);
                        }
                        let (s3, st3) = (s2.clone(), st2.clone());
                        std::thread::spawn(move || serve(conn, &s3, &st3));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ApiServer {
            addr,
            state,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Plays one recorded watch event: ADDED/MODIFIED/DELETED change the pod list too;
    /// BOOKMARK only moves the resourceVersion; ERROR (410) expires every older version.
    pub fn push(&self, ev: &Value) {
        let (m, cv) = &*self.state;
        let mut st = m.lock().unwrap();
        let kind = ev["type"].as_str().unwrap_or("");
        let obj = &ev["object"];
        let rv = if kind == "ERROR" {
            st.rv + 5
        } else {
            rv_of(obj)
        };
        assert!(
            rv > st.rv,
            "fixture resourceVersions must grow: {rv} after {}",
            st.rv
        );
        st.rv = rv;
        let uid = obj["metadata"]["uid"].clone();
        match kind {
            "ADDED" | "MODIFIED" => {
                st.pods.retain(|p| p["metadata"]["uid"] != uid);
                st.pods.push(obj.clone());
            }
            "DELETED" => st.pods.retain(|p| p["metadata"]["uid"] != uid),
            _ => {}
        }
        st.log.push((rv, ev.clone()));
        cv.notify_all();
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap().requests.clone()
    }

    /// Closes the listener and every connection: the API is unreachable from now on.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query(target: &str) -> HashMap<String, String> {
    target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn serve(conn: TcpStream, state: &(Mutex<State>, Condvar), stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    // HTTP/1.1 keep-alive: kube reuses connections for the list and the next watch.
    for _ in 0..1000 {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split(' ').nth(1).unwrap_or("/").to_string();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let q = query(&target);
        let path = target.split('?').next().unwrap_or("");
        if path != "/api/v1/pods" {
            let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#;
            if respond(&mut w, 404, body).is_err() {
                return;
            }
            continue;
        }
        if q.get("watch").is_some_and(|v| v == "true" || v == "1") {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290u64)
                .min(290);
            state
                .0
                .lock()
                .unwrap()
                .requests
                .push(format!("watch rv={from}"));
            watch(&mut w, state, stop, from, Duration::from_secs(timeout));
            // A watch ends its connection (`conns` holds a clone: close it for real).
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
        let body = {
            let mut st = state.0.lock().unwrap();
            st.requests.push(format!("list {target}"));
            serde_json::json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": st.pods,
            })
            .to_string()
        };
        if respond(&mut w, 200, &body).is_err() {
            return;
        }
    }
}

fn respond(w: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = if code == 200 { "OK" } else { "Not Found" };
    write!(
        w,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(w: &mut TcpStream, line: &str) -> std::io::Result<()> {
    write!(w, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    w.flush()
}

/// Streams the events after `from` as kube-apiserver does, until the timeout, an ERROR event,
/// or stop. A client whose version an expiry (410) overtook gets that ERROR at once.
fn watch(
    w: &mut TcpStream,
    state: &(Mutex<State>, Condvar),
    stop: &AtomicBool,
    from: u64,
    timeout: Duration,
) {
    if write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let end = Instant::now() + timeout;
    let mut sent = from;
    let (m, cv) = state;
    let mut st = m.lock().unwrap();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let pending: Vec<(u64, Value)> = st
            .log
            .iter()
            .filter(|(rv, _)| *rv > sent)
            .cloned()
            .collect();
        for (rv, ev) in pending {
            let is_error = ev["type"] == "ERROR";
            drop(st);
            if chunk(w, &ev.to_string()).is_err() {
                return;
            }
            sent = rv;
            if is_error {
                let _ = write!(w, "0\r\n\r\n");
                return;
            }
            st = m.lock().unwrap();
        }
        st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
    }
    drop(st);
    let _ = write!(w, "0\r\n\r\n");
}
