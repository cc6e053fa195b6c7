"""The one subprocess wrapper: runs a command, optionally tees into a log file, and turns a
failure into the caller's error class with the command's last output lines."""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from fsbuild.errors import FsbuildError, ToolMissingError

_log = logging.getLogger(__name__)  # -v shows every command run


def which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolMissingError(f"{tool} not found; run `fsbuild doctor` for the install command")
    return path


def run(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    error: type[FsbuildError] = FsbuildError,
    input: bytes | None = None,
    timeout: float | None = None,
    timeout_message: str = "",
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run cmd; on non-zero exit (with `check`) raise `error` naming the command and its
    output tail. With `log`, stdout+stderr are appended to that file instead of captured.
    A command that cannot start, or runs past `timeout` seconds (killed then), raises
    `error` too, with `timeout_message` appended: callers never see subprocess's own
    exceptions."""
    argv = [str(c) for c in cmd]
    which(argv[0])
    _log.info("$ %s", shlex.join(argv))
    shown = f"`{shlex.join(argv[:3])}{'…' if len(argv) > 3 else ''}`"
    try:
        if log is not None:
            proc = _run_logged(argv, cwd, env, log, input, timeout)
        else:
            proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, input=input,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        hint = f" ({timeout_message})" if timeout_message else ""
        raise error(f"{shown} timed out after {timeout:g} s and was killed{hint}") from None
    except OSError as exc:
        raise error(f"cannot run {shown}: {exc.strerror}") from None
    if check and proc.returncode != 0:
        raise error(f"{shown} failed ({_status(proc.returncode)}): {_last_lines(proc, log)}")
    return proc


def _run_logged(argv: list[str], cwd: Path | None, env: Mapping[str, str] | None, log: Path,
                input: bytes | None, timeout: float | None) -> subprocess.CompletedProcess[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"$ {shlex.join(argv)}\n".encode())
        fh.flush()
        return subprocess.run(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              input=input, timeout=timeout)


def _status(rc: int) -> str:
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"


def _last_lines(proc: subprocess.CompletedProcess[bytes], log: Path | None) -> str:
    if log is not None:
        return f"last lines of {log}: {tail(log)}"
    out = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip().splitlines()
    return " | ".join(out[-3:]) or "no output"


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])
