"""The repository layer: GitPython errors mapped to fsbuild's classes, the command
object's fast paths (cat-file --batch, fast-import) and the Repo helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsbuild import gitio as G
from fsbuild.errors import BuildError, ToolMissingError, WorkspaceError


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    G.init_repo(root, "series", {"gc.auto": "0", "core.autocrlf": "false"})
    (root / "dir").mkdir()
    (root / "dir" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "dir" / "run.sh").chmod(0o755)
    (root / "README").write_bytes(b"hello\n")
    G.git(root, "add", "-A")
    G.git(root, "commit", "-q", "-m", "base")
    return root


def test_init_repo_sets_branch_and_config(repo: Path) -> None:
    assert G.git_out(repo, "symbolic-ref", "HEAD") == "refs/heads/series"
    assert G.git_out(repo, "config", "gc.auto") == "0"
    assert G.git_out(repo, "config", "core.autocrlf") == "false"


def test_fixed_identity_gives_the_same_commit_everywhere(tmp_path: Path) -> None:
    shas = []
    for name in ("a", "b"):
        G.init_repo(tmp_path / name, "series", {})
        G.git(tmp_path / name, "commit", "-q", "--allow-empty", "-F", "-", input=b"same\n")
        shas.append(G.git_out(tmp_path / name, "rev-parse", "HEAD"))
    assert shas[0] == shas[1]
    assert G.git_out(tmp_path / "a", "log", "-1", "--format=%an %ae %at") == "fsbuild fsbuild@localhost 1000000000"


def test_failed_command_is_the_callers_class_in_one_line(repo: Path) -> None:
    with pytest.raises(BuildError) as err:
        G.git(repo, "rev-parse", "--verify", "no-such-ref", error=BuildError)
    msg = err.value.message
    assert msg.startswith("`git rev-parse --verify…` in ") and "failed (exit 128)" in msg
    assert "\n" not in msg
    assert G.git(repo, "rev-parse", "--verify", "no-such-ref", check=False).returncode == 128


def test_missing_git_is_a_tool_error(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(repo))
    with pytest.raises(ToolMissingError, match="git not found"):
        G.git(repo, "status")
    with pytest.raises(ToolMissingError, match="git not found"):
        G.GitCat(repo)


def test_not_a_repository_is_a_workspace_error(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="not a git repository"), G.repository(tmp_path):
        pass
    with pytest.raises(WorkspaceError, match="not a git repository"), G.repository(tmp_path / "absent"):
        pass


def test_gitpython_errors_inside_a_repository_block_are_mapped(repo: Path) -> None:
    with pytest.raises(WorkspaceError), G.repository(repo) as r:
        r.git.rev_parse("--verify", "no-such-ref")
    with pytest.raises(WorkspaceError), G.repository(repo) as r:
        r.commit("0" * 40).message   # noqa: B018 - reading it is the failure


def test_resolve_and_refs(repo: Path) -> None:
    head = G.git_out(repo, "rev-parse", "HEAD")
    with G.repository(repo) as r:
        assert G.resolve(r, "refs/tags/upstream/1.0^{commit}") is None
        r.create_tag("upstream/1.0", ref=head, force=True)
        assert G.resolve(r, "refs/tags/upstream/1.0^{commit}") == head
        assert {ref.path: ref.object.hexsha for ref in r.references} == {
            "refs/heads/series": head, "refs/tags/upstream/1.0": head}


def test_cat_file_reader_modes_dirs_and_missing(repo: Path) -> None:
    with G.GitCat(repo) as cat:
        read = cat.reader("HEAD")
        assert read("README") == (b"hello\n", 0o100644)
        assert read("dir/run.sh") == (b"#!/bin/sh\n", 0o100755)
        assert read("dir") is None and read("nope/x") is None
        assert read.isdir("dir") and not read.isdir("README")
        assert cat.object("0" * 40) is None
        with pytest.raises(WorkspaceError, match="no such tree"):
            cat.reader("no-such-ref")


def test_fast_commits_are_one_run_and_readable(repo: Path) -> None:
    base = G.git_out(repo, "rev-parse", "HEAD")
    specs = [G.CommitSpec(base, "one\n", {"README": (b"one\n", 0o100644), "new/file": (b"x\n", 0o100755)}),
             G.CommitSpec(0, "two\n", {"README": None})]
    shas = G.fast_commits(repo, specs)
    assert shas == G.fast_commits(repo, specs)   # deterministic: same ids again
    assert G.git_out(repo, "rev-parse", f"{shas[1]}^") == shas[0]
    with G.GitCat(repo) as cat:
        assert cat.reader(shas[0])("new/file") == (b"x\n", 0o100755)
        assert cat.reader(shas[1])("README") is None
    assert G.git(repo, "show-ref", "refs/fsbuild/fast-import", check=False).returncode != 0
