"""The papers' findings, each set against our runs as **agrees**, **disagrees** or **inconclusive**.

Every function takes the tidy rows a command wrote (so it can be checked on constructed tables) and
returns a `stats.Verdict`: the claim, the outcome, the interval it was decided from, the margin and the
reason. The rules (stats.directional / stats.equivalent) and the margins below are the whole policy;
the report prints them beside each verdict.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from skipbench.stats import Verdict, combine, directional, equivalent, t_interval, welch_interval

#: the smallest difference that matters, per measure (what "no difference" means in an equivalence test)
MARGINS = {
    "cosine": 0.02,  # cosine similarity of hidden states: differences below 0.02 are within seed-to-seed noise
    "rougeL": 0.05,  # ROUGE-L F1: 5 points, the smallest gap the papers discuss as a change in quality
    "oracle_pct": 5.0,  # percentage points of the layers at which the oracle matches the full model
    "layers": 0.5,  # layers used per token (FlexiDepth usage): half a layer
}

# Glavas et al. Sec. 3.3: the oracle matches the full model at 5.6 of 24 layers on Alpaca, 5.5 on CNN-DM
PAPER_STAR = {"alpaca": 5.6 / 24 * 100, "cnn_dailymail": 5.5 / 24 * 100}
PAPER_MODEL_FAMILY = "opt"  # OPT-IML-1.3B fine-tuned on Alpaca
# FlexiDepth (Luo et al.): layers used, of 32, per subtask, and the orderings they report
FLEXI_PAPER = {"copy": 22.0, "summarize": 28.7, "continue": 30.3, "repeat": 20.1, "sum": 22.5, "product": 23.9}
FLEXI_ORDERS = (("copy", "summarize", "continue"), ("repeat", "sum", "product"))


def mid_costs(costs, num_layers: int) -> list[int]:
    """The costs nearest L/2 and 2L/3: the paper's 12 and 16 of 24 layers, scaled to this model."""
    costs = sorted(set(int(c) for c in costs))
    if not costs:
        return []
    picks = [min(costs, key=lambda c: (abs(c - f * num_layers), c)) for f in (1 / 2, 2 / 3)]
    return sorted(set(picks))


def _paired(per_item: pd.DataFrame, measure: str, a: str, b: str, cost: int) -> tuple[float, float, float, int]:
    """Mean over items of (a - b) at one cost, with its t-interval (items are the unit: the same items run both)."""
    wide = per_item[per_item["cost"] == cost].pivot(index="item_id", columns="strategy", values=measure)
    d = (wide[a] - wide[b]).dropna().to_numpy()
    mean, lo, hi = t_interval(d)
    return mean, lo, hi, len(d)


def cosine(rows: pd.DataFrame, num_layers: int) -> list[Verdict]:
    """Fig. 1a of Glavas et al. at the costs nearest L/2 and 2L/3, from the per-token rows of `cosine`:
    (1) ULS keeps the final hidden state closer to the full model's than EE and than RLS;
    (2) EE keeps the layerwise (KV) states closer than ULS and than RLS — the trade-off."""
    rows = rows[rows["strategy"].isin(["early-exit", "uniform", "random"])]  # the paper's three
    per_item = rows.groupby(["strategy", "cost", "item_id"])[["cos_final", "cos_layerwise"]].mean().reset_index()
    have = set(per_item["strategy"])
    costs = mid_costs(per_item["cost"].unique(), num_layers)
    margin, unit = MARGINS["cosine"], "cosine"
    claims = (("ULS keeps the final hidden state closer to the full model's than {other}", "cos_final", "uniform"),
              ("EE keeps the layerwise (KV) states closer to the full model's than {other}", "cos_layerwise", "early-exit"))
    out = []
    for text, measure, winner in claims:
        for other in ("early-exit", "uniform", "random"):
            if other == winner or not {winner, other} <= have:
                continue
            name = {"early-exit": "EE", "uniform": "ULS", "random": "RLS"}[other]
            claim = text.format(other=name)
            parts = []
            for c in costs:
                mean, lo, hi, n = _paired(per_item, measure, winner, other, c)
                v = directional(claim, mean, lo, hi, margin, unit)
                parts.append(Verdict(claim, v.outcome, mean, lo, hi, margin, unit,
                                     f"at {c} of {num_layers} layers, {n} items: {v.reason}"))
            out.append(combine(claim, parts))
    return out


