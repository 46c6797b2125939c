"""The self-speculative track: every draft method on the same prompts, timed against plain decoding, with
Spec-Bench's two figures and a lossless check on every prompt.

Spec-Bench (Xia et al., 2024) reports a speculative method by two figures per category of its prompts: the mean
speedup over plain decoding, and the mean accepted tokens per drafting-and-verification step (the verifier's own
token included, so plain decoding has 1). This recipe measures both for any set of self-speculative drafts on the
same model: per prompt (batch 1, greedy, as Spec-Bench's leaderboard runs), full depth and every method generate
until EOS or the length, in an order that rotates from prompt to prompt so that a drift of the machine's speed hits
every method alike (the lockstep of one process); each generation is timed whole, prefill included, as Spec-Bench
times it. The figures follow Spec-Bench's `evaluation/speed.py`: a method's speed is its mean tokens/s over the
prompts, its speedup that speed over full depth's on the same prompts (a ratio of means), and its mean tokens per
round the new tokens after the prompt's over its rounds, pooled over the prompts; each with a 95% paired bootstrap
interval over the prompts. The baseline is skipbench's own full-depth decoding (Spec-Bench's is the model's plain
autoregressive decoding; skipbench's is about 1.1x `model.generate` on a CPU: docs/BENCHMARKS.md). A method whose
output differs from full depth's on a prompt keeps its row, flagged (`lossless` False), and the table counts such
prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from skipbench.analysis.stats import bootstrap_interval
from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_items
from skipbench.engine import generate
from skipbench.engine.decode import Clock, check_room
from skipbench.engine.speculative import Speculation, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import EMBEDDED, load_model
from skipbench.policies import PolicySpec, parse_policies
from skipbench.store.results import Shown, Written, check_out_path, manifest, tidy, write_tables


@dataclass(frozen=True, kw_only=True)
class TrackConfig:
    model: str = EMBEDDED
    dataset: str = "spec-bench"
    per_category: int = 1  # prompts of each category (subtask) taken in the dataset's order (0: every one)
    drafts: tuple[PolicySpec, ...] | None = None  # None: `default_drafts` at the model's depth
    draft_search: bool = True  # add the layer set `bench --draft auto` searches (evaluation/draft_search)
    speculation: Speculation = Speculation()
    max_new_tokens: int = 64  # the defaults fit the 20 minutes on the 2-core machine: docs/BENCHMARKS.md
    max_prompt_tokens: int = 1024
    warmup: int = 1  # prompts run untimed first, by every method
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None


def default_drafts(num_layers: int) -> tuple[PolicySpec, ...]:
    """Early exit and CLaSp at three quarters of the depth (a draft that skips more agrees too rarely on a small
    model: docs/BENCHMARKS.md), and DEL and KnapSpec, which choose their own depth; the searched layer set
    (`draft_search`, on by default) joins them in `run`. `uniform` at the same depth is left out: it trailed early
    exit in every track run measured (docs/BENCHMARKS.md) and cost a fifth of the default run's time."""
    c = max(1, round(0.75 * num_layers))
    return tuple(parse_policies(f"early-exit:{c},clasp:{c},del,knapspec"))


def prompts_of(cfg: TrackConfig) -> list:
    items = load_items(DataSpec(name=cfg.dataset))
    if cfg.per_category < 0:
        raise SkipbenchError(f"--per-category must be >= 0 (0: every prompt), got {cfg.per_category}")
    if not cfg.per_category:
        return items
    taken: dict[str, int] = {}
    out = []
    for it in items:
        if taken.get(it.subtask, 0) < cfg.per_category:
            taken[it.subtask] = taken.get(it.subtask, 0) + 1
            out.append(it)
    return out


@dataclass(kw_only=True)
class TrackResult(Written):
    """rows: one per (prompt, method); summary: one per (method, category) and the methods over every prompt."""

    summary: pd.DataFrame


