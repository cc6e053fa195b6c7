"""The one subprocess wrapper: runs a command, optionally tees into a log file, and turns a
failure into the caller's error class with the command's last output lines."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from fsbuild.errors import FsbuildError, ToolMissingError


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
) -> subprocess.CompletedProcess[bytes]:
    """Run cmd; on non-zero exit raise `error` naming the command and its output tail.
    With `log`, stdout+stderr are appended to that file instead of captured."""
    argv = [str(c) for c in cmd]
    which(argv[0])
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(f"$ {shlex.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.run(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  input=input, timeout=timeout)
        if proc.returncode != 0:
            raise error(f"`{shlex.join(argv[:3])}…` failed (exit {proc.returncode}); "
                        f"last lines of {log}: {tail(log)}")
        return proc
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, input=input, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise error(f"`{shlex.join(argv[:3])}…` failed (exit {proc.returncode}): "
                    f"{' | '.join(out[-3:])}")
    return proc


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])
