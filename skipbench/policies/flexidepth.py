"""FlexiDepth (Luo, Wang, Yan): a plug-in router and adapter per routed layer, KV-preserving skipping.

For a routed layer, G = sigmoid(Router(Norm(X))) with Router(z) = W_r (W_up Norm(tanh(W_down z))) (a
bottleneck of hidden/16; `linear` gives Router(z) = W_r z). A token runs the full layer when G > tau:

    full path  h' = h + Attn(LN1 h);  out = h' + G * MLP(LN2 h')
    skip path  out = h + (1 - G) * Adapter(LN2 h)      (no query, attention or MLP for the token)

A skipped token's K/V at the layer are still computed and cached (KV-preserving skipping), unless
`no_kv`, where it writes none and later tokens do not see it there; the engine computes only those K/V for it
(engine/forward.py `Engine.routed`, gathered path; the dense path computes the layer for every token and selects). The gate scaling gives the router a
gradient; the original weights stay frozen. L_skip = mean_t (sum_l G_t^l)^2 over the routed layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skipbench.store.checkpoints import checked_module, load_module
from skipbench.engine.protocol import Policy, Route, follows
from skipbench.errors import SkipbenchError


class Router(nn.Module):
    def __init__(self, hidden: int, reduction: int = 16, linear: bool = False, init_open: float = 3.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.linear = linear
        if linear:
            self.out = nn.Linear(hidden, 1)
        else:
            small = max(1, hidden // reduction)
            self.down = nn.Linear(hidden, small, bias=False)
            self.inner = nn.RMSNorm(small, eps=1e-6)
            self.up = nn.Linear(small, hidden, bias=False)
            self.out = nn.Linear(hidden, 1)
        with torch.no_grad():  # start open: G = sigmoid(init_open) ~ 0.95, close to the base model
            self.out.weight.mul_(0.01)
            self.out.bias.fill_(init_open)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.norm(h.to(self.out.weight.dtype))
        if not self.linear:
            z = self.up(self.inner(torch.tanh(self.down(z))))
        return torch.sigmoid(self.out(z)).squeeze(-1)


class Adapter(nn.Module):
    """A small SwiGLU MLP on the skip path; its output projection starts at zero (the skip is the identity)."""

    def __init__(self, hidden: int, reduction: int = 16) -> None:
        super().__init__()
        small = max(1, hidden // reduction)
        self.gate_proj = nn.Linear(hidden, small, bias=False)
        self.up_proj = nn.Linear(hidden, small, bias=False)
        self.down_proj = nn.Linear(small, hidden, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down_proj.weight.dtype)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FlexiDepth(nn.Module):
    def __init__(self, hidden: int, num_layers: int, routed: list[int] | None = None, reduction: int = 16,
                 tau: float = 0.5, adapter: bool = True, kv: bool = True, linear_router: bool = False) -> None:
        super().__init__()
        routed = sorted(set(routed)) if routed else list(range(num_layers // 2, num_layers))
        if not routed or any(not 0 <= l < num_layers for l in routed):
            raise SkipbenchError(f"--routed-layers must be within 0..{num_layers - 1}")
        if not 0 < tau < 1:
            raise SkipbenchError(f"--tau must be in (0, 1), got {tau}")
        self.hidden, self.num_layers, self.routed, self.reduction = hidden, num_layers, routed, reduction
        self.tau, self.use_adapter, self.kv, self.linear_router = tau, adapter, kv, linear_router
        self.routers = nn.ModuleDict({str(l): Router(hidden, reduction, linear_router) for l in routed})
        self.adapters = nn.ModuleDict({str(l): Adapter(hidden, reduction) for l in routed} if adapter else {})
        self.force_open = False  # tests: G = 1 everywhere makes the routed model the base model

    def config(self) -> dict:
        return {"hidden_size": self.hidden, "num_layers": self.num_layers, "routed_layers": self.routed,
                "reduction": self.reduction, "tau": self.tau, "adapter": self.use_adapter, "kv": self.kv,
                "linear_router": self.linear_router}

    def gate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.force_open:
            return torch.ones(h.shape[:-1], dtype=h.dtype, device=h.device)
        return self.routers[str(layer)](h).to(h.dtype)

    def route(self, layer: int, g: torch.Tensor, tau: float | None = None) -> Route:
        """The routed layer for gate values g [B, T]: the full path where G > tau (MLP scaled by G), the adapter
        path scaled by 1 - G elsewhere; K/V for skipped tokens unless `no_kv`. The engine runs it. `tau`: another
        threshold than the trained one (evaluation)."""
        adapter = self.adapters[str(layer)] if self.use_adapter else None
        # the adapter's output is cast to the state's dtype before the gate scales it (bf16 runs round as before)
        skip = (lambda normed, sel: (1 - g[sel])[:, None] * adapter(normed).to(g.dtype)) if adapter is not None else None
        return Route(run=g > (self.tau if tau is None else tau), scale=g, skip=skip, kv_for_skipped=self.kv)


class FlexiMethod:
    """The trainable side, for skipbench.training: routers and adapters; L = alpha * L_skip + L_task."""

    kind = "flexidepth"
    routes = True
    unused_params = True  # an adapter gets no gradient when no token of the batch skips its layer

    def __init__(self, flexi: FlexiDepth, alpha: float) -> None:
        self.flexi, self.alpha = flexi, alpha
        self.kv_mode = "fill" if flexi.kv else "none"

    def module(self) -> nn.Module:
        return self.flexi

    def gate_fn(self, keys=None):  # deterministic gates: nothing to key
        f = self.flexi

        return lambda layer, h: f.route(layer, f.gate(layer, h)) if layer in f.routed else True

    def regulariser(self, gates, mask):
        m = mask.to(gates[0].dtype)
        total = torch.stack(gates).sum(0)  # sum over routed layers of G, per token
        skip_sum = ((total**2) * m).sum()  # L_skip times the token count: the trainer divides
        executed = (torch.stack(gates) > self.flexi.tau).sum(0) + (self.flexi.num_layers - len(gates))
        n = m.sum()
        return self.alpha * skip_sum, {"l_skip": float(skip_sum.detach() / n), "layers": float((executed * m).sum() / n)}

    def config(self) -> dict:
        return {**self.flexi.config(), "alpha": self.alpha,
                "skip_loss": "mean over response tokens of (sum over routed layers of G)^2"}


class FlexiPolicy(Policy):
    """Trained routers deciding per token at generation time."""

    static = False

    def __init__(self, flexi: FlexiDepth, tau: float | None = None) -> None:
        super().__init__(flexi.num_layers)
        self.f, self.tau = flexi.eval(), tau
        self.name = "flexidepth"
        self.kv_mode = "fill" if flexi.kv else "none"  # the checkpoint decides what skipped tokens write

    @torch.no_grad()
    def gate(self, layer, hidden):
        if layer not in self.f.routed:
            return True
        follows(self.f.routers[str(layer)], hidden.device)  # each layer's router and adapter on its layer's device
        if self.f.use_adapter:
            follows(self.f.adapters[str(layer)], hidden.device)
        return self.f.route(layer, self.f.gate(layer, hidden), self.tau)


def load_flexidepth(path: str, model: dict | None = None) -> tuple[FlexiDepth, dict]:
    return load_module(path, "flexidepth", lambda meta: FlexiDepth(
        meta["hidden_size"], meta["num_layers"], meta["routed_layers"], meta["reduction"], meta["tau"], meta["adapter"],
        meta["kv"], meta["linear_router"]), model)


def flexidepth(spec, ctx) -> Policy:
    """The trained routers; `-o tau=T` another threshold, `-o skip=K` the one that skips K layers per token on
    calibration prompts (policies/calibration.threshold_of)."""
    from skipbench.policies.calibration import threshold_of

    f, _ = checked_module(spec.value, ctx, load_flexidepth)
    return FlexiPolicy(f, threshold_of(spec, ctx, lambda t: FlexiPolicy(f, t), "layers", len(f.routed)))
