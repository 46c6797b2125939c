"""Commands that train: finetune (the backbone; the LayerSkip recipe) and the skip controllers (train, sweep)."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display
from skipbench.cli.group import group
from skipbench.cli.options import (
    AlphaUnits, BatchSize, ControllerInput, DatasetOpt, DeviceOpt, DropoutSchedule, Dtype, Device, GateMode, GradAccum, Loss, LossKind, Lr, MaxSeqLen, Model, Restart, Seed, Steps, Targets, Teacher, TrainDtype, Units, floats,
    PolicyOptions, draft, for_policies, names, plain, train_config,
)
from skipbench.errors import SkipbenchError
from skipbench.policies.spec import STRATEGIES
from skipbench.store.paths import default_out


def healing(text, layers: int, seed: int, policy_option):
    """--heal's spec, with the -o options it takes; an -o it does not take, or --heal-layers without --heal, refused."""
    if text is None:
        if layers != 3 or policy_option:
            raise SkipbenchError("--heal-layers and -o apply to --heal SPEC (a static plan to prune to): give --heal")
        return None
    for_policies(policy_option, [], [text], seed)
    return draft(text, seed, policy_option, "--heal")


def finetune(
    model: str = Model,
    dataset: str = typer.Option("alpaca", "--dataset", "-d", help="training data (references are the targets)"),
    limit: int = typer.Option(0, help="first N training items (0 = the whole train split)"),
    val_limit: int = typer.Option(200, help="validation items scored for early stopping (0 = all)"),
    steps: int = typer.Option(1000, help="optimiser steps at most (early stopping may end sooner)"),
    batch_size: int = typer.Option(8, min=1, help="examples per step (the global batch under torchrun)"),
    grad_accum: GradAccum = 1,
    lr: Lr = 2e-5,
    lr_schedule: str = typer.Option("constant", help="constant | linear (decays to 0 at --steps; App. A.2.2's, with "
                                    "--lr 5e-5 --batch-size 64 --patience 1)"),
    eval_every: int = typer.Option(100, help="steps between validations"),
    patience: int = typer.Option(3, help="validations without a better ROUGE-L before stopping"),
    layer_dropout: float = typer.Option(0.0, help="drop each layer with this probability per example (LayerDrop, Fan et al.)"),
    dropout_schedule: DropoutSchedule = typer.Option(DropoutSchedule.uniform, callback=plain, help="uniform: every "
                                                     "layer at --layer-dropout; exp: LayerSkip's rate rising with depth "
                                                     "from 0 at the first layer to --layer-dropout at the last"),
    early_exit_loss: float = typer.Option(0.0, help="LayerSkip's e_scale: an early-exit loss at every layer through the "
                                          "shared head, weighted e_l = e_scale * sum_{i<=l} i (0: the last layer only)"),
    early_exit_every: int = typer.Option(1, help="LayerSkip's rotational curriculum: an exit at every R-th layer, "
                                         "rotating with the step (and always the last)"),
    max_seq_len: MaxSeqLen = 512,
    max_new_tokens: int = typer.Option(128, help="length of the validation responses"),
    seed: int = typer.Option(0, help="seed of the batches and the layer dropout (the 70/15/15 split is always seed 0)"),
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option("runs/finetune", help="run folder: OUT/best is the model to use (--model OUT/best)"),
    restart: bool = typer.Option(False, "--restart", help="discard an earlier run in --out"),
    heal: Optional[str] = typer.Option(None, help="healing: prune to a static plan's layers first (reverse:C, "
                                       "uniform:C, block-influence:C, angular:C, ...), then train only the head and "
                                       "the last --heal-layers kept layers; OUT/best has C layers"),
    heal_layers: int = typer.Option(3, help="--heal: the last kept layers that train with the head"),
    policy_option: Optional[list[str]] = PolicyOptions,
) -> None:
    """Fine-tune the model on the train split (prompt masked from the loss), early stopping on validation ROUGE-L.

    Example: skipbench finetune --model opt-iml-1.3b --dataset alpaca --lr 5e-5 --lr-schedule linear --batch-size 64 \\
             --steps 3414 --eval-every 569 --patience 1 --out runs/opt-iml-alpaca   # App. A.2.2: 6 epochs
    Then:    skipbench evaluate --model runs/opt-iml-alpaca/best --dataset alpaca --split test
    Healing: skipbench finetune --dataset text --heal reverse:22 --heal-layers 3 --out runs/heal-reverse-22
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.finetune import FinetuneConfig, run, summary

    # the split keeps its default seed (0), as every later command's --split does: --seed must not move the
    # test items into the fine-tuning data
    cfg = FinetuneConfig(model=model, data=DataSpec(name=dataset, split="train", limit=limit or None),
                         val_data=DataSpec(name=dataset, split="validation", limit=val_limit or None), steps=steps,
                         batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule, seed=seed,
                         eval_every=eval_every, patience=patience, layer_dropout=layer_dropout,
                         dropout_schedule=dropout_schedule, early_exit_loss=early_exit_loss,
                         early_exit_every=early_exit_every, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
                         device=device, dtype=dtype, out=out, restart=restart, heal_layers=heal_layers,
                         heal=healing(heal, heal_layers, seed, policy_option))
    with display.TrainBar("finetune") as bar:
        res = run(cfg, progress=bar.step, start=bar.start)
    for message in res.notes:
        display.note(message)
    typer.echo(summary(res))


controllers = group("Gumbel-softmax skip controllers: hidden-state vs constant input (Glavas et al.).")


@controllers.command("train")
def controllers_train(
    model: str = Model,
    dataset: str = DatasetOpt,
    split: str = typer.Option("train", help="training items (a seeded 70/15/15 split)"),
    limit: int = typer.Option(0, help="first N training items (0 = all)"),
    input: ControllerInput = typer.Option(ControllerInput.hidden, callback=plain,
                                          help="hidden: the detached hidden state; constant: all ones"),
    alpha: float = typer.Option(4.0, help="weight of the cost term (see --alpha-units)"),
    alpha_units: AlphaUnits = Units,
    tau: float = typer.Option(1.0, help="Gumbel-softmax temperature"),
    steps: Steps = 300,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-3,
    seed: Seed = 0,
    loss: Loss = LossKind.kl,
    targets: Targets = Teacher.full,
    max_new_tokens: int = typer.Option(64, help="length of the full model's responses used for training"),
    max_seq_len: MaxSeqLen = 256,
    train_backbone: bool = typer.Option(False, "--train-backbone",
                                        help="fine-tune the model jointly (saved to OUT/backbone; the target stays the original)"),
    backbone_lr: float = typer.Option(1e-5, help="learning rate of the backbone with --train-backbone"),
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: str = typer.Option(STRATEGIES.get("controller").default_arg, help="checkpoint folder (resumed when it holds a checkpoint)"),
    restart: bool = Restart,
) -> None:
    """Train one set of skip controllers (frozen backbone, or jointly with it: --train-backbone).

    Example: skipbench controllers train --dataset text --input hidden --alpha 4 --steps 300 --out runs/ctrl-hidden-a4
    Jointly trained controllers are evaluated on their backbone: evaluate --model OUT/backbone --controller OUT
    """
    from skipbench.experiments.controllers import ControllerTrainConfig, run_train

    tcfg = train_config(model, dataset, split, limit, steps, batch_size, lr, seed, loss, max_new_tokens, max_seq_len,
                        device, dtype, out, targets, grad_accum, train_backbone=train_backbone, backbone_lr=backbone_lr,
                        restart=restart)
    display.train(run_train, ControllerTrainConfig(train=tcfg, input=input, alpha=alpha, tau=tau, alpha_units=alpha_units))


@controllers.command("sweep")
def controllers_sweep(
    model: str = Model,
    dataset: str = DatasetOpt,
    train_limit: int = typer.Option(0, help="training items (0 = the whole train split)"),
    eval_limit: int = typer.Option(50, help="held-out test items evaluated per run"),
    alpha: str = typer.Option("2,4,6,10", help="cost weights, comma-separated (see --alpha-units)"),
    alpha_units: AlphaUnits = Units,
    inputs: str = typer.Option("hidden,constant", help="the controllers' inputs compared: hidden, constant"),
    num_seeds: int = typer.Option(3, help="training runs per (input, alpha), with seeds 0..N-1"),
    tau: float = typer.Option(1.0, help="Gumbel-softmax temperature"),
    gate: GateMode = typer.Option(GateMode.sample, callback=plain, help="evaluation gates: sample (as in the paper) | argmax"),
    metric: str = typer.Option("full_rougeL", help="the quality the hidden-vs-constant test compares: full_rougeL "
                               "(against the full model's output) | rougeL (against the references, the paper's)"),
    steps: Steps = 300,
    batch_size: BatchSize = 4,
    lr: Lr = 1e-3,
    loss: Loss = LossKind.kl,
    targets: Targets = Teacher.full,
    max_new_tokens: int = typer.Option(64, help="length of the training targets and of the evaluated responses"),
    max_seq_len: MaxSeqLen = 256,
    train_backbone: bool = typer.Option(False, "--train-backbone", help="each run fine-tunes the model jointly with its "
                                        "controllers (the paper's and the authors' setting), from the original weights"),
    backbone_lr: float = typer.Option(1e-5, help="learning rate of the backbone with --train-backbone"),
    matched_random: bool = typer.Option(True, help="evaluate each run beside random-token skipping of the layers per "
                                        "token it realized (evaluate --matched-random), in the figure and the test"),
    device: Device = DeviceOpt,
    dtype: TrainDtype = Dtype.float32,
    out: Optional[str] = typer.Option(None, help="parquet (default results/controllers-<model>-<dataset>.parquet)"),
    restart: bool = Restart,
) -> None:
    """Train and evaluate controllers for every (input, alpha, seed); Figures 1b and 6; hidden vs constant test.

    Example: skipbench controllers sweep --dataset text --alpha 2,4,6,10 --inputs hidden,constant --num-seeds 3
    """
    from skipbench.data import DataSpec
    from skipbench.experiments.controllers import SweepConfig, run_sweep

    tcfg = train_config(model, dataset, "train", train_limit, steps, batch_size, lr, 0, loss, max_new_tokens,
                        max_seq_len, device, dtype, "", targets, restart=restart, train_backbone=train_backbone,
                        backbone_lr=backbone_lr)
    cfg = SweepConfig(train=tcfg, eval_data=DataSpec(name=dataset, split="test", limit=eval_limit or None),
                      inputs=names([inputs]), alphas=floats(alpha, "--alpha"), num_seeds=num_seeds, tau=tau,
                      alpha_units=alpha_units, gate=gate, metric=metric, eval_max_new_tokens=max_new_tokens,
                      matched_random=matched_random, out=out or default_out("controllers", model, dataset))
    with display.Bar("sweep") as bar:
        display.result(run_sweep(cfg, progress=bar.advance, start=bar.start))


COMMANDS = {"finetune": finetune}
GROUPS = {"controllers": controllers}
