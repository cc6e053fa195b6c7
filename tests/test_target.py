from __future__ import annotations

from pathlib import Path

import pytest

from fsbuild import target
from fsbuild.errors import TargetError


def test_load_default_is_el6() -> None:
    t = target.load()
    assert t.name == "el6"
    assert t.full_version == "2.6.32-431.17.1.el6"
    assert t.hostcc_series is not None and t.hostcc_series.name == "series"


def test_load_linux61_default_source() -> None:
    t = target.load("linux-6.1")
    assert t.source_kind == "tarball"
    assert t.default_source().endswith(".tar.xz")


def test_el6_source_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBUILD_EL6_SRC", "/x/kernel.src.rpm")
    assert target.load("el6").default_source() == "/x/kernel.src.rpm"


def test_el6_without_source_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSBUILD_EL6_SRC", raising=False)
    with pytest.raises(TargetError, match="FSBUILD_EL6_SRC"):
        target.load("el6").default_source()


def test_unknown_target() -> None:
    with pytest.raises(TargetError, match="unknown target"):
        target.load("el5")


def test_malformed_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "patches" / "bad").mkdir(parents=True)
    (tmp_path / "patches" / "bad" / "target.toml").write_text("name = \n")
    monkeypatch.setenv("FSBUILD_ROOT", str(tmp_path))
    with pytest.raises(TargetError, match="target.toml"):
        target.load("bad")
