"""The word-wise resolver after a 3-way conflict, blocked_by, likely_upstream and the
conflict explanation: unit cases on file contents, then plain mode, a git-ref upstream
and the workspace on small synthetic upstreams built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_rebase import DESC, extract, fsbuild, make_target, udiff
from test_upstream import kernel_files, make_tarball, makefile

from fsbuild import resolve as RS
from fsbuild.gitio import Overlay, tree_reader
from fsbuild.rebase import merge_file
from fsbuild.render import apply_patch
from fsbuild.target import load

BACKENDS = [pytest.param("wiggle", marks=pytest.mark.skipif(
    not shutil.which("wiggle"), reason="wiggle not installed (apt-get install wiggle)")), "words"]


def numbered(prefix: str, n: int = 40) -> bytes:
    return b"".join(b"%s line %d\n" % (prefix.encode(), i) for i in range(1, n + 1))


def sub(text: bytes, old: bytes, new: bytes) -> bytes:
    assert old in text
    return text.replace(old, new, 1)


def reader(files: dict[str, bytes]) -> RS.Reader:
    return lambda p: (files[p], 0o100644) if p in files else None


def c(data: bytes) -> RS.Content:
    return data, 0o100644


# ---------------------------------------------------------------- unit: the resolver

BASE = numbered("kconfig")
PATCHED = sub(BASE, b"kconfig line 30\n", b"kconfig line 30 ours\n")


@pytest.mark.parametrize("how", BACKENDS)
def test_word_merge_places_hunk_whose_context_changed_by_a_word(how: str) -> None:
    new = sub(BASE, b"kconfig line 29\n", b"kconfig line 29 upstream\n")
    merged, ok = merge_file(c(BASE), c(new), c(PATCHED), "p")
    assert not ok   # the 3-way merge cannot place it: an adjacent line changed
    changes = RS.word_resolve({"f": c(BASE)}, {"f": c(PATCHED)}, reader({"f": new}), {"f": merged}, ["f"], how)
    assert changes == {"f": c(sub(new, b"kconfig line 30\n", b"kconfig line 30 ours\n"))}


@pytest.mark.parametrize("how", BACKENDS)
def test_word_merge_that_changes_the_patch_lines_is_refused(how: str) -> None:
    new = sub(BASE, b"kconfig line 30\n", b"kconfig LINE 30\n")   # a word in the patched line
    merged, ok = merge_file(c(BASE), c(new), c(PATCHED), "p")
    assert not ok
    # the word merge itself is conflict-free, but its removed line is upstream's, not the patch's
    assert RS.MERGERS[how](BASE, new, PATCHED) == sub(new, b"kconfig LINE 30\n", b"kconfig LINE 30 ours\n")
    assert RS.word_resolve({"f": c(BASE)}, {"f": c(PATCHED)}, reader({"f": new}), {"f": merged}, ["f"], how) is None


@pytest.mark.parametrize("how", BACKENDS)
def test_word_merge_conflict_stays_conflict(how: str) -> None:
    new = sub(BASE, b"kconfig line 30\n", b"kconfig line 30 theirs\n")   # the same word spot
    merged, ok = merge_file(c(BASE), c(new), c(PATCHED), "p")
    assert not ok and RS.MERGERS[how](BASE, new, PATCHED) is None
    assert RS.word_resolve({"f": c(BASE)}, {"f": c(PATCHED)}, reader({"f": new}), {"f": merged}, ["f"], how) is None


def test_changed_lines_sees_a_newline_at_end_of_file() -> None:
    assert RS.changed_lines(b"a\nb", b"a\nb\n") == ([b"b"], [b"b\n"])
    assert RS.changed_lines(b"a\nb\n", b"a\nc\n") == ([b"b\n"], [b"c\n"])


def test_words_merge_keeps_bytes_it_does_not_tokenise() -> None:
    base = b"a\tb  c\r\nd\xff e\n" * 3
    theirs = base.replace(b"d\xff e", b"d\xff E", 1)
    assert RS.words_merge(base, base, theirs) == theirs


def test_likely_upstream_true_when_upstream_took_it_in_another_form() -> None:
    base = numbered("net")
    patched = sub(base, b"net line 20\n", b"net line 20 fixed\nnet extra check\n")
    upstream = sub(base, b"net line 20\n", b"net line 20 fixed\n/* why: upstream's comment */\nnet extra check\n")
    assert RS.likely_upstream({"f": c(base)}, {"f": c(patched)}, reader({"f": upstream}))


def test_likely_upstream_false_for_a_real_conflict() -> None:
    new = sub(BASE, b"kconfig line 30\n", b"kconfig LINE 30\n")
    assert not RS.likely_upstream({"f": c(BASE)}, {"f": c(PATCHED)}, reader({"f": new}))
    # the added line elsewhere in the file (far from the hunk) does not count either
    far = new + b"\n" * 100 + b"kconfig line 30 ours\n"
    assert not RS.likely_upstream({"f": c(BASE)}, {"f": c(PATCHED)}, reader({"f": far}))


def test_explain_shows_hunk_and_upstream_change_with_position() -> None:
    new = b"new first line\n" + sub(BASE, b"kconfig line 30\n", b"kconfig LINE 30\n")
    items = RS.explain({"f": c(BASE)}, {"f": c(PATCHED)}, reader({"f": new}), reader({"f": new}))
    assert len(items) == 1
    item = items[0]
    assert item["file"] == "f" and item["line"] == 31
    assert "-kconfig line 30\n+kconfig line 30 ours\n" in str(item["hunk"])
    assert "-kconfig line 30\n+kconfig LINE 30\n" in str(item["upstream_change"])


# ---------------------------------------------------------------- plain mode end to end

def series_case(tmp: Path, old_files: dict[str, str], patches: list[tuple[str, str, str, str]]) -> Path:
    pdir = tmp / "patches"
    pdir.mkdir(parents=True)
    state = dict(old_files)
    for name, path, a, b in patches:
        assert a in state[path]
        after = state[path].replace(a, b, 1)
        (pdir / name).write_text(DESC.format(name=name) + udiff(path, state[path], after))
        state[path] = after
    (pdir / "series").write_text("".join(f"{p[0]}\n" for p in patches))
    return pdir / "series"


PATCHES = [
    ("0001-wiggle.patch", "net/Kconfig", "kconfig line 10\n", "kconfig line 10 ours\n"),
    ("0002-conflict.patch", "net/Kconfig", "kconfig line 30\n", "kconfig line 30 ours\n"),
    ("0003-blocked.patch", "net/Kconfig", "kconfig line 30 ours\n", "kconfig line 30 ours too\n"),
    ("0004-likely.patch", "net/Makefile", "net line 20\n", "net line 20 fixed\nnet extra check\n"),
    ("0005-after.patch", "kernel/sched.c", "sched line 50\n", "sched line 50 patched\n"),
]


def new_files(old: dict[str, str]) -> dict[str, str]:
    new = dict(old, Makefile=makefile("1.0.1"))
    k = new["net/Kconfig"].replace("kconfig line 9\n", "kconfig line 9 upstream\n")
    new["net/Kconfig"] = k.replace("kconfig line 30\n", "kconfig LINE 30\n")
    new["net/Makefile"] = new["net/Makefile"].replace(
        "net line 20\n", "net line 20 fixed\n/* why: upstream's comment */\nnet extra check\n")
    return new


def test_plain_mode_word_merge_blocked_by_likely_upstream(tmp_path: Path) -> None:
    old = kernel_files("1.0.0")
    new = new_files(old)
    series = series_case(tmp_path, old, PATCHES)
    old_tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", old)
    new_tb = make_tarball(tmp_path / "linux-1.0.1.tar.gz", "linux-1.0.1", new)
    out, report = tmp_path / "out", tmp_path / "report.json"
    cp = fsbuild("rebase", "--series", str(series), "--from", str(old_tb), "--onto", str(new_tb), "--upstream-version", "1.0.1-1",
                 "--out", str(out), "--json", str(report))
    assert cp.returncode == 7, cp.stderr
    pats = {p["name"]: p for p in json.loads(report.read_text())["patches"]}
    assert {n: p["outcome"] for n, p in pats.items()} == {
        "0001-wiggle.patch": "merged", "0002-conflict.patch": "conflict", "0003-blocked.patch": "conflict",
        "0004-likely.patch": "conflict", "0005-after.patch": "clean"}
    assert pats["0001-wiggle.patch"]["resolved_by"] == RS.backend()
    assert pats["0003-blocked.patch"]["blocked_by"] == "0002-conflict.patch"
    assert "blocked_by" not in pats["0002-conflict.patch"] and "blocked_by" not in pats["0004-likely.patch"]
    assert pats["0004-likely.patch"]["likely_upstream"] is True
    assert pats["0002-conflict.patch"]["likely_upstream"] is False
    # never dropped: the likely-upstream patch stays in the output series, unchanged
    assert "0004-likely.patch" in (out / "series").read_text()
    assert (out / "0004-likely.patch").read_bytes() == (series.parent / "0004-likely.patch").read_bytes()
    ex = pats["0002-conflict.patch"]["explain"]
    assert ex[0]["file"] == "net/Kconfig" and "+kconfig line 30 ours" in ex[0]["hunk"]
    assert "+kconfig LINE 30" in ex[0]["upstream_change"]
    # the refreshed patch: same -/+ lines, context from the new upstream, applies exactly
    text = (out / "0001-wiggle.patch").read_text()
    assert text.startswith(DESC.format(name="0001-wiggle.patch"))
    assert " kconfig line 9 upstream\n-kconfig line 10\n+kconfig line 10 ours\n" in text
    tree = Overlay(tree_reader(extract(new_tb, tmp_path / "new")))
    assert apply_patch(text.encode(), "0001-wiggle.patch", 1, tree).exact
    md = report.with_suffix(".md").read_text()
    assert "## Review: patches refreshed by a word-wise merge" in md
    assert "+kconfig line 10 ours" in md.split("## Review")[1]
    assert "Blocked by 0002-conflict.patch" in md and "**Likely upstream**" in md
    assert "what upstream did to the same lines" in md


def test_plain_mode_blocked_patch_carries_once_blocker_resolves(tmp_path: Path) -> None:
    """The same chain where the first patch is word-resolvable: the second is not blocked."""
    old = kernel_files("1.0.0")
    new = dict(old, Makefile=makefile("1.0.1"))
    new["net/Kconfig"] = old["net/Kconfig"].replace("kconfig line 29\n", "kconfig line 29 upstream\n")
    series = series_case(tmp_path, old, PATCHES[1:3])
    old_tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", old)
    new_tb = make_tarball(tmp_path / "linux-1.0.1.tar.gz", "linux-1.0.1", new)
    out, report = tmp_path / "out", tmp_path / "report.json"
    cp = fsbuild("rebase", "--series", str(series), "--from", str(old_tb), "--onto", str(new_tb), "--upstream-version", "1.0.1-1",
                 "--out", str(out), "--json", str(report))
    assert cp.returncode == 0, cp.stderr
    pats = [(p["name"], p["outcome"], p.get("resolved_by", "")) for p in json.loads(report.read_text())["patches"]]
    # both carried (the second's context holds the same upstream word change)
    assert pats == [("0002-conflict.patch", "merged", RS.backend()), ("0003-blocked.patch", "merged", RS.backend())]


def git_upstream(tmp: Path, old: dict[str, str], new: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A git repo: old tree, then one commit per changed file (subject names the file)."""
    repo = tmp / "upstream.git"
    repo.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="U", GIT_AUTHOR_EMAIL="u@example.org",
               GIT_COMMITTER_NAME="U", GIT_COMMITTER_EMAIL="u@example.org")

    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                              text=True, env=env).stdout.strip()

    def write(files: dict[str, str]) -> None:
        for rel, text in files.items():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_text(text)

    run("init", "-q")
    write(old)
    run("add", "-A")
    run("commit", "-q", "-m", "v1.0.0")
    shas = {"old": run("rev-parse", "HEAD")}
    for rel in [*sorted(set(new) - {"Makefile"}), "Makefile"]:
        if new[rel] != old[rel]:
            write({rel: new[rel]})
            run("commit", "-q", "-am", f"change {rel}")
            shas[rel] = run("rev-parse", "HEAD")
    return repo, shas


