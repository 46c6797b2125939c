"""`skipbench controllers train | sweep`: Gumbel skip controllers, hidden-state vs constant input.

train: controllers for one (input, alpha, seed), saved as safetensors + JSON (resumable).
sweep: train every (input, alpha, seed), evaluate each on held-out items (`evaluate --policy controller
--matched-random` plus a teacher-forced KL pass), then aggregate: Figure 1b (cost vs quality, hidden vs constant,
each beside the random control of the layers its runs realized), Figure 6 (per-layer skip ratio), a test of whether
the hidden state helps at matched cost, and each input against its random control.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from skipbench.data import DataSpec, load_items
from skipbench.engine.decode import eos_ids
from skipbench.errors import SkipbenchError
from skipbench.evaluation import quality as ev
from skipbench.store import readers
from skipbench.evaluation.fidelity import compare_to_full
from skipbench.analysis.stats import t_interval
from skipbench.models import load_model
from skipbench.policies.controller import (
    COST_TERMS, INPUTS, ControllerMethod, ControllerPolicy, Controllers, load_controllers,
)
from skipbench.store.results import (
    Shown, Written, check_out_dir, check_out_path, companion, manifest, manifest_path, tidy, write_tables,
)
from skipbench.training.loop import BACKBONE, TrainConfig, TrainResult, train


@dataclass(frozen=True, kw_only=True)
class ControllerTrainConfig:
    train: TrainConfig
    input: str = "hidden"
    alpha: float = 4.0
    tau: float = 1.0
    alpha_units: str = "fraction"  # see policies/controller.py: fraction (the authors' code) | sum


def run_train(cfg: ControllerTrainConfig, lm=None, progress: Callable | None = None, start: Callable | None = None) -> TrainResult:
    check_out_dir(cfg.train.out)
    lm = lm or load_model(cfg.train.model, cfg.train.device, cfg.train.dtype)
    hidden = lm.model.config.hidden_size
    torch.manual_seed(cfg.train.seed)  # the initial controllers depend on the seed alone
    method = ControllerMethod(Controllers(hidden, lm.num_layers, cfg.input), cfg.alpha, cfg.tau, cfg.alpha_units)
    return train(lm, method, cfg.train, progress, start)


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    train: TrainConfig  # model, training data (split train), steps, batch size, ...
    eval_data: DataSpec  # held-out items (split test)
    inputs: tuple[str, ...] = INPUTS
    alphas: tuple[float, ...] = (2.0, 4.0, 6.0, 10.0)
    num_seeds: int = 3
    tau: float = 1.0
    alpha_units: str = "fraction"
    gate: str = "sample"
    metric: str = "full_rougeL"  # the hidden-vs-constant test's quality: vs the full model's output, or vs references
    eval_max_new_tokens: int = 64
    matched_random: bool = True  # each run beside random-token skipping of the layers it realized (evaluate's control)
    out: str = ""


def run_dir(cfg: SweepConfig, input_kind: str, alpha: float, seed: int) -> Path:
    out = Path(cfg.out)
    return out.with_name(out.stem + ".runs") / f"{input_kind}-a{alpha:g}-s{seed}"


def run_sweep(cfg: SweepConfig, progress: Callable | None = None, start: Callable | None = None) -> SweepResult:
    out = check_out_path(cfg.out)
    bad = [i for i in cfg.inputs if i not in INPUTS]
    if bad or not cfg.alphas or cfg.num_seeds < 1:
        raise SkipbenchError(f"sweep needs inputs from {', '.join(INPUTS)}, at least one alpha and --num-seeds >= 1")
    if cfg.metric not in METRICS:
        raise SkipbenchError(f"--metric must be one of {', '.join(METRICS)}, got '{cfg.metric}'")
    for flag, limit in (("--train-limit", cfg.train.data.limit), ("--eval-limit", cfg.eval_data.limit)):
        if limit is not None and limit < 1:  # before the model loads and the runs' folder is made
            raise SkipbenchError(f"{flag} must be >= 0 (0: the whole split), got {limit}")
    lm = load_model(cfg.train.model, cfg.train.device, cfg.train.dtype)
    grid = [(i, a, s) for i in cfg.inputs for a in cfg.alphas for s in range(cfg.num_seeds)]
    Path(cfg.out).with_name(Path(cfg.out).stem + ".runs").mkdir(parents=True, exist_ok=True)
    if start:
        start(len(grid))
    frames, control_frames, layer_rows, notes = [], [], [], []
    for input_kind, alpha, seed in grid:
        folder = run_dir(cfg, input_kind, alpha, seed)
        tcfg = replace(cfg.train, seed=seed, out=str(folder), teacher_cache=str(folder.parent / "teacher.json"))
        # joint training changes the model's weights: every run starts from the original ones and is evaluated on
        # the backbone it trained (OUT/backbone), as `evaluate --model OUT/backbone` would
        run_lm = load_model(cfg.train.model, cfg.train.device, cfg.train.dtype) if cfg.train.train_backbone else lm
        trained = run_train(ControllerTrainConfig(train=tcfg, input=input_kind, alpha=alpha, tau=cfg.tau, alpha_units=cfg.alpha_units), run_lm)
        notes += [n for n in trained.notes if n not in notes]  # the same data in every run: say each thing once
        rows, control = evaluate_run(cfg, run_lm, folder, seed)
        for df in (rows, control):
            df["input"], df["alpha"], df["seed"] = input_kind, alpha, seed
        frames.append(rows)
        control_frames.append(control)
        use = np.stack(rows["layer_use"].to_numpy()).sum(0) / max(1, rows["skipped_tokens"].sum())
        layer_rows += [{"input": input_kind, "alpha": alpha, "seed": seed, "layer": l, "skip_ratio": 1 - u}
                       for l, u in enumerate(use)]
        if progress:
            progress(1)
    items = tidy(pd.concat(frames, ignore_index=True), cfg, lm=lm)
    layers = pd.DataFrame(layer_rows)
    controls = pd.concat(control_frames, ignore_index=True)
    controls = tidy(controls, cfg, lm=lm) if len(controls) else controls
    agg = aggregate(items)
    if len(controls):  # each input's controls as a series of their own ("random (hidden)"), beside the controllers
        agg = pd.concat([agg, aggregate(controls.assign(input="random (" + controls["input"] + ")"))], ignore_index=True)
    test = compare_inputs(items, cfg.metric)
    exception = compare_inputs(items, cfg.metric, window=exception_window(lm.num_layers))
    against = versus_controls(items, controls, cfg.metric)
    meta = manifest(cfg, lm=lm, comparison=test, exception=exception, versus_control=against, notes=notes,
                    confidence_interval="95% t-interval over seed means (per input, alpha)",
                    alpha_units=cfg.alpha_units, cost_term=COST_TERMS[cfg.alpha_units])
    from skipbench.analysis.plots import controller_figures

    out.parent.mkdir(parents=True, exist_ok=True)
    figures = controller_figures(agg, layers, lm.num_layers, out.with_name(out.stem))
    if not len(controls):  # the controls of an earlier run with them are not this run's
        for stale in (companion(out, "controls"), manifest_path(companion(out, "controls"))):
            stale.unlink(missing_ok=True)
    paths = write_tables(items, out, meta, layers=layers, agg=agg, **({"controls": controls} if len(controls) else {}))
    from skipbench.analysis import verdicts

    shown = agg[["input", "alpha", "seeds", "layers_mean", "rougeL", "full_rougeL", "kl"]]
    lines = [verdicts.line(v).replace("**", "") for v in verdicts.controllers(test, exception)]
    lines += [verdicts.control_line(i, c) for i, c in against.items()]
    return SweepResult(rows=items, path=paths.pop("rows"), tables={"agg": agg, "layers": layers, "controls": controls},
                       files=paths | {f"figure{n}": f for n, f in enumerate(figures)}, comparison=test,
                       exception=exception, notes=notes,
                       shown=[Shown(f"controllers · {cfg.train.model} · {cfg.train.data.name} (means over seeds; CIs in "
                                    "-agg)", shown)],
                       said=[f"hidden vs constant at matched cost ({test['test']}):", *lines, f"wrote {out}"])


@dataclass(kw_only=True)
class SweepResult(Written):
    """rows: one per (input, alpha, seed, item); tables: agg (per input and alpha), layers (skip ratio per layer)."""

    comparison: dict  # hidden vs constant at matched cost (compare_inputs)
    exception: dict  # the same near 2L/3 executed layers only (App. A.4.3)
    notes: list[str]


def evaluate_run(cfg: SweepConfig, lm, folder: Path, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generation quality (evaluate) and teacher-forced KL of one trained controller on held-out items; and the
    rows of its matched random control (`evaluate --matched-random`: random-token skipping of the layers per token
    the controller realized on these items; empty without `matched_random`, or where no random plan matches)."""
    from skipbench.policies import PolicySpec

    spec = PolicySpec(name="controller", arg=str(folder), gate=cfg.gate, seed=seed)
    model = str(folder / BACKBONE) if cfg.train.train_backbone else cfg.train.model  # jointly trained: its own backbone
    ecfg = ev.EvalConfig(model=model, data=cfg.eval_data, policies=(spec,), seed=0,
                         max_new_tokens=cfg.eval_max_new_tokens, device=cfg.train.device,
                         dtype=cfg.train.dtype, out=str(folder / "eval.parquet"), matched_random=cfg.matched_random)
    every = ev.run(ecfg, lm=lm).rows
    every = every.assign(tokens=every["layers_per_token"].map(len))  # generated tokens: pools layers per token
    rows = every[every["policy"] == "controller"].copy()
    rows["kl"] = rows["item_id"].map(kl_per_item(cfg, lm, folder, seed, rows))
    control = every[every["matched_to"].notna()].rename(columns={"policy_spec": "control"})
    control = control.assign(kl=np.nan)  # the teacher-forced KL is the controllers' alone
    columns = ["item_id", "subtask", "layers_mean", "tokens", "rougeL", "full_rougeL", "kl"]
    return (rows[columns[:4] + ["layer_use", "skipped_tokens"] + columns[4:]],
            control[columns + ["control"]].reset_index(drop=True))


