"""Upstream identity (issue 16): every name fsbuild gives a kernel (report, target.toml,
SRPM/RPM NEVRA, hence `uname -r`) comes from what the source states: the SRPM's spec, the
tarball's top directory or file name, the directory's name, a git tag / describe, or the
user's --upstream-version. A source stating nothing is refused (exit 16, nothing changed)
instead of inheriting the target's old release."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, el6_source, require_tool
from test_upstream import git, git_repo, kernel_files, lines, make_tarball, write_tree

from fsbuild import build, rebase, spec, upstream
from fsbuild.errors import UpstreamIdentityError
from fsbuild.target import load
from fsbuild.workspace import Workspace

OLD = "2.6.32-431.17.1.el6"
NEW = "2.6.32-431.29.2.el6"
PATCH = """Subject: [PATCH] sched: tweak

---
--- a/kernel/sched.c
+++ b/kernel/sched.c
@@ -9,3 +9,3 @@
 sched line 9
-sched line 10
+sched line 10 fastsocket
 sched line 11
"""


def fsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsbuild", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def new_files() -> dict[str, str]:
    """2.6.32 again (RHEL updates keep the Makefile), other content: a later update."""
    return kernel_files("2.6.32") | {"kernel/sched.c": "update\n" + lines("sched", 120)}


@pytest.fixture
def el6_like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout root whose target `r6` is el6-like (identity = version-release) at OLD,
    its source a tarball named like RHEL's."""
    old_tb = make_tarball(tmp_path / f"linux-{OLD}.tar.gz", f"linux-{OLD}", kernel_files("2.6.32"))
    tdir = tmp_path / "root" / "patches" / "r6"
    tdir.mkdir(parents=True)
    (tdir / "0001-tweak.patch").write_text(PATCH)
    (tdir / "series").write_text("0001-tweak.patch\n")
    (tdir / "target.toml").write_text(
        'name = "r6"\ndescription = "el6-like"\nversion = "2.6.32"\nrelease = "431.17.1.el6"\n'
        f'series = "series"\n\n[source]\nkind = "tarball"\ndefault = "{old_tb}"\n'
        'identity = "version-release"\n')
    monkeypatch.setenv("FSBUILD_ROOT", str(tmp_path / "root"))
    return tdir


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- an unpacked tree

