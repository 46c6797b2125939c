"""One small adapter per architecture family: the primitives the engine's layer loop needs.

All version-sensitive access to transformers internals lives here (tested against the transformers
range pinned in pyproject.toml). An adapter calls the Hugging Face modules (projections, norms, MLPs),
never reading a weight's values but through `_weight` (a model accelerate placed keeps offloaded weights on `meta`
until their module runs; tests/test_placement.py bans other reads); the engine owns the layer loop, the attention
and the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skipbench.errors import SkipbenchError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def execution_device(module: nn.Module) -> torch.device:
    """Where a module runs: its accelerate hook's execution device when the model was placed (an offloaded module's
    weights sit on `meta` and are brought there when it runs), else its first weight's or buffer's device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        for hooked in getattr(hook, "hooks", ()):  # a SequentialHook
            device = getattr(hooked, "execution_device", None) or device
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _weight(module: nn.Module) -> torch.Tensor | None:
    """A module's weight where its values are here, else None (offloaded by accelerate: call the module instead,
    whose hook brings the weight in). The one place an adapter reads a weight."""
    w = module.weight
    return None if w.device.type == "meta" else w
SUPPORTED_FAMILIES = "Llama family (llama, mistral, qwen2, qwen3 — incl. SmolLM2) and OPT (pre-LN)"


