"""Calibration samples (issue 41): `-o calibration-seed=S` draws another calibration sample of the same size from
the train split; `evaluate --calibration-seeds` runs every calibrated point once per sample and reports each point's
spread and whether a ranking between calibrated points survives it (analysis/spread.py)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import tiny_model
from skipbench.cli import app
from skipbench.data import DataSpec, load_items
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.analysis.spread import calibration_spread, rankings, references
from skipbench.policies import parse_policies
from skipbench.policies.calibration import calibration_items
from skipbench.policies.spec import with_calibration_seeds


def test_another_seed_draws_another_sample_of_the_same_size_from_the_same_split():
    train = DataSpec(name="text", split="train", limit=8)
    first = calibration_items(train)
    assert [it.item_id for it in first] == [it.item_id for it in load_items(train)]  # seed 0: the first items, as before
    pool = {it.item_id for it in load_items(DataSpec(name="text", split="train"))}
    test = {it.item_id for it in load_items(DataSpec(name="text", split="test"))}
    samples = [calibration_items(train, s) for s in (1, 2)]
    for sample in samples:
        ids = [it.item_id for it in sample]
        assert len(ids) == 8 and set(ids) <= pool and not set(ids) & test  # the train split only
    assert len({frozenset(it.item_id for it in s) for s in [first, *samples]}) == 3  # three different samples
    assert [it.item_id for it in calibration_items(train, 1)] == [it.item_id for it in samples[0]]  # seeded
    mixed = calibration_items(DataSpec(name="text,arith", split="validation", limit=10), 3)
    suites = {it.item_id: name for name in ("text", "arith")
              for it in load_items(DataSpec(name=name, split="validation"))}
    assert [suites[it.item_id] for it in mixed] == ["text", "arith"] * 5  # the datasets' balance, as seed 0's


def test_other_calibrated_strategies_take_their_sample_too(tokenizer, tmp_path, monkeypatch):
    from skipbench.policies import calibration, laco
    from skipbench.policies.angular import distances
    from skipbench.policies.spec import Context

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    ctx = Context(num_layers=lm.num_layers, lm=lm, data=DataSpec(name="text"))

    def spec(name, seed, **more):
        (s,) = parse_policies(name, {"calibration": "4", "calibration-tokens": "256", "calibration-seed": str(seed),
                                     **more})
        return s

    assert not np.allclose(distances(spec("angular:4", 0), ctx)[1], distances(spec("angular:4", 1), ctx)[1])
    assert laco._options(spec("laco:3", 2))["calibration-seed"] == 2 and "calibration-seed" not in laco._options(spec("laco:3", 0))
    _, source = laco._calibration_prompts(spec("laco:3", 2), ctx)
    assert "calibration sample 2" in source
    asked = []
    real = calibration.sequences
    monkeypatch.setattr(calibration, "sequences", lambda lm, data, tokens, sample=0: asked.append(sample) or real(lm, data, tokens, sample))
    calibration.tune_threshold(ctx, lambda t: __import__("skipbench.policies.static", fromlist=["x"]).PlanPolicy(
        lm.num_layers, list(range(lm.num_layers)), "all"), "layers", 1.0, 3, 32, steps=1, sample=5)
    assert asked == [5]  # a router's -o skip calibrates on its own sample


def test_a_plan_is_computed_from_its_own_sample(tokenizer, tmp_path, monkeypatch):
    from skipbench.policies.block_influence import influence

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    from skipbench.policies.spec import Context

    def bi(seed):
        (spec,) = parse_policies("block-influence:3", {"calibration": "4", "calibration-tokens": "256",
                                                       "calibration-seed": str(seed)})
        return influence(spec, Context(num_layers=lm.num_layers, lm=lm, data=DataSpec(name="text")))

    zero, one = bi(0), bi(1)
    assert not np.allclose(zero, one)  # other sequences, other similarities
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 2  # cached apart
    np.testing.assert_array_equal(bi(1), one)
    (spec,) = parse_policies("block-influence:3", {"calibration-seed": "-1"})
    with pytest.raises(SkipbenchError, match=r"calibration-seed must be in 0 \.\. 2\^31 - 1"):
        influence(spec, Context(num_layers=lm.num_layers, lm=lm, data=DataSpec(name="text")))


def test_the_seeds_expand_only_the_points_that_depend_on_a_sample():
    points = parse_policies("uniform:3,block-influence:3,angular:4")
    got = [p.label for p in with_calibration_seeds(points, (0, 2))]
    assert got == ["uniform:3", "block-influence:3", "block-influence:3[calibration-seed=2]", "angular:4",
                   "angular:4[calibration-seed=2]"]
    router = parse_policies("flexidepth:runs/f")  # its trained threshold: no calibration sample
    with pytest.raises(SkipbenchError, match="no point depends on a calibration sample"):
        with_calibration_seeds(router, (0, 1))
    tuned = parse_policies("flexidepth:runs/f", {"skip": "4"})
    assert len(with_calibration_seeds(tuned, (0, 1))) == 2
    for seeds, said in [((0, 0), "distinct"), ((-1, 1), "0 .. 2^31 - 1"), ((2**63, 1), "0 .. 2^31 - 1"), ((1,), "at least two")]:
        with pytest.raises(SkipbenchError, match=re.escape(said)):
            with_calibration_seeds(points, seeds)
    with pytest.raises(SkipbenchError, match="give one of them"):
        with_calibration_seeds(parse_policies("angular:4", {"calibration-seed": "3"}), (0, 1))


def test_spread_and_rankings_by_hand():
    rows = pd.DataFrame({
        "dataset": "text", "split": "test", "cost": 3, "item_id": ["a", "b"] * 6,
        "policy": ["block-influence"] * 6 + ["angular"] * 6,
        "calibration_point": ["block-influence:3"] * 6 + ["angular:3"] * 6,
        "calibration_seed": pd.array([0, 0, 1, 1, 2, 2] * 2, dtype="Int64"),
        "full_rougeL": [0.9, 0.7, 0.8, 0.8, 0.6, 0.8, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6]})
    spread = calibration_spread(rows).set_index("policy")
    assert spread.loc["block-influence", ["samples", "lo", "hi"]].tolist() == [3, 0.7, 0.8]  # sample means .8 .8 .7
    assert spread.loc["block-influence", "mean"] == pytest.approx(0.7667, abs=1e-4)
    assert spread.loc["angular", "sd"] == pytest.approx(np.std([0.5, 0.5, 0.6], ddof=1))
    (line,) = rankings(calibration_spread(rows))
    assert line.startswith("dataset text, split test, cost 3: block-influence:3") and "survives" in line
    plain = pd.DataFrame({"dataset": "text", "split": "test", "cost": 3, "item_id": ["a", "b"], "policy": "uniform",
                          "calibration_point": "uniform:3", "calibration_seed": pd.array([None, None], dtype="Int64"),
                          "full_rougeL": [0.75, 0.75]})
    both = pd.concat([rows, plain], ignore_index=True)
    spread = calibration_spread(both)
    lines = rankings(spread, reference=references(both, spread))
    assert any("block-influence:3" in x and "above uniform:3" in x and "does not survive" in x for x in lines)  # 0.7 < 0.75
    assert any("uniform:3 (full_rougeL 0.750, no calibration sample) above angular:3" in x and "survives" in x
               for x in lines)
    lines = rankings(spread, reference=references(both, spread), rows=both)  # the reference's items pair too
    assert any(x.startswith("dataset text, split test, cost 3: uniform:3") and "above angular:3" in x
               and "over their 2 items the first leads by +0.217 [" in x for x in lines)  # .75-.5, .75-.567
    (line,) = rankings(calibration_spread(rows), rows=rows)  # per item over samples: .767 - .5 and .767 - .567
    assert "over their 2 items the first leads by +0.233 [-0.190, +0.657]" in line  # two items: survives, unordered
    assert "survives" in line and "the items do not order them" in line
    four = pd.DataFrame({"dataset": "text", "split": "test", "cost": 3, "item_id": list("abcd") * 4,
                         "policy": ["block-influence"] * 8 + ["angular"] * 8,
                         "calibration_point": ["block-influence:3"] * 8 + ["angular:3"] * 8,
                         "calibration_seed": pd.array(([0] * 4 + [1] * 4) * 2, dtype="Int64"),
                         "full_rougeL": [0.8, 0.7, 0.9, 0.6] * 2 + [0.5, 0.45, 0.6, 0.4] * 2})
    (line,) = rankings(calibration_spread(four), rows=four)  # leads .3 .25 .3 .2 on every item
    assert "over their 4 items the first leads by +0.263 [+0.186, +0.339]" in line and "the items order them too" in line
    router = rows.assign(cost=[3, 3, 4, 4, 3, 3] * 2)  # a router's samples realize other costs: one point still
    assert calibration_spread(router)["samples"].tolist() == [3, 3]
    rows.loc[rows.index[-2:], "full_rougeL"] = 0.75  # angular's third sample now scores 0.75 > 0.7
    (line,) = rankings(calibration_spread(rows))
    assert "does not survive" in line
    single = rows[rows["calibration_seed"] == 0]
    assert calibration_spread(single).empty and rankings(calibration_spread(single)) == []  # one sample: no spread


def test_evaluate_runs_each_calibrated_point_on_each_sample_and_reports_the_spread(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "evaluate-seeds.parquet"
    args = ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "test", "--limit", "3",
            "--max-new-tokens", "4", "--policy", "uniform:3,block-influence:3,angular:3", "-o", "calibration=3",
            "-o", "calibration-tokens=32", "--calibration-seeds", "0,1,2", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    for name in ("block-influence", "angular"):
        mine = df[df["policy"] == name]
        assert sorted(mine["calibration_seed"].unique()) == [0, 1, 2] and (mine["calibration_point"] == f"{name}:3[calibration=3;calibration-tokens=32]").all()
    assert df.loc[df["policy"].isin(["full", "uniform"]), "calibration_seed"].isna().all()
    assert "calibration spread" in res.stdout and "the ranking does not survive" in res.stderr  # equal scores overlap
    bi = df[df["policy"] == "block-influence"].groupby("calibration_seed")["full_rougeL"].mean()
    spread = calibration_spread(df).set_index("policy")
    assert spread.loc["block-influence", "lo"] == pytest.approx(bi.min()) and spread.loc["block-influence", "samples"] == 3
    report = tmp_path / "REPORT.md"
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path), "--out", str(report)])
    assert res.exit_code == 0, res.output
    text = report.read_text()
    assert "### Calibration samples" in text and "calibration spread" in text
    bad = [a if a != "0,1,2" else "1,-2" for a in args[:-1]] + [str(tmp_path / "bad.parquet")]
    res = CliRunner().invoke(app, bad)
    assert res.exit_code == 1 and "0 .. 2^31 - 1" in res.stderr and not (tmp_path / "bad.parquet").exists()
