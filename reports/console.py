"""Consoles for tables: a terminal keeps its width (rich wraps to it); piped output, which rich
would cut at 80 columns (figures ending in "…"), gets a width no table here reaches."""
from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 240


def wide_console(**kwargs) -> Console:
    """A rich Console (``kwargs`` as rich takes them) that never cuts a table when piped."""
    console = Console(**kwargs)
    if not console.is_terminal and "width" not in kwargs:
        console.width = max(console.width, PIPED_WIDTH)
    return console
