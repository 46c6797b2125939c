"""`skipbench track`: every self-speculative method on the same prompts, against full depth, per category."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.experiments.track import TrackConfig, prompts_of, summarise


def test_track_times_every_method_on_the_same_prompts_and_checks_each_output(tiny_dirs, tmp_path):
    out = tmp_path / "track.parquet"
    res = CliRunner().invoke(app, ["track", "--model", str(tiny_dirs["llama"]), "--per-category", "1",
                                   "--draft", "early-exit:3,clasp:3", "--max-new-tokens", "6",
                                   "--max-prompt-tokens", "24", "--warmup", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    methods = {"full", "early-exit:3", "clasp:3"}
    assert set(df["method"]) == methods and (df.groupby("method").size() == 13).all()  # one prompt per category
    assert df["lossless"].all()  # greedy self-speculation gives full depth's output on every prompt
    full = df[df["method"] == "full"]
    assert (full["speedup"] == 1.0).all() and (full["tokens_per_round"] == 1.0).all()
    seconds = df.pivot(index="item_id", columns="method", values="seconds")
    for m in methods - {"full"}:
        mine = df[df["method"] == m].set_index("item_id")
        assert np.allclose(mine["speedup"], (seconds["full"] / seconds[m]).loc[mine.index])
        assert (mine["tokens_per_round"] >= 1).all() and (mine["rounds"] >= 1).all()
    assert (df.loc[df["method"] == "clasp:3", "clasp_searches"] >= 1).all()
    agg = pd.read_parquet(tmp_path / "track-agg.parquet")
    assert set(agg["category"]) == {"all", *set(full["category"])} and len(set(full["category"])) == 13
    overall = agg[agg["category"] == "all"].set_index("method")
    assert overall.loc["full", "speedup"] == 1.0 and (overall["lossless"] == "13/13").all()
    assert overall.loc["clasp:3", "speedup"] == pytest.approx(df.loc[df["method"] == "clasp:3", "speedup"].mean())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "per category" in res.stdout
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path), "--out", str(tmp_path / "REPORT.md")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Self-speculative methods on the same prompts (`track.parquet`)" in text and "13/13" in text


def test_a_method_that_differs_from_full_depth_is_flagged_not_dropped():
    rows = pd.DataFrame({"item_id": ["a", "b"] * 2, "category": ["x", "y"] * 2, "method": ["full"] * 2 + ["m"] * 2,
                         "speedup": [1.0, 1.0, 1.2, 0.8], "tokens_per_round": [1.0, 1.0, 2.0, 3.0],
                         "acceptance_rate": [np.nan, np.nan, 0.5, 0.7], "lossless": [True, True, True, False]})
    s = summarise(rows).set_index(["method", "category"])
    assert s.loc[("m", "all"), "lossless"] == "1/2" and s.loc[("m", "y"), "lossless"] == "0/1"
    assert s.loc[("m", "all"), "speedup"] == pytest.approx(1.0) and s.loc[("m", "all"), "prompts"] == 2


def test_prompts_per_category_and_bad_settings():
    got = prompts_of(TrackConfig(per_category=3))
    assert len(got) == 39 and all(sum(it.subtask == c for it in got) == 3 for c in {it.subtask for it in got})
    assert len(prompts_of(TrackConfig(dataset="spec-bench/coding", per_category=0))) == 10


@pytest.mark.parametrize("args,message", [
    (["--per-category", "-1"], "--per-category must be >= 0"),
    (["--max-new-tokens", "1"], "--max-new-tokens >= 2"),
    (["--dataset", "spec-bench/poetry"], "unknown Spec-Bench category"),
    (["--draft", "laco:3"], "runs a model of its own"),
])
def test_bad_track_options_exit_1_with_one_line(tiny_dirs, args, message):
    res = CliRunner().invoke(app, ["track", "--model", str(tiny_dirs["llama"]), *args])
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
