#!/usr/bin/env python3
"""Benchmark: apply Debian's linux 6.1 series (orig tarball + debian/patches/series) with
`fsbuild apply` and with `quilt push -a` on fresh trees in the same run, check the trees are
identical, print both times and the ratio (target: fsbuild at least 5x faster).
Extraction and tree copies are excluded; each tool runs FSBUILD_BENCH_ROUNDS (3) times on
fresh trees, interleaved, and the best time of each is compared. Usage: python3 ci/bench_apply.py [VERSION]"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import debsrc  # noqa: E402


def timed(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    return elapsed


def main() -> int:
    version = sys.argv[1] if len(sys.argv) > 1 else "6.1.176-1"
    try:
        src = debsrc.fetch(version)
    except BaseException as exc:  # pytest.skip raises a BaseException subclass
        print(f"bench_apply: skipped: {exc}")
        return 0
    n = sum(1 for line in src.series.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#"))
    rounds = int(os.environ.get("FSBUILD_BENCH_ROUNDS", "3"))
    base = Path(os.environ.get("FSBUILD_BENCH_TMP", tempfile.gettempdir()))
    times: dict[str, list[float]] = {"fsbuild": [], "quilt": []}
    with tempfile.TemporaryDirectory(dir=base, prefix="bench_apply.") as tmp:
        pristine = debsrc.extract_orig(src, Path(tmp, "pristine"))
        for r in range(rounds):
            # Hard-link copies are cheap fresh trees: both tools replace a file by writing a
            # new one and renaming it, so the pristine tree is never modified.
            ours, theirs = Path(tmp, f"ours{r}"), Path(tmp, f"theirs{r}")
            subprocess.run(["cp", "-al", str(pristine), str(ours)], check=True)
            subprocess.run(["cp", "-al", str(pristine), str(theirs)], check=True)
            times["fsbuild"].append(timed([sys.executable, "-m", "fsbuild", "apply", "--series",
                                           str(src.series), str(ours)]))
            env = {**os.environ, "QUILT_PATCHES": str(src.series.parent),
                   "QUILT_PC": str(Path(tmp, f"pc{r}")), "QUILT_PATCH_OPTS": ""}
            times["quilt"].append(timed(["quilt", "push", "-a", "--fuzz=0", "-q"], cwd=theirs,
                                        env=env))
            same = subprocess.run(["diff", "-rq", "--no-dereference", str(ours), str(theirs)],
                                  capture_output=True).returncode == 0
            if not same:
                break
            shutil.rmtree(ours)
            shutil.rmtree(theirs)
    t_ours, t_quilt = min(times["fsbuild"]), min(times["quilt"])
    print(f"series: Debian linux {version}, {n} patches")
    print(f"fsbuild apply : {t_ours:7.2f} s (best of {len(times['fsbuild'])}: "
          f"{', '.join(f'{t:.2f}' for t in times['fsbuild'])})")
    print(f"quilt push -a : {t_quilt:7.2f} s (best of {len(times['quilt'])}: "
          f"{', '.join(f'{t:.2f}' for t in times['quilt'])})")
    print(f"ratio         : {t_quilt / t_ours:7.1f}x faster (target >= 5x)")
    print(f"identical     : {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
