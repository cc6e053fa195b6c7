#!/usr/bin/env python3
"""Benchmark: apply Debian's linux 6.1 series (orig tarball + debian/patches/series) with
`fsbuild apply` and with `quilt push -a` on fresh trees in the same run, check the trees are
identical, print both times and the ratio (target: fsbuild at least 5x faster).
Extraction time is excluded. Usage: python3 ci/bench_apply.py [VERSION]"""

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
    base = Path(os.environ.get("FSBUILD_BENCH_TMP", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(dir=base, prefix="bench_apply.") as tmp:
        ours = debsrc.extract_orig(src, Path(tmp, "ours"))
        theirs = debsrc.extract_orig(src, Path(tmp, "theirs"))
        subprocess.run(["sync"], check=False)
        t_ours = timed([sys.executable, "-m", "fsbuild", "apply", "--series", str(src.series),
                        str(ours)])
        env = {**os.environ, "QUILT_PATCHES": str(src.series.parent),
               "QUILT_PC": str(Path(tmp, "pc")), "QUILT_PATCH_OPTS": ""}
        t_quilt = timed(["quilt", "push", "-a", "--fuzz=0", "-q"], cwd=theirs, env=env)
        same = subprocess.run(["diff", "-rq", "--no-dereference", str(ours), str(theirs)],
                              capture_output=True).returncode == 0
        shutil.rmtree(Path(tmp, "pc"), ignore_errors=True)
    print(f"series: Debian linux {version}, {n} patches")
    print(f"fsbuild apply : {t_ours:7.2f} s")
    print(f"quilt push -a : {t_quilt:7.2f} s")
    print(f"ratio         : {t_quilt / t_ours:7.1f}x faster (target >= 5x)")
    print(f"identical     : {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
