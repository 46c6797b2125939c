"""The training loop shared by skip controllers (Glavas et al.) and FlexiDepth routers.

A `Method` owns the trainable modules, the gate function of the differentiable pass and its loss
term; this module owns the rest: items, the full model's responses (distillation needs no labels),
batching, the full-depth prompt prefill, the task loss, AdamW, checkpoints and resuming.

Training runs on response tokens only. The prompt runs at full depth and, with a frozen backbone,
nothing trainable reads it (gate inputs are detached), so it is prefilled once per batch without
gradients — exactly the same numbers as a pass over the whole sequence, at a fraction of the cost.

With `train_backbone` (the paper's joint fine-tuning) the prompt's K/V depend on the trained weights,
so prompt and response run in one differentiable pass (only the response is gated), and the
distillation target comes from a frozen copy of the original model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from skipbench import keyed
from skipbench.store import distributed
from skipbench.store import checkpoints, readers
from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_prompt
from skipbench.engine import Engine, generate
from skipbench.engine.protocol import GateFn
from skipbench.engine.decode import eos_ids, left_pad, pad_id
from skipbench.store.checkpoints import BACKBONE, checkpoint_fingerprint, load_checkpoint, training_record  # noqa: F401
from skipbench.errors import SkipbenchError, note
from skipbench.models.loading import LoadedModel, model_fingerprint, write_folder
from skipbench.store.results import config_dict, finish_together, write_text_atomic, write_together


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str
    data: DataSpec
    steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per optimiser step; losses are normalised over the whole step
    lr: float = 1e-3
    seed: int = 0
    loss: str = "kl"  # kl: distil the full model's next-token distributions | ce: cross-entropy on the targets
    targets: str = "full"  # full: the full model's own greedy responses (no labels needed) | reference
    max_new_tokens: int = 64  # length of the full model's responses used as training data
    max_seq_len: int = 256  # prompt + response tokens per example
    save_every: int = 50
    device: str = "auto"
    dtype: str = "float32"
    out: str = ""
    teacher_cache: str | None = None  # JSON of the full model's responses (default <out>/teacher.json; sweeps share one)
    train_backbone: bool = False  # fine-tune the model jointly (saved to <out>/backbone); the target stays the original
    backbone_lr: float = 1e-5
    restart: bool = False  # discard a checkpoint in `out` instead of resuming it
    # held-out loss: every `eval_every` steps (and at the last), the objective's mean over these items (the
    # validation split), without gradients; logged as `val_loss`, it is what `training_summary` judges convergence by
    val_data: DataSpec | None = None
    eval_every: int = 0  # 0: no held-out loss
    # early stopping on that loss: stop after `patience` evaluations without a lower one, and keep the router of the
    # lowest (its weights become the checkpoint's; the log keeps every step). 0: train every step, keep the last
    patience: int = 0


# fields that may change between a run and its resumption: they do not change what a step computes
RESUMABLE = {"steps", "save_every", "out", "teacher_cache", "device", "restart", "val_data", "eval_every", "patience"}
BEST = "best.safetensors"  # with --patience: the weights of the lowest held-out loss so far, saved with each checkpoint
LAST = "last.safetensors"  # with --patience, a run that used its --steps without stopping: its last weights (the
# checkpoint's are the kept router's), from which more --steps continue


class Method:
    """What a trainable skip method provides to the loop."""

    kind: str = "method"

    def module(self) -> nn.Module:
        raise NotImplementedError

    def gate_fn(self, keys: list | None = None) -> Callable:
        """gate(i, h) for the differentiable pass; random draws seeded per row by `keys`."""
        raise NotImplementedError

    kv_mode: str = "fill"
    #: its gates route layers (protocol.Route) instead of blending them: no prompt in the same pass
    routes: bool = False
    #: a step may leave some parameters without a gradient (data parallelism must then look for them)
    unused_params: bool = False

    def regulariser(self, gates: list[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(the cost term summed over the response tokens in `mask`, per-token means for the log)."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError


@dataclass
class Example:
    prompt: list[int]
    response: list[int]


@dataclass
class TrainResult:
    steps: int
    log: list[dict] = field(default_factory=list)
    out: Path | None = None
    resumed_from: int = 0  # the step a resumed checkpoint had reached
    notes: list[str] = field(default_factory=list)  # what the user should know: dropped examples, nothing to do


def examples(lm: LoadedModel, cfg: TrainConfig, cache_file: Path | None, d: distributed.Dist = distributed.Dist(),
             notes: list[str] | None = None, end: tuple[int, ...] = ()) -> list[Example]:
    """Prompts with the full model's greedy responses (targets full) or the references followed by `end` (an
    EOS token, for fine-tuning). Items left out (a prompt that does not fit --max-seq-len, a response under 2
    tokens) are counted in `notes`."""
    if cfg.loss not in ("kl", "ce"):
        raise SkipbenchError(f"--loss must be 'kl' or 'ce', got '{cfg.loss}'")
    if cfg.targets not in ("full", "reference"):
        raise SkipbenchError(f"--targets must be 'full' or 'reference', got '{cfg.targets}'")
    items = load_items(cfg.data)
    prompts = [encode_prompt(lm.tokenizer, it.prompt) for it in items]
    keep = [i for i, p in enumerate(prompts) if len(p) < cfg.max_seq_len - 1]
    if not keep:
        raise SkipbenchError(f"every prompt is longer than --max-seq-len {cfg.max_seq_len}")
    if cfg.targets == "reference":
        responses = {i: lm.tokenizer(items[i].reference, add_special_tokens=False)["input_ids"] + list(end) for i in keep}
    else:
        responses = _teacher(lm, items, prompts, keep, cfg, cache_file, d)
    out = []
    for i in keep:
        resp = responses[i][: cfg.max_seq_len - len(prompts[i])]
        if len(resp) >= 2:
            out.append(Example(prompts[i], resp))
    if not out:
        raise SkipbenchError("no training example has a response of at least 2 tokens")
    if notes is not None:
        if len(keep) < len(items):
            notes.append(f"{len(items) - len(keep)} of {len(items)} training prompts do not fit --max-seq-len "
                         f"{cfg.max_seq_len} and were left out")
        if len(out) < len(keep):
            notes.append(f"{len(keep) - len(out)} training item(s) left out: the response has fewer than 2 tokens "
                         "within --max-seq-len")
    return out


def _teacher(lm, items, prompts, keep, cfg: TrainConfig, cache_file: Path | None, d: distributed.Dist) -> dict[int, list[int]]:
    # keyed by (model, response length), then item: one cache file serves every run of a sweep
    fingerprint = model_fingerprint(cfg.model)
    key = f"{cfg.model}|{cfg.max_new_tokens}" + (f"|{fingerprint}" if fingerprint else "")
    cached = _teacher_cache(cache_file).get(key, {})
    if not isinstance(cached, dict) or not all(isinstance(v, list) and all(isinstance(t, int) for t in v)
                                               for v in cached.values()):
        note(f"teacher cache '{cache_file}' holds no responses under {key!r}: generating them again")
        cached = {}
    todo = [i for i in keep if items[i].item_id not in cached]
    mine = [todo[j] for j in d.shard([items[i].item_id for i in todo])]  # each rank generates its share
    stops, new = eos_ids(lm), {}
    for s in range(0, len(mine), 8):
        idx = mine[s : s + 8]
        gen = generate(lm, [prompts[i] for i in idx], None, cfg.max_new_tokens)
        for r, i in enumerate(idx):
            new[items[i].item_id] = [t for t in gen.tokens[r] if t not in stops]
    for share in d.all_gather(new):
        cached.update(share)
    if cache_file is not None and todo and d.main:
        everything = _teacher_cache(cache_file, quiet=True)
        everything[key] = cached
        write_text_atomic(cache_file, json.dumps(everything))
    return {i: cached[items[i].item_id] for i in keep}


def _teacher_cache(path: Path | None, quiet: bool = False) -> dict:
    """The cached teacher responses; a damaged cache is reported in one line and computed again (never fatal)."""
    if path is None or not path.exists():
        return {}
    try:
        return readers.json_file(path, "teacher cache")
    except readers.Unreadable as exc:
        if not quiet:
            note(f"{exc}: generating the responses again")
        return {}


def batch_tensors(lm, batch: list[Example]):
    ids, present = left_pad([e.prompt for e in batch], pad_id(lm), lm.device)
    width = max(len(e.response) for e in batch)
    resp = torch.full((len(batch), width), pad_id(lm), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for r, e in enumerate(batch):
        resp[r, : len(e.response)] = torch.tensor(e.response)
        mask[r, : len(e.response)] = True
    return ids, present, resp.to(lm.device), mask.to(lm.device)


def task_weight(batch: list[Example], loss_kind: str) -> int:
    """Response positions the task loss counts: all of them for KL, all but each last one for CE."""
    return sum(len(e.response) - (loss_kind == "ce") for e in batch)


def step_loss(lm, engine: Engine, method: Method, batch: list[Example], loss_kind: str, denominator: float | None = None,
              teacher: Engine | None = None, keys: list | None = None, clock: dict | None = None):
    """One differentiable pass over the responses; returns (loss, parts).

    The task loss and the method's cost term are summed over tokens and divided by `denominator`, the
    token count of the whole optimiser step, so micro-batches of a step add up to the step's mean.
    `teacher`: a frozen engine of the original model when the backbone itself is trained (else `engine`).
    `keys`: one per example, seeding its random gates (see Method.gate_fn).
    `clock`: seconds of the no-grad teacher part and of the differentiable pass are added to it."""
    t0 = time.perf_counter()
    ids, present, resp, mask = batch_tensors(lm, batch)
    frozen = teacher is None
    teacher = teacher or engine
    with torch.no_grad():
        cache, _ = teacher.prefill(ids, present, ids.shape[1] + resp.shape[1], last_only=True)
        # the distillation target: every layer runs, so the KV mode of the cache does not matter
        target = teacher.forward(resp, cache.clone() if frozen else cache, None).logits if loss_kind == "kl" else None
    t1 = time.perf_counter()
    if engine.kv_mode != "fill" and not method.routes:
        raise SkipbenchError("training skip controllers needs --kv-mode fill")
    gate = GateFn(lm.num_layers, method.gate_fn(keys), method.kind)
    if frozen:  # the prompt prefilled above is exactly what the trained pass would compute
        out = engine.run(resp, cache, gate)
    else:  # the prompt's K/V depend on the trained weights: prompt and response in one pass
        cache = engine.prompt_cache(present, ids.shape[1] + resp.shape[1])
        out = engine.run(torch.cat([ids, resp], 1), cache, gate, present=torch.cat([present, torch.ones_like(mask)], 1),
                         gated_from=ids.shape[1])
    logits, gates = out.logits, out.gates
    if loss_kind == "kl":  # KL(p_hat || p_full) at every response position
        per_token, weight = kl_divergence(logits, target), mask
    else:  # next-token cross-entropy on the response
        per_token = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), resp[:, 1:].flatten(),
                                                reduction="none").view(len(batch), -1)
        weight = mask[:, 1:] & mask[:, :-1]
        per_token = torch.cat([per_token, torch.zeros_like(per_token[:, :1])], 1)
        weight = torch.cat([weight, torch.zeros_like(weight[:, :1])], 1)
    denominator = denominator or float(weight.sum())
    task = (per_token * weight).sum() / denominator
    reg, parts = method.regulariser(gates, weight)
    if clock is not None:
        clock["teacher"] = clock.get("teacher", 0.0) + t1 - t0
        clock["forward"] = clock.get("forward", 0.0) + time.perf_counter() - t1
    return task + reg / denominator, {"task": float(task.detach()), **parts}


def train(lm: LoadedModel, method: Method, cfg: TrainConfig, progress: Callable | None = None,
          start: Callable | None = None) -> TrainResult:
    """Train `method` for cfg.steps steps, saving to cfg.out every save_every steps (resumable)."""
    from safetensors.torch import save_file

    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise SkipbenchError("--steps, --batch-size and --grad-accum must be >= 1")
    if cfg.eval_every < 0 or cfg.patience < 0:
        raise SkipbenchError(f"--eval-every and --patience must be >= 0, got {cfg.eval_every} and {cfg.patience}")
    if cfg.patience and (not cfg.eval_every or cfg.val_data is None):
        raise SkipbenchError("--patience stops on the held-out loss: give --eval-every N too")
    evaluations = -(-cfg.steps // cfg.eval_every) if cfg.eval_every else 0  # every N steps and at the last
    if cfg.patience and evaluations <= cfg.patience:  # allowed: a resume with more --steps may still stop
        note(f"--patience {cfg.patience}: {cfg.steps} steps make {evaluations} held-out evaluation(s), so this run "
             "cannot stop early; it keeps the router of its lowest held-out loss")
    if cfg.patience and cfg.train_backbone:  # the kept router would sit on the last step's backbone
        raise SkipbenchError("--patience keeps the router of the lowest held-out loss, not the backbone trained with "
                             "it: train without --train-backbone, or without --patience")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    module = method.module().to(lm.device)
    teacher = _unfreeze_backbone(lm, method, cfg) if cfg.train_backbone else None
    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.train_backbone:
        groups.append({"params": list(lm.model.parameters()), "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    done, log, notes = 0, [], []
    state_file = out / "trainer.pt"
    d = distributed.current()
    if d.main:  # a restart drops the checkpoint and any save a killed run journaled; else that save is completed
        if cfg.restart:
            _discard_checkpoint(out)
        finish_together(out, roll_forward=not cfg.restart)
    d.barrier()  # no rank reads the checkpoint before rank 0 has put it in order
    if state_file.exists() and (out / "weights.safetensors").exists():
        _check_resumable(out, method, cfg)
        _load_into(module, checkpoints.safetensors_file(out / "weights.safetensors", "checkpoint weights", RESTART), out)
        state = trainer_state(out)
        if state["step"] > cfg.steps:
            raise SkipbenchError(f"'{out}' was trained for {state['step']} steps, more than --steps {cfg.steps}; "
                                 f"pass --steps {state['step']} or more to continue, or --restart to train again")
        if cfg.train_backbone:
            _load_backbone(lm, out, state["step"])
        opt.load_state_dict(state["optimizer"])
        done, log = state["step"], state["log"]
        _check_held_out_resumable(out, cfg, log)
        if state.get("stopped"):  # final: its weights are an earlier step's, its optimiser the last's
            notes.append(f"'{out}' holds the router of step {state['kept_step']}, kept by early stopping after "
                         f"{done} steps (its lowest held-out loss): nothing to train (--restart to train again)")
            return TrainResult(done, log, out, done, notes)
        if state.get("kept_step") is not None:  # ran out of --steps with --patience: go on from its last weights
            _load_into(module, _last_weights(out, done), out)
        if done == cfg.steps:
            notes.append(f"'{out}' already holds {done} steps of this configuration: nothing to train "
                         "(--steps N to continue, --restart to train again)")
    data = examples(lm, cfg, Path(cfg.teacher_cache) if cfg.teacher_cache else out / "teacher.json", d, notes)
    if min(cfg.batch_size, len(data)) < d.world:
        raise SkipbenchError(f"a batch of {min(cfg.batch_size, len(data))} example(s) leaves some of the {d.world} "
                             "ranks without one; raise --batch-size")
    held_out = _held_out(lm, cfg, data, d, notes)
    best = _best_so_far(out, log) if cfg.patience else None
    engine = Engine(lm.adapter, method.kv_mode)
    runner = _data_parallel(Trainable(module, lm.model if cfg.train_backbone else None), d, lm.device,
                            method.unused_params)
    if start:
        start(cfg.steps, done)
    module.train()
    for step in range(done, cfg.steps):
        batch, chosen = pick_batch(data, cfg.batch_size, cfg.seed, step)
        log.append(optimizer_step(
            runner, opt, batch, chosen, step, cfg.seed, cfg.grad_accum, d, lambda e: task_weight([e], cfg.loss),
            lambda sub, keys, total, clock: step_loss(lm, engine, method, sub, cfg.loss, total, teacher, keys, clock)))
        stop = False
        if held_out and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            log[-1]["val_loss"] = held_out_loss(lm, engine, method, held_out, cfg, d, teacher)
            module.train()
            if best is not None:
                loss = log[-1]["val_loss"]  # a NaN loss is never the lowest (NaN < x is False either way)
                if math.isfinite(loss) and (not best or loss < best["loss"]):
                    best.update(step=step + 1, loss=loss, weights=_copy(module))
                stop = bool(best) and sum(1 for r in log if "val_loss" in r and r["step"] > best["step"]) >= cfg.patience
        kept = best["step"] if best and (stop or step + 1 == cfg.steps) else None
        last = _copy(module) if kept is not None and not stop else None
        if kept is not None:  # the lowest router becomes the checkpoint's
            module.load_state_dict(best["weights"])
        if d.main and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop):
            _save(out, module, opt, step + 1, log, method, cfg, save_file, lm, best, kept, stop, last)
        if progress:
            progress(log[-1])
        if stop:
            notes.append(f"stopped early at step {step + 1}: no lower held-out loss in {cfg.patience} evaluations; "
                         f"kept the router of step {best['step']} (held-out loss {best['loss']:.4f})")
            break
    d.barrier()  # the last checkpoint is on disk before any rank returns
    module.eval()
    lm.model.requires_grad_(False)
    return TrainResult(len(log), log, out, done, notes)


def _copy(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _best_so_far(out: Path, log: list[dict]) -> dict:
    """Early stopping's lowest held-out loss so far: {} before any, else its step, loss and weights (of a resumed
    run: read back from best.safetensors, which each checkpoint save writes with the log it belongs to)."""
    held = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r and math.isfinite(r["val_loss"])]
    if not held:
        return {}
    step, loss = min(held, key=lambda h: h[1])
    if _saved_step(out / BEST) != step:
        raise SkipbenchError(f"'{out}' logs its lowest held-out loss at step {step} but holds no {BEST} of that step "
                             f"(found {_saved_step(out / BEST)}): it was trained without --patience or a save was cut "
                             f"short; {RESTART}")
    return {"step": step, "loss": loss, "weights": checkpoints.safetensors_file(out / BEST, "best weights", RESTART)}


def _last_weights(out: Path, step: int) -> dict:
    if _saved_step(out / LAST) != step:
        raise SkipbenchError(f"'{out}' holds no {LAST} of its last step {step} to continue from (found "
                             f"{_saved_step(out / LAST)}); {RESTART}")
    return checkpoints.safetensors_file(out / LAST, "last weights", RESTART)


def _saved_step(path: Path) -> int | None:
    """The step a weights file records in its metadata; None when there is no such file; a damaged one is one
    line naming it."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            saved = (f.metadata() or {}).get("step")
        return int(saved) if saved is not None else None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error, OSError or ValueError for a bad file
        raise readers.Unreadable("weights file", path, f"cannot be read ({readers.why(exc)})", RESTART) from None


