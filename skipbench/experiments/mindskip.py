"""`skipbench mindskip train`: MindSkip routers on a frozen model (Router-Tuning, He et al.; policies/mindskip.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from skipbench.models import load_model
from skipbench.policies.mindskip import MindSkip, MindSkipMethod, check_capacity, default_layers
from skipbench.store.results import check_out_dir
from skipbench.training.loop import TrainConfig, TrainResult, train


@dataclass(frozen=True, kw_only=True)
class MindSkipTrainConfig:
    train: TrainConfig
    capacity: float = 0.5  # the fraction of tokens that attend at a routed layer (the authors' 50%)
    weight: float = 1.0  # lambda of the capacity loss
    capacity_loss: str = "abs"  # abs: towards capacity from both sides | relu: the authors' (down to it)
    routed: int = 0  # the number of routed layers below the last (0: half the depth)
    routed_layers: tuple[int, ...] = ()  # explicit 0-based layers instead
    tau: float = 0.5
    kv: bool = False  # skipped tokens write K/V at routed layers (fill); the authors' code writes none


def run_train(cfg: MindSkipTrainConfig, lm=None, progress: Callable | None = None, start: Callable | None = None) -> TrainResult:
    check_out_dir(cfg.train.out)
    check_capacity(cfg.capacity, cfg.capacity_loss)
    lm = lm or load_model(cfg.train.model, cfg.train.device, cfg.train.dtype)
    routed = list(cfg.routed_layers) or default_layers(lm.num_layers, cfg.routed or None)
    torch.manual_seed(cfg.train.seed)
    mind = MindSkip(lm.model.config.hidden_size, lm.num_layers, routed, cfg.tau, cfg.kv)
    return train(lm, MindSkipMethod(mind, lm.adapter, cfg.capacity, cfg.weight, cfg.capacity_loss), cfg.train, progress, start)
