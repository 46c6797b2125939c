"""Invariant 6: the knapsack oracle is exact (brute force, HiGHS); greedy never beats it; end to end from evaluate."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.experiments.bench_knapsack import highs, instance
from skipbench.analysis.knapsack import Instance, greedy, smallest_budget_reaching, solve


def brute_force(V, costs, budget):
    """costs [K], or [n, K] per item and configuration."""
    n, k = V.shape
    C = np.broadcast_to(np.asarray(costs, dtype=float), V.shape)
    best = -np.inf
    for a in itertools.product(range(k), repeat=n):
        if C[np.arange(n), list(a)].sum() <= n * budget + 1e-9:
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


def test_oracle_with_per_item_costs_equals_brute_force():
    """A dynamic policy's configuration costs each item its realized mean layers (fractional): still exact."""
    rng = np.random.default_rng(1)
    for _ in range(150):
        n, k = int(rng.integers(1, 8)), int(rng.integers(1, 5))
        C = rng.integers(200, 2400, size=(n, k)) / 100  # layers, on the oracle's grid of 1/100: exact
        if rng.random() < 0.5:
            C += rng.random((n, k)) / 100  # off the grid: rounded up, so the answer is feasible in the true costs
        V = rng.random((n, k)).round(int(rng.choice([1, 2, 6])))
        inst = Instance(V, C)
        rounded = np.ceil(C * 100 - 1e-9) / 100
        budget = float(rng.uniform(inst.cheapest(), rounded.max()))
        sol = solve(inst, budget)
        assert sol.exact and sol.value == pytest.approx(brute_force(V, rounded, budget), abs=1e-12)
        assert sol.mean_cost <= budget + 1e-9
        g = greedy(inst, budget)  # Eq. 4 per item; an item with nothing that cheap takes its cheapest
        for i in range(n):
            fits = [j for j in range(k) if rounded[i, j] <= budget + 1e-9]
            best = max(fits, key=lambda j: V[i, j]) if fits else int(np.argmin(rounded[i]))
            assert V[i, g.choice[i]] == V[i, best]


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
    assert len(assign[assign["budget"].isin([2, 3, 4, 5, 6])]) == 5 * 8
    for png in ("oracle-fig2.png", "oracle-fig8.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["full"] == "full:6" and meta["source"]["model"]["family"] == "llama"
    assert meta["source"]["model"]["num_layers"] == 6 and meta["source"]["datasets"] == ["text"]
    tested = {t["budget"]: t for t in meta["length_tests"]}
    assert 3.0 in tested and meta["star_budget"] in tested  # at --budget and at the star


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


def _group_runs(dataset, policy, scores, cost=2, split="test"):
    return pd.DataFrame({"item_id": ["a", "b"] * 2, "policy": [policy] * 2 + ["full"] * 2, "cost": [cost] * 2 + [8] * 2,
                         "rougeL": scores, "model": "m", "dataset": dataset, "split": split})


def test_runs_of_several_datasets_are_solved_apart(tmp_path):
    """Each (model, dataset, split) gets its own oracle, file and manifest source; a group with only full depth among
    the chosen policies is left out with a note; a full-depth run read twice (it is in every file) is not
    'averaged'; a missing grouping column is a group of its own, not lost."""
    from skipbench.experiments.oracle import OracleConfig, run, run_groups

    _group_runs("x", "uniform", [0.1, 0.9, 0.5, 0.5]).to_parquet(tmp_path / "x-uniform.parquet")
    _group_runs("x", "early-exit", [0.0, 0.0, 0.5, 0.5]).to_parquet(tmp_path / "x-early.parquet")
    _group_runs("y", "uniform", [0.7, 0.2, 0.3, 0.6]).to_parquet(tmp_path / "y-uniform.parquet")
    _group_runs("z", "early-exit", [0.1, 0.1, 0.4, 0.4]).to_parquet(tmp_path / "z-early.parquet")
    _group_runs("w", "uniform", [0.2, 0.4, 0.3, 0.3]).drop(columns=["split"]).to_parquet(tmp_path / "w-nosplit.parquet")
    for d in "xyz":
        (tmp_path / f"{d}-uniform.json").write_text(json.dumps({"model": {"name": "m"},
                                                                "config": {"data": {"name": d, "split": "test"}}}))
    files = tuple(str(p) for p in sorted(tmp_path.glob("*.parquet")))
    results, notes = run_groups(OracleConfig(runs=files, budget=5, policies=("uniform",), bootstrap=0,
                                             out=str(tmp_path / "out" / "o.parquet")))
    assert [dict(r.group)["dataset"] for r in results] == ["w", "x", "y"]
    w, x, y = results
    assert dict(w.group)["split"] == "?"
    # budget 5 of (2, 8): one of the two items runs at full depth
    assert x.table.set_index("method").loc["oracle", "value"] == pytest.approx((0.9 + 0.5) / 2)
    assert y.table.set_index("method").loc["oracle", "value"] == pytest.approx((0.7 + 0.6) / 2)
    assert notes == ["m/z/test left out: no configuration besides full depth among the chosen policies and costs"]
    assert not any("averaged" in n for r in results for n in r.notes)
    assert [Path(r.path).name for r in results] == ["o-w-na.parquet", "o-x-test.parquet", "o-y-test.parquet"]
    written = pd.read_parquet(y.path)
    assert set(written["dataset"]) == {"y"} and set(written["model"]) == {"m"}
    assert json.loads(Path(y.path).with_suffix(".json").read_text())["source"]["datasets"] == ["y"]
    with pytest.raises(SkipbenchError, match="mixes models/datasets/splits"):
        run(OracleConfig(runs=files, budget=5))
    with pytest.raises(SkipbenchError, match="nothing to solve"):
        run_groups(OracleConfig(runs=(files[-1],), budget=5, policies=("uniform",)))


SHARE = r"^ *([a-z-]+:\d+) +[0-9.]+ +[0-9.]+ *$"  # a row of the plain (piped) table of shares per configuration


def test_with_no_runs_the_paper_configurations_of_every_evaluate_result(tmp_path, monkeypatch):
    """`skipbench oracle --budget B` alone: every results/evaluate-*.parquet but companions, uniform skipping at
    1/6, 1/3 and 1/2 of the depth (5, 10, 15 of 30) and full depth; other costs and policies only when named."""
    rng = np.random.default_rng(0)
    results = tmp_path / "results"
    results.mkdir()
    items = [f"i{k}" for k in range(6)]
    full = rng.random(len(items))
    for policy, costs in (("uniform", (5, 10, 15, 22)), ("early-exit", (5, 10))):
        rows = [{"item_id": i, "policy": p, "cost": c, "rougeL": v, "model": "m", "dataset": "text", "split": "test"}
                for c in costs for p, (i, v) in [(policy, iv) for iv in zip(items, rng.random(len(items)))]]
        rows += [{"item_id": i, "policy": "full", "cost": 30, "rougeL": v, "model": "m", "dataset": "text",
                  "split": "test"} for i, v in zip(items, full)]
        pd.DataFrame(rows).to_parquet(results / f"evaluate-{policy}-text.parquet")
    pd.DataFrame({"junk": [1]}).to_parquet(results / "evaluate-uniform-text-agg.parquet")  # a companion: not read
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["oracle", "--budget", "6"])
    assert res.exit_code == 0, res.output
    assert "the paper's configurations" in res.stdout + res.stderr
    shares = re.findall(SHARE, res.stdout, re.M)
    assert shares == ["uniform:5", "uniform:10", "uniform:15", "full:30"]
    runs = pd.read_parquet(results / "evaluate-uniform-text.parquet")
    wide = runs[runs["cost"].isin([5, 10, 15, 30])].pivot_table(index="item_id", columns="cost", values="rougeL")
    expected = brute_force(wide.to_numpy(), np.array(wide.columns, dtype=float), 6)
    assert float(re.search(r"^ *oracle +([0-9.]+)", res.stdout, re.M).group(1)) == pytest.approx(expected, abs=5e-4)
    res = CliRunner().invoke(app, ["oracle", "--budget", "6", "--policy", "uniform,early-exit"])
    assert re.findall(SHARE, res.stdout, re.M) == [
        "early-exit:5", "uniform:5", "early-exit:10", "uniform:10", "uniform:15", "full:30"]
    res = CliRunner().invoke(app, ["oracle", "--budget", "6", "--costs", "5,22"])  # the paper's policy, other costs
    assert re.findall(SHARE, res.stdout, re.M) == ["uniform:5", "uniform:22", "full:30"]


