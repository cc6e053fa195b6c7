"""Command line entry point. Subcommands live in fsbuild/commands/<job>.py and are imported
lazily so `fsbuild --help` stays fast; every FsbuildError is caught here, once."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from fsbuild import __version__
from fsbuild.errors import FsbuildError, RunInterruptedError

# command name -> "module:attribute" under fsbuild.commands
COMMANDS: dict[str, str] = {
    "apply": "apply:cmd",
    "series": "series:cmd",
    "upstream": "upstream:cmd",
    "rebase": "rebase:cmd",
    "rpm": "rpm:cmd",
    "verify": "verify:cmd",
    "smoke": "smoke:cmd",
    "doctor": "doctor:cmd",
    "targets": "targets:cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, spec in COMMANDS.items()
                      if importlib.util.find_spec(f"fsbuild.commands.{spec.split(':')[0]}"))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        module, attr = spec.split(":")
        return getattr(importlib.import_module(f"fsbuild.commands.{module}"), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fsbuild")
def cli() -> None:
    """Fastsocket kernel build system: apply and rebase the patch series, build RPMs, boot them."""


def main() -> None:
    try:
        rv = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("fsbuild: interrupted", err=True)
        sys.exit(RunInterruptedError.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FsbuildError as exc:
        click.echo(f"fsbuild: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("fsbuild: interrupted", err=True)
        sys.exit(RunInterruptedError.exit_code)
    except SystemExit:
        raise
    # Commands may return an int exit code (e.g. `series check` reporting problems).
    sys.exit(rv if isinstance(rv, int) else 0)
