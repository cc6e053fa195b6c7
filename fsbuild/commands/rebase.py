"""`fsbuild rebase`: move a series to a new upstream (workspace mode or plain mode)."""

from __future__ import annotations

from pathlib import Path

import click

from fsbuild import paths, progress
from fsbuild import rebase as R
from fsbuild import target as targets
from fsbuild.commands.common import complete_targets
from fsbuild.errors import RebaseConflictError
from fsbuild.gitio import clear_stale_git_locks


@click.command("rebase")
@click.option("--onto", "onto", help="New upstream: SRPM, tarball, directory or REPO@REF.")
@click.option("--target", "-t", "target_name", shell_complete=complete_targets,
              help="Target (default: el6 or $FSBUILD_TARGET).")
@click.option("--continue", "cont", is_flag=True, help="Go on after resolving a conflict.")
@click.option("--skip", is_flag=True, help="Drop the conflicting patch and go on.")
@click.option("--abort", is_flag=True, help="Restore workspace, patches/ and target.toml.")
@click.option("--series", "series", type=click.Path(path_type=Path), help="Plain mode: series file.")
@click.option("--from", "old_src", help="Plain mode: the upstream the series applies to.")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Plain mode: output folder.")
@click.option("--json", "report", type=click.Path(path_type=Path), help="Plain mode: JSON report path.")
@click.option("--upstream-version", "up_version", metavar="VERSION-RELEASE",
              help="Identity of --onto when the source names none (e.g. 2.6.32-431.29.2.el6).")
def cmd(onto: str | None, target_name: str | None, cont: bool, skip: bool, abort: bool,
        series: Path | None, old_src: str | None, out: Path | None, report: Path | None,
        up_version: str | None) -> int:
    """Carry the series to a new upstream, classifying each patch
    clean | offset | merged | upstream | conflict."""
    target = targets.load(target_name)
    if up_version is not None and not onto:
        raise click.UsageError("--upstream-version names the --onto source: give --onto too")
    if series is not None or old_src is not None or out is not None:
        return _plain(target, series, old_src, onto, out, report, up_version)
    actions = [a for a in (cont, skip, abort, bool(onto)) if a]
    if len(actions) != 1:
        raise click.UsageError("give exactly one of --onto SRC, --continue, --skip, --abort")
    rb = R.Rebase(target)
    if abort:
        rb.abort()
        click.echo(f"rebase aborted: workspace, {target.series.parent} and target.toml restored")
        return 0
    results = rb.resume() if cont else rb.skip() if skip else rb.start(onto or "", up_version)
    _summary(results)
    click.echo(f"report: {paths.out_dir(target.name) / 'rebase-report.md'}")
    return 0


def _plain(target: targets.Target, series: Path | None, old_src: str | None, onto: str | None,
           out: Path | None, report: Path | None, up_version: str | None) -> int:
    if not (series and old_src and onto and out):
        raise click.UsageError("plain mode needs --series, --from, --onto and --out")
    progress.set_quiet(False)
    ws = R.plain_workspace(target)
    with ws.locked():
        if ws.exists:
            clear_stale_git_locks(ws.root)
        results = R.plain(series, old_src, onto, out, target, report, up_version)
    _summary(results)
    conflicts = [r.name for r in results if r.outcome == "conflict"]
    if conflicts:
        raise RebaseConflictError(f"{len(conflicts)} patch(es) conflict: {', '.join(conflicts)} "
                                  "(written unchanged)")
    return 0


def _summary(results: list[R.Result]) -> None:
    for r in results:
        note = f"  ({r.reason})" if r.reason and r.outcome != "clean" else ""
        click.echo(f"{r.outcome:9} {r.name}{note}")
    counts = {o: sum(r.outcome == o for r in results) for o in R.OUTCOMES}
    click.echo(" ".join(f"{o}={n}" for o, n in counts.items()))
