"""Static plans: full depth, early exit, uniform layer skipping U(l,c), random skipping, explicit sets."""

from __future__ import annotations

import numpy as np
import torch

from skipbench.errors import SkipbenchError
from skipbench.policies.base import POLICIES, Gate, Policy, PolicyOptions, check_cost


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

    def gate(self, layer: int, hidden: torch.Tensor) -> Gate:
        return self._run[layer]

    def executed_layers(self) -> list[int]:
        return list(self.layers)


@POLICIES.register("full")
def full(num_layers: int, opts: PolicyOptions) -> Policy:
    return PlanPolicy(num_layers, list(range(num_layers)), "full")


@POLICIES.register("early-exit")
def early_exit(num_layers: int, opts: PolicyOptions) -> Policy:
    """Exit after layer E (1-based count of layers run = E): layers 0..E-1 run, the rest are skipped."""
    exit_layer = opts.exit_layer if opts.exit_layer is not None else opts.cost
    exit_layer = check_cost(exit_layer, num_layers)
    return PlanPolicy(num_layers, list(range(exit_layer)), f"early-exit:{exit_layer}")


@POLICIES.register("uniform")
def uniform(num_layers: int, opts: PolicyOptions) -> Policy:
    cost = check_cost(opts.cost, num_layers)
    return PlanPolicy(num_layers, uniform_plan(num_layers, cost), f"uniform:{cost}")


@POLICIES.register("layers")
def layers(num_layers: int, opts: PolicyOptions) -> Policy:
    if not opts.keep:
        raise SkipbenchError("policy 'layers' needs --keep 0,3,5,... (0-based layer indices)")
    return PlanPolicy(num_layers, list(opts.keep), "layers:" + ",".join(map(str, sorted(set(opts.keep)))))


def random_layers(rng: np.random.Generator, num_layers: int, cost: int, first_layer: bool) -> np.ndarray:
    """Exactly `cost` distinct layers, layer 0 always included when `first_layer`."""
    if first_layer:
        rest = rng.choice(np.arange(1, num_layers), size=cost - 1, replace=False)
        return np.sort(np.concatenate([[0], rest]))
    return np.sort(rng.choice(num_layers, size=cost, replace=False))


class RandomPolicy(Policy):
    """Random layer skipping: exactly c layers, one draw per sequence (default) or per token.

    Draws are reproducible: sequence r uses numpy's generator seeded with (seed, row key), where the
    row key is the row index unless the caller passes stable keys (evaluate passes item hashes), so a
    sequence gets the same layers whatever batch it lands in.
    """

    def __init__(self, num_layers: int, cost: int, seed: int, per_token: bool, first_layer: bool) -> None:
        super().__init__(num_layers)
        if first_layer and cost < 1:
            raise SkipbenchError("random skipping with the first layer kept needs cost >= 1")
        self.cost, self.seed, self.per_token, self.first_layer = cost, seed, per_token, first_layer
        self.static = False
        self.name = f"random{'-token' if per_token else ''}:{cost}"
        self._rngs: list[np.random.Generator] = []
        self._run: torch.Tensor | None = None  # [L, B, T] for the current step

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        keys = row_keys if row_keys is not None else list(range(batch_size))
        self._rngs = [np.random.default_rng([self.seed, int(k) % (2**63)]) for k in keys]
        self._seq_plan = None
        if not self.per_token:
            plan = np.zeros((self.num_layers, batch_size), dtype=bool)
            for r, rng in enumerate(self._rngs):
                plan[random_layers(rng, self.num_layers, self.cost, self.first_layer), r] = True
            self._seq_plan = torch.from_numpy(plan)

    def new_step(self, batch_size: int, num_tokens: int, device: torch.device) -> None:
        if not self._rngs:
            self.begin(batch_size)
        if self._seq_plan is not None:
            run = self._seq_plan[:, :, None].expand(-1, -1, num_tokens)
        else:
            plan = np.zeros((self.num_layers, batch_size, num_tokens), dtype=bool)
            for r, rng in enumerate(self._rngs):
                for t in range(num_tokens):
                    plan[random_layers(rng, self.num_layers, self.cost, self.first_layer), r, t] = True
            run = torch.from_numpy(plan)
        self._run = run.to(device)

    def gate(self, layer: int, hidden: torch.Tensor) -> Gate:
        g = self._run[layer]
        if bool(g.all()):
            return True
        if not bool(g.any()):
            return False
        return g

    def executed_layers(self) -> list[int] | None:
        if self._seq_plan is not None and self._seq_plan.shape[1] == 1:
            return torch.nonzero(self._seq_plan[:, 0]).flatten().tolist()
        return None


@POLICIES.register("random")
def random(num_layers: int, opts: PolicyOptions) -> Policy:
    cost = check_cost(opts.cost, num_layers)
    return RandomPolicy(num_layers, cost, opts.seed, opts.per_token, opts.first_layer)
