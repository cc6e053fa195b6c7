#!/usr/bin/env python3
"""Benchmark: apply Debian's linux 6.1 series (orig tarball + debian/patches/series) with
`fsbuild apply` and with `quilt push -a` on fresh trees in the same run, check the trees are
identical, print both times and the ratio (target: fsbuild at least 5x faster).
Extraction and tree copies are excluded; each tool runs FSBUILD_BENCH_ROUNDS (3) times on
fresh trees, interleaved, and the best time of each is compared.

Then one large patch (issue 12.14: 640k hunks, ~41 MB; FSBUILD_BENCH_HUNKS) on one file with
`fsbuild apply` and GNU `patch -p1`, FSBUILD_BENCH_ROUNDS times interleaved: the best wall
time, CPU time and peak RSS of each, the ratios (target: within 2x of GNU patch) and whether
the results are identical; then the floor any CPython run pays (interpreter + imports, one
bare loop over the lines, the file and its result held), measured the same way, against
GNU's figures, and the CPU time of apply's two phases in this process (parse, place/build).
Usage: python3 ci/bench_apply.py [VERSION]"""

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


def measured(cmd: list[str], cwd: Path, stdin: Path | None = None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds (user + system), peak RSS in KiB) of one command. GNU time
    reports the RSS of its own small child: a child forked from this Python would start
    with our RSS as its peak. CPU time is the steadier figure on a shared machine."""
    gnu_time = shutil.which("time") or "/usr/bin/time"
    if not Path(gnu_time).exists():
        sys.exit("bench_apply: GNU time missing (apt-get install time; make deps)")
    start = time.perf_counter()
    with open(stdin or os.devnull, "rb") as fin:
        proc = subprocess.run([gnu_time, "-f", "maxrss=%M cpu=%U+%S", *cmd], cwd=cwd,
                              stdin=fin, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    rss, cpu = proc.stderr.rsplit("maxrss=", 1)[1].split()[:2]
    user, system = cpu.removeprefix("cpu=").split("+")
    return elapsed, float(user) + float(system), int(rss)


def write_large_case(root: Path, hunks: int) -> tuple[Path, Path]:
    """A file and a unified diff changing one line in every 5, one line of context each side."""
    stride = 5
    (root / "tree").mkdir(parents=True)
    with open(root / "tree" / "big.txt", "wb") as fh:
        fh.write(b"".join(b"%07x\n" % k for k in range(hunks * stride + stride)))
    series = root / "patches"
    series.mkdir()
    with open(series / "big.patch", "wb") as fh:
        fh.write(b"--- a/big.txt\n+++ b/big.txt\n")
        for h in range(hunks):
            first = h * stride + 2  # 1-based line of the leading context
            fh.write(b"@@ -%d,3 +%d,3 @@\n %07x\n-%07x\n+%07X\n %07x\n"
                     % (first, first, first - 1, first, first, first + 1))
    (series / "series").write_text("big.patch\n")
    return root / "tree", series / "series"


def large_patch() -> bool:
    hunks = int(os.environ.get("FSBUILD_BENCH_HUNKS", "640000"))
    rounds = int(os.environ.get("FSBUILD_BENCH_ROUNDS", "3"))
    base = Path(os.environ.get("FSBUILD_BENCH_TMP", tempfile.gettempdir()))
    ours: list[tuple[float, float, int]] = []
    gnu: list[tuple[float, float, int]] = []
    same = True
    with tempfile.TemporaryDirectory(dir=base, prefix="bench_large.") as tmp:
        tree, series = write_large_case(Path(tmp), hunks)
        size = (series.parent / "big.patch").stat().st_size
        pristine = Path(tmp, "pristine")
        subprocess.run(["cp", "-a", str(tree), str(pristine)], check=True)
        for r in range(rounds):  # interleaved on fresh trees: both see the same load
            mine, theirs = Path(tmp, f"ours{r}"), Path(tmp, f"gnu{r}")
            subprocess.run(["cp", "-a", str(pristine), str(mine)], check=True)
            subprocess.run(["cp", "-a", str(pristine), str(theirs)], check=True)
            ours.append(measured([sys.executable, "-m", "fsbuild", "apply", "--series",
                                  str(series), str(mine)], cwd=ROOT))
            gnu.append(measured(["patch", "-p1", "-s", "-f", "--no-backup-if-mismatch"],
                                cwd=theirs, stdin=series.parent / "big.patch"))
            same = same and (mine / "big.txt").read_bytes() == (theirs / "big.txt").read_bytes()
            shutil.rmtree(mine)
            shutil.rmtree(theirs)
    (t_ours, c_ours, m_ours), (t_gnu, c_gnu, m_gnu) = _best(ours), _best(gnu)
    print(f"large patch   : {size / 1e6:.0f} MB, {hunks} hunks on one file (best of {rounds})")
    print(f"fsbuild apply : {t_ours:7.2f} s wall, {c_ours:6.2f} s CPU, peak RSS "
          f"{m_ours / 1024:5.0f} MiB")
    print(f"GNU patch     : {t_gnu:7.2f} s wall, {c_gnu:6.2f} s CPU, peak RSS "
          f"{m_gnu / 1024:5.0f} MiB")
    print(f"ratio         : time {t_ours / t_gnu:5.1f}x wall, {c_ours / max(c_gnu, 0.01):5.1f}x CPU, "
          f"memory {m_ours / max(m_gnu, 1):5.1f}x of GNU patch (target <= 2x)")
    print(f"identical     : {'yes' if same else 'NO'}")
    _floors(c_gnu, m_gnu, hunks)
    _phases(hunks, rounds)
    return same


def _best(runs: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """The least of each figure over the rounds (load from elsewhere only adds)."""
    return min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)


# What any CPython implementation pays before doing the work, measured like the runs above:
# the interpreter with `fsbuild apply`'s imports, and one bare Python loop over every line of
# the patch and of the file (what a line-by-line applier like GNU's would cost in Python).
_IMPORTS = "import fsbuild.commands.apply"
_LINES = ("import sys\n"
          "for name in sys.argv[1:]:\n"
          "    with open(name, 'rb') as fh:\n"
          "        for line in fh:\n"
          "            pass\n")


def _floors(c_gnu: float, m_gnu: int, hunks: int) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("FSBUILD_BENCH_TMP")) as tmp:
        tree, series = write_large_case(Path(tmp), hunks)
        _, c_imp, m_imp = measured([sys.executable, "-c", _IMPORTS], cwd=ROOT)
        _, c_loop, _ = measured([sys.executable, "-c", _LINES, str(series.parent / "big.patch"),
                                 str(tree / "big.txt")], cwd=ROOT)
        # The patch is read back in blocks (fsbuild.patch.read_patch); the file and its
        # result are held whole (the series' later patches may patch the result again).
        held = 2 * (tree / "big.txt").stat().st_size
    print(f"floor (CPU)   : {c_imp:6.2f} s interpreter + imports, {c_loop:6.2f} s a bare Python "
          f"loop over the lines ({(c_imp + c_loop) / max(c_gnu, 0.01):4.1f}x GNU's CPU)")
    print(f"floor (memory): {m_imp / 1024:5.0f} MiB interpreter + imports, + {held / 2**20:4.0f} MiB "
          f"file and result held at once = {(m_imp * 1024 + held) / 2**20 / max(m_gnu / 1024, 1):4.1f}x "
          "GNU's peak RSS")


def _phases(hunks: int, rounds: int) -> None:
    """CPU seconds (best of rounds) of reading + parsing the patch and of applying its hunks
    to the file in memory: where apply's time goes, without interpreter start or writing."""
    from fsbuild.patch import apply_hunks, read_patch
    best = [float("inf"), float("inf")]
    with tempfile.TemporaryDirectory(dir=os.environ.get("FSBUILD_BENCH_TMP")) as tmp:
        tree, series = write_large_case(Path(tmp), hunks)
        data = (tree / "big.txt").read_bytes()
        for _ in range(rounds):
            start = time.process_time()
            patch = read_patch(series.parent / "big.patch", "big.patch")
            parsed = time.process_time()
            apply_hunks(data, patch.files[0].hunks, 0, "big.txt")
            done = time.process_time()
            best = [min(best[0], parsed - start), min(best[1], done - parsed)]
            del patch
    print(f"phases (CPU)  : {best[0]:6.2f} s read + parse, {best[1]:6.2f} s place hunks + build "
          "the result (in process, best of each)")


def main() -> int:
    version = sys.argv[1] if len(sys.argv) > 1 else "6.1.176-1"
    large_ok = large_patch()
    try:
        src = debsrc.fetch(version)
    except BaseException as exc:  # pytest.skip raises a BaseException subclass
        print(f"bench_apply: Debian series skipped: {exc}")
        return 0 if large_ok else 1
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
            # the copies' metadata (80k links each) is set-up, not either tool's work: written
            # out now, it is not charged to fsbuild's durable commit (syncfs for > 256 files)
            os.sync()
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
    return 0 if same and large_ok else 1


if __name__ == "__main__":
    sys.exit(main())
