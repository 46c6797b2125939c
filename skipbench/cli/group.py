"""The command group every skipbench command runs under: a user mistake is one line on stderr and exit code 1, never a
traceback; old option spellings are translated (with a note); an option that takes one value, given twice, is
refused; under torchrun only the commands that share their work run, and only rank 0 prints."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from skipbench.errors import NOTED, SkipbenchError

# Options renamed so that one idea has one spelling in every command: the old spelling still works, with a note,
# until the next release; `--help` shows only the new one.
RENAMED = {
    "generate": {"--cost": "--costs"},
    "plan": {"--cost": "--costs"},
    "bench": {"--policies": "--policy", "--drafts": "--draft", "--new-tokens": "--max-new-tokens"},
    "cosine": {"--strategies": "--policy", "--seeds": "--num-seeds"},
    "compare": {"--methods": "--policy"},
    "oracle": {"--policies": "--policy"},
    "route train": {"--policies": "--policy"},
    "controllers sweep": {"--alphas": "--alpha", "--seeds": "--num-seeds"},
    "flexidepth train": {"--alpha": "--skip-weight"},
    "mindskip train": {"--weight": "--capacity-weight"},
}


class SkipbenchGroup(TyperGroup):
    """Maps user mistakes to one line on stderr and exit code 1; under torchrun, lets only the commands in `torchrun`
    run (the root sets it), and only rank 0 print."""

    torchrun: tuple[str, ...] = ()

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        from skipbench.cli.display import console
        from skipbench.store import distributed  # light: torch only once a process group is joined

        quiet = distributed.rank() > 0  # the other ranks' tables and progress would repeat rank 0's
        NOTED.clear()  # each command says its own notes once
        console.quiet = quiet
        try:  # torch is imported only by commands that need it (plan, oracle and --help do not)
            with contextlib.ExitStack() as stack:
                if quiet:
                    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SkipbenchError as exc:
            fail(str(exc))
        except TyperException as exc:  # click's usage errors (typer's public base of them)
            if type(exc).__name__ == "NoArgsIsHelpError":  # no_args_is_help (its class is not public; the name is
                if exc.format_message().strip():  # click's): rich prints the help itself, plain click returns it
                    typer.echo(exc.format_message(), err=True)
                rv = 0
            else:
                fail(exc.format_message())
        except typer.Abort:
            fail("aborted")
        finally:
            distributed.shutdown()
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        from skipbench.store.distributed import world_size

        if cmd is None or isinstance(cmd, TyperGroup):
            return name, cmd, rest
        words = " ".join([c.info_name for c in _ancestry(ctx) if c.parent is not None] + [name])  # the command to run
        sharded = words in TP_COMMANDS and any(a.partition("=")[0] == "--tp" for a in rest)  # one model, several ranks
        if world_size() > 1 and words not in SkipbenchGroup.torchrun and not sharded:
            raise SkipbenchError(f"'{words}' runs in one process; under torchrun: {', '.join(SkipbenchGroup.torchrun)}")
        rest = renamed(words, rest)
        refuse_repeats(cmd, rest)
        return name, cmd, rest


PLACEMENT_HELP = {
    "device_map": "place the model across devices with accelerate: auto | balanced | balanced_low_0 | sequential (filled "
                  "up to --max-memory) | FILE.json (module name -> CUDA index, cpu or disk); --device stays auto",
    "max_memory": "with --device-map auto|balanced|sequential: each device's limit, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
    "gpus_per_rank": "with --device-map under torchrun: GPUs each rank places its own model on (rank r takes r N .. "
                     "r N + N - 1; the map's indices are the rank's own)",
    "tp": "tensor parallelism under torchrun with N processes: each layer's heads and MLP split across the ranks "
          "(transformers' plan; Llama, Mistral, Qwen2, Qwen3), the same layers skipped on every rank, rank 0 writes",
}
TP_COMMANDS = ("evaluate", "generate", "bench")  # the commands that run a model sharded across ranks (--tp)
# the trainers take no --device-map: their loops keep the trained modules, gates and losses on one device, and
# training a placed model (gradients through offloaded or spread layers) has never been tested
TRAINERS = ("finetune", "controllers train", "controllers sweep", "flexidepth train", "mindskip train")


def placeable(command, tp: bool = False):
    """`command` (one that loads a model: it takes --device) with --device-map, --max-memory and --gpus-per-rank
    added, and with `tp` --tp too: it runs inside models.loading.placing(...), so every model it loads is placed or
    sharded so (issue 44). One wrapper for every such command, so that each takes the options alike."""
    import functools
    import inspect

    sig = inspect.signature(command, eval_str=True)  # typer reads this signature as given: annotations resolved
    if "device" not in sig.parameters:
        return command
    extra = [inspect.Parameter("device_map", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option("", help=PLACEMENT_HELP["device_map"])),
             inspect.Parameter("max_memory", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option("", help=PLACEMENT_HELP["max_memory"])),
             inspect.Parameter("gpus_per_rank", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                               default=typer.Option(0, min=0, help=PLACEMENT_HELP["gpus_per_rank"]))]
    if tp:
        extra.append(inspect.Parameter("tp", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                                       default=typer.Option(0, min=0, help=PLACEMENT_HELP["tp"])))
    params = list(sig.parameters.values())
    at = next((n for n, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))

    @functools.wraps(command)
    def run(*args, device_map: str = "", max_memory: str = "", gpus_per_rank: int = 0, tp: int = 0, **kw):
        if not device_map and not tp:
            if max_memory or gpus_per_rank:
                raise SkipbenchError(f"{'--max-memory' if max_memory else '--gpus-per-rank'} places a model: give "
                                     "--device-map too")
            return command(*args, **kw)
        from skipbench.models.loading import Placement, placing

        with placing(Placement(device_map, max_memory, gpus_per_rank, tp)):
            return command(*args, **kw)

    run.__signature__ = sig.replace(parameters=params[:at] + extra + params[at:])
    return run


def group(help: str) -> typer.Typer:
    """A command group (controllers, flexidepth, mindskip, route) with the same error handling."""
    return typer.Typer(cls=SkipbenchGroup, no_args_is_help=True, help=help)


def renamed(command: str, args: list[str]) -> list[str]:
    """The arguments with old option spellings replaced by the new ones (a note for each)."""
    from skipbench.errors import note

    renames, out = RENAMED.get(command, {}), []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in renames:
            note(f"'{command} {flag}' is now '{renames[flag]}' (the old spelling works until the next release)")
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


def refuse_repeats(cmd, args: list[str]) -> None:
    """An option that takes one value, given twice, is refused (click would keep the last one silently); options that
    take several values (`--policy`, `-o`) append."""
    for param in cmd.params:
        if getattr(param, "param_type_name", "") != "option" or param.multiple:
            continue
        names = set(param.opts) | set(param.secondary_opts)
        given = [a.partition("=")[0] for a in args if a.partition("=")[0] in names]
        if len(given) > 1:
            raise SkipbenchError(f"{' and '.join(dict.fromkeys(given))} given {len(given)} times; "
                                 f"{param.opts[0]} takes one value")


def _ancestry(ctx) -> list:
    chain = []
    while ctx is not None:
        chain.insert(0, ctx)
        ctx = ctx.parent
    return chain


def fail(message: str) -> None:
    from skipbench.store import distributed

    who = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
    typer.echo(f"{who}error: {' '.join(message.split())}", err=True)
    sys.exit(1)
