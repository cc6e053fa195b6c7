"""One lock per tree or workspace: an flock on a lock file, released by the kernel when the
holder dies (SIGKILL included), so a stale lock never needs cleaning by hand."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsbuild.errors import LockHeldError


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


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
            raise LockHeldError(f"{what} is locked by another fsbuild (pid {_holder(fd)}); "
                                "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last fd releases the flock
