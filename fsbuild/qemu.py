"""QEMU for the smoke boot: the command line, the KVM probe (KVM can hang on hosts with
broken nested virtualisation, so it is tried with a short timeout and TCG is the fallback),
network namespaces with multi_queue taps, and the run loop: QMP over a unix socket with
qemu.qmp, a poll of the serial logs, and a hard host-side timeout that kills QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fsbuild import proc
from fsbuild.errors import ToolMissingError
from fsbuild.fileio import atomic_write

if TYPE_CHECKING:  # imported lazily at run time: only smoke needs QMP
    from qemu.qmp import QMPClient

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT_S = 3.0
TAP_QUEUES = 4
GUEST_MAC = ("52:54:00:fb:00:01", "52:54:00:fb:00:02")
# q35 without the board devices no check uses: probing the PS/2 mouse alone kept a TCG guest
# busy for ~1 s before init (QEMU CPU time of a boot to init: 4.6 s -> 3.3 s with lpj= and
# an uncompressed initramfs). The NICs, serial ports, HPET and PIT stay.
MACHINE = "q35,i8042=off,sata=off,smbus=off"
# qboot, QEMU's minimal firmware (shipped beside SeaBIOS), instead of SeaBIOS: it hands the
# kernel QEMU's ACPI and MP tables and jumps to it without a POST, and after it 2.6.32's fast
# PIT calibration of the TSC succeeds (after SeaBIOS it fails into a ~0.1 s fallback). Boot to
# init, alternated smoke runs, medians: el6 3.03 -> 2.75 s (10 pairs), linux-6.1 2.79 ->
# 2.36 s (4 pairs), every check passing the same. Where QEMU has no qboot.rom: SeaBIOS.
FIRMWARE = "qboot.rom"


@dataclass(frozen=True)
class Accel:
    name: str          # kvm | tcg
    reason: str        # why, for the report


@dataclass(frozen=True)
class Net:
    mode: str                  # "tap-netns" (multi_queue tap in a private netns) | "user"
    reason: str
    netns: str | None = None
    args: tuple[str, ...] = ()


@dataclass
class VmConfig:
    kernel: Path
    initrd: Path
    workdir: Path              # QMP socket lives here
    serial_log: Path           # ttyS0: console
    checks_log: Path           # ttyS1: the guest init's structured lines
    accel: Accel
    net: Net
    append: str = ""
    smp: int = 4
    memory_mb: int = 512
    pvpanic: bool = True
    qemu: str = QEMU
    qmp_path: Path | None = None   # default workdir/qmp.sock; run() picks a short one
    pid: int | None = None         # QEMU's, set by run() while it runs (cpu_seconds)


@dataclass
class VmResult:
    stopped_by: str | None     # the stop predicate's reason, when it ended the run
    timed_out: bool
    returncode: int | None
    duration_s: float
    events: list[str] = field(default_factory=list)   # QMP event names (+ reason)
    status: str | None = None  # first query-status answer


# ---------------------------------------------------------------- command line

# Boot knobs of the test VM that no check depends on. pty_init registered 256 legacy BSD pty
# pairs (CONFIG_LEGACY_PTYS, 6.1 mini config): 266 ms of ~1 s of initcalls under TCG (12 ms
# without); nothing in the guest opens /dev/ptyXX. Kernels without legacy ptys ignore it.
# tsc=reliable: TCG derives every vCPU's TSC from one host clock, so they are in sync, but
# QEMU's default vCPU (AMD, no invariant-TSC bit) makes both kernels mark the TSC unstable
# and time everything with the HPET, an emulated MMIO read per clock read (el6 smoke, 5
# alternated pairs: median QEMU CPU 6.70 -> 6.11 s, checks 2.61 -> 2.35 s).
GUEST_KNOBS = "pty.legacy_count=0 tsc=reliable"


def kernel_cmdline(extra: str = "") -> str:
    # panic=1 + -no-reboot: a panic resets after 1 s and the reset ends QEMU. (2.6.32 hangs
    # with panic=-1 instead of resetting; the serial watcher also stops at the panic line.)
    # The caller's `extra` comes last: a later parameter overrides an earlier one.
    base = f"console=ttyS0,115200 panic=1 rdinit=/init printk.time=1 {GUEST_KNOBS}"
    return f"{base} {extra}".strip()


def argv(cfg: VmConfig) -> list[str]:
    """The QEMU command line (without the `ip netns exec` prefix)."""
    # TCG keeps QEMU's default CPU model: el6 (2.6.32) predates most of `-cpu max`.
    a = [cfg.qemu, "-accel", accel_arg(cfg.accel, cfg.smp), "-M", MACHINE, *firmware_args(cfg.qemu),
         *(["-cpu", "host"] if cfg.accel.name == "kvm" else []),
         "-smp", str(cfg.smp), "-m", str(cfg.memory_mb),
         "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
         "-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd),
         "-append", kernel_cmdline(cfg.append),
         "-chardev", f"file,id=con,path={cfg.serial_log}", "-serial", "chardev:con",
         "-chardev", f"file,id=chk,path={cfg.checks_log}", "-serial", "chardev:chk",
         "-qmp", f"unix:{qmp_socket(cfg)},server=on,wait=off"]
    if cfg.pvpanic:
        a += ["-device", "pvpanic"]
    return a + list(cfg.net.args)


def firmware_args(qemu: str = QEMU) -> list[str]:
    """`-bios <qboot.rom>` from the data directory of this QEMU (PREFIX/share/qemu beside
    PREFIX/bin), or nothing: QEMU's default firmware."""
    binary = shutil.which(qemu)
    if binary is None:
        return []
    rom = Path(binary).resolve().parent.parent / "share" / "qemu" / FIRMWARE
    return ["-bios", str(rom)] if rom.is_file() else []


