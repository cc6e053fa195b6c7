"""Quilt series files and transactional application of a whole series to a tree.

`parse_series` reads a quilt `series` file (comments, blank lines, per-entry `-pN`/`-R`);
`apply_series` applies every patch in memory over an overlay of the tree (each touched file
is read once) and writes only when all patches applied, through a write-ahead journal
(fsbuild/journal.py): rolled back on SIGINT/SIGTERM/SIGHUP, or by `journal.recover` after
SIGKILL or a power cut. Semantics follow `quilt push` (GNU patch -p1 -f, fuzz as given).
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fsbuild import journal
from fsbuild.errors import (
    MissingFileError,
    PatchApplyError,
    PatchFormatError,
    RecoveryError,
    RunInterruptedError,
    UnsafePathError,
)
from fsbuild.fileio import atomic_write
from fsbuild.patch import (
    FilePatch,
    Hunk,
    HunkFailed,
    HunkLog,
    Patch,
    apply_hunks,
    read_patch,
    resolves_inside,
    safe_relpath,
    strip_path,
)

# ---------------------------------------------------------------- series file


@dataclass
class SeriesEntry:
    """One patch line of a series file."""

    name: str
    strip: int = 1
    reverse: bool = False
    lineno: int = 0
    comment: str = ""  # trailing comment, kept for round-trips
    raw: str = ""  # the original line (without newline)


@dataclass
class Series:
    path: Path
    entries: list[SeriesEntry]
    lines: list[str] = field(default_factory=list)  # every original line, for write_series

    @property
    def folder(self) -> Path:
        return self.path.parent

    def patch_path(self, entry: SeriesEntry) -> Path:
        return self.folder / entry.name


def _split_comment(line: str) -> tuple[str, str]:
    """quilt's rule: `#` at line start or after whitespace starts a comment."""
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i], line[i:]
    return line, ""


def parse_series_text(text: str, path: Path) -> Series:
    entries: list[SeriesEntry] = []
    lines = text.splitlines()
    for no, line in enumerate(lines, 1):
        body, comment = _split_comment(line)
        fields = body.split()
        if not fields:
            continue
        entry = SeriesEntry(name=fields[0], lineno=no, comment=comment, raw=line)
        opts = iter(fields[1:])
        for opt in opts:
            if opt == "-R":
                entry.reverse = True
            elif opt == "-p":
                entry.strip = _strip_level(next(opts, ""), path, no)
            elif opt.startswith("-p"):
                entry.strip = _strip_level(opt[2:], path, no)
            else:
                raise PatchFormatError(f"{path}:{no}: unsupported patch option {opt!r}")
        _check_entry_name(entry, path)
        entries.append(entry)
    return Series(path=path, entries=entries, lines=lines)


def _strip_level(text: str, path: Path, no: int) -> int:
    if not text.isdigit():
        raise PatchFormatError(f"{path}:{no}: bad strip level {text!r}")
    return int(text)


def _check_entry_name(entry: SeriesEntry, path: Path) -> None:
    if entry.name.startswith("/") or ".." in entry.name.split("/"):
        raise UnsafePathError(f"{path}:{entry.lineno}: patch name {entry.name!r} "
                              "escapes the series folder")


