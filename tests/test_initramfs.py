from __future__ import annotations

import gzip
import io
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

from fsbuild import initramfs
from fsbuild.errors import MissingFileError, UnsafePathError

# The shape of a real 6.1 modules.dep (mini config): igb needs i2c-algo-bit and i2c-core,
# virtio_net needs net_failover which needs failover.
MODULES_DEP = """\
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko:
kernel/drivers/net/ethernet/intel/igb/igb.ko: kernel/drivers/i2c/algos/i2c-algo-bit.ko kernel/drivers/i2c/i2c-core.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/i2c/algos/i2c-algo-bit.ko: kernel/drivers/i2c/i2c-core.ko
kernel/drivers/i2c/i2c-core.ko:
kernel/net/core/failover.ko:
kernel/net/fastsocket/fastsocket.ko.xz:
"""


def _sample_archive() -> bytes:
    buf = io.BytesIO()
    w = initramfs.CpioWriter(buf)
    w.add_file("etc/conf", b"A=1\n")               # parent dir created implicitly
    w.add_file("bin/tool", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    w.add_symlink("bin/sh", "tool")
    w.add_dir("empty", 0o700)
    w.add_file("odd", b"x" * 5)                     # sizes that need padding
    w.close()
    return buf.getvalue()


def test_newc_roundtrip_with_gnu_cpio(tmp_path: Path) -> None:
    require_tool("cpio")
    data = _sample_archive()
    listing = subprocess.run(["cpio", "-it"], input=data, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names == ["etc", "etc/conf", "bin", "bin/tool", "bin/sh", "empty", "odd"]
    subprocess.run(["cpio", "-idm", "--no-absolute-filenames", "--quiet"], input=data, cwd=tmp_path,
                   check=True, capture_output=True)
    assert (tmp_path / "etc/conf").read_bytes() == b"A=1\n"
    tool = tmp_path / "bin/tool"
    assert tool.read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert (tmp_path / "bin/sh").is_symlink() and str((tmp_path / "bin/sh").readlink()) == "tool"
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o700
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_gnu_cpio_archive_reads_back(tmp_path: Path) -> None:
    """Our reader parses what GNU cpio writes (the same code reads RPM payloads)."""
    require_tool("cpio")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"hello")
    (tmp_path / "d/l").symlink_to("f")
    out = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"d\nd/f\nd/l\n", cwd=tmp_path,
                         capture_output=True, check=True).stdout
    entries = {n: (m, d) for n, m, d in initramfs.read_newc(out)}
    assert entries["d/f"][1] == b"hello" and stat.S_ISREG(entries["d/f"][0])
    assert entries["d/l"][1] == b"f" and stat.S_ISLNK(entries["d/l"][0])
    assert stat.S_ISDIR(entries["d"][0])


def test_device_nodes_and_determinism() -> None:
    def make() -> bytes:
        buf = io.BytesIO()
        w = initramfs.CpioWriter(buf)
        w.add_node("dev/console", "c", 5, 1)
        w.add_file("init", b"#!/bin/sh\n", 0o755)
        w.close()
        return buf.getvalue()

    a = make()
    assert a == make()
    entries = initramfs.read_newc(a)
    console = next(m for n, m, _ in entries if n == "dev/console")
    assert stat.S_ISCHR(console)
    # rdevmajor/rdevminor of dev/console (entry 2: dev, then dev/console)
    hdr = a[a.index(b"dev/console") - 110:]
    assert int(hdr[78:86], 16) == 5 and int(hdr[86:94], 16) == 1


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/../../b", "", "./"])
def test_unsafe_paths_rejected(bad: str) -> None:
    w = initramfs.CpioWriter(io.BytesIO())
    with pytest.raises(UnsafePathError):
        w.add_file(bad, b"")


def test_truncated_archive_is_an_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        initramfs.read_newc(_sample_archive()[:150])


def test_closure_orders_dependencies_first() -> None:
    deps = initramfs.parse_modules_dep(MODULES_DEP)
    order = initramfs.closure(deps, ["igb", "e1000e", "virtio_net"])
    names = [initramfs.module_name(p) for p in order]
    assert names == ["i2c_core", "i2c_algo_bit", "igb", "e1000e", "failover", "net_failover", "virtio_net"]
    assert initramfs.closure(deps, ["fastsocket"]) == ["kernel/net/fastsocket/fastsocket.ko.xz"]
    # '-' and '_' are the same module name, as for modprobe
    assert initramfs.closure(deps, ["i2c-algo-bit"])[-1].endswith("i2c-algo-bit.ko")


