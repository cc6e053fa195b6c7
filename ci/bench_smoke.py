#!/usr/bin/env python3
"""Benchmark: time to a smoke verdict vs a plain `qemu -kernel … -initrd …` boot of the same
kernel to an init that reboots at once (the floor any boot test pays), same run, same
accelerator. Prints both and the ratio.

usage: ci/bench_smoke.py [--rpms DIR] [--target linux-6.1] [--repeat N]
The kernel RPM comes from --rpms, $FSBUILD_TEST_KERNEL, or out/<target>/rpms."""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsbuild import initramfs, paths, progress, qemu, smoke  # noqa: E402
from fsbuild.errors import FsbuildError  # noqa: E402


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


def plain_boot(kin: smoke.KernelInputs, accel: qemu.Accel, work: Path) -> float:
    initrd = plain_initrd(work / "plain.gz")
    log = work / "plain-serial.log"
    cmd = ["qemu-system-x86_64", "-accel", qemu.accel_arg(accel, 4), "-M", "q35", "-smp", "4", "-m", "512",
           "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(kin.vmlinuz),
           "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1", "-serial", f"file:{log}"]
    start = time.monotonic()
    subprocess.run(cmd, timeout=300, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    if "PLAIN-INIT" not in log.read_text(errors="replace"):
        raise SystemExit(f"bench_smoke: plain boot never reached init; see {log}")
    return elapsed


def smoke_verdict(rpm: Path, target: str, work: Path) -> tuple[float, str]:
    os.environ["FSBUILD_OUT"] = str(work / "out")
    rpms = work / "rpms"
    rpms.mkdir(exist_ok=True)
    link = rpms / rpm.name
    if not link.exists():
        link.symlink_to(rpm.resolve())
    start = time.monotonic()
    try:
        verdict = smoke.run(target, rpms).verdict
    except FsbuildError as exc:
        verdict = f"fail ({type(exc).__name__})"
    return time.monotonic() - start, verdict


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
        plain, full = [], []
        for i in range(args.repeat):
            plain.append(plain_boot(kin, accel, work))
            secs, verdict = smoke_verdict(rpm, args.target, work)
            full.append(secs)
            print(f"run {i + 1}: plain boot to init {plain[-1]:.2f}s, smoke verdict {secs:.2f}s ({verdict})")
    p, f = min(plain), min(full)
    print(f"plain boot (best of {args.repeat}): {p:.2f}s")
    print(f"smoke verdict (best of {args.repeat}): {f:.2f}s")
    print(f"ratio smoke/plain: {f / p:.2f}x   (target: verdict <= 15 s under TCG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