def parse_series(path: Path | str, check_files: bool = True) -> Series:
    """Parse a series file; with check_files every named patch must exist
    (MissingFileError naming the series line otherwise)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise MissingFileError(f"series file {path} does not exist") from None
    except IsADirectoryError:
        raise MissingFileError(f"series file {path} is a directory") from None
    series = parse_series_text(text, path)
    if check_files:
        root = series.folder.resolve()
        for e in series.entries:
            p = series.patch_path(e)
            real = p.resolve()
            if real != root and root not in real.parents:
                raise UnsafePathError(f"{path}:{e.lineno}: patch {e.name} leads outside "
                                      f"{series.folder} (symlink)")
            if not p.is_file():
                raise MissingFileError(f"{path}:{e.lineno}: patch file {p} does not exist")
    return series


def format_entry(e: SeriesEntry) -> str:
    opts = ([f"-p{e.strip}"] if e.strip != 1 else []) + (["-R"] if e.reverse else [])
    text = " ".join([e.name, *opts])
    return f"{text} {e.comment}" if e.comment else text


def write_series(series: Series, path: Path | None = None) -> str:
    """Render a series: unchanged entries keep their original line (comments, blank lines
    and spacing survive), removed entries lose only their own line, and new entries
    (lineno 0) go right after the entry before them in `series.entries` (before the first
    kept entry when they lead). Existing entries keep their place in the file."""
    kept = {e.lineno for e in series.entries if e.lineno}
    after: dict[int, list[SeriesEntry]] = {}   # lineno of the kept entry before -> new ones
    prev = 0
    for e in series.entries:
        if e.lineno:
            prev = e.lineno
        else:
            after.setdefault(prev, []).append(e)
    first = min(kept, default=0)
    by_line = {e.lineno: e for e in series.entries if e.lineno}
    out: list[str] = []
    for no, line in enumerate(series.lines, 1):
        if no == first:
            out.extend(format_entry(e) for e in after.pop(0, []))
        found = by_line.get(no)
        if found is None:
            if not _split_comment(line)[0].split():
                out.append(line)  # comment or blank line
            continue  # an entry that was removed
        e = found
        original = parse_series_text(e.raw, series.path).entries
        same = original and original[0] == SeriesEntry(e.name, e.strip, e.reverse, 1,
                                                      e.comment, e.raw)
        out.append(e.raw if same else format_entry(e))
        out.extend(format_entry(n) for n in after.pop(no, []))
    out.extend(format_entry(e) for new in after.values() for e in new)
    text = "".join(f"{line}\n" for line in out)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8", errors="surrogateescape")
    return text


# ---------------------------------------------------------------- tree overlay


@dataclass
class FileState:
    data: bytes
    mode: int  # permission bits
    link: bool = False  # a symlink; data is its target


LINK_TYPE = 0o120000
_TYPE_MASK = 0o170000
MAX_LINK_HOPS = 40  # Linux's MAXSYMLINKS


class Tree:
    """The on-disk tree plus in-memory changes. Each file is read at most once; no path
    component may be a symlink (a patch must never write through one)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.orig: dict[str, FileState | None] = {}
        self.cur: dict[str, FileState | None] = {}
        self._dirs: dict[str, bool] = {"": True}
        self._umask = _umask()

    def _check_dirs(self, rel: str) -> bool:
        """True when every parent directory exists (and none is a symlink)."""
        parts = rel.split("/")[:-1]
        prefix = ""
        for part in parts:
            prefix = f"{prefix}/{part}" if prefix else part
            known = self._dirs.get(prefix)
            if known is None:
                if (st_ := self.cur.get(prefix)) is not None and st_.link:
                    raise UnsafePathError(f"{prefix} in {self.root} is a symlink made by the "
                                          "series; refusing to patch through it")
                try:
                    st = os.lstat(self.root / prefix)
                except FileNotFoundError:
                    known = False
                except NotADirectoryError:
                    known = False
                else:
                    if stat.S_ISLNK(st.st_mode):
                        raise UnsafePathError(f"{prefix} in {self.root} is a symlink; "
                                              "refusing to patch through it")
                    known = stat.S_ISDIR(st.st_mode)
                self._dirs[prefix] = known
            if not known:
                return False
        return True

    def _load(self, rel: str) -> FileState | None:
        if rel in self.orig:
            return self.orig[rel]
        state: FileState | None = None
        if self._check_dirs(rel):
            full = self.root / rel
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is not None:
                if stat.S_ISLNK(st.st_mode):  # only a diff of the link itself may use it
                    state = FileState(os.fsencode(os.readlink(full)), 0o777, link=True)
                elif stat.S_ISREG(st.st_mode):
                    with open(full, "rb") as fh:
                        state = FileState(fh.read(), stat.S_IMODE(st.st_mode) & 0o777)
        self.orig[rel] = state
        return state

    def get(self, rel: str) -> FileState | None:
        if rel in self.cur:
            return self.cur[rel]
        return self._load(rel)

    def set(self, rel: str, state: FileState | None) -> None:
        self._load(rel)  # remember the original for the diff and the symlink check
        self.cur[rel] = state

    def is_link(self, rel: str) -> bool:
        st = self.get(rel) if self._check_dirs(rel) else None
        return st is not None and st.link

    def new_mode(self) -> int:
        return 0o666 & ~self._umask

    def changes(self) -> dict[str, FileState | None]:
        """Paths whose final state differs from the disk (content or mode)."""
        return {rel: st for rel, st in self.cur.items() if st != self.orig.get(rel)}

    def missing_dirs(self, rel: str) -> int:
        """How many directories creating rel would need (GNU prefers fewest)."""
        parts = rel.split("/")[:-1]
        for k in range(len(parts), 0, -1):
            if self._check_dirs("/".join(parts[:k]) + "/x"):
                return len(parts) - k
        return len(parts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- applying one patch


@dataclass
class PatchReport:
    name: str
    files: list[str] = field(default_factory=list)
    hunks: HunkLog = field(default_factory=HunkLog)


def _reverse(fp: FilePatch) -> FilePatch:
    swap = {"+": "-", "-": "+", " ": " "}
    hunks = [Hunk(h.new_start, h.new_len, h.old_start, h.old_len, h.section,
                  [(swap[t], c) for t, c in h.lines], h.lineno) for h in fp.hunks]
    return FilePatch(fp.new_name, fp.old_name, fp.lineno, fp.header, hunks, fp.git,
                     fp.new_mode, fp.old_mode, fp.rename, fp.copy, fp.binary,
                     fp.new_absent, fp.old_absent, fp.index_name)


def _best_name(names: list[str | None], ignore: list[bool]) -> int | None:
    """GNU best_name: fewest components, then shortest basename, then shortest name."""
    best: tuple[int, int, int] | None = None
    pick = None
    for i, n in enumerate(names):
        if n is None or ignore[i]:
            continue
        key = (n.count("/"), len(n.rsplit("/", 1)[-1]), len(n))
        if best is None or key < best:
            best, pick = key, i
    return pick


def _choose_input(tree: Tree, fp: FilePatch, old: str | None, new: str | None) -> str | None:
    names = [old, new]
    exists = [n is not None and tree.get(n) is not None for n in names]
    i = _best_name(names, [not e for e in exists])
    if i is None and fp.old_absent:
        dirs = [tree.missing_dirs(n) if n is not None else 0 for n in names]
        lowest = min(d for n, d in zip(names, dirs, strict=True) if n is not None) if any(names) else 0
        i = _best_name(names, [n is None or d != lowest for n, d in zip(names, dirs, strict=True)])
    return names[i] if i is not None else None


def apply_file(tree: Tree, fp: FilePatch, strip: int, fuzz: int, patch: str,
               report: PatchReport) -> None:
    """Apply one file's diff to the overlay (GNU patch's per-file main loop)."""
    old = strip_path(fp.old_name, strip) if fp.old_name else None
    new = strip_path(fp.new_name, strip) if fp.new_name else None
    old = safe_relpath(old, f"{patch}:{fp.lineno}") if old else None
    new = safe_relpath(new, f"{patch}:{fp.lineno}") if new else None
    inname = _choose_input(tree, fp, old, new)
    if inname is None:
        shown = fp.new_name or fp.old_name
        raise PatchApplyError(f"patch {patch}: {shown}: file to patch not found "
                              f"(diff at line {fp.lineno})")
    if (fp.rename or fp.copy) and (old is None or new is None):
        raise PatchApplyError(f"patch {patch}: cannot rename/copy {inname} without two names")
    outname = new if (fp.rename or fp.copy) and new else inname
    link = _is_link_diff(fp, patch, outname)
    state = tree.get(inname)
    if state is not None and state.link != link:
        if state.link:
            raise UnsafePathError(f"{inname} in {tree.root} is a symlink (to "
                                  f"{state.data.decode(errors='replace')}); refusing to patch it")
        raise PatchApplyError(f"patch {patch}: {inname}: the diff is for a symlink, "
                              "the file is not one")
    data = state.data if state else b""
    try:
        out, results = apply_hunks(data, fp.hunks, fuzz, outname, creating=fp.old_absent == 2)
    except HunkFailed as exc:
        raise PatchApplyError(f"patch {patch}: {outname}: hunk #{exc.index} FAILED "
                              f"({exc.why}; expected at line {exc.line})") from None
    report.files.append(outname)
    report.hunks.extend(results)
    if not out and fp.new_absent == 2:
        tree.set(outname, None)
        if fp.rename and inname != outname:
            tree.set(inname, None)
        return
    if out and fp.new_absent == 2:
        raise PatchApplyError(f"patch {patch}: {outname}: not deleting the file as its "
                              "content differs from the patch")
    set_mode = bool(fp.new_mode) and fp.old_mode != fp.new_mode
    if not fp.hunks and not set_mode and not fp.rename and not fp.copy:
        return  # GNU leaves such files alone
    if link:
        _check_link_target(tree, outname, out, patch)
        tree.set(outname, FileState(out, 0o777, link=True))
        if fp.rename and inname != outname:
            tree.set(inname, None)
        return
    if set_mode:
        mode = (fp.new_mode or 0) & 0o777  # set_mode: new_mode is set
    else:
        mode = state.mode if state else tree.new_mode()
    tree.set(outname, FileState(out, mode))
    if fp.rename and inname != outname:
        tree.set(inname, None)


def _is_link_diff(fp: FilePatch, patch: str, name: str) -> bool:
    """Whether the diff is of a symlink (git mode 120000). Like GNU patch, a diff that changes
    a file's type (regular file <-> symlink) is refused."""
    old_type = (fp.old_mode or 0) & _TYPE_MASK
    new_type = (fp.new_mode or 0) & _TYPE_MASK
    if old_type and new_type and old_type != new_type:
        raise PatchApplyError(f"patch {patch}: {name}: cannot change the file type from "
                              f"{old_type:o} to {new_type:o}")
    return (old_type or new_type) == LINK_TYPE


def _check_link_target(tree: Tree, rel: str, target: bytes, patch: str) -> None:
    """A symlink the series creates must point inside the tree, following every link it
    meets on the way (on disk or made earlier in the series), not just by its text."""
    text = target.decode("utf-8", "surrogateescape")
    if not target or b"\0" in target or b"\n" in target:
        raise PatchApplyError(f"patch {patch}: {rel}: invalid symlink target {text!r}")

    def readlink(path: str) -> str | None:
        if path == rel or not tree.is_link(path):
            return None
        st = tree.get(path)
        return st.data.decode("utf-8", "surrogateescape") if st else None

    if text.startswith("/") or not resolves_inside(rel.split("/")[:-1], text, readlink,
                                                   max_hops=MAX_LINK_HOPS):
        raise UnsafePathError(f"patch {patch}: symlink {rel} -> {text} leads outside the tree")


def apply_patch(tree: Tree, patch: Patch, strip: int = 1, fuzz: int = 0,
                reverse: bool = False) -> PatchReport:
    report = PatchReport(patch.name)
    for fp in patch.files:
        apply_file(tree, _reverse(fp) if reverse else fp, strip, fuzz, patch.name, report)
    return report


# ---------------------------------------------------------------- writing

# Signals that end a run: each one rolls the tree back (SIGKILL cannot be caught; the
# journal covers it).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag while the tree is being written, so a stop
    can only land between two whole-file operations and the rollback is never cut short."""

    def __init__(self) -> None:
        self.hit: int | None = None  # the signal that arrived

    @contextmanager
    def deferred(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def install(self) -> None:
        """Defer for the rest of the process (the CLI: once the tree is written, a late
        signal must not turn a finished run into a failure)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def settle(self) -> None:
        """The run is complete: ignore stop signals until exit. (A Python handler would
        not do: the interpreter restores the default action while it shuts down, and a
        SIGTERM there would kill a run that already succeeded.)"""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handler(self, signum: int, frame: object) -> None:
        self.hit = signum

    def check(self) -> None:
        if self.hit is not None:
            raise KeyboardInterrupt


def commit(root: Path, changes: dict[str, FileState | None],
           hook: Callable[[str], None] | None = None,
           guard: Interrupts | None = None) -> None:
    """Write changes into root all or nothing. The journal (fsbuild/journal.py) first
    records every original; new files are staged inside it, then renamed into place. On
    a stop signal or an error the journal rolls the tree back; after SIGKILL or a power
    cut, `journal.recover` does. Once the last rename is done the run is complete: a
    signal arriving later no longer undoes it. `hook(step)` runs between steps (tests)."""
    root = Path(root)
    guard = guard or Interrupts()
    items = sorted(changes.items())
    with guard.deferred():
        guard.check()
        try:
            jr = journal.begin(root, {rel: st is not None for rel, st in items})
        except OSError as exc:
            raise PatchApplyError(f"cannot write the journal in {root}: {exc.filename}: "
                                  f"{exc.strerror}; the tree is unchanged") from exc
        current = ""
        try:
            for i, (rel, st) in enumerate(items):
                if st is not None:
                    current = rel
                    _write_temp(jr.staged(i), st)
                    guard.check()
                    if hook:
                        hook("staged")
            for i, (rel, st) in enumerate(items):
                guard.check()  # before, not after: the last rename completes the run
                current = rel
                _replace(root, rel, jr.staged(i) if st is not None else None)
                if hook:
                    hook("replaced")
            for rel, st in items:
                if st is None:
                    _remove_empty_parents(root, (root / rel).parent)
            jr.complete()
        except BaseException as exc:
            _rollback(root, exc, current)
        try:
            jr.remove()
        except OSError as exc:
            raise RecoveryError(f"{root} is fully patched, but its journal {jr.dir} could not "
                                f"be removed ({exc.strerror}); `fsbuild apply --recover "
                                f"{root}` removes it") from exc


def _replace(root: Path, rel: str, staged: Path | None) -> None:
    target = root / rel
    if staged is None:
        os.unlink(target)
        return
    if not target.parent.is_dir():
        os.makedirs(target.parent)  # journal.begin recorded which ones are new
    os.replace(staged, target)


def _rollback(root: Path, exc: BaseException, current: str) -> None:
    """Undo through the journal and raise the error the user sees: it names the tree's
    file (not a staging path) and says "restored" only when the recovery succeeded."""
    try:
        done = journal.recover(root)
    except RecoveryError as failed:
        raise RecoveryError(f"{_describe(exc, current)}; rolling back also failed: "
                            f"{failed.message}") from exc
    if done is not None and done.state == "kept":  # failed after the commit point
        raise RecoveryError(f"{_describe(exc, current)} after every file was written: "
                            "the tree is fully patched") from exc
    if isinstance(exc, KeyboardInterrupt):
        raise RunInterruptedError("interrupted while writing; the tree was restored "
                                  "to its state before the run") from None
    if isinstance(exc, OSError):
        raise PatchApplyError(f"{_describe(exc, current)}; the tree was restored") from exc
    raise exc


def _describe(exc: BaseException, rel: str) -> str:
    if isinstance(exc, OSError):
        return f"cannot write {rel}: {exc.strerror}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted while writing"
    return str(exc)


def _write_temp(tmp: Path, st: FileState) -> None:
    """Write one file's new state at tmp (inside the journal)."""
    if st.link:
        os.symlink(st.data, tmp)
        return
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(st.data)
        os.fchmod(fh.fileno(), st.mode)


def _remove_empty_parents(root: Path, d: Path) -> None:
    """GNU patch removes directories a deleted file leaves empty."""
    while d != root and root in d.parents:
        try:
            os.rmdir(d)
        except OSError:
            return
        d = d.parent


# ---------------------------------------------------------------- whole series


def load_patches(series: Series) -> list[tuple[SeriesEntry, Patch]]:
    out = []
    for e in series.entries:
        out.append((e, read_patch(series.patch_path(e), e.name)))
    return out


def apply_series(series: Series, tree_dir: Path, fuzz: int = 0, dry_run: bool = False,
                 progress: Callable[[str], None] | None = None,
                 hook: Callable[[str], None] | None = None,
                 guard: Interrupts | None = None) -> list[PatchReport]:
    """Apply every patch of the series to tree_dir, all or nothing. The caller holds the
    tree's lock and has recovered any earlier interrupted run (commands/apply.py)."""
    tree_dir = Path(tree_dir)
    if not tree_dir.is_dir():
        raise MissingFileError(f"tree {tree_dir} is not a directory")
    tree = Tree(tree_dir)
    reports = []
    for entry, patch in load_patches(series):
        if guard:
            guard.check()
        if progress:
            progress(entry.name)
        reports.append(apply_patch(tree, patch, entry.strip, fuzz, entry.reverse))
    if not dry_run:
        commit(tree_dir, tree.changes(), hook, guard)
    return reports


# ---------------------------------------------------------------- the workspace's view

@dataclass(frozen=True)
class Entry:
    name: str      # relative to the series file's folder
    strip: int = 1


def read_series(series: Path) -> list[Entry]:
    """Entries of a quilt series file (comments, blank lines, -pN). A `-R` entry has no
    faithful commit form (refresh would write the reversed diff under a `-R` line), so
    the workspace refuses it rather than apply it forward."""
    entries = parse_series(series, check_files=False).entries
    for e in entries:
        if e.reverse:
            raise PatchFormatError(f"{series}:{e.lineno}: {e.name} -R: reversed entries work with "
                                   "`fsbuild apply` and `fsbuild rpm`, not in the git workspace "
                                   "(store the patch inverted instead)")
    return [Entry(e.name, e.strip) for e in entries]



def update_series_file(series: Path, entries: list[Entry]) -> None:
    """Write `entries` through fsbuild.series.write_series, the one series writer: entries
    already in the file keep their line (comments, spacing) and place, dropped ones lose
    only their own line, new ones go after the entry before them."""
    if series.is_file():
        parsed = parse_series(series, check_files=False)
    else:
        parsed = Series(series, [])
    pool: dict[str, list[SeriesEntry]] = {}
    for se in parsed.entries:
        pool.setdefault(se.name, []).append(se)
    chosen: list[SeriesEntry] = []
    for e in entries:
        same_name = pool.get(e.name)
        se = same_name.pop(0) if same_name else SeriesEntry(e.name, e.strip)
        chosen.append(se if se.strip == e.strip else replace(se, strip=e.strip))
    parsed.entries = chosen
    atomic_write(series, write_series(parsed).encode("utf-8", "surrogateescape"))
