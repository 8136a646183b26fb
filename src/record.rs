//! One finished request: its timestamps (DESIGN.md §3), the stages and headline latencies
//! derived from them, and its JSON form for `/api/v1/requests` (DESIGN.md §5).

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::net::SocketAddr;

/// Named points of a request's timeline, in the order a request passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ts {
    Syn,
    Established,
    Accepted,
    NodeIn,
    NatDone,
    PodIn,
    SidecarQueued,
    SidecarRead,
    SidecarWrite,
    SockQueued,
    SockQueuedLast,
    ReadFirst,
    ReadDone,
    RespFirst,
    Token1,
    TokenN,
    RespLast,
    SidecarToken1,
    SidecarLast,
    PodOut,
    NodeOut,
}

impl Ts {
    pub const ALL: [Ts; 21] = [
        Ts::Syn,
        Ts::Established,
        Ts::Accepted,
        Ts::NodeIn,
        Ts::NatDone,
        Ts::PodIn,
        Ts::SidecarQueued,
        Ts::SidecarRead,
        Ts::SidecarWrite,
        Ts::SockQueued,
        Ts::SockQueuedLast,
        Ts::ReadFirst,
        Ts::ReadDone,
        Ts::RespFirst,
        Ts::Token1,
        Ts::TokenN,
        Ts::RespLast,
        Ts::SidecarToken1,
        Ts::SidecarLast,
        Ts::PodOut,
        Ts::NodeOut,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Ts::Syn => "syn",
            Ts::Established => "established",
            Ts::Accepted => "accepted",
            Ts::NodeIn => "node_in",
            Ts::NatDone => "nat_done",
            Ts::PodIn => "pod_in",
            Ts::SidecarQueued => "sidecar_queued",
            Ts::SidecarRead => "sidecar_read",
            Ts::SidecarWrite => "sidecar_write",
            Ts::SockQueued => "sock_queued",
            Ts::SockQueuedLast => "sock_queued_last",
            Ts::ReadFirst => "read_first",
            Ts::ReadDone => "read_done",
            Ts::RespFirst => "resp_first",
            Ts::Token1 => "token_1",
            Ts::TokenN => "token_n",
            Ts::RespLast => "resp_last",
            Ts::SidecarToken1 => "sidecar_token_1",
            Ts::SidecarLast => "sidecar_last",
            Ts::PodOut => "pod_out",
            Ts::NodeOut => "node_out",
        }
    }
}

/// Marks an absent value in the arrays below (`Option<u64>` would take twice the room, and
/// the recent-request store keeps thousands of records). No CLOCK_MONOTONIC time and no stage
/// reaches it.
const ABSENT: u64 = u64::MAX;

fn present(v: u64) -> Option<u64> {
    (v != ABSENT).then_some(v)
}

/// The timestamps of one request that were seen (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamps([u64; Ts::ALL.len()]);

impl Default for Timestamps {
    fn default() -> Timestamps {
        Timestamps([ABSENT; Ts::ALL.len()])
    }
}

impl Timestamps {
    pub fn get(&self, t: Ts) -> Option<u64> {
        present(self.0[t as usize])
    }
    pub fn set(&mut self, t: Ts, ns: u64) {
        self.0[t as usize] = ns;
    }
    pub fn clear(&mut self, t: Ts) {
        self.0[t as usize] = ABSENT;
    }
    /// Sets `t` only if it was not seen yet.
    pub fn set_first(&mut self, t: Ts, ns: u64) {
        if self.0[t as usize] == ABSENT {
            self.0[t as usize] = ns;
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = (Ts, u64)> + '_ {
        Ts::ALL.iter().filter_map(|&t| self.get(t).map(|v| (t, v)))
    }
}

impl Serialize for Timestamps {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (t, v) in self.iter() {
            m.serialize_entry(t.name(), &v)?;
        }
        m.end()
    }
}

/// Stages: each the difference of two timestamps (DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    TcpHandshake,
    AcceptWait,
    LoadBalancing,
    ContainerNetwork,
    SidecarInbound,
    SocketWait,
    RequestRead,
    QueuePrefill,
    Decode,
    Inference,
    SidecarOutbound,
    EgressNetwork,
}

