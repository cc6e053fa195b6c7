"""Move a patch series to a new upstream.

Both sides are computed in memory from git trees (fsbuild.patch applier + `git merge-file`),
then written as commits with one `git fast-import` run, so a 160-patch series costs a few
seconds. For each patch, against the new upstream plus the patches already carried:

  clean     applies at fuzz 0 with no offset        (its file is kept byte for byte)
  offset    applies at fuzz 0 with line offsets     (hunks re-exported)
  upstream  reverse-applies, or the 3-way merge changes nothing, or (for a patch that
            would conflict) it and the next few patches together change nothing (a revert
            + corrected re-apply): already in the new upstream -> dropped, reason recorded
  merged    needed a 3-way merge (base: the file before the patch on the old upstream), or,
            when that conflicts, a word-wise merge (fsbuild.resolve, `resolved_by`) whose
            result removes and adds exactly the original patch's lines
  conflict  the merges left conflict markers; the report explains each (failed hunk beside
            upstream's change there), flags `likely_upstream` and `blocked_by`

Workspace mode stops at a conflict with the markers in the work tree and the state in
.git/fsbuild/rebase.json (`--continue`, `--skip`, `--abort`); nothing under patches/ is
written before the very end, and that last step keeps backups so `--abort` (or a rerun
after Ctrl-C) restores patches/ and target.toml byte for byte."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from fsbuild import patch as P
from fsbuild import paths, proc, progress
from fsbuild import resolve as RS
from fsbuild import upstream as U
from fsbuild.errors import (
    MissingFileError,
    PatchApplyError,
    PatchFormatError,
    RebaseConflictError,
    RunInterruptedError,
    UnsafePathError,
    UpstreamError,
    WorkspaceError,
)
from fsbuild.fileio import atomic_write
from fsbuild.gitio import (
    CommitSpec,
    Content,
    GitCat,
    Overlay,
    Reader,
    clear_stale_git_locks,
    commit_diff,
    fast_commits,
    git,
    git_out,
    repository,
    write_tree_changes,
)
from fsbuild.render import apply_patch, commit_message, rerender
from fsbuild.series import Entry, read_series, update_series_file
from fsbuild.target import Target
from fsbuild.upstream_import import partial_commit
from fsbuild.workspace import Workspace

OUTCOMES = ("clean", "offset", "merged", "upstream", "conflict")
MARKER = re.compile(rb"^(<<<<<<<|>>>>>>>)( |$)", re.M)


@dataclass
class Result:
    name: str
    outcome: str
    reason: str = ""
    files: list[str] = field(default_factory=list)   # conflicting files
    resolved: str = ""                                 # "", "manual" or "skipped"
    resolved_by: str = ""          # merged by a word-wise resolver: its name
    blocked_by: str = ""           # conflicts only because this earlier patch conflicted
    likely_upstream: bool = False  # a conflict whose change already looks present upstream
    explain: list[dict[str, object]] = field(default_factory=list)   # failed hunks vs upstream

    @property
    def kept(self) -> bool:
        return self.outcome != "upstream" and self.resolved != "skipped"


@dataclass
class OldPatch:
    """One patch of the old series as applied to the old upstream."""

    entry: Entry
    data: bytes
    before: dict[str, Content]     # touched paths before the patch
    after: dict[str, Content]      # ... and after


# ---------------------------------------------------------------- the engine

def apply_old(entries: list[Entry], folder: Path, base: Reader) -> list[OldPatch]:
    """The old series on the old upstream (GNU default fuzz 2, as quilt applied it)."""
    tree = Overlay(base)
    out = []
    for e in entries:
        path = folder / e.name
        if not path.is_file():
            raise MissingFileError(f"{folder / 'series'}: patch {e.name} does not exist")
        data = path.read_bytes()
        try:
            applied = apply_patch(data, e.name, e.strip, tree, fuzz=2)
        except PatchApplyError as exc:
            raise PatchApplyError(f"the series does not apply to the old upstream: {exc.message}") from None
        before = {p: tree(p) for p in applied.changes}
        tree.update(applied.changes)
        out.append(OldPatch(e, data, before, dict(applied.changes)))
    return out


def carry(old: OldPatch, tree: Overlay, new_version: str) -> tuple[Result, dict[str, Content]]:
    """Classify one patch against `tree` and return the changes to make (empty if dropped
    or conflicting; for a conflict the changes hold the files with markers)."""
    name, e = old.entry.name, old.entry
    try:
        applied = apply_patch(old.data, name, e.strip, tree, fuzz=0)
    except (PatchApplyError, PatchFormatError):
        pass
    else:
        if applied.exact:
            return Result(name, "clean"), applied.changes
        where = ", ".join(f"{f} #{h} {o:+d}" for f, h, o, _ in applied.offsets[:4])
        return Result(name, "offset", f"hunks moved: {where}"), applied.changes
    if old.after and _reverse_applies(old, tree):
        return Result(name, "upstream", f"reverse-applies cleanly to {new_version}: already upstream"), {}
    result, changes = _merge3(old, tree, new_version)
    if result.outcome == "conflict":
        how = RS.backend()
        resolved = RS.word_resolve(old.before, old.after, tree, changes, result.files, how)
        if resolved:
            return Result(name, "merged", f"word-wise merge ({how}) in {', '.join(result.files)}: "
                          "only context moved", resolved_by=how), resolved
    return result, changes


def _reverse_applies(old: OldPatch, tree: Overlay) -> bool:
    try:
        apply_patch(old.data, old.entry.name, old.entry.strip, tree, fuzz=0, reverse=True)
    except (PatchApplyError, PatchFormatError):
        return False
    return True


def _merge3(old: OldPatch, tree: Overlay, new_version: str) -> tuple[Result, dict[str, Content]]:
    changes: dict[str, Content] = {}
    conflicts: list[str] = []
    for path, theirs in old.after.items():
        base, ours = old.before.get(path), tree(path)
        merged, ok = merge_file(base, ours, theirs, old.entry.name)
        if not ok:
            conflicts.append(path)
        if merged != ours:
            changes[path] = merged
    if conflicts:
        return Result(old.entry.name, "conflict", "3-way merge conflict in " + ", ".join(conflicts),
                      files=conflicts), changes
    if not changes:
        return Result(old.entry.name, "upstream",
                      f"3-way merge onto {new_version} changes nothing: already upstream"), {}
    return Result(old.entry.name, "merged", "applied with a 3-way merge"), changes


def merge_file(base: Content, ours: Content, theirs: Content, label: str) -> tuple[Content, bool]:
    """(result, clean) of a 3-way merge of one file; absent files are None."""
    if ours in (base, theirs):
        return theirs, True
    if theirs == base:
        return ours, True
    if theirs is None or ours is None:   # modify/delete: keep ours, flag it
        return ours, False
    mode = theirs[1] if base is None or theirs[1] != base[1] else ours[1]
    with tempfile.TemporaryDirectory(prefix="fsbuild-merge-") as tmp:
        files = []
        for tag, content in (("ours", ours), ("base", base), ("theirs", theirs)):
            p = Path(tmp) / tag
            p.write_bytes(content[0] if content else b"")
            files.append(str(p))
        cp = proc.run(["git", "merge-file", "-p", "-L", "upstream", "-L", "base", "-L", label, *files],
                      check=False, error=WorkspaceError)
    if cp.returncode < 0 or cp.returncode > 127:
        raise WorkspaceError(f"git merge-file failed: {cp.stderr.decode(errors='replace').strip()}")
    return (cp.stdout, mode), cp.returncode == 0


# ---------------------------------------------------------------- one rebase run

@dataclass
class Plan:
    """Everything a rebase needs across --continue: kept in .git/fsbuild/rebase.json."""

    series: str                  # the series file being rebased
    old_base: str
    new_base: str
    new_version: str
    new_digest: str
    old_commits: list[str]       # the old series as commits on old_base
    results: list[Result] = field(default_factory=list)
    tip: str = ""                # new-side commit after the last carried patch
    new_commits: dict[str, str] = field(default_factory=dict)   # name -> commit
    stopped: int = -1            # index of the patch waiting for a resolution
    head_before: str = ""
    refs_before: dict[str, str] = field(default_factory=dict)
    state_before: str = ""       # workspace.json before the rebase
    phase: str = "carry"         # carry | export
    git_upstream: list[str] = field(default_factory=list)   # [repo, old ref, new ref] of a git upstream
    flushed: int = 0             # results whose commits exist (the rest is redone on resume)

    def __post_init__(self) -> None:
        # old commit -> its patch, filled by build_old in this process: not a field, so it
        # stays out of rebase.json (a resumed plan reads the patches back from git)
        self.old_patches: dict[str, OldPatch] = {}


def _entries_of(plan_series: Path) -> list[Entry]:
    return read_series(plan_series)


def run_carry(repo: Path, plan: Plan, start: int, stop_on_conflict: bool,
              with_worktree: bool) -> int | None:
    """Carry patches from `start`; returns the index of a conflicting patch when stopping."""
    entries = _entries_of(Path(plan.series))
    folder = Path(plan.series).parent
    committed, tip = len(plan.results), plan.tip
    try:
        with GitCat(repo) as cat:
            return _carry_loop(repo, plan, cat, entries, folder, start, stop_on_conflict, with_worktree)
    except BaseException:
        # Ctrl-C or error: forget results whose commits were not written, so --continue
        # redoes exactly those patches on the tip of the ones kept; a conflict stop stays
        # only when it was recorded whole (its result is the last one kept)
        del plan.results[max(committed, plan.flushed):]
        plan.tip = _last_commit(plan) or tip
        if not (0 <= plan.stopped == len(plan.results) - 1 and plan.results[-1].outcome == "conflict"):
            plan.stopped = -1
        raise


def _last_commit(plan: Plan) -> str:
    """The commit of the last kept result that has one ("" when none has)."""
    return next((plan.new_commits[r.name] for r in reversed(plan.results) if r.name in plan.new_commits), "")


def _carry_loop(repo: Path, plan: Plan, cat: GitCat, entries: list[Entry], folder: Path,
                start: int, stop_on_conflict: bool, with_worktree: bool) -> int | None:
    tree = Overlay(cat.reader(plan.tip or plan.new_base))
    pending: list[tuple[str, dict[str, Content], str]] = []   # (name, changes, message)
    with progress.bar("rebasing", total=len(entries) - start) as bar:
        i = start
        while i < len(entries):
            old = _old_patch(cat, plan, entries, folder, i)
            result, changes = carry(old, tree, plan.new_version)
            if result.outcome == "conflict" and (last := _combined_upstream(cat, plan, entries, i, tree)):
                names = [e.name for e in entries[i:last + 1]]
                for name in names:
                    plan.results.append(Result(
                        name, "upstream", f"combined change of {' + '.join(names)} is already "
                        f"in {plan.new_version}"))
                bar.advance(last + 1 - i)
                i = last + 1
                continue
            if result.outcome == "conflict":
                _annotate(cat, plan, entries, folder, i, old, tree, result)
            bar.advance(description=f"{result.outcome:8} {old.entry.name}")
            if result.outcome == "conflict" and stop_on_conflict:
                # the order matters for an interruption in between (see run_carry): the
                # work tree shows the conflict before the plan records the stop
                _flush(repo, plan, pending)
                plan.flushed = len(plan.results)
                if with_worktree:
                    _show_conflict(repo, plan, changes)
                plan.stopped = i
                plan.results.append(result)
                plan.flushed = len(plan.results)
                return i
            plan.results.append(result)
            if result.outcome in ("clean", "offset", "merged"):
                tree.update(changes)
                pending.append((old.entry.name, changes, commit_message(old.data, old.entry.name)))
            i += 1
    _flush(repo, plan, pending)
    plan.flushed = len(plan.results)
    plan.stopped = -1
    return None


def _annotate(cat: GitCat, plan: Plan, entries: list[Entry], folder: Path, i: int, old: OldPatch,
              tree: Overlay, result: Result) -> None:
    """A conflict's blocked_by / likely_upstream / explanation (the report's part 2)."""
    result.likely_upstream = RS.likely_upstream(old.before, old.after, tree)
    log = RS.git_log_lines(Path(plan.git_upstream[0]), *plan.git_upstream[1:]) if plan.git_upstream else None
    result.explain = RS.explain(old.before, old.after, tree, cat.reader(plan.new_base), log)
    # earlier conflicts (unresolved or skipped) on the same files: does this patch carry
    # on a tree where they had applied? Then it only waits for them.
    cands = [k for k, r in enumerate(plan.results[:i]) if r.outcome == "conflict"
             and r.resolved != "manual" and set(r.files) & set(old.after)]
    if not cands:
        return
    hypo = Overlay(tree)
    for k in cands:
        prev = _old_patch(cat, plan, entries, folder, k)
        hypo.update({p: RS.theirs_merge(prev.before.get(p), hypo(p), a) for p, a in prev.after.items()})
    if carry(old, hypo, plan.new_version)[0].outcome != "conflict":
        result.blocked_by = entries[cands[-1]].name
        result.reason += f"; blocked by {result.blocked_by}"


def _old_patch(cat: GitCat, plan: Plan, entries: list[Entry], folder: Path, i: int) -> OldPatch:
    """Patch i of the old series with its before/after files, read from the old commits."""
    cached = plan.old_patches.get(plan.old_commits[i])
    if cached is not None and cached.entry == entries[i]:
        return cached
    e = entries[i]
    data = (folder / e.name).read_bytes()
    parent = plan.old_commits[i - 1] if i else plan.old_base
    before_r, after_r = cat.reader(parent), cat.reader(plan.old_commits[i])
    touched = _touched(cat, parent, plan.old_commits[i])
    return OldPatch(e, data, {p: before_r(p) for p in touched}, {p: after_r(p) for p in touched})


LOOKAHEAD = 3


def _combined_upstream(cat: GitCat, plan: Plan, entries: list[Entry], i: int, tree: Overlay) -> int | None:
    """For a conflicting patch i: the last index j (up to LOOKAHEAD patches on) such that
    patches i..j together are already upstream (e.g. a revert followed by a corrected
    re-apply, both superseded by the new upstream), else None."""
    before = plan.old_commits[i - 1] if i else plan.old_base
    base_r = cat.reader(before)
    for j in range(i + 1, min(i + 1 + LOOKAHEAD, len(entries))):
        after_r = cat.reader(plan.old_commits[j])
        clean_noop = True
        for path in _touched(cat, before, plan.old_commits[j]):
            ours = tree(path)
            merged, ok = merge_file(base_r(path), ours, after_r(path), entries[i].name)
            if not ok or merged != ours:
                clean_noop = False
                break
        if clean_noop:
            return j
    return None


def _touched(cat: GitCat, a: str, b: str) -> list[str]:
    out = git(cat.repo, "diff-tree", "-r", "--no-renames", "--name-only", "-z", a, b).stdout
    return [p.decode(errors="surrogateescape") for p in out.split(b"\0") if p]


def _flush(repo: Path, plan: Plan, pending: list[tuple[str, dict[str, Content], str]]) -> None:
    if not pending:
        return
    specs = [CommitSpec(plan.tip or plan.new_base if k == 0 else k - 1, msg, changes)
             for k, (_, changes, msg) in enumerate(pending)]
    shas = fast_commits(repo, specs)
    for (name, _, _), sha in zip(pending, shas, strict=True):
        plan.new_commits[name] = sha
    plan.tip = shas[-1]
    pending.clear()


def _show_conflict(repo: Path, plan: Plan, changes: dict[str, Content]) -> None:
    git(repo, "checkout", "-q", "-f", "-B", "series", plan.tip or plan.new_base)
    git(repo, "clean", "-q", "-fd")
    write_tree_changes(repo, changes)


def build_old(repo: Path, entries: list[Entry], folder: Path, old_base: str,
              cache: dict[str, OldPatch] | None = None) -> list[str]:
    """The old series as commits on `old_base`; `cache` (a plan's old_patches) gets each
    commit's patch with its before/after files, so the carry need not read them back."""
    with GitCat(repo) as cat:
        olds = apply_old(entries, folder, cat.reader(old_base))
    specs = [CommitSpec(old_base if k == 0 else k - 1, commit_message(o.data, o.entry.name), o.after)
             for k, o in enumerate(olds)]
    shas = fast_commits(repo, specs)
    if cache is not None:
        cache.clear()
        cache.update(zip(shas, olds, strict=True))
    return shas


# ---------------------------------------------------------------- export and report

def export_patch(repo: Path, plan: Plan, res: Result, e: Entry, original: bytes,
                 diffs: dict[str, bytes] | None = None) -> bytes:
    """Clean patches keep their bytes; others get fresh hunks under the same description."""
    if res.outcome == "clean" and not res.resolved:
        return original
    sha = plan.new_commits[e.name]
    diff = diffs[sha] if diffs and sha in diffs else commit_diff(repo, sha)
    return rerender(original, diff, e.name) if original.strip() else diff


def commit_diffs(repo: Path, shas: list[str]) -> dict[str, bytes]:
    """The diffs of many commits against their parents from one `git diff-tree --stdin`."""
    if not shas:
        return {}
    out = git(repo, "diff-tree", "--stdin", "-p", "--no-renames", "--no-color", "--no-ext-diff", "-U3",
              input="".join(f"{s}\n" for s in shas).encode()).stdout
    wanted = {s.encode() + b"\n" for s in shas}
    diffs: dict[str, list[bytes]] = {}
    current: list[bytes] | None = None
    for line in out.splitlines(keepends=True):
        if line in wanted:
            current = diffs.setdefault(line.decode().strip(), [])
        elif current is not None:
            current.append(line)
    return {s: b"".join(v) for s, v in diffs.items()}


def diffs_needed(repo: Path, plan: Plan, entries: list[Entry], results: list[Result]) -> dict[str, bytes]:
    """Batch the diffs of every patch whose file will be regenerated."""
    shas = [plan.new_commits[e.name] for e, r in zip(entries, results, strict=False)
            if r.kept and e.name in plan.new_commits
            and (r.resolved or r.outcome not in ("clean", "conflict"))]
    return commit_diffs(repo, shas)


def range_diff(repo: Path, plan: Plan) -> str:
    if not plan.old_commits or not plan.tip:
        return ""
    old_tip = plan.old_commits[-1]
    with repository(repo) as r:
        out = r.git.range_diff("--no-color", f"{plan.old_base}..{old_tip}", f"{plan.new_base}..{plan.tip}",
                               with_exceptions=False, strip_newline_in_stdout=False)
    return str(out)


def patch_json(r: Result) -> dict[str, object]:
    """One patch in a JSON report: empty fields left out, but a conflict always says
    whether it is likely upstream."""
    return {k: v for k, v in asdict(r).items()
            if v or k in ("name", "outcome") or (k == "likely_upstream" and r.outcome == "conflict")}


def review_markdown(results: list[Result], diff_of: Callable[[str], bytes | str]) -> list[str]:
    """The markdown sections a maintainer reviews: word-wise merged hunks, explained conflicts."""
    md: list[str] = []
    wiggled = [r for r in results if r.resolved_by and r.outcome == "merged"]
    if wiggled:
        md += ["", "## Review: patches refreshed by a word-wise merge", "",
               "Conflict-free, and each removes and adds exactly the lines of the original patch; "
               "only the context moved. Check the placement:"]
        for r in wiggled:
            diff = diff_of(r.name)
            text = diff.decode(errors="replace") if isinstance(diff, bytes) else diff
            md += ["", f"### {r.name} (resolved by {r.resolved_by})", "", "```diff", text.rstrip(), "```"]
    conflicts = [r for r in results if r.outcome == "conflict"]
    if conflicts:
        md += ["", "## Conflicts explained"]
    for r in conflicts:
        md += ["", f"### {r.name}", ""]
        if r.blocked_by:
            md.append(f"Blocked by {r.blocked_by}: it conflicts only because that patch did not "
                      "apply; resolve that one first and this one is carried on the result.")
        if r.likely_upstream:
            md.append("**Likely upstream**: its added lines are already in the new upstream where its "
                      "hunks belong and its removed lines are gone. Check, then drop it by hand if so "
                      "(never dropped automatically).")
        for item in r.explain:
            md += _explain_md(item)
    return md


def _explain_md(item: dict[str, object]) -> list[str]:
    where = f"{item['file']}" + (f" line {item['line']}" if "line" in item else "")
    if "hunk" not in item:
        return ["", f"- {where}: {item.get('note', '')}"]
    md = ["", f"{where}: the patch's hunk", "", "```diff", str(item["hunk"]).rstrip(), "```",
          "", "what upstream did to the same lines", "", "```diff",
          str(item["upstream_change"]).rstrip() or "(nothing: the lines differ by earlier patches)", "```"]
    commits = item.get("upstream_commits")
    if isinstance(commits, list) and commits:
        md += ["", "upstream commits touching them:", *(f"- {c}" for c in commits)]
    return md


def _git_range(old_src: str, new_src: str) -> list[str]:
    """[repo, old ref, new ref] when both sides are refs of the same git repository."""
    (k1, p1, r1), (k2, p2, r2) = U.classify(old_src), U.classify(new_src)   # resolve() checked both
    return [str(p1), r1 or "HEAD", r2 or "HEAD"] if k1 == k2 == "git" and p1 == p2 else []


def write_report(out: Path, plan: Plan, old_version: str, extra: dict[str, object],
                 rdiff: str, repo: Path | None = None) -> tuple[Path, Path]:
    results = list(plan.results)
    counts = {o: sum(1 for r in results if r.outcome == o) for o in OUTCOMES}
    data = {"from": old_version, "onto": plan.new_version, "counts": counts,
            "patches": [patch_json(r) for r in results], **extra}
    out.mkdir(parents=True, exist_ok=True)
    js = out / "rebase-report.json"
    atomic_write(js, (json.dumps(data, indent=1) + "\n").encode())
    md = [f"# Rebase {old_version} -> {plan.new_version}", "",
          " ".join(f"{o}: {n}" for o, n in counts.items()), "",
          "| patch | outcome | note |", "|---|---|---|"]
    for r in results:
        note = r.reason + (f" (resolved: {r.resolved})" if r.resolved else "")
        md.append(f"| {r.name} | {r.outcome} | {note.replace('|', '/')} |")
    md += review_markdown(results, lambda name: commit_diff(repo, plan.new_commits[name]) if repo else "")
    md += ["", "## git range-diff (old series vs rebased series)", "", "```", rdiff.rstrip(), "```", ""]
    mdp = out / "rebase-report.md"
    atomic_write(mdp, "\n".join(md).encode())
    return mdp, js


# ---------------------------------------------------------------- plain mode (contract)

def plain(series: Path, old_src: str, new_src: str, out: Path, target: Target,
          report: Path | None = None, new_version: str | None = None) -> list[Result]:
    """Rebase `series` from OLD onto NEW into `out` (series + patches); no stop on conflict:
    a conflicting patch is written unchanged and reported, the rest carries on.
    `new_version`: NEW's --upstream-version (required when NEW names no release)."""
    if not series.is_file():
        raise MissingFileError(f"series file {series} does not exist")
    entries = read_series(series)
    clock = PhaseClock()
    wanted = series_paths(entries, series.parent)
    # partial imports of two tarballs or directories run side by side (a whole import runs
    # after the other: the second one then sends git only the files that changed)
    aside = _Aside(U.resolve, target, old_src, None, False, wanted) \
        if wanted is not None and _side_by_side(old_src, new_src, new_version) else None
    try:
        with clock("import_new"):
            new_up = U.resolve(target, new_src, new_version, paths=wanted)   # first: a refusal changes nothing
        with clock("import_old"):
            old_up = aside.result() if aside else U.resolve(target, old_src, strict=False, paths=wanted)
    finally:
        if aside:
            aside.stop()
    with clock("import_old"):
        ws = plain_workspace(target)
        ws.ensure_repo()
        # regenerated `index` lines abbreviate blob ids as the kernel does (12), not by the
        # repository's object count (auto): a partial and a whole tree export the same bytes
        git(ws.root, "config", "core.abbrev", str(ABBREV))
        old_base = _plain_base(ws, old_up)
    with clock("import_new"):
        new_base = _plain_base(ws, new_up)
    t0 = time.monotonic()
    with clock("carry"):
        plan = Plan(series=str(series.resolve()), old_base=old_base, new_base=new_base,
                    new_version=new_up.version, new_digest=new_up.digest, old_commits=[],
                    git_upstream=_git_range(old_src, new_src))
        plan.old_commits = build_old(ws.root, entries, series.parent, old_base, plan.old_patches)
        run_carry(ws.root, plan, 0, stop_on_conflict=False, with_worktree=False)
    results = list(plan.results)
    with clock("export"):
        _write_series_dir(ws.root, plan, series, entries, results, out)
    elapsed = time.monotonic() - t0
    if report is not None:
        data = {"from": old_up.version, "onto": new_up.version, "seconds": round(elapsed, 2),
                "phase_seconds": clock.rounded(PLAIN_PHASES), "patches": [patch_json(r) for r in results]}
        atomic_write(report, (json.dumps(data, indent=1) + "\n").encode())
        md = [f"# Rebase {old_up.version} -> {new_up.version}", "",
              *(f"- {r.name}: {r.outcome}" + (f" ({r.reason})" if r.reason else "") for r in results),
              *review_markdown(results, lambda name: commit_diff(ws.root, plan.new_commits[name]))]
        md_path = report.with_suffix(".md") if report.suffix != ".md" else report.with_name(report.name + ".md")
        atomic_write(md_path, ("\n".join(md) + "\n").encode())
    return results


PLAIN_PHASES = ("import_old", "import_new", "carry", "export")
ABBREV = 12   # hex digits of a blob id in a regenerated diff's `index` line (the kernel's)


def series_paths(entries: list[Entry], folder: Path) -> U.PathSet | None:
    """Every path the series' patches name (old and new names, at each entry's strip
    level: the names the applier may read or ask about), or None when the applier could
    read others (a symlink diff resolves its target through the tree) or a patch is
    unreadable (its error then comes from the run on the whole tree)."""
    found: set[str] = set()
    for e in entries:
        try:
            parsed = P.parse_patch((folder / e.name).read_bytes(), e.name)
        except (OSError, PatchFormatError):
            return None
        for fp in parsed.files:
            if any((m or 0) & 0o170000 == 0o120000 for m in (fp.old_mode, fp.new_mode)):
                return None
            for name in (fp.old_name, fp.new_name):
                stripped = P.strip_path(name, e.strip) if name else None
                try:
                    found.update([P.safe_relpath(stripped, e.name)] if stripped else [])
                except UnsafePathError:
                    return None
    return U.PathSet(found)


def _side_by_side(old_src: str, new_src: str, new_version: str | None) -> bool:
    """Both sources are tarballs or directories, NEW not a directory imported whole for a
    release given (errors in either are left for resolve(), in its order)."""
    try:
        kinds = U.classify(old_src)[0], U.classify(new_src)[0]
    except (MissingFileError, UpstreamError):
        return False
    return set(kinds) <= {"tarball", "dir"} and not (kinds[1] == "dir" and U.given_release(new_version))


class _Aside:
    """fn(*args) in a forked child while this process goes on: OLD's decompressor and tar
    parser get the other core while NEW is imported here. Its result or its error comes
    back pickled; stop() interrupts it (SIGINT: its import cleans up as on Ctrl-C)."""

    def __init__(self, fn: Callable[..., U.Upstream], *args: object) -> None:
        ctx = multiprocessing.get_context("fork")
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_aside_child, args=(send, fn, args), daemon=True)
        self.proc.start()
        send.close()
        self.answered = False

    def result(self) -> U.Upstream:
        try:
            ok, value = self.recv.recv()
            self.answered = True   # the child only exits now: no signal for it
        except EOFError:
            self.proc.join()
            raise UpstreamError(f"the import of the old upstream died (exit {self.proc.exitcode})") from None
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def stop(self) -> None:
        if not self.answered and self.proc.is_alive() and self.proc.pid is not None:
            os.kill(self.proc.pid, signal.SIGINT)
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join()
        self.recv.close()


