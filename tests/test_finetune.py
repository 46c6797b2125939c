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
from skipbench.training.loop import Example


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


def test_layerskip_exit_weights_by_hand():
    """LayerSkip's e_l = e_scale sum_{i<=l} i (l < L-1), e_{L-1} = L-1 + e_scale sum_{i<=L-2} i, normalised; with
    the rotational curriculum only every R-th layer (shifted by the step) and the last keep theirs."""
    from skipbench.experiments.finetune import exit_weights

    # L = 4, e_scale 1: e = (0, 1, 0+1+2, 3 + (0+1+2)) = (0, 1, 3, 6), over 10
    assert exit_weights(4, 1.0) == pytest.approx([0.0, 0.1, 0.3, 0.6])
    # e_scale 2: (0, 2, 6, 3 + 6) over 17
    assert exit_weights(4, 2.0) == pytest.approx([0, 2 / 17, 6 / 17, 9 / 17])
    # R = 2: step 0 keeps layers 0, 2 (and the last); step 1 keeps layer 1 (and the last)
    assert exit_weights(4, 1.0, step=0, every=2) == pytest.approx([0, 0, 3 / 9, 6 / 9])
    assert exit_weights(4, 1.0, step=1, every=2) == pytest.approx([0, 1 / 7, 0, 6 / 7])


def test_layerskip_dropout_rates_rise_with_depth():
    """exp: p D(l), D(l) = exp(l ln 2 / (L-1)) - 1, from 0 at the first layer to p at the last, rising; the drawn
    keep frequencies follow 1 - p_l."""
    import numpy as np

    from skipbench.experiments.finetune import drop_rates

    rates = drop_rates(6, 0.4, "exp")
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.4) and np.all(np.diff(rates) > 0)
    assert rates[3] == pytest.approx(0.4 * (2 ** (3 / 5) - 1))
    assert drop_rates(6, 0.4, "uniform") == pytest.approx([0.4] * 6)
    keep = layer_keep([(0, s, e) for s in range(200) for e in range(10)], 6, 0.4, "exp").float().mean(0)
    assert keep.numpy() == pytest.approx(1 - rates, abs=0.04)
    assert bool(keep[0] == 1.0)  # the first layer is never dropped


def test_layerskip_early_exit_loss_against_transformers(tokenizer):
    """The loss with early exits is sum_l e~_l CE(head(norm(h_l))) where h_l are transformers' own hidden states
    (the output of layer l) and the last exit is the model's loss: computed here from model(output_hidden_states)."""
    from skipbench.experiments.finetune import exit_weights

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    a, b = prompts(tokenizer, 2)
    batch = [Example(a, [5, 17, 9, 1]), Example(b, [33, 12, 1])]
    total = sum(len(e.response) for e in batch)
    ours, parts = finetune_loss(lm, Engine(lm.adapter), batch, total, [(0, 0, 0), (0, 0, 1)], 0.0, early_exit=1.0)
    weights = exit_weights(6, 1.0)
    expected = 0.0
    for e in batch:
        ids = torch.tensor([e.prompt + e.response])
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, layer 0 .. 5 (normed last)
        target = torch.tensor(e.response)
        span = slice(len(e.prompt) - 1, len(e.prompt) - 1 + len(e.response))
        for l in range(6):
            states = hs[l + 1][0, span]
            logits = lm.model.lm_head(states if l == 5 else lm.model.model.norm(states))
            expected += weights[l] * torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    torch.testing.assert_close(ours, expected / total, rtol=1e-5, atol=1e-5)
    assert parts["last_layer"] == pytest.approx(float(sum(_hf_loss(lm.model, e) * len(e.response) for e in batch) / total),
                                                rel=1e-5)
    # e_scale 0 (the default) is the plain loss
    plain, _ = finetune_loss(lm, Engine(lm.adapter), batch, total, [(0, 0, 0), (0, 0, 1)], 0.0)
    assert float(plain) == pytest.approx(parts["last_layer"], rel=1e-6)


def test_layerskip_recipe_end_to_end_and_older_runs_resume(tiny_dirs, tmp_path):
    """`finetune --layer-dropout P --dropout-schedule exp --early-exit-loss E --early-exit-every R` trains and logs
    the last layer's loss beside the weighted one; a run saved before these options existed resumes with their
    defaults and is refused with any other value."""
    runner, model = CliRunner(), tiny_dirs["llama"]
    recipe = ("--layer-dropout", "0.3", "--dropout-schedule", "exp", "--early-exit-loss", "1", "--early-exit-every", "2")
    res = runner.invoke(app, _args(model, tmp_path / "ls", "--steps", "3", "--eval-every", "3", *recipe))
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ls" / "config.json").read_text())
    assert meta["dropout_schedule"] == "exp" and meta["early_exit_loss"] == 1.0 and meta["early_exit_every"] == 2
    log = torch.load(tmp_path / "ls" / "trainer.pt", weights_only=False)["log"]
    assert len(log) == 3 and all("last_layer" in r for r in log)
    res = runner.invoke(app, _args(model, tmp_path / "ls", "--steps", "3", "--eval-every", "3", "--dropout-schedule", "nope"))
    assert res.exit_code != 0 and "nope" in res.output + res.stderr
    # an older run: its config has none of the three fields
    old = tmp_path / "old"
    assert runner.invoke(app, _args(model, old, "--steps", "2", "--eval-every", "2")).exit_code == 0
    meta = json.loads((old / "config.json").read_text())
    for k in ("dropout_schedule", "early_exit_loss", "early_exit_every"):
        meta.pop(k)
    (old / "config.json").write_text(json.dumps(meta))
    res = runner.invoke(app, _args(model, old, "--steps", "3", "--eval-every", "2"))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, _args(model, old, "--steps", "4", "--eval-every", "2", "--early-exit-loss", "1"))
    assert res.exit_code == 1 and "early_exit_loss: 0.0 -> 1.0" in res.stderr
