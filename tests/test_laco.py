"""LaCo (`laco:C`): the RDSC merge against a direct computation, the search down to C layers, and the collapsed
model folder: it loads in transformers and gives the strategy's own tokens and logits."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import generate
from skipbench.models import load_model, wrap_model
from skipbench.policies import parse_policies
from skipbench.policies.laco import collapse, rdsc


def _layer(model, i):
    return {k: v.clone() for k, v in model.model.layers[i].state_dict().items()}


def _expected(a, *rest):
    """RDSC by hand: the first layer plus the differences of the others, norms the first layer's."""
    return {k: a[k] if "norm" in k else a[k] + sum(r[k] - a[k] for r in rest) for k in a}


def test_rdsc_is_the_first_layer_plus_the_differences(tokenizer):
    """theta* = theta_l + sum_k (theta_{l+k} - theta_l) for the attention and MLP weights, the first layer's norms
    kept: identical layers give that layer back; otherwise the direct sum of the differences."""
    model = tiny_model("llama", len(tokenizer))
    a, b, c = (_layer(model, i) for i in (2, 3, 4))
    merged = rdsc([a, b, c])
    assert set(merged) == set(a) and any("norm" in k for k in merged) and any("mlp" in k for k in merged)
    expected = _expected(a, b, c)
    for k in a:
        torch.testing.assert_close(merged[k], expected[k])
        if "norm" not in k:
            assert not torch.equal(merged[k], a[k])
    same = rdsc([a, copy.deepcopy(a), copy.deepcopy(a)])
    for k in a:
        torch.testing.assert_close(same[k], a[k])


def test_collapse_merges_runs_until_c_layers_remain(tokenizer):
    """With a threshold every merge passes, the search merges from the top: runs of 3 into layer 3 (keeping 4 of 6
    layers), its weights theta_4 + theta_5 - theta_3; the other layers untouched; the original left as it was."""
    model = tiny_model("llama", len(tokenizer))
    before = {i: _layer(model, i) for i in range(6)}
    ids = [torch.tensor([p]) for p in prompts(tokenizer, 2)]
    small, merges, origin = collapse(model, 4, ids, merge=3, threshold=-1.0, interval=2, lowest=1)
    assert small.config.num_hidden_layers == 4 and len(small.model.layers) == 4 and origin == [0, 1, 2, 3]
    assert [(m.into, m.layers, m.accepted_above_threshold) for m in merges] == [(3, (3, 4, 5), True)]
    expected = _expected(before[3], before[4], before[5])
    for k, v in _layer(small, 3).items():
        torch.testing.assert_close(v, expected[k])  # theta_4 + theta_5 - theta_3, layer 3's norms
    for i in range(3):
        for k, v in _layer(small, i).items():
            assert torch.equal(v, before[i][k])
    assert len(model.model.layers) == 6 and all(torch.equal(_layer(model, 3)[k], before[3][k]) for k in before[3])
    # a threshold no merge passes: each pass keeps its most similar merge instead, and says so
    _, merges, origin = collapse(model, 3, ids, merge=2, threshold=1.5, interval=1, lowest=1)
    assert len(origin) == 3 and merges and not any(m.accepted_above_threshold for m in merges)
    assert all(-1 <= m.similarity <= 1 for m in merges)


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_laco_folder_loads_in_transformers_and_equals_the_strategy(family, tiny_dirs, tmp_path, monkeypatch, tokenizer):
    """`laco:4` writes a plain model folder once (the cache) whose merged layer is RDSC of the original layers; its
    policy runs that model: the tokens of transformers' generate on the folder, the logits of its forward; `plan`
    prints the merges and the folder."""
    from transformers import AutoModelForCausalLM

    from skipbench.data import DataSpec
    from skipbench.policies.laco import _stack, folder

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(tiny_dirs[family]), "cpu", "float32")
    spec = parse_policies("laco:4", policy_options={"merge": "3", "threshold": "-1", "calibration": "2"})[0]
    data = DataSpec(name="text", split="test")
    policy = spec.build(6, lm, data)
    assert policy.lm is not None and policy.lm.num_layers == 4 and policy.executed_layers() == [0, 1, 2, 3]
    path, record = folder(spec, type("Ctx", (), {"lm": lm, "data": data})())
    assert record["origin"] == spec.plan(6, lm, data) and len(record["merges"]) >= 1
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert hf.config.num_hidden_layers == 4
    first = record["merges"][0]  # threshold -1: the first try, layers 3, 4, 5 into 3
    assert first["layers"] == [3, 4, 5] and record["origin"] == [0, 1, 2, 3]
    original = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in _stack(lm.model).layers]
    expected = _expected(*(original[i] for i in first["layers"]))
    for k, v in _stack(hf).layers[3].state_dict().items():
        torch.testing.assert_close(v, expected[k])
    ps = prompts(tokenizer, 3)
    ours = generate(lm, ps, policy, 8, stop_at_eos=False)
    theirs = generate(wrap_model(hf, tokenizer, "hf"), ps, None, 8, stop_at_eos=False)
    assert ours.tokens == theirs.tokens and all(len(r) == 4 for row in ours.layers for r in row)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ps[0]]), output_hidden_states=False).logits
        from skipbench.engine import Engine

        eng = Engine(policy.lm.adapter)
        ids = torch.tensor([ps[0]])
        mine = eng.forward(ids, eng.prompt_cache(torch.ones_like(ids, dtype=torch.bool), ids.shape[1]), policy).logits
    torch.testing.assert_close(mine, out, rtol=1e-4, atol=1e-4)
    mtime = (path / "config.json").stat().st_mtime_ns
    spec.build(6, lm, data)  # read back, not collapsed again
    assert (path / "config.json").stat().st_mtime_ns == mtime
    if family != "llama":
        return
    res = CliRunner().invoke(app, ["plan", "--model", str(tiny_dirs["llama"]), "--policy", "laco:4",
                                   "-o", "merge=3", "-o", "threshold=-1", "-o", "calibration=2"])
    assert res.exit_code == 0, res.output
    assert "folder" in res.output and "3,4,5" in res.output and res.output.strip().endswith("0 1 2 3")


