# Two commands get a newcomer from a fresh Debian/Ubuntu machine (as root, with a Rust toolchain)
# to a running demo and a passing test suite:  make demo   and   make test.
# Each installs the system packages it needs when they are missing.

SHELL := /bin/bash
CARGO ?= cargo
# System packages: BPF toolchain, netns testbed, real peers (promtool, nginx).
APT_PKGS := clang llvm libelf-dev zlib1g-dev libbpf-dev pkg-config make iproute2 iptables procps prometheus nginx-light haproxy curl

.PHONY: all deps mounts build test test-unit test-kernel lint demo bench clean

all: build

deps:
	@missing=""; for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "Rust toolchain missing: install rustup (https://rustup.rs) then rerun"; exit 1; }
	@# nginx/haproxy are used as sidecars by tests, never as system services.
	@systemctl disable --now nginx haproxy >/dev/null 2>&1 || true

# tracefs and bpffs: the agent mounts them itself when it can; do it here for the tests too.
mounts:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

build: deps
	$(CARGO) build --workspace --all-targets

# Unit tests need nothing; kernel tests (BPF + network namespaces) need root and run one at a
# time (they measure latency on a 2-core machine). With LLMSLO_REQUIRE_BPF=1 (CI) a kernel test
# that cannot load its programs fails instead of skipping.
test: deps mounts
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --workspace --test '*' -- --test-threads=1

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo: deps mounts
	$(CARGO) build --release --bin llm-slo-agent
	./target/release/llm-slo-agent demo

# Userspace hot path (criterion), then the overhead benchmark, which rewrites docs/BENCHMARKS.md.
bench: deps mounts
	$(CARGO) bench --bench pipeline
	LLMSLO_BENCH_WRITE=1 $(CARGO) bench --bench overhead
	LLMSLO_BENCH_WRITE=1 $(CARGO) bench --bench tc

clean:
	$(CARGO) clean