def test_git_ref_upstream_names_the_commits_that_touched_the_lines(tmp_path: Path) -> None:
    old = kernel_files("1.0.0")
    new = new_files(old)
    repo, shas = git_upstream(tmp_path, old, new)
    # a carried patch first moves the conflict's lines: the commits are looked up where
    # those lines are in the upstream file, not in the patched one
    shift = ("0000-shift.patch", "net/Kconfig", "kconfig line 2\n", "kconfig line 2\nshift\nshift\nshift\n")
    series = series_case(tmp_path, old, [shift, PATCHES[1]])
    out, report = tmp_path / "out", tmp_path / "report.json"
    cp = fsbuild("rebase", "--series", str(series), "--from", f"{repo}@{shas['old']}",
                 "--onto", f"{repo}@{shas['Makefile']}", "--upstream-version", "1.0.1-1", "--out", str(out), "--json", str(report))
    assert cp.returncode == 7, cp.stderr
    shifted, pat = json.loads(report.read_text())["patches"]
    assert shifted["outcome"] == "clean" and pat["explain"][0]["line"] == 33
    commits = pat["explain"][0]["upstream_commits"]
    assert commits == [f"{shas['net/Kconfig']} change net/Kconfig"]
    assert f"- {shas['net/Kconfig']} change net/Kconfig" in report.with_suffix(".md").read_text()


