"""`skipbench finetune`: causal-LM fine-tuning of the backbone, the first stage of Glavas et al.'s setup (App. A.2.2).

The model learns the references of the train split: next-token cross-entropy on the response tokens only
(the prompt is context, masked from the loss), the first response token included, an EOS appended so the
model learns to stop. Every `eval_every` steps (and at step 0) it generates for the validation items at full
depth and scores ROUGE-L against their references; the best model so far is kept in OUT/best (a plain model
folder for `--model`), and training stops once `patience` evaluations in a row bring no improvement.
OUT/last, the optimiser state and the evaluation history make a run resumable.

`layer_dropout` P fine-tunes with random layer dropout after Fan et al. (LayerDrop): each example drops
each decoder layer with probability P for the whole sequence (a dropped layer is the identity), drawn
from a generator keyed by (seed, step, example) — the backbone of Glavas et al.'s App. A.4 ablation (Fig. 7).
Dropout inside the layers stays off, as everywhere in skipbench (the layers are called in eval mode).

Glavas et al.'s two recipes (`make reproduce PRESET=paper` runs the first):

* the paper's App. A.2.2: AdamW at lr 5e-5 decaying linearly (`--lr 5e-5 --lr-schedule linear`), batch 64, 6 epochs,
  early stopping with patience 1 (a validation per epoch);
* the authors' released code (AdalasOPT): lr 2e-5 (this command's default, constant), batch 8, 2 epochs, keeping the
  epoch with the better validation ROUGE-L.

The LayerSkip recipe (Elhoushi et al., 2024, Sec. 4) adds two things:

* `dropout_schedule="exp"`: the rate rises with depth, p_l = D(l) P with D(l) = exp(l ln 2 / (L - 1)) - 1, so the
  first layer is never dropped and the last with probability P (the paper's S(t) = 1: no schedule over time);
* `early_exit_loss` e_scale > 0: the loss is sum_l e~_l CE(head(norm(h_l)), y) over the states h_l leaving every
  layer l, through the model's own final norm and head (shared), with e_l = e_scale sum_{i<=l} i for l < L - 1 and
  e_{L-1} = L - 1 + e_scale sum_{i<=L-2} i, normalised over the exits enabled at the step (e~_l = C(t,l) e_l /
  sum_i C(t,i) e_i). `early_exit_every` R > 1 is the paper's rotational curriculum: at step t only the layers
  l = t mod R, t mod R + R, ... (and always the last) have an exit, which also bounds the logits held at once.

These weights are the paper's. The authors' training code (the torchtune recipe their README points to:
pytorch/torchtune PR #1076, commit f8563ddc750c of 2024-12-06; torchtune/modules/early_exit_loss.py
`sum_l_loss_scale`, recipes/dev/early_exit_finetune_distributed.py; its config's default `0::4`, rotational, `sum_l`,
e_scale 1) scales otherwise: over the exits enabled at the step, in order, e_k = sum_{j<=k} (l_j + 1), times e_scale
below the last layer and 1 at it, then normalised. So indices count from 1 (the first exit weighs e_scale, not 0), the
sum runs over the enabled exits only (under the rotation it leaves the disabled layers out), and the last exit weighs
the whole sum, L (L + 1) / 2 with every exit on, where the paper has L - 1 + e_scale sum_{i<=L-2} i. Its exit l also
reads the state entering layer l (torchtune's `output_hidden_states`): its exits 0 .. L - 1 are the embeddings .. the
output of layer L - 2, and the model's final output gets no loss; here exit l reads the state leaving layer l, the
last the final output. Its rotation (np.roll of the pattern by one a step) is the same as here where R divides L.

Fine-tuned that way, the model is then run with `early-exit:E` (or drafts with it: `--draft early-exit:E`).

**Healing** (`heal`, `--heal SPEC --heal-layers N`; the recipe of Reassessing Layer Pruning, ICLR 2026): the model is
first pruned to the layers a static plan keeps (`reverse:C`, the first C; or `uniform`, `block-influence`, `angular`,
`layers`, `early-exit`: criterion against criterion), physically (a model of C layers), and then only its LM head and
its last N kept layers train, everything else frozen. OUT/best is then a plain model folder of C layers that loads in
transformers as it is. Where the head is tied to the input embedding (SmolLM2, OPT), the pruned model gets a head of
its own (a copy, untied), so that healing leaves the embedding as it was; the folder then holds both matrices.

Under torchrun each rank takes its share of every step's batch (DistributedDataParallel) and of the
validation items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from skipbench import keyed
from skipbench.store import distributed
from skipbench.store import readers
from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_prompt
from skipbench.engine import Engine, generate
from skipbench.engine.decode import eos_ids
from skipbench.errors import SkipbenchError
from skipbench.analysis.metrics import rouge_l
from skipbench.models import load_model, wrap_model
from skipbench.engine.protocol import GateFn
from skipbench.models.loading import remove_layers, write_folder
from skipbench.store.results import check_out_dir, config_dict, finish_together, write_together
from skipbench.training.loop import (
    RESTART, RESUMABLE, TrainConfig, Trainable, _data_parallel, _flat, batch_tensors, examples, load_model_weights,
    load_trainer,
    optimizer_step, pick_batch,
)

BEST, LAST = "best", "last"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    model: str
    data: DataSpec  # training items (the train split)
    val_data: DataSpec  # early-stopping items (the validation split)
    steps: int = 1000  # at most; early stopping may end sooner
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    lr_schedule: str = "constant"  # constant | linear (decay to 0 at `steps`, App. A.2.2's)
    seed: int = 0
    eval_every: int = 100
    patience: int = 3
    layer_dropout: float = 0.0
    dropout_schedule: str = "uniform"  # uniform | exp (LayerSkip: the rate rises with depth to layer_dropout)
    early_exit_loss: float = 0.0  # LayerSkip's e_scale: an early-exit loss at every layer (0: the last layer only)
    early_exit_every: int = 1  # LayerSkip's rotational curriculum: exits at every R-th layer, rotating with the step
    heal: object = None  # a static plan's PolicySpec: prune to its layers, then train the head and `heal_layers` only
    heal_layers: int = 3  # the last kept layers that train with the head when healing
    max_seq_len: int = 512
    max_new_tokens: int = 128  # generation length of the validation responses
    device: str = "auto"
    dtype: str = "float32"
    out: str = "runs/finetune"
    restart: bool = False


@dataclass
class FinetuneResult:
    out: Path
    log: list[dict] = field(default_factory=list)  # one record per optimiser step
    evals: list[dict] = field(default_factory=list)  # {"step", "rougeL"} per validation
    best: dict | None = None  # the best evaluation (its model is OUT/best)
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


SCHEDULES = ("uniform", "exp")
LR_SCHEDULES = ("constant", "linear")


def lr_at(cfg: FinetuneConfig, step: int) -> float:
    """The learning rate of a step: constant, or decaying linearly from `lr` to 0 over `steps` (transformers'
    get_linear_schedule_with_warmup without warm-up, the Trainer's default the paper's App. A.2.2 names)."""
    return cfg.lr if cfg.lr_schedule == "constant" else cfg.lr * (1 - step / cfg.steps)


def drop_rates(num_layers: int, p: float, schedule: str = "uniform") -> np.ndarray:
    """[L] each layer's dropout rate: p everywhere (`uniform`), or LayerSkip's p D(l), D(l) = exp(l ln 2 / (L - 1)) - 1
    (`exp`: 0 at the first layer, p at the last)."""
    if schedule == "uniform":
        return np.full(num_layers, p)
    if schedule == "exp":
        depth = np.arange(num_layers) / max(num_layers - 1, 1)
        return p * (np.exp(depth * np.log(2)) - 1)
    raise SkipbenchError(f"--dropout-schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")


def layer_keep(keys: list, num_layers: int, p: float, schedule: str = "uniform") -> torch.Tensor:
    """[B, L] bool: the layers each example runs under layer dropout, drawn per (seed, step, example) key."""
    draws = np.stack([keyed.rng(*key, 0x1A7E).random(num_layers) for key in keys])
    return torch.from_numpy(draws >= drop_rates(num_layers, p, schedule)[None, :])


def exit_weights(num_layers: int, e_scale: float, step: int = 0, every: int = 1) -> np.ndarray:
    """[L] LayerSkip's normalised early-exit loss weights e~_l at a step (module docstring): e_l = e_scale
    sum_{i<=l} i below the last layer, e_{L-1} = L - 1 + e_scale sum_{i<=L-2} i; with `every` R > 1 only the layers
    l with l = step mod R (mod R) and the last keep theirs."""
    l = np.arange(num_layers, dtype=float)
    e = e_scale * l * (l + 1) / 2
    e[-1] = (num_layers - 1) + e_scale * (num_layers - 2) * (num_layers - 1) / 2
    on = (np.arange(num_layers) % every) == (step % every)
    on[-1] = True
    e = np.where(on, e, 0.0)
    return e / e.sum()


def finetune_loss(lm, engine: Engine, batch: list, total: float, keys: list, layer_dropout: float,
                  schedule: str = "uniform", early_exit: float = 0.0, step: int = 0, every: int = 1):
    """Cross-entropy of the response tokens given the prompt, summed and divided by `total`; (loss, parts). With
    `early_exit` (LayerSkip's e_scale) the loss is the weighted sum over every layer's exit (`exit_weights`)."""
    ids, present, resp, mask = batch_tensors(lm, batch)
    width = ids.shape[1]
    cache = engine.prompt_cache(present, width + resp.shape[1])
    gate = None  # every layer runs
    if layer_dropout > 0:
        keep = layer_keep(keys, lm.num_layers, layer_dropout, schedule).to(lm.device, lm.dtype)
        # a row drops layer i everywhere: a soft gate of exact 0s and 1s
        gate = GateFn(lm.num_layers, lambda i, h: keep[:, i, None].expand(h.shape[:2]), "layer-dropout")
    seq = torch.cat([ids, resp], 1)
    # logits from the last prompt position: position width - 1 + t predicts response token t
    out = engine.run(seq, cache, gate, present=torch.cat([present, torch.ones_like(mask)], 1), logits_from=width - 1,
                     keep_hidden=early_exit > 0)
    cut = slice(width - 1, width - 1 + resp.shape[1])

    def ce(logits: torch.Tensor) -> torch.Tensor:
        per_token = nn.functional.cross_entropy(logits.flatten(0, 1).float(), resp.flatten(), reduction="none")
        return (per_token.view_as(mask) * mask).sum() / total

    last = ce(out.logits[:, : resp.shape[1]])
    if early_exit <= 0:
        return last, {"task": float(last.detach())}
    weights = exit_weights(lm.num_layers, early_exit, step, every)
    task = float(weights[-1]) * last
    for l in np.nonzero(weights[:-1])[0]:  # the exit after layer l reads the stream entering layer l + 1
        task = task + float(weights[l]) * ce(lm.adapter.head(lm.adapter.final_norm(out.hidden[l + 1][:, cut])))
    # the log's other entries are per-token means of the micro-batch (training.optimizer_step weighs them)
    return task, {"task": float(task.detach()), "last_layer": float(last.detach()) * total / float(mask.sum())}


def validate(lm, items, prompts: list[list[int]], cfg: FinetuneConfig, d: distributed.Dist) -> float:
    """Mean ROUGE-L of the full-depth greedy responses against the references (each rank its share)."""
    mine = d.shard([it.item_id for it in items])
    total = 0.0
    for s in range(0, len(mine), 8):
        idx = mine[s : s + 8]
        gen = generate(lm, [prompts[i] for i in idx], None, cfg.max_new_tokens)
        for r, i in enumerate(idx):
            total += rouge_l(lm.tokenizer.decode(gen.tokens[r], skip_special_tokens=True).strip(), items[i].reference)
    return d.sum([total])[0] / len(items)


def run(cfg: FinetuneConfig, progress: Callable | None = None, start: Callable | None = None) -> FinetuneResult:
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.eval_every < 1 or cfg.patience < 1:
        raise SkipbenchError("--steps, --batch-size, --grad-accum, --eval-every and --patience must be >= 1")
    if not 0 <= cfg.layer_dropout < 1:
        raise SkipbenchError(f"--layer-dropout must be in [0, 1), got {cfg.layer_dropout}")
    drop_rates(2, cfg.layer_dropout, cfg.dropout_schedule)  # a bad schedule fails here, before any work
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise SkipbenchError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_schedule}'")
    if not cfg.lr > 0 or cfg.lr == float("inf"):
        raise SkipbenchError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.early_exit_loss < 0 or cfg.early_exit_every < 1:
        raise SkipbenchError("--early-exit-loss must be >= 0 and --early-exit-every >= 1")
    if cfg.heal is not None and (cfg.heal_layers < 0 or cfg.layer_dropout or cfg.early_exit_loss):
        raise SkipbenchError("--heal trains the head and the last --heal-layers N >= 0 layers of a pruned model; it does "
                             "not combine with --layer-dropout or --early-exit-loss")
    if cfg.heal is not None and (cfg.heal.strategy.kind != "static" or cfg.heal.strategy.own_model
                                 or cfg.heal.name == "full"):
        raise SkipbenchError(f"--heal takes a static plan that removes layers (reverse, uniform, early-exit, layers, "
                             f"block-influence, angular), got '{cfg.heal.label}'")
    out = check_out_dir(cfg.out)
    d = distributed.current()
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if cfg.heal is None:
        lm.model.requires_grad_(True)
    else:
        lm = pruned(lm, cfg)
    opt = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=cfg.lr)
    state, notes = _resume(out, cfg, lm, opt)
    result = FinetuneResult(out, state["log"], state["evals"], state["best"], state["stopped_early"], notes)
    tcfg = TrainConfig(model=cfg.model, data=cfg.data, loss="ce", targets="reference", max_seq_len=cfg.max_seq_len,
                       seed=cfg.seed, out=cfg.out)
    data = examples(lm, tcfg, None, d, notes, end=tuple(sorted(eos_ids(lm)))[:1])
    if min(cfg.batch_size, len(data)) < d.world:
        raise SkipbenchError(f"a batch of {min(cfg.batch_size, len(data))} example(s) leaves some of the {d.world} "
                             "ranks without one; raise --batch-size")
    val = load_items(cfg.val_data)
    val_prompts = [encode_prompt(lm.tokenizer, it.prompt) for it in val]
    engine = Engine(lm.adapter, "fill")
    runner = _data_parallel(Trainable(nn.Module(), lm.model), d, lm.device, False)
    done, before = state["step"], len(result.log)
    if start:
        start(cfg.steps, done)
    if not result.evals:  # the starting point: early stopping may keep the model as it was
        _evaluate(lm, val, val_prompts, cfg, d, 0, result, opt)
    for step in range(done, cfg.steps):
        if result.stopped_early:
            break
        batch, chosen = pick_batch(data, cfg.batch_size, cfg.seed, step)
        for group in opt.param_groups:  # a function of the step alone, so a resumed run continues the schedule
            group["lr"] = lr_at(cfg, step)
        result.log.append(optimizer_step(
            runner, opt, batch, chosen, step, cfg.seed, cfg.grad_accum, d, lambda e: len(e.response),
            lambda sub, keys, total, clock: finetune_loss(lm, engine, sub, total, keys, cfg.layer_dropout,
                                                          cfg.dropout_schedule, cfg.early_exit_loss, step,
                                                          cfg.early_exit_every)))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            _evaluate(lm, val, val_prompts, cfg, d, step + 1, result, opt)
        if progress:
            progress(result.log[-1])
    if done and len(result.log) == before:
        notes.append(f"'{out}' already holds this fine-tuning run (step {done}"
                     f"{', stopped early' if result.stopped_early else ''}): nothing to train (--restart to train again)")
    d.barrier()
    lm.model.requires_grad_(False)
    return result


def pruned(lm, cfg: FinetuneConfig):
    """Healing's model: `lm` with only the layers of the static plan `cfg.heal` (calibrated plans read the training
    items), a copy of C layers renumbered as transformers expects, whose head and last `heal_layers` layers train."""
    spec = cfg.heal
    policy = spec.build(lm.num_layers, lm, cfg.data)
    if policy.lm is not None or not policy.skips_statically():
        raise SkipbenchError(f"--heal takes a static plan that removes layers (reverse, uniform, early-exit, layers, "
                             f"block-influence, angular), got '{spec.label}'")
    keep = policy.executed_layers()
    if cfg.heal_layers > len(keep):
        raise SkipbenchError(f"--heal-layers {cfg.heal_layers} is more than the {len(keep)} layers '{spec.label}' keeps")
    small = remove_layers(lm.model, keep, share_weights=False)
    if small.lm_head.weight is small.get_input_embeddings().weight:  # tied: the head gets a copy of its own
        small.lm_head.weight = nn.Parameter(small.lm_head.weight.detach().clone())
        small.config.tie_word_embeddings = False
    healed = wrap_model(small, lm.tokenizer, f"{lm.name} pruned to {spec.label}", lm.device)
    layers = small.model.decoder.layers if small.config.model_type == "opt" else small.model.layers
    for module in (small.lm_head, *list(layers)[len(keep) - cfg.heal_layers:]):
        module.requires_grad_(True)
    return healed


def _evaluate(lm, val, val_prompts, cfg: FinetuneConfig, d, step: int, result: FinetuneResult, opt) -> None:
    """Validate, keep the best model, decide early stopping, and checkpoint everything (resumable)."""
    score = validate(lm, val, val_prompts, cfg, d)
    result.evals.append({"step": step, "rougeL": score})
    improved = result.best is None or score > result.best["rougeL"]
    if improved:
        result.best = {"step": step, "rougeL": score}
    without = sum(e["step"] > result.best["step"] for e in result.evals)  # evaluations since the best
    result.stopped_early = without >= cfg.patience and step < cfg.steps
    if d.main:  # one save: every file written first, then all moved into place together (results.write_together)
        meta = {**config_dict(cfg), "kind": "finetune", "step": step, "best": result.best, "evals": result.evals,
                "stopped_early": result.stopped_early}
        write_together(result.out, {
            **({BEST: lambda tmp: write_folder(lm.model, lm.tokenizer, tmp, {"step": step, "val_rougeL": score,
                                                                             "base_model": cfg.model})} if improved else {}),
            LAST: lambda tmp: write_folder(lm.model, lm.tokenizer, tmp, {"step": step}),
            "config.json": lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str)),
            "trainer.pt": lambda tmp: torch.save({"optimizer": opt.state_dict(), "step": step, "log": result.log,
                                                  "evals": result.evals, "best": result.best,
                                                  "stopped_early": result.stopped_early}, tmp)})
    d.barrier()


def _resume(out: Path, cfg: FinetuneConfig, lm, opt) -> tuple[dict, list[str]]:
    """The state of an earlier run with the same configuration, loaded into the model and optimiser."""
    import shutil

    fresh = {"step": 0, "log": [], "evals": [], "best": None, "stopped_early": False}
    d = distributed.current()
    if d.main:  # a restart drops the checkpoint and any save a killed run journaled; else that save is completed
        if cfg.restart:
            for name in ("trainer.pt", "config.json"):
                (out / name).unlink(missing_ok=True)
            for name in (BEST, LAST):
                shutil.rmtree(out / name, ignore_errors=True)
        finish_together(out, roll_forward=not cfg.restart)
    d.barrier()  # no rank reads the checkpoint before rank 0 has put it in order
    if not (out / "trainer.pt").exists():
        return fresh, []
    saved = _flat(readers.json_file(out / "config.json", "fine-tuning config", RESTART))
    now = _flat(config_dict(cfg))
    # a run saved before the LayerSkip or healing options existed used their defaults
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    saved = {**{k: defaults[k] for k in ("dropout_schedule", "early_exit_loss", "early_exit_every", "lr_schedule",
                                         "heal", "heal_layers")}, **saved}
    # its early stopping's patience, unlike the routers' (which keep the lowest router whatever it is), decides
    # where a resumed run stops against the evaluations it logged: a change is refused
    differ = [k for k in sorted(now) if (k not in RESUMABLE or k == "patience") and saved.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:6])
        raise SkipbenchError(f"'{out}' holds a fine-tuning run with another configuration ({shown}); "
                             "pass --restart to train from scratch there, or choose another --out")
    state = load_trainer(out / "trainer.pt")
    if state["step"] > cfg.steps:
        raise SkipbenchError(f"'{out}' was fine-tuned for {state['step']} steps, more than --steps {cfg.steps}; "
                             f"pass --steps {state['step']} or more, or --restart")
    load_model_weights(lm, out / LAST, state["step"])
    opt.load_state_dict(state["optimizer"])
    return {k: state[k] for k in fresh}, []


def summary(result: FinetuneResult) -> str:
    """The line a fine-tuning run ends with: validation ROUGE-L at the start and at its best, and the model to use."""
    first, best, last = result.evals[0], result.best, result.evals[-1]["step"]
    stop = f"stopped early at step {last}" if result.stopped_early else f"ran to step {last}"
    return (f"validation ROUGE-L {first['rougeL']:.4f} at step 0, best {best['rougeL']:.4f} at step {best['step']}; "
            f"{stop}; the model to use: {result.out / 'best'}")