def _held_out(lm, cfg: TrainConfig, data: list[Example], d: distributed.Dist, notes: list[str]) -> list[Example]:
    """The held-out examples (prompts with the full model's responses, from the same teacher cache), checked to
    share no prompt with the training examples."""
    if not cfg.eval_every or cfg.val_data is None:
        return []
    cache = Path(cfg.teacher_cache) if cfg.teacher_cache else Path(cfg.out) / "teacher.json"
    held = examples(lm, replace(cfg, data=cfg.val_data), cache, d, notes)
    seen = {tuple(e.prompt) for e in data}
    if any(tuple(e.prompt) in seen for e in held):
        raise SkipbenchError(f"the held-out items (split {cfg.val_data.split}) share prompts with the training items "
                             f"(split {cfg.data.split}): train on --split train to measure a held-out loss")
    return held


@torch.no_grad()
def held_out_loss(lm, engine: Engine, method: Method, held: list[Example], cfg: TrainConfig, d: distributed.Dist,
                  teacher: Engine | None = None) -> float:
    """The training objective (task loss + the method's cost term) per response token over the held-out examples,
    in eval mode and with random gates keyed by (seed, -1, example) so every evaluation draws the same."""
    method.module().eval()
    total = float(sum(task_weight([e], cfg.loss) for e in held))
    mine = list(range(d.rank, len(held), d.world))
    loss = 0.0
    for s in range(0, len(mine), cfg.batch_size):
        idx = mine[s : s + cfg.batch_size]
        part, _ = step_loss(lm, engine, method, [held[i] for i in idx], cfg.loss, total, teacher,
                            [(cfg.seed, -1, i) for i in idx])
        loss += float(part)
    return float(d.sum([loss])[0])