def accel_arg(accel: Accel, smp: int, host_cpus: int | None = None) -> str:
    """Multi-threaded TCG only when every vCPU has a host core: oversubscribed, each
    cross-CPU wakeup in the guest waits for the host to schedule another vCPU thread
    (measured on 2 cores, -smp 4: 11 vs 62 requests/s for the 4-worker demo)."""
    if accel.name != "tcg":
        return accel.name
    cores = host_cpus if host_cpus is not None else len(os.sched_getaffinity(0))
    return "tcg" if cores >= smp else "tcg,thread=single"


def qmp_socket(cfg: VmConfig) -> Path:
    return cfg.qmp_path or cfg.workdir / "qmp.sock"


def full_argv(cfg: VmConfig) -> list[str]:
    prefix = ["ip", "netns", "exec", cfg.net.netns] if cfg.net.netns else []
    return prefix + argv(cfg)


# ---------------------------------------------------------------- accelerator

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe_cache() -> Path:
    # A host fact, not project state: shared by every checkout and test of this user and
    # keyed by boot id, so a reboot (or a fixed KVM) is probed afresh.
    return Path(tempfile.gettempdir()) / f"fsbuild-accel-probe-{os.getuid()}.json"


def probe_accel(kernel: Path, qemu: str = QEMU, timeout: float = PROBE_TIMEOUT_S,
                use_cache: bool = True) -> Accel:
    """KVM only if a real kernel starts printing under it within `timeout`; else TCG.
    FSBUILD_SMOKE_ACCEL=tcg|kvm forces a choice. The answer is cached per host boot."""
    forced = os.environ.get("FSBUILD_SMOKE_ACCEL")
    if forced in ("tcg", "kvm"):
        return Accel(forced, f"forced by FSBUILD_SMOKE_ACCEL={forced}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "no usable /dev/kvm: TCG")
    cache = _probe_cache()
    key = f"{_boot_id()} {shutil.which(qemu)}"
    known: dict[str, dict[str, str]] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text())
    if use_cache and isinstance(known.get(key), dict):
        hit = known[key]
        return Accel(hit["name"], hit["reason"] + " (cached for this host boot)")
    accel = _probe_kvm_boot(kernel, qemu, timeout)
    # Keep only answers for this boot and for QEMU binaries that still exist.
    known = {k: v for k, v in known.items()
             if k.startswith(_boot_id() + " ") and Path(k.split(" ", 1)[1]).exists()}
    known[key] = {"name": accel.name, "reason": accel.reason}
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps(known).encode(), fsync=False)  # a cache: losing it costs a probe
    return accel


