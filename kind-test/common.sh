#!/usr/bin/env bash
# shellcheck shell=bash
# Shared steps of the kind e2e, sourced by run-<cni>.sh after it sets CNI and defines
# install_cni. Needs docker, kind, kubectl, helm, curl and jq, and internet access (images and
# CNI manifests are downloaded): see kind-test/README.md.
#
# Flow (run_e2e): build the image -> kind cluster without a CNI -> tracefs/bpffs on the nodes ->
# the CNI -> load images -> the agent (Helm chart) -> the synthetic inference server -> a load
# Job (bounded request count) on another node -> assert on the agent of the server's node:
# /metrics has llmslo_requests_total for the server's pod, /api/v1/breakdown counts it.
# Every wait is bounded. The cluster is deleted at the end unless KEEP_CLUSTER=1.

set -euo pipefail

: "${CNI:?run-<cni>.sh sets CNI before sourcing common.sh}"
KT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$KT_DIR/.." && pwd)
CLUSTER=${CLUSTER:-llmslo-$CNI}
KCTX="kind-$CLUSTER"
IMAGE_REPO=${IMAGE_REPO:-llm-slo-agent}
IMAGE_TAG=${IMAGE_TAG:-kind-test}
IMAGE="$IMAGE_REPO:$IMAGE_TAG"
CURL_IMAGE=${CURL_IMAGE:-curlimages/curl:8.11.1}
AGENT_NS=llm-slo
TEST_NS=llm-test
REQUESTS=${REQUESTS:-200}
LOCAL_PORT=${LOCAL_PORT:-19464}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
WORK=$(mktemp -d)
PF_PID=""

k() { kubectl --context "$KCTX" "$@"; }
log() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}
need() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null || die "$t not found on PATH (see kind-test/README.md)"
    done
}

# wait_until SECONDS DESCRIPTION COMMAND...: runs COMMAND every 2 s until it succeeds.
wait_until() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${secs}s waiting for: $what"
        fi
        sleep 2
    done
}

dump_diagnostics() {
    log "diagnostics"
    k get nodes -o wide || true
    k get pods -A -o wide || true
    k -n "$AGENT_NS" logs -l app.kubernetes.io/name=llm-slo-agent --prefix --tail=60 || true
    k -n "$TEST_NS" logs job/llm-load --tail=20 || true
    if [ -n "$PF_PID" ]; then
        curl -sS --max-time 5 "http://127.0.0.1:$LOCAL_PORT/api/v1/targets" || true
        echo
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT
    if [ "$rc" != 0 ]; then
        dump_diagnostics
    fi
    if [ -n "$PF_PID" ]; then
        kill "$PF_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    if [ "$KEEP_CLUSTER" = 1 ]; then
        log "keeping cluster $CLUSTER (delete it with: kind delete cluster --name $CLUSTER)"
    else
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
    if [ "$rc" = 0 ]; then
        log "PASS: kind e2e with $CNI"
    fi
    exit "$rc"
}

build_image() {
    log "building $IMAGE from $REPO_ROOT/Dockerfile"
    docker build -t "$IMAGE" "$REPO_ROOT"
    docker pull "$CURL_IMAGE"
}

create_cluster() {
    log "creating kind cluster $CLUSTER ($KT_DIR/kind-$CNI.yaml)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    trap cleanup EXIT
    kind create cluster --name "$CLUSTER" --config "$KT_DIR/kind-$CNI.yaml" --wait 0s
}

# The agent mounts tracefs and bpffs itself only with CAP_SYS_ADMIN, which the chart does not
# grant; it expects the node to have them (systemd nodes do). kind nodes may not: mount them.
prepare_nodes() {
    local node
    for node in $(kind get nodes --name "$CLUSTER"); do
        docker exec "$node" sh -c '
            mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
            mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'
    done
}

load_images() {
    log "loading $IMAGE and $CURL_IMAGE into the nodes"
    kind load docker-image --name "$CLUSTER" "$IMAGE" "$CURL_IMAGE"
}

wait_nodes_ready() {
    log "waiting for the nodes to be Ready ($CNI)"
    k wait --for=condition=Ready node --all --timeout=300s
    k -n kube-system rollout status deploy/coredns --timeout=300s
}

install_agent() {
    log "installing the agent (Helm chart)"
    k create namespace "$AGENT_NS" --dry-run=client -o yaml | k apply -f -
    k label namespace "$AGENT_NS" --overwrite pod-security.kubernetes.io/enforce=privileged
    helm --kube-context "$KCTX" upgrade --install llm-slo-agent \
        "$REPO_ROOT/deploy/helm/llm-slo-agent" --namespace "$AGENT_NS" \
        -f "$KT_DIR/values.yaml" \
        --set "image.repository=$IMAGE_REPO" --set "image.tag=$IMAGE_TAG" \
        --wait --timeout 5m
    k -n "$AGENT_NS" rollout status ds/llm-slo-agent --timeout=300s
}

