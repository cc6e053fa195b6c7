"""The git-backed workspace of a target: state_dir()/<target>/ is a git repository whose
work tree is the kernel. The pristine upstream is a commit tagged `upstream/<version>`
(imported with one `git fast-import` stream straight from the tarball: no extraction, no
`git add` of 70k files); the series is applied on top as one commit per patch, with the
patch's description as message and an `Fsbuild-Patch: <file>` trailer.

Patches are applied in memory by fsbuild.patch (GNU patch semantics), reading the files
from the work tree or from any git tree (GitReader), so push/check/rebase agree with
`fsbuild apply` and quilt byte for byte."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fsbuild import lock, paths, proc, progress, upstream
from fsbuild import patch as P
from fsbuild import series as S
from fsbuild.errors import (
    FsbuildError,
    LockHeldError,
    MissingFileError,
    PatchApplyError,
    PatchFormatError,
    UnsafePathError,
    WorkspaceError,
)
from fsbuild.fileio import atomic_write
from fsbuild.target import Target
from fsbuild.upstream import Upstream, check_member

TRAILER = "Fsbuild-Patch"
DIGEST_TRAILER = "Fsbuild-Upstream-Digest"
IDENT = "fsbuild <fsbuild@localhost> 1000000000 +0000"
GIT_ENV = {"GIT_AUTHOR_NAME": "fsbuild", "GIT_AUTHOR_EMAIL": "fsbuild@localhost",
           "GIT_COMMITTER_NAME": "fsbuild", "GIT_COMMITTER_EMAIL": "fsbuild@localhost",
           "GIT_AUTHOR_DATE": "@1000000000 +0000", "GIT_COMMITTER_DATE": "@1000000000 +0000",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}

Content = tuple[bytes, int] | None   # (bytes, mode) or None for "absent"
Reader = Callable[[str], Content]


# ---------------------------------------------------------------- git plumbing

def git(repo: Path, *args: str, input: bytes | None = None, check: bool = True,
        error: type[FsbuildError] = WorkspaceError) -> subprocess.CompletedProcess[bytes]:
    """git in `repo` with a fixed identity and dates (same content -> same commit ids)."""
    env = {**os.environ, **GIT_ENV}
    argv = ["git", "-C", str(repo), *args]
    return proc.run(argv, env=env, input=input, error=error, check=check)


def git_out(repo: Path, *args: str) -> str:
    return git(repo, *args).stdout.decode().strip()


class GitCat:
    """One persistent `git cat-file --batch` per repository; GitReader views share it."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self._proc = subprocess.Popen(["git", "-C", str(repo), "cat-file", "--batch"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._dirs: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait()

    def __enter__(self) -> GitCat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def object(self, name: str) -> tuple[str, str, bytes] | None:
        """(sha, type, data) of any object name git understands, None when missing."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(name.encode() + b"\n")
        self._proc.stdin.flush()
        header = self._proc.stdout.readline().split()
        if len(header) < 3 or header[1] == b"missing":
            return None
        data = self._proc.stdout.read(int(header[2]) + 1)[:-1]
        return header[0].decode(), header[1].decode(), data

    def reader(self, treeish: str) -> GitReader:
        obj = self.object(f"{treeish}^{{tree}}")
        if obj is None:
            raise WorkspaceError(f"{treeish}: no such tree in {self.repo}")
        return GitReader(self, obj[0])

    def listing(self, tree: str, dirpath: str) -> dict[str, tuple[int, str]]:
        key = (tree, dirpath)
        if key not in self._dirs:
            if dirpath:
                parent, _, base = dirpath.rpartition("/")
                entry = self.listing(tree, parent).get(base)
                sha = entry[1] if entry and entry[0] == 0o40000 else None
            else:
                sha = tree
            obj = self.object(sha) if sha else None
            self._dirs[key] = _parse_tree(obj[2]) if obj and obj[1] == "tree" else {}
        return self._dirs[key]


class GitReader:
    """Reads the files of one git tree (a Reader); modes come from the tree objects."""

    def __init__(self, cat: GitCat, tree: str) -> None:
        self.cat, self.tree = cat, tree

    def isdir(self, path: str) -> bool:
        parent, _, base = path.rpartition("/")
        entry = self.cat.listing(self.tree, parent).get(base)
        return entry is not None and entry[0] == 0o40000

    def __call__(self, path: str) -> Content:
        parent, _, base = path.rpartition("/")
        entry = self.cat.listing(self.tree, parent).get(base)
        if entry is None or entry[0] == 0o40000:
            return None
        obj = self.cat.object(entry[1])
        return (obj[2], entry[0]) if obj else None


def _parse_tree(data: bytes) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    i = 0
    while i < len(data):
        sp = data.index(b" ", i)
        nul = data.index(b"\0", sp)
        mode = int(data[i:sp], 8)
        out[data[sp + 1:nul].decode(errors="surrogateescape")] = (mode, data[nul + 1:nul + 21].hex())
        i = nul + 21
    return out


def tree_reader(root: Path) -> Reader:
    """Reads files of a work tree, refusing paths that leave it through symlinks."""
    real_root = root.resolve()

    class _Read:
        def isdir(self, path: str) -> bool:
            return (root / path).is_dir() and not (root / path).is_symlink()

        def __call__(self, path: str) -> Content:
            return read(path)

    def read(path: str) -> Content:
        full = root / path
        try:
            if not full.resolve().is_relative_to(real_root):
                raise UnsafePathError(f"{path}: leads outside the tree through a symlink")
            st = full.lstat()
        except FileNotFoundError:
            return None
        if not full.is_file():
            return None
        return full.read_bytes(), 0o100755 if st.st_mode & 0o100 else 0o100644

    return _Read()


def _fi_path(path: str) -> bytes:
    """fast-import path: C-quote when it could be misread."""
    if any(c in path for c in '"\n\\') or path.startswith(" "):
        return json.dumps(path).encode()
    return path.encode()


def _fi_data(data: bytes) -> bytes:
    return b"data %d\n" % len(data) + data + b"\n"


@dataclass
class CommitSpec:
    """A commit for fast_commits: parent is a sha, or an int index into the batch."""

    parent: str | int
    message: str
    changes: dict[str, Content] = field(default_factory=dict)


def fast_commits(repo: Path, specs: list[CommitSpec]) -> list[str]:
    """Create the commits in one `git fast-import` run; returns their shas."""
    if not specs:
        return []
    marks = repo / ".git" / "fsbuild" / "fi.marks"
    marks.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[bytes] = [b"feature done\n"]
    for n, spec in enumerate(specs, 1):
        parent = f":{spec.parent + 1}" if isinstance(spec.parent, int) else spec.parent
        chunks.append(b"commit refs/fsbuild/fast-import\nmark :%d\n" % n)
        chunks.append(f"author {IDENT}\ncommitter {IDENT}\n".encode())
        chunks.append(_fi_data(spec.message.encode()))
        chunks.append(f"from {parent}\n".encode())
        for path, content in sorted(spec.changes.items()):
            if content is None:
                chunks.append(b"D " + _fi_path(path) + b"\n")
            else:
                chunks.append(b"M %o inline " % content[1] + _fi_path(path) + b"\n" + _fi_data(content[0]))
        chunks.append(b"\n")
    chunks.append(b"done\n")
    # a Ctrl-C that kills git fast-import too surfaces as the interruption, not a git error
    with deferred_signals():
        git(repo, "fast-import", "--quiet", "--done", "--force", f"--export-marks={marks}",
            input=b"".join(chunks))
        git(repo, "update-ref", "-d", "refs/fsbuild/fast-import")
    by_mark = dict(line.split() for line in marks.read_text().splitlines())
    return [by_mark[f":{n}"] for n in range(1, len(specs) + 1)]


class Overlay:
    """A tree = a git tree + in-memory changes on top."""

    def __init__(self, base: Reader) -> None:
        self.base = base
        self.changes: dict[str, Content] = {}

    def __call__(self, path: str) -> Content:
        return self.changes[path] if path in self.changes else self.base(path)

    def update(self, changes: dict[str, Content]) -> None:
        self.changes.update(changes)
        self._dirs = {d for p, c in self.changes.items() if c is not None
                      for d in _parents(p)}

    def isdir(self, path: str) -> bool:
        if path in getattr(self, "_dirs", ()):
            return True
        isdir = getattr(self.base, "isdir", None)
        return bool(isdir(path)) if isdir else True


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]


# ---------------------------------------------------------------- patches in memory

@dataclass
class Applied:
    """The outcome of applying one patch in memory."""

    changes: dict[str, Content]
    offsets: list[tuple[str, int, int, int]]   # (file, hunk, offset, fuzz) when not exact

    @property
    def exact(self) -> bool:
        return not self.offsets


class _ReaderTree(S.Tree):
    """The series engine's overlay (GNU file-name choice, create/delete rules) over a
    Reader instead of a directory: files come from a git tree or another overlay."""

    def __init__(self, read: Reader) -> None:
        super().__init__(Path("/nonexistent"))
        self._read = read

    def _load(self, rel: str) -> S.FileState | None:
        if rel not in self.orig:
            content = self._read(rel)
            self.orig[rel] = None if content is None else S.FileState(
                content[0], content[1] & 0o777, link=content[1] & 0o170000 == S.LINK_TYPE)
        return self.orig[rel]

    def _check_dirs(self, rel: str) -> bool:
        """GNU picks the file name needing the fewest new directories: ask the reader."""
        isdir = getattr(self._read, "isdir", None)
        if isdir is None:
            return True
        parts = rel.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/".join(parts[:k])
            if d not in self._dirs:
                self._dirs[d] = bool(isdir(d))
            if not self._dirs[d]:
                return False
        return True


def apply_patch(data: bytes, name: str, strip: int, read: Reader, fuzz: int = 0,
                reverse: bool = False) -> Applied:
    """Apply (or reverse-apply) a patch to the files given by `read` with GNU patch
    semantics; nothing is written. Raises PatchApplyError naming patch, file and hunk."""
    parsed = P.parse_patch(data, name)
    for fp in parsed.files:
        if fp.binary:
            raise PatchFormatError(f"{name}: binary diff for {fp.new_name or fp.old_name} is not supported")
    tree = _ReaderTree(read)
    report = S.apply_patch(tree, parsed, strip=strip, fuzz=fuzz, reverse=reverse)
    changes: dict[str, Content] = {
        path: None if st is None else (st.data, S.LINK_TYPE if st.link else
                                       0o100755 if st.mode & 0o100 else 0o100644)
        for path, st in tree.changes().items()}
    offsets = [(r.file, r.hunk, r.offset, r.fuzz) for r in report.hunks if r.offset or r.fuzz]
    return Applied(changes, offsets)


def description(data: bytes, name: str = "<patch>") -> bytes:
    return P.parse_patch(data, name).description


def rerender(original: bytes, new_diff: bytes, name: str) -> bytes:
    """The patch with the original description, per-file headers and trailer kept byte for
    byte, and the hunks taken from `new_diff` (a git diff of the refreshed change)."""
    old = P.parse_patch(original, name)
    new = P.parse_patch(new_diff, name) if new_diff.strip() else P.Patch(name, b"", [])
    by_path = {_key(fp): fp for fp in old.files}
    files: list[P.FilePatch] = []
    leading: list[bytes] = []
    for fp in new.files:
        orig = by_path.get(_key(fp))
        if orig is not None and not (fp.binary or orig.binary):
            fp = P.FilePatch(orig.old_name, orig.new_name, orig.lineno, header=orig.header,
                             hunks=[_like(h, orig.hunks) for h in fp.hunks], git=orig.git)
        files.append(fp)
        idx = old.files.index(orig) if orig is not None else -1
        leading.append(old.leading[idx] if 0 < idx < len(old.leading) else b"")
    out = P.Patch(name, old.description, files, leading, old.trailer)
    return P.format_patch(out)


def _like(h: P.Hunk, olds: Sequence[P.Hunk]) -> P.Hunk:
    """Give a regenerated hunk the `@@` section text the original tool wrote (GNU diff
    without -p writes none; git adds a function name), so only line numbers churn."""
    same = next((o for o in olds if o.lines == h.lines), None)
    if same is not None:
        section = same.section
    elif all(not o.section.strip() for o in olds):
        section = b""
    else:
        return h
    if section != h.section:
        h.section, h.raw = section, None
    return h


def _key(fp: P.FilePatch) -> str:
    name = fp.new_name if fp.new_absent != 2 and fp.new_name else fp.old_name
    return (P.strip_path(name or "", 1) or name or "")


# ---------------------------------------------------------------- series files

@dataclass(frozen=True)
class Entry:
    name: str      # relative to the series file's folder
    strip: int = 1


def read_series(series: Path) -> list[Entry]:
    """Entries of a quilt series file (comments, blank lines, -pN). A `-R` entry has no
    faithful commit form (refresh would write the reversed diff under a `-R` line), so
    the workspace refuses it rather than apply it forward."""
    entries = S.parse_series(series, check_files=False).entries
    for e in entries:
        if e.reverse:
            raise PatchFormatError(f"{series}:{e.lineno}: {e.name} -R: reversed entries work with "
                                   "`fsbuild apply` and `fsbuild rpm`, not in the git workspace "
                                   "(store the patch inverted instead)")
    return [Entry(e.name, e.strip) for e in entries]


# ---------------------------------------------------------------- interrupted runs

@dataclass
class Intent:
    """A step in flight: written before the step touches the work tree or HEAD, removed once
    the step is whole, so a run killed in between (SIGKILL, power loss) is seen by the next
    command instead of passing for the user's own unrefreshed changes."""

    op: str                 # push | pop | refresh
    patch: str              # push/refresh: the patch; pop: the top patch popped
    head: str               # HEAD before the step
    to: str = ""            # pop: the commit it resets to
    paths: list[str] = field(default_factory=list)     # push: every file the patch writes
    created: list[str] = field(default_factory=list)   # push: ... of them, the new ones
    popped: list[str] = field(default_factory=list)    # pop: the patches removed
    pid: int = 0