def test_old_depmod_absolute_paths() -> None:
    old = "/lib/modules/2.6.32-431.el6/kernel/drivers/net/igb/igb.ko: /lib/modules/2.6.32-431.el6/kernel/drivers/i2c/algos/i2c-algo-bit.ko\n"
    deps = initramfs.parse_modules_dep(old)
    assert deps == {"kernel/drivers/net/igb/igb.ko": ["kernel/drivers/i2c/algos/i2c-algo-bit.ko"]}


def test_closure_errors() -> None:
    deps = initramfs.parse_modules_dep(MODULES_DEP)
    with pytest.raises(MissingFileError, match="ixgbe"):
        initramfs.closure(deps, ["ixgbe"])
    cyclic = initramfs.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(MissingFileError, match="cycle"):
        initramfs.closure(cyclic, ["a"])


def _modules_tree(root: Path) -> Path:
    mdir = root / "lib/modules/6.1.0-test"
    for line in MODULES_DEP.splitlines():
        rel = line.split(":")[0]
        p = mdir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        payload = f"module {rel}".encode()
        p.write_bytes(lzma.compress(payload) if rel.endswith(".xz") else payload)
    (mdir / "modules.dep").write_text(MODULES_DEP)
    return mdir


def test_build_guest_image(tmp_path: Path) -> None:
    require_tool("busybox")
    mdir = _modules_tree(tmp_path / "root")
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\necho hi\n")
    server = tmp_path / "server"
    server.write_bytes(b"\x7fELFserver")
    spec = initramfs.GuestSpec(
        kver="6.1.0-test", modules_dir=mdir, init=init, busybox=Path(shutil.which("busybox") or ""),
        userspace=initramfs.Userspace(server=server), musl_loader=None,
        config={"REQUESTS": "10", "SERVER_CMD": "/bin/server -p 80"})
    image = initramfs.build(spec, tmp_path / "out" / "initramfs.gz")
    entries = {n: (m, d) for n, m, d in initramfs.read_newc(gzip.decompress(image.path.read_bytes()))}
    assert image.fastsocket
    assert stat.S_ISREG(entries["bin/busybox"][0])        # not replaced by an applet symlink
    assert entries["bin/sh"][1] == b"busybox" and entries["init"][1].startswith(b"#!/bin/sh")
    assert entries["bin/server"][1] == b"\x7fELFserver"
    base = "lib/modules/6.1.0-test/kernel"
    # .ko.xz shipped decompressed under the plain name, and modules.dep says so
    assert entries[f"{base}/net/fastsocket/fastsocket.ko"][1] == b"module kernel/net/fastsocket/fastsocket.ko.xz"
    dep = entries["lib/modules/6.1.0-test/modules.dep"][1].decode()
    assert "kernel/net/fastsocket/fastsocket.ko:" in dep and ".xz" not in dep
    for dep_of_igb in ("drivers/i2c/i2c-core.ko", "drivers/i2c/algos/i2c-algo-bit.ko"):
        assert f"{base}/{dep_of_igb}" in entries
    conf = entries["etc/fsmoke.conf"][1].decode()
    assert "KVER=6.1.0-test\n" in conf and "FASTSOCKET_KO=1\n" in conf
    assert "SERVER_CMD='/bin/server -p 80'" in conf       # shell-quoted for `. /etc/fsmoke.conf`
    assert "NIC_MODULES='igb e1000e virtio_net'" in conf
    assert "NIC_PARALLEL=1\n" in conf                     # igb's and virtio's closures are disjoint
    # insmod fallback chains, dependencies first, decompressed names
    assert ("MODCHAIN_igb='kernel/drivers/i2c/i2c-core.ko kernel/drivers/i2c/algos/i2c-algo-bit.ko "
            "kernel/drivers/net/ethernet/intel/igb/igb.ko'") in conf
    assert "MODCHAIN_fastsocket=kernel/net/fastsocket/fastsocket.ko\n" in conf
    # the kernel's unpacker needs every parent before its children
    names = list(entries)
    for n in names:
        parent = n.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(n), n


