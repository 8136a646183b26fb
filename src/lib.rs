//! llm-slo-agent: kernel-level latency and SLO observability for LLM inference servers.
//! Follow one request: `bpf/l7.bpf.c` → `ringbuf` → `assemble` → `stats` → `api`.
//!
//! Without the `agent` feature (on by default) the crate is the request parsers alone:
//! `assemble` and the `event`, `record` and `inside` types it reads and writes. That is what
//! `fuzz/` builds.

#[cfg(feature = "agent")]
pub mod abnormal;
#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "agent")]
pub mod api;
pub mod assemble;
#[cfg(feature = "agent")]
pub mod caps;
#[cfg(feature = "agent")]
pub mod config;
#[cfg(feature = "agent")]
pub mod crosscheck;
#[cfg(feature = "agent")]
pub mod demo;
#[cfg(feature = "agent")]
pub mod discovery;
pub mod event;
#[cfg(feature = "agent")]
pub mod gpu;
pub mod inside;
#[cfg(feature = "agent")]
pub mod loader;
#[cfg(feature = "agent")]
pub mod netpath;
#[cfg(feature = "agent")]
pub mod otlp;
#[cfg(feature = "agent")]
pub mod podtotals;
#[cfg(feature = "agent")]
pub mod probe;
#[cfg(feature = "agent")]
pub mod procwatch;
pub mod record;
#[cfg(feature = "agent")]
pub mod ringbuf;
#[cfg(feature = "agent")]
pub mod rtnl;
#[cfg(feature = "agent")]
pub mod runq;
#[cfg(feature = "agent")]
pub mod serve;
#[cfg(feature = "agent")]
pub mod skel;
#[cfg(feature = "agent")]
pub mod slo;
#[cfg(feature = "agent")]
pub mod stats;
