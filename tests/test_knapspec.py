"""KnapSpec (policies/knapspec.py) and the sub-layer gate it needs (protocol.Sublayers).

The gate against transformers' own model with that branch's output projection zeroed; greedy output equal to full
depth's for both families and KV modes at batch 1 and 4, and sampled tokens in the full model's distribution; the
search on a model with planted identity sub-layers (it skips exactly those); the latency model's cache; options.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import Engine, generate
from skipbench.engine.decode import Sampling
from skipbench.engine.protocol import Policy, Sublayers
from skipbench.engine.speculative import Speculation, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.policies import parse_policies
from skipbench.policies.knapspec import KnapSpec, SublayerCosts

NEW = 20
FLAT = SublayerCosts(c2=0.0, c3=1e-3, mlp=1e-3, contexts=(32,), attention=(1e-3,))  # attention weighs as an MLP


def layers_of(model):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def zero_branch(model, i: int, branch: str):
    """Layer i's attention or MLP output projection (weight and bias) zeroed: that branch adds nothing."""
    layer = layers_of(model)[i]
    if branch == "attn":
        proj = layer.self_attn.o_proj if hasattr(layer.self_attn, "o_proj") else layer.self_attn.out_proj
    else:
        proj = layer.mlp.down_proj if hasattr(layer, "mlp") else layer.fc2
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    return model


class Plan(Policy):
    def __init__(self, num_layers, gates):
        super().__init__(num_layers)
        self.gates = gates

    def gate(self, layer, hidden):
        return self.gates.get(layer, True)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_a_skipped_branch_is_that_branch_adding_nothing(tokenizer, family, kv_mode):
    ids = torch.tensor([prompts(tokenizer, 1)[0]])
    lm = wrap_model(tiny_model(family, len(tokenizer)), tokenizer, family)
    engine = Engine(lm.adapter, kv_mode)
    present = torch.ones_like(ids, dtype=torch.bool)
    gates = {2: Sublayers(attn=False, mlp=True), 3: Sublayers(attn=True, mlp=False)}
    got = engine.forward(ids, engine.prompt_cache(present, ids.shape[1]), Plan(lm.num_layers, gates), present=present).logits
    ref = zero_branch(zero_branch(tiny_model(family, len(tokenizer)), 2, "attn"), 3, "mlp")(ids).logits
    assert torch.allclose(got, ref, atol=1e-5)


def planted(tokenizer, family="llama"):
    """Layers 2 and 3's attention and layer 4's MLP add nothing (sub-layers 4, 6 and 9)."""
    model = tiny_model(family, len(tokenizer))
    for i, branch in ((2, "attn"), (3, "attn"), (4, "mlp")):
        zero_branch(model, i, branch)
    return wrap_model(model, tokenizer, f"tiny-{family}-planted")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_it_skips_the_planted_identity_sub_layers(tokenizer, family):
    """Skipping an identity sub-layer keeps every state exactly (cosine 1), and that draft agrees with the full model
    on every reference token: the search skips exactly those three (layer 2's attention alone of its layer), with
    the longest draft."""
    lm = planted(tokenizer, family)
    draft = KnapSpec(lm.adapter, interval=1, reference=8, max_length=6, name="knapspec", costs=FLAT)
    ps = prompts(tokenizer, 2)
    out = speculate(lm, ps, draft, Speculation(k=3), NEW)
    assert out.tokens == generate(lm, ps, None, NEW).tokens
    assert set(draft.searches) == {((4, 6, 9), 6)}
    assert out.speculation.acceptance_rate() == 1.0
    assert draft.gate(2, None) == Sublayers(attn=False, mlp=True)  # one branch of a layer run, the other skipped


def test_the_latency_model_decides_which_sub_layers_go(tokenizer):
    """Layers 2 and 3's attentions and layers 1-4's MLPs are the identity. With attention five times an MLP's time
    (weights 5 and 1, capacity 12 of the 24 skippable), the most time is saved by both attentions and two MLPs;
    with equal times (capacity 4), four identity sub-layers of any kind save the same, and fewer attentions go."""
    model = tiny_model("llama", len(tokenizer))
    for i, branch in [(2, "attn"), (3, "attn"), *((i, "mlp") for i in range(1, 5))]:
        zero_branch(model, i, branch)
    lm = wrap_model(model, tokenizer, "tiny-planted")
    heavy = SublayerCosts(c2=0.0, c3=5e-3, mlp=1e-3, contexts=(32,), attention=(5e-3,))
    ps = prompts(tokenizer, 1)
    chosen = {}
    for name, costs in (("heavy", heavy), ("flat", FLAT)):
        draft = KnapSpec(lm.adapter, interval=100, reference=8, max_length=4, name="knapspec", costs=costs)
        speculate(lm, ps, draft, Speculation(k=3), 6)
        (skipped, _), = draft.searches
        chosen[name] = set(skipped)
    assert {4, 6} <= chosen["heavy"] and len(chosen["heavy"]) == 4  # both attentions (10) and two MLPs (2)
    assert len(chosen["flat"]) == 4 and chosen["flat"] <= {4, 6, 3, 5, 7, 9}  # four of the identity sub-layers


