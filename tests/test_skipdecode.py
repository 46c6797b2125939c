"""SkipDecode (policies/skipdecode.py): the schedule's mean, its monotone fall and the layers it skips, the batch
running one set per step, the K/V semantics (fill == none), and the strategy in the commands and as a draft."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import generate
from skipbench.engine.speculative import Speculation, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.policies import make_policy
from skipbench.policies.skipdecode import layers_at, schedule


def lm_for(family, tokenizer):
    return wrap_model(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}")


@pytest.mark.parametrize("L,C,W,start", [(30, 15, 1, 0), (30, 22, 1, 0), (30, 20, 4, 26), (6, 3, 1, 0), (32, 8, 2, 0)])
def test_the_schedule_falls_linearly_to_a_mean_of_c(L, C, W, start):
    s, e = schedule(L, C, W, start)
    assert (s + e) / 2 == C and s <= L and e >= max(W, 1) and (start == 0 or s == start)
    for length in (16, 64, 129):
        n = layers_at(np.arange(length - 1), s, e, length)  # the tokens a run of `length` feeds back
        assert n[0] == s and n[-1] == e and (np.diff(n) <= 0).all()
        assert abs(n.mean() - C) <= 0.5  # up to the rounding of each token's count


@pytest.mark.parametrize("L,C,W,start,message", [(30, 31, 1, 0, "between 1"), (30, 2, 3, 0, "between 3"),
                                                 (30, 15, 1, 10, "-o start=10"), (30, 15, 1, 31, "-o start=31")])
def test_impossible_schedules_are_refused(L, C, W, start, message):
    with pytest.raises(SkipbenchError, match=message):
        schedule(L, C, W, start)


def test_generated_tokens_skip_the_lower_layers_on_the_schedule_and_the_batch_shares_each_step(tokenizer):
    lm = lm_for("llama", tokenizer)  # 6 layers
    ps, new = prompts(tokenizer, 3), 12
    policy = make_policy("skipdecode:3", lm.num_layers)  # S = 5, E = 1: warm-up layer 0, then the top n - 1
    out = generate(lm, ps, policy, new, stop_at_eos=False)
    n = [5, 5, 4, 4, 3, 3, 3, 2, 2, 1, 1]  # round(5 - 4 t / 10) for the 11 tokens fed back: a mean of 3
    for row in out.layers:
        assert len(row) == new - 1  # the fed-back tokens, indices 0 .. new - 2
        for t, ran in enumerate(row):
            assert ran == [0, *range(lm.num_layers - (n[t] - 1), lm.num_layers)], t
    assert all(row == out.layers[0] for row in out.layers)  # batch-uniform: every row is at the same index


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fill_and_none_give_the_same_tokens(family, tokenizer):
    """No token reads the K/V of a layer an earlier token skipped (the schedule never grows)."""
    lm = lm_for(family, tokenizer)
    ps = prompts(tokenizer, 3)
    runs = [generate(lm, ps, make_policy("skipdecode:3", lm.num_layers), 16, kv_mode=m) for m in ("fill", "none")]
    assert runs[0].tokens == runs[1].tokens and runs[0].layers == runs[1].layers


def direct(model, ids: list[int], runs: list[list[int] | None]) -> int:
    """The next token of `ids` computed by transformers' own model, each decoder layer run on the whole sequence
    with a forward hook that keeps a token's state unchanged where `runs[t]` (None: every layer) leaves the layer out:
    a skipped token's K/V at that layer come from the state it carries there, as in skipbench's `fill` mode."""
    import torch

    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    hooks = []
    for i, layer in enumerate(layers):
        keep = torch.tensor([r is None or i in r for r in runs])[None, :, None]

        def hook(module, args, kwargs, output, keep=keep):
            before = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            out = torch.where(keep, out, before)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return int(model(torch.tensor([ids])).logits[0, -1].argmax())
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_its_tokens_equal_transformers_layers_run_directly(tokenizer, family):
    """Each generated token, fed back, runs the layers the schedule gives it (the lower ones skipped, warm-up kept):
    the greedy output equals transformers' model recomputing the whole sequence with those layers per token."""
    model = tiny_model(family, len(tokenizer))
    lm = wrap_model(model, tokenizer, f"tiny-{family}")
    (prompt,) = prompts(tokenizer, 1)
    out = generate(lm, [prompt], make_policy("skipdecode:3", lm.num_layers), 10, stop_at_eos=False)
    tokens, ran = out.tokens[0], out.layers[0]
    s, e = schedule(lm.num_layers, 3, 1)
    n = layers_at(np.arange(len(ran)), s, e, 10)
    assert ran == [[0, *range(lm.num_layers - (k - 1), lm.num_layers)] for k in n]  # warm-up 0, then the top n - 1
    assert any(direct(model, prompt + tokens[: j + 1], [None] * (len(prompt) + j + 1)) != tokens[j + 1]
               for j in range(len(tokens) - 1))  # full depth would have said otherwise: the skipping shows
    for j in range(len(tokens) - 1):  # token j + 1 from the prompt and tokens 0 .. j (which ran ran[0 .. j])
        assert direct(model, prompt + tokens[: j + 1], [None] * len(prompt) + ran[: j + 1]) == tokens[j + 1], j


@pytest.mark.parametrize("batch", [1, 4])
def test_as_a_draft_the_output_is_full_depths(tokenizer, batch):
    lm = lm_for("llama", tokenizer)
    ps = prompts(tokenizer, 4)[:batch]
    out = speculate(lm, ps, make_policy("skipdecode:4", lm.num_layers), Speculation(k=3), 20)
    assert out.tokens == generate(lm, ps, None, 20).tokens and sum(out.speculation.drafted) > 0


def test_skipdecode_in_the_commands(tiny_dirs, tmp_path):
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dirs["llama"]), "--policy", "skipdecode:3",
                                   "-o", "warmup=2", "--prompt", "Hi", "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "text", "--split", "test",
                                   "--policy", "skipdecode:3", "--limit", "2", "--max-new-tokens", "6",
                                   "--out", str(tmp_path / "ev.parquet")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dirs["llama"]), "--policy", "skipdecode:3",
                                   "-o", "start=2", "--prompt", "Hi"])
    assert res.exit_code == 1 and "-o start=2" in res.stderr and len(res.stderr.strip().splitlines()) == 1
