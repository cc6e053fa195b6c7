"""Series files and transactional series application (plain `fsbuild apply`), compared with
quilt on small real trees; hostile input must leave the tree byte-identical."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fsbuild.errors import MissingFileError, PatchApplyError, PatchFormatError, RunInterruptedError, UnsafePathError
from fsbuild.patch import format_patch, parse_patch
from fsbuild.series import apply_series, parse_series, parse_series_text, write_series
from tests.conftest import require_tool

# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under root: kind, permission bits, content (or link target)."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if ".pc" in p.relative_to(root).parts:
                continue
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def make_series(folder: Path, patches: dict[str, bytes], extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in patches.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
    series = folder / "series"
    series.write_text("".join(f"{n}\n" for n in patches) + extra)
    return series


def make_tree(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src/main.c").write_bytes(b"".join(b"line %d\n" % i for i in range(1, 41)))
    (root / "src/old.h").write_bytes(b"#define OLD 1\n#define KEEP 2\n")
    (root / "doc").mkdir()
    (root / "doc/gone.txt").write_bytes(b"bye\n")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi")
    return root


def fsbuild(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsbuild", *map(str, args)],
                          capture_output=True, text=True)


P1 = b"""Description: edit main.c twice, one hunk drifted by an offset

--- a/src/main.c
+++ b/src/main.c
@@ -2,4 +2,5 @@
 line 2
 line 3
+inserted after 3
 line 4
 line 5
@@ -26,3 +27,3 @@
 line 27
-line 28
+LINE 28
 line 29
"""

P2 = b"""From: someone
Subject: git features: rename, mode, create, delete, no newline at EOF

diff --git a/src/old.h b/src/new.h
similarity index 60%
rename from src/old.h
rename to src/new.h
--- a/src/old.h
+++ b/src/new.h
@@ -1,2 +1,2 @@
-#define OLD 1
+#define NEW 1
 #define KEEP 2
diff --git a/run.sh b/run.sh
old mode 100644
new mode 100755
--- a/run.sh
+++ b/run.sh
@@ -1,2 +1,2 @@
 #!/bin/sh
-echo hi
\\ No newline at end of file
+echo hello
diff --git a/net/fastsocket/Kconfig b/net/fastsocket/Kconfig
new file mode 100644
--- /dev/null
+++ b/net/fastsocket/Kconfig
@@ -0,0 +1,2 @@
+config FASTSOCKET
+\ttristate "Fastsocket"
diff --git a/doc/gone.txt b/doc/gone.txt
deleted file mode 100644
--- a/doc/gone.txt
+++ /dev/null
@@ -1 +0,0 @@
-bye
"""

P3 = b"""--- a/src/main.c
+++ b/src/main.c
@@ -39,2 +39,3 @@
 line 39
 line 40
+tail
\\ No newline at end of file
"""

P_FAIL = b"""--- a/src/main.c
+++ b/src/main.c
@@ -10,3 +10,3 @@
 line 10
-no such line
+x
 line 12
