//! The scrape thread: every interval, each traced server (one per network namespace) is
//! scraped once, off the BPF thread, with a deadline; its scrapes of the window are compared
//! with the agent's records of the same pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::compare::{compare, AgentObs, Scrape};
use super::scrape::{self, Fetch};
use super::source;
use super::{Crosscheck, ScrapeResult};
use crate::agent::{mono_ns, unix_now, Shared};

/// Ports tried per server when none is configured and none answered before.
const MAX_PORTS: usize = 4;
/// A server without metrics of ours is asked again after this many intervals.
const NOT_FOUND_BACKOFF: u32 = 8;

/// One server to scrape: a network namespace with traced processes.
#[derive(Debug, Default)]
struct Server {
    namespace: String,
    pod: String,
    pids: Vec<u32>,
}

pub fn spawn(shared: Arc<Shared>, proc_root: PathBuf) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("llmslo-crosscheck".into())
        .spawn(move || {
            if let Some(xc) = shared.crosscheck.clone() {
                run(&shared, &xc, &proc_root);
            }
        })?;
    Ok(())
}

fn run(shared: &Shared, xc: &Crosscheck, proc_root: &Path) {
    let interval = Duration::from_secs(xc.cfg.interval_s);
    while !shared.stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let servers = servers(shared, proc_root, xc.cfg.max_targets);
        xc.targets
            .lock()
            .expect("crosscheck lock")
            .retain(|ino, _| servers.contains_key(ino));
        for (ino, srv) in servers {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            scrape_one(shared, xc, proc_root, ino, srv, interval);
        }
        // Nothing joins this thread: a second between looks at `stop` (each wake-up of an idle
        // agent's threads costs a context switch each way).
        while t0.elapsed() < interval && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(interval.saturating_sub(t0.elapsed()).min(Duration::from_secs(1)));
        }
    }
}

/// The traced servers, by network namespace inode. Sidecars share their pod's namespace and
/// are not scraped themselves.
fn servers(shared: &Shared, proc_root: &Path, max: usize) -> BTreeMap<u64, Server> {
    use std::os::unix::fs::MetadataExt;
    let targets = shared
        .snapshot
        .read()
        .expect("snapshot lock")
        .targets
        .clone();
    let mount = crate::discovery::cgroup::cgroup2_mount();
    let mut out: BTreeMap<u64, Server> = BTreeMap::new();
    for t in targets.iter().filter(|t| !t.reason.starts_with("sidecar")) {
        let pids = match (t.pid, &t.cgroup_path, &mount) {
            (Some(p), ..) => vec![p],
            (None, Some(rel), Some(m)) => {
                let mut p = crate::discovery::cgroup_pids(&m.join(rel.trim_start_matches('/')));
                p.truncate(32);
                p
            }
            _ => continue,
        };
        let Some(ino) = pids.iter().find_map(|p| {
            std::fs::metadata(proc_root.join(p.to_string()).join("ns/net"))
                .ok()
                .map(|m| m.ino())
        }) else {
            continue;
        };
        if !out.contains_key(&ino) && out.len() >= max {
            continue;
        }
        let s = out.entry(ino).or_default();
        if s.pod.is_empty() {
            s.namespace = t.namespace.clone().unwrap_or_default();
            s.pod = t.pod.clone().unwrap_or_default();
        }
        for p in pids {
            if !s.pids.contains(&p) {
                s.pids.push(p);
            }
        }
    }
    out
}

