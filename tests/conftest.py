"""Shared fixtures: every test gets its own state and output folders, so nothing a test
does touches the checkout's .fsbuild/ or out/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("FSBUILD_STATE", str(state))
    monkeypatch.setenv("FSBUILD_OUT", str(tmp_path_factory.mktemp("out")))
    monkeypatch.delenv("FSBUILD_TARGET", raising=False)
    return state


def require_tool(*tools: str) -> None:
    """Skip (saying which) when a host tool is missing; `make deps` installs them all."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"host tool(s) missing: {', '.join(missing)} (run `make deps`)")


def el6_source() -> Path:
    """The pristine el6 source for tests that need it; skip with the reason otherwise."""
    src = os.environ.get("FSBUILD_EL6_SRC")
    if not src:
        pytest.skip("FSBUILD_EL6_SRC is unset: el6 source (2.6.32-431.17.1) never reaches CI")
    path = Path(src)
    if not path.exists():
        pytest.skip(f"FSBUILD_EL6_SRC={src} does not exist")
    return path
