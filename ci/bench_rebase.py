#!/usr/bin/env python3
"""Benchmark: rebase Debian's linux 6.1.170-3 patch series (~160 patches) from orig 6.1.170
onto orig 6.1.176 with `fsbuild rebase` (plain mode), against the same move done by
`git rebase` (cherry-picks with a work tree, conflicting picks skipped) in the same run.
Upstream import (hash, scan, fast-import of each 140 MB tarball) is timed separately and
cached in ~/.cache/fsbuild-bench (FSBUILD_BENCH_STATE) across runs.

First, the word-wise resolvers side by side (`--resolvers` runs only that): wiggle and the
Python `words` merge on the issue-14 case (Debian's rxrpc conn-level patch carried onto
6.1.176, judged against Debian's own refresh) and on a large synthetic file."""

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


RXRPC = ["rxrpc-input-Open-code-skb_unshare.patch", "rxrpc-Fix-conn-level-packet-handling-to-unshare-RESP.patch",
         "rxrpc-Also-unshare-DATA-RESPONSE-packets-when-paged-.patch"]
RXRPC_FILES = ["net/rxrpc/conn_event.c", "net/rxrpc/input.c"]


def _orig_reader(tarball: Path, dest: Path):  # type: ignore[no-untyped-def]
    import subprocess
    if not all((dest / f).is_file() for f in RXRPC_FILES):
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xJf", str(tarball), "-C", str(dest), "--strip-components=1", "--wildcards",
                        *(f"*/{f}" for f in RXRPC_FILES)], check=True)
    return lambda p: ((dest / p).read_bytes(), 0o100644) if (dest / p).is_file() else None


def _best(fn, n: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.monotonic()
        fn()
        times.append(time.monotonic() - t)
    return min(times)


def bench_resolvers(old, new) -> None:  # type: ignore[no-untyped-def]
    """Correctness and time of each word-wise resolver, on the real case and a large file."""
    import shutil as sh

    from fsbuild import rebase as R
    from fsbuild import resolve as RS
    from fsbuild.workspace import Entry, Overlay, apply_patch
    old_up = Overlay(_orig_reader(old.orig_tarball, STATE / "rxrpc" / old.version))
    new_up = _orig_reader(new.orig_tarball, STATE / "rxrpc" / new.version)
    debian = Overlay(new_up)
    olds = []
    for name in RXRPC:
        data = (old.series.parent / "bugfix" / "all" / name).read_bytes()
        applied = apply_patch(data, name, 1, old_up, fuzz=2)
        olds.append(R.OldPatch(Entry(name, 1), data, {p: old_up(p) for p in applied.changes}, dict(applied.changes)))
        old_up.update(applied.changes)
        debian.update(apply_patch((new.series.parent / "bugfix" / "all" / name).read_bytes(), name, 1, debian).changes)
    # a large file: 20k lines, upstream rewords the line above each of 50 patched lines
    big = b"".join(b"\tfield_%d = compute(arg, %d);\n" % (i, i) for i in range(20000))
    patched, upstream = big, big
    for k in range(100, 20000, 400):
        patched = patched.replace(b"field_%d =" % k, b"field_%d +=" % k, 1)
        upstream = upstream.replace(b"compute(arg, %d)" % (k - 1), b"compute(argp, %d)" % (k - 1), 1)
    chosen = RS.backend
    for how in ("wiggle", "words"):
        if how == "wiggle" and not sh.which("wiggle"):
            print("resolver wiggle: not installed (apt-get install wiggle)")
            continue
        RS.backend = lambda how=how: how  # type: ignore[assignment]

        def carry_all() -> Overlay:
            tree = Overlay(new_up)
            for o in olds:
                tree.update(R.carry(o, tree, new.version)[1])
            return tree
        tree = carry_all()
        same = all(tree(f) == debian(f) for f in RXRPC_FILES)
        t_real = _best(carry_all)
        out = RS.MERGERS[how](big, upstream, patched)
        ok_big = out is not None and RS.changed_lines(big, patched) == RS.changed_lines(upstream, out)
        t_big = _best(lambda how=how: RS.MERGERS[how](big, upstream, patched), 3)
        print(f"resolver {how}: rxrpc 3 patches {t_real:.3f} s, identical to Debian's refresh: {same}; "
              f"20k-line file, 50 hunks: {t_big:.3f} s, intent kept: {ok_big}")
    RS.backend = chosen  # type: ignore[assignment]


def main() -> int:
    import debsrc
    import pytest

    from fsbuild import rebase as R
    from fsbuild import upstream
    from fsbuild.target import load
    from fsbuild.workspace import Workspace, git, read_series

    try:
        old, new = debsrc.fetch("6.1.170-3"), debsrc.fetch("6.1.176-1")
    except pytest.skip.Exception as exc:
        print(f"bench_rebase: skipped: {exc}")
        return 0
    bench_resolvers(old, new)
    if "--resolvers" in sys.argv[1:]:
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