def run(cfg: TrackConfig, progress=None, start=None) -> TrackResult:
    if cfg.max_new_tokens < 2 or cfg.warmup < 0 or cfg.max_prompt_tokens < 0:
        raise SkipbenchError("track needs --max-new-tokens >= 2, --warmup >= 0 and --max-prompt-tokens >= 0 (0: no cut)")
    labels = [s.label for s in cfg.drafts or ()]
    if cfg.drafts is not None and not cfg.drafts and not cfg.draft_search:
        raise SkipbenchError("track: no method to run; give --draft (or leave it out for every method)")
    if "full" in labels or len(set(labels)) < len(labels):
        raise SkipbenchError("track: give each method once; full depth is the baseline of every run already")
    if cfg.out:
        check_out_path(cfg.out)
    items = prompts_of(cfg)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    encoded, truncated = encode_items(lm, items, cfg.max_prompt_tokens)
    specs = [s.check_draft() for s in (default_drafts(lm.num_layers) if cfg.drafts is None else cfg.drafts)]
    check_room(lm, max(map(len, encoded)), cfg.max_new_tokens)  # before the search and the first method
    found = None
    if cfg.draft_search:
        from skipbench.evaluation.draft_search import search

        found = search(lm, encoded[0], cfg.speculation.k)
        if found.label in {s.label for s in specs}:
            raise SkipbenchError(f"track: the searched draft {found.label} is also among the methods; give it once")
    methods = {"full": None, **{s.label: s.build(lm.num_layers, lm, draft=True) for s in specs}}
    if found is not None:  # named by its size; its layers are in the manifest (`draft_search`) and said
        methods[searched_name(found)] = parse_policies(found.label)[0].build(lm.num_layers, lm, draft=True)

    def once(name: str, ids: list[int]):
        draft = methods[name]
        if draft is None:
            return generate(lm, [ids], None, cfg.max_new_tokens), None
        gen = speculate(lm, [ids], draft, cfg.speculation, cfg.max_new_tokens)
        return gen, gen.speculation

    names = list(methods)
    if start:
        start((cfg.warmup + len(items)) * len(names))
    for ids in encoded[: cfg.warmup]:
        for name in names:
            once(name, ids)
            if progress:
                progress()
    clock, rows = Clock(lm.device), []
    for n, (item, ids) in enumerate(zip(items, encoded)):
        order = names[n % len(names):] + names[: n % len(names)]  # rotated: a drift hits every method alike
        runs = {}
        for name in order:
            clock.lap()
            gen, stats = once(name, ids)
            runs[name] = (clock.lap(), gen.tokens[0], stats)
            if progress:
                progress()
        full_seconds, full_tokens, _ = runs["full"]
        for name in names:
            seconds, tokens, s = runs[name]
            # rounds: plain decoding makes one token per step after the prompt's; a speculative round makes its
            # accepted drafts and the verifier's token (what it emitted: drafts past EOS or the length are not)
            rounds = len(s.round_k) if s is not None else len(tokens) - 1
            rows.append({"prompt": n, "item_id": item.item_id, "category": item.subtask, "method": name, "seconds": seconds,
                         "new_tokens": len(tokens), "tokens_per_s": len(tokens) / seconds,
                         "seconds_ratio": full_seconds / seconds, "lossless": tokens == full_tokens,
                         "rounds": rounds, "acceptance_rate": np.nan if s is None else s.acceptance_rate(),
                         "searches": len(getattr(methods[name], "searches", ()) or ()),
                         "exit_mean": _exit_mean(methods[name])})
    df = pd.DataFrame(rows)
    summary = summarise(df)
    drafted = [s.label for s in specs] + ([found.label] if found is not None else [])
    df = tidy(df, cfg, skip=("out", "drafts"), lm=lm, drafts=",".join(drafted))
    shown = [Shown(f"skipbench track · {cfg.model} · {cfg.dataset} · {len(items)} prompts, batch 1, greedy, "
                   f"{cfg.max_new_tokens} new tokens at most, K={cfg.speculation.label}",
                   summary[summary["category"] == "all"].drop(columns="category"),
                   {"speedup": "{:.3f}", "speedup_lo": "{:.3f}", "speedup_hi": "{:.3f}", "tokens_per_round": "{:.2f}"}),
             *[Shown(f"per category: {what}", summary[summary["category"] != "all"].pivot(
                 index="category", columns="method", values=column).reset_index())
               for column, what in (("speedup", "mean speedup over full depth"),
                                    ("tokens_per_round", "mean tokens per round"))]]
    said = [] if found is None else [f"searched draft: {searched_name(found)} = {found.label}"]
    if not cfg.out:
        return TrackResult(rows=df, summary=summary, shown=shown, said=said)
    from pathlib import Path

    from skipbench.analysis.plots import track_figure

    meta = manifest(cfg, lm=lm, drafts=drafted, prompts=len(items), truncated_prompts=truncated,
                    draft_search=None if found is None else found.label, summary=summary.to_dict("records"))
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    figure = track_figure(summary, Path(cfg.out).with_suffix(".png"))
    paths = write_tables(df, cfg.out, meta, agg=summary)
    return TrackResult(rows=df, summary=summary, path=paths["rows"], tables={"agg": summary}, files={"figure": figure},
                       shown=shown, said=said + [f"wrote {paths['rows']}"])


