# llm-slo-agent node agent image.
#
#   docker build -t llm-slo-agent:dev .
#
# Two stages: a Debian bookworm Rust toolchain builds the agent (clang compiles the BPF C
# into skeletons in build.rs; libbpf-sys builds its vendored libbpf with make and links
# libelf and zlib), and a slim Debian runtime carries the one binary and the two shared
# libraries it links (libelf, zlib). No compiler, no shell tools beyond Debian's base.
#
# The build stage's RUN steps are also a plain script, scripts/docker-build-steps.sh, so CI
# can check them on a Debian machine without a Docker engine. tests/deploy.rs checks that the
# apt package list and the cargo command below equal the script's: change both together.

########## build ##########
FROM rust:1-bookworm AS build

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends clang llvm libelf-dev zlib1g-dev pkg-config make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The workspace: the agent package at the root, its members (testbed: the synthetic server
# behind the hidden `synth-server` subcommand; cni-adapters), the BPF sources and vendored
# BTF headers build.rs compiles, and benches/ (Cargo.toml names its [[bench]] targets, so
# the files must exist for the manifest to load). tests/ is not needed to build the binary.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src/ src/
COPY vmlinux/ vmlinux/
COPY testbed/ testbed/
COPY cni-adapters/ cni-adapters/
COPY benches/ benches/

RUN cargo build --release --locked --bin llm-slo-agent

########## runtime ##########
FROM debian:bookworm-slim

# libelf1 and zlib1g: the binary links them (libbpf). ca-certificates: TLS roots for
# outbound exports. The agent runs no external command (no ip, tc or iptables: it talks
# netlink and BPF syscalls itself), so nothing else is installed.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libelf1 zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /src/target/release/llm-slo-agent /usr/local/bin/llm-slo-agent

# A default config equal to the built-in defaults, so the image's CMD runs as is
# (`docker run --privileged --pid=host --net=host ...`). Kubernetes mounts the chart's
# ConfigMap over /etc/llm-slo.
RUN mkdir -p /etc/llm-slo \
 && printf '%s\n' '# Built-in defaults; mount your own agent.yaml here (README "Configuration").' \
      'listen: 127.0.0.1:9464' > /etc/llm-slo/agent.yaml

# Root, on purpose. Loading BPF programs needs CAP_BPF and CAP_PERFMON (plus CAP_NET_ADMIN for
# tc/netfilter, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH to read other processes' /proc entries,
# CAP_SYS_RESOURCE for RLIMIT_MEMLOCK on kernels < 5.11). A non-root user would hold none of
# them after exec unless they were granted as ambient capabilities, which Kubernetes cannot
# express. The DaemonSet (deploy/) therefore runs as uid 0 with every capability dropped
# except that list, privileged: false and a read-only root filesystem.
USER 0

# /metrics and the JSON API (the config's `listen`).
EXPOSE 9464

ENTRYPOINT ["llm-slo-agent"]
CMD ["run", "--config", "/etc/llm-slo/agent.yaml"]
