"""Progress bars (rich) for long work, silent when stderr is not a terminal or output is JSON."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)
_quiet = False    # this command's choice (--json owns stdout)
_silenced = False  # the user's global -q: no command turns it back on


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def silence() -> None:
    """`fsbuild -q`: no bars and no status lines for the rest of the run."""
    global _silenced
    _silenced = True


def enabled() -> bool:
    return not (_quiet or _silenced) and sys.stderr.isatty()


class Bar:
    """A task handle; `advance`/`update` are no-ops when progress is disabled."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._p, self._t = progress, task

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._p is not None and self._t is not None:
            self._p.update(self._t, advance=n, description=description)

    def update(self, description: str) -> None:
        if self._p is not None and self._t is not None:
            self._p.update(self._t, description=description)


@contextmanager
def bar(description: str, total: int | None = None) -> Iterator[Bar]:
    if not enabled():
        yield Bar(None, None)
        return
    # Descriptions are patch names and paths: text, never rich markup (`[net]`, `[/proc]`).
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=_console, transient=True) as progress:
        yield Bar(progress, progress.add_task(description, total=total))


def info(message: str) -> None:
    """A status line on stderr (never on stdout, which --json owns). The message is
    plain text: names like `0004-fix-[/proc]-entry.patch` are printed as they are."""
    if not (_quiet or _silenced):
        _console.print(message, highlight=False, markup=False)
