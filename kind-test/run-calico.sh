#!/usr/bin/env bash
# kind e2e with Calico (manifest install, iptables dataplane, IP-in-IP/VXLAN between nodes).
# Downloads the Calico manifest from GitHub at run time: a machine with Docker and internet.
#   kind-test/run-calico.sh        (KEEP_CLUSTER=1 keeps the cluster afterwards)
set -euo pipefail
CNI=calico
CALICO_VERSION=${CALICO_VERSION:-v3.29.1}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

install_cni() {
    log "installing Calico $CALICO_VERSION"
    k apply -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/calico.yaml"
    k -n kube-system rollout status ds/calico-node --timeout=300s
    k -n kube-system rollout status deploy/calico-kube-controllers --timeout=300s
}

run_e2e
