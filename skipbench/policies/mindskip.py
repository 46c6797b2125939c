"""MindSkip (Router-Tuning, He et al., 2024): a router per layer decides per token whether the layer's attention runs.
The MLP always runs, and the model stays frozen: only the routers train.

For a routed layer l the router reads the token's state through the layer's own attention norm LN_l:

    s = sigmoid(w_l . LN_l(h))        one Linear(hidden, 1) without bias, zero at the start: s = 0.5 for every token
    g = 1[s >= tau]                   tau = 0.5; trained straight-through (forward g, gradient that of s)
    h' = h + g * Attn(LN_l h);   out = h' + MLP(LN2 h')

A token with g = 0 computes no query and no attention at the layer (engine `AttnRoute`); its K/V there follow the
KV mode the routers were trained under: `none` (the authors' code at 75faa3b8b25e, below: a skipped row has no K/V
at the layer) or `fill` (`--kv`). The routed layers are the n below the last one (the authors' layers L-n-1 .. L-2;
n = 16 of 32).

Loss: L = L_task + lambda * sum_l |mean_t g_l - capacity|: at each routed layer the fraction of tokens that attend
is driven towards `capacity` from both sides. `--capacity-loss relu` is the authors' router-tuning patch
(`target_capacity`), relu(mean_t g_l - capacity), which only pushes down. Why not it by default: with routers that
start at s = 0.5 = tau, one optimiser step moves every token below tau, and then nothing brings one back (a skipped
token's attention is not computed, so the task loss gives its gate no gradient, and the relu none below capacity);
on the tiny test model the fraction attending fell from 1 to 0 in one step and stayed there.

The authors' code followed (github.com/CASE-Lab-UMD/Router-Tuning-Mixture-of-Depths; Shwai-He/Router-Tuning shares its
history to 2024-10-19): the model files ckpt/*/modeling_*.py of commit 75faa3b8b25e (2024-10-18), their routing
unchanged through 82d6d733e25b (2026-03-26): Linear(hidden, 1) without bias on the input_layernorm output, sigmoid,
threshold 0.5, straight-through; a skipped row is gathered out, so it computes no attention and writes no K/V; routed
layers from `mindskip_n` (entrypoints/finetune/finetune_mindskip.py); capacity term gradient_scale * mean(g), no
target. Their release since 6f7ad0433379 (2026-04-25, utils/model/model_patch.py) is mask-based with K/V kept: every
token's attention runs and writes K/V, the update is multiplied by the 0/1 gate (`granularity=attn_token` per token;
the default `attn_sequence` from the mean of each forward call's normed states), the capacity term is gradient_scale *
relu(mean(g) - target_capacity); `--kv` (`fill`) with `--impl mask` approximates it.
Where skipbench differs from the authors' code: decisions are per token (the model files of 75faa3b8b25e decide once
per sequence, from the mean of the normed prompt states, and keep that decision for every generated token); skipped
attention is not computed here on the gathered path (`--impl gather`; `auto` at steps of many tokens, and at one-token
steps where the measured cost table says gathering pays: at batch 1 always), while the dense path (`--impl mask`;
`auto` at a batch where gathering some rows costs more than the whole batch's attention) computes it for every token
and keeps the routed tokens' outputs.

`-o tau=T` evaluates with another threshold; `-o skip=K` chooses the threshold on calibration prompts (the run's
validation split, held out from the routers' training, or both embedded suites' under lm-eval and compare; 64
items by default) so that a token skips about K attention
sub-layers there (what `compare` uses to aim at a number of skipped layers; the rows record what was realized).
"""

from __future__ import annotations

import torch
from torch import nn

from skipbench.store.checkpoints import checked_module, load_module
from skipbench.engine.protocol import AttnRoute, Policy, follows
from skipbench.errors import SkipbenchError

CAPACITY_LOSSES = ("abs", "relu")


def default_layers(num_layers: int, n: int | None = None) -> list[int]:
    """The n layers below the last one (the authors' placement); n defaults to half the depth."""
    n = num_layers // 2 if n is None else n
    if not 1 <= n <= num_layers - 1:
        raise SkipbenchError(f"MindSkip routes 1..{num_layers - 1} layers of this model (the last never), got {n}")
    return list(range(num_layers - 1 - n, num_layers - 1))


