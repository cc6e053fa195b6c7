"""The git workspace and `fsbuild series ...`: import, push/pop, refresh keeping the
description, new, import, export, status, list, check."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_rebase import build_case, fsbuild, make_target
from test_upstream import kernel_files, make_tarball, write_tree

from fsbuild.gitio import git_out
from fsbuild.render import rerender
from fsbuild.target import load
from fsbuild.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Workspace, Path, Path]:
    old_tb, _, series, _ = build_case(tmp_path / "case")
    tdir = make_target(tmp_path / "root", series)
    monkeypatch.setenv("FSBUILD_ROOT", str(tmp_path / "root"))
    cp = fsbuild("upstream", "import", str(old_tb), "-t", "t1", "--json")
    assert cp.returncode == 0, cp.stderr
    info = json.loads(cp.stdout)
    assert info["version"] == "1.0.0" and info["tag"] == "upstream/1.0.0"
    return Workspace(load("t1")), tdir, old_tb


def test_import_is_pristine_and_cached(ws: tuple[Workspace, Path, Path], tmp_path: Path) -> None:
    w, _, old_tb = ws
    assert (w.root / "kernel" / "sched.c").read_text() == kernel_files("1.0.0")["kernel/sched.c"]
    tag = git_out(w.root, "rev-parse", "upstream/1.0.0")
    assert git_out(w.root, "rev-parse", "HEAD") == tag
    # the same tarball again: same commit, no second import
    assert w.import_upstream(__import__("fsbuild.upstream").upstream.resolve(w.target, str(old_tb))) == tag
    # the commit is deterministic: a directory with the same files yields the same tree
    d = write_tree(tmp_path / "dir", kernel_files("1.0.0"))
    from fsbuild import upstream
    assert git_out(w.root, "rev-parse", f"{w.import_upstream(upstream.resolve(w.target, str(d)))}^{{tree}}") \
        == git_out(w.root, "rev-parse", "upstream/1.0.0^{tree}")


def test_push_pop_list_status(ws: tuple[Workspace, Path, Path]) -> None:
    w, _tdir, _ = ws
    cp = fsbuild("series", "push", "2", "-t", "t1")
    assert cp.returncode == 0 and cp.stdout.split() == ["applied", "0001-clean.patch", "applied", "0002-offset.patch"]
    assert "net line 10 patched" in (w.root / "net" / "Makefile").read_text()
    log = git_out(w.root, "log", "-1", "--format=%B")
    assert log.startswith("From: Dev") and log.rstrip().endswith("Fsbuild-Patch: 0002-offset.patch")
    st = json.loads(fsbuild("series", "status", "-t", "t1", "--json").stdout)
    assert (st["applied"], st["total"], st["top"], st["dirty"]) == (2, 6, "0002-offset.patch", False)
    listing = fsbuild("series", "list", "-t", "t1").stdout.splitlines()
    assert listing[:3] == ["+ 0001-clean.patch", "= 0002-offset.patch", "  0003-merged.patch"]
    # pop refuses to throw away unrefreshed work
    (w.root / "net" / "Makefile").write_text("edited\n")
    cp = fsbuild("series", "pop", "-t", "t1")
    assert cp.returncode == 12 and "unrefreshed" in cp.stderr
    assert fsbuild("series", "pop", "-a", "-f", "-t", "t1").returncode == 0
    assert git_out(w.root, "rev-parse", "HEAD") == git_out(w.root, "rev-parse", "upstream/1.0.0")
    assert (w.root / "net" / "Makefile").read_text() == kernel_files("1.0.0")["net/Makefile"]
    assert fsbuild("series", "push", "-a", "-t", "t1").returncode == 0
    assert len(w.applied()) == 6
    cp = fsbuild("series", "push", "-t", "t1")
    assert cp.returncode == 12 and "fully applied" in cp.stderr


def test_push_pop_check_json(ws: tuple[Workspace, Path, Path]) -> None:
    """--json on push/pop/check like the other reports: the names done, and check's
    verdict per patch with the same exit code as without --json."""
    w, _tdir, _ = ws
    cp = fsbuild("series", "push", "2", "--fuzz", "10", "-t", "t1", "--json")   # apply's fuzz range
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {"applied": [n for n, _ in w.applied()]} and len(w.applied()) == 2
    cp = fsbuild("series", "pop", "-t", "t1", "--json")
    assert cp.returncode == 0 and json.loads(cp.stdout) == {"removed": ["0002-offset.patch"]}
    plain, as_json = fsbuild("series", "check", "-t", "t1"), fsbuild("series", "check", "-t", "t1", "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == plain.returncode
    assert report["ok"] is (plain.returncode == 0)
    assert [p["name"] for p in report["patches"]] == [e.name for e in w.entries()]
    assert {p["name"] for p in report["patches"] if p["result"] != "ok"} == \
        {line.split()[1].rstrip(":") for line in plain.stdout.splitlines() if line.startswith("FAIL")}


def test_push_failure_names_patch_and_leaves_tree(ws: tuple[Workspace, Path, Path]) -> None:
    w, tdir, _ = ws
    (tdir / "0001-clean.patch").write_text((tdir / "0001-clean.patch").read_text().replace(" net line 9\n", " net line 99\n"))
    cp = fsbuild("series", "push", "-t", "t1")
    assert cp.returncode == 6 and "0001-clean.patch" in cp.stderr and "hunk #1" in cp.stderr
    assert not w.dirty() and w.applied() == []


def test_refresh_keeps_description(ws: tuple[Workspace, Path, Path]) -> None:
    w, tdir, _ = ws
    before = (tdir / "0001-clean.patch").read_bytes()
    assert fsbuild("series", "push", "-t", "t1").returncode == 0
    # refresh without changes: byte-identical file
    assert fsbuild("series", "refresh", "-t", "t1").returncode == 0
    assert (tdir / "0001-clean.patch").read_bytes() == before
    mk = w.root / "net" / "Makefile"
    mk.write_text(mk.read_text().replace("net line 12\n", "net line 12 also\n"))
    assert fsbuild("series", "refresh", "-t", "t1").returncode == 0
    after = (tdir / "0001-clean.patch").read_text()
    desc = before.decode().split("--- a/")[0]
    assert after.startswith(desc) and "+net line 12 also" in after and "+net line 10 patched" in after
    assert not w.dirty()
    # pop + push reproduces the refreshed change
    assert fsbuild("series", "pop", "-t", "t1").returncode == 0
    assert fsbuild("series", "push", "-t", "t1").returncode == 0
    assert "net line 12 also" in mk.read_text()


def test_new_import_export_check(ws: tuple[Workspace, Path, Path], tmp_path: Path) -> None:
    w, tdir, _ = ws
    assert fsbuild("series", "push", "-t", "t1").returncode == 0
    cp = fsbuild("series", "new", "-t", "t1", "-m", "net: add fastsocket hook", "0001a-new.patch")
    assert cp.returncode == 0, cp.stderr
    series = (tdir / "series").read_text().splitlines()
    assert series[:3] == ["# test series", "0001-clean.patch", "0001a-new.patch"]
    (w.root / "net" / "fastsocket.c").write_text("int fastsocket;\n")
    assert fsbuild("series", "refresh", "-t", "t1").returncode == 0
    text = (tdir / "0001a-new.patch").read_text()
    assert text.startswith("net: add fastsocket hook\n") and "+int fastsocket;" in text
    # import after the top patch
    extra = tmp_path / "extra.patch"
    extra.write_text("Extra change\n---\n--- a/Makefile\n+++ b/Makefile\n@@ -5 +5 @@\n-NAME = Test\n+NAME = Extra\n")
    assert fsbuild("series", "import", "-t", "t1", str(extra)).returncode == 0
    assert (tdir / "series").read_text().splitlines()[3] == "extra.patch"
    assert fsbuild("series", "import", "-t", "t1", str(extra)).returncode == 12  # twice: refused
    assert fsbuild("series", "import", "-t", "t1", str(tmp_path / "missing.patch")).returncode == 3
    out = tmp_path / "export"
    assert fsbuild("series", "export", "-t", "t1", str(out)).returncode == 0
    assert (out / "series").read_bytes() == (tdir / "series").read_bytes()
    assert (out / "0001a-new.patch").read_bytes() == (tdir / "0001a-new.patch").read_bytes()
    assert (out / "0003-merged.patch").read_bytes() == (tdir / "0003-merged.patch").read_bytes()
    cp = fsbuild("series", "check", "-t", "t1")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "8 patches apply exactly" in cp.stdout


def test_check_reports_offsets(ws: tuple[Workspace, Path, Path], tmp_path: Path) -> None:
    _w, _tdir, _ = ws
    # import an upstream with 5 extra lines at the top of sched.c: 0002 applies with an offset
    files = kernel_files("1.0.0")
    files["kernel/sched.c"] = "x\n" * 5 + files["kernel/sched.c"]
    tb = make_tarball(tmp_path / "shifted.tar.gz", "linux-1.0.0", files)
    assert fsbuild("upstream", "import", str(tb), "-t", "t1").returncode == 0
    cp = fsbuild("series", "check", "-t", "t1")
    assert cp.returncode == 6
    assert "FAIL 0002-offset.patch: kernel/sched.c hunk #1 offset +5" in cp.stdout


def test_commands_without_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, series, _ = build_case(tmp_path / "case")
    make_target(tmp_path / "root", series)
    monkeypatch.setenv("FSBUILD_ROOT", str(tmp_path / "root"))
    cp = fsbuild("series", "push", "-t", "t1")
    assert cp.returncode == 12 and "upstream import" in cp.stderr
    cp = fsbuild("upstream", "import", str(tmp_path / "nope.tar.gz"), "-t", "t1")
    assert cp.returncode == 3 and cp.stderr.startswith("fsbuild: error:")
    import tarfile
    slip = tarfile.TarInfo("linux-1.0.0/../../../escaped")
    slip.size = 1
    bad = make_tarball(tmp_path / "slip.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                       extra=[(slip, b"x")])
    cp = fsbuild("upstream", "import", str(bad), "-t", "t1")
    assert cp.returncode == 4 and "escapes the tree" in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1
    assert not Workspace(load("t1")).exists and not (tmp_path / "escaped").exists()


def test_rerender_keeps_headers_and_trailer() -> None:
    original = (b"Desc\n\nSigned-off-by: x\n---\n net/a | 2 +-\n\n"
                b"diff --git a/net/a b/net/a\nindex 1111111..2222222 100644\n--- a/net/a\n+++ b/net/a\n"
                b"@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n-- \n2.39.5\n")
    new_diff = (b"diff --git a/net/a b/net/a\nindex 3333333..4444444 100644\n--- a/net/a\n+++ b/net/a\n"
                b"@@ -10,3 +10,3 @@\n a\n-b\n+B\n c\n")
    out = rerender(original, new_diff, "p.patch")
    assert out == original.replace(b"@@ -1,3 +1,3 @@", b"@@ -10,3 +10,3 @@")


def test_reverse_series_entry_is_refused_not_applied_forward(tmp_path: Path) -> None:
    from fsbuild.errors import PatchFormatError
    from fsbuild.series import read_series
    (tmp_path / "a.patch").write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    (tmp_path / "series").write_text("a.patch -p1\n")
    assert [(e.name, e.strip) for e in read_series(tmp_path / "series")] == [("a.patch", 1)]
    (tmp_path / "series").write_text("# keep\na.patch -R\n")
    with pytest.raises(PatchFormatError, match=r"series:2: a.patch -R"):
        read_series(tmp_path / "series")


# ---------------------------------------------------------------- killed runs (issue 12 #2)

N_PATCHES = 24


def many_patches_case(tmp: Path) -> tuple[Path, Path]:
    """An upstream tarball and a series of N_PATCHES patches, each editing net/Makefile and
    creating a file in a new directory (one deletes an earlier one), long enough for a
    signal to land anywhere inside `push -a`. Returns (tarball, series)."""
    from test_rebase import DESC, replace_line, udiff
    files = kernel_files("1.0.0")
    pdir = tmp / "patches"
    pdir.mkdir(parents=True)
    mk = files["net/Makefile"]
    names = []
    for k in range(1, N_PATCHES + 1):
        name = f"{k:04d}-step.patch"
        new_mk = replace_line(mk, f"net line {k}\n", f"net line {k} patched\n")
        body = DESC.format(name=name) + udiff("net/Makefile", mk, new_mk)
        body += f"--- /dev/null\n+++ b/drivers/fs{k}/new.c\n@@ -0,0 +1 @@\n+int fs{k};\n"
        if k == 12:
            body += "--- a/drivers/fs3/new.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-int fs3;\n"
        (pdir / name).write_text(body)
        names.append(name)
        mk = new_mk
    (pdir / "series").write_text("# many steps\n" + "".join(f"{n}\n" for n in names))
    return make_tarball(tmp / "linux-1.0.0.tar.gz", "linux-1.0.0", files), pdir / "series"


@pytest.fixture
def many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Workspace, Path, list[str]]:
    """The many-patch workspace, plus the tree id after each number of applied patches
    (from one uninterrupted `series push -a`)."""
    from test_rebase import make_target
    tb, series = many_patches_case(tmp_path / "case")
    tdir = make_target(tmp_path / "root", series)
    monkeypatch.setenv("FSBUILD_ROOT", str(tmp_path / "root"))
    assert fsbuild("upstream", "import", str(tb), "-t", "t1").returncode == 0
    cp = fsbuild("series", "push", "-a", "-t", "t1")
    assert cp.returncode == 0, cp.stderr
    w = Workspace(load("t1"))
    trees = [git_out(w.root, "rev-parse", f"HEAD~{N_PATCHES - k}^{{tree}}") for k in range(N_PATCHES + 1)]
    w.pop(None)
    return w, tdir, trees


def _killed_push(w: Workspace, sig: int, group: bool, delay: float) -> subprocess.CompletedProcess[str]:
    """`series push -a` in its own session, hit by `sig` (0: none) `delay` seconds after
    its first step began: the whole process group (a terminal's Ctrl-C, a session kill)
    or the fsbuild process alone (its git child then runs on as an orphan). The returned
    .args is the time from that first step to the end of the run."""
    import os
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "fsbuild", "series", "push", "-a", "-t", "t1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=os.environ.copy())
    while proc.poll() is None and not w.intent_file.exists():
        time.sleep(0.002)
    t0 = time.monotonic()
    time.sleep(delay)
    if sig and proc.poll() is None:
        os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    out, err = proc.communicate()
    span = time.monotonic() - t0
    for _ in range(1000):   # orphans of a lone kill: let them finish first
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    return subprocess.CompletedProcess(span, proc.returncode, out, err)


def _tree(w: Workspace) -> str:
    return git_out(w.root, "rev-parse", "HEAD^{tree}")


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGINT"])
def test_push_killed_at_random_points_stays_consistent(many: tuple[Workspace, Path, list[str]],
                                                       signame: str) -> None:
    """Issue 12 #2: after a kill anywhere in `push -a` the workspace is either whole (clean
    tree == the tree of its applied patches) or carries an intent record: status names it,
    refresh/push refuse, `pop` rolls the half-pushed patch back. No patch file is ever
    rewritten. SIGINT (to the process group like a terminal, or to fsbuild alone) never
    leaves a half step."""
    import random
    import signal

    from fsbuild.commands.series import _status
    from fsbuild.errors import WorkspaceError
    w, tdir, trees = many
    sig = getattr(signal, signame)
    patches = snapshot_dir(tdir)
    ref = _killed_push(w, 0, False, 0)
    assert ref.returncode == 0, ref.stderr
    span = ref.args   # from its first step to its end
    w.pop(None)
    rng = random.Random(12)
    seen = {"whole": 0, "interrupted": 0, "stopped early": 0}
    for trial in range(20):
        cp = _killed_push(w, sig, group=trial % 2 == 0, delay=rng.uniform(0, span))
        assert snapshot_dir(tdir) == patches
        if sig == signal.SIGINT:
            # -2: the signal came after the run was over, in interpreter exit (cli.py's)
            assert cp.returncode in (0, 130, -2), cp.stderr
            assert cp.returncode in (0, -2) or cp.stderr.strip() == "fsbuild: interrupted", cp.stderr
        it = w.intent()
        seen["stopped early"] += len(w.applied()) < N_PATCHES
        if it is None:
            seen["whole"] += 1
            assert sig == signal.SIGKILL or cp.stdout.count("applied ") == len(w.applied())
            assert not w.dirty(), trial
            assert _tree(w) == trees[len(w.applied())], trial
        else:
            seen["interrupted"] += 1
            # SIGINT rolls back even a git it killed (leaving index.lock): never a half step
            assert sig == signal.SIGKILL, (trial, cp.returncode, cp.stderr, it,
                                           list((w.root / ".git").glob("*.lock")))
            note = _status(w)["interrupted"]
            assert it.patch in note and "`fsbuild series pop`" in note   # type: ignore[operator]
            with pytest.raises(WorkspaceError, match="interrupted"):
                w.refresh()   # would fold the half-pushed patch into the one below
            with pytest.raises(WorkspaceError, match="interrupted"):
                w.push()
            assert snapshot_dir(tdir) == patches
            assert w.pop() == [it.patch]
            assert w.intent() is None and not w.dirty(), trial
            assert _tree(w) == trees[len(w.applied())], trial
        w.pop(None, force=True) if w.applied() else None
        assert _tree(w) == trees[0]
    print(f"{signame}: {seen}")   # shown with -s: how the 20 kills landed
    # the signals landed mid-run (not after it), SIGKILL also inside steps
    assert seen["stopped early"] >= 10, seen
    if sig == signal.SIGKILL:
        assert seen["interrupted"] >= 3, seen


def snapshot_dir(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- one lock per workspace (#5)

def test_second_command_on_a_locked_workspace_exits_14(ws: tuple[Workspace, Path, Path],
                                                       tmp_path: Path) -> None:
    import os
    w, _, old_tb = ws
    new_tb = tmp_path / "case" / "linux-1.0.1.tar.gz"
    with w.locked():
        for args in (("series", "push", "-t", "t1"), ("series", "status", "-t", "t1"),
                     ("upstream", "import", str(old_tb), "-t", "t1"),
                     ("rebase", "--onto", str(new_tb), "-t", "t1")):
            cp = fsbuild(*args)
            assert cp.returncode == 14, (args, cp.stderr)
            assert cp.stderr.startswith("fsbuild: error: workspace t1") and f"pid {os.getpid()}" in cp.stderr
            assert len(cp.stderr.strip().splitlines()) == 1
    assert w.applied() == [] and not w.dirty()
    assert fsbuild("series", "push", "-t", "t1").returncode == 0   # free again


def test_two_push_loops_one_workspace(many: tuple[Workspace, Path, list[str]]) -> None:
    """A second `series push` while a `push -a` runs exits 14 naming the first one's pid;
    the first finishes unharmed."""
    import os
    import sys
    import time
    w, _, trees = many
    first = subprocess.Popen([sys.executable, "-m", "fsbuild", "series", "push", "-a", "-t", "t1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ.copy())
    while first.poll() is None and not w.intent_file.exists():
        time.sleep(0.002)
    second = fsbuild("series", "push", "-t", "t1")
    _out, err = first.communicate()
    assert first.returncode == 0, err
    assert second.returncode == 14 and f"pid {first.pid}" in second.stderr, second.stderr
    assert len(w.applied()) == N_PATCHES and not w.dirty() and _tree(w) == trees[-1]


# ---------------------------------------------------------------- during a rebase (#4)

def test_series_commands_while_a_rebase_is_stopped(ws: tuple[Workspace, Path, Path],
                                                   tmp_path: Path) -> None:
    _w, tdir, old_tb = ws
    assert fsbuild("series", "push", "-a", "-t", "t1").returncode == 0
    cp = fsbuild("rebase", "--onto", str(tmp_path / "case" / "linux-1.0.1.tar.gz"), "-t", "t1")
    assert cp.returncode == 7, cp.stderr
    before = snapshot_dir(tdir)
    cp = fsbuild("series", "status", "-t", "t1")
    assert cp.returncode == 0, cp.stderr
    assert ("a rebase onto 1.0.1 is stopped on a conflict in 0005-conflict.patch (net/Kconfig): "
            "resolve it, then `fsbuild rebase --continue`, or `--skip` / `--abort`") in cp.stdout
    st = json.loads(fsbuild("series", "status", "-t", "t1", "--json").stdout)
    # carried so far onto 1.0.1: 0001-0003 (0004 is upstream, 0005 waits)
    assert (st["rebase_in_progress"], st["applied"], st["top"]) == (True, 3, "0003-merged.patch")
    for args in (("list",), ("pop",), ("refresh",), ("push",), ("export", str(tmp_path / "x"))):
        cp = fsbuild("series", *args, "-t", "t1")
        assert cp.returncode == 12, (args, cp.stderr)
        assert cp.stderr.startswith("fsbuild: error: a rebase onto 1.0.1 is stopped on a conflict")
        assert len(cp.stderr.strip().splitlines()) == 1
    # nor may an upstream import reset the work tree under the rebase
    cp = fsbuild("upstream", "import", str(old_tb), "-t", "t1")
    assert cp.returncode == 12 and "rebase onto 1.0.1 is stopped" in cp.stderr
    assert snapshot_dir(tdir) == before
    assert fsbuild("rebase", "--abort", "-t", "t1").returncode == 0
    assert fsbuild("series", "list", "-t", "t1").returncode == 0


# ---------------------------------------------------------------- one series writer (#18)

def test_series_writer_keeps_comments_and_places(tmp_path: Path) -> None:
    from fsbuild.series import Entry, update_series_file
    series = tmp_path / "series"
    series.write_text("# head\n\n# section A\na.patch\nfix-p2-thing.patch   # keep me\n"
                      "# section B\nb.patch -p0 # zero\nc.patch\n")
    # the first entry of a section dropped: nothing else moves; a -pN in a name is a name
    update_series_file(series, [Entry("fix-p2-thing.patch"), Entry("b.patch", 0), Entry("c.patch")])
    assert series.read_text() == ("# head\n\n# section A\nfix-p2-thing.patch   # keep me\n"
                                  "# section B\nb.patch -p0 # zero\nc.patch\n")
    # the last entry above a header dropped: the header and what follows stay put
    update_series_file(series, [Entry("b.patch", 0), Entry("c.patch")])
    assert series.read_text() == "# head\n\n# section A\n# section B\nb.patch -p0 # zero\nc.patch\n"
    # new entries go after the one before them (at the front: before the first entry)
    update_series_file(series, [Entry("n0.patch"), Entry("b.patch", 0), Entry("n1.patch", 2),
                                Entry("n2.patch"), Entry("c.patch"), Entry("n3.patch")])
    assert series.read_text() == ("# head\n\n# section A\n# section B\nn0.patch\nb.patch -p0 # zero\n"
                                  "n1.patch -p2\nn2.patch\nc.patch\nn3.patch\n")
    # a changed strip level renders the entry anew but keeps its comment
    update_series_file(series, [Entry("b.patch", 1), Entry("c.patch")])
    assert series.read_text() == "# head\n\n# section A\n# section B\nb.patch # zero\nc.patch\n"


@pytest.mark.slow
def test_series_writer_on_debians_series(tmp_path: Path) -> None:
    """Debian's real series (section headers, blank lines): drops at section starts and
    ends and an insertion change only those lines."""
    import debsrc

    from fsbuild import series as S
    from fsbuild.series import Entry, update_series_file
    src = debsrc.fetch("6.1.176-1")
    text = src.series.read_text()
    series = tmp_path / "series"
    series.write_text(text)
    update_series_file(series, [Entry(e.name, e.strip) for e in S.parse_series(series, False).entries])
    assert series.read_text() == text   # a rewrite with the same entries is byte for byte
    lines = text.splitlines()
    entries = S.parse_series(series, check_files=False).entries
    comment = {no for no, line in enumerate(lines, 1) if line.lstrip().startswith("#")}
    dropped = {e.lineno for e in entries if e.lineno - 1 in comment or e.lineno + 1 in comment}
    assert len(dropped) >= 10 and len(comment) >= 10   # the real file has sections
    dropped.add(entries[len(entries) // 2].lineno)
    anchor = next(e for e in entries[5:] if e.lineno not in dropped)
    new = [Entry(e.name, e.strip) for e in entries if e.lineno not in dropped]
    new.insert(new.index(Entry(anchor.name, anchor.strip)) + 1, Entry("fastsocket/0001-x.patch"))
    update_series_file(series, new)
    expected = []
    for no, line in enumerate(lines, 1):
        if no not in dropped:
            expected.append(line)
        if no == anchor.lineno:
            expected.append("fastsocket/0001-x.patch")
    assert series.read_text() == "\n".join(expected) + "\n"


def _dies_at_git(gitcmd: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`fsbuild ARGS` in a process that dies on the spot (os._exit, no cleanup: what
    SIGKILL does) when it is about to run `git GITCMD`."""
    import os
    import sys
    code = ("import os, sys\nfrom fsbuild import gitio as G, workspace as W\nreal, die_at = G.git, sys.argv[1]\n"
            "def git(repo, *a, **kw):\n    if a and a[0] == die_at:\n        os._exit(137)\n"
            "    return real(repo, *a, **kw)\n"
            "G.git = W.git = git\nfrom fsbuild.cli import main\nsys.argv = ['fsbuild', *sys.argv[2:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, gitcmd, *args], capture_output=True, text=True,
                          env=os.environ.copy())


