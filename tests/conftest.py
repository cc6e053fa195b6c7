"""Shared fixtures: every test gets its own state and output folders, so nothing a test
does touches the checkout's .fsbuild/ or out/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("FSBUILD_STATE", str(state))
    monkeypatch.setenv("FSBUILD_OUT", str(tmp_path_factory.mktemp("out")))
    monkeypatch.delenv("FSBUILD_TARGET", raising=False)
    return state


class _Stoppable(Protocol):
    def stop(self) -> None: ...


@pytest.fixture
def servers() -> Iterator[list[_Stoppable]]:
    """Servers a test starts (test_demo.Server and the like): stopped at teardown, also
    when the test fails."""
    started: list[_Stoppable] = []
    yield started
    for s in started:
        s.stop()


def require_tool(*tools: str) -> None:
    """Skip (saying which) when a host tool is missing; `make deps` installs them all."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"host tool(s) missing: {', '.join(missing)} (run `make deps`)")


def el6_source() -> Path:
    """The pristine el6 source for tests that need it; skip with the reason otherwise."""
    src = os.environ.get("FSBUILD_EL6_SRC")
    if not src:
        pytest.skip("FSBUILD_EL6_SRC is unset: point it at the 2.6.32-431.17.1.el6 SRPM, tarball, "
                    "tree or git ref (CI sets it to ../shared/el6/)")
    path = Path(src)
    if not path.exists():
        pytest.skip(f"FSBUILD_EL6_SRC={src} does not exist")
    return path


def _checkout_env() -> dict[str, str]:
    """Environment for builds shared with `make demo`: the checkout's out/ and .fsbuild/."""
    env = dict(os.environ)
    env["FSBUILD_OUT"] = str(ROOT / "out")
    env["FSBUILD_STATE"] = str(ROOT / ".fsbuild")
    return env


@pytest.fixture(scope="session")
def linux61_rpms() -> Path:
    """The linux-6.1 mini RPMs (kernel, kernel-devel, kernel-firmware) in the checkout's
    out/linux-6.1/rpms, built once per session through `fsbuild rpm` — incremental, so a
    second session (or `make demo` afterwards) reuses them. Boot and module tests use
    these, so they test what the pipeline really produces."""
    import subprocess
    import sys

    if not Path("/usr/src/linux-source-6.1.tar.xz").exists() and not os.environ.get("FSBUILD_LINUX61_SRC"):
        pytest.skip("linux-6.1 source missing: apt-get install linux-source-6.1 (make deps)")
    require_tool("rpmbuild", "make", "gcc", "bc", "bison", "flex")
    proc = subprocess.run([sys.executable, "-m", "fsbuild", "rpm", "--target", "linux-6.1",
                           "--config", "mini"], cwd=ROOT, env=_checkout_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rpms = ROOT / "out" / "linux-6.1" / "rpms"
    assert list(rpms.glob("kernel-[0-9]*.x86_64.rpm")), f"no kernel RPM in {rpms}"
    return rpms


@pytest.fixture(scope="session")
def linux61_kernel_devel(linux61_rpms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/usr/src/kernels/KVER of the built kernel-devel, installed with its kernel into an
    empty RPM root (so ROOT/boot/vmlinuz-KVER is the image the modules are built for)."""
    import subprocess

    root = tmp_path_factory.mktemp("kdevel-root")
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True)
    pkgs = sorted(linux61_rpms.glob("kernel-devel-*.rpm")) + sorted(linux61_rpms.glob("kernel-[0-9]*.rpm"))
    assert len(pkgs) == 2, f"want one kernel and one kernel-devel RPM in {linux61_rpms}: {pkgs}"
    # --nodeps: the empty root has no base system to satisfy the package's requirements
    # (and no /bin/sh: rpm warns that %post cannot run and installs anyway).
    subprocess.run(["rpm", "--root", str(root), "--nodeps", "-i", *map(str, pkgs)],
                   check=True, capture_output=True)
    kdirs = sorted((root / "usr" / "src" / "kernels").iterdir())
    assert len(kdirs) == 1, kdirs
    return kdirs[0]


@pytest.fixture()
def kernel_rpm(request: pytest.FixtureRequest) -> Path:
    """The kernel RPM boot tests boot: $FSBUILD_TEST_KERNEL (an RPM or a directory of RPMs),
    else the linux-6.1 RPMs this checkout builds (linux61_rpms)."""
    from fsbuild import smoke

    env = os.environ.get("FSBUILD_TEST_KERNEL")
    where = Path(env) if env else request.getfixturevalue("linux61_rpms")
    return where if where.is_file() else smoke.find_kernel_rpm(where)


def proc_state(pid: int) -> str:
    """A process's state letter from /proc (R, S, Z, ...), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def proc_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(x) for x in path.read_text().split()]
    except OSError:
        return []
