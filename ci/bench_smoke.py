#!/usr/bin/env python3
"""Benchmark: time to a smoke verdict vs a plain `qemu -kernel … -initrd …` boot of the same
kernel to an init that reboots at once (the floor any boot test pays), same run, same
accelerator, same machine and kernel command line. Prints both, the ratio, and the QEMU CPU
seconds of each (on a loaded host the wall clock swings 2x; TCG's CPU time much less).

usage: ci/bench_smoke.py [--rpms DIR] [--target linux-6.1] [--repeat N]
The kernel RPM comes from --rpms, $FSBUILD_TEST_KERNEL, or out/<target>/rpms."""

from __future__ import annotations

import argparse
import gzip
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsbuild import initramfs, paths, progress, qemu, smoke
from fsbuild.errors import FsbuildError


def kernel_rpm(args: argparse.Namespace) -> Path | None:
    where = args.rpms or os.environ.get("FSBUILD_TEST_KERNEL")
    path = Path(where) if where else paths.repo_root() / "out" / args.target / "rpms"
    if path.is_file():
        return path
    try:
        return smoke.find_kernel_rpm(path)
    except FsbuildError as exc:
        print(f"bench_smoke: skipped: {exc.message}")
        return None


def plain_initrd(out: Path) -> Path:
    """busybox + an init that reboots immediately (-no-reboot turns that into QEMU exit)."""
    buf = io.BytesIO()
    w = initramfs.CpioWriter(buf)
    w.add_node("dev/console", "c", 5, 1)
    busybox = shutil.which("busybox") or "/bin/busybox"
    w.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_symlink("bin/reboot", "busybox")
    w.add_file("init", b"#!/bin/sh\necho PLAIN-INIT\nreboot -f\n", 0o755)
    w.close()
    out.write_bytes(gzip.compress(buf.getvalue(), compresslevel=1, mtime=0))
    return out