fn scrape_one(
    shared: &Shared,
    xc: &Crosscheck,
    proc_root: &Path,
    ino: u64,
    srv: Server,
    interval: Duration,
) {
    let (known_port, next_try) = {
        let t = xc.targets.lock().expect("crosscheck lock");
        t.get(&ino)
            .map(|s| (s.port, s.next_try))
            .unwrap_or_default()
    };
    if next_try.is_some_and(|n| Instant::now() < n) {
        return;
    }
    let Some(&pid) = srv.pids.first() else {
        return;
    };
    let ports: Vec<u16> = match (xc.cfg.port, known_port) {
        (Some(p), _) | (None, Some(p)) => vec![p],
        (None, None) => {
            let mut ports: Vec<u16> = srv
                .pids
                .iter()
                .take(8)
                .flat_map(|&p| crate::discovery::listen_ports(proc_root, p))
                .map(|(_, port)| port)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            ports.truncate(MAX_PORTS);
            ports
        }
    };
    let timeout = Duration::from_millis(xc.cfg.timeout_ms);
    // The most telling outcome over the ports tried: ok, else not_found, else an error.
    let rank = |r: Option<ScrapeResult>| match r {
        None => 0,
        Some(ScrapeResult::Error) => 1,
        Some(ScrapeResult::NotFound) => 2,
        Some(ScrapeResult::Ok) => 3,
    };
    type Best = (
        Option<ScrapeResult>,
        Option<String>,
        Option<(std::net::SocketAddr, u16)>,
        Option<(source::ServerView, (u64, u64))>,
    );
    let mut best: Best = (None, Some("no listening port".into()), None, None);
    for port in ports {
        let addr = match scrape::address_of(proc_root, pid, port) {
            Ok(a) => a,
            Err(e) => {
                best = (Some(ScrapeResult::Error), Some(e), None, None);
                break;
            }
        };
        let fetched = scrape::get(addr, &xc.cfg.path, timeout, xc.cfg.max_bytes, |local| {
            xc.mark_own(local)
        });
        let at = (mono_ns(), unix_now());
        let (r, err, view) = classify(fetched);
        if rank(Some(r)) > rank(best.0) {
            best = (Some(r), err, Some((addr, port)), view.map(|v| (v, at)));
        }
        if r == ScrapeResult::Ok {
            break;
        }
    }
    let (r, err, addr, view) = best;
    let r = r.unwrap_or(ScrapeResult::Error);
    xc.count(r);
    // The agent's records of the pod since the oldest scrape the window keeps.
    let window_ns = xc.cfg.window_s * 1_000_000_000;
    let obs = view.as_ref().map(|(_, (mono, _))| {
        let oldest = {
            let t = xc.targets.lock().expect("crosscheck lock");
            t.get(&ino)
                .and_then(|s| s.ring.front().map(|f| f.mono_ns))
                .unwrap_or(*mono)
        };
        agent_obs(shared, &srv, oldest)
    });
    let mut targets = xc.targets.lock().expect("crosscheck lock");
    let t = targets.entry(ino).or_default();
    t.namespace = srv.namespace;
    t.pod = srv.pod;
    t.pid = pid;
    t.last_result = Some(r);
    t.last_error = err;
    t.last_unix = unix_now();
    t.next_try = (r == ScrapeResult::NotFound && xc.cfg.port.is_none())
        .then(|| Instant::now() + interval * NOT_FOUND_BACKOFF);
    if let Some((a, port)) = addr {
        t.address = Some(a.to_string());
        if r == ScrapeResult::Ok {
            t.port = Some(port);
        }
    }
    if r != ScrapeResult::Ok {
        // A port that stopped answering is looked for again next time.
        t.port = None;
    }
    if let Some((v, (mono, unix))) = view {
        t.ring.push_back(Scrape {
            mono_ns: mono,
            unix_s: unix,
            view: v,
        });
        // Keep the newest scrape at or before the window's start, and everything after.
        while t.ring.len() > 2 && t.ring[1].mono_ns + window_ns <= mono {
            t.ring.pop_front();
        }
        let ring: Vec<Scrape> = t.ring.iter().cloned().collect();
        t.compared = compare(&ring, &obs.unwrap_or_default());
    }
}

