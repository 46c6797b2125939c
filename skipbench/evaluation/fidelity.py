"""Hidden-state fidelity to the full model, teacher-forced: what `cosine` measures per token, and what the
controllers sweep measures of its trained runs (KL). A library: recipes import it, it imports no recipe.

Per response token: cos_final (the last layer's output state vs the full model's, raw), cos_final_normed (the same
states through the model's final norm: the state the head reads, the authors' "final hidden state"), cos_layerwise
(mean over layers 1..L-1 of the cosine of the raw state entering each layer: the KV-cache propagation error),
kl_next (KL(p_full || p_other) of the next-token distributions) and top1_agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dataclasses import dataclass

from skipbench.engine import Engine
from skipbench.errors import SkipbenchError
from skipbench.engine.decode import left_pad, pad_id

CONVENTION = ("residual (raw residual-stream states entering each layer and after the last; no norm applied), except "
              "cos_final_normed: the last state through the model's final norm (what the head reads)")
MEASURES = ("cos_final", "cos_final_normed", "cos_layerwise", "kl_next", "top1_agree")


def cosines(h_a: list[torch.Tensor], h_b: list[torch.Tensor]) -> torch.Tensor:
    """Per-token cosine at every depth: [depth, B, T] (depth L+1: entering each layer, then the output)."""
    return torch.stack([F.cosine_similarity(a.float(), b.float(), dim=-1) for a, b in zip(h_a, h_b)])


@dataclass
class FullDist:
    """What every comparison needs of the full model's next-token distributions, computed once."""

    p: torch.Tensor  # probabilities [B, T, V]
    neg_entropy: torch.Tensor  # sum p log p, [B, T]
    top1: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> "FullDist":
        logp = torch.log_softmax(logits.float(), -1)
        p = logp.exp()
        return cls(p, torch.linalg.vecdot(p, logp), logits.argmax(-1))


def measures(full, other, num_layers: int, final_norm, dist: FullDist | None = None) -> dict[str, torch.Tensor]:
    """Per-token fidelity of `other` to `full`; `final_norm` is the model's (the adapter's `final_norm`).

    KL(p_full || p_other) = sum p log p - (sum p z - logsumexp z) for the other's logits z, so no
    vocabulary-sized temporary is built per comparison (they dominated the time as page faults)."""
    dist = dist or FullDist.of(full.logits)
    cos = cosines(full.hidden, other.hidden)
    z = other.logits.float()
    cross = torch.linalg.vecdot(dist.p, z) - torch.logsumexp(z, -1)
    return {
        "cos_final": cos[num_layers],
        "cos_final_normed": F.cosine_similarity(final_norm(full.hidden[num_layers]).float(),
                                                final_norm(other.hidden[num_layers]).float(), dim=-1),
        "cos_layerwise": cos[1:num_layers].mean(0),
        "kl_next": (dist.neg_entropy - cross).clamp_min(0),
        "top1_agree": (dist.top1 == z.argmax(-1)).float(),
    }


def early_exit_from_full(adapter, full, exit_layer: int):
    """Early exit at E, read off the full pass: with every earlier layer run by every token, the states
    entering layers <= E and the caches they read are the full model's, so only the head is new."""
    from skipbench.engine import ForwardOut

    h = full.hidden[exit_layer]
    hidden = full.hidden[: exit_layer + 1] + [h] * (adapter.num_layers - exit_layer)
    return ForwardOut(logits=adapter.head(adapter.final_norm(h)), executed=None, hidden=hidden)


@torch.no_grad()
def compare_to_full(lm, prompts, responses, keys, variants, kv_mode: str = "fill", max_new_tokens: int | None = None):
    """Teacher-forced passes over the responses, the prompt at full depth once: yields, per variant,
    (label, {measure: [B, T] array, "layers": [B, T] layers each token ran}). A variant is (label, policy) or
    (label, ("prefix", E)): a plan running layers 0..E-1 (early exit), read off the full pass. `max_new_tokens`: the
    run length the responses count as (Policy.lengths; default the longest response of the batch)."""
    engine = Engine(lm.adapter, kv_mode)
    ids, present = left_pad(prompts, pad_id(lm), lm.device)
    width = max(map(len, responses))
    resp = torch.full((len(responses), width), pad_id(lm), dtype=torch.long)
    for r, toks in enumerate(responses):
        resp[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    resp = resp.to(lm.device)
    cache, _ = engine.prefill(ids, present, ids.shape[1] + width, last_only=True)  # the prompt, full depth, once
    full = engine.forward(resp, cache.clone(), None, keep_hidden=True)
    dist = FullDist.of(full.logits)
    for label, policy in variants:
        if isinstance(policy, tuple):
            other = early_exit_from_full(lm.adapter, full, policy[1])
            layers = torch.full(resp.shape, float(policy[1]))
        else:
            if policy.lm is not None:
                raise SkipbenchError(f"'{label}' runs a model of its own: its states are not the model's layers'")
            policy.begin(len(prompts), keys)
            policy.lengths([len(p) for p in prompts], max_new_tokens or width)
            other = engine.forward(resp, cache.clone(), policy, keep_hidden=True, record=True)
            layers = other.executed.sum(-1).float()
        yield label, {**{k: v.cpu().numpy() for k, v in measures(full, other, lm.num_layers, lm.adapter.final_norm, dist).items()},
                      "layers": layers.cpu().numpy()}


