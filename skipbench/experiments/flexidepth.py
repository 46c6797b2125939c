"""`skipbench flexidepth train | usage | depthmap`: FlexiDepth routers and adapters on a frozen model.

usage: per generated token, how many layers and which, with the token text and the subtask; mean and
variance of layers used per subtask (the paper's table). depthmap: one prompt's generated tokens
coloured by layers used, as an HTML page and a PNG.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_prompt
from skipbench.engine import LAYERS_CONVENTION, generate
from skipbench.errors import SkipbenchError
from skipbench.models import load_model
from skipbench.store.checkpoints import checked_module
from skipbench.policies.flexidepth import FlexiDepth, FlexiMethod, FlexiPolicy, load_flexidepth
from skipbench.store.results import (
    Shown, Written, check_out_dir, check_out_path, check_writable, manifest, tidy, write_tables, write_text_atomic,
)
from skipbench.data.heldout import check_held_out
from skipbench.training.loop import TrainConfig, TrainResult, train, training_summary


@dataclass(frozen=True, kw_only=True)
class FlexiTrainConfig:
    train: TrainConfig
    alpha: float = 1e-3
    routed_layers: tuple[int, ...] = ()  # empty: the second half of the stack
    reduction: int = 16
    tau: float = 0.5
    adapter: bool = True
    kv: bool = True
    linear_router: bool = False


def run_train(cfg: FlexiTrainConfig, lm=None, progress: Callable | None = None, start: Callable | None = None) -> TrainResult:
    check_out_dir(cfg.train.out)
    lm = lm or load_model(cfg.train.model, cfg.train.device, cfg.train.dtype)
    torch.manual_seed(cfg.train.seed)  # the initial routers and adapters depend on the seed alone
    flexi = FlexiDepth(lm.model.config.hidden_size, lm.num_layers, list(cfg.routed_layers) or None, cfg.reduction,
                       cfg.tau, cfg.adapter, cfg.kv, cfg.linear_router)
    return train(lm, FlexiMethod(flexi, cfg.alpha), cfg.train, progress, start)


@dataclass(frozen=True, kw_only=True)
class UsageConfig:
    model: str
    router: str
    data: DataSpec
    max_new_tokens: int = 64
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""


def _routers(path: str, lm):
    """Trained routers for this model, with the same checks as `--policy flexidepth`."""
    from skipbench.policies.spec import Context

    return checked_module(path, Context(num_layers=lm.num_layers, lm=lm), load_flexidepth)


def token_rows(lm, item, tokens: list[int], layers: list[list[int]]) -> list[dict]:
    """One row per generated token that ran through the model (the `input` convention)."""
    return [{"item_id": item.item_id, "subtask": item.subtask, "token": t, "token_id": tokens[t],
             "text": lm.tokenizer.decode([tokens[t]]), "layers_used": len(rec), "layers": rec}
            for t, rec in enumerate(layers)]


def run_usage(cfg: UsageConfig, progress: Callable | None = None, start: Callable | None = None) -> Written:
    out = check_out_path(cfg.out)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    flexi, meta = _routers(cfg.router, lm)
    policy = FlexiPolicy(flexi)
    items = load_items(cfg.data)
    check_held_out(items, cfg.router)
    if start:
        start(len(items))
    rows = []
    for s in range(0, len(items), cfg.batch_size):
        chunk = items[s : s + cfg.batch_size]
        gen = generate(lm, [encode_prompt(lm.tokenizer, it.prompt) for it in chunk], policy, cfg.max_new_tokens)
        for r, it in enumerate(chunk):
            rows += [row | {"kv_mode": gen.kv_mode} for row in token_rows(lm, it, gen.tokens[r], gen.layers[r])]
        if progress:
            progress(len(chunk))
    if not rows:
        raise SkipbenchError("no generated token ran through the model (every response ended at once)")
    df = tidy(pd.DataFrame(rows), cfg, lm=lm)
    agg = (df.groupby("subtask")["layers_used"].agg(tokens="count", mean="mean", var="var").reset_index()
           .sort_values("mean"))
    meta_out = manifest(cfg, lm=lm, routed_layers=flexi.routed, num_layers=lm.num_layers,
                        layers_convention=LAYERS_CONVENTION, router_config=meta,
                        router_training=training_summary(cfg.router))
    paths = write_tables(df, out, meta_out, agg=agg)
    return Written(rows=df, path=paths["rows"], tables={"agg": agg}, files={"agg": paths["agg"]},
                   shown=[Shown(f"FlexiDepth layers used per subtask · {cfg.model}", agg)], said=[f"wrote {paths['rows']}"])


@dataclass(frozen=True, kw_only=True)
class DepthmapConfig:
    model: str
    router: str
    prompt: str
    max_new_tokens: int = 64
    device: str = "auto"
    dtype: str = "auto"
    out: str = "results/depthmap.html"


def run_depthmap(cfg: DepthmapConfig) -> dict:
    out = Path(cfg.out)
    if out.suffix != ".html":
        raise SkipbenchError(f"--out must end in .html, got '{out}'")
    check_writable(out)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    flexi, _ = _routers(cfg.router, lm)
    gen = generate(lm, [encode_prompt(lm.tokenizer, cfg.prompt)], FlexiPolicy(flexi), cfg.max_new_tokens)
    tokens, layers = gen.tokens[0], gen.layers[0]
    texts = [lm.tokenizer.decode([t]) for t in tokens]
    used = [len(rec) for rec in layers] + [None] * (len(tokens) - len(layers))  # the last token never ran
    write_text_atomic(out, depthmap_html(cfg.prompt, texts, used, lm.num_layers, flexi.routed))
    from skipbench.analysis.plots import depthmap_png

    png = depthmap_png(texts, used, lm.num_layers, out.with_suffix(".png"))
    return {"html": out, "png": png, "tokens": texts, "layers_used": used}


def _colour(used: int | None, lo: int, hi: int) -> str:
    if used is None:
        return "#dddddd"
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    frac = 0.0 if hi == lo else (used - lo) / (hi - lo)
    return to_hex(colormaps["RdYlGn_r"](0.1 + 0.8 * frac))


def depthmap_html(prompt: str, texts: list[str], used: list[int | None], num_layers: int, routed: list[int]) -> str:
    lo, hi = num_layers - len(routed), num_layers
    spans = "".join(
        f'<span class="t" style="background:{_colour(u, lo, hi)}" title="{u if u is not None else "not fed back"} layers">'
        f"{html.escape(t).replace(chr(10), '<br>')}</span>" for t, u in zip(texts, used))
    legend = "".join(f'<span class="t" style="background:{_colour(v, lo, hi)}">{v}</span>'
                     for v in range(lo, hi + 1, max(1, (hi - lo) // 8)))
    vals = [u for u in used if u is not None]
    mean = f"{np.mean(vals):.2f}" if vals else "n/a"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>skipbench depth map</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.9}}
.t{{padding:1px 2px;border-radius:3px;white-space:pre-wrap}} .p{{color:#555}}</style></head><body>
<h2>Layers used per generated token (FlexiDepth)</h2>
<p class="p"><b>Prompt:</b> {html.escape(prompt)}</p>
<p>{spans}</p>
<p class="p">Colour: decoder layers the token ran through (of {num_layers}; layers {routed[0]}–{routed[-1]} are routed).
Hover a token for its count. Grey: the last token, never fed back. Mean over tokens: {mean} layers.</p>
<p>{legend}</p></body></html>
"""
