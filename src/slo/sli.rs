//! Judging one request against an SLI: good, bad, or not counted. The rules (and why) are in
//! `super`'s docs under "What counts".

use crate::record::{ns_to_ms, RequestRecord, Stage, Ts};

/// A per-request latency an SLO can put a threshold on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Ttft,
    /// The request's largest gap between consecutive tokens.
    Itl,
    Tpot,
    E2e,
    Stage(Stage),
}

impl Metric {
    /// `ttft`, `itl`, `tpot`, `e2e` or `stage:<name>` with a stage name of DESIGN.md §3.
    pub fn parse(s: &str) -> anyhow::Result<Metric> {
        Ok(match s {
            "ttft" => Metric::Ttft,
            "itl" => Metric::Itl,
            "tpot" => Metric::Tpot,
            "e2e" => Metric::E2e,
            _ => {
                let stage = s
                    .strip_prefix("stage:")
                    .and_then(|n| Stage::ALL.iter().copied().find(|st| st.name() == n));
                match stage {
                    Some(st) => Metric::Stage(st),
                    None => anyhow::bail!(
                        "unknown metric {s:?}: expected ttft, itl, tpot, e2e or stage:<name> \
                         with one of {}",
                        Stage::ALL.map(Stage::name).join(", ")
                    ),
                }
            }
        })
    }

    /// The request's value in ms, when measured.
    fn value_ms(self, rec: &RequestRecord) -> Option<f64> {
        let v = match self {
            Metric::Ttft => rec.ttft_ms,
            Metric::Itl => rec.token_ns.itl_ms().reduce(f64::max),
            Metric::Tpot => rec.tpot_ms,
            Metric::E2e => rec.e2e_ms,
            Metric::Stage(s) => rec.stages.get(s).map(ns_to_ms),
        };
        // A non-finite or negative value is a measurement fault, not a latency.
        v.filter(|v| v.is_finite() && *v >= 0.0)
    }

    /// Whether a request that was cut short would have had this metric had it completed.
    /// Only a response head that said "not a stream" rules the token metrics out; a request
    /// cut before any response byte could have been either.
    fn applies_when_cut(self, rec: &RequestRecord) -> bool {
        let not_stream = !rec.streaming && rec.timestamps.get(Ts::RespFirst).is_some();
        match self {
            Metric::Ttft
            | Metric::Itl
            | Metric::Tpot
            | Metric::Stage(Stage::QueuePrefill | Stage::Decode) => !not_stream,
            Metric::Stage(Stage::Inference) => !rec.streaming,
            Metric::E2e => true,
            // Stages before the response are missing because a hook did not fire, not
            // because of the abort: nothing to say about them.
            Metric::Stage(_) => false,
        }
    }
}

/// The outcome of judging one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Good,
    Bad,
    /// Not counted: the SLI does not apply to this request (neither good nor bad).
    Skip,
}

/// `vllm bench serve --goodput` counts a request good when `value <= threshold`.
fn meets(v: f64, threshold_ms: f64) -> Verdict {
    if v <= threshold_ms {
        Verdict::Good
    } else {
        Verdict::Bad
    }
}

/// One latency threshold. `aborted_bad`: an aborted request without a conclusive value counts
/// as bad (the default) rather than not at all.
pub fn latency(m: Metric, threshold_ms: f64, rec: &RequestRecord, aborted_bad: bool) -> Verdict {
    let value = m.value_ms(rec);
    if !rec.aborted {
        return match value {
            Some(v) => meets(v, threshold_ms),
            // A completed stream with one token has no gap, and vLLM's bench counts its TPOT
            // as 0: every ITL/TPOT threshold is met.
            None if matches!(m, Metric::Itl | Metric::Tpot) && rec.ttft_ms.is_some() => {
                Verdict::Good
            }
            None => Verdict::Skip,
        };
    }
    // Cut short. TTFT and stages are complete once measured; the largest gap can only grow,
    // so a gap over the threshold is conclusive. TPOT and E2E of a cut response are not known.
    match (m, value) {
        (Metric::Ttft | Metric::Stage(_), Some(v)) => return meets(v, threshold_ms),
        (Metric::Itl, Some(v)) if v > threshold_ms => return Verdict::Bad,
        _ => {}
    }
    if aborted_bad && m.applies_when_cut(rec) {
        Verdict::Bad
    } else {
        Verdict::Skip
    }
}

/// Served: completed with a status below 500. An unknown status on a completed request
/// (head not parsed) is not counted.
pub fn availability(rec: &RequestRecord, aborted_bad: bool) -> Verdict {
    match (rec.aborted, rec.status) {
        (true, _) if aborted_bad => Verdict::Bad,
        (true, _) => Verdict::Skip,
        (false, Some(s)) if s >= 500 => Verdict::Bad,
        (false, Some(_)) => Verdict::Good,
        (false, None) => Verdict::Skip,
    }
}

/// Good only if served and every threshold is met (vLLM's goodput counts only successful
/// requests). A failure or any threshold missed makes it bad; otherwise a threshold that does
/// not apply, or an abort under `aborted: ignore`, leaves it uncounted.
pub fn goodput(all: &[(Metric, f64)], rec: &RequestRecord, aborted_bad: bool) -> Verdict {
    let mut out = availability(rec, aborted_bad);
    if out == Verdict::Bad {
        return out;
    }
    for &(m, t) in all {
        match latency(m, t, rec, aborted_bad) {
            Verdict::Bad => return Verdict::Bad,
            Verdict::Skip => out = Verdict::Skip,
            Verdict::Good => {}
        }
    }
    out
}
