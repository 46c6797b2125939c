"""A random control matched on realized compute (issue 41): `random-token:C -o mean=M` draws C or C - 1 layers per
token with mean M, and `evaluate --matched-random` puts one beside each learned point at the mean that point
realized; the report compares them per item."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.policies import parse_policies
from skipbench.policies.static import RandomPolicy


def test_a_mean_draws_c_or_c_minus_one_layers_with_that_mean():
    policy = RandomPolicy(30, 18, seed=3, per_token=True, first_layer=True, mean=17.25)
    counts = np.array([len(policy._draw(row, position)) for row in range(40) for position in range(100)])
    assert set(counts) == {17, 18} and abs(counts.mean() - 17.25) < 0.03  # 4,000 draws: sd of the mean ~0.007
    assert all(0 in policy._draw(1, p) for p in range(50))  # layer 0 always
    plain = RandomPolicy(30, 18, seed=3, per_token=True, first_layer=True)
    assert {len(plain._draw(0, p)) for p in range(50)} == {18}


@pytest.mark.parametrize("cost, mean", [(18, 16.5), (18, 18.5), (1, 0.5), (18, float("nan")), (18, float("inf"))])
def test_a_mean_outside_c_minus_one_to_c_is_refused(cost, mean):
    with pytest.raises(SkipbenchError, match="-o mean must lie in"):
        RandomPolicy(30, cost, seed=0, per_token=True, first_layer=True, mean=mean)
    (spec,) = parse_policies(f"random-token:{cost}", {"mean": str(mean)})
    with pytest.raises(SkipbenchError, match="-o mean must lie in"):
        spec.build(30)


def test_evaluate_puts_a_matched_control_beside_each_learned_point(tiny_dirs, tmp_path):
    runner = CliRunner()
    run, out = tmp_path / "flexi", tmp_path / "evaluate-matched.parquet"
    model = ["--model", str(tiny_dirs["llama"])]
    res = runner.invoke(app, ["flexidepth", "train", *model, "--dataset", "text,arith", "--limit", "8", "--skip-weight",
                              "1", "--router-reduction", "4", "--steps", "30", "--batch-size", "4", "--lr", "0.05",
                              "--max-new-tokens", "8", "--max-seq-len", "1024", "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", *model, "--dataset", "arith", "--split", "test", "--limit", "6",
                              "--policy", "flexidepth,uniform:3", "--router", str(run), "--max-new-tokens", "8",
                              "--matched-random", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    learned = df[df["policy"] == "flexidepth"]
    realized = learned["layers_mean"].mean()
    assert 2 <= realized < 6  # the router skips
    control = df[df["matched_to"].notna()]
    (label,) = set(control["policy_spec"])
    assert set(control["matched_to"]) == {learned["policy_spec"].iloc[0]} and label.startswith("random-token:")
    assert f"mean={round(realized, 4):g}" in label or realized == int(realized)
    assert set(control["item_id"]) == set(learned["item_id"])
    assert abs(control["layers_mean"].mean() - realized) < 0.75  # the same compute, up to the draws
    assert df.loc[df["policy_spec"] == "uniform:3", "matched_to"].isna().all()  # only learned points get one
    report = tmp_path / "REPORT.md"
    res = runner.invoke(app, ["report", "--results", str(tmp_path), "--out", str(report)])
    assert res.exit_code == 0, res.output
    text = report.read_text()
    assert "### Learned policies against random skipping of the same realized compute" in text
    assert f"against {label}" in text and "over 6 items" in text
