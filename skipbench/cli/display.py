"""Everything a person sees: the console, the tables (rich on a terminal, plain aligned text when piped, never
wrapped), the progress bars (a log line now and then when piped), the library's notes, and a recipe's result (its
`shown` tables and `said` lines). No other CLI module builds a table."""

from __future__ import annotations

import sys
import time

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape  # noqa: F401  (commands escape text shown with markup)
from rich.table import Table

from skipbench.errors import LISTENERS

console = Console(stderr=True)


def note(message: str) -> None:
    """The library's notes (errors.note), one plain line each on stderr (not wrapped: a path stays on its line);
    rank 0 only."""
    if not console.quiet:
        typer.echo(f"note: {message}", err=True)


LISTENERS.append(note)


def say(message: str, markup: bool = True) -> None:
    """A line for the person running the command (stderr; rich markup unless `markup` is False). Piped, it is one
    line however long (a path or a layer list is not broken at 80 columns)."""
    console.print(message, markup=markup, highlight=markup, soft_wrap=not console.is_terminal)


def show(df, title: str, formats: dict | None = None, width: int | None = None) -> None:
    """Every table a command prints: a rich table on a terminal; piped (not a terminal), plain aligned text that is
    never wrapped, one row per line, so that a table can be read by another program. `formats`: a format string per
    column (floats default to 3 decimals; NaN is blank)."""
    formats = formats or {}

    def cell(col, v) -> str:
        if isinstance(v, float) and v != v:
            return ""
        if col in formats:
            return formats[col].format(v)
        return f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)

    cells = [[cell(col, v) for col, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    if not sys.stdout.isatty():
        import pandas as pd

        typer.echo(f"# {title}")
        shown = pd.DataFrame(cells, columns=[str(c) for c in df.columns])
        typer.echo(shown.to_string(index=False) if len(shown) else "(no rows)")
        return
    table = Table(title=title)
    for col in df.columns:  # long names (tasks, specs) wrap rather than end in an ellipsis
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "if" else "left", overflow="fold")
    for row in cells:
        table.add_row(*[escape(c) for c in row])  # labels hold [options]
    Console(width=width).print(table)


def result(res) -> None:
    """A recipe's result as its recipe chose to show it: its notes, its tables, then its lines (what was written)."""
    for message in getattr(res, "notes", None) or ():
        note(message)
    for s in res.shown:
        if s.frame is None:
            typer.echo(s.title)  # a line of the result itself (stdout), in its place among the tables
        else:
            show(s.frame, s.title, s.formats, s.width)
    for line in res.said:
        say(line, markup=False)


def piped() -> bool:
    """Progress is drawn on a terminal; piped, it is a plain log line now and then (and one per finished point)."""
    return not console.is_terminal


class Bar:
    """A rich progress bar with ETA that appears only once the work starts (after inputs are checked); piped, a log
    line every LOG_EVERY seconds and at the end instead."""

    LOG_EVERY = 10.0

    def __init__(self, label: str) -> None:
        self.label, self.progress, self.task = label, None, None
        self.done, self.total, self.began, self.logged = 0, None, 0.0, 0.0

    def start(self, total: int | None) -> None:
        """The work's size; called again once started, the new total (work found on the way, such as the matched
        controls evaluate decides after the learned points) with the count and clock kept."""
        if self.began:
            self.total = total
            if self.progress is not None:
                self.progress.update(self.task, total=total)
            return
        self.total, self.began = total, time.perf_counter()
        if piped():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=total)

    def advance(self, n: int = 1) -> None:
        if self.progress is None and not piped():
            self.start(None)
        self.done += n
        if self.progress is not None:
            self.progress.advance(self.task, n)
            return
        now = time.perf_counter()
        if now - self.logged >= self.LOG_EVERY or self.done == self.total:
            self.logged = now
            of = f"/{self.total}" if self.total else ""
            typer.echo(f"{self.label}: {self.done}{of} ({now - self.began:.0f} s)", err=True)

    def point(self, what: str) -> None:
        """A finished point (a part of a sweep): one log line when piped, the bar's description on a terminal."""
        if self.progress is not None:
            self.progress.update(self.task, description=f"{self.label}: {what} done")
        else:
            typer.echo(f"{self.label}: {what} done", err=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


class TrainBar(Bar):
    """Progress with the loss parts and mean executed layers of the last step."""

    def start(self, total, done=0) -> None:
        super().start(total)
        self.done = done  # a resumed run starts where it stopped
        if self.progress is not None:
            self.progress.advance(self.task, done)

    def step(self, rec: dict) -> None:
        parts = " ".join(f"{k}={v:.3f}" for k, v in rec.items() if k != "step" and not k.startswith("seconds"))
        if self.progress is not None:
            self.progress.update(self.task, description=parts)
        else:
            self.label = f"{self.label.partition(':')[0]}: {parts} ·"  # piped: the log line carries the last step's parts
        self.advance(1)


def training(res) -> None:
    """A training run's notes and its last step: the loss parts, the median seconds per step and its phases."""
    for message in res.notes:
        note(message)
    if res.log:
        last = res.log[-1]
        secs = np.median([r["seconds"] for r in res.log])
        parts = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step" and not k.startswith("seconds"))
        phases = ", ".join(f"{k.removeprefix('seconds_')} {np.median([r.get(k, np.nan) for r in res.log]):.2f}"
                           for k in last if k.startswith("seconds_"))
        typer.echo(f"step {last['step']}: {parts}; median {secs:.2f} s/step ({phases}); saved to {res.out}")


def train(run_train, cfg) -> None:
    """A training recipe under the progress bar, then its last step's summary."""
    with TrainBar("train") as bar:
        res = run_train(cfg, progress=bar.step, start=bar.start)
    training(res)
