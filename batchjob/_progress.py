"""A progress bar for people at a terminal: keys done of total, current rate, ETA.

rich draws it on stderr and redraws in place; it is left out when stderr is not a terminal
(cron, systemd, CI), where JSON logs say the same.
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ProgressBar:
    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("undoing check-ins"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("keys · {task.fields[rate]:.2f} req/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task: TaskID | None = None

    def log_stream(self) -> io.TextIOBase:
        """Where log lines go while the bar is shown: printed above it, never over it."""
        return _AboveTheBar(self._progress.console)

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("undo", total=total, rate=0.0)

    def advance(self, keys: int, rate: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=keys, rate=rate)

    def close(self) -> None:
        self._progress.stop()


class _AboveTheBar(io.TextIOBase):
    """A text stream whose lines rich prints above its live bar, which it then redraws.

    Written to directly, the terminal would show each line after a stale copy of the bar.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.print(Text.from_ansi(line), soft_wrap=True, highlight=False)
        return len(text)

    def isatty(self) -> bool:
        return self._console.is_terminal