def searched_name(found) -> str:
    """The searched layer set's method name (its label lists every layer it keeps)."""
    return f"auto ({len(found.chosen)} layers)"


def _exit_mean(draft) -> float:
    """DEL's mean exit layer over the rounds that drafted (NaN for other methods, or when it never drafted)."""
    exits = [e for e, d in getattr(draft, "choices", ()) if d]
    return float(np.mean(exits)) if exits else np.nan


def summarise(df: pd.DataFrame, resamples: int = 1000) -> pd.DataFrame:
    """Per method, over every prompt ("all") and per category, Spec-Bench's figures (module docstring): the speedup,
    mean tokens/s over full depth's on the same prompts, and the tokens per round, pooled, each with a 95% paired
    bootstrap interval over the prompts; and on how many prompts the output was full depth's."""
    out = []
    for category in ["all", *dict.fromkeys(df["category"])]:
        part = df if category == "all" else df[df["category"] == category]
        wide = {col: part.pivot(index="prompt", columns="method", values=col)  # a prompt's place: ids may repeat
                for col in ("tokens_per_s", "new_tokens", "rounds")}
        for method in dict.fromkeys(part["method"]):
            speed, base = wide["tokens_per_s"][method].to_numpy(), wide["tokens_per_s"]["full"].to_numpy()
            made, rounds = wide["new_tokens"][method].to_numpy() - 1, wide["rounds"][method].to_numpy()

            def speedup(idx):
                return speed[idx].mean() / base[idx].mean()

            def per_round(idx):
                return made[idx].sum() / rounds[idx].sum() if rounds[idx].sum() else None

            n, mine = len(speed), part[part["method"] == method]
            s_lo, s_hi = bootstrap_interval(speedup, n, resamples) if method != "full" else (1.0, 1.0)
            t_lo, t_hi = bootstrap_interval(per_round, n, resamples)
            out.append({"method": method, "category": category, "prompts": n, "tokens_per_s": speed.mean(),
                        "speedup": speedup(np.arange(n)), "speedup_lo": s_lo, "speedup_hi": s_hi,
                        "tokens_per_round": per_round(np.arange(n)), "tokens_per_round_lo": t_lo,
                        "tokens_per_round_hi": t_hi, "acceptance_rate": mine["acceptance_rate"].mean(),
                        "lossless": f"{int(mine['lossless'].sum())}/{len(mine)}"})
    return pd.DataFrame(out)
