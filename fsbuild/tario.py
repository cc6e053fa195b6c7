"""The one deterministic tar.gz writer: same entries -> same bytes (the order given, fixed
owner and mtime, gzip header mtime 0). Upstream snapshots (whose file streams may also feed
the object store as they are read) and the module tarball use it."""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterable
from types import TracebackType
from typing import IO, Protocol

_KINDS = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "file": tarfile.REGTYPE}


class Readable(Protocol):
    """A member's content: read in chunks by tarfile, closed once the member is written
    (a plain file, or a stream that does more with the bytes it hands out)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def __enter__(self) -> Readable: ...

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None, /) -> object: ...


class TarSource(Protocol):
    """One member: a file's content comes from open(), a symlink's target from link."""

    name: str
    kind: str   # file | dir | symlink
    mode: int
    link: str

    def size(self) -> int: ...

    def open(self) -> Readable: ...


def tar_info(name: str, kind: bytes, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_tar_gz(fh: IO[bytes], entries: Iterable[TarSource], *, mtime: int, level: int = 6,
                 topdir: str | None = None) -> None:
    """Write entries (names under `topdir`, which gets its own 0755 entry first) as GNU
    tar in gzip; directories are 0755, symlinks 0777, files keep their mode."""
    with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=level) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tf:
        if topdir is not None:
            tf.addfile(tar_info(topdir, tarfile.DIRTYPE, 0o755, mtime))
        for e in entries:
            name = f"{topdir}/{e.name}" if topdir is not None else e.name
            kind = _KINDS[e.kind]
            mode = {tarfile.DIRTYPE: 0o755, tarfile.SYMTYPE: 0o777}.get(kind, e.mode)
            info = tar_info(name, kind, mode, mtime)
            if kind == tarfile.SYMTYPE:
                info.linkname = e.link
                tf.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = e.size()
                with e.open() as data:
                    tf.addfile(info, data)
            else:
                tf.addfile(info)
