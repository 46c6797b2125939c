"""SkipDecode (Del Corro et al., 2023, arXiv 2307.02628): a batch-uniform, position-monotone skip schedule.

A generated token at index t (0 for the first one fed back) runs n(t) layers, falling linearly from a start S at the
first token fed back to an end E at the last one a run of T new tokens feeds back (index T - 2: the last token is
never fed back):

    n(t) = round(S + (E - S) t / (T - 2)),  E = 2C - S,

so that the mean over a run of the maximum length (`--max-new-tokens` T >= 3) is C layers per token fed back
(`skipdecode:C`, up to the rounding; a run of 2 feeds back one token, which runs S). The token skips the *lower* layers: it runs the W warm-up layers 0 .. W-1
(`-o warmup=W`, default 1), then the top n(t) - W layers. The prompt runs at full depth. S defaults to the widest
schedule with mean C, min(L, 2C - max(W, 1)) (`-o start=S` sets it, between C and L, with E >= max(W, 1)). A
teacher-forced pass (`cosine`, lm-eval's scores) follows the same schedule over the length its caller gives (the
run's `--max-new-tokens`; lm-eval's default 256 for scoring), so a token's layers never depend on the other rows.

K/V: a token runs layer l only when every earlier generated token ran it too (n never grows, and the upper block
of a shorter token lies inside every longer token's), so no query ever reads the K/V of a token at a layer that
token skipped: `fill` and `none` give the same tokens (tested), and the default `fill` computes K/V that no one
reads, as a static plan's would. Every row of a plain batch is at the same index t at each step, so the batch runs
one set of layers per step (the paper's point: batching and the KV cache keep working); a self-speculative batch,
whose rows accept different numbers of tokens, runs each row at its own index.

Where this differs from the paper, which has no public code:

* the paper fine-tunes the model with the schedule it then decodes with; this is the schedule alone, training-free,
  on any model (fine-tune with `skipbench finetune` first for the paper's setting);
* the schedule spans the run's maximum length (`--max-new-tokens`), as the paper's spans its maximum generation
  length; a row that stops early never reaches the lowest exits, so its realised mean is above C (recorded);
* the paper's exit points are chosen per model and target speedup; here S, E follow from C and W as above, and
  the paper's "warm-up" layers are the W lowest ones.
"""

from __future__ import annotations

import numpy as np
import torch

from skipbench.engine.protocol import Gate, Policy
from skipbench.errors import SkipbenchError
from skipbench.policies.static import layer_gates


def schedule(num_layers: int, cost: int, warmup: int, start: int = 0) -> tuple[int, int]:
    """(S, E): the layers of the first and of the last generated token (module docstring)."""
    low = max(warmup, 1)
    if not low <= cost <= num_layers:
        raise SkipbenchError(f"skipdecode:{cost}: C must be between {low} (the warm-up layers, at least 1) and "
                             f"{num_layers}")
    s = start or min(num_layers, 2 * cost - low)
    e = 2 * cost - s
    if not (cost <= s <= num_layers and e >= low):
        raise SkipbenchError(f"skipdecode:{cost}: -o start={start} must lie between {cost} and "
                             f"{min(num_layers, 2 * cost - low)} (the end, 2C - start, must keep the {low} warm-up "
                             "layer(s))")
    return s, e


def layers_at(t: np.ndarray, s: int, e: int, length: int) -> np.ndarray:
    """n(t) for generated indices t >= 0 of a run of at most `length` new tokens (fed back: indices 0 .. length - 2;
    later ones, in a teacher-forced pass, keep E)."""
    last = max(length - 2, 1)
    return np.rint(s + (e - s) * np.clip(t, 0, last) / last).astype(int)


class SkipDecode(Policy):
    static = False

    def __init__(self, num_layers: int, cost: int, warmup: int, start: int, name: str) -> None:
        super().__init__(num_layers)
        if warmup < 0 or warmup > num_layers:
            raise SkipbenchError(f"policy '{name}': -o warmup must be between 0 and {num_layers}, got {warmup}")
        self.warmup, self.name = warmup, name
        self.start, self.end = schedule(num_layers, cost, warmup, start)
        self._prompt: np.ndarray | None = None
        self._length = 0
        self._gates: list[Gate] = []

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        self._prompt = None  # until `lengths`: a pass without them is refused, never run on an earlier batch's

    def lengths(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        self._prompt, self._length = np.asarray(prompt_lengths, dtype=int), int(max_new_tokens)

    def new_step(self, positions: torch.Tensor) -> None:
        if self._prompt is None or len(self._prompt) != positions.shape[0]:
            raise SkipbenchError(f"policy '{self.name}' follows the generation's positions: it runs where a "
                                 "generation or a teacher-forced pass over responses tells it their lengths")
        t = positions.cpu().numpy() - self._prompt[:, None]  # generated index of each token; < 0: the prompt
        n = np.where(t < 0, self.num_layers, layers_at(t, self.start, self.end, self._length))
        depth = np.arange(self.num_layers)[:, None, None]
        run = (depth < self.warmup) | (depth >= self.num_layers - (n - self.warmup)[None])  # [L, B, T]
        self._gates = layer_gates(run, positions.device)

    def gate(self, layer: int, hidden) -> Gate:
        return self._gates[layer]


def build(spec, ctx) -> Policy:
    return SkipDecode(ctx.num_layers, spec.int_arg(), spec.opt("warmup"), spec.opt("start"), spec.label)
