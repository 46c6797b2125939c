"""MindSkip: open routers == full depth; skipped attention is not computed; the KV modes hold; gathered == dense ==
token by token; the capacity loss by hand and driving the attending fraction; train, evaluate and lm-eval rows."""

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
from skipbench.policies.mindskip import MindSkip, MindSkipMethod, MindSkipPolicy


def tiny(tokenizer, family="llama"):
    return wrap_model(tiny_model(family, len(tokenizer)), tokenizer, "tiny")


def mixed(routed=(1, 2, 3, 4), kv=False, seed=1) -> MindSkip:
    """Routers whose scores fall on both sides of tau: some tokens skip, some attend."""
    m = MindSkip(64, 6, list(routed), kv=kv)
    torch.manual_seed(seed)
    with torch.no_grad():
        for r in m.routers.values():
            r.weight.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_open_routers_equal_full_depth(tokenizer, family):
    lm = tiny(tokenizer, family)
    m = mixed()
    m.force_open = True
    ps = prompts(tokenizer, 3)
    ours = generate(lm, ps, MindSkipPolicy(m, lm.adapter), 12, prompt_depth="policy")
    base = generate(lm, ps, make_policy("full", 6), 12)
    assert ours.tokens == base.tokens and ours.layers == base.layers
    ids, present = left_pad(ps, 0, "cpu")
    e = Engine(lm.adapter, "none")
    a = e.forward(ids, e.prompt_cache(present, ids.shape[1]), MindSkipPolicy(m, lm.adapter), present=present)
    b = e.forward(ids, e.prompt_cache(present, ids.shape[1]), None, present=present)
    assert torch.equal(a.logits, b.logits)


def test_untrained_routers_start_open(tokenizer):
    """Zero routers score 0.5 >= tau for every token: the model is the base model before any training."""
    lm = tiny(tokenizer)
    ids, present = left_pad(prompts(tokenizer, 3), 0, "cpu")
    e = Engine(lm.adapter, "none")
    a = e.forward(ids, e.prompt_cache(present, ids.shape[1]), MindSkipPolicy(MindSkip(64, 6), lm.adapter),
                  present=present, record=True)
    b = e.forward(ids, e.prompt_cache(present, ids.shape[1]), None, present=present)
    assert torch.equal(a.logits, b.logits) and int(a.attention_skips.sum()) == 0


