"""Model loading and per-family adapters."""

from skipbench.models.adapters import Adapter, make_adapter
from skipbench.models.loading import ALIASES, EMBEDDED, LoadedModel, load_model, wrap_model

__all__ = ["Adapter", "make_adapter", "ALIASES", "EMBEDDED", "LoadedModel", "load_model", "wrap_model"]
