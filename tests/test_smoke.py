from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import require_tool

from fsbuild import qemu, smoke
from fsbuild.errors import MissingFileError, SmokeBootError, SmokeCheckError, SmokePanicError, SmokeTimeoutError

# ---------------------------------------------------------------- kernel for boot tests


def staged_kernel(rpm: Path, where: Path) -> smoke.KernelInputs:
    return smoke.stage_rpm(rpm, where / "staged-root")


def _boot_tools() -> None:
    require_tool("qemu-system-x86_64", "busybox", "musl-gcc")


def _rpm_dir(tmp_path: Path, rpm: Path) -> Path:
    """An --rpms directory holding just the kernel RPM (the boot tools checked first)."""
    _boot_tools()
    rpms = tmp_path / "rpms"
    rpms.mkdir()
    (rpms / rpm.name).symlink_to(rpm)
    return rpms


def _init(tmp_path: Path, body: str) -> Path:
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\nmount -t devtmpfs devtmpfs /dev\nmount -t proc proc /proc\n" + body)
    return init


# ---------------------------------------------------------------- parsing and verdicts

GUEST_LOG = (
    "\x00FSBOOT 6.1.192\r\n"
    "[    3.1] some kernel line FSCHECK not-at-start pass x\r\n"
    "FSCHECK kernel_version pass 6.1.192\r\n"
    "FSCHECK igb_queues fail eth0: 2 rx, 2 tx (sysfs), want >= 4 each\r\n"
    "FSCHECK fastsocket_load skip the RPM has no fastsocket.ko\r\n"
    "FSCHECK broken maybe detail\r\n"
    "FSDONE\r\n"
)


def test_parse_guest_lines() -> None:
    rep = smoke.parse_guest(GUEST_LOG)
    assert rep.booted == "6.1.192" and rep.done
    assert [(c.name, c.status) for c in rep.checks] == [
        ("kernel_version", "pass"), ("igb_queues", "fail"), ("fastsocket_load", "skip"), ("broken", "fail")]
    assert rep.checks[1].detail == "eth0: 2 rx, 2 tx (sysfs), want >= 4 each"
    assert "malformed" in rep.checks[3].detail
    assert smoke.parse_guest("random noise\n") == smoke.GuestReport()


def _vm(**kw: object) -> qemu.VmResult:
    base: dict[str, object] = {"stopped_by": None, "timed_out": False, "returncode": 0, "duration_s": 1.0}
    base.update(kw)
    return qemu.VmResult(**base)  # type: ignore[arg-type]


REQUIRED = "".join(f"FSCHECK {n} pass ok\n" for n in smoke.REQUIRED_CHECKS)
OK_LOG = "FSBOOT 6.1\nFSCHECK a pass x\nFSCHECK b skip why\n" + REQUIRED + "FSDONE\n"


@pytest.mark.parametrize(("guest", "console", "vm", "err", "extra"), [
    (OK_LOG, "", _vm(stopped_by="done"), None, None),
    ("\xff" + OK_LOG, "", _vm(stopped_by="done"), None, None),  # UART junk before the first line
    ("FSBOOT 6.1\nFSDONE\n", "", _vm(stopped_by="done"), SmokeCheckError, "checks_reported"),
    ("FSBOOT 6.1\nFSCHECK a fail no\nFSDONE\n", "", _vm(), SmokeCheckError, None),
    ("FSBOOT 6.1\nFSCHECK a pass x\n", "", _vm(), SmokeCheckError, "guest_complete"),
    ("FSBOOT 6.1\nFSCHECK a pass x\n", "[ 9.0] Kernel panic - not syncing: Attempted to kill init!\n",
     _vm(), SmokePanicError, "kernel_panic"),
    ("", "", _vm(events=["GUEST_PANICKED:pause"]), SmokePanicError, "kernel_panic"),
    ("FSBOOT 6.1\nFSCHECK a pass x\n", "", _vm(timed_out=True, returncode=-9), SmokeTimeoutError, "timeout"),
    ("", "[ 0.1] early boot\n", _vm(timed_out=True), SmokeTimeoutError, "timeout"),
    ("", "SeaBIOS\n", _vm(returncode=1), SmokeBootError, None),
])
def test_classify(guest: str, console: str, vm: qemu.VmResult, err: type | None, extra: str | None) -> None:
    checks, got, message = smoke.classify(smoke.parse_guest(guest), console, vm, 30.0, "tcg")
    assert got is err
    assert checks[0].name == "boot"
    assert checks[0].status == ("pass" if "FSBOOT" in guest else "fail")
    if extra:
        assert any(c.name == extra and c.status == "fail" for c in checks)
    assert bool(message) == (err is not None)