# the command that resolves an interrupted step (any other mutating command refuses)
RESOLVED_BY = {"push": "pop", "pop": "pop", "refresh": "refresh"}
READ_ONLY = ("list", "check", "export")
CAUGHT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_active: list[list[int]] = []   # the hits of the outermost deferred_signals in force


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM/SIGHUP only set a flag inside the body, so one step is never cut in
    half by a signal we can catch; the interruption is raised when the outermost body ends
    with the flag still set (a body that finished its work clears it). A git child killed
    by the same Ctrl-C reads as the interruption too. Nested uses share the outer flag."""
    if _active or threading.current_thread() is not threading.main_thread():
        yield _active[0] if _active else []
        return
    hits: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: hits.append(signum))
                for sig in CAUGHT_SIGNALS}
    _active.append(hits)
    try:
        yield hits
    except FsbuildError:
        if hits:
            raise KeyboardInterrupt from None
        raise
    finally:
        _active.pop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if hits:
        raise KeyboardInterrupt


GIT_LOCKS = ("index.lock", "HEAD.lock", "ORIG_HEAD.lock", "packed-refs.lock", "config.lock")


def clear_stale_git_locks(repo: Path) -> list[Path]:
    """Remove the lock files a killed git left behind (git never removes another run's
    lock) when no live process works on the repository; LockHeldError naming the pid when
    one does. Callers hold the workspace lock, so no fsbuild of ours is that process."""
    gitdir = repo / ".git"
    found = [gitdir / n for n in GIT_LOCKS if (gitdir / n).exists()]
    if (gitdir / "refs").is_dir():
        found += sorted((gitdir / "refs").rglob("*.lock"))
    if not found:
        return []
    users = repo_users(repo)
    if users:
        raise LockHeldError(f"{found[0].relative_to(repo)} in {repo}: a live process (pid "
                            f"{users[0]}) is working on the repository; wait for it to finish")
    for path in found:
        path.unlink(missing_ok=True)
    return found


def repo_users(repo: Path) -> list[int]:
    """Live processes other than this one that have a file open under repo/.git, or are a
    git started in (or with -C on) the repository."""
    root = str(repo.resolve())
    names = {root.encode(), str(repo).encode()}
    me = os.getpid()
    users = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me and _uses_repo(entry.path, root, names):
            users.append(int(entry.name))
    return users


def _uses_repo(proc_dir: str, root: str, names: set[bytes]) -> bool:
    try:
        argv = Path(proc_dir, "cmdline").read_bytes().split(b"\0")
        if os.path.basename(argv[0]).startswith(b"git"):
            cwd = os.readlink(f"{proc_dir}/cwd")
            if cwd == root or cwd.startswith(root + "/") or names & set(argv):
                return True
        gitdir = root + "/.git"
        for fd in os.scandir(f"{proc_dir}/fd"):
            target = os.readlink(fd.path)
            if target == gitdir or target.startswith(gitdir + "/"):
                return True
    except OSError:   # gone meanwhile, or not ours to inspect
        return False
    return False


def _prune_empty_dirs(root: Path, d: Path) -> None:
    """Remove `d` and its parents up to `root` while they are empty (a rolled-back push
    leaves no directories it created)."""
    while d != root and d.is_relative_to(root):
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


# ---------------------------------------------------------------- the workspace

class Workspace:
    def __init__(self, target: Target, root: Path | None = None) -> None:
        self.target = target
        self.root = root or paths.state_dir() / target.name
        self.meta_dir = self.root / ".git" / "fsbuild"
        self.intent_file = self.meta_dir / "intent.json"
        self.rebase_file = self.meta_dir / "rebase.json"
        # beside the repository, not in it: the lock must exist before `git init`
        self.lock_file = self.root.with_name(f"{self.root.name}.lock")

    def locked(self) -> AbstractContextManager[None]:
        """The workspace lock: one fsbuild command at a time on this workspace."""
        return lock.hold(self.lock_file, f"workspace {self.target.name} ({self.root})")

    # -- interrupted runs and rebases ------------------------------------------------

    def guard(self, op: str) -> None:
        """Refuse `op` while the workspace is mid-way through something else: a rebase in
        progress, or a step of a killed run (its stale git locks are removed first). The
        caller holds the workspace lock, so whatever is in flight belongs to a dead run."""
        note = self.rebase_note()
        if note:
            raise WorkspaceError(note)
        if op in READ_ONLY or not self.exists:
            return
        clear_stale_git_locks(self.root)
        it = self.intent()
        if it is not None and RESOLVED_BY[it.op] != op:
            raise WorkspaceError(self.interrupted_note(it))

    def rebase_note(self) -> str:
        """One line on the rebase in progress ("" when none)."""
        if not self.rebase_file.is_file():
            return ""
        try:
            plan = json.loads(self.rebase_file.read_text())
            onto = f" onto {plan['new_version']}"
            stopped = plan["stopped"] >= 0 and plan["results"]
        except (OSError, ValueError, KeyError, TypeError):
            onto, stopped = "", False
        if stopped:
            last = plan["results"][-1]
            return (f"a rebase{onto} is stopped on a conflict in {last['name']} "
                    f"({', '.join(last.get('files') or []) or 'see the work tree'}): resolve it, "
                    "then `fsbuild rebase --continue`, or `--skip` / `--abort`")
        return f"a rebase{onto} was interrupted: `fsbuild rebase --continue` or `--abort`"

    def intent(self) -> Intent | None:
        try:
            return Intent(**json.loads(self.intent_file.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise WorkspaceError(f"{self.intent_file} (a killed run's record) is unreadable ({exc}): "
                                 f"check `git -C {self.root} status`, then remove it") from None

    def interrupted_note(self, it: Intent) -> str:
        """What a killed run left and the command that gets back to a whole state."""
        if it.op == "push":
            below = self._patch_at(it.head)
            return (f"a push of {it.patch} was interrupted (pid {it.pid}): its files may be half "
                    f"written over {below}; `fsbuild series pop` drops them (back to {below}), "
                    "then push again")
        if it.op == "pop":
            return (f"a pop of {', '.join(it.popped) or it.patch} was interrupted (pid {it.pid}): "
                    f"`fsbuild series pop` finishes it (back to {self._patch_at(it.to)})")
        return (f"a refresh of {it.patch} was interrupted (pid {it.pid}): "
                "`fsbuild series refresh` finishes it")

    def _patch_at(self, commit: str) -> str:
        body = git(self.root, "log", "-1", "--format=%B", commit, check=False).stdout.decode(errors="replace")
        names = re.findall(rf"^{TRAILER}: (.+)$", body, re.M)
        return names[-1].strip() if names else "the upstream"

    @contextmanager
    def _step(self, it: Intent, undo: Callable[[Intent], None] | None = None) -> Iterator[None]:
        """Run one step under its intent record, with catchable signals deferred; on any
        failure `undo` restores the state before it (if undo fails too, the record stays
        and the next command says what to do)."""
        with deferred_signals():
            it.pid = os.getpid()
            atomic_write(self.intent_file, json.dumps(asdict(it), indent=1).encode())
            try:
                yield
            except BaseException:
                if undo is not None:
                    undo(it)
                    self.intent_file.unlink(missing_ok=True)
                raise
            self.intent_file.unlink(missing_ok=True)

    def _undo_push(self, it: Intent) -> None:
        """Back to exactly the commit before the push: push starts on a clean tree, so the
        commit plus the removal of the files the patch created is the whole state. A git of
        ours killed by the same Ctrl-C may have left its lock: its owner is dead now."""
        clear_stale_git_locks(self.root)
        git(self.root, "reset", "-q", "--hard", it.head)
        for rel in it.created:
            full = self.root / rel
            if full.is_symlink() or full.is_file():
                full.unlink()
            _prune_empty_dirs(self.root, full.parent)

    def _changed_since(self, commit: str) -> set[str]:
        """Paths whose work-tree state differs from `commit` (tracked or untracked)."""
        tracked = git(self.root, "diff", "--name-only", "--no-renames", "-z", commit, "--").stdout
        others = git(self.root, "ls-files", "--others", "--exclude-standard", "-z").stdout
        return {p.decode(errors="surrogateescape") for p in (tracked + others).split(b"\0") if p}

    def _resolve(self, it: Intent, force: bool) -> list[str]:
        """`pop` on an interrupted push (roll back) or pop (finish it)."""
        if it.op == "push":
            foreign = self._changed_since(it.head) - set(it.paths)
            if foreign and not force:
                raise WorkspaceError(
                    f"{self.interrupted_note(it)}; but {', '.join(sorted(foreign)[:3])} changed "
                    f"too (not part of {it.patch}): `fsbuild series pop --force` discards that")
            self._undo_push(it)
            popped = [it.patch]
        else:
            git(self.root, "reset", "-q", "--hard", it.to)
            git(self.root, "clean", "-q", "-fd")
            popped = it.popped or [it.patch]
        self.intent_file.unlink(missing_ok=True)
        return popped

    # -- repository and upstream ------------------------------------------------

    @property
    def exists(self) -> bool:
        return (self.root / ".git").is_dir()

    def ensure_repo(self) -> None:
        if not self.exists:
            self.root.mkdir(parents=True, exist_ok=True)
            git(self.root, "init", "-q", "-b", "series")
            git(self.root, "config", "gc.auto", "0")
            git(self.root, "config", "core.autocrlf", "false")
        self.meta_dir.mkdir(parents=True, exist_ok=True)

    def upstream_tag(self, up: Upstream) -> str:
        return f"upstream/{up.version}"

    def import_upstream(self, up: Upstream) -> str:
        """The commit of `up` (imported once; the digest trailer makes it cache-safe)."""
        self.ensure_repo()
        tag = self.upstream_tag(up)
        existing = git(self.root, "rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}", check=False)
        if existing.returncode == 0:
            commit = existing.stdout.decode().strip()
            if up.digest in git_out(self.root, "log", "-1", "--format=%B", commit):
                return commit
            tag = f"{tag}+{up.digest[:12]}"   # same version, other bytes: keep both
            again = git(self.root, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False)
            if again.returncode == 0:
                return again.stdout.decode().strip()
        commit = self._from_store(up) or self._fast_import_tarball(up)
        git(self.root, "tag", "-f", tag, commit)
        return commit

    def _commit_message(self, up: Upstream) -> bytes:
        return f"upstream {up.version}\n\n{DIGEST_TRAILER}: {up.digest}\n".encode()

    def _from_store(self, up: Upstream) -> str | None:
        """The upstream's commit made from its tree in the upstream cache's object store (its
        packs linked in, nothing copied); None when the store does not hold it."""
        if not upstream.store_has_tree(up.store_tree):
            return None
        upstream.link_packs(self.root / ".git")
        return git(self.root, "commit-tree", up.store_tree, "-F", "-",
                   input=self._commit_message(up)).stdout.decode().strip()

    def _fast_import_tarball(self, up: Upstream) -> str:
        msg = self._commit_message(up)
        marks = self.meta_dir / "import.marks"
        # zlib level 1 and no deltas: the import is CPU-bound on compression otherwise
        fi = subprocess.Popen(["git", "-C", str(self.root), "-c", "core.compression=1",
                               "-c", "pack.compression=1", "fast-import", "--quiet", "--done",
                               "--depth=0",
                               "--force", f"--export-marks={marks}"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, **GIT_ENV})
        assert fi.stdin is not None
        try:
            files = self._stream_blobs(up, fi.stdin.write)
            fi.stdin.write(b"commit refs/fsbuild/import\nmark :1\n")
            fi.stdin.write(f"author {IDENT}\ncommitter {IDENT}\n".encode() + _fi_data(msg))
            for path, (mode, mark) in sorted(files.items()):
                fi.stdin.write(b"M %o :%d " % (mode, mark) + _fi_path(path) + b"\n")
            fi.stdin.write(b"\ndone\n")
            fi.stdin.close()
        except BaseException:
            fi.kill()
            fi.wait()
            raise
        err = fi.stderr.read() if fi.stderr else b""
        if fi.wait() != 0:
            raise WorkspaceError(f"git fast-import of {up.tarball.name} failed: {err.decode()[-300:]}")
        commit = git_out(self.root, "rev-parse", "refs/fsbuild/import")
        git(self.root, "update-ref", "-d", "refs/fsbuild/import")
        return commit

    def _stream_blobs(self, up: Upstream, write: Callable[[bytes], object]) -> dict[str, tuple[int, int]]:
        """Write every file of the tarball as a blob; returns path -> (mode, mark)."""
        files: dict[str, tuple[int, int]] = {}
        mark = 1
        prefix = up.topdir + "/"
        with upstream.open_tar(up.tarball) as tf, progress.bar(f"importing {up.version}") as bar:
            for m in tf:
                name = check_member(m, str(up.tarball))
                if not name.startswith(prefix):
                    continue
                rel = name[len(prefix):]
                if m.isfile():  # streamed: a member is never held whole in memory
                    mark += 1
                    write(b"blob\nmark :%d\ndata %d\n" % (mark, m.size))
                    upstream.stream_member(tf.extractfile(m) or io.BytesIO(), write, m.size, rel)
                    write(b"\n")
                    files[rel] = (0o100755 if m.mode & 0o100 else 0o100644, mark)
                    bar.advance()
                    continue
                if m.issym():
                    data, mode = m.linkname.encode(), 0o120000
                elif m.islnk():
                    target = files.get(check_member(tarfile.TarInfo(m.linkname), "")[len(prefix):])
                    if target:
                        files[rel] = target
                    continue
                else:
                    continue
                mark += 1
                write(b"blob\nmark :%d\n" % mark + _fi_data(data))
                files[rel] = (mode, mark)
                bar.advance()
        return files

    def checkout(self, commit: str) -> None:
        """Make the work tree exactly `commit` on branch `series`."""
        git(self.root, "checkout", "-q", "-f", "-B", "series", commit)
        git(self.root, "clean", "-q", "-fdx")

    # -- state ------------------------------------------------------------------

    def state(self) -> dict[str, str]:
        try:
            state: dict[str, str] = json.loads((self.meta_dir / "workspace.json").read_text())
        except (OSError, ValueError):
            return {}
        return state

    def save_state(self, **values: str) -> None:
        atomic_write(self.meta_dir / "workspace.json",
                     json.dumps({**self.state(), **values}, indent=1, sort_keys=True).encode())

    def require(self) -> dict[str, str]:
        st = self.state()
        if not self.exists or "base" not in st:
            raise WorkspaceError(f"no workspace for target {self.target.name}: "
                                 f"run `fsbuild upstream import SRC --target {self.target.name}`")
        return st

    def use_upstream(self, up: Upstream) -> str:
        """Import `up`, reset the work tree to it (series unapplied)."""
        commit = self.import_upstream(up)
        self.checkout(commit)
        self.save_state(base=commit, version=up.version, digest=up.digest,
                        tag=self.upstream_tag(up), tarball=str(up.tarball))
        return commit

    # -- the applied stack --------------------------------------------------------

    def applied(self, base: str | None = None) -> list[tuple[str, str]]:
        """(patch name, commit) from the upstream base (or `base`) to HEAD, bottom first."""
        base = base or self.require()["base"]
        out = git_out(self.root, "log", "--reverse", "--format=%H%x00%B%x01", f"{base}..HEAD")
        stack = []
        for record in filter(None, (r.strip() for r in out.split("\x01"))):
            sha, _, body = record.partition("\x00")
            names = re.findall(rf"^{TRAILER}: (.+)$", body, re.M)
            if not names:
                raise WorkspaceError(f"commit {sha[:12]} on the series branch names no patch "
                                     f"({TRAILER} trailer): commit your work with `fsbuild series refresh`")
            stack.append((names[-1].strip(), sha))
        return stack

    def entries(self) -> list[Entry]:
        return read_series(self.target.series)

    def patch_path(self, e: Entry) -> Path:
        return self.target.series.parent / e.name

    def dirty(self) -> bool:
        git(self.root, "update-index", "-q", "--refresh", check=False)
        return git(self.root, "diff-index", "--quiet", "HEAD", "--", check=False).returncode != 0 or \
            bool(git_out(self.root, "ls-files", "--others", "--exclude-standard"))

    def push(self, count: int | None = 1, fuzz: int = 0,
             done_one: Callable[[str], None] | None = None) -> list[str]:
        """Apply the next `count` (None: all) patches as commits; returns their names
        (`done_one(name)` hears of each as soon as its commit exists)."""
        self.require()
        self.guard("push")
        if self.dirty():
            raise WorkspaceError("the work tree has changes not in any patch: "
                                 "`fsbuild series refresh` or `pop --force` first")
        entries, done = self.entries(), len(self.applied())
        todo = entries[done:] if count is None else entries[done:done + count]
        if not todo:
            raise WorkspaceError("series fully applied" if entries else "the series is empty")
        pushed: list[str] = []
        # a signal stops the loop after the patch in hand (whole, or rolled back)
        with deferred_signals() as hits:
            for e in todo:
                if hits:
                    raise KeyboardInterrupt
                self._push_one(e, fuzz)
                pushed.append(e.name)
                if done_one is not None:
                    done_one(e.name)
            hits.clear()   # every patch asked for is whole: the run did what it was asked
        return pushed

    def _push_one(self, e: Entry, fuzz: int) -> None:
        path = self.patch_path(e)
        if not path.is_file():
            raise MissingFileError(f"{self.target.series}: patch {e.name} does not exist")
        data = path.read_bytes()
        reader = tree_reader(self.root)
        applied = apply_patch(data, e.name, e.strip, reader, fuzz=fuzz)
        it = Intent("push", e.name, git_out(self.root, "rev-parse", "HEAD"),
                    paths=sorted(applied.changes),
                    created=sorted(p for p in applied.changes if reader(p) is None))
        # all or nothing: on any failure or signal the tree and HEAD go back to it.head
        with self._step(it, undo=self._undo_push):
            write_tree_changes(self.root, applied.changes)
            if applied.changes:  # -f: the kernel's .gitignore may match files a patch adds
                git(self.root, "add", "-A", "-f", "--", *applied.changes)
            git(self.root, "commit", "-q", "--allow-empty", "--no-verify", "-F", "-",
                input=commit_message(data, e.name).encode())

    def pop(self, count: int | None = 1, force: bool = False) -> list[str]:
        """Unapply the top `count` patches; after a killed run, pop instead rolls back its
        half-done push (or finishes its pop) and stops there."""
        self.guard("pop")
        it = self.intent()
        if it is not None:
            return self._resolve(it, force)
        stack = self.applied()
        if not stack:
            raise WorkspaceError("no patch applied")
        if self.dirty() and not force:
            raise WorkspaceError(f"top patch {stack[-1][0]} has unrefreshed changes: "
                                 "`fsbuild series refresh` or `pop --force`")
        n = len(stack) if count is None else min(count, len(stack))
        keep = stack[-n - 1][1] if n < len(stack) else self.require()["base"]
        popped = [name for name, _ in reversed(stack[-n:])]
        with deferred_signals() as hits:
            with self._step(Intent("pop", stack[-1][0], stack[-1][1], to=keep, popped=popped)):
                git(self.root, "reset", "-q", "--hard", keep)
                git(self.root, "clean", "-q", "-fd")
            hits.clear()   # the pop is whole: report it done, not interrupted
        return popped

    def refresh(self) -> Path:
        """Fold work-tree changes into the top patch commit and rewrite its file (same
        description, same per-file headers; only hunks change). Refused while a killed
        push is unresolved: its half-written files would be folded into the wrong patch."""
        self.guard("refresh")
        stack = self.applied()
        if not stack:
            raise WorkspaceError("no patch applied: nothing to refresh")
        name = stack[-1][0]
        entry = next((e for e in self.entries() if e.name == name), Entry(name))
        path = self.patch_path(entry)
        # a rerun finishes a killed refresh: the amend and the file write are idempotent
        with deferred_signals() as hits:
            with self._step(Intent("refresh", name, stack[-1][1])):
                git(self.root, "add", "-A")
                if git(self.root, "diff-index", "--cached", "--quiet", "HEAD", check=False).returncode:
                    git(self.root, "commit", "-q", "--amend", "--no-edit", "--no-verify")
                original = path.read_bytes() if path.is_file() else b""
                diff = commit_diff(self.root, "HEAD", entry.strip)
                atomic_write(path, rerender(original, diff, name) if original.strip() else diff)
            hits.clear()   # the refresh is whole
        return path

    def _free_slot(self, name: str, hint: str = "") -> tuple[list[Entry], Path]:
        """The series entries and the path for a patch `name` that is neither in the series
        nor on disk yet (new/import never overwrite)."""
        entries = self.entries()
        if any(e.name == name for e in entries):
            raise WorkspaceError(f"patch {name} is already in the series")
        path = self.target.series.parent / name
        if path.exists():
            raise WorkspaceError(f"{path} exists{hint}")
        return entries, path

    def new(self, name: str, message: str = "") -> Path:
        """Create an empty patch after the top one and push it (quilt new)."""
        P.safe_relpath(name, "series new")
        self.guard("new")
        entries, path = self._free_slot(name, ": use `fsbuild series import`")
        done = len(self.applied())
        body = (message.rstrip("\n") + "\n").encode() if message else b""
        atomic_write(path, body)
        self._write_series([*entries[:done], Entry(name), *entries[done:]])
        git(self.root, "commit", "-q", "--allow-empty", "--no-verify", "-F", "-",
            input=commit_message(body, name).encode())
        return path

    def import_patch(self, src: Path, name: str | None = None, strip: int = 1) -> Path:
        """Copy a patch file into the series after the top applied patch (quilt import)."""
        if not src.is_file():
            raise MissingFileError(f"patch {src} does not exist")
        name = name or src.name
        P.safe_relpath(name, "series import")
        data = src.read_bytes()
        P.parse_patch(data, name)  # reject malformed patches before touching anything
        self.guard("import")
        entries, dest = self._free_slot(name)
        done = len(self.applied()) if self.exists and "base" in self.state() else len(entries)
        atomic_write(dest, data)
        self._write_series([*entries[:done], Entry(name, strip), *entries[done:]])
        return dest

    def _write_series(self, entries: list[Entry]) -> None:
        """Rewrite the series keeping comments: replace only the entry lines."""
        update_series_file(self.target.series, entries)

    def export(self, out: Path) -> list[Path]:
        """Write the series file and every patch to `out`; applied patches are regenerated
        from their commits (description kept), the others copied."""
        self.guard("export")
        stack = dict(self.applied()) if self.exists and "base" in self.state() else {}
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for e in self.entries():
            src = self.patch_path(e)
            data = src.read_bytes() if src.is_file() else b""
            if e.name in stack:
                diff = commit_diff(self.root, stack[e.name], e.strip)
                data = rerender(data, diff, e.name) if data.strip() else diff
            dest = out / e.name
            atomic_write(dest, data)
            written.append(dest)
        atomic_write(out / "series", self.target.series.read_bytes())
        return written

    def check(self) -> list[tuple[str, str]]:
        """Every patch against the pristine upstream at fuzz 0: (name, problem or 'ok')."""
        self.guard("check")
        base = self.require()["base"]
        results: list[tuple[str, str]] = []
        with GitCat(self.root) as cat:
            read = Overlay(cat.reader(base))

            for e in self.entries():
                path = self.patch_path(e)
                if not path.is_file():
                    results.append((e.name, "missing"))
                    continue
                try:
                    applied = apply_patch(path.read_bytes(), e.name, e.strip, read)
                except (PatchApplyError, PatchFormatError, UnsafePathError) as exc:
                    results.append((e.name, f"FAILED: {exc.message}"))
                    continue
                read.update(applied.changes)
                results.append((e.name, _offset_text(applied) or "ok"))
        return results


def _offset_text(applied: Applied) -> str:
    return "; ".join(f"{f} hunk #{h} " + (f"offset {o:+d}" if o else "") + (f" fuzz {z}" if z else "")
                     for f, h, o, z in applied.offsets)


def update_series_file(series: Path, entries: list[Entry]) -> None:
    """Write `entries` through fsbuild.series.write_series, the one series writer: entries
    already in the file keep their line (comments, spacing) and place, dropped ones lose
    only their own line, new ones go after the entry before them."""
    if series.is_file():
        parsed = S.parse_series(series, check_files=False)
    else:
        parsed = S.Series(series, [])
    pool: dict[str, list[S.SeriesEntry]] = {}
    for se in parsed.entries:
        pool.setdefault(se.name, []).append(se)
    chosen: list[S.SeriesEntry] = []
    for e in entries:
        same_name = pool.get(e.name)
        se = same_name.pop(0) if same_name else S.SeriesEntry(e.name, e.strip)
        chosen.append(se if se.strip == e.strip else replace(se, strip=e.strip))
    parsed.entries = chosen
    atomic_write(series, S.write_series(parsed).encode("utf-8", "surrogateescape"))


def write_tree_changes(root: Path, changes: dict[str, Content]) -> None:
    for path, content in changes.items():
        full = root / path
        if content is None:
            full.unlink(missing_ok=True)
            continue
        full.parent.mkdir(parents=True, exist_ok=True)
        if full.is_symlink():
            full.unlink()
        full.write_bytes(content[0])
        full.chmod(0o755 if content[1] & 0o100 else 0o644)


def commit_message(patch_data: bytes, name: str) -> str:
    desc = description(patch_data, name).decode(errors="replace").strip() if patch_data else ""
    return f"{desc or name}\n\n{TRAILER}: {name}\n"


def commit_diff(repo: Path, commit: str, strip: int = 1, parent: str | None = None) -> bytes:
    """The change of `commit` as a git diff with a/ b/ prefixes (-p1)."""
    args = ["diff", "--no-color", "--no-renames", "--no-ext-diff", "-U3",
            parent or f"{commit}^", commit]
    return git(repo, *args).stdout
