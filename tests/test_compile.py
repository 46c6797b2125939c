"""`--compile` (engine/forward.enable_compile): a static plan's passes run as torch.compile graphs and give the eager
engine's tokens, model.generate's at full depth, the smaller model's under a plan, and full depth's when drafting."""

from __future__ import annotations

import pytest
import torch

from conftest import prompts, tiny_model
from test_engine import hf_generate
from skipbench.engine import generate
from skipbench.engine.forward import Meter, enable_compile
from skipbench.engine.speculative import Speculation, speculate
from skipbench.models import wrap_model
from skipbench.models.loading import remove_layers
from skipbench.policies import make_policy

pytestmark = pytest.mark.slow  # each new plan and pass kind compiles (seconds to tens of seconds on 2 cores)


@pytest.fixture(autouse=True)
def strict_dynamo():
    """Dynamo falls back to eager silently at its recompile limit: here that fails the test instead."""
    import torch._dynamo

    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def graphs() -> int:
    """Graphs dynamo has traced in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compiled_lm(family, tokenizer):
    lm = wrap_model(tiny_model(family, len(tokenizer), 6), tokenizer, f"tiny-{family}")
    enable_compile(lm.adapter)
    return lm


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compiled_full_depth_equals_generate(family, tokenizer):
    lm = compiled_lm(family, tokenizer)
    ps = prompts(tokenizer, 3)  # left padding: the prompt runs eagerly, the steps compiled with a mask
    assert generate(lm, ps, None, max_new_tokens=16).tokens == hf_generate(lm.model, ps, 16, pad_id=0, eos_id=1)


@pytest.mark.parametrize("kv_mode", ["fill", "auto"])
def test_compiled_plan_equals_the_smaller_model_and_its_meter_the_eager_meter(tokenizer, kv_mode):
    """bench reads the meter: the compiled path counts a plan's parts (the skipped layers' K/V in `fill`; none under
    `auto`, which runs a static plan `none`) as the eager loop does; its policy time is nil (the gates are constants
    of the graph)."""
    lm = compiled_lm("llama", tokenizer)
    plan = make_policy("uniform:3", lm.num_layers)
    keep, one = plan.executed_layers(), prompts(tokenizer, 1)
    meters = {"compiled": Meter(), "eager": Meter()}
    before = graphs()
    ours = generate(lm, one, plan, max_new_tokens=16, kv_mode=kv_mode, prompt_depth="policy", meter=meters["compiled"])
    traced = graphs()
    assert traced > before  # the steps ran as graphs
    assert ours.kv_mode == ("fill" if kv_mode == "fill" else "none")
    again = generate(lm, one, plan, max_new_tokens=16, kv_mode=kv_mode, prompt_depth="policy")
    assert graphs() == traced and again.tokens == ours.tokens  # a new engine and cache: no new graph
    assert ours.tokens == hf_generate(remove_layers(lm.model, keep, share_weights=False), one, 16, pad_id=0, eos_id=1)
    assert all(rec == keep for row in ours.layers for rec in row)
    lm.adapter.compiled = False
    eager = generate(lm, one, plan, max_new_tokens=16, kv_mode=kv_mode, prompt_depth="policy", meter=meters["eager"])
    assert eager.tokens == ours.tokens
    a, b = ours.cache, eager.cache  # what the graph wrote to the cache: lengths, validity, keys and values
    assert (a.length, a.all_valid, a.pad.tolist()) == (b.length, b.all_valid, b.pad.tolist())
    assert all(torch.equal(x, y) for x, y in zip(a.valid, b.valid))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.k + a.v, b.k + b.v))
    e, c = meters["eager"], meters["compiled"]
    steps = len(ours.layers[0])  # the fed-back tokens: 3 layers run and 3 skipped (their K/V written in `fill`)
    kv = 3 * steps if kv_mode == "fill" else 0
    assert (c.steps, c.attention, c.mlp, c.kv) == (e.steps, e.attention, e.mlp, e.kv) == (steps, 3 * steps, 3 * steps, kv)
    assert steps > 0
    assert c.policy_seconds == 0 < e.policy_seconds


def test_compiled_self_speculation_is_lossless_and_per_token_policies_run_eagerly(tokenizer):
    lm = compiled_lm("llama", tokenizer)
    ps = prompts(tokenizer, 2)
    full = generate(lm, ps, None, max_new_tokens=16)
    # an early exit drafts, then the verifier resumes its tokens from the exit (a span) and verifies K + 1 at once
    out = speculate(lm, ps, make_policy("early-exit:3", lm.num_layers), Speculation(k=3), 16)
    assert out.tokens == full.tokens
    # a per-token policy's gates are tensors: the eager loop runs it (its gates are timed, which the graph never
    # does), with the eager engine's tokens
    per_token, meter = make_policy("random-token:3", lm.num_layers, seed=1), Meter()
    compiled_run = generate(lm, ps, per_token, max_new_tokens=8, meter=meter)
    assert meter.steps > 0 and meter.policy_seconds > 0
    lm.adapter.compiled = False
    assert compiled_run.tokens == generate(lm, ps, per_token, max_new_tokens=8).tokens
