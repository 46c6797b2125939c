"""Static plans: full depth, early exit, uniform layer skipping U(l,c), random skipping, explicit sets.

The plans themselves are plain functions of (spec, number of layers), importable without torch (`skipbench plan`
needs none); the Policy classes wrap them for the engine. Their registry entries are in policies/spec.py.
"""

from __future__ import annotations

import numpy as np

from skipbench import keyed
from skipbench.engine.protocol import AttnRoute, Gate, Policy, moved
from skipbench.errors import SkipbenchError


def uniform_plan(num_layers: int, cost: int) -> list[int]:
    """Eq. 2 of Glavas et al.: U(1,c)=1, U(l,c) = 1(sum_{k<l} U(k,c) <= (l-1) c / L), 0-based output.

    Compared in integers (sum * L <= (l-1) * c) so no float rounding decides a layer.
    """
    executed: list[int] = []
    for l in range(1, num_layers + 1):  # 1-based as in the paper
        if l == 1 or len(executed) * num_layers <= (l - 1) * cost:
            executed.append(l - 1)
    return executed


class PlanPolicy(Policy):
    """The same set of layers for every token."""

    static = True

    def __init__(self, num_layers: int, layers: list[int], name: str) -> None:
        super().__init__(num_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise SkipbenchError(f"layer indices {bad} are outside 0..{num_layers - 1}")
        if not layers:
            raise SkipbenchError("a plan must execute at least one layer")
        self.layers = sorted(set(layers))
        self._run = [i in set(self.layers) for i in range(num_layers)]
        self.name = name

    def gate(self, layer: int, hidden) -> Gate:
        return self._run[layer]

    def executed_layers(self) -> list[int]:
        return list(self.layers)


def full_plan(spec, ctx) -> list[int]:
    return list(range(ctx.num_layers))


def early_exit_plan(spec, ctx) -> list[int]:
    """Exit after layer E (1-based count of layers run = E): layers 0..E-1 run, the rest are skipped."""
    return list(range(spec.int_arg()))


def reverse_plan(spec, ctx) -> list[int]:
    """Reverse-order pruning (Reassessing Layer Pruning, ICLR 2026): keep the first C layers, remove the rest. The
    same layers as early exit at C; named apart because it is meant to be healed (`skipbench finetune --heal`)."""
    return list(range(spec.int_arg()))


def uniform_plan_of(spec, ctx) -> list[int]:
    return uniform_plan(ctx.num_layers, spec.int_arg())


def layers_plan(spec, ctx) -> list[int]:
    return sorted(set(spec.int_list()))


def random_plan(spec, ctx) -> list[int]:
    """The layers one sequence (row key 0) runs."""
    policy = RandomPolicy(ctx.num_layers, spec.int_arg(), spec.seed, False, spec.first_layer, spec.opt("mean"))
    return policy.layers_for(0).tolist()


def plan_policy(plan):
    """The build function of a plan: the same layers for every token (calibrated plans use it too)."""
    def build(spec, ctx) -> Policy:
        return PlanPolicy(ctx.num_layers, plan(spec, ctx), spec.label)

    return build


full = plan_policy(full_plan)
early_exit = plan_policy(early_exit_plan)
reverse = plan_policy(reverse_plan)
uniform = plan_policy(uniform_plan_of)
layers = plan_policy(layers_plan)


def random_layers(rng: np.random.Generator, num_layers: int, cost: int, first_layer: bool) -> np.ndarray:
    """Exactly `cost` distinct layers, layer 0 always included when `first_layer`."""
    if first_layer:
        rest = rng.choice(np.arange(1, num_layers), size=cost - 1, replace=False)
        return np.sort(np.concatenate([[0], rest]))
    return np.sort(rng.choice(num_layers, size=cost, replace=False))


def layer_gates(plan: np.ndarray, device) -> list[Gate]:
    """Per-layer gates from a plan [L, B, T] of who runs what: a python bool where a whole layer agrees (the engine
    then runs or skips it outright), else the layer's bool tensor [B, T]."""
    import torch

    run = torch.from_numpy(plan).to(device)  # one transfer per step; a layer's gate is a view of it
    counts = plan.reshape(len(plan), -1).sum(1)  # one reduction for all layers
    whole = plan[0].size
    return [True if n == whole else False if n == 0 else run[i] for i, n in enumerate(counts.tolist())]


class SequencePlans(Policy):
    """One layer set per sequence of a batch: `plan_rows(keys)` fills the plan [L, B] from `layers_for(row key)`,
    and every token of a row runs its row's layers (random skipping per sequence; a router's configurations)."""

    static = False
    _seq_plan: np.ndarray | None = None  # [L, B]
    _gates: list[Gate] = []

    def layers_for(self, key: int):
        raise NotImplementedError

    def plan_rows(self, keys: list[int]) -> None:
        plan = np.zeros((self.num_layers, len(keys)), dtype=bool)
        for r, key in enumerate(keys):
            plan[self.layers_for(key), r] = True
        self._seq_plan = plan

    def sequence_gates(self, positions) -> list[Gate]:
        return layer_gates(np.repeat(self._seq_plan[:, :, None], positions.shape[1], axis=2), positions.device)

    def gate(self, layer: int, hidden) -> Gate:
        return self._gates[layer]

    def executed_layers(self) -> list[int] | None:
        if self._seq_plan is not None and self._seq_plan.shape[1] == 1:
            return np.nonzero(self._seq_plan[:, 0])[0].tolist()
        return None


class RandomPolicy(SequencePlans):
    """Random layer skipping: exactly c layers, one draw per sequence (default) or per token.

    Draws are reproducible and independent of batching: a sequence draws from numpy's generator
    seeded with (seed, row key), a token from (seed, row key, position). The row key is the row index
    unless the caller passes stable keys (evaluate passes item hashes). Keying per-token draws by
    position makes an incremental decode and a whole-sequence recomputation skip the same layers.
    """

    def __init__(self, num_layers: int, cost: int, seed: int, per_token: bool, first_layer: bool,
                 mean: float = 0.0, kind: str = "") -> None:
        super().__init__(num_layers)
        self.cost, self.seed, self.per_token, self.first_layer = cost, seed, per_token, first_layer
        self.name = f"{kind or ('random-token' if per_token else 'random')}:{cost}"
        self._keys: list[int] | None = None
        # `-o mean=M` (C - 1 < M <= C): each draw runs C layers with probability M - (C - 1), else C - 1, so a
        # draw's expected count is M (a random control matched to a learned policy's realized mean)
        if mean and not (mean == cost or (cost >= 2 and cost - 1 < mean < cost)):
            raise SkipbenchError(f"policy '{self.name}': -o mean must lie in ({cost - 1}, {cost}] with a cost of at "
                                 f"least 2 (the cost C is the most layers a draw runs), got {mean}")
        self.upper = mean - (cost - 1) if mean else 1.0  # the probability of C layers rather than C - 1

    def _draw(self, *key: int) -> np.ndarray:
        rng = keyed.rng(self.seed, *key)
        count = self.cost if self.upper >= 1 or rng.random() < self.upper else self.cost - 1
        return random_layers(rng, self.num_layers, count, self.first_layer)

    def layers_for(self, key: int) -> np.ndarray:
        return self._draw(key)

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        self._keys = list(row_keys) if row_keys is not None else list(range(batch_size))
        self._seq_plan = None
        if not self.per_token:
            self.plan_rows(self._keys)

    def new_step(self, positions) -> None:
        batch, num_tokens = positions.shape
        if self._keys is None or len(self._keys) != batch:
            self.begin(batch)
        if self._seq_plan is not None:
            self._gates = self.sequence_gates(positions)
            return
        plan = np.zeros((self.num_layers, batch, num_tokens), dtype=bool)
        for (r, t), p in np.ndenumerate(positions.cpu().numpy()):
            plan[self._draw(self._keys[r], p), r, t] = True
        self._gates = layer_gates(plan, positions.device)


class RandomAttentionPolicy(RandomPolicy):
    """Random attention skipping, per token: C of the L attention sub-layers (the first layer's always, unless
    --no-first-layer, as random skipping keeps it), drawn as `random-token` draws layers; every token runs every
    MLP. The random control of MindSkip, which skips attention only, at the attention sub-layers it realized
    (evaluate --matched-random). A skipped attention writes its token's K/V or none as the run's KV mode says
    (`-o kv=auto`), or as `-o kv=fill|none` requires (the control takes MindSkip's own)."""

    def __init__(self, num_layers: int, cost: int, seed: int, first_layer: bool, mean: float = 0.0,
                 kv: str = "auto") -> None:
        super().__init__(num_layers, cost, seed, True, first_layer, mean, kind="random-attention")
        self.kv_mode = None if kv == "auto" else kv

    def gate(self, layer: int, hidden) -> Gate:
        import torch

        run = self._gates[layer]
        if run is True:
            return True
        run = (torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if run is False
               else moved(run, hidden.device))  # the layer's device under a placement
        return AttnRoute(run=run, scale=torch.ones(run.shape, dtype=hidden.dtype, device=hidden.device),
                         kv_for_skipped=None if self.kv_mode is None else self.kv_mode == "fill")

    def executed_layers(self) -> list[int] | None:
        return None  # every layer's MLP runs: no layer is skipped whole


def random(spec, ctx) -> Policy:
    return RandomPolicy(ctx.num_layers, spec.int_arg(), spec.seed, False, spec.first_layer, spec.opt("mean"))


def random_token(spec, ctx) -> Policy:
    return RandomPolicy(ctx.num_layers, spec.int_arg(), spec.seed, True, spec.first_layer, spec.opt("mean"))


def random_attention(spec, ctx) -> Policy:
    return RandomAttentionPolicy(ctx.num_layers, spec.int_arg(), spec.seed, spec.first_layer, spec.opt("mean"),
                                 spec.opt("kv"))
