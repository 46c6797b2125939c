"""`skipbench cosine`: identities at full cost, early exit == full below the exit, CI vs scipy, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.data import DataSpec
from skipbench.engine import Engine
from skipbench.engine.decode import left_pad
from skipbench.evaluation import fidelity
from skipbench.analysis import stats
from skipbench.experiments import cosine as cs
from skipbench.models import wrap_model
from skipbench.policies import make_policy


def test_every_strategy_at_full_cost_is_the_full_model(tiny_dirs, tmp_path):
    cfg = cs.CosineConfig(model=str(tiny_dirs["qwen3"]), data=DataSpec(name="text", limit=4), costs=(6,), num_seeds=2,
                          max_new_tokens=8, out=str(tmp_path / "c.parquet"))
    res = cs.run(cfg)
    assert set(res.rows["strategy"]) == {"early-exit", "uniform", "random"}
    assert np.allclose(res.rows["cos_final"], 1, atol=1e-5) and np.allclose(res.rows["cos_layerwise"], 1, atol=1e-5)
    assert np.allclose(res.rows["kl_next"], 0, atol=1e-5) and (res.rows["top1_agree"] == 1).all()
    # the shared result: rows, companion tables and files are what was written
    pd.testing.assert_frame_equal(res.rows, pd.read_parquet(res.path))
    pd.testing.assert_frame_equal(res.tables["agg"], pd.read_parquet(res.files["agg"]))
    assert res.files["agg"].name == "c-agg.parquet" and res.files["figure"].stat().st_size > 5000


@pytest.mark.parametrize("exit_layer", [1, 3, 5])
def test_early_exit_states_equal_full_up_to_the_exit(tokenizer, exit_layer):
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    ids, present = left_pad(prompts(tokenizer, 2), 0, "cpu")
    resp = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    engine = Engine(lm.adapter)
    cache = engine.new_cache(2, ids.shape[1] + 6, "cpu", torch.float32)
    cache.pad = (~present).sum(1)
    engine.forward(ids, cache, None, present=present)
    full = engine.forward(resp, cache.clone(), None, keep_hidden=True)
    ee = engine.forward(resp, cache.clone(), make_policy(f"early-exit:{exit_layer}", 6), keep_hidden=True)
    cos = fidelity.cosines(full.hidden, ee.hidden)
    assert torch.allclose(cos[: exit_layer + 1], torch.ones_like(cos[: exit_layer + 1]), atol=1e-6)
    assert (cos[exit_layer + 1 :] < 0.9999).any()
    for depth in range(exit_layer + 1, 7):  # skipped layers leave the state as it was at the exit
        assert torch.equal(ee.hidden[depth], ee.hidden[exit_layer])
    shortcut = fidelity.early_exit_from_full(lm.adapter, full, exit_layer)  # what `cosine` uses instead of a pass
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(shortcut.hidden, ee.hidden))
    assert torch.allclose(shortcut.logits, ee.logits, atol=1e-5)


def test_t_interval_matches_scipy():
    values = np.array([0.91, 0.85, 0.97, 0.66, 0.78, 0.88, 0.93])
    mean, lo, hi = stats.t_interval(values)
    ref = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
    assert mean == pytest.approx(values.mean()) and (lo, hi) == pytest.approx(ref, abs=1e-12)


def test_aggregate_uses_item_means():
    df = pd.DataFrame({"strategy": "uniform", "point": "3", "cost": 3, "item_id": ["a", "a", "b", "c"],
                       "layers": [3.0, 3.0, 2.0, 4.0], **{m: [1.0, 0.0, 0.25, 0.75] for m in cs.MEASURES}})
    agg = cs.aggregate(df)
    assert agg["items"].iloc[0] == 3 and agg["cos_final"].iloc[0] == pytest.approx((0.5 + 0.25 + 0.75) / 3)
    assert agg["layers"].iloc[0] == pytest.approx(3.0)  # a mean of item means too


def test_cosine_cli_end_to_end(tiny_dirs, tmp_path):
    out = tmp_path / "cos.parquet"
    res = CliRunner().invoke(app, ["cosine", "--model", str(tiny_dirs["opt"]), "--dataset", "arith", "--limit", "5",
                                   "--costs", "2,4", "--num-seeds", "2", "--max-new-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out)
    agg = pd.read_parquet(tmp_path / "cos-agg.parquet")
    assert {"item_id", "token", "strategy", "cost", "seed", *cs.MEASURES} <= set(rows.columns)
    assert len(agg) == 3 * 2 and (agg["items"] == rows["item_id"].nunique()).all()
    per_item_tokens = rows.groupby(["strategy", "cost", "seed", "item_id"]).size()
    assert per_item_tokens.groupby("item_id").nunique().eq(1).all()  # every pass covers the same tokens
    assert set(rows.loc[rows["strategy"] == "random", "seed"]) == {0, 1}
    assert (agg["cos_final_lo"] <= agg["cos_final"]).all() and (agg["cos_final"] <= agg["cos_final_hi"]).all()
    assert (tmp_path / "cos.png").stat().st_size > 10_000
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["hidden_state_convention"].startswith("residual") and "t-interval" in meta["confidence_interval"]


def test_the_post_norm_final_cosine_is_hfs_last_hidden_state(tokenizer):
    """cos_final_normed compares the states the head reads: the final norm of the last state, which is what
    transformers returns as its last `hidden_states`; with a final norm whose weights are not all one, it differs from
    the raw cosine."""
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    with torch.no_grad():
        lm.model.model.norm.weight.copy_(torch.rand(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 2)
    ids, present = left_pad(prompts(tokenizer, 1), 0, "cpu")
    resp = torch.randint(3, len(tokenizer), (1, 5), generator=torch.Generator().manual_seed(2))
    engine = Engine(lm.adapter)
    cache, _ = engine.prefill(ids, present, ids.shape[1] + 5)
    full = engine.forward(resp, cache.clone(), None, keep_hidden=True)
    other = engine.forward(resp, cache.clone(), make_policy("layers:0,2,3,5", 6), keep_hidden=True)
    ours = fidelity.measures(full, other, 6, lm.adapter.final_norm)["cos_final_normed"][0]
    with torch.no_grad():
        hf_last = lm.model(torch.cat([ids, resp], 1), output_hidden_states=True).hidden_states[-1][0, ids.shape[1]:]
    assert torch.allclose(lm.adapter.final_norm(full.hidden[6])[0], hf_last, atol=1e-5)  # HF's last state: post-norm
    want = torch.nn.functional.cosine_similarity(lm.adapter.final_norm(full.hidden[6])[0],
                                                 lm.adapter.final_norm(other.hidden[6])[0], dim=-1)
    raw = fidelity.cosines(full.hidden, other.hidden)[6][0]
    assert torch.allclose(ours, want, atol=1e-6) and (ours - raw).abs().max() > 1e-3
