from __future__ import annotations

import json

import click

from fsbuild import doctor
from fsbuild.errors import ToolMissingError


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def cmd(as_json: bool) -> None:
    """Check the host for every tool fsbuild commands need; print the install command."""
    findings = doctor.run_checks()
    missing = [f.tool for f in findings if not f.ok and not f.tool.optional]
    if as_json:
        click.echo(json.dumps({
            "ok": not missing,
            "tools": [{"name": f.tool.name, "ok": f.ok, "detail": f.detail, "package": f.tool.package,
                       "needed_by": list(f.tool.needed_by), "optional": f.tool.optional}
                      for f in findings],
            "install": doctor.install_command(missing),
            "engines": doctor.engine_lines(),
        }, indent=2))
    else:
        for f in findings:
            mark = "ok  " if f.ok else ("opt " if f.tool.optional else "MISS")
            click.echo(f"{mark} {f.tool.name:20} {f.detail}  (for {', '.join(f.tool.needed_by)})")
        click.echo("\ncompile farms (fsbuild rpm --distcc HOSTS / --icecc):")
        for line in doctor.engine_lines():
            click.echo(f"     {line}")
        if not missing:
            click.echo("\nall required tools present")
    if missing:
        # The report above is the detail; the failure itself is one line and its class's code.
        raise ToolMissingError(f"missing {', '.join(t.name for t in missing)}; install: "
                               f"{doctor.install_command(missing)}")
