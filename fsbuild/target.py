"""Targets: one declarative patches/<name>/target.toml per upstream kernel line."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsbuild import paths
from fsbuild.errors import TargetError

DEFAULT_TARGET = "el6"
IDENTITIES = ("version", "version-release")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    version: str            # upstream kernel version, e.g. "2.6.32" / "6.1.192"
    release: str            # upstream package release, e.g. "431.17.1.el6" / "2"
    dir: Path               # patches/<name>
    series: Path            # the Fastsocket quilt series
    hostcc_series: Path | None  # compat patches for host-toolchain builds (el6 only)
    source_kind: str        # srpm | tarball | dir | git (what `default_source` is)
    source_env: str | None  # environment variable naming the source, e.g. FSBUILD_EL6_SRC
    source_default: str | None
    source_hint: str        # how a user gets the source
    # What names an upstream of this line: "version-release" when the release is the
    # distribution's (RHEL: 2.6.32-431.17.1.el6, absent from the Makefile), so a source must
    # state it; "version" when the Makefile version names the kernel and `release` is only
    # the package's own iteration (mainline, Debian's linux-source).
    identity: str = "version"
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def full_version(self) -> str:
        return f"{self.version}-{self.release}"

    def section(self, name: str) -> dict[str, Any]:
        """A free-form table of target.toml ([config], [rpm], [smoke]...) for the job owning it."""
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise TargetError(f"{self.dir / 'target.toml'}: [{name}] must be a table")
        return value

    def default_source(self) -> str:
        """The upstream source to use when none is given: $ENV, then the toml default."""
        if self.source_env and os.environ.get(self.source_env):
            return os.environ[self.source_env]
        if self.source_default:
            return self.source_default
        raise TargetError(f"target {self.name}: no upstream source given; {self.source_hint}")


def available() -> list[str]:
    root = paths.patches_dir()
    return sorted(p.parent.name for p in root.glob("*/target.toml"))


def load(name: str | None = None) -> Target:
    name = name or os.environ.get("FSBUILD_TARGET") or DEFAULT_TARGET
    tdir = paths.patches_dir() / name
    toml_path = tdir / "target.toml"
    if not toml_path.is_file():
        raise TargetError(f"unknown target {name!r} (known: {', '.join(available()) or 'none'})")
    try:
        raw = tomllib.loads(toml_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{toml_path}: {exc}") from exc
    return _from_raw(name, tdir, raw)


def _from_raw(name: str, tdir: Path, raw: dict[str, Any]) -> Target:
    try:
        src = raw.get("source", {})
        hostcc = raw.get("hostcc_series")
        identity = str(src.get("identity", "version"))
        if identity not in IDENTITIES:
            raise TargetError(f"{tdir / 'target.toml'}: [source] identity = {identity!r} "
                              f"(choose {' or '.join(IDENTITIES)})")
        return Target(
            name=name,
            description=raw.get("description", ""),
            version=str(raw["version"]),
            release=str(raw["release"]),
            dir=tdir,
            series=tdir / raw.get("series", "series"),
            hostcc_series=tdir / hostcc if hostcc else None,
            source_kind=src.get("kind", "tarball"),
            source_env=src.get("env"),
            source_default=src.get("default"),
            source_hint=src.get("hint", ""),
            identity=identity,
            raw=raw,
        )
    except KeyError as exc:
        raise TargetError(f"{tdir / 'target.toml'}: missing key {exc}") from exc
