"""FlexiDepth: open gates == base model, KV-preserving skipping, L_skip by hand, training, e2e commands."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.analysis import verdicts
from skipbench.cli import app
from skipbench.engine import Engine, generate
from skipbench.engine.decode import left_pad
from skipbench.engine.protocol import Policy
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
    from skipbench.training.loop import TrainConfig, examples, step_loss, task_weight
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
    res = runner.invoke(app, ["flexidepth", "train", *common, "--dataset", "text,arith", "--limit", "8", "--skip-weight", "1",
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


def test_held_out_loss_is_the_objective_on_the_validation_items(tiny_dirs, tmp_path):
    """--eval-every logs the held-out loss at its steps and the last; it is the training objective (task + cost
    term per token) of the final routers over the validation split, and `training_summary` hands it to the verdict.
    Adding it to a checkpoint trained without it resumes (it does not change what a step computes)."""
    from skipbench.data import DataSpec
    from skipbench.policies.flexidepth import load_flexidepth
    from skipbench.training.loop import TrainConfig, examples, step_loss, training_summary

    runner, run = CliRunner(), tmp_path / "flexi"
    common = ["flexidepth", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8",
              "--skip-weight", "0.1", "--router-reduction", "4", "--batch-size", "4", "--max-new-tokens", "6",
              "--max-seq-len", "1024", "--out", str(run)]
    assert runner.invoke(app, [*common, "--steps", "3"]).exit_code == 0
    res = runner.invoke(app, [*common, "--steps", "7", "--eval-every", "2", "--val-limit", "6"])
    assert res.exit_code == 0, res.output
    log = torch.load(run / "trainer.pt", weights_only=False)["log"]
    assert [r["step"] for r in log if "val_loss" in r] == [4, 6, 7]  # resumed at 3: every 2nd step, and the last

    lm = load_model(str(tiny_dirs["llama"]), "cpu", "float32")
    flexi, _ = load_flexidepth(str(run))
    cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=DataSpec(name="arith", split="validation", limit=6),
                      loss="ce", max_new_tokens=6, max_seq_len=1024)
    held = examples(lm, cfg, run / "teacher.json")
    assert len(held) == 6
    with torch.no_grad():  # one batch of six
        by_hand, _ = step_loss(lm, Engine(lm.adapter), FlexiMethod(flexi.eval(), 0.1), held, "ce")
    assert log[-1]["val_loss"] == pytest.approx(float(by_hand), rel=1e-4)  # batches of 4 + 2 add up to the mean

    summary = training_summary(run)
    assert summary["val_steps"] == [4, 6, 7] and summary["val_loss"] == [r["val_loss"] for r in log if "val_loss" in r]


def test_held_out_options_are_checked_and_a_resume_keeps_its_held_out_items(tiny_dirs, tmp_path):
    runner, run = CliRunner(), tmp_path / "flexi"
    common = ["flexidepth", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8",
              "--router-reduction", "4", "--max-new-tokens", "4", "--max-seq-len", "1024", "--out", str(run)]
    for bad, said in [(["--eval-every", "-1"], "must be >= 0"), (["--eval-every", "1", "--val-limit", "-2"], "must be >= 0"),
                      (["--val-limit", "3"], "give --eval-every N too")]:
        res = runner.invoke(app, [*common, "--steps", "2", *bad])
        assert res.exit_code == 1 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert runner.invoke(app, [*common, "--steps", "2", "--eval-every", "1", "--val-limit", "3"]).exit_code == 0
    res = runner.invoke(app, [*common, "--steps", "4", "--eval-every", "1", "--val-limit", "4"])  # other items
    assert res.exit_code == 1 and "logged held-out losses on other items" in res.stderr
    assert runner.invoke(app, [*common, "--steps", "4", "--eval-every", "1", "--val-limit", "3"]).exit_code == 0


def _early_stopping(tiny_dirs, out, steps=12, patience=2, **extra):
    from skipbench.data import DataSpec
    from skipbench.experiments.flexidepth import FlexiTrainConfig
    from skipbench.training.loop import TrainConfig

    held = DataSpec(name="arith", split="validation", limit=4)
    return FlexiTrainConfig(train=TrainConfig(
        model=str(tiny_dirs["llama"]), data=DataSpec(name="arith", split="train", limit=8), steps=steps, batch_size=4,
        lr=0.3, loss="ce", max_new_tokens=4, max_seq_len=1024, device="cpu", out=str(out), save_every=1,
        val_data=held, **{"eval_every": 1, "patience": patience, **extra}), alpha=0.1, reduction=4)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "weights.safetensors"))


def test_early_stopping_keeps_the_router_of_the_lowest_held_out_loss(tiny_dirs, tmp_path):
    """--patience P: training stops P evaluations after the lowest held-out loss, and the checkpoint's weights are
    the router a run of exactly that many steps ends with (the log keeps every step); a run killed after a save
    resumes to the same stop and the same router; the kept checkpoint is final; the usage verdict reads it."""
    from dataclasses import replace

    from skipbench.experiments.flexidepth import run_train
    from skipbench.training.loop import training_summary

    cfg = _early_stopping(tiny_dirs, tmp_path / "stopped")
    res = run_train(cfg)
    state = torch.load(tmp_path / "stopped" / "trainer.pt", weights_only=False)
    held = [(r["step"], r["val_loss"]) for r in state["log"]]
    kept = min(held, key=lambda h: h[1])[0]
    assert state["kept_step"] == kept and state["stopped"] and len(held) == res.steps == state["step"]
    assert res.steps < 12 and res.steps - kept == 2, held  # lr 0.3 overshoots: it stops well before its 12 steps
    assert any("stopped early" in n for n in res.notes)

    run_train(replace(cfg, train=replace(cfg.train, steps=kept, patience=0, eval_every=0, val_data=None,
                                         out=str(tmp_path / "plain"))))
    got, plain = _weights(tmp_path / "stopped"), _weights(tmp_path / "plain")
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in got)
    last = {k: v.clone() for k, v in got.items()}

    class Killed(Exception):
        pass

    def kill(record):  # after the save of that step: a run killed between two saves
        if record["step"] == kept + 1:
            raise Killed

    with pytest.raises(Killed):
        run_train(replace(cfg, train=replace(cfg.train, out=str(tmp_path / "killed"))), progress=kill)
    assert "kept_step" not in torch.load(tmp_path / "killed" / "trainer.pt", weights_only=False)
    resumed = run_train(replace(cfg, train=replace(cfg.train, out=str(tmp_path / "killed"))))
    assert resumed.resumed_from == kept + 1 and resumed.steps == res.steps
    again = _weights(tmp_path / "killed")
    assert all(torch.equal(again[k], last[k]) for k in last)

    final = run_train(replace(cfg, train=replace(cfg.train, steps=40)))  # more steps: the kept router stays
    assert final.steps == res.steps and any(f"router of step {kept}, kept by early stopping" in n for n in final.notes)
    assert all(torch.equal(_weights(tmp_path / "stopped")[k], last[k]) for k in last)

    summary = training_summary(tmp_path / "stopped")
    assert summary["kept_step"] == kept and summary["patience"] == 2 and summary["steps"] == res.steps
    assert summary["kept_epochs"] == pytest.approx(kept * 4 / 8)
    ok, why = verdicts.trained_enough(summary)  # the usage verdict's reading: at the router kept, a patience of 2
    assert not ok and f"at step {kept}" in why and "the router kept" in why and "a patience of 2" in why


def test_a_run_that_uses_its_steps_keeps_its_lowest_router_and_continues_from_its_last(tiny_dirs, tmp_path):
    """--patience with --steps reached first: the checkpoint holds the lowest router (not final), and more --steps
    continue from the last weights, to what one longer run gives."""
    from dataclasses import replace

    from skipbench.experiments.flexidepth import run_train

    cfg = _early_stopping(tiny_dirs, tmp_path / "short", steps=3, patience=20)
    run_train(cfg)
    state = torch.load(tmp_path / "short" / "trainer.pt", weights_only=False)
    held = [(r["step"], r["val_loss"]) for r in state["log"]]
    assert state["kept_step"] == min(held, key=lambda h: h[1])[0] and not state["stopped"] and state["step"] == 3
    more = run_train(replace(cfg, train=replace(cfg.train, steps=6)))
    assert more.resumed_from == 3 and more.steps == 6
    run_train(replace(cfg, train=replace(cfg.train, steps=6, out=str(tmp_path / "long"))))
    a, b = _weights(tmp_path / "short"), _weights(tmp_path / "long")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [torch.load(tmp_path / d / "trainer.pt", weights_only=False)["log"] for d in ("short", "long")]
    assert [r["val_loss"] for r in logs[0]] == [r["val_loss"] for r in logs[1]]


def test_a_patience_the_run_cannot_reach_is_said(tiny_dirs, tmp_path, capsys):
    from skipbench.experiments.flexidepth import run_train

    run_train(_early_stopping(tiny_dirs, tmp_path / "short", steps=3, patience=3))  # 3 evaluations: never 3 after one
    assert "--patience 3: 3 steps make 3 held-out evaluation(s), so this run cannot stop early" in capsys.readouterr().err
    run_train(_early_stopping(tiny_dirs, tmp_path / "long", steps=4, patience=3))
    assert "cannot stop early" not in capsys.readouterr().err


def test_a_run_without_early_stopping_is_not_resumed_with_it(tiny_dirs, tmp_path):
    from dataclasses import replace

    from skipbench.errors import SkipbenchError
    from skipbench.experiments.flexidepth import run_train

    cfg = _early_stopping(tiny_dirs, tmp_path / "f", steps=2, patience=0)
    run_train(cfg)
    with pytest.raises(SkipbenchError, match="holds no best.safetensors of that step"):
        run_train(replace(cfg, train=replace(cfg.train, steps=4, patience=2)))
    res = CliRunner().invoke(app, ["flexidepth", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith",
                                   "--steps", "2", "--patience", "2", "--out", str(tmp_path / "g")])
    assert res.exit_code == 1 and "--patience needs the held-out loss of --eval-every" in res.stderr
    res = CliRunner().invoke(app, ["flexidepth", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith",
                                   "--steps", "2", "--eval-every", "1", "--patience", "-1", "--out", str(tmp_path / "g")])
    assert res.exit_code == 1 and "must be >= 0" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


@pytest.mark.parametrize("split", ["validation", "all"])
def test_a_held_out_loss_on_training_items_is_refused(tiny_dirs, tmp_path, split):
    res = CliRunner().invoke(app, ["flexidepth", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith",
                                   "--split", split, "--steps", "2", "--eval-every", "1", "--max-new-tokens", "4",
                                   "--max-seq-len", "1024", "--out", str(tmp_path / "f")])
    assert res.exit_code == 1 and "share prompts with the training items" in res.stderr
    assert not (tmp_path / "f" / "weights.safetensors").exists()


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


# A routed layer's attention (issue 42): a skipped token bypasses attention and MLP; only its K/V are computed.

ROUTED = 3  # the routed layer of the tests below; the others run in full


class Rows:
    """Tokens (rows) the adapter's attention projections get, per projection and layer."""

    def __init__(self, ad, monkeypatch):
        self.seen: dict = {}
        for name in ("q", "qkv", "kv", "attn_out"):
            real = getattr(ad, name)

            def wrapped(i, x, *rest, real=real, name=name):
                self.seen[name, i] = self.seen.get((name, i), 0) + x.shape[0] * x.shape[1]
                return real(i, x, *rest)

            monkeypatch.setattr(ad, name, wrapped)

    def __call__(self, name: str, i: int = ROUTED) -> int:
        return self.seen.get((name, i), 0)


