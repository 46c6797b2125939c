"""The papers' findings, each set against our runs as **agrees**, **disagrees** or **inconclusive**.

Every function takes the tidy rows a command wrote (so it can be checked on constructed tables) and
returns a `stats.Verdict`: the claim, the outcome, the interval it was decided from, the margin and the
reason. The rules (stats.directional / stats.equivalent) and the margins below are the whole policy;
the report prints them beside each verdict.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from skipbench.analysis.papers import (FLEXI_ORDERS, FLEXI_PAPER, PAPER_MODEL_FAMILY, PAPER_STAR, TALK, TALK_MODEL,
                                      TALK_TASKS)
from skipbench.analysis.stats import Verdict, at_least, combine, directional, equivalent, t_interval, welch_interval

#: the smallest difference that matters, per measure (what "no difference" means in an equivalence test)
MARGINS = {
    "cosine": 0.02,  # cosine similarity of hidden states: differences below 0.02 are within seed-to-seed noise
    "rougeL": 0.05,  # ROUGE-L F1: 5 points, the smallest gap the papers discuss as a change in quality
    "oracle_pct": 5.0,  # percentage points of the layers at which the oracle matches the full model
    "layers": 0.5,  # layers used per token (FlexiDepth usage): half a layer
    "retain_pct": 5.0,  # Retain %: a method keeps the full model's scores when its Retain % is at least 100 - 5
}



MATCHED_WITHIN = 0.5  # a point realizes K skipped layers (and two methods the same skip) within this many layers


def mid_costs(costs, num_layers: int) -> list[int]:
    """The costs nearest L/2 and 2L/3 (the paper's 12 and 16 of 24 layers, scaled to this model), each within L/12
    of its target (2 of 24 layers): a run whose nearest cost lies farther has none there."""
    costs = sorted(set(int(c) for c in costs))
    if not costs:
        return []
    picks = [min(costs, key=lambda c: (abs(c - f * num_layers), c)) for f in (1 / 2, 2 / 3)]
    return sorted({c for c, f in zip(picks, (1 / 2, 2 / 3)) if abs(c - f * num_layers) <= num_layers / 12})


def _paired(per_item: pd.DataFrame, measure: str, a: str, b: str, costs) -> tuple[float, float, float, int]:
    """Mean over items of (a - b), averaged per item over `costs`, with its t-interval (items are the unit: the same
    items run both)."""
    at = per_item[per_item["cost"].isin(list(costs))]
    wide = at.pivot_table(index=["item_id", "cost"], columns="strategy", values=measure)
    if a not in wide or b not in wide:  # one of them was not run at these costs: nothing to pair
        return math.nan, math.nan, math.nan, 0
    d = (wide[a] - wide[b]).dropna().groupby(level="item_id").mean().to_numpy()
    mean, lo, hi = t_interval(d)
    return mean, lo, hi, len(d)


NAMES = {"early-exit": "EE", "uniform": "ULS", "random": "RLS"}
TEACHER_NOTE = ("teacher-forced on the full model's greedy responses; the authors teacher-force the labels "
                "(`cosine --teacher reference`)")


def cosine(rows: pd.DataFrame, num_layers: int, teacher: str = "full") -> list[Verdict]:
    """Fig. 1a and Sec. 3.1 of Glavas et al., from the per-token rows of `cosine` (per-item paired differences):

    * ULS keeps the final hidden state closer to the full model's than EE, and than RLS (directional, at each of the
      costs nearest L/2 and 2L/3), on the state after the final norm (the authors' final hidden state; a file
      without it falls back to the raw state, and says so);
    * EE keeps the layerwise (KV) states closest to the full model's: above ULS and above RLS, each averaged over
      every cost run (directional);
    * at L/2 and 2L/3 ULS matches EE on the layerwise states (equivalence within the cosine margin).
    """
    rows = rows[rows["strategy"].isin(list(NAMES))]  # the paper's three
    final = "cos_final_normed" if "cos_final_normed" in rows.columns else "cos_final"
    per_item = rows.groupby(["strategy", "cost", "item_id"])[[final, "cos_layerwise"]].mean().reset_index()
    have = set(per_item["strategy"])
    mids = mid_costs(per_item["cost"].unique(), num_layers)
    every = sorted(int(c) for c in per_item["cost"].unique())
    margin, unit = MARGINS["cosine"], "cosine"
    state = ("after the final norm" if final == "cos_final_normed"
             else "raw: this file has no post-norm state; rerun `skipbench cosine`")
    teacher_note = "" if teacher == "reference" else f"; {TEACHER_NOTE}"
    out = []

    def at_each(claim, measure, a, b, rule, costs):
        parts = []
        for c in costs:
            mean, lo, hi, n = _paired(per_item, measure, a, b, [c])
            v = rule(claim, mean, lo, hi, margin, unit)
            parts.append(Verdict(claim, v.outcome, mean, lo, hi, margin, unit,
                                 f"at {c} of {num_layers} layers, {n} items: {v.reason}"))
        return combine(claim, parts)

    for other in ("early-exit", "random"):
        if {"uniform", other} <= have:
            claim = f"ULS keeps the final hidden state ({state}) closer to the full model's than {NAMES[other]}"
            v = at_each(claim, final, "uniform", other, directional, mids)
            out.append(replace(v, reason=v.reason + teacher_note))
    parts = []
    claim = "EE keeps the layerwise (KV) states closest to the full model's (averaged over every cost)"
    for other in ("uniform", "random"):
        if {"early-exit", other} <= have:
            mean, lo, hi, n = _paired(per_item, "cos_layerwise", "early-exit", other, every)
            v = directional(claim, mean, lo, hi, margin, unit)
            parts.append(Verdict(claim, v.outcome, mean, lo, hi, margin, unit,
                                 f"EE minus {NAMES[other]} over costs {', '.join(map(str, every))}, {n} items: {v.reason}"))
    if parts:
        out.append(combine(claim, parts))
    if {"uniform", "early-exit"} <= have:
        claim = "at L/2 and 2L/3 ULS matches EE on the layerwise (KV) states"
        out.append(at_each(claim, "cos_layerwise", "uniform", "early-exit", equivalent, mids))
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


def controllers(comparison: dict, exception: dict | None = None) -> list[Verdict]:
    """Sec. 3.2: a hidden-state input gives the skip controllers no advantage over a constant input at matched
    cost (an equivalence claim on the run-level hidden-input effect); App. A.4.3's exception, tested apart: near 16
    of 24 executed layers (2L/3) the hidden state does help (a directional claim on the runs in that window)."""
    out = [_controllers_claim("the hidden-state input gives no advantage over a constant input at matched cost",
                              comparison, equivalent)]
    if exception is not None:
        out.append(_controllers_claim("near 2L/3 executed layers the hidden-state input helps (App. A.4.3's exception)",
                                      exception, directional))
    return out


def _controllers_claim(claim: str, comparison: dict, rule) -> Verdict:
    margin = comparison.get("margin", MARGINS["rougeL"])
    unit = comparison.get("metric", "full_rougeL")
    if "hidden_effect" not in comparison:
        return Verdict(claim, "inconclusive", math.nan, math.nan, math.nan, margin, unit,
                       comparison.get("note", "no comparison was made"))
    v = rule(claim, comparison["hidden_effect"], comparison["lo"], comparison["hi"], margin, unit)
    window = comparison.get("window")
    runs = (f"{comparison['runs']} training runs (dof {comparison['dof']})"
            + (f" at {window[0]:g}-{window[1]:g} executed layers" if window else ""))
    need = comparison.get("runs_needed_per_input")
    more = (f"; if the estimate held, about {need} runs per input would narrow the interval to within ±{margin:g} "
            "(a guide: new runs move the estimate)" if need and v.outcome == "inconclusive" and rule is equivalent else "")
    return Verdict(claim, v.outcome, v.estimate, v.lo, v.hi, margin, unit, f"{v.reason}; {runs}{more}")


def control_line(input_kind: str, c: dict) -> str:
    """One input's controllers against their random controls, in words (the sweep's output and the report), with
    each alpha's after it."""
    def said(c):
        if not c["runs"] > 1:
            return "one run: no interval"
        return ("above the control" if c["lo"] > 0 else "below the control" if c["hi"] < 0
                else "not distinguishable from the control")

    def value(c):
        return f"{c['diff']:+.3f}" + (f" [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c["runs"] > 1 else "")

    alphas = "; ".join(f"alpha {a['alpha']:g}: {value(a)} over {a['runs']} seed(s), {said(a)} ({a['layers']:.2f} vs "
                       f"{a['control_layers']:.2f} layers)" for a in c.get("by_alpha", ()))
    missing = c.get("without_control", 0)
    return (f"{input_kind} controllers vs random-token skipping of the layers they realized "
            f"({c['layers']:.2f} vs {c['control_layers']:.2f} layers per token, pooled over tokens): {c['metric']} "
            f"{value(c)} over {c['runs']} training runs, {said(c)}"
            + (f"; {alphas}" if alphas else "")
            + (f"; {missing} run(s) had no control (every layer run, or fewer than 2)" if missing else ""))


# A router is judged on its orderings only once it trained this much (the paper's routers trained to convergence;
# a router that barely learned routes every subtask alike, and its "disagreement" says nothing about the method).
# Convergence is read off the held-out loss when the run measured one (train --eval-every): the paper's routers saw
# each of their many training items about once, so their training loss stood for their loss on new text; a router
# trained for epochs over a few hundred items keeps lowering its training loss by fitting those items, and only the
# held-out loss says whether more steps would still change how it routes new text.
MIN_EPOCHS = 2.0  # passes over its training items
PLATEAU = 0.02  # the loss levelled off: its mean over the last fifth within 2% of the fifth before it, above or below
# (the held-out loss over the last fifth of its evaluations when recorded, else the training loss over the steps)
MIN_EVALS = 10  # held-out evaluations needed to speak of a plateau (fifths of at least 2)
# With early stopping (train --patience P) the router kept is the lowest held-out loss's, and the plateau is P
# evaluations after it with none lower (`_stopped_early`), P at least MIN_PATIENCE, MIN_EVALS evaluations in all.
MIN_PATIENCE = 3


def trained_enough(training: dict | None) -> tuple[bool, str]:
    """Whether a router's training meets the stated criterion (MIN_EPOCHS and a loss PLATEAU, on the held-out loss
    when recorded; for a run with early stopping, at the router it kept: `_stopped_early`), and why (read off the usage manifest's `router_training`, written from the checkpoint's log)."""
    if not training or "loss_last_fifth" not in training:
        return False, "the router's training log is not recorded (or has fewer than 5 steps)"
    epochs, last, before = training.get("epochs"), training["loss_last_fifth"], training["loss_fifth_before"]
    held = [float(v) for v in training.get("val_loss") or []]
    if held and training.get("kept_step") is not None:
        return _stopped_early(training, held)
    if held:
        return _held_out_plateau(training, held, epochs)
    change = abs(last - before) / abs(before) if before else float("inf")
    if not math.isfinite(change):  # a NaN loss, or none before: no plateau to speak of
        change = float("inf")
    said = (f"{training['steps']} steps, {epochs:.1f} epochs, loss {training['loss_fifth_before']:.3f} -> {last:.3f} "
            f"over the last two fifths ({100 * change:.1f}%)" if epochs is not None else f"{training['steps']} steps")
    if epochs is None or epochs < MIN_EPOCHS:
        return False, f"{said}: fewer than {MIN_EPOCHS:g} epochs"
    if change > PLATEAU:
        return False, f"{said}: the loss has not levelled off (more than {100 * PLATEAU:g}%)"
    return True, said


def _held_out_plateau(training: dict, held: list[float], epochs: float | None) -> tuple[bool, str]:
    steps = [int(s) for s in training.get("val_steps") or range(1, len(held) + 1)]
    said = f"{training['steps']} steps" + (f", {epochs:.1f} epochs" if epochs is not None else "")
    if len(held) < MIN_EVALS:
        return False, f"{said}: {len(held)} held-out evaluation(s), fewer than {MIN_EVALS}"
    if not all(math.isfinite(v) for v in held):
        return False, f"{said}: a held-out loss is not finite"
    fifth = len(held) // 5
    last, before = float(np.mean(held[-fifth:])), float(np.mean(held[-2 * fifth : -fifth]))
    change = (last - before) / abs(before) if before else float("inf")
    said += (f", held-out loss {held[0]:.3f} (step {steps[0]}) -> {held[-1]:.3f} (step {steps[-1]}), mean "
             f"{before:.3f} -> {last:.3f} over the last two fifths of its {len(held)} evaluations ({100 * change:+.1f}%)")
    if epochs is None or epochs < MIN_EPOCHS:
        return False, f"{said}: fewer than {MIN_EPOCHS:g} epochs"
    if change < -PLATEAU:
        return False, f"{said}: the held-out loss has not levelled off (it still fell more than {100 * PLATEAU:g}%)"
    if change > PLATEAU:  # past its best: the router now fits its training items at the cost of new text
        best = int(np.argmin(held))
        return False, (f"{said}: the held-out loss rose more than {100 * PLATEAU:g}% (its lowest, {held[best]:.3f}, "
                       f"at step {steps[best]})")
    return True, f"{said}: the held-out loss levelled off"


def _stopped_early(training: dict, held: list[float]) -> tuple[bool, str]:
    """Early stopping (train --patience P): the router kept is the one of the lowest held-out loss; the loss
    levelled off when P evaluations after it brought no lower one (the run stopped there), not when it ran out of
    steps first. The epochs are counted up to the kept router."""
    steps = [int(s) for s in training.get("val_steps") or range(1, len(held) + 1)]
    kept, patience, epochs = int(training["kept_step"]), training.get("patience"), training.get("kept_epochs")
    if not all(math.isfinite(v) for v in held) or kept not in steps:
        return False, f"{training['steps']} steps: a held-out loss is not finite, or the kept step was not evaluated"
    at = steps.index(kept)
    if held[at] > min(held):
        return False, f"{training['steps']} steps: a held-out loss lower than the kept router's ({held[at]:.3f}) was logged"
    after = len(held) - 1 - at
    said = (f"{training['steps']} steps, held-out loss {held[0]:.3f} (step {steps[0]}) -> lowest {held[at]:.3f} at "
            f"step {kept}" + (f" ({epochs:.1f} epochs)" if epochs is not None else "") + ", the router kept; "
            f"{after} evaluation(s) after it, none lower")
    if epochs is None or epochs < MIN_EPOCHS:
        return False, f"{said}: fewer than {MIN_EPOCHS:g} epochs before the kept router"
    if not patience or after < int(patience):
        return False, f"{said}: fewer than the patience ({patience}), so the loss may still fall"
    if len(held) < MIN_EVALS or after < MIN_PATIENCE:
        return False, (f"{said}: {len(held)} held-out evaluation(s) and a patience of {patience}, fewer than the "
                       f"{MIN_EVALS} and {MIN_PATIENCE} needed to speak of a plateau")
    return True, f"{said} (patience {patience}): the held-out loss levelled off"


def flexidepth(usage: pd.DataFrame, training: dict | None = None) -> list[Verdict]:
    """FlexiDepth's layer usage per subtask: copy < summarize < continue and repeat < sum < product. Items are
    the unit (a response's tokens are not independent): per-item mean layers, Welch intervals between subtasks.
    A router that does not meet the training criterion (`trained_enough`) gives inconclusive verdicts whatever its
    intervals say: its orderings are printed, not judged."""
    per_item = usage.groupby(["subtask", "item_id"])["layers_used"].mean().reset_index()
    enough, why = trained_enough(training)
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
        v = combine(claim, parts)
        if not enough:  # the intervals stay visible; the outcome waits for a router that learned
            said = f"the router does not meet the training criterion ({why}); the intervals alone would say {v.outcome}"
            v = Verdict(claim, "inconclusive", v.estimate, v.lo, v.hi, v.margin, v.unit, f"{said}: {v.reason}",
                        tuple(replace(p, outcome="inconclusive") for p in v.parts), preface=said)
        out.append(v)
    return out




def compare(summary: pd.DataFrame, model: dict | None, tasks: list[str]) -> list[Verdict]:
    """The talk's headline, FlexiDepth keeps the full model's scores with K of 32 layers skipped, as a
    non-inferiority claim on Retain % (at least 100 - margin, the paired bootstrap interval) at each K the run has
    of the talk's 4 and 8; on another model or other tasks the value is printed, not judged (inconclusive)."""
    margin = MARGINS["retain_pct"]
    name = str((model or {}).get("name", "")).lower()
    same = (TALK_MODEL in name.replace("meta-llama/meta-", "") and sorted(tasks) == sorted(TALK_TASKS))
    out = []
    for r in summary[summary["method"].str.partition(":")[0] == "flexidepth"].itertuples():
        if r.skip not in TALK["flexidepth"]:
            continue
        claim = (f"FlexiDepth keeps the full model's scores with {r.skip} layers skipped (the talk: Retain "
                 f"{TALK['flexidepth'][r.skip]}% at {r.skip} of 32)")
        v = at_least(claim, r.retain_pct, r.retain_lo, r.retain_hi, 100 - margin, "Retain %", margin)
        realized = f"realized {r.skipped:.2f} skipped {r.skipped_unit}"
        matched = r.skipped_unit == "layers" and abs(r.skipped - r.skip) <= MATCHED_WITHIN
        if same and not matched:  # the talk's point is K whole layers skipped: another skip is another point
            v = Verdict(claim, "inconclusive", v.estimate, v.lo, v.hi, margin, v.unit,
                        f"the thresholds did not realize {r.skip} skipped layers here ({realized}); the talk's point "
                        f"is {r.skip} layers")
        elif not same:
            v = Verdict(claim, "inconclusive", v.estimate, v.lo, v.hi, margin, v.unit,
                        f"not comparable: the talk's value is for Llama-3-8B-Instruct on {', '.join(TALK_TASKS)}; "
                        f"this is {(model or {}).get('name', 'another model')} on {', '.join(tasks)} ({realized})")
        else:
            v = Verdict(claim, v.outcome, v.estimate, v.lo, v.hi, margin, v.unit, f"{v.reason} ({realized})")
        out.append(v)
    return out


def line(v: Verdict, digits: int = 3) -> str:
    """One Markdown line: the outcome, the claim, each interval it was decided from with why, unit and margin.
    A combined verdict's parts carry their context before the first ': ' of their reason."""
    if v.parts:
        body = "; ".join(f"{ctx}: {p.interval(digits)} — {why}" for p in v.parts for ctx, _, why in [p.reason.partition(": ")])
    else:
        body = f"{v.interval(digits)} — {v.reason}"
    body = f"{v.preface}. {body}" if v.preface else body
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
