"""The residual stream's similarity between layer boundaries on calibration prompts: what similarity-based pruning
(block influence, angular distance) decides from. Computed once per (model, dataset, items, tokens) and cached.

A calibration sequence is an item of the dataset's train split, its chat-formatted prompt followed by its
reference response, cut to `max_tokens`, run at full depth. State a is the residual stream entering layer a
(a = L: after the last layer), as in `fidelity.CONVENTION`. Two summaries of every pair (a, b):

* `cos[a, b]`: the mean over every token of every sequence of cos(h_a, h_b) (ShortGPT's expectation over X, t);
* `angle_last[a, b]`: the mean over sequences of arccos(cos(h_a, h_b)) / pi at the sequence's last token
  (Gromov et al.'s angular distance).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from skipbench.store import readers
from skipbench.store.distributed import tensor_parallel
from skipbench.errors import SkipbenchError, note

VERSION = 1  # bump when the computation changes: cached summaries of an older one are not reused


@dataclass(frozen=True)
class Similarities:
    cos: np.ndarray  # [L+1, L+1]
    angle_last: np.ndarray  # [L+1, L+1]
    sequences: int
    tokens: int
    source: str  # the dataset and split they came from


def calibration_data(ctx, items: int, max_tokens: int, split: str = "train", default: str = "text", sample: int = 0):
    """The calibration items: the first `items` of the run's dataset's `split` (the embedded `default` suite(s) when
    the run names none); `sample` (-o calibration-seed) is checked here and drawn by `calibration_items`."""
    from skipbench.data import DataSpec

    if items < 1 or max_tokens < 2:
        raise SkipbenchError(f"calibration needs at least 1 item and 2 tokens, got {items} and {max_tokens}")
    if not 0 <= sample < 2**31:
        raise SkipbenchError(f"-o calibration-seed must be in 0 .. 2^31 - 1 (0: the split's first items), got {sample}")
    return replace(ctx.data or DataSpec(name=default), split=split, limit=items)


def calibration_items(data, sample: int = 0) -> list:
    """`data`'s items: its split's first `data.limit` (sample 0, the default), or with sample S > 0 a seeded random
    sample of `data.limit` items of the same split: each dataset of a comma list ranked by a hash of S and the item
    id, then interleaved as `load_items` interleaves them (so a mixed sample keeps the datasets' balance, as seed
    0's first items do), kept in that order. Another calibration sample of the same size, to see how much a plan
    depends on its sample; a sample as large as the split is the same for every seed (a note says so)."""
    import itertools

    from skipbench.data import load_items

    if not sample:
        return load_items(data)
    ranked = []
    for name in [n.strip() for n in data.name.split(",") if n.strip()]:
        pool = load_items(replace(data, name=name, limit=None))
        ranked.append(sorted(pool, key=lambda it: hashlib.sha1(f"calibration:{sample}:{it.item_id}".encode()).hexdigest()))
    items = [it for group in itertools.zip_longest(*ranked) for it in group if it is not None]
    if data.limit is not None and data.limit >= len(items):
        note(f"calibration sample {sample}: {data.limit} items of a split of {len(items)} ({data.name}/{data.split}) is "
             "the whole split, the same for every seed")
    return items[: data.limit]


def source_of(data, sample: int = 0) -> str:
    return f"{data.name}/{data.split}" + (f" (calibration sample {sample})" if sample else "")


# A learned router's threshold (`-o skip=K`) is chosen on held-out items: the validation split, which its training
# (the train split) never saw, and which `evaluate` then refuses to score (check_held_out); with no dataset (lm-eval,
# compare), both embedded suites' validation splits (105 items), so that the default 64 can be met.
THRESHOLD_SPLIT, THRESHOLD_DATA = "validation", "text,arith"
# how `-o skip=K` searches its threshold, in the keys of the parts it made: 2, the bisection stops within 0.02 of K
THRESHOLD_SEARCH = 2


def sequences(lm, data, max_tokens: int, sample: int = 0) -> list[list[int]]:
    """Each calibration item's chat-formatted prompt followed by its reference response, cut to `max_tokens`."""
    from skipbench.data.prompts import encode_prompt

    return [(encode_prompt(lm.tokenizer, item.prompt)
             + lm.tokenizer(item.reference, add_special_tokens=False)["input_ids"])[:max_tokens]
            for item in calibration_items(data, sample)]


def similarities(ctx, items: int, max_tokens: int, sample: int = 0) -> Similarities:
    from skipbench.models.loading import cache_dir, model_fingerprint
    from skipbench.store.results import write_text_atomic

    data = calibration_data(ctx, items, max_tokens, sample=sample)
    lm = ctx.lm
    key = json.dumps({"model": lm.name, "fingerprint": model_fingerprint(lm.name), "dtype": str(lm.dtype),
                      "data": data.__dict__, "max_tokens": max_tokens, "version": VERSION,
                      **({"sample": sample} if sample else {})}, sort_keys=True, default=str)
    path = cache_dir() / "calibration" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    # under --tp every rank computes (with collectives in step): a rank reading a file another just wrote would not
    if path.exists() and not tensor_parallel():
        try:
            saved = readers.json_file(path, "calibration cache")
            return Similarities(np.array(saved["cos"]), np.array(saved["angle_last"]), saved["sequences"],
                                saved["tokens"], saved["source"])
        except (readers.Unreadable, KeyError, TypeError, ValueError) as exc:  # computed again, the cache rewritten
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'calibration cache {str(path)!r} is incomplete'}"
                 ": computing it again")
    sims = _compute(lm, data, max_tokens, sample)
    write_text_atomic(path, json.dumps({"cos": sims.cos.tolist(), "angle_last": sims.angle_last.tolist(),
                                        "sequences": sims.sequences, "tokens": sims.tokens, "source": sims.source,
                                        "key": json.loads(key)}))
    return sims


