"""The command line: the app, its command table, and which commands may run under torchrun.

A command builds a frozen config from its options and runs its recipe's `run(cfg)` under a progress bar; the recipe
decides which tables a person sees (`display.result`). One module per command family holds the signatures (the
only place defaults live; tests/test_cli.py checks them against the configs'); `group` handles errors and old
spellings, `options` the shared options, `display` everything printed.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from skipbench.cli import catalog, lmeval, oracle, pipeline, quality, routers, speed, training
from skipbench.cli.group import TP_COMMANDS, TRAINERS, SkipbenchGroup, placeable

# libraries quieted once, before any of them is imported: transformers' logging and progress bars (its tqdm follows
# the hub's switch), lm-eval's tqdm bars (read when tqdm is first imported)
for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TQDM_DISABLE", "1")):
    os.environ.setdefault(name, value)
if "transformers" in sys.modules:  # imported before us (a test, a notebook): it read the switches already
    quiet = sys.modules["transformers"].utils.logging
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        quiet.disable_progress_bar()
    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        quiet.set_verbosity_error()
# lm-eval warns, per task and point, that a task built by `custom_dataset` (the shipped ones) takes --metadata
logging.getLogger("lm_eval.api.task").addFilter(lambda record: "Custom kwargs can be passed" not in record.getMessage())

# the commands that know how to share their work; the others refuse to run under torchrun
SkipbenchGroup.torchrun = ("evaluate", "cosine", "controllers train", "flexidepth train", "mindskip train", "finetune",
                           "lm-eval")

app = typer.Typer(cls=SkipbenchGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run pre-trained decoder-only LLMs under layer-skipping policies and measure what skipping "
                       "costs and saves.")


def _version(value: bool) -> None:
    if value:
        from skipbench import __version__

        typer.echo(f"skipbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print skipbench's version and exit")) -> None:
    """Run pre-trained decoder-only LLMs under layer-skipping policies and measure what skipping costs and saves."""


for family in (quality, lmeval, speed, training, routers, oracle, catalog, pipeline):
    for name, command in getattr(family, "COMMANDS", {}).items():
        app.command(name)(command if name in TRAINERS else placeable(command, tp=name in TP_COMMANDS))
    for name, sub in getattr(family, "GROUPS", {}).items():
        for info in sub.registered_commands:  # a group's commands that load a model take --device-map too
            if f"{name} {info.name}" not in TRAINERS:
                info.callback = placeable(info.callback)
        app.add_typer(sub, name=name)


def main() -> None:
    app()
