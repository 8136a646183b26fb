#!/bin/bash
# What the agent's syscall hooks cost a process, without and with the agent, on each hook set
# (the socket layer's tracepoints, the default where the kernel has them; one tracepoint per
# syscall, LLMSLO_SYSCALL_HOOKS=tracepoint; the raw sys_enter/sys_exit, =raw), interleaved ROUNDS
# times:
#   - a target writing 120-byte chunks to a TCP socket on loopback (every write traced and copied),
#   - the same writer when it is not a target,
#   - an untargeted process calling write(/dev/null) and getppid(),
#     with the target named by pid, and (bpf_stats table only) by its cgroup.
# Then, for the target run, the BPF programs' ns per run from kernel.bpf_stats_enabled (restored),
# and (with perf installed) the untargeted calls' BPF time from perf samples, bpf_stats off.
# The processes under test run on CPU 1, the agent on CPU 0. Root; prints a markdown table.
#
#   scripts/syscall-cost.sh [AGENT_BIN] [ROUNDS]
#
# SETS="sock" limits it to some hook sets; PERF_ONLY=1 runs only the perf part (ROUNDS times),
# the quickest look at what untargeted processes pay.
set -euo pipefail
AG=${1:-target/release/llm-slo-agent}
ROUNDS=${2:-3}
N=${N:-100000}
[ "$(id -u)" = 0 ] || { echo "SKIPPING: needs root (loads BPF programs)"; exit 0; }
[ -x "$AG" ] || { echo "no agent binary at $AG (cargo build --release --bin llm-slo-agent)"; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d)
PORT_API=$((20000 + RANDOM % 5000))
STATS_WAS=$(sysctl -n kernel.bpf_stats_enabled)
AP=""
CG=""
cleanup() {
  [ -n "$AP" ] && kill "$AP" 2>/dev/null && wait "$AP" 2>/dev/null || true
  sysctl -q kernel.bpf_stats_enabled="$STATS_WAS"
  # A cgroup of ours left by an interruption: its sleep goes to the parent first.
  if [ -n "$CG" ]; then
    while read -r p; do echo "$p" >"$(dirname "$CG")/cgroup.procs"; done <"$CG/cgroup.procs" || true
    rmdir "$CG" 2>/dev/null || true
  fi
  rm -rf "$W"
}
trap cleanup EXIT
cc -O2 -o "$W/target_write" "$HERE/syscall-cost/target_write.c"
cc -O2 -o "$W/syscalls" "$HERE/syscall-cost/syscalls.c"
printf 'crosscheck:\n  enabled: false\n' >"$W/agent.yaml"

start_agent() { # $1 hooks, then the target: --target-pid PID or --target-cgroup PATH
  local hooks=$1; shift
  LLMSLO_SYSCALL_HOOKS=$hooks taskset -c 0 "$AG" run --config "$W/agent.yaml" --no-auto --no-network \
    "$@" --listen 127.0.0.1:$PORT_API >"$W/agent.log" 2>&1 &
  AP=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:$PORT_API/readyz >/dev/null && return; sleep 0.1; done
  echo "agent not ready:"; cat "$W/agent.log"; exit 1
}
stop_agent() { kill "$AP"; wait "$AP" 2>/dev/null || true; AP=""; }

# The target writer waits for a go file, so the agent can be started on its pid first.
target_write() { # $1: hooks or "none", $2: "untargeted" to target a sleep instead; ns per write
  rm -f "$W/go"
  exec 3< <(TW_GO="$W/go" taskset -c 1 "$W/target_write" "$N" $((30000 + RANDOM % 5000)))
  read -r -u 3 pid
  local s=""
  if [ "${2:-}" = untargeted ]; then sleep 600 & s=$!; fi
  [ "$1" != none ] && start_agent "$1" --target-pid "${s:-$pid}"
  [ "$1" != none ] && bpftool -j prog show >"$W/before.json"
  touch "$W/go"
  local out; out=$(cat <&3)
  [ "$1" != none ] && bpftool -j prog show >"$W/after.json"
  [ "$1" != none ] && stop_agent
  [ -n "$s" ] && kill "$s"
  echo "${out#write_ns }"
}