impl Stage {
    pub const ALL: [Stage; 12] = [
        Stage::TcpHandshake,
        Stage::AcceptWait,
        Stage::LoadBalancing,
        Stage::ContainerNetwork,
        Stage::SidecarInbound,
        Stage::SocketWait,
        Stage::RequestRead,
        Stage::QueuePrefill,
        Stage::Decode,
        Stage::Inference,
        Stage::SidecarOutbound,
        Stage::EgressNetwork,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::TcpHandshake => "tcp_handshake",
            Stage::AcceptWait => "accept_wait",
            Stage::LoadBalancing => "load_balancing",
            Stage::ContainerNetwork => "container_network",
            Stage::SidecarInbound => "sidecar_inbound",
            Stage::SocketWait => "socket_wait",
            Stage::RequestRead => "request_read",
            Stage::QueuePrefill => "queue_prefill",
            Stage::Decode => "decode",
            Stage::Inference => "inference",
            Stage::SidecarOutbound => "sidecar_outbound",
            Stage::EgressNetwork => "egress_network",
        }
    }

    /// Stages that lie inside E2E (they partition it); the others happen before the request.
    pub fn in_e2e(self) -> bool {
        !matches!(self, Stage::TcpHandshake | Stage::AcceptWait)
    }
}

/// Stage durations in ns, absent when either end was not seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages([u64; 12]);

impl Default for Stages {
    fn default() -> Stages {
        Stages([ABSENT; 12])
    }
}

impl Stages {
    pub fn get(&self, s: Stage) -> Option<u64> {
        present(self.0[s as usize])
    }
    /// Sum of the stages inside E2E (equal to E2E when the request's ends were seen).
    pub fn in_e2e_sum(&self) -> u64 {
        self.iter()
            .filter(|(s, _)| s.in_e2e())
            .map(|(_, v)| v)
            .sum()
    }
    pub fn iter(&self) -> impl Iterator<Item = (Stage, u64)> + '_ {
        Stage::ALL
            .iter()
            .filter_map(|&s| self.get(s).map(|v| (s, v)))
    }

    /// Derives the stages from the timestamps. Inside E2E the stages form a chain from the
    /// origin to the end, so they sum to E2E exactly; a link whose ends were not seen is
    /// absent, and the next present link starts where the previous one ended.
    pub fn compute(ts: &Timestamps, first_on_conn: bool, streaming: bool) -> Stages {
        let mut st = Stages::default();
        for (s, a, b) in Stages::intervals(ts, first_on_conn, streaming) {
            st.0[s as usize] = (b - a).min(ABSENT - 1);
        }
        st
    }

    /// Each present stage as `(stage, from, to)` in CLOCK_MONOTONIC ns, in timeline order:
    /// the boundaries `compute` takes the differences of (`to - from` is the stage). A
    /// boundary earlier than the previous one gives an empty interval at the previous one.
    pub fn intervals(
        ts: &Timestamps,
        first_on_conn: bool,
        streaming: bool,
    ) -> Vec<(Stage, u64, u64)> {
        let mut out = Vec::with_capacity(Stage::ALL.len());
        let mut put = |s: Stage, a: Option<u64>, b: Option<u64>| {
            if let (Some(a), Some(b)) = (a, b) {
                out.push((s, a, b.max(a)));
            }
        };
        if first_on_conn {
            put(
                Stage::TcpHandshake,
                ts.get(Ts::Syn),
                ts.get(Ts::Established),
            );
            put(
                Stage::AcceptWait,
                ts.get(Ts::Established),
                ts.get(Ts::Accepted),
            );
        }
        // The chain of in-E2E boundaries, earliest first. Each stage runs from the previous
        // present boundary to its own end boundary.
        let token1 = if streaming { ts.get(Ts::Token1) } else { None };
        let (sock_queued, read_first) = (ts.get(Ts::SockQueued), ts.get(Ts::ReadFirst));
        // With a sidecar, the packets reach the sidecar's socket (sidecar_queued); everything
        // from there until the app's socket holds the request is the sidecar's (its own socket
        // wait, its processing, the loopback hop).
        let sidecar_in = ts.get(Ts::SidecarQueued).or(ts.get(Ts::SidecarRead));
        // The whole request is in the app's socket: its first bytes, or where it came in
        // pieces (a large prompt on a slow link) its last ones. Until then the request is on
        // the network, even if the server already reads its first bytes.
        let app_in = sock_queued
            .or(read_first)
            .map(|a| a.max(ts.get(Ts::SockQueuedLast).unwrap_or(0)));
        // nat_done bounds a link only after node_in: without it (e.g. pod-to-service traffic
        // from the same node) it precedes the origin, and chaining from it overshoots E2E.
        let node_in = ts.get(Ts::NodeIn);
        let nat_done = ts.get(Ts::NatDone).filter(|_| node_in.is_some());
        let chain: [(Option<Stage>, Option<u64>); 10] = [
            (None, node_in.or(ts.get(Ts::PodIn))),
            (Some(Stage::LoadBalancing), nat_done),
            (Some(Stage::ContainerNetwork), sidecar_in.or(app_in)),
            (Some(Stage::SidecarInbound), sidecar_in.and(app_in)),
            (Some(Stage::SocketWait), sock_queued.and(read_first)),
            (Some(Stage::RequestRead), ts.get(Ts::ReadDone)),
            (Some(Stage::QueuePrefill), token1),
            (
                Some(if token1.is_some() {
                    Stage::Decode
                } else {
                    Stage::Inference
                }),
                ts.get(Ts::RespLast),
            ),
            (Some(Stage::SidecarOutbound), ts.get(Ts::SidecarLast)),
            (
                Some(Stage::EgressNetwork),
                ts.get(Ts::PodOut).max(ts.get(Ts::NodeOut)),
            ),
        ];
        // A boundary earlier than the previous one (the server read the first bytes before the
        // last ones arrived) makes a zero stage and does not move the chain back: the stages
        // still telescope to E2E.
        let mut prev: Option<u64> = None;
        for (stage, at) in chain {
            let Some(at) = at else { continue };
            if let Some(stage) = stage {
                put(stage, prev, Some(at));
            }
            prev = Some(prev.map_or(at, |p| p.max(at)));
        }
        out
    }
}

