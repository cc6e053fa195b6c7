"""Debian's linux source package for real-world tests: `fetch(version)` downloads it once
with `apt-get source --download-only` (needs deb-src) into a cache folder and extracts only
its debian/ tarball; the orig tarball stays packed (use `extract_orig`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class DebSource:
    version: str
    orig_tarball: Path
    debian_dir: Path  # extracted debian/ folder; debian_dir / "patches" / "series"

    @property
    def series(self) -> Path:
        return self.debian_dir / "patches" / "series"


def cache_dir(version: str) -> Path:
    base = os.environ.get("FSBUILD_TEST_CACHE")
    root = Path(base) / "debsrc" if base else Path.home() / ".cache" / "fsbuild-tests" / "debsrc"
    return root / version


def fetch(version: str) -> DebSource:
    """The linux=VERSION source package, downloaded and cached; skips the test (saying why)
    when apt-get cannot download it."""
    folder = cache_dir(version)
    upstream = version.split("-")[0]
    orig = folder / f"linux_{upstream}.orig.tar.xz"
    debian_tar = folder / f"linux_{version}.debian.tar.xz"
    if not (orig.is_file() and debian_tar.is_file()):
        if shutil.which("apt-get") is None:
            pytest.skip("apt-get not available: cannot download Debian's linux source")
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["apt-get", "source", "--download-only", f"linux={version}"],
                              cwd=folder, capture_output=True, text=True)
        if proc.returncode != 0 or not (orig.is_file() and debian_tar.is_file()):
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            pytest.skip(f"apt-get source linux={version} failed (deb-src enabled?): {tail}")
    extracted = folder / "extracted"
    debian_dir = extracted / "debian"
    if not (debian_dir / "patches" / "series").is_file():
        tmp = folder / "extracted.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with tarfile.open(debian_tar) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(extracted, ignore_errors=True)
        tmp.rename(extracted)  # atomic: a half-extracted cache is never used
    return DebSource(version=version, orig_tarball=orig, debian_dir=debian_dir)


def extract_orig(src: DebSource, dest: Path) -> Path:
    """Unpack the orig tarball into dest; return the top-level source directory."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xJf", str(src.orig_tarball), "-C", str(dest)], check=True)
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise RuntimeError(f"{src.orig_tarball}: expected one top-level directory, got {tops}")
    return tops[0]