def test_missing_items_are_dropped_with_a_count(tmp_path):
    from skipbench.experiments.oracle import OracleConfig, run

    df = pd.DataFrame({"item_id": ["a", "b", "c", "a", "b"], "cost": [4, 4, 4, 8, 8], "rougeL": [0.1, 0.2, 0.9, 0.3, 0.4]})
    df.to_parquet(tmp_path / "r.parquet")
    res = run(OracleConfig(runs=(str(tmp_path / "r.parquet"),), budget=6))
    assert any("1 item(s) not scored" in n for n in res.notes)


def test_dynamic_configurations_are_costed_per_item_end_to_end(tmp_path):
    """A dynamic policy's rows carry each item's realized layers: the oracle costs them per item, its curve starts at
    the cheapest assignment (2.4 here, above the nominal 2), and what it returns is what it wrote."""
    from skipbench.experiments.oracle import OracleConfig, run

    items = ["a", "b", "c"]
    df = pd.DataFrame({
        "item_id": items * 2, "policy": ["confidence"] * 3 + ["full"] * 3, "cost": [2] * 3 + [8] * 3,
        "layers_mean": [2.3, 2.5, 2.4, 8, 8, 8], "rougeL": [0.9, 0.1, 0.5, 0.4, 0.6, 0.5]})
    df.to_parquet(tmp_path / "r.parquet")
    res = run(OracleConfig(runs=(str(tmp_path / "r.parquet"),), curve=True, bootstrap=0, out=str(tmp_path / "o.parquet")))
    assert any("costed per item" in n and "confidence:2" in n for n in res.notes)
    oracle = res.rows[res.rows["method"] == "oracle"].set_index("budget")
    assert list(oracle.index) == [3, 4, 5, 6, 7, 8]
    # b gains most from full depth, at 2.3 + 8 + 2.4 = 12.7 layers in all: over budgets 3 and 4 (9 and 12), within 5 (15)
    assert oracle.loc[3, "value"] == pytest.approx(0.5) and oracle.loc[3, "mean_cost"] == pytest.approx(2.4)
    assert oracle.loc[4, "value"] == pytest.approx(0.5)
    assert oracle.loc[5, "value"] == pytest.approx((0.9 + 0.6 + 0.5) / 3)
    pd.testing.assert_frame_equal(res.rows, pd.read_parquet(res.path))
    pd.testing.assert_frame_equal(res.tables["assign"], pd.read_parquet(res.files["assign"]))


