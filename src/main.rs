//! `llm-slo-agent`: run the agent, probe the kernel, or run the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use llm_slo_agent::{config::Config, probe};

#[derive(Parser)]
#[command(
    name = "llm-slo-agent",
    version,
    about = "Kernel-level latency and SLO observability for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Trace inference servers on this node and serve /metrics and the JSON API.
    Run(RunArgs),
    /// Report which kernel hooks this node offers and what the agent does without the others.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Build a small simulated node with inference pods, drive load, and run the agent on it.
    Demo(DemoArgs),
    /// The testbed's synthetic OpenAI-compatible server (used by the demo and the tests).
    #[command(hide = true)]
    SynthServer {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// YAML config file (see README "Configuration").
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address for /metrics and the API (default 127.0.0.1:9464).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Trace this process (repeatable).
    #[arg(long = "target-pid")]
    target_pid: Vec<u32>,
    /// Trace every process in this cgroup v2 path, absolute or relative to the mount (repeatable).
    #[arg(long = "target-cgroup")]
    target_cgroup: Vec<PathBuf>,
    /// Do not look for inference servers by command line; trace only the explicit targets.
    #[arg(long)]
    no_auto: bool,
    /// Extra command-line signature of an inference server (repeatable).
    #[arg(long = "signature")]
    signature: Vec<String>,
    /// Treat this interface as the node's ingress device (repeatable; default: the default route's).
    #[arg(long = "node-device")]
    node_device: Vec<String>,
    /// No packet-path hooks (tc, netfilter): server-side stages only.
    #[arg(long)]
    no_network: bool,
}

#[derive(clap::Args, Clone)]
struct DemoArgs {
    /// Address for the demo agent's /metrics and API.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::SynthServer { args } = cli.cmd {
        return testbed::synth::synth_main(
            std::iter::once("llmslo-synth-server".to_string())
                .chain(args)
                .collect(),
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Run(args) => run(args),
        Cmd::Probe { json } => {
            let r = probe::run();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                probe::print_text(&r);
            }
            Ok(())
        }
        Cmd::Demo(args) => {
            llm_slo_agent::demo::run(args.listen, args.duration.map(Duration::from_secs))
        }
        Cmd::SynthServer { .. } => unreachable!("handled above"),
    }
}

fn run(args: RunArgs) -> Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    cfg.discovery.target_pids.extend(args.target_pid);
    cfg.discovery.target_cgroups.extend(args.target_cgroup);
    cfg.discovery.extra_signatures.extend(args.signature);
    if args.no_auto {
        cfg.discovery.auto = false;
    }
    cfg.network.node_devices.extend(args.node_device);
    if args.no_network {
        cfg.network.enabled = false;
    }
    cfg.validate()?;
    serve(cfg)
}

/// Runs the agent until SIGTERM/SIGINT.
pub fn serve(cfg: Config) -> Result<()> {
    // Before any thread is started: each inherits it.
    match llm_slo_agent::agent::lower_priority(cfg.nice) {
        Ok(n) => tracing::info!(nice = n, "agent priority"),
        Err(e) => tracing::warn!(error = %e, "could not lower the agent's priority"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(llm_slo_agent::agent::run_until_signal(cfg))
}
