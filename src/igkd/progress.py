"""Rich progress bars with a throughput column (images/s), silent when disabled."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
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


@contextlib.contextmanager
def progress_bar(total: int, description: str, unit: str = "img", enabled: bool = True) -> Iterator[_Bar]:
    """``with progress_bar(n, "epoch 1") as bar: bar.advance(1, items=batch_size)``."""
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, items=0, status="")
        yield _Bar(progress, task)
