"""A random control matched on realized compute (issue 41): `random-token:C -o mean=M` draws C or C - 1 layers per
token with mean M, and `evaluate --matched-random` puts one beside each learned point at the mean that point
realized; the report compares them per item."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.policies import parse_policies
from skipbench import keyed
from skipbench.policies.static import RandomPolicy, random_layers


def test_a_mean_draws_c_or_c_minus_one_layers_with_that_mean():
    policy = RandomPolicy(30, 18, seed=3, per_token=True, first_layer=True, mean=17.25)
    counts = np.array([len(policy._draw(row, position)) for row in range(40) for position in range(100)])
    assert set(counts) == {17, 18} and abs(counts.mean() - 17.25) < 0.03  # 4,000 draws: sd of the mean ~0.007
    assert all(0 in policy._draw(1, p) for p in range(50))  # layer 0 always
    plain = RandomPolicy(30, 18, seed=3, per_token=True, first_layer=True)
    assert {len(plain._draw(0, p)) for p in range(50)} == {18}
    whole = RandomPolicy(30, 18, seed=3, per_token=True, first_layer=True, mean=18.0)
    for key in [(0, 5), (7, 1)]:  # without a mean (or with M = C) the draws are the ones random-token always made
        want = random_layers(keyed.rng(3, *key), 30, 18, True)
        assert (plain._draw(*key) == want).all() and (whole._draw(*key) == want).all()


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
    tokens = learned["layers_per_token"]
    realized = tokens.map(sum).sum() / tokens.map(len).sum()  # pooled over the items' tokens
    assert 2 <= realized < 6  # the router skips (this tiny one skips its routed layers for every token alike)
    control = df[df["matched_to"].notna()]
    (label,) = set(control["policy_spec"])
    assert set(control["matched_to"]) == {learned["policy_spec"].iloc[0]} and label.startswith("random-token:")
    cost, whole = int(np.ceil(realized)), realized == int(realized)
    assert label == (f"random-token:{cost}" if whole else f"random-token:{cost}[mean={round(realized, 4):g}]")
    assert set(control["item_id"]) == set(learned["item_id"])
    drawn = control["layers_per_token"]
    counts = {n for row in drawn for n in row}
    assert counts == {cost} if whole else counts == {cost, cost - 1}  # C, or C and C - 1 (the fraction: unit test)
    assert abs(drawn.map(sum).sum() / drawn.map(len).sum() - realized) < 0.5  # the same compute, up to the draws
    assert df.loc[df["policy_spec"] == "uniform:3", "matched_to"].isna().all()  # only learned points get one
    # the progress total grew by the control's items: the last count is the whole (full, two points, the control)
    counts = re.findall(r"^evaluate: (\d+)/(\d+) ", res.stderr, re.M)
    assert counts and counts[-1] == (str(4 * 6), str(4 * 6))
    report = tmp_path / "REPORT.md"
    res = runner.invoke(app, ["report", "--results", str(tmp_path), "--out", str(report)])
    assert res.exit_code == 0, res.output
    text = report.read_text()
    assert "### Learned policies against random skipping of the same realized compute" in text
    assert f"against {label}" in text and "over 6 items" in text
    assert (tmp_path / "quality-arith-test.png").stat().st_size > 10_000  # the figure, with the pair joined


def test_every_learned_point_that_skips_layers_gets_its_kind_of_control():
    from skipbench.evaluation.quality import matched_spec, matches
    from skipbench.policies import parse_policies

    (flexi,) = parse_policies("flexidepth:runs/f")
    (route,) = parse_policies("route:runs/r")
    (mind,) = parse_policies("mindskip:runs/m")
    (uniform,) = parse_policies("uniform:4")
    assert matches(flexi) and matches(route) and matches(mind) and not matches(uniform)
    assert matched_spec(flexi, 17.26, 30).label == "random-token:18[mean=17.26]"
    assert matched_spec(route, 12.0, 30).label == "random:12"  # per sequence, as the router assigns
    assert matched_spec(flexi, 30.0, 30) is None and matched_spec(flexi, 1.5, 30) is None
    # MindSkip skips attention only: its control draws attention sub-layers, under the KV mode it ran
    assert matched_spec(mind, 21.5, 30).label == "random-attention:22[mean=21.5]"
    assert matched_spec(mind, 21.5, 30, "none").label == "random-attention:22[kv=none;mean=21.5]"
    assert matched_spec(mind, 21.5, 30, "fill").label == "random-attention:22[kv=fill;mean=21.5]"


def test_random_attention_draws_the_layers_random_token_draws():
    """The same seed and keys: random-attention's attention runs exactly where random-token's layers run (layer 0
    always), as an AttnRoute that follows the cache's KV mode unless -o kv sets one; its nominal cost is L."""
    import torch

    from skipbench.engine.protocol import AttnRoute
    from skipbench.policies import make_policy

    attention, layers = make_policy("random-attention:3", 6, seed=5), make_policy("random-token:3", 6, seed=5)
    positions = torch.arange(4).repeat(2, 1)
    for policy in (attention, layers):
        policy.begin(2)
        policy.new_step(positions)
    h = torch.zeros(2, 4, 8)
    assert attention.gate(0, h) is True and attention.kv_mode is None
    for i in range(1, 6):
        a, t = attention.gate(i, h), layers.gate(i, h)
        if t is True:
            assert a is True
            continue
        assert isinstance(a, AttnRoute) and a.kv_for_skipped is None
        assert torch.equal(a.run, torch.zeros(2, 4, dtype=torch.bool) if t is False else t)
    assert make_policy("random-attention:3", 6, policy_options={"kv": "none"}).kv_mode == "none"
    (spec,) = parse_policies("random-attention:3")
    assert spec.cost(6) == 6  # every layer runs (its MLP)


