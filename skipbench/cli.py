"""The command line: thin Typer commands that build a frozen config and call the recipe's `run(cfg)`.

Defaults are the command signatures'; the config dataclasses default to the same values for the Python API, and
tests/test_cli.py::test_cli_defaults_are_the_configs_defaults fails when the two drift apart. A user mistake raises
`SkipbenchError`, shown as one line on stderr with exit code 1 (click's own usage errors are shown the same way).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import Enum
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from skipbench.errors import LISTENERS, NOTED
from skipbench.errors import SkipbenchError
from skipbench.policies.spec import STRATEGIES  # light: the registry's defaults (checkpoint folders)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class SkipbenchGroup(TyperGroup):
    """Maps user mistakes to one line on stderr and exit code 1, never a traceback; under torchrun, lets only the
    commands that share their work run, and only rank 0 print."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        from skipbench import distributed  # light: torch only once a process group is joined

        quiet = distributed.rank() > 0  # the other ranks' tables and progress would repeat rank 0's
        NOTED.clear()  # each command says its own notes once
        console.quiet = quiet
        try:  # torch is imported only by commands that need it (plan, oracle and --help do not)
            with contextlib.ExitStack() as stack:
                if quiet:
                    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SkipbenchError as exc:
            _fail(str(exc))
        except TyperException as exc:  # click's usage errors (typer's public base of them)
            if type(exc).__name__ == "NoArgsIsHelpError":  # no_args_is_help (its class is not public; the name is
                if exc.format_message().strip():  # click's): rich prints the help itself, plain click returns it
                    typer.echo(exc.format_message(), err=True)
                rv = 0
            else:
                _fail(exc.format_message())
        except typer.Abort:
            _fail("aborted")
        finally:
            distributed.shutdown()
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        from skipbench.distributed import COMMANDS, world_size

        if cmd is None or isinstance(cmd, TyperGroup):
            return name, cmd, rest
        words = " ".join([c.info_name for c in _ancestry(ctx) if c.parent is not None] + [name])  # the command to run
        if world_size() > 1 and words not in COMMANDS:
            raise SkipbenchError(f"'{words}' runs in one process; under torchrun: {', '.join(COMMANDS)}")
        rest = _renamed(words, rest)
        _refuse_repeats(cmd, rest)
        return name, cmd, rest


# Options renamed so that one idea has one spelling in every command (issue 42): the old spelling still works, with a
# note, until the next release; `--help` shows only the new one.
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


def _renamed(command: str, args: list[str]) -> list[str]:
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


def _refuse_repeats(cmd, args: list[str]) -> None:
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


def _fail(message: str) -> None:
    from skipbench import distributed

    who = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
    typer.echo(f"{who}error: {' '.join(message.split())}", err=True)
    sys.exit(1)


app = typer.Typer(
    cls=SkipbenchGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run pre-trained decoder-only LLMs under layer-skipping policies and measure what skipping costs and saves.",
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from skipbench import __version__

        typer.echo(f"skipbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print skipbench's version and exit")) -> None:
    """Run pre-trained decoder-only LLMs under layer-skipping policies and measure what skipping costs and saves."""
# the library's notes (errors.note), one plain line each on stderr (not wrapped: a path stays on its line); rank 0 only
def _note(message: str) -> None:
    if not console.quiet:
        typer.echo(f"note: {message}", err=True)


LISTENERS.append(_note)


# Choices, as `str` Enums: `--help` lists them and click refuses anything else in one line. Each member's value is
# what the library takes (tests/test_cli.py checks them against the library's own lists); `_plain` hands the
# command the plain string.
def _choices(name: str, *values: str) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)


Device = _choices("Device", "auto", "cpu", "cuda")
Dtype = _choices("Dtype", "auto", "float32", "bfloat16", "float16")
KvMode = _choices("KvMode", "auto", "fill", "none")
PromptDepth = _choices("PromptDepth", "full", "policy")
Impl = _choices("Impl", "auto", "gather", "mask")
DropoutSchedule = _choices("DropoutSchedule", "uniform", "exp")
Teacher = _choices("Teacher", "full", "reference")  # cosine's teacher, and the training targets
GateMode = _choices("GateMode", "sample", "argmax")
ControllerInput = _choices("ControllerInput", "hidden", "constant")
AlphaUnits = _choices("AlphaUnits", "fraction", "sum")
LossKind = _choices("LossKind", "kl", "ce")
OracleMetric = _choices("OracleMetric", "rouge", "binary")


def _plain(value):
    return value.value if isinstance(value, Enum) else value


EMBEDDED = "smollm2-135m"
ModelOpt = typer.Option(EMBEDDED, "--model", "-m", help="alias, hub id, local directory or .gguf file")
DeviceOpt = typer.Option(Device.auto, callback=_plain, help="auto: cuda when available")
DtypeOpt = typer.Option(Dtype.auto, callback=_plain, help="auto: fp32 on CPU, bf16 on CUDA")
KvOpt = typer.Option(KvMode.auto, callback=_plain, help="K/V of a token at a layer it skips: fill (computed from its hidden state) | none "
                     "(nothing written) | auto (fill, or the mode a trained policy requires)")


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
        import time

        self.total, self.began = total, time.perf_counter()
        if piped():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=total)

    def advance(self, n: int = 1) -> None:
        import time

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


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_ARG_HINT = {"none": "", "cost": ":C", "layers": ":0,3,5", "checkpoint": ":DIR", "threshold": ":T"}
PolicyHelp = (" | ".join(n + _ARG_HINT[STRATEGIES.get(n).arg] for n in STRATEGIES.names(include_plugins=False))
              + ", or a plugin's (`skipbench policies` lists them, with their options)")
PolicyOptionOpt = typer.Option(None, "--policy-option", "-o", metavar="NAME=VALUE",
                               help="a strategy's own option, e.g. -o min-layers=4 -o measure=state (repeatable; "
                                    "`skipbench policies` lists them)")


DraftOpt = typer.Option(None, "--draft", help="self-speculative decoding: this policy drafts, the full model verifies "
                        "(the output stays full depth's), e.g. --draft early-exit:10")
SpeculateOpt = typer.Option("4", help="--draft: draft tokens per round, or 'auto' (adapted between rounds)")
DraftThresholdOpt = typer.Option(0.0, help="--draft: a row stops drafting after a token the draft gives a probability "
                                 "below this (0: never)")


def _speculation(speculate: str, threshold: float):
    from skipbench.engine.speculative import Speculation

    return Speculation.parse(speculate, threshold)


def _draft(draft: str | None, seed: int, policy_options=None):
    """The one draft spec of --draft (None without it)."""
    if draft is None:
        return None
    specs = _specs(draft, seed=seed, policy_options=policy_options)
    if len(specs) != 1:
        raise SkipbenchError(f"--draft '{draft}' names {len(specs)} policies; one drafts")
    return specs[0]


def _specs(policy: str, *, cost=None, costs=(), exit_layer=None, keep=None, seed=0, per_token=False,
           first_layer=True, checkpoint=None, gate="sample", policy_options=None):
    """The one policy grammar, plus the older separate options (`--policy uniform --cost 15`, `--keep 0,3,5`,
    `--per-token`, `--controller DIR`), which fill in the argument a spec leaves out."""
    from dataclasses import replace

    from skipbench.policies import parse_policies, with_costs
    from skipbench.policies.spec import parse_policy_options

    specs = parse_policies(policy, parse_policy_options(policy_options), seed=seed, gate=gate, first_layer=first_layer)
    out = []
    for s in specs:
        name, arg = s.name, s.arg
        if name == "random" and per_token:
            name = "random-token"
        if not arg:
            given = {"cost": exit_layer if name == "early-exit" and exit_layer is not None else cost,
                     "layers": keep, "checkpoint": (checkpoint or {}).get(name)}.get(s.strategy.arg)
            arg = "" if given is None else str(given)
        out.append(replace(s, name=name, arg=arg))
    return with_costs(out, costs)


def _no_policy(policy_option) -> list:
    """No --policy: then no -o either (it would be dropped silently), and a malformed one is refused all the same."""
    from skipbench.policies.spec import parse_policy_options

    given = parse_policy_options(policy_option)
    if given:
        raise SkipbenchError(f"--policy-option {', '.join(given)}: no policy given takes it (give --policy)")
    return []


def _one_spec(policy: str, **kw):
    specs = _specs(policy, **kw)
    if len(specs) != 1:
        raise SkipbenchError(f"--policy '{policy}' names {len(specs)} policies; this command runs one")
    return specs[0]