def pick_batch(data: list, batch_size: int, seed: int, step: int) -> tuple[list, np.ndarray]:
    """The step's examples: they depend on (seed, step) alone, so a resumed run draws what it would have."""
    rng = keyed.rng(seed, step)
    chosen = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
    return [data[i] for i in chosen], chosen


def optimizer_step(runner, opt, batch: list, chosen, step: int, seed: int, grad_accum: int, d: distributed.Dist,
                   weight: Callable, loss_of: Callable) -> dict:
    """One optimiser step over `batch`: every rank takes its share, in `grad_accum` micro-batches.

    loss_of(sub, keys, total, clock) -> (loss, parts): the loss of examples `sub` summed over their tokens
    and divided by `total`, the token count (`weight` per example) of the whole step, so the micro-batches
    of all ranks add up to the step's mean; parts["task"] and per-token means of other terms for the log.
    `keys` (seed, step, example) seed each example's random draws, whatever rank or micro-batch runs it."""
    torch.manual_seed(seed * 1_000_003 + step)  # any other randomness per step, also after a resume
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    total, mine = sum(weight(e) for e in batch), np.arange(len(batch))[d.rank :: d.world]
    micros = np.array_split(mine, min(grad_accum, len(mine)))
    loss, task, weighted, clock = 0.0, 0.0, {}, {"backward": 0.0}
    for m, micro in enumerate(micros):
        sub = [batch[i] for i in micro]
        keys = [(seed, step, int(chosen[i])) for i in micro]
        with runner.no_sync() if d.enabled and m < len(micros) - 1 else contextlib.nullcontext():
            part_loss, part = runner(lambda: loss_of(sub, keys, total, clock))
            tb = time.perf_counter()
            (part_loss * d.world).backward()  # DDP averages over ranks; the parts already add up to the mean
            clock["backward"] += time.perf_counter() - tb
        loss, task = loss + float(part_loss.detach()), task + part["task"]
        for k, v in part.items():
            if k != "task":
                weighted[k] = weighted.get(k, 0.0) + sum(weight(e) for e in sub) * v
    opt.step()
    names = sorted(weighted)
    loss, task, *sums = d.sum([loss, task, *(weighted[k] for k in names)])
    summary = {k: v / total for k, v in zip(names, sums)} | {"task": task}
    return {"step": step + 1, "loss": loss, **summary, "seconds": time.perf_counter() - t0,
            **{f"seconds_{k}": v for k, v in clock.items()}}  # this rank's phases