def kl_per_item(cfg: SweepConfig, lm, folder: Path, seed: int, rows: pd.DataFrame) -> dict:
    """KL(p_full || p_controller) averaged over the full model's response tokens, per item."""
    items = {it.item_id: it for it in load_items(cfg.eval_data)}
    full_out = readers.table(folder / "eval.parquet", "controller evaluation", "rerun the sweep to compute it again")
    full_out = full_out[full_out["policy"] == "full"].set_index("item_id")["output"]
    controllers, meta = load_controllers(str(folder))
    policy = ControllerPolicy(controllers, cfg.gate, seed, meta.get("tau", 1.0))
    from skipbench.data.prompts import encode_prompt

    stops, out = eos_ids(lm), {}
    responses = {i: [t for t in lm.tokenizer(full_out[i], add_special_tokens=False)["input_ids"] if t not in stops]
                 for i in rows["item_id"] if i in items}
    ids = [i for i, r in responses.items() if r]  # an empty full response leaves nothing to compare (KL NaN)
    for s in range(0, len(ids), 8):
        chunk = ids[s : s + 8]
        prompts = [encode_prompt(lm.tokenizer, items[i].prompt) for i in chunk]
        resp = [responses[i] for i in chunk]
        for _, m in compare_to_full(lm, prompts, resp, [items[i].key for i in chunk], [("c", policy)]):
            for r, i in enumerate(chunk):
                out[i] = float(m["kl_next"][r, : len(resp[r])].mean())
    return out


