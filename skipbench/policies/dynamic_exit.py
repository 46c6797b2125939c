"""DEL (Entezari Zarch et al., COLM 2025, arXiv 2504.05598): a dynamic exit layer and speculation length for early-exit
self-speculative decoding. A self-speculative draft only (`--draft del`).

The draft is an early exit at E (layers 0 .. E-1, then the final norm and head; the verify pass resumes its tokens
at E, engine/speculative.py). After the prompt and after every verify pass, DEL estimates how often an exit at each
candidate layer l would have proposed the full model's token, and picks the next round's E and draft length d:

* **shadow tokens**: for every token the round kept (its window: the pending token and the accepted drafts), the
  token an exit at l proposes, argmax head(norm(h_l)), from the states the round already computed (the draft's
  below E, the verify pass's from E up: `Round.hidden`), against the full model's, argmax head(norm(h_L)). The
  first round reads the prompt's last tokens (speculative.PROMPT_WINDOW);
* **acceptance per layer**: decayed counts of matches m_l and mismatches u_l, each multiplied by `decay` (0.95)
  every round before the round's are added; alpha_l = m_l / (m_l + u_l);
* **tokens per layer**: the round's expected tokens over its cost in layer passes, with the standard model of
  acceptance (Leviathan et al., Eq. 1), TPL(l, d) = (1 - alpha_l^(d+1)) / (1 - alpha_l) / (d l + L); E and d
  maximise it over the candidate exits and d = 1 .. `max-length`; when no (l, d) beats plain decoding's 1 / L, the
  next round drafts nothing (a plain decoding step, after which the estimates are updated again);
* **confidence stop**: a row stops drafting after a token whose draft probability is below tau_E, the midpoint of
  the mean confidence of the shadow tokens at E that matched and of those that did not (decayed like the counts;
  none until both kinds have been seen).

The output is the full model's whatever E and d are (the verify pass decides every token). DEL pairs with a model
whose early layers were trained to exit (the LayerSkip recipe: `skipbench finetune --early-exit-loss`); on a model
that was not, the shadow tokens of low layers rarely match, and DEL exits late or drafts nothing.

Where this differs from the paper (the authors' code, hoenza/DEL, was read to check the estimator; this is not it):

* candidate exits are the layers from `-o min-exit` (default L/4) to L-1: a shadow token costs one head
  evaluation per layer and kept token, which a CPU pays in full (on SmolLM2-135M the head is about 28M weights,
  some 8 layers' worth, so a round that keeps 3 tokens spends about 23 x 3 head evaluations on its estimate; the
  paper's GPU batches them); `-o min-exit` narrows the range. TPL's cost (d l + L) leaves this overhead out, as the
  paper's does;
* when no (E, d) beats plain decoding's 1 / L, the next round drafts nothing (the loop needs some K; the paper's
  d = 0);
* at batch > 1 the rows share E, d and tau, pooled over the rows' kept tokens (the paper decodes one sequence); the
  first estimate reads the last min(32, shortest prompt) tokens of every row;
* DEL sets the draft length and the confidence stop itself: `--speculate K` and `--draft-threshold` do not apply
  (the length is at most `-o max-length`, itself at most 16); under sampling the stop compares the
  sampled token's draft probability with tau, which is built from the shadow tokens' (greedy) probabilities.
"""

from __future__ import annotations

import torch

from skipbench.engine.protocol import Gate, Policy, Round
from skipbench.engine.speculative import Speculation
from skipbench.errors import SkipbenchError


def tokens_per_layer(alpha: torch.Tensor, layers: torch.Tensor, lengths: torch.Tensor, num_layers: int) -> torch.Tensor:
    """TPL(l, d) = (1 - a^(d+1)) / (1 - a) / (d l + L) for each candidate (alpha, layers) [C] and length d [D]:
    [C, D]. a = 1 gives d + 1 tokens per round."""
    a, d = alpha[:, None].double(), lengths[None, :].double()
    expected = torch.where(a >= 1, d + 1, (1 - a ** (d + 1)) / (1 - a).clamp_min(1e-12))
    return expected / (d * layers[:, None].double() + num_layers)