def _skip_adapter(seed=0):
    from skipbench.policies.flexidepth import Adapter

    torch.manual_seed(seed)
    adapter = Adapter(64, 4)
    with torch.no_grad():
        adapter.down_proj.weight.normal_(0, 0.1)  # not the identity
    return adapter


def _one_routed_layer(tokenizer, kv, impl, runs):
    """A tiny model whose layer ROUTED is routed by the Route of `runs[0]` (a fixed [B, T] pattern, set by the test),
    its prompts run at full depth; returns (lm, engine, cache after the prompts, policy, the adapter)."""
    from skipbench.engine.protocol import GateFn, Route

    lm = tiny(tokenizer)
    adapter = _skip_adapter()

    def gate(i, h):
        if i != ROUTED:
            return True
        run = runs[0]
        scale = torch.linspace(0.2, 0.9, run.numel()).reshape(run.shape)
        return Route(run=run, scale=scale, skip=lambda normed, sel: (1 - scale[sel])[:, None] * adapter(normed),
                     kv_for_skipped=kv)

    engine = Engine(lm.adapter, "fill" if kv else "none", impl)
    ids, present = left_pad(prompts(tokenizer, 2), 0, "cpu")
    cache, _ = engine.prefill(ids, present, ids.shape[1] + 6)
    return lm, engine, cache, GateFn(6, gate), adapter


