"""Where things live. The repository root holds patches/, specs/, module/...; state
(workspaces, caches) goes to .fsbuild/ and results to out/, both outside the source tree
proper and both relocatable through the environment."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from fsbuild.errors import MissingFileError


def _is_project(d: Path) -> bool:
    return any(d.glob("patches/*/target.toml"))


@functools.cache
def _found_root(cwd: Path) -> Path:
    """The checkout this package runs from (editable install or PYTHONPATH), else the first
    project directory at or above `cwd` (an installed wheel run inside a checkout)."""
    own = Path(__file__).resolve().parent.parent
    if _is_project(own):
        return own
    for d in (cwd, *cwd.parents):
        if _is_project(d):
            return d
    raise MissingFileError(f"no fsbuild project directory (patches/*/target.toml) at or above {cwd}: "
                           "run inside the checkout, or set FSBUILD_ROOT / pass --project-dir")


def repo_root() -> Path:
    """The project directory (patches/, specs/, module/, ci/): FSBUILD_ROOT (--project-dir),
    else the checkout this package lives in, else the nearest one at or above the cwd."""
    env = os.environ.get("FSBUILD_ROOT")
    if env:
        return Path(env).resolve()
    return _found_root(Path.cwd().resolve())


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
