"""`laco:C`: LaCo, layer collapse (Yang et al., 2024, "LaCo: Large Language Model Pruning via Layer Collapse",
arXiv 2402.11187): merge runs of consecutive layers until C layers remain.

Reserving-Differences-while-Seeking-Common merge (RDSC): a run of layers l .. l+K collapses into layer l; layers
l+1 .. l+K are removed and layer l's norms are kept (the authors' code merges the projections only). Two formulas
for the merged attention and MLP weights, `-o rdsc=`:

    paper (default)  theta* = theta_l + sum_{k=1..K} (theta_{l+k} - theta_l)      (the paper's RDSC)
    code             theta_l += theta_{l+k} - theta_l, k = 1..K, each step on the theta_l the previous one left:
                     the authors' released notebook (github.com/yangyifei729/LaCo, laco_llama-13b.ipynb,
                     `merge_layers_return_model`: `weight.data.add_(other - weight.data)` in place), which telescopes
                     to theta* = theta_{l+K}, the run's last layer

The search (the paper's Algorithm 1, with the stopping rule of this benchmark: a given number of layers C to keep):

    l = the top position a run of `merge` layers can start at
    while more than C layers remain:
        try the merge of `merge` layers at l (fewer where the top or C would be passed)
        s = mean over the calibration prompts of cos(y, y'), y and y' the last hidden states of the original model
            and of the merged one, flattened over the tokens (as in the paper, every merge is compared with the
            original)
        s > `threshold`: keep the merge, l -= `interval`; else l -= 1
        below `lowest`: start again from the top

A pass that keeps no merge (no merge passes the threshold), `-o below-threshold=`:

    force (default)  keep the pass's most similar merge anyway (a forced merge, recorded as below the threshold and
                     noted), so the search always ends at C layers
    stop             stop merging, as the authors' notebook never merges below its threshold (it makes a single
                     pass with no C; skipbench starts again from the top while passes keep merges): the model keeps
                     more than C layers, and a note says how many

Every result row of a `laco` point (evaluate's and lm-eval's) says how its model was collapsed: `laco_rdsc`,
`laco_below_threshold` and `laco_forced_merges`, the merges kept below the threshold (on SmolLM2-135M `laco:22`
at the default threshold 0.65 forces all three of its merges, at cosines 0.04-0.17).

Calibration prompts are the dataset's train split (policies/calibration.py's convention), so `laco` is scored on
held-out items. The merged model is a plain model folder written once per (model, C, options, calibration) into
the cache (`<cache>/laco/`); `laco:C` runs it (its policy carries the model: `Policy.lm`), `skipbench plan` prints
its merges (forced ones marked) and the folder, and it loads in transformers like any model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skipbench.store import readers
from skipbench.engine.protocol import Full
from skipbench.errors import SkipbenchError, note
from skipbench.policies.calibration import calibration_data, sequences, source_of
from skipbench.policies.spec import STRATEGIES

VERSION = 3  # 2: merges compared with the original model; 3: norms kept, flattened cosine


@dataclass(frozen=True)
class Merge:
    into: int  # the original index of the layer the run collapsed into
    layers: tuple[int, ...]  # the original indices merged (into first)
    similarity: float
    accepted_above_threshold: bool


def _stack(model: nn.Module):
    return model.model.decoder if model.config.model_type == "opt" else model.model


RDSC = STRATEGIES.get("laco").option("rdsc").choices  # paper | code (module docstring)
BELOW_THRESHOLD = STRATEGIES.get("laco").option("below-threshold").choices  # force | stop


def rdsc(states: list[dict[str, torch.Tensor]], form: str = "paper") -> dict[str, torch.Tensor]:
    """The merge of the layers' state dicts (the first is the layer merged into), in float32: `paper`
    theta_0 + sum_{k>=1} (theta_k - theta_0), `code` the authors' in-place updates (theta_K); the first layer's norms
    are kept (as the authors' code does: it merges the projections only)."""
    first = states[0]

    def merged(name: str) -> torch.Tensor:
        if "norm" in name:
            return first[name]
        base = first[name].float()
        if form == "paper":
            return (base + sum(s[name].float() - base for s in states[1:])).to(first[name].dtype)
        # the notebook's `w.add_(w_k - w)` for k = 1..K, each on the w the step before left: w telescopes to w_K
        for s in states[1:]:
            base = base + (s[name].float() - base)
        return base.to(first[name].dtype)

    return {name: merged(name) for name in first}


def _set_layers(model: nn.Module, layers: list[nn.Module]) -> None:
    _stack(model).layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)  # (per-layer type lists are set once the search ends)


@torch.no_grad()
def _last_states(model: nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1][0].float()
            for ids in prompts]


