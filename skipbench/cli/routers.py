"""Commands of the learned per-token routers: FlexiDepth (train, usage, depthmap) and MindSkip (train)."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display
from skipbench.cli.group import group
from skipbench.cli.options import (
    BatchSize, Device, DeviceOpt, Dtype, DtypeOpt, GradAccum, Loss, LossKind, Lr, MaxSeqLen, Model, Restart, Router,
    Seed, Steps, Targets, Teacher, TrainData, TrainDtype, TrainSplit, TrainTokens, ints, train_config,
)
from skipbench.errors import SkipbenchError
from skipbench.policies.spec import STRATEGIES
from skipbench.store.paths import slug

flexidepth = group("FlexiDepth: plug-in routers and adapters, KV-preserving skipping, depth maps (Luo et al.).")
mindskip = group("MindSkip: per-token routers that skip attention sub-layers (Router-Tuning, He et al.).")


@flexidepth.command("train")
def flexidepth_train(
    model: str = Model,
    dataset: str = TrainData,
    split: str = TrainSplit,
    limit: int = typer.Option(0, help="first N training items (0 = all)"),
    skip_weight: float = typer.Option(1e-3, help="FlexiDepth's alpha: the weight of L_skip = mean_t (sum_l G)^2 in "
                                      "alpha L_skip + L_lm"),
    routed_layers: str = typer.Option("", help="0-based layers to route (default: the second half)"),
    router_reduction: int = typer.Option(16, help="bottleneck = hidden / reduction (router and adapter)"),
    tau: float = typer.Option(0.5, help="a token runs the full layer when G > tau"),
    adapter: bool = typer.Option(True, help="--no-adapter: the skip path is the identity"),
    kv: bool = typer.Option(True, help="--no-kv: skipped tokens write no K/V at routed layers"),
    linear_router: bool = typer.Option(False, "--linear-router", help="Router(z) = W_r z"),
    steps: Steps = 400,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-3,
    seed: Seed = 0,
    loss: Loss = LossKind.ce,
    targets: Targets = Teacher.full,
    max_new_tokens: int = TrainTokens,
    max_seq_len: MaxSeqLen = 256,
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option(STRATEGIES.get("flexidepth").default_arg, help="checkpoint folder (resumed when it holds a checkpoint)"),
    restart: bool = Restart,
    eval_every: int = typer.Option(0, help="every N steps (and at the last), the loss over held-out items (the "
                                   "validation split), logged as val_loss and used to judge convergence (0 = never)"),
    val_limit: int = typer.Option(0, help="held-out items for --eval-every (0 = the whole validation split)"),
    patience: int = typer.Option(0, help="early stopping: stop after N held-out evaluations without a lower loss and "
                                 "keep the router of the lowest (0 = train every step, keep the last)"),
) -> None:
    """Train FlexiDepth routers and adapters on a frozen model.

    Example: skipbench flexidepth train --dataset text,arith --skip-weight 1e-3 --steps 400 --out runs/flexi-smollm2
    """
    from skipbench.experiments.flexidepth import FlexiTrainConfig, run_train

    from skipbench.data import DataSpec

    if eval_every < 0 or val_limit < 0 or patience < 0:
        raise SkipbenchError(f"--eval-every, --val-limit and --patience must be >= 0, got {eval_every}, {val_limit} "
                             f"and {patience}")
    if (val_limit or patience) and not eval_every:
        raise SkipbenchError(f"{'--val-limit' if val_limit else '--patience'} needs the held-out loss of --eval-every: "
                             "give --eval-every N too")
    tcfg = train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens, max_seq_len,
                        device, dtype, out, targets, grad_accum, restart=restart, eval_every=eval_every, patience=patience,
                        val_data=DataSpec(name=dataset, split="validation", limit=val_limit or None) if eval_every else None)
    display.train(run_train, FlexiTrainConfig(train=tcfg, alpha=skip_weight, routed_layers=ints(routed_layers, "--routed-layers"),
                                              reduction=router_reduction, tau=tau, adapter=adapter, kv=kv,
                                              linear_router=linear_router))


@flexidepth.command("usage")
def flexidepth_usage(
    model: str = Model,
    router: str = Router,
    dataset: str = typer.Option("text,arith", "--dataset", "-d", help="datasets, comma-separated to mix"),
    split: str = typer.Option("test", help="held-out items: test (default) | validation (a seeded 70/15/15 split)"),
    limit: int = typer.Option(50, help="items per run (0 = all)"),
    max_new_tokens: int = typer.Option(64, help="tokens generated per item at most"),
    batch_size: int = typer.Option(8, min=1, help="sequences per generation batch"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: Optional[str] = typer.Option(None, help="parquet (default results/flexi-usage-<model>.parquet)"),
) -> None:
    """Layers used per generated token, with token text and subtask; mean and variance per subtask.

    Example: skipbench flexidepth usage --router runs/flexi-smollm2 --dataset text,arith --out results/flexi-usage.parquet
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.flexidepth import UsageConfig, run_usage

    cfg = UsageConfig(model=model, router=router, data=DataSpec(name=dataset, split=split, limit=limit or None),
                      max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype,
                      out=out or f"results/flexi-usage-{slug(model)}.parquet")
    with display.Bar("usage") as bar:
        display.result(run_usage(cfg, progress=bar.advance, start=bar.start))


