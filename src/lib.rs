//! llm-slo-agent: kernel-level latency and SLO observability for LLM inference servers.
//! Follow one request: `bpf/l7.bpf.c` → `ringbuf` → `assemble` → `stats` → `api`.
//!
//! Without the `agent` feature (on by default) the crate is the request parsers alone:
//! `assemble` and the `event`, `record` and `inside` types it reads and writes. That is what
//! `fuzz/` builds.

// The parsers and the types they read and write: always built.
pub mod assemble;
pub mod event;
pub mod inside;
pub mod record;

/// Items that exist only with the `agent` feature (on by default).
macro_rules! agent_only {
    ($($item:item)*) => { $( #[cfg(feature = "agent")] $item )* };
}

agent_only! {
    pub mod abnormal;
    pub mod agent;
    pub mod api;
    pub mod caps;
    pub mod config;
    pub mod crosscheck;
    pub mod demo;
    pub mod discovery;
    pub mod floor;
    pub mod gpu;
    pub mod loader;
    pub mod netpath;
    pub mod otlp;
    pub mod podtotals;
    pub mod probe;
    pub mod procwatch;
    pub mod ringbuf;
    pub mod rtnl;
    pub mod runq;
    pub mod selfcost;
    pub mod serve;
    pub mod skel;
    pub mod slo;
    pub mod stats;
}
