//! HTTP surface: `/metrics` (Prometheus), the JSON API under `/api/v1/`, and health probes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::agent::{unix_now, Shared};
use crate::assemble::UnparsedReason;
use crate::loader::STAT_NAMES;
use crate::stats::{write_counter, write_counter_by, write_gauge};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/breakdown", get(breakdown))
        .route("/api/v1/targets", get(targets))
        .route("/api/v1/slo", get(slo))
        .route("/api/v1/heatmap", get(heatmap))
        .route("/api/v1/slo/analysis", get(slo_analysis))
        .route("/api/v1/crosscheck", get(crosscheck))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        // Tracing works without the API (node-local names): ready, but say what is missing.
        match s.k8s.degraded() {
            Some(why) => format!("ready (degraded: {why})\n").into_response(),
            None => "ready\n".into_response(),
        }
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "BPF programs not attached yet\n",
        )
            .into_response()
    }
}

/// Parses "90s", "5m", "1h", "300" (seconds).
pub fn parse_window(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 's') => (&s[..i], 1),
        (i, 'm') => (&s[..i], 60),
        (i, 'h') => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().filter(|&n| n > 0).map(|n| n * mul)
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response()
}

async fn requests(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer".into()),
    };
    let pod = q.get("pod");
    let model = q.get("model");
    let store = s.store.lock().expect("store lock");
    if q.get("slow").is_some_and(|v| v == "true" || v == "1") {
        let out = store.abnormal.list(unix_now(), limit);
        return Json(json!({ "requests": out })).into_response();
    }
    let out: Vec<_> = store
        .recent
        .iter()
        .rev()
        .filter(|r| pod.is_none_or(|p| r.pod.as_ref() == Some(p)))
        .filter(|r| model.is_none_or(|m| r.model.as_ref() == Some(m)))
        .take(limit)
        .cloned()
        .collect();
    drop(store);
    Json(json!({ "requests": out })).into_response()
}

async fn breakdown(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let window = match q.get("window").map(|w| parse_window(w)) {
        None => 300,
        Some(Some(w)) => w,
        Some(None) => return bad_request("window must look like 60s, 5m or 1h".into()),
    };
    let group_by: Vec<&str> = q
        .get("group_by")
        .map(|g| g.split(',').filter(|x| !x.is_empty()).collect())
        .unwrap_or_default();
    if let Some(bad) = group_by
        .iter()
        .find(|g| !crate::stats::GROUP_FIELDS.contains(g))
    {
        return bad_request(format!(
            "cannot group by {bad:?}: use {}",
            crate::stats::GROUP_FIELDS.join(", ")
        ));
    }
    let v = s
        .store
        .lock()
        .expect("store lock")
        .agg
        .breakdown(unix_now(), window, &group_by);
    Json(v).into_response()
}