def test_killed_pop_is_finished_by_pop(ws: tuple[Workspace, Path, Path]) -> None:
    w, _tdir, _ = ws
    assert fsbuild("series", "push", "3", "-t", "t1").returncode == 0
    stack = w.applied()
    assert _dies_at_git("clean", "series", "pop", "2", "-t", "t1").returncode == 137
    st = fsbuild("series", "status", "-t", "t1")
    assert st.returncode == 0 and ("a pop of 0003-merged.patch, 0002-offset.patch was interrupted"
                                   in st.stdout) and "`fsbuild series pop` finishes it (back to 0001-clean.patch)" in st.stdout
    for args in (("push",), ("refresh",)):
        cp = fsbuild("series", *args, "-t", "t1")
        assert cp.returncode == 12 and "series pop` finishes it" in cp.stderr, cp.stderr
    cp = fsbuild("series", "pop", "-t", "t1")
    assert cp.returncode == 0 and cp.stdout.split() == ["removed", "0003-merged.patch", "removed", "0002-offset.patch"]
    assert w.applied() == stack[:1] and not w.dirty() and w.intent() is None


def test_killed_refresh_is_finished_by_refresh(ws: tuple[Workspace, Path, Path]) -> None:
    """Killed after the amend, before the patch file was written: pop (which would leave
    the file stale and the refresh lost) refuses; a rerun of refresh writes it."""
    w, tdir, _ = ws
    assert fsbuild("series", "push", "-t", "t1").returncode == 0
    mk = w.root / "net" / "Makefile"
    mk.write_text(mk.read_text().replace("net line 12\n", "net line 12 also\n"))
    assert _dies_at_git("diff", "series", "refresh", "-t", "t1").returncode == 137
    assert "net line 12 also" not in (tdir / "0001-clean.patch").read_text() and not w.dirty()
    cp = fsbuild("series", "pop", "-t", "t1")
    assert cp.returncode == 12 and "a refresh of 0001-clean.patch was interrupted" in cp.stderr
    assert "`fsbuild series refresh` finishes it" in fsbuild("series", "status", "-t", "t1").stdout
    assert fsbuild("series", "refresh", "-t", "t1").returncode == 0
    assert "+net line 12 also" in (tdir / "0001-clean.patch").read_text() and w.intent() is None
