"""Host check: every tool a command needs, and the one command that installs what is missing."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from fsbuild import farm, proc
from fsbuild.errors import BuildError, ToolMissingError


@dataclass(frozen=True)
class Tool:
    name: str          # executable
    package: str       # Debian package providing it
    needed_by: tuple[str, ...]
    backports: bool = False
    optional: bool = False  # e.g. mock: only for --builder mock


TOOLS: tuple[Tool, ...] = (
    Tool("git", "git", ("upstream", "rebase", "series")),
    Tool("patch", "patch", ("rpm",)),
    Tool("quilt", "quilt", ("bench",), optional=True),
    # word-wise conflict resolver; without it rebase uses its own (same results here, ~5x slower)
    Tool("wiggle", "wiggle", ("rebase",), optional=True),
    Tool("rpmbuild", "rpm", ("rpm",)),
    Tool("rpm", "rpm", ("rpm", "smoke")),
    Tool("rpmlint", "rpmlint", ("verify",), optional=True),
    Tool("make", "make", ("rpm", "smoke")),
    Tool("gcc", "build-essential", ("rpm",)),
    Tool("bc", "bc", ("rpm",)),
    Tool("bison", "bison", ("rpm",)),
    Tool("flex", "flex", ("rpm",)),
    Tool("perl", "perl", ("rpm",)),
    Tool("depmod", "kmod", ("rpm", "smoke")),
    Tool("cpio", "cpio", ("smoke",)),
    Tool("xz", "xz-utils", ("upstream",)),
    Tool("bzip2", "bzip2", ("upstream",)),
    # parallel decompression of Source0 in %prep (el6 SRPMs carry a .tar.bz2)
    Tool("lbzip2", "lbzip2", ("rpm",), optional=True),
    Tool("pigz", "pigz", ("rpm",), optional=True),
    Tool("musl-gcc", "musl-tools", ("smoke",)),
    Tool("busybox", "busybox-static", ("smoke",)),
    Tool("qemu-system-x86_64", "qemu-system-x86", ("smoke",), backports=True),
    Tool("ip", "iproute2", ("smoke",)),
    Tool("mock", "mock", ("rpm --builder mock",), optional=True),
    # compile farms: the clients here; distccd / iceccd + icecc-scheduler run on the farm
    Tool("distcc", "distcc", ("rpm --distcc",), optional=True),
    Tool("icecc", "icecc", ("rpm --icecc",), optional=True),
)


@dataclass(frozen=True)
class Finding:
    tool: Tool
    ok: bool
    detail: str


def check_tool(tool: Tool) -> Finding:
    path = shutil.which(tool.name)
    if path is None:
        return Finding(tool, False, "not found")
    if tool.name == "qemu-system-x86_64" and not qemu_has_igb(path):
        return Finding(tool, False, "no `igb` device (needs QEMU >= 8, bookworm-backports)")
    if tool.name == "busybox" and not _is_static(path):
        return Finding(tool, False, "not static (install busybox-static)")
    return Finding(tool, True, path)


def qemu_has_igb(qemu: str) -> bool:
    try:
        out = proc.run([qemu, "-device", "help"], error=ToolMissingError, timeout=20, check=False)
    except ToolMissingError:  # cannot start, or hangs: not a usable QEMU
        return False
    return b'"igb"' in out.stdout


def _is_static(path: str) -> bool:
    try:
        out = proc.run(["file", "-L", path], error=ToolMissingError, timeout=10, check=False)
    except ToolMissingError:
        return True  # no usable `file`: do not guess against it
    return b"statically linked" in out.stdout or b"static-pie" in out.stdout


def install_command(missing: list[Tool]) -> str:
    plain = sorted({t.package for t in missing if not t.backports and t.name != "mock"})
    bpo = sorted({t.package for t in missing if t.backports})
    cmds = []
    if plain:
        cmds.append("apt-get install -y " + " ".join(plain))
    if bpo:
        cmds.append("apt-get install -y -t bookworm-backports " + " ".join(bpo)
                    + "  # enable bookworm-backports first (make deps does)")
    return " && ".join(cmds)


def run_checks() -> list[Finding]:
    return [check_tool(t) for t in TOOLS]


def engine_lines() -> list[str]:
    """One line per compile-farm engine: what `fsbuild rpm --distcc/--icecc` would use.
    Cheap: no probe compile; icecream's broadcast only when a local iceccd could use it."""
    return [_distcc_line(), _icecc_line()]


def _distcc_line() -> str:
    if shutil.which("distcc") is None:
        return "distcc  not installed (apt-get install distcc)"
    hosts = os.environ.get("DISTCC_HOSTS", "").strip()
    if not hosts:
        return "distcc  ready; no DISTCC_HOSTS: name the farm with --distcc HOSTS"
    try:
        parsed = farm.parse_distcc_hosts(hosts)
    except BuildError as exc:
        return f"distcc  DISTCC_HOSTS={hosts}: {exc.message}"
    return f"distcc  DISTCC_HOSTS={hosts} ({len(parsed)} hosts, {farm.distcc_slots(parsed)} slots)"


def _icecc_line() -> str:
    if shutil.which("icecc") is None:
        return "icecc   not installed (apt-get install icecc)"
    sock = farm.iceccd_socket()
    if not farm.unix_listening(sock):
        return f"icecc   no local iceccd at {sock}: start iceccd to use --icecc"
    given = os.environ.get("ICECC_SCHEDULER")
    where = f"ICECC_SCHEDULER={given}" if given else None
    if where is None:
        found = farm.discover_scheduler()
        where = f"scheduler {found} (broadcast)" if found else "no scheduler answered the broadcast"
    return f"icecc   local iceccd at {sock}; {where}"