STEP = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
RUN = torch.tensor([[True, False, True, False], [False, True, False, True]])  # two routed tokens per row


@pytest.mark.parametrize("kv", [True, False])
def test_skipped_tokens_run_no_query_and_no_attention_output(tokenizer, monkeypatch, kv):
    """Gathered, the routed layer's queries and output projection get the routed tokens only; the K/V projections
    get every token under `fill` (KV-preserving skipping), only the routed ones under `none`."""
    runs = [RUN]
    lm, engine, cache, policy, _ = _one_routed_layer(tokenizer, kv, "gather", runs)
    ad, start = lm.adapter, cache.length
    count = Rows(ad, monkeypatch)
    out = engine.forward(STEP, cache, policy, keep_hidden=True)
    assert count("attn_out") == 4 and count("q") + count("qkv") == 4  # 4 routed tokens of 8
    assert (count("q"), count("qkv"), count("kv")) == ((4, 0, 8) if kv else (0, 4, 0))
    assert all(count("qkv", i) == count("attn_out", i) == 8 for i in range(6) if i != ROUTED)
    new = slice(start, start + 4)
    if kv:  # every token's K/V at the layer: those of the state it carries, valid for later queries
        h = out.hidden[ROUTED]
        k, v = ad.kv(ROUTED, ad.attn_norm(ROUTED, h), ad.position_embeddings(h, cache.positions(4) - 4))
        torch.testing.assert_close(cache.k[ROUTED][:, :, new], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[ROUTED][:, :, new], v, rtol=1e-5, atol=1e-5)
        assert cache.valid[ROUTED][:, new].all()
    else:
        assert torch.equal(cache.valid[ROUTED][:, new], RUN)
    # a one-token step of two rows, one routed: one query, one output row; the K/V of both (`fill`) or of one
    count.seen.clear()
    runs[0] = torch.tensor([[False], [True]])
    engine.forward(torch.tensor([[13], [14]]), cache, policy)
    assert count("attn_out") == 1 and count("q") + count("qkv") == 1
    assert count("kv") == (2 if kv else 0)
    # no token routed: only the K/V (`fill`), or no projection at all (`none`)
    count.seen.clear()
    runs[0] = torch.tensor([[False], [False]])
    engine.forward(torch.tensor([[15], [16]]), cache, policy)
    assert (count("q"), count("qkv"), count("attn_out"), count("kv")) == (0, 0, 0, 2 if kv else 0)


