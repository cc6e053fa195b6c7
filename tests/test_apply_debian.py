"""Real-world check: Debian's linux 6.1 orig tarball + debian/patches/series (~165 patches),
applied by `fsbuild apply` and by `quilt push -a` on two fresh extractions, must give
byte-identical trees (contents, file kinds, modes; quilt's .pc ignored)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fsbuild.patch import format_patch, parse_patch
from fsbuild.series import parse_series
from tests import debsrc
from tests.conftest import require_tool

VERSION = "6.1.176-1"


def kinds_and_modes(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and ".pc" in dirnames:
            dirnames.remove(".pc")
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


@pytest.mark.slow
def test_debian_series_matches_quilt(tmp_path: Path) -> None:
    require_tool("quilt", "patch", "tar", "xz", "diff")
    src = debsrc.fetch(VERSION)
    series = parse_series(src.series)
    for entry in series.entries:  # cheap: every real patch formats back byte-identically
        data = series.patch_path(entry).read_bytes()
        assert format_patch(parse_patch(data, entry.name)) == data, entry.name
    ours = debsrc.extract_orig(src, tmp_path / "ours")
    theirs = debsrc.extract_orig(src, tmp_path / "theirs")

    proc = subprocess.run([sys.executable, "-m", "fsbuild", "apply", "--series", src.series,
                           "--json", ours], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"applied": ' in proc.stdout

    env = {**os.environ, "QUILT_PATCHES": str(src.series.parent),
           "QUILT_PC": str(tmp_path / "pc"), "QUILT_PATCH_OPTS": ""}
    proc = subprocess.run(["quilt", "push", "-a", "--fuzz=0", "-q"], cwd=theirs, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    diff = subprocess.run(["diff", "-rq", "--no-dereference", "-x", ".pc", str(ours),
                           str(theirs)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:3000]
    assert kinds_and_modes(ours) == kinds_and_modes(theirs)