# ---------------------------------------------------------------- workspace mode

def test_workspace_word_merge_needs_no_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = kernel_files("1.0.0")
    new = dict(old, Makefile=makefile("1.0.1"))
    new["net/Kconfig"] = old["net/Kconfig"].replace("kconfig line 9\n", "kconfig line 9 upstream\n")
    series = series_case(tmp_path / "case", old, PATCHES[:1])
    old_tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", old)
    new_tb = make_tarball(tmp_path / "linux-1.0.1.tar.gz", "linux-1.0.1", new)
    root = tmp_path / "root"
    tdir = make_target(root, series)
    monkeypatch.setenv("FSBUILD_ROOT", str(root))
    assert fsbuild("upstream", "import", str(old_tb), "-t", "t1").returncode == 0
    cp = fsbuild("rebase", "--onto", str(new_tb), "-t", "t1")
    assert cp.returncode == 0, cp.stderr
    out = Path(os.environ["FSBUILD_OUT"]) / "t1"
    (pat,) = json.loads((out / "rebase-report.json").read_text())["patches"]
    assert (pat["outcome"], pat["resolved_by"]) == ("merged", RS.backend())
    assert "+kconfig line 10 ours" in (out / "rebase-report.md").read_text().split("## Review")[1]
    assert " kconfig line 9 upstream\n" in (tdir / "0001-wiggle.patch").read_text()
    assert load("t1").version == "1.0.1"