def _similarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The mean over prompts of the cosine between the two last-hidden-state matrices, flattened (as the authors'
    code compares them); NaN (an overflow) counts as the least similar."""
    cos = [torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0) for x, y in zip(a, b)]
    s = float(torch.stack(cos).mean())
    return s if s == s else float("-inf")


@torch.no_grad()
def collapse(model: nn.Module, keep: int, prompts: list[torch.Tensor], merge: int, threshold: float, interval: int,
             lowest: int, form: str = "paper", below: str = "force") -> tuple[nn.Module, list[Merge], list[int]]:
    """A copy of `model` collapsed to `keep` layers (more with `below="stop"` once a pass keeps no merge); the
    merges made; the original index of each remaining layer. `form`: rdsc's formula."""
    import copy

    if form not in RDSC or below not in BELOW_THRESHOLD:
        raise SkipbenchError(f"laco: rdsc must be one of {', '.join(RDSC)} and below-threshold one of "
                             f"{', '.join(BELOW_THRESHOLD)}, got {form!r} and {below!r}")
    work = copy.deepcopy(model)
    layers = list(_stack(work).layers)
    origin = [[i] for i in range(len(layers))]  # original indices merged into each current layer
    merges: list[Merge] = []
    reference = _last_states(work, prompts)  # the original model's

    def merged(l: int, k: int) -> dict[str, torch.Tensor]:
        return rdsc([layers[j].state_dict() for j in range(l, l + k + 1)], form)

    while len(layers) > keep:
        l, best, kept = len(layers) - merge, None, False
        l = max(l, lowest)
        while l >= lowest and len(layers) > keep:
            k = min(merge - 1, len(layers) - 1 - l, len(layers) - keep)
            if k < 1:
                l -= 1
                continue
            saved = {n: t.clone() for n, t in layers[l].state_dict().items()}
            layers[l].load_state_dict(merged(l, k))
            _set_layers(work, layers[: l + 1] + layers[l + k + 1:])
            trial = _last_states(work, prompts)
            s = _similarity(reference, trial)
            if s > threshold:
                merges.append(Merge(origin[l][0], tuple(sum(origin[l: l + k + 1], [])), s, True))
                origin[l: l + k + 1] = [sum(origin[l: l + k + 1], [])]
                del layers[l + 1: l + k + 1]
                kept = True
                l -= interval
                continue
            if best is None or s > best[0]:
                best = (s, l, k)
            layers[l].load_state_dict(saved)
            _set_layers(work, layers)
            l -= 1
        if not kept and len(layers) > keep:
            if below == "stop":  # the authors' rule: nothing merged below the threshold (a pass again: same tries)
                break
            if best is None:
                raise SkipbenchError(f"laco: no run of layers can be merged above layer {lowest}; lower the option "
                                     "'lowest' or keep more layers")
            s, l, k = best  # no merge passed the threshold in a whole pass: the most similar one is forced
            layers[l].load_state_dict(merged(l, k))
            merges.append(Merge(origin[l][0], tuple(sum(origin[l: l + k + 1], [])), s, False))
            origin[l: l + k + 1] = [sum(origin[l: l + k + 1], [])]
            del layers[l + 1: l + k + 1]
            _set_layers(work, layers)
    _set_layers(work, layers)
    for new_idx, layer in enumerate(layers):  # transformers' cache indexes layers by these
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    for attr in ("layer_types", "mlp_layer_types"):  # per-layer lists in some configs (Qwen2/3, Mistral)
        if getattr(work.config, attr, None):
            setattr(work.config, attr, [getattr(model.config, attr)[o[0]] for o in origin])
    return work, merges, [o[0] for o in origin]


def _calibration_prompts(spec, ctx) -> tuple[list[torch.Tensor], str]:
    """The calibration sequences (policies/calibration.py's: train-split prompts with their references)."""
    data = calibration_data(ctx, spec.opt("calibration"), spec.opt("calibration-tokens"),
                            sample=spec.opt("calibration-seed"))
    ids = sequences(ctx.lm, data, spec.opt("calibration-tokens"), spec.opt("calibration-seed"))
    return [torch.tensor([seq], device=ctx.lm.device) for seq in ids], source_of(data, spec.opt("calibration-seed"))


def _options(spec) -> dict:
    """The options that change the collapsed model (its cache key). `rdsc`, `below-threshold` and `calibration-seed`
    count only when set
    away from their defaults (the behaviour before they existed), so the folders written before keep their keys."""
    opts = {name: spec.opt(name) for name in ("merge", "threshold", "interval", "lowest", "calibration",
                                              "calibration-tokens")}
    return opts | {name: spec.opt(name) for name in ("rdsc", "below-threshold", "calibration-seed")
                   if spec.opt(name) != spec.strategy.option(name).default}