@pytest.mark.parametrize("kv", [True, False])
def test_routed_tokens_equal_the_dense_layer_and_skipped_ones_take_the_adapter(tokenizer, kv):
    """Routed tokens: h' = h + Attn(LN1 h), out = h' + G MLP(LN2 h') as the dense computation (`mask`, and by hand)
    gives it, to 1e-5; skipped tokens: exactly h + (1 - G) Adapter(LN2 h), on both paths. With gradients (training
    gathers) the gate values still get theirs."""
    outs = {}
    for impl in ("gather", "mask"):
        lm, engine, cache, policy, adapter = _one_routed_layer(tokenizer, kv, impl, [RUN])
        before = cache.clone()
        outs[impl] = engine.forward(STEP, cache, policy, keep_hidden=True)
    ad = lm.adapter
    h = outs["gather"].hidden[ROUTED]
    assert torch.equal(h, outs["mask"].hidden[ROUTED])  # the full layers before it are the same code
    scale = torch.linspace(0.2, 0.9, RUN.numel()).reshape(RUN.shape)
    # by hand: the attention of every token over the cache it sees (the skipped tokens' K/V under `fill` only)
    if kv:
        before.mark(range(6), True, 4)
    else:
        before.mark([ROUTED], RUN, 4)
    pos = ad.position_embeddings(h, before.positions(4))
    h_attn = h + Engine(ad, before.mode).attend(ROUTED, h, pos, before)
    want = h_attn + scale[..., None] * ad.mlp_block(ROUTED, h_attn)
    for impl, out in outs.items():
        got = out.hidden[ROUTED + 1]
        torch.testing.assert_close(got[RUN], want[RUN], rtol=0, atol=1e-5)
        with torch.no_grad():
            skipped = h[~RUN] + (1 - scale[~RUN])[:, None] * adapter(ad.mlp_norm(ROUTED, h[~RUN]))
        assert torch.equal(got[~RUN], skipped), impl
    torch.testing.assert_close(outs["gather"].hidden[ROUTED + 1], outs["mask"].hidden[ROUTED + 1], rtol=0, atol=1e-5)

    # training's path: gradients through the gathered routed layer reach the gate values of every token
    from skipbench.engine.protocol import GateFn, Route

    g = scale.clone().requires_grad_(True)
    route = Route(run=RUN, scale=g, skip=lambda normed, sel: (1 - g[sel])[:, None] * adapter(normed), kv_for_skipped=kv)
    lm, engine, cache, _, _ = _one_routed_layer(tokenizer, kv, "auto", [RUN])
    out = engine.run(STEP, cache, GateFn(6, lambda i, x: route if i == ROUTED else True), keep_hidden=True)
    assert out.gates == [g]  # the regulariser reads them
    out.logits.square().sum().backward()
    assert g.grad is not None and bool((g.grad != 0).all())
    torch.testing.assert_close(out.hidden[ROUTED + 1].detach(), outs["gather"].hidden[ROUTED + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["gather", "mask"])
def test_without_kv_for_skipped_tokens_they_write_none(tokenizer, monkeypatch, impl):
    """`kv_for_skipped=False` (`--no-kv`): a skipped token's K/V are not valid at the layer (later queries there do
    not see it), on both paths; gathered, its K/V are not even computed. The other layers keep every token."""
    runs = [RUN]
    lm, engine, cache, policy, _ = _one_routed_layer(tokenizer, False, impl, runs)
    start = cache.length
    count = Rows(lm.adapter, monkeypatch)
    engine.forward(STEP, cache, policy)
    new = slice(start, start + 4)
    assert torch.equal(cache.valid[ROUTED][:, new], RUN)
    assert all(cache.valid[i][:, new].all() for i in range(6) if i != ROUTED)
    assert count("kv") == 0 and count("qkv") == (4 if impl == "gather" else 8)
    # a later token at the layer sees the routed tokens only: its output does not depend on the skipped ones' slots
    runs[0] = torch.tensor([[True], [True]])
    probe = cache.clone()  # the skipped tokens' slots at the layer overwritten with large values
    k, v = probe.k[ROUTED], probe.v[ROUTED]
    k[:, :, start : start + 4] = torch.where(RUN[:, None, :, None], k[:, :, start : start + 4], 100.0)
    v[:, :, start : start + 4] = torch.where(RUN[:, None, :, None], v[:, :, start : start + 4], -100.0)
    a = engine.forward(torch.tensor([[13], [14]]), cache, policy).logits
    b = engine.forward(torch.tensor([[13], [14]]), probe, policy).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class PositionRoute(Policy):
    """Routes a token through layers 2-4 unless (position + layer) % 3 == 0 (decisions no rounding can flip), gate
    values from its state, a FlexiDepth adapter on the skip path."""

    static = False

    def __init__(self, kv: bool) -> None:
        super().__init__(6)
        self.kv, self.adapters = kv, {i: _skip_adapter(i) for i in (2, 3, 4)}

    def new_step(self, positions):
        self.positions = positions

    def gate(self, layer, hidden):
        from skipbench.engine.protocol import Route

        if layer not in self.adapters:
            return True
        g, adapter = torch.sigmoid(hidden[..., 0]), self.adapters[layer]
        return Route(run=(self.positions + layer) % 3 != 0, scale=g, kv_for_skipped=self.kv,
                     skip=lambda normed, sel: (1 - g[sel])[:, None] * adapter(normed))


@pytest.mark.parametrize("impl", ["gather", "mask"])
@pytest.mark.parametrize("kv", [True, False])
def test_routed_layers_cached_equal_uncached(tokenizer, impl, kv):
    """Invariant 3 for routed layers: prompts and new tokens in one pass (each row's routed tokens packed to the
    longest row's count) == the prompts, then one token at a time, under both KV modes and both paths."""
    lm = tiny(tokenizer)
    policy = PositionRoute(kv)
    engine = Engine(lm.adapter, "fill" if kv else "none", impl)
    ids, present = left_pad(prompts(tokenizer, 3), 0, "cpu")
    gen = torch.randint(3, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    whole = torch.cat([ids, gen], 1)
    every = torch.cat([present, torch.ones_like(gen, dtype=torch.bool)], 1)
    out = engine.forward(whole, engine.prompt_cache(present, whole.shape[1]), policy, present=every, record=True)
    cache, first = engine.prefill(ids, present, whole.shape[1], policy, record=True)
    steps = [engine.forward(gen[:, t : t + 1], cache, policy, record=True) for t in range(gen.shape[1])]
    width = ids.shape[1]
    assert torch.equal(out.executed[:, width:], torch.cat([s.executed for s in steps], 1))
    assert torch.equal(out.executed[:, :width][present], first.executed[present])
    assert not bool(out.executed[:, width:].all())  # some tokens skipped
    torch.testing.assert_close(out.logits[:, width:], torch.cat([s.logits for s in steps], 1), rtol=0, atol=1e-4)
