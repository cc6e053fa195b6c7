from __future__ import annotations

import json

import click

from fsbuild import target as targets


@click.command("targets")
@click.option("--json", "as_json", is_flag=True)
def cmd(as_json: bool) -> None:
    """List the targets (patches/<name>/target.toml)."""
    loaded = [targets.load(n) for n in targets.available()]
    if as_json:
        click.echo(json.dumps([{"name": t.name, "version": t.full_version, "series": str(t.series),
                                "default": t.name == targets.DEFAULT_TARGET} for t in loaded], indent=2))
        return
    for t in loaded:
        star = "*" if t.name == targets.DEFAULT_TARGET else " "
        click.echo(f"{star} {t.name:12} {t.full_version:24} {t.description}")
