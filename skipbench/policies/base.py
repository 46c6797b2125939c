"""The policy interface, the registry, and the one place policy options are validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from skipbench.errors import SkipbenchError
from skipbench.registry import Registry

Gate = Union[bool, torch.Tensor]


@dataclass(frozen=True)
class PolicyOptions:
    """Everything a user can say about a policy; each policy reads the fields it needs."""

    cost: int | None = None
    exit_layer: int | None = None
    keep: tuple[int, ...] | None = None
    seed: int = 0
    per_token: bool = False
    first_layer: bool = True
    extra: dict = field(default_factory=dict)


class Policy:
    """Base class. Subclasses set `static` and implement `gate`."""

    name: str = "policy"
    #: a static policy returns the same python bool for every token of a layer
    static: bool = True
    #: a KV mode the policy requires (e.g. FlexiDepth trained without K/V for skipped tokens), else None
    kv_mode: str | None = None

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        """Called once per batch of sequences before generation (per-sequence draws go here)."""

    def new_step(self, positions: torch.Tensor) -> None:
        """Called before each forward with the tokens' positions [B, T] (per-token draws go here)."""

    def gate(self, layer: int, hidden: torch.Tensor) -> Gate:
        raise NotImplementedError

    def layer(self, engine, i: int, h: torch.Tensor, pos, cache, real):
        """A policy may run layer i itself: return (new hidden state, gate recorded), or None (the default)."""
        return None

    def executed_layers(self) -> list[int] | None:
        """For plans that run the same layers for every token: those layers, else None."""
        return None

    def describe(self) -> str:
        return self.name


POLICIES: Registry[Callable[[int, PolicyOptions], Policy]] = Registry("policy")


def make_policy(name: str, num_layers: int, opts: PolicyOptions | None = None) -> Policy:
    return POLICIES.get(name)(num_layers, opts or PolicyOptions())


def checkpoint_module(opts: PolicyOptions, num_layers: int, policy: str, flag: str, load: Callable):
    """The trained module of a learned policy (`--controller DIR`, `--router DIR`), checked against the model."""
    path = opts.extra.get("path")
    if not path:
        raise SkipbenchError(f"policy '{policy}' needs {flag} DIR (a folder written by its 'train' command)")
    module, meta = load(path)
    if module.num_layers != num_layers:
        raise SkipbenchError(f"'{path}' was trained for {module.num_layers} layers; this model has {num_layers}")
    return module, meta


def check_cost(cost: int | None, num_layers: int) -> int:
    if cost is None:
        raise SkipbenchError("this policy needs --cost C (the number of layers to execute)")
    if isinstance(cost, float) and not cost.is_integer():
        raise SkipbenchError(f"--cost must be an integer number of layers, got {cost}")
    cost = int(cost)
    if not 1 <= cost <= num_layers:
        raise SkipbenchError(f"--cost must be between 1 and {num_layers} (the model's layers), got {cost}")
    return cost


def parse_policy_spec(spec: str, num_layers: int, seed: int = 0) -> Policy:
    """`full`, `uniform:15`, `early-exit:10`, `random:22`, `random-token:22`, `layers:0,3,5`."""
    name, _, arg = spec.partition(":")
    name = name.strip()
    try:
        if name == "random-token":
            return make_policy("random", num_layers, PolicyOptions(cost=_int(arg), seed=seed, per_token=True))
        if name == "early-exit":
            return make_policy(name, num_layers, PolicyOptions(exit_layer=_int(arg)))
        if name == "layers":
            return make_policy(name, num_layers, PolicyOptions(keep=parse_int_list(arg)))
        if name == "full":
            return make_policy(name, num_layers)
        return make_policy(name, num_layers, PolicyOptions(cost=_int(arg) if arg else None, seed=seed))
    except ValueError:
        raise SkipbenchError(f"cannot read policy '{spec}'; examples: full, uniform:15, random-token:22, layers:0,3,5")


def _int(text: str) -> int | None:
    return int(text) if text else None


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SkipbenchError(f"expected a comma-separated list of integers, got '{text}'")