async fn heatmap(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let metric = q.get("metric").map(String::as_str).unwrap_or("ttft");
    let Some(window) = parse_window(q.get("window").map(String::as_str).unwrap_or("15m")) else {
        return bad_request("window must look like 60s, 15m or 1h".into());
    };
    let Some(step) = parse_window(q.get("step").map(String::as_str).unwrap_or("10s")) else {
        return bad_request("step must look like 10s or 1m".into());
    };
    match s
        .store
        .lock()
        .expect("store lock")
        .heatmap
        .query(metric, unix_now(), window, step)
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn slo_analysis(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(name) = q.get("slo") else {
        return bad_request("slo=<name> is required".into());
    };
    let Some(window) = parse_window(q.get("window").map(String::as_str).unwrap_or("15m")) else {
        return bad_request("window must look like 60s, 15m or 1h".into());
    };
    let since = crate::agent::mono_ns().saturating_sub(window * 1_000_000_000);
    let store = s.store.lock().expect("store lock");
    let recs: Vec<&crate::record::RequestRecord> = store
        .recent
        .iter()
        .filter(|r| r.end_ns.or(r.start_ns).is_some_and(|t| t >= since))
        .map(|r| &**r)
        .collect();
    match crate::slo::analysis::analyze(&store.slo, name, &recs) {
        Ok(mut v) => {
            v["window_s"] = json!(window);
            Json(v).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, Json(json!({ "error": e }))).into_response(),
    }
}

async fn crosscheck(State(s): State<Arc<Shared>>) -> Response {
    match &s.crosscheck {
        Some(x) => Json(x.json()).into_response(),
        None => Json(json!({ "enabled": false, "targets": [] })).into_response(),
    }
}

async fn slo(State(s): State<Arc<Shared>>) -> Response {
    Json(s.store.lock().expect("store lock").slo.status(unix_now())).into_response()
}

async fn targets(State(s): State<Arc<Shared>>) -> Response {
    let (snap, cni) = {
        let g = s.snapshot.read().expect("snapshot lock");
        (g.targets.clone(), g.cni.clone())
    };
    let programs = s.programs.read().expect("programs lock").clone();
    let verifier = s.verifier.read().expect("verifier lock").clone();
    let syscall_hooks = *s.syscall_hooks.read().expect("syscall hooks lock");
    let hooks = s.hooks.read().expect("hooks lock").clone();
    let gpu_libs = s.gpu.read().expect("gpu lock").libs.clone();
    Json(json!({
        "kernel": s.probe.kernel,
        "hooks": s.probe.features,
        "programs": programs,
        "syscall_hooks": syscall_hooks,
        "verifier": verifier,
        "targets": snap,
        "interfaces": hooks,
        "cni": cni,
        "gpu_libraries": gpu_libs,
        "kubernetes": {
            "enabled": s.k8s.enabled.load(Ordering::Relaxed),
            "api_up": s.k8s.up.load(Ordering::Relaxed),
            "node": s.k8s.node.read().expect("node lock").clone(),
            "pods": s.k8s.pod_count(),
            "degraded": s.k8s.degraded(),
        },
    }))
    .into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut out = String::with_capacity(64 * 1024);
    {
        let mut st = s.store.lock().expect("store lock");
        let now = unix_now();
        st.agg.render(now, &mut out);
        st.slo.render(now, &mut out);
    }
    render_health(&s, &mut out);
    crate::gpu::render(&s.gpu.read().expect("gpu lock"), &mut out);
    crate::runq::render(&s.runq.read().expect("runq lock"), &mut out);
    if let Some(x) = &s.crosscheck {
        x.render(&mut out);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn render_health(s: &Shared, out: &mut String) {
    if let Some(x) = &s.otlp {
        x.render(out);
    }
    let h = s.health.lock().expect("health lock").clone();
    let stat = |name: &str| {
        STAT_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| h.bpf[i])
            .unwrap_or(0)
    };
    write_counter(
        out,
        "llmslo_agent_events_read_total",
        "Events read from the ring buffer.",
        &[(&[], h.events_read as f64)],
    );
    write_counter(
        out,
        "llmslo_agent_events_lost_total",
        "Events lost before userspace could assemble them, by cause.",
        &[
            (&[("cause", "ringbuf_full")], stat("ringbuf_full") as f64),
            (
                &[("cause", "active_map_full")],
                stat("active_map_full") as f64,
            ),
            (&[("cause", "conn_map_full")], stat("conn_map_full") as f64),
            (&[("cause", "decode_error")], h.decode_errors as f64),
        ],
    );
    let conns = [("map", "conns")];
    write_gauge(
        out,
        "llmslo_agent_bpf_map_entries",
        "Live entries of the kernel's connection map (walked every 5 s).",
        &[(&conns, h.conn_map.live as f64)],
    );
    write_gauge(
        out,
        "llmslo_agent_bpf_map_capacity",
        "Size of the kernel's connection map (max_kernel_connections).",
        &[(&conns, f64::from(h.conn_map.capacity))],
    );
    write_counter(
        out,
        "llmslo_agent_bpf_map_evictions_total",
        "Entries the kernel's LRU connection map dropped to make room (inserts - deletes - live): \
         those connections lose their socket stamps and close events.",
        &[(&conns, h.conn_map.evicted as f64)],
    );
    write_counter_by(
        out,
        "llmslo_agent_bpf_stat_total",
        "Raw per-CPU counters of the BPF programs, summed.",
        "stat",
        STAT_NAMES
            .iter()
            .copied()
            .zip(h.bpf.iter().map(|&v| v as f64)),
    );
    write_counter_by(
        out,
        "llmslo_agent_requests_unparsed_total",
        "Connections or requests the agent could not parse, by reason.",
        "reason",
        UnparsedReason::ALL
            .iter()
            .map(|r| r.name())
            .zip(h.assembler.unparsed.iter().map(|&v| v as f64)),
    );
    write_counter(
        out,
        "llmslo_agent_requests_assembled_total",
        "Requests assembled from kernel events.",
        &[(&[], h.assembler.requests as f64)],
    );
    write_counter(
        out,
        "llmslo_agent_requests_aborted_total",
        "Requests whose response never completed.",
        &[(&[], h.assembler.aborted as f64)],
    );
    write_counter(
        out,
        "llmslo_agent_streams_armed_total",
        "Streamed responses whose token writes the kernel was armed to count (kernel_token_counting).",
        &[(&[], h.assembler.streams_armed as f64)],
    );
    write_counter(
        out,
        "llmslo_agent_kernel_token_writes_total",
        "Token writes the kernel counted instead of sending their bytes, as received: applied to \
         their response, or misplaced (not at an event boundary of a streamed response: a gap; \
         before a response head, or of a connection not followed: dropped).",
        &[
            (
                &[("result", "applied")],
                h.assembler
                    .token_writes
                    .saturating_sub(h.assembler.token_writes_misplaced) as f64,
            ),
            (
                &[("result", "misplaced")],
                h.assembler.token_writes_misplaced as f64,
            ),
        ],
    );
    let verifier = s.verifier.read().expect("verifier lock").clone();
    let labels: Vec<[(&str, &str); 2]> = verifier
        .iter()
        .map(|v| [("object", v.object), ("program", v.program.as_str())])
        .collect();
    let rows: Vec<(&[(&str, &str)], f64)> = labels
        .iter()
        .zip(&verifier)
        .map(|(l, v)| (&l[..], f64::from(v.verified_insns)))
        .collect();
    write_gauge(
        out,
        "llmslo_agent_bpf_verified_insns",
        "Instructions the kernel's verifier processed per loaded BPF program.",
        &rows,
    );
    crate::selfcost::render_programs(&verifier, s.bpf_stats.is_some(), out);
    crate::selfcost::render_process(
        &crate::selfcost::process(),
        crate::selfcost::process_start_unix(),
        out,
    );
    let j = &h.assembler.sidecar;
    write_counter(
        out,
        "llmslo_agent_sidecar_joins_total",
        "Sidecar join outcomes: requests joined with their sidecar's record; records handed out \
         without a partner; forwardings matching no request read; entries dropped at a cap.",
        &[
            (&[("result", "joined")], j.joined as f64),
            (&[("result", "unjoined")], j.unjoined as f64),
            (
                &[("result", "unmatched_forward")],
                j.unmatched_forwards as f64,
            ),
            (&[("result", "dropped")], j.dropped as f64),
        ],
    );
    write_counter(
        out,
        "llmslo_agent_connections_evicted_total",
        "Tracked connections evicted at the cap.",
        &[(&[], h.assembler.conns_evicted as f64)],
    );
    write_gauge(
        out,
        "llmslo_agent_connections_active",
        "Connections tracked now.",
        &[(&[], h.assembler.conns_active as f64)],
    );
    let n_targets = s.snapshot.read().expect("snapshot lock").targets.len();
    write_gauge(
        out,
        "llmslo_agent_targets",
        "Processes and cgroups traced now.",
        &[(&[], n_targets as f64)],
    );
    let (series, overflowed, retained, retained_bytes) = {
        let st = s.store.lock().expect("store lock");
        (
            st.agg.label_sets(),
            st.agg.overflow_records(),
            st.recent.len(),
            st.recent_bytes,
        )
    };
    write_gauge(
        out,
        "llmslo_agent_label_sets",
        "Distinct request label sets.",
        &[(&[], series as f64)],
    );
    write_counter(
        out,
        "llmslo_agent_label_set_overflow_total",
        "Requests counted under the overflow label set (namespace, pod, model and route \"other\") \
         because max_label_sets distinct label sets were held.",
        &[(&[], overflowed as f64)],
    );
    write_gauge(
        out,
        "llmslo_agent_records_retained",
        "Finished requests kept for /api/v1/requests.",
        &[(&[], retained as f64)],
    );
    write_gauge(
        out,
        "llmslo_agent_records_retained_bytes",
        "Memory the kept finished requests hold (estimated; bounded by recent_requests_bytes).",
        &[(&[], retained_bytes as f64)],
    );
    let k = &s.k8s;
    if k.enabled.load(Ordering::Relaxed) {
        write_gauge(
            out,
            "llmslo_agent_kubernetes_api_up",
            "1 when the last Kubernetes API list/watch call succeeded; 0: node-local names only.",
            &[(&[], f64::from(u8::from(k.up.load(Ordering::Relaxed))))],
        );
        write_counter(
            out,
            "llmslo_agent_kubernetes_api_errors_total",
            "Failed Kubernetes API list/watch calls (410 Gone re-lists are not errors).",
            &[(&[], k.errors.load(Ordering::Relaxed) as f64)],
        );
        write_counter(
            out,
            "llmslo_agent_kubernetes_relists_total",
            "Full re-lists of this node's pods after the first (410 Gone, broken watch).",
            &[(&[], k.relists.load(Ordering::Relaxed) as f64)],
        );
        write_gauge(
            out,
            "llmslo_agent_kubernetes_pods",
            "Pods on this node known from the Kubernetes API.",
            &[(&[], k.pod_count() as f64)],
        );
    }
    write_counter(
        out,
        "llmslo_agent_discovery_wakeups_total",
        "Rescans started early by a server exec, a listen() of a server or target, or a target's exit.",
        &[(&[], s.exec_wakes.load(Ordering::Relaxed) as f64)],
    );
    write_gauge(
        out,
        "llmslo_agent_ready",
        "1 when the BPF programs are attached.",
        &[(&[], f64::from(u8::from(s.ready.load(Ordering::Relaxed))))],
    );
    let _ = writeln!(
        out,
        "# HELP llmslo_agent_uptime_seconds Seconds since the agent started."
    );
    let _ = writeln!(out, "# TYPE llmslo_agent_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "llmslo_agent_uptime_seconds {:.3}",
        s.started.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("5m"), Some(300));
        assert_eq!(parse_window("90s"), Some(90));
        assert_eq!(parse_window("1h"), Some(3600));
        assert_eq!(parse_window("300"), Some(300));
        assert_eq!(parse_window("0"), None);
        assert_eq!(parse_window("m"), None);
        assert_eq!(parse_window("5x"), None);
        assert_eq!(parse_window(""), None);
    }
}
