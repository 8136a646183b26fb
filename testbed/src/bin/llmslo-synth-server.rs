//! `llmslo-synth-server`: the synthetic OpenAI-compatible server as its own process,
//! so tests can start it inside a pod's netns and cgroup.

fn main() -> anyhow::Result<()> {
    testbed::synth_main(std::env::args().skip(1).collect())
}