def test_unnamed_tree_is_refused_and_nothing_changes(el6_like: Path, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", new_files())
    before = snapshot(el6_like)
    cp = fsbuild("rebase", "--onto", str(tree), "-t", "r6")
    assert cp.returncode == UpstreamIdentityError.exit_code == 16, cp.stderr
    err = cp.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsbuild: error: ") and "--upstream-version" in err[0]
    assert "Traceback" not in cp.stderr
    assert snapshot(el6_like) == before
    assert not Workspace(load("r6")).exists
    for args in (["upstream", "import", str(tree), "-t", "r6"],
                 ["rebase", "--series", str(el6_like / "series"), "--from", str(tmp_path / f"linux-{OLD}.tar.gz"),
                  "--onto", str(tree), "--out", str(tmp_path / "plain-out"), "-t", "r6"]):
        cp = fsbuild(*args)
        assert cp.returncode == 16 and "--upstream-version" in cp.stderr, (args, cp.stderr)
    assert not (tmp_path / "plain-out").exists()


def test_unnamed_tree_with_upstream_version_names_everything(el6_like: Path, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", new_files())
    cp = fsbuild("rebase", "--onto", str(tree), "-t", "r6", "--upstream-version", NEW)
    assert cp.returncode == 0, cp.stderr
    toml = (el6_like / "target.toml").read_text()
    assert 'version = "2.6.32"' in toml and 'release = "431.29.2.el6"' in toml
    assert load("r6").full_version == NEW
    out = Path(os.environ["FSBUILD_OUT"]) / "r6"
    assert (out / "rebase-report.md").read_text().splitlines()[0] == f"# Rebase {OLD} -> {NEW}"
    assert json.loads((out / "rebase-report.json").read_text())["onto"] == NEW
    # the identity given for these bytes is remembered: `fsbuild rpm --source tree` names it
    assert upstream.resolve(load("r6"), str(tree)).version == NEW


def test_upstream_version_must_match_the_source(el6_like: Path, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", new_files())
    named = make_tarball(tmp_path / "n.tar.gz", f"linux-{NEW}", new_files())
    t = load("r6")
    for src, given, why in ((tree, "2.6.33-1.el6", "Makefile"), (tree, "2.6.32", "VERSION-RELEASE"),
                            (tree, "2.6.32-4-3", "VERSION-RELEASE"), (named, "2.6.32-504.el6", NEW)):
        with pytest.raises(UpstreamIdentityError, match=why):
            upstream.resolve(t, str(src), given)
    assert upstream.resolve(t, str(named), NEW).version == NEW


def test_version_targets_keep_the_makefile_identity(tmp_path: Path) -> None:
    """linux-6.1-style targets: the Makefile version names the kernel (no refusal)."""
    tree = write_tree(tmp_path / "tree", kernel_files("6.1.200"))
    assert upstream.resolve(load("linux-6.1"), str(tree)).version == "6.1.200"
    assert upstream.resolve(load("linux-6.1"), str(tree), "6.1.200-3").version == "6.1.200-3"


def test_new_version_without_release_restarts_at_1(tmp_path: Path) -> None:
    toml = tmp_path / "target.toml"
    toml.write_text('version = "6.1.192"\nrelease = "2"\n')
    rebase.set_version(toml, "6.1.192")
    assert toml.read_text() == 'version = "6.1.192"\nrelease = "2"\n'
    rebase.set_version(toml, "6.1.200")
    assert toml.read_text() == 'version = "6.1.200"\nrelease = "1"\n'


# ---------------------------------------------------------------- tarballs

def test_renamed_tarball(el6_like: Path, tmp_path: Path) -> None:
    t = load("r6")
    # the top directory names it, whatever the file is called
    by_top = make_tarball(tmp_path / "kernel-update.tar.gz", f"linux-{NEW}", new_files())
    assert upstream.resolve(t, str(by_top)).version == NEW
    # a top directory without release: the file name names it
    by_name = make_tarball(tmp_path / f"linux-{NEW}.tar.xz", "linux-2.6.32", new_files(), "w:xz")
    assert upstream.resolve(t, str(by_name)).version == NEW
    # the same bytes renamed to nothing: refused, not labelled with a cached or old release
    bare = tmp_path / "kernel.tar.xz"
    shutil.copyfile(by_name, bare)
    with pytest.raises(UpstreamIdentityError, match="--upstream-version"):
        upstream.resolve(t, str(bare))
    # a name contradicting the content: refused
    liar = tmp_path / f"linux-{NEW}.tar.gz"
    shutil.copyfile(make_tarball(tmp_path / "o.tar.gz", f"linux-{OLD}", kernel_files("2.6.32")), liar)
    with pytest.raises(UpstreamIdentityError, match="top directory says .*file name says"):
        upstream.resolve(t, str(liar))


# ---------------------------------------------------------------- git

def test_git_ref(el6_like: Path, tmp_path: Path) -> None:
    t = load("r6")
    repo = git_repo(tmp_path / "repo", new_files())
    with pytest.raises(UpstreamIdentityError, match="--upstream-version"):
        upstream.resolve(t, f"{repo}@HEAD")
    git(repo, "tag", f"kernel-{NEW}")
    assert upstream.resolve(t, f"{repo}@HEAD").version == NEW          # git describe, exact
    (repo / "net" / "Makefile").write_text("local fix\n")
    git(repo, "commit", "-qam", "local fix")
    sha = git(repo, "rev-parse", "--short=7", "HEAD").strip()
    described = upstream.resolve(t, f"git:{repo}@HEAD").version
    assert described.startswith(f"{NEW}.1.g") and sha.startswith(described.rsplit(".g", 1)[1][:7])
    assert upstream.resolve(t, f"{repo}@kernel-{NEW}").version == NEW  # the tag as the ref


# ---------------------------------------------------------------- SRPMs

SPEC = """\
Name: kernel
Version: 2.6.32
Release: {release}
Summary: test kernel
License: GPLv2
Source0: {tarball}
%description
test
%prep
%build
%files
"""


def make_srpm(tmp_path: Path, tarball: Path, release: str) -> Path:
    require_tool("rpmbuild")
    top = tmp_path / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    (top / "SPECS").mkdir()
    shutil.copyfile(tarball, top / "SOURCES" / tarball.name)
    spec_file = top / "SPECS" / "kernel.spec"
    spec_file.write_text(SPEC.format(release=release, tarball=tarball.name))
    subprocess.run(["rpmbuild", "-bs", "--define", f"_topdir {top}", str(spec_file)],
                   check=True, capture_output=True)
    (srpm,) = (top / "SRPMS").glob("*.src.rpm")
    return srpm


def test_srpm_spec_names_it(el6_like: Path, tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "linux-2.6.32.tar.gz", "linux-2.6.32", new_files())
    srpm = make_srpm(tmp_path / "a", tb, "431.29.2.el6")
    renamed = tmp_path / "whatever.src.rpm"
    shutil.copyfile(srpm, renamed)
    assert upstream.resolve(load("r6"), str(renamed)).version == NEW


def test_srpm_contradicting_its_tarball_is_refused(el6_like: Path, tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / f"linux-{OLD}.tar.gz", f"linux-{OLD}", kernel_files("2.6.32"))
    srpm = make_srpm(tmp_path / "b", tb, "431.29.2.el6")
    with pytest.raises(UpstreamIdentityError, match="SRPM spec says"):
        upstream.resolve(load("r6"), str(srpm))


# ---------------------------------------------------------------- the RPM names it

def test_rpm_nevra_names_the_given_upstream(tmp_path: Path) -> None:
    """`fsbuild rpm --source TREE` after `upstream import TREE --upstream-version NEW`:
    Release, kver (hence `uname -r` and the smoke kernel_version check) name NEW."""
    tree = write_tree(tmp_path / "tree", new_files())
    req = build.Request(load("el6"), source=str(tree))
    with pytest.raises(UpstreamIdentityError):
        build.make_plan(req)
    upstream.resolve(load("el6"), str(tree), NEW)
    plan = build.make_plan(req)
    assert (plan.version, plan.release) == ("2.6.32", "431.29.2.el6.fastsocket")
    text = spec.render(build.spec_inputs(plan), build.upstream_desc(plan))
    assert "%define pkg_release 431.29.2.el6.fastsocket\n" in text and "431.17.1" not in text


def test_real_el6_source_names_itself() -> None:
    """The pristine el6 source (FSBUILD_EL6_SRC) states its identity: no flag needed."""
    src = el6_source()
    up = upstream.resolve(load("el6"), str(src))
    assert up.version == OLD
    assert build.split_version(load("el6"), up.version) == ("2.6.32", "431.17.1.el6")
