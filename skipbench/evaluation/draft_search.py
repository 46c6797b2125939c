"""`bench --drafts auto`: search a static layer set for a self-speculative draft on this model and machine.

Calibration: the first `items` prompts of the embedded `text` suite's train split (never bench's own prompts),
continued `tokens` tokens by the full model (greedy). A layer set's *agreement* is the share of those continuation
positions where the set's top-1 token, teacher-forced (prompt at full depth, continuation under the set), equals
the full model's: the proxy SWIFT scores layer sets by. The search starts from every layer and greedily drops the
layer whose removal keeps agreement highest (layer 0 is always kept), down to `min_layers` (L/4 unless set). The
proxy is pessimistic: teacher forcing runs every continuation token under the set, so later tokens read K/V the
set computed, where a real draft reads the full model's K/V of everything accepted and drafts at most K tokens.

Each set on that path is then scored Draft & Verify's way, by wall clock on this machine: its draft step time
t_draft is measured (a short plain decode under the set), the verify pass t_verify (a full forward over K + 1
tokens) and the full step t_full once, and the predicted speedup is E(agreement, K) t_full / (K t_draft +
t_verify) with E the expected tokens per round (engine/speculative.expected_tokens). The set with the highest
prediction is the draft; bench then measures its real acceptance and speed like any other draft.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_items
from skipbench.engine import Engine, generate
from skipbench.engine.decode import Clock, left_pad, pad_id
from skipbench.engine.speculative import expected_tokens
from skipbench.models.loading import LoadedModel
from skipbench.policies.static import PlanPolicy


@dataclass(frozen=True)
class Step:
    layers: tuple[int, ...]
    agreement: float  # teacher-forced top-1 agreement with the full model on the calibration continuations
    t_draft: float = float("nan")  # seconds per draft step, measured
    predicted_speedup: float = float("nan")


@dataclass(frozen=True)
class Search:
    chosen: tuple[int, ...]
    path: list[Step]
    t_full: float
    t_verify: float
    k: int

    @property
    def label(self) -> str:
        return "layers:" + ",".join(map(str, self.chosen))


def _calibration(lm: LoadedModel, items: int, tokens: int):
    prompts, _ = encode_items(lm, load_items(DataSpec(name="text", split="train", limit=items)), 512)
    cont = generate(lm, prompts, None, tokens, stop_at_eos=False).tokens
    seqs = [p + c for p, c in zip(prompts, cont)]
    ids, present = left_pad(seqs, pad_id(lm), lm.device)
    width = ids.shape[1]
    # the positions whose next token a draft would propose: the last prompt token and every continuation token
    # but the last (padding is on the left, so row r's prompt ends at width - len(cont) - 1)
    drafted = torch.zeros_like(present)
    for r, c in enumerate(cont):
        drafted[r, width - len(c) - 1 : width - 1] = True
    return ids, present, drafted


def _agreement(engine: Engine, lm: LoadedModel, ids, present, drafted, target, layers) -> float:
    cache = engine.prompt_cache(present, ids.shape[1])
    policy = PlanPolicy(lm.num_layers, list(layers), "search")
    logits = engine.forward(ids, cache, policy, present=present, skippable=drafted & present).logits
    return float((logits.argmax(-1) == target)[drafted].float().mean())


def _step_time(lm: LoadedModel, prompt: list[int], layers, steps: int = 8) -> float:
    """Median seconds of one decode step under the set (None: full depth), on the engine a draft runs on: a static
    draft computes no K/V for the layers it skips (engine/speculative.py)."""
    engine = Engine(lm.adapter, write_skipped=False)
    policy = None if layers is None else PlanPolicy(lm.num_layers, list(layers), "search")
    ids, present = left_pad([prompt], pad_id(lm), lm.device)
    cache, out = engine.prefill(ids, present, ids.shape[1] + steps + 1, last_only=True)
    tok, clock, times = out.logits[:, -1].argmax(-1), Clock(lm.device), []
    for _ in range(steps):
        tok = engine.forward(tok[:, None], cache, policy).logits[:, -1].argmax(-1)
        times.append(clock.lap())
    return statistics.median(times)


def _verify_time(lm: LoadedModel, prompt: list[int], k: int, reps: int = 5) -> float:
    """Median seconds of one full-depth forward over the prompt's last K + 1 tokens (a verify pass)."""
    engine = Engine(lm.adapter)
    ids, present = left_pad([prompt], pad_id(lm), lm.device)
    times = []
    for _ in range(reps):
        cache, _ = engine.prefill(ids, present, ids.shape[1] + k + 1, last_only=True)
        clock = Clock(lm.device)
        engine.forward(ids[:, -k - 1 :], cache, None)
        times.append(clock.lap())
    return statistics.median(times)


@torch.no_grad()
def search(lm: LoadedModel, prompt: list[int], k: int, items: int = 4, tokens: int = 32,
           min_layers: int | None = None, progress=None) -> Search:
    """The draft layer set for K tokens per round (module docstring). `prompt`: the prompt timing runs on."""
    L = lm.num_layers
    min_layers = max(1, min_layers if min_layers is not None else L // 4)
    engine = Engine(lm.adapter)
    ids, present, drafted = _calibration(lm, items, tokens)
    full = engine.forward(ids, engine.prompt_cache(present, ids.shape[1]), None, present=present).logits.argmax(-1)
    current = list(range(L))
    path = [Step(tuple(current), 1.0)]
    while len(current) > min_layers:
        # layer 0 is never dropped: every draft starts from the embedding through it (as random skipping does)
        scores = {l: _agreement(engine, lm, ids, present, drafted, full, [x for x in current if x != l])
                  for l in current if l != 0}
        drop = max(scores, key=lambda l: (scores[l], l))
        current = [x for x in current if x != drop]
        path.append(Step(tuple(current), scores[drop]))
        if progress:
            progress()
    t_full = _step_time(lm, prompt, None)
    t_verify = _verify_time(lm, prompt, k)
    scored = []
    for s in path[1:]:
        t_d = _step_time(lm, prompt, s.layers)
        scored.append(Step(s.layers, s.agreement, t_d, expected_tokens(s.agreement, k) * t_full / (k * t_d + t_verify)))
    best = max(scored, key=lambda s: s.predicted_speedup)
    return Search(best.layers, [path[0], *scored], t_full, t_verify, k)
