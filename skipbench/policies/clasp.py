"""CLaSp (Chen et al., ACL 2025, arXiv 2505.24196): in-context layer skipping for self-speculative decoding.

A draft that runs C of the L layers (M = L - C skipped) and chooses them again from the verify passes. The choice
is the paper's approximate dynamic program (its Algorithm 1) on the last accepted token's states, x_0 (the
embedding) .. x_L (leaving the last layer), as the verify pass computed them:

* g[i][j] is a state after the first i layers with j of them skipped: g[0][0] = x_0, g[i][0] = x_i, and
  g[i][i] = g[i-1][i-1] (every layer so far skipped) for i <= M;
* for 1 <= j <= min(i - 1, M), g[i][j] is whichever of g[i-1][j-1] (layer i-1 skipped) and f_{i-1}(g[i-1][j])
  (layer i-1 run on it) has the larger cosine similarity to x_i; a tie skips;
* the M layers skipped on the way to g[L][M] are read back from the choices made.

The program runs after the prompt (the paper's "prefill & update") and then every `interval` rounds, its layer
optimisation interval: the paper's sparse persistence (the layer sets adjacent tokens need are alike, Fig. 3a) is
why a set may serve several rounds. The draft's greedy output equals full depth's whatever the set (the verify pass
decides every token).

Where this differs from the paper, which has no code (kaist-flexml-lab/knapspec's reimplementation was read to
check the algorithm):

* f_{i-1} runs on all of a layer's candidates in one call that reads the verify pass's cache and writes nothing
  (`Engine.probe`), as the paper's sequence-parallel mask does (each candidate gathers its row's keys: a copy per
  candidate, where the paper's mask shares one);
* at batch > 1 the batch shares one layer set: each cell keeps the choice with the larger cosine summed over the
  rows (the paper decodes one sequence);
* the interval defaults to 16 rounds (the paper does not give the one of its tables; knapspec uses 64, more rounds
  than a 128-token answer has); C is given (the paper skips 50-60% of the layers; knapspec 25%);
* x_L is the state before the final norm (the paper does not say; knapspec does the same);
* the draft length and its stop are the loop's (`--speculate`, `--draft-threshold`); the paper stops drafting at a
  draft confidence of about 0.7 (its Draft-Exiting Threshold), which `--draft-threshold 0.7` gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skipbench.engine.forward import Engine
from skipbench.engine.protocol import Gate, Policy, Round
from skipbench.errors import SkipbenchError


class CLaSp(Policy):
    static = True  # the same layers for every token of a round
    adapts = True

    def __init__(self, adapter, cost: int, interval: int, name: str) -> None:
        super().__init__(adapter.num_layers)
        if not 1 <= cost < adapter.num_layers:
            raise SkipbenchError(f"policy '{name}': a CLaSp draft runs 1 to {adapter.num_layers - 1} layers, got {cost}")
        if interval < 1:
            raise SkipbenchError(f"policy '{name}': -o interval must be >= 1 (rounds between layer searches), got {interval}")
        self.engine, self.cost, self.interval, self.name = Engine(adapter), cost, interval, name
        self.begin(1)

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        self.layers = list(range(self.num_layers))  # until the first search, after the prompt
        self._run = [True] * self.num_layers
        self.rounds = 0
        self.searches: list[tuple[int, ...]] = []  # the layer set each search chose, in order

    def gate(self, layer: int, hidden) -> Gate:
        return self._run[layer]

    def executed_layers(self) -> list[int]:
        return list(self.layers)

    def after_round(self, done: Round) -> int | None:
        self.rounds += 1
        if (self.rounds - 1) % self.interval == 0 and bool(done.live.any()):
            self.layers = self.search(done)
            self._run = [i in set(self.layers) for i in range(self.num_layers)]
            self.searches.append(tuple(self.layers))
        return None

    @torch.no_grad()
    def search(self, done: Round) -> list[int]:
        """Algorithm 1 on each live row's last kept token; the layers to run."""
        rows = done.live.nonzero()[:, 0]
        last = done.accepted[rows]
        x = [h[rows, last].float() for h in done.hidden]  # [R, d] per depth 0 .. L
        index = done.start + last  # the token's cache index
        ad, L, M = self.engine.ad, self.num_layers, self.num_layers - self.cost
        g = {(0, 0): x[0]}
        skipped = {}  # (i, j) -> whether g[i][j] skipped layer i - 1
        for i in range(1, L + 1):
            g[i, 0] = x[i]
            if i <= M:
                g[i, i], skipped[i, i] = g[i - 1, i - 1], True
            js = list(range(1, min(i - 1, M) + 1))
            if not js:
                continue
            cand = torch.stack([g[i - 1, j] for j in js])  # [J, R, d]
            J, R, d = cand.shape
            h = cand.reshape(J * R, 1, d).to(done.hidden[0].dtype)
            pos = ad.position_embeddings(h, done.positions[rows, last].repeat(J)[:, None])
            run = self.engine.probe(i - 1, h, pos, done.cache, rows.repeat(J), index.repeat(J)).reshape(J, R, d).float()
            skip = torch.stack([g[i - 1, j - 1] for j in js])
            by_skip = F.cosine_similarity(skip, x[i][None], dim=-1).sum(-1)
            by_run = F.cosine_similarity(run, x[i][None], dim=-1).sum(-1)
            for n, j in enumerate(js):
                skipped[i, j] = bool(by_skip[n] >= by_run[n])
                g[i, j] = skip[n] if skipped[i, j] else run[n]
        out, j = [], M
        for i in range(L, 0, -1):
            if j and skipped[i, j]:
                j -= 1
            else:
                out.append(i - 1)
        return sorted(out)


def build(spec, ctx) -> Policy:
    return CLaSp(ctx.lm.adapter, spec.int_arg(), spec.opt("interval"), spec.label)