def aggregate(items: pd.DataFrame) -> pd.DataFrame:
    """Per (input, alpha): means with 95% t-intervals over seeds (each seed: its mean over items)."""
    per_seed = items.groupby(["input", "alpha", "seed"])[["layers_mean", "rougeL", "full_rougeL", "kl"]].mean().reset_index()
    rows = []
    for (input_kind, alpha), g in per_seed.groupby(["input", "alpha"]):
        row = {"input": input_kind, "alpha": alpha, "seeds": len(g)}
        for m in ("layers_mean", "rougeL", "full_rougeL", "kl"):
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = t_interval(g[m].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)


METRICS = ("full_rougeL", "rougeL")


def exception_window(num_layers: int) -> tuple[float, float]:
    """App. A.4.3's exception, near 16 of 24 executed layers: 2L/3 +- L/12 (14-18 of 24, 17.5-22.5 of 30)."""
    return 2 * num_layers / 3 - num_layers / 12, 2 * num_layers / 3 + num_layers / 12


def versus_controls(items: pd.DataFrame, controls: pd.DataFrame, metric: str = "full_rougeL") -> dict:
    """Per input: does a trained controller beat random skipping of the layers it realized? Each training run is one
    unit: its mean over the items both ran of (controller - control); a 95% t-interval over the runs, and per alpha
    over its seeds. The layers per token beside them are pooled over each side's generated tokens (what the control
    was matched on), averaged over the runs; `without_control` counts the runs that got none (every layer run, or
    fewer than 2)."""
    if not len(controls):
        return {}
    keys = ["input", "alpha", "seed", "item_id"]
    both = items[keys + [metric, "layers_mean", "tokens"]].merge(
        controls[keys + [metric, "layers_mean", "tokens"]], on=keys, suffixes=("", "_control"))
    both = both.dropna(subset=[metric, f"{metric}_control"])
    both["diff"] = both[metric] - both[f"{metric}_control"]
    for side in ("", "_control"):  # token-weighted: a run's layers per token pooled over its tokens
        both[f"layer_tokens{side}"] = both[f"layers_mean{side}"] * both[f"tokens{side}"]
    runs = both.groupby(["input", "alpha", "seed"]).sum(numeric_only=True).reset_index()
    runs["diff"] = both.groupby(["input", "alpha", "seed"])["diff"].mean().to_numpy()
    for side in ("", "_control"):
        runs[f"layers{side}"] = runs[f"layer_tokens{side}"] / runs[f"tokens{side}"].clip(lower=1)
    trained = items.groupby("input")[["alpha", "seed"]].apply(lambda g: len(g.drop_duplicates()))
    out = {}
    for input_kind, g in runs.groupby("input"):
        diff, lo, hi = t_interval(g["diff"].to_numpy())
        per_alpha = []
        for alpha, a in g.groupby("alpha"):
            d, l, h = t_interval(a["diff"].to_numpy())
            per_alpha.append({"alpha": float(alpha), "diff": d, "lo": l, "hi": h, "runs": len(a),
                              "layers": float(a["layers"].mean()), "control_layers": float(a["layers_control"].mean())})
        out[input_kind] = {"metric": metric, "diff": diff, "lo": lo, "hi": hi, "runs": len(g),
                           "layers": float(g["layers"].mean()), "control_layers": float(g["layers_control"].mean()),
                           "without_control": int(trained.get(input_kind, len(g)) - len(g)), "by_alpha": per_alpha,
                           "unit": "training run (its mean over items)"}
    return out


