"""What the layer loop asks of a policy: the engine owns this protocol, policies implement it.

For each decoder layer the loop asks `policy.gate(layer, hidden)` which of the tokens being processed run the
layer. The answer is one of:

* `True` / `False`: every token runs the layer / none does (a static plan: skipping costs nothing);
* a bool tensor [batch, tokens]: the tokens that run it (per-token policies);
* a float tensor [batch, tokens] in [0, 1]: a soft gate for training, h <- g * layer(h) + (1 - g) * h
  (straight-through hard samples keep the forward pass exact);
* a `Route`: a routed layer (FlexiDepth): the routed tokens run attention and the MLP scaled by `scale`, the
  others a skip path (an adapter) and only their K/V — the engine runs it, the policy only decides;
* an `AttnRoute`: a layer whose attention only the routed tokens run (MindSkip); every token runs the MLP;
* a `Sublayers`: a layer's attention and MLP run or skipped apart, alike for every token (KnapSpec's drafts).

Nothing here imports a policy; policies import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    import torch

Gate = Union[bool, "torch.Tensor", "Route", "AttnRoute", "Sublayers"]


@dataclass
class Route:
    """A routed layer. `run` [B, T] bool: tokens that take the full layer (attention, unscaled, and the MLP);
    `scale` [B, T]: the weight of their MLP output (the router's gate, so the router gets a gradient);
    `skip(normed, sel)`: what a skipped token adds to its state instead of attention and MLP, given its state
    through the layer's MLP norm and the index tuple of the skipped tokens (None: the identity); a skipped token's
    attention output is not needed (gathered, none is computed). `kv_for_skipped`: skipped tokens still write the
    layer's K/V (KV-preserving skipping, `fill`), else none (`none`: later queries at the layer do not see them)."""

    run: "torch.Tensor"
    scale: "torch.Tensor"
    skip: Callable | None = None
    kv_for_skipped: bool = True


@dataclass(frozen=True)
class Sublayers:
    """A layer whose two residual branches are run or skipped apart, for every token alike: `attn` (its norm,
    attention and output projection) and `mlp` (its norm and MLP). A skipped attention writes K/V as a skipped layer
    does (engine.forward.Engine.layer: `fill` computes them unless the engine skips that, `none` marks them
    invalid); a skipped MLP adds nothing."""

    attn: bool
    mlp: bool


@dataclass
class AttnRoute:
    """A layer with routed attention. `run` [B, T] bool: tokens whose attention is computed, its output scaled by
    `scale` [B, T] (1 in the forward pass for a straight-through gate, which gives the router its gradient); the
    others add nothing from attention, and no query of theirs is computed. Every token runs the MLP.
    `kv_for_skipped`: skipped tokens still write the layer's K/V (`fill`), else none (`none`: later queries at
    the layer do not see them); None: as the cache's KV mode says (a random plan has no mode of its own). `normed`: the states through the layer's attention norm when the policy computed
    them to decide (the engine then does not compute them again)."""

    run: "torch.Tensor"
    scale: "torch.Tensor"
    kv_for_skipped: bool | None = False
    normed: "torch.Tensor | None" = None


@dataclass
class Round:
    """What one verify pass of self-speculative decoding computed, handed to a draft that `adapts`
    (`Policy.after_round`; engine/speculative.py) before the next round drafts. Rows are the batch's; the verify
    pass ran over [pending, d1 .. dm] (m = `k`) at the cache positions `start` .. `start` + m. After the prompt, the
    first Round holds its last w tokens (w = speculative.PROMPT_WINDOW, or the shortest prompt): k = 0, drafted 0,
    accepted w - 1 (each row keeps all w)."""

    hidden: list  # per layer i: the stream entering layer i, [B, m + 1, d]; index L: leaving the last layer (before
    # the final norm). When the round's draft was an early exit at E, the states below E are the ones its draft
    # passes computed (the full model's there: the verify pass resumed at E)
    positions: "torch.Tensor"  # [B, m + 1] the verified tokens' position ids
    drafted: "torch.Tensor"  # [B] draft tokens each row proposed this round
    accepted: "torch.Tensor"  # [B] of those, accepted: row r keeps verified tokens 0 .. accepted[r] in the cache
    live: "torch.Tensor"  # [B] bool: rows that took part in this round
    start: int  # the cache index of the first verified token
    context: int  # the cache's length after the round (its common length, padding and holes included)
    k: int  # the K this round drafted with
    cache: object = None  # the KV cache (engine.cache.KVCache), as it is after the round: every kept token's K/V at
    # every layer; the live object, so read it in `after_round` (the next round writes to it)


class Policy:
    """The interface the loop consumes. Subclasses set `static` and implement `gate`."""

    name: str = "policy"
    #: a static policy returns the same python bool for every token of a layer
    static: bool = True
    #: a KV mode the policy requires (e.g. FlexiDepth trained without K/V for skipped tokens), else None
    kv_mode: str | None = None
    #: the model it runs on when its layers are new weights (LaCo's collapsed model), else None: the loaded one
    lm: object = None
    #: with `lm`: the loaded model's layer each of its layers stands for (what `layer_use` counts)
    origin: list | None = None
    #: a self-speculative draft that adapts between rounds: the verify pass then keeps its per-layer states and
    #: `after_round` receives them (False: the loop keeps nothing and calls nothing, so the hook costs nothing)
    adapts: bool = False
    #: an adapting draft's own confidence stop for the next round (DEL): a row stops drafting after a token whose
    #: draft probability is below it (None: the loop's --draft-threshold)
    stop_below: float | None = None
    #: its gates are `Sublayers` (or bools), the same for every token: a self-speculative draft of it never reads K/V
    #: its skipped attention would write at its own positions (as `executed_layers` says for whole layers)
    plans_sublayers: bool = False

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        """Called once per batch of sequences before generation (per-sequence draws go here)."""

    def lengths(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """Called after `begin` by every generation or teacher-forced pass over responses: each row's prompt length
        (the position of its first generated token) and the run's largest number of new tokens (a schedule over
        the generation's positions reads them: SkipDecode)."""

    def new_step(self, positions: "torch.Tensor") -> None:
        """Called before each forward with the tokens' positions [B, T] (per-token draws go here)."""

    def gate(self, layer: int, hidden: "torch.Tensor") -> Gate:
        raise NotImplementedError

    def executed_layers(self) -> list[int] | None:
        """For plans that run the same layers for every token: those layers, else None."""
        return None

    def after_round(self, done: Round) -> int | None:
        """Called after each verify pass of self-speculative decoding when `adapts`: the draft may change the layers
        it runs (the same for every token of the next round) and returns the next round's K (None: the loop's; 0: a
        plain decoding step, after which it is called again)."""
        return None

    def skips_statically(self) -> bool:
        """Every token skips the same layers, at least one: K/V filled there would never be read (what `auto` KV
        mode uses to pick `none`)."""
        layers = self.executed_layers() if self.static else None
        return layers is not None and len(layers) < self.num_layers

    def describe(self) -> str:
        return self.name

    def row_record(self, row: int) -> dict:
        """What the policy decided for a row of the current batch, kept in `evaluate`'s rows (a router's choice)."""
        return {}

    def point_record(self) -> dict:
        """What holds for every row the policy produces (how it was built: LaCo's forced merges), kept in
        `evaluate`'s and `lmeval`'s rows."""
        return {}


def moved(t, device):
    """A tensor, or a tuple of them (position tables), on `device` (itself when already there)."""
    if hasattr(t, "device") and hasattr(t, "to"):
        return t if t.device == device else t.to(device)
    return tuple(moved(x, device) for x in t) if isinstance(t, tuple) else t


def follows(module, device):
    """A policy's module for one layer, on that layer's `device` (moved there on first use, then left: under a
    device map the layers sit on several devices, and each layer's router goes to its layer's once)."""
    param = next(module.parameters(), None)
    if param is not None and param.device != device:
        module.to(device)
    return module


class Full(Policy):
    """Every layer for every token (what `policy=None` means to the engine)."""

    name = "full"

    def gate(self, layer: int, hidden: "torch.Tensor") -> Gate:
        return True

    def executed_layers(self) -> list[int]:
        return list(range(self.num_layers))


class GateFn(Policy):
    """A policy from a plain function `gate(layer, hidden) -> Gate` (training passes, layer dropout)."""

    static = False

    def __init__(self, num_layers: int, fn: Callable, name: str = "gate-fn") -> None:
        super().__init__(num_layers)
        self.fn, self.name = fn, name

    def gate(self, layer: int, hidden: "torch.Tensor") -> Gate:
        return self.fn(layer, hidden)