class Adapter:
    """Primitives of one decoder-only family. Shapes: h [B, T, hidden]; q/k/v [B, heads, T, head_dim] (this rank's
    heads under tensor parallelism, `tp` > 1)."""

    family: str
    tp: int = 1
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _place(self) -> None:
        """Each layer's device (`devices`) and the final norm's (`final_device`); `placed` when they differ or a
        module is offloaded (accelerate's hooks): the engine then moves the stream between layers, keeps position
        tables per device and each layer's K/V on its device, and `final_norm` and `head` take their input to their
        module's device. A model on one device (offloaded parts included: their hooks bring the weights in) runs as
        before, with no moves."""
        self.devices = [execution_device(layer) for layer in self.layers]
        self.final_device = execution_device(self.final_norm_module())
        self.embed_device = execution_device(self.model.get_input_embeddings())
        self.head_device = execution_device(self.model.get_output_embeddings())
        self.placed = len({*self.devices, self.final_device, self.embed_device, self.head_device}) > 1

    def final_norm_module(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def position_embeddings(self, h: torch.Tensor, positions: torch.Tensor):
        """What every layer's q and k need of the positions, computed once per forward: None, or a tuple of tensors
        shaped [B, 1, T, D] (rows first, tokens third: the engine takes rows and tokens of them)."""
        return None

    def attn_norm(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, i: int, x: torch.Tensor, pos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def kv(self, i: int, x: torch.Tensor, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of normed hidden states x at layer i (the `fill` mode for skipped tokens)."""
        raise NotImplementedError

    def q(self, i: int, x: torch.Tensor, pos) -> torch.Tensor:
        """The queries alone (routed attention: the K/V of every token come from `kv`)."""
        raise NotImplementedError

    def attn_out(self, i: int, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_norm(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """MLP(Norm(h)), the second residual branch."""
        return self.mlp(i, self.mlp_norm(i, h))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the weights one decode step reads, by part: a decoder layer (`layer`), its attention half
        (`attention`: its norm and projections), its MLP half (`mlp`), the K/V projections alone (`kv`, what a
        layer that no row runs still reads in `fill` mode), and the head (`head`; the embedding lookup reads one row
        per token and is left out); `vocab` is the head's rows (a count, not bytes). Layers have one shape, so the
        middle one stands for all."""
        layer = self.layers[self.num_layers // 2]
        named = [(n, p.numel() * p.element_size()) for n, p in layer.named_parameters()]  # sizes only: no values read
        attention = sum(b for n, b in named if n.startswith(("self_attn", "input_layernorm", "self_attn_layer_norm")))
        total = sum(b for _, b in named)
        head = self.model.get_output_embeddings()
        return {"layer": total, "attention": attention, "mlp": total - attention,
                "kv": sum(b for n, b in named if n.split(".")[-2:-1] in (["k_proj"], ["v_proj"])),
                "head": sum(p.numel() * p.element_size() for p in head.parameters()), "vocab": head.out_features}

    def _split_heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n, self.head_dim).transpose(1, 2)


RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}  # one formula (transformers copies it)


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMS norms over the head dim)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.family = cfg.model_type
        self.base = model.model
        self.layers = list(self.base.layers)
        self.num_layers = len(self.layers)
        # under tensor parallelism (transformers' plan: q, k, v column-wise) each rank holds 1/tp of the heads, its
        # projections return its own, and o_proj's row-wise product all-reduces inside its forward
        self.tp = getattr(model, "tp_size", None) or 1
        self.num_heads = cfg.num_attention_heads // self.tp
        self.num_kv_heads = cfg.num_key_value_heads // self.tp
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.attn = [layer.self_attn for layer in self.layers]
        self.q_norm = [getattr(a, "q_norm", None) for a in self.attn]
        self.k_norm = [getattr(a, "k_norm", None) for a in self.attn]
        self._place()

    def final_norm_module(self):
        return self.base.norm

    def embed(self, ids, positions):
        return self.base.embed_tokens(ids)

    def position_embeddings(self, h, positions):
        """(cos, signed sin), each [B, 1, T, head_dim], made once per forward for every layer: transformers' rotary
        is q cos + rotate_half(q) sin with rotate_half(q) = (-q2, q1); with the sin's first half negated here it is
        q cos + roll(q, D/2) sin', the same products and sum (exact), in 4 operations instead of 7, per q and k."""
        cos, sin = self.base.rotary_emb(h, position_ids=positions)
        half = self.head_dim // 2
        return cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, None]

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An RMS norm (Llama's, Mistral's, Qwen's: x rsqrt(mean(x^2) + eps) w, in fp32) as torch's one fused
        operation where the input is fp32 (the module's own 7 operations otherwise: in bf16 transformers rounds
        before the weight's product, which the fused operation does not; and where accelerate offloaded the weight,
        whose hook brings it in when the module runs)."""
        w = _weight(norm)
        if x.dtype == torch.float32 and type(norm).__name__ in RMS_NORMS and w is not None:
            return F.rms_norm(x if x.device == w.device else x.to(w.device), w.shape, w, norm.variance_epsilon)
        return norm(x)

    def attn_norm(self, i, h):
        return self._norm(self.layers[i].input_layernorm, h)

    def _heads(self, i, proj: nn.Linear, norm, x, n):
        t = proj(x)
        b, s, _ = t.shape
        t = t.view(b, s, n, self.head_dim)
        if norm is not None:
            t = self._norm(norm, t)
        return t.transpose(1, 2)

    def qkv(self, i, x, pos):
        a = self.attn[i]
        q = self._heads(i, a.q_proj, self.q_norm[i], x, self.num_heads)
        k = self._heads(i, a.k_proj, self.k_norm[i], x, self.num_kv_heads)
        v = self._split_heads(a.v_proj(x), self.num_kv_heads)
        return self._rotate(q, pos), self._rotate(k, pos), v

    def kv(self, i, x, pos):
        a = self.attn[i]
        k = self._heads(i, a.k_proj, self.k_norm[i], x, self.num_kv_heads)
        v = self._split_heads(a.v_proj(x), self.num_kv_heads)
        return self._rotate(k, pos), v

    def q(self, i, x, pos):
        return self._rotate(self._heads(i, self.attn[i].q_proj, self.q_norm[i], x, self.num_heads), pos)

    def _rotate(self, t, pos):
        """Rotary embedding of q or k (position_embeddings: the same maths as transformers' apply_rotary_pos_emb)."""
        cos, signed_sin = pos
        return t * cos + t.roll(self.head_dim // 2, -1) * signed_sin

    def attn_out(self, i, a):
        return self.attn[i].o_proj(a)

    def mlp_norm(self, i, h):
        return self._norm(self.layers[i].post_attention_layernorm, h)

    def mlp(self, i, x):
        return self.layers[i].mlp(x)

    def final_norm(self, h):
        return self._norm(self.base.norm, h.to(self.final_device) if self.placed else h)

    def head(self, h):
        return self.model.lm_head(h.to(self.head_device) if self.placed else h)


class OPTAdapter(Adapter):
    """OPT with pre-LN layers (125m, 1.3b, 2.7b, ...). Post-LN OPT-350m is refused at load time."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        if not cfg.do_layer_norm_before:
            raise SkipbenchError(
                "this OPT checkpoint is post-LN (do_layer_norm_before=False, e.g. opt-350m); "
                "skipbench supports pre-LN OPT only (opt-125m, opt-1.3b, opt-2.7b, ...)"
            )
        self.family = "opt"
        self.dec = model.model.decoder
        self.layers = list(self.dec.layers)
        self.num_layers = len(self.layers)
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        # HF OPT scales q after its projection and calls attention with scale 1; we pass the scale to
        # SDPA instead (same maths, differs only in float rounding).
        self.scale = self.head_dim**-0.5
        self._place()

    def final_norm_module(self):
        return self.dec.final_layer_norm if self.dec.final_layer_norm is not None else self.layers[-1]

    def embed(self, ids, positions):
        h = self.dec.embed_tokens(ids)
        if self.dec.project_in is not None:
            h = self.dec.project_in(h)
        # the module adds its offset (2) itself; called, not read, so an offloaded table is brought in by its hook
        pe = self.dec.embed_positions
        if self.placed:  # a table placed by hand on another device than the token embedding
            positions = positions.to(execution_device(pe))
        return h + pe(None, position_ids=positions).to(h.device)

    def attn_norm(self, i, h):
        return self.layers[i].self_attn_layer_norm(h)

    def qkv(self, i, x, pos):
        a = self.layers[i].self_attn
        q = self._split_heads(a.q_proj(x), self.num_heads)
        k, v = self.kv(i, x, pos)
        return q, k, v

    def kv(self, i, x, pos):
        a = self.layers[i].self_attn
        return self._split_heads(a.k_proj(x), self.num_heads), self._split_heads(a.v_proj(x), self.num_heads)

    def q(self, i, x, pos):
        return self._split_heads(self.layers[i].self_attn.q_proj(x), self.num_heads)

    def attn_out(self, i, a):
        return self.layers[i].self_attn.out_proj(a)

    def mlp_norm(self, i, h):
        return self.layers[i].final_layer_norm(h)

    def mlp(self, i, x):
        layer = self.layers[i]
        return layer.fc2(layer.activation_fn(layer.fc1(x)))

    def final_norm(self, h):
        if self.placed:
            h = h.to(self.final_device)
        if self.dec.final_layer_norm is not None:
            h = self.dec.final_layer_norm(h)
        return h

    def head(self, h):
        if self.placed:
            h = h.to(self.head_device)
        if self.dec.project_out is not None:
            h = self.dec.project_out(h)
        return self.model.lm_head(h)


def make_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", "?")
    if model_type in LLAMA_FAMILY:
        return LlamaAdapter(model)
    if model_type == "opt":
        return OPTAdapter(model)
    raise SkipbenchError(f"unsupported architecture '{model_type}'; supported: {SUPPORTED_FAMILIES}")
