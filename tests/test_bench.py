"""The bench command end to end on a tiny model, reading the parquet back (no timing assertions)."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from skipbench.cli import app


def test_bench_end_to_end(tiny_dirs, tmp_path):
    out = tmp_path / "bench.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["llama"]), "--batch-sizes", "1,2",
                                   "--policies", "full,uniform:3,random-token:4", "--impl", "both",
                                   "--new-tokens", "4", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    variants = {"hf-generate", "full", "uniform:3", "random-token:4 [gather]", "random-token:4 [mask]", "removed:uniform:3"}
    assert set(df["variant"]) == variants
    assert len(df) == 2 * len(variants) * 2 * 2  # batch sizes x variants x repeats x phases
    decode = df[df["phase"] == "decode"]
    assert (decode["steps"] == 3).all() and (df["tokens_per_s"] > 0).all() and df["run_id"].nunique() == 1
    assert set(decode.loc[decode["variant"] == "uniform:3", "layers_mean"]) == {3.0}
    assert (decode.loc[decode["variant"].str.startswith("random-token"), "layers_mean"] == 4.0).all()
    assert (df["step_p90"] >= df["step_p50"]).all()
    meta = json.loads(out.with_suffix(".json").read_text())
    summary = pd.DataFrame(meta["summary"])
    full = summary[(summary["variant"] == "full") & (summary["phase"] == "decode")]
    assert (full["speedup"] == 1.0).all() and (full["ideal_speedup"].round(9) == 1.0).all()
    assert set(meta["fixed_part_seconds"]) == {"1", "2"} or set(meta["fixed_part_seconds"]) == {1, 2}
    assert "real/ideal" in res.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_removed_layers_model_equals_plan(tokenizer):
    """The bench's bound (shared-weight smaller model) gives the plan's tokens: it times the same work."""
    from conftest import prompts, tiny_model
    from skipbench.engine import generate
    from skipbench.models import wrap_model
    from skipbench.models.loading import remove_layers
    from skipbench.policies import make_policy
    from skipbench.policies.base import PolicyOptions

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    plan = make_policy("uniform", 6, PolicyOptions(cost=3))
    small = wrap_model(remove_layers(lm.model, plan.executed_layers()), tokenizer, "small")
    ps = prompts(tokenizer, 3)
    a = generate(lm, ps, plan, 10, prompt_depth="policy")
    b = generate(small, ps, make_policy("full", 3), 10)
    assert a.tokens == b.tokens
    assert lm.num_layers == 6  # the original is untouched