@app.command()
def generate(
    prompt: str = typer.Option(..., help="the user instruction (the chat template is applied when the model has one)"),
    model: str = ModelOpt,
    policy: str = typer.Option("full", help=PolicyHelp),
    cost: Optional[int] = typer.Option(None, "--costs", help="layers executed per generated token, for a policy given "
                                       "without its argument (--policy uniform --costs 15 is uniform:15)"),
    exit_layer: Optional[int] = typer.Option(None, help="early-exit: number of layers run before the exit"),
    keep: Optional[str] = typer.Option(None, help="layers: comma-separated 0-based layer indices"),
    seed: int = typer.Option(0, help="seed of random skipping and of sampling"),
    per_token: bool = typer.Option(False, "--per-token", help="random: a fresh draw for every token"),
    first_layer: bool = typer.Option(True, help="random: always run layer 0"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate at most"),
    kv_mode: KvMode = KvOpt,
    prompt_depth: PromptDepth = typer.Option(PromptDepth.full, callback=_plain,
                                             help="full: the prompt runs every layer; policy: the prompt is skipped too"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling: the smallest set of tokens with this much probability"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
    policy_option: Optional[list[str]] = PolicyOptionOpt,
    draft: Optional[str] = DraftOpt,
    speculate: str = SpeculateOpt,
    draft_threshold: float = DraftThresholdOpt,
) -> None:
    """Generate text under a layer-skipping policy, or at full depth with a skipping policy drafting (--draft).

    Example: skipbench generate --policy uniform:15 --prompt "Please calculate the sum of 99, 45 and 12."
    Example: skipbench generate --draft early-exit:10 --speculate 4 --prompt "..." --json
    """
    from skipbench.engine import Sampling
    from skipbench.experiments.generate import GenerateConfig, run

    _quiet_transformers()
    cfg = GenerateConfig(
        prompt=prompt, model=model, policy=_one_spec(policy, cost=cost, exit_layer=exit_layer, keep=keep, seed=seed,
                                                     per_token=per_token, first_layer=first_layer,
                                                     policy_options=policy_option),
        max_new_tokens=max_new_tokens, kv_mode=kv_mode, prompt_depth=prompt_depth, sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed),
        device=device, dtype=dtype, draft=_draft(draft, seed, policy_option),
        speculation=_speculation(speculate, draft_threshold),
    )
    result = run(cfg)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(result["text"])
    if result.get("speculation"):
        sp = result["speculation"]
        console.print(f"[dim]full depth, drafted by {sp['draft']} (K={sp['speculate']}) · {len(result['token_ids'])} "
                      f"new tokens · acceptance {sp['acceptance_rate']:.2f} · {sp['accepted_per_round']:.2f} accepted "
                      f"per round over {sp['rounds']} rounds[/dim]")
        return
    mean = result["cost_mean"]
    console.print(
        f"[dim]{result['policy']} · {len(result['token_ids'])} new tokens · "
        f"mean executed layers {mean:.2f} of {result['num_layers']}[/dim]" if mean is not None else
        f"[dim]{result['policy']} · {len(result['token_ids'])} new tokens[/dim]"
    )


@app.command()
def plan(
    layers: Optional[int] = typer.Option(None, help="number of decoder layers L (default: the model's, when --model "
                                                    "is given or the policy is computed from a model)"),
    cost: Optional[int] = typer.Option(None, "--costs", help="layers to execute c (a policy given without its argument)"),
    policy: str = typer.Option("uniform", help="a static or per-sequence policy: uniform:C | early-exit:E | random:C | "
                               "layers:0,3,5 | full | block-influence:C | angular:C | a plugin's"),
    exit_layer: Optional[int] = typer.Option(None, help="early-exit: number of layers run before the exit"),
    keep: Optional[str] = typer.Option(None, help="layers: comma-separated 0-based layer indices"),
    seed: int = typer.Option(0, help="random: the seed of the draw"),
    data_seed: int = typer.Option(0, help="calibrated plans: the seed of the dataset's 70/15/15 split"),
    first_layer: bool = typer.Option(True, help="random: always run layer 0"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a model (policies computed from its states need "
                                                                  "one; default then: the embedded model)"),
    dataset: str = typer.Option("text", "--dataset", "-d", help="calibration prompts: this dataset's train split"),
    policy_option: Optional[list[str]] = PolicyOptionOpt,
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
) -> None:
    """Print the 0-based layer indices a static plan executes (and the table it was chosen from, if any).

    Example: skipbench plan --layers 24 --cost 12 --policy uniform   # 0 2 4 ... 22
    Example: skipbench plan --policy block-influence --cost 15 --dataset text
    """
    if layers is not None and layers < 1:
        raise SkipbenchError(f"--layers must be >= 1, got {layers}")
    spec = _one_spec(policy, cost=cost, exit_layer=exit_layer, keep=keep, seed=seed, first_layer=first_layer,
                     policy_options=policy_option)
    lm = data = None
    if model is not None or "model" in spec.strategy.needs:  # otherwise: no model and no torch
        from skipbench.data import DataSpec
        from skipbench.models import load_model

        _quiet_transformers()
        lm, data = load_model(model or EMBEDDED, device, dtype), DataSpec(name=dataset, seed=data_seed)  # evaluate's split
        if layers is not None and layers != lm.num_layers:
            raise SkipbenchError(f"--layers {layers} disagrees with the model's {lm.num_layers} layers")
        layers = lm.num_layers
    if layers is None:
        raise SkipbenchError("give --layers (the model's depth) or --model")
    executed = spec.plan(layers, lm, data)
    if executed is None:
        raise SkipbenchError(f"policy '{spec.label}' ({spec.strategy.kind}) has no static plan")
    table = spec.explain(layers, lm, data)
    if table:
        import pandas as pd

        show(pd.DataFrame(table), f"{spec.label} · {model or EMBEDDED} · {dataset} (train split)")
    typer.echo(" ".join(map(str, executed)))


@app.command()
def policies() -> None:
    """List the skipping strategies (built-in and plugins): kind, argument, KV modes.

    Example: skipbench policies
    """
    import pandas as pd

    from skipbench.policies.spec import describe

    show(pd.DataFrame(describe()), "skipbench policies", width=160)
    typer.echo("Write NAME:ARG, several separated by commas; numbers after a comma continue the argument "
               "(uniform:8,15,22 is a sweep, layers:0,3,5 one set).")


@app.command()
def models() -> None:
    """List the known model aliases, their families, and which load offline.

    Example: skipbench models
    """
    import pandas as pd

    from skipbench.models.loading import ALIASES, available_offline

    show(pd.DataFrame([{"alias": alias, "hub id": hub_id, "family": family,
                        "offline": "yes" if available_offline(alias) else "no"}
                       for alias, (hub_id, family) in ALIASES.items()]), "skipbench models")
    typer.echo("Also accepted: any hub id (org/name), a local model directory, or a .gguf file.")


def _names(values: list[str] | None) -> tuple[str, ...]:
    """A repeatable option of comma-separated names, flattened."""
    return tuple(n.strip() for v in values or () for n in v.split(",") if n.strip())


def _int_list(text: str, what: str) -> tuple[int, ...]:
    from skipbench.policies.spec import parse_int_list

    values = parse_int_list(text, what)
    if not values:
        raise SkipbenchError(f"{what} needs at least one integer")
    return values


@app.command()
def bench(
    model: str = ModelOpt,
    policy: Optional[list[str]] = typer.Option(None, help="specs, repeatable (default: full and uniform at half the "
                                               "depth): " + PolicyHelp),
    batch_sizes: str = typer.Option("1,8", help="comma-separated batch sizes"),
    max_new_tokens: int = typer.Option(64, help="tokens generated per sequence (EOS does not stop a run)"),
    repeats: int = typer.Option(3, help="timed repeats per variant (medians are reported)"),
    warmup: int = typer.Option(1, help="untimed warm-up rounds"),
    kv_mode: KvMode = KvOpt,
    impl: str = typer.Option("auto", help="auto (per layer and step, the cheaper of the two by a measured cost "
                             "table), gather, mask; comma-separated, per-token policies run under each (both = "
                             "gather,mask; all = auto,gather,mask)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the per-layer maths"),
    lockstep: bool = typer.Option(True, help="skipbench's variants decode together, one step each in turn, so a "
                                  "drift of the machine's speed hits all alike (--no-lockstep: one run after another)"),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="measure --impl auto's layer cost tables again "
                                     "(they are kept in the cache once measured)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    seed: int = typer.Option(0, help="seed of random policies"),
    out: Optional[str] = typer.Option(None, help="parquet of per-repeat timings (manifest beside it)"),
    policy_option: Optional[list[str]] = PolicyOptionOpt,
    draft: Optional[list[str]] = typer.Option(None, help="self-speculative decoding: draft policies (specs, repeatable), "
                                              "each verified by the full model, or 'auto' (search a draft layer set "
                                              "for this model and machine)"),
    speculate: str = typer.Option("4", help="--draft: draft tokens per round, comma-separated (one variant each), "
                                  "or 'auto'"),
    draft_threshold: float = DraftThresholdOpt,
) -> None:
    """Wall-clock speed of skipping, side by side in one process: prefill and decode tokens/s, step latency,
    memory, realized vs ideal speedup; model.generate as the baseline; removed-layer models as the bound;
    self-speculative decoding with --draft (acceptance, time shares, realized vs predicted speedup).

    Example: skipbench bench --policy full,uniform:15,uniform:8,random-token:22 --batch-sizes 1,8 --impl all
    Example: skipbench bench --policy full --draft early-exit:8,uniform:20 --speculate 2,4,6 --batch-sizes 1,8
    """
    from skipbench.experiments.bench import BenchConfig, run

    _quiet_transformers()
    drafts = [d for d in draft or [] if d.strip()]
    search = drafts == ["auto"]
    if "auto" in drafts and not search:
        raise SkipbenchError("--draft auto searches a draft of its own: give it alone")
    cfg = BenchConfig(model=model, policies=tuple(_specs(policy, seed=seed, policy_options=policy_option)) if policy else (),
                      batch_sizes=_int_list(batch_sizes, "--batch-sizes"), max_new_tokens=max_new_tokens, repeats=repeats,
                      warmup=warmup, kv_mode=kv_mode, impl=impl, compile=compile, lockstep=lockstep,
                      recalibrate=recalibrate, device=device, dtype=dtype, seed=seed, out=out,
                      drafts=() if search or not drafts else tuple(_specs(drafts, seed=seed, policy_options=policy_option)),
                      draft_search=search,
                      speculations=tuple(_speculation(k, draft_threshold) for k in speculate.split(",") if k.strip()) or
                      (_speculation("4", draft_threshold),))
    if cfg.draft_search:
        console.print("[dim]searching a draft layer set (calibration on the text suite's train split)...[/dim]")
    with Bar("bench") as bar:
        result = run(cfg, progress=bar.advance, start=bar.start)
    if result.search is not None:
        _print_search(result.search)
    import pandas as pd

    s = result.summary
    shown = pd.DataFrame({  # p90 and the parts: in the parquet's summary
        "batch": s["batch_size"], "variant": s["variant"], "phase": s["phase"], "tok/s": s["tokens_per_s"],
        "p50 ms": 1e3 * s["step_p50"], "layers": s["layers_mean"], "speedup": s["speedup"], "ideal": s["ideal_speedup"],
        "real/ideal": s["realized_over_ideal"], "batch ideal": s["ideal_batch_speedup"],
        "real/batch": s["realized_over_batch_ideal"], "policy %": 100 * s.get("policy_share", np.nan),
        "vs generate": s["vs_generate"]})
    show(shown, f"skipbench bench · {model} · {max_new_tokens} new tokens",
         {"tok/s": "{:.1f}", "p50 ms": "{:.1f}", "layers": "{:.1f}", "policy %": "{:.1f}"}, width=160)
    d = s[(s.kind == "speculative") & (s.phase == "decode")]
    if len(d):
        shown = pd.DataFrame({
            "batch": d["batch_size"], "variant": d["variant"], "accept rate": d["acceptance_rate"],
            "accept prob": d["acceptance_prob"], "accepted/round": d["accepted_per_round"], "K mean": d["k_mean"],
            "passes/tok": d["layer_passes_per_token"], "draft %": 100 * d["draft_share"],
            "verify %": 100 * d["verify_share"], "accept %": 100 * d["accept_share"], "speedup": d["speedup"],
            "predicted": d["predicted_speedup"], "real/pred": d["realized_over_predicted"],
            "cost model": d["cost_model_speedup"], "real/cost": d["realized_over_cost_model"]})
        show(shown, "self-speculative decoding (decode phase; output = full depth's)",
             {"accepted/round": "{:.2f}", "K mean": "{:.2f}", "passes/tok": "{:.1f}", "draft %": "{:.0f}",
              "verify %": "{:.0f}", "accept %": "{:.1f}"}, width=160)
    if result.path:
        console.print(f"wrote {result.path}")


def _print_search(found) -> None:
    import pandas as pd

    rows, prev = [], None
    for s in found.path:
        rows.append({"layers": f"{len(s.layers)}{' *' if s.layers == found.chosen else ''}",
                     "dropped last": "" if prev is None else str(next(iter(set(prev) - set(s.layers)))),
                     "agreement": s.agreement, "draft step ms": 1e3 * s.t_draft, "predicted speedup": s.predicted_speedup})
        prev = s.layers
    show(pd.DataFrame(rows), f"draft search (K={found.k}; full step {1e3 * found.t_full:.1f} ms, verify pass "
                             f"{1e3 * found.t_verify:.1f} ms)", {"draft step ms": "{:.1f}"}, width=160)
    console.print(f"chosen draft: {found.label}")


def _slug(text: str) -> str:
    import re
    from pathlib import Path

    name = Path(text).stem if ("/" in text and Path(text).exists()) or text.endswith((".json", ".jsonl", ".csv", ".parquet", ".gguf")) else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "_")).strip("_") or "x"


