"""What `fsbuild rebase` does after a 3-way merge conflict.

1. A word-wise merge (Debian's `wiggle`; `words` = git merge-file on word tokens is the
   fallback when wiggle is missing) often places a hunk whose context changed by a word.
   Its result is accepted only when conflict-free AND the rebased change removes and adds
   exactly the lines the original patch did: only context may move, never the patch's intent.
2. Whatever stays a conflict is explained: the failed hunk beside what upstream did to the
   same lines (and, for a git-ref upstream, the commits that did it), and whether the
   patch's change already looks present in the new upstream (`likely_upstream`; never a drop).

All functions work on plain file contents (`Content` = (bytes, mode) or None) so that this
module does not depend on the rebase engine."""

from __future__ import annotations

import difflib
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fsbuild import proc
from fsbuild.errors import WorkspaceError

Content = tuple[bytes, int] | None
Reader = Callable[[str], Content]
Files = dict[str, Content]

# a token is a word, a run of blanks, a newline or one punctuation character
_TOKEN = re.compile(rb"\n|[^\S\n]+|\w+|[^\w\s]", re.A)
_NL = b"\x1bNL"      # a newline token (no NUL: merge-file would call it binary)
_WINDOW = 40         # lines around a hunk's context where its change must be found


# ---------------------------------------------------------------- word-wise merge

def backend() -> str:
    """The resolver in use: wiggle when installed (measured better), else `words`."""
    return "wiggle" if shutil.which("wiggle") else "words"


def _run_merge(cmd: list[str], texts: tuple[bytes, bytes, bytes]) -> tuple[bytes, int]:
    with tempfile.TemporaryDirectory(prefix="fsbuild-wiggle-") as tmp:
        files = []
        for tag, text in zip(("ours", "base", "theirs"), texts, strict=True):
            p = Path(tmp) / tag
            p.write_bytes(text)
            files.append(str(p))
        cp = proc.run([*cmd, *files], check=False, error=WorkspaceError)
    worst = 127 if cmd[0] == "git" else 1    # merge-file: rc = number of conflicts
    if cp.returncode < 0 or cp.returncode > worst:
        raise WorkspaceError(f"{cmd[0]} failed: {cp.stderr.decode(errors='replace').strip()}")
    return cp.stdout, cp.returncode


def wiggle_merge(base: bytes, ours: bytes, theirs: bytes) -> bytes | None:
    """Word-wise merge with wiggle: the result, or None when wiggle left a conflict."""
    out, rc = _run_merge(["wiggle", "--merge", "--quiet"], (ours, base, theirs))
    return out if rc == 0 else None


def _tokens(text: bytes) -> bytes:
    toks = _TOKEN.findall(text)
    return b"".join((_NL if t == b"\n" else t) + b"\n" for t in toks)


def _untokens(text: bytes) -> bytes:
    return b"".join(b"\n" if t == _NL else t for t in text.split(b"\n")[:-1])


def words_merge(base: bytes, ours: bytes, theirs: bytes) -> bytes | None:
    """Word-wise merge in Python terms: a 3-way merge of the files as one token per line."""
    out, rc = _run_merge(["git", "merge-file", "-p", "--"],
                         (_tokens(ours), _tokens(base), _tokens(theirs)))
    if rc != 0 or _untokens(_tokens(base)) != base:   # a byte the tokens do not cover
        return None
    return _untokens(out)


MERGERS: dict[str, Callable[[bytes, bytes, bytes], bytes | None]] = {
    "wiggle": wiggle_merge, "words": words_merge}


def _git_diff(a: bytes, b: bytes, ctx: int) -> bytes:
    """git's xdiff a -> b (difflib needs seconds on a large kernel file)."""
    if a == b:
        return b""
    with tempfile.TemporaryDirectory(prefix="fsbuild-diff-") as tmp:
        pa, pb = Path(tmp) / "a", Path(tmp) / "b"
        pa.write_bytes(a)
        pb.write_bytes(b)
        cp = proc.run(["git", "diff", "--no-index", "--no-color", "--no-ext-diff", "--no-textconv",
                       "-a", f"-U{ctx}", "--", str(pa), str(pb)], check=False, error=WorkspaceError)
    if cp.returncode not in (0, 1):
        raise WorkspaceError(f"git diff failed: {cp.stderr.decode(errors='replace').strip()}")
    return cp.stdout


