#!/usr/bin/env bash
# Host set-up for fsbuild (Debian 12): apt sources, packages, Python deps. Idempotent.
set -euo pipefail
SOURCES=/etc/apt/sources.list.d/debian.sources
APT_PKGS=(
  git quilt patch rpm rpm2cpio cpio xz-utils bzip2 lbzip2 pigz zstd lz4
  build-essential bc bison flex libelf-dev libssl-dev perl rsync kmod dwarves
  busybox-static musl-tools ethtool iproute2 wrk apache2-utils nginx-light
  dpkg-dev linux-source-6.1 rpmlint python3-rpm wiggle time sparse linux-headers-amd64
  distcc icecc
)
BACKPORT_PKGS=(qemu-system-x86)

# One line per step on the terminal; everything apt and pip say goes to $LOG, named on failure.
LOG=${FSBUILD_DEPS_LOG:-${TMPDIR:-/tmp}/fsbuild-deps.log}
: >"$LOG"

# step "what" cmd...: "deps: what ... ok" (or the log's tail and its path, and exit 1)
step() {
  local what=$1; shift
  printf 'deps: %s ... ' "$what"
  echo "### $what: $*" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then echo ok; return 0; fi
  echo FAILED
  tail -n 5 "$LOG" | sed 's/^/deps:   /' >&2
  echo "deps: $what failed; full log: $LOG" >&2
  exit 1
}

need_root() { [ "$(id -u)" = 0 ] || { echo "deps: run as root (apt-get)" >&2; exit 1; }; }

# Add bookworm-backports (newer QEMU with igb) and deb-src (apt-get source linux)
# to the main Debian stanza, without naming any mirror.
fix_sources() {
  [ -f "$SOURCES" ] || return 0
  python3 - "$SOURCES" <<'PY'
import sys, re
path = sys.argv[1]
text = open(path).read()
stanzas = text.split("\n\n")
out = []
for st in stanzas:
    if re.search(r"^Suites:.*\bbookworm\b(?!-)", st, re.M) and "debian-security" not in st:
        st = re.sub(r"^Suites:(.*)$", lambda m: m.group(0) if "bookworm-backports" in m.group(1)
                    else "Suites:" + m.group(1) + " bookworm-backports", st, flags=re.M)
        st = re.sub(r"^Types:\s*deb\s*$", "Types: deb deb-src", st, flags=re.M)
    out.append(st)
new = "\n\n".join(out)
if new != text:
    open(path, "w").write(new)
    print("deps: enabled bookworm-backports and deb-src in", path)
PY
}

apt_install() {
  local missing=()
  for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  local qemu_ok=0
  if command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 -device help 2>/dev/null | grep -q '"igb"'; then qemu_ok=1; fi
  if [ ${#missing[@]} -eq 0 ] && [ $qemu_ok = 1 ]; then echo "deps: apt packages present"; return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  step "apt-get update" apt-get update -q
  [ ${#missing[@]} -eq 0 ] ||
    step "apt-get install ${#missing[@]} package(s)" apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ $qemu_ok = 1 ] ||
    step "QEMU from bookworm-backports" apt-get install -y -q --no-install-recommends -t bookworm-backports "${BACKPORT_PKGS[@]}"
}

main() {
  if [ "${1:-}" != "--pip-only" ]; then need_root; fix_sources; apt_install; fi
  step "python packages (pip install -e .[dev])" python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "deps: ready (log: $LOG)"
}
[ "${BASH_SOURCE[0]}" != "$0" ] || main "$@"   # sourced (tests): functions only
