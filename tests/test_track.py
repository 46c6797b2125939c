"""`skipbench track`: every self-speculative method on the same prompts, against full depth, per category."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.errors import SkipbenchError
from skipbench.experiments.track import TrackConfig, prompts_of, summarise


def test_track_times_every_method_on_the_same_prompts_and_checks_each_output(tiny_dirs, tmp_path):
    out = tmp_path / "track.parquet"
    res = CliRunner().invoke(app, ["track", "--model", str(tiny_dirs["llama"]), "--per-category", "1",
                                   "--draft", "early-exit:3,clasp:3,del,knapspec", "--draft", "auto", "--max-new-tokens", "6",
                                   "--max-prompt-tokens", "24", "--warmup", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    searched = json.loads(out.with_suffix(".json").read_text())["draft_search"]  # the layer set found (manifest)
    name = f"auto ({searched.count(',') + 1} layers)"  # its method name: the set's size
    assert searched.startswith("layers:0,") and f"searched draft: {name} = {searched}" in res.output
    methods = {"full", "early-exit:3", "clasp:3", "del", "knapspec", name}
    assert set(df["method"]) == methods and (df.groupby("method").size() == 13).all()  # one prompt per category
    assert df["lossless"].all()  # greedy self-speculation gives full depth's output on every prompt
    full = df[df["method"] == "full"]
    assert (full["rounds"] == full["new_tokens"] - 1).all()  # plain decoding: one token per step after the prompt's
    clasp = df[df["method"] == "clasp:3"]
    assert ((1 <= clasp["searches"]) & (clasp["searches"] <= clasp["rounds"])).all()  # after the prompt, every 16
    exits = df.loc[df["method"] == "del", "exit_mean"].dropna()  # DEL's chosen exits, where it drafted
    assert ((1 <= exits) & (exits < 6)).all() and df.loc[df["method"] != "del", "exit_mean"].isna().all()
    agg = pd.read_parquet(tmp_path / "track-agg.parquet")
    assert set(agg["category"]) == {"all", *set(full["category"])} and len(set(full["category"])) == 13
    overall = agg[agg["category"] == "all"].set_index("method")
    assert (overall["lossless"] == "13/13").all() and (overall["prompts"] == 13).all()
    for m in methods:  # Spec-Bench's definitions: a ratio of mean speeds; tokens per round pooled over the prompts
        mine = df[df["method"] == m]
        assert overall.loc[m, "speedup"] == pytest.approx(mine["tokens_per_s"].mean() / full["tokens_per_s"].mean())
        assert overall.loc[m, "tokens_per_round"] == pytest.approx((mine["new_tokens"] - 1).sum() / mine["rounds"].sum())
        assert overall.loc[m, "speedup_lo"] <= overall.loc[m, "speedup"] <= overall.loc[m, "speedup_hi"]
    assert overall.loc["full", "speedup"] == 1.0 and overall.loc["full", "tokens_per_round"] == 1.0
    assert overall.loc["early-exit:3", "tokens_per_round"] > 1.0  # some drafts were accepted
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "per category: mean speedup" in res.stdout and "per category: mean tokens per round" in res.stdout
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path), "--out", str(tmp_path / "REPORT.md")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Self-speculative methods on the same prompts (`track.parquet`)" in text and "13/13" in text
    assert "Tokens per round per category" in text and f"| {name} |" in text


def test_the_context_length_is_checked_before_the_draft_search(tiny_dirs, tmp_path, monkeypatch):
    import skipbench.evaluation.draft_search as draft_search

    def never(*args, **kwargs):
        raise AssertionError("the search ran before the length check")

    monkeypatch.setattr(draft_search, "search", never)
    res = CliRunner().invoke(app, ["track", "--model", str(tiny_dirs["llama"]), "--max-new-tokens", "100000000",
                                   "--out", str(tmp_path / "t.parquet")])
    assert res.exit_code == 1 and "exceeds the model's 1024 positions" in res.stderr  # the search never ran


def test_auto_alone_runs_the_searched_draft_alone(tiny_dirs, tmp_path):
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(app, ["track", "--model", str(tiny_dirs["llama"]), "--dataset", "spec-bench/coding",
                                   "--draft", "auto", "--max-new-tokens", "4", "--max-prompt-tokens", "24",
                                   "--warmup", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    methods = set(pd.read_parquet(out)["method"])
    assert len(methods) == 2 and "full" in methods and any(m.startswith("auto (") for m in methods)


def test_the_figures_are_spec_benchs_and_a_method_that_differs_is_flagged_not_dropped():
    rows = pd.DataFrame({"prompt": [0, 1] * 2, "item_id": ["a", "a"] * 2, "category": ["x", "y"] * 2, "method": ["full"] * 2 + ["m"] * 2,
                         "tokens_per_s": [10.0, 30.0, 30.0, 30.0], "new_tokens": [11, 21, 11, 21],
                         "rounds": [10, 20, 4, 6], "acceptance_rate": [np.nan, np.nan, 0.5, 0.7],
                         "lossless": [True, True, True, False]})
    s = summarise(rows).set_index(["method", "category"])  # the same item id twice (a repeated prompt): no matter
    assert s.loc[("m", "all"), "lossless"] == "1/2" and s.loc[("m", "y"), "lossless"] == "0/1"
    assert s.loc[("m", "all"), "speedup"] == pytest.approx(30 / 20)  # mean speeds 30 and 20, not the mean ratio 2
    assert s.loc[("m", "all"), "tokens_per_round"] == pytest.approx(30 / 10)  # 10 + 20 tokens in 4 + 6 rounds
    assert s.loc[("m", "x"), "speedup"] == pytest.approx(3.0) and s.loc[("m", "all"), "prompts"] == 2


def test_prompts_per_category_and_bad_settings():
    got = prompts_of(TrackConfig(per_category=3))
    assert len(got) == 39 and all(sum(it.subtask == c for it in got) == 3 for c in {it.subtask for it in got})
    assert len(prompts_of(TrackConfig(dataset="spec-bench/coding", per_category=0))) == 10


@pytest.mark.parametrize("args,message", [
    (["--per-category", "-1"], "--per-category must be >= 0"),
    (["--max-new-tokens", "1"], "--max-new-tokens >= 2"),
    (["--dataset", "spec-bench/poetry"], "unknown Spec-Bench category"),
    (["--draft", "laco:3"], "runs a model of its own"),
    (["--draft", "full"], "give each method once"),
    (["--draft", "early-exit:3,early-exit:3"], "give each method once"),
    (["--max-prompt-tokens", "-5"], "--max-prompt-tokens >= 0"),
    (["--max-new-tokens", "100000000", "--per-category", "1"], "exceeds the model's 1024 positions"),  # a Llama too
])
def test_bad_track_options_exit_1_with_one_line(tiny_dirs, tmp_path, args, message):
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(app, ["track", "--model", str(tiny_dirs["llama"]), "--out", str(out), *args])
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert not out.exists()


def test_the_default_methods_are_the_timed_set_and_some_method_is_needed():
    from skipbench.experiments.track import default_drafts, run

    # the set BENCHMARKS.md timed within 20 minutes (with the searched layer set beside it)
    assert [s.label for s in default_drafts(30)] == ["early-exit:22", "clasp:22", "del", "knapspec"]
    with pytest.raises(SkipbenchError, match="no method to run"):
        run(TrackConfig(drafts=(), draft_search=False))