def default_out(command: str, model: str, dataset: str) -> str:
    return f"results/{command}-{_slug(model)}-{_slug(dataset)}.parquet"


DatasetOpt = typer.Option("text", "--dataset", "-d", help="arith | text | alpaca | cnn_dailymail | xsum | a file; comma-separated to mix")


@app.command()
def evaluate(
    model: str = ModelOpt,
    dataset: str = DatasetOpt,
    split: str = typer.Option("all", help="all | train | validation | test (a seeded 70/15/15 split)"),
    limit: int = typer.Option(100, help="first N items of the split (0 = all)"),
    policy: Optional[list[str]] = typer.Option(None, help="specs, repeatable, e.g. uniform:8,15,22 or early-exit:10,uniform:15 "
                                               "(default: uniform; " + PolicyHelp
                                               + "); a sweeping policy without an argument takes --costs"),
    costs: str = typer.Option("", help="comma-separated layer counts (default: L/4, L/2, 3L/4); full always runs too"),
    seed: int = typer.Option(0, help="seed of random skipping (the items do not depend on it: --data-seed)"),
    data_seed: int = typer.Option(0, help="seed of the dataset's 70/15/15 split (the items of --split)"),
    per_token: bool = typer.Option(False, "--per-token", help="random: a fresh draw per token"),
    max_new_tokens: int = typer.Option(96, help="tokens to generate per item at most"),
    max_prompt_tokens: int = typer.Option(1024, help="longer instructions are truncated (counted in the manifest)"),
    batch_size: int = typer.Option(0, min=0, help="sequences per batch (0: automatic, 8 on CPU, 32 on CUDA)"),
    kv_mode: KvMode = KvOpt,
    prompt_depth: PromptDepth = typer.Option(PromptDepth.full, callback=_plain, help="the prompt's depth"),
    impl: Impl = typer.Option(Impl.auto, callback=_plain, help="partial layers at decode steps: auto (the cheaper "
                              "of gathered and dense, by a measured cost table), gather or mask; the rows agree but for "
                              "floats' last bits"),
    prompt_field: Optional[str] = typer.Option(None, help="column holding the prompt (files)"),
    reference_field: Optional[str] = typer.Option(None, help="column holding the reference (files)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet output (default results/evaluate-<model>-<dataset>.parquet)"),
    resume: bool = typer.Option(True, help="reuse finished (policy, cost) parts of an earlier run"),
    controller: Optional[str] = typer.Option(None, help="policy controller: folder written by 'controllers train'"),
    gate: GateMode = typer.Option(GateMode.sample, callback=_plain, help="policy controller: sample (as in the paper) | argmax"),
    router: Optional[str] = typer.Option(None, help="policy flexidepth: folder written by 'flexidepth train'"),
    policy_option: Optional[list[str]] = PolicyOptionOpt,
    budget: Optional[float] = typer.Option(None, help="policy route: the mean layers per token over the items "
                                           "(the same as -o budget=B)"),
    draft: Optional[str] = DraftOpt,
    speculate: str = SpeculateOpt,
    draft_threshold: float = DraftThresholdOpt,
) -> None:
    """Generate for every item under a policy at several costs; ROUGE-L, exact match and fidelity per item.
    With --draft, one more point: full depth's output by self-speculative decoding (acceptance columns,
    matches_full).

    Example: skipbench evaluate --dataset arith --policy uniform --costs 8,15,22,30 --limit 100
    Example: skipbench evaluate --dataset text --policy full --draft uniform:20 --speculate 4
    Example: skipbench evaluate --dataset text --split test --policy route:runs/route-text --budget 12
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.evaluate import EvalConfig, run

    _quiet_transformers()
    if budget is not None:
        if any(o.partition("=")[0].strip() == "budget" for o in policy_option or ()):
            raise SkipbenchError("give the budget once: --budget B or -o budget=B")
        policy_option = [*(policy_option or []), f"budget={budget:g}"]
    cfg = EvalConfig(
        model=model,
        data=DataSpec(name=dataset, split=split, limit=limit or None, seed=data_seed, prompt_field=prompt_field,
                      reference_field=reference_field),
        policies=tuple(_specs(policy or ["uniform"], costs=_int_list(costs, "--costs") if costs else (), seed=seed,
                              per_token=per_token, checkpoint={"controller": controller, "flexidepth": router}, gate=gate,
                              policy_options=policy_option)),
        seed=seed, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, batch_size=batch_size or None,
        kv_mode=kv_mode, prompt_depth=prompt_depth, impl=impl, device=device, dtype=dtype,
        out=out or default_out("evaluate", model, dataset), resume=resume,
        draft=_draft(draft, seed, policy_option), speculation=_speculation(speculate, draft_threshold),
    )
    with Bar("evaluate") as bar:
        result = run(cfg, progress=bar.advance, start=bar.start, on_part=lambda p: bar.point(p.label))
    show(result.summary, f"evaluate · {model} · {dataset}")
    shares = f", {result.reused_shares} rank share(s) of a failed run reused" if result.reused_shares else ""
    console.print(f"wrote {result.path} ({len(result.rows)} rows; {result.reused_parts} finished part(s) reused{shares})")


def _no_custom_dataset_note(record) -> bool:
    """lm-eval warns, per task and point, that a task built by `custom_dataset` (the shipped ones) takes --metadata."""
    return "Custom kwargs can be passed" not in record.getMessage()


@app.command("lm-eval")
def lm_eval(
    tasks: str = typer.Option(..., help="comma-separated lm-eval tasks, groups or tags, or task YAML paths; shipped "
                              "offline: skipbench_choice, skipbench_arith, skipbench_text (its four subtasks)"),
    model: str = ModelOpt,
    policy: Optional[list[str]] = typer.Option(None, help="specs, repeatable, e.g. uniform:15,22,30 (" + PolicyHelp
                                               + "); full always runs too"),
    limit: int = typer.Option(0, min=0, help="documents per task (0 = all)"),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="few-shot examples (default: the task's)"),
    seed: int = typer.Option(0, help="seed of random skipping and of sampled generation (lm-eval keeps its own seeds)"),
    batch_size: int = typer.Option(0, min=0, help="requests per batch (0: automatic, 8 on CPU, 32 on CUDA)"),
    kv_mode: KvMode = KvOpt,
    prompt_depth: PromptDepth = typer.Option(PromptDepth.full, callback=_plain, help="the context's depth: full (first "
                                             "continuation token from the full-depth context) | policy"),
    chat_template: bool = typer.Option(False, "--chat-template/--no-chat-template", help="wrap each prompt in the model's "
                                       "chat template (lm-eval's --apply_chat_template)"),
    max_length: int = typer.Option(0, min=0, help="context window in tokens (0: the model's positions)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet output (default results/lmeval-<model>-<tasks>.parquet)"),
    resume: bool = typer.Option(True, help="reuse finished (task, policy point) parts of an earlier run"),
    policy_option: Optional[list[str]] = PolicyOptionOpt,
    gate: GateMode = typer.Option(GateMode.sample, callback=_plain, help="policy controller: sample (as in the paper) | argmax"),
    first_layer: bool = typer.Option(True, help="random: always run layer 0"),
) -> None:
    """Policies on lm-evaluation-harness tasks through skipbench's engine: a row per task, metric and policy point,
    with each point's mean executed layers; lm-eval's results JSON per point; a figure of metric vs layers.

    Example: skipbench lm-eval --tasks skipbench_choice --policy early-exit:8,15,22 --policy uniform:8,15,22
    Example: skipbench lm-eval --tasks arc_easy,hellaswag --policy uniform:15,22,30 --limit 200
    """
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars (tqdm reads it once, when first imported)
    from skipbench.experiments.lmeval import LmEvalConfig, run

    _quiet_transformers()
    logging.getLogger("lm_eval.api.task").addFilter(_no_custom_dataset_note)
    specs = (_specs(policy, seed=seed, policy_options=policy_option, gate=gate, first_layer=first_layer) if policy
             else _no_policy(policy_option))
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    cfg = LmEvalConfig(
        model=model, tasks=names, policies=tuple(specs), limit=limit or None, num_fewshot=num_fewshot,
        batch_size=batch_size or None, kv_mode=kv_mode, prompt_depth=prompt_depth, chat_template=chat_template,
        max_length=max_length or None, seed=seed, device=device, dtype=dtype,
        out=out or default_out("lmeval", model, "_".join(_slug(t) for t in names)), resume=resume,
    )
    with Bar("lm-eval") as bar:
        result = run(cfg, on_part=lambda task, p: bar.point(f"{task} · {p.label}"))
    from skipbench.lmeval_sweep import interval

    r = result.rows  # every metric and filter lm-eval reported (the figure and the report take each task's main one)
    bounds = [interval(m, v, e, n, g) for m, v, e, n, g in zip(r["metric"], r["value"], r["stderr"], r["n"], r["group"])]
    shown = r.assign(interval=[f"[{lo:.3f}, {hi:.3f}]" for lo, hi in bounds])
    show(shown[["task", "policy_spec", "layers_mean", "metric", "filter", "value", "interval", "n"]], f"lm-eval · {model}")
    console.print(f"wrote {result.path} ({len(result.rows)} rows; {result.reused_parts} finished part(s) reused); "
                  f"lm-eval's results: {result.path.with_name(result.path.stem + '-lmeval')}/; figure: {result.files.get('figure', '-')}")


@app.command()
def compare(
    ctx: typer.Context,
    policy: Optional[list[str]] = typer.Option(None, help="the methods, comma-separated or repeated (default: shortgpt,"
                                               "laco): shortgpt (block-influence), laco, angular, uniform, early-exit, "
                                               "... (each set to L-K layers), flexidepth:DIR, mindskip:DIR (-o skip=K), "
                                               "layerskip:DIR (early exit after L-K layers of `finetune`'s model)"),
    skip: str = typer.Option("4,8", help="numbers of skipped layers K, comma-separated (compare counts the layers a "
                             "method skips, as the FlexiDepth talk does; other commands' --costs count those run)"),
    tasks: str = typer.Option("skipbench_choice,skipbench_text", help="lm-eval tasks, groups, tags or task YAMLs"),
    preset: Optional[str] = typer.Option(None, help="offline: the embedded model, skipbench_choice and skipbench_text "
                                         "with the chat template | paper: Llama-3-8B-Instruct on the talk's six "
                                         "benchmarks (a GPU machine with the hub); sets --model, --tasks, --skip and "
                                         "--chat-template unless they are given"),
    model: str = ModelOpt,
    limit: int = typer.Option(0, min=0, help="documents per task (0 = all)"),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="few-shot examples (default: the task's)"),
    batch_size: int = typer.Option(0, min=0, help="requests per batch (0: automatic)"),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="wrap prompts in the model's chat "
                                       "template (an instruct model, as the embedded one; --no-chat-template for a base model)"),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="let tasks such as humaneval run "
                                              "the code the model writes (lm-eval's confirm_run_unsafe_code)"),
    seed: int = typer.Option(0, help="seed of random skipping and sampled generation"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet output (default results/compare-<model>.parquet)"),
    resume: bool = typer.Option(True, help="reuse finished (task, point) parts of an earlier run"),
) -> None:
    """Every method at the same number of skipped layers on lm-eval tasks: Retain % (mean over tasks of score / full
    score), the layers a token actually ran, each task's interval; a table, its summary (-agg), a figure.

    Example: skipbench compare --policy shortgpt,laco,mindskip:runs/mindskip,layerskip:runs/finetune --skip 4,8
    Example: skipbench compare --preset paper --policy shortgpt,laco,flexidepth:runs/flexi --allow-code-execution
    """
    import logging

    from click.core import ParameterSource

    os.environ.setdefault("TQDM_DISABLE", "1")
    from skipbench.experiments.compare import PRESETS, CompareConfig, run

    _quiet_transformers()
    logging.getLogger("lm_eval.api.task").addFilter(_no_custom_dataset_note)
    if preset is not None and preset not in PRESETS:
        raise SkipbenchError(f"--preset must be one of {', '.join(PRESETS)}, got '{preset}'")
    chosen = PRESETS.get(preset, {})

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    model = model if given("model") or "model" not in chosen else chosen["model"]
    names = tuple(t.strip() for t in tasks.split(",") if t.strip()) if given("tasks") or "tasks" not in chosen else chosen["tasks"]
    ks = _int_list(skip, "--skip") if given("skip") or "skip" not in chosen else chosen["skip"]
    chat_template = chat_template if given("chat_template") or "chat_template" not in chosen else chosen["chat_template"]
    methods = [m.strip() for text in policy or ["shortgpt,laco"] for m in text.split(",") if m.strip()]
    cfg = CompareConfig(model=model, methods=tuple(methods), skip=ks,
                        tasks=names, limit=limit or None, num_fewshot=num_fewshot, batch_size=batch_size or None,
                        chat_template=chat_template, allow_code_execution=allow_code_execution, seed=seed,
                        device=device, dtype=dtype, out=out or f"results/compare-{_slug(model)}.parquet", resume=resume)
    with Bar("compare") as bar:
        result = run(cfg, on_part=lambda task, p: bar.point(f"{task} · {p.label}"))
    t = result.rows
    shown = t.assign(difference=[f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(t["diff"], t["diff_lo"], t["diff_hi"])])
    show(shown[["method", "skip", "task", "metric", "value", "full_value", "difference", "noisy_ratio", "layers_mean",
                "attention_mean"]], f"compare · {model} · per task (paired differences from full depth, 95%)")
    s = result.summary
    shown = s.assign(retain=[f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, lo, hi in zip(s["retain_pct"], s["retain_lo"], s["retain_hi"])])
    show(shown[["method", "skip", "retain", "noisy_tasks", "skipped", "skipped_unit", "layers_mean", "attention_mean"]],
         f"compare · {model} · Retain % (paired bootstrap 95% intervals)")
    console.print(f"wrote {result.path}, {result.files['agg']}, {result.files['figure']}; every point's lm-eval rows: "
                  f"{result.runs}")


@app.command()
def cosine(
    model: str = ModelOpt,
    dataset: str = DatasetOpt,
    split: str = typer.Option("all", help="all | train | validation | test (a seeded 70/15/15 split)"),
    limit: int = typer.Option(100, help="first N items (0 = all)"),
    costs: str = typer.Option("", help="comma-separated costs (default: about L/5, L/3, L/2, 2L/3, 4L/5)"),
    policy: Optional[list[str]] = typer.Option(None, help="strategies that take a cost, in the policy grammar, "
                                               "repeatable (default: early-exit,uniform,random): names run at every "
                                               "--costs value, points (uniform:10,15) at theirs; a threshold strategy "
                                               "at its points (confidence:0.9,0.95)"),
    num_seeds: int = typer.Option(3, help="random skipping is repeated with seeds 0..N-1"),
    per_token: bool = typer.Option(False, "--per-token", help="random: a fresh draw per token"),
    teacher: Teacher = typer.Option(Teacher.full, callback=_plain, help="full: the full model's greedy response; "
                                    "reference: the item's reference (the authors teacher-force the labels)"),
    max_new_tokens: int = typer.Option(64, help="tokens of the teacher response compared at most"),
    max_prompt_tokens: int = typer.Option(1024, help="longer instructions are truncated (counted in the manifest)"),
    batch_size: int = typer.Option(0, min=0, help="sequences per batch (0: automatic, 8 on CPU, 32 on CUDA)"),
    kv_mode: KvMode = KvOpt,
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="detailed parquet (default results/cosine-<model>-<dataset>.parquet); "
                                      "-agg.parquet and .png beside it"),
    policy_option: Optional[list[str]] = PolicyOptionOpt,
) -> None:
    """Hidden-state cosine similarity of early exit, uniform and random skipping vs the full model (Fig. 1a).

    Example: skipbench cosine --dataset text --costs 6,10,15,20,25 --limit 200
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.cosine import CosineConfig, run
    from skipbench.policies import parse_policies
    from skipbench.policies.spec import parse_policy_options

    _quiet_transformers()
    cfg = CosineConfig(
        model=model, data=DataSpec(name=dataset, split=split, limit=limit or None), costs=_int_list(costs, "--costs") if costs else (),
        strategies=tuple(s.name + (f":{s.arg}" if s.arg else "")
                         for s in parse_policies(policy or ["early-exit,uniform,random"])), num_seeds=num_seeds,
        per_token=per_token,
        teacher=teacher, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size or None, kv_mode=kv_mode, device=device, dtype=dtype,
        policy_options=tuple(sorted(parse_policy_options(policy_option).items())),
        out=out or default_out("cosine", model, dataset),
    )
    with Bar("cosine") as bar:
        result = run(cfg, progress=bar.advance, start=bar.start)
    shown = result.agg[["strategy", "point", "layers", "items", "cos_final_normed", "cos_final", "cos_layerwise",
                        "kl_next", "top1_agree"]]
    show(shown, f"cosine · {model} · {dataset} (means; 95% CIs in the -agg file)")
    console.print(f"wrote {result.path}, {result.files['agg'].name}, {result.files['figure'].name}")