impl Serialize for Stages {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (st, v) in self.iter() {
            m.serialize_entry(st.name(), &ns_to_ms(v))?;
        }
        m.end()
    }
}

mod tokens;
pub use tokens::TokenTimes;

/// An address as the JSON record has it: `ip:port` (IPv6 in brackets), or `""`.
fn addr_or_empty<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.collect_str(a),
        None => s.serialize_str(""),
    }
}

pub fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// One request as the API reports it (DESIGN.md §5). Unknown values are `None` (JSON null).
#[derive(Debug, Clone, Serialize, Default)]
pub struct RequestRecord {
    pub id: u64,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// The node (when Kubernetes enrichment is on).
    pub node: Option<String>,
    /// The pod labels listed in `kubernetes.labels` that the pod has.
    pub labels: std::collections::BTreeMap<String, String>,
    pub pid: u32,
    pub comm: String,
    /// Client address (the connection's peer) and server address; in JSON as `ip:port`
    /// (`""` when unknown), formatted only when a record is serialized.
    #[serde(serialize_with = "addr_or_empty")]
    pub src: Option<SocketAddr>,
    #[serde(serialize_with = "addr_or_empty")]
    pub dst: Option<SocketAddr>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub model: Option<String>,
    pub status: Option<u16>,
    pub streaming: bool,
    pub aborted: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// SSE events that carried generated content.
    pub output_events: u32,
    /// From `usage.completion_tokens` when the server sent it, else the content events.
    pub output_tokens: Option<u32>,
    pub prompt_tokens: Option<u32>,
    /// Which timestamp started the clock (`node_in`, `pod_in`, `sock_queued` or `read_first`).
    pub origin: Option<&'static str>,
    pub start_ns: Option<u64>,
    pub end_ns: Option<u64>,
    pub ttfb_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
    /// Write time of every content event; in the JSON record, the gaps between them (`itl_ms`).
    #[serde(rename = "itl_ms", serialize_with = "tokens::serialize_itl_ms")]
    pub token_ns: TokenTimes,
    pub timestamps: Timestamps,
    pub stages: Stages,
    /// Run-queue wait (ms) of the server thread that served the request, per server-side stage
    /// (`queue_prefill`, `decode` or `inference`) and `total`; a stage whose two ends were
    /// different threads has none (see `inside`). Null with `cpu_runqueue: false`.
    pub cpu_runqueue_wait_ms: Option<crate::inside::RunqWait>,
    /// The server cgroup's GPU activity per server-side stage; null when it has no GPU
    /// counters (no libcuda probed).
    pub gpu: Option<Box<crate::inside::GpuStages>>,
    /// The sidecar proxy the request passed through (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarInfo>,
    /// Cgroup and connection identity, for labelling and joins; not in the JSON record.
    #[serde(skip)]
    pub cgroup_id: u64,
    #[serde(skip)]
    pub sock_id: u64,
    /// The connection's (local, remote) addresses, for the sidecar join.
    #[serde(skip)]
    pub conn_addrs: Option<(SocketAddr, SocketAddr)>,
    /// Index of the request on its connection (0 = first one seen).
    #[serde(skip)]
    pub conn_seq: u64,
    /// Whether it was the first request of a connection whose accept was seen.
    #[serde(skip)]
    pub first_on_conn: bool,
    /// Content fingerprint of the request (method and body), for the sidecar join.
    #[serde(skip)]
    pub fingerprint: u64,
    /// The kernel's cumulative counters at the events bounding the server-side stages.
    #[serde(skip)]
    pub marks: crate::inside::Marks,
}

