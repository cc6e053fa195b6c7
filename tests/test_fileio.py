from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from fsbuild.fileio import atomic_open, atomic_write


def test_concurrent_writers_never_collide(tmp_path: Path) -> None:
    """Two writers of one file (two fsbuild runs saving the same state): each rename moves
    its own whole temporary file. A shared temporary name lost one writer's data or failed
    its rename (FileNotFoundError)."""
    target = tmp_path / "state.json"
    payloads = [bytes([65 + k]) * 200_000 for k in range(2)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(150):
                atomic_write(target, data, fsync=False)
                assert target.read_bytes() in payloads   # never a mix, never partial
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(os.listdir(tmp_path)) == ["state.json"]   # no temporary file left


def test_failed_write_keeps_old_content_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_mode_follows_umask_like_open(tmp_path: Path) -> None:
    atomic_write(tmp_path / "new", b"x")
    (tmp_path / "plain").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_walk_sorted_order_skips_and_symlinks(tmp_path: Path) -> None:
    from fsbuild.fileio import walk_sorted

    for rel in ("b/z", "b/a", "a", ".git/HEAD", "c/.git/x"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "link").symlink_to("b")          # listed, never followed
    got = [rel for rel, _ in walk_sorted(tmp_path, skip_dirs={".git"})]
    assert got == ["a", "b", "c", "link", "b/a", "b/z"]
    assert all(full == tmp_path / rel for rel, full in walk_sorted(tmp_path))
