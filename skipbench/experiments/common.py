"""Pieces the recipes share: building a policy from CLI options for a loaded model."""

from __future__ import annotations

from dataclasses import dataclass

from skipbench.policies.base import Policy, PolicyOptions, make_policy


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "full"
    cost: int | None = None
    exit_layer: int | None = None
    keep: tuple[int, ...] | None = None
    seed: int = 0
    per_token: bool = False
    first_layer: bool = True
    controller: str | None = None  # checkpoint folder of a learned policy ("controller", "flexidepth")
    gate: str = "sample"  # controllers at evaluation: sample | argmax

    def build(self, num_layers: int) -> Policy:
        opts = PolicyOptions(
            cost=self.cost, exit_layer=self.exit_layer, keep=self.keep, seed=self.seed,
            per_token=self.per_token, first_layer=self.first_layer,
            extra={"path": self.controller, "gate": self.gate},
        )
        return make_policy(self.name, num_layers, opts)