def test_doctor_lists_wiggle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsbuild import doctor
    (tool,) = [t for t in doctor.TOOLS if t.name == "wiggle"]
    assert tool.package == "wiggle" and "rebase" in tool.needed_by and tool.optional
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.check_tool(tool).detail == "not found"
    fake = tmp_path / "wiggle"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert doctor.check_tool(tool).ok
    assert RS.backend() == "wiggle"
    fake.unlink()
    assert RS.backend() == "words"   # the fallback when wiggle is missing


# ---------------------------------------------------------------- the real case (slow)

RXRPC = ["rxrpc-input-Open-code-skb_unshare.patch", "rxrpc-Fix-conn-level-packet-handling-to-unshare-RESP.patch",
         "rxrpc-Also-unshare-DATA-RESPONSE-packets-when-paged-.patch"]
RXRPC_FILES = ["net/rxrpc/conn_event.c", "net/rxrpc/input.c"]


def _orig_files(tarball: Path, dest: Path, files: list[str]) -> RS.Reader:
    """Only `files` of a Debian orig tarball (its top folder stripped), extracted once."""
    if not all((dest / f).is_file() for f in files):
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xJf", str(tarball), "-C", str(dest), "--strip-components=1", "--wildcards",
                        *(f"*/{f}" for f in files)], check=True)
    return lambda p: ((dest / p).read_bytes(), 0o100644) if (dest / p).is_file() else None