def save(m: MindSkip, folder):
    """A MindSkip checkpoint as `mindskip train` writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps({"kind": "mindskip", **m.config()}))
    return folder


def test_the_threshold_for_k_skips(tokenizer, tmp_path):
    """-o skip=K: skipping rises with tau, and the tau chosen gives about K attention skips on the calibration
    prompts; -o tau=T is used as given."""
    from skipbench.policies import Context
    from skipbench.policies.calibration import tune_threshold

    lm = tiny(tokenizer)
    m = mixed()
    ctx = Context(num_layers=6, lm=lm)
    # one bisection step measures the skips of a fixed threshold
    got = {t: tune_threshold(ctx, lambda _, t=t: MindSkipPolicy(m, lm.adapter, t), "attention", 0, 4, 64, steps=1)[1]
           for t in (0.2, 0.5, 0.8)}
    assert got[0.2] < got[0.5] < got[0.8]
    tau, realized = tune_threshold(ctx, lambda t: MindSkipPolicy(m, lm.adapter, t), "attention", 2.0, 4, 64)
    assert abs(realized - 2.0) < 0.25 and 0.2 < tau < 0.8
    # the bisection stops at the first threshold within the tolerance, and runs every step when none is
    calls = []

    def counted(t):
        calls.append(t)
        return MindSkipPolicy(m, lm.adapter, t)

    assert tune_threshold(ctx, counted, "attention", 2.0, 4, 64, tolerance=10.0)[0] == 0.5 and len(calls) == 2
    calls.clear()
    tune_threshold(ctx, counted, "attention", 2.0, 4, 64, tolerance=-1.0)
    assert len(calls) == 21  # the engine's KV mode, then the 20 steps
    folder = save(m, tmp_path / "m")
    from skipbench.policies import parse_policies

    spec = parse_policies(f"mindskip:{folder}", {"skip": "2", "calibration": "4", "calibration-tokens": "64"})[0]
    assert spec.build(6, lm).tau == pytest.approx(tau)
    assert parse_policies(f"mindskip:{folder}", {"tau": "0.3"})[0].build(6, lm).tau == 0.3


class Counting:
    """Counts the query rows the adapter computes per layer and the attention calls (torch's SDPA) of the engine."""

    def __init__(self, lm, monkeypatch):
        import skipbench.engine.forward as forward

        self.queries: dict[int, int] = {}
        self.calls = 0
        ad = lm.adapter
        for name in ("q", "qkv"):
            real = getattr(ad, name)

            def wrapped(i, x, pos, real=real):
                self.queries[i] = self.queries.get(i, 0) + x.shape[0] * x.shape[1]
                return real(i, x, pos)

            monkeypatch.setattr(ad, name, wrapped)
        sdpa = forward.F.scaled_dot_product_attention

        def counted(q, *args, **kw):
            self.calls += 1
            return sdpa(q, *args, **kw)

        monkeypatch.setattr(forward.F, "scaled_dot_product_attention", counted)


@pytest.mark.parametrize("kv", [False, True])
def test_skipped_attention_is_not_computed_and_the_kv_mode_holds(tokenizer, monkeypatch, kv):
    lm = tiny(tokenizer)
    m = mixed(kv=kv)
    policy = MindSkipPolicy(m, lm.adapter)
    engine = Engine(lm.adapter, policy.kv_mode, "gather")
    ids = torch.tensor([prompts(tokenizer, 1)[0][:9]])
    present = torch.ones_like(ids, dtype=torch.bool)
    cache = engine.prompt_cache(present, ids.shape[1] + 2)
    # what the routers decide, from the states the tokens carry into each layer
    ref = Engine(lm.adapter, policy.kv_mode, "mask").forward(ids, engine.prompt_cache(present, 11), policy,
                                                             present=present, keep_hidden=True, record=True)
    runs = {i: m.route(i, lm.adapter.attn_norm(i, ref.hidden[i])).run[0] for i in m.routed}
    assert any(r.any() and not r.all() for r in runs.values())  # a mixed case
    count = Counting(lm, monkeypatch)
    out = engine.forward(ids, cache, policy, present=present, keep_hidden=True, record=True)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    for i in range(6):  # one prompt: queries for exactly the routed tokens at a routed layer, all tokens elsewhere
        want = int(runs[i].sum()) if i in m.routed else ids.shape[1]
        assert count.queries.get(i, 0) == want, i
    assert count.calls == sum(bool(runs.get(i, torch.ones(1)).any()) for i in range(6))
    assert torch.equal(out.attention_skips[0], sum((~runs[i]).long() for i in m.routed))
    assert out.executed.all()  # the MLP runs everywhere: every layer counts as executed
    for i in m.routed:
        if kv:  # fill: the skipped tokens' K/V are those of the state they carry
            k, v = lm.adapter.kv(i, lm.adapter.attn_norm(i, out.hidden[i]), lm.adapter.position_embeddings(out.hidden[i], cache.positions(9) - 9))
            assert torch.allclose(cache.k[i][:, :, :9], k, atol=1e-5) and cache.valid[i][0, :9].all()
        else:  # none: only the tokens that attended are visible at the layer
            assert torch.equal(cache.valid[i][0, :9], runs[i])
    # a one-token step of a row whose token skips: no query and no attention at that layer
    count.queries.clear()
    count.calls = 0
    step = engine.forward(torch.tensor([[7]]), cache, policy, keep_hidden=True, record=True)
    skipped = [i for i in m.routed if not bool(m.route(i, lm.adapter.attn_norm(i, step.hidden[i])).run.all())]
    assert all(i not in count.queries for i in skipped)
    assert count.calls == 6 - len(skipped) and int(step.attention_skips.sum()) == len(skipped)


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
@pytest.mark.parametrize("kv", [False, True])
def test_gathered_equals_dense_and_token_by_token(tokenizer, family, kv):
    lm = tiny(tokenizer, family)
    policy = MindSkipPolicy(mixed(kv=kv), lm.adapter)
    ps = prompts(tokenizer, 3)
    runs = {impl: generate(lm, ps, policy, 10, impl=impl, prompt_depth="policy") for impl in ("gather", "mask", "auto")}
    assert runs["gather"].tokens == runs["mask"].tokens == runs["auto"].tokens
    assert runs["gather"].attention_skips == runs["mask"].attention_skips and any(map(any, runs["gather"].attention_skips))
    # a step of many tokens (rows packed to the longest row's routed tokens) == the same tokens one at a time
    ids, present = left_pad(ps, 0, "cpu")
    e = Engine(lm.adapter, policy.kv_mode, "gather")
    whole = e.forward(ids, e.prompt_cache(present, ids.shape[1]), policy, present=present, record=True)
    cache = e.prompt_cache(present, ids.shape[1])
    steps = [e.forward(ids[:, t : t + 1], cache, policy, present=present[:, t : t + 1], record=True) for t in range(ids.shape[1])]
    real = present[:, -1]  # the last position is real in every (left-padded) row
    assert torch.allclose(whole.logits[:, -1][real], steps[-1].logits[:, 0][real], atol=1e-4)
    skips = torch.cat([s.attention_skips for s in steps], 1)
    assert torch.equal(whole.attention_skips[present], skips[present])


def test_capacity_loss_by_hand():
    m = MindSkip(64, 6, [2, 3])
    gates = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])]
    mask = torch.tensor([[True, True], [True, False]])
    attend = [2 / 3, 1 / 3]  # the masked token left out
    loss, parts = MindSkipMethod(m, None, capacity=0.5, weight=2.0, loss="abs").regulariser(gates, mask)
    assert float(loss) == pytest.approx(2.0 * (abs(attend[0] - 0.5) + abs(attend[1] - 0.5)) * 3)  # times the tokens
    assert parts["attend"] == pytest.approx(0.5) and parts["attn_skipped"] == pytest.approx(1.0)
    loss, _ = MindSkipMethod(m, None, capacity=0.5, weight=2.0, loss="relu").regulariser(gates, mask)
    assert float(loss) == pytest.approx(2.0 * (attend[0] - 0.5) * 3)