def plain_boot(kin: smoke.KernelInputs, accel: qemu.Accel, work: Path) -> tuple[float, float]:
    """(wall, QEMU CPU) seconds of a boot to an init that reboots at once, on the smoke's
    machine (qemu.MACHINE) and with its lpj= and boot knobs, so the difference is the
    smoke's own work."""
    initrd = plain_initrd(work / "plain.gz")
    log = work / "plain-serial.log"
    lpj = smoke.preset_lpj(kin.config)
    append = f"console=ttyS0 panic=-1 {qemu.GUEST_KNOBS}" + (f" lpj={lpj}" if lpj else "")
    cmd = ["qemu-system-x86_64", "-accel", qemu.accel_arg(accel, 4), "-M", qemu.MACHINE,
           *qemu.firmware_args(), "-smp", "4", "-m", "512",
           "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(kin.vmlinuz),
           "-initrd", str(initrd), "-append", append, "-serial", f"file:{log}"]
    start, cpu0 = time.monotonic(), _children_cpu()
    try:
        subprocess.run(cmd, timeout=120, check=True, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # seen once on el6 under heavy host load: say so, no traceback
        raise SystemExit(f"bench_smoke: plain boot did not end within 120 s; see {log}") from None
    elapsed = time.monotonic() - start
    if "PLAIN-INIT" not in log.read_text(errors="replace"):
        raise SystemExit(f"bench_smoke: plain boot never reached init; see {log}")
    return elapsed, _children_cpu() - cpu0


def _children_cpu() -> float:
    """CPU seconds of reaped children (QEMU; rpm2cpio and depmod are a few ms of it)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def smoke_verdict(rpm: Path, target: str, work: Path) -> tuple[float, str, dict[str, float]]:
    """(seconds, verdict, phases): host phases, the children's CPU seconds (cpu), and the
    guest's own per-check times."""
    os.environ["FSBUILD_OUT"] = str(work / "out")
    rpms = work / "rpms"
    rpms.mkdir(exist_ok=True)
    link = rpms / rpm.name
    if not link.exists():
        link.symlink_to(rpm.resolve())
    start, cpu0 = time.monotonic(), _children_cpu()
    phases: dict[str, float] = {}
    try:
        v = smoke.run(target, rpms)
        verdict, phases = v.verdict, dict(v.phases)
    except FsbuildError as exc:
        verdict = f"fail ({type(exc).__name__})"
    secs = time.monotonic() - start
    phases["cpu"] = round(_children_cpu() - cpu0, 3)
    console = work / "out" / target / "smoke-serial.log"
    text = console.read_text(errors="replace") if console.exists() else ""
    return secs, verdict, phases | guest_phases(smoke.guest_steps(text))


# The guest's checks in groups (name prefix -> group): one line each in the report.
GROUPS = (("init", "kernel_boot"), ("kernel_version", "version"), ("nic_module", "nic_modules"),
          ("igb_", "igb"), ("virtio_net", "virtio_net"), ("nic_affinity", "nic_sh"),
          ("fastsocket_load", "fs_load"), ("fastsocket_params", "fs_load"),
          ("fastsocket_demo", "demo_load"), ("demo_plain", "demo_load"),
          ("fastsocket_stats", "fs_stats"), ("fastsocket_unload", "rmmod"),
          ("nic_wait", "nic_wait"), ("nic_ready", "nic_wait"), ("dmesg_clean", "dmesg"), ("done", "dmesg"))
# Steps of the init's background NIC lanes (each from its `nic_job:<lane>` step on): timed
# on their own clocks, since the lanes run beside the fastsocket checks and the demo load.
# g:nic_wait is how long the init then still waited for them (`nic_wait` to `nic_ready`), g:nic_sh
# nic.sh and its affinity check alone.
NIC_LANES = (("nic_module:virtio", "virtio"), ("virtio_net", "virtio"), ("nic_module", "igb"), ("igb_", "igb"))


def guest_phases(steps: list[tuple[str, float]]) -> dict[str, float]:
    """Guest uptime deltas between FSSTEP lines, summed per group ('g:' prefix); a NIC
    lane's steps count from the lane's previous step, the others from the init's."""
    out: dict[str, float] = {}
    prev = {"init": 0.0, "igb": 0.0, "virtio": 0.0}
    for name, t in steps:
        if name.startswith("nic_job:"):
            prev[name.removeprefix("nic_job:")] = t
            continue
        if name.startswith(("fastsocket_demo:", "demo_plain:")):
            continue
        lane = next((ln for p, ln in NIC_LANES if name.startswith(p)), "init")
        group = next((g for p, g in GROUPS if name.startswith(p)), name.split(":")[0])
        out[f"g:{group}"] = round(out.get(f"g:{group}", 0.0) + t - prev.get(lane, 0.0), 3)
        prev[lane] = t
    return out


def print_phases(label: str, runs: list[dict[str, float]]) -> None:
    """Best (min) of each phase over the runs, host phases then guest groups."""
    names = list(dict.fromkeys(k for r in runs for k in r))
    cells = [f"{n}={min(r.get(n, float('inf')) for r in runs):.2f}" for n in names]
    print(f"{label} phases (s, best of {len(runs)}): " + " ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rpms", default=None)
    ap.add_argument("--target", default="linux-6.1")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    progress.set_quiet(True)  # only the measurements on stdout
    rpm = kernel_rpm(args)
    if rpm is None:
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        work = Path(tmp)
        kin = smoke.stage_rpm(rpm, work / "root")
        accel = qemu.probe_accel(kin.vmlinuz)
        print(f"kernel {kin.kver} from {rpm.name}; accel {qemu.accel_arg(accel, 4)} ({accel.reason}); "
              f"host load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        plain, plain_cpu, full, phases = [], [], [], []
        for i in range(args.repeat):
            wall, cpu = plain_boot(kin, accel, work)
            plain.append(wall)
            plain_cpu.append(cpu)
            secs, verdict, ph = smoke_verdict(rpm, args.target, work)
            full.append(secs)
            phases.append(ph)
            print(f"run {i + 1}: plain boot to init {wall:.2f}s (cpu {cpu:.2f}s), smoke verdict {secs:.2f}s "
                  f"(cpu {ph['cpu']:.2f}s) ({verdict})")
    p, f = min(plain), min(full)
    print(f"plain boot (best of {args.repeat}): {p:.2f}s, QEMU cpu {min(plain_cpu):.2f}s")
    print(f"smoke verdict (best of {args.repeat}): {f:.2f}s, cpu {min(ph['cpu'] for ph in phases):.2f}s")
    print_phases("smoke", phases)
    goal = 4.0 if args.target == "el6" else 4.5
    print(f"ratio smoke/plain: {f / p:.2f}x   (goal: verdict <= {goal} s, checks ~1.3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
