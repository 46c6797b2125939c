"""`skipbench oracle`: the exact knapsack oracle and the greedy oracle over per-item scores of K configurations.

Reads `evaluate` parquet (one or several files); a configuration is a (policy, cost) pair, its cost the
nominal layer count. Budgets below the cheapest configuration are an error; budgets above the dearest
give the per-item best assignment (the constraint no longer binds), with a note.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.errors import SkipbenchError
from skipbench.oracle import Instance, greedy, smallest_budget_reaching, solve
from skipbench.results import manifest, run_id, write_atomic

LENGTH_BIN, LENGTH_BINS = 15, 11


@dataclass(frozen=True)
class OracleConfig:
    runs: tuple[str, ...] = ()  # empty: every results/evaluate-*.parquet
    metric: str = "rougeL"
    budget: float | None = None
    curve: bool = False
    budgets: tuple[float, ...] = ()  # the curve's grid (default: every integer from cheapest to dearest)
    policies: tuple[str, ...] = ()  # keep only these policies (default: all)
    out: str | None = None
    max_cells: float = 2e8


@dataclass
class OracleResult:
    table: pd.DataFrame  # one row per (budget, method)
    assignment: pd.DataFrame  # one row per (budget, item): oracle and greedy configuration
    configs: list[str]
    costs: list[int]
    full: str
    star: float | None
    length_test: dict | None
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def load_scores(cfg: OracleConfig) -> tuple[pd.DataFrame, list[str]]:
    paths = list(cfg.runs) or sorted(glob.glob("results/evaluate-*.parquet"))
    if not paths:
        raise SkipbenchError("no evaluate results under results/; produce them with: "
                             "skipbench evaluate --policy uniform --costs 8,15,22")
    frames = []
    for p in paths:
        if not Path(p).is_file():
            raise SkipbenchError(f"--runs file not found: {p}")
        frames.append(pd.read_parquet(p))
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in ("item_id", "cost", cfg.metric) if c not in df.columns]
    if missing:
        raise SkipbenchError(f"--runs lacks column(s) {', '.join(missing)}; columns found: {', '.join(df.columns)}")
    if {"model", "dataset"} <= set(df.columns) and len(df[["model", "dataset"]].drop_duplicates()) > 1:
        pairs = ", ".join(f"{m}/{d}" for m, d in df[["model", "dataset"]].drop_duplicates().itertuples(index=False))
        raise SkipbenchError(f"--runs mixes models/datasets ({pairs}); pass the files of one with --runs")
    if "policy" not in df.columns:
        df["policy"] = "config"
    if cfg.policies:
        df = df[df["policy"].isin(cfg.policies) | (df["policy"] == "full")]
    df = df.dropna(subset=[cfg.metric])
    if df.empty:
        raise SkipbenchError(f"no rows with a value for metric '{cfg.metric}'")
    df["config"] = df["policy"].astype(str) + ":" + df["cost"].astype(int).astype(str)
    notes = []
    dup = df.duplicated(["config", "item_id"]).sum()
    if dup:
        notes.append(f"{dup} repeated (configuration, item) rows were averaged")
    return df, notes


def pivot(df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str], list[int], list[str]]:
    wide = df.pivot_table(index="item_id", columns="config", values=metric, aggfunc="mean")
    costs_of = df.groupby("config")["cost"].first().astype(int)
    configs = sorted(wide.columns, key=lambda c: (costs_of[c], c))
    wide = wide[configs]
    notes = []
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        notes.append(f"{int(incomplete.sum())} item(s) missing from some configuration were dropped")
        wide = wide[~incomplete]
    if wide.empty:
        raise SkipbenchError("no item is scored under every configuration")
    return wide, configs, [int(costs_of[c]) for c in configs], notes


def run(cfg: OracleConfig) -> OracleResult:
    if cfg.budget is None and not cfg.curve:
        raise SkipbenchError("give --budget B (mean layers per token) or --curve")
    df, notes = load_scores(cfg)
    wide, configs, costs, more = pivot(df, cfg.metric)
    notes += more
    inst = Instance(wide.to_numpy(), costs)
    full = next((c for c in configs if c.startswith("full:")), configs[-1])
    grid = sorted(set(cfg.budgets or (range(min(costs), max(costs) + 1) if cfg.curve else ())) | (
        {cfg.budget} if cfg.budget is not None else set()))
    for b in grid:
        if b < min(costs):
            raise SkipbenchError(f"budget {b} is below the cheapest configuration's cost ({min(costs)})")
        if b > max(costs):
            notes.append(f"budget {b} is above the dearest configuration ({max(costs)}): every item takes its best")
    rows, assign = [], []
    singles = {c: float(wide[c].mean()) for c in configs}
    for b in grid:
        sols = {"oracle": solve(inst, b, cfg.max_cells), "greedy": greedy(inst, b)}
        for method, sol in sols.items():
            share = np.bincount(sol.choice, minlength=len(configs)) / inst.n
            rows.append({"budget": b, "method": method, "value": sol.value, "mean_cost": sol.mean_cost,
                         "exact": sol.exact, "gap": sol.gap, "core_items": sol.core,
                         **{f"share:{c}": s for c, s in zip(configs, share)}})
        for c, cost in zip(configs, costs):
            if cost <= b:
                rows.append({"budget": b, "method": f"single:{c}", "value": singles[c], "mean_cost": float(cost),
                             "exact": True, "gap": 0.0, "core_items": 0})
        assign.append(pd.DataFrame({"budget": b, "item_id": wide.index,
                                    "oracle": [configs[k] for k in sols["oracle"].choice],
                                    "greedy": [configs[k] for k in sols["greedy"].choice]}))
    table = pd.DataFrame(rows)
    assignment = pd.concat(assign, ignore_index=True)
    star = smallest_budget_reaching(inst, singles[full]) if cfg.curve else None
    test_budget = cfg.budget if cfg.budget is not None else star
    length = length_test(df, wide, assignment, test_budget) if test_budget is not None else None
    result = OracleResult(table, assignment, configs, costs, full, star, length, notes)
    if cfg.out:
        result.path = write(cfg, result)
    return result


def length_test(df: pd.DataFrame, wide: pd.DataFrame, assignment: pd.DataFrame, budget: float) -> dict | None:
    """App. A.5.2: chi-square test of homogeneity of the oracle's selection across label-length bins."""
    from scipy.stats import chi2_contingency

    if budget not in set(assignment["budget"]):
        return None
    if "reference_tokens" in df.columns:
        lengths, unit = df.groupby("item_id")["reference_tokens"].first(), "tokens"
    elif "reference" in df.columns:
        lengths, unit = df.groupby("item_id")["reference"].first().str.split().str.len(), "words"
    else:
        return None
    pick = assignment[assignment["budget"] == budget].set_index("item_id")["oracle"]
    bins = np.minimum(lengths.reindex(pick.index).to_numpy() // LENGTH_BIN, LENGTH_BINS - 1)
    table = pd.crosstab(bins, pick.to_numpy())
    table = table.loc[table.sum(axis=1) > 0, table.sum(axis=0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return {"budget": budget, "statistic": None, "p_value": None, "dof": 0, "unit": unit,
                "note": "selection or lengths do not vary: nothing to test"}
    res = chi2_contingency(table.to_numpy())
    return {"budget": budget, "statistic": float(res.statistic), "p_value": float(res.pvalue), "dof": int(res.dof),
            "unit": unit, "bins": int(table.shape[0]), "bin_width": LENGTH_BIN}


def write(cfg: OracleConfig, result: OracleResult) -> Path:
    out = Path(cfg.out)
    table = result.table.copy()
    table.insert(0, "run_id", run_id(cfg))
    table["metric"] = cfg.metric
    meta = manifest(cfg, None, configs=result.configs, costs=result.costs, full=result.full, star_budget=result.star,
                    length_test=result.length_test, notes=result.notes,
                    solver="Lagrangian bound + reduced-cost fixing + exact DP over the core (skipbench.oracle)")
    path = write_atomic(table, out, meta)
    write_atomic(result.assignment, out.with_name(out.stem + "-assign.parquet"))
    if cfg.curve:
        from skipbench.plots import oracle_figures

        oracle_figures(result, cfg.metric, out.with_name(out.stem))
    return path