@pytest.mark.parametrize("kv", ["auto", "fill", "none"])
def test_random_attention_runs_c_attention_sub_layers_per_token_and_every_mlp(tokenizer, kv):
    """`random-attention:C`: every generated token runs C attention sub-layers (layer 0's among them) and all L
    layers' MLPs; with `-o mean=M`, C or C - 1 with mean M; under either KV mode (the cache's, which it requires)."""
    from conftest import prompts, tiny_model
    from skipbench.engine import generate
    from skipbench.models import wrap_model
    from skipbench.policies import make_policy

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    ps = prompts(tokenizer, 3)
    out = generate(lm, ps, make_policy("random-attention:4", 6, policy_options={"kv": kv}), 10)
    for row in range(3):
        assert all(len(layers) == 6 for layers in out.layers[row])  # every layer ran (its MLP)
        assert out.attention_mean(row) == 4  # C attention sub-layers per token
    out = generate(lm, ps, make_policy("random-attention:4", 6, policy_options={"kv": kv, "mean": "3.5"}), 10)
    per_token = [6 - s for row in out.attention_skips for s in row]
    assert set(per_token) == {3, 4}


def test_evaluate_puts_a_random_attention_control_beside_mindskip(tiny_dirs, tmp_path):
    """MindSkip skips attention only: its control runs the same attention sub-layers per token at random, every
    MLP, under the KV mode MindSkip ran; the report gives both in attention sub-layers."""
    runner = CliRunner()
    mind, out = tmp_path / "mind", tmp_path / "evaluate-mind.parquet"
    model = ["--model", str(tiny_dirs["llama"])]
    res = runner.invoke(app, ["mindskip", "train", *model, "--dataset", "text,arith", "--limit", "8", "--steps", "4",
                              "--max-new-tokens", "8", "--out", str(mind)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", *model, "--dataset", "arith", "--split", "test", "--limit", "6",
                              "--policy", f"mindskip:{mind}", "-o", "skip=2", "--max-new-tokens", "8",
                              "--matched-random", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    learned, control = df[df["policy"] == "mindskip"], df[df["matched_to"].notna()]
    tokens = learned["layers_per_token"].map(len)
    realized = (learned["attention_mean"] * tokens).sum() / tokens.sum()
    assert 2 <= realized < 6  # the threshold skips about 2 of the 6 attention sub-layers
    (label,) = set(control["policy_spec"])
    assert label.startswith("random-attention:") and set(control["matched_to"]) == set(learned["policy_spec"])
    assert set(control["kv_mode"]) == set(learned["kv_mode"])
    assert (control["layers_mean"] == 6).all() and (learned["layers_mean"] == 6).all()  # every MLP ran
    drawn = control["layers_per_token"].map(len)
    assert abs((control["attention_mean"] * drawn).sum() / drawn.sum() - realized) < 0.5
    report = tmp_path / "REPORT.md"
    res = runner.invoke(app, ["report", "--results", str(tmp_path), "--out", str(report)])
    assert res.exit_code == 0, res.output
    assert f"attention sub-layers per token) against {label}" in report.read_text()