def test_only_routers_learn_and_the_capacity_loss_drives_the_attending_fraction(tokenizer):
    from skipbench.data import DataSpec
    from skipbench.experiments.mindskip import MindSkipTrainConfig, run_train
    from skipbench.training.loop import TrainConfig, examples, step_loss

    lm = tiny(tokenizer)
    cfg = TrainConfig(model="tiny", data=DataSpec(name="arith", limit=4), loss="ce", max_new_tokens=6)
    method = MindSkipMethod(mixed(), lm.adapter, capacity=0.5, weight=1.0)
    step_loss(lm, Engine(lm.adapter, method.kv_mode), method, examples(lm, cfg, None), "ce")[0].backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in method.mind.routers.values())
    assert all(p.grad is None for p in lm.model.parameters())

    def attend(capacity, tmp):
        tc = TrainConfig(model="tiny", data=DataSpec(name="text,arith", limit=8), steps=40, batch_size=4, lr=1e-2,
                         loss="ce", max_new_tokens=8, out=str(tmp))
        log = run_train(MindSkipTrainConfig(train=tc, capacity=capacity, routed=4), lm=lm).log
        return log[0]["attend"], sum(r["attend"] for r in log[-15:]) / 15

    import tempfile

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        (first, late_half), (_, late_quarter) = attend(0.5, a), attend(0.25, b)
    assert first == 1.0  # routers start open
    assert abs(late_half - 0.5) < 0.2 and abs(late_quarter - 0.25) < 0.15 and late_quarter < late_half