def _aside_child(send: Connection, fn: Callable[..., U.Upstream], args: tuple[object, ...]) -> None:
    progress.set_quiet(True)   # one live progress display: the parent's
    try:
        send.send((True, fn(*args)))
    except BaseException as exc:   # the parent raises it
        send.send((False, exc))
    finally:
        send.close()


def _plain_base(ws: Workspace, up: U.Upstream) -> str:
    """The upstream's commit in plain mode's repository: a partial tree's commit is never
    tagged (a tag is what later imports reuse as the whole tree)."""
    if up.partial_tree:
        return partial_commit(ws.root, up)
    return ws.import_upstream(up)


class PhaseClock:
    """Wall seconds per phase (a phase may be entered more than once: the times add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - t

    def rounded(self, order: tuple[str, ...]) -> dict[str, float]:
        return {k: round(self.seconds.get(k, 0.0), 2) for k in order}


def plain_workspace(target: Target) -> Workspace:
    """Plain mode's scratch repository (its lock is taken by `fsbuild rebase --series`)."""
    return Workspace(target, root=paths.state_dir() / "rebase-plain")


def _write_series_dir(repo: Path, plan: Plan, series: Path, entries: list[Entry],
                      results: list[Result], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    diffs = diffs_needed(repo, plan, entries, results)
    for e, r in zip(entries, results, strict=False):
        if not r.kept:
            continue
        original = (series.parent / e.name).read_bytes()
        data = original if r.outcome == "conflict" else export_patch(repo, plan, r, e, original, diffs)
        atomic_write(out / e.name, data)
        kept.append(e)
    shutil.copyfile(series, out / "series") if series.resolve() != (out / "series").resolve() else None
    update_series_file(out / "series", kept)


# ---------------------------------------------------------------- workspace mode

class Rebase:
    """`fsbuild rebase --onto SRC [--continue|--skip|--abort]` for one target."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.ws = Workspace(target)
        self.state_file = self.ws.meta_dir / "rebase.json"
        self.backup = self.ws.meta_dir / "rebase-backup"

    def in_progress(self) -> bool:
        return self.state_file.is_file()

    def _load(self) -> Plan:
        if not self.in_progress():
            raise WorkspaceError(f"no rebase in progress for target {self.target.name}")
        data = json.loads(self.state_file.read_text())
        results = [Result(**r) for r in data.pop("results", [])]
        return Plan(**data, results=results)

    def _save(self, plan: Plan) -> None:
        atomic_write(self.state_file, json.dumps(asdict(plan), indent=1).encode())

    # every entry point holds the workspace lock: a second fsbuild on it exits 14

    def start(self, src: str, version: str | None = None) -> list[Result]:
        with self.ws.locked():
            return self._start(src, version)

    def resume(self) -> list[Result]:
        with self.ws.locked():
            self._unlock_git()
            return self._resume()

    def skip(self) -> list[Result]:
        with self.ws.locked():
            self._unlock_git()
            return self._skip()

    def abort(self) -> None:
        with self.ws.locked():
            self._unlock_git()
            self._abort()

    def _unlock_git(self) -> None:
        """A rebase killed inside a git command leaves git's lock files: remove them when
        their owner is dead (the rebase's own work is recorded in rebase.json)."""
        if self.in_progress():
            clear_stale_git_locks(self.ws.root)

    def _start(self, src: str, version: str | None = None) -> list[Result]:
        if self.in_progress():
            raise WorkspaceError("a rebase is already in progress: `fsbuild rebase --continue`, "
                                 "`--skip` or `--abort`")
        entries = self.ws.entries()
        # the new upstream's identity first: refusing it must leave everything as it was
        new_up = U.resolve(self.target, src, version)
        if "base" not in self.ws.state():
            # no workspace yet: the series applies to the target's own upstream
            self.ws.use_upstream(U.resolve(self.target, strict=False))
        old_state = self.ws.require()
        self.ws.guard("rebase")   # not over a push or pop a killed run left half done
        repo = self.ws.root
        refs = _refs(repo)
        with repository(repo) as r:
            head = r.head.commit.hexsha
        if self.ws.dirty():
            raise WorkspaceError("the workspace has unrefreshed changes: `fsbuild series refresh` first")
        new_base = self.ws.import_upstream(new_up)
        plan = Plan(series=str(self.target.series), old_base=old_state["base"], new_base=new_base,
                    new_version=new_up.version, new_digest=new_up.digest, old_commits=[],
                    head_before=head, refs_before=refs,
                    state_before=(self.ws.meta_dir / "workspace.json").read_text())
        self._backup_files(entries)
        self._save(plan)   # from here on --abort works
        self._build_old(plan)
        return self._carry(plan, 0)

    def _build_old(self, plan: Plan) -> None:
        """The old series as commits (deterministic: a rerun after an interruption makes
        the same ones), from the series as it was when the rebase started."""
        manifest = json.loads((self.backup / "manifest.json").read_text())
        entries = read_series(self.backup / manifest[str(self.target.series)])
        try:
            plan.old_commits = build_old(self.ws.root, entries, self.target.series.parent,
                                         plan.old_base, plan.old_patches)
        except KeyboardInterrupt:
            raise RunInterruptedError("rebase interrupted; patches/ untouched: "
                                      "`fsbuild rebase --continue` resumes, `--abort` restores") from None
        self._save(plan)

    def _carry(self, plan: Plan, start: int) -> list[Result]:
        try:
            stopped = run_carry(self.ws.root, plan, start, stop_on_conflict=True, with_worktree=True)
        except KeyboardInterrupt:
            self._save(plan)
            raise RunInterruptedError("rebase interrupted; patches/ untouched: "
                                      "`fsbuild rebase --continue` resumes, `--abort` restores") from None
        finally:
            self._save(plan)
        if stopped is not None:
            name = read_series(Path(plan.series))[stopped].name
            res = plan.results[-1]
            why = (f", blocked by {res.blocked_by}" if res.blocked_by else "") + \
                (", likely already upstream (see the report)" if res.likely_upstream else "")
            raise RebaseConflictError(
                f"patch {name} conflicts in {', '.join(res.files)}{why} (markers in {self.ws.root}); "
                "resolve them, then `fsbuild rebase --continue` (or --skip / --abort)")
        return self._finish(plan)

    def _resume(self) -> list[Result]:
        plan = self._load()
        if plan.phase == "export":
            return self._finish(plan)
        if not plan.old_commits:
            self._build_old(plan)   # interrupted before the old series was built
        if plan.stopped < 0:
            return self._carry(plan, len(plan.results))
        entries = read_series(Path(plan.series))
        e = entries[plan.stopped]
        res = plan.results[-1]
        left = [f for f in res.files if (self.ws.root / f).is_file()
                and MARKER.search((self.ws.root / f).read_bytes())]
        if left:
            raise RebaseConflictError(f"conflict markers left in {', '.join(left)}: resolve them first")
        repo = self.ws.root
        git(repo, "add", "-A")
        data = (self.target.series.parent / e.name).read_bytes()
        git(repo, "commit", "-q", "--allow-empty", "--no-verify", "-F", "-",
            input=commit_message(data, e.name).encode())
        plan.tip = git_out(repo, "rev-parse", "HEAD")
        plan.new_commits[e.name] = plan.tip
        res.resolved = "manual"
        plan.stopped = -1
        self._save(plan)
        return self._carry(plan, len(plan.results))

    def _skip(self) -> list[Result]:
        plan = self._load()
        if plan.stopped < 0:
            raise WorkspaceError("no conflicting patch to skip")
        plan.results[-1].resolved = "skipped"
        git(self.ws.root, "checkout", "-q", "-f", "-B", "series", plan.tip or plan.new_base)
        git(self.ws.root, "clean", "-q", "-fd")
        plan.stopped = -1
        self._save(plan)
        return self._carry(plan, len(plan.results))

    def _abort(self) -> None:
        """Restore refs, work tree, patches/ files and target.toml exactly as before."""
        plan = self._load()
        repo = self.ws.root
        now = _refs(repo)
        for ref in now.keys() - plan.refs_before.keys():
            git(repo, "update-ref", "-d", ref)
        for ref, sha in plan.refs_before.items():
            git(repo, "update-ref", "--no-deref", ref, sha)
        git(repo, "checkout", "-q", "-f", "series")
        git(repo, "reset", "-q", "--hard", plan.head_before)
        git(repo, "clean", "-q", "-fd")
        self._restore_files()
        atomic_write(self.ws.meta_dir / "workspace.json", plan.state_before.encode())
        self._cleanup()

    # -- files under patches/: backed up before anything is written ----------------

    def _files_at_risk(self, entries: list[Entry]) -> list[Path]:
        tdir = self.target.series.parent
        return [self.target.series, self.target.dir / "target.toml", *(tdir / e.name for e in entries)]

    def _backup_files(self, entries: list[Entry]) -> None:
        shutil.rmtree(self.backup, ignore_errors=True)
        manifest = {}
        for k, path in enumerate(self._files_at_risk(entries)):
            if path.is_file():
                dest = self.backup / str(k)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                manifest[str(path)] = str(k)
        atomic_write(self.backup / "manifest.json", json.dumps(manifest).encode())

    def _restore_files(self) -> None:
        manifest = json.loads((self.backup / "manifest.json").read_text())
        for path, k in manifest.items():
            data = (self.backup / k).read_bytes()
            p = Path(path)
            if not p.is_file() or p.read_bytes() != data:
                atomic_write(p, data)
                shutil.copystat(self.backup / k, p)

    def _cleanup(self) -> None:
        self.state_file.unlink(missing_ok=True)
        shutil.rmtree(self.backup, ignore_errors=True)

    # -- the end: export, target.toml, report ------------------------------------

    def _finish(self, plan: Plan) -> list[Result]:
        plan.phase = "export"
        self._save(plan)
        repo = self.ws.root
        manifest = json.loads((self.backup / "manifest.json").read_text())
        # the series as it was: a rerun after Ctrl-C must not see a half-updated one
        entries = read_series(self.backup / manifest[str(self.target.series)])
        results = list(plan.results)
        folder = self.target.series.parent
        originals = {p: (self.backup / k).read_bytes() for p, k in manifest.items()}
        kept = []
        diffs = diffs_needed(repo, plan, entries, results)
        for e, r in zip(entries, results, strict=False):
            path = folder / e.name
            original = originals.get(str(path), b"")
            if r.kept:
                new = export_patch(repo, plan, r, e, original, diffs)
                if new != original:
                    atomic_write(path, new)
                kept.append(e)
            else:
                path.unlink(missing_ok=True)
        if len(kept) != len(entries):
            # from the series as it was: a rerun after Ctrl-C may find it already shortened
            atomic_write(self.target.series, originals[str(self.target.series)])
            update_series_file(self.target.series, kept)
        set_version(self.target.dir / "target.toml", plan.new_version)
        git(repo, "checkout", "-q", "-f", "-B", "series", plan.tip or plan.new_base)
        self.ws.save_state(base=plan.new_base, version=plan.new_version, digest=plan.new_digest,
                           tag=f"upstream/{plan.new_version}")
        old_version = json.loads(plan.state_before).get("version", "?")
        write_report(paths.out_dir(self.target.name), plan, old_version, {}, range_diff(repo, plan), repo)
        self._cleanup()
        return results


def _refs(repo: Path) -> dict[str, str]:
    """Every ref and the object it names (what --abort puts back)."""
    with repository(repo) as r:
        return {ref.path: ref.object.hexsha for ref in r.references}


def set_version(toml: Path, full_version: str) -> None:
    """Minimal textual edit of target.toml: only the version/release values change. An
    upstream naming no release (the Makefile version is its identity) keeps the package
    release for the same version and starts a new version at release 1."""
    version, _, release = full_version.partition("-")
    text = toml.read_text()
    if not release:
        old = re.search(r'(?m)^version\s*=\s*"([^"]*)"', text)
        release = "1" if old and old.group(1) != version else ""
    new = re.sub(r'(?m)^(version\s*=\s*")[^"]*(")', lambda m: m.group(1) + version + m.group(2), text, count=1)
    if release:
        new = re.sub(r'(?m)^(release\s*=\s*")[^"]*(")', lambda m: m.group(1) + release + m.group(2), new, count=1)
    if new != text:
        atomic_write(toml, new.encode())
