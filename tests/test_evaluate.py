"""`skipbench evaluate` end to end on a tiny model: schema, rows, fidelity, resume without duplicates."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.data import DataSpec
from skipbench.policies import parse_policies
from skipbench.evaluation import quality as ev

COLUMNS = {"run_id", "model", "dataset", "item_id", "policy", "cost", "layers_mean", "prompt_tokens", "new_tokens",
           "output", "reference", "rougeL", "full_rougeL", "exact_match", "seed", "subtask", "layer_use"}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_evaluate_cli_end_to_end(tiny_dirs, tmp_path):
    out = tmp_path / "eval.parquet"
    res = cli("evaluate", "--model", tiny_dirs["llama"], "--dataset", "arith", "--policy", "uniform",
              "--costs", "2,4", "--limit", 6, "--max-new-tokens", 8, "--batch-size", 4, "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert COLUMNS <= set(df.columns)
    assert len(df) == 6 * 3 and not df.duplicated(["policy", "cost", "item_id"]).any()
    assert sorted(set(zip(df["policy"], df["cost"]))) == [("full", 6), ("uniform", 2), ("uniform", 4)]
    full = df[df["policy"] == "full"]
    assert (full["full_rougeL"] == 1.0).all() and (full["layers_mean"] == 6).all()
    uni = df[df["policy"] == "uniform"]
    assert (uni["layers_mean"] == uni["cost"]).all()  # a static plan: measured == nominal
    for rec in df.itertuples():
        assert sum(rec.layer_use) == rec.layers_mean * rec.skipped_tokens
    assert df["item_id"].nunique() == 6 and df["exact_match"].notna().all()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["points"] == ["full:6", "uniform:2", "uniform:4"] and meta["layers_convention"] == "input"
    assert meta["versions"]["transformers"] and meta["git_sha"] is not None


def test_interrupted_sweep_resumes_without_duplicates(tiny_dirs, tmp_path):
    out = tmp_path / "sweep.parquet"
    cfg = ev.EvalConfig(model=str(tiny_dirs["opt"]), data=DataSpec(name="text", limit=5), policies=tuple(parse_policies("early-exit:2,3,5")),
                        max_new_tokens=6, batch_size=2, out=str(out))

    class Interrupt(Exception):
        pass

    def stop_after_first(point):
        raise Interrupt(point)

    with pytest.raises(Interrupt):
        ev.run(cfg, on_part=stop_after_first)
    assert not out.exists()  # no half-written result
    assert len(list((tmp_path / ".skipbench-parts").glob("*.parquet"))) == 1

    res = cli("evaluate", "--model", tiny_dirs["opt"], "--dataset", "text", "--limit", 5, "--policy", "early-exit",
              "--costs", "2,3,5", "--max-new-tokens", 6, "--batch-size", 2, "--out", out)
    assert res.exit_code == 0, res.output
    assert "1 finished part(s) reused" in res.stderr
    df = pd.read_parquet(out)
    assert len(df) == 5 * 4 and not df.duplicated(["policy", "cost", "item_id"]).any()

    again = ev.run(cfg)
    assert again.reused_parts == 4 and again.path == out
    pd.testing.assert_frame_equal(again.rows, df)


def test_random_policy_is_per_item_reproducible_across_batch_sizes(tiny_dirs, tmp_path):
    def layer_use(bs):
        cfg = ev.EvalConfig(model=str(tiny_dirs["llama"]), data=DataSpec(name="arith", limit=5), policies=tuple(parse_policies("random:3", seed=4)),
                            seed=4, max_new_tokens=6, batch_size=bs, out=str(tmp_path / f"r{bs}.parquet"))
        df = ev.run(cfg).rows
        df = df[df["policy"] == "random"].set_index("item_id")
        return {i: tuple(u) for i, u in df["layer_use"].items()}

    assert layer_use(1) == layer_use(5)


def test_evaluate_bad_inputs(tiny_dirs, tmp_path):
    for args, msg in [
        (["--costs", "2,9"], "between 1 and 6"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--out", tmp_path / "x.csv"], "must end in .parquet"),
        (["--dataset", tmp_path / "none.jsonl"], "not found"),
    ]:
        res = cli("evaluate", "--model", tiny_dirs["llama"], "--limit", 2, *args)
        assert res.exit_code == 1 and msg in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1


def test_a_model_folder_written_again_is_not_served_old_parts(tokenizer, tmp_path):
    """A local model (a fine-tuned backbone) is identified by its files, not its path: after it is written
    again, evaluate recomputes instead of reusing the parts of the old weights."""
    import shutil

    from conftest import tiny_model

    folder = tmp_path / "model"
    tiny_model("llama", len(tokenizer), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = ev.EvalConfig(model=str(folder), data=DataSpec(name="text", limit=2), policies=tuple(parse_policies("uniform:3")),
                        max_new_tokens=4, batch_size=2, out=str(tmp_path / "e.parquet"))
    first = ev.run(cfg)
    assert ev.run(cfg).reused_parts == 2  # same files: reused
    shutil.rmtree(folder)
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(folder)  # "fine-tuned again": new weights
    tokenizer.save_pretrained(folder)
    again = ev.run(cfg)
    assert again.reused_parts == 0
    assert list(again.rows["output"]) != list(first.rows["output"])
