# Two commands get a newcomer from a fresh Debian/Ubuntu machine (as root, with a Rust toolchain)
# to a running demo and a passing test suite:  make demo   and   make test.
# Each installs the system packages it needs when they are missing.

SHELL := /bin/bash
CARGO ?= cargo
# System packages: BPF toolchain, netns testbed, real peers (promtool, nginx), bpftool (the
# benchmarks read the programs' run time with it).
APT_PKGS := clang llvm libelf-dev zlib1g-dev libbpf-dev pkg-config make iproute2 iptables procps prometheus nginx-light haproxy curl bpftool

.PHONY: all deps mounts build test test-unit test-kernel lint fuzz demo bench bench-soak clean

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
	@# The L7 suite again on the other syscall hook sets: one tracepoint per syscall (the
	@# default on kernels without the socket layer's tracepoints) and raw sys_enter/sys_exit.
	LLMSLO_SYSCALL_HOOKS=tracepoint $(CARGO) test --test l7 -- --test-threads=1
	LLMSLO_SYSCALL_HOOKS=raw $(CARGO) test --test l7 -- --test-threads=1
	@# What the verifier did with each BPF program (tests/verifier.rs), for the log.
	@cat target/verifier-stats.txt 2>/dev/null || true

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# The parsers alone, as fuzz/ builds them (the `agent` feature off).
	$(CARGO) clippy --lib --no-default-features -- -D warnings

# cargo fuzz on the parsers (src/assemble/fuzz.rs), each target for FUZZ_SECONDS from the
# checked-in corpus (fuzz/corpus/<target>; new finds go to fuzz/scratch/, not committed).
# RUSTC_BOOTSTRAP lets the stable toolchain take cargo fuzz's -Z flags: no nightly needed.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := http_head chunked sse assembler
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p scratch/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t scratch/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
	    | grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY|==[0-9]+==' ; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "fuzz target $$t failed (crash input in fuzz/artifacts/$$t)"; exit 1; }; \
	done

demo: deps mounts
	$(CARGO) build --release --bin llm-slo-agent
	./target/release/llm-slo-agent demo

# Userspace hot path (criterion), then the overhead benchmark, which rewrites docs/BENCHMARKS.md.
bench: deps mounts
	$(CARGO) bench --bench pipeline
	LLMSLO_BENCH_WRITE=1 $(CARGO) bench --bench overhead
	LLMSLO_BENCH_WRITE=1 $(CARGO) bench --bench tc

# Sustained record rate (60 s) and memory over a 10-minute soak; rewrites its section of
# docs/BENCHMARKS.md. Separate from `bench` for its length (~12 minutes).
bench-soak: deps mounts
	LLMSLO_BENCH_WRITE=1 $(CARGO) bench --bench soak

clean:
	$(CARGO) clean
