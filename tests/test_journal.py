"""The apply journal (fsbuild/journal.py) and the per-tree lock: a run killed at any
moment (SIGKILL, SIGTERM, SIGHUP) is rolled back to the exact original tree by
`fsbuild apply --recover TREE` or by the next apply; two applies never run at once."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsbuild import journal
from fsbuild.errors import LockHeldError, RecoveryError, RunInterruptedError
from fsbuild.series import apply_series, parse_series

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- helpers


def tree_hash(root: Path) -> str:
    """Every entry under root: path, kind, permission bits, content or link target."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = os.lstat(p)
            h.update(f"{p.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def fsbuild(*args: str | Path, **kw: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "fsbuild", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = fsbuild(*args)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _body(rel: str, i: int) -> bytes:
    return b"".join(b"%s line %d\n" % (rel.encode(), k) for k in range(8)) + b"%d\n" % i


def generate(base: Path, n_patches: int, n_files: int, seed: int) -> tuple[Path, Path]:
    """A tree of n_files files and a series of n_patches patches that edit (4 files each,
    some with a mode change), create files in new directories, and delete files (some
    the last of their directory, which GNU patch then removes)."""
    rng = random.Random(seed)
    tree, pdir = base / "tree", base / "patches"
    files = [f"d{i // 50:03d}/f{i % 50:02d}.c" for i in range(n_files - n_patches // 10)]
    solos = [f"solo/s{i:03d}/only.txt" for i in range(n_patches // 10)]
    for i, rel in enumerate(files + solos):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(_body(rel, i))
        os.chmod(tree / rel, 0o755 if i % 7 == 0 else 0o644)
    rng.shuffle(files)
    pdir.mkdir(parents=True)
    names = []
    for p in range(n_patches):
        diffs = [_edit(rel, chmod=k == 0 and p % 3 == 0)
                 for k, rel in enumerate(files[p * 4:p * 4 + 4])]
        if p % 4 == 0:
            diffs.append(_create(f"new/n{p:04d}/added.c"))
        if p % 10 == 0:
            diffs.append(_delete(tree, solos[p // 10]))
        names.append(f"{p:04d}-change.patch")
        (pdir / names[-1]).write_bytes(b"".join(diffs))
    (pdir / "series").write_text("".join(f"{n}\n" for n in names))
    return tree, pdir / "series"


def _edit(rel: str, chmod: bool) -> bytes:
    head = f"diff --git a/{rel} b/{rel}\n".encode()
    if chmod:
        head += b"old mode 100644\nnew mode 100600\n"
    return (head + f"--- a/{rel}\n+++ b/{rel}\n@@ -3,3 +3,3 @@\n".encode()
            + b" %s line 2\n-%s line 3\n+%s LINE 3\n %s line 4\n"
            % (rel.encode(), rel.encode(), rel.encode(), rel.encode()))


def _create(rel: str) -> bytes:
    return f"--- /dev/null\n+++ b/{rel}\n@@ -0,0 +1,2 @@\n+new\n+{rel}\n".encode()


def _delete(tree: Path, rel: str) -> bytes:
    lines = (tree / rel).read_bytes().splitlines(keepends=True)
    return (f"--- a/{rel}\n+++ /dev/null\n@@ -1,{len(lines)} +0,0 @@\n".encode()
            + b"".join(b"-" + line for line in lines))


def jfile(tree: Path) -> Path:
    return tree / journal.JOURNAL / journal.MANIFEST


def killed_at(tree: Path, series: Path, step: str, count: int) -> subprocess.CompletedProcess[str]:
    """Run apply_series in a child that SIGKILLs itself at the count-th `step` (a
    deterministic stand-in for a kill or power cut at that point)."""
    code = ("import os, signal, sys\n"
            "from fsbuild.series import apply_series, parse_series\n"
            "seen = []\n"
            "def hook(step):\n"
            f"    seen.append(step)\n"
            f"    if seen.count({step!r}) == {count}:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "apply_series(parse_series(sys.argv[1]), sys.argv[2], hook=hook)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, str(series), str(tree)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmpfs when there is one: the trials test the logic, and a shared disk (discard,
    other jobs) would make each run many times slower without testing more."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="fsbuild-journal-", dir=shm))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def small(scratch: Path) -> tuple[Path, Path, str]:
    tree, series = generate(scratch, 20, 120, seed=7)
    return tree, series, tree_hash(tree)


@pytest.mark.parametrize("step, count", [("staged", 1), ("staged", 40), ("replaced", 1),
                                         ("replaced", 45), ("replaced", 86)])
def test_recover_after_sigkill(small: tuple[Path, Path, str], step: str, count: int) -> None:
    tree, series, original = small
    proc = killed_at(tree, series, step, count)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert jfile(tree).is_file()
    assert tree_hash(tree) != original or step == "staged"  # the journal itself differs
    rec = run("apply", "--recover", tree)
    assert rec.returncode == 0, rec.stderr
    assert rec.stderr.strip().splitlines() == [
        f"fsbuild: recovered {tree} from an interrupted apply "
        f"({count if step == 'replaced' else 0} paths restored)"]
    assert tree_hash(tree) == original  # no journal, no temp files, same modes and bytes
    again = run("apply", "--recover", tree)
    assert again.returncode == 0 and "nothing to recover" in again.stderr


def test_next_apply_recovers_first(small: tuple[Path, Path, str], tmp_path: Path) -> None:
    tree, series, _original = small
    clean = tmp_path / "clean"
    shutil.copytree(tree, clean, symlinks=True)
    assert run("apply", "--series", series, clean).returncode == 0
    assert killed_at(tree, series, "replaced", 30).returncode == -signal.SIGKILL
    dry = run("apply", "--series", series, "--dry-run", tree)  # writes nothing, so refuses
    assert dry.returncode == RecoveryError.exit_code and "--recover" in dry.stderr
    proc = run("apply", "--series", series, tree)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == (f"fsbuild: recovered {tree} from an interrupted "
                                           "apply (30 paths restored)")
    assert tree_hash(tree) == tree_hash(clean)


def test_interrupted_recovery_is_resumed(small: tuple[Path, Path, str]) -> None:
    tree, series, original = small
    assert killed_at(tree, series, "replaced", 60).returncode == -signal.SIGKILL
    manifest = json.loads(jfile(tree).read_text())
    # Replay the first half of a recovery by hand, as if it was killed there.
    for i, entry in enumerate(manifest["files"][:30]):
        saved = tree / journal.JOURNAL / "orig" / str(i)
        if entry["orig"] == "saved":
            os.replace(saved, tree / entry["path"])
    assert journal.recover(tree) is not None
    assert tree_hash(tree) == original


@pytest.mark.parametrize("leftover", [journal.PREPARING, journal.FINISHED])
def test_leftovers_are_discarded(small: tuple[Path, Path, str], leftover: str) -> None:
    """Killed while the journal was prepared (tree untouched) or removed (tree whole)."""
    tree, _series, original = small
    (tree / leftover / "orig").mkdir(parents=True)
    (tree / leftover / "orig" / "0").write_bytes(b"x")
    proc = run("apply", "--recover", tree)
    assert proc.returncode == 0 and "removed the leftovers" in proc.stderr
    assert tree_hash(tree) == original


def test_journal_without_manifest_is_refused(small: tuple[Path, Path, str]) -> None:
    tree, _series, _original = small
    (tree / journal.JOURNAL / "orig").mkdir(parents=True)  # no state of ours looks like this
    with pytest.raises(RecoveryError, match="neither a manifest nor a completion mark"):
        journal.recover(tree)


def test_kill_past_commit_point_keeps_new_tree(small: tuple[Path, Path, str],
                                               tmp_path: Path, monkeypatch) -> None:
    """A complete run whose journal cannot be removed (as if killed right after the
    commit point) is kept, and the error says so rather than "restored"."""
    tree, series, _original = small
    clean = tmp_path / "clean"
    shutil.copytree(tree, clean, symlinks=True)
    assert run("apply", "--series", series, clean).returncode == 0

    def fails(self: journal.Journal) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(journal.Journal, "remove", fails)
    with pytest.raises(RecoveryError, match="is fully patched, but its journal"):
        apply_series(parse_series(series), tree)
    monkeypatch.undo()
    assert (tree / journal.JOURNAL / journal.COMPLETE).is_file()
    proc = run("apply", "--recover", tree)
    assert proc.returncode == 0 and "had written every file; kept it" in proc.stderr
    assert tree_hash(tree) == tree_hash(clean)


def test_corrupt_manifest_is_one_line_error(small: tuple[Path, Path, str]) -> None:
    tree, _series, _ = small
    (tree / journal.JOURNAL).mkdir()
    jfile(tree).write_text("{trunc")
    proc = run("apply", "--recover", tree)
    assert proc.returncode == RecoveryError.exit_code
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fsbuild: error: ")


def test_patch_into_journal_dir_refused(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    pdir = tmp_path / "p"
    pdir.mkdir()
    (pdir / "1.patch").write_bytes(_create(f"{journal.JOURNAL}/manifest.json"))
    (pdir / "series").write_text("1.patch\n")
    proc = run("apply", "--series", pdir / "series", tree)
    assert proc.returncode == 4 and "journal" in proc.stderr
    assert list(tree.iterdir()) == []


def test_sigterm_and_sighup_roll_back(small: tuple[Path, Path, str]) -> None:
    tree, series, original = small
    for sig in (signal.SIGTERM, signal.SIGHUP):
        code = ("import os, signal, sys\n"
                "from fsbuild.series import apply_series, parse_series\n"
                "n = []\n"
                "def hook(step):\n"
                "    n.append(step)\n"
                f"    if len(n) == 50: os.kill(os.getpid(), {int(sig)})\n"
                "try:\n"
                "    apply_series(parse_series(sys.argv[1]), sys.argv[2], hook=hook)\n"
                "except Exception as exc:\n"
                "    print(type(exc).__name__, exc); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(series), str(tree)],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 3 and proc.stdout.startswith(RunInterruptedError.__name__)
        assert tree_hash(tree) == original


# ---------------------------------------------------------------- lock


def test_second_apply_on_same_tree_is_refused(small: tuple[Path, Path, str]) -> None:
    tree, series, _original = small
    lockfile = journal.lock_file(tree)
    first = fsbuild("apply", "--series", series, tree)
    deadline = time.monotonic() + 60
    while not (lockfile.is_file() and lockfile.read_text().strip() == str(first.pid)):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # hold the lock as long as the test needs
    try:
        second = run("apply", "--series", series, tree)
    finally:
        first.send_signal(signal.SIGCONT)
    _out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == LockHeldError.exit_code
    assert second.stderr.splitlines() == [second.stderr.rstrip("\n")]
    assert f"pid {first.pid}" in second.stderr and str(tree) in second.stderr
    assert run("apply", "--recover", tree).returncode == 0  # lock released with the holder


# ---------------------------------------------------------------- random kills


def kill_trials(base: Path, n_patches: int, n_files: int, trials: int, seed: int) -> dict[str, int]:
    """Start `fsbuild apply`, signal it at a random moment (mostly while it writes the
    tree), recover, compare the tree hash; SIGKILL sometimes hits the recovery too."""
    tree, series = generate(base, n_patches, n_files, seed)
    pristine = base / "pristine"
    shutil.copytree(tree, pristine, symlinks=True)
    original = tree_hash(tree)
    window, patched = _calibrate(tree, series)
    _reset(tree, pristine)
    rng = random.Random(seed)
    stats = {"trials": 0, "mid_write": 0, "sigkill": 0, "sigterm": 0, "sighup": 0,
             "finished_first": 0, "recovery_killed": 0}
    while stats["trials"] < trials:
        sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
        proc = fsbuild("apply", "--series", series, tree)
        if rng.random() < 0.85:  # aim at the write phase, where the danger is
            while proc.poll() is None and not jfile(tree).exists():
                time.sleep(0.002)
        time.sleep(rng.uniform(0, window))
        mid = jfile(tree).exists()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:  # it finished before the signal: a complete run
            assert tree_hash(tree) == patched
            _reset(tree, pristine)
            stats["finished_first"] += 1
            continue
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            if rng.random() < 0.25 and (tree / journal.JOURNAL).exists():
                rec = fsbuild("apply", "--recover", tree)
                time.sleep(rng.uniform(0, 0.3))
                rec.kill()
                rec.communicate()
                stats["recovery_killed"] += 1
            done = run("apply", "--recover", tree)
            assert done.returncode == 0, done.stderr
            # killed at or past the commit point: the tree must be whole, either way
            if "recovered" not in done.stderr and tree_hash(tree) == patched:
                _reset(tree, pristine)
                stats["finished_first"] += 1
                continue
        elif proc.returncode == -sig:  # before Python installed any handler
            assert not mid and not journal.pending(tree)
        else:
            assert proc.returncode == RunInterruptedError.exit_code, err
            assert not journal.pending(tree)
        assert tree_hash(tree) == original, f"trial {stats['trials']}: {sig!r}"
        stats["trials"] += 1
        stats["mid_write"] += mid
        stats[signal.Signals(sig).name.lower()] += 1
    return stats


def _calibrate(tree: Path, series: Path) -> tuple[float, str]:
    """How long the write phase lasts (journal up to exit) and the patched tree's hash."""
    proc = fsbuild("apply", "--series", series, tree)
    while proc.poll() is None and not jfile(tree).exists():
        time.sleep(0.002)
    start = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return time.monotonic() - start, tree_hash(tree)


def _reset(tree: Path, pristine: Path) -> None:
    shutil.rmtree(tree)
    shutil.copytree(pristine, tree, symlinks=True)


def test_random_kills_quick(scratch: Path) -> None:
    stats = kill_trials(scratch, n_patches=200, n_files=1000, trials=10, seed=12)
    print(stats)
    assert stats["mid_write"] >= 3, stats  # most signals must land while writing


@pytest.mark.soak
def test_random_kills_2000_patches_10000_files(scratch: Path) -> None:
    stats = kill_trials(scratch, n_patches=2000, n_files=10000, trials=50, seed=2026)
    print(stats)
    assert stats["mid_write"] >= 25 and stats["sigkill"] >= 10 and stats["sigterm"] >= 5, stats


# ---------------------------------------------------------------- durability at the commit point


def _synced(monkeypatch: pytest.MonkeyPatch, run_it) -> tuple[list[str], int]:  # type: ignore[no-untyped-def]
    """Run run_it() recording what is fsync'd (as paths) and how often the whole
    filesystem is synced."""
    paths: list[str] = []
    whole = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(journal.os, "fsync", fsync)
    monkeypatch.setattr(journal, "sync_tree", lambda root: whole.append(root))
    run_it()
    return paths, len(whole)


def test_commit_of_a_few_files_syncs_them_not_the_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.14: applying one big patch took 4x GNU patch's wall time on a busy machine,
    most of it in syncfs, which waits for every other writer's dirty data on the
    filesystem. A run of a few files fsyncs exactly those files and the directories above
    every changed path (a deletion's too) before its commit point."""
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "gone").mkdir()
    (tree / "a" / "b" / "f.c").write_bytes(b"one\ntwo\n")
    (tree / "gone" / "x.c").write_bytes(b"x\n")
    (tmp_path / "1.patch").write_bytes(
        b"--- a/a/b/f.c\n+++ b/a/b/f.c\n@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n"
        b"--- a/gone/x.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n"
        b"--- /dev/null\n+++ b/new/n.c\n@@ -0,0 +1 @@\n+n\n")
    (tmp_path / "series").write_text("1.patch\n")
    paths, whole = _synced(monkeypatch,
                           lambda: apply_series(parse_series(tmp_path / "series"), tree))
    assert whole == 0
    real = str(tree.resolve())
    for want in ("/a/b/f.c", "/new/n.c", "/a/b", "/a", "/new", ""):  # "gone" was removed
        assert real + want in paths, (want, paths)
    assert (tree / "a" / "b" / "f.c").read_bytes() == b"one\nTWO\n"
    assert not (tree / "gone").exists() and not journal.pending(tree)


def test_commit_of_many_files_syncs_the_filesystem_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SYNC_EACH_MAX paths one syncfs beats as many fsyncs."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"a\n")
    (tmp_path / "1.patch").write_bytes(b"--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n+b\n")
    (tmp_path / "series").write_text("1.patch\n")
    monkeypatch.setattr(journal, "SYNC_EACH_MAX", 0)
    paths, whole = _synced(monkeypatch,
                           lambda: apply_series(parse_series(tmp_path / "series"), tree))
    assert whole == 1 and str((tree / "f").resolve()) not in paths
    assert (tree / "f").read_bytes() == b"b\n"