/// What a fetched response says: ok with the server's histograms, not_found, or error.
fn classify(fetched: Fetch) -> (ScrapeResult, Option<String>, Option<source::ServerView>) {
    match fetched {
        Fetch::Ok(body) => {
            let text = String::from_utf8_lossy(&body);
            let parsed = super::expo::parse(&text, source::wanted);
            match source::extract(&parsed.samples) {
                Some(v) => (ScrapeResult::Ok, None, Some(v)),
                None if parsed.good_lines > 0 => (
                    ScrapeResult::NotFound,
                    Some("no vLLM, SGLang or TGI latency histogram".to_string()),
                    None,
                ),
                None => (
                    ScrapeResult::Error,
                    Some(format!(
                        "not a Prometheus exposition ({} unparseable lines)",
                        parsed.bad_lines
                    )),
                    None,
                ),
            }
        }
        Fetch::NotFound => (ScrapeResult::NotFound, Some("HTTP 404".into()), None),
        Fetch::Failed(e) => (ScrapeResult::Error, Some(e), None),
    }
}

/// Routes whose requests a server's latency histograms count (generation, not health checks,
/// model lists or embeddings).
fn generates(route: &str) -> bool {
    !matches!(route, "other" | "unknown" | "/v1/models" | "/v1/embeddings")
}

/// The pod's finished, successful generation requests that ended after `since_ns`.
fn agent_obs(shared: &Shared, srv: &Server, since_ns: u64) -> Vec<AgentObs> {
    let store = shared.store.lock().expect("store lock");
    store
        .recent
        .iter()
        .filter(|r| r.end_ns.is_some_and(|e| e > since_ns))
        .filter(|r| {
            if srv.pod.is_empty() {
                srv.pids.contains(&r.pid)
            } else {
                r.pod.as_deref() == Some(srv.pod.as_str())
                    && r.namespace.as_deref().unwrap_or("") == srv.namespace
            }
        })
        .filter(|r| !r.aborted && r.status.is_some_and(|s| (200..300).contains(&s)))
        .filter(|r| generates(&crate::stats::route_of(r.path.as_deref())))
        .map(|r| AgentObs {
            end_ns: r.end_ns.unwrap_or(0),
            model: r.model.clone().unwrap_or_default(),
            ttft: r.ttft_ms.map(|m| m / 1e3),
            e2e: r.e2e_ms.map(|m| m / 1e3),
            queue_prefill: r
                .stages
                .get(crate::record::Stage::QueuePrefill)
                .map(|ns| ns as f64 / 1e9),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crosscheck::source::{Metric, Source};
    use testbed::synth_metrics::{garbage, VllmMetrics};

    #[test]
    fn classify_what_servers_answer() {
        // The synthetic server's vLLM exposition, read back.
        let m = VllmMetrics::new("m");
        for v in [0.30, 0.35, 0.40, 0.45] {
            m.observe_ttft(v);
            m.observe_finished(v + 0.03, v - 0.01);
        }
        let (r, err, view) = classify(Fetch::Ok(m.render().into_bytes()));
        assert_eq!((r, err), (ScrapeResult::Ok, None));
        let view = view.unwrap();
        assert_eq!(view.source, Source::Vllm);
        let ttft = &view.hists[&(Metric::Ttft, "m".to_string())];
        assert_eq!(ttft.count, 4.0);
        // All four in (0.25, 0.5]: p50 = 0.25 + 0.25 × 2/4.
        assert!((ttft.quantile(0.5).unwrap().value - 0.375).abs() < 1e-9);
        let queue = &view.hists[&(Metric::Queue, "m".to_string())];
        assert!((queue.mean().unwrap() - 0.365).abs() < 1e-9);

        let (r, err, _) = classify(Fetch::Ok(garbage()));
        assert_eq!(r, ScrapeResult::Error, "{err:?}");
        let (r, ..) = classify(Fetch::Ok(b"# TYPE up gauge\nup 1\n".to_vec()));
        assert_eq!(r, ScrapeResult::NotFound);
        assert_eq!(classify(Fetch::NotFound).0, ScrapeResult::NotFound);
        assert_eq!(classify(Fetch::Failed("x".into())).0, ScrapeResult::Error);
        assert_eq!(classify(Fetch::Ok(Vec::new())).0, ScrapeResult::Error);
    }

    #[test]
    fn generation_routes_only() {
        assert!(generates("/v1/chat/completions"));
        assert!(generates("/generate_stream"));
        for r in ["other", "unknown", "/v1/models", "/v1/embeddings"] {
            assert!(!generates(r), "{r}");
        }
    }
}
