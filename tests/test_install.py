"""fsbuild as a Python tool: a wheel installed (not editable) into a fresh venv runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it into a new venv (dependencies read from the host's site
    packages: no network), then run it away from the checkout: `--help` works anywhere, a
    real command says in one line where the project is missing, and finds it through
    --project-dir, FSBUILD_ROOT or the current directory."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "out", ".fsbuild", "*.egg-info", "build",
                                                             "__pycache__", ".mypy_cache", ".ruff_cache"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True)
    wheel = next(wheels.glob("fsbuild-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The host's dependencies by path, without its .pth hooks (an editable fsbuild's finder
    # among them would shadow the wheel).
    site = subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    host = [p for p in sys.path if p.endswith("-packages") and Path(p).is_dir()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FSBUILD_ROOT")}
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--force-reinstall", str(wheel)], check=True, capture_output=True, env=env)
    # after the install: pip would take the host's editable fsbuild for this one
    Path(site, "host-deps.pth").write_text("".join(f"{p}\n" for p in host))
    away = tmp_path / "elsewhere"
    away.mkdir()

    def fsbuild(*args: str, cwd: Path = away, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([venv / "bin/fsbuild", *args], cwd=cwd, env={**env, **extra},
                              capture_output=True, text=True)

    where = subprocess.run([venv / "bin/python", "-c", "import fsbuild; print(fsbuild.__file__)"],
                           cwd=away, env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where              # the wheel, not the checkout
    assert (Path(where).parent / "py.typed").is_file()
    assert fsbuild("--help").returncode == 0
    lost = fsbuild("targets", "--json")
    assert lost.returncode == 3 and lost.stderr.count("\n") == 1 and "--project-dir" in lost.stderr
    names = sorted(p.parent.name for p in (ROOT / "patches").glob("*/target.toml"))
    for found in (fsbuild("--project-dir", str(src), "targets", "--json"),
                  fsbuild("targets", "--json", FSBUILD_ROOT=str(src)),
                  fsbuild("targets", "--json", cwd=src / "patches")):
        assert found.returncode == 0, found.stderr
        assert sorted(t["name"] for t in json.loads(found.stdout)) == names