def oracle(star: float | None, interval, num_layers: int, model: dict | None, datasets: list[str],
           config_means: dict | None = None, full: str | None = None) -> Verdict:
    """Sec. 3.3: the exact oracle matches the full model at 23.3% of the layers (Alpaca; 22.9% on CNN-DM).
    A value claim on the star budget as a share of the depth, within ±5 percentage points, and a value of the
    paper's setup: on another model family or dataset the comparison is inconclusive (the value is printed, not
    judged). When the cheapest configuration alone already scores as well as the full model, the star sits at
    the cheapest cost whatever the oracle does: the comparison has no power and is inconclusive."""
    dataset = next((d for d in datasets if d in PAPER_STAR), "alpaca")
    target = PAPER_STAR[dataset]
    claim = f"the oracle matches the full model at {target:.1f}% of the layers ({dataset})"
    family = (model or {}).get("family")
    papers = family == PAPER_MODEL_FAMILY and dataset in datasets
    setup = ("the paper's setup (an OPT model on " + dataset + ")" if papers
             else f"another setup than the paper's: {(model or {}).get('name', 'an unknown model')} "
                  f"({family or 'unknown family'}) on {', '.join(datasets) or 'unknown data'}")
    margin, unit = MARGINS["oracle_pct"], "% of the layers"
    if star is None:
        return Verdict(claim, "disagrees", math.nan, math.nan, math.nan, margin, unit,
                       f"the oracle never reaches the full model's mean at any budget; {setup}")
    cheapest = _cheapest(config_means or {}, full)
    if cheapest is not None and config_means[cheapest] >= config_means[full]:
        return Verdict(claim, "inconclusive", 100 * star / num_layers, math.nan, math.nan, margin, unit,
                       f"the cheapest configuration ({cheapest}) alone scores as well as the full model "
                       f"({config_means[cheapest]:.3f} vs {config_means[full]:.3f}): nothing for the oracle to trade; {setup}")
    lo, hi = (100 * interval[0] / num_layers, 100 * interval[1] / num_layers) if interval else (math.nan, math.nan)
    v = equivalent(claim, 100 * star / num_layers, lo, hi, margin, unit, target=round(target, 1))
    if not papers:  # a value of OPT on Alpaca says nothing about this model and data
        return Verdict(claim, "inconclusive", v.estimate, v.lo, v.hi, margin, unit,
                       f"not comparable: the paper's value is for OPT on {dataset}, this is {setup}")
    return Verdict(claim, v.outcome, v.estimate, v.lo, v.hi, margin, unit, f"{v.reason}; {setup}")


def _cheapest(config_means: dict, full: str | None) -> str | None:
    """The configuration with the fewest layers, read from labels `policy:cost` (None when a cost is unreadable)."""
    if full not in config_means:
        return None
    try:
        return min(config_means, key=lambda label: float(label.rpartition(":")[2]))
    except ValueError:
        return None


def controllers(comparison: dict) -> Verdict:
    """Sec. 3.2: a hidden-state input gives the skip controllers no advantage over a constant input at matched
    cost. An equivalence claim on the run-level hidden-input effect."""
    claim = "the hidden-state input gives no advantage over a constant input at matched cost"
    margin = comparison.get("margin", MARGINS["rougeL"])
    unit = comparison.get("metric", "full_rougeL")
    if "hidden_effect" not in comparison:
        return Verdict(claim, "inconclusive", math.nan, math.nan, math.nan, margin, unit,
                       comparison.get("note", "no comparison was made"))
    v = equivalent(claim, comparison["hidden_effect"], comparison["lo"], comparison["hi"], margin, unit)
    runs = f"{comparison['runs']} training runs (dof {comparison['dof']})"
    need = comparison.get("runs_needed_per_input")
    more = (f"; if the estimate held, about {need} runs per input would narrow the interval to within ±{margin:g} "
            "(a guide: new runs move the estimate)" if need and v.outcome == "inconclusive" else "")
    return Verdict(claim, v.outcome, v.estimate, v.lo, v.hi, margin, unit, f"{v.reason}; {runs}{more}")


def flexidepth(usage: pd.DataFrame) -> list[Verdict]:
    """FlexiDepth's layer usage per subtask: copy < summarize < continue and repeat < sum < product. Items are
    the unit (a response's tokens are not independent): per-item mean layers, Welch intervals between subtasks."""
    per_item = usage.groupby(["subtask", "item_id"])["layers_used"].mean().reset_index()
    out = []
    for order in FLEXI_ORDERS:
        claim = " < ".join(order) + " (layers used per token)"
        if not all(s in set(per_item["subtask"]) for s in order):
            out.append(Verdict(claim, "inconclusive", math.nan, math.nan, math.nan, MARGINS["layers"], "layers",
                               "some of these subtasks were not run"))
            continue
        parts = []
        for a, b in zip(order, order[1:]):
            diff, lo, hi = welch_interval(per_item.loc[per_item["subtask"] == b, "layers_used"],
                                          per_item.loc[per_item["subtask"] == a, "layers_used"])
            v = directional(claim, diff, lo, hi, MARGINS["layers"], "layers")
            parts.append(Verdict(claim, v.outcome, diff, lo, hi, v.margin, v.unit, f"{b} minus {a}: {v.reason}"))
        out.append(combine(claim, parts))
    return out


def line(v: Verdict, digits: int = 3) -> str:
    """One Markdown line: the outcome, the claim, each interval it was decided from with why, unit and margin.
    A combined verdict's parts carry their context before the first ': ' of their reason."""
    if v.parts:
        body = "; ".join(f"{ctx}: {p.interval(digits)} — {why}" for p in v.parts for ctx, _, why in [p.reason.partition(": ")])
    else:
        body = f"{v.interval(digits)} — {v.reason}"
    return f"**{v.outcome}** — {v.claim}: {body} ({v.unit}; 95% intervals; margin ±{v.margin:g})."


def per_subtask(usage: pd.DataFrame) -> pd.DataFrame:
    """Mean layers used per subtask with a 95% interval over items, beside the paper's numbers."""
    per_item = usage.groupby(["subtask", "item_id"])["layers_used"].mean().reset_index()
    rows = []
    for subtask, g in per_item.groupby("subtask"):
        mean, lo, hi = t_interval(g["layers_used"].to_numpy())
        rows.append({"subtask": subtask, "items": len(g), "tokens": int((usage["subtask"] == subtask).sum()),
                     "layers": mean, "lo": lo, "hi": hi, "paper_of_32": FLEXI_PAPER.get(subtask, np.nan)})
    return pd.DataFrame(rows).sort_values("layers").reset_index(drop=True)
