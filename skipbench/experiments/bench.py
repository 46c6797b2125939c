"""`skipbench bench`: wall-clock cost of skipping, measured side by side in one process.

Variants, timed round-robin on the same prompts after warm-up (medians over repeats):
  hf-generate     transformers' own `model.generate` at full depth (the baseline)
  full            skipbench at full depth
  uniform:C       skipbench with the U(l,C) plan (prompt under the plan too, so the work equals ...)
  removed:C       ... the same model with the other layers physically removed, run by skipbench (the bound)
Every variant generates exactly `new_tokens` tokens (EOS does not stop it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch

from skipbench.data.prompts import encode_prompt
from skipbench.engine import generate
from skipbench.engine.generate import left_pad, pad_id
from skipbench.errors import SkipbenchError
from skipbench.models import EMBEDDED, load_model, wrap_model
from skipbench.models.loading import LoadedModel, remove_layers
from skipbench.policies import make_policy
from skipbench.policies.base import PolicyOptions
from skipbench.results import flat_config, manifest, run_id, write_atomic

PROMPTS = [
    "Please calculate the sum of 99, 45 and 12.",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers larger than 50.",
    "What is the capital of France, and why is it famous?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Describe a cat to someone who has never seen one.",
    "Give me a simple recipe for a cup of tea.",
]


@dataclass(frozen=True)
class BenchConfig:
    model: str = EMBEDDED
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    cost: int = 15
    repeats: int = 3
    warmup: int = 1
    kv_mode: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None


@dataclass
class BenchResult:
    rows: pd.DataFrame  # one row per (variant, batch size, repeat)
    summary: pd.DataFrame  # one row per (variant, batch size): medians and ratios
    path: str | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _variants(lm: LoadedModel, cfg: BenchConfig):
    full = make_policy("full", lm.num_layers)
    uniform = make_policy("uniform", lm.num_layers, PolicyOptions(cost=cfg.cost))
    small = wrap_model(remove_layers(lm.model, uniform.executed_layers()), lm.tokenizer, "removed", lm.device)
    small_full = make_policy("full", small.num_layers)
    n = cfg.new_tokens

    def hf(prompts):
        ids, present = left_pad(prompts, pad_id(lm), lm.device)
        lm.model.generate(input_ids=ids, attention_mask=present.long(), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad_id(lm))

    def ours(model, policy, depth):
        return lambda prompts: generate(model, prompts, policy, n, cfg.kv_mode, stop_at_eos=False, prompt_depth=depth)

    return {
        "hf-generate": (hf, lm.num_layers),
        "full": (ours(lm, full, "full"), lm.num_layers),
        f"uniform:{cfg.cost}": (ours(lm, uniform, "policy"), cfg.cost),
        f"removed:{cfg.cost}": (ours(small, small_full, "full"), cfg.cost),
    }


def run(cfg: BenchConfig, progress=None, start=None) -> BenchResult:
    if cfg.new_tokens < 2 or cfg.repeats < 1 or cfg.warmup < 0 or any(b < 1 for b in cfg.batch_sizes):
        raise SkipbenchError("bench needs --new-tokens >= 2, --repeats >= 1, --warmup >= 0 and batch sizes >= 1")
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    make_policy("uniform", lm.num_layers, PolicyOptions(cost=cfg.cost))  # validates --cost early
    torch.manual_seed(cfg.seed)
    variants = _variants(lm, cfg)
    encoded = [encode_prompt(lm.tokenizer, p) for p in PROMPTS]
    rows = []
    if start:
        start(len(cfg.batch_sizes) * (cfg.repeats + cfg.warmup) * len(variants))
    for batch in cfg.batch_sizes:
        prompts = [encoded[i % len(encoded)] for i in range(batch)]
        for rep in range(-cfg.warmup, cfg.repeats):  # round-robin, so drift hits every variant alike
            for name, (fn, layers) in variants.items():
                _sync(lm.device)
                start = time.perf_counter()
                fn(prompts)
                _sync(lm.device)
                seconds = time.perf_counter() - start
                if rep >= 0:
                    rows.append({"variant": name, "batch_size": batch, "repeat": rep, "layers": layers,
                                 "seconds": seconds, "tokens_per_s": batch * cfg.new_tokens / seconds})
                if progress:
                    progress()
    df = pd.DataFrame(rows)
    summary = summarise(df, cfg)
    rid = run_id(cfg)
    for frame in (df, summary):
        frame.insert(0, "run_id", rid)
    path = None
    if cfg.out:
        for key, value in flat_config(cfg).items():
            df[key] = value
        path = str(write_atomic(df, cfg.out, manifest(cfg, str(lm.device), summary=summary.to_dict("records"))))
    return BenchResult(df, summary, path)


def summarise(df: pd.DataFrame, cfg: BenchConfig) -> pd.DataFrame:
    med = df.groupby(["batch_size", "variant"], sort=False)["tokens_per_s"].median().rename("tokens_per_s_median")
    out = med.reset_index()
    ref = {"full": "hf-generate", f"uniform:{cfg.cost}": f"removed:{cfg.cost}", f"removed:{cfg.cost}": "full",
           "hf-generate": "hf-generate"}
    out["compared_to"] = out["variant"].map(ref)
    lookup = {(b, v): t for b, v, t in zip(out["batch_size"], out["variant"], out["tokens_per_s_median"])}
    out["ratio"] = [t / lookup[(b, c)] for b, c, t in zip(out["batch_size"], out["compared_to"], out["tokens_per_s_median"])]
    out["speedup_vs_full"] = [t / lookup[(b, "full")] for b, t in zip(out["batch_size"], out["tokens_per_s_median"])]
    return out
