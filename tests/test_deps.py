"""ci/deps.sh prints one line per step; tools' output goes to a log named on failure."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _step(tmp_path: Path, cmd: str) -> subprocess.CompletedProcess[str]:
    log = tmp_path / "deps.log"
    script = f'source "{ROOT}/ci/deps.sh"; step "thing" {cmd}; echo after'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "FSBUILD_DEPS_LOG": str(log)})


def test_step_is_one_line_and_logs_the_noise(tmp_path: Path) -> None:
    cp = _step(tmp_path, "sh -c 'for i in 1 2 3; do echo unpacking package $i; done'")
    assert cp.returncode == 0 and cp.stdout == "deps: thing ... ok\nafter\n" and cp.stderr == ""
    assert "unpacking package 3" in (tmp_path / "deps.log").read_text()


def test_failed_step_names_the_log_and_stops(tmp_path: Path) -> None:
    cp = _step(tmp_path, "sh -c 'echo E: Unable to locate package nope; exit 100'")
    assert cp.returncode == 1 and cp.stdout == "deps: thing ... FAILED\n"   # no "after"
    assert "E: Unable to locate package nope" in cp.stderr
    assert cp.stderr.rstrip().splitlines()[-1] == f"deps: thing failed; full log: {tmp_path / 'deps.log'}"
