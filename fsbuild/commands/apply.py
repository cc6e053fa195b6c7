"""`fsbuild apply --series PATH/series [--fuzz N] [--json] [--dry-run] TREE`: apply a quilt
series to any tree, in place, all or nothing (plain mode; no workspace, no backups).
`fsbuild apply --recover TREE` rolls back an apply that was killed; the next apply on TREE
does so first. One apply per tree at a time (a lock outside the tree)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from fsbuild import journal, lock, progress
from fsbuild.commands.common import FUZZ
from fsbuild.errors import MissingFileError, RecoveryError
from fsbuild.series import Interrupts, PatchReport, apply_series, parse_series


def summary(reports: list[PatchReport]) -> dict[str, int]:
    files = {f for r in reports for f in r.files}
    # Counted per run of equal results: a big patch has a HunkResult per hunk only on demand.
    counts = [r.hunks.counts() for r in reports]
    return {"patches": len(reports), "files": len(files), "hunks": sum(c[0] for c in counts),
            "offset": sum(c[1] for c in counts), "fuzz": sum(c[2] for c in counts)}


def to_json(reports: list[PatchReport]) -> dict[str, object]:
    return {
        "patches": [{"name": r.name, "files": r.files,
                     "hunks": [{"file": h.file, "hunk": h.hunk, "offset": h.offset,
                                "fuzz": h.fuzz} for h in r.hunks]} for r in reports],
        "applied": len(reports),
    }


@click.command("apply")
@click.option("--series", "series_path", type=click.Path(path_type=Path),
              help="quilt series file; patch paths are relative to its folder")
@click.option("--fuzz", default=0, show_default=True, type=FUZZ,
              help="max context lines GNU-patch style fuzz may ignore")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report on stdout")
@click.option("--dry-run", is_flag=True, help="check that everything applies; write nothing")
@click.option("--recover", is_flag=True,
              help="only roll TREE back from an interrupted apply (killed, power loss)")
@click.argument("tree", type=click.Path(path_type=Path))
def cmd(series_path: Path | None, fuzz: int, as_json: bool, dry_run: bool, recover: bool,
        tree: Path) -> int:
    """Apply every patch of a quilt series to TREE (all or nothing)."""
    if not recover and series_path is None:
        raise click.UsageError("Missing option '--series' (or --recover to roll back TREE).")
    if not tree.is_dir():
        raise MissingFileError(f"tree {tree} is not a directory")
    progress.set_quiet(as_json)
    guard = Interrupts()
    guard.install()  # stop signals become one flag, checked between safe points
    with lock.hold(journal.lock_file(tree), f"tree {tree}"):
        if recover:
            _recover(tree, explicit=True)
            return 0
        if journal.pending(tree):
            if dry_run:
                raise RecoveryError(f"{tree} holds an interrupted apply; roll it back first: "
                                    f"fsbuild apply --recover {tree}")
            _recover(tree, explicit=False)
        assert series_path is not None
        series = parse_series(series_path)
        with progress.bar("applying", total=len(series.entries)) as bar:
            reports = apply_series(series, tree, fuzz=fuzz, dry_run=dry_run, guard=guard,
                                   progress=lambda name: bar.advance(1, description=name))
        guard.settle()
    if guard.hit is not None and not dry_run:
        click.echo(f"fsbuild: {signal.Signals(guard.hit).name} arrived after the tree was "
                   "fully written; the run is complete", err=True)
    _report(reports, as_json, dry_run)
    return 0


def _recover(tree: Path, explicit: bool) -> None:
    done = journal.recover(tree)
    # stderr, even with --json: the tree changed before this run's own work.
    if done is None:
        if explicit:
            click.echo(f"fsbuild: nothing to recover in {tree}", err=True)
    elif done.state == "rolled back":
        click.echo(f"fsbuild: recovered {tree} from an interrupted apply "
                   f"({done.restored} paths restored)", err=True)
    elif done.state == "kept":
        click.echo(f"fsbuild: the interrupted apply in {tree} had written every file; "
                   "kept it and removed its journal", err=True)
    else:
        click.echo(f"fsbuild: removed the leftovers of an interrupted apply in {tree} "
                   "(the tree was whole)", err=True)


def _report(reports: list[PatchReport], as_json: bool, dry_run: bool) -> None:
    if as_json:
        click.echo(json.dumps(to_json(reports), indent=1))
        return
    s = summary(reports)
    verb = "would apply" if dry_run else "applied"
    progress.info(f"{verb} {s['patches']} patches to {s['files']} files "
                  f"({s['hunks']} hunks; {s['offset']} with offset, {s['fuzz']} with fuzz)")
    # Offsets are routine; fuzz means context was ignored and deserves a look.
    for r in reports:
        for h in r.hunks.fuzzed():
            progress.info(f"  {r.name}: {h.file} hunk #{h.hunk} applied with fuzz {h.fuzz}"
                          + (f" (offset {h.offset:+d})" if h.offset else ""))