# training options shared by controllers train / sweep, flexidepth train and finetune: one declaration each,
# the default beside each command (they differ: FlexiDepth trains longer, finetune uses the paper's lr)
Steps = Annotated[int, typer.Option(help="optimiser steps")]
BatchSize = Annotated[int, typer.Option(min=1, help="examples per step (the global batch under torchrun)")]
GradAccum = Annotated[int, typer.Option(help="micro-batches per step (losses normalised over the step's tokens)")]
Lr = Annotated[float, typer.Option(help="learning rate (AdamW)")]
Seed = Annotated[int, typer.Option(help="seed of the batches and of random gates")]
MaxSeqLen = Annotated[int, typer.Option(help="prompt + response tokens per example")]
TrainDtype = Annotated[Dtype, typer.Option(callback=_plain, help="the training dtype")]
Loss = Annotated[LossKind, typer.Option(callback=_plain, help="kl: distil the full model's distributions; ce: cross-entropy")]
Targets = Annotated[Teacher, typer.Option(callback=_plain, help="full: the full model's own responses")]


RestartOpt = typer.Option(False, "--restart", help="discard a checkpoint in --out and train from scratch "
                          "(without it, a checkpoint is resumed only by the configuration that wrote it)")

AlphaUnitsOpt = typer.Option(AlphaUnits.fraction, callback=_plain, help="fraction: alpha x the fraction of the L layers executed per token, as "
                              "the paper's code computes it | sum: alpha x the sum of the gates (= fraction / L)")

