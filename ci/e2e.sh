#!/usr/bin/env bash
# The main job end to end (`make demo`): build the target's RPMs with rpmbuild, verify them,
# install them into a fresh RPM root (scriptlets run), then smoke-boot them in QEMU.
set -euo pipefail
TARGET=${1:-linux-6.1}
CONFIG=${2:-mini}
cd "$(dirname "$0")/.."
OUT=${FSBUILD_OUT:-$PWD/out}/$TARGET

step() { printf '\n==> %s\n' "$*"; }

step "host check"
python3 -m fsbuild doctor

step "RPMs for $TARGET ($CONFIG config, rpmbuild)"
# shellcheck disable=SC2086  # FSBUILD_RPM_ARGS: options, split on purpose
python3 -m fsbuild rpm --target "$TARGET" --config "$CONFIG" --builder rpmbuild ${FSBUILD_RPM_ARGS:-}

step "verify"
python3 -m fsbuild verify --target "$TARGET"

step "install into a fresh RPM root (scriptlets run: busybox sh + depmod)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
bash ci/install-root.sh "$root" "$OUT"/rpms/kernel-*.rpm
rpm --root "$root" -qa | sort
ls "$root"/boot "$root"/lib/modules

step "smoke boot in QEMU"
python3 -m fsbuild smoke --target "$TARGET"
echo "demo: $TARGET passed; verdict in $OUT/smoke.json"