@flexidepth.command("depthmap")
def flexidepth_depthmap(
    prompt: str = typer.Option(..., help="the instruction to answer"),
    model: str = Model,
    router: str = Router,
    max_new_tokens: int = typer.Option(64, help="tokens generated at most"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: str = typer.Option("results/depthmap.html", help="HTML page (a PNG is written beside it)"),
) -> None:
    """Colour each generated token by the number of layers it used (HTML and PNG).

    Example: skipbench flexidepth depthmap --router runs/flexi-smollm2 --prompt "Please calculate the sum of 99, 45, 12 and 78."
    """
    from skipbench.experiments.flexidepth import DepthmapConfig, run_depthmap

    res = run_depthmap(DepthmapConfig(model=model, router=router, prompt=prompt, max_new_tokens=max_new_tokens,
                                      device=device, dtype=dtype, out=out))
    display.say(f"wrote {res['html']} and {res['png'].name}", markup=False)


@mindskip.command("train")
def mindskip_train(
    model: str = Model,
    dataset: str = TrainData,
    split: str = TrainSplit,
    limit: int = typer.Option(0, help="first N training items (0 = all)"),
    capacity: float = typer.Option(0.5, help="the fraction of tokens that attend at a routed layer (the capacity "
                                             "loss pushes it down to this)"),
    capacity_weight: float = typer.Option(1.0, help="lambda of the capacity loss, summed over routed layers"),
    capacity_loss: str = typer.Option("abs", help="abs: |attend - capacity| (towards it from both sides) | relu: "
                                                  "relu(attend - capacity), the authors' (only down to it)"),
    routed: int = typer.Option(0, help="route the N layers below the last (0: half the depth, the authors' 16 of 32)"),
    routed_layers: str = typer.Option("", help="0-based layers to route instead of --routed"),
    tau: float = typer.Option(0.5, help="a token attends when its router score is >= tau"),
    kv: bool = typer.Option(False, "--kv/--no-kv", help="--kv: skipped tokens still write K/V at routed layers "
                                                        "(fill); default none, as the authors' code"),
    steps: Steps = 200,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-2,
    seed: Seed = 0,
    loss: Loss = LossKind.ce,
    targets: Targets = Teacher.full,
    max_new_tokens: int = TrainTokens,
    max_seq_len: MaxSeqLen = 256,
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option(STRATEGIES.get("mindskip").default_arg, help="checkpoint folder (resumed when it holds a checkpoint)"),
    restart: bool = Restart,
) -> None:
    """Train MindSkip routers on a frozen model; then --policy mindskip:OUT (-o skip=K to meet K skips per token).

    Example: skipbench mindskip train --dataset text,arith --capacity 0.75 --steps 200 --out runs/mindskip-smollm2
    """
    from skipbench.experiments.mindskip import MindSkipTrainConfig, run_train

    tcfg = train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens, max_seq_len,
                        device, dtype, out, targets, grad_accum, restart=restart)
    display.train(run_train, MindSkipTrainConfig(train=tcfg, capacity=capacity, weight=capacity_weight,
                                                 capacity_loss=capacity_loss, routed=routed, tau=tau, kv=kv,
                                                 routed_layers=ints(routed_layers, "--routed-layers")))


GROUPS = {"flexidepth": flexidepth, "mindskip": mindskip}
