"""FlexiDepth: open gates == base model, KV-preserving skipping, L_skip by hand, training, e2e commands."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import Engine, generate
from skipbench.engine.decode import left_pad
from skipbench.models import wrap_model
from skipbench.policies import make_policy
from skipbench.models import load_model
from skipbench.policies.flexidepth import FlexiDepth, FlexiMethod, FlexiPolicy


def tiny(tokenizer, family="llama"):
    return wrap_model(tiny_model(family, len(tokenizer)), tokenizer, "tiny")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_open_gates_equal_the_base_model(tokenizer, family):
    lm = tiny(tokenizer, family)
    flexi = FlexiDepth(64, 6, reduction=4)
    flexi.force_open = True
    calls = []
    for a in flexi.adapters.values():
        a.register_forward_hook(lambda *args: calls.append(1))
    ps = prompts(tokenizer, 3)
    ours = generate(lm, ps, FlexiPolicy(flexi), 12)
    base = generate(lm, ps, make_policy("full", 6), 12)
    assert ours.tokens == base.tokens and ours.layers == base.layers
    assert not calls  # adapters are never called when every token takes the full path


def _skip_everything(flexi):
    with torch.no_grad():
        for r in flexi.routers.values():
            r.out.bias.fill_(-20.0)  # G ~ 0 < tau: every token skips every routed layer


@pytest.mark.parametrize("kv", [True, False])
def test_kv_preserving_skip(tokenizer, kv):
    lm = tiny(tokenizer)
    flexi = FlexiDepth(64, 6, routed=[3, 4], reduction=4, kv=kv)
    _skip_everything(flexi)
    policy = FlexiPolicy(flexi)
    engine = Engine(lm.adapter, policy.kv_mode)
    ids, present = left_pad(prompts(tokenizer, 2), 0, "cpu")
    cache = engine.new_cache(2, ids.shape[1] + 3, "cpu", torch.float32)
    cache.pad = (~present).sum(1)
    engine.forward(ids, cache, None, present=present)
    start = cache.length
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = engine.forward(new, cache, policy, keep_hidden=True, record=True)
    assert not out.executed[..., 3:5].any() and out.executed[..., [0, 1, 2, 5]].all()
    gen = slice(start, start + 3)
    for i in (3, 4):
        k, v = lm.adapter.kv(i, lm.adapter.attn_norm(i, out.hidden[i]), lm.adapter.position_embeddings(out.hidden[i], cache.positions(3) - 3))
        if kv:  # the base layer's K/V of the hidden state the token carries
            assert torch.allclose(cache.k[i][:, :, gen], k, atol=1e-5) and torch.allclose(cache.v[i][:, :, gen], v, atol=1e-5)
            assert cache.valid[i][:, gen].all()
        else:
            assert not cache.valid[i][:, gen].any()
    assert cache.valid[5][:, gen].all()


def test_skip_loss_by_hand_and_gradients(tokenizer):
    flexi = FlexiDepth(64, 6, routed=[3, 4, 5], reduction=4)
    method = FlexiMethod(flexi, alpha=0.5)
    gates = [torch.tensor([[0.2, 0.9], [0.6, 0.1]]), torch.tensor([[0.4, 0.8], [0.3, 0.7]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]])]
    mask = torch.tensor([[True, True], [True, False]])
    loss, parts = method.regulariser(gates, mask)
    sums = [0.2 + 0.4 + 1.0, 0.9 + 0.8 + 0.0, 0.6 + 0.3 + 0.5]  # the masked token is left out
    assert parts["l_skip"] == pytest.approx(sum(x * x for x in sums) / 3)
    assert float(loss) == pytest.approx(0.5 * parts["l_skip"] * 3)  # a token sum: the trainer divides by tokens

    lm = tiny(tokenizer)
    from skipbench.training import TrainConfig, examples, step_loss, task_weight
    from skipbench.data import DataSpec

    cfg = TrainConfig(model="tiny", data=DataSpec(name="arith", limit=4), loss="ce", max_new_tokens=6)
    data = examples(lm, cfg, None)
    flexi = FlexiDepth(64, 6, reduction=4)
    with torch.no_grad():
        for a in flexi.adapters.values():
            a.down_proj.weight.normal_(0, 0.1)
    total, _ = step_loss(lm, Engine(lm.adapter), FlexiMethod(flexi, 1e-2), data, "ce")
    total.backward()
    assert all(r.out.weight.grad is not None and r.out.weight.grad.abs().sum() > 0 for r in flexi.routers.values())
    assert all(p.grad is None for p in lm.model.parameters())

    # gradient accumulation: two micro-batches normalised by the step's tokens == one pass over the batch
    whole = [p.grad.clone() for p in flexi.parameters() if p.grad is not None]
    flexi.zero_grad()
    denominator = task_weight(data, "ce")
    for micro in (data[:2], data[2:]):
        step_loss(lm, Engine(lm.adapter), FlexiMethod(flexi, 1e-2), micro, "ce", denominator)[0].backward()
    accumulated = [p.grad for p in flexi.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(whole, accumulated))


def test_train_large_alpha_then_evaluate_usage_depthmap(tiny_dirs, tmp_path):
    runner = CliRunner()
    run = tmp_path / "flexi"
    common = ["--model", str(tiny_dirs["llama"])]
    res = runner.invoke(app, ["flexidepth", "train", *common, "--dataset", "text,arith", "--limit", "8", "--alpha", "1",
                              "--router-reduction", "4", "--steps", "30", "--batch-size", "4", "--lr", "0.05",
                              "--max-new-tokens", "8", "--max-seq-len", "1024", "--out", str(run)])
    assert res.exit_code == 0, res.output
    log = torch.load(run / "trainer.pt", weights_only=False)["log"]
    assert log[-1]["layers"] < log[0]["layers"] - 1  # a large alpha closes gates
    assert json.loads((run / "config.json").read_text())["routed_layers"] == [3, 4, 5]

    out = tmp_path / "eval.parquet"
    res = runner.invoke(app, ["evaluate", *common, "--dataset", "arith", "--split", "test", "--limit", "4", "--policy", "flexidepth",
                              "--router", str(run), "--max-new-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    flex = pd.read_parquet(out).query("policy == 'flexidepth'")
    assert len(flex) == 4 and (flex["layers_mean"] < 6).any()

    usage = tmp_path / "usage.parquet"
    res = runner.invoke(app, ["flexidepth", "usage", *common, "--router", str(run), "--dataset", "text,arith",
                              "--split", "all", "--limit", "6", "--max-new-tokens", "6", "--out", str(usage)])
    assert res.exit_code == 1 and "were used to train" in res.stderr and not usage.exists()  # its training items
    res = runner.invoke(app, ["flexidepth", "usage", *common, "--router", str(run), "--dataset", "text,arith",
                              "--split", "test", "--limit", "6", "--max-new-tokens", "6", "--out", str(usage)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(usage)
    assert {"item_id", "subtask", "token", "text", "layers_used", "layers"} <= set(rows.columns)
    assert (rows["layers_used"] == rows["layers"].map(len)).all()
    agg = pd.read_parquet(tmp_path / "usage-agg.parquet")
    assert set(agg["subtask"]) == set(rows["subtask"])

    page = tmp_path / "map.html"
    res = runner.invoke(app, ["flexidepth", "depthmap", *common, "--router", str(run), "--prompt",
                              "Please calculate the sum of 99, 45, 12 and 78.", "--max-new-tokens", "8", "--out", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert text.count('class="t"') >= 8 and "layers" in text
    assert page.with_suffix(".png").stat().st_size > 2000


def test_usage_refuses_routers_of_another_depth(tiny_dirs, tmp_path, tokenizer):
    from safetensors.torch import save_file

    flexi = FlexiDepth(64, 8, reduction=4)  # trained for 8 layers; the tiny model has 6
    (tmp_path / "r").mkdir()
    save_file({k: v.contiguous() for k, v in flexi.state_dict().items()}, str(tmp_path / "r" / "weights.safetensors"))
    (tmp_path / "r" / "config.json").write_text(json.dumps({"kind": "flexidepth", **flexi.config()}))
    for cmd in (["usage", "--out", str(tmp_path / "u.parquet")], ["depthmap", "--prompt", "hi", "--out", str(tmp_path / "d.html")]):
        res = CliRunner().invoke(app, ["flexidepth", cmd[0], "--model", str(tiny_dirs["llama"]), "--router", str(tmp_path / "r"), *cmd[1:]])
        assert res.exit_code == 1 and "(8 layers, hidden size 64); this model has 6 layers" in res.stderr, res.output


def test_a_policy_never_overrides_the_kv_mode_silently(tiny_dirs, tmp_path):
    """The old engine ran `policy.kv_mode or kv_mode` while the output recorded the user's value."""
    from conftest import no_kv_router

    router = no_kv_router(tmp_path / "r")
    out = tmp_path / "eval.parquet"
    base = ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "3", "--policy", "flexidepth",
            "--router", str(router), "--max-new-tokens", "5", "--out", str(out)]
    res = CliRunner().invoke(app, [*base, "--kv-mode", "fill"])
    assert res.exit_code == 1 and "conflicts with policy 'flexidepth:" in res.stderr and not out.exists()
    res = CliRunner().invoke(app, base)  # auto: the mode the router was trained with
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out)
    assert rows.groupby("policy")["kv_mode"].agg(set).to_dict() == {"full": {"fill"}, "flexidepth": {"none"}}
    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    policy = make_policy(f"flexidepth:{router}", 6)
    assert generate(lm, prompts(lm.tokenizer, 2), policy, 4).kv_mode == "none"
    assert generate(lm, prompts(lm.tokenizer, 2), make_policy("full", 6), 4, kv_mode="none").kv_mode == "none"
