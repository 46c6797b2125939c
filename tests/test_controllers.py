"""Skip controllers: constant input is token-independent; training moves KL and cost the right way; e2e."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.data import DataSpec
from skipbench.engine import Engine
from skipbench.models import load_model
from skipbench.policies.controller import ControllerMethod, Controllers
from skipbench.training import TrainConfig, examples, step_loss, train


def test_constant_input_does_not_depend_on_the_token():
    c = Controllers(16, 6, "constant")
    with torch.no_grad():
        for lin in c.linears:
            lin.weight.normal_()
    h = torch.randn(3, 5, 16)
    for layer in c.gated:
        logits = c.logits(layer, h)
        assert torch.equal(logits, logits[:1, :1].expand_as(logits))
    hidden = Controllers(16, 6, "hidden")
    with torch.no_grad():
        hidden.linears[0].weight.normal_()
    assert not torch.equal(hidden.logits(1, h)[0, 0], hidden.logits(1, h)[0, 1])


def _expected(lm, method, cfg, data, draws=6):
    """Mean task loss and executed layers over fixed Gumbel draws on fixed batches."""
    engine = Engine(lm.adapter, "fill")
    tasks, layers = [], []
    with torch.no_grad():
        for d in range(draws):
            torch.manual_seed(100 + d)
            _, parts = step_loss(lm, engine, method, data[:4], cfg.loss)
            tasks.append(parts["task"])
            layers.append(parts["layers"])
    return float(np.mean(tasks)), float(np.mean(layers))


@pytest.mark.parametrize("alpha", [0.0, 20.0])
def test_training_moves_kl_and_cost(tiny_dirs, tmp_path, alpha):
    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=DataSpec("arith", limit=12), steps=25, batch_size=4,
                      lr=5e-2, max_new_tokens=8, out=str(tmp_path / f"a{alpha}"))
    method = ControllerMethod(Controllers(64, 6, "hidden", init_execute=1.0), alpha)
    data = examples(lm, cfg, None)
    kl0, layers0 = _expected(lm, method, cfg, data)
    train(lm, method, cfg)
    kl1, layers1 = _expected(lm, method, cfg, data)
    if alpha == 0:
        assert kl1 <= kl0 + 1e-6 and layers1 >= layers0  # nothing to gain from skipping
    else:
        assert layers1 < layers0 - 0.5  # a large cost weight removes layers
    for p in lm.model.parameters():  # the backbone stays frozen
        assert p.grad is None


def test_train_save_load_evaluate_end_to_end(tiny_dirs, tmp_path):
    runner = CliRunner()
    run = tmp_path / "ctrl"
    args = ["controllers", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8",
            "--input", "hidden", "--alpha", "4", "--steps", "4", "--batch-size", "2", "--max-new-tokens", "6",
            "--out", str(run)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "config.json").read_text())
    assert meta["kind"] == "controllers" and meta["step"] == 4 and meta["input"] == "hidden"
    res = runner.invoke(app, [*args[:-6], "--steps", "6", "--batch-size", "2", "--max-new-tokens", "6", "--out", str(run)])
    assert res.exit_code == 0 and json.loads((run / "config.json").read_text())["step"] == 6  # resumed to 6
    assert len(torch.load(run / "trainer.pt", weights_only=False)["log"]) == 6

    out = tmp_path / "eval.parquet"
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "4",
                              "--policy", "controller", "--controller", str(run), "--max-new-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    ctrl = df[df["policy"] == "controller"]
    assert len(ctrl) == 4 and (ctrl["cost"] == round(ctrl["layers_mean"].mean())).all()
    for rec in ctrl.itertuples():
        assert rec.layer_use[0] == rec.skipped_tokens and rec.layer_use[-1] == rec.skipped_tokens  # never gated
        assert sum(rec.layer_use) == pytest.approx(rec.layers_mean * rec.skipped_tokens)


def test_bad_controller_folder(tiny_dirs, tmp_path):
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--policy", "controller",
                                   "--controller", str(tmp_path), "--limit", "2"])
    assert res.exit_code == 1 and "not a trained controllers folder" in res.stderr