controllers_app = typer.Typer(cls=SkipbenchGroup, no_args_is_help=True,
                              help="Gumbel-softmax skip controllers: hidden-state vs constant input (Glavas et al.).")
app.add_typer(controllers_app, name="controllers")


def _train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens, max_seq_len,
                  device, dtype, out, targets="full", grad_accum=1, **extra):
    from skipbench.data import DataSpec
    from skipbench.training import TrainConfig

    return TrainConfig(model=model, data=DataSpec(name=dataset, split=split, limit=limit or None), steps=steps, batch_size=batch_size,
                       grad_accum=grad_accum, lr=lr, seed=seed, loss=loss, targets=targets, max_new_tokens=max_new_tokens,
                       max_seq_len=max_seq_len, device=device, dtype=dtype, out=out, **extra)


def _train(run_train, cfg) -> None:
    """A training recipe under the progress bar, then its last step's summary."""
    with TrainBar("train") as bar:
        result = run_train(cfg, progress=bar.step, start=bar.start)
    _report_training(result)


def _report_training(result) -> None:
    for note in result.notes:
        _note(note)
    if result.log:
        last = result.log[-1]
        secs = np.median([r["seconds"] for r in result.log])
        parts = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step" and not k.startswith("seconds"))
        phases = ", ".join(f"{k.removeprefix('seconds_')} {np.median([r.get(k, np.nan) for r in result.log]):.2f}"
                           for k in last if k.startswith("seconds_"))
        typer.echo(f"step {last['step']}: {parts}; median {secs:.2f} s/step ({phases}); saved to {result.out}")


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


@controllers_app.command("train")
def controllers_train(
    model: str = ModelOpt,
    dataset: str = DatasetOpt,
    split: str = typer.Option("train", help="training items (a seeded 70/15/15 split)"),
    limit: int = typer.Option(0, help="first N training items (0 = all)"),
    input: ControllerInput = typer.Option(ControllerInput.hidden, callback=_plain,
                                          help="hidden: the detached hidden state; constant: all ones"),
    alpha: float = typer.Option(4.0, help="weight of the cost term (see --alpha-units)"),
    alpha_units: AlphaUnits = AlphaUnitsOpt,
    tau: float = typer.Option(1.0, help="Gumbel-softmax temperature"),
    steps: Steps = 300,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-3,
    seed: Seed = 0,
    loss: Loss = LossKind.kl,
    targets: Targets = Teacher.full,
    max_new_tokens: int = typer.Option(64, help="length of the full model's responses used for training"),
    max_seq_len: MaxSeqLen = 256,
    train_backbone: bool = typer.Option(False, "--train-backbone",
                                        help="fine-tune the model jointly (saved to OUT/backbone; the target stays the original)"),
    backbone_lr: float = typer.Option(1e-5, help="learning rate of the backbone with --train-backbone"),
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option(STRATEGIES.get("controller").default_arg, help="checkpoint folder (resumed when it holds a checkpoint)"),
    restart: bool = RestartOpt,
) -> None:
    """Train one set of skip controllers (frozen backbone, or jointly with it: --train-backbone).

    Example: skipbench controllers train --dataset text --input hidden --alpha 4 --steps 300 --out runs/ctrl-hidden-a4
    Jointly trained controllers are evaluated on their backbone: evaluate --model OUT/backbone --controller OUT
    """
    from skipbench.experiments.controllers import ControllerTrainConfig, run_train

    _quiet_transformers()
    tcfg = _train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens,
                         max_seq_len, device, dtype, out, targets, grad_accum,
                         train_backbone=train_backbone, backbone_lr=backbone_lr, restart=restart)
    _train(run_train, ControllerTrainConfig(train=tcfg, input=input, alpha=alpha, tau=tau, alpha_units=alpha_units))


