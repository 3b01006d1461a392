"""The rich progress bars of the long stages (sensitivity passes, fine-tuning epochs), one layout for all."""

from __future__ import annotations


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