def _saved_config(method: Method, cfg: TrainConfig) -> dict:
    fingerprint = model_fingerprint(cfg.model)  # trained on a local folder: on that version of it
    return {"kind": method.kind, **method.config(), "train": config_dict(cfg),
            **({"model_fingerprint": fingerprint} if fingerprint else {})}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resumable(out: Path, method: Method, cfg: TrainConfig) -> None:
    """A checkpoint is resumed only by the configuration that wrote it (steps may grow)."""
    saved = _flat(readers.json_file(out / "config.json", "checkpoint config", RESTART))
    now = _flat(json.loads(json.dumps(_saved_config(method, cfg), default=str)))
    differ = [k for k in sorted(set(saved) | set(now))
              if k.removeprefix("train.").split(".")[0] not in RESUMABLE and k not in ("step", "kept_step", "stopped")
              and saved.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:6])
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise SkipbenchError(f"'{out}' holds a checkpoint trained with another configuration ({shown}{more}); "
                             "pass --restart to train from scratch there, or choose another --out")


RESTART = "pass --restart to train from scratch there, or choose another --out"


def _check_held_out_resumable(out: Path, cfg: TrainConfig, log: list[dict]) -> None:
    """Held-out losses already logged were measured on the saved --val-limit's items: a resumed run that measures
    on other items would mix two series in one log (the criterion compares its fifths), so it is refused."""
    if not any("val_loss" in r for r in log):
        return
    saved = readers.json_file(out / "config.json", "checkpoint config", RESTART).get("train", {}).get("val_data")
    now = json.loads(json.dumps(config_dict(cfg), default=str)).get("val_data")
    if cfg.eval_every and saved != now:
        raise SkipbenchError(f"'{out}' logged held-out losses on other items ({saved} -> {now}); keep its --val-limit "
                             f"and dataset, or {RESTART.removeprefix('pass ')}")