@controllers_app.command("sweep")
def controllers_sweep(
    model: str = ModelOpt,
    dataset: str = DatasetOpt,
    train_limit: int = typer.Option(0, help="training items (0 = the whole train split)"),
    eval_limit: int = typer.Option(50, help="held-out test items evaluated per run"),
    alpha: str = typer.Option("2,4,6,10", help="cost weights, comma-separated (see --alpha-units)"),
    alpha_units: AlphaUnits = AlphaUnitsOpt,
    inputs: str = typer.Option("hidden,constant", help="the controllers' inputs compared: hidden, constant"),
    num_seeds: int = typer.Option(3, help="training runs per (input, alpha), with seeds 0..N-1"),
    tau: float = typer.Option(1.0, help="Gumbel-softmax temperature"),
    gate: GateMode = typer.Option(GateMode.sample, callback=_plain, help="evaluation gates: sample (as in the paper) | argmax"),
    metric: str = typer.Option("full_rougeL", help="the quality the hidden-vs-constant test compares: full_rougeL "
                               "(against the full model's output) | rougeL (against the references, the paper's)"),
    steps: Steps = 300,
    batch_size: BatchSize = 4,
    lr: Lr = 1e-3,
    loss: Loss = LossKind.kl,
    targets: Targets = Teacher.full,
    max_new_tokens: int = typer.Option(64, help="length of the training targets and of the evaluated responses"),
    max_seq_len: MaxSeqLen = 256,
    train_backbone: bool = typer.Option(False, "--train-backbone", help="each run fine-tunes the model jointly with its "
                                        "controllers (the paper's and the authors' setting), from the original weights"),
    backbone_lr: float = typer.Option(1e-5, help="learning rate of the backbone with --train-backbone"),
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: Optional[str] = typer.Option(None, help="parquet (default results/controllers-<model>-<dataset>.parquet)"),
    restart: bool = RestartOpt,
) -> None:
    """Train and evaluate controllers for every (input, alpha, seed); Figures 1b and 6; hidden vs constant test.

    Example: skipbench controllers sweep --dataset text --alpha 2,4,6,10 --inputs hidden,constant --num-seeds 3
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.controllers import SweepConfig, run_sweep

    _quiet_transformers()
    tcfg = _train_config(model, dataset, "train", train_limit, steps, batch_size, lr, 0, loss, max_new_tokens,
                         max_seq_len, device, dtype, "", targets, restart=restart, train_backbone=train_backbone,
                         backbone_lr=backbone_lr)
    cfg = SweepConfig(train=tcfg, eval_data=DataSpec(name=dataset, split="test", limit=eval_limit or None),
                      inputs=tuple(i.strip() for i in inputs.split(",") if i.strip()),
                      alphas=_float_list(alpha, "--alpha"), num_seeds=num_seeds, tau=tau, alpha_units=alpha_units, gate=gate,
                      metric=metric, eval_max_new_tokens=max_new_tokens,
                      out=out or default_out("controllers", model, dataset))
    with Bar("sweep") as bar:
        res = run_sweep(cfg, progress=bar.advance, start=bar.start)
    for note in res.notes:
        _note(note)
    shown = res.tables["agg"][["input", "alpha", "seeds", "layers_mean", "rougeL", "full_rougeL", "kl"]]
    show(shown, f"controllers · {model} · {dataset} (means over seeds; CIs in -agg)")
    from skipbench import verdicts

    typer.echo(f"hidden vs constant at matched cost ({res.comparison['test']}):")
    for v in verdicts.controllers(res.comparison, res.exception):
        typer.echo(verdicts.line(v).replace("**", ""))
    console.print(f"wrote {res.path}")


route_app = typer.Typer(cls=SkipbenchGroup, no_args_is_help=True,
                        help="A prompt-level router against the oracle: which configuration to run, decided from the "
                             "prompt alone.")
app.add_typer(route_app, name="route")
RunsOpt = typer.Option(..., "--runs", help="evaluate parquet file(s) scoring the same items under static "
                       "configurations (run with --split all, or one file per split)")


@route_app.command("train")
def route_train(
    runs: list[str] = RunsOpt,
    features: str = typer.Option("hidden", help="hidden (the prompt's residual stream) | tfidf (its words) | length"),
    states: str = typer.Option("", help="hidden: residual-stream states to read, 0..L (default: L/2 and L)"),
    metric: str = typer.Option("rougeL", help="the per-item score the router predicts"),
    policy: Optional[list[str]] = typer.Option(None, help="keep only these policies (full always stays), "
                                               "comma-separated or repeated"),
    costs: str = typer.Option("", help="keep only configurations of these costs (full always stays), comma-separated"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: str = typer.Option(STRATEGIES.get("route").default_arg, help="router folder (replaced)"),
) -> None:
    """Fit a router: one ridge regressor per configuration from the prompt's features, on the train split's items,
    its penalty tuned on the validation split's; the test split is not read.

    Example: skipbench route train --runs results/evaluate-text.parquet --features hidden --out runs/route-text
    """
    from skipbench.experiments.route import RouteTrainConfig, train

    _quiet_transformers()
    cfg = RouteTrainConfig(runs=tuple(runs), features=features, states=_int_list(states, "--states") if states else (),
                           metric=metric, policies=_names(policy),
                           costs=_int_list(costs, "--costs") if costs else (), device=device, dtype=dtype, out=out)
    result = train(cfg)
    for note in result.notes:
        _note(note)
    show(result.validation, f"router · {cfg.features} · {result.counts['train']} train, "
                                    f"{result.counts['validation']} validation items (squared error on validation)")
    console.print(f"wrote {result.path}")


@route_app.command("curve")
def route_curve(
    router: list[str] = typer.Option(..., "--router", help="router folder(s) written by 'route train'"),
    runs: list[str] = RunsOpt,
    budgets: str = typer.Option("", help="budgets reported with intervals (default: 1/3, 1/2 and 2/3 of the layers)"),
    bootstrap: int = typer.Option(1000, help="item resamples for the 95% intervals (0: none)"),
    random_draws: int = typer.Option(5, help="random assignments averaged per budget (and per resample)"),
    seed: int = typer.Option(0, help="seed of the resamples and the random assignments"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: str = typer.Option("", help="parquet of (budget, method) rows, -assign parquet and PNG beside it (default "
                            "results/route-<dataset>.parquet)"),
) -> None:
    """The routers on the test items, beside the exact and greedy oracle, the single configurations and a random
    assignment at each budget; the share of the oracle's gain each captures, with 95% bootstrap intervals.

    Example: skipbench route curve --router runs/route-text --runs results/evaluate-text.parquet --out results/route-text.parquet
    """
    from skipbench.experiments.route import RouteCurveConfig, curve

    _quiet_transformers()
    cfg = RouteCurveConfig(routers=tuple(router), runs=tuple(runs),
                           budgets=_float_list(budgets, "--budgets") if budgets else (), bootstrap=bootstrap,
                           random_draws=random_draws, seed=seed, device=device, dtype=dtype, out=out)
    result = curve(cfg)
    for note in result.notes:
        _note(note)
    show(result.summary, f"route curve · {result.test_items} test items")
    show(result.differences.rename(columns={"method": "difference"}),
                 "paired differences (95% bootstrap intervals over the same resamples)")
    console.print(f"wrote {result.path}")


flexi_app = typer.Typer(cls=SkipbenchGroup, no_args_is_help=True,
                        help="FlexiDepth: plug-in routers and adapters, KV-preserving skipping, depth maps (Luo et al.).")
app.add_typer(flexi_app, name="flexidepth")
RouterOpt = typer.Option(STRATEGIES.get("flexidepth").default_arg, "--router", help="folder written by 'flexidepth train'")


@flexi_app.command("train")
def flexidepth_train(
    model: str = ModelOpt,
    dataset: str = typer.Option("text,arith", "--dataset", "-d", help="training data: datasets, comma-separated to mix"),
    split: str = typer.Option("train", help="training items: train (default) | validation | test | all (a seeded 70/15/15 split)"),
    limit: int = typer.Option(0, help="first N training items (0 = all)"),
    skip_weight: float = typer.Option(1e-3, help="FlexiDepth's alpha: the weight of L_skip = mean_t (sum_l G)^2 in "
                                      "alpha L_skip + L_lm"),
    routed_layers: str = typer.Option("", help="0-based layers to route (default: the second half)"),
    router_reduction: int = typer.Option(16, help="bottleneck = hidden / reduction (router and adapter)"),
    tau: float = typer.Option(0.5, help="a token runs the full layer when G > tau"),
    adapter: bool = typer.Option(True, help="--no-adapter: the skip path is the identity"),
    kv: bool = typer.Option(True, help="--no-kv: skipped tokens write no K/V at routed layers"),
    linear_router: bool = typer.Option(False, "--linear-router", help="Router(z) = W_r z"),
    steps: Steps = 400,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-3,
    seed: Seed = 0,
    loss: Loss = LossKind.ce,
    targets: Targets = Teacher.full,
    max_new_tokens: int = typer.Option(64, help="tokens generated per item at most (training targets: the full model's)"),
    max_seq_len: MaxSeqLen = 256,
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option(STRATEGIES.get("flexidepth").default_arg, help="checkpoint folder (resumed when it holds a checkpoint)"),
    restart: bool = RestartOpt,
) -> None:
    """Train FlexiDepth routers and adapters on a frozen model.

    Example: skipbench flexidepth train --dataset text,arith --skip-weight 1e-3 --steps 400 --out runs/flexi-smollm2
    """
    from skipbench.experiments.flexidepth import FlexiTrainConfig, run_train

    _quiet_transformers()
    tcfg = _train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens,
                         max_seq_len, device, dtype, out, targets, grad_accum, restart=restart)
    cfg = FlexiTrainConfig(train=tcfg, alpha=skip_weight, routed_layers=_int_list(routed_layers, "--routed-layers") if routed_layers else (),
                           reduction=router_reduction, tau=tau, adapter=adapter, kv=kv, linear_router=linear_router)
    _train(run_train, cfg)


@flexi_app.command("usage")
def flexidepth_usage(
    model: str = ModelOpt,
    router: str = RouterOpt,
    dataset: str = typer.Option("text,arith", "--dataset", "-d", help="datasets, comma-separated to mix"),
    split: str = typer.Option("test", help="held-out items: test (default) | validation (a seeded 70/15/15 split)"),
    limit: int = typer.Option(50, help="items per run (0 = all)"),
    max_new_tokens: int = typer.Option(64, help="tokens generated per item at most (training targets: the full model's)"),
    batch_size: int = typer.Option(8, min=1, help="sequences per generation batch"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet (default results/flexi-usage-<model>.parquet)"),
) -> None:
    """Layers used per generated token, with token text and subtask; mean and variance per subtask.

    Example: skipbench flexidepth usage --router runs/flexi-smollm2 --dataset text,arith --out results/flexi-usage.parquet
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.flexidepth import UsageConfig, run_usage

    _quiet_transformers()
    cfg = UsageConfig(model=model, router=router, data=DataSpec(name=dataset, split=split, limit=limit or None), max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype,
                      out=out or f"results/flexi-usage-{_slug(model)}.parquet")
    with Bar("usage") as bar:
        res = run_usage(cfg, progress=bar.advance, start=bar.start)
    show(res.tables["agg"], f"FlexiDepth layers used per subtask · {model}")
    console.print(f"wrote {res.path}")


