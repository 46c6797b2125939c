"""Host-device synchronisations in the decode loop (issue 39): on a GPU, each `.item()`, `.tolist()`, `bool(t)`,
`int(t)`, `.cpu()` or `.nonzero()` of a device tensor stalls the queue until the GPU catches up. The CPU has no such
stall, so these tests count the calls themselves (the Tensor methods patched) during the decode steps of a tiny
model, and hold them to the budget listed here; on CUDA the static plans also run under
`torch.cuda.set_sync_debug_mode("error")`.

The budget, per decode step (the prompt's pass and the collection of the records after the loop are not steps):

* static plans (full depth, uniform, early exit, a calibrated plan): none. Whether every row has finished is read
  through `decode.DonePoll`: a non-blocking copy into pinned memory, read once its event reports it arrived
  (`Event.query`, no wait).
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

# what blocks the host until the GPU catches up when called on a device tensor (`numpy` and `__array__` too: a
# device tensor must be copied to the host first). Not counted: blocking host-to-device copies (`.to(device)` of a
# host-drawn plan, as random-token's), which a CPU run cannot tell from a no-op.
SYNCING = ("__bool__", "item", "tolist", "cpu", "nonzero", "__int__", "__float__", "__index__", "numpy", "__array__")
LAYERS = 6
NEW = 10


def per_step(lm, prompts, policy) -> list[dict[str, int]]:
    """The SYNCING calls of each decode step after the first (the prompt's pass and the first token are not steps;
    neither is the records' collection after the loop), counted between the decoding's pauses. The host flag that
    `decode.DonePoll` reads is not counted: on CUDA it is a pinned host copy (the CUDA test below runs it under sync
    debug mode)."""
    import sys

    import skipbench.engine.decode as decode

    counted = collections.Counter()
    with pytest.MonkeyPatch.context() as mp:
        for name in SYNCING:
            original = getattr(torch.Tensor, name)

            def counting(self, *a, _name=name, _original=original, **k):
                caller = sys._getframe(1)
                if caller.f_code is not decode.DonePoll.finished.__code__:
                    counted[_name] += 1
                return _original(self, *a, **k)

            mp.setattr(torch.Tensor, name, counting)
        steps = decode.decoding(lm, prompts, policy, NEW, stop_at_eos=False, timings=[])
        next(steps)  # the prompt's pass and the first token
        out = []
        for _ in range(NEW - 2):  # the last step's pause is followed by the collection
            before = dict(counted)
            next(steps)
            out.append({k: v - before.get(k, 0) for k, v in counted.items() if v - before.get(k, 0)})
    return out


@pytest.fixture(scope="module")
def lm(tokenizer):
    return wrap_model(tiny_model("llama", len(tokenizer), LAYERS), tokenizer, "tiny-llama")


@pytest.mark.parametrize("spec", ["full", "uniform:3", "early-exit:3", "block-influence:4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_static_plans_decode_step_never_synchronises(lm, tokenizer, spec, batch, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))  # block-influence's calibration: not the user's cache
    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:batch]]
    policy = parse_policies(spec)[0].build(LAYERS, lm, DataSpec(name="text"))
    assert policy.static
    steps = per_step(lm, prompts, policy)
    assert len(steps) == NEW - 2 and all(not s for s in steps), steps


def test_per_token_policies_stay_within_their_listed_budget(lm, tokenizer, tmp_path):
    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    router = no_kv_router(tmp_path / "router")
    routed = 3  # no_kv_router routes the upper half of the 6 layers
    budgets = {  # spec: (the most calls a step may make, which kinds)
        "random:3": (LAYERS, {"__int__"}),
        "random-token:3": (2 + LAYERS, {"__int__", "cpu", "numpy"}),  # `.cpu().numpy()`: one wait, two calls
        "confidence:0.9": (3 * LAYERS, {"nonzero", "__bool__"}),
        f"flexidepth:{router}": (3 * routed, {"nonzero", "__bool__"}),
    }
    for spec, (most, kinds) in budgets.items():
        steps = per_step(lm, prompts, parse_policies(spec)[0].build(LAYERS, lm))
        # each of them does synchronise (so the counting sees calls), and every step within its budget
        assert any(steps), spec
        for used in steps:
            assert sum(used.values()) <= most and set(used) <= kinds, (spec, used)


def test_the_lagged_poll_keeps_the_tokens(lm, tokenizer, monkeypatch):
    """On CUDA the poll reads a step's flag once its copy has arrived, so a finished batch runs on a step or so; those
    tokens are padding and count in no row. Run here through DonePoll's lagged path with events that complete one
    step late: the same tokens and layer records as the CPU's immediate read, and one step more run."""
    import skipbench.engine.decode as decode

    prompts = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    policy = make_policy("uniform:3", LAYERS)

    def stop(rows):  # the rows end after 4, 7 and 10 tokens, long before the 24 allowed
        return [len(r) >= 4 + 3 * i for i, r in enumerate(rows)]

    plain = generate(lm, prompts, policy, 24, stop=stop)

    class OneStepLate:
        def __init__(self):
            self.asked = 0

        def query(self):
            self.asked += 1
            return self.asked > 1

    monkeypatch.setattr(decode.DonePoll, "_event", staticmethod(lambda device: OneStepLate()))
    monkeypatch.setattr(decode.DonePoll, "__init__",
                        lambda self, device, lagged=None: setattr(self, "lagged", True) or setattr(self, "pinned", False)
                        or setattr(self, "pending", []))
    lagged = generate(lm, prompts, policy, 24, stop=stop)
    assert lagged.tokens == plain.tokens and lagged.layers == plain.layers
    assert [len(t) for t in plain.tokens] == [4, 7, 10]  # every row ended early
    assert lagged.cache.length == plain.cache.length + 1  # the one padding step the lag ran


@pytest.mark.lane
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device: sync debug mode exists only there")
def test_static_plans_decode_under_cuda_sync_debug_mode_error(tokenizer):
    lm = wrap_model(tiny_model("llama", len(tokenizer), LAYERS), tokenizer, "tiny-llama", "cuda")
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
