"""Progress bars on stderr (stdout stays clean for ``--json``), shown only on a terminal."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Items per second, e.g. ``5,120 img/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; ``unit="bytes"`` shows sizes and transfer speed instead of a count."""
    console = Console(stderr=True)
    if unit == "bytes":
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as progress:
        task = progress.add_task(description, total=total or None)
        yield lambda n: progress.advance(task, n)
