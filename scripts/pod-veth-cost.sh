#!/bin/bash
# Per-packet BPF cost of the agent's pod-veth programs on a pod WITHOUT a target, for any agent
# binary (to compare builds): two pods (netns + veth, a python http.server in each), the agent
# traces one (--target-pid; crosscheck off, so it sends nothing to that pod itself);
# kernel.bpf_stats_enabled=1 (restored at exit); N requests to the other pod, then N to the
# traced one; run_cnt/run_time_ns of the agent's tc_pod_in + tc_pod_out (its prog ids, from
# /proc/<agent>/fdinfo) from `bpftool prog show -j`; then SIGTERM and the time to exit.
# Usage (root): scripts/pod-veth-cost.sh [AGENT_BIN]   (N=200 by default)
# The two /30s are reserved like the testbed's (/run/llmslo-testbed/subnets, under its flock).
set -euo pipefail
BIN=${1:-target/debug/llm-slo-agent}
N=${N:-200}
P=lsm$$
STATE=/run/llmslo-testbed
OLD=$(sysctl -n kernel.bpf_stats_enabled)
CFG=$(mktemp)
LOCKS=()
AG= S1= S2=
cleanup() {
    for p in $AG $S1 $S2; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    for x in a b; do ip link del ${P}$x 2>/dev/null; ip netns del ${P}${x^^} 2>/dev/null; done
    sysctl -qw kernel.bpf_stats_enabled="$OLD"
    rm -f "$CFG" "${LOCKS[@]}"
}
trap cleanup EXIT
printf 'crosscheck:\n  enabled: false\n' >"$CFG"

# Two free /30 subnets of 10.200.0.0/16 (index i is 10.200.0.0 + 4i).
mkdir -p $STATE/subnets
exec 9>>$STATE/lock
flock 9
for i in $(seq 16000 16383); do
    f=$STATE/subnets/$i
    if [ -e "$f" ]; then
        owner=$(awk '{print $2}' "$f")
        [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null && continue
    fi
    echo "llmslo $$ pod-veth-cost" >"$f"
    LOCKS+=("$f")
    [ ${#LOCKS[@]} -eq 2 ] && break
done
flock -u 9
addr() { local b=$((4 * $1)); echo "10.200.$((b / 256)).$((b % 256 + $2))"; }
k=0
declare -A POD
for x in a b; do
    idx=$(basename "${LOCKS[$k]}")
    k=$((k + 1))
    ns=${P}${x^^}
    ip netns add $ns
    ip link add ${P}$x type veth peer name eth0 netns $ns
    # No IPv6 (router solicitations, MLD): the target pod's veth then carries only our requests.
    sysctl -qw net.ipv6.conf.${P}$x.disable_ipv6=1
    ip netns exec $ns sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1
    ip addr add "$(addr $idx 1)/30" dev ${P}$x
    ip link set ${P}$x up
    ip -n $ns addr add "$(addr $idx 2)/30" dev eth0
    ip -n $ns link set eth0 up
    ip -n $ns link set lo up
    POD[$x]=$(addr $idx 2)
done
ip netns exec ${P}A python3 -m http.server 8000 --bind "${POD[a]}" >/dev/null 2>&1 &
S1=$!
ip netns exec ${P}B python3 -m http.server 8000 --bind "${POD[b]}" >/dev/null 2>&1 &
S2=$!
sleep 1
"$BIN" run --config "$CFG" --no-auto --target-pid $S1 --listen 127.0.0.1:19466 >/dev/null 2>&1 &
AG=$!
for _ in $(seq 1 100); do curl -s -o /dev/null 127.0.0.1:19466/readyz && break; sleep 0.1; done
sleep 1
sysctl -qw kernel.bpf_stats_enabled=1
ids=$(grep -h '^prog_id' /proc/$AG/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -u | paste -sd,)
runs() {
    bpftool prog show -j | python3 -c "
import json, sys
ids = {int(i) for i in '$ids'.split(',')}
p = [x for x in json.load(sys.stdin) if x['id'] in ids and x.get('name') in ('tc_pod_in', 'tc_pod_out')]
print(sum(x.get('run_cnt', 0) for x in p), sum(x.get('run_time_ns', 0) for x in p))"
}
hooked=$(curl -s 127.0.0.1:19466/api/v1/targets | python3 -c "
import json, sys
t = json.load(sys.stdin)
print(len([i for i in t['interfaces'] if i['role'] == 'pod_veth']), 'pod veths hooked, scope:',
      (t['cni'] or {}).get('pod_veths', {}).get('scope', 'every pod veth'))")
r0=$(runs)
for _ in $(seq 1 "$N"); do curl -s -o /dev/null --max-time 2 "http://${POD[b]}:8000/"; done
r1=$(runs)
for _ in $(seq 1 "$N"); do curl -s -o /dev/null --max-time 2 "http://${POD[a]}:8000/"; done
r2=$(runs)
t0=$(date +%s.%N)
kill -TERM $AG
wait $AG
t1=$(date +%s.%N)
AG=
echo "$BIN: $hooked"
python3 -c "
a, b, c = [list(map(int, r.split())) for r in ('$r0', '$r1', '$r2')]
for what, x, y in (('without a target', a, b), ('with the target', b, c)):
    n, ns = y[0] - x[0], y[1] - x[1]
    print('$N requests to the pod %s: %d runs, %d ns (%.0f ns a run)' % (what, n, ns, ns / max(n, 1)))
print('SIGTERM -> exit %.2f s' % ($t1 - $t0))"
