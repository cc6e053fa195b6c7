#!/usr/bin/env python3
"""Benchmark `fsbuild rpm`: packaging overhead against a raw `make -jN bzImage modules` of
the same tree and config (target <= 10 %), and the no-op rebuild time (target <= 2 s).

    python3 ci/bench_rpm.py [--target linux-6.1] [--jobs 2] [--keep]

The raw baseline is prepared exactly like %prep/%build (pristine tarball, series patches,
module/, mini config resolved by olddefconfig) on the filesystem fsbuild builds on (the
tmpfs it picks, else the disk); only the `make` is timed. The packaged build is
`fsbuild rpm --force` (SRPM + rpmbuild --rebuild: unpack, patch, config, make, install,
kernel-devel copy, compression), timed end to end, in a scratch out/ dir; its per-phase
seconds (build.json "phases") show where the difference goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsbuild import build, target  # noqa: E402


def sh(cmd: list[str] | str, **kw: object) -> float:
    start = time.monotonic()
    subprocess.run(cmd, check=True, shell=isinstance(cmd, str), **kw)  # type: ignore[call-overload]
    return time.monotonic() - start


def raw_tree(plan: build.Plan, work: Path) -> tuple[Path, float]:
    """Unpack + patch + module + config like the spec does; returns (tree, prep seconds)."""
    start = time.monotonic()
    up = plan.upstream
    sh(f"xz -T0 -dc {up.tarball} | tar -xf - -C {work}"  # type: ignore[attr-defined]
       if str(up.tarball).endswith(".xz") else ["tar", "-xf", str(up.tarball), "-C", str(work)])  # type: ignore[attr-defined]
    tree = work / up.topdir  # type: ignore[attr-defined]
    for p in plan.series:
        with open(p.path, "rb") as fh:
            subprocess.run(["patch", f"-p{p.strip}", "-F0", "-s", "-f", "-E"], stdin=fh, cwd=tree, check=True)
    (tree / "net" / "fastsocket").mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", "-", "-C", "net/fastsocket"], input=plan.module_tar, cwd=tree, check=True)
    subprocess.run(["sed", "-i", f"s/^EXTRAVERSION.*/EXTRAVERSION = -{plan.release}.x86_64/", "Makefile"],
                   cwd=tree, check=True)
    mk = ["make", "-s", "ARCH=x86_64", "LOCALVERSION="]
    if plan.config.base_file:
        shutil.copyfile(plan.config.base_file, tree / ".config")
    else:
        subprocess.run([*mk, str(plan.config.base_make)], cwd=tree, check=True)
    with open(tree / ".config", "ab") as fh:
        fh.write(plan.config.fragment + b'\nCONFIG_LOCALVERSION=""\n')
    subprocess.run([*mk, "olddefconfig"], cwd=tree, check=True)
    return tree, time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="linux-6.1")
    ap.add_argument("--config", default="mini")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-rpm-"))
    work: Path | None = None
    os.environ["FSBUILD_OUT"] = str(scratch / "out")
    os.environ.setdefault("FSBUILD_STATE", str(ROOT / ".fsbuild"))
    try:
        req = build.Request(target.load(args.target), config=args.config, jobs=args.jobs)
        plan = build.make_plan(req)
        ram = build.choose_scratch(plan)
        work = Path(tempfile.mkdtemp(prefix="bench-raw-", dir=ram or scratch))
        tree, prep_s = raw_tree(plan, work)
        print(f"raw tree in {work} ({'tmpfs' if ram else 'disk'}, as fsbuild rpm builds)",
              file=sys.stderr, flush=True)
        print(f"raw prep (unpack, patch, config): {prep_s:.1f} s", file=sys.stderr, flush=True)
        make_s = sh(["make", f"-j{args.jobs}", "ARCH=x86_64", "LOCALVERSION=", "bzImage", "modules"],
                    cwd=tree, stdout=subprocess.DEVNULL)
        print(f"raw make -j{args.jobs} bzImage modules: {make_s:.1f} s", file=sys.stderr, flush=True)
        shutil.rmtree(work)

        fs = [sys.executable, "-m", "fsbuild", "rpm", "--target", args.target, "--config", args.config,
              "-j", str(args.jobs), "--json"]
        rpm_s = sh([*fs, "--force"], cwd=ROOT, stdout=subprocess.DEVNULL)
        phases = json.loads((scratch / "out" / args.target / "build.json").read_text())["phases"]
        print(f"fsbuild rpm --force: {rpm_s:.1f} s; phases {phases}", file=sys.stderr, flush=True)
        noop_s = sh(fs, cwd=ROOT, stdout=subprocess.DEVNULL)
        overhead = (rpm_s - make_s) / make_s
        # The same question inside one build, free of make-to-make noise between the two runs:
        # everything fsbuild rpm spends outside its own `make bzImage modules`.
        own_make = float(phases.get("make", 0.0))
        outside = (rpm_s - own_make) / own_make if own_make else None
        result = {
            "target": args.target, "config": args.config, "jobs": args.jobs,
            "raw_prep_s": round(prep_s, 1), "raw_make_s": round(make_s, 1),
            "fsbuild_rpm_s": round(rpm_s, 1), "overhead_vs_raw_make": round(overhead, 3),
            "overhead_vs_raw_prep_plus_make": round((rpm_s - make_s - prep_s) / (make_s + prep_s), 3),
            "overhead_outside_own_make": round(outside, 3) if outside is not None else None,
            "noop_rebuild_s": round(noop_s, 2), "build_fs": "tmpfs" if ram else "disk",
            "fsbuild_phases_s": phases,
            "targets": {"overhead": 0.10, "noop_s": 2.0},
        }
        print(json.dumps(result, indent=2))
        inside = f"; {outside:.1%} outside its own make ({own_make:.0f} s)" if outside is not None else ""
        print(f"packaging overhead {overhead:.1%} vs raw make ({rpm_s:.0f} s vs {make_s:.0f} s; "
              f"raw prep {prep_s:.0f} s){inside}; no-op rebuild {noop_s:.2f} s", file=sys.stderr)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
