"""Commands that run the whole pipeline: reproduce (a preset's stages, as skipbench commands) and report."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display


def reproduce(
    ctx: typer.Context,
    preset: str = typer.Option("quick", help="smoke | quick | paper, or a path to a .toml preset"),
    results: Optional[str] = typer.Option(None, help="results folder (default: the preset's)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the commands without running them"),
) -> None:
    """Run a preset's experiments as a sequence of skipbench commands; finished stages are skipped.

    Example: skipbench reproduce --preset quick      # what `make reproduce` runs
    """
    from skipbench.experiments.reproduce import run

    root = ctx.find_root().command  # each stage is a skipbench command, run in this process
    run(preset, results, dry_run, command=lambda argv: root.main(argv, standalone_mode=False), say=display.say)


def report(
    results: str = typer.Option("results", help="folder holding skipbench outputs"),
    out: Optional[str] = typer.Option(None, help="Markdown file (default <results>/REPORT.md)"),
) -> None:
    """Write a Markdown report (figures, tables, the papers' numbers beside ours, verdicts).

    Example: skipbench report --results results/ --out results/REPORT.md
    """
    from skipbench.experiments.report import run

    display.say(f"wrote {run(results, out)}", markup=False)


COMMANDS = {"reproduce": reproduce, "report": report}
