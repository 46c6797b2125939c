"""Skip controllers: constant input is token-independent; training moves KL and cost the right way; e2e."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.data import DataSpec
from skipbench.engine import Engine
from skipbench.models import load_model
from skipbench.policies.controller import ControllerMethod, Controllers
from skipbench.training.loop import TrainConfig, examples, step_loss, train


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
            _, parts = step_loss(lm, engine, method, data[:4], cfg.loss, keys=[(100 + d, r) for r in range(4)])
            tasks.append(parts["task"])
            layers.append(parts["layers"])
    return float(np.mean(tasks)), float(np.mean(layers))


@pytest.mark.parametrize("alpha", [0.0, 20.0])
def test_training_moves_kl_and_cost(tiny_dirs, tmp_path, alpha):
    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=DataSpec(name="arith", limit=12), steps=25, batch_size=4,
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
    res = runner.invoke(app, [*args[:-8], "--steps", "6", "--batch-size", "2", "--max-new-tokens", "6", "--out", str(run)])
    assert res.exit_code == 0 and json.loads((run / "config.json").read_text())["step"] == 6  # resumed to 6
    assert len(torch.load(run / "trainer.pt", weights_only=False)["log"]) == 6

    out = tmp_path / "eval.parquet"
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "4",
                              "--policy", "controller", "--controller", str(run), "--max-new-tokens", "6", "--out", str(out)])
    assert res.exit_code == 1 and "were used to train" in res.stderr and "--split test" in res.stderr  # split all
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "4",
                              "--split", "test", "--policy", "controller", "--controller", str(run),
                              "--max-new-tokens", "6", "--out", str(out)])
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


def _backbone_setup(tiny_dirs, tmp_path, double=False):
    from skipbench.models.loading import wrap_model
    from skipbench.training.loop import _unfreeze_backbone

    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    if double:  # finite differences need float64
        lm = wrap_model(lm.model.double(), lm.tokenizer, lm.name)
    cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=DataSpec(name="arith", limit=6), max_new_tokens=6,
                      train_backbone=True, out=str(tmp_path))
    controllers = Controllers(64, 6, "hidden", init_execute=0.5).to(lm.dtype)
    method = ControllerMethod(controllers, 2.0)
    data = examples(lm, cfg, None)[:3]
    teacher = _unfreeze_backbone(lm, method, cfg)
    return lm, method, data, teacher


def test_joint_pass_equals_the_prefilled_one(tiny_dirs, tmp_path):
    """With the backbone trainable, prompt and response run in one pass: same loss, same controller gradients."""
    lm, method, data, teacher = _backbone_setup(tiny_dirs, tmp_path)
    engine = Engine(lm.adapter, "fill")
    grads = []
    for t in (None, teacher):
        method.controllers.zero_grad()
        torch.manual_seed(3)
        loss, parts = step_loss(lm, engine, method, data, "kl", teacher=t)
        loss.backward()
        grads.append((float(loss.detach()), parts["layers"], [p.grad.clone() for p in method.controllers.parameters()]))
    (l0, layers0, g0), (l1, layers1, g1) = grads
    assert l1 == pytest.approx(l0, rel=1e-5) and layers1 == layers0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_backbone_gradient_includes_the_prompt(tiny_dirs, tmp_path):
    """The backbone's gradient matches finite differences, which a no-grad prompt prefill would miss."""
    lm, method, data, teacher = _backbone_setup(tiny_dirs, tmp_path, double=True)
    engine = Engine(lm.adapter, "fill")
    weight = lm.model.model.layers[0].self_attn.k_proj.weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype)

    def loss(t):
        torch.manual_seed(3)  # the same Gumbel draws every time
        return step_loss(lm, engine, method, data, "kl", teacher=t)[0]

    def shifted(eps):
        with torch.no_grad():
            weight.add_(eps * direction)
            value = float(loss(teacher))
            weight.sub_(eps * direction)
        return value

    def directional(t):
        lm.model.zero_grad()
        loss(t).backward()
        return float((weight.grad * direction).sum())

    eps = 1e-3  # RMSNorm computes in fp32 even in a float64 model: smaller steps drown in its rounding
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    joint, response_only = directional(teacher), directional(None)
    assert joint == pytest.approx(numeric, rel=1e-3)
    assert abs(response_only - numeric) > 0.05 * abs(numeric)  # the prompt's K/V carry part of the gradient


