"""proc.run, the one subprocess wrapper: every way a command can fail (exit status,
signal, timeout, cannot start) becomes the caller's error class, never a subprocess
exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsbuild import proc
from fsbuild.errors import BuildError, ToolMissingError, UpstreamError


def test_failure_names_command_status_and_output() -> None:
    with pytest.raises(BuildError) as err:
        proc.run(["sh", "-c", "echo one; echo two >&2; exit 3"], error=BuildError)
    assert err.value.message == "`sh -c 'echo one; echo two >&2; exit 3'` failed (exit 3): two"


def test_killed_by_signal_is_named() -> None:
    with pytest.raises(UpstreamError, match=r"failed \(killed by SIGKILL\)"):
        proc.run(["sh", "-c", "kill -9 $$"], error=UpstreamError)


def test_check_false_returns_the_status() -> None:
    assert proc.run(["sh", "-c", "exit 4"], check=False).returncode == 4


def test_timeout_is_the_callers_error() -> None:
    with pytest.raises(BuildError) as err:
        proc.run(["sleep", "30"], error=BuildError, timeout=0.2,
                 timeout_message="the guest helper build hangs")
    assert err.value.message == ("`sleep 30` timed out after 0.2 s and was killed "
                                 "(the guest helper build hangs)")


def test_timeout_with_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with pytest.raises(BuildError, match="timed out after 0.2 s"):
        proc.run(["sleep", "30"], error=BuildError, timeout=0.2, log=log)
    assert log.read_text().startswith("$ sleep 30\n")


def test_cannot_start_is_the_callers_error(tmp_path: Path) -> None:
    exe = tmp_path / "not-a-program"
    exe.write_bytes(b"\x00\x01garbage")
    exe.chmod(0o755)
    with pytest.raises(BuildError, match=r"cannot run `.*not-a-program`: Exec format error"):
        proc.run([exe], error=BuildError)


def test_missing_tool() -> None:
    with pytest.raises(ToolMissingError, match="no-such-tool-xyz not found"):
        proc.run(["no-such-tool-xyz"])
