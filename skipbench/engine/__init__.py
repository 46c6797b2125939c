"""The skip-aware forward pass and decode loop (engine/protocol.py is what a policy implements).

Exports are loaded on first use, so importing `skipbench.engine.protocol` (as every policy does) needs no torch.
"""

_EXPORTS = {
    "KV_CHOICES": "cache", "KV_MODES": "cache", "KVCache": "cache", "resolve_kv_mode": "cache",
    "Engine": "forward", "ForwardOut": "forward",
    "LAYERS_CONVENTION": "decode", "Generation": "decode", "Sampling": "decode", "generate": "decode",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"skipbench.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'skipbench.engine' has no attribute '{name}'")


__all__ = list(_EXPORTS)