class MindSkip(nn.Module):
    def __init__(self, hidden: int, num_layers: int, routed: list[int] | None = None, tau: float = 0.5,
                 kv: bool = False) -> None:
        super().__init__()
        routed = sorted(set(routed)) if routed else default_layers(num_layers)
        if any(not 0 <= l < num_layers for l in routed):
            raise SkipbenchError(f"--routed-layers must be within 0..{num_layers - 1}")
        if not 0 < tau < 1:
            raise SkipbenchError(f"--tau must be in (0, 1), got {tau}")
        self.hidden, self.num_layers, self.routed, self.tau, self.kv = hidden, num_layers, routed, tau, kv
        self.routers = nn.ModuleDict({str(l): nn.Linear(hidden, 1, bias=False) for l in routed})
        for r in self.routers.values():
            nn.init.zeros_(r.weight)  # s = 0.5 >= tau: every token attends, the base model
        self.force_open = False  # tests: every token attends

    def config(self) -> dict:
        return {"hidden_size": self.hidden, "num_layers": self.num_layers, "routed_layers": self.routed,
                "tau": self.tau, "kv": self.kv}

    def score(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """s [B, T] from the layer's attention-normed states."""
        w = self.routers[str(layer)].weight
        return torch.sigmoid(normed.to(w.dtype) @ w[0])

    def route(self, layer: int, normed: torch.Tensor, tau: float | None = None) -> AttnRoute:
        """The straight-through gate: its value is g (0 or 1), its gradient that of s."""
        if self.force_open:
            ones = torch.ones(normed.shape[:-1], dtype=normed.dtype, device=normed.device)
            return AttnRoute(run=ones > 0, scale=ones, kv_for_skipped=self.kv, normed=normed)
        s = self.score(layer, normed)
        hard = (s >= (self.tau if tau is None else tau)).to(s.dtype)
        g = hard + s - s.detach() if s.requires_grad else hard
        # the normed states travel with the route: the engine's attention reads them instead of norming again
        return AttnRoute(run=hard > 0, scale=g.to(normed.dtype), kv_for_skipped=self.kv, normed=normed)


def check_capacity(capacity: float, loss: str) -> None:
    if not 0 <= capacity <= 1:
        raise SkipbenchError(f"--capacity must be in [0, 1] (the fraction of tokens that attend), got {capacity}")
    if loss not in CAPACITY_LOSSES:
        raise SkipbenchError(f"--capacity-loss must be one of {', '.join(CAPACITY_LOSSES)}, got '{loss}'")


class MindSkipMethod:
    """The trainable side, for skipbench.training: the routers; L = L_task + lambda * sum_l |mean g_l - capacity|
    (`abs`) or relu(mean g_l - capacity) (`relu`, the authors')."""

    kind = "mindskip"
    routes = True
    unused_params = False

    def __init__(self, mind: MindSkip, adapter, capacity: float, weight: float, loss: str = "abs") -> None:
        check_capacity(capacity, loss)
        self.mind, self.ad, self.capacity, self.weight, self.loss = mind, adapter, capacity, weight, loss
        self.kv_mode = "fill" if mind.kv else "none"

    def module(self) -> nn.Module:
        return self.mind

    def gate_fn(self, keys=None):  # deterministic gates: nothing to key
        m, ad = self.mind, self.ad
        return lambda layer, h: m.route(layer, ad.attn_norm(layer, h)) if layer in m.routed else True

    def regulariser(self, gates, mask):
        m = mask.to(gates[0].dtype)
        n = m.sum()
        kept = torch.stack([(g * m).sum() / n for g in gates])  # per routed layer: the fraction that attends
        d = kept - self.capacity
        loss = self.weight * (d.abs() if self.loss == "abs" else torch.relu(d)).sum()
        # the trainer divides by the step's tokens: the term is returned times this micro-batch's
        return loss * n, {"l_capacity": float(loss.detach()), "attend": float(kept.detach().mean()),
                          "attn_skipped": float((1 - kept.detach()).sum())}

    def config(self) -> dict:
        return {**self.mind.config(), "capacity": self.capacity, "weight": self.weight, "capacity_loss": self.loss,
                "capacity_loss_formula": f"weight * sum over routed layers of {self.loss}(mean over response tokens of g "
                                         "- capacity)"}


class MindSkipPolicy(Policy):
    """Trained routers deciding per token, at generation and scoring."""

    static = False

    def __init__(self, mind: MindSkip, adapter, tau: float | None = None) -> None:
        super().__init__(mind.num_layers)
        self.m, self.ad, self.tau = mind.eval(), adapter, mind.tau if tau is None else tau
        self.name = "mindskip"
        self.kv_mode = "fill" if mind.kv else "none"  # the checkpoint decides what skipped tokens write

    @torch.no_grad()
    def gate(self, layer, hidden):
        if layer not in self.m.routed:
            return True
        follows(self.m.routers[str(layer)], hidden.device)  # each layer's router on its layer's device
        return self.m.route(layer, self.ad.attn_norm(layer, hidden), self.tau)


def load_mindskip(path: str, model: dict | None = None) -> tuple[MindSkip, dict]:
    return load_module(path, "mindskip", lambda meta: MindSkip(
        meta["hidden_size"], meta["num_layers"], meta["routed_layers"], meta["tau"], meta["kv"]), model)


def build(spec, ctx) -> Policy:
    from skipbench.policies.calibration import threshold_of

    mind, _ = checked_module(spec.value, ctx, load_mindskip)
    tau = threshold_of(spec, ctx, lambda t: MindSkipPolicy(mind, ctx.lm.adapter, t), "attention", len(mind.routed))
    return MindSkipPolicy(mind, ctx.lm.adapter, tau)