@pytest.mark.slow
@pytest.mark.parametrize("how", BACKENDS)
def test_debian_rxrpc_patch_resolved_like_debian(how: str, tmp_path_factory: pytest.TempPathFactory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 6.1.170-3 -> 6.1.176: the three rxrpc patches (the only ones touching their
    files) carried by the engine onto 6.1.176 give byte for byte the files of Debian's
    hand-refreshed 6.1.176-1 patches; the second needs the word-wise merge."""
    import debsrc

    from fsbuild import rebase as R
    from fsbuild.series import Entry
    old, new = debsrc.fetch("6.1.170-3"), debsrc.fetch("6.1.176-1")
    cache = tmp_path_factory.getbasetemp() / "rxrpc"
    old_up = Overlay(_orig_files(old.orig_tarball, cache / "old", RXRPC_FILES))
    new_up = _orig_files(new.orig_tarball, cache / "new", RXRPC_FILES)
    monkeypatch.setattr(RS, "backend", lambda: how)
    ours, debian = Overlay(new_up), Overlay(new_up)
    outcomes = []
    for name in RXRPC:
        data = (old.series.parent / "bugfix" / "all" / name).read_bytes()
        applied = apply_patch(data, name, 1, old_up, fuzz=2)
        before = {p: old_up(p) for p in applied.changes}
        old_up.update(applied.changes)
        res, changes = R.carry(R.OldPatch(Entry(name, 1), data, before, dict(applied.changes)), ours, "6.1.176")
        outcomes.append((res.outcome, res.resolved_by))
        ours.update(changes)
        refreshed = (new.series.parent / "bugfix" / "all" / name).read_bytes()
        debian.update(apply_patch(refreshed, name, 1, debian).changes)
    assert outcomes == [("clean", ""), ("merged", how), ("clean", "")]
    for f in RXRPC_FILES:
        assert ours(f) == debian(f), f


def _ws_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Workspace with 0002-conflict (no word merge can keep its lines) + 0003-blocked on it."""
    old = kernel_files("1.0.0")
    new = new_files(old)
    series = series_case(tmp_path / "case", old, PATCHES[1:3])
    old_tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", old)
    new_tb = make_tarball(tmp_path / "linux-1.0.1.tar.gz", "linux-1.0.1", new)
    root = tmp_path / "root"
    tdir = make_target(root, series)
    monkeypatch.setenv("FSBUILD_ROOT", str(root))
    assert fsbuild("upstream", "import", str(old_tb), "-t", "t1").returncode == 0
    cp = fsbuild("rebase", "--onto", str(new_tb), "-t", "t1")
    assert cp.returncode == 7 and "0002-conflict.patch" in cp.stderr, cp.stderr
    return tdir, new_tb


def test_workspace_blocked_patch_retried_after_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tdir, _ = _ws_chain(tmp_path, monkeypatch)
    from fsbuild.workspace import Workspace
    kconfig = Workspace(load("t1")).root / "net" / "Kconfig"
    text = kconfig.read_text()
    start, end = text.index("<<<<<<< upstream"), text.index(">>>>>>> 0002-conflict.patch\n")
    kconfig.write_text(text[:start] + "kconfig line 30 ours\n" + text[end + len(">>>>>>> 0002-conflict.patch\n"):])
    cp = fsbuild("rebase", "--continue", "-t", "t1")
    assert cp.returncode == 0, cp.stderr   # 0003 carried on the resolution
    out = Path(os.environ["FSBUILD_OUT"]) / "t1"
    pats = {p["name"]: p for p in json.loads((out / "rebase-report.json").read_text())["patches"]}
    assert pats["0003-blocked.patch"]["outcome"] == "clean" and "blocked_by" not in pats["0003-blocked.patch"]


def test_workspace_skip_reports_blocked_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _ws_chain(tmp_path, monkeypatch)
    cp = fsbuild("rebase", "--skip", "-t", "t1")
    assert cp.returncode == 7 and "0003-blocked.patch" in cp.stderr
    assert "blocked by 0002-conflict.patch" in cp.stderr
    assert fsbuild("rebase", "--skip", "-t", "t1").returncode == 0
    out = Path(os.environ["FSBUILD_OUT"]) / "t1"
    pats = {p["name"]: p for p in json.loads((out / "rebase-report.json").read_text())["patches"]}
    assert pats["0003-blocked.patch"]["blocked_by"] == "0002-conflict.patch"
    assert "Blocked by 0002-conflict.patch" in (out / "rebase-report.md").read_text()


def test_plain_mode_markdown_never_overwrites_the_json(tmp_path: Path) -> None:
    old = kernel_files("1.0.0")
    series = series_case(tmp_path, old, PATCHES[:1])
    old_tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", old)
    new_tb = make_tarball(tmp_path / "linux-1.0.1.tar.gz", "linux-1.0.1", new_files(old))
    report = tmp_path / "report.md"   # an odd name for the JSON report
    cp = fsbuild("rebase", "--series", str(series), "--from", str(old_tb), "--onto", str(new_tb), "--upstream-version", "1.0.1-1",
                 "--out", str(tmp_path / "out"), "--json", str(report))
    assert cp.returncode == 0, cp.stderr
    assert json.loads(report.read_text())["patches"][0]["resolved_by"] == RS.backend()
    assert "## Review" in (tmp_path / "report.md.md").read_text()


def test_missing_git_is_a_tool_error_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver's git calls go through proc.run: without git on PATH the user gets
    ToolMissingError (one line, its exit code), not FileNotFoundError's traceback."""
    from fsbuild.errors import ToolMissingError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="git not found"):
        RS._git_diff(b"a\n", b"b\n", 3)
