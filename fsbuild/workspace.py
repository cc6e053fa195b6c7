"""The git-backed workspace of a target: state_dir()/<target>/ is a git repository whose
work tree is the kernel. The pristine upstream is a commit tagged `upstream/<version>`
(imported with one `git fast-import` stream straight from the tarball: no extraction, no
`git add` of 70k files); the series is applied on top as one commit per patch, with the
patch's description as message and an `Fsbuild-Patch: <file>` trailer.

Patches are applied in memory by fsbuild.patch (GNU patch semantics), reading the files
from the work tree or from any git tree (GitReader), so push/check/rebase agree with
`fsbuild apply` and quilt byte for byte."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fsbuild import lock, paths
from fsbuild import patch as P
from fsbuild.errors import (
    MissingFileError,
    PatchApplyError,
    PatchFormatError,
    UnsafePathError,
    WorkspaceError,
)
from fsbuild.fileio import atomic_write
from fsbuild.gitio import (
    GitCat,
    Overlay,
    clear_stale_git_locks,
    commit_diff,
    deferred_signals,
    git,
    git_out,
    init_repo,
    repository,
    resolve,
    tree_reader,
    write_tree_changes,
)
from fsbuild.render import TRAILER, Applied, apply_patch, commit_message, rerender
from fsbuild.series import Entry, read_series, update_series_file
from fsbuild.target import Target
from fsbuild.upstream import Upstream
from fsbuild.upstream_import import upstream_commit

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


def _text(message: str | bytes) -> str:
    """A commit message as text (GitPython gives bytes for an undecodable one)."""
    return message if isinstance(message, str) else message.decode(errors="replace")


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
            init_repo(self.root, "series", {"gc.auto": "0", "core.autocrlf": "false"})
        self.meta_dir.mkdir(parents=True, exist_ok=True)

    def upstream_tag(self, up: Upstream) -> str:
        return f"upstream/{up.version}"

    def import_upstream(self, up: Upstream) -> str:
        """The commit of `up` (imported once; the digest trailer makes it cache-safe)."""
        self.ensure_repo()
        tag = self.upstream_tag(up)
        with repository(self.root) as repo:
            commit = resolve(repo, f"refs/tags/{tag}^{{commit}}")
            if commit is not None:
                if up.digest in _text(repo.commit(commit).message):
                    return commit
                tag = f"{tag}+{up.digest[:12]}"   # same version, other bytes: keep both
                again = resolve(repo, f"refs/tags/{tag}^{{commit}}")
                if again is not None:
                    return again
        commit = upstream_commit(self.root, self.meta_dir, up)
        with repository(self.root) as repo:
            repo.create_tag(tag, ref=commit, force=True)
        return commit

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
        with repository(self.root) as repo:
            commits = [(c.hexsha, _text(c.message)) for c in repo.iter_commits(f"{base}..HEAD", reverse=True)]
        stack = []
        for sha, body in commits:
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
        """Changes against HEAD, staged or not, or untracked files. A query only: git status
        without its optional index refresh takes no index.lock, so a run killed here
        leaves nothing behind (`update-index --refresh` did)."""
        return bool(git_out(self.root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=normal"))

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
