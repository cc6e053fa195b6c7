#!/usr/bin/env python3
"""Benchmark: rebase Debian's linux 6.1.170-3 patch series (~160 patches) from orig 6.1.170
onto orig 6.1.176 with `fsbuild rebase` (plain mode).

Cold and warm, as a user runs it (the CLI; cold: an empty state, both 1.3 GB upstreams
read, only the files the series names imported; warm: the same state again), with the
per-phase seconds of its --json report and the load average, beside baselines on the
same inputs in the same run: `tar -xJf` of both orig tarballs (what any tool reading both
trees pays at least) and `quilt push -a` of the series on the
extracted old tree. Wall seconds are the min over FSBUILD_BENCH_RUNS runs (2); CPU seconds
(user+sys, children included) are printed too: on a shared, loaded machine they move less.
Then the same cold and warm runs with both upstreams as directories (the orig tarballs
extracted once, outside the timing). `--cold` stops there. Then the rebase alone (upstreams imported, cached in
~/.cache/fsbuild-bench, FSBUILD_BENCH_STATE) against the same move done by `git rebase`
(cherry-picks with a work tree, conflicting picks skipped).

First, the word-wise resolvers side by side (`--resolvers` runs only that): wiggle and the
Python `words` merge on the issue-14 case (Debian's rxrpc conn-level patch carried onto
6.1.176, judged against Debian's own refresh) and on a large synthetic file."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
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
    from fsbuild.gitio import Overlay
    from fsbuild.render import apply_patch
    from fsbuild.series import Entry
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


def _timed(argv: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess[bytes]]:  # type: ignore[no-untyped-def]
    """(wall, cpu of the child tree, result) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    cp = subprocess.run(argv, capture_output=True, **kw)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), cp


def _rebase_cli(state: Path, old, new, out: Path,  # type: ignore[no-untyped-def]
                srcs: tuple[Path, Path] | None = None) -> tuple[float, float, dict]:  # type: ignore[type-arg]
    """One `fsbuild rebase --series` run on `state`: (wall, cpu, its --json report). `srcs`:
    OLD and NEW as given (default: the two orig tarballs)."""
    report = out.parent / f"{out.name}.json"
    env = {**os.environ, "FSBUILD_STATE": str(state), "PYTHONPATH": str(ROOT)}
    src_old, src_new = srcs or (old.orig_tarball, new.orig_tarball)
    wall, cpu, cp = _timed([sys.executable, "-m", "fsbuild", "rebase", "--target", "linux-6.1",
                            "--series", str(old.series), "--from", str(src_old),
                            "--onto", str(src_new), "--out", str(out), "--json", str(report)],
                           env=env)
    if cp.returncode not in (0, 7):   # 7: conflicts remain (reported), the run itself worked
        raise RuntimeError(f"fsbuild rebase failed ({cp.returncode}): {cp.stderr.decode()[-500:]}")
    return wall, cpu, json.loads(report.read_text())


