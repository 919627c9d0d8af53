"""Rich progress bars with a throughput column (images/s), silent when disabled."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

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


class RateColumn(ProgressColumn):
    """Items per second, from the task's ``images`` field (falls back to completed steps)."""

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        items = task.fields.get("items", task.completed)
        if elapsed <= 0 or not items:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        return Text(f"{items / elapsed:,.0f} {self.unit}/s", style="progress.data.speed")


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self._progress, self._task, self.items = progress, task_id, 0

    def advance(self, steps: int = 1, items: int = 0, **fields) -> None:
        self.items += items
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, items=self.items, **fields)

    def reset(self, total: int, description: str) -> None:
        self.items = 0
        if self._progress is not None:
            self._progress.reset(self._task, total=total, description=description, items=0)


class _LogLines(_Bar):
    """Where no bar can be drawn (a log file of a background job): one plain line at most every ``every`` seconds."""

    def __init__(self, total: int, description: str, unit: str, every: float):
        super().__init__(None, None)
        self.total, self.description, self.unit, self.every = total, description, unit, every
        self.done, self.started = 0, time.perf_counter()
        self.printed = self.started

    def advance(self, steps: int = 1, items: int = 0, **fields) -> None:
        super().advance(steps, items)
        self.done += steps
        now = time.perf_counter()
        if now - self.printed >= self.every:
            self.printed = now
            rate = self.items / (now - self.started) if self.items else 0.0
            print(f"{self.description}: {self.done:,}/{self.total:,} after {now - self.started:,.0f} s"
                  + (f", {rate:,.0f} {self.unit}/s" if rate else ""), file=sys.stderr, flush=True)

    def reset(self, total: int, description: str) -> None:
        self.items, self.done, self.total, self.description = 0, 0, total, description
        self.started = self.printed = time.perf_counter()


#: Seconds between the plain progress lines written where stderr is not a terminal.
LOG_EVERY_S = 60.0


@contextlib.contextmanager
def progress_bar(total: int, description: str, unit: str = "img", enabled: bool = True) -> Iterator[_Bar]:
    """``with progress_bar(n, "epoch 1") as bar: bar.advance(1, items=batch_size)``.

    Drawn on stderr, so stdout stays clean for ``--json``; where stderr is not a terminal (a background job's
    log), a plain line every :data:`LOG_EVERY_S` seconds instead. ``unit="bytes"`` shows sizes and transfer speed
    (downloads) instead of a count and a rate.
    """
    console = Console(stderr=True)
    if not enabled:
        yield _Bar(None, None)
        return
    if not console.is_terminal:
        yield _LogLines(total, description, unit, LOG_EVERY_S)
        return
    if unit == "bytes":
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    else:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total or None, items=0, status="")
        yield _Bar(progress, task)
