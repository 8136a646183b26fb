#!/usr/bin/env bash
# Regenerates the vendored BTF headers in vmlinux/<arch>/vmlinux.h.
#   x86:   from the running kernel's BTF (/sys/kernel/btf/vmlinux) with bpftool
#   arm64: from Debian's linux-bpf-dev package for arm64 (downloaded as a .deb, not installed)
# Usage: scripts/gen-vmlinux.sh [x86|arm64|all]   (default: all). Needs bpftool, apt-get, dpkg-deb.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}

gen_x86() {
  [ "$(uname -m)" = x86_64 ] || { echo "x86 header must be generated on an x86_64 kernel" >&2; exit 1; }
  bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$top/vmlinux/x86/vmlinux.h.tmp"
  mv "$top/vmlinux/x86/vmlinux.h.tmp" "$top/vmlinux/x86/vmlinux.h"
  echo "vmlinux/x86/vmlinux.h from $(uname -r)"
}

gen_arm64() {
  local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
  local o=(-oAPT::Architecture=arm64 -oAPT::Architectures=arm64 -oDir::State::Lists="$tmp/lists" -oDir::Cache="$tmp/cache")
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  # linux-bpf-dev is in bookworm-backports (and in trixie/sid); ask Debian's mirror for it alone.
  printf 'deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main\n' > "$tmp/sources.list"
  o+=(-oDir::Etc::SourceList="$tmp/sources.list" -oDir::Etc::SourceParts=/nonexistent -oAPT::Sandbox::User=root)
  apt-get "${o[@]}" update -qq
  (cd "$tmp" && apt-get "${o[@]}" download linux-bpf-dev)
  dpkg-deb -x "$tmp"/linux-bpf-dev_*.deb "$tmp/x"
  cp "$tmp/x/usr/include/aarch64-linux-gnu/linux/bpf/vmlinux.h" "$top/vmlinux/arm64/vmlinux.h"
  echo "vmlinux/arm64/vmlinux.h from $(basename "$tmp"/linux-bpf-dev_*.deb)"
}

case "$what" in
  x86) gen_x86 ;;
  arm64) gen_arm64 ;;
  all) gen_x86; gen_arm64 ;;
  *) echo "usage: $0 [x86|arm64|all]" >&2; exit 2 ;;
esac