def diff_hunks(a: bytes, b: bytes, ctx: int = 3) -> list[list[tuple[str, bytes]]]:
    """Unified-diff hunks a -> b as (sign, line), sign in ' ', '-', '+'."""
    out: list[list[tuple[str, bytes]]] = []
    for line in _git_diff(a, b, ctx).splitlines(keepends=True):
        if line.startswith(b"@@"):
            out.append([])
        elif out and line[:1] in (b" ", b"-", b"+"):
            out[-1].append((line[:1].decode(), line[1:]))
        elif out and out[-1] and line.startswith(b"\\"):   # "\ No newline at end of file"
            sign, text = out[-1][-1]
            out[-1][-1] = (sign, text.rstrip(b"\n"))
    return out


_HEADER = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", re.M)


def _line_map(a: bytes, b: bytes, k: int) -> int:
    """Line k of a, as a line number of b (where its hunk starts when k itself changed)."""
    shift = 0
    for m in _HEADER.finditer(_git_diff(a, b, 0)):
        s, n, t, mm = int(m[1]), int(m[2] or 1), int(m[3]), int(m[4] or 1)
        a_end, b_end = (s + n - 1 if n else s), (t + mm - 1 if mm else t)
        if n and s <= k <= a_end:
            return max(t, 1)
        if k <= a_end:
            break
        shift = b_end - a_end
    return max(k + shift, 1)


def changed_lines(a: bytes, b: bytes) -> tuple[list[bytes], list[bytes]]:
    """(removed, added) lines of the line diff a -> b, in order."""
    pairs = [x for h in diff_hunks(a, b, 0) for x in h]
    return [x for s, x in pairs if s == "-"], [x for s, x in pairs if s == "+"]


def word_resolve(before: Files, after: Files, tree: Reader, merged: Files,
                 conflicts: list[str], how: str | None = None) -> Files | None:
    """The patch's changes on `tree` with each conflicting file word-merged, or None when a
    file still conflicts or the result's -/+ lines differ from the original patch's."""
    merge = MERGERS[how or backend()]
    changes = dict(merged)
    for path in conflicts:
        base, ours, theirs = before.get(path), tree(path), after.get(path)
        if base is None or ours is None or theirs is None:   # add/delete: nothing to wiggle
            return None
        out = merge(base[0], ours[0], theirs[0])
        if out is None:
            return None
        changes[path] = (out, theirs[1] if theirs[1] != base[1] else ours[1])
    for path, theirs in after.items():
        base, ours = before.get(path), tree(path)
        new = changes.get(path, ours)
        if changed_lines(_b(base), _b(theirs)) != changed_lines(_b(ours), _b(new)):
            return None
    return {p: c for p, c in changes.items() if c != tree(p)}


def _b(c: Content) -> bytes:
    return c[0] if c else b""


# ---------------------------------------------------------------- blocked_by

def theirs_merge(base: Content, ours: Content, theirs: Content) -> Content:
    """`ours` with the patch's side winning every conflict: the tree as if it had applied."""
    if base is None or ours is None or theirs is None:
        return theirs
    out, _ = _run_merge(["git", "merge-file", "-p", "--theirs", "--"], (ours[0], base[0], theirs[0]))
    return out, theirs[1]


# ---------------------------------------------------------------- explanation

def conflict_regions(base: bytes, ours: bytes, theirs: bytes) -> list[dict[str, object]]:
    """The diff3 conflict regions: start line in ours (1-based) and the three sides."""
    out, _ = _run_merge(["git", "merge-file", "-p", "--diff3", "-L", "upstream", "-L", "base",
                         "-L", "patch", "--"], (ours, base, theirs))
    regions: list[dict[str, object]] = []
    line_no, side = 0, ""
    cur: dict[str, list[bytes]] = {}
    start = 0
    for line in out.splitlines(keepends=True):
        if line.startswith(b"<<<<<<< upstream"):
            side, cur, start = "ours", {"ours": [], "base": [], "theirs": []}, line_no + 1
        elif side and line.startswith(b"||||||| base"):
            side = "base"
        elif side and line.rstrip(b"\n") == b"=======":
            side = "theirs"
        elif side and line.startswith(b">>>>>>> patch"):
            regions.append({"start": start, **{k: b"".join(v) for k, v in cur.items()}})
            line_no += len(cur["ours"])
            side = ""
        elif side:
            cur[side].append(line)
        else:
            line_no += 1
    return regions


