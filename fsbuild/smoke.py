"""`fsbuild smoke`: boot exactly what the kernel RPM contains in QEMU (igb + multiqueue
virtio-net), run the guest checks from ci/guest/init, and turn the serial output into a
verdict: out/<target>/smoke.json + smoke-junit.xml, and a distinct error per failure class
(no boot, panic, hang, failed checks), raised only after the verdict files are written."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fsbuild import build, initramfs, lock, paths, proc, progress, qemu, stress
from fsbuild.errors import (
    BuildError,
    FsbuildError,
    MissingFileError,
    SmokeBootError,
    SmokeCheckError,
    SmokePanicError,
    SmokeTimeoutError,
    ToolMissingError,
    UnsafePathError,
)
from fsbuild.fileio import atomic_write, sha256_file

DEFAULT_TIMEOUT_S = 120.0
# Under TCG a guest does ~60-250 connections/s (one request per connection): keep N small.
# 64 = 16 per pinned worker: every CPU's listener accepts, loadgen counts and checks every
# response; 200 cost ~0.9 s more of the verdict and asserted nothing more.
REQUESTS = 64
DEMO_PORT = 8080
PANIC_RE = re.compile(r"Kernel panic - not syncing[^\r\n]*")
LINE_RE = re.compile(r"^(FSBOOT|FSCHECK|FSDONE)\b ?(.*)$")
# The init's progress on the console: `FSSTEP t=<guest uptime> <what>` (ci/guest/init step()).
STEP_RE = re.compile(r"FSSTEP t=([0-9.]+) (\S+)")
# The kernel's printk writes the UART between the bytes of a line the init is writing:
# "FSSTEP t=1.90 ni[    2.17] igb: ...\nc_job:igb". The splice drops such kernel lines.
SPLIT_STEP_RE = re.compile(r"(FSSTEP t=[0-9.]+ [^\s\[]*)\[ *\d+\.\d+\][^\n]*\n")
# A UART may put a junk byte before the first line (seen on 2.6.32): strip non-printables.
JUNK_RE = re.compile(r"^[^\x20-\x7e]+")
# Checks the guest init always reports (pass, fail or skip): a run missing any of them did not
# really test the kernel, whatever else it says.
REQUIRED_CHECKS = ("kernel_version", "igb_queues", "nic_affinity", "fastsocket_load",
                   "fastsocket_demo", "dmesg_clean")
STATUSES = ("pass", "fail", "skip")
# Sub-packages of the kernel that are not the kernel (kernel-devel, kernel-firmware...).
NOT_KERNEL = re.compile(r"^kernel-(devel|headers|firmware|debug|debuginfo|doc|tools|abi)")


@dataclass
class Check:
    name: str
    status: str       # pass | fail | skip
    detail: str


@dataclass
class KernelInputs:
    kver: str
    vmlinuz: Path
    modules_dir: Path
    rpm: Path | None
    config: Path | None = None      # /boot/config-<kver>: HZ for the preset lpj=


@dataclass
class Verdict:
    verdict: str
    duration_s: float
    checks: list[Check]
    error: type[FsbuildError] | None = None
    message: str = ""
    # seconds per phase (host: stage, userspace, accel, network, initramfs, boot_to_init,
    # checks, shutdown, teardown; QEMU's CPU: qemu_cpu_boot, qemu_cpu_checks): where the time
    # beyond the boot goes; not in smoke.json
    phases: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"verdict": self.verdict, "duration_s": round(self.duration_s, 2),
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks]}


# ---------------------------------------------------------------- RPM -> staging root

def find_kernel_rpm(rpm_dir: Path) -> Path:
    if not rpm_dir.is_dir():
        raise MissingFileError(f"RPM directory {rpm_dir} does not exist (run `fsbuild rpm` first)")
    rpms = sorted(p for p in rpm_dir.glob("kernel-*.x86_64.rpm") if not NOT_KERNEL.match(p.name))
    if not rpms:
        raise MissingFileError(f"no kernel-*.x86_64.rpm in {rpm_dir} (run `fsbuild rpm` first)")
    if len(rpms) > 1:
        raise MissingFileError(f"several kernel RPMs in {rpm_dir}: {', '.join(p.name for p in rpms)}; "
                               "pass --rpms with a directory holding one build")
    return rpms[0]


def _wanted(name: str) -> bool:
    return name.startswith(("boot/vmlinuz-", "boot/config-", "lib/modules/"))


# In a staging root: the sha256 of the RPM it was extracted from, written last.
STAGE_STAMP = ".fsbuild-staged-from"


def stage_rpm(rpm: Path, root: Path) -> KernelInputs:
    """Extract /boot/vmlinuz-*, /boot/config-* and /lib/modules/** of the kernel RPM into
    `root` (fresh). Paths are checked (no `..`, no absolute symlink escapes); nothing else is
    written. A root already staged from the same RPM bytes is reused (el6 also runs depmod)."""
    digest = _sha256(rpm)
    stamp = root / STAGE_STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return _kernel_inputs(root, rpm)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from fsbuild.artifacts import iter_payload  # lazy: rpmfile only when staging an RPM

    for name, mode, data in iter_payload(rpm):
        rel = name.removeprefix(".").lstrip("/")
        if _wanted(rel):
            _extract_one(root, rel, mode, data)
    kin = _kernel_inputs(root, rpm)
    stamp.write_text(digest + "\n")
    return kin


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise MissingFileError(f"cannot read {path}: {exc.strerror}") from exc


def _extract_one(root: Path, rel: str, mode: int, data: bytes) -> None:
    parts = PurePosixPath(rel).parts
    if ".." in parts:
        raise UnsafePathError(f"RPM member {rel!r} escapes the staging root")
    dest = root.joinpath(*parts)
    kind = mode & 0o170000
    if kind == 0o040000:
        dest.mkdir(parents=True, exist_ok=True)
    elif kind == 0o100000:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    elif kind == 0o120000:
        target = data.decode()
        # /lib/modules/K/build -> /usr/src/kernels/...: harmless, never followed; skip it.
        if target.startswith("/") or ".." in PurePosixPath(target).parts:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        dest.symlink_to(target)


def _kernel_inputs(root: Path, rpm: Path | None) -> KernelInputs:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise MissingFileError(f"{rpm}: expected one /boot/vmlinuz-*, found "
                               f"{[k.name for k in kernels] or 'none'}")
    kver = kernels[0].name.removeprefix("vmlinuz-")
    mdir = root / "lib" / "modules" / kver
    if not mdir.is_dir():
        raise MissingFileError(f"{rpm}: no /lib/modules/{kver} next to /boot/vmlinuz-{kver}")
    if not (mdir / "modules.dep").is_file():
        # el6-style specs leave modules.dep to %post depmod; compute it the same way.
        proc.run([_tool("depmod"), "-b", str(root), kver], error=BuildError, timeout=120,
                 timeout_message=f"modules of {rpm}")
    config = root / "boot" / f"config-{kver}"
    return KernelInputs(kver, kernels[0], mdir, rpm, config if config.is_file() else None)


def preset_lpj(kernel_config: Path | None, cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """loops_per_jiffy for the guest's `lpj=`: what its boot CPU derives from the TSC anyway
    (TCG reads the host's TSC, KVM passes it through), i.e. host MHz * 1e6 / the kernel's HZ.
    Preset, no vCPU runs the delay-loop calibration: under TCG every secondary CPU of a
    qemu64 model (no constant_tsc) fails the quick one and spends ~0.2 s in the slow one.
    None (calibrate as before) when the config has no CONFIG_HZ or the host shows no MHz."""
    try:
        hz_m = re.search(r"^CONFIG_HZ=(\d+)$", kernel_config.read_text(), re.MULTILINE) if kernel_config else None
        mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)$", cpuinfo.read_text(), re.MULTILINE)]
    except (OSError, ValueError):
        return None
    if not hz_m or not mhz or int(hz_m.group(1)) <= 0:
        return None
    # The highest core clock: TSCs tick at the nominal rate while idle cores may be clocked down.
    return round(max(mhz) * 1e6 / int(hz_m.group(1)))


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}")
                                        if os.access(p, os.X_OK)), None)
    if found is None:
        raise ToolMissingError(f"{name} not found; run `fsbuild doctor` for the install command")
    return found


# ---------------------------------------------------------------- guest programs

def guest_helper(build_dir: Path) -> Path:
    """ci/guest/fsguest.c -> static musl binary (rebuilt when the source is newer)."""
    src = paths.repo_root() / "ci" / "guest" / "fsguest.c"
    out = build_dir / "fsguest"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        build_dir.mkdir(parents=True, exist_ok=True)
        proc.run([_tool("musl-gcc"), "-static", "-Os", "-s", "-o", str(out), str(src)],
                 error=BuildError, timeout=120)
    return out


def build_userspace(build_dir: Path) -> tuple[initramfs.Userspace, list[Check]]:
    """`make -C library|demo CC=musl-gcc BUILDDIR=...` (incremental). Absent sources leave
    the demo checks skipping with the reason; a failing build is a failing check."""
    root = paths.repo_root()
    us = initramfs.Userspace()
    host_checks: list[Check] = []
    build_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("library", "demo"):
        if not (root / sub / "Makefile").is_file():
            us.missing.append(f"no {sub}/Makefile")
            continue
        r = proc.run(["make", "-s", "-C", str(root / sub), "CC=musl-gcc", f"BUILDDIR={build_dir}"],
                     error=BuildError, timeout=300, check=False)
        if r.returncode != 0:
            tail = " | ".join(r.stderr.decode(errors="replace").strip().splitlines()[-2:])
            us.missing.append(f"make -C {sub} failed")
            host_checks.append(Check(f"build_{sub}", "fail", f"make -C {sub} CC=musl-gcc: {tail}"))
    for attr, fname in (("libsocket", "libsocket.so"), ("server", "server"), ("loadgen", "loadgen")):
        p = build_dir / fname
        if p.is_file():
            setattr(us, attr, p)
        elif not us.missing:
            us.missing.append(f"{fname} not produced in {build_dir}")
    nic = root / "scripts" / "nic.sh"
    us.nic_sh = nic if nic.is_file() else None
    return us, host_checks


def guest_programs(userspace: bool, suite: str | None = None
                   ) -> tuple[list[Path], initramfs.Userspace, list[Check]]:
    """The musl guest programs, built (incrementally) in the state dir: they do not depend on
    the kernel, so every target and every out dir shares one build (a fresh out dir paid a
    full musl build, ~6 s under load, before its verdict). Concurrent smokes take turns."""
    gbuild = paths.state_dir() / "guest"
    with lock.hold(paths.state_dir() / "guest.lock", "the guest userspace build", wait=True):
        helpers = [guest_helper(gbuild)]
        if suite == "stress":
            helpers += stress.guest_programs(gbuild)
        if not userspace:
            return helpers, initramfs.Userspace(missing=["userspace disabled for this boot"]), []
        us, host_checks = build_userspace(gbuild)
    return helpers, us, host_checks


def musl_loader() -> Path | None:
    p = Path(initramfs.MUSL_LOADER)
    return p if p.exists() else None


# ---------------------------------------------------------------- serial output -> checks

@dataclass
class GuestReport:
    booted: str | None = None           # uname -r from FSBOOT
    checks: list[Check] = field(default_factory=list)
    done: bool = False


def parse_guest(text: str) -> GuestReport:
    """FSBOOT/FSCHECK/FSDONE lines -> report; other lines (and CRs) are ignored."""
    rep = GuestReport()
    for raw in text.splitlines():
        m = LINE_RE.match(JUNK_RE.sub("", raw.strip("\r\x00 ")))
        if not m:
            continue
        kind, rest = m.groups()
        if kind == "FSBOOT":
            rep.booted = rest.strip() or "?"
        elif kind == "FSDONE":
            rep.done = True
        else:
            name, _, tail = rest.partition(" ")
            status, _, detail = tail.partition(" ")
            if name and status in STATUSES:
                rep.checks.append(Check(name, status, detail.strip()))
            else:
                rep.checks.append(Check(name or "?", "fail", f"malformed check line: {raw.strip()}"))
    return rep


def guest_steps(console: str) -> list[tuple[str, float]]:
    """(step, guest uptime) of every FSSTEP line: the init's own clock, per check."""
    spliced = 1
    while spliced:   # one kernel line per pass: a step may have been cut more than once
        console, spliced = SPLIT_STEP_RE.subn(r"\1", console)
    return [(m.group(2), float(m.group(1))) for m in STEP_RE.finditer(console)]


def find_panic(console: str) -> str | None:
    m = PANIC_RE.search(console)
    return m.group(0).strip() if m else None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no console output)"


def classify(rep: GuestReport, console: str, vm: qemu.VmResult, timeout: float,
             boot_detail: str, qemu_stderr: str = "", required: tuple[str, ...] = REQUIRED_CHECKS,
             ) -> tuple[list[Check], type[FsbuildError] | None, str]:
    """Host-side checks + the guest's, and the error class of the outcome (None = pass)."""
    panic = find_panic(console)
    if panic is None and any(e.startswith("GUEST_PANICKED") for e in vm.events):
        panic = "guest-panicked event (pvpanic)"
    checks = [Check("boot", "pass" if rep.booted else "fail",
                    f"init reached ({rep.booted}); {boot_detail}" if rep.booted else
                    f"init never reported; last console line: {_last_line(console)}; {boot_detail}")]
    checks += rep.checks
    last = rep.checks[-1].name if rep.checks else "none"
    if panic:
        checks.append(Check("kernel_panic", "fail", f"{panic} (after check: {last})"))
        return checks, SmokePanicError, f"guest kernel panicked: {panic}"
    if vm.timed_out:
        where = f"after check {last}" if rep.booted else f"before init; last console line: {_last_line(console)}"
        checks.append(Check("timeout", "fail", f"no verdict within {timeout:.0f}s, {where}"))
        return checks, SmokeTimeoutError, f"guest hung: no verdict within {timeout:.0f}s ({where})"
    if not rep.booted:
        why = f"QEMU exit {vm.returncode}, events {vm.events or 'none'}"
        if qemu_stderr.strip():
            why += f", QEMU said: {_last_line(qemu_stderr)}"
            checks[0].detail += f"; QEMU said: {_last_line(qemu_stderr)}"
        return checks, SmokeBootError, f"guest did not boot to init ({why}); last console line: {_last_line(console)}"
    if not rep.done:
        checks.append(Check("guest_complete", "fail", f"guest stopped after check {last} "
                            f"(QEMU exit {vm.returncode}, events {vm.events or 'none'})"))
    missing = [n for n in required if n not in {c.name for c in rep.checks}]
    if missing:
        checks.append(Check("checks_reported", "fail", f"guest never reported: {', '.join(missing)}"))
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        return checks, SmokeCheckError, f"{len(failed)} smoke check(s) failed: {', '.join(failed)}"
    return checks, None, ""


# ---------------------------------------------------------------- verdict files

def write_verdict(v: Verdict, out: Path, suite: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "smoke.json", (json.dumps(v.as_json(), indent=2) + "\n").encode())
    (out / "smoke-junit.xml").write_bytes(junit_xml(v, suite))


def junit_xml(v: Verdict, suite: str) -> bytes:
    fails = sum(c.status == "fail" for c in v.checks)
    skips = sum(c.status == "skip" for c in v.checks)
    ts = ET.Element("testsuite", name=suite, tests=str(len(v.checks)), failures=str(fails),
                    errors="0", skipped=str(skips), time=f"{v.duration_s:.2f}")
    for c in v.checks:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=c.name)
        if c.status == "fail":
            ET.SubElement(tc, "failure", message=c.detail).text = c.detail
        elif c.status == "skip":
            ET.SubElement(tc, "skipped", message=c.detail)
        else:
            ET.SubElement(tc, "system-out").text = c.detail
    root = ET.Element("testsuites")
    root.append(ts)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root) + b"\n"


# ---------------------------------------------------------------- the run

@dataclass
class BootOptions:
    timeout: float = DEFAULT_TIMEOUT_S
    init: Path | None = None            # a test's own init instead of ci/guest/init
    userspace: bool = True              # build and ship the musl programs
    requests: int = REQUESTS
    append: str = ""
    suite: str = "smoke"                # smoke | stress (fsbuild.stress: more programs, checks)
    config: str = "mini"                # build profile: debug reads and writes out/<target>/debug


def guest_config(us: initramfs.Userspace, net: qemu.Net, requests: int) -> dict[str, str]:
    missing = "; ".join(us.missing) or "server/loadgen/libsocket.so absent"
    return {
        "NIC_WANTED": " ".join(initramfs.NIC_MODULES),
        "NETDEV_MODE": net.mode,
        "MISSING_USERSPACE": missing,
        "MISSING_NIC_SH": "no scripts/nic.sh in the repository",
        "DEMO_PORT": str(DEMO_PORT),
        "DEMO_TIMEOUT": "20",
        "REQUESTS": str(requests),
        # demo/server.c: 4 workers pinned to CPUs 0-3; demo/loadgen.c: 4 workers pinned to
        # CPUs 0-3, one request per connection (accept-heavy), exit 1 on any error.
        "SERVER_CMD": f"/bin/server -w 4 -c 0 -a 127.0.0.1:{DEMO_PORT}",
        "LOADGEN_CMD": f"/bin/loadgen -n {requests} -c 16 -w 4 -p 0 -t 10 http://127.0.0.1:{DEMO_PORT}/",
        "LOADGEN_RESULT_RE": f"requests={requests} errors=0 ",
    }


def boot(kin: KernelInputs, out: Path, opts: BootOptions,
         status: Callable[[str], None] = lambda _m: None) -> Verdict:
    """Assemble the guest for `kin`, boot it, and return the verdict (no files, no raise)."""
    start = time.monotonic()
    clock = _Clock()
    work = out / "smoke"
    helpers, us, host_checks = guest_programs(opts.userspace, opts.suite)
    required = REQUIRED_CHECKS + (stress.REQUIRED_CHECKS if opts.suite == "stress" else ())
    clock.lap("userspace")
    accel = qemu.probe_accel(kin.vmlinuz)
    clock.lap("accel")
    with qemu.network(f"fsbuild-smoke-{os.getpid()}") as net:
        clock.lap("network")
        status(f"building initramfs ({accel.name}, {net.mode} networking)")
        spec = initramfs.GuestSpec(
            kver=kin.kver, modules_dir=kin.modules_dir,
            init=opts.init or paths.repo_root() / "ci" / "guest" / "init",
            busybox=Path(_tool("busybox")), helpers=helpers, userspace=us,
            musl_loader=musl_loader(), config=guest_config(us, net, opts.requests)
            | (stress.guest_config() if opts.suite == "stress" else {}))
        # Uncompressed: the kernel copies it instead of inflating it (~1 s under TCG).
        image = initramfs.build(spec, work / "initramfs.cpio")
        clock.lap("initramfs")
        lpj = preset_lpj(kin.config)
        # The caller's own lpj= (if any) comes later on the command line and wins.
        append = " ".join(a for a in (f"lpj={lpj}" if lpj else "", opts.append) if a)
        cfg = qemu.VmConfig(kernel=kin.vmlinuz, initrd=image.path, workdir=work,
                            serial_log=out / "smoke-serial.log", checks_log=out / "smoke-checks.log",
                            accel=accel, net=net, append=append)
        watcher = _Watcher(cfg, status)
        vm = qemu.run(cfg, opts.timeout, watcher.poll, status)
        clock.split_vm(watcher, vm)
    clock.lap("teardown")
    rep = _guest_report(cfg)
    boot_detail = (f"{accel.name} ({accel.reason}); network {net.mode} ({net.reason}); "
                   f"QEMU {vm.duration_s:.1f}s, QMP status {vm.status or 'n/a'}, "
                   f"events {','.join(vm.events) or 'none'}")
    checks, err, message = classify(rep, _read(cfg.serial_log), vm, opts.timeout, boot_detail,
                                    _read(work / "qemu.stderr"), required)
    checks = checks[:1] + host_checks + checks[1:]
    if err is None and host_checks:
        err, message = SmokeCheckError, "guest userspace failed to build"
    return Verdict("fail" if err else "pass", time.monotonic() - start, checks, err, message,
                   phases=clock.phases)


class _Clock:
    """Host-side phase times of one boot (laps of the monotonic clock)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.last, 3)
        self.last = now

    def split_vm(self, watcher: _Watcher, vm: qemu.VmResult) -> None:
        """QEMU's run: start to FSBOOT seen, to FSDONE seen, then quit and cleanup."""
        t0 = self.last
        init = watcher.t_init or t0
        done = watcher.t_done or init
        self.phases["boot_to_init"] = round(init - t0, 3)
        self.phases["checks"] = round(done - init, 3)
        self.last = done
        self.lap("shutdown")
        self.phases["qemu"] = round(vm.duration_s, 3)
        # QEMU's CPU seconds to FSBOOT and from there to FSDONE: comparable on a loaded host
        if watcher.cpu_init is not None:
            self.phases["qemu_cpu_boot"] = round(watcher.cpu_init, 3)
            if watcher.cpu_done is not None:
                self.phases["qemu_cpu_checks"] = round(watcher.cpu_done - watcher.cpu_init, 3)


class _Watcher:
    """Stop predicate for the run loop: FSDONE or a panic ends the boot at once."""

    def __init__(self, cfg: qemu.VmConfig, status: Callable[[str], None]) -> None:
        self.cfg, self.status, self.seen = cfg, status, 0
        self.t_init: float | None = None    # when FSBOOT / FSDONE were first seen
        self.t_done: float | None = None
        self.cpu_init: float | None = None  # QEMU's CPU seconds then (qemu.cpu_seconds)
        self.cpu_done: float | None = None

    def poll(self) -> str | None:
        rep = _guest_report(self.cfg)
        if rep.booted and self.t_init is None:
            self.t_init = time.monotonic()
            self.cpu_init = qemu.cpu_seconds(self.cfg.pid)
        if rep.done:
            if self.t_done is None:
                self.t_done = time.monotonic()
                self.cpu_done = qemu.cpu_seconds(self.cfg.pid)
            return "done"
        if find_panic(_read(self.cfg.serial_log)):
            return "panic"
        if not rep.booted:
            return None
        if self.seen == 0:  # seen = 1 (init) + checks already shown
            self.status(f"guest: init running ({rep.booted})")
            self.seen = 1
        for c in rep.checks[self.seen - 1:]:
            self.status(f"guest: {c.name} {c.status}")
        self.seen = len(rep.checks) + 1
        return None


def _guest_report(cfg: qemu.VmConfig) -> GuestReport:
    """The checks channel (ttyS1); the console when the guest had no ttyS1 and fell back."""
    rep = parse_guest(_read(cfg.checks_log))
    return rep if rep.booted else parse_guest(_read(cfg.serial_log))


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def run(target: str, rpm_dir: Path | None = None, opts: BootOptions | None = None) -> Verdict:
    """The command: RPM -> staging root -> boot -> verdict files; raise on failure."""
    opts = opts or BootOptions()
    start = time.monotonic()
    out = build.profile_out(target, opts.config)
    rpm = find_kernel_rpm(rpm_dir or out / "rpms")
    with progress.bar(f"smoke {target}: staging {rpm.name}") as bar:

        def status(msg: str) -> None:
            bar.update(f"smoke {target}: {msg}")
            if not progress.enabled():  # CI logs: one line per phase instead of a live bar
                progress.info(f"smoke {target}: {msg}")

        t0 = time.monotonic()
        kin = stage_rpm(rpm, out / "smoke" / "root")
        staged = time.monotonic() - t0
        status(f"booting {kin.kver} from {rpm.name}")
        out = stress.verdict_dir(out, opts.suite, opts.config)
        verdict = boot(kin, out, opts, status)
    verdict.phases = {"stage": round(staged, 3), **verdict.phases}
    verdict.duration_s = time.monotonic() - start
    write_verdict(verdict, out, f"fsbuild.smoke.{target}")
    if verdict.error is not None:
        raise verdict.error(f"{verdict.message} (verdict in {out / 'smoke.json'}, "
                            f"console in {out / 'smoke-serial.log'})")
    return verdict
