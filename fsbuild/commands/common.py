"""Options shared by several commands, so they read and complete the same everywhere."""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem

# One fuzz range for `apply` and `series push` (GNU patch's -F; 0 means exact context).
FUZZ = click.IntRange(0, 10)


def complete_targets(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """--target values: the names of patches/*/target.toml."""
    from fsbuild import target

    return [CompletionItem(n) for n in target.available() if n.startswith(incomplete)]

