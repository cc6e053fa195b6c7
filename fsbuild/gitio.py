"""The repository layer: GitPython for the repository itself (Repo, refs, config, commits,
its command object for every git run) with GitPython's exceptions mapped to fsbuild's
classes in one place (`mapped`); the measured fast paths kept on that command object: one
long-lived `git cat-file --batch` per repository (trees as Readers) and many commits in one
`git fast-import` run. Also: the work tree and in-memory overlays as Readers, and the
recovery of git locks a killed run left behind."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# A host without git must get ToolMissingError on first use (one line), not GitPython's
# ImportError at import time.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

from git import Git, Repo
from git.exc import (
    BadName,
    BadObject,
    GitCommandError,
    GitCommandNotFound,
    GitError,
    InvalidGitRepositoryError,
    NoSuchPathError,
)

from fsbuild.errors import (
    FsbuildError,
    LockHeldError,
    ToolMissingError,
    UnsafePathError,
    WorkspaceError,
)

_log = logging.getLogger(__name__)   # -v shows every git run, as proc.run does for the rest

IDENT = "fsbuild <fsbuild@localhost> 1000000000 +0000"
GIT_ENV = {"GIT_AUTHOR_NAME": "fsbuild", "GIT_AUTHOR_EMAIL": "fsbuild@localhost",
           "GIT_COMMITTER_NAME": "fsbuild", "GIT_COMMITTER_EMAIL": "fsbuild@localhost",
           "GIT_AUTHOR_DATE": "@1000000000 +0000", "GIT_COMMITTER_DATE": "@1000000000 +0000",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
GIT_MISSING = "git not found; run `fsbuild doctor` for the install command"

Content = tuple[bytes, int] | None   # (bytes, mode) or None for "absent"
Reader = Callable[[str], Content]


# ---------------------------------------------------------------- GitPython, errors mapped once

@contextmanager
def mapped(error: type[FsbuildError] = WorkspaceError, what: str = "git") -> Iterator[None]:
    """The one translation of GitPython's exceptions: git missing -> ToolMissingError, a
    failed command -> `error` with git's last lines, no repository or no such object ->
    WorkspaceError. Callers never see a GitPython exception."""
    try:
        yield
    except GitCommandNotFound:
        raise ToolMissingError(GIT_MISSING) from None
    except GitCommandError as exc:
        raise error(f"{what} failed (exit {exc.status}): {_tail(exc.stderr or exc.stdout)}") from None
    except (InvalidGitRepositoryError, NoSuchPathError) as exc:
        raise WorkspaceError(f"{exc}: not a git repository") from None
    except (BadName, BadObject, ValueError) as exc:
        raise WorkspaceError(f"{what}: {exc}") from None
    except GitError as exc:
        raise error(f"{what}: {exc}") from None


def _tail(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:]) or "no output"


def command(repo: Path) -> Git:
    """GitPython's command object for `repo` with the fixed identity and dates."""
    g = Git(repo if repo.is_dir() else None)
    g.update_environment(**GIT_ENV)
    return g


@contextmanager
def repository(root: Path) -> Iterator[Repo]:
    """The GitPython Repo of `root`; its persistent helper processes end with the block."""
    with mapped(what=f"git repository {root}"):
        repo = Repo(root)
    repo.git.update_environment(**GIT_ENV)
    try:
        with mapped(what=f"git in {root}"):
            yield repo
    finally:
        repo.close()


def init_repo(root: Path, branch: str, config: dict[str, str]) -> None:
    """A new repository at `root` on `branch` with `config` ("section.key": value) set."""
    with mapped(what=f"git init {root}"):
        repo = Repo.init(root, mkdir=True, initial_branch=branch)
        try:
            with repo.config_writer() as cw:
                for key, value in config.items():
                    section, _, option = key.rpartition(".")
                    cw.set_value(section, option, value)
        finally:
            repo.close()


def resolve(repo: Repo, rev: str) -> str | None:
    """The object id `rev` names, None when it names nothing (`rev-parse -q --verify`)."""
    try:
        return repo.rev_parse(rev).hexsha
    except (BadName, BadObject, ValueError, IndexError):
        return None


class Started:
    """A long-running git (fast-import, cat-file --batch) started by GitPython's command
    object; the caller talks to `popen`'s pipes. GitPython ends the process when this
    object is dropped, so a caller keeps it for as long as it uses the process."""

    def __init__(self, repo: Path, *args: str, stdin: bool = True) -> None:
        argv = ["git", "-C", str(repo), *args]
        _log.info("$ %s", shlex.join(argv))
        with mapped(what=f"`git {shlex.join(args[:2])}`"):
            self._auto = command(repo).execute(argv, istream=subprocess.PIPE if stdin else None,
                                               as_process=True)
        popen: subprocess.Popen[bytes] | None = self._auto.proc
        assert popen is not None   # as_process: GitPython hands the started process back
        self.popen = popen


def git(repo: Path, *args: str, input: bytes | None = None, check: bool = True,
        error: type[FsbuildError] = WorkspaceError) -> subprocess.CompletedProcess[bytes]:
    """git in `repo` with a fixed identity and dates (same content -> same commit ids); a
    failure (with `check`) raises `error` naming the command and git's last lines."""
    started = Started(repo, *args, stdin=input is not None)
    popen = started.popen
    try:
        out, err = popen.communicate(input)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    cp = subprocess.CompletedProcess(["git", "-C", str(repo), *args], popen.returncode, out, err)
    if check and cp.returncode != 0:
        status = (f"killed by {signal.Signals(-cp.returncode).name}" if cp.returncode < 0
                  else f"exit {cp.returncode}")
        shown = shlex.join(args[:2]) + ("…" if len(args) > 2 else "")
        raise error(f"`git {shown}` in {repo} failed ({status}): {_tail(err or out)}")
    return cp


def git_out(repo: Path, *args: str) -> str:
    return git(repo, *args).stdout.decode().strip()


# ---------------------------------------------------------------- trees as Readers

class GitCat:
    """One persistent `git cat-file --batch` per repository; GitReader views share it."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self._started = Started(repo, "cat-file", "--batch")
        self._proc = self._started.popen
        self._dirs: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()

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


def fi_path(path: str) -> bytes:
    """fast-import path: C-quote when it could be misread."""
    if any(c in path for c in '"\n\\') or path.startswith(" "):
        return json.dumps(path).encode()
    return path.encode()


def fi_data(data: bytes) -> bytes:
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
        chunks.append(fi_data(spec.message.encode()))
        chunks.append(f"from {parent}\n".encode())
        for path, content in sorted(spec.changes.items()):
            if content is None:
                chunks.append(b"D " + fi_path(path) + b"\n")
            else:
                chunks.append(b"M %o inline " % content[1] + fi_path(path) + b"\n" + fi_data(content[0]))
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


# ---------------------------------------------------------------- signals and git locks

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



# ---------------------------------------------------------------- work trees and diffs

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



def commit_diff(repo: Path, commit: str, strip: int = 1, parent: str | None = None) -> bytes:
    """The change of `commit` as a git diff with a/ b/ prefixes (-p1)."""
    args = ["diff", "--no-color", "--no-renames", "--no-ext-diff", "-U3",
            parent or f"{commit}^", commit]
    return git(repo, *args).stdout
