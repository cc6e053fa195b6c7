from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import IO

from fsbuild.tario import write_tar_gz


@dataclass
class Src:
    name: str
    kind: str
    mode: int = 0o644
    data: bytes = b""
    link: str = ""

    def size(self) -> int:
        return len(self.data)

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.data)


ENTRIES = [Src("d", "dir", 0o700), Src("d/run", "file", 0o755, b"#!/bin/sh\n"), Src("d/l", "symlink", link="run")]


def _tar(mtime: int, topdir: str | None = "top") -> bytes:
    out = io.BytesIO()
    write_tar_gz(out, ENTRIES, mtime=mtime, topdir=topdir)
    return out.getvalue()


def test_same_entries_same_bytes_and_mtime_shows() -> None:
    assert _tar(5) == _tar(5)
    assert _tar(5) != _tar(6)


def test_members_owner_modes_and_order() -> None:
    with tarfile.open(fileobj=io.BytesIO(_tar(5))) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["top", "top/d", "top/d/run", "top/d/l"]
        assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "root", "root", 5)}
        assert [m.mode for m in members] == [0o755, 0o755, 0o755, 0o777]   # dirs 0755 whatever given
        assert members[3].linkname == "run"
        run = tf.extractfile(members[2])
        assert run is not None and run.read() == b"#!/bin/sh\n"


def test_without_topdir_names_are_as_given() -> None:
    with tarfile.open(fileobj=io.BytesIO(_tar(5, None))) as tf:
        assert tf.getnames() == ["d", "d/run", "d/l"]