# The synthetic OpenAI-compatible server: the agent image's hidden `synth-server` subcommand.
# bash's `exec -a` sets its argv[0] to llmslo-synth-server, the signature in values.yaml.
deploy_server() {
    log "deploying the synthetic inference server"
    k create namespace "$TEST_NS" --dry-run=client -o yaml | k apply -f -
    k apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: llm-synth
  namespace: $TEST_NS
spec:
  replicas: 1
  selector:
    matchLabels: {app: llm-synth}
  template:
    metadata:
      labels: {app: llm-synth}
    spec:
      containers:
        - name: server
          image: $IMAGE
          imagePullPolicy: Never
          command: ["bash", "-c"]
          args:
            - exec -a llmslo-synth-server /usr/local/bin/llm-slo-agent synth-server
              --listen 0.0.0.0:8000 --decode-ms 5 --tokens 16
          ports:
            - {name: http, containerPort: 8000}
          readinessProbe:
            httpGet: {path: /health, port: http}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: llm-synth
  namespace: $TEST_NS
spec:
  selector: {app: llm-synth}
  ports:
    - {name: http, port: 8000, targetPort: http}
YAML
    k -n "$TEST_NS" rollout status deploy/llm-synth --timeout=180s
    SERVER_POD=$(k -n "$TEST_NS" get pod -l app=llm-synth -o jsonpath='{.items[0].metadata.name}')
    SERVER_NODE=$(k -n "$TEST_NS" get pod "$SERVER_POD" -o jsonpath='{.spec.nodeName}')
    log "server pod $SERVER_POD on node $SERVER_NODE"
}

agent_api() { curl -sf --max-time 10 "http://127.0.0.1:$LOCAL_PORT$1"; }
agent_up() { agent_api /healthz >/dev/null; }
agent_traces_server() { agent_api /api/v1/targets | grep -q 'signature:llmslo-synth-server'; }

# Port-forward to the agent on the server's node (host network: its node's port 9464).
connect_agent() {
    local agent
    agent=$(k -n "$AGENT_NS" get pod -l app.kubernetes.io/name=llm-slo-agent \
        --field-selector "spec.nodeName=$SERVER_NODE" -o jsonpath='{.items[0].metadata.name}')
    [ -n "$agent" ] || die "no agent pod on node $SERVER_NODE"
    log "port-forwarding 127.0.0.1:$LOCAL_PORT to $agent:9464"
    k -n "$AGENT_NS" port-forward "pod/$agent" "$LOCAL_PORT:9464" >"$WORK/port-forward.log" 2>&1 &
    PF_PID=$!
    wait_until 60 "port-forward to $agent" agent_up
    wait_until 60 "the agent on $SERVER_NODE to trace the synthetic server" agent_traces_server
}

# A Job on another node than the server: REQUESTS streaming chat completions through the
# Service (kube-proxy DNAT, the CNI between nodes), one at a time, each bounded by --max-time.
run_load() {
    log "driving $REQUESTS requests from a Job"
    k -n "$TEST_NS" delete job llm-load --ignore-not-found --wait=true
    k apply -f - <<YAML
apiVersion: batch/v1
kind: Job
metadata:
  name: llm-load
  namespace: $TEST_NS
spec:
  backoffLimit: 0
  activeDeadlineSeconds: 600
  template:
    spec:
      restartPolicy: Never
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - labelSelector:
                matchLabels: {app: llm-synth}
              topologyKey: kubernetes.io/hostname
      containers:
        - name: load
          image: $CURL_IMAGE
          imagePullPolicy: IfNotPresent
          command: ["sh", "-c"]
          args:
            - |
              body='{"model":"synth-llm","stream":true,"max_tokens":16,"messages":[{"role":"user","content":"hello"}]}'
              i=0; ok=0
              while [ \$i -lt $REQUESTS ]; do
                i=\$((i + 1))
                if curl -sSf -N --max-time 20 -o /dev/null -H 'content-type: application/json' \\
                    -d "\$body" http://llm-synth.$TEST_NS.svc:8000/v1/chat/completions; then
                  ok=\$((ok + 1))
                fi
              done
              echo "requests: \$ok of \$i succeeded"
              [ \$ok -gt 0 ]
YAML
    local deadline=$((SECONDS + 600)) succeeded failed
    while :; do
        succeeded=$(k -n "$TEST_NS" get job llm-load -o jsonpath='{.status.succeeded}')
        failed=$(k -n "$TEST_NS" get job llm-load -o jsonpath='{.status.failed}')
        [ "${succeeded:-0}" -ge 1 ] && break
        [ "${failed:-0}" -ge 1 ] && die "the load Job failed"
        ((SECONDS < deadline)) || die "the load Job did not finish in 600 s"
        sleep 3
    done
    k -n "$TEST_NS" logs job/llm-load --tail=5
}

assert_metrics() {
    log "checking the agent's /metrics and /api/v1/breakdown for pod $SERVER_POD"
    # Give the agent one aggregation slot to publish the last requests.
    sleep 12
    local metrics total breakdown count
    metrics=$(agent_api /metrics) || die "GET /metrics failed"
    total=$(printf '%s\n' "$metrics" |
        grep -E "^llmslo_requests_total\{[^}]*pod=\"$SERVER_POD\"" |
        awk '{s += $NF} END {print s + 0}')
    printf '%s\n' "$metrics" | grep -E "^llmslo_requests_total\{" | head -n 10
    [ "${total%.*}" -gt 0 ] || die "no llmslo_requests_total sample with pod=\"$SERVER_POD\""
    breakdown=$(agent_api "/api/v1/breakdown?window=5m&group_by=pod,model") ||
        die "GET /api/v1/breakdown failed"
    printf '%s\n' "$breakdown" | jq -c '.groups[] | {name, count}'
    count=$(printf '%s\n' "$breakdown" |
        jq --arg pod "$SERVER_POD" '[.groups[] | select(.key.pod == $pod) | .count] | add // 0')
    [ "$count" -gt 0 ] || die "/api/v1/breakdown has no requests for pod $SERVER_POD"
    log "agent counted $total requests in /metrics and $count in /api/v1/breakdown (sent $REQUESTS)"
}

# The whole e2e; install_cni comes from run-<cni>.sh.
run_e2e() {
    need docker kind kubectl helm curl jq
    build_image
    create_cluster
    prepare_nodes
    install_cni
    wait_nodes_ready
    load_images
    install_agent
    deploy_server
    connect_agent
    run_load
    assert_metrics
}
