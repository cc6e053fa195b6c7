from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_tool

from fsbuild import qemu


def _cfg(tmp_path: Path, accel: qemu.Accel = qemu.Accel("tcg", "test"),  # noqa: B008 - frozen, shared safely
         net: qemu.Net | None = None, **kw: object) -> qemu.VmConfig:
    return qemu.VmConfig(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.gz", workdir=tmp_path / "w",
                         serial_log=tmp_path / "serial.log", checks_log=tmp_path / "checks.log",
                         accel=accel, net=net or qemu.user_net("test"), **kw)  # type: ignore[arg-type]


def _value(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_renders_the_smoke_machine(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, append="fs.extra=1")
    argv = qemu.argv(cfg)
    assert argv[0] == "qemu-system-x86_64"
    assert _value(argv, "-smp") == ["4"] and _value(argv, "-m") == ["512"]
    assert "-no-reboot" in argv and "-nodefaults" in argv
    append = _value(argv, "-append")[0]
    assert "console=ttyS0" in append.split(",")[0] and "panic=1" in append.split() and "fs.extra=1" in append
    assert _value(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert _value(argv, "-initrd") == [str(tmp_path / "initrd.gz")]
    # console and the checks channel are two serial ports, each into its own file
    assert _value(argv, "-serial") == ["chardev:con", "chardev:chk"]
    chardevs = _value(argv, "-chardev")
    assert f"file,id=con,path={tmp_path / 'serial.log'}" in chardevs
    assert f"file,id=chk,path={tmp_path / 'checks.log'}" in chardevs
    assert _value(argv, "-qmp") == [f"unix:{tmp_path / 'w' / 'qmp.sock'},server=on,wait=off"]
    assert "pvpanic" in _value(argv, "-device")
    devices = _value(argv, "-device")
    assert any(d.startswith("igb,netdev=n0") for d in devices)
    assert any(d.startswith("virtio-net-pci,netdev=n1") for d in devices)
    # -kernel boots never network-boot: the firmware runs no NIC option ROM (iPXE)
    assert all(d.endswith(",romfile=") for d in devices if d.startswith(("igb", "virtio-net")))
    # board devices no check uses stay off: the PS/2 mouse probe alone cost ~1 s of TCG boot
    assert _value(argv, "-M") == ["q35,i8042=off,sata=off,smbus=off"]
    assert all("restrict=on" in n for n in _value(argv, "-netdev"))   # user net reaches nothing
    assert qemu.full_argv(cfg) == argv                                 # no netns prefix


def test_cmdline_skips_legacy_ptys_and_the_caller_overrides(tmp_path: Path) -> None:
    """pty_init's 256 legacy BSD pty pairs (6.1 mini config) took 266 ms of ~1 s of initcalls
    under TCG (12 ms without); the caller's own parameters come later and win."""
    words = _value(qemu.argv(_cfg(tmp_path, append="pty.legacy_count=2")), "-append")[0].split()
    assert words.index("pty.legacy_count=0") < words.index("pty.legacy_count=2")


def _qemu_prefix(root: Path, with_qboot: bool) -> Path:
    """PREFIX/bin/qemu-system-x86_64 (a script) and, optionally, PREFIX/share/qemu/qboot.rom."""
    binary = root / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    if with_qboot:
        (root / "share" / "qemu").mkdir(parents=True)
        (root / "share" / "qemu" / "qboot.rom").write_bytes(b"\0" * 64)
    return binary


def test_firmware_is_qboot_from_the_qemu_data_dir(tmp_path: Path) -> None:
    """qboot (no POST; 2.6.32's fast TSC calibration works after it) from PREFIX/share/qemu
    of the QEMU that runs; the rendered command line carries it."""
    binary = _qemu_prefix(tmp_path / "with", with_qboot=True)
    rom = tmp_path / "with" / "share" / "qemu" / "qboot.rom"
    assert qemu.firmware_args(str(binary)) == ["-bios", str(rom)]
    assert _value(qemu.argv(_cfg(tmp_path, qemu=str(binary))), "-bios") == [str(rom)]


def test_firmware_falls_back_to_qemus_default(tmp_path: Path) -> None:
    """No qboot.rom (or no such QEMU): no -bios, QEMU boots its default firmware."""
    binary = _qemu_prefix(tmp_path / "without", with_qboot=False)
    assert qemu.firmware_args(str(binary)) == []
    assert "-bios" not in qemu.argv(_cfg(tmp_path, qemu=str(binary)))
    assert qemu.firmware_args(str(tmp_path / "no-such-qemu")) == []


def test_cmdline_trusts_the_tcg_tsc(tmp_path: Path) -> None:
    """Every TCG vCPU's TSC comes from one host clock; without tsc=reliable both kernels
    distrust it (AMD vCPU model, no invariant-TSC bit) and time everything with the HPET,
    an emulated MMIO read per clock read."""
    words = _value(qemu.argv(_cfg(tmp_path)), "-append")[0].split()
    assert "tsc=reliable" in words


def test_argv_tap_netns_multiqueue(tmp_path: Path) -> None:
    net = qemu.Net("tap-netns", "test", "fsns", ("-netdev", "tap,id=n1,ifname=fsvnet0,queues=4",
                                                 "-device", "virtio-net-pci,netdev=n1,mq=on,vectors=10"))
    full = qemu.full_argv(_cfg(tmp_path, net=net))
    assert full[:4] == ["ip", "netns", "exec", "fsns"]
    assert "virtio-net-pci,netdev=n1,mq=on,vectors=10" in full


@pytest.mark.parametrize(("cores", "smp", "want"), [(2, 4, "tcg,thread=single"), (4, 4, "tcg"), (8, 4, "tcg")])
def test_tcg_threading_follows_host_cores(cores: int, smp: int, want: str) -> None:
    assert qemu.accel_arg(qemu.Accel("tcg", ""), smp, cores) == want
    assert qemu.accel_arg(qemu.Accel("kvm", ""), smp, cores) == "kvm"


def test_kvm_argv_uses_host_cpu(tmp_path: Path) -> None:
    argv = qemu.argv(_cfg(tmp_path, accel=qemu.Accel("kvm", "")))
    assert _value(argv, "-accel") == ["kvm"] and _value(argv, "-cpu") == ["host"]


# ---------------------------------------------------------------- accel probe

def _fake_qemu(tmp_path: Path, body: str) -> str:
    """A stand-in for qemu-system-x86_64: a script with the given behaviour."""
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def kvm_usable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qemu, "_probe_cache", lambda: tmp_path / "accel-cache.json")  # not the host's
    real = os.access
    monkeypatch.setattr(qemu.os, "access", lambda p, m: True if p == "/dev/kvm" else real(p, m))
    monkeypatch.delenv("FSBUILD_SMOKE_ACCEL", raising=False)


def test_probe_hanging_kvm_falls_back_to_tcg_within_timeout(tmp_path: Path, kvm_usable: None) -> None:
    fake = _fake_qemu(tmp_path, "sleep 30")
    start = time.monotonic()
    accel = qemu.probe_accel(tmp_path / "vmlinuz", qemu=fake, timeout=1.0, use_cache=False)
    assert accel.name == "tcg" and "hangs" in accel.reason
    assert time.monotonic() - start < 5
    # the hung probe (and its children) are gone
    assert subprocess.run(["pgrep", "-f", fake], capture_output=True).returncode == 1


def test_probe_failing_kvm_names_the_error(tmp_path: Path, kvm_usable: None) -> None:
    fake = _fake_qemu(tmp_path, 'echo "failed to initialize kvm: Permission denied" >&2; exit 1')
    accel = qemu.probe_accel(tmp_path / "vmlinuz", qemu=fake, timeout=3.0, use_cache=False)
    assert accel.name == "tcg" and "Permission denied" in accel.reason


def test_probe_working_kvm_is_cached(tmp_path: Path, kvm_usable: None) -> None:
    # prints on "serial" (the file after `-serial file:`), like a kernel under working KVM
    fake = _fake_qemu(tmp_path, 'for a in "$@"; do case $a in file:*) echo Linux > "${a#file:}";; esac; done; sleep 30')
    accel = qemu.probe_accel(tmp_path / "vmlinuz", qemu=fake, timeout=3.0)
    assert accel.name == "kvm"
    again = qemu.probe_accel(tmp_path / "vmlinuz", qemu=fake, timeout=3.0)
    assert again.name == "kvm" and "cached" in again.reason


def test_probe_without_dev_kvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FSBUILD_SMOKE_ACCEL", raising=False)
    monkeypatch.setattr(qemu.os, "access", lambda p, m: False)
    assert qemu.probe_accel(tmp_path / "vmlinuz").name == "tcg"
    monkeypatch.setenv("FSBUILD_SMOKE_ACCEL", "kvm")
    assert qemu.probe_accel(tmp_path / "vmlinuz").name == "kvm"


def test_probe_against_this_hosts_qemu(tmp_path: Path, kernel_rpm: Path) -> None:
    """The real probe on the real QEMU answers within its timeout, whatever the host."""
    require_tool("qemu-system-x86_64")
    from test_smoke import staged_kernel
    kernel = staged_kernel(kernel_rpm, tmp_path).vmlinuz
    start = time.monotonic()
    accel = qemu.probe_accel(kernel, timeout=3.0, use_cache=False)
    assert accel.name in ("kvm", "tcg") and accel.reason
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- run loop

def test_run_kills_a_hung_vm_at_the_deadline(tmp_path: Path) -> None:
    # a "QEMU" that forks a child and hangs: the whole process group must die
    fake = _fake_qemu(tmp_path, "sleep 300 & sleep 300")
    cfg = _cfg(tmp_path, qemu=fake)
    start = time.monotonic()
    res = qemu.run(cfg, timeout=2.0, stop_when=lambda: None)
    assert res.timed_out and res.stopped_by is None
    assert 2.0 <= res.duration_s < 8 and time.monotonic() - start < 10
    assert subprocess.run(["pgrep", "-f", fake], capture_output=True).returncode == 1


def test_run_stops_when_the_predicate_says_so(tmp_path: Path) -> None:
    # writes the guest's final marker into the checks log (the file after id=chk)
    fake = _fake_qemu(tmp_path, 'for a in "$@"; do case $a in file,id=chk,path=*) echo FSDONE > "${a#file,id=chk,path=}";; esac; done; sleep 300')
    cfg = _cfg(tmp_path, qemu=fake)
    res = qemu.run(cfg, timeout=20.0, stop_when=lambda: "done" if "FSDONE" in cfg.checks_log.read_text() else None)
    assert res.stopped_by == "done" and not res.timed_out and res.duration_s < 10


def test_run_missing_qemu_is_a_tool_error(tmp_path: Path) -> None:
    from fsbuild.errors import ToolMissingError
    with pytest.raises(ToolMissingError, match="no-such-qemu"):
        qemu.run(_cfg(tmp_path, qemu="no-such-qemu"), timeout=1, stop_when=lambda: None)


# ---------------------------------------------------------------- network

def test_netns_with_multiqueue_tap(tmp_path: Path) -> None:
    require_tool("ip")
    if os.geteuid() != 0:
        net = qemu.setup_net("fsbuild-test-nonroot")
        assert net.mode == "user" and "user networking" in net.reason
        return
    name = f"fsbuild-test-{os.getpid()}"
    with qemu.network(name) as net:
        if net.mode == "user":
            pytest.skip(f"host refuses netns/tap: {net.reason}")
        assert net.netns == name
        links = subprocess.run(["ip", "-n", name, "-d", "link", "show", "fsvnet0"], capture_output=True,
                               text=True, check=True).stdout
        assert "multi_queue" in links
        assert any("queues=4" in a for a in net.args)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_forced_user_networking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBUILD_SMOKE_NET", "user")
    net = qemu.setup_net("unused")
    assert net.mode == "user" and net.netns is None and "FSBUILD_SMOKE_NET" in net.reason
    assert shutil.which("ip") is None or "unused" not in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_cpu_seconds_of_a_process_and_of_none() -> None:
    """The smoke's phases carry QEMU's CPU seconds (utime + stime of all its threads): a
    loaded host stretches the wall clock 2-4x, the CPU a TCG guest costs much less."""
    before = qemu.cpu_seconds(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    after = qemu.cpu_seconds(os.getpid())
    assert before is not None and after is not None and 0.2 <= after - before < 5
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert qemu.cpu_seconds(sleeper.pid) == pytest.approx(0.0, abs=0.05)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert qemu.cpu_seconds(sleeper.pid) is None and qemu.cpu_seconds(None) is None