def test_teacher_stays_the_original_model(tiny_dirs, tmp_path):
    lm, method, data, teacher = _backbone_setup(tiny_dirs, tmp_path)
    original = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    ids = torch.tensor([data[0].prompt + data[0].response])
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.05)
        expected = original.model(ids).logits
        cache = teacher.new_cache(1, ids.shape[1], lm.device, lm.dtype)
        torch.testing.assert_close(teacher.forward(ids, cache).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(lm.model(ids).logits, expected, atol=1e-3)


def test_train_backbone_end_to_end(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    runner = CliRunner()
    run, model = tmp_path / "joint", str(tiny_dirs["llama"])
    args = ["controllers", "train", "--model", model, "--dataset", "arith", "--limit", "8", "--alpha", "4",
            "--batch-size", "2", "--max-new-tokens", "6", "--train-backbone", "--backbone-lr", "1e-3", "--out", str(run)]
    res = runner.invoke(app, [*args, "--steps", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--steps", "4"])  # resumes the controllers, the backbone and the optimiser
    assert res.exit_code == 0, res.output
    assert json.loads((run / "backbone" / "skipbench.json").read_text())["step"] == 4
    assert len(torch.load(run / "trainer.pt", weights_only=False)["log"]) == 4
    trained, original = load_model(str(run / "backbone"), "cpu", "float32"), load_model(model, "cpu", "float32")
    saved = load_file(str(run / "backbone" / "model.safetensors"))
    changed = [k for k, v in original.model.state_dict().items() if not torch.equal(v, trained.model.state_dict()[k])]
    assert changed and all(torch.equal(saved[k], trained.model.state_dict()[k]) for k in saved)

    out = tmp_path / "eval.parquet"
    base = ["evaluate", "--dataset", "arith", "--split", "test", "--limit", "3", "--policy", "controller", "--controller", str(run),
            "--max-new-tokens", "6", "--out", str(out)]
    res = runner.invoke(app, [*base, "--model", model])
    assert res.exit_code == 1 and "--model" in res.stderr and "backbone" in res.stderr and not out.exists()
    res = runner.invoke(app, [*base, "--model", str(run / "backbone")])
    assert res.exit_code == 0, res.output
    assert set(pd.read_parquet(out)["policy"]) == {"full", "controller"}


def test_sampled_gates_do_not_depend_on_batching(tiny_dirs, tmp_path):
    """Gumbel noise per (seed, item, position): batch 1 and batch 4 take the same sampled decisions."""
    runner, model, run = CliRunner(), str(tiny_dirs["llama"]), tmp_path / "ctrl"
    res = runner.invoke(app, ["controllers", "train", "--model", model, "--dataset", "arith", "--limit", "8",
                              "--alpha", "20", "--lr", "5e-2", "--steps", "6", "--batch-size", "4",
                              "--max-new-tokens", "6", "--out", str(run)])
    assert res.exit_code == 0, res.output
    frames = []
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}" / "eval.parquet"
        res = runner.invoke(app, ["evaluate", "--model", model, "--dataset", "arith", "--split", "test", "--limit", "6", "--policy",
                                  "controller", "--controller", str(run), "--max-new-tokens", "8",
                                  "--batch-size", str(bs), "--out", str(out)])
        assert res.exit_code == 0, res.output
        frames.append(pd.read_parquet(out).query("policy == 'controller'").reset_index(drop=True))
    a, b = frames
    assert a["layers_mean"].mean() < 6  # the gates do skip, so the comparison means something
    assert list(a["output"]) == list(b["output"])
    assert [list(x) for x in a["layer_use"]] == [list(x) for x in b["layer_use"]]


def test_a_checkpoint_is_resumed_only_by_its_own_configuration(tiny_dirs, tmp_path):
    runner, run = CliRunner(), tmp_path / "ctrl"
    args = ["controllers", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8",
            "--batch-size", "2", "--max-new-tokens", "6", "--out", str(run)]

    def train(*extra):
        return runner.invoke(app, [*args, *extra])

    assert train("--alpha", "4", "--steps", "2").exit_code == 0
    for extra, named in ((("--alpha", "8"), "alpha: 4.0 -> 8.0"), (("--lr", "0.01"), "train.lr: 0.001 -> 0.01"),
                         (("--input", "constant"), "input: 'hidden' -> 'constant'")):
        res = train("--steps", "3", *extra)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and named in lines[0] and "--restart" in lines[0], res.stderr
    assert json.loads((run / "config.json").read_text())["step"] == 2  # untouched
    res = train("--alpha", "4", "--steps", "2")
    assert res.exit_code == 0 and "nothing to train" in res.stderr
    res = train("--alpha", "4", "--steps", "1")
    assert res.exit_code == 1 and "trained for 2 steps, more than --steps 1" in res.stderr
    res = train("--alpha", "8", "--steps", "3", "--restart")
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "config.json").read_text())
    assert meta["alpha"] == 8.0 and meta["step"] == 3
    assert len(torch.load(run / "trainer.pt", weights_only=False)["log"]) == 3  # from scratch, not 2 + 1


def test_prompts_that_do_not_fit_are_counted(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=DataSpec(name="text", limit=12), max_new_tokens=4, out="")
    from skipbench.data import load_items
    from skipbench.data.prompts import encode_prompt

    lengths = sorted(len(encode_prompt(lm.tokenizer, it.prompt)) for it in load_items(cfg.data))
    cut = lengths[len(lengths) // 2] + 1  # about half the prompts do not fit
    notes: list[str] = []
    data = examples(lm, replace(cfg, max_seq_len=cut), None, notes=notes)
    dropped = sum(n >= cut - 1 for n in lengths)
    assert 0 < dropped < 12 and len(data) <= 12 - dropped
    assert notes and notes[0].startswith(f"{dropped} of 12 training prompts do not fit --max-seq-len {cut}")


def test_retrained_controllers_are_evaluated_again(tiny_dirs, tmp_path):
    """Cached evaluate parts are keyed by the checkpoint's contents, not only its folder."""
    runner, run, model = CliRunner(), tmp_path / "ctrl", str(tiny_dirs["llama"])
    train = ["controllers", "train", "--model", model, "--dataset", "arith", "--limit", "8", "--steps", "2",
             "--batch-size", "2", "--max-new-tokens", "6", "--lr", "0.05", "--out", str(run)]
    ev = ["evaluate", "--model", model, "--dataset", "arith", "--split", "test", "--limit", "3", "--policy", "controller",
          "--controller", str(run), "--max-new-tokens", "5", "--out", str(tmp_path / "e.parquet")]
    assert runner.invoke(app, [*train, "--alpha", "1"]).exit_code == 0
    assert runner.invoke(app, ev).exit_code == 0
    res = runner.invoke(app, ev)
    assert "2 finished part(s) reused" in res.stderr.replace("\n", " ")
    assert runner.invoke(app, [*train, "--alpha", "30", "--restart"]).exit_code == 0
    res = runner.invoke(app, ev)
    assert res.exit_code == 0 and "1 finished part(s) reused" in res.stderr.replace("\n", " ")  # full only


def test_alpha_units_fraction_is_the_authors_code_and_sum():
    c = Controllers(16, 6, "hidden")
    gates = [torch.tensor([[1.0, 0.0, 1.0]], requires_grad=True) for _ in c.gated]  # 4 gated layers, 3 tokens
    mask = torch.tensor([[True, True, False]])
    summed, parts = ControllerMethod(c, 2.0, alpha_units="sum").regulariser(gates, mask)
    assert float(summed.detach()) == 2.0 * (4 + 0)  # token 0 runs all 4 gated layers, token 1 none; token 2 is masked
    assert parts["layers"] == pytest.approx((6 + 2) / 2)  # first and last always run
    # the default is the authors' code (AdalasOPT): per layer, the ungated first and last included, the fraction of
    # response tokens executing it; alpha x the mean over all L layers (here one sequence, so per-token = per-sequence)
    default, _ = ControllerMethod(c, 2.0).regulariser(gates, mask)
    per_layer = [torch.ones(()), *[(g[0, :2]).mean() for g in gates], torch.ones(())]  # tokens 0 and 1 are real
    adalas = 2.0 * torch.stack(per_layer).mean()
    assert float(default.detach()) == pytest.approx(2 * float(adalas.detach()))  # per-token sum over the 2 real tokens
    grads = []
    for units, alpha in (("sum", 2.0), ("fraction", 2.0 * 6)):
        for g in gates:
            g.grad = None
        ControllerMethod(c, alpha, alpha_units=units).regulariser(gates, mask)[0].backward()
        grads.append(torch.stack([g.grad for g in gates]))
    torch.testing.assert_close(grads[0], grads[1])  # the same pressure per gate: alpha_fraction = L alpha_sum
    assert ControllerMethod(c, 1.0, alpha_units="fraction").config()["alpha_units"] == "fraction"
    with pytest.raises(Exception, match="--alpha-units must be one of fraction, sum"):
        ControllerMethod(c, 1.0, alpha_units="mean")


def test_sweep_says_how_many_prompts_were_left_out(tiny_dirs, tmp_path):
    from skipbench.data import load_items
    from skipbench.data.prompts import encode_prompt

    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    lengths = sorted(len(encode_prompt(lm.tokenizer, it.prompt)) for it in load_items(DataSpec(name="text", split="train", limit=12)))
    cut = lengths[len(lengths) // 2] + 1  # about half the prompts do not fit
    res = CliRunner().invoke(app, ["controllers", "sweep", "--model", str(tiny_dirs["llama"]), "--dataset", "text",
                                   "--inputs", "constant", "--alpha", "2", "--num-seeds", "1", "--steps", "1",
                                   "--train-limit", "12", "--eval-limit", "2", "--max-new-tokens", "3",
                                   "--max-seq-len", str(cut), "--dtype", "float32", "--out", str(tmp_path / "c.parquet")])
    assert res.exit_code == 0, res.output
    assert f"training prompts do not fit --max-seq-len {cut}" in " ".join(res.stderr.split())
    meta = json.loads((tmp_path / "c.json").read_text())
    assert any("do not fit" in n for n in meta["notes"])


def test_sweep_sets_each_run_beside_random_skipping_of_the_layers_it_realized(tiny_dirs, tmp_path):
    """Issue 41: every trained controller is evaluated beside random-token skipping of its realized layers per token
    (evaluate --matched-random); the figure's table gets a `random (INPUT)` series and each input a run-level test."""
    out = tmp_path / "controllers-arith.parquet"
    args = ["controllers", "sweep", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--inputs",
            "hidden,constant", "--alpha", "1", "--num-seeds", "2", "--steps", "2", "--lr", "0.05", "--train-limit", "8",
            "--eval-limit", "3", "--max-new-tokens", "5", "--dtype", "float32", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    items, controls = pd.read_parquet(out), pd.read_parquet(tmp_path / "controllers-arith-controls.parquet")
    assert len(controls) == len(items) == 2 * 2 * 3  # one control per training run, on the same items
    seen = set()
    for (input_kind, seed), g in controls.groupby(["input", "seed"]):
        part = pd.read_parquet(tmp_path / f"controllers-arith.runs/{input_kind}-a1-s{seed}/eval.parquet")
        per_token = part.loc[part["policy"] == "controller", "layers_per_token"]
        realized = per_token.map(sum).sum() / per_token.map(len).sum()  # pooled over the run's generated tokens
        (label,) = set(g["control"])
        mean = round(realized, 4)
        assert label == f"random-token:{math.ceil(mean)}" + (f"[mean={mean:g}]" if mean != math.ceil(mean) else "")
        seen.add(mean)
    assert len(seen) > 1  # the runs realized different layers per token, each matched to its own
    agg = pd.read_parquet(tmp_path / "controllers-arith-agg.parquet").set_index("input")
    assert {"hidden", "constant", "random (hidden)", "random (constant)"} == set(agg.index)
    assert np.isnan(agg.loc["random (hidden)", "kl"])  # the KL pass is the controllers' alone
    against = json.loads((tmp_path / "controllers-arith.json").read_text())["versus_control"]
    keys = ["input", "alpha", "seed", "item_id"]
    both = items.merge(controls, on=keys, suffixes=("", "_c"))
    for input_kind, c in against.items():
        mine = both[both["input"] == input_kind]
        runs = (mine["full_rougeL"] - mine["full_rougeL_c"]).groupby(mine["seed"]).mean()
        assert c["runs"] == 2 and c["diff"] == pytest.approx(runs.mean())  # a run is one unit
        if np.ptp(runs) > 0:  # a t-interval over the 2 runs
            half = scipy.stats.t.ppf(0.975, 1) * runs.std(ddof=1) / np.sqrt(2)
            assert (c["lo"], c["hi"]) == pytest.approx((runs.mean() - half, runs.mean() + half))
        pooled = [(g["layers_mean"] * g["tokens"]).sum() / g["tokens"].sum() for _, g in mine.groupby("seed")]
        assert c["layers"] == pytest.approx(np.mean(pooled))  # pooled over tokens, as the control was matched
        assert [a["alpha"] for a in c["by_alpha"]] == [1.0] and c["by_alpha"][0]["diff"] == pytest.approx(c["diff"])
    assert "controllers vs random-token skipping of the layers they realized" in " ".join(res.stderr.split())
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path), "--out", str(tmp_path / "REPORT.md")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "REPORT.md").read_text()
    assert "Against chance" in text and "random (constant)" in text and "hidden controllers vs random-token" in text
    trained = {f: f.stat().st_mtime_ns for f in (tmp_path / "controllers-arith.runs").glob("*/*.safetensors")}
    res = CliRunner().invoke(app, [*args, "--no-matched-random"])  # the runs reused; the stale controls removed
    assert res.exit_code == 0, res.output
    assert trained and all(f.stat().st_mtime_ns == t for f, t in trained.items())  # not trained again
    assert not (tmp_path / "controllers-arith-controls.parquet").exists() and json.loads((tmp_path / "controllers-arith.json").read_text())["versus_control"] == {}
    assert set(pd.read_parquet(tmp_path / "controllers-arith-agg.parquet")["input"]) == {"hidden", "constant"}


def test_a_control_line_of_one_run_gives_no_interval():
    from skipbench.analysis.verdicts import control_line

    one = {"metric": "full_rougeL", "diff": 0.2, "lo": float("nan"), "hi": float("nan"), "runs": 1, "layers": 20.0,
           "control_layers": 20.01, "without_control": 1,
           "by_alpha": [{"alpha": 2.0, "diff": 0.2, "lo": float("nan"), "hi": float("nan"), "runs": 1, "layers": 20.0,
                         "control_layers": 20.01}]}
    line = control_line("hidden", one)
    assert "nan" not in line and "+0.200 over 1 training runs, one run: no interval" in line
    assert "1 run(s) had no control" in line
