#!/usr/bin/env python3
"""Benchmark the compile farm's overhead: fastsocket.ko built against a kernel-devel locally
and through two distccd hosts in private network namespaces on this machine (root).

    python3 ci/bench_farm.py [--rpms out/linux-6.1/rpms] [--runs 3] [--hosts 2]

Every host is this machine, so there is no speed-up to expect: the ratio is what the engine
costs (local preprocessing, shipping, the daemons). distccd's per-job times (its own log)
are the per-object compile time a real farm host would need; with them the closing line
estimates a build of OBJECTS objects on N hosts of S slots (compile time only; preprocessing,
linking and modpost stay on the builder).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fsbuild import farm  # noqa: E402


def kernel_devel(rpms: Path, work: Path) -> Path:
    """/usr/src/kernels/KVER of the kernel-devel RPM, unpacked (no install needed)."""
    rpm = next(iter(sorted(rpms.glob("kernel-devel-*.rpm"))), None)
    if rpm is None:
        raise SystemExit(f"bench_farm: no kernel-devel RPM in {rpms} (fsbuild rpm --target linux-6.1 first)")
    subprocess.run(f"rpm2cpio {rpm} | cpio -idm --quiet", shell=True, cwd=work, check=True)
    return next((work / "usr" / "src" / "kernels").iterdir())


def build_once(kdir: Path, src: Path, cc: list[str], env: dict[str, str], jobs: int) -> float:
    make = ["make", "-C", str(kdir), f"M={src}", *cc]
    subprocess.run([*make, "clean"], env=env, check=True, capture_output=True)
    start = time.monotonic()
    subprocess.run([*make, f"-j{jobs}", "modules"], env=env, check=True, capture_output=True)
    return time.monotonic() - start


def job_ms(log: Path) -> list[int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(m) for m in re.findall(r"COMPILE_OK .*? time:(\d+)ms", text)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpms", type=Path, default=ROOT / "out" / "linux-6.1" / "rpms")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--objects", type=int, default=30000,
                    help="objects of the build to estimate (a build.log has one `  CC` line each)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("distccd"):
        print("bench_farm: skipped (needs root for network namespaces and distccd: make deps)")
        return 0
    from test_farm import Distccd, Farmnet  # the tests' farm: namespaces on a bridge

    work = Path(tempfile.mkdtemp(prefix="fsbuild-bench-farm-"))
    net = Farmnet()
    daemons: list[Distccd] = []
    try:
        kdir = kernel_devel(args.rpms, work)
        src = work / "module"
        shutil.copytree(ROOT / "module", src, ignore=shutil.ignore_patterns("tests"))
        for n in range(args.hosts):
            ns, addr = net.host(11 + n)
            daemons.append(Distccd(addr, netns=ns))
        f = farm.resolve(" ".join(f"{d.addr}/2" for d in daemons), False)
        assert f is not None
        base = {**os.environ, "LC_ALL": "C"}
        local = [build_once(kdir, src, [], base, 2) for _ in range(args.runs)]
        remote = [build_once(kdir, src, [f"CC={f.cc}"], {**base, **f.env}, f.jobs) for _ in range(args.runs)]
        ms = [t for d in daemons for t in job_ms(d.log)]
        lo, fa = statistics.median(local), statistics.median(remote)
        print(f"fastsocket.ko: local -j2 {lo:.2f} s, farm ({f.where}) -j{f.jobs} {fa:.2f} s: "
              f"x{fa / lo:.2f} (engine overhead on one host)")
        if ms:
            per = statistics.median(ms) / 1000
            print(f"distccd per-job compile: median {per:.2f} s over {len(ms)} jobs")
            for hosts in (1, 4, 16):
                print(f"estimate: {args.objects} objects on {hosts} host(s) x 8 slots: "
                      f"{args.objects * per / (hosts * 8) / 60:.1f} min of compile")
    finally:
        for d in daemons:
            d.stop()
        net.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
