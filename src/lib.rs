//! llm-slo-agent: kernel-level latency and SLO observability for LLM inference servers.
//! Follow one request: `bpf/l7.bpf.c` → `ringbuf` → `assemble` → `stats` → `api`.

pub mod abnormal;
pub mod agent;
pub mod api;
pub mod assemble;
pub mod caps;
pub mod config;
pub mod crosscheck;
pub mod demo;
pub mod discovery;
pub mod event;
pub mod gpu;
pub mod inside;
pub mod loader;
pub mod netpath;
pub mod otlp;
pub mod podtotals;
pub mod probe;
pub mod procwatch;
pub mod record;
pub mod ringbuf;
pub mod rtnl;
pub mod runq;
pub mod serve;
pub mod skel;
pub mod slo;
pub mod stats;