class DEL(Policy):
    static = True  # the same layers for every token of a round
    adapts = True

    def __init__(self, adapter, min_exit: int, max_length: int, decay: float, name: str) -> None:
        super().__init__(adapter.num_layers)
        L = adapter.num_layers
        min_exit = min_exit or max(1, L // 4)
        if not 1 <= min_exit < L:
            raise SkipbenchError(f"policy '{name}': -o min-exit must be between 1 and {L - 1}, got {min_exit}")
        if not 1 <= max_length <= Speculation().k_max:
            raise SkipbenchError(f"policy '{name}': -o max-length must be between 1 and {Speculation().k_max} (the "
                                 f"loop's largest K), got {max_length}")
        if not 0 < decay <= 1:
            raise SkipbenchError(f"policy '{name}': -o decay must be in (0, 1], got {decay}")
        self.ad, self.name, self.decay = adapter, name, decay
        self.candidates = torch.arange(min_exit, L)
        self.draft_lengths = torch.arange(1, max_length + 1)
        self.begin(1)

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        self.exit = self.num_layers  # until the first estimate, after the prompt: every layer (nothing drafted)
        self.stop_below = None
        c = len(self.candidates)
        self.matched, self.missed = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        self.conf_matched, self.conf_missed = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        self.choices: list[tuple[int, int]] = []  # (E, d) chosen after each round, in order (d = 0: no draft)

    def gate(self, layer: int, hidden) -> Gate:
        return layer < self.exit

    def executed_layers(self) -> list[int]:
        return list(range(self.exit))

    @torch.no_grad()
    def after_round(self, done: Round) -> int | None:
        if not bool(done.live.any()):
            return None
        self.observe(done)
        return self.choose()

    def observe(self, done: Round) -> None:
        """Add the round's shadow-token matches and confidences per candidate exit (after decaying the old ones)."""
        rows = done.live.nonzero()[:, 0]
        width = done.hidden[0].shape[1]
        kept = torch.arange(width, device=rows.device)[None, :] <= done.accepted[rows, None]  # [R, T] the window
        final = self._logits(done.hidden[self.num_layers][rows][kept]).argmax(-1)  # [N] the full model's tokens
        hits, confs = [], []
        for layer in self.candidates.tolist():  # one candidate at a time: [N, V] logits, never [C, N, V]
            logits = self._logits(done.hidden[layer][rows][kept]).float()
            top, shadow = logits.max(-1)
            hits.append(shadow == final)
            confs.append(torch.exp(top - torch.logsumexp(logits, -1)))  # the shadow token's probability
        hit = torch.stack(hits).double().cpu()  # [C, N]
        conf = torch.stack(confs).double().cpu()
        self.matched = self.decay * self.matched + hit.sum(1)
        self.missed = self.decay * self.missed + (1 - hit).sum(1)
        self.conf_matched = self.decay * self.conf_matched + (conf * hit).sum(1)
        self.conf_missed = self.decay * self.conf_missed + (conf * (1 - hit)).sum(1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.ad.head(self.ad.final_norm(h))

    def alpha(self) -> torch.Tensor:
        seen = self.matched + self.missed
        return torch.where(seen > 0, self.matched / seen.clamp_min(1e-12), torch.zeros_like(seen))

    def choose(self) -> int:
        """E, d and tau for the next round (module docstring); returns d (0: a plain decoding step)."""
        tpl = tokens_per_layer(self.alpha(), self.candidates, self.draft_lengths, self.num_layers)
        best = int(tpl.argmax())
        c, d = divmod(best, len(self.draft_lengths))
        if float(tpl.flatten()[best]) <= 1 / self.num_layers:  # no draft beats plain decoding
            self.exit, self.stop_below = self.num_layers, None
            self.choices.append((self.num_layers, 0))
            return 0
        self.exit, d = int(self.candidates[c]), int(self.draft_lengths[d])
        m, u = float(self.matched[c]), float(self.missed[c])
        self.stop_below = (0.5 * (float(self.conf_matched[c]) / m + float(self.conf_missed[c]) / u)
                           if m > 0 and u > 0 else None)
        self.choices.append((self.exit, d))
        return d


def build(spec, ctx) -> Policy:
    return DEL(ctx.lm.adapter, spec.opt("min-exit"), spec.opt("max-length"), spec.opt("decay"), spec.label)
