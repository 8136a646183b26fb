#!/bin/bash
# The CPU an idle agent costs: a synthetic server on loopback as its one target (by pid; command-
# line discovery stays on, as by default), no load; each of the agent's threads' time on a CPU
# (/proc/<pid>/task/*/schedstat, ns) over SECONDS, after its start-up has settled. Root.
# Run it for two builds in turns to compare them (docs/BENCHMARKS.md, "Discovery that keeps what
# did not change").
#
#   scripts/idle-cost.sh [AGENT_BIN] [SECONDS]
set -euo pipefail
AG=${1:-target/release/llm-slo-agent}
N=${2:-20}
SYNTH=${SYNTH:-target/release/llmslo-synth-server}
[ "$(id -u)" = 0 ] || { echo "SKIPPING: needs root (loads BPF programs)"; exit 0; }
for b in "$AG" "$SYNTH"; do
  [ -x "$b" ] || { echo "no binary at $b (cargo build --release)"; exit 1; }
done
SPORT=$((25000 + RANDOM % 5000))
APORT=$((SPORT + 1))
LOG=$(mktemp)
"$SYNTH" --listen "127.0.0.1:$SPORT" >/dev/null 2>&1 &
S=$!
A=
cleanup() {
  [ -n "$A" ] && kill -TERM "$A" 2>/dev/null && wait "$A" 2>/dev/null
  kill "$S" 2>/dev/null
  wait "$S" 2>/dev/null
  rm -f "$LOG"
}
trap cleanup EXIT
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$SPORT") 2>/dev/null && break
  sleep 0.1
done
kill -0 "$S" 2>/dev/null || { echo "the synthetic server did not start (port $SPORT taken?)"; exit 1; }
"$AG" run --listen "127.0.0.1:$APORT" --target-pid "$S" >"$LOG" 2>&1 &
A=$!
for _ in $(seq 1 100); do
  curl -sf "127.0.0.1:$APORT/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "127.0.0.1:$APORT/readyz" >/dev/null || { echo "agent not ready:"; cat "$LOG"; exit 1; }
sleep 3
snap() {
  for t in /proc/"$A"/task/*; do
    echo "$(basename "$t") $(cat "$t/comm") $(cut -d' ' -f1 "$t/schedstat")"
  done | sort
}
before=$(snap)
sleep "$N"
after=$(snap)
join <(echo "$before") <(echo "$after") | awk -v n="$N" '
  { d = $5 - $3; tot += d; if (d > 0) printf "%-20s %6.2f ms/s\n", $2, d / 1e6 / n }
  END { printf "%-20s %6.2f ms/s\n", "all threads", tot / 1e6 / n }'