def folder(spec, ctx) -> tuple[Path, dict]:
    """The collapsed model's folder in the cache, written on first use, and its record (merges, origin)."""
    from skipbench.models.loading import cache_dir, model_fingerprint, write_folder
    from skipbench.store.results import atomic_dir

    lm, keep = ctx.lm, spec.int_arg()
    opts = _options(spec)
    if opts["merge"] < 2 or opts["interval"] < 1 or opts["lowest"] < 0:
        raise SkipbenchError(f"policy '{spec.label}': merge must be >= 2, interval >= 1 and lowest >= 0")
    if keep >= lm.num_layers:
        raise SkipbenchError(f"policy '{spec.label}': keeps every layer ({lm.num_layers}); give fewer")
    prompts, source = _calibration_prompts(spec, ctx)
    tokens = hashlib.sha1(json.dumps([p[0].tolist() for p in prompts]).encode()).hexdigest()  # the calibration itself
    key = json.dumps({"model": lm.name, "fingerprint": model_fingerprint(lm.name), "dtype": str(lm.dtype), "keep": keep,
                      "options": opts, "calibration": tokens, "version": VERSION}, sort_keys=True, default=str)
    target = cache_dir() / "laco" / hashlib.sha1(key.encode()).hexdigest()[:16]
    record = _valid(target, key)
    if record is None:
        model, merges, origin = collapse(lm.model, keep, prompts, opts["merge"], opts["threshold"], opts["interval"],
                                         opts["lowest"], spec.opt("rdsc"), spec.opt("below-threshold"))
        record = {"key": json.loads(key), "kind": "laco", "base_model": lm.name, "calibration": source,
                  "rdsc": spec.opt("rdsc"), "below_threshold": spec.opt("below-threshold"),
                  "origin": origin, "merges": [m.__dict__ for m in merges]}
        if _valid(target, key) is None:  # another process may have written it meanwhile: a valid folder is kept
            with atomic_dir(target) as tmp:
                write_folder(model, lm.tokenizer, tmp, record)
    _note_below_threshold(spec, record, keep)
    return target, record


def _valid(target: Path, key: str) -> dict | None:
    stamp = target / "skipbench.json"
    if not stamp.exists():
        return None
    try:
        record = readers.json_file(stamp, "LaCo record")
    except readers.Unreadable as exc:
        note(f"{exc}: collapsing the model again")
        return None
    return record if record.get("key") == json.loads(key) and (target / "config.json").exists() else None


def forced_merges(record: dict) -> int:
    """The merges kept although no merge of their pass passed the threshold (`below-threshold=force`)."""
    return sum(not m["accepted_above_threshold"] for m in record["merges"])


def _note_below_threshold(spec, record: dict, keep: int) -> None:
    """What the paper's search would not have done, said whenever the folder is used (plan, evaluate, lm-eval)."""
    forced, left = forced_merges(record), len(record["origin"])
    if forced:
        note(f"{spec.label}: {forced} of {len(record['merges'])} merges were forced below the threshold "
             f"{spec.opt('threshold')} (the most similar of a pass that kept none, -o below-threshold=force; "
             f"`skipbench plan --policy {spec.label}`)")
    if left > keep:
        note(f"{spec.label}: merging stopped where no merge passed the threshold {spec.opt('threshold')} "
             f"(-o below-threshold=stop): the model keeps {left} layers, not {keep}")


class Collapsed(Full):
    """Every layer of the collapsed model (its `lm`); every row it produces says how the collapse went."""

    def __init__(self, spec, lm, record: dict) -> None:
        super().__init__(lm.num_layers)
        self.name, self.lm = spec.label, lm  # the policy runs on the collapsed model's new weights
        self.origin = record["origin"]
        self.columns = {"laco_rdsc": spec.opt("rdsc"), "laco_below_threshold": spec.opt("below-threshold"),
                        "laco_forced_merges": forced_merges(record)}

    def point_record(self) -> dict:
        return dict(self.columns)


def build(spec, ctx):
    from skipbench.models.loading import load_beside, refuse_tp

    refuse_tp(ctx.lm, "LaCo")  # before it merges layers of a sharded model
    path, record = folder(spec, ctx)
    merged = load_beside(str(path), ctx.lm, "LaCo")
    return Collapsed(spec, merged, record)


def plan(spec, ctx) -> list[int]:
    """The original indices of the layers that remain (each now holding its merged run's weights)."""
    return folder(spec, ctx)[1]["origin"]


def explain(spec, ctx) -> list[dict]:
    path, record = folder(spec, ctx)
    rows = [{"merge": str(j + 1), "into": str(m["into"]), "layers": ",".join(map(str, m["layers"])),
             "similarity": m["similarity"], "above threshold": "yes" if m["accepted_above_threshold"] else "no: forced"}
            for j, m in enumerate(record["merges"])]
    if len(record["origin"]) > spec.int_arg():
        rows.append({"merge": "stopped", "into": "", "layers": f"no merge passed: {len(record['origin'])} layers kept",
                     "similarity": "", "above threshold": "no"})
    return rows + [{"merge": "folder", "into": "", "layers": str(path), "similarity": "", "above threshold": ""}]
