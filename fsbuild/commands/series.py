"""`fsbuild series ...`: the target's quilt series in its git workspace (one commit per
applied patch): list, check, push, pop, refresh, new, import, export, status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from fsbuild import progress
from fsbuild import target as targets
from fsbuild.commands.common import FUZZ, complete_targets
from fsbuild.errors import PatchApplyError, WorkspaceError
from fsbuild.workspace import Workspace

target_opt = click.option("--target", "-t", "target_name", shell_complete=complete_targets,
                          help="Target (default: el6 or $FSBUILD_TARGET).")


@contextmanager
def _ws(target_name: str | None) -> Iterator[Workspace]:
    """The target's workspace, locked for the command (a second command exits 14)."""
    ws = Workspace(targets.load(target_name))
    with ws.locked():
        yield ws


@click.group("series")
def cmd() -> None:
    """Work on the target's patch series in its workspace (state_dir/<target>/)."""


@cmd.command("list")
@target_opt
@click.option("--json", "as_json", is_flag=True)
def list_cmd(target_name: str | None, as_json: bool) -> None:
    """Every patch of the series; `+` applied, `=` top."""
    with _ws(target_name) as ws:
        ws.guard("list")
        applied = [n for n, _ in ws.applied()] if ws.exists and ws.state().get("base") else []
        rows = [(e.name, e.name in applied) for e in ws.entries()]
    if as_json:
        click.echo(json.dumps([{"name": n, "applied": a} for n, a in rows], indent=2))
        return
    for n, a in rows:
        mark = "=" if applied and n == applied[-1] else ("+" if a else " ")
        click.echo(f"{mark} {n}")


@cmd.command("status")
@target_opt
@click.option("--json", "as_json", is_flag=True)
def status_cmd(target_name: str | None, as_json: bool) -> None:
    """Upstream version, applied/total patches, top patch, unrefreshed changes; a rebase
    in progress or a step of an interrupted run, and the command that gets back."""
    with _ws(target_name) as ws:
        info = _status(ws)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"target {info['target']}: upstream {info['upstream']} in {info['tree']}")
    click.echo(f"applied {info['applied']}/{info['total']}, top: {info['top'] or '(none)'}"
               + (", unrefreshed changes" if info["dirty"] and not info["interrupted"] else ""))
    for note in (info["rebase"], info["interrupted"]):
        if note:
            click.echo(note)


def _status(ws: Workspace) -> dict[str, object]:
    st = ws.require()
    note = ws.rebase_note()
    applied = _stack(ws, rebase=bool(note))
    it = ws.intent()
    return {"target": ws.target.name, "upstream": st.get("version"), "tree": str(ws.root),
            "applied": len(applied), "total": len(ws.entries()),
            "top": applied[-1][0] if applied else None, "dirty": ws.dirty(),
            "rebase_in_progress": bool(note), "rebase": note or None,
            "interrupted": ws.interrupted_note(it) if it else None}


def _stack(ws: Workspace, rebase: bool) -> list[tuple[str, str]]:
    """The applied patches. During a rebase HEAD is on the new upstream once carrying
    started (on the old series before): count from whichever base HEAD descends from."""
    if not rebase:
        return ws.applied()
    try:
        new_base = json.loads(ws.rebase_file.read_text()).get("new_base")
    except (OSError, ValueError, AttributeError):
        new_base = None
    for base in (new_base, None):
        try:
            return ws.applied(base)
        except WorkspaceError:
            continue
    return []