def _compute(lm, data, max_tokens: int, sample: int = 0) -> Similarities:
    import torch

    from skipbench.engine import Engine

    engine = Engine(lm.adapter, "fill")
    size = lm.num_layers + 1
    cos_sum, angle_sum, tokens, seqs = np.zeros((size, size)), np.zeros((size, size)), 0, 0
    for seq in sequences(lm, data, max_tokens, sample):
        ids = torch.tensor([seq], device=lm.device)
        present = torch.ones_like(ids, dtype=torch.bool)
        out = engine.forward(ids, engine.prompt_cache(present, ids.shape[1]), keep_hidden=True)
        h = torch.nn.functional.normalize(torch.stack(out.hidden)[:, 0].float(), dim=-1)  # [L+1, T, d]
        cos_sum += torch.einsum("atd,btd->ab", h, h).double().cpu().numpy()
        last = (h[:, -1] @ h[:, -1].T).clamp(-1, 1)
        angle_sum += (torch.arccos(last) / torch.pi).double().cpu().numpy()
        tokens += ids.shape[1]
        seqs += 1
    return Similarities(cos_sum / tokens, angle_sum / seqs, seqs, tokens, source_of(data, sample))


def tune_threshold(ctx, policy_at, count: str, target: float, items: int, max_tokens: int,
                   steps: int = 20, tolerance: float = 0.02, sample: int = 0) -> tuple[float, float]:
    """The threshold in (0, 1) at which `policy_at(threshold)` skips `target` per token on the calibration sequences
    (teacher-forced, every token gated): `count` "attention" counts attention sub-layers skipped (MindSkip),
    "layers" whole layers. Bisection, as skipping rises with the threshold, for at most `steps` passes over the
    sequences, stopping early at a threshold that skips within `tolerance` of `target` (each pass costs a full
    teacher-forced run of the calibration set; the items evaluated later realize their own mean anyway); returns
    (threshold, what it skips), the closest of the thresholds tried."""
    import torch

    from skipbench.engine import Engine

    data = calibration_data(ctx, items, max_tokens, THRESHOLD_SPLIT, THRESHOLD_DATA, sample)
    seqs = sequences(ctx.lm, data, max_tokens, sample)
    if len(seqs) < items:
        note(f"threshold calibration: the {data.split} split of '{data.name}' has {len(seqs)} items, fewer than the "
             f"{items} asked for (-o calibration); all {len(seqs)} are used")
    engine = Engine(ctx.lm.adapter, policy_at(0.5).kv_mode or "fill")

    def skipped(threshold: float) -> float:
        policy, total, tokens = policy_at(threshold), 0, 0
        for seq in seqs:
            ids = torch.tensor([seq], device=ctx.lm.device)
            present = torch.ones_like(ids, dtype=torch.bool)
            out = engine.forward(ids, engine.prompt_cache(present, ids.shape[1]), policy, record=True)
            if count == "attention":
                total += 0 if out.attention_skips is None else int(out.attention_skips.sum())
            else:
                total += int((~out.executed).sum())
            tokens += ids.shape[1]
        return total / tokens

    lo, hi, best = 0.0, 1.0, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = skipped(mid)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        if abs(got - target) <= tolerance:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    return best


