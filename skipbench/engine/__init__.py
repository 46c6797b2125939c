"""The skip-aware forward pass and decode loop."""

from skipbench.engine.cache import KV_MODES, KVCache
from skipbench.engine.forward import Engine, ForwardOut
from skipbench.engine.generate import LAYERS_CONVENTION, Generation, Sampling, generate

__all__ = ["KV_MODES", "KVCache", "Engine", "ForwardOut", "LAYERS_CONVENTION", "Generation", "Sampling", "generate"]