def trainer_state(out: Path) -> dict:
    """The optimiser state and step of a checkpoint, checked against the step its weights and config were saved at:
    a checkpoint whose files come from different saves (a write cut short) is refused, never half-resumed."""
    from safetensors import safe_open

    state = load_trainer(out / "trainer.pt")
    step = state["step"]
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    saved = meta.get("step")
    saved_config = readers.json_file(out / "config.json", "checkpoint config", RESTART)
    config = saved_config.get("step")
    kept = {str(v) for v in (state.get("kept_step"), saved_config.get("kept_step"), meta.get("kept_step"))}
    if len(kept) > 1:  # early stopping: the three files name the same kept router (or none)
        raise SkipbenchError(f"'{out}' holds files of different saves (kept router at steps {sorted(kept)}): a save was "
                             f"cut short; {RESTART}")
    if (saved is not None and int(saved) != step) or (config is not None and config != step):
        raise SkipbenchError(f"'{out}' holds files of different saves (trainer state at step {step}, weights at {saved}, "
                             f"config at {config}): a save was cut short; {RESTART}")
    return state


def _load_into(module: nn.Module, weights: dict, where: Path, strict: bool = True):
    """`module.load_state_dict`, a mismatch (names or shapes) being one line naming the folder."""
    try:
        return module.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        raise SkipbenchError(f"'{where}' holds tensors that do not fit this model ({readers.why(exc)}); {RESTART}") from None


