"""Where things live. The repository root holds patches/, specs/, module/...; state
(workspaces, caches) goes to .fsbuild/ and results to out/, both outside the source tree
proper and both relocatable through the environment."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """FSBUILD_ROOT, else the checkout this package was installed from (editable install)."""
    env = os.environ.get("FSBUILD_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """Workspaces and caches: FSBUILD_STATE or <root>/.fsbuild."""
    env = os.environ.get("FSBUILD_STATE")
    return Path(env).resolve() if env else repo_root() / ".fsbuild"


def out_dir(target: str) -> Path:
    """Results of one target: FSBUILD_OUT/<target> or <root>/out/<target>."""
    env = os.environ.get("FSBUILD_OUT")
    base = Path(env).resolve() if env else repo_root() / "out"
    return base / target


def patches_dir() -> Path:
    return repo_root() / "patches"


def specs_dir() -> Path:
    return repo_root() / "specs"