def test_reference_tokens_of_earlier_rounds_stay_where_the_cache_holds_them(tokenizer):
    """At batch 4 rows leave holes; a reference token kept rounds ago is still read at its cache index and position:
    the full model, run as a candidate on every reference token, agrees with itself on all of them."""
    class Recording(KnapSpec):
        def after_round(self, done):
            self.last = done
            return super().after_round(done)

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    draft = Recording(lm.adapter, interval=3, reference=24, max_length=3, name="knapspec", costs=FLAT)
    out = speculate(lm, prompts(tokenizer, 4), draft, Speculation(k=3), NEW)
    assert sum(out.speculation.rejections) > 0 and len({r for r, *_ in draft.refs}) > 1
    assert draft.agreement([frozenset()], draft.last) == [1.0]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_greedy_output_is_full_depths(tokenizer, family, kv_mode):
    from test_del import scaled_top

    # the upper layers scaled down: skipping their sub-layers changes little, so drafts pay, and are sometimes wrong
    lm = wrap_model(scaled_top(tiny_model(family, len(tokenizer)), 2, 0.3), tokenizer, family)
    ps = prompts(tokenizer, 4)
    ref = generate(lm, ps, None, NEW)
    for batch in (1, 4):
        draft = KnapSpec(lm.adapter, interval=2, reference=8, max_length=4, name="knapspec", costs=FLAT)
        out = speculate(lm, ps[:batch], draft, Speculation(k=3), NEW, kv_mode)
        assert out.tokens == ref.tokens[:batch], (family, kv_mode, batch)
        assert sum(out.speculation.drafted) > 0 and sum(out.speculation.rejections) > 0 and len(draft.searches) >= 2
        assert all(not {0, 1, 10, 11} & set(skipped) for skipped, _ in draft.searches)  # first and last layers run


def test_sampled_tokens_follow_the_full_models_distribution():
    from test_speculative import chi2

    small = tiny_model("llama", 6, layers=6, seed=3)
    with torch.no_grad():
        for p in small.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    lm = wrap_model(small, SimpleNamespace(pad_token_id=0, eos_token_id=None), "tiny-vocab-6")
    sampling, n, prompt = Sampling(temperature=1.0, seed=5), 3000, [2, 3, 4, 5, 2]
    draft = KnapSpec(lm.adapter, interval=1, reference=8, max_length=2, name="knapspec", costs=FLAT)
    out = speculate(lm, [prompt] * n, draft, Speculation(k=2), 4, "fill", sampling, stop_at_eos=False)
    s = out.speculation
    assert sum(s.accepted) > n // 10 and sum(s.rejections) > n // 40  # both paths taken (the residual 100+ times)
    assert chi2(lm, prompt, out, sampling) > 0.01


def test_the_latency_model_is_measured_once_and_kept(tokenizer, tmp_path, monkeypatch):
    from skipbench.policies import knapspec

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    costs = knapspec.sublayer_costs(lm.adapter)
    assert costs.mlp > 0 and len(costs.attention) == len(knapspec.CONTEXTS) and all(t > 0 for t in costs.attention)
    monkeypatch.setattr(knapspec, "measure", lambda adapter: pytest.fail("measured again although kept"))
    assert knapspec.sublayer_costs(lm.adapter) == costs
    (kept,) = (tmp_path / "cache" / "sublayer-costs").glob("*.json")
    kept.write_text("{")
    monkeypatch.setattr(knapspec, "measure", lambda adapter: costs)
    assert knapspec.sublayer_costs(lm.adapter) == costs  # a damaged file: measured again, not fatal


@pytest.mark.parametrize("option, value, said", [
    ("interval", "0", "interval must be >= 1"),
    ("reference", "0", "reference must be between 1 and 1024"),
    ("reference", "100000", "reference must be between 1 and 1024"),
    ("max-length", "17", "max-length must be between 1 and 16"),
])
def test_bad_options_are_one_line(tokenizer, option, value, said):
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    (spec,) = parse_policies("knapspec", {option: value})
    with pytest.raises(SkipbenchError, match=said):
        spec.build(lm.num_layers, lm, draft=True)


def test_the_commands_take_it_as_a_draft_only(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(tiny_dirs["opt"]), "--dataset", "arith", "--limit", "2", "--max-new-tokens", "6"]
    res = CliRunner().invoke(app, ["evaluate", *common, "--policy", "knapspec", "--out", str(tmp_path / "p.parquet")])
    assert res.exit_code == 1 and "give it as a draft" in res.stderr
    res = CliRunner().invoke(app, ["evaluate", *common, "--policy", "full", "--draft", "knapspec",
                                   "--out", str(tmp_path / "d.parquet")])
    assert res.exit_code == 0, res.output
