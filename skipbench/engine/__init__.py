"""The skip-aware forward pass and decode loop."""

from skipbench.engine.cache import KV_CHOICES, KV_MODES, KVCache, resolve_kv_mode
from skipbench.engine.forward import Engine, ForwardOut
from skipbench.engine.generate import LAYERS_CONVENTION, Generation, Sampling, generate

__all__ = ["KV_CHOICES", "KV_MODES", "KVCache", "resolve_kv_mode", "Engine", "ForwardOut", "LAYERS_CONVENTION", "Generation", "Sampling", "generate"]
