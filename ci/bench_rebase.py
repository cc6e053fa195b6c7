#!/usr/bin/env python3
"""Benchmark: rebase Debian's linux 6.1.170-3 patch series (~160 patches) from orig 6.1.170
onto orig 6.1.176 with `fsbuild rebase` (plain mode), against the same move done by
`git rebase` (cherry-picks with a work tree, conflicting picks skipped) in the same run.
Upstream import (hash, scan, fast-import of each 140 MB tarball) is timed separately and
cached in ~/.cache/fsbuild-bench (FSBUILD_BENCH_STATE) across runs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STATE = Path(os.environ.get("FSBUILD_BENCH_STATE", Path.home() / ".cache" / "fsbuild-bench"))
os.environ["FSBUILD_STATE"] = str(STATE)


def main() -> int:
    import pytest

    import debsrc
    from fsbuild import rebase as R
    from fsbuild import upstream
    from fsbuild.target import load
    from fsbuild.workspace import Workspace, git, read_series

    try:
        old, new = debsrc.fetch("6.1.170-3"), debsrc.fetch("6.1.176-1")
    except pytest.skip.Exception as exc:
        print(f"bench_rebase: skipped: {exc}")
        return 0
    target = load("linux-6.1")
    ws = Workspace(target, root=STATE / "rebase-plain")
    t = time.monotonic()
    ups = [upstream.resolve(target, str(s.orig_tarball)) for s in (old, new)]
    bases = [ws.import_upstream(u) for u in ups]
    t_import = time.monotonic() - t
    n = len(read_series(old.series))

    runs = []
    for _ in range(2):
        out = Path(tempfile.mkdtemp(prefix="bench-rebase-"))
        t = time.monotonic()
        results = R.plain(old.series, str(old.orig_tarball), str(new.orig_tarball), out, target)
        runs.append(time.monotonic() - t)
        shutil.rmtree(out)
    counts = {o: sum(r.outcome == o for r in results) for o in R.OUTCOMES}

    # baseline: plain git, the old series as commits rebased in a work tree
    old_commits = R.build_old(ws.root, read_series(old.series), old.series.parent, bases[0])
    wt = Path(tempfile.mkdtemp(prefix="bench-git-")) / "wt"
    git(ws.root, "worktree", "add", "-q", "--detach", str(wt), old_commits[-1])
    try:
        t = time.monotonic()
        cp = git(wt, "rebase", "-q", "--onto", bases[1], bases[0], check=False)
        skips = 0
        while (ws.root / ".git" / "worktrees" / wt.name / "rebase-merge").exists():
            git(wt, "rebase", "--skip", check=False)
            skips += 1
        t_git = time.monotonic() - t
        del cp
    finally:
        git(ws.root, "worktree", "remove", "--force", str(wt), check=False)
        shutil.rmtree(wt.parent, ignore_errors=True)

    best = min(runs)
    print(f"upstream import (2 orig tarballs, cached after first run): {t_import:.1f} s")
    print(f"fsbuild rebase, {n} patches 6.1.170 -> 6.1.176: {best:.2f} s (runs: "
          + ", ".join(f"{r:.2f}" for r in runs) + ")")
    print("  outcomes: " + " ".join(f"{o}={c}" for o, c in counts.items()))
    print(f"baseline git rebase (work tree, {skips} conflicting picks skipped): {t_git:.2f} s")
    print(f"ratio git/fsbuild: {t_git / best:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
