"""`skipbench compare`: every method at the same number of skipped layers on lm-eval tasks, summarised as Retain %.

The FlexiDepth talk (Luo et al.) compares, on Llama-3-8B-Instruct with 4 and 8 of 32 layers skipped, FlexiDepth with
LayerSkip, ShortGPT, LaCo and MindSkip over six benchmarks, as "Retain %": the mean over tasks of a method's score
over the full model's. Here a method is a strategy set to skip K of the model's L layers:

* a strategy whose argument is a cost (`shortgpt` = block-influence, `laco`, `angular`, `uniform`, `early-exit`,
  ...): `NAME:L-K`;
* a learned router with a threshold (`flexidepth:DIR`, `mindskip:DIR`): `-o skip=K`, the threshold chosen on
  held-out calibration prompts (the validation splits of the embedded `text` and `arith` suites, 64 items: lm-eval
  tasks carry no skipbench dataset, and the routers trained on the train splits) so that a
  token skips about K layers (MindSkip: K attention sub-layers) there, as the talk tunes dynamic methods to the
  skipped layers;
* `layerskip:DIR`: early exit after L-K layers of the model the LayerSkip recipe fine-tuned (`-o exit=L-K`).

Every point runs through `skipbench lm-eval`'s recipe (its parts are cached and reused) with the context under the
policy (`prompt_depth="policy"`: a one-token answer is decided by the context's pass), full depth beside it. The
table has a row per method, K and task: the score with its 95% interval, the full model's, their ratio, and the
layers (and attention sub-layers) a token actually ran. The summary (`-agg`) per method and K: Retain % with an
approximate interval, and the realized skip averaged over tasks; a dynamic method meets K only as well as its
threshold does on the evaluated items, which the table shows.

`--calibration-seeds 0,1,2` runs every method whose plan or threshold is drawn from a calibration sample (ShortGPT,
LaCo, angular; a router's `-o skip` threshold) once per sample of the same size (`-o calibration-seed`; issue 41):
the first seed keeps the method's name, the others are `METHOD [calibration-seed S]` rows of their own. The spread
table (`-spread`) has, per method and K, the samples' Retain % (mean, sd, range), beside the methods drawn from no
sample, and the lines of `analysis.spread.rankings` say whether each ranking survives that spread. The figure, the
pairs and the talk's verdict use the first sample only, so that no sample is picked with hindsight.

With `matched_random` (the default; `--no-matched-random` leaves it out), each learned router at each K (FlexiDepth,
MindSkip: `quality.MATCHED`; the first calibration sample's) gets a random control run after it, as `evaluate
--matched-random` adds one (issue 41): `random-token` skipping of the layers per token the router realized, or for
MindSkip `random-attention` skipping of the attention sub-layers it realized, under its checkpoint's KV mode; matched
to the realized compute averaged over the tasks (the table's realized skip; lm-eval runs one policy on every task, so
one control serves every task). It is a method of its own, `random control of METHOD`, at the router's K: in the
tables, the figure and the pairs, where the router against it is a paired bootstrap difference of Retain %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from skipbench.analysis.lmeval_tables import CONTROL, NOISY_CV, POINT_COLUMNS
from skipbench.analysis.papers import TALK
from skipbench.analysis.spread import first_sample, retain_rankings, retain_spread
from skipbench.analysis.verdicts import MATCHED_WITHIN
from skipbench.errors import SkipbenchError, note
from skipbench.models import load_model
from skipbench.models.loading import EMBEDDED, default_batch_size
from skipbench.policies import STRATEGIES, PolicySpec, parse_policies
from skipbench.store.paths import slug
from skipbench.store.results import (
    Shown, Written, check_out_path, companion, manifest, manifest_path, tidy, write_tables,
)

ALIASES = {"shortgpt": "block-influence"}  # the talk's names for skipbench's strategies

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
    max_gen_toks: int | None = None  # every generation task's answer length; None: the task's
    num_fewshot: int | None = None
    batch_size: int | None = None
    chat_template: bool = True  # the embedded model is an instruct model
    allow_code_execution: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""
    resume: bool = True
    policy_options: tuple[str, ...] = ()  # -o NAME=VALUE: to every method whose strategy takes NAME
    calibration_seeds: tuple[int, ...] = ()  # each calibrated method once per calibration sample (module docstring)
    matched_random: bool = True  # each learned router beside random skipping of the compute it realized (docstring)


def with_preset(cfg: CompareConfig, preset: str | None, given: set[str]) -> CompareConfig:
    """The preset's model, tasks, K and chat template for the fields not given on the command line (`given`), and
    the output path settled (results/compare-<model>.parquet for the model the preset may set), so the manifest
    records the path written."""
    if preset is not None:
        if preset not in PRESETS:
            raise SkipbenchError(f"--preset must be one of {', '.join(PRESETS)}, got '{preset}'")
        cfg = replace(cfg, **{k: v for k, v in PRESETS[preset].items() if k not in given})
    return replace(cfg, out=cfg.out or f"results/compare-{slug(cfg.model)}.parquet")


@dataclass(kw_only=True)
class CompareResult(Written):
    summary: pd.DataFrame  # per method and K: Retain % and the realized skip
    runs: Path  # the lm-eval recipe's table of every point


@dataclass(frozen=True)
class Point:
    method: str  # as the user named it (shortgpt, mindskip:runs/x, ...); a later calibration sample's is marked
    skip: int
    spec: PolicySpec
    calibration_seed: int | None = None  # --calibration-seeds: the sample its plan or threshold came from
    calibration_of: str = ""  # --calibration-seeds: the method it is a sample of (its name as given)


def sampled_name(method: str, seed: int) -> str:
    return f"{method} [calibration-seed {seed}]"


def scoped_options(methods: tuple[str, ...], policy_options: tuple[str, ...]) -> list[tuple[list[str], str, str]]:
    """-o pairs as (the methods each goes to, option, value), checked (see `points`); needs no model, so `run` calls it
    before loading one."""
    from skipbench.policies.spec import parse_policy_options

    given = parse_policy_options(policy_options)
    named = {m: STRATEGIES.get(ALIASES.get(m.partition(":")[0], m.partition(":")[0])) for m in methods}
    scoped = []  # (the methods it goes to, option, value): `-o flexidepth.calibration=16` to flexidepth's only
    for key, value in given.items():
        who, _, option = key.rpartition(".")
        to = [m for m, st in named.items() if not who or who in (m.partition(":")[0], st.name)]
        if who and not to:
            raise SkipbenchError(f"compare: -o {key}: no method named '{who}' is given")
        for m in to:
            sets = named[m].skip_option[0] if named[m].skip_option else None
            if option == sets or (sets == "skip" and option == "tau"):
                raise SkipbenchError(f"compare: -o {key}: compare sets {m}'s {sets} to meet each --skip K; give --skip")
        to = [m for m in to if named[m].option(option)]
        if not to:
            raise SkipbenchError(f"compare: -o {key}: no method given takes it")
        scoped.append((to, option, value))
    return scoped


def points(methods: tuple[str, ...], skip: tuple[int, ...], num_layers: int, seed: int = 0,
           policy_options: tuple[str, ...] = (), calibration_seeds: tuple[int, ...] = ()) -> list[Point]:
    """Each method set to skip each K of `num_layers`: its policy spec (see the module's docstring); two methods
    that name the same strategy (an alias and its name) are refused. A method that runs a model of its own and is
    set by an option (LayerSkip's exit) also gets K=0, that model at full depth: its own baseline. `policy_options`
    (-o NAME=VALUE) go to every method whose strategy takes NAME, and `-o METHOD.NAME=VALUE` to that method's only
    (the same option name can mean different things: `flexidepth.calibration=16` is 16 threshold prompts, LaCo's
    `calibration` its merge check's prompts); one that none takes, or the option compare sets itself to meet K (and a
    router's `tau`, which that option chooses), is refused. With `calibration_seeds`, a point drawn from a
    calibration sample is one point per seed (the module's docstring)."""
    from skipbench.policies.spec import samples_calibration, with_calibration_seeds

    check_seeds(methods, calibration_seeds)
    scoped = scoped_options(methods, policy_options)
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
        own_baseline = strategy.own_model and bool(strategy.skip_option)
        own = {option: value for to, option, value in scoped if method in to}
        for k in ((0,) if own_baseline else ()) + skip:
            if strategy.arg == "cost":
                if arg:
                    raise SkipbenchError(f"compare: method '{method}' takes no argument (compare sets it to L-K)")
                spec = parse_policies(f"{strategy.name}:{num_layers - k}", own, seed=seed)[0]
            elif strategy.skip_option:  # the registry says which option sets it (a threshold router, an exit)
                option, means = strategy.skip_option
                value = k if means == "K" else num_layers - k
                spec = parse_policies(f"{strategy.name}:{arg or strategy.default_arg}", {**own, option: str(value)},
                                      seed=seed)[0]
            else:
                raise SkipbenchError(f"compare: method '{method}' cannot be set to a number of skipped layers (its "
                                     "argument is not a cost and its registry entry names no skip_option)")
            twin = next((p.method for p in out if p.spec.label == spec.label), None)
            if twin is not None:
                raise SkipbenchError(f"compare: methods '{twin}' and '{method}' are the same strategy ({spec.label})")
            if not (calibration_seeds and samples_calibration(spec)):
                out.append(Point(method, k, spec))
                continue
            for i, (s, sampled) in enumerate(zip(calibration_seeds, with_calibration_seeds((spec,), calibration_seeds))):
                out.append(Point(method if i == 0 else sampled_name(method, s), k, sampled, s, method))
    return out


def matched_controls(table: pd.DataFrame, pts: list[Point], num_layers: int) -> list[Point]:
    """A random control for each learned router's point (the module docstring): the plan of `quality.matched_spec`
    at the router's realized compute, averaged over the tasks (attention sub-layers for MindSkip, under its
    checkpoint's KV mode). None for a point that realized every layer or fewer than 2, or a later calibration
    sample."""
    from skipbench.evaluation.quality import MATCHED_UNIT, matched_spec, matches

    out = []
    for p in pts:
        if not matches(p.spec) or p.skip == 0 or (p.calibration_of and p.method != p.calibration_of):
            continue
        mine = table[table["policy_spec"] == p.spec.label]
        column = "attention_mean" if p.spec.name in MATCHED_UNIT else "layers_mean"
        realized = float(mine[column].fillna(mine["layers_mean"]).mean()) if len(mine) else math.nan
        kv = None
        if p.spec.name == "mindskip":
            from skipbench.policies.mindskip import load_mindskip

            kv = "fill" if load_mindskip(p.spec.arg)[1]["kv"] else "none"  # the checkpoint decides its KV mode
        spec = matched_spec(p.spec, realized, num_layers, kv) if math.isfinite(realized) else None
        unit = MATCHED_UNIT.get(p.spec.name, "layers")
        if spec is None:
            note(f"compare: {p.method} at K={p.skip} ran {realized:.2f} {unit} per token, which no random plan of 2 .. "
                 f"{num_layers - 1} matches; no control for it")
        elif spec.label in {q.spec.label for q in pts + out}:  # one name per lm-eval point
            note(f"compare: {p.method} at K={p.skip} realized what another point did ({spec.label}); no control of "
                 "its own")
        else:
            out.append(Point(CONTROL + p.method, p.skip, spec))
    return out


def check_seeds(methods: tuple[str, ...], seeds: tuple[int, ...]) -> None:
    """--calibration-seeds: two distinct seeds at least, and some method drawn from a calibration sample (a
    strategy with -o calibration-seed: compare sets a router's -o skip, so its threshold is always one)."""
    from skipbench.policies.spec import CALIBRATION_SEED, check_calibration_seeds

    if not seeds:
        return
    check_calibration_seeds(seeds)
    strategies = [STRATEGIES.get(ALIASES.get(m.partition(":")[0], m.partition(":")[0])) for m in methods]
    if not any(st.option(CALIBRATION_SEED) is not None for st in strategies):
        raise SkipbenchError("--calibration-seeds: no method is drawn from a calibration sample (shortgpt, laco, "
                             "angular, or a flexidepth/mindskip router, whose threshold compare tunes)")


def run(cfg: CompareConfig, on_part: Callable | None = None, lm=None) -> CompareResult:
    from skipbench.analysis.lmeval_tables import summarise
    from skipbench.evaluation.lmeval_sweep import LmEvalConfig, run as lmeval_run

    out = check_out_path(cfg.out or f"results/compare-{slug(cfg.model)}.parquet")  # the model a preset may set
    code = [t for t in cfg.tasks if t in CODE_TASKS]
    if code and not cfg.allow_code_execution:
        raise SkipbenchError(f"{', '.join(code)} runs the code the model writes; pass --allow-code-execution to allow "
                             "it (lm-eval's confirm_run_unsafe_code), or leave the task out")
    scoped_options(cfg.methods, cfg.policy_options)  # a mistyped -o fails before the model loads
    check_seeds(cfg.methods, cfg.calibration_seeds)  # and so do --calibration-seeds that no method can use
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
    pts = points(cfg.methods, cfg.skip, lm.num_layers, cfg.seed, cfg.policy_options, cfg.calibration_seeds)
    runs = out.with_name(f"{out.stem}.lmeval.parquet")
    lcfg = LmEvalConfig(model=cfg.model, tasks=cfg.tasks, policies=tuple(p.spec for p in pts), limit=cfg.limit,
                        max_gen_toks=cfg.max_gen_toks, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, prompt_depth="policy",
                        chat_template=cfg.chat_template, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                        out=str(runs), resume=cfg.resume, allow_code_execution=cfg.allow_code_execution)
    result = lmeval_run(lcfg, on_part, lm=lm)
    table = per_task(summarise(result.rows), pts)
    controls = matched_controls(table, pts, lm.num_layers) if cfg.matched_random else []
    if controls:  # run after the routers, from what they realized; the parts finished above are reused
        pts += controls
        fresh = frozenset() if cfg.resume else frozenset(p.spec.label for p in controls)  # --no-resume: theirs too
        result = lmeval_run(replace(lcfg, policies=tuple(p.spec for p in pts), resume=True), on_part, lm=lm, fresh=fresh)
        table = per_task(summarise(result.rows), pts)
    reps = replicates(table, result.tables["docs"], RESAMPLES, cfg.seed)
    table = with_task_intervals(table, reps)
    summary = retain(table, reps)
    pairs = matched_pairs(first_sample(table), first_sample(summary), reps)
    spread = retain_spread(summary, lm.num_layers)
    rows = tidy(table, cfg, skip=("out", "resume", "methods", "skip", "tasks", "calibration_seeds"), lm=lm,
                model=cfg.model, batch_size=cfg.batch_size or default_batch_size(lm.device))
    from skipbench.analysis.plots import compare_figure

    meta = manifest(cfg, lm=lm, num_layers=lm.num_layers, points={p.spec.label: [p.method, p.skip] for p in pts},
                    lmeval_runs=str(runs), talk=TALK, interval=INTERVAL, matched_within=MATCHED_WITHIN)
    if not len(spread):  # a spread of an earlier run with seeds is not this run's
        for stale in (companion(out, "spread"), manifest_path(companion(out, "spread"))):
            stale.unlink(missing_ok=True)
    paths = write_tables(rows, out, meta, agg=summary, pairs=pairs, **({"spread": spread} if len(spread) else {}))
    shown_points = first_sample(summary)
    figure = compare_figure(shown_points[shown_points["skip"] > 0], lm.num_layers, out.with_suffix(".png"))
    return CompareResult(rows=rows, path=paths["rows"], tables={"agg": summary, "pairs": pairs},
                         files={"agg": paths["agg"], "pairs": paths["pairs"], "figure": figure}, summary=summary, runs=runs,
                         shown=shown(rows, summary, cfg.model),
                         said=[*retain_rankings(spread),
                               f"wrote {paths['rows']}, {paths['agg']}, {paths['pairs']}, "
                               + (f"{paths['spread']}, " if "spread" in paths else "")
                               + f"{figure}; every point's lm-eval rows: {runs}"])


def shown(rows: pd.DataFrame, summary: pd.DataFrame, model: str) -> list[Shown]:
    """Per task, the score beside full depth's with their paired difference; per method and K, Retain %."""
    per_task = rows.assign(difference=[f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                       for d, lo, hi in zip(rows["diff"], rows["diff_lo"], rows["diff_hi"])])
    retain = summary.assign(retain=[f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, lo, hi in
                                    zip(summary["retain_pct"], summary["retain_lo"], summary["retain_hi"])])
    return [Shown(f"compare · {model} · per task (paired differences from full depth, 95%)",
                  per_task[["method", "skip", "task", "metric", "value", "full_value", "difference", "noisy_ratio",
                            "layers_mean", "attention_mean"]]),
            Shown(f"compare · {model} · Retain % (paired bootstrap 95% intervals)",
                  retain[["method", "skip", "retain", "noisy_tasks", "skipped", "skipped_unit", "layers_mean",
                          "attention_mean", *(["laco_forced_merges"] if "laco_forced_merges" in retain else [])]])]


RESAMPLES = 2000
INTERVAL = (f"95% percentile interval of a paired bootstrap over documents ({RESAMPLES} replicates): each replicate "
            "resamples every task's documents (a group's within each of its tasks), the same documents for every "
            "method and full depth, and recomputes each task's scores, ratios and Retain %")


def per_task(summary: pd.DataFrame, pts: list[Point]) -> pd.DataFrame:
    """lm-eval's main metric per task and point, beside the full model's: a row per method, K and task. Only the
    tasks asked for count (a group such as MMLU by its own aggregate, not once per subtask). A method with a
    baseline of its own (K=0: LayerSkip's fine-tuned model at full depth) carries it as `own_value`."""
    summary = summary[summary["top"].astype(bool)]
    full = summary[summary["policy_spec"] == "full"].set_index("task")
    by_label = {p.spec.label: p for p in pts}
    own = {(by_label[r.policy_spec].method, r.task): r.value for r in summary.itertuples()
           if r.policy_spec in by_label and by_label[r.policy_spec].skip == 0}
    rows = []
    for r in summary[summary["policy_spec"] != "full"].itertuples():
        p, f = by_label[r.policy_spec], full.loc[r.task]
        own_value = own.get((p.method, r.task), math.nan)
        rows.append({"method": p.method, "skip": p.skip, "calibration_seed": p.calibration_seed,
                     "calibration_of": p.calibration_of, "policy_spec": r.policy_spec, "task": r.task,
                     "metric": r.metric, "filter": r.filter, "value": r.value, "stderr": r.stderr, "lo": r.lo,
                     "hi": r.hi, "n": r.n, "full_value": f["value"], "full_lo": f["lo"], "full_hi": f["hi"],
                     "ratio": r.value / f["value"] if f["value"] else math.nan,
                     "own_value": own_value, "own_ratio": r.value / own_value if own_value else math.nan,
                     "layers_mean": r.layers_mean, "attention_mean": r.attention_mean,
                     "full_layers_mean": f["layers_mean"],
                     **{c: getattr(r, c) for c in POINT_COLUMNS if c in summary}})  # LaCo's forced merges
    out = pd.DataFrame(rows)
    if len(out):
        out["calibration_seed"] = pd.array(out["calibration_seed"], dtype="Int64")
    return out


@dataclass(frozen=True)
class Replicates:
    """Per task: the bootstrap replicates of every point's mean score, paired ([resamples, points]), and each
    point's column."""

    by_task: dict[str, np.ndarray]
    column: dict[str, int]  # policy_spec -> column ("full" included)


def replicates(table: pd.DataFrame, docs: pd.DataFrame, resamples: int = RESAMPLES, seed: int = 0) -> Replicates:
    """The paired bootstrap behind every interval of compare: per task, its documents resampled (a group's within
    each of its tasks, weighted as lm-eval averaged them), one draw for every point, so that differences and ratios
    between points are paired."""
    from skipbench.analysis.lmeval_tables import strata
    from skipbench.analysis.stats import group_weighting, stratified_means

    specs = ["full", *dict.fromkeys(table["policy_spec"])]
    by_task = {}
    for k, (task, g) in enumerate(table.groupby("task", sort=True)):
        parts = strata(docs, task, g["metric"].iloc[0], g["filter"].iloc[0], specs)
        if not parts:
            raise SkipbenchError(f"compare: no per-document scores of task '{task}' under every point (lm-eval logged "
                                 "none for its metric); its Retain % has no paired interval")
        weighting = group_weighting([p[:, 0] for p in parts], float(g["full_value"].iloc[0])) if len(parts) > 1 else "size"
        by_task[task] = stratified_means(parts, resamples, seed=seed * 1000 + k, weighting=weighting)
    return Replicates(by_task, {spec: j for j, spec in enumerate(specs)})


def with_task_intervals(table: pd.DataFrame, reps: Replicates) -> pd.DataFrame:
    """Per task and point: the paired difference from the full model with its interval, the ratio's interval, and
    how much the full model's score varies across replicates (its coefficient of variation; a ratio whose
    denominator varies more than NOISY_CV is flagged `noisy_ratio`)."""
    extra = []
    for r in table.itertuples():
        rep = reps.by_task[r.task]
        x, f = rep[:, reps.column[r.policy_spec]], rep[:, reps.column["full"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = x / f
        ratio = ratio[np.isfinite(ratio)]
        cv = float(f.std(ddof=1) / r.full_value) if r.full_value else math.nan
        extra.append({"diff": r.value - r.full_value, "diff_lo": float(np.quantile(x - f, 0.025)),
                      "diff_hi": float(np.quantile(x - f, 0.975)),
                      "ratio_lo": float(np.quantile(ratio, 0.025)) if len(ratio) else math.nan,
                      "ratio_hi": float(np.quantile(ratio, 0.975)) if len(ratio) else math.nan,
                      "full_cv": cv, "noisy_ratio": bool(cv > NOISY_CV)})
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(extra, index=range(len(table)))], axis=1)


def _retain_replicates(g: pd.DataFrame, reps: Replicates, denominator: str) -> np.ndarray:
    """Retain % per replicate for one method and K over the tasks in `g` (NaN where a task's denominator is 0; no
    task at all: no replicates)."""
    if g.empty:
        return np.full(0, np.nan)
    ratios = []
    for r in g.itertuples():
        rep = reps.by_task[r.task]
        den = rep[:, reps.column[getattr(r, denominator)]]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(den != 0, rep[:, reps.column[r.policy_spec]] / den, np.nan))
    return 100 * np.mean(ratios, axis=0)


def retain(table: pd.DataFrame, reps: Replicates) -> pd.DataFrame:
    """Per method and K: Retain % = 100 x the mean over tasks of score / full score, with the paired bootstrap's 95%
    interval (INTERVAL; a replicate in which some task's full score is 0 is left out, and counted); a task the full
    model scores 0 on has no ratio and is left out (`tasks` counts the ones in), and `noisy_tasks` counts the ratios
    flagged noisy. For a method with a baseline of its own (LayerSkip's fine-tuned model), `retain_own_pct` divides
    by that baseline instead. And what a token ran, averaged over tasks: layers, attention sub-layers, and the skip
    they realize against the full model's (MindSkip skips attention only: its layers stay at full depth)."""
    out = []
    full_specs = table.assign(full_spec="full")
    for (method, k), g in full_specs.groupby(["method", "skip"], sort=False):
        g = g.assign(attention_mean=g["attention_mean"].fillna(g["layers_mean"]))
        scored = g[g["full_value"] != 0]
        mean = float(scored["ratio"].mean()) if len(scored) else math.nan
        row = {"method": method, "skip": int(k), **{c: g[c].iloc[0] for c in ("calibration_seed", "calibration_of")
                                                     if c in g}, "tasks": len(scored),
               "noisy_tasks": int(scored["noisy_ratio"].sum()),
               "retain_pct": 100 * mean, **_interval(_retain_replicates(scored, reps, "full_spec"), "retain")}
        own = scored[scored["own_value"].notna() & (scored["own_value"] != 0)]
        if len(own) and k > 0:
            own_spec = next(s for s, c in reps.column.items() if s != "full" and
                            table[(table["method"] == method) & (table["skip"] == 0)]["policy_spec"].eq(s).any())
            row |= {"retain_own_pct": 100 * float(own["own_ratio"].mean()),
                    **_interval(_retain_replicates(own.assign(own_spec=own_spec), reps, "own_spec"), "retain_own")}
        layers = float((g["full_layers_mean"] - g["layers_mean"]).mean())
        attention = float((g["full_layers_mean"] - g["attention_mean"]).mean())
        only_attention = layers < 0.01 < attention  # MindSkip: its realized skip is in attention sub-layers
        row |= {c: g[c].dropna().iloc[0] for c in POINT_COLUMNS if c in g and g[c].notna().any()}  # how it was built
        out.append(row | {"layers_mean": float(g["layers_mean"].mean()), "attention_mean": float(g["attention_mean"].mean()),
                          "layers_skipped": layers, "attention_skipped": attention,
                          "skipped": attention if only_attention else layers,
                          "skipped_unit": "attention" if only_attention else "layers"})
    out = pd.DataFrame(out)
    if "calibration_seed" in out:
        out["calibration_seed"] = pd.array(out["calibration_seed"], dtype="Int64")
    return out


def _interval(values: np.ndarray, name: str) -> dict:
    kept = values[np.isfinite(values)]
    lo, hi = np.quantile(kept, [0.025, 0.975]) if len(kept) > 1 else (math.nan, math.nan)
    return {f"{name}_lo": float(lo), f"{name}_hi": float(hi), f"{name}_replicates_dropped": int(len(values) - len(kept))}


def matched_pairs(table: pd.DataFrame, summary: pd.DataFrame, reps: Replicates) -> pd.DataFrame:
    """Every two methods at the same K: the paired difference of their Retain % (first minus second) with its
    interval, and whether they realized the same skip (both in whole layers, within MATCHED_WITHIN of K): only matched
    pairs may be ordered, since a method that skipped fewer layers is not better for the same K."""
    scored = table[table["full_value"] != 0].assign(full_spec="full")
    at = summary.set_index(["method", "skip"])
    rows = []
    for k, g in scored[scored["skip"] > 0].groupby("skip"):
        methods = list(dict.fromkeys(g["method"]))
        values = {m: _retain_replicates(g[g["method"] == m], reps, "full_spec") for m in methods}
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                ra, rb = at.loc[(a, k)], at.loc[(b, k)]
                matched = all(r["skipped_unit"] == "layers" and abs(r["skipped"] - k) <= MATCHED_WITHIN for r in (ra, rb))
                diff = values[a] - values[b]
                rows.append({"skip": int(k), "method_a": a, "method_b": b,
                             "diff_pct": float(ra["retain_pct"] - rb["retain_pct"]), **_interval(diff, "diff"),
                             "skipped_a": float(ra["skipped"]), "skipped_b": float(rb["skipped"]), "matched": matched})
    return pd.DataFrame(rows, columns=["skip", "method_a", "method_b", "diff_pct", "diff_lo", "diff_hi",
                                       "diff_replicates_dropped", "skipped_a", "skipped_b", "matched"])
