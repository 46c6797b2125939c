"""Invariant 6: the knapsack oracle is exact (brute force, HiGHS); greedy never beats it; end to end from evaluate."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.experiments.oracle_bench import highs, instance
from skipbench.oracle import Instance, greedy, smallest_budget_reaching, solve


def brute_force(V, costs, budget):
    n, k = V.shape
    best = -np.inf
    for a in itertools.product(range(k), repeat=n):
        if costs[list(a)].sum() <= n * budget + 1e-9:
            best = max(best, V[np.arange(n), list(a)].mean())
    return best


def test_oracle_equals_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n, k = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        costs = np.sort(rng.choice([2, 3, 4, 6, 8, 12, 24], k, replace=False))
        V = rng.random((n, k)).round(int(rng.choice([1, 2, 6])))  # rounding makes ties common
        budget = float(rng.uniform(costs.min(), costs.max()))
        sol = solve(Instance(V, costs), budget)
        assert sol.exact and sol.value == pytest.approx(brute_force(V, costs, budget), abs=1e-12)
        assert sol.mean_cost <= budget + 1e-9


@pytest.mark.parametrize("metric", ["rouge", "binary"])
def test_oracle_equals_highs_on_medium_instances(metric):
    inst = instance(300, (4, 8, 12, 24), metric, seed=3)
    for budget in (4.5, 6, 9.3, 15, 23):
        sol = solve(inst, budget)
        assert sol.exact and sol.value == pytest.approx(highs(inst, budget), abs=1e-9)


def test_greedy_never_above_oracle_and_endpoints():
    inst = instance(500, (4, 8, 12, 24), "rouge", seed=1)
    for b in range(4, 25):
        assert greedy(inst, b).value <= solve(inst, b).value + 1e-12
    cheapest = inst.V[:, 0].mean()
    assert solve(inst, 4).value == pytest.approx(cheapest) and greedy(inst, 4).value == pytest.approx(cheapest)
    per_item_best = inst.V.max(1).mean()
    assert solve(inst, 24).value == pytest.approx(per_item_best) and greedy(inst, 24).value == pytest.approx(per_item_best)


def test_star_is_the_smallest_budget_reaching_the_target():
    inst = instance(200, (4, 8, 12, 24), "rouge", seed=2)
    target = inst.V[:, -1].mean()
    star = smallest_budget_reaching(inst, target)
    assert solve(inst, star).value >= target - 1e-12
    assert solve(inst, star - inst.g / inst.n).value < target


def test_budget_below_cheapest_is_an_error():
    with pytest.raises(SkipbenchError, match="below the cheapest"):
        solve(Instance(np.ones((3, 2)), [4, 8]), 3.9)


def test_oracle_cli_end_to_end_from_evaluate(tiny_dirs, tmp_path):
    runner = CliRunner()
    ev = tmp_path / "eval.parquet"
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--limit", "8",
                              "--policy", "uniform", "--costs", "2,3,4", "--max-new-tokens", "8", "--out", str(ev)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "oracle.parquet"
    res = runner.invoke(app, ["oracle", "--runs", str(ev), "--curve", "--budget", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out)
    evals = pd.read_parquet(ev)
    assert set(table["budget"]) == {2, 3, 4, 5, 6}
    oracle = table[table["method"] == "oracle"].set_index("budget")["value"]
    greedy_v = table[table["method"] == "greedy"].set_index("budget")["value"]
    assert (greedy_v <= oracle + 1e-12).all() and oracle.is_monotonic_increasing
    # the oracle recomputed from the evaluate rows by brute force at budget 3 (8 items, 4 configurations)
    wide = evals.pivot_table(index="item_id", columns=["policy", "cost"], values="rougeL")
    costs = np.array([c for _, c in wide.columns])
    assert oracle[3] == pytest.approx(brute_force(wide.to_numpy(), costs, 3), abs=1e-12)
    assign = pd.read_parquet(tmp_path / "oracle-assign.parquet")
    assert len(assign) == 5 * 8
    for png in ("oracle-fig2.png", "oracle-fig8.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["full"] == "full:6" and "length_test" in meta


def test_oracle_cli_errors(tmp_path):
    runner = CliRunner()
    df = pd.DataFrame({"item_id": ["a", "b", "a", "b"], "cost": [4, 4, 8, 8], "rougeL": [0.1, 0.2, 0.3, 0.4]})
    df.to_parquet(tmp_path / "r.parquet")
    res = runner.invoke(app, ["oracle", "--runs", str(tmp_path / "r.parquet"), "--budget", "2"])
    assert res.exit_code == 1 and "below the cheapest" in res.stderr
    res = runner.invoke(app, ["oracle", "--runs", str(tmp_path / "r.parquet"), "--budget", "5", "--metric", "bleu"])
    assert res.exit_code == 1 and "lacks column(s) bleu" in res.stderr
    res = runner.invoke(app, ["oracle", "--runs", str(tmp_path / "r.parquet"), "--budget", "6"])
    assert res.exit_code == 0 and "0.250" in res.stdout  # (0.3 + 0.2) / 2: one item may take cost 8


def test_missing_items_are_dropped_with_a_count(tmp_path):
    from skipbench.experiments.oracle import OracleConfig, run

    df = pd.DataFrame({"item_id": ["a", "b", "c", "a", "b"], "cost": [4, 4, 4, 8, 8], "rougeL": [0.1, 0.2, 0.9, 0.3, 0.4]})
    df.to_parquet(tmp_path / "r.parquet")
    res = run(OracleConfig(runs=(str(tmp_path / "r.parquet"),), budget=6))
    assert any("1 item(s) missing" in n for n in res.notes)
