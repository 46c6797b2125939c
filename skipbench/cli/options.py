"""The options several commands share (one declaration each, the default beside it) and the small parsers that turn
option text into library values. Choices are `str` Enums: `--help` lists them and click refuses anything else in one
line; `plain` hands a command the plain string (tests/test_cli.py checks the members against the library's lists)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from skipbench.errors import SkipbenchError
from skipbench.policies.spec import STRATEGIES  # light: the registry's defaults (checkpoint folders)


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


def plain(value):
    return value.value if isinstance(value, Enum) else value


EMBEDDED = "smollm2-135m"
Model = typer.Option(EMBEDDED, "--model", "-m", help="alias, hub id, local directory or .gguf file")
DeviceOpt = typer.Option(Device.auto, callback=plain, help="auto: cuda when available")
DtypeOpt = typer.Option(Dtype.auto, callback=plain, help="auto: fp32 on CPU, bf16 on CUDA")
KvOpt = typer.Option(KvMode.auto, callback=plain, help="K/V of a token at a layer it skips: fill (computed from its "
                     "hidden state) | none (nothing written) | auto (the mode a trained policy requires, else none for a "
                     "static plan, else fill)")
DatasetOpt = typer.Option("text", "--dataset", "-d", help="arith | text | alpaca | cnn_dailymail | xsum | a file; "
                          "comma-separated to mix")
Gate = typer.Option(GateMode.sample, callback=plain, help="policy controller: sample (as in the paper) | argmax")

_ARG_HINT = {"none": "", "cost": ":C", "layers": ":0,3,5", "checkpoint": ":DIR", "threshold": ":T"}
POLICIES = (" | ".join(n + _ARG_HINT[STRATEGIES.get(n).arg] for n in STRATEGIES.names(include_plugins=False))
            + ", or a plugin's (`skipbench policies` lists them, with their options)")
PolicyOptions = typer.Option(None, "--policy-option", "-o", metavar="NAME=VALUE",
                             help="a strategy's own option, e.g. -o min-layers=4 -o measure=state (repeatable; "
                                  "`skipbench policies` lists them)")
Draft = typer.Option(None, "--draft", help="self-speculative decoding: this policy drafts, the full model verifies "
                     "(the output stays full depth's), e.g. --draft early-exit:10")
Speculate = typer.Option("4", help="--draft: draft tokens per round, or 'auto' (adapted between rounds)")
DraftThreshold = typer.Option(0.0, help="--draft: a row stops drafting after a token the draft gives a probability "
                              "below this (0: never)")
DraftVocab = typer.Option(0, min=0, help="--draft: the draft's head scores only the N most frequent tokens of the "
                          "data's train split (FR-Spec; 0: the whole vocabulary); the verifier keeps the full head, so the "
                          "output is unchanged")

# training options shared by controllers train / sweep, flexidepth and mindskip train and finetune: one declaration
# each, the default beside each command (they differ: FlexiDepth trains longer, finetune uses the paper's lr)
Steps = Annotated[int, typer.Option(help="optimiser steps")]
BatchSize = Annotated[int, typer.Option(min=1, help="examples per step (the global batch under torchrun)")]
GradAccum = Annotated[int, typer.Option(help="micro-batches per step (losses normalised over the step's tokens)")]
Lr = Annotated[float, typer.Option(help="learning rate (AdamW)")]
Seed = Annotated[int, typer.Option(help="seed of the batches and of random gates")]
MaxSeqLen = Annotated[int, typer.Option(help="prompt + response tokens per example")]
TrainDtype = Annotated[Dtype, typer.Option(callback=plain, help="the training dtype")]
Loss = Annotated[LossKind, typer.Option(callback=plain, help="kl: distil the full model's distributions; ce: cross-entropy")]
Targets = Annotated[Teacher, typer.Option(callback=plain, help="full: the full model's own responses")]
TrainData = typer.Option("text,arith", "--dataset", "-d", help="training data: datasets, comma-separated to mix")
TrainSplit = typer.Option("train", help="training items: train (default) | validation | test | all (a seeded 70/15/15 split)")
TrainTokens = typer.Option(64, help="tokens generated per item at most (training targets: the full model's)")
Restart = typer.Option(False, "--restart", help="discard a checkpoint in --out and train from scratch (without it, a "
                       "checkpoint is resumed only by the configuration that wrote it)")
Units = typer.Option(AlphaUnits.fraction, callback=plain, help="fraction: alpha x the fraction of the L layers executed "
                     "per token, as the paper's code computes it | sum: alpha x the sum of the gates (= fraction / L)")
Router = typer.Option(STRATEGIES.get("flexidepth").default_arg, "--router", help="folder written by 'flexidepth train'")
Runs = typer.Option(..., "--runs", help="evaluate parquet file(s) scoring the same items under static configurations "
                    "(run with --split all, or one file per split)")


def specs(policy, **flags) -> list:
    """The points `--policy` (repeatable) and the older flags name (policies.spec.from_flags)."""
    from skipbench.policies.spec import from_flags

    return from_flags(policy, **flags)


def one_spec(policy: str, **flags):
    found = specs(policy, **flags)
    if len(found) != 1:
        raise SkipbenchError(f"--policy '{policy}' names {len(found)} policies; this command runs one")
    return found[0]


def no_policy(policy_option) -> list:
    """No --policy: then no -o either (it would be dropped silently), and a malformed one is refused all the same."""
    from skipbench.policies.spec import parse_policy_options

    given = parse_policy_options(policy_option)
    if given:
        raise SkipbenchError(f"--policy-option {', '.join(given)}: no policy given takes it (give --policy)")
    return []


def speculation(speculate: str, threshold: float, draft_vocab: int = 0):
    from skipbench.engine.speculative import Speculation

    return Speculation.parse(speculate, threshold, draft_vocab)


def for_policies(policy_option, found: list, draft_texts=(), seed: int = 0) -> list[str]:
    """-o, checked before any work whatever else is given (NAME=VALUE, each name once): the options some --policy
    point (`found`, parsed without them) takes. One that only a --draft takes goes to the draft alone (`drafted`);
    one that none takes is refused, never dropped."""
    from skipbench.policies.spec import parse_policy_options

    given = parse_policy_options(policy_option)
    if not given:
        return []
    drafts = [f for text in draft_texts if text and text != "auto" for f in specs(text, seed=seed)]

    def takes(points, name):
        return any(p.strategy.option(name) for p in points)

    unused = [n for n in given if not takes(found, n) and not takes(drafts, n)]
    if unused:
        raise SkipbenchError(f"--policy-option {', '.join(unused)}: no policy given takes it")
    return [o for o in policy_option if takes(found, o.partition("=")[0].strip())]


def drafted(text: str, seed: int, policy_options=None) -> list:
    """The draft specs one --draft value names, each with the -o options its strategy takes (the others are the
    policies': `-o min-layers=2 --policy confidence:0.9 --draft early-exit:8` gives the draft none)."""
    found = specs(text, seed=seed)
    own = [o for o in policy_options or () if any(f.strategy.option(o.partition("=")[0].strip()) for f in found)]
    return specs(text, seed=seed, policy_options=own) if own else found


def draft(text: str | None, seed: int, policy_options=None, flag: str = "--draft"):
    """The one spec of --draft (or of another option that takes one policy, `flag`), None without it."""
    if text is None:
        return None
    found = drafted(text, seed, policy_options)
    if len(found) != 1:
        raise SkipbenchError(f"{flag} '{text}' names {len(found)} policies; give one")
    return found[0]


def with_budget(policy_option, budget: float | None) -> list[str]:
    """`--budget B` is `-o budget=B` (the route policy's), given once."""
    if budget is None:
        return list(policy_option or [])
    if any(o.partition("=")[0].strip() == "budget" for o in policy_option or ()):
        raise SkipbenchError("give the budget once: --budget B or -o budget=B")
    return [*(policy_option or []), f"budget={budget:g}"]


def names(values: list[str] | None) -> tuple[str, ...]:
    """A repeatable option of comma-separated names, flattened."""
    return tuple(n.strip() for v in values or () for n in v.split(",") if n.strip())


def int_list(text: str, what: str) -> tuple[int, ...]:
    from skipbench.policies.spec import parse_int_list

    values = parse_int_list(text, what)
    if not values:
        raise SkipbenchError(f"{what} needs at least one integer")
    return values


def ints(text: str, what: str) -> tuple[int, ...]:
    """An optional comma list: () when empty."""
    return int_list(text, what) if text else ()


def floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SkipbenchError(f"{what} expects comma-separated numbers, got '{text}'") from None


def drafts(values: list[str] | None, seed: int, policy_options=None) -> tuple[tuple, bool]:
    """bench's --draft: the draft specs, or `auto` alone (search a draft layer set): (specs, search)."""
    given = [d for d in values or [] if d.strip()]
    if given == ["auto"]:
        return (), True
    if "auto" in given:
        raise SkipbenchError("--draft auto searches a draft of its own: give it alone")
    return tuple(s for d in given for s in drafted(d, seed, policy_options)), False


def split_auto(values: list[str] | None) -> tuple[list[str], bool]:
    """track's --draft: each value without its `auto` items (a comma list may hold one: `del,auto`), and whether one
    was given. `auto` is always a name of its own in a list (a layer list holds numbers), so dropping it leaves the
    other specs as written."""
    texts, search = [], False
    for value in values or []:
        items = [t for t in value.replace(";", ",").split(",") if t.strip()]
        search |= any(t.strip() == "auto" for t in items)
        kept = ",".join(t for t in items if t.strip() != "auto")
        if kept:
            texts.append(kept)
    return texts, search


def speculations(text: str, threshold: float, vocabs: str = "0") -> tuple:
    """bench's --speculate and --draft-vocab: one speculation setting per comma-separated K (or auto) and draft
    vocabulary size."""
    ks = [k for k in text.split(",") if k.strip()] or ["4"]
    return tuple(speculation(k, threshold, n) for n in (ints(vocabs, "--draft-vocab") or (0,)) for k in ks)


def train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens, max_seq_len,
                 device, dtype, out, targets="full", grad_accum=1, **extra):
    """The training loop's config from a training command's options (controllers, FlexiDepth, MindSkip)."""
    from skipbench.data import DataSpec
    from skipbench.training.loop import TrainConfig

    return TrainConfig(model=model, data=DataSpec(name=dataset, split=split, limit=limit or None), steps=steps,
                       batch_size=batch_size, grad_accum=grad_accum, lr=lr, seed=seed, loss=loss, targets=targets,
                       max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, device=device, dtype=dtype, out=out, **extra)
