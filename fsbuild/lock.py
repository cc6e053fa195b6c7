"""One lock per tree or workspace: an flock on a lock file, released by the kernel when the
holder dies (SIGKILL included), so a stale lock never needs cleaning by hand."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsbuild.errors import LockHeldError


def _recorded(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _command(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv)
    return text if len(text) <= 80 else text[:77] + "..."


def holders(fd: int) -> list[str]:
    """Every other process with the lock file open ("PID (command)"), found through
    /proc/PID/fd: the flock belongs to the open file, so a process that inherited it holds
    the lock even when the pid written in the file is long gone."""
    st = os.fstat(fd)
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid())):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue   # gone, or another user's
        for n in fds:
            try:
                other = os.stat(f"/proc/{pid}/fd/{n}")
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                found.append(f"{pid} ({_command(pid)})")
                break
    return found


def _held_message(what: str, fd: int) -> str:
    found = holders(fd)
    who = f"pid {', '.join(found)}" if found else f"pid {_recorded(fd)}"
    return f"{what} is locked by another fsbuild ({who}); wait for it to finish"


@contextmanager
def hold(lockfile: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock `lockfile` for the body. Without `wait`, a lock held by
    another process raises LockHeldError naming `what` and the holder's pid."""
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeldError(_held_message(what, fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last fd releases the flock
