#!/usr/bin/env bash
# The build stage of ../Dockerfile as a plain script, for a Debian bookworm machine with a Rust
# toolchain and no Docker engine (CI, a developer's box): installs the same system packages
# when they are missing and runs the same cargo command, in the repository root.
#
# Keep in sync with the Dockerfile's build stage: tests/deploy.rs checks that BUILD_PKGS equals
# the Dockerfile's `apt-get install` list and that the `cargo build` lines are identical.
#
#   scripts/docker-build-steps.sh            # binary in ${CARGO_TARGET_DIR:-target}/release/
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_PKGS=(clang llvm libelf-dev zlib1g-dev pkg-config make)

missing=()
for p in "${BUILD_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]} > 0)); then
    echo "installing: ${missing[*]}"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install a Rust toolchain (rustup, Rust >= 1.80) first" >&2
    exit 1
fi

cargo build --release --locked --bin llm-slo-agent

echo "built ${CARGO_TARGET_DIR:-target}/release/llm-slo-agent"
