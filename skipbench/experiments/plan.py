"""`skipbench plan`: the 0-based layers a static plan executes, and the table it was chosen from (a ranking, a distance
table) for a plan computed from a model's states. No model and no torch unless the strategy needs one or --model is
given."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from skipbench.errors import SkipbenchError
from skipbench.policies import PolicySpec
from skipbench.store.results import Shown, Written


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    policy: PolicySpec
    layers: int | None = None  # the model's depth (default: the model's, when one is loaded)
    model: str | None = None  # None: no model unless the strategy needs one (then the embedded one)
    dataset: str = "text"  # calibration prompts: this dataset's train split
    data_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"


def run(cfg: PlanConfig) -> Written:
    """rows: one per executed layer; shown: the strategy's own table (if any), then the layers on one line."""
    layers, spec = cfg.layers, cfg.policy
    if layers is not None and layers < 1:
        raise SkipbenchError(f"--layers must be >= 1, got {layers}")
    lm = data = None
    if cfg.model is not None or "model" in spec.strategy.needs:  # otherwise: no model and no torch
        from skipbench.data import DataSpec
        from skipbench.models import load_model
        from skipbench.models.loading import EMBEDDED

        lm, data = load_model(cfg.model or EMBEDDED, cfg.device, cfg.dtype), DataSpec(name=cfg.dataset, seed=cfg.data_seed)
        if layers is not None and layers != lm.num_layers:
            raise SkipbenchError(f"--layers {layers} disagrees with the model's {lm.num_layers} layers")
        layers = lm.num_layers
    if layers is None:
        raise SkipbenchError("give --layers (the model's depth) or --model")
    executed = spec.plan(layers, lm, data)
    if executed is None:
        raise SkipbenchError(f"policy '{spec.label}' ({spec.strategy.kind}) has no static plan")
    table = spec.explain(layers, lm, data)
    where = f"{lm.name} · {cfg.dataset} (train split)" if lm is not None else f"{layers} layers"
    shown = [Shown(f"{spec.label} · {where}", pd.DataFrame(table))] if table else []
    return Written(rows=pd.DataFrame({"layer": executed}), shown=[*shown, Shown(" ".join(map(str, executed)))])