untargeted() { # $1: hooks or "none"; prints "write getppid" ns
  if [ "$1" != none ]; then sleep 600 & local s=$!; start_agent "$1" --target-pid "$s"; fi
  local w g
  w=$(taskset -c 1 "$W/syscalls" write)
  g=$(taskset -c 1 "$W/syscalls" getppid)
  if [ "$1" != none ]; then stop_agent; kill "$s"; fi
  echo "$w $g"
}

SETS=${SETS:-sock tracepoint raw}
declare -A tw tu uw ug
for r in $(seq "$ROUNDS"); do
  [ -n "${PERF_ONLY:-}" ] && break
  for m in none $SETS; do
    tw[$m]+="$(target_write $m) "
    tu[$m]+="$(target_write $m untargeted) "
    read -r a b <<<"$(untargeted $m)"
    uw[$m]+="$a "; ug[$m]+="$b "
  done
done
range() { tr ' ' '\n' <<<"$1" | grep . | sort -n | sed -n '1p;$p' | paste -sd' ' | awk '{print ($1==$2)?$1:$1"–"$2}'; }
row() { # $1 label, $2 name of the array
  local -n a=$2
  echo "| $1 | $(range "${a[none]}") | $(range "${a[sock]}") | $(range "${a[tracepoint]}") | $(range "${a[raw]}") |"
}
if [ -z "${PERF_ONLY:-}" ]; then
echo "| ns per call (min–max over $ROUNDS rounds) | no agent | sock (default) | tracepoint | raw |"
echo "|---|---:|---:|---:|---:|"
row "target: write() of 120 B to a TCP socket, traced" tw
row "untargeted: the same write() of 120 B to a TCP socket" tu
row "untargeted: write() to /dev/null" uw
row "untargeted: getppid()" ug
fi

# BPF run time per program, each hook set once more with bpf_stats on: for the target's traced
# writes, and for an untargeted process's write(/dev/null) (every run of the write programs is
# then for a process that is not a target: the filter's cost). Other processes on the machine
# run the programs too; the program counts say how many runs each figure rests on.
sysctl -q kernel.bpf_stats_enabled=1
prog_stats() { # $1 hooks, $2 label: the agent's programs' runs and ns per run between the snapshots
  python3 - "$W" "$1" "$2" <<'PY'
import json, sys
w, m, what = sys.argv[1:4]
pre = {p["id"] for p in json.load(open(f"{w}/pre.json"))}
before = {p["id"]: p for p in json.load(open(f"{w}/before.json")) if p["id"] not in pre}
for p in json.load(open(f"{w}/after.json")):
    b = before.get(p["id"])
    if not b or "run_cnt" not in p:
        continue
    n = p["run_cnt"] - b.get("run_cnt", 0)
    t = p["run_time_ns"] - b.get("run_time_ns", 0)
    if n >= 1000:
        print(f"| {m} | {what} | {p['name']} | {n} | {t / n:.0f} |")
PY
}
with_untargeted() { # $1 hooks, $2 "pid" or "cgroup" (how the agent names its target, a sleep;
  # by cgroup as on Kubernetes, where every node then has cgroup targets), then a command to
  # run meanwhile: what it measures is a process that is not a target
  local hooks=$1 by=$2; shift 2
  sleep 600 & local s=$!
  if [ "$by" = cgroup ]; then
    CG="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)/llmslo-syscost-$$"
    mkdir -p "$CG"
    echo "$s" >"$CG/cgroup.procs"
    start_agent "$hooks" --target-cgroup "$CG"
  else
    start_agent "$hooks" --target-pid "$s"
  fi
  "$@"
  stop_agent; kill "$s"
  if [ -n "${CG:-}" ]; then wait "$s" 2>/dev/null || true; rmdir "$CG"; CG=""; fi
}
stats_around_write() { # write(/dev/null) between two snapshots of the programs' bpf_stats
  bpftool -j prog show >"$W/before.json"
  taskset -c 1 "$W/syscalls" write >/dev/null
  bpftool -j prog show >"$W/after.json"
}
untargeted_stats() { # $1 hooks, $2 pid|cgroup
  with_untargeted "$1" "$2" stats_around_write
}
[ -z "${PERF_ONLY:-}" ] && printf '\n| hooks | process | program | runs | ns per run |\n|---|---|---|---:|---:|\n'
for m in $SETS; do
  [ -n "${PERF_ONLY:-}" ] && break
  bpftool -j prog show >"$W/pre.json"
  target_write $m >/dev/null
  prog_stats $m "target, traced write"
  bpftool -j prog show >"$W/pre.json"
  target_write $m untargeted >/dev/null
  prog_stats $m "untargeted socket write"
  bpftool -j prog show >"$W/pre.json"
  untargeted_stats $m pid
  prog_stats $m "untargeted write"
  bpftool -j prog show >"$W/pre.json"
  untargeted_stats $m cgroup
  prog_stats $m "untargeted write, target by cgroup"