def test_laco_in_evaluate_and_where_it_cannot_go(tiny_dirs, tmp_path, monkeypatch):
    """evaluate runs `laco:C` on the collapsed model (C layers per token); a router or a draft, which need the full
    model's layers, refuse it in one line."""
    import pandas as pd

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev.parquet"
    args = ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--split", "test", "--limit", "4",
            "--max-new-tokens", "6", "--policy", "laco:4", "-o", "merge=2", "-o", "threshold=-1", "-o", "calibration=2"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    laco = df[df["policy_spec"].str.startswith("laco")]
    assert len(laco) == 4 and (laco["layers_mean"] == 4).all()
    use = laco["layer_use"].iloc[0]  # counted on the loaded model's layers: the merged runs' first layers
    assert len(use) == 6 and [i for i, n in enumerate(use) if n] == [0, 1, 2, 4]
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--split",
                                   "test", "--limit", "2", "--max-new-tokens", "4", "--policy", "full", "--draft",
                                   "laco:4", "--out", str(tmp_path / "d.parquet")])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1 and "cache" in res.stderr
    assert not (tmp_path / "d.parquet").exists()


@pytest.mark.parametrize("bad", ["merge=1", "interval=0"])
def test_laco_refuses_bad_options(tiny_dirs, tmp_path, monkeypatch, bad):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["plan", "--model", str(tiny_dirs["llama"]), "--policy", "laco:4", "-o", bad])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1 and "merge must be" in res.stderr


def test_rdsc_code_is_the_notebooks_in_place_merge_the_last_layer_of_the_run(tokenizer):
    """`rdsc=code`: the authors' notebook adds theta_{l+k} - theta_l to the already-updated theta_l in place, which
    telescopes to the run's last layer; `rdsc=paper` is the paper's sum. Both keep the first layer's norms, in the
    merge and in a collapsed model."""
    model = tiny_model("llama", len(tokenizer))
    a, b, c = (_layer(model, i) for i in (3, 4, 5))
    code, paper = rdsc([a, b, c], "code"), rdsc([a, b, c], "paper")
    for k in a:
        notebook = a[k].clone()
        for other in (b, c):  # merge_layers_return_model: weight.data.add_(other - weight.data)
            notebook.add_(other[k] - notebook)
        torch.testing.assert_close(paper[k], _expected(a, b, c)[k])
        if "norm" in k:
            assert torch.equal(code[k], a[k]) and torch.equal(paper[k], a[k])
            continue
        assert torch.equal(code[k], notebook)
        torch.testing.assert_close(code[k], c[k])
        assert not torch.allclose(code[k], paper[k])
    ids = [torch.tensor([p]) for p in prompts(tokenizer, 2)]
    small, merges, _ = collapse(model, 4, ids, merge=3, threshold=-1.0, interval=2, lowest=1, form="code")
    assert [m.layers for m in merges] == [(3, 4, 5)]
    for k, v in _layer(small, 3).items():
        torch.testing.assert_close(v, a[k] if "norm" in k else c[k])


