"""Terminal rendering: progress on stderr, results on stdout, errors as one line on stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PIPE_WIDTH = 1000  # piped output has no screen to fit: a path or title folded mid-word breaks copying and grep


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr)
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


out = _console(stderr=False)
err = _console(stderr=True)


def display_path(path: str | os.PathLike) -> str:
    """A path as the user would type it: relative to the working folder when that is shorter."""
    text = os.fspath(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:  # another drive (Windows)
        return text
    return relative if len(relative) < len(text) else text


def handle_errors(command: Callable) -> Callable:
    """Library errors become `error: ...` on stderr and exit 1 (usage errors exit 2)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hsl.errors import HSLError, HSLUsageError, os_error_message

        from .options import FLAGS

        try:
            return command(*args, **kwargs)
        except HSLError as exc:  # the library names the parameter at fault; the user reads this CLI's flag
            err.print(f"[red]error:[/red] {escape(exc.worded(FLAGS))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(exc, HSLUsageError) else 1) from None
        except OSError as exc:  # the file system said no (permissions, disk full, a damaged file)
            err.print(f"[red]error:[/red] {escape(os_error_message(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: finished work is saved; run the same command again to continue")
            raise typer.Exit(130) from None

    return wrapper


class _Rate(TextColumn):
    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task: Any) -> Any:
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, quiet: bool, unit: str = "items") -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields the callback the library calls with (done, total)."""
    if quiet:
        yield lambda done, total: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   _Rate(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err,
                   transient=False)
    task = bar.add_task(description, total=None)
    last = [0]

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:  # start on first news: an early error prints no empty bar
            bar.start()
        if done < last[0]:  # a new pass (hsl train's next epoch): its own count, time and rate, not a mix
            bar.reset(task, total=total, completed=done)
        else:
            bar.update(task, completed=done, total=total)
        last[0] = done

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