/// The sidecar's side of a request that went through one (DESIGN.md §3).
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct SidecarInfo {
    pub pid: u32,
    pub comm: String,
    /// The sidecar's end of its connection to the app (`ip:port`).
    pub upstream: String,
    /// First token: the app wrote it → the sidecar wrote it on to the client.
    pub outbound_first_token_ms: Option<f64>,
}

impl RequestRecord {
    /// What the record holds in memory, itself and its heap parts (an estimate: allocator
    /// overhead aside), for the recent-request store's byte bound.
    pub fn heap_bytes(&self) -> usize {
        let s = |v: &Option<String>| v.as_ref().map_or(0, String::capacity);
        // A BTreeMap entry: key and value headers, their text, the node's share.
        let labels: usize = self
            .labels
            .iter()
            .map(|(k, v)| k.capacity() + v.capacity() + 64)
            .sum();
        std::mem::size_of::<RequestRecord>()
            + self.token_ns.heap_bytes()
            + [
                &self.namespace,
                &self.pod,
                &self.container,
                &self.node,
                &self.method,
                &self.path,
                &self.model,
            ]
            .into_iter()
            .map(s)
            .sum::<usize>()
            + self.comm.capacity()
            + labels
            + self
                .gpu
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<crate::inside::GpuStages>())
            + self
                .sidecar
                .as_ref()
                .map_or(0, |sc| sc.comm.capacity() + sc.upstream.capacity())
    }

    /// Fills every derived field (origin, start/end, headline latencies, ITL, stages) from
    /// `timestamps` and `token_ns`. Call once the request is complete or aborted.
    pub fn finish(&mut self, first_on_conn: bool) {
        self.first_on_conn = first_on_conn;
        let ts = &self.timestamps;
        let origin = [
            Ts::NodeIn,
            Ts::PodIn,
            Ts::SidecarQueued,
            Ts::SidecarRead,
            Ts::SockQueued,
            Ts::ReadFirst,
        ]
        .into_iter()
        .filter_map(|t| ts.get(t).map(|v| (v, t)))
        .min();
        self.origin = origin.map(|(_, t)| t.name());
        self.start_ns = origin.map(|(v, _)| v);
        self.end_ns = [Ts::RespLast, Ts::SidecarLast, Ts::PodOut, Ts::NodeOut]
            .into_iter()
            .filter_map(|t| ts.get(t))
            .max();
        let since_start = |t: Option<u64>| match (self.start_ns, t) {
            (Some(s), Some(t)) => Some(ns_to_ms(t.saturating_sub(s))),
            _ => None,
        };
        self.ttfb_ms = since_start(ts.get(Ts::RespFirst));
        // Behind a sidecar the client gets each token when the sidecar writes it on.
        self.ttft_ms = if self.streaming {
            since_start(ts.get(Ts::SidecarToken1).or(ts.get(Ts::Token1)))
        } else {
            None
        };
        self.e2e_ms = if self.aborted {
            None
        } else {
            since_start(self.end_ns)
        };
        self.token_ns.shrink_to_fit();
        self.tpot_ms = match (self.token_ns.first(), self.token_ns.last()) {
            (Some(first), Some(last)) if self.token_ns.len() > 1 => {
                Some(ns_to_ms(last.saturating_sub(first)) / (self.token_ns.len() - 1) as f64)
            }
            _ => None,
        };
        self.stages = Stages::compute(&self.timestamps, first_on_conn, self.streaming);
        let (runq, gpu) = crate::inside::compute(&self.marks, &self.stages);
        (self.cpu_runqueue_wait_ms, self.gpu) = (runq, gpu.map(Box::new));
        if let Some(sc) = self.sidecar.as_mut() {
            sc.outbound_first_token_ms = match (
                self.timestamps.get(Ts::Token1),
                self.timestamps.get(Ts::SidecarToken1),
            ) {
                (Some(a), Some(b)) if self.streaming => Some(ns_to_ms(b.saturating_sub(a))),
                _ => None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pairs: &[(Ts, u64)], tokens: &[u64]) -> RequestRecord {
        let mut r = RequestRecord {
            streaming: !tokens.is_empty(),
            token_ns: tokens.to_vec().into(),
            ..Default::default()
        };
        for &(t, v) in pairs {
            r.timestamps.set(t, v);
        }
        if let (Some(&a), Some(&b)) = (tokens.first(), tokens.last()) {
            r.timestamps.set(Ts::Token1, a);
            r.timestamps.set(Ts::TokenN, b);
        }
        r.finish(true);
        r
    }

    fn in_e2e_sum(r: &RequestRecord) -> u64 {
        r.stages.in_e2e_sum()
    }

    #[test]
    fn server_side_streaming_partition() {
        let r = rec(
            &[
                (Ts::SockQueued, 1_000_000),
                (Ts::ReadFirst, 1_500_000),
                (Ts::ReadDone, 2_000_000),
                (Ts::RespFirst, 3_000_000),
                (Ts::RespLast, 30_000_000),
            ],
            &[10_000_000, 20_000_000, 29_000_000],
        );
        assert_eq!(r.origin, Some("sock_queued"));
        assert_eq!(r.ttft_ms, Some(9.0));
        assert_eq!(r.ttfb_ms, Some(2.0));
        assert_eq!(r.e2e_ms, Some(29.0));
        assert_eq!(r.token_ns.itl_ms().collect::<Vec<_>>(), vec![10.0, 9.0]);
        assert_eq!(r.tpot_ms, Some(9.5));
        assert_eq!(r.stages.get(Stage::SocketWait), Some(500_000));
        assert_eq!(r.stages.get(Stage::RequestRead), Some(500_000));
        assert_eq!(r.stages.get(Stage::QueuePrefill), Some(8_000_000));
        assert_eq!(r.stages.get(Stage::Decode), Some(20_000_000));
        assert_eq!(r.stages.get(Stage::Inference), None);
        assert_eq!(r.stages.get(Stage::ContainerNetwork), None);
        assert_eq!(in_e2e_sum(&r), 29_000_000);
    }

    #[test]
    fn a_request_arriving_in_pieces_is_on_the_network_until_its_last_bytes() {
        // The server reads the first bytes at 1.2 ms, the last ones arrive at 9 ms (a slow
        // link), it has read everything at 9.1 ms.
        let r = rec(
            &[
                (Ts::NodeIn, 1_000_000),
                (Ts::SockQueued, 1_100_000),
                (Ts::ReadFirst, 1_200_000),
                (Ts::SockQueuedLast, 9_000_000),
                (Ts::ReadDone, 9_100_000),
                (Ts::RespFirst, 10_000_000),
                (Ts::RespLast, 20_000_000),
            ],
            &[11_000_000, 20_000_000],
        );
        assert_eq!(r.stages.get(Stage::ContainerNetwork), Some(8_000_000));
        assert_eq!(r.stages.get(Stage::SocketWait), Some(0));
        assert_eq!(r.stages.get(Stage::RequestRead), Some(100_000));
        assert_eq!(r.stages.get(Stage::QueuePrefill), Some(1_900_000));
        assert_eq!(in_e2e_sum(&r), 19_000_000);
        // Busy server: everything arrived (5 ms) before it read (7 ms).
        let r = rec(
            &[
                (Ts::NodeIn, 1_000_000),
                (Ts::SockQueued, 1_100_000),
                (Ts::SockQueuedLast, 5_000_000),
                (Ts::ReadFirst, 7_000_000),
                (Ts::ReadDone, 7_000_000),
                (Ts::RespLast, 20_000_000),
            ],
            &[11_000_000, 20_000_000],
        );
        assert_eq!(r.stages.get(Stage::ContainerNetwork), Some(4_000_000));
        assert_eq!(r.stages.get(Stage::SocketWait), Some(2_000_000));
        assert_eq!(in_e2e_sum(&r), 19_000_000);
    }

    #[test]
    fn network_chain_partitions_e2e() {
        let r = rec(
            &[
                (Ts::Syn, 100),
                (Ts::Established, 300),
                (Ts::Accepted, 700),
                (Ts::NodeIn, 1_000),
                (Ts::NatDone, 1_200),
                (Ts::PodIn, 1_500),
                (Ts::SockQueued, 2_000),
                (Ts::ReadFirst, 2_600),
                (Ts::ReadDone, 3_000),
                (Ts::RespLast, 9_000),
                (Ts::NodeOut, 9_400),
            ],
            &[],
        );
        assert_eq!(r.origin, Some("node_in"));
        assert_eq!(r.stages.get(Stage::TcpHandshake), Some(200));
        assert_eq!(r.stages.get(Stage::AcceptWait), Some(400));
        assert_eq!(r.stages.get(Stage::LoadBalancing), Some(200));
        assert_eq!(r.stages.get(Stage::ContainerNetwork), Some(800));
        assert_eq!(r.stages.get(Stage::Inference), Some(6_000));
        assert_eq!(r.stages.get(Stage::EgressNetwork), Some(400));
        assert_eq!(r.e2e_ms, Some(ns_to_ms(8_400)));
        assert_eq!(in_e2e_sum(&r), 8_400);
        assert_eq!(r.ttft_ms, None, "no tokens: TTFT unknown, not 0");
    }

    #[test]
    fn nat_without_node_in_stays_inside_e2e() {
        let r = rec(
            &[
                (Ts::NatDone, 1_000),
                (Ts::PodIn, 1_200),
                (Ts::SockQueued, 2_000),
                (Ts::ReadFirst, 2_500),
                (Ts::ReadDone, 3_000),
                (Ts::RespLast, 9_000),
            ],
            &[],
        );
        assert_eq!(r.origin, Some("pod_in"));
        assert_eq!(r.stages.get(Stage::LoadBalancing), None);
        assert_eq!(r.stages.get(Stage::ContainerNetwork), Some(800));
        assert_eq!(in_e2e_sum(&r), 7_800);
    }

    #[test]
    fn aborted_has_no_e2e_and_json_nulls() {
        let mut r = rec(&[(Ts::ReadFirst, 10), (Ts::ReadDone, 20)], &[]);
        r.aborted = true;
        r.finish(false);
        assert_eq!(r.e2e_ms, None);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["e2e_ms"].is_null());
        assert!(v["ttft_ms"].is_null());
        assert_eq!(v["timestamps"]["read_first"], 10);
        assert_eq!(v["stages"]["request_read"], 0.00001);
        assert!(v["stages"].get("tcp_handshake").is_none());
    }
}
