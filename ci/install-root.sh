#!/usr/bin/env bash
# Install kernel RPMs into a fresh RPM root whose scriptlets really run, then check their
# effect: the way `rpm --force -ivh` behaves on a server, minus the el6 base system.
# The root holds a static busybox as /bin/sh and /sbin/depmod (what %post calls; the other
# tools it may call — new-kernel-pkg, dracut, grubby — are absent, as the scriptlets allow)
# and /dev/null (their redirects). Usage: ci/install-root.sh ROOT RPM...
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "install-root: usage: install-root.sh ROOT RPM..." >&2
  exit 2
fi
root=$1
shift
busybox=$(command -v busybox) || { echo "install-root: busybox not found (apt-get install busybox-static)" >&2; exit 2; }
if ldd "$busybox" >/dev/null 2>&1; then  # ldd fails on a static binary
  echo "install-root: $busybox is not static: the root has no libc for it (apt-get install busybox-static)" >&2
  exit 2
fi

mkdir -p "$root"/bin "$root"/sbin "$root"/dev
cp "$busybox" "$root"/bin/busybox
ln -sf busybox "$root"/bin/sh
ln -sf ../bin/busybox "$root"/sbin/depmod
[ -c "$root"/dev/null ] || mknod -m 666 "$root"/dev/null c 1 3
rpm --root "$root" --initdb

stamp="$root"/.install-start
touch "$stamp"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --nodeps: no el6 base system (coreutils, module-init-tools...) to satisfy the requirements;
# file conflicts and scriptlets are checked.
rpm --root "$root" --force -ivh --nodeps "$@" 2>&1 | tee "$log"
if grep -Eiq 'scriptlet|warning|error|can.t create' "$log"; then
  echo "install-root: rpm reported a scriptlet problem (above)" >&2
  exit 1
fi

# %post ran depmod for each installed kernel: its modules.dep is newer than the install and
# lists fastsocket.ko.
checked=0
for moddir in "$root"/lib/modules/*/; do
  dep=${moddir}modules.dep
  [ -f "${moddir}kernel/net/fastsocket/fastsocket.ko" ] || continue
  if [ ! "$dep" -nt "$stamp" ]; then
    echo "install-root: %post did not run depmod: $dep not rewritten" >&2
    exit 1
  fi
  grep -q 'fastsocket\.ko:' "$dep" || { echo "install-root: $dep lacks fastsocket.ko" >&2; exit 1; }
  echo "install-root: %post ran depmod: $(grep -c . "$dep") modules in $dep"
  checked=$((checked + 1))
done
[ "$checked" -gt 0 ] || { echo "install-root: no installed kernel carries fastsocket.ko" >&2; exit 1; }
rm -f "$stamp"
