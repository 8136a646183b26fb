#!/usr/bin/env bash
# kind e2e with Flannel (VXLAN overlay between nodes). Downloads the Flannel manifest and the
# CNI reference plugins (Flannel delegates to `bridge`, which kind's node image lacks) at run
# time: a machine with Docker and internet.
#   kind-test/run-flannel.sh       (KEEP_CLUSTER=1 keeps the cluster afterwards)
set -euo pipefail
CNI=flannel
FLANNEL_VERSION=${FLANNEL_VERSION:-v0.26.1}
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.6.0}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

install_cni() {
    local arch node tgz
    case "$(uname -m)" in
        x86_64) arch=amd64 ;;
        aarch64 | arm64) arch=arm64 ;;
        *) die "unsupported architecture $(uname -m)" ;;
    esac
    tgz="$WORK/cni-plugins.tgz"
    log "installing CNI plugins $CNI_PLUGINS_VERSION on the nodes"
    curl -fsSL --retry 3 --max-time 300 -o "$tgz" \
        "https://github.com/containernetworking/plugins/releases/download/$CNI_PLUGINS_VERSION/cni-plugins-linux-$arch-$CNI_PLUGINS_VERSION.tgz"
    for node in $(kind get nodes --name "$CLUSTER"); do
        docker cp "$tgz" "$node:/tmp/cni-plugins.tgz"
        docker exec "$node" tar -xzf /tmp/cni-plugins.tgz -C /opt/cni/bin ./bridge
    done
    log "installing Flannel $FLANNEL_VERSION"
    k apply -f "https://github.com/flannel-io/flannel/releases/download/$FLANNEL_VERSION/kube-flannel.yml"
    k -n kube-flannel rollout status ds/kube-flannel-ds --timeout=300s
}

run_e2e
