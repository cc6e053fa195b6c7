"""Status lines and progress bars print patch names and paths literally (no rich markup)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fsbuild import progress

NAMES = ["0004-fix-[/proc]-entry.patch", "[net] tcp: [bold]x", "a[/]b"]


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(progress, "_console",
                        Console(file=buf, force_terminal=True, color_system=None, width=200))
    monkeypatch.setattr(progress, "_quiet", False)
    return buf


@pytest.mark.parametrize("name", NAMES)
def test_info_prints_names_literally(captured: io.StringIO, name: str) -> None:
    progress.info(f"applied {name}")
    assert captured.getvalue() == f"applied {name}\n"


def test_bar_descriptions_are_not_markup(captured: io.StringIO,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "enabled", lambda: True)
    with progress.bar("applying", total=len(NAMES)) as bar:
        for name in NAMES:
            bar.advance(1, description=name)
            bar._p.refresh()  # type: ignore[union-attr]  # render now, in this thread
            assert name in captured.getvalue()