"""

# ---------------------------------------------------------------- series parsing


def test_parse_series_comments_and_options(tmp_path: Path) -> None:
    text = ("# a comment\n\n"
            "fs/0001-a.patch\n"
            "  fs/0002-b.patch -p0   # trailing comment\n"
            "fs/0003-c.patch -p 2 -R\n"
            "fs/x#y.patch\n")
    s = parse_series_text(text, tmp_path / "series")
    assert [(e.name, e.strip, e.reverse, e.lineno) for e in s.entries] == [
        ("fs/0001-a.patch", 1, False, 3), ("fs/0002-b.patch", 0, False, 4),
        ("fs/0003-c.patch", 2, True, 5), ("fs/x#y.patch", 1, False, 6)]
    assert s.entries[1].comment == "# trailing comment"
    assert write_series(s) == text  # round trip keeps comments and spacing


def test_write_series_after_edit(tmp_path: Path) -> None:
    s = parse_series_text("# head\na.patch\nb.patch -p0 # keep\nc.patch\n", tmp_path / "series")
    s.entries[1].strip = 1
    del s.entries[2]
    assert write_series(s) == "# head\na.patch\nb.patch # keep\n"


@pytest.mark.parametrize("name", ["../evil.patch", "/etc/evil.patch", "a/../../evil.patch"])
def test_series_names_escaping_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError, match="escapes the series folder"):
        parse_series_text(f"{name}\n", tmp_path / "series")


def test_series_bad_option(tmp_path: Path) -> None:
    with pytest.raises(PatchFormatError, match="series:1"):
        parse_series_text("a.patch --fuzz=3\n", tmp_path / "series")


def test_series_missing_patch_names_line(tmp_path: Path) -> None:
    series = make_series(tmp_path / "p", {"a.patch": P1}, extra="missing.patch\n")
    with pytest.raises(MissingFileError, match=r"series:2: patch file .*missing.patch"):
        parse_series(series)
    with pytest.raises(MissingFileError):
        parse_series(tmp_path / "nope" / "series")


# ---------------------------------------------------------------- applying


def test_apply_series_features(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2, "3.patch": P3})
    reports = apply_series(parse_series(series), tree)
    main = (tree / "src/main.c").read_bytes()
    assert b"line 3\ninserted after 3\nline 4\n" in main
    assert b"LINE 28\n" in main and main.endswith(b"line 40\ntail")
    assert reports[0].hunks[1].offset == 1  # the second hunk shifted by the first
    assert not (tree / "src/old.h").exists()
    assert (tree / "src/new.h").read_bytes() == b"#define NEW 1\n#define KEEP 2\n"
    assert (tree / "run.sh").read_bytes() == b"#!/bin/sh\necho hello\n"
    assert stat.S_IMODE((tree / "run.sh").stat().st_mode) == 0o755
    assert (tree / "net/fastsocket/Kconfig").read_bytes().startswith(b"config FASTSOCKET\n")
    assert not (tree / "doc").exists()  # emptied by the deletion, removed like GNU patch


def test_matches_quilt(tmp_path: Path) -> None:
    require_tool("quilt")
    ours, theirs = make_tree(tmp_path / "ours"), make_tree(tmp_path / "theirs")
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2, "3.patch": P3})
    apply_series(parse_series(series), ours)
    env = {**os.environ, "QUILT_PATCHES": str(series.parent), "QUILT_PC": str(tmp_path / "pc")}
    proc = subprocess.run(["quilt", "push", "-a", "--fuzz=0"], cwd=theirs, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot(ours) == snapshot(theirs)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    before = snapshot(tree)
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2})
    assert len(apply_series(parse_series(series), tree, dry_run=True)) == 2
    assert snapshot(tree) == before


def evil(path: str) -> bytes:
    return f"--- {path}\n+++ {path}\n@@ -1 +1 @@\n-bye\n+pwned\n".encode()


@pytest.mark.parametrize("third, error, message", [
    (P_FAIL, PatchApplyError, r"3\.patch: src/main.c: hunk #1 FAILED .*line 10"),
    (evil("a/../outside.txt"), UnsafePathError, "escapes the tree"),
    (evil("/etc/passwd"), UnsafePathError, "absolute path"),
    (evil("a/link/gone.txt"), UnsafePathError, "symlink"),
    (b"--- a/src/main.c\n+++ b/src/main.c\n@@ -1,4 +1,4 @@\n line 1\n-line 2\n", PatchFormatError,
     r"3\.patch:5: truncated hunk"),
    (b"diff --git a/x.bin b/x.bin\nGIT binary patch\nliteral 1\n", PatchFormatError,
     "binary diff not supported"),
])
def test_failure_leaves_tree_untouched(tmp_path: Path, third: bytes, error: type,
                                       message: str) -> None:
    tree = make_tree(tmp_path / "t")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "gone.txt").write_bytes(b"bye\n")
    (tree / "link").symlink_to(outside)
    before, before_out = snapshot(tree), snapshot(outside)
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2, "3.patch": third})
    with pytest.raises(error, match=message):
        apply_series(parse_series(series), tree)
    assert snapshot(tree) == before and snapshot(outside) == before_out


def test_interrupt_during_write_restores_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    before = snapshot(tree)
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2, "3.patch": P3})
    steps: list[str] = []

    def hook(step: str) -> None:
        steps.append(step)
        if steps.count("replaced") == 3:  # half-way through the renames
            raise KeyboardInterrupt

    with pytest.raises(RunInterruptedError):
        apply_series(parse_series(series), tree, hook=hook)
    assert snapshot(tree) == before
    assert steps.count("replaced") == 3


def test_file_to_patch_missing(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    series = make_series(tmp_path / "p", {"1.patch": evil("a/nope.txt")})
    with pytest.raises(PatchApplyError, match="nope.txt: file to patch not found"):
        apply_series(parse_series(series), tree)


def test_creating_existing_file_fails(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    body = b"--- /dev/null\n+++ b/run.sh\n@@ -0,0 +1 @@\n+new\n"
    series = make_series(tmp_path / "p", {"1.patch": body})
    with pytest.raises(PatchApplyError, match="already exists"):
        apply_series(parse_series(series), tree)


# ---------------------------------------------------------------- CLI


def test_cli_apply_json_and_exit_codes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2})
    proc = fsbuild("apply", "--series", series, "--json", "--dry-run", tree)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["applied"] == 2 and report["patches"][0]["name"] == "1.patch"
    assert report["patches"][0]["hunks"][1] == {"file": "src/main.c", "hunk": 2, "offset": 1,
                                                "fuzz": 0}
    proc = fsbuild("apply", "--series", series, tree)
    assert proc.returncode == 0 and "applied 2 patches" in proc.stderr
    proc = fsbuild("apply", "--series", series, tree)  # already applied: hunks fail
    assert proc.returncode == PatchApplyError.exit_code
    assert proc.stderr.startswith("fsbuild: error: patch 1.patch: src/main.c: hunk #1 FAILED")
    proc = fsbuild("apply", "--series", tmp_path / "none" / "series", tree)
    assert proc.returncode == MissingFileError.exit_code


def test_cli_fuzz(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    main = tree / "src/main.c"
    main.write_bytes(main.read_bytes().replace(b"line 2\n", b"line two\n"))
    series = make_series(tmp_path / "p", {"1.patch": P1})
    assert fsbuild("apply", "--series", series, tree).returncode == PatchApplyError.exit_code
    proc = fsbuild("apply", "--series", series, "--fuzz", "1", "--json", tree)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["patches"][0]["hunks"][0]["fuzz"] == 1


def test_reverse_entry_undoes_patch(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    before = snapshot(tree)
    folder = tmp_path / "p"
    make_series(folder, {"1.patch": P1, "undo/1.patch": P1})
    (folder / "series").write_text("1.patch\nundo/1.patch -R # revert it again\n")
    reports = apply_series(parse_series(folder / "series"), tree)
    assert [len(r.hunks) for r in reports] == [2, 2]
    assert snapshot(tree) == before


def test_diff_quoted_in_description_is_ignored(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    body = b"Example in the text:\n--- a/nowhere\n+++ b/nowhere\nend of text\n\n" + P1
    series = make_series(tmp_path / "p", {"1.patch": body})
    assert apply_series(parse_series(series), tree)[0].files == ["src/main.c"]
    parsed = parse_patch(body, "1.patch")
    assert parsed.description.startswith(b"Example in the text:\n--- a/nowhere\n")
    assert parsed.description.endswith(b"one hunk drifted by an offset\n\n")
    assert format_patch(parsed) == body


def test_real_sigint_during_write_restores_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    before = snapshot(tree)
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2})
    sent: list[str] = []

    def hook(step: str) -> None:
        if step == "replaced" and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # deferred to the next safe point

    with pytest.raises(RunInterruptedError):
        apply_series(parse_series(series), tree, hook=hook)
    assert snapshot(tree) == before
    assert not list(tree.rglob(".*.fsbuild-*"))  # no temp files left behind


# ---------------------------------------------------------------- commit errors and late signals


def test_failed_write_names_file_leaves_no_temp(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "src/dir").mkdir()
    (tree / "src/dir/keep.c").write_bytes(b"kept\n")
    before = snapshot(tree)
    over_dir = b"--- /dev/null\n+++ b/src/dir\n@@ -0,0 +1 @@\n+file over a directory\n"
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2, "3.patch": over_dir})
    with pytest.raises(PatchApplyError) as err:
        apply_series(parse_series(series), tree)
    assert err.value.message == "cannot write src/dir: Is a directory; the tree was restored"
    assert snapshot(tree) == before  # no temp file, no journal, originals back


def test_failed_rollback_is_not_called_restored(tmp_path: Path, monkeypatch) -> None:
    from fsbuild import journal
    from fsbuild.errors import RecoveryError

    tree = make_tree(tmp_path / "t")
    (tree / "src/dir").mkdir()
    over_dir = b"--- /dev/null\n+++ b/src/dir\n@@ -0,0 +1 @@\n+x\n"
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": over_dir})

    def broken(root: Path) -> int:
        raise RecoveryError("cannot recover: disk gone")

    monkeypatch.setattr(journal, "recover", broken)
    with pytest.raises(RecoveryError) as err:
        apply_series(parse_series(series), tree)
    assert "restored" not in err.value.message
    assert err.value.message.startswith("cannot write src/dir: Is a directory; rolling back")


def test_signal_after_tree_written_keeps_rc_0(tmp_path: Path, monkeypatch) -> None:
    """A SIGINT once every file is written (here: while the summary prints) must not
    turn the finished run into rc 130."""
    from fsbuild import cli, progress

    tree = make_tree(tmp_path / "t")
    series = make_series(tmp_path / "p", {"1.patch": P1, "2.patch": P2})
    printed: list[str] = []

    def info(message: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        printed.append(message)

    monkeypatch.setattr(progress, "info", info)
    monkeypatch.setattr(sys, "argv", ["fsbuild", "apply", "--series", str(series), str(tree)])
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as rc:
            cli.main()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert rc.value.code == 0 and printed and printed[0].startswith("applied 2 patches")
    assert (tree / "src/new.h").is_file() and not (tree / ".fsbuild-journal").exists()