def test_verdict_files(tmp_path: Path) -> None:
    checks = [smoke.Check("boot", "pass", "ok"), smoke.Check("igb_queues", "fail", "2 < 4 <&>"),
              smoke.Check("fastsocket_load", "skip", "no fastsocket.ko")]
    v = smoke.Verdict("fail", 12.345, checks, SmokeCheckError, "1 failed")
    smoke.write_verdict(v, tmp_path, "fsbuild.smoke.t")
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert list(data) == ["verdict", "duration_s", "checks"]
    assert data["verdict"] == "fail" and data["duration_s"] == 12.35
    assert data["checks"][1] == {"name": "igb_queues", "status": "fail", "detail": "2 < 4 <&>"}
    suite = ET.parse(tmp_path / "smoke-junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    failure = suite.find("testcase[@name='igb_queues']/failure")
    assert failure is not None and failure.get("message") == "2 < 4 <&>"


# ---------------------------------------------------------------- RPM input

def _build_rpm(tmp_path: Path, name: str, files: dict[str, str], symlinks: dict[str, str] | None = None,
               arch: str = "x86_64") -> Path:
    require_tool("rpmbuild")
    src = tmp_path / f"src-{name}"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    links = "".join(f"ln -s {t} %{{buildroot}}/{p}\n" for p, t in (symlinks or {}).items())
    spec = tmp_path / f"{name}.spec"
    spec.write_text(f"""Name: {name}
Version: 1.0
Release: 1
Summary: test
License: GPL-2.0
BuildArch: {arch}
%global debug_package %{{nil}}
%global __os_install_post %{{nil}}
%description
test
%install
cp -a {src}/. %{{buildroot}}/
{links}%files
/*
""")
    top = tmp_path / "rpmbuild"
    subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {top}", str(spec)], check=True, capture_output=True)
    return next((top / "RPMS" / arch).glob(f"{name}-1.0-1.*.rpm"))


def test_find_kernel_rpm(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        smoke.find_kernel_rpm(tmp_path / "nope")
    for n in ("kernel-devel-1-1.x86_64.rpm", "kernel-firmware-1-1.noarch.rpm", "kernel-headers-1-1.x86_64.rpm"):
        (tmp_path / n).write_bytes(b"")
    with pytest.raises(MissingFileError, match="no kernel"):
        smoke.find_kernel_rpm(tmp_path)
    (tmp_path / "kernel-6.1.192-2.x86_64.rpm").write_bytes(b"")
    assert smoke.find_kernel_rpm(tmp_path).name == "kernel-6.1.192-2.x86_64.rpm"
    (tmp_path / "kernel-6.1.193-1.x86_64.rpm").write_bytes(b"")
    with pytest.raises(MissingFileError, match="several"):
        smoke.find_kernel_rpm(tmp_path)


def test_stage_rpm_needs_no_rpm2cpio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The payload is read with rpmfile: a host with depmod but without rpm2cpio stages it."""
    require_tool("rpmbuild", "depmod")
    rpm = _build_rpm(tmp_path, "kernel", {"boot/vmlinuz-9.9.9-test": "KERNEL",
                                          "lib/modules/9.9.9-test/kernel/x.ko": "x"})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "depmod").symlink_to(shutil.which("depmod") or "")
    monkeypatch.setenv("PATH", str(bindir))
    assert smoke.stage_rpm(rpm, tmp_path / "root").kver == "9.9.9-test"


def test_stage_rpm_takes_only_kernel_and_modules(tmp_path: Path) -> None:
    require_tool("depmod")
    rpm = _build_rpm(tmp_path, "kernel", {
        "boot/vmlinuz-9.9.9-test": "KERNEL",
        "boot/config-9.9.9-test": "CONFIG_X=y",
        "lib/modules/9.9.9-test/kernel/net/fastsocket/fastsocket.ko": "not really elf",
        "etc/should-not-be-extracted": "x",
    }, symlinks={"lib/modules/9.9.9-test/build": "/usr/src/kernels/9.9.9-test"})
    kin = smoke.stage_rpm(rpm, tmp_path / "root")
    assert kin.kver == "9.9.9-test" and kin.vmlinuz.read_text() == "KERNEL"
    assert (kin.modules_dir / "kernel/net/fastsocket/fastsocket.ko").is_file()
    assert (kin.modules_dir / "modules.dep").is_file()          # computed with depmod -b
    assert not (tmp_path / "root" / "etc").exists()
    assert not (kin.modules_dir / "build").exists()              # absolute symlink never followed
    assert kin.config is not None and kin.config.read_text() == "CONFIG_X=y"   # HZ for lpj=


def test_stage_rpm_without_kernel_image(tmp_path: Path) -> None:
    rpm = _build_rpm(tmp_path, "kernel", {"lib/modules/1.0/kernel/x.ko": "x"})
    with pytest.raises(MissingFileError, match="vmlinuz"):
        smoke.stage_rpm(rpm, tmp_path / "root")
    with pytest.raises(MissingFileError, match="rpm2cpio|unreadable"):
        bad = tmp_path / "kernel-bad.x86_64.rpm"
        bad.write_bytes(b"not an rpm at all")
        smoke.stage_rpm(bad, tmp_path / "root2")


# ---------------------------------------------------------------- real QEMU

def test_unbootable_kernel_is_a_boot_error(tmp_path: Path) -> None:
    """QEMU refuses the 'kernel' at once: a boot error, fast, no hang."""
    _boot_tools()
    mdir = tmp_path / "root/lib/modules/0.0"
    mdir.mkdir(parents=True)
    (mdir / "modules.dep").write_text("")
    vmlinuz = tmp_path / "vmlinuz-0.0"
    vmlinuz.write_bytes(b"\0" * 4096)
    kin = smoke.KernelInputs("0.0", vmlinuz, mdir, None)
    start = time.monotonic()
    v = smoke.boot(kin, tmp_path / "out", smoke.BootOptions(timeout=30, userspace=False))
    assert v.error is SmokeBootError and v.verdict == "fail"
    assert v.checks[0].name == "boot" and v.checks[0].status == "fail"
    assert "QEMU said" in v.message and "QEMU said" in v.checks[0].detail
    assert time.monotonic() - start < 25


@pytest.mark.slow
def test_panicking_guest_ends_as_panic_verdict(tmp_path: Path, kernel_rpm: Path) -> None:
    rpms = _rpm_dir(tmp_path, kernel_rpm)
    # init exits: "Attempted to kill init!" -> panic=1 resets -> -no-reboot ends QEMU
    opts = smoke.BootOptions(timeout=90, userspace=False,
                             init=_init(tmp_path, 'echo "FSBOOT $(cat /proc/sys/kernel/osrelease)" > /dev/ttyS1\nexit 3\n'))
    start = time.monotonic()
    with pytest.raises(SmokePanicError, match="Attempted to kill init"):
        smoke.run("linux-6.1", rpms, opts)
    assert time.monotonic() - start < 60
    out = Path(os.environ["FSBUILD_OUT"]) / "linux-6.1"
    data = json.loads((out / "smoke.json").read_text())
    assert data["verdict"] == "fail"
    names = {c["name"]: c["status"] for c in data["checks"]}
    assert names["boot"] == "pass" and names["kernel_panic"] == "fail"
    assert (out / "smoke-junit.xml").is_file() and "Kernel panic" in (out / "smoke-serial.log").read_text()


@pytest.mark.slow
def test_hung_guest_ends_as_timeout_within_the_limit(tmp_path: Path, kernel_rpm: Path) -> None:
    _boot_tools()
    kin = staged_kernel(kernel_rpm, tmp_path)
    opts = smoke.BootOptions(timeout=15, userspace=False, init=_init(
        tmp_path, 'echo "FSBOOT hung" > /dev/ttyS1\nwhile :; do sleep 1; done\n'))
    start = time.monotonic()
    v = smoke.boot(kin, tmp_path / "out", opts)
    elapsed = time.monotonic() - start
    assert v.error is SmokeTimeoutError
    assert v.checks[0].status == "pass" and v.checks[-1].name == "timeout"
    assert "QMP status running" in v.checks[0].detail      # qemu.qmp talked to this QEMU
    assert elapsed < 15 + 10, f"timeout 15 s took {elapsed:.1f}s"
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "out")], capture_output=True).returncode == 1


@pytest.mark.slow
def test_smoke_command_boots_the_rpm(tmp_path: Path, kernel_rpm: Path) -> None:
    """`fsbuild smoke --rpms DIR --json` end to end on the real kernel RPM."""
    rpms = _rpm_dir(tmp_path, kernel_rpm)
    proc = subprocess.run([sys.executable, "-m", "fsbuild", "smoke", "-t", "linux-6.1", "--rpms", str(rpms),
                           "--timeout", "150", "--json"], capture_output=True, text=True, timeout=300)
    data = json.loads(proc.stdout)
    statuses = {c["name"]: c for c in data["checks"]}
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip()} {statuses}"
    assert data["verdict"] == "pass"
    kver = next(c["detail"] for c in data["checks"] if c["name"] == "kernel_version")
    assert smoke.stage_rpm(kernel_rpm, tmp_path / "root").kver == kver
    for name in ("boot", "nic_module:igb", "igb_queues", "igb_msix", "dmesg_clean"):
        assert statuses[name]["status"] == "pass", statuses[name]
    assert all(c["status"] != "fail" for c in data["checks"])
    out = Path(os.environ["FSBUILD_OUT"]) / "linux-6.1"
    assert json.loads((out / "smoke.json").read_text()) == data
    assert ET.parse(out / "smoke-junit.xml").getroot().find("testsuite") is not None
    if shutil.which("ip"):   # no namespace left behind by a finished run (others may be running)
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left = [n for n in re.findall(r"^fsbuild-smoke-(\d+)", listing, re.MULTILINE) if not Path(f"/proc/{n}").exists()]
        assert not left, listing


def test_console_fallback_when_the_guest_has_no_second_port(tmp_path: Path) -> None:
    cfg = qemu.VmConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", workdir=tmp_path, serial_log=tmp_path / "s",
                        checks_log=tmp_path / "c", accel=qemu.Accel("tcg", ""), net=qemu.user_net(""))
    cfg.checks_log.write_text("")
    cfg.serial_log.write_text("[ 1.0] boot\nFSBOOT 2.6.32-431.17.1.el6.fastsocket\nFSCHECK kernel_version pass ok\n")
    rep = smoke._guest_report(cfg)
    assert rep.booted == "2.6.32-431.17.1.el6.fastsocket" and rep.checks[0].name == "kernel_version"
    cfg.checks_log.write_text("FSBOOT 6.1\nFSDONE\n")     # the checks channel wins when it has the boot
    assert smoke._guest_report(cfg).booted == "6.1" and smoke._guest_report(cfg).done


def test_phases_split_the_run_and_the_guest_steps(tmp_path: Path) -> None:
    """Where the time beyond the boot goes: host laps, QEMU split at FSBOOT/FSDONE, and the
    init's FSSTEP clock per check (ci/bench_smoke.py prints them)."""
    console = ("[ 0.5] x\nFSSTEP t=1.25 init\nFSSTEP t=1.50 kernel_version\r\n"
               "junk FSSTEP t=2.00 nic_module:igb\nFSSTEP t=bad x\n")
    assert smoke.guest_steps(console) == [("init", 1.25), ("kernel_version", 1.5), ("nic_module:igb", 2.0)]
    # printk lines written into the middle of a step line (another CPU) are spliced out
    split = ("FSSTEP t=1.86 ni[    2.17] igb: Intel(R) Gigabit\n[    2.18] igb: Copyright\nc_job:igb\n"
             "FSSTEP t=1.90 [    2.19] virtio-pci: INT A\nnic_job:virtio\n")
    assert smoke.guest_steps(split) == [("nic_job:igb", 1.86), ("nic_job:virtio", 1.9)]
    clock = smoke._Clock()
    clock.last -= 1.0
    w = smoke._Watcher(qemu.VmConfig(kernel=tmp_path, initrd=tmp_path, workdir=tmp_path, serial_log=tmp_path / "s",
                                     checks_log=tmp_path / "c", accel=qemu.Accel("tcg", ""),
                                     net=qemu.user_net("")), lambda _m: None)
    w.t_init, w.t_done = clock.last + 0.25, clock.last + 0.75
    clock.split_vm(w, qemu.VmResult("done", False, 0, 0.9))
    assert (clock.phases["boot_to_init"], clock.phases["checks"], clock.phases["qemu"]) == (0.25, 0.5, 0.9)
    assert 0.2 <= clock.phases["shutdown"] <= 0.5
    assert "qemu_cpu_boot" not in clock.phases            # no QEMU process was watched


def test_bench_groups_time_the_nic_lanes_and_the_wait_apart() -> None:
    """ci/bench_smoke.py: a lane's steps count on the lane's clock; the init's wait for the
    lanes (nic_wait..nic_ready) is g:nic_wait, not nic.sh's (it hid 0.7 s of igb in it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
    import bench_smoke
    steps = [("init", 0.8), ("kernel_version", 0.81), ("nic_job:igb", 0.82), ("nic_job:virtio", 0.83),
             ("fastsocket_load", 0.9), ("nic_module:virtio_net", 1.0), ("virtio_net", 1.1),
             ("fastsocket_demo:server up", 1.0), ("fastsocket_demo", 1.3), ("nic_module:igb", 1.4),
             ("nic_wait", 1.35), ("igb_queues", 2.0), ("nic_ready", 2.01), ("nic_affinity", 2.06),
             ("dmesg_clean", 2.07), ("done", 2.07)]
    g = bench_smoke.guest_phases(steps)
    assert g["g:kernel_boot"] == 0.8 and g["g:nic_modules"] == round(0.17 + 0.58, 3)
    assert g["g:virtio_net"] == 0.1 and g["g:igb"] == 0.6 and g["g:demo_load"] == 0.4
    assert g["g:nic_wait"] == round(0.05 + 0.66, 3) and g["g:nic_sh"] == 0.05


def test_watcher_takes_qemu_cpu_at_fsboot_and_fsdone(tmp_path: Path) -> None:
    """QEMU's CPU seconds split at FSBOOT/FSDONE (qemu_cpu_boot, qemu_cpu_checks): the
    phases a loaded host's wall clock cannot compare (here: this process stands in)."""
    cfg = qemu.VmConfig(kernel=tmp_path, initrd=tmp_path, workdir=tmp_path, serial_log=tmp_path / "s",
                        checks_log=tmp_path / "c", accel=qemu.Accel("tcg", ""), net=qemu.user_net(""),
                        pid=os.getpid())
    w = smoke._Watcher(cfg, lambda _m: None)
    cfg.checks_log.write_text("FSBOOT 6.1\n")
    assert w.poll() is None and w.cpu_init is not None
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    cfg.checks_log.write_text("FSBOOT 6.1\nFSDONE\n")
    assert w.poll() == "done"
    clock = smoke._Clock()
    clock.split_vm(w, qemu.VmResult("done", False, 0, 1.0))
    assert clock.phases["qemu_cpu_boot"] == round(w.cpu_init, 3)
    assert 0.2 <= clock.phases["qemu_cpu_checks"] < 5


def test_guest_programs_are_built_once_for_every_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh FSBUILD_OUT (another target, bench's temp dir) reuses the musl build."""
    require_tool("musl-gcc", "make")
    monkeypatch.setenv("FSBUILD_OUT", str(tmp_path / "out1"))
    helpers, us, fails = smoke.guest_programs(True)
    assert not fails and us.server is not None and us.server.is_file(), us.missing
    stamps = {p: p.stat().st_mtime_ns for p in [*helpers, us.server, us.loadgen, us.libsocket] if p}
    monkeypatch.setenv("FSBUILD_OUT", str(tmp_path / "out2"))
    again, us2, _ = smoke.guest_programs(True)
    assert again == helpers and us2.server == us.server
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps   # nothing rebuilt


def test_preset_lpj_from_the_kernel_hz_and_the_host_clock(tmp_path: Path) -> None:
    """lpj= skips the delay-loop calibration of every vCPU (~0.2 s per secondary CPU under
    TCG): the value the kernel derives from the TSC, host MHz * 1e6 / CONFIG_HZ."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 1200.000\nprocessor\t: 1\ncpu MHz\t\t: 2445.406\n")
    config = tmp_path / "config"
    config.write_text("CONFIG_HZ_250=y\nCONFIG_HZ=250\n")
    assert smoke.preset_lpj(config, cpuinfo) == 9781624          # what 6.1 printed: lpj=9780912 at 2445.228
    config.write_text("CONFIG_HZ=1000\n")
    assert smoke.preset_lpj(config, cpuinfo) == 2445406          # el6
    assert smoke.preset_lpj(None, cpuinfo) is None
    config.write_text("# CONFIG_HZ is not set\n")
    assert smoke.preset_lpj(config, cpuinfo) is None
    cpuinfo.write_text("processor\t: 0\n")                       # no clock shown: calibrate as before
    assert smoke.preset_lpj(config, cpuinfo) is None


def test_fsguest_reap_terms_then_kills_what_ignores_it(tmp_path: Path) -> None:
    """kill_named in the guest init: one process polls /proc every 5 ms (the shell version
    ran a /proc scan and a `sleep` per poll: ~2 s of the verdict); SIGKILL after 0.5 s."""
    require_tool("musl-gcc")
    helper = smoke.guest_helper(tmp_path / "build")
    name = f"fsreap{os.getpid() % 100000}"          # a name no other process on the host has
    prog = tmp_path / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", prog)
    polite = subprocess.Popen([str(prog), "30"])
    # SIG_IGN survives exec: this one ignores SIGTERM and needs the SIGKILL.
    stubborn = subprocess.Popen(["sh", "-c", f"trap '' TERM; exec {prog} 30"])
    time.sleep(0.2)
    try:
        start = time.monotonic()
        r = subprocess.run([str(helper), "reap", name], capture_output=True, timeout=10, check=False)
        took = time.monotonic() - start
        assert r.returncode == 1 and r.stdout == b"", r
        assert polite.wait(timeout=5) == -15 and stubborn.wait(timeout=5) == -9
        assert 0.4 <= took < 5, took                  # waited for the TERM, then killed
        assert subprocess.run([str(helper), "reap", name], timeout=10, check=False).returncode == 0   # none left
    finally:
        for p in (polite, stubborn):
            p.kill()
            p.wait()


def test_stage_rpm_reuses_a_root_staged_from_the_same_rpm(tmp_path: Path) -> None:
    """Every verdict staged the RPM afresh (rpm2cpio, and depmod for el6): same bytes, same
    root; other bytes under the same name are staged again."""
    require_tool("rpm2cpio", "depmod")
    files = {"boot/vmlinuz-9.9.9-test": "KERNEL", "lib/modules/9.9.9-test/kernel/x.ko": "x"}
    rpm = _build_rpm(tmp_path / "a", "kernel", files)
    root = tmp_path / "root"
    first = smoke.stage_rpm(rpm, root)
    marker = root / "lib/modules/9.9.9-test/kept"
    marker.write_text("a file a fresh extraction would remove")
    again = smoke.stage_rpm(rpm, root)
    assert again == first and marker.is_file()
    other = _build_rpm(tmp_path / "b", "kernel", {**files, "boot/vmlinuz-9.9.9-test": "KERNEL v2"})
    shutil.copy(other, rpm)
    assert smoke.stage_rpm(rpm, root).vmlinuz.read_text() == "KERNEL v2" and not marker.exists()


def test_fsguest_listen_polls_until_the_port_listens(tmp_path: Path) -> None:
    """The guest init waits for the demo server with one process polling /proc/net/tcp every
    5 ms (the shell loop paid a grep and a `sleep` exec per poll under TCG)."""
    require_tool("musl-gcc")
    import socket
    helper = str(smoke.guest_helper(tmp_path / "build"))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
            quiet = subprocess.run([helper, "listen", port, str(sleeper.pid), "100"], capture_output=True,
                                   text=True, timeout=10, check=False)
            assert quiet.returncode == 2 and int(quiet.stdout) >= 10, quiet     # bound, not listening
            s.listen()
            up = subprocess.run([helper, "listen", port, str(sleeper.pid), "5000"], capture_output=True,
                                text=True, timeout=10, check=False)
            assert up.returncode == 0 and up.stdout.strip() == "0", up
        sleeper.kill()
        sleeper.wait()
        gone = subprocess.run([helper, "listen", port, str(sleeper.pid), "5000"], capture_output=True,
                              text=True, timeout=10, check=False)
        assert gone.returncode == 1, gone                                         # the server died first
    finally:
        sleeper.kill()
        sleeper.wait()


def test_fsguest_reap_terms_children_before_their_parents(tmp_path: Path) -> None:
    """The demo server's master sleeps 100 ms when its workers are still alive right after
    it told them to stop: reap stops the workers first, then the master finds them gone."""
    require_tool("musl-gcc")
    helper = smoke.guest_helper(tmp_path / "build")
    name = f"fsrtree{os.getpid() % 100000}"
    prog, seen = tmp_path / name, tmp_path / "seen"
    # The child takes 0.3 s to stop; the parent records whether it was gone (exited or a
    # zombie) when the parent's own SIGTERM arrived.
    prog.write_text(f"""#!/bin/sh
if [ "$1" = child ]; then trap 'sleep 0.3; exit 0' TERM; while :; do sleep 0.05; done; fi
"$0" child & c=$!
gone() {{ read -r _ _ st _ < /proc/$c/stat 2>/dev/null || return 0; [ "$st" = Z ]; }}
trap 'if gone; then echo gone > {seen}; else echo alive > {seen}; fi; exit 0' TERM
while :; do sleep 0.05; done
""")
    prog.chmod(0o755)
    parent = subprocess.Popen([str(prog)])
    try:
        time.sleep(0.3)
        r = subprocess.run([str(helper), "reap", name], capture_output=True, timeout=10, check=False)
        assert r.returncode == 1, r
        assert parent.wait(timeout=5) == 0 and seen.read_text().strip() == "gone"
    finally:
        parent.kill()
        parent.wait()
        subprocess.run([str(helper), "reap", name], timeout=10, check=False)


def test_fsguest_klog_is_the_dmesg_grep_pipeline(tmp_path: Path) -> None:
    """dmesg_clean scans the kernel log in one process (dmesg, grep and grep were three
    execs under TCG): same lines as `dmesg | grep -E '\\b(BUG|WARNING|Oops)\\b|[Pp]anic' |
    grep -vi 'command line'`, the "<level>" prefix dropped as dmesg does."""
    require_tool("musl-gcc", "grep")
    helper = str(smoke.guest_helper(tmp_path / "build"))
    log = tmp_path / "klog"
    lines = ["<6>[    0.0] Kernel command line: console=ttyS0 panic=1", "<5>[ 0.1] KERNEL COMMAND LINE BUG",
             "<4>[ 0.2] WARNING: CPU: 1 PID: 7 at net/core/dev.c:1 x", "<6>[ 0.3] DEBUG_BUGS and BUG_ON are fine",
             "<0>[ 0.4] Kernel panic - not syncing: x", "<6>[ 0.5] pvpanic: ok", "<1>[ 0.6] BUG: unable to handle",
             "<6>[ 0.7] (Oops) 1", "<6>[ 0.8] xOops WARNINGS PANIC", "[ 0.9] no level BUG", "<6>", "<12>[1.0] Oops"]
    log.write_text("\n".join(lines) + "\n")
    r = subprocess.run([helper, "klog", str(log)], capture_output=True, text=True, timeout=10, check=False)
    plain = "".join(re.sub(r"^<[0-9]+>", "", ln) + "\n" for ln in lines)
    grep = subprocess.run("grep -E '\\b(BUG|WARNING|Oops)\\b|[Pp]anic' | grep -v -i 'command line'", shell=True,
                          input=plain, capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 0 and r.stdout == grep.stdout and len(r.stdout.splitlines()) == 7, (r, grep.stdout)
    missing = subprocess.run([helper, "klog", str(tmp_path / "none")], capture_output=True, timeout=10, check=False)
    assert missing.returncode == 1