def _phases(report: dict) -> str:  # type: ignore[type-arg]
    return ", ".join(f"{k} {v:.1f}" for k, v in report.get("phase_seconds", {}).items())


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_cold_warm(old, new, runs: int) -> None:  # type: ignore[no-untyped-def]
    """Cold (fresh state) and warm (same state again) plain-mode rebases, beside tar -xJf of
    both tarballs and quilt push -a, all in this run."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    print(f"load average at start: {_load()} (on {os.cpu_count()} cores)")
    try:
        base: list[tuple[float, float]] = []
        quilt_wall, applied = [], 0
        for k in range(runs):
            trees = scratch / f"trees{k}"
            trees.mkdir()
            t = time.monotonic()
            cpu = 0.0
            for src in (old, new):
                _, c, cp = _timed(["tar", "-xJf", str(src.orig_tarball), "-C", str(trees)])
                cpu += c
                assert cp.returncode == 0, cp.stderr
            base.append((time.monotonic() - t, cpu))
            old_tree = trees / f"linux-{old.version.split('-')[0]}"
            w, _, cp = _timed(["quilt", "push", "-a", "-q"], cwd=old_tree,
                              env={**os.environ, "QUILT_PATCHES": str(old.series.parent), "QUILT_PC": ".pc"})
            quilt_wall.append(w)
            applied = sum(1 for line in cp.stdout.decode(errors="replace").splitlines()
                          if line.startswith("Applying patch"))
            subprocess.run(["rm", "-rf", str(trees)], check=True)   # 160k files: rm beats rmtree
        colds, warms = _cold_warm(scratch, old, new, runs, None)
        n = len(colds[0][2]["patches"])
        b_wall, b_cpu = min(base)
        cold, warm = min(colds, key=lambda r: r[0]), min(warms, key=lambda r: r[0])
        print(f"baseline tar -xJf of both orig tarballs: {b_wall:.1f} s wall, {b_cpu:.1f} s cpu (min of {runs})")
        print(f"baseline quilt push -a ({applied} patches on the extracted 6.1.170): {min(quilt_wall):.1f} s")
        print(f"fsbuild rebase cold, {n} patches, both upstreams read: {cold[0]:.1f} s wall, "
              f"{cold[1]:.1f} s cpu  [{_phases(cold[2])}]  (runs: " + ", ".join(f"{r[0]:.1f}" for r in colds) + ")")
        print(f"fsbuild rebase warm: {warm[0]:.1f} s wall, {warm[1]:.1f} s cpu  [{_phases(warm[2])}]  (runs: "
              + ", ".join(f"{r[0]:.1f}" for r in warms) + ")")
        print(f"min cpu: cold {min(r[1] for r in colds):.1f} s, warm {min(r[1] for r in warms):.1f} s, "
              f"tar -xJf {min(b[1] for b in base):.1f} s")
        print(f"ratio cold/tar -xJf: {cold[0] / b_wall:.2f}x wall, {cold[1] / b_cpu:.2f}x cpu "
              "(goal: cold <= 30 s, warm <= 5 s wall on an idle 2-core machine)")
        _bench_dirs(scratch, old, new, runs)
        print(f"load average at end: {_load()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cold_warm(scratch: Path, old, new, runs: int,  # type: ignore[no-untyped-def]
               srcs: tuple[Path, Path] | None) -> tuple[list, list]:  # type: ignore[type-arg]
    """`runs` pairs of a cold run (fresh state) and a warm one (that state again)."""
    colds, warms = [], []
    for k in range(runs):
        state = scratch / f"state{k}"
        colds.append(_rebase_cli(state, old, new, scratch / f"cold{k}", srcs))
        warms.append(_rebase_cli(state, old, new, scratch / f"warm{k}", srcs))
        subprocess.run(["rm", "-rf", str(state)], check=True)
    return colds, warms


def _bench_dirs(scratch: Path, old, new, runs: int) -> None:  # type: ignore[no-untyped-def]
    """The same cold and warm runs with OLD and NEW as directories: both orig tarballs
    extracted once, outside the timing (and left 2 s to settle: a tree changed within the
    last 2 s is not indexed by its stat signature, see upstream.RACY_NS)."""
    trees = scratch / "dirs"
    trees.mkdir()
    for src in (old, new):
        subprocess.run(["tar", "-xJf", str(src.orig_tarball), "-C", str(trees)], check=True)
    dirs = tuple(trees / f"linux-{s.version.split('-')[0]}" for s in (old, new))
    time.sleep(2.5)
    try:
        colds, warms = _cold_warm(scratch, old, new, runs, dirs)  # type: ignore[arg-type]
    finally:
        subprocess.run(["rm", "-rf", str(trees)], check=True)
    cold, warm = min(colds, key=lambda r: r[0]), min(warms, key=lambda r: r[0])
    print(f"fsbuild rebase cold from directories: {cold[0]:.1f} s wall, {cold[1]:.1f} s cpu  "
          f"[{_phases(cold[2])}]  (runs: " + ", ".join(f"{r[0]:.1f}" for r in colds) + ")")
    print(f"fsbuild rebase warm from directories: {warm[0]:.1f} s wall, {warm[1]:.1f} s cpu  "
          f"[{_phases(warm[2])}]  (runs: " + ", ".join(f"{r[0]:.1f}" for r in warms) + ")")
    print(f"min cpu from directories: cold {min(r[1] for r in colds):.1f} s, warm {min(r[1] for r in warms):.1f} s")


def main() -> int:
    import debsrc
    import pytest

    from fsbuild import rebase as R
    from fsbuild import upstream
    from fsbuild.gitio import git
    from fsbuild.series import read_series
    from fsbuild.target import load
    from fsbuild.workspace import Workspace

    try:
        old, new = debsrc.fetch("6.1.170-3"), debsrc.fetch("6.1.176-1")
    except pytest.skip.Exception as exc:
        print(f"bench_rebase: skipped: {exc}")
        return 0
    bench_resolvers(old, new)
    if "--resolvers" in sys.argv[1:]:
        return 0
    bench_cold_warm(old, new, int(os.environ.get("FSBUILD_BENCH_RUNS", "2")))
    if "--cold" in sys.argv[1:]:
        return 0
    target = load("linux-6.1")
    ws = Workspace(target, root=STATE / "rebase-plain")
    ups = [upstream.resolve(target, str(s.orig_tarball)) for s in (old, new)]
    bases = [ws.import_upstream(u) for u in ups]
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
    print(f"fsbuild rebase, {n} patches 6.1.170 -> 6.1.176: {best:.2f} s (runs: "
          + ", ".join(f"{r:.2f}" for r in runs) + ")")
    print("  outcomes: " + " ".join(f"{o}={c}" for o, c in counts.items()))
    print(f"baseline git rebase (work tree, {skips} conflicting picks skipped): {t_git:.2f} s")
    print(f"ratio git/fsbuild: {t_git / best:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
