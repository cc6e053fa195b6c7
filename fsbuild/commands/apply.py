"""`fsbuild apply --series PATH/series [--fuzz N] [--json] [--dry-run] TREE`: apply a quilt
series to any tree, in place, all or nothing (plain mode; no workspace, no backups)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fsbuild import progress
from fsbuild.series import PatchReport, apply_series, parse_series


def summary(reports: list[PatchReport]) -> dict[str, int]:
    files = {f for r in reports for f in r.files}
    hunks = [h for r in reports for h in r.hunks]
    return {"patches": len(reports), "files": len(files), "hunks": len(hunks),
            "offset": sum(1 for h in hunks if h.offset and not h.fuzz),
            "fuzz": sum(1 for h in hunks if h.fuzz)}


def to_json(reports: list[PatchReport]) -> dict[str, object]:
    return {
        "patches": [{"name": r.name, "files": r.files,
                     "hunks": [{"file": h.file, "hunk": h.hunk, "offset": h.offset,
                                "fuzz": h.fuzz} for h in r.hunks]} for r in reports],
        "applied": len(reports),
    }


@click.command("apply")
@click.option("--series", "series_path", required=True, type=click.Path(path_type=Path),
              help="quilt series file; patch paths are relative to its folder")
@click.option("--fuzz", default=0, show_default=True, type=click.IntRange(0, 10),
              help="max context lines GNU-patch style fuzz may ignore")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report on stdout")
@click.option("--dry-run", is_flag=True, help="check that everything applies; write nothing")
@click.argument("tree", type=click.Path(path_type=Path))
def cmd(series_path: Path, fuzz: int, as_json: bool, dry_run: bool, tree: Path) -> int:
    """Apply every patch of a quilt series to TREE (all or nothing)."""
    progress.set_quiet(as_json)
    series = parse_series(series_path)
    with progress.bar("applying", total=len(series.entries)) as bar:
        reports = apply_series(series, tree, fuzz=fuzz, dry_run=dry_run,
                               progress=lambda name: bar.advance(1, description=name))
    if as_json:
        click.echo(json.dumps(to_json(reports), indent=1))
        return 0
    s = summary(reports)
    verb = "would apply" if dry_run else "applied"
    progress.info(f"{verb} {s['patches']} patches to {s['files']} files "
                  f"({s['hunks']} hunks; {s['offset']} with offset, {s['fuzz']} with fuzz)")
    # Offsets are routine; fuzz means context was ignored and deserves a look.
    for r in reports:
        for h in r.hunks:
            if h.fuzz:
                progress.info(f"  {r.name}: {h.file} hunk #{h.hunk} applied with fuzz {h.fuzz}"
                              + (f" (offset {h.offset:+d})" if h.offset else ""))
    return 0