def test_train_then_evaluate_with_a_tuned_threshold(tiny_dirs, tmp_path):
    runner = CliRunner()
    run = tmp_path / "mind"
    common = ["--model", str(tiny_dirs["llama"])]
    res = runner.invoke(app, ["mindskip", "train", *common, "--dataset", "text,arith", "--limit", "8", "--steps", "6",
                              "--batch-size", "4", "--max-new-tokens", "8", "--routed", "4", "--out", str(run)])
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["kind"] == "mindskip" and saved["routed_layers"] == [1, 2, 3, 4] and saved["kv"] is False
    out = tmp_path / "eval.parquet"
    res = runner.invoke(app, ["evaluate", *common, "--dataset", "arith", "--split", "test", "--limit", "4",
                              "--policy", f"mindskip:{run}", "-o", "skip=2", "-o", "calibration=4",
                              "--max-new-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out)
    mind = rows[rows["policy"] == "mindskip"]
    assert len(mind) == 4 and (mind["layers_mean"] == 6).all() and (mind["kv_mode"] == "none").all()
    assert mind["attention_mean"].mean() < 6 and (rows[rows["policy"] == "full"]["attention_mean"] == 6).all()
    assert mind["policy_spec"].iloc[0].endswith("[calibration=4;skip=2]")

    res = runner.invoke(app, ["evaluate", *common, "--dataset", "arith", "--split", "test", "--limit", "2",
                              "--policy", f"mindskip:{run}", "-o", "skip=2", "-o", "tau=0.4", "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 1 and "give one" in res.output and not (tmp_path / "x.parquet").exists()
    res = runner.invoke(app, ["mindskip", "train", *common, "--capacity", "1.5", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "--capacity must be in [0, 1]" in res.output


@pytest.mark.parametrize("kv", [False, True])
def test_a_mindskip_draft_keeps_full_depths_tokens(tokenizer, kv):
    from skipbench.engine.speculative import Speculation, speculate

    lm = tiny(tokenizer)
    ps = prompts(tokenizer, 3)
    drafted = speculate(lm, ps, MindSkipPolicy(mixed(kv=kv), lm.adapter), Speculation(k=3), 16)
    assert drafted.tokens == generate(lm, ps, make_policy("full", 6), 16).tokens


@pytest.mark.parametrize("kv", [False, True])
def test_auto_takes_the_dense_path_where_the_cost_table_says(tokenizer, tmp_path, monkeypatch, kv):
    """--impl auto at one-token steps: gathered attention at the running-row counts where the layer table says
    gathering pays, dense elsewhere; the same tokens and attention records as gather and mask."""
    from test_engine import _plant_costs

    from skipbench.engine.forward import Meter

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    lm = tiny(tokenizer)
    policy = MindSkipPolicy(mixed(kv=kv), lm.adapter)
    _plant_costs(lm, policy.kv_mode, 4, gather_rows={1, 3})
    ps = prompts(tokenizer, 4)
    runs, meters = {}, {}
    for impl in ("gather", "mask", "auto"):
        meters[impl] = Meter()
        runs[impl] = generate(lm, ps, policy, 12, impl=impl, meter=meters[impl])
    assert runs["auto"].tokens == runs["gather"].tokens == runs["mask"].tokens
    assert runs["auto"].attention_skips == runs["gather"].attention_skips == runs["mask"].attention_skips
    assert meters["auto"].dense > 0 and meters["auto"].gathered > 0
    assert meters["gather"].dense == 0 and meters["mask"].gathered == 0


def test_refusals_of_a_mismatched_cache_and_of_training_items(tokenizer, tmp_path):
    from skipbench.data import DataSpec
    from skipbench.errors import SkipbenchError
    from skipbench.policies import parse_policies

    lm = tiny(tokenizer)
    policy = MindSkipPolicy(mixed(kv=False), lm.adapter)  # trained without K/V for skipped tokens: `none`
    ids = torch.tensor([prompts(tokenizer, 1)[0][:6]])
    e = Engine(lm.adapter, "fill", "gather")
    with pytest.raises(SkipbenchError, match="needs a cache in none mode"):
        e.forward(ids, e.prompt_cache(torch.ones_like(ids, dtype=torch.bool), 6), policy)
    folder = save(mixed(), tmp_path / "m")
    tuned = parse_policies(f"mindskip:{folder}", {"skip": "2"})[0]
    for split in ("validation", "all"):  # -o skip chooses the threshold on the validation split: scored elsewhere
        with pytest.raises(SkipbenchError, match="chooses its threshold on the validation split"):
            tuned.check_held_out(DataSpec(name="text", split=split))
    parse_policies(f"mindskip:{folder}")[0].check_held_out(DataSpec(name="text", split="validation"))  # no tuning
    tuned.check_held_out(DataSpec(name="text", split="test"))