def threshold_of(spec, ctx, policy_at, count: str, most: int) -> float | None:
    """A learned router's threshold as its spec's options set it: `-o tau=T` as given, `-o skip=K` chosen on
    held-out calibration prompts (the validation split of the run's dataset; both embedded suites' when the run has
    none, as under lm-eval and compare) so that a token skips about K (`count`: attention sub-layers or layers)
    there, of at most `most`; None: the trained one. The evaluated items may realize another mean: runs record
    theirs."""
    tau, skip = spec.opt("tau"), spec.opt("skip")
    if tau and skip:
        raise SkipbenchError(f"{spec.name}: -o tau and -o skip choose the same threshold; give one")
    if tau and not 0 < tau < 1:
        raise SkipbenchError(f"{spec.name}: -o tau must be in (0, 1), got {tau}")
    if not skip:
        return tau or None
    if not 0 < skip <= most:
        raise SkipbenchError(f"{spec.name}: -o skip must be in (0, {most}] (its routed layers), got {skip:g}")
    if ctx.lm is None:
        raise SkipbenchError(f"{spec.name}: -o skip chooses the threshold from the model's runs: this command needs the "
                             "model")
    tau, realized = tune_threshold(ctx, policy_at, count, skip, spec.opt("calibration"), spec.opt("calibration-tokens"),
                                   sample=spec.opt("calibration-seed"))
    if abs(realized - skip) > 0.5:
        note(f"{spec.name}: no threshold gives {skip:g} skipped {count} per token on the calibration prompts; the "
             f"closest, tau={tau:.4f}, gives {realized:.2f}")
    return tau


DRAFT_VOCAB_VERSION = 1


def frequent_tokens(lm, n: int, data=None):
    """A draft's vocabulary (FR-Spec, Zhao et al. 2025; `--draft-vocab N`): the N token ids most frequent in the
    train split of `data` (default: the embedded `text` suite), prompts chat-formatted as the model sees them and
    their references, ties broken by the lower id; the model's EOS tokens always among them; when the text holds
    fewer than N distinct tokens, the lowest other ids fill the rest. Counted once per tokenizer and data, then
    read from the cache (`<cache>/draft-vocab/`). Returns a LongTensor of N ids on the model's device."""
    import torch

    from skipbench.data import DataSpec
    from skipbench.engine.decode import eos_ids
    from skipbench.models.loading import cache_dir
    from skipbench.store.results import write_text_atomic

    vocab = lm.model.get_output_embeddings().weight.shape[0]
    if not 1 <= n <= vocab:
        raise SkipbenchError(f"--draft-vocab must be between 1 and the vocabulary's {vocab} tokens, got {n}")
    data = replace(data or DataSpec(name="text"), split="train", limit=None)
    key = json.dumps({"tokenizer": lm.tokenizer.name_or_path, "vocab": vocab, "data": data.__dict__,
                      "version": DRAFT_VOCAB_VERSION}, sort_keys=True, default=str)
    path = cache_dir() / "draft-vocab" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    ranked = None
    if path.exists():
        try:
            ranked = [int(t) for t in readers.json_file(path, "draft vocabulary cache")["ranked"]]
        except (readers.Unreadable, KeyError, TypeError, ValueError) as exc:
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'draft vocabulary cache {str(path)!r} is damaged'}"
                 ": counting again")
    if ranked is None:
        counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences(lm, data, 1 << 30)]),
                             minlength=vocab)[:vocab]
        seen = np.flatnonzero(counts)
        ranked = seen[np.lexsort((seen, -counts[seen]))].tolist()  # most frequent first, then the lower id
        write_text_atomic(path, json.dumps({"ranked": ranked, "key": json.loads(key)}))
    eos = [t for t in sorted(eos_ids(lm)) if t < vocab]
    chosen = list(dict.fromkeys(eos + [t for t in ranked if t not in eos]))[:n]
    if len(chosen) < n:  # fewer distinct tokens than asked: the lowest unused ids
        taken = set(chosen)
        chosen += [t for t in range(vocab) if t not in taken][: n - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.long, device=lm.device)
