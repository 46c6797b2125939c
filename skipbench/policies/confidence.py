"""`confidence:LAMBDA`: per-token dynamic early exit after Schuster et al. (CALM, 2022).

Before layer l (l >= `min-layers`), the state a token carries after l layers gets a confidence c; a token with
c >= lambda exits: it skips every remaining layer and the head reads that state. A skipped layer's K/V follow the
run's KV mode: `fill` writes the K/V the layer computes from the exit state (CALM's state propagation), `none`
writes nothing. Measures (`measure` option):

* `softmax`: the difference of the top two probabilities of the state through the final norm and the head
  (CALM's softmax_diff); it costs one head product per still-running token per layer, and bench's clock counts it;
* `state`: cos(h_l, h_{l-1}), the cosine between the states after consecutive layers (no head).

With `decay` tau > 0 the threshold decays with the generated position t (CALM Eq. 5):
lambda_t = clip(0.9 lambda + 0.1 exp(-tau t / N), 0, 1), N = `decay-length`; t is each token's position less the
position of the first token the policy saw in its sequence, so a decode loop (one token per step) and a
teacher-forced pass over the whole response (`cosine`) give every token the same threshold. Tokens still running at the last
layer run it: a threshold above 1 is full depth, a threshold of 0 (softmax) exits every token at `min-layers`.

That decay is the paper's form. The authors' code (google-research/t5x, t5x/contrib/calm/models.py,
`position_adjusted_threshold`, the same since ca3d2e43c8db of 2022-10-10) differs: it scales the decaying term by
lambda, lambda_t = lambda (0.9 + 0.1 exp(-tau t / N)), unclipped, which falls from lambda at t = 0 to 0.9 lambda (the
paper's from 0.9 lambda + 0.1), tau = `position_temp` (default 4), N the decode length; and its decoding loop never
passes the position (`pos` keeps its default 0), so its threshold is lambda at every step: no decay in effect. It
also exits a whole batch together, once the batch's minimum confidence reaches the threshold, not each token.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from skipbench.engine.protocol import Gate, Policy, moved


class ConfidencePolicy(Policy):
    static = False

    def __init__(self, adapter, threshold: float, measure: str, min_layers: int, decay: float, decay_length: int,
                 name: str) -> None:
        super().__init__(adapter.num_layers)
        self.ad, self.threshold, self.measure = adapter, threshold, measure
        self.min_layers, self.decay, self.decay_length, self.name = max(1, min_layers), decay, decay_length, name
        self._first: torch.Tensor | None = None  # [B, 1] the position of each sequence's first token seen
        self._running: torch.Tensor | None = None  # [B, T] tokens that have not exited (this step)
        self._prev: torch.Tensor | None = None  # the state one layer back (measure `state`)
        self._lambda: float | torch.Tensor = threshold  # a number, or [B, T] with decay

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        self._first = None

    def new_step(self, positions: torch.Tensor) -> None:
        self._running, self._prev = None, None
        if self.decay > 0:
            if self._first is None:
                self._first = positions[:, :1]
            t = (positions - self._first).clamp_min(0).float()
            self._lambda = (0.9 * self.threshold + 0.1 * torch.exp(-self.decay * t / self.decay_length)).clamp(0, 1)

    def confidence(self, h: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """c for each row of h [N, d] (the states after l layers; prev: after l - 1)."""
        if self.measure == "state":
            return F.cosine_similarity(h.float(), prev.float(), dim=-1)
        top2 = torch.softmax(self.ad.head(self.ad.final_norm(h)).float(), -1).topk(2, -1).values
        return top2[..., 0] - top2[..., 1]

    def gate(self, layer: int, hidden: torch.Tensor) -> Gate:
        if layer < self.min_layers:
            if layer == self.min_layers - 1:
                self._prev = hidden
            return True
        running = self._running if self._running is not None else torch.ones(hidden.shape[:2], dtype=torch.bool,
                                                                               device=hidden.device)
        running = moved(running, hidden.device)  # a placed model: the last layer may sit on another device
        sel = running.nonzero(as_tuple=True)  # only tokens still running are checked (and pay for the check)
        if sel[0].numel():
            prev = moved(self._prev, hidden.device)[sel] if self.measure == "state" else None
            lam = moved(self._lambda, hidden.device)[sel] if isinstance(self._lambda, torch.Tensor) else self._lambda
            stay = moved(self.confidence(hidden[sel], prev), hidden.device) < lam
            running = running.index_put(sel, stay)
        self._running, self._prev = running, hidden
        if bool(running.all()):
            return True
        return running if bool(running.any()) else False


def build(spec, ctx) -> Policy:
    return ConfidencePolicy(ctx.lm.adapter, float(spec.value), spec.opt("measure"), spec.opt("min-layers"),
                            spec.opt("decay"), spec.opt("decay-length"), spec.label)
