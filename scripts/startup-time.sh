#!/bin/bash
# How long the agent takes from its start to /readyz answering 200 (its programs loaded and
# attached), and the CPU it used until then, RUNS times. The agent traces only this script's
# shell (`--no-auto --target-pid`), so discovery has nothing to find and the time is the load's.
# Root; one line per run.
#
#   scripts/startup-time.sh [AGENT_BIN] [RUNS]
set -euo pipefail
AG=${1:-target/release/llm-slo-agent}
RUNS=${2:-3}
[ "$(id -u)" = 0 ] || { echo "SKIPPING: needs root (loads BPF programs)"; exit 0; }
[ -x "$AG" ] || { echo "no agent binary at $AG (cargo build --release --bin llm-slo-agent)"; exit 1; }
PORT=$((20000 + RANDOM % 5000))
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
TCK=$(getconf CLK_TCK)
for i in $(seq 1 "$RUNS"); do
  s=$(date +%s%N)
  "$AG" run --no-auto --target-pid $$ --listen "127.0.0.1:$PORT" >"$LOG" 2>&1 &
  pid=$!
  ready=no
  for _ in $(seq 1 1000); do   # 10 s at most
    if curl -sf -o /dev/null "127.0.0.1:$PORT/readyz"; then ready=yes; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  e=$(date +%s%N)
  cpu=$(awk -v t="$TCK" '{printf "%.2f", ($14 + $15) / t}' "/proc/$pid/stat" 2>/dev/null || echo "?")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "$ready" != yes ]; then echo "run $i: not ready within 10 s; its log:"; cat "$LOG"; exit 1; fi
  echo "run $i: ready in $(( (e - s) / 1000000 )) ms, agent CPU until then ${cpu} s"
done
