#!/bin/bash
# The CPU the per-pod run-queue counters cost: one target process of THREADS sleeping threads
# (python3; by pid, no network probes, no command-line discovery), no load; the agent's threads'
# time on a CPU (/proc/<pid>/task/*/schedstat, ns) over SECONDS after start-up, its BPF thread
# (ring-buffer reader, housekeeping, the run-queue reads every 2 s) apart. Root.
# Run it for two builds in turns to compare them (docs/BENCHMARKS.md, "Run-queue counters from
# kept files").
#
#   scripts/runq-cost.sh [AGENT_BIN] [THREADS] [SECONDS]
set -euo pipefail
AG=${1:-target/release/llm-slo-agent}
N=${2:-300}
S=${3:-20}
[ "$(id -u)" = 0 ] || { echo "SKIPPING: needs root (loads BPF programs)"; exit 0; }
[ -x "$AG" ] || { echo "no binary at $AG (cargo build --release)"; exit 1; }
APORT=$((25000 + RANDOM % 5000))
LOG=$(mktemp)
python3 -c "
import threading, time
for _ in range($N - 1):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
time.sleep(3600)" &
T=$!
"$AG" run --listen "127.0.0.1:$APORT" --no-auto --no-network --target-pid "$T" >"$LOG" 2>&1 &
A=$!
cleanup() { kill -TERM "$A" 2>/dev/null; wait "$A" 2>/dev/null; kill "$T" 2>/dev/null; rm -f "$LOG"; }
trap cleanup EXIT
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$APORT/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "127.0.0.1:$APORT/readyz" >/dev/null || { echo "agent not ready:"; cat "$LOG"; exit 1; }
sleep 3
echo "target $T: $(ls /proc/$T/task | wc -l) threads"
snap() { for t in /proc/$A/task/*; do echo "$(basename "$t") $(tr ' ' _ <"$t/comm") $(cut -d' ' -f1 "$t/schedstat")"; done | sort; }
b=$(snap); sleep "$S"; a=$(snap)
join <(echo "$b") <(echo "$a") | awk -v n="$S" '{d=$5-$3; tot+=d; if ($2=="llmslo-bpf") bpf=d}
  END {printf "agent CPU: BPF thread %.2f ms/s, all threads %.2f ms/s over %d s\n", bpf/1e6/n, tot/1e6/n, n}'
