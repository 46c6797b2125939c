"""`skipbench finetune`: the loss is transformers' masked-label loss, layer dropout is a smaller model,
early stopping follows the validation history, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import Engine
from skipbench.experiments.finetune import finetune_loss, layer_keep
from skipbench.models import load_model, wrap_model
from skipbench.models.loading import remove_layers
from skipbench.training import Example


def _hf_loss(model, ex: Example) -> torch.Tensor:
    """transformers' own loss with the prompt masked (-100): the mean over response tokens."""
    ids = torch.tensor([ex.prompt + ex.response])
    labels = torch.tensor([[-100] * len(ex.prompt) + ex.response])
    return model(input_ids=ids, labels=labels).loss


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_loss_is_the_masked_label_loss(tokenizer, family):
    lm = wrap_model(tiny_model(family, len(tokenizer)), tokenizer, "tiny")
    a, b = prompts(tokenizer, 2)
    batch = [Example(a, [5, 17, 9, 1]), Example(b, [33, 12, 1])]  # prompts of different lengths: left padding
    total = sum(len(e.response) for e in batch)
    ours, _ = finetune_loss(lm, Engine(lm.adapter), batch, total, [(0, 0, 0), (0, 0, 1)], 0.0)
    expected = sum(_hf_loss(lm.model, e) * len(e.response) for e in batch) / total
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # changing a prompt token changes the context, not what is scored: the loss counts response tokens only
    one, _ = finetune_loss(lm, Engine(lm.adapter), batch[:1], len(batch[0].response), [(0, 0, 0)], 0.0)
    torch.testing.assert_close(one, _hf_loss(lm.model, batch[0]), rtol=1e-5, atol=1e-5)


def test_layer_dropout_is_the_model_without_the_dropped_layers(tokenizer):
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    key = next((0, 0, k) for k in range(100) if 0 < int(layer_keep([(0, 0, k)], 6, 0.5)[0].sum()) < 6)
    kept = torch.nonzero(layer_keep([key], 6, 0.5)[0]).flatten().tolist()
    ex = Example(prompts(tokenizer, 1)[0], [5, 17, 9, 1])
    ours, _ = finetune_loss(lm, Engine(lm.adapter), [ex], len(ex.response), [key], 0.5)
    smaller = remove_layers(lm.model, kept, share_weights=False)
    torch.testing.assert_close(ours, _hf_loss(smaller, ex), rtol=1e-5, atol=1e-5)
    rates = layer_keep([(0, s, e) for s in range(50) for e in range(8)], 6, 0.25).float().mean()
    assert 0.7 < float(rates) < 0.8  # each layer kept with probability 1 - p


def _args(model, out, *extra):
    return ["finetune", "--model", str(model), "--dataset", "arith", "--limit", "16", "--val-limit", "3",
            "--batch-size", "4", "--lr", "1e-2", "--max-new-tokens", "6", "--out", str(out), *extra]


def test_early_stopping_follows_the_validation_history(tiny_dirs, tmp_path):
    runner, out = CliRunner(), tmp_path / "ft"
    res = runner.invoke(app, _args(tiny_dirs["llama"], out, "--steps", "12", "--eval-every", "2", "--patience", "2"))
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "config.json").read_text())
    evals = meta["evals"]
    assert [e["step"] for e in evals][:2] == [0, 2]
    best = max(evals, key=lambda e: (e["rougeL"], -e["step"]))  # the first of the best
    assert meta["best"] == best
    after = [e for e in evals if e["step"] > best["step"]]
    if meta["stopped_early"]:
        assert len(after) == 2 and evals[-1]["step"] < 12  # exactly `patience` evaluations without improvement
    else:
        assert evals[-1]["step"] == 12 and len(after) < 2
    stamp = json.loads((out / "best" / "skipbench.json").read_text())
    assert stamp["step"] == best["step"] and stamp["val_rougeL"] == best["rougeL"]
    tuned = load_model(str(out / "best"), "cpu", "float32")  # a plain model folder for --model
    assert tuned.num_layers == 6
    res = runner.invoke(app, _args(tiny_dirs["llama"], out, "--steps", "12", "--eval-every", "2", "--patience", "2"))
    assert res.exit_code == 0 and "nothing to train" in res.stderr
    res = runner.invoke(app, _args(tiny_dirs["llama"], out, "--steps", "12", "--eval-every", "2", "--patience", "3"))
    assert res.exit_code == 1 and "patience: 2 -> 3" in res.stderr and "--restart" in res.stderr


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_dirs, tmp_path):
    runner, model = CliRunner(), tiny_dirs["llama"]
    common = ("--eval-every", "2", "--patience", "50", "--layer-dropout", "0.3")
    assert runner.invoke(app, _args(model, tmp_path / "a", "--steps", "4", *common)).exit_code == 0
    res = runner.invoke(app, _args(model, tmp_path / "a", "--steps", "6", *common))
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, _args(model, tmp_path / "b", "--steps", "6", *common)).exit_code == 0
    a, b = (load_file(str(tmp_path / x / "last" / "model.safetensors")) for x in ("a", "b"))
    original = load_model(str(model), "cpu", "float32").model.state_dict()
    assert any(not torch.equal(a[k], original[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    log = torch.load(tmp_path / "a" / "trainer.pt", weights_only=False)["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