@flexi_app.command("depthmap")
def flexidepth_depthmap(
    prompt: str = typer.Option(..., help="the instruction to answer"),
    model: str = ModelOpt,
    router: str = RouterOpt,
    max_new_tokens: int = typer.Option(64, help="tokens generated per item at most (training targets: the full model's)"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: str = typer.Option("results/depthmap.html", help="HTML page (a PNG is written beside it)"),
) -> None:
    """Colour each generated token by the number of layers it used (HTML and PNG).

    Example: skipbench flexidepth depthmap --router runs/flexi-smollm2 --prompt "Please calculate the sum of 99, 45, 12 and 78."
    """
    from skipbench.experiments.flexidepth import DepthmapConfig, run_depthmap

    _quiet_transformers()
    res = run_depthmap(DepthmapConfig(model=model, router=router, prompt=prompt, max_new_tokens=max_new_tokens, device=device, dtype=dtype, out=out))
    console.print(f"wrote {res['html']} and {res['png'].name}")


mindskip_app = typer.Typer(cls=SkipbenchGroup, no_args_is_help=True,
                           help="MindSkip: per-token routers that skip attention sub-layers (Router-Tuning, He et al.).")
app.add_typer(mindskip_app, name="mindskip")


@mindskip_app.command("train")
def mindskip_train(
    model: str = ModelOpt,
    dataset: str = typer.Option("text,arith", "--dataset", "-d", help="training data: datasets, comma-separated to mix"),
    split: str = typer.Option("train", help="training items: train (default) | validation | test | all (a seeded 70/15/15 split)"),
    limit: int = typer.Option(0, help="first N training items (0 = all)"),
    capacity: float = typer.Option(0.5, help="the fraction of tokens that attend at a routed layer (the capacity "
                                             "loss pushes it down to this)"),
    capacity_weight: float = typer.Option(1.0, help="lambda of the capacity loss, summed over routed layers"),
    capacity_loss: str = typer.Option("abs", help="abs: |attend - capacity| (towards it from both sides) | relu: "
                                                  "relu(attend - capacity), the authors' (only down to it)"),
    routed: int = typer.Option(0, help="route the N layers below the last (0: half the depth, the authors' 16 of 32)"),
    routed_layers: str = typer.Option("", help="0-based layers to route instead of --routed"),
    tau: float = typer.Option(0.5, help="a token attends when its router score is >= tau"),
    kv: bool = typer.Option(False, "--kv/--no-kv", help="--kv: skipped tokens still write K/V at routed layers "
                                                        "(fill); default none, as the authors' code"),
    steps: Steps = 200,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-2,
    seed: Seed = 0,
    loss: Loss = LossKind.ce,
    targets: Targets = Teacher.full,
    max_new_tokens: int = typer.Option(64, help="tokens generated per item at most (training targets: the full model's)"),
    max_seq_len: MaxSeqLen = 256,
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option(STRATEGIES.get("mindskip").default_arg, help="checkpoint folder (resumed when it holds a checkpoint)"),
    restart: bool = RestartOpt,
) -> None:
    """Train MindSkip routers on a frozen model; then --policy mindskip:OUT (-o skip=K to meet K skips per token).

    Example: skipbench mindskip train --dataset text,arith --capacity 0.75 --steps 200 --out runs/mindskip-smollm2
    """
    from skipbench.experiments.mindskip import MindSkipTrainConfig, run_train

    _quiet_transformers()
    tcfg = _train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens,
                         max_seq_len, device, dtype, out, targets, grad_accum, restart=restart)
    cfg = MindSkipTrainConfig(train=tcfg, capacity=capacity, weight=capacity_weight, capacity_loss=capacity_loss, routed=routed, tau=tau, kv=kv,
                              routed_layers=_int_list(routed_layers, "--routed-layers") if routed_layers else ())
    _train(run_train, cfg)


