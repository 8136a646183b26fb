#!/usr/bin/env bash
# kind e2e with Cilium, installed by the cilium CLI (which must be on PATH; it downloads the
# Cilium Helm chart and images at run time: a machine with Docker and internet). kube-proxy is
# kept (kubeProxyReplacement=false) so the ClusterIP hop is iptables DNAT, which the agent's
# netfilter hooks time; the agent's tc programs run beside Cilium's own.
#   kind-test/run-cilium.sh        (KEEP_CLUSTER=1 keeps the cluster afterwards)
set -euo pipefail
CNI=cilium
CILIUM_VERSION=${CILIUM_VERSION:-1.16.5}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

install_cni() {
    log "installing Cilium $CILIUM_VERSION"
    cilium install --context "$KCTX" --version "$CILIUM_VERSION" \
        --set kubeProxyReplacement=false
    cilium status --context "$KCTX" --wait --wait-duration 5m
}

need cilium
run_e2e