def load_trainer(path: Path) -> dict:
    """A trainer.pt (optimiser state, step, log); a damaged one is one line naming it."""
    try:
        state = torch.load(path, weights_only=False)
        state["step"] = int(state["step"])
    except Exception as exc:  # noqa: BLE001 - torch.load raises pickle, EOF, zip and runtime errors for a damaged file
        raise readers.Unreadable("trainer state", path, f"cannot be loaded ({readers.why(exc)})", RESTART) from None
    return state


def _discard_checkpoint(out: Path) -> None:
    import shutil

    for name in ("weights.safetensors", "trainer.pt", "config.json", BEST, LAST):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / BACKBONE, ignore_errors=True)


class Trainable(nn.Module):
    """What data parallelism synchronises: the method's module, and the backbone when it is trained.
    Its forward runs a loss closure, so DDP sees the pass that uses the parameters."""

    def __init__(self, module: nn.Module, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.method = module
        self.backbone = backbone

    def forward(self, loss_fn: Callable):
        return loss_fn()


def _data_parallel(trainable: Trainable, d: distributed.Dist, device: torch.device, unused: bool) -> nn.Module:
    if not d.enabled:
        return trainable
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def _unfreeze_backbone(lm: LoadedModel, method: Method, cfg: TrainConfig) -> Engine:
    """Make the model trainable and return a frozen engine of the original weights (the distillation target)."""
    import copy

    from skipbench.models.adapters import make_adapter

    if method.routes:
        raise SkipbenchError("--train-backbone is for skip controllers; FlexiDepth trains its routers on a frozen model")
    original = copy.deepcopy(lm.model)  # before any update (and before a resumed backbone is loaded)
    original.requires_grad_(False)
    lm.model.requires_grad_(True)
    return Engine(make_adapter(original), method.kv_mode)


def _load_backbone(lm: LoadedModel, out: Path, step: int) -> None:
    load_model_weights(lm, out / BACKBONE, step)


def load_model_weights(lm: LoadedModel, folder: Path, step: int) -> None:
    """Load a model folder written by `models.loading.write_folder` into `lm`, checking that it was saved at `step`."""
    stamp = folder / "skipbench.json"
    saved = readers.json_file(stamp, "model stamp", RESTART).get("step") if stamp.exists() else None
    if saved != step:
        raise SkipbenchError(f"'{folder.parent}' holds no model saved at step {step} (found {saved}); "
                             "pass --restart to start over")
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(checkpoints.safetensors_file(f, "model weights", RESTART))
    missing, unexpected = _load_into(lm.model, weights, folder, strict=False)
    tied = set(getattr(lm.model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise SkipbenchError(f"'{folder}' does not match the model ({len(missing)} missing, {len(unexpected)} unexpected tensors)")


def _save(out: Path, module, opt, step: int, log, method: Method, cfg: TrainConfig, save_file, lm=None,
          best: dict | None = None, kept: int | None = None, stopped: bool = False, last: dict | None = None) -> None:
    """One checkpoint. With early stopping, `best` (the lowest held-out loss's weights so far) is saved beside it;
    `kept` marks a save whose weights are that step's router: the run `stopped` (final), or it used its --steps
    first, and `last` (its last weights) is saved for more steps to continue from."""
    def tensors(state: dict) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    stamp = {"step": step, **({"kept_step": kept, "stopped": stopped} if kept is not None else {})}
    writers = {  # one save: every file written first, then all moved into place together (results.write_together)
        **({BACKBONE: lambda tmp: write_folder(lm.model, lm.tokenizer, tmp, {"step": step})} if cfg.train_backbone else {}),
        "trainer.pt": lambda tmp: torch.save({"optimizer": opt.state_dict(), "log": log, **stamp}, tmp),
        "config.json": lambda tmp: tmp.write_text(json.dumps({**_saved_config(method, cfg), **stamp}, indent=2,
                                                             default=str)),
        "weights.safetensors": lambda tmp: save_file(tensors(module.state_dict()), str(tmp),
                                                     metadata={k: str(v) for k, v in stamp.items()}),
        **({BEST: lambda tmp: save_file(tensors(best["weights"]), str(tmp), metadata={"step": str(best["step"])})}
           if best else {}),
        **({LAST: lambda tmp: save_file(tensors(last), str(tmp), metadata={"step": str(step)})} if last else {}),
    }
    write_together(out, writers)


def training_summary(path: str | Path) -> dict | None:
    """What a checkpoint's training did, for judging whether it trained long enough (read off its trainer.pt log and
    config.json): steps, examples seen and epochs over its training items, the mean loss over the last fifth
    of the steps against the fifth before it, and the held-out losses with their steps when the run measured them
    (--eval-every). None without a log (a hand-made checkpoint)."""
    path = Path(path)
    if not (path / "trainer.pt").exists():
        return None
    state = load_trainer(path / "trainer.pt")
    log, kept = state.get("log") or [], state.get("kept_step")
    record = training_record(str(path)) or {}
    if len(log) < 5:
        return {"steps": len(log)}
    fifth = max(1, len(log) // 5)
    last, before = (float(np.mean([r["loss"] for r in part])) for part in (log[-fifth:], log[-2 * fifth : -fifth]))
    batch = int(record.get("batch_size") or 0)
    items = None
    if record.get("data"):
        try:
            items = len(load_items(DataSpec(**record["data"])))
        except (TypeError, SkipbenchError):
            items = None
    held = [(int(r["step"]), float(r["val_loss"])) for r in log if "val_loss" in r]
    return {"steps": len(log), "examples": len(log) * batch, "train_items": items,
            "epochs": len(log) * batch / items if items and batch else None,
            "loss_first": float(log[0]["loss"]), "loss_last_fifth": last, "loss_fifth_before": before,
            **({"val_steps": [s for s, _ in held], "val_loss": [v for _, v in held]} if held else {}),
            **({"kept_step": int(kept), "patience": record.get("patience"),
                "kept_epochs": int(kept) * batch / items if items and batch else None} if kept is not None else {})}


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from logits."""
    dtype = torch.promote_types(logits_p.dtype, torch.float32)  # at least fp32 (float64 stays float64)
    logp = torch.log_softmax(logits_p.to(dtype), -1)
    logq = torch.log_softmax(logits_q.to(dtype), -1)
    return (logp.exp() * (logp - logq)).sum(-1)