def test_length_bins_follow_the_paper():
    from skipbench.experiments.oracle import LENGTH_LABELS, length_bin

    assert list(length_bin([1, 15, 16, 30, 31, 150, 151, 999])) == [0, 0, 1, 1, 2, 9, 10, 10]
    assert LENGTH_LABELS[0] == "1-15" and LENGTH_LABELS[9] == "136-150" and LENGTH_LABELS[10] == ">150"


def _length_runs(tmp_path, planted: bool, n: int = 120, seed: int = 0):
    """Scores of 3 configurations; with `planted`, long references are best served by the dear one."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, n)
    rows = []
    for i, length in enumerate(lengths):
        long = length > 60
        for policy, cost in (("uniform", 4), ("uniform", 8), ("full", 24)):
            base = {4: 0.3, 8: 0.5, 24: 0.7}[cost] + rng.normal(0, 0.05)
            if planted and cost == 4 and not long:
                base += 0.6  # short labels: the cheap configuration is as good as any
            rows.append({"item_id": f"i{i:03d}", "policy": policy, "cost": cost, "rougeL": base,
                         "reference_tokens": int(length)})
    path = tmp_path / ("planted.parquet" if planted else "null.parquet")
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_length_test_detects_a_planted_effect_and_not_a_shuffled_one(tmp_path):
    from skipbench.experiments.oracle import OracleConfig, length_test, run

    res = run(OracleConfig(runs=(str(_length_runs(tmp_path, True)),), budget=8, bootstrap=0))
    planted = next(t for t in res.length_tests if t["budget"] == 8)
    assert planted["p_value"] < 0.01 and planted["dof"] > 0 and planted["statistic"] > 0
    assert sum(c["count"] for c in planted["counts"]) == 120
    # the same assignment with the items' lengths shuffled: no dependence left
    assign = res.assignment[res.assignment["budget"] == 8].set_index("item_id")["oracle"]
    lengths = pd.read_parquet(tmp_path / "planted.parquet").groupby("item_id")["reference_tokens"].first()
    shuffled = pd.Series(np.random.default_rng(1).permutation(lengths.to_numpy()), index=lengths.index)
    null = length_test(shuffled, assign, res.configs)
    assert null["p_value"] > 0.05


def test_length_test_runs_at_a_fractional_star_after_curve(tmp_path, capsys):
    """The star budget is fractional; the old code skipped the test there (the curve's grid is integer)."""
    out = tmp_path / "o.parquet"
    res = CliRunner().invoke(app, ["oracle", "--runs", str(_length_runs(tmp_path, True)), "--curve",
                                   "--length-budgets", "6,24", "--bootstrap", "50", "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_suffix(".json").read_text())
    star = meta["star_budget"]
    assert star != int(star)
    tests = {t["budget"]: t for t in meta["length_tests"]}
    assert set(tests) == {star, 6.0, 24.0} and tests[star]["why"] == "star"
    assert all(t["p_value"] is not None for t in tests.values())
    lo, hi = meta["star_interval"]
    assert lo <= star <= hi
    counts = pd.read_parquet(tmp_path / "o-length.parquet")
    assert set(counts["budget"]) == {star, 6.0, 24.0}
    assert counts.groupby("budget")["count"].sum().eq(120).all()
    assert f"length test at budget {star:g} (star)" in res.stdout and "chi2 = " in res.stdout
    assert "136-150" in res.stdout or ">150" in res.stdout


def _exact_conditional_p(table) -> float:
    """Freeman-Halton by enumeration of every 2 x c table with `table`'s margins: the probability (multivariate
    hypergeometric) of the tables no more probable than the observed one."""
    from math import comb

    table = np.asarray(table)
    rows, cols = table.sum(1), table.sum(0)

    def prob(first):
        return np.prod([comb(int(c), int(k)) for c, k in zip(cols, first)]) / comb(int(rows.sum()), int(rows[0]))

    tables = [f for f in itertools.product(*(range(int(c) + 1) for c in cols)) if sum(f) == rows[0]]
    observed = prob(table[0])
    return sum(prob(f) for f in tables if prob(f) <= observed * (1 + 1e-9))


def test_the_sparse_table_of_the_results_gets_an_exact_p():
    """docs/RESULTS.md's label-length test at budget 7.5: 24 items in two bins (1-15 tokens: 18, 16-30: 6), chi2 =
    6.93, dof 2, p = 0.031, 67% of cells expecting fewer than 5. The oracle sent 16 of the 18 short items to
    uniform:5 and 2 of the 6 longer ones to full depth; dof 2 means three configurations. Of the 2 x 3 tables with
    those counts (short: 16, a, 2 - a; long: x, 4 - x, 2 over uniform:5, a second configuration, full), only
    [[16, 2, 0], [4, 0, 2]] gives chi2 6.93 (6.933) and 4 of 6 cells expecting < 5: short items 16 uniform:5 and
    2 at another uniform cost, long ones 4 uniform:5 and 2 full. Its exact conditional p (Freeman-Halton, by
    enumerating the 9 tables with its margins; the chi-square statistic orders them the same way) is 0.107: no
    hint of a length effect."""
    from scipy.stats import chi2_contingency

    from skipbench.experiments.oracle import length_test

    found = []
    for a, x in itertools.product(range(3), range(5)):
        t = np.array([[16, a, 2 - a], [x, 4 - x, 2]])
        t = t[:, t.sum(0) > 0]
        res = chi2_contingency(t)
        if t.shape[1] == 3 and round(res.statistic, 2) == 6.93 and (res.expected_freq < 5).sum() == 4:
            found.append(t.tolist())
    assert found == [[[16, 2, 0], [4, 0, 2]]]
    assert _exact_conditional_p(found[0]) == pytest.approx(0.10728, abs=5e-6)

    picks = ["uniform:5"] * 16 + ["uniform:10"] * 2 + ["uniform:5"] * 4 + ["full:30"] * 2
    items = [f"i{k:02d}" for k in range(24)]
    lengths = pd.Series([8] * 18 + [22] * 6, index=items)
    t = length_test(lengths, pd.Series(picks, index=items), ["uniform:5", "uniform:10", "uniform:15", "full:30"])
    assert (t["bins_used"], t["configs_used"], t["dof"]) == (2, 3, 2)
    assert t["statistic"] == pytest.approx(6.933, abs=5e-4) and t["p_chi2"] == pytest.approx(0.0312, abs=5e-5)
    assert t["sparse_cells"] == pytest.approx(4 / 6)
    assert t["test"] == "permutation (100,000 resamples, seed 0)" and t["resamples"] == 100_000
    # the Monte-Carlo p within 3 standard errors (sqrt(p (1 - p) / 100,000) = 0.001) of the exact 0.107
    assert t["p_value"] == pytest.approx(0.1073, abs=0.003)
    assert "too few for the chi-square approximation, whose p is 0.0312" in t["note"]


def test_contingency_test_picks_the_test_by_the_expected_counts():
    """Cochran's rule: chi-square when at most 20% of cells expect fewer than 5; else Fisher's exact test for
    2 x 2 (its p the hypergeometric enumeration's) and a permutation p for larger tables."""
    from scipy.stats import hypergeom

    from skipbench.analysis.stats import contingency_test

    dense = contingency_test([[30, 10], [10, 30]])
    assert dense["test"] == "chi-square" and dense["p_value"] == dense["p_chi2"] == pytest.approx(2.15e-5, rel=1e-3)
    fisher = contingency_test([[9, 1], [1, 3]])  # 3 of 4 cells expect fewer than 5
    null = hypergeom(14, 10, 10)  # the top-left cell given the margins
    exact = sum(null.pmf(k) for k in range(6, 11) if null.pmf(k) <= null.pmf(9) * (1 + 1e-9))
    assert fisher["test"].startswith("Fisher exact") and fisher["p_value"] == pytest.approx(exact) == pytest.approx(0.04096, abs=1e-5)
    assert fisher["p_chi2"] == pytest.approx(0.0755, abs=1e-4)  # Yates-corrected chi-square: not what is reported
    sparse = [[5, 1, 0], [1, 3, 2]]
    again = contingency_test(sparse, resamples=20_000, seed=3)
    assert again["test"] == "permutation (20,000 resamples, seed 3)"
    assert again["p_value"] == pytest.approx(_exact_conditional_p(sparse), abs=4 * 0.5 / 20_000 ** 0.5)
    assert contingency_test(sparse, resamples=20_000, seed=3)["p_value"] == again["p_value"]  # seeded


def _full_best_runs(tmp_path, n: int = 60, seed: int = 0):
    """Skipping costs every item some quality, items with references over 45 tokens much more: full depth scores
    best on every item, so the star is full depth itself and sends every item there."""
    rng = np.random.default_rng(seed)
    lengths, base = rng.integers(1, 91, n), rng.uniform(0.5, 0.9, n)
    rows = [{"item_id": f"i{i:02d}", "policy": "full" if c == 24 else "uniform", "cost": c,
             "rougeL": base[i] - (1 - c / 24) ** 2 * (0.6 if lengths[i] > 45 else 0.05),
             "reference_tokens": int(lengths[i])} for i in range(n) for c in (4, 8, 12, 24)]
    path = tmp_path / "full-best.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_curve_tests_a_planted_length_effect_where_full_depth_is_best(tmp_path):
    """`oracle --curve` alone tested the star only. When full depth scores best on every item (skipping hurts long
    references most, short ones a little) the star is full depth and every item goes there: nothing to test, p None.
    --curve now also tests the paper's budgets (6 and 24 of 24 layers, scaled), where the planted effect shows."""
    out = tmp_path / "o.parquet"
    res = CliRunner().invoke(app, ["oracle", "--runs", str(_full_best_runs(tmp_path)), "--curve", "--bootstrap", "0",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["star_budget"] == 24
    tests = {t["budget"]: t for t in meta["length_tests"]}
    assert set(tests) == {24.0, 6.0}  # the paper's 24 of 24 is the star: tested once
    star, six = tests[24.0], tests[6.0]
    assert star["why"] == "star" and star["p_value"] is None and star["configs_used"] == 1
    assert "the star is full depth itself: full:24 scores best on every item" in star["note"]
    assert six["why"] == "the paper's 6 of 24, scaled" and six["configs_used"] > 1
    assert six["p_value"] is not None and six["p_value"] < 1e-3 and six["test"].startswith("permutation")
    counts = pd.read_parquet(tmp_path / "o-length.parquet")
    at_six = counts[counts["budget"] == 6.0]
    short = at_six[at_six["bin"].isin(["1-15", "16-30", "31-45"])]
    assert set(short.loc[short["count"] > 0, "config"]) == {"uniform:4"}  # the oracle spends on long references
    assert "length test at budget 6 (the paper's 6 of 24, scaled)" in res.stdout and "permutation (100,000" in res.stdout
    assert "the star is full depth itself" in res.stdout


def test_static_plans_and_full_depth_may_differ_in_kv_mode_without_a_note():
    """`auto` runs full depth `fill` and a static plan `none`: the same tokens, so no "compared as if alike" note;
    a per-token policy whose mode differs still gets one."""
    from skipbench.analysis.scores import load_scores
    from skipbench.policies.spec import static_names

    def rows(policy, cost, kv):
        return pd.DataFrame({"item_id": ["a", "b"], "policy": policy, "cost": cost, "rougeL": [0.5, 0.6],
                             "kv_mode": kv, "model": "m", "dataset": "d", "split": "test"})

    plain = pd.concat([rows("full", 6, "fill"), rows("uniform", 3, "none")], ignore_index=True)
    assert not load_scores(plain, "rougeL", mode_free=static_names())[1]
    mixed = pd.concat([plain, rows("random-token", 3, "none"), rows("random-token", 4, "fill")], ignore_index=True)
    notes = load_scores(mixed, "rougeL", mode_free=static_names())[1]
    assert notes == ["the runs differ in kv_mode (fill, none): they are compared as if alike"]
    assert load_scores(plain, "rougeL")[1]  # without the list, every difference is noted
