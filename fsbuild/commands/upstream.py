"""`fsbuild upstream import SRC`: import an upstream kernel into the target's workspace."""

from __future__ import annotations

import json

import click

from fsbuild import progress, upstream
from fsbuild import target as targets
from fsbuild.commands.common import complete_targets
from fsbuild.workspace import Workspace


@click.group("upstream")
def cmd() -> None:
    """Pristine upstream sources (SRPM, tarball, directory, git ref)."""


@cmd.command("import")
@click.argument("src", required=False)
@click.option("--target", "-t", "target_name", shell_complete=complete_targets,
              help="Target (default: el6 or $FSBUILD_TARGET).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--upstream-version", "up_version", metavar="VERSION-RELEASE",
              help="Identity of SRC when it names none (e.g. 2.6.32-431.29.2.el6).")
def import_cmd(src: str | None, target_name: str | None, as_json: bool, up_version: str | None) -> None:
    """Import SRC (default: the target's source) and make it the workspace's upstream,
    with the series unapplied. SRC: FILE.src.rpm, FILE.tar.{gz,bz2,xz}, DIR, or
    [git:]REPO@REF."""
    progress.set_quiet(as_json)
    target = targets.load(target_name)
    up = upstream.resolve(target, src, up_version)
    ws = Workspace(target)
    with ws.locked():
        ws.guard("upstream")   # not under a rebase or a killed step: the reset would hide it
        commit = ws.use_upstream(up)
    info = {"target": target.name, "version": up.version, "digest": up.digest,
            "tarball": str(up.tarball), "topdir": up.topdir, "commit": commit,
            "tag": ws.upstream_tag(up), "tree": str(ws.root),
            "configs": sorted(up.configs), "spec": str(up.spec) if up.spec else None}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"upstream {up.version} ({up.digest[:16]}) -> {ws.root} [{info['tag']}]")
    if up.configs:
        click.echo(f"configs: {', '.join(sorted(up.configs))}")
