"""The skip-aware forward pass: embed, positions, `for layer ...` with a gate, final norm, head.

It reads like `LlamaModel.forward`; the only addition is the gate each layer asks the policy for (the protocol
is in engine/protocol.py). One loop serves generation (hard gates, no gradients: `forward`) and training (soft
gates and routed layers with gradients: `run`).
A skipped layer is the identity on the residual stream. For a token that skips layer i the KV mode
decides what the cache gets: `fill` writes the K/V that layer would compute from the hidden state the
token carries, `none` writes nothing (and later queries at layer i do not see the token).
"""

from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from skipbench.errors import SkipbenchError

from skipbench.engine.cache import KVCache
from skipbench.engine.protocol import AttnRoute, Gate, Policy, Route, Sublayers, moved
from skipbench.models.adapters import Adapter


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, T or 1, vocab]
    executed: torch.Tensor | None  # [B, T, L] bool: which layers each token ran (when recorded)
    hidden: list[torch.Tensor] | None  # the residual stream entering each layer, plus the last one
    gates: list | None = None  # soft gates and routers' gate values, layer by layer (training reads them)
    state: torch.Tensor | None = None  # a span that stops before the last layer: the stream leaving it (no logits)
    attention_skips: torch.Tensor | None = None  # [B, T] int: layers a token ran without their attention (recorded
    # when a policy routes attention, `AttnRoute`; such a layer counts as executed in `executed`: its MLP ran)


def passes(out: ForwardOut, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a recorded run: the layers and the attention sub-layers the tokens marked in `tokens` [B, T] ran."""
    layers = (out.executed & tokens[..., None]).sum((1, 2))
    skips = 0 if out.attention_skips is None else (out.attention_skips * tokens).sum(1)
    return layers, layers - skips


IMPLS = ("auto", "gather", "mask")


@dataclass
class Meter:
    """What the runs of an engine did, summed over its steps (bench reads it): the policy's own seconds (its
    `new_step` and `gate` calls, and apart the skip path of routed layers; host time, so on CUDA the time to
    launch its kernels) and, per layer and step, the parts at least one row ran: attention, MLP, or only the K/V
    of rows that skip (`fill`); and how partial layers (some rows run them) were executed."""

    steps: int = 0
    policy_seconds: float = 0.0
    skip_seconds: float = 0.0  # a routed layer's skip path (FlexiDepth's adapters): the policy's code, run per layer
    attention: int = 0
    mlp: int = 0
    kv: int = 0
    dense: int = 0
    gathered: int = 0


class DraftHead:
    """A draft's head over part of the vocabulary (FR-Spec, Zhao et al. 2025): the logits of `ids` only, one
    product with N rows of the head instead of V; every other token gets -inf, so the draft never proposes it. The
    verifier keeps the full head, so the output is still the full model's. The N rows are copied once (N x hidden
    values, beside the head's V x hidden)."""

    def __init__(self, adapter: Adapter, ids: torch.Tensor) -> None:
        out = adapter.model.get_output_embeddings()
        if adapter.tp > 1:
            raise SkipbenchError("--draft-vocab copies rows of the head, which tensor parallelism shards across the ranks")
        if out.weight.device.type == "meta":
            raise SkipbenchError("--draft-vocab copies rows of the head, which this placement offloads (its weights are "
                                 "read in only while the head runs): place the head on a device (--device-map FILE.json)")
        self.ids = ids.to(out.weight.device)
        self.weight = out.weight[self.ids].contiguous()
        self.bias = None if getattr(out, "bias", None) is None else out.bias[self.ids]
        self.vocab = out.weight.shape[0]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        part = F.linear(h if h.device == self.weight.device else h.to(self.weight.device), self.weight, self.bias)
        return part.new_full((*part.shape[:-1], self.vocab), float("-inf")).index_copy_(-1, self.ids, part)