done

# The same filter cost without bpf_stats (whose two clock reads per run are most of what it
# reports for a program that returns at once): perf samples of CPU 1 while the untargeted
# process writes to /dev/null, bpf_stats off; each program's share of the samples × the wall
# time per write is its time per syscall. Needs perf (linux-perf); skipped without it.
if command -v perf >/dev/null; then
  sysctl -q kernel.bpf_stats_enabled=0
  perf_share() { # $1 hooks, $2 pid|cgroup, $3 what, $4 comm, then the command (prints ns per call)
    local m=$1 by=$2 what=$3 comm=$4; shift 4
    with_untargeted "$m" "$by" perf record -q -F 20000 -e cpu-clock -C 1 -o "$W/perf.data" -- \
      "$@" >"$W/ns" 2>/dev/null
    perf report -i "$W/perf.data" --comm "$comm" --sort sym --stdio 2>/dev/null >"$W/perf.txt" || true
    python3 - "$m" "$by" "$what" "$(sed 's/^write_ns //' "$W/ns")" "$W/perf.txt" <<'PY'
import re, sys
m, by, what, ns, path = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
samples, progs = 0, {}
for line in open(path):
    if line.startswith("# Samples:"):
        v = line.split()[2]
        samples = float(v[:-1]) * 1000 if v.endswith("K") else float(v)
    hit = re.match(r"\s*([\d.]+)%\s+\[k\]\s+bpf_prog_[0-9a-f]+_(\w+)", line)
    if hit:
        progs[hit.group(2)] = progs.get(hit.group(2), 0.0) + float(hit.group(1))
share = sum(progs.values())
detail = ", ".join(f"{k} {v / 100 * ns:.1f}" for k, v in sorted(progs.items()))
print(f"| {m} | {by} | {what} | {ns:.0f} | {samples:.0f} | {share:.1f} % | **{share / 100 * ns:.1f}** | {detail} |")
PY
  }
  echo
  echo "| hooks | target named by | untargeted call | ns per call (wall) | samples | BPF share | BPF ns per call (all its programs) | per program |"
  echo "|---|---|---|---:|---:|---:|---:|---|"
  PR=1; [ -n "${PERF_ONLY:-}" ] && PR=$ROUNDS
  for _ in $(seq "$PR"); do for m in $SETS; do
    for by in pid cgroup; do
      perf_share "$m" "$by" "write(/dev/null)" syscalls taskset -c 1 "$W/syscalls" write 1000000
      # The writer's receiving child (same name, same CPU) is sampled too: its reads count.
      perf_share "$m" "$by" "write() to a TCP socket, its reader's reads included" target_write \
        taskset -c 1 "$W/target_write" "$N" $((30000 + RANDOM % 5000))
    done
  done; done
fi
