"""The rich progress bars of the long stages (sensitivity passes, fine-tuning epochs), one layout for all."""

from __future__ import annotations

import contextlib
import sys


def progress_bar(show: bool = True, *, info: bool = False):
    """Bars on stderr, so stdout stays free for a command's ``--json`` summary: description, bar, done/total,
    a per-task ``info`` field when asked for, elapsed time and ETA. ``show=False`` gives a silent one."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        cols.append(TextColumn("{task.fields[info]}"))
    cols += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*cols, console=Console(stderr=True), disable=not show)


class StageBars:
    """A bar per named step of a long pass, fed by a ``progress(stage, done, total)`` callback (the sensitivity
    methods' protocol); shown on stderr only when it is a terminal and ``show`` is set."""

    def __init__(self, show: bool = True):
        self.bar = progress_bar(show and sys.stderr.isatty())
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


@contextlib.contextmanager
def stage_status(text: str, show: bool = True):
    """A spinner on stderr while a stage without bars of its own runs (export, evaluation), terminal only; it
    must not wrap anything that opens bars (rich allows one live display at a time)."""
    if not (show and sys.stderr.isatty()):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield
