from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from fsbuild.cli import cli


def run_fsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsbuild", *args], capture_output=True, text=True)


def test_help_lists_commands() -> None:
    out = CliRunner().invoke(cli, ["--help"])
    assert out.exit_code == 0
    assert "targets" in out.output and "doctor" in out.output


def test_targets_json_has_both_targets_and_el6_default() -> None:
    proc = run_fsbuild("targets", "--json")
    assert proc.returncode == 0, proc.stderr
    data = {t["name"]: t for t in json.loads(proc.stdout)}
    assert data["el6"]["default"] is True
    assert data["el6"]["version"] == "2.6.32-431.17.1.el6"
    assert "linux-6.1" in data


def test_error_is_one_line_with_distinct_exit_code(monkeypatch) -> None:
    monkeypatch.setenv("FSBUILD_TARGET", "no-such-target")
    proc = subprocess.run([sys.executable, "-c",
                           "from fsbuild.cli import main; from fsbuild import target; "
                           "import click; target.load()"], capture_output=True, text=True)
    assert proc.returncode == 1  # raw exception outside the CLI: not caught there
    from fsbuild.errors import TargetError
    assert TargetError.exit_code == 13


def test_distinct_exit_codes() -> None:
    from fsbuild import errors
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.FsbuildError) and c is not errors.FsbuildError]
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes)), "two failure classes share an exit code"
    assert 1 not in codes and 2 not in codes  # 1: bugs, 2: click usage errors