def _udiff(a: bytes, b: bytes, label: str) -> str:
    lines = difflib.unified_diff(a.decode(errors="replace").splitlines(keepends=True),
                                 b.decode(errors="replace").splitlines(keepends=True),
                                 f"base/{label}", label, n=1)
    return "".join(x if x.endswith("\n") else x + "\n" for x in lines)


def explain(before: Files, after: Files, tree: Reader, new_upstream: Reader,
            log: Callable[[str, int, int], list[str]] | None = None) -> list[dict[str, object]]:
    """For each conflicting region: the patch's hunk (base -> patch) and what upstream did to
    the same lines (base -> upstream), plus the upstream commits when `log` can name them."""
    out: list[dict[str, object]] = []
    for path, theirs in after.items():
        base, ours = before.get(path), tree(path)
        if base is None or ours is None or theirs is None:
            out.append({"file": path, "note": "added or deleted on one side"})
            continue
        for reg in conflict_regions(base[0], ours[0], theirs[0]):
            b, o, t = reg["base"], reg["ours"], reg["theirs"]
            assert isinstance(b, bytes) and isinstance(o, bytes) and isinstance(t, bytes)
            start = reg["start"]
            assert isinstance(start, int)
            item: dict[str, object] = {"file": path, "line": start, "hunk": _udiff(b, t, "patch"),
                                       "upstream_change": _udiff(b, o, "upstream")}
            if log is not None:
                up = new_upstream(path)
                a, z = _map_range(ours[0], up[0] if up else b"", start, start + max(o.count(b"\n"), 1) - 1)
                item["upstream_commits"] = log(path, a, z)
            out.append(item)
    return out


def _map_range(ours: bytes, up: bytes, a: int, z: int) -> tuple[int, int]:
    """Lines a..z of `ours` (upstream + carried patches) in the pure upstream file."""
    if ours == up:
        return a, z
    n = max(up.count(b"\n"), 1)
    lo, hi = min(_line_map(ours, up, a), n), min(_line_map(ours, up, z), n)
    return lo, max(lo, hi)


def git_log_lines(repo: Path, old_ref: str, new_ref: str) -> Callable[[str, int, int], list[str]]:
    """`log(path, a, z)`: the commits OLD..NEW of a git upstream touching lines a..z of path
    in NEW, as "sha subject" (newest first)."""
    def log(path: str, a: int, z: int) -> list[str]:
        cp = proc.run(["git", "-C", str(repo), "log", "--format=%x00%H %s", "--no-patch",
                       f"-L{a},{z}:{path}", f"{old_ref}..{new_ref}"], check=False, error=WorkspaceError)
        if cp.returncode != 0:
            return []
        return [c.split(b"\n", 1)[0].decode(errors="replace")
                for c in cp.stdout.split(b"\x00")[1:]]
    return log


# ---------------------------------------------------------------- likely upstream

def _trivial(lines: list[bytes]) -> bool:
    return all(len(x.strip()) < 3 for x in lines)


def likely_upstream(before: Files, after: Files, tree: Reader) -> bool:
    """True when every hunk's added lines are in `tree` near the hunk's context and its
    removed lines are gone from there: upstream took the change in another form."""
    seen = False
    for path, theirs in after.items():
        base, ours = before.get(path), tree(path)
        if theirs is None or base is None:
            if (ours is None) != (theirs is None):
                return False
            continue
        if ours is None:
            return False
        lines = ours[0].splitlines(keepends=True)
        for h in diff_hunks(base[0], theirs[0]):
            ok, counted = _hunk_present(h, lines)
            if not ok:
                return False
            seen = seen or counted
    return seen


def _hunk_present(h: list[tuple[str, bytes]], lines: list[bytes]) -> tuple[bool, bool]:
    """(present, meaningful) for one hunk in the new file's lines: near one of its context
    lines, every added line is there and no removed line is (upstream may have put its own
    lines in between: "in another form")."""
    plus = {x for s, x in h if s == "+" and not _trivial([x])}
    minus = {x for s, x in h if s == "-" and not _trivial([x])} - plus   # a moved line stays
    if not plus and not minus:
        return True, False
    context = {x for s, x in h if s == " " and not _trivial([x])}
    spots = [i for i, x in enumerate(lines) if x in context] or \
            [i for i, x in enumerate(lines) if x in plus]
    for spot in spots:
        window = set(lines[max(spot - _WINDOW, 0):spot + _WINDOW])
        if plus <= window and not minus & window:
            return True, True
    return False, True
