"""Write-ahead journal for `fsbuild apply`: an undo log kept inside the tree.

Before the first byte of the tree changes, TREE/.fsbuild-journal/ holds every original the
run will replace or delete (a hard link to the untouched inode, so content, mode and type
survive exactly; a copy where links are not allowed), the directories the run may create
or remove, and a manifest naming all of it, fsync'd. New content is staged inside the
journal too, so the tree never holds temp files. `recover(TREE)` puts every original back
and is idempotent, so a SIGKILL or power loss at any moment — even during a recovery — is
undone by running it again. The journal lives in the tree so that it is on the same
filesystem (renames are atomic) and is found from TREE alone.

Every state on disk has one meaning, whatever instant a kill lands on:
  .fsbuild-journal.new/        being prepared; the tree is untouched      -> discard
  .fsbuild-journal/manifest    the tree is being written                  -> roll back
  .fsbuild-journal/complete    every file is written (the commit point)   -> keep, discard
  .fsbuild-journal.old/        finished with (run kept or rolled back)    -> discard
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsbuild import paths
from fsbuild.errors import RecoveryError, UnsafePathError

JOURNAL = ".fsbuild-journal"
PREPARING = JOURNAL + ".new"
FINISHED = JOURNAL + ".old"
MANIFEST = "manifest.json"
COMPLETE = "complete"  # the manifest's name once every file is written
VERSION = 1


def journal_dir(root: Path) -> Path:
    return Path(root) / JOURNAL


def lock_file(root: Path) -> Path:
    """The per-tree lock, outside the tree (it must not change its content), keyed by the
    directory's identity so every path spelling of one tree shares the lock."""
    st = os.stat(root)
    key = hashlib.sha256(f"{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:16]
    return paths.state_dir() / "locks" / f"apply-{key}.lock"


def pending(root: Path) -> bool:
    return any(os.path.lexists(Path(root) / name) for name in (JOURNAL, PREPARING, FINISHED))


def in_journal(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    return top in (JOURNAL, PREPARING, FINISHED)


# ---------------------------------------------------------------- durability


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Up to this many paths, complete() fsyncs each written file and every directory above a
# changed path; beyond, one syncfs is cheaper than the many fsyncs.
SYNC_EACH_MAX = 256


def sync_paths(root: Path, rels: list[str]) -> bool:
    """Make the writes to rels durable one by one: each regular file's data, then every
    existing directory from each path's parent up to root (renames, unlinks, mkdirs and
    rmdirs live in them). syncfs would also wait for every other writer's dirty data on
    the filesystem (a build next door), which can take seconds. False when a path may not
    be opened (mode 000 as another user): the caller syncs the filesystem instead."""
    dirs: set[str] = set()
    try:
        for rel in rels:
            path = root / rel
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                st = None  # deleted: its directory records it
            if st is not None and stat.S_ISREG(st.st_mode):
                _fsync_path(path)
            parts = rel.split("/")[:-1]
            dirs.update("/".join(parts[:k]) for k in range(len(parts) + 1))
        for d in sorted(dirs, key=lambda d: -d.count("/") if d else 1):  # deepest first
            if os.path.isdir(root / d) and not os.path.islink(root / d):
                _fsync_path(root / d)
    except PermissionError:
        return False
    return True


def sync_tree(root: Path) -> None:
    """Flush every write under root at once (syncfs): one call instead of an fsync per
    staged file. Falls back to a global sync where syncfs is missing."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writing the journal


@dataclass
class Journal:
    """An open journal: `staged(i)` is where entry i's new content is written before it
    is renamed over the tree; `complete()` marks the run done, then `remove()` cleans up."""

    root: Path
    rels: list[str]

    @property
    def dir(self) -> Path:
        return journal_dir(self.root)

    def staged(self, index: int) -> Path:
        return self.dir / "new" / str(index)

    def complete(self) -> None:
        """The commit point: from here on, recovery keeps the new tree."""
        # The new tree is durable before its undo log goes.
        if len(self.rels) > SYNC_EACH_MAX or not sync_paths(self.root, self.rels):
            sync_tree(self.root)
        os.rename(self.dir / MANIFEST, self.dir / COMPLETE)
        _fsync_path(self.dir)

    def remove(self) -> None:
        os.rename(self.dir, self.root / FINISHED)  # one step: never a half-deleted journal
        shutil.rmtree(self.root / FINISHED)


def begin(root: Path, changes: dict[str, bool]) -> Journal:
    """Record the current state of every path in `changes` (rel -> True when the run
    writes it, False when it deletes it). Nothing in the tree is modified here, except
    creating the journal directory itself."""
    root = Path(root)
    rels = sorted(changes)
    for rel in rels:
        if in_journal(rel):
            raise UnsafePathError(f"a patch writes {rel}, inside fsbuild's journal "
                                  f"{JOURNAL}/; refusing")
    if pending(root):
        raise RecoveryError(f"{root} holds the journal of an interrupted apply; run "
                            f"`fsbuild apply --recover {root}`")
    jdir = root / PREPARING
    os.mkdir(jdir, 0o700)
    try:
        for sub in ("orig", "new"):
            os.mkdir(jdir / sub, 0o700)
        files = [{"path": rel, "orig": _save_original(root, rel, jdir / "orig" / str(i))}
                 for i, rel in enumerate(rels)]
        manifest = {"version": VERSION, "pid": os.getpid(), "files": files,
                    "mkdirs": _missing_dirs(root, [r for r in rels if changes[r]]),
                    "dirs": _parent_modes(root, [r for r in rels if not changes[r]])}
        with open(jdir / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(jdir / "orig")
        _fsync_path(jdir)
        os.rename(jdir, journal_dir(root))  # the journal is valid from here on
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(jdir, ignore_errors=True)  # the tree itself is still untouched
        raise
    return Journal(root, rels)


def _save_original(root: Path, rel: str, dest: Path) -> str:
    """'absent', or 'saved' with the original at dest (same inode when possible)."""
    src = root / rel
    try:
        st = os.lstat(src)
    except (FileNotFoundError, NotADirectoryError):
        return "absent"
    if stat.S_ISDIR(st.st_mode):
        return "dir"  # writing over it fails before it changes; nothing to put back
    try:
        os.link(src, dest, follow_symlinks=False)
        return "saved"
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
    else:
        shutil.copy2(src, dest, follow_symlinks=False)
        _fsync_path(dest)
    return "saved"


def _missing_dirs(root: Path, written: list[str]) -> list[str]:
    """Directories the run will create, parents first."""
    out: dict[str, None] = {}
    for rel in written:
        parts = rel.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/".join(parts[:k])
            if d not in out and not os.path.isdir(root / d):
                out[d] = None
    return sorted(out, key=lambda d: d.count("/"))


def _parent_modes(root: Path, deleted: list[str]) -> list[list[object]]:
    """Every existing parent of a deleted file, with its mode: removing a file may remove
    the directories it leaves empty (GNU patch does), and recovery recreates them."""
    out: dict[str, int] = {}
    for rel in deleted:
        parts = rel.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/".join(parts[:k])
            if d not in out:
                out[d] = stat.S_IMODE(os.lstat(root / d).st_mode)
    return [[d, m] for d, m in sorted(out.items(), key=lambda kv: kv[0].count("/"))]


# ---------------------------------------------------------------- recovery


@dataclass
class Recovery:
    state: str  # "rolled back", "kept" (the run had written every file), "leftovers"
    restored: int = 0  # paths put back


def recover(root: Path) -> Recovery | None:
    """Bring the tree back to a whole state after an interrupted apply: roll it back,
    or keep it when the run had passed its commit point. None when there is nothing to
    do. Safe to run again after being interrupted itself."""
    root = Path(root)
    jdir = journal_dir(root)
    result = None
    try:
        if os.path.lexists(jdir):
            result = _recover_journal(root, jdir)
            os.rename(jdir, root / FINISHED)
        for name in (PREPARING, FINISHED):
            if os.path.lexists(root / name):
                shutil.rmtree(root / name)
                result = result or Recovery("leftovers")
    except OSError as exc:
        raise RecoveryError(f"cannot recover {root}: {exc.filename or ''}: "
                            f"{exc.strerror}") from exc
    return result


def _recover_journal(root: Path, jdir: Path) -> Recovery:
    if os.path.lexists(jdir / COMPLETE):
        return Recovery("kept")
    manifest = _read_manifest(jdir)
    restored = _undo(root, jdir, manifest)
    sync_tree(root)  # the originals are back for good before the journal goes
    return Recovery("rolled back", restored)


def _read_manifest(jdir: Path) -> dict[str, Any]:  # parsed JSON: checked by use
    try:
        text = (jdir / MANIFEST).read_text(encoding="utf-8")
        manifest = json.loads(text)
    except FileNotFoundError:
        raise RecoveryError(f"{jdir} has neither a manifest nor a completion mark; the "
                            "tree cannot be rolled back automatically") from None
    except ValueError as exc:
        raise RecoveryError(f"{jdir / MANIFEST} is corrupt ({exc}); the tree cannot be "
                            "rolled back automatically") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise RecoveryError(f"{jdir / MANIFEST}: unknown journal version")
    return manifest


def _undo(root: Path, jdir: Path, manifest: dict[str, Any]) -> int:
    for d, mode in manifest["dirs"]:
        if not os.path.isdir(root / d):
            os.mkdir(root / d)
            os.chmod(root / d, mode)
    restored = 0
    for i, entry in enumerate(manifest["files"]):
        target = root / entry["path"]
        if entry["orig"] == "absent":
            if os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)
                restored += 1
        elif (entry["orig"] == "saved" and os.path.lexists(jdir / "orig" / str(i))
              and not _same_inode(jdir / "orig" / str(i), target)):
            os.replace(jdir / "orig" / str(i), target)
            restored += 1
        # else: put back by an earlier, interrupted recovery
    for d in reversed(manifest["mkdirs"]):
        try:
            os.rmdir(root / d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    return restored


def _same_inode(a: Path, b: Path) -> bool:
    """The original was never replaced (its hard link in the journal is the file)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
