"""Host-device synchronisations in the decode loop (issue 39): on a GPU, each `.item()`, `.tolist()`, `bool(t)`,
`int(t)`, `.cpu()` or `.nonzero()` of a device tensor stalls the queue until the GPU catches up. The CPU has no such
stall, so these tests count the calls themselves (the Tensor methods patched) during the decode steps of a tiny
model, and hold them to the budget listed here; on CUDA the static plans also run under
`torch.cuda.set_sync_debug_mode("error")`.

The budget, per decode step (the prompt's pass and the collection of the records after the loop are not steps):

* static plans (full depth, uniform, early exit, a calibrated plan): none. Whether every row has finished is read
  through `decode.DonePoll`, a non-blocking copy read one step later on CUDA.
* plans that differ between rows (`random:C`, one draw per sequence) and per-token random skipping: one `int(t)`
  per layer some rows run and others skip (`Engine.layer`: the running tokens' count decides gathered or dense and
  sizes the gathered rows); `random-token` adds one `.cpu()` a step (its draws are made on the host from the
  tokens' positions, so that a token's draw does not depend on its batch).
* confidence exit: per gated layer, a `.nonzero()` (the tokens still running, whose confidence is computed) and one
  or two `bool(t)` (does every token, or any, still run).
* FlexiDepth's routed layers: two `.nonzero()` (the routed and the skipped tokens, gathered apart) and, in the `none`
  KV mode, one `bool(t)` in `KVCache.mark` (whether every token wrote K/V there).
* stop strings (`stop=`, lm-eval's `until`): one `.tolist()` a step, the tokens decoded on the host; not counted here.

Gathering needs the number of running tokens on the host, so a per-token policy that gathers pays at least one
synchronisation per partly-run layer; the issue's "at most one per step" holds for no gathering policy here, and
the counts above are pinned so that they do not grow.
"""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import CORPUS, no_kv_router, tiny_model
from skipbench.data import DataSpec
from skipbench.engine import generate
from skipbench.models import wrap_model
from skipbench.policies import make_policy, parse_policies

SYNCING = ("__bool__", "item", "tolist", "cpu", "nonzero", "__int__", "__float__", "__index__")
LAYERS = 6


def per_step(lm, prompts, policy_of, monkeypatch) -> dict[str, float]:
    """The calls of SYNCING per decode step: those of a 12-token decoding less those of a 4-token one, over the 8
    steps between (the prompt's pass and the records' collection cancel out)."""
    import skipbench.engine.decode as decode

    counted = collections.Counter()
    collecting = [False]
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _name=name, _original=original, **k):
            if not collecting[0]:
                counted[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    collect = decode._collect

    def collect_uncounted(*a, **k):
        collecting[0] = True
        try:
            return collect(*a, **k)
        finally:
            collecting[0] = False

    monkeypatch.setattr(decode, "_collect", collect_uncounted)
    runs = {}
    for n in (4, 12):
        counted.clear()
        generate(lm, prompts, policy_of(), n, stop_at_eos=False)
        runs[n] = dict(counted)
    monkeypatch.undo()
    return {k: (runs[12].get(k, 0) - runs[4].get(k, 0)) / 8 for k in set(runs[4]) | set(runs[12])}


@pytest.fixture(scope="module")
def lm(tokenizer):
    return wrap_model(tiny_model("llama", len(tokenizer), LAYERS), tokenizer, "tiny-llama")


@pytest.mark.parametrize("spec", ["full", "uniform:3", "early-exit:3", "block-influence:4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_static_plans_decode_step_never_synchronises(lm, tokenizer, spec, batch, monkeypatch):
    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:batch]]
    def policy_of():
        return parse_policies(spec)[0].build(LAYERS, lm, DataSpec(name="text"))

    assert policy_of().static
    counts = per_step(lm, prompts, policy_of, monkeypatch)
    assert sum(counts.values()) == 0, counts


def test_per_token_policies_stay_within_their_listed_budget(lm, tokenizer, tmp_path, monkeypatch):
    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    router = no_kv_router(tmp_path / "router")
    routed = 3  # no_kv_router routes the upper half of the 6 layers
    budgets = {  # spec: (the most calls a step may make, which kinds)
        "random:3": (LAYERS, {"__int__"}),
        "random-token:3": (1 + LAYERS, {"__int__", "cpu"}),
        "confidence:0.9": (3 * LAYERS, {"nonzero", "__bool__"}),
        f"flexidepth:{router}": (3 * routed, {"nonzero", "__bool__"}),
    }
    for spec, (most, kinds) in budgets.items():
        counts = per_step(lm, prompts, lambda: parse_policies(spec)[0].build(LAYERS, lm), monkeypatch)
        used = {k: v for k, v in counts.items() if v}
        # each of them does synchronise (so the counting sees calls), within its budget
        assert used and sum(used.values()) <= most and set(used) <= kinds, (spec, used)


def test_the_lagged_poll_keeps_the_tokens(lm, tokenizer):
    """On CUDA the poll reads the previous step's flag, so a finished batch runs one more step; its tokens are padding
    and count in no row. Emulated here by forcing the lag on the CPU: the same tokens and layer records as unlagged."""
    import skipbench.engine.decode as decode

    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    policy = make_policy("uniform:3", LAYERS)

    def stop(rows):  # the rows end after 4, 7 and 10 tokens, long before the 24 allowed
        return [len(r) >= 4 + 3 * i for i, r in enumerate(rows)]

    plain = generate(lm, prompts, policy, 24, stop=stop)

    class Lagged(decode.DonePoll):
        def __init__(self, device):
            super().__init__(device)
            self.previous = False

        def finished(self, done):
            now, self.previous = self.previous, bool(done.all())
            return now

    original = decode.DonePoll
    decode.DonePoll = Lagged
    try:
        lagged = generate(lm, prompts, policy, 24, stop=stop)
    finally:
        decode.DonePoll = original
    assert lagged.tokens == plain.tokens and lagged.layers == plain.layers
    assert [len(t) for t in plain.tokens] == [4, 7, 10]  # every row ended early: the lag ran a step past the end


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device: sync debug mode exists only there")
def test_static_plans_decode_under_cuda_sync_debug_mode_error(tokenizer):
    lm = wrap_model(tiny_model("llama", len(tokenizer), LAYERS).cuda(), tokenizer, "tiny-llama")
    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    for spec in ("full", "uniform:3", "early-exit:3"):
        import skipbench.engine.decode as decode

        steps = decode.decoding(lm, prompts, make_policy(spec, LAYERS), 12, stop_at_eos=False, timings=[])
        next(steps)  # the prompt's pass (its padding is read on the host)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(8):
                next(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
