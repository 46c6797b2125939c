"""`skipbench bench-oracle`: the exact sequence-level knapsack (the oracle's solver, analysis/knapsack.py) vs scipy's
HiGHS MILP on the same instance, in one process.

The instance mimics per-item ROUGE-L of uniform-skipping models: item difficulty from Beta(2, 2), a
quality factor rising with cost, and noise; `--metric binary` draws 0/1 scores (exact match), the
tie-heavy case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from skipbench.errors import SkipbenchError
from skipbench.analysis.knapsack import Instance, solve
from skipbench.store.results import Shown, Written


@dataclass(frozen=True, kw_only=True)
class KnapsackBenchConfig:
    items: int = 7800
    costs: tuple[int, ...] = (4, 8, 12, 24)
    metric: str = "rouge"  # rouge | binary
    highs_budgets: tuple[float, ...] = (6.0, 10.0, 16.0)
    big_items: int = 1_000_000
    seed: int = 0


def instance(n: int, costs: tuple[int, ...], metric: str, seed: int) -> Instance:
    rng = np.random.default_rng(seed)
    quality = np.asarray(costs, dtype=float) / max(costs)
    if metric == "binary":
        return Instance((rng.random((n, len(costs))) < 0.15 + 0.6 * quality).astype(float), costs)
    base = rng.beta(2, 2, n)[:, None]
    values = np.clip(base * (0.3 + 0.7 * quality) + rng.normal(0, 0.1, (n, len(costs))), 0, 1)
    return Instance(values, costs)


def highs(inst: Instance, budget: float) -> float:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, identity, kron

    n, k = inst.V.shape
    one_each = LinearConstraint(kron(identity(n), np.ones((1, k))), 1, 1)
    budget_row = LinearConstraint(csr_matrix(inst.C.ravel()[None, :].astype(float)), -np.inf, n * budget)
    res = milp(-inst.V.ravel(), constraints=[one_each, budget_row], integrality=np.ones(n * k), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    return -res.fun / n


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(cfg: KnapsackBenchConfig) -> Written:
    if cfg.items < 1 or cfg.big_items < 0 or not cfg.costs or min(cfg.costs) < 1:
        raise SkipbenchError("bench-oracle needs --items >= 1, --big-items >= 0 and costs >= 1")
    inst = instance(cfg.items, cfg.costs, cfg.metric, cfg.seed)
    grid = list(range(min(cfg.costs), max(cfg.costs) + 1))
    rows = []
    _, curve_s = _timed(lambda: [solve(inst, b) for b in grid])
    rows.append({"what": f"oracle curve ({len(grid)} budgets, assignments)", "items": cfg.items, "seconds": curve_s})
    for b in cfg.highs_budgets:
        sol, ours = _timed(lambda: solve(inst, b))
        ref, theirs = _timed(lambda: highs(inst, b))
        rows.append({"what": f"budget {b:g}: oracle", "items": cfg.items, "seconds": ours, "value": sol.value, "exact": sol.exact})
        rows.append({"what": f"budget {b:g}: HiGHS milp", "items": cfg.items, "seconds": theirs, "value": ref,
                     "speedup": theirs / ours, "same_value": abs(ref - sol.value) <= 1e-9})
    if cfg.big_items:
        big = instance(cfg.big_items, cfg.costs, cfg.metric, cfg.seed + 1)
        for b in (6.0, 12.0):
            sol, secs = _timed(lambda: solve(big, b))
            rows.append({"what": f"budget {b:g}: oracle", "items": cfg.big_items, "seconds": secs, "value": sol.value,
                         "exact": sol.exact, "gap": sol.gap, "core": sol.core})
    df = pd.DataFrame(rows)
    return Written(rows=df, shown=[Shown(f"bench-oracle · {cfg.metric} · costs {','.join(map(str, cfg.costs))}",
                                         _table(df), {"mean value": "{:.6f}"}, width=120)])


def _table(df: pd.DataFrame) -> pd.DataFrame:
    """Each timing with what it says: the speed ratio to the oracle and whether both found the same value, or
    whether the solution is exact (else its certified gap)."""
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
    return pd.DataFrame(rows)