@app.command()
def finetune(
    model: str = ModelOpt,
    dataset: str = typer.Option("alpaca", "--dataset", "-d", help="training data (references are the targets)"),
    limit: int = typer.Option(0, help="first N training items (0 = the whole train split)"),
    val_limit: int = typer.Option(200, help="validation items scored for early stopping (0 = all)"),
    steps: int = typer.Option(1000, help="optimiser steps at most (early stopping may end sooner)"),
    batch_size: int = typer.Option(8, min=1, help="examples per step (the global batch under torchrun)"),
    grad_accum: GradAccum = 1,
    lr: Lr = 2e-5,
    lr_schedule: str = typer.Option("constant", help="constant | linear (decays to 0 at --steps; App. A.2.2's, with "
                                    "--lr 5e-5 --batch-size 64 --patience 1)"),
    eval_every: int = typer.Option(100, help="steps between validations"),
    patience: int = typer.Option(3, help="validations without a better ROUGE-L before stopping"),
    layer_dropout: float = typer.Option(0.0, help="drop each layer with this probability per example (LayerDrop, Fan et al.)"),
    dropout_schedule: DropoutSchedule = typer.Option(DropoutSchedule.uniform, callback=_plain, help="uniform: every "
                                                     "layer at --layer-dropout; exp: LayerSkip's rate rising with depth "
                                                     "from 0 at the first layer to --layer-dropout at the last"),
    early_exit_loss: float = typer.Option(0.0, help="LayerSkip's e_scale: an early-exit loss at every layer through the "
                                          "shared head, weighted e_l = e_scale * sum_{i<=l} i (0: the last layer only)"),
    early_exit_every: int = typer.Option(1, help="LayerSkip's rotational curriculum: an exit at every R-th layer, "
                                         "rotating with the step (and always the last)"),
    max_seq_len: MaxSeqLen = 512,
    max_new_tokens: int = typer.Option(128, help="length of the validation responses"),
    seed: int = typer.Option(0, help="seed of the batches and the layer dropout (the 70/15/15 split is always seed 0)"),
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option("runs/finetune", help="run folder: OUT/best is the model to use (--model OUT/best)"),
    restart: bool = typer.Option(False, "--restart", help="discard an earlier run in --out"),
) -> None:
    """Fine-tune the model on the train split (prompt masked from the loss), early stopping on validation ROUGE-L.

    Example: skipbench finetune --model opt-iml-1.3b --dataset alpaca --lr 5e-5 --lr-schedule linear --batch-size 64 \\
             --steps 3414 --eval-every 569 --patience 1 --out runs/opt-iml-alpaca   # App. A.2.2: 6 epochs
    Then:    skipbench evaluate --model runs/opt-iml-alpaca/best --dataset alpaca --split test
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.finetune import FinetuneConfig, run

    _quiet_transformers()
    # the split keeps its default seed (0), as every later command's --split does: --seed must not move the
    # test items into the fine-tuning data
    cfg = FinetuneConfig(model=model, data=DataSpec(name=dataset, split="train", limit=limit or None),
                         val_data=DataSpec(name=dataset, split="validation", limit=val_limit or None), steps=steps,
                         batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule, seed=seed,
                         eval_every=eval_every,
                         patience=patience, layer_dropout=layer_dropout, dropout_schedule=dropout_schedule,
                         early_exit_loss=early_exit_loss, early_exit_every=early_exit_every, max_seq_len=max_seq_len,
                         max_new_tokens=max_new_tokens, device=device, dtype=dtype, out=out, restart=restart)
    with TrainBar("finetune") as bar:
        result = run(cfg, progress=bar.step, start=bar.start)
    for note in result.notes:
        _note(note)
    first, best = result.evals[0], result.best
    stop = f"stopped early at step {result.evals[-1]['step']}" if result.stopped_early else f"ran to step {result.evals[-1]['step']}"
    typer.echo(f"validation ROUGE-L {first['rougeL']:.4f} at step 0, best {best['rougeL']:.4f} at step {best['step']}; "
               f"{stop}; the model to use: {result.out / 'best'}")


@app.command()
def reproduce(
    preset: str = typer.Option("quick", help="smoke | quick | paper, or a path to a .toml preset"),
    results: Optional[str] = typer.Option(None, help="results folder (default: the preset's)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the commands without running them"),
) -> None:
    """Run a preset's experiments as a sequence of skipbench commands; finished stages are skipped.

    Example: skipbench reproduce --preset quick      # what `make reproduce` runs
    """
    from skipbench.experiments.reproduce import run

    run(preset, results, dry_run, command=lambda argv: app(argv, standalone_mode=False), say=console.print)


@app.command()
def report(
    results: str = typer.Option("results", help="folder holding skipbench outputs"),
    out: Optional[str] = typer.Option(None, help="Markdown file (default <results>/REPORT.md)"),
) -> None:
    """Write a Markdown report (figures, tables, the papers' numbers beside ours, verdicts).

    Example: skipbench report --results results/ --out results/REPORT.md
    """
    from pathlib import Path

    from skipbench.report import write_report

    path = write_report(results, out or str(Path(results) / "REPORT.md"))
    console.print(f"wrote {path}")


@app.command()
def datasets() -> None:
    """List the built-in and hub datasets with sizes and fields.

    Example: skipbench datasets
    """
    import pandas as pd

    from skipbench.data import catalogue

    df = pd.DataFrame(catalogue()).fillna("")
    df["items"] = [str(int(x)) if x != "" else "(hub)" for x in df["items"]]
    show(df, "skipbench datasets")
    typer.echo("Files: Alpaca JSON/JSONL (instruction, input, output), or JSONL/CSV/parquet with --prompt-field/--reference-field.")


def _float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SkipbenchError(f"{what} expects comma-separated numbers, got '{text}'") from None
    return values


@app.command()
def oracle(
    runs: Optional[list[str]] = typer.Option(None, "--runs", help="evaluate parquet file(s); default: results/evaluate-*.parquet, the "
                                       "paper's configurations, one oracle per model/dataset/split"),
    budget: Optional[float] = typer.Option(None, help="mean executed layers per token allowed"),
    curve: bool = typer.Option(False, "--curve", help="every budget from the cheapest to the dearest configuration"),
    budgets: str = typer.Option("", help="the curve's budgets, comma-separated (default: every integer)"),
    metric: str = typer.Option("rougeL", help="rougeL | full_rougeL | exact_match | any numeric column"),
    policy: Optional[list[str]] = typer.Option(None, help="keep only these policies (full always stays), "
                                               "comma-separated or repeated"),
    costs: str = typer.Option("", help="keep only configurations of these costs (full always stays), comma-separated"),
    length_budgets: str = typer.Option("", help="budgets for the label-length test besides the star and --budget "
                                       "(the paper: 6 and 24 of 24 layers)"),
    bootstrap: int = typer.Option(2000, help="item resamples for the star budget's 95% interval (0: none)"),
    out: Optional[str] = typer.Option(None, help="parquet of (budget, method) rows; -assign, -length parquet and PNGs beside it"),
) -> None:
    """The exact sequence-level knapsack oracle and the greedy oracle (Glavas et al. Sec. 3.3).

    With no --runs: every results/evaluate-*.parquet, one oracle per (model, dataset, split), among the paper's
    configurations (uniform skipping at 1/6, 1/3 and 1/2 of the layers, and full depth) unless --policies or
    --costs name others.

    Example: skipbench oracle --budget 6
             skipbench oracle --runs results/eval-alpaca.parquet --curve --length-budgets 6,24 --out results/oracle.parquet
    """
    from skipbench.experiments.oracle import OracleConfig, run_groups

    if bootstrap < 0:
        raise SkipbenchError(f"--bootstrap must be >= 0, got {bootstrap}")
    cfg = OracleConfig(runs=tuple(runs or ()), metric=metric, budget=budget, curve=curve,
                       budgets=_float_list(budgets, "--budgets") if budgets else (),
                       policies=_names(policy),
                       costs=_int_list(costs, "--costs") if costs else (),
                       length_budgets=_float_list(length_budgets, "--length-budgets") if length_budgets else (),
                       bootstrap=bootstrap, out=out)
    results, notes = run_groups(cfg)
    for note in notes:
        _note(note)
    for result in results:
        _print_oracle(result, cfg, name=" · ".join(v for _, v in result.group) if len(results) > 1 else "")


def _print_oracle(result, cfg, name: str) -> None:
    if name:
        typer.echo(f"\n== {name} ==")  # plain: a long model path is neither wrapped nor cut
    for note in result.notes:
        _note(note)
    t, metric, budget = result.table, cfg.metric, cfg.budget
    if budget is not None:
        shown = t[t["budget"] == budget]
        show(shown[["method", "value", "mean_cost", "exact", "gap"]], f"oracle · budget {budget:g} · {metric}")
        shares = shown[shown["method"].isin(["oracle", "greedy"])].set_index("method").filter(like="share:")
        shares = shares.T.rename(index=lambda c: c.removeprefix("share:")).reset_index(names="configuration")
        show(shares, "share of items per configuration")
    if cfg.curve:
        wide = t[t["method"].isin(["oracle", "greedy"])].pivot(index="budget", columns="method", values="value").reset_index()
        show(wide, f"oracle curve · {metric}")
    L = max(result.costs)
    if result.star is not None:
        ci = (f", 95% bootstrap interval [{result.star_interval[0]:.2f}, {result.star_interval[1]:.2f}]"
              if result.star_interval else "")
        typer.echo(f"oracle matches {result.full} at budget {result.star:.3f} layers "
                   f"({100 * result.star / L:.1f}% of {L}{ci})")
    else:
        typer.echo(f"oracle never reaches {result.full}'s mean {metric}")
    for lt in result.length_tests:
        _print_length_test(lt)
    if result.path:
        console.print(f"wrote {result.path}")


def _print_length_test(lt: dict) -> None:
    import pandas as pd

    head = f"length test at budget {lt['budget']:g} ({lt['why']}), label length in {lt['unit']}, {lt['items']} items: "
    if lt["p_value"] is None:
        typer.echo(head + lt.get("note", "nothing to test"))
        return
    typer.echo(head + f"{lt.get('test') or 'chi-square'}, chi2 = {lt['statistic']:.2f}, dof = {lt['dof']}, "
               f"p = {lt['p_value']:.3g}"
               + (f" ({lt['note']})" if lt.get("note") else ""))
    counts = pd.DataFrame(lt["counts"]).pivot(index="bin", columns="config", values="count")
    counts = counts.reindex([b for b in dict.fromkeys(c["bin"] for c in lt["counts"])]).reset_index()
    show(counts, f"oracle's choice per label-length bin · budget {lt['budget']:g}")


@app.command("bench-oracle")
def bench_oracle(
    items: int = typer.Option(7800, min=1, help="items (the paper's Alpaca test size)"),
    costs: str = typer.Option("4,8,12,24", help="the configurations' costs (layers per token), comma-separated"),
    metric: OracleMetric = typer.Option(OracleMetric.rouge, callback=_plain, help="rouge: continuous; binary: 0/1, tie-heavy"),
    big_items: int = typer.Option(1_000_000, min=0, help="a large instance run by the oracle alone (0 to skip)"),
    seed: int = typer.Option(0, help="seed of the synthetic instance"),
) -> None:
    """Time the exact oracle against scipy's HiGHS MILP on the same instance (one process).

    Example: skipbench bench-oracle --items 7800 --costs 4,8,12,24
    """
    from skipbench.experiments.oracle_bench import OracleBenchConfig, run

    if metric not in ("rouge", "binary"):
        raise SkipbenchError(f"--metric must be rouge or binary, got '{metric}'")
    df = run(OracleBenchConfig(items=items, costs=_int_list(costs, "--costs"), metric=metric, big_items=big_items, seed=seed))
    import pandas as pd

    rows = []
    for r in df.to_dict("records"):
        if "speedup" in r and r["speedup"] == r["speedup"]:
            note = f"{r['speedup']:.0f}x slower than the oracle; same value: {r['same_value']}"
        elif r.get("exact") is True or r.get("exact") is False:
            note = "exact" if r["exact"] else f"certified gap {r['gap']:.2e}"
        else:
            note = ""
        value = r.get("value")
        rows.append({"what": r["what"], "items": r["items"], "seconds": r["seconds"],
                     "mean value": np.nan if value is None else value, "note": note})
    show(pd.DataFrame(rows), f"bench-oracle · {metric} · costs {costs}", {"mean value": "{:.6f}"}, width=120)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
