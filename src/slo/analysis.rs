//! Violation analysis: for the requests of a window, compare those that violated an SLO with
//! those that met it — which stage grew, which request class violates most — and end with a
//! diagnosis an operator can act on.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::{SloEngine, Verdict};
use crate::record::{ns_to_ms, RequestRecord, Stage};
use crate::stats::route_of;

/// The request classes compared, and the class of one request in each.
fn classes(r: &RequestRecord) -> [(&'static str, String); 6] {
    let kib = r.request_bytes / 1024;
    let prompt = match kib {
        0 => "<1KiB",
        1..=7 => "1-8KiB",
        8..=63 => "8-64KiB",
        _ => ">=64KiB",
    };
    let out = match r.output_tokens {
        None => "unknown",
        Some(0..=63) => "<64",
        Some(64..=255) => "64-256",
        Some(256..=1023) => "256-1024",
        Some(_) => ">=1024",
    };
    let client = r.src.map(|a| a.ip().to_string()).unwrap_or_default();
    [
        ("prompt_size", prompt.to_string()),
        ("output_length", out.to_string()),
        ("model", r.model.clone().unwrap_or_default()),
        ("route", route_of(r.path.as_deref())),
        ("client", client),
        ("pod", r.pod.clone().unwrap_or_default()),
    ]
}

/// What a stage growing usually means, and what operators do about it.
pub fn remedy(stage: Stage) -> (&'static str, &'static str) {
    match stage {
        Stage::QueuePrefill => (
            "requests wait in the server's queue or in prefill",
            "add replicas, or serve long prompts from a separate long-context pool (chunked prefill helps too)",
        ),
        Stage::Decode | Stage::Inference => (
            "generation itself is slow (GPU saturated or batches too large)",
            "scale out or lower the maximum batch size / concurrency per replica",
        ),
        Stage::SocketWait | Stage::AcceptWait => (
            "the server's event loop is saturated: requests sit unread in their sockets",
            "add API-server workers or replicas; look for CPU starvation of the server process",
        ),
        Stage::ContainerNetwork | Stage::EgressNetwork | Stage::TcpHandshake => (
            "the path between the node and the pod is slow (CNI, overlay, veth, bandwidth)",
            "check the CNI/overlay (MTU, encapsulation, routing mode) and node network saturation",
        ),
        Stage::LoadBalancing => ("the service's DNAT hop is slow", "check kube-proxy's mode (iptables vs IPVS/eBPF) and conntrack"),
        Stage::SidecarInbound | Stage::SidecarOutbound => ("the service-mesh sidecar adds latency", "exclude the inference port from the mesh"),
        Stage::RequestRead => (
            "large request bodies arrive slowly",
            "check client bandwidth and the network path; compress or shorten prompts",
        ),
    }
}

/// Cause and remedy when the server's threads wait for a CPU.
const CPU_STARVED: (&str, &str) = (
    "the server's threads are starved of CPU (runnable but waiting on a run queue)",
    "give the server's pod dedicated CPUs (Guaranteed QoS with the static CPU manager policy) or move CPU-heavy neighbours off its cores",
);

/// A request's run-queue wait over its server-side stages (ms), where measured.
fn runq_ms(r: &RequestRecord) -> Option<f64> {
    let w = r.cpu_runqueue_wait_ms.as_ref()?;
    w.total
        .or_else(|| w.iter().map(|(_, v)| v).reduce(|a, b| a + b))
        .map(ns_to_ms)
}

#[derive(Default)]
struct Acc {
    n: u64,
    sum: f64,
}

impl Acc {
    fn add(&mut self, v: f64) {
        self.n += 1;
        self.sum += v;
    }
    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// Analyses `recs` (already limited to the window) against the SLO `name`.
pub fn analyze(engine: &SloEngine, name: &str, recs: &[&RequestRecord]) -> Result<Value, String> {
    let mut judged = Vec::new();
    for r in recs {
        match engine.verdict(name, r, &route_of(r.path.as_deref())) {
            None => return Err(format!("no SLO named {name:?}")),
            Some(Verdict::Good) => judged.push((*r, false)),
            Some(Verdict::Bad) => judged.push((*r, true)),
            Some(Verdict::Skip) => {}
        }
    }
    let n = judged.len() as u64;
    let bad = judged.iter().filter(|j| j.1).count() as u64;
    let overall = if n > 0 { bad as f64 / n as f64 } else { 0.0 };
    let mut out =
        json!({ "slo": name, "requests": n, "violations": bad, "violation_rate": overall });
    if bad == 0 || bad == n {
        out["diagnosis"] = Value::from(if bad == 0 {
            "no violations in this window".to_string()
        } else {
            "every request violated: nothing met the SLO to compare with".to_string()
        });
        return Ok(out);
    }
    // Stages: violating vs meeting, in ms.
    let mut stages = serde_json::Map::new();
    let mut dominant: Option<(Stage, f64, f64)> = None;
    for st in Stage::ALL {
        let (mut g, mut b) = (Acc::default(), Acc::default());
        for (r, is_bad) in &judged {
            if let Some(v) = r.stages.get(st) {
                if *is_bad {
                    b.add(ns_to_ms(v))
                } else {
                    g.add(ns_to_ms(v))
                }
            }
        }
        let (Some(gm), Some(bm)) = (g.mean(), b.mean()) else {
            continue;
        };
        let delta = bm - gm;
        stages.insert(st.name().into(), json!({ "meeting_mean_ms": gm, "violating_mean_ms": bm, "delta_ms": delta, "ratio": if gm > 0.0 { Some(bm / gm) } else { None } }));
        if st.in_e2e() && dominant.is_none_or(|d| delta > d.1) {
            dominant = Some((st, delta, if gm > 0.0 { bm / gm } else { f64::INFINITY }));
        }
    }
    out["stages"] = Value::Object(stages);
    // Signals from inside the server: its serving thread's run-queue wait.
    let (mut g, mut b) = (Acc::default(), Acc::default());
    for (r, is_bad) in &judged {
        if let Some(v) = runq_ms(r) {
            if *is_bad {
                b.add(v)
            } else {
                g.add(v)
            }
        }
    }
    if let (Some(gm), Some(bm)) = (g.mean(), b.mean()) {
        out["signals"] = json!({ "cpu_runqueue_wait": { "meeting_mean_ms": gm, "violating_mean_ms": bm, "delta_ms": bm - gm } });
    }
    // Classes: violation rate per value of each dimension.
    let mut dims: BTreeMap<&str, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    for (r, is_bad) in &judged {
        for (d, v) in classes(r) {
            let e = dims.entry(d).or_default().entry(v).or_default();
            e.0 += 1;
            e.1 += u64::from(*is_bad);
        }
    }
    let min_n = (n / 20).max(3);
    let mut worst: Option<(&str, String, f64, u64)> = None;
    let mut classes_json = serde_json::Map::new();
    for (d, vals) in &dims {
        let mut list = Vec::new();
        for (v, (cn, cb)) in vals {
            let rate = *cb as f64 / *cn as f64;
            list.push(
                json!({ "value": v, "requests": cn, "violations": cb, "violation_rate": rate }),
            );
            // A class is only interesting when the dimension splits the traffic.
            if vals.len() > 1
                && *cn >= min_n
                && rate > overall
                && worst
                    .as_ref()
                    .is_none_or(|w| rate > w.2 || (rate == w.2 && *cn > w.3))
            {
                worst = Some((d, v.clone(), rate, *cn));
            }
        }
        classes_json.insert((*d).into(), Value::Array(list));
    }
    out["classes"] = Value::Object(classes_json);
    let Some((stage, delta, ratio)) = dominant else {
        out["diagnosis"] =
            Value::from("no stage was measured for both violating and meeting requests");
        return Ok(out);
    };
    let (cause, fix) = remedy(stage);
    let mut text = format!(
        "{bad} of {n} requests violated {name}. {stage} is {ratio:.1}x longer in violating requests ({delta:+.1} ms on average)",
        stage = stage.name()
    );
    if let Some((d, v, rate, cn)) = &worst {
        // The dominant stage in that class versus everyone else.
        let (mut inside, mut rest) = (Acc::default(), Acc::default());
        for (r, _) in &judged {
            if let Some(x) = r.stages.get(stage) {
                if classes(r).iter().any(|(dd, vv)| dd == d && vv == v) {
                    inside.add(ns_to_ms(x))
                } else {
                    rest.add(ns_to_ms(x))
                }
            }
        }
        let _ = write!(
            text,
            "; {d}={v} requests ({cn}) violate {:.0}% vs {:.0}% overall",
            rate * 100.0,
            overall * 100.0
        );
        if let (Some(i), Some(o)) = (inside.mean(), rest.mean()) {
            if o > 0.0 {
                let _ = write!(
                    text,
                    ", and their {} is {:.1}x the others'",
                    stage.name(),
                    i / o
                );
                out["class_stage_ratio"] = json!(i / o);
            }
        }
        out["class"] =
            json!({ "dimension": d, "value": v, "violation_rate": rate, "requests": cn });
    }
    // Starved of CPU: in the dominant stage, when it is a server-side stage that grew, the
    // serving threads' extra run-queue wait in that same stage explains a good part of the
    // growth (at least a quarter of it, and at least a millisecond).
    let (mut cause, mut fix) = (cause, fix);
    let server_side = matches!(
        stage,
        Stage::QueuePrefill | Stage::Decode | Stage::Inference
    );
    let stage_runq_delta = if server_side && delta > 0.0 {
        let (mut g, mut b) = (Acc::default(), Acc::default());
        for (r, is_bad) in &judged {
            let Some(v) = r.cpu_runqueue_wait_ms.as_ref().and_then(|w| w.get(stage)) else {
                continue;
            };
            if *is_bad {
                b.add(ns_to_ms(v))
            } else {
                g.add(ns_to_ms(v))
            }
        }
        g.mean().zip(b.mean()).map(|(gm, bm)| bm - gm)
    } else {
        None
    };
    if let Some(rd) = stage_runq_delta.filter(|&rd| rd >= 1.0 && rd >= 0.25 * delta) {
        let _ = write!(
            text,
            "; their server threads waited {rd:+.1} ms longer on a CPU run queue in {} ({:.0}% of that)",
            stage.name(),
            100.0 * rd / delta
        );
        out["cpu_starved"] = Value::Bool(true);
        if rd >= 0.5 * delta {
            (cause, fix) = CPU_STARVED;
        }
    }
    let _ = write!(text, ". Likely cause: {cause}. Usual remedy: {fix}.");
    out["dominant_stage"] = Value::from(stage.name());
    out["diagnosis"] = Value::from(text);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Ts;
    use crate::slo::SloSpec;

    fn rec(id: u64, bytes: u64, prefill_ms: u64) -> RequestRecord {
        let mut r = RequestRecord {
            id,
            request_bytes: bytes,
            streaming: true,
            model: Some("m".into()),
            path: Some("/v1/chat/completions".into()),
            src: Some(format!("10.0.0.{}:1000", id % 3).parse().unwrap()),
            ..Default::default()
        };
        let ms = 1_000_000;
        r.timestamps.set(Ts::SockQueued, 0);
        r.timestamps.set(Ts::ReadFirst, ms);
        r.timestamps.set(Ts::ReadDone, 2 * ms);
        r.token_ns = vec![(2 + prefill_ms) * ms, (3 + prefill_ms) * ms].into();
        r.timestamps.set(Ts::Token1, (2 + prefill_ms) * ms);
        r.timestamps.set(Ts::TokenN, (3 + prefill_ms) * ms);
        r.timestamps.set(Ts::RespLast, (4 + prefill_ms) * ms);
        r.finish(false);
        r
    }

    #[test]
    fn long_prompts_queueing_are_named() {
        let spec: SloSpec = serde_yaml::from_str("name: t\nobjective: 0.9\nwindow: 1h\nsli: {type: latency, metric: ttft, threshold_ms: 20}").unwrap();
        let engine = SloEngine::new(vec![spec]).unwrap();
        let mut recs = Vec::new();
        for i in 0..40 {
            recs.push(rec(i, 300, 2)); // short prompt, fast
        }
        for i in 40..50 {
            recs.push(rec(i, 40_000, 80)); // long prompt, 80 ms prefill: violates
        }
        let refs: Vec<&RequestRecord> = recs.iter().collect();
        let a = analyze(&engine, "t", &refs).unwrap();
        assert_eq!(a["violations"], 10);
        assert_eq!(a["dominant_stage"], "queue_prefill");
        assert_eq!(a["class"]["dimension"], "prompt_size");
        assert_eq!(a["class"]["value"], "8-64KiB");
        let d = a["diagnosis"].as_str().unwrap();
        assert!(
            d.contains("queue_prefill")
                && d.contains("prompt_size=8-64KiB")
                && d.contains("long-context pool"),
            "{d}"
        );
        assert!(a["class_stage_ratio"].as_f64().unwrap() > 10.0);
        assert!(analyze(&engine, "nope", &refs).is_err());
    }

    #[test]
    fn cpu_starvation_is_named() {
        let spec: SloSpec = serde_yaml::from_str("name: t\nobjective: 0.9\nwindow: 1h\nsli: {type: latency, metric: ttft, threshold_ms: 20}").unwrap();
        let engine = SloEngine::new(vec![spec]).unwrap();
        let with_runq = |mut r: RequestRecord, wait_ms: u64| {
            r.cpu_runqueue_wait_ms = Some(crate::inside::RunqWait {
                by_stage: [Some(wait_ms * 1_000_000), Some(0), None],
                total: Some(wait_ms * 1_000_000),
            });
            r
        };
        let mut recs = Vec::new();
        for i in 0..40 {
            recs.push(with_runq(rec(i, 300, 2), 0));
        }
        // Same prompts, 60 ms of prefill of which 50 ms waiting for a CPU.
        for i in 40..50 {
            recs.push(with_runq(rec(i, 300, 60), 50));
        }
        let refs: Vec<&RequestRecord> = recs.iter().collect();
        let a = analyze(&engine, "t", &refs).unwrap();
        assert_eq!(a["dominant_stage"], "queue_prefill");
        assert_eq!(a["signals"]["cpu_runqueue_wait"]["delta_ms"], 50.0);
        assert_eq!(a["cpu_starved"], true);
        let d = a["diagnosis"].as_str().unwrap();
        assert!(
            d.contains("waited +50.0 ms longer on a CPU run queue in queue_prefill")
                && d.contains("starved of CPU")
                && d.contains("dedicated CPUs"),
            "{d}"
        );
        // The extra wait was in decode, not in the stage that grew: no starvation diagnosis
        // (the per-request signal still shows it).
        let in_decode = |mut r: RequestRecord, wait_ms: u64| {
            r.cpu_runqueue_wait_ms = Some(crate::inside::RunqWait {
                by_stage: [Some(0), Some(wait_ms * 1_000_000), None],
                total: Some(wait_ms * 1_000_000),
            });
            r
        };
        let other: Vec<RequestRecord> = (0..40)
            .map(|i| in_decode(rec(i, 300, 2), 0))
            .chain((40..50).map(|i| in_decode(rec(i, 300, 60), 50)))
            .collect();
        let refs: Vec<&RequestRecord> = other.iter().collect();
        let a = analyze(&engine, "t", &refs).unwrap();
        assert_eq!(a["dominant_stage"], "queue_prefill");
        assert_eq!(a["signals"]["cpu_runqueue_wait"]["delta_ms"], 50.0);
        assert!(a.get("cpu_starved").is_none(), "{a}");
        // Without run-queue figures: no signal, the usual diagnosis.
        let plain: Vec<RequestRecord> = (0..40)
            .map(|i| rec(i, 300, 2))
            .chain((40..50).map(|i| rec(i, 300, 60)))
            .collect();
        let refs: Vec<&RequestRecord> = plain.iter().collect();
        let a = analyze(&engine, "t", &refs).unwrap();
        assert!(a.get("signals").is_none() && a.get("cpu_starved").is_none());
        assert!(a["diagnosis"]
            .as_str()
            .unwrap()
            .contains("long-context pool"));
    }

    #[test]
    fn nothing_to_compare() {
        let spec: SloSpec = serde_yaml::from_str("name: t\nobjective: 0.9\nwindow: 1h\nsli: {type: latency, metric: ttft, threshold_ms: 2000}").unwrap();
        let engine = SloEngine::new(vec![spec]).unwrap();
        let recs = [rec(1, 300, 2)];
        let refs: Vec<&RequestRecord> = recs.iter().collect();
        assert_eq!(
            analyze(&engine, "t", &refs).unwrap()["diagnosis"],
            "no violations in this window"
        );
    }
}