@cmd.command("check")
@target_opt
@click.option("--json", "as_json", is_flag=True, help="Report on stdout; exit code as without it.")
def check_cmd(target_name: str | None, as_json: bool) -> int:
    """Verify every patch applies to the pristine upstream at fuzz 0 with no offset."""
    progress.set_quiet(as_json)
    with _ws(target_name) as ws:
        results = ws.check()
    bad = [(n, r) for n, r in results if r != "ok"]
    if as_json:
        click.echo(json.dumps({"ok": not bad, "patches": [{"name": n, "result": r} for n, r in results]},
                              indent=2))
        return PatchApplyError.exit_code if bad else 0
    for n, r in results:
        click.echo(f"{'ok  ' if r == 'ok' else 'FAIL'} {n}" + ("" if r == "ok" else f": {r}"))
    if bad:
        raise PatchApplyError(f"{len(bad)} of {len(results)} patches do not apply exactly "
                              f"(first: {bad[0][0]}); refresh them")
    click.echo(f"{len(results)} patches apply exactly")
    return 0


@cmd.command("push")
@target_opt
@click.option("-a", "--all", "push_all", is_flag=True, help="Push every remaining patch.")
@click.option("--fuzz", type=FUZZ, default=0, show_default=True,
              help="Context lines a hunk may ignore (as `fsbuild apply --fuzz`).")
@click.option("--json", "as_json", is_flag=True, help="Print {\"applied\": [...]} on stdout.")
@click.argument("count", type=click.IntRange(1), default=1, required=False)
def push_cmd(target_name: str | None, push_all: bool, fuzz: int, as_json: bool, count: int) -> None:
    """Apply the next COUNT patches (one commit each)."""
    progress.set_quiet(as_json)
    applied: list[str] = []

    def done_one(name: str) -> None:
        applied.append(name)
        if not as_json:
            click.echo(f"applied {name}")

    with _ws(target_name) as ws, progress.bar("pushing"):
        ws.push(None if push_all else count, fuzz=fuzz, done_one=done_one)
    if as_json:
        click.echo(json.dumps({"applied": applied}, indent=2))


@cmd.command("pop")
@target_opt
@click.option("-a", "--all", "pop_all", is_flag=True)
@click.option("-f", "--force", is_flag=True, help="Discard unrefreshed changes.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"removed\": [...]} on stdout.")
@click.argument("count", type=click.IntRange(1), default=1, required=False)
def pop_cmd(target_name: str | None, pop_all: bool, force: bool, as_json: bool, count: int) -> None:
    """Unapply the top COUNT patches (reset to the previous patch commit)."""
    with _ws(target_name) as ws:
        removed = ws.pop(None if pop_all else count, force=force)
    if as_json:
        click.echo(json.dumps({"removed": removed}, indent=2))
        return
    for name in removed:
        click.echo(f"removed {name}")


@cmd.command("refresh")
@target_opt
def refresh_cmd(target_name: str | None) -> None:
    """Regenerate the top patch file from its commit and the work tree's changes."""
    with _ws(target_name) as ws:
        click.echo(f"refreshed {ws.refresh()}")


@cmd.command("new")
@target_opt
@click.option("-m", "--message", default="", help="Description of the new patch.")
@click.argument("name")
def new_cmd(target_name: str | None, message: str, name: str) -> None:
    """Start a new (empty) patch NAME after the top patch; edit files, then refresh."""
    with _ws(target_name) as ws:
        click.echo(f"created {ws.new(name, message)}")


@cmd.command("import")
@target_opt
@click.option("-P", "--name", "as_name", help="File name inside the series folder.")
@click.option("-p", "strip", type=click.IntRange(0), default=1, show_default=True)
@click.argument("patch", type=click.Path(path_type=Path))
def import_cmd(target_name: str | None, as_name: str | None, strip: int, patch: Path) -> None:
    """Add PATCH to the series after the top applied patch (not applied)."""
    with _ws(target_name) as ws:
        click.echo(f"imported {ws.import_patch(patch, as_name, strip)}")


@cmd.command("export")
@target_opt
@click.argument("out", type=click.Path(path_type=Path))
def export_cmd(target_name: str | None, out: Path) -> None:
    """Write the series and its patches (applied ones regenerated from commits) to OUT."""
    with _ws(target_name) as ws:
        files = ws.export(out)
    click.echo(f"exported {len(files)} patches to {out}")