class Engine:
    """impl `gather` runs a layer only for the rows and tokens routed through it; `mask` computes the layer
    for every token and then selects; `auto` (default) takes, at each partial layer of a one-token step, the path
    the measured cost table says is cheaper (engine/costs.py), and gathers at steps of many tokens. Routed attention
    (`AttnRoute`) has no table of its own: the whole layer's decides for it. The three
    compute the same function (floats may differ in the last bits; the tests find the same tokens).

    `write_skipped=False` (`fill` mode only) leaves a layer every token skips without K/V at their positions: only
    for a caller that never reads them before they are written again (a static plan's draft tokens, which the
    verify pass of self-speculative decoding rewrites at every layer).

    `head` replaces the model's head (h after the final norm -> logits): a draft's cheaper head (`DraftHead`).
    `drafts`: the engine drafts for self-speculative decoding, the only place a policy that `adapts` may run."""

    def __init__(self, adapter: Adapter, kv_mode: str = "fill", impl: str = "auto", write_skipped: bool = True,
                 head: Callable | None = None, drafts: bool = False) -> None:
        if kv_mode not in ("fill", "none"):
            raise SkipbenchError(f"--kv-mode must be 'fill' or 'none', got '{kv_mode}'")
        if impl not in IMPLS:
            raise SkipbenchError(f"--impl must be one of {', '.join(IMPLS)}, got '{impl}'")
        self.ad = adapter
        self.kv_mode = kv_mode
        # tensor parallelism: every rank must run the same products (a row-wise projection all-reduces), so a partial
        # layer runs gathered on all of them rather than by each rank's own cost table
        self.impl = "gather" if impl == "auto" and adapter.tp > 1 else impl
        self.write_skipped = write_skipped
        self.drafts = drafts
        self.head = head or adapter.head
        self.gqa = adapter.num_heads != adapter.num_kv_heads
        self.costs: dict = {}  # batch size -> costs.LayerCosts (`auto`), read or measured on first need
        self.meter: Meter | None = None

    def new_cache(self, batch: int, capacity: int, device, dtype) -> KVCache:
        """An empty cache; a placed model's layers each keep their K/V on their own device."""
        ad = self.ad
        return KVCache.allocate(ad.num_layers, batch, ad.num_kv_heads, ad.head_dim, capacity, self.kv_mode, device, dtype,
                                ad.devices if ad.placed else None)

    def prompt_cache(self, present: torch.Tensor, capacity: int) -> KVCache:
        """An empty cache for left-padded prompts (`present` [B, W] marks real tokens) with room for `capacity`
        positions: every prompt's cache is made here."""
        cache = self.new_cache(present.shape[0], capacity, present.device, next(self.ad.model.parameters()).dtype)
        cache.pad = (~present).sum(1)
        return cache

    def prefill(self, ids: torch.Tensor, present: torch.Tensor, capacity: int, policy: Policy | None = None,
                **kw) -> tuple[KVCache, ForwardOut]:
        """`prompt_cache` filled by running the prompts (at full depth unless a policy is given)."""
        cache = self.prompt_cache(present, capacity)
        return cache, self.forward(ids, cache, policy, present=present, **kw)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache, policy: Policy | None = None, **kw) -> ForwardOut:
        """`run` without gradients: generation, scoring, hidden-state comparisons. On an adapter made `compiled`
        (`enable_compile`), the pass of a static plan runs as compiled graphs (`_compiled`)."""
        if policy is not None and policy.adapts and not self.drafts:
            raise SkipbenchError(f"policy '{policy.describe()}' chooses its layers from the verify passes of "
                                 "self-speculative decoding: give it as a draft (--draft), not as a policy")
        # a prompt's padding runs eagerly (once per run), and so do `skippable` tokens (their gates become tensors)
        if getattr(self.ad, "compiled", False) and kw.get("present") is None and kw.get("skippable") is None:
            plan = range(self.ad.num_layers) if policy is None else policy.executed_layers() if policy.static else None
            if plan is not None:
                return self._compiled(ids, cache, policy, set(plan), **kw)
        return self.run(ids, cache, policy, **kw)

    def _compiled(self, ids: torch.Tensor, cache: KVCache, policy: Policy | None, plan: set[int], **kw) -> ForwardOut:
        """`run` through torch.compile: the loop, the gates of a static plan (constants to the compiler) and the cache
        writes trace into one graph per plan and pass kind, so a step pays no Python per operation. The meter stays
        outside (its clock would break the graph): the plan's parts are counted here, and its policy time is nil."""
        meter, self.meter = self.meter, None
        try:
            out = _compiled_run()(self, ids, cache, policy, **kw)
        finally:
            self.meter = meter
        if meter is not None:
            meter.steps += 1
            for i in range(self.ad.num_layers) if kw.get("span") is None else kw["span"]:
                self._count(i in plan, i in plan, i not in plan and self.kv_mode == "fill" and self.write_skipped)
        return out

    def run(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        policy: Policy | None = None,
        present: torch.Tensor | None = None,
        skippable: torch.Tensor | None = None,
        record: bool = False,
        keep_hidden: bool = False,
        last_only: bool = False,
        gated_from: int = 0,
        logits_from: int | None = None,
        span: range | None = None,
        states: torch.Tensor | None = None,
    ) -> ForwardOut:
        """Run `ids` [B, T] through the model, appending to `cache`.

        policy None runs every layer. `present` [B, T] marks real tokens (False for padding);
        `skippable` [B, T] limits the policy to some tokens (the rest run every layer).
        `gated_from`: the first position the policy gates (the ones before, a prompt run in the same training
        pass, run every layer); `logits_from`: the first position whose logits are returned (default
        `gated_from`; `last_only` returns the last position's).
        `span`: the layers to run (default all). A span that starts above 0 takes `states`, the stream entering its
        first layer, instead of embedding `ids`; one that ends below the last layer returns the stream leaving it
        (`state`) and no logits (self-speculative decoding resumes an early-exit draft's tokens this way).
        """
        ad, num_tokens = self.ad, ids.shape[1]
        span = range(ad.num_layers) if span is None else span
        positions = cache.positions(num_tokens)
        if ad.placed:  # a placed model: the ids and positions to the embedding's device, the rotary tables there too
            h = ad.embed(ids.to(ad.embed_device), positions.to(ad.embed_device)) if span.start == 0 else states
            pos = ad.position_embeddings(h, positions.to(h.device))
        else:
            h = ad.embed(ids, positions) if span.start == 0 else states
            pos = ad.position_embeddings(h, positions)
        real = True if present is None else present
        if self.kv_mode == "fill":  # every real token writes K/V at every layer
            cache.mark(range(ad.num_layers), real, num_tokens)
        if self.meter is not None:
            self.meter.steps += 1
        if policy is not None:
            self._timed(policy.new_step, positions)
        executed = torch.zeros(*ids.shape, ad.num_layers, dtype=torch.bool, device=ids.device) if record else None
        hidden = [] if keep_hidden else None
        soft: list = []
        attention_skips = None
        here = _PerDevice() if ad.placed else None  # a placed model: the stream and the tables follow each layer
        tables = (pos, real, skippable)

        for i in span:
            if here is not None:
                h, pos, real, skippable = here(ad.devices[i], h, *tables)
            if keep_hidden:  # a placed model's states on one device (the head's), where policies compare them
                hidden.append(h if here is None else h.to(ad.head_device))
            gate = True if policy is None else self._timed(policy.gate, i, h[:, gated_from:] if gated_from else h)
            if here is not None and isinstance(gate, torch.Tensor):  # a gate made on another device (a plan's)
                gate = gate.to(h.device)
            if isinstance(gate, Route):  # the policy routes, the engine runs the routed layer
                if gated_from:
                    raise SkipbenchError("a routed layer (FlexiDepth) cannot train with the prompt in the same pass")
                soft.append(gate.scale)  # the router's gate values (FlexiDepth's L_skip reads them)
                h, gate = self.routed(i, h, pos, cache, gate, real), gate.run
            elif isinstance(gate, Sublayers):  # attention and MLP apart, every token alike (KnapSpec)
                if gated_from:
                    raise SkipbenchError("a sub-layer plan (KnapSpec) cannot train with the prompt in the same pass")
                h, gate = self.sublayers(i, h, pos, cache, gate, real), gate.attn or gate.mlp
            elif isinstance(gate, AttnRoute):  # routed attention (MindSkip): every token runs the layer's MLP
                if gated_from:
                    raise SkipbenchError("routed attention (MindSkip) cannot train with the prompt in the same pass")
                soft.append(gate.scale)
                h, ran = self.attn_routed(i, h, pos, cache, gate, real), gate.run
                if record:
                    attention_skips = (0 if attention_skips is None else attention_skips) + (~ran).long().to(executed.device)
                gate = True
            elif isinstance(gate, torch.Tensor) and gate.is_floating_point():  # soft gate: blend (training)
                soft.append(gate)
                g = torch.cat([gate.new_ones(gate.shape[0], gated_from), gate], 1) if gated_from else gate
                h = g[..., None] * self.layer(i, h, pos, cache, True, real) + (1 - g[..., None]) * h
                gate = g > 0.5
            else:
                if skippable is not None and gate is not True:
                    gate = skippable.logical_not() | gate
                h = self.layer(i, h, pos, cache, gate, real)
            if record:
                executed[:, :, i] = gate

        if keep_hidden:
            hidden.append(h if here is None else h.to(ad.head_device))
        cache.length += num_tokens
        if span.stop < ad.num_layers:
            return ForwardOut(logits=None, executed=executed, hidden=hidden, gates=soft, state=h,
                              attention_skips=attention_skips)
        first = gated_from if logits_from is None else logits_from
        if last_only:
            h = h[:, -1:]
        elif first:
            h = h[:, first:]
        logits = self.head(ad.final_norm(h))
        return ForwardOut(logits=logits, executed=executed, hidden=hidden, gates=soft, attention_skips=attention_skips)

    def _timed(self, call, *args, field: str = "policy_seconds"):
        """A policy call, its seconds added to the meter's `field` when one is attached."""
        if self.meter is None:
            return call(*args)
        began = time.perf_counter()
        out = call(*args)
        setattr(self.meter, field, getattr(self.meter, field) + time.perf_counter() - began)
        return out

    def _decides(self, h: torch.Tensor) -> bool:
        """`auto` chooses by the cost table at one-token steps without gradients; steps of many tokens and training
        gather (their matmuls are large enough that their cost follows their rows)."""
        return self.impl == "auto" and h.shape[1] == 1 and not torch.is_grad_enabled()

    def _gathers(self, h: torch.Tensor, running: int | None, routed: bool = False) -> bool:
        """Whether a layer some tokens run (`running` of them, counted when `_decides`) is run gathered rather than
        densely (for a routed layer: its attention and MLP, by the table's routed series)."""
        if self.impl != "auto":
            return self.impl == "gather"
        if not self._decides(h) or running == 0:  # nothing runs: gathering computes only the K/V
            return True
        batch = h.shape[0]
        if running == batch:  # every row: the plain layer
            return False
        if batch not in self.costs:
            from skipbench.engine.costs import layer_costs

            self.costs[batch] = layer_costs(self, batch)
        table = self.costs[batch]
        return table.routed_gather_pays(running) if routed else table.gather_pays(running)

    def _count(self, attention: bool, mlp: bool, kv: bool, gathered: bool | None = None) -> None:
        m = self.meter
        if m is not None:
            m.attention, m.mlp, m.kv = m.attention + attention, m.mlp + mlp, m.kv + kv
            if gathered is not None:
                m.gathered, m.dense = m.gathered + gathered, m.dense + (not gathered)

    def layer(self, i: int, h: torch.Tensor, pos, cache: KVCache, gate: Gate, real) -> torch.Tensor:
        """One decoder layer under a gate: run it, skip it, or run it for some tokens only."""
        ad, num_tokens = self.ad, h.shape[1]
        if gate is False:
            if self.kv_mode == "none":  # nothing is written, nothing is computed
                cache.mark([i], False, num_tokens)
            elif self.write_skipped:
                cache.write(i, *ad.kv(i, ad.attn_norm(i, h), pos))
            self._count(False, False, self.kv_mode == "fill" and self.write_skipped)
            return h
        if self.kv_mode == "none":
            cache.mark([i], _both(gate, real), num_tokens)
        if gate is True:
            self._count(True, True, False)
        else:  # one host sync: the running tokens, when auto decides or the meter counts
            n = int(gate.sum()) if self.meter is not None or self._decides(h) else None
            gathered = self._gathers(h, n)
            if self.meter is not None:  # what runs: gathered, the running tokens (or only K/V); dense, everything
                partial = 0 < n < gate.numel()
                runs = n > 0 or not gathered
                self._count(runs, runs, not runs and self.kv_mode == "fill", gathered if partial else None)
            if gathered:
                return self._gathered(i, h, pos, cache, gate)
        out = h + self.attend(i, h, pos, cache)
        out = out + ad.mlp_block(i, out)
        if gate is True:
            return out
        # some tokens skip: the layer is computed for all of them, then selected
        return torch.where(gate[..., None], out, h)

    def sublayers(self, i: int, h: torch.Tensor, pos, cache: KVCache, gate: Sublayers, real) -> torch.Tensor:
        """Layer i's attention and MLP run or skipped apart (protocol.Sublayers); both or neither: `layer`."""
        if gate.attn == gate.mlp:
            return self.layer(i, h, pos, cache, gate.attn, real)
        ad, num_tokens = self.ad, h.shape[1]
        if gate.attn:
            if self.kv_mode == "none":
                cache.mark([i], real, num_tokens)
            h = h + self.attend(i, h, pos, cache)
        elif self.kv_mode == "none":  # a skipped attention: its K/V as a skipped layer's
            cache.mark([i], False, num_tokens)
        elif self.write_skipped:
            cache.write(i, *ad.kv(i, ad.attn_norm(i, h), pos))
        self._count(gate.attn, gate.mlp, not gate.attn and self.kv_mode == "fill" and self.write_skipped)
        return h + ad.mlp_block(i, h) if gate.mlp else h

    def _gathered(self, i: int, h: torch.Tensor, pos, cache: KVCache, gate: torch.Tensor) -> torch.Tensor:
        """Attention for the rows with a running token, the MLP for the running tokens only, scattered back.
        Rows where every token skips only get their K/V (`fill`) or nothing (`none`)."""
        ad = self.ad
        row_runs = gate.any(1)
        rows = row_runs.nonzero().flatten()
        if self.kv_mode == "fill" and rows.numel() < h.shape[0]:
            others = (~row_runs).nonzero().flatten()
            cache.write(i, *ad.kv(i, ad.attn_norm(i, h[others]), _take(pos, others)), rows=others)
        if rows.numel() == 0:
            return h
        every_row = rows.numel() == h.shape[0]
        hr = h if every_row else h[rows]
        hr_attn = hr + (self.attend(i, hr, pos, cache) if every_row else self.attend(i, hr, _take(pos, rows), cache, rows))
        g = gate if every_row else gate[rows]
        if bool(g.all()):
            hr_out = hr_attn + ad.mlp_block(i, hr_attn)
        else:  # per-token: the MLP runs on the routed tokens only; the others keep their state
            sel = g.nonzero(as_tuple=True)
            x = hr_attn[sel]
            hr_out = hr.index_put(sel, x + ad.mlp_block(i, x))
        return hr_out if every_row else h.index_copy(0, rows, hr_out)

    def routed(self, i: int, h: torch.Tensor, pos, cache: KVCache, route: Route, real=True) -> torch.Tensor:
        """A routed layer (protocol.Route). The routed tokens run the layer, its MLP scaled by `route.scale`; a
        skipped token bypasses attention and MLP through the skip path (FlexiDepth's adapter), and only its K/V are
        computed (`kv_for_skipped`: later tokens attend to it) or none (it is then invisible at the layer).
        Gathered (`gather`; `auto` at steps of many tokens, and at one-token steps where the cost table says gathering
        pays): `_routed_attention`, as for MindSkip's `attn_routed` (queries, attention and output projection for the
        routed tokens only, each row's packed to the longest row; unscaled: FlexiDepth scales the MLP), then the MLP
        for the routed tokens only; no token routed: only the K/V, or nothing. Dense (`mask`; `auto` elsewhere):
        attention and MLP for every token, then the skipped ones replaced."""
        ad, run = self.ad, route.run
        if not route.kv_for_skipped:  # skipped tokens write no K/V here (the cache is in `none` mode)
            cache.mark([i], run if real is True else run & real, h.shape[1])
        full, skip = run.nonzero(as_tuple=True), (~run).nonzero(as_tuple=True)
        n = full[0].numel()
        everyone, partial = n == run.numel(), 0 < n < run.numel()
        dense = partial and not self._gathers(h, n, routed=True)
        # truthful parts: the attention where a token is routed; only the skipped tokens' K/V where none is
        self._count(n > 0, n > 0, n == 0 and route.kv_for_skipped, not dense if partial else None)
        if everyone or dense:
            h_attn = h + self.attend(i, h, pos, cache)
            out = (h_attn + route.scale[..., None] * ad.mlp_block(i, h_attn)).to(h.dtype)
        else:  # a skipped token's state passes unchanged (its attention adds nothing) to be replaced below
            out = h
            if n or route.kv_for_skipped:  # the routed tokens' attention, unscaled (weight 1; 0 for the others)
                attention = AttnRoute(run, run.to(h.dtype), route.kv_for_skipped)
                out = h + self._routed_attention(i, h, pos, cache, attention)
            if n:
                x = out[full]
                out = out.index_put(full, x + route.scale[full][:, None] * ad.mlp_block(i, x))
        if skip[0].numel():
            y = h[skip]
            if route.skip is not None:  # the policy's skip path (FlexiDepth's adapter), timed apart
                y = y + self._timed(route.skip, ad.mlp_norm(i, y), skip, field="skip_seconds").to(h.dtype)
            out = out.index_put(skip, y)
        return out

    def attn_routed(self, i: int, h: torch.Tensor, pos, cache: KVCache, route: AttnRoute, real=True) -> torch.Tensor:
        """A layer with routed attention (protocol.AttnRoute), then the MLP for every token. K/V are written for
        every token (`kv_for_skipped`) or only for the routed ones. Gathered (`gather`; `auto` at steps of many
        tokens, and at one-token steps where the cost table says gathering pays): queries, attention and its output
        projection for the routed tokens only, each row's packed to the longest row's count (a step of one token:
        the rows with a routed token); no token routed: no attention at all. Dense (`mask`; `auto` elsewhere):
        attention for every token, then the routed ones keep it."""
        ad, run = self.ad, route.run
        num_tokens = h.shape[1]
        if route.kv_for_skipped is None:  # the cache's mode (a random plan's)
            route = dataclasses.replace(route, kv_for_skipped=cache.mode == "fill")
        if route.kv_for_skipped != (cache.mode == "fill"):  # `fill` shares one validity record across layers
            raise SkipbenchError(f"routed attention {'with' if route.kv_for_skipped else 'without'} K/V for skipped "
                                 f"tokens needs a cache in {'fill' if route.kv_for_skipped else 'none'} mode, got {cache.mode}")
        if not route.kv_for_skipped:  # skipped tokens write no K/V here
            cache.mark([i], run if real is True else run & real, num_tokens)
        n = int(run.sum())  # one host sync: what runs decides the path
        everyone = n == run.numel()
        # dense: `mask`, or `auto` at a one-token step where the layer cost table says gathering `n` rows does not pay
        # (no table is measured for attention alone: the whole layer's, whose gathered cost is mostly the gathered
        # attention's copies of cached rows, stands in)
        dense = 0 < n < run.numel() and (self.impl == "mask" or (self._decides(h) and not self._gathers(h, n)))
        self._count(n > 0, True, n == 0 and route.kv_for_skipped, None if everyone or n == 0 else not dense)
        if everyone or dense:
            a = self.attend(i, h, pos, cache, normed=route.normed)
            h_attn = h + (route.scale[..., None] * a if everyone else torch.where(run[..., None], route.scale[..., None] * a, 0)).to(h.dtype)
        else:
            h_attn = h + self._routed_attention(i, h, pos, cache, route)
        return h_attn + ad.mlp_block(i, h_attn)

    def _routed_attention(self, i: int, h: torch.Tensor, pos, cache: KVCache, route: AttnRoute) -> torch.Tensor:
        """What attention adds to each token when only `route.run` tokens attend (zero for the others)."""
        ad, run = self.ad, route.run
        normed = ad.attn_norm(i, h) if route.normed is None else route.normed
        if route.kv_for_skipped:  # every token's K/V (`fill`)
            keys, values = cache.write(i, *ad.kv(i, normed, pos))
        rows = run.any(1).nonzero().flatten()
        if rows.numel() == 0:
            return torch.zeros_like(h)
        every_row = rows.numel() == h.shape[0]
        r = run if every_row else run[rows]
        counts = r.sum(1)
        width = int(counts.max())
        # each row's routed tokens first, in order; the rest of the first `width` are skipped tokens whose outputs
        # are dropped (a step of many tokens pads to its longest row this way)
        order = torch.sort((~r).to(torch.int8), dim=1, stable=True).indices[:, :width]
        packed = order[..., None]
        x = (normed if every_row else normed[rows]).gather(1, packed.expand(-1, -1, h.shape[-1]))
        pq = None if pos is None else tuple(  # position embeddings are [B, 1, T, D] (Adapter.position_embeddings)
            t.gather(2, packed[:, None].expand(-1, 1, -1, t.shape[-1])) for t in (pos if every_row else _take(pos, rows)))
        if route.kv_for_skipped:
            q = ad.q(i, x, pq)
        else:  # only the routed tokens' K/V are computed (the others' slots are invalid at this layer)
            q, k, v = ad.qkv(i, x, pq)
            shape = (h.shape[0], k.shape[1], h.shape[1], k.shape[3])
            at = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            full_k = k.new_zeros(shape).index_copy(0, rows, k.new_zeros(len(rows), *shape[1:]).scatter(2, at, k))
            full_v = v.new_zeros(shape).index_copy(0, rows, v.new_zeros(len(rows), *shape[1:]).scatter(2, at, v))
            keys, values = cache.write(i, full_k, full_v)
        mask = cache.layer_mask(i, h.shape[1])
        if mask is None:  # every position valid: causal (a one-token step sees everything)
            end = cache.length + h.shape[1]
            qpos = torch.arange(cache.length, end, device=h.device)[:, None]
            mask = (torch.arange(end, device=h.device)[None, :] <= qpos)[None, None].expand(h.shape[0], 1, -1, -1)
        if not every_row:
            keys, values, mask = keys[rows], values[rows], mask[rows]
        mask = mask.gather(2, order[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=ad.scale, enable_gqa=self.gqa)
        o = ad.attn_out(i, a.transpose(1, 2).reshape(len(rows), width, -1))
        kept = torch.arange(width, device=h.device)[None, :] < counts[:, None]
        weight = (route.scale if every_row else route.scale[rows]).gather(1, order) * kept
        added = torch.zeros_like(h[: len(rows)]).scatter(1, packed.expand(-1, -1, h.shape[-1]), (weight[..., None] * o).to(h.dtype))
        return added if every_row else torch.zeros_like(h).index_copy(0, rows, added)

    def attend(self, i: int, h: torch.Tensor, pos, cache: KVCache, rows: torch.Tensor | None = None,
               normed: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of layer i for every token of h (writing their K/V): the first residual branch.
        `rows`: h holds only these rows of the batch; `normed`: h through the attention norm, when already known."""
        ad, num_tokens = self.ad, h.shape[1]
        q, k, v = ad.qkv(i, ad.attn_norm(i, h) if normed is None else normed, pos)
        keys, values = cache.write(i, k, v, rows)
        mask = cache.layer_mask(i, num_tokens)
        if rows is not None:
            keys, values = keys[rows], values[rows]
            mask = None if mask is None else mask[rows]
        a = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=ad.scale, is_causal=mask is None and num_tokens > 1, enable_gqa=self.gqa
        )
        return ad.attn_out(i, a.transpose(1, 2).reshape(*h.shape[:2], -1))


    def probe(self, i: int, h: torch.Tensor, pos, cache: KVCache, rows: torch.Tensor, index: torch.Tensor,
              attn: bool = True, mlp: bool = True) -> torch.Tensor:
        """Layer i applied to candidate states of cached tokens, reading the cache and writing nothing: h [N, 1, d],
        candidate n for the token at cache index `index[n]` of row `rows[n]` (`pos`: its position embeddings, [N, 1]).
        Each attends to its row's valid positions before that index at layer i and to itself, its own K/V computed
        from its candidate state: what the token's layer output would be had it reached layer i in that state (CLaSp's
        layer search runs every candidate of a layer in one call so). `attn`/`mlp` False: that branch is skipped
        (KnapSpec's sub-layer search)."""
        ad = self.ad
        if ad.placed:  # the candidates to layer i's device, their outputs back to where they came from
            back = h.device
            h, pos, rows, index = _PerDevice()(ad.devices[i], h, pos, rows, index)
            return self._probe(i, h, pos, cache, rows, index, attn, mlp).to(back)
        return self._probe(i, h, pos, cache, rows, index, attn, mlp)

    def _probe(self, i, h, pos, cache, rows, index, attn, mlp):
        ad = self.ad
        if not attn:
            return h + ad.mlp_block(i, h) if mlp else h
        q, k, v = ad.qkv(i, ad.attn_norm(i, h), pos)
        end = int(index.max())
        before = cache.valid[i][rows, :end] & (torch.arange(end, device=h.device)[None, :] < index[:, None])
        mask = torch.cat([before, before.new_ones(len(rows), 1)], 1)[:, None, None, :]
        a = F.scaled_dot_product_attention(q, torch.cat([cache.k[i][rows, :, :end], k], 2),
                                           torch.cat([cache.v[i][rows, :, :end], v], 2), attn_mask=mask,
                                           scale=ad.scale, enable_gqa=self.gqa)
        out = h + ad.attn_out(i, a.transpose(1, 2).reshape(*h.shape[:2], -1))
        return out + ad.mlp_block(i, out) if mlp else out


class _PerDevice:
    """For a model placed across devices: tensors (or tuples of them) moved to a layer's device, each moved once per
    pass and device (position tables, padding marks), the stream whenever it enters a layer on another device."""

    def __init__(self) -> None:
        self.copies: dict = {}

    def __call__(self, device: torch.device, h, *tables):
        return (moved(h, device), *(self._kept(t, device) for t in tables))

    def _kept(self, t, device):
        if not isinstance(t, (torch.Tensor, tuple)):
            return t
        key = (id(t), device)
        if key not in self.copies:
            self.copies[key] = (t, moved(t, device))  # the original kept alive: its id stays its own
        return self.copies[key][1]


def _take(pos, rows: torch.Tensor):
    """Position embeddings of some rows (a (cos, sin) pair for rotary models, None for OPT)."""
    if pos is None:
        return None
    return tuple(p[rows] for p in pos)


def _both(a: Gate, b: Gate) -> Gate:
    if a is True:
        return b
    if b is True:
        return a
    return a & b


_COMPILED: list = []  # the compiled `Engine.run`, made on first use and shared by every engine


def _compiled_run() -> Callable:
    if not _COMPILED:
        import torch._dynamo

        # one graph per static plan, pass kind (one token, several, a span) and batch-size family: a bench of several
        # plans and drafts needs more than the default 8 before dynamo would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # automatic dynamic shapes: a size compiles static first and dynamic once it changes (the cache length at the
        # second step), while the layer indices and spans stay constants, so the loop unrolls
        _COMPILED.append(torch.compile(Engine.run, dynamic=None))
    return _COMPILED[0]


def enable_compile(adapter: Adapter) -> None:
    """Run every no-gradient pass of a static plan on this adapter through torch.compile (`Engine._compiled`).

    The whole pass is compiled, loop and cache writes included, with automatic dynamic shapes: a growing cache or a
    new batch size compiles once more, then never again. Compiling each layer's maths apart instead was measured 2.3x
    slower on a 2-core CPU (docs/BENCHMARKS.md): each compiled function's guards cost more than the Python it saved.
    Per-token policies (tensor gates, routers), prompts with padding and training run eagerly. The first passes of
    each plan compile (tens of seconds on a CPU); `bench` runs its warm-up repeats before timing.
    """
    adapter.compiled = True