def test_below_threshold_stop_keeps_the_depth_and_force_counts_forced_merges_in_rows(tiny_dirs, tmp_path,
                                                                                    monkeypatch):
    """A threshold no cosine can pass: `below-threshold=stop` merges nothing (6 layers run, a note says the model
    keeps 6, not 4; `plan` shows it stopped); `force` (the default) reaches 4 layers with 2 forced merges of 2, and
    every row of evaluate and lm-eval says so (`laco_forced_merges`, `laco_rdsc`, `laco_below_threshold`); `plan`
    marks them forced."""
    import pandas as pd

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    model = ["--model", str(tiny_dirs["llama"])]
    opts = ["-o", "merge=2", "-o", "threshold=1.5", "-o", "calibration=2"]
    ev = ["evaluate", *model, "--dataset", "arith", "--split", "test", "--limit", "3", "--max-new-tokens", "4",
          "--policy", "laco:4", *opts]
    res = CliRunner().invoke(app, [*ev, "-o", "below-threshold=stop", "--out", str(tmp_path / "stop.parquet")])
    assert res.exit_code == 0, res.output
    assert "below-threshold=stop): the model keeps 6 layers, not 4" in res.stderr
    rows = pd.read_parquet(tmp_path / "stop.parquet")
    laco = rows[rows["policy_spec"] == "laco:4[below-threshold=stop;calibration=2;merge=2;threshold=1.5]"]
    assert len(laco) == 3 and (laco["layers_mean"] == 6).all() and (laco["laco_forced_merges"] == 0).all()
    assert set(laco["laco_below_threshold"]) == {"stop"} and set(laco["laco_rdsc"]) == {"paper"}
    res = CliRunner().invoke(app, ["plan", *model, "--policy", "laco:4", *opts, "-o", "below-threshold=stop"])
    assert res.exit_code == 0 and "stopped" in res.output and res.output.strip().endswith("0 1 2 3 4 5")

    res = CliRunner().invoke(app, [*ev, "--out", str(tmp_path / "force.parquet")])
    assert res.exit_code == 0, res.output
    assert "2 of 2 merges were forced below the threshold 1.5" in res.stderr
    rows = pd.read_parquet(tmp_path / "force.parquet")
    laco = rows[rows["policy"] == "laco"]
    assert len(laco) == 3 and (laco["layers_mean"] == 4).all() and (laco["laco_forced_merges"] == 2).all()
    assert set(laco["laco_below_threshold"]) == {"force"} and rows[rows["policy"] == "full"]["laco_rdsc"].isna().all()
    res = CliRunner().invoke(app, ["plan", *model, "--policy", "laco:4", *opts])
    assert res.exit_code == 0 and res.output.count("no: forced") == 2

    out = tmp_path / "lm.parquet"
    res = CliRunner().invoke(app, ["lm-eval", *model, "--tasks", "skipbench_choice", "--policy", "laco:4", *opts,
                                   "-o", "rdsc=code", "--limit", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lm = pd.read_parquet(out)
    laco = lm[lm["policy"] == "laco"]
    assert len(laco) and (laco["laco_forced_merges"] == 2).all() and set(laco["laco_rdsc"]) == {"code"}
    # carried into the summaries compare builds its rows from (every column LaCo records is registered there)
    from skipbench.analysis.lmeval_tables import POINT_COLUMNS, summarise

    assert {c for c in lm.columns if c.startswith("laco_")} <= set(POINT_COLUMNS)
    s = summarise(lm)
    assert (s.loc[s["policy_spec"].str.startswith("laco"), "laco_forced_merges"] == 2).all()


@pytest.mark.parametrize("bad", ["rdsc=both", "below-threshold=skip"])
def test_laco_refuses_bad_rdsc_and_below_threshold(tiny_dirs, tmp_path, monkeypatch, bad):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["plan", "--model", str(tiny_dirs["llama"]), "--policy", "laco:4", "-o", bad])
    name, _, value = bad.partition("=")
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1
    assert f"option {name} must be one of" in res.stderr and f"got '{value}'" in res.stderr
    assert not (tmp_path / "cache").exists()