def compare_inputs(items: pd.DataFrame, metric: str = "full_rougeL", margin: float | None = None,
                   window: tuple[float, float] | None = None) -> dict:
    """Does the hidden-state input help at matched cost? Each training run (input, alpha, seed) is one unit:
    its items are averaged first, so items of one run are not counted as independent evidence. An OLS over
    runs of the run-mean metric on the run-mean executed layers plus a hidden-input indicator (an ANCOVA);
    the indicator's coefficient with its 95% interval, and a guide to the runs per input an equivalence verdict needs.
    `window` (lo, hi): only the runs whose mean executed layers lie in it (App. A.4.3's exception)."""
    from skipbench.analysis.stats import ols_effect, runs_to_resolve
    from skipbench.analysis.verdicts import MARGINS

    margin = MARGINS["rougeL"] if margin is None else margin
    runs = items.dropna(subset=[metric, "layers_mean"]).groupby(["input", "alpha", "seed"])[[metric, "layers_mean"]].mean()
    runs = runs.reset_index()
    test = f"OLS over training runs: run-mean {metric} ~ 1 + run-mean layers + hidden (a run is one unit)"
    if window is not None:
        runs = runs[runs["layers_mean"].between(*window)]
        test += f", the runs at {window[0]:g}-{window[1]:g} executed layers"
    if runs["input"].nunique() < 2:
        return {"test": test, "note": "needs both inputs", "runs": len(runs)}
    X = np.column_stack([np.ones(len(runs)), runs["layers_mean"].to_numpy(), (runs["input"] == "hidden").to_numpy(float)])
    if np.linalg.matrix_rank(X) < 3:
        return {"test": test, "note": "executed layers do not vary apart from the input: no matched-cost comparison",
                "runs": len(runs)}
    eff = ols_effect(runs[metric].to_numpy(), X, 2)
    return {"test": test, "metric": metric, "unit": "training run", "runs": len(runs), "window": window,
            "runs_per_input": runs.groupby("input").size().to_dict(), "hidden_effect": eff["effect"],
            "lo": eff["lo"], "hi": eff["hi"], "std_error": eff["std_error"], "dof": eff["dof"],
            "p_value": eff.get("p_value"), "residual_sd": eff["residual_sd"], "margin": margin,
            "runs_needed_per_input": runs_to_resolve(eff["std_error"], len(runs), eff["effect"], margin)}
