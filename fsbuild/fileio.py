"""Small file helpers every module shares: one way to replace a file atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask cannot be read without setting it


@contextlib.contextmanager
def atomic_open(path: Path, *, fsync: bool = True) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` in one step when the block ends without an error.
    The temporary name is unique per writer (two writers never share it: the last rename
    wins whole), the data is fsync'd before the rename, and on error nothing is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what a plain open() would have created
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data` atomically (see atomic_open)."""
    with atomic_open(path, fsync=fsync) as fh:
        fh.write(data)


def walk_sorted(root: Path, skip_dirs: Collection[str] = ()) -> Iterator[tuple[str, Path]]:
    """Every path under `root` as (relative name, full path) in a stable order: each
    directory's names sorted, a directory's own entry before its contents. Directories
    named in `skip_dirs` are neither listed nor entered; symlinks are listed, not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            yield (name if rel_dir == "." else f"{rel_dir}/{name}"), Path(dirpath) / name


def sha256_file(path: Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
