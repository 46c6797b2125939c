"""`skipbench compare`: every method at the same number of skipped layers on lm-eval tasks, summarised as Retain %.

The FlexiDepth talk (Luo et al.) compares, on Llama-3-8B-Instruct with 4 and 8 of 32 layers skipped, FlexiDepth with
LayerSkip, ShortGPT, LaCo and MindSkip over six benchmarks, as "Retain %": the mean over tasks of a method's score
over the full model's. Here a method is a strategy set to skip K of the model's L layers:

* a strategy whose argument is a cost (`shortgpt` = block-influence, `laco`, `angular`, `uniform`, `early-exit`,
  ...): `NAME:L-K`;
* a learned router with a threshold (`flexidepth:DIR`, `mindskip:DIR`): `-o skip=K`, the threshold chosen on
  calibration prompts (the embedded `text` suite's train split: lm-eval tasks carry no skipbench dataset) so that a
  token skips about K layers (MindSkip: K attention sub-layers) there, as the talk tunes dynamic methods to the
  skipped layers;
* `layerskip:DIR`: early exit after L-K layers of the model the LayerSkip recipe fine-tuned (`-o exit=L-K`).

Every point runs through `skipbench lm-eval`'s recipe (its parts are cached and reused) with the context under the
policy (`prompt_depth="policy"`: a one-token answer is decided by the context's pass), full depth beside it. The
table has a row per method, K and task: the score with its 95% interval, the full model's, their ratio, and the
layers (and attention sub-layers) a token actually ran. The summary (`-agg`) per method and K: Retain % with an
approximate interval, and the realized skip averaged over tasks; a dynamic method meets K only as well as its
threshold does on the evaluated items, which the table shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from skipbench.errors import SkipbenchError
from skipbench.models import load_model
from skipbench.models.loading import EMBEDDED
from skipbench.policies import STRATEGIES, PolicySpec, parse_policies
from skipbench.results import Written, check_out_path, manifest, tidy, write_tables

ALIASES = {"shortgpt": "block-influence"}  # the talk's names for skipbench's strategies

# Retain % as the FlexiDepth talk reports it (Llama-3-8B-Instruct, 32 layers; MMLU, HellaSwag, WinoGrande, GSM8K,
# HumanEval, CoQA), by skipped layers: the reference the report prints beside a run's own table. Not measured here.
TALK = {"flexidepth": {4: 106.5, 8: 100.7}, "shortgpt": {4: 69.1, 8: 32.0}, "laco": {4: 81.7, 8: 65.3},
        "mindskip": {4: 84.2, 8: 60.2}, "layerskip": {4: 54.0, 8: 43.9}}

PRESETS = {
    # here: the embedded model and the shipped offline tasks with the chat template (an instruct model; its answers
    # to `skipbench_arith` match none of the references even at full depth, so that task has no ratio); the trained
    # methods are added with --methods
    "offline": {"model": EMBEDDED, "tasks": ("skipbench_choice", "skipbench_text"), "skip": (4, 8),
                "chat_template": True},
    # the talk's setting, for a GPU machine with the hub (humaneval also needs --allow-code-execution)
    "paper": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "skip": (4, 8), "chat_template": False,
              "tasks": ("mmlu", "hellaswag", "winogrande", "gsm8k", "humaneval", "coqa")},
}
CODE_TASKS = ("humaneval", "mbpp")  # lm-eval runs the model's code for these


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    model: str = EMBEDDED
    methods: tuple[str, ...] = ("shortgpt", "laco")
    skip: tuple[int, ...] = (4, 8)
    tasks: tuple[str, ...] = PRESETS["offline"]["tasks"]
    limit: int | None = None  # documents per task
    num_fewshot: int | None = None
    batch_size: int | None = None
    chat_template: bool = True  # the embedded model is an instruct model
    allow_code_execution: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""
    resume: bool = True


@dataclass(kw_only=True)
class CompareResult(Written):
    summary: pd.DataFrame  # per method and K: Retain % and the realized skip
    runs: Path  # the lm-eval recipe's table of every point


@dataclass(frozen=True)
class Point:
    method: str  # as the user named it (shortgpt, mindskip:runs/x, ...)
    skip: int
    spec: PolicySpec


def points(methods: tuple[str, ...], skip: tuple[int, ...], num_layers: int, seed: int = 0) -> list[Point]:
    """Each method set to skip each K of `num_layers`: its policy spec (see the module's docstring); two methods
    that name the same strategy (an alias and its name) are refused."""
    if not methods:
        raise SkipbenchError("--methods is empty; e.g. --methods shortgpt,laco,mindskip:runs/mindskip")
    skip = tuple(dict.fromkeys(skip))  # a K given twice is one
    if not skip or any(not 0 < k < num_layers for k in skip):
        raise SkipbenchError(f"--skip takes layer counts in 1..{num_layers - 1} (the model has {num_layers}), got "
                             f"{','.join(map(str, skip)) or 'none'}")
    out = []
    for method in dict.fromkeys(methods):
        name, _, arg = method.partition(":")
        strategy = STRATEGIES.get(ALIASES.get(name, name))
        for k in skip:
            if strategy.arg == "cost":
                if arg:
                    raise SkipbenchError(f"compare: method '{method}' takes no argument (compare sets it to L-K)")
                spec = parse_policies(f"{strategy.name}:{num_layers - k}", seed=seed)[0]
            elif strategy.skip_option:  # the registry says which option sets it (a threshold router, an exit)
                option, means = strategy.skip_option
                value = k if means == "K" else num_layers - k
                spec = parse_policies(f"{strategy.name}:{arg or strategy.default_arg}", {option: str(value)}, seed=seed)[0]
            else:
                raise SkipbenchError(f"compare: method '{method}' cannot be set to a number of skipped layers (its "
                                     "argument is not a cost and its registry entry names no skip_option)")
            twin = next((p.method for p in out if p.spec.label == spec.label), None)
            if twin is not None:
                raise SkipbenchError(f"compare: methods '{twin}' and '{method}' are the same strategy ({spec.label})")
            out.append(Point(method, k, spec))
    return out


def run(cfg: CompareConfig, on_part: Callable | None = None, lm=None) -> CompareResult:
    from skipbench.lmeval_sweep import LmEvalConfig, run as lmeval_run, summarise

    out = check_out_path(cfg.out)
    code = [t for t in cfg.tasks if t in CODE_TASKS]
    if code and not cfg.allow_code_execution:
        raise SkipbenchError(f"{', '.join(code)} runs the code the model writes; pass --allow-code-execution to allow "
                             "it (lm-eval's confirm_run_unsafe_code), or leave the task out")
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
    pts = points(cfg.methods, cfg.skip, lm.num_layers, cfg.seed)
    runs = out.with_name(f"{out.stem}.lmeval.parquet")
    lcfg = LmEvalConfig(model=cfg.model, tasks=cfg.tasks, policies=tuple(p.spec for p in pts), limit=cfg.limit,
                        num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, prompt_depth="policy",
                        chat_template=cfg.chat_template, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                        out=str(runs), resume=cfg.resume, allow_code_execution=cfg.allow_code_execution)
    result = lmeval_run(lcfg, on_part, lm=lm)
    table = per_task(summarise(result.rows), pts)
    summary = retain(table)
    rows = tidy(table, cfg, skip=("out", "resume", "methods", "skip", "tasks"), model=cfg.model)
    from skipbench.plots import compare_figure

    meta = manifest(cfg, lm=lm, num_layers=lm.num_layers, points={p.spec.label: [p.method, p.skip] for p in pts},
                    lmeval_runs=str(runs), talk=TALK)
    paths = write_tables(rows, out, meta, agg=summary)
    figure = compare_figure(summary, lm.num_layers, out.with_suffix(".png"))
    return CompareResult(rows=rows, path=paths["rows"], tables={"agg": summary}, files={"agg": paths["agg"], "figure": figure},
                         summary=summary, runs=runs)


def per_task(summary: pd.DataFrame, pts: list[Point]) -> pd.DataFrame:
    """lm-eval's main metric per task and point, beside the full model's: a row per method, K and task. Only the
    tasks asked for count (a group such as MMLU by its own aggregate, not once per subtask)."""
    summary = summary[summary["top"].astype(bool)]
    full = summary[summary["policy_spec"] == "full"].set_index("task")
    by_label = {p.spec.label: p for p in pts}
    rows = []
    for r in summary[summary["policy_spec"] != "full"].itertuples():
        p, f = by_label[r.policy_spec], full.loc[r.task]
        rows.append({"method": p.method, "skip": p.skip, "policy_spec": r.policy_spec, "task": r.task,
                     "metric": r.metric, "value": r.value, "stderr": r.stderr, "lo": r.lo, "hi": r.hi, "n": r.n,
                     "full_value": f["value"], "full_lo": f["lo"], "full_hi": f["hi"],
                     "ratio": r.value / f["value"] if f["value"] else math.nan,
                     "layers_mean": r.layers_mean, "attention_mean": r.attention_mean,
                     "full_layers_mean": f["layers_mean"]})
    return pd.DataFrame(rows)


def retain(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and K: Retain % = 100 x the mean over tasks of score / full score, with an approximate 95%
    interval (delta method, tasks independent: var(x / f) ~ (se_x^2 + r^2 se_f^2) / f^2, each se the half-width of
    the score's own 95% interval over 1.96, so Wilson's for accuracies; the method's and the full model's scores are
    treated as independent, which they are not (the same documents), so it is wider than a paired interval would
    be; a ratio cannot be negative, so the interval starts at 0 at the lowest; a score whose own interval has no
    width, a ROUGE-L of 0 on every item, adds no variance); a task the full model scores 0 on has no ratio and is
    left out (`tasks` counts the ones in).
    And what a token ran, averaged over tasks: layers, attention sub-layers, and the skip they realize against the
    full model's (MindSkip skips attention only: its layers stay at full depth)."""
    out = []
    for (method, k), g in table.groupby(["method", "skip"], sort=False):
        g = g.assign(attention_mean=g["attention_mean"].fillna(g["layers_mean"]))
        scored = g[g["full_value"] != 0]
        r = (scored["value"] / scored["full_value"]).to_numpy(float)
        # each score's standard error from its 95% interval (Wilson for accuracies: not 0 at 0% or 100%)
        se, se_full = (scored["hi"] - scored["lo"]) / 3.92, (scored["full_hi"] - scored["full_lo"]) / 3.92
        var = ((se**2 + r**2 * se_full**2) / scored["full_value"] ** 2).to_numpy(float)
        half = 1.96 * math.sqrt(var.sum()) / len(r) if len(r) and np.isfinite(var).all() else math.nan
        mean = float(np.mean(r)) if len(r) else math.nan
        layers = float((g["full_layers_mean"] - g["layers_mean"]).mean())
        attention = float((g["full_layers_mean"] - g["attention_mean"]).mean())
        only_attention = layers < 0.01 < attention  # MindSkip: its realized skip is in attention sub-layers
        out.append({"method": method, "skip": int(k), "tasks": len(r), "retain_pct": 100 * mean,
                    "retain_lo": max(0.0, 100 * (mean - half)), "retain_hi": 100 * (mean + half),
                    "layers_mean": float(g["layers_mean"].mean()), "attention_mean": float(g["attention_mean"].mean()),
                    "layers_skipped": layers, "attention_skipped": attention,
                    "skipped": attention if only_attention else layers,
                    "skipped_unit": "attention" if only_attention else "layers"})
    return pd.DataFrame(out)
