"""A pre-allocated KV cache with a per-layer record of which positions hold keys.

Rows are left-padded prompts, so every row writes the same cache index at each step. `valid[i]`
says, for layer i, which positions a query may attend to: padding is never valid; in the `none` KV
mode a token that skipped layer i writes nothing there and stays invalid, so later queries at that
layer do not see it. In the `fill` mode every layer shares one validity tensor (one per device, for a model placed
across devices: each layer's K/V and validity live on its layer's device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_MODES = ("fill", "none")
KV_CHOICES = ("auto", *KV_MODES)


def resolve_kv_mode(requested: str, required: str | None, who: str = "the policy", static_skip: bool = False) -> str:
    """The KV mode a run uses. `auto` takes the mode the policy requires (a FlexiDepth router trained without
    K/V for skipped tokens needs `none`); else `none` for a plan that skips statically (`static_skip`: every
    token skips the same layers, so K/V filled there would never be read: both modes give the same tokens, and
    `fill` only costs, as DESIGN.md's semantics say),
    else `fill`. An explicit choice that conflicts with the policy's requirement is refused: the mode a result
    records is always the mode it ran under."""
    from skipbench.errors import SkipbenchError

    if requested not in KV_CHOICES:
        raise SkipbenchError(f"--kv-mode must be one of {', '.join(KV_CHOICES)}, got '{requested}'")
    if requested == "auto":
        return required or ("none" if static_skip else "fill")
    if required is not None and requested != required:
        raise SkipbenchError(f"--kv-mode {requested} conflicts with {who}, which requires --kv-mode {required} "
                             f"(it was trained that way); pass --kv-mode auto or {required}")
    return requested


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, kv_heads, capacity, head_dim]
    v: list[torch.Tensor]
    valid: list[torch.Tensor]  # per layer [B, capacity] bool
    all_valid: list[bool]  # per layer: no invalid position written so far (lets attention skip the mask)
    pad: torch.Tensor  # [B] positions before the next token that hold none of the row's tokens: its left padding,
    # then the holes rejected draft tokens left (`drop`); a token's position id is its index minus this
    mode: str
    length: int = 0
    shared: tuple[int, ...] = (0,)  # `fill` mode: the first layer of each device, whose validity tensor its device's
    # layers share (a plain index list, not tensor identities: a compiled step guards on it once)

    @classmethod
    def allocate(cls, num_layers, batch, kv_heads, head_dim, capacity, mode, device, dtype,
                 layer_devices: list | None = None) -> "KVCache":
        """`device` holds the row bookkeeping (padding, positions); each layer's K/V and validity go to
        `layer_devices[i]` (a model placed across devices), else to `device`."""
        devices = layer_devices or [device] * num_layers
        shape = (batch, kv_heads, capacity, head_dim)
        k = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        v = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        firsts = {}
        for i, d in enumerate(devices):
            firsts.setdefault(torch.device(d), i)
        if mode == "fill":
            per_device = {d: torch.zeros(batch, capacity, dtype=torch.bool, device=d) for d in firsts}
            valid = [per_device[torch.device(d)] for d in devices]
        else:
            valid = [torch.zeros(batch, capacity, dtype=torch.bool, device=d) for d in devices]
        pad = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(k, v, valid, [True] * num_layers, pad, mode, shared=tuple(firsts.values()))

    def clone(self) -> "KVCache":
        """An independent copy (e.g. one full-depth prompt reused by several policies)."""
        copies: dict[int, torch.Tensor] = {}
        valid = [copies.setdefault(id(t), t.clone()) for t in self.valid]  # keeps `fill` mode's sharing
        return KVCache([t.clone() for t in self.k], [t.clone() for t in self.v], valid, list(self.all_valid),
                       self.pad.clone(), self.mode, self.length, self.shared)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, end: int) -> None:
        """Room for `end` positions: grown (copied, doubling) only when a run needs more than it allocated."""
        if end <= self.capacity:
            return
        extra = max(end, 2 * self.capacity) - self.capacity

        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim)

        self.k = [grown(t, 2) for t in self.k]
        self.v = [grown(t, 2) for t in self.v]
        copies: dict[int, torch.Tensor] = {}
        self.valid = [copies.setdefault(id(t), grown(t, 1)) for t in self.valid]  # keeps `fill` mode's sharing

    def drop(self, start: int, keep: torch.Tensor, end: int) -> None:
        """Roll back rejected tokens without copying: row r keeps positions start .. start + keep[r] - 1 of the
        ones written from `start`; its positions from there to `end` become holes (never valid, and its later
        tokens' position ids shift back by their number); the next token goes to `end`."""
        idx = torch.arange(start, end, device=keep.device)
        hole = idx[None, :] >= (start + keep)[:, None]  # [B, end - start]
        if bool(hole.any()):
            done: set[int] = set()
            for i, valid in enumerate(self.valid):
                if id(valid) not in done:
                    valid[:, start:end] &= ~hole.to(valid.device)
                    done.add(id(valid))
                self.all_valid[i] = False
            self.pad = self.pad + hole.sum(1)
        self.length = end

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Position ids of the next `num_tokens` tokens: index minus the row's left padding."""
        idx = torch.arange(self.length, self.length + num_tokens, device=self.pad.device)
        return (idx[None, :] - self.pad[:, None]).clamp_min(0)

    def mark(self, layers: range | list[int], present: torch.Tensor | bool, num_tokens: int) -> None:
        """Record which of the next tokens wrote K/V at these layers."""
        sl = slice(self.length, self.length + num_tokens)
        complete = present if isinstance(present, bool) else bool(present.all())
        # `fill` mode: the layers share one tensor per device, written once (by index, not by identity: a compiled
        # step would otherwise guard on each new cache's tensor ids and compile again for every run)
        for valid in ([self.valid[i] for i in self.shared] if self.mode == "fill" else [self.valid[i] for i in layers]):
            valid[:, sl] = present
        for i in layers:
            self.all_valid[i] = self.all_valid[i] and complete

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """Store K/V of the next tokens and return the layer's keys and values up to them."""
        end = self.length + k.shape[2]
        if rows is None:
            self.k[layer][:, :, self.length : end] = k
            self.v[layer][:, :, self.length : end] = v
        else:
            self.k[layer][rows, :, self.length : end] = k
            self.v[layer][rows, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def layer_mask(self, layer: int, num_tokens: int) -> torch.Tensor | None:
        """Boolean attention mask [B, 1, T, S] for the next tokens at `layer`, or None when causal suffices."""
        start, end = self.length, self.length + num_tokens
        if self.all_valid[layer] and (num_tokens == 1 or start == 0):
            return None
        valid = self.valid[layer][:, None, None, :end]
        if num_tokens == 1:
            # a query always sees itself, so no row is fully masked (which would give NaN); a comparison rather than
            # an indexed write, which a compiled step would specialise on the cache length and compile at every step
            return valid | (torch.arange(end, device=valid.device) == start)
        q = torch.arange(start, end, device=valid.device)[:, None]
        kpos = torch.arange(end, device=valid.device)[None, :]
        causal = kpos <= q
        return (valid & causal) | (kpos == q)