def _probe_kvm_boot(kernel: Path, qemu: str, timeout: float) -> Accel:
    # A trivial guest runs fine under a broken KVM; the hang shows only once a real kernel
    # enters long mode, so boot the kernel itself and wait for its first console byte.
    log = Path(tempfile.gettempdir()) / f"fsbuild-kvm-probe-{os.getpid()}.log"
    log.unlink(missing_ok=True)
    cmd = [qemu, "-accel", "kvm", "-M", "q35", "-m", "128", "-nodefaults", "-display", "none",
           "-no-reboot", "-kernel", str(kernel), "-append",
           "console=ttyS0 earlyprintk=serial panic=-1 rdinit=/nonexistent",
           "-serial", f"file:{log}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout:
            if log.exists() and log.stat().st_size > 0:
                return Accel("kvm", f"KVM printed within {time.monotonic() - start:.1f}s")
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
                last = err.splitlines()[-1] if err else f"exit {proc.returncode}"
                return Accel("tcg", f"KVM unusable ({last}): TCG")
            time.sleep(0.05)
        return Accel("tcg", f"KVM probe printed nothing in {timeout:.0f}s (hangs): TCG")
    finally:
        _kill_group(proc)
        log.unlink(missing_ok=True)


# ---------------------------------------------------------------- network

def _ip(*args: str) -> subprocess.CompletedProcess[bytes]:
    return proc.run(["ip", *args], error=ToolMissingError, timeout=10, check=False,
                    timeout_message="the host's `ip` hangs; FSBUILD_SMOKE_NET=user avoids it")


# The NICs' option ROMs (iPXE) would run in the firmware on every boot: -kernel never
# network-boots, so the smoke skips them.
NO_ROM = ",romfile="


def user_net(reason: str) -> Net:
    # restrict=on: the guest reaches nothing outside itself.
    args = ("-netdev", "user,id=n0,restrict=on",
            "-device", f"igb,netdev=n0,mac={GUEST_MAC[0]}{NO_ROM}",
            "-netdev", "user,id=n1,restrict=on",
            "-device", f"virtio-net-pci,netdev=n1,mac={GUEST_MAC[1]}{NO_ROM}")
    return Net("user", reason, None, args)


def setup_net(name: str) -> Net:
    """A private netns with two taps (igb; virtio-net on a 4-queue multi_queue tap);
    user networking with the reason when the host does not allow it."""
    if os.environ.get("FSBUILD_SMOKE_NET") == "user":
        return user_net("forced by FSBUILD_SMOKE_NET=user")
    if shutil.which("ip") is None:
        return user_net("no `ip` tool: user networking (single queue virtio-net)")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return user_net("no /dev/net/tun: user networking (single queue virtio-net)")
    _reap_stale_netns()
    r = _ip("netns", "add", name)
    if r.returncode != 0:
        return user_net(f"cannot create a netns ({r.stderr.decode().strip()}): user networking "
                        "(single queue virtio-net)")
    steps = [("-n", name, "tuntap", "add", "dev", "fsigb0", "mode", "tap"),
             ("-n", name, "tuntap", "add", "dev", "fsvnet0", "mode", "tap", "multi_queue"),
             ("-n", name, "link", "set", "fsigb0", "up"),
             ("-n", name, "link", "set", "fsvnet0", "up"),
             ("netns", "exec", name, "true")]  # QEMU will be started this way
    for step in steps:
        r = _ip(*step)
        if r.returncode != 0:
            teardown_net(Net("tap-netns", "", name))
            return user_net(f"`ip {' '.join(step)}` failed ({r.stderr.decode().strip()}): user networking")
    args = ("-netdev", "tap,id=n0,ifname=fsigb0,script=no,downscript=no",
            "-device", f"igb,netdev=n0,mac={GUEST_MAC[0]}{NO_ROM}",
            "-netdev", f"tap,id=n1,ifname=fsvnet0,script=no,downscript=no,queues={TAP_QUEUES},vhost=off",
            "-device", f"virtio-net-pci,netdev=n1,mq=on,vectors={2 * TAP_QUEUES + 2},mac={GUEST_MAC[1]}{NO_ROM}")
    return Net("tap-netns", f"multi_queue tap ({TAP_QUEUES} queues) in netns {name}", name, args)


def _reap_stale_netns() -> None:
    """Namespaces of smoke runs that were SIGKILLed (fsbuild-smoke-<pid>, pid gone)."""
    listing = _ip("netns", "list").stdout.decode()
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name.removeprefix("fsbuild-smoke-")
        if name.startswith("fsbuild-smoke-") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name)


def teardown_net(net: Net) -> None:
    if net.netns:
        _ip("netns", "del", net.netns)  # removes the taps with it


@contextlib.contextmanager
def network(name: str) -> Iterator[Net]:
    net = setup_net(name)
    try:
        yield net
    finally:
        teardown_net(net)


# ---------------------------------------------------------------- run loop

