"""Command line entry point. Subcommands live in fsbuild/commands/<job>.py and are imported
lazily so `fsbuild --help` stays fast; every FsbuildError is caught here, once."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

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
        command: click.Command = getattr(importlib.import_module(f"fsbuild.commands.{module}"), attr)
        return command


_debug = False  # --debug: let errors propagate with their traceback (for bug reports)

# FSBUILD_* environment variables, for --help (README describes them at length).
ENVIRONMENT = {
    "FSBUILD_TARGET": "default target (else el6)",
    "FSBUILD_ROOT": "project directory: patches/, specs/, module/ (else this checkout)",
    "FSBUILD_STATE": "workspaces and caches (else ROOT/.fsbuild)",
    "FSBUILD_OUT": "results: RPMs, reports, verdicts (else ROOT/out)",
    "FSBUILD_EL6_SRC": "the el6 SRPM or tarball (the default el6 upstream)",
    "FSBUILD_MOCK_BASEURL": "CentOS 6 vault/mirror for --builder mock",
    "FSBUILD_MAX_MEMBER / FSBUILD_MAX_TOTAL": "archive size limits for upstream imports",
    "FSBUILD_SMOKE_ACCEL": "smoke: force kvm or tcg",
    "FSBUILD_SMOKE_NET": "smoke: `user` for user-mode networking (no tap devices)",
}


def _epilog() -> str:
    from fsbuild import errors

    classes = sorted((c for c in vars(errors).values()
                      if isinstance(c, type) and issubclass(c, errors.FsbuildError) and c is not errors.FsbuildError),
                     key=lambda c: c.exit_code)
    codes = ["0 success", "1 internal error (a bug: rerun with --debug)", "2 usage error",
             *(f"{c.exit_code} {(c.__doc__ or c.__name__).strip().splitlines()[0]}" for c in classes)]
    env = [f"{k}: {v}" for k, v in ENVIRONMENT.items()]
    # \b keeps click from re-wrapping the lists into one paragraph.
    return "\b\nExit codes:\n" + "\n".join(f"  {c}" for c in codes) + \
        "\n\n\b\nEnvironment:\n" + "\n".join(f"  {e}" for e in env)


@click.group(cls=LazyGroup, invoke_without_command=True, epilog=_epilog(),
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fsbuild")
@click.option("-v", "--verbose", is_flag=True, help="Also log every external command fsbuild runs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or status lines (errors still show).")
@click.option("--debug", is_flag=True, help="On any error, show the full traceback (for bug reports).")
@click.option("--project-dir", type=click.Path(file_okay=False, path_type=Path), envvar="FSBUILD_ROOT",
              help="The fsbuild checkout (patches/, specs/, module/); default: the one fsbuild runs "
                   "from, or the nearest above the current directory.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, debug: bool, project_dir: Path | None) -> None:
    """Fastsocket kernel build system: apply and rebase the patch series, build RPMs, boot them."""
    global _debug
    _debug = debug
    if project_dir is not None:  # children (rpmbuild helpers, tests) see the same project
        os.environ["FSBUILD_ROOT"] = str(project_dir.resolve())
    if quiet:
        from fsbuild import progress  # lazy: rich is slow to import, --help must stay fast

        progress.silence()
    if verbose or debug:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                            format="fsbuild: %(message)s")
    if ctx.invoked_subcommand is None:  # bare `fsbuild`: the help, and success
        click.echo(ctx.get_help())


def one_line(message: str) -> str:
    """Errors are one line: multi-line library messages (tarfile's per-method list...)
    are folded, so scripts and logs can rely on it."""
    out = ""
    for part in (p.strip().removeprefix("- ") for p in message.splitlines()):
        if part:
            out += part if not out else (" " if out.endswith(":") else "; ") + part
    return out


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP stop a run the way Ctrl-C does: builds kill their process group
    and remove their tmpfs, applies roll back. (By default they killed Python outright,
    leaving rpmbuild running orphaned.) A signal the caller set to ignore stays ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _stop)


def _unraisable(info: sys.UnraisableHookArgs) -> None:
    """An error Python cannot raise (a library object's __del__ failing on the half-built
    state a Ctrl-C left it in) is the library's noise, not the user's: no traceback for
    it, only under --debug."""
    if _debug:
        sys.__unraisablehook__(info)


def main() -> None:
    _stop_signals_interrupt()
    sys.unraisablehook = _unraisable
    try:
        # prog_name and complete_var fixed: `python -m fsbuild` and the console script
        # complete alike (README: eval "$(_FSBUILD_COMPLETE=bash_source fsbuild)").
        rv = cli.main(standalone_mode=False, prog_name="fsbuild", complete_var="_FSBUILD_COMPLETE")
    except SystemExit:
        raise
    except BaseException as exc:
        if _debug:  # the whole traceback first; the line and exit code stay the same
            traceback.print_exception(exc)
        code, line = _failure(exc)
        click.echo(line, err=True)
        sys.exit(code)
    # Commands may return an int exit code (e.g. `series check` reporting problems).
    sys.exit(rv if isinstance(rv, int) else 0)


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line the user sees, for any exception."""
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
        return RunInterruptedError.exit_code, "fsbuild: interrupted"
    if isinstance(exc, click.UsageError):
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        return exc.exit_code, f"fsbuild: error: {one_line(exc.format_message())}{hint}"
    if isinstance(exc, click.ClickException):
        return exc.exit_code, f"fsbuild: error: {one_line(exc.format_message())}"
    if isinstance(exc, FsbuildError):
        return exc.exit_code, f"fsbuild: error: {one_line(exc.message)}"
    # Anything else is a bug in fsbuild: still one line, and the way to the traceback.
    what = one_line(str(exc)) or "no message"
    return 1, (f"fsbuild: error: internal error {type(exc).__name__}: {what} "
               "(rerun with `fsbuild --debug ...` for the traceback and report it)")