def test_build_without_fastsocket_or_modules_dep(tmp_path: Path) -> None:
    require_tool("busybox")
    mdir = _modules_tree(tmp_path / "root")
    (mdir / "modules.dep").write_text("\n".join(ln for ln in MODULES_DEP.splitlines() if "fastsocket" not in ln))
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\n")
    spec = initramfs.GuestSpec(kver="6.1.0-test", modules_dir=mdir, init=init,
                               busybox=Path(shutil.which("busybox") or ""))
    image = initramfs.build(spec, tmp_path / "i.gz")
    assert not image.fastsocket
    assert "FASTSOCKET_KO=0" in gzip.decompress(image.path.read_bytes()).decode(errors="replace")
    (mdir / "modules.dep").unlink()
    with pytest.raises(MissingFileError, match="modules.dep"):
        initramfs.build(spec, tmp_path / "j.gz")


def test_plain_cpio_image_is_reused_until_an_input_changes(tmp_path: Path) -> None:
    """A .cpio image is an uncompressed newc (no inflate at boot), and a second build from
    the same inputs reuses it: only a content change (init, module, config) rebuilds."""
    require_tool("busybox")
    mdir = _modules_tree(tmp_path / "root")
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\necho one\n")
    spec = initramfs.GuestSpec(kver="6.1.0-test", modules_dir=mdir, init=init,
                               busybox=Path(shutil.which("busybox") or ""), config={"A": "1"})
    out = tmp_path / "out" / "initramfs.cpio"
    first = initramfs.build(spec, out)
    entries = {n: d for n, _m, d in initramfs.read_newc(out.read_bytes())}   # not gzip'd
    assert entries["init"] == b"#!/bin/sh\necho one\n" and first.entries == len(entries)
    stamp = out.stat().st_mtime_ns
    again = initramfs.build(spec, out)
    assert out.stat().st_mtime_ns == stamp                                  # reused as is
    assert (again.modules, again.fastsocket, again.entries) == (first.modules, first.fastsocket, first.entries)
    changes = [lambda: init.write_text("#!/bin/sh\necho two\n"),
               lambda: (mdir / "kernel/net/fastsocket/fastsocket.ko.xz").write_bytes(lzma.compress(b"v2")),
               lambda: spec.config.update(A="2")]
    for change in changes:
        change()
        initramfs.build(spec, out)
        assert out.stat().st_mtime_ns != stamp
        stamp = out.stat().st_mtime_ns
    assert b"echo two" in out.read_bytes() and b"A=2" in out.read_bytes()
    out.write_bytes(b"damaged")                       # unreadable: built again
    initramfs.build(spec, out)
    assert initramfs.read_newc(out.read_bytes())[0][0] == initramfs.KEY_ENTRY
    gz = initramfs.build(spec, tmp_path / "out" / "initramfs.gz")   # gzip'd images are reused too
    stamp = gz.path.stat().st_mtime_ns
    assert initramfs.build(spec, gz.path).entries == gz.entries and gz.path.stat().st_mtime_ns == stamp


def test_nic_lanes_run_in_parallel_only_on_disjoint_dependencies() -> None:
    """The init loads virtio-net beside igb (igb's open held the RTNL lock virtio-net's
    register waited on, ~1 s of the 6.1 verdict); two modprobes of one shared dependency
    could race, so the host allows it only when the closures share no module."""
    deps = initramfs.parse_modules_dep(MODULES_DEP)
    assert initramfs.lanes_disjoint(deps, ["igb", "e1000e", "virtio_net"])
    # el6: virtio_net and igb both needing one module (here: i2c-core)
    shared = MODULES_DEP.replace("kernel/drivers/net/virtio_net.ko: ", "kernel/drivers/net/virtio_net.ko: "
                                 "kernel/drivers/i2c/i2c-core.ko ")
    assert not initramfs.lanes_disjoint(initramfs.parse_modules_dep(shared), ["igb", "e1000e", "virtio_net"])
    assert initramfs.lanes_disjoint(deps, ["igb", "e1000e"])          # no virtio: nothing to share