def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process, all its threads (/proc/PID/stat): what a
    TCG guest really cost, which a loaded host's wall clock blurs. None when it is gone."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _kill_group(proc: subprocess.Popen[bytes] | asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


StopPredicate = Callable[[], str | None]
StatusFn = Callable[[str], None]


def run(cfg: VmConfig, timeout: float, stop_when: StopPredicate,
        status: StatusFn = lambda _m: None) -> VmResult:
    """Boot, poll `stop_when` (reads the logs; returns a reason to stop) and QMP events,
    and never outlive `timeout`: QEMU is killed at the deadline whatever the guest does."""
    if shutil.which(cfg.qemu) is None:
        raise ToolMissingError(f"{cfg.qemu} not found; run `fsbuild doctor` for the install command")
    for log in (cfg.serial_log, cfg.checks_log):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # disconnects at quit are expected
    # unix socket paths are limited to 107 bytes; out/ may be deep (CI, pytest tmp dirs).
    with tempfile.TemporaryDirectory(prefix="fsbuild-qmp-") as sockdir:
        if len(str(qmp_socket(cfg))) > 100:
            cfg.qmp_path = Path(sockdir) / "qmp.sock"
        qmp_socket(cfg).unlink(missing_ok=True)
        return asyncio.run(_run(cfg, timeout, stop_when, status))


async def _run(cfg: VmConfig, timeout: float, stop_when: StopPredicate, status: StatusFn) -> VmResult:
    from qemu.qmp import QMPClient  # lazy: only smoke needs it

    start = time.monotonic()
    deadline = start + timeout
    proc = await asyncio.create_subprocess_exec(
        *full_argv(cfg), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=open(cfg.workdir / "qemu.stderr", "wb"),  # noqa: SIM115 - the child keeps its copy; ours is dropped at once
        start_new_session=True)
    result = VmResult(None, False, None, 0.0)
    cfg.pid = proc.pid  # `ip netns exec` execs QEMU: the same pid
    qmp = QMPClient("fsbuild-smoke")
    # QMP comes up in the background: the guest is watched (and the deadline kept) from
    # the first moment, even if the monitor never answers.
    connect = asyncio.create_task(_connect(qmp, qmp_socket(cfg), proc, deadline))
    events: asyncio.Task[None] | None = None
    try:
        status(f"QEMU started ({cfg.accel.name}, {cfg.net.mode} networking)")
        while True:
            if events is None and connect.done() and connect.result():
                events = asyncio.create_task(_collect_events(qmp, result))
                result.status = await _query_status(qmp)
            reason = stop_when()
            if reason:
                result.stopped_by = reason
                if connect.done() and connect.result():
                    await _quit(qmp, proc)
                break
            if proc.returncode is not None:
                break
            if time.monotonic() >= deadline:
                result.timed_out = True
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
        # A last look: the guest may have written its final lines just before exiting.
        if result.stopped_by is None:
            result.stopped_by = stop_when()
    finally:
        connect.cancel()
        if events is not None:
            events.cancel()
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), 2)
        qmp_socket(cfg).unlink(missing_ok=True)
    cfg.pid = None
    result.returncode = proc.returncode
    result.duration_s = time.monotonic() - start
    return result


async def _connect(qmp: QMPClient, sock: Path, proc: asyncio.subprocess.Process, deadline: float) -> bool:
    """QEMU creates the socket a moment after it starts; retry until it is there."""
    limit = min(deadline, time.monotonic() + 10)
    while time.monotonic() < limit:
        if proc.returncode is not None:
            return False
        if sock.exists():
            try:
                await asyncio.wait_for(qmp.connect(str(sock)), 2)
                return True
            except Exception:  # any connect failure means "retry"
                pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
    return False


async def _query_status(qmp: QMPClient) -> str | None:
    with contextlib.suppress(Exception):
        answer = await asyncio.wait_for(qmp.execute("query-status"), 2)
        if isinstance(answer, dict):
            return str(answer.get("status"))
    return None


async def _collect_events(qmp: QMPClient, result: VmResult) -> None:
    with contextlib.suppress(Exception):
        async for event in qmp.events:
            name = str(event.get("event"))
            data = event.get("data")
            if not isinstance(data, dict):
                data = {}
            extra = data.get("reason") or (data.get("action") if name == "GUEST_PANICKED" else None)
            result.events.append(f"{name}:{extra}" if extra else name)


async def _quit(qmp: QMPClient, proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(qmp.execute("quit"), 2)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), 3)
