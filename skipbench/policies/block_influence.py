"""`block-influence:C`: static pruning after Men et al. (ShortGPT, 2024).

Block influence of layer l: BI_l = 1 - E_{X,t}[cos(h_l, h_{l+1})], the expectation over every token of the
calibration sequences (policies/calibration.py: the dataset's train split, `calibration` items). The C layers with
the highest BI run; the others are removed (ties go to the earlier layer).

h_L, after the last layer, is the raw residual stream, so the last layer's BI is 1 - E cos(h_{L-1}, h_L). The
authors' code (github.com/icip-cas/ShortGPT, shortgpt/shortgpt.py `compute_bi`, commit 9a2ee8dfe9e2 of 2025-05-30)
reads HF `output_hidden_states`, whose last entry is the state through the model's final norm, so its last-layer BI is
1 - E cos(h_{L-1}, norm(h_L)) (the norm's weight turns the direction); the other layers' BI agree. The unofficial
sramshetty/ShortGPT (short_gpt/short_llama.py) takes h_L before the norm, as here. Their calibration: 256-token
windows of PG19 validation texts, each run on its own, BI summed over tokens.
"""

from __future__ import annotations

import numpy as np

from skipbench.policies.calibration import similarities
from skipbench.policies.static import plan_policy


def influence(spec, ctx) -> np.ndarray:
    """BI of every layer, [L]."""
    sims = similarities(ctx, spec.opt("calibration"), spec.opt("calibration-tokens"), spec.opt("calibration-seed"))
    return 1.0 - np.diagonal(sims.cos, offset=1)


def plan(spec, ctx) -> list[int]:
    order = np.argsort(-influence(spec, ctx), kind="stable")  # highest first; the earlier layer on ties
    return sorted(order[: spec.int_arg()].tolist())


def explain(spec, ctx) -> list[dict]:
    bi = influence(spec, ctx)
    rank = np.empty(len(bi), dtype=int)
    rank[np.argsort(-bi, kind="stable")] = np.arange(1, len(bi) + 1)
    return [{"layer": l, "block_influence": float(bi[l]), "rank": int(rank[l]), "kept": bool(rank[l] <= spec.int_arg())}
            for l in range(len(bi))]


build = plan_policy(plan)
