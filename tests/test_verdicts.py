"""Every verdict function on constructed tables: agrees, disagrees and inconclusive, for the reason stated."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from skipbench.analysis import stats
from skipbench.analysis import verdicts
from skipbench.experiments.controllers import compare_inputs


def test_rules():
    d = stats.directional
    assert d("c", 1.0, 0.5, 1.5, 0.1, "u").outcome == "agrees"
    assert d("c", -1.0, -1.5, -0.5, 0.1, "u").outcome == "disagrees"
    assert d("c", 0.0, -0.05, 0.05, 0.1, "u").outcome == "disagrees"  # equivalent: no difference that matters
    assert d("c", 0.0, -0.5, 0.5, 0.1, "u").outcome == "inconclusive"  # not significant, not equivalent either
    assert d("c", 0.001, 0.0005, 0.0015, 0.02, "u").outcome == "disagrees"  # significant, but too small to matter
    # the docstring's rule: above zero by a difference that matters, so a significant effect whose interval reaches
    # below the margin is not yet agreement
    assert d("c", 0.05, 0.01, 0.09, 0.02, "u").outcome == "inconclusive"
    assert d("c", 0.05, 0.02, 0.09, 0.02, "u").outcome == "agrees"
    assert d("c", -0.1, -0.5, 0.01, 0.02, "u").outcome == "disagrees"  # certainly below the margin
    assert d("c", 0.0, math.nan, math.nan, 0.1, "u").outcome == "inconclusive"
    e = stats.equivalent
    assert e("c", 0.01, -0.02, 0.04, 0.05, "u").outcome == "agrees"
    assert e("c", 0.2, 0.1, 0.3, 0.05, "u").outcome == "disagrees"
    assert e("c", -0.2, -0.3, -0.1, 0.05, "u").outcome == "disagrees"
    assert e("c", 0.0, -0.3, 0.3, 0.05, "u").outcome == "inconclusive"  # "no significant difference", too wide
    assert e("c", 0.04, 0.01, 0.07, 0.05, "u").outcome == "inconclusive"  # significant, yet partly within the margin
    assert e("c", 24, 20, 27, 5, "%", target=23.3).outcome == "agrees"
    parts = [d("c", 1, 0.5, 1.5, 0.1, "u"), d("c", 0, -1, 1, 0.1, "u")]
    assert stats.combine("c", parts).outcome == "inconclusive"
    assert stats.combine("c", parts + [d("c", -1, -2, -0.5, 0.1, "u")]).outcome == "disagrees"
    assert stats.combine("c", parts[:1] * 2).outcome == "agrees"


def test_intervals_match_scipy():
    import scipy.stats

    a, b = np.array([1.0, 2.0, 4.0, 3.5]), np.array([0.5, 0.2, 1.1, 0.9, 0.4])
    _, lo, hi = stats.welch_interval(a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert (lo, hi) == pytest.approx((ref.low, ref.high))
    assert stats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def _cosine_rows(uls_minus_ee: float, noise: float, n: int = 40, seed: int = 0, uls_layerwise: float = 0.6,
                 normed: bool = True) -> pd.DataFrame:
    """Per-token cosine rows at costs 5 and 7 of 10 layers: ULS's final cosine (after the norm) = EE's + the given
    shift; the raw final cosine is the reverse, so a verdict read off the wrong column shows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = rng.uniform(0.3, 0.6)
        for cost in (5, 7):
            for strategy, final, layerwise in (("early-exit", base, 0.9), ("uniform", base + uls_minus_ee, uls_layerwise),
                                               ("random", base - 0.1, 0.7)):
                value = final + rng.normal(0, noise)
                rows.append({"item_id": f"i{i}", "strategy": strategy, "cost": cost, "seed": 0, "token": 0,
                             "cos_final": value if not normed else 1 - value,
                             **({"cos_final_normed": value} if normed else {}),
                             "cos_layerwise": layerwise + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


FINAL = "ULS keeps the final hidden state (after the final norm) closer to the full model's than EE"
LAYERWISE = "EE keeps the layerwise (KV) states closest to the full model's (averaged over every cost)"
MATCH = "at L/2 and 2L/3 ULS matches EE on the layerwise (KV) states"


@pytest.mark.parametrize("shift, noise, outcome", [(0.3, 0.02, "agrees"), (-0.3, 0.02, "disagrees"),
                                                   (0.0, 0.002, "disagrees"), (0.02, 0.4, "inconclusive")])
def test_cosine_final_state_claim(shift, noise, outcome):
    found = {v.claim: v for v in verdicts.cosine(_cosine_rows(shift, noise), 10)}
    v = found[FINAL]
    assert v.outcome == outcome, verdicts.line(v)
    assert len(v.parts) == 2 and "at 5 of 10 layers" in v.parts[0].reason and "at 7 of 10 layers" in v.parts[1].reason
    assert "the authors teacher-force the labels" in v.reason  # the teacher differs from the paper's: said
    assert "the authors" not in verdicts.cosine(_cosine_rows(shift, noise), 10, teacher="reference")[0].reason
    # random skipping is compared too, and EE's layerwise advantage over both, averaged over the costs
    assert found[LAYERWISE].outcome == "agrees" and len(found[LAYERWISE].parts) == 2
    assert "over costs 5, 7" in found[LAYERWISE].parts[0].reason
    assert "ULS keeps the final hidden state (after the final norm) closer to the full model's than RLS" in found


def test_cosine_final_state_falls_back_to_the_raw_state_and_says_so():
    found = verdicts.cosine(_cosine_rows(0.3, 0.02, normed=False), 10)
    assert "raw: this file has no post-norm state" in found[0].claim and found[0].outcome == "agrees"


@pytest.mark.parametrize("uls_layerwise, outcome", [(0.6, "disagrees"), (0.9, "agrees")])
def test_uls_matching_ee_layerwise_is_an_equivalence_claim(uls_layerwise, outcome):
    """Sec. 3.1: at L/2 and 2L/3 ULS *matches* EE on the layerwise states; an EE advantage of 0.3 disagrees with
    that (the old verdict tested EE > ULS there and called it agreement), equal states agree."""
    found = {v.claim: v for v in verdicts.cosine(_cosine_rows(0.3, 0.02, uls_layerwise=uls_layerwise), 10)}
    v = found[MATCH]
    assert v.outcome == outcome and v.margin == verdicts.MARGINS["cosine"] and len(v.parts) == 2


def test_mid_costs_scale_the_papers_12_and_16_of_24():
    assert verdicts.mid_costs([4, 8, 12, 16, 20, 24], 24) == [12, 16]
    assert verdicts.mid_costs([6, 10, 15, 20, 25], 30) == [15, 20]


@pytest.mark.parametrize("star, interval, outcome", [(7.0, (6.5, 7.6), "agrees"), (24.8, (22.0, 27.0), "disagrees"),
                                                     (8.0, (4.0, 14.0), "inconclusive"), (None, None, "disagrees")])
def test_oracle_claim(star, interval, outcome):
    opt = {"name": "opt-iml-1.3b", "family": "opt", "num_layers": 30}
    v = verdicts.oracle(star, interval, 30, opt, ["alpaca"])
    assert v.outcome == outcome and v.margin == 5.0
    assert "the paper's setup" in v.reason


def test_oracle_without_power_is_inconclusive():
    """Every configuration scores 0 (a random model): the cheapest one 'matches' full depth trivially."""
    v = verdicts.oracle(5.0, (5.0, 5.0), 24, None, ["alpaca"], {"uniform:5": 0.0, "full:24": 0.0}, "full:24")
    assert v.outcome == "inconclusive" and "nothing for the oracle to trade" in v.reason
    opt = {"name": "opt-iml-1.3b", "family": "opt", "num_layers": 24}
    v = verdicts.oracle(5.6, (5.0, 6.3), 24, opt, ["alpaca"], {"uniform:5": 0.1, "full:24": 0.4}, "full:24")
    assert v.outcome == "agrees"
    # the cheapest configuration by its cost, not the one with the lowest score
    means = {"uniform:12": 0.1, "uniform:4": 0.45, "full:24": 0.4}
    v = verdicts.oracle(4.0, (4.0, 4.0), 24, opt, ["alpaca"], means, "full:24")
    assert v.outcome == "inconclusive" and "(uniform:4)" in v.reason


def test_oracle_setup_comes_from_the_model_record_not_from_names():
    """The old verdict looked for the substring 'opt' in the config JSON; a path like /opt/... matched."""
    llama = {"name": "/opt/models/llama", "family": "llama", "num_layers": 30}
    v = verdicts.oracle(7.0, (6.5, 7.6), 30, llama, ["alpaca"])
    assert "another setup" in v.reason and "llama" in v.reason
    assert v.outcome == "inconclusive" and "not comparable" in v.reason  # a value of OPT on Alpaca, not of Llama
    assert verdicts.oracle(7.0, (6.5, 7.6), 30, None, ["text"]).reason.endswith("unknown family) on text")


def _runs(effect: float, spread: float, seeds: int, seed: int = 0) -> pd.DataFrame:
    """Item rows of controller runs: full_rougeL = 0.02 * layers + effect * hidden + run noise + item noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for input_kind in ("hidden", "constant"):
        for alpha in (2.0, 10.0):
            for s in range(seeds):
                layers = 25 - alpha / 2 + rng.normal(0, 0.5)
                run_level = 0.02 * layers + effect * (input_kind == "hidden") + rng.normal(0, spread)
                for i in range(10):
                    rows.append({"input": input_kind, "alpha": alpha, "seed": s, "item_id": f"i{i}",
                                 "layers_mean": layers + rng.normal(0, 0.1), "full_rougeL": run_level + rng.normal(0, 0.05)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("effect, spread, seeds, outcome", [(0.0, 0.004, 6, "agrees"), (0.3, 0.004, 6, "disagrees"),
                                                            (0.0, 0.06, 2, "inconclusive"), (-0.3, 0.004, 6, "disagrees")])
def test_controllers_claim(effect, spread, seeds, outcome):
    c = compare_inputs(_runs(effect, spread, seeds))
    (v,) = verdicts.controllers(c)
    assert v.outcome == outcome, verdicts.line(v)
    assert c["runs"] == 2 * 2 * seeds and c["dof"] == c["runs"] - 3  # runs are the unit, not items
    if outcome == "inconclusive":
        assert c["runs_needed_per_input"] > seeds and "runs per input" in v.reason


def test_the_a43_exception_is_tested_on_the_runs_near_two_thirds_apart():
    """App. A.4.3: near 16 of 24 executed layers the hidden state helps. Planted: the runs at alpha 10 execute about
    20 of 30 layers (2L/3 = 20, window 17.5-22.5), those at alpha 2 about 24, outside it; a hidden-input effect of
    +0.2 agrees with the exception's directional claim, no effect disagrees, and the main claim is tested over all."""
    from skipbench.experiments.controllers import exception_window

    assert exception_window(24) == (14, 18) and exception_window(30) == (17.5, 22.5)
    for effect, outcome in ((0.2, "agrees"), (0.0, "disagrees")):
        runs = _runs(effect, 0.004, 6)
        exception = compare_inputs(runs, window=exception_window(30))
        assert exception["runs"] == 2 * 6 and exception["window"] == (17.5, 22.5)  # the alpha 10 runs only
        main, near = verdicts.controllers(compare_inputs(runs), exception)
        assert near.outcome == outcome and "App. A.4.3" in near.claim and "at 17.5-22.5 executed layers" in near.reason


def test_not_significant_is_not_agreement():
    """1 seed x 2 alphas x 2 inputs: the old code said 'reproduced' whenever p >= 0.05, however wide the interval."""
    c = compare_inputs(_runs(0.0, 0.03, 1))
    (v,) = verdicts.controllers(c)
    assert c["p_value"] > 0.05 and c["hi"] - c["lo"] > 2 * c["margin"]
    assert v.outcome == "inconclusive" and "(dof 1)" in v.reason


def _usage(means: dict, spread: float, items: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for subtask, mean in means.items():
        for i in range(items):
            item_mean = mean + rng.normal(0, spread)
            for t in range(5):
                rows.append({"item_id": f"{subtask}{i}", "subtask": subtask, "layers_used": item_mean + rng.normal(0, 0.2)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("means, spread, outcome", [
    ({"copy": 20, "summarize": 24, "continue": 27}, 0.5, "agrees"),
    ({"copy": 27, "summarize": 24, "continue": 20}, 0.5, "disagrees"),
    ({"copy": 22, "summarize": 22.05, "continue": 22.1}, 0.05, "disagrees"),  # equal within half a layer
    ({"copy": 20, "summarize": 20.5, "continue": 21}, 3.0, "inconclusive"),
])
def test_flexidepth_orderings(means, spread, outcome):
    trained = {"steps": 600, "epochs": 4.0, "loss_first": 3.0, "loss_last_fifth": 1.00, "loss_fifth_before": 1.01}
    found = verdicts.flexidepth(_usage(means, spread), trained)
    text = next(v for v in found if v.claim.startswith("copy < summarize"))
    assert text.outcome == outcome, verdicts.line(text)
    arith = next(v for v in found if v.claim.startswith("repeat < sum"))
    assert arith.outcome == "inconclusive" and "not run" in arith.reason


@pytest.mark.parametrize("training, why", [
    (None, "not recorded"),
    ({"steps": 60, "epochs": 0.9, "loss_first": 3.0, "loss_last_fifth": 1.0, "loss_fifth_before": 1.0}, "fewer than 2 epochs"),
    ({"steps": 600, "epochs": 5.0, "loss_first": 3.0, "loss_last_fifth": 1.0, "loss_fifth_before": 1.2}, "not levelled off"),
])
def test_a_router_that_barely_learned_is_not_judged(training, why):
    """The orderings of a router that does not meet the training criterion are inconclusive, whatever the data say
    (a 60-step router gave the old page's 'disagrees'); the reason names the criterion and what the data would say."""
    found = verdicts.flexidepth(_usage({"copy": 27, "summarize": 24, "continue": 20}, 0.5), training)
    text = next(v for v in found if v.claim.startswith("copy < summarize"))
    assert text.outcome == "inconclusive" and why in text.reason and "would say disagrees" in text.reason
    assert why in verdicts.line(text) and "training criterion" in verdicts.line(text)  # the report says why


def test_line_prints_interval_margin_and_reason():
    (v,) = verdicts.controllers(compare_inputs(_runs(0.0, 0.004, 6)))
    text = verdicts.line(v)
    assert text.startswith("**agrees**") and "margin ±0.05" in text and "[" in text and "runs" in text


def test_runs_to_resolve_scales_the_fitted_standard_error_and_leaves_room_for_the_estimate():
    import scipy.stats

    se, runs, est, margin = 0.03, 4, 0.01, 0.05
    n = stats.runs_to_resolve(se, runs, est, margin)
    half = lambda k: scipy.stats.t.ppf(0.975, 2 * k - 3) * se * (runs / (2 * k)) ** 0.5  # noqa: E731
    assert half(n) <= margin - est < half(n - 1)  # the interval around 0.01 then fits inside ±0.05
    assert stats.runs_to_resolve(se, runs, 0.0, margin) < n  # an estimate nearer 0 needs fewer runs
    assert stats.runs_to_resolve(se, runs, 0.06, margin) is None  # beyond the margin: no number of runs shows equivalence
    assert stats.runs_to_resolve(float("nan"), runs, 0.0, margin) is None


def test_mid_costs_lie_near_their_targets_or_are_not_there():
    assert verdicts.mid_costs([6, 10, 15, 20, 25], 30) == [15, 20]
    assert verdicts.mid_costs([2, 4], 30) == []  # 4 of 30 is neither L/2 nor 2L/3: no claim is judged there
    assert verdicts.mid_costs([14, 4], 30) == [14]


def test_a_strategy_missing_at_a_cost_gives_no_interval_not_a_crash():
    """cosine's per-strategy points can leave EE without the cost ULS ran: that comparison is inconclusive."""
    rows = _cosine_rows(0.3, 0.02)
    rows = rows[~((rows["strategy"] == "early-exit") & (rows["cost"] == 5))]
    found = {v.claim: v for v in verdicts.cosine(rows, 10)}
    assert found[FINAL].outcome == "inconclusive"


HELD = {"steps": 600, "epochs": 5.0, "loss_first": 3.0, "loss_last_fifth": 0.5, "loss_fifth_before": 0.7}
FALLING = [2.0, 1.8, 1.6, 1.5, 1.4, 1.3]  # then the last two fifths (2 evaluations each of 10)


@pytest.mark.parametrize("tail, ok, why", [
    ([1.00, 1.02, 1.01, 0.99], True, "levelled off"),  # mean 1.01 -> 1.00: the training loss's 29% fall is not read
    ([1.00, 0.96, 0.95, 0.93], False, "has not levelled off"),  # 0.98 -> 0.94, -4.1%
    ([0.90, 0.95, 1.00, 1.05], False, "rose more than 2% (its lowest, 0.900, at step 420)"),  # 0.925 -> 1.025
    ([1.00, 1.20, 0.99, 0.98], False, "has not levelled off"),  # a bump is averaged, not taken as a plateau
])
def test_a_held_out_loss_decides_convergence_when_recorded(tail, ok, why):
    held = FALLING + tail
    training = {**HELD, "val_loss": held, "val_steps": [60 * (i + 1) for i in range(len(held))]}
    got, said = verdicts.trained_enough(training)
    assert got is ok and why in said, said
    found = verdicts.flexidepth(_usage({"copy": 20, "summarize": 24, "continue": 27}, 0.5), training)
    text = next(v for v in found if v.claim.startswith("copy < summarize"))
    assert text.outcome == ("agrees" if ok else "inconclusive")


@pytest.mark.parametrize("training, why", [
    ({**HELD, "epochs": 1.5, "val_loss": FALLING[:2] + [1.0] * 8}, "fewer than 2 epochs"),
    ({**HELD, "val_loss": [1.0] * 9}, "fewer than 10"),
    ({**HELD, "val_loss": FALLING + [1.0, float("nan"), 1.0, 1.0]}, "not finite"),
])
def test_a_held_out_plateau_still_needs_epochs_evaluations_and_numbers(training, why):
    got, said = verdicts.trained_enough(training)
    assert not got and why in said, said


STOPPED = [2.0, 1.5, 1.3, 1.2, 1.15, 1.1, 1.05, 1.1, 1.2, 1.3]  # lowest at the 7th evaluation (step 420), 3 after


@pytest.mark.parametrize("change, ok, why", [
    ({}, True, "lowest 1.050 at step 420 (2.5 epochs), the router kept; 3 evaluation(s) after it, none lower (patience 3)"),
    ({"patience": 4}, False, "fewer than the patience (4), so the loss may still fall"),  # ran out of steps first
    ({"kept_epochs": 1.5}, False, "fewer than 2 epochs before the kept router"),
    ({"val_loss": STOPPED[:8] + [float("nan"), 1.3]}, False, "not finite"),
    ({"kept_step": 450}, False, "the kept step was not evaluated"),
    ({"val_loss": STOPPED[:9] + [1.0]}, False, "a held-out loss lower than the kept router's (1.050) was logged"),
    ({"val_loss": STOPPED[2:], "val_steps": [60 * (i + 1) for i in range(8)], "kept_step": 300}, False,
     "8 held-out evaluation(s)"),  # fewer than MIN_EVALS
    ({"val_loss": STOPPED[:9], "val_steps": [60 * (i + 1) for i in range(9)] , "patience": 2}, False,
     "a patience of 2"),  # the 9 evaluations also fall short, and a patience of 2 is too short to speak of a plateau
])
def test_an_early_stopped_router_is_judged_at_the_router_it_kept(change, ok, why):
    """With --patience the criterion is the stop itself: the kept router's epochs, and P evaluations after it with
    none lower (P >= 3, 10 evaluations in all). A rising tail, which the fifths rule would fault as "rose", does not
    count against a stopped run: its router is the one before the rise."""
    training = {**HELD, "steps": 600, "val_loss": STOPPED, "val_steps": [60 * (i + 1) for i in range(10)],
                "kept_step": 420, "patience": 3, "kept_epochs": 2.5, **change}
    got, said = verdicts.trained_enough(training)
    assert got is ok and why in said, said
    if ok:  # the same losses without the stop: the fifths rule sees the rise
        plain = {k: v for k, v in training.items() if k not in ("kept_step", "patience", "kept_epochs")}
        assert not verdicts.trained_enough(plain)[0]


def test_a_nan_loss_is_no_plateau():
    ok, why = verdicts.trained_enough({"steps": 600, "epochs": 5.0, "loss_first": 3.0, "loss_last_fifth": float("nan"),
                                       "loss_fifth_before": 1.0})
    assert not ok and "levelled off" in why


def test_the_talks_claim_is_judged_only_where_k_layers_were_skipped():
    from skipbench.analysis.papers import TALK_MODEL, TALK_TASKS

    def summary(skipped, unit="layers"):
        return pd.DataFrame([{"method": "flexidepth:runs/f", "skip": 4, "retain_pct": 101.0, "retain_lo": 97.0,
                              "retain_hi": 105.0, "skipped": skipped, "skipped_unit": unit}])

    model = {"name": f"meta-llama/Meta-{TALK_MODEL}"}
    (v,) = verdicts.compare(summary(4.2), model, list(TALK_TASKS))
    assert v.outcome == "agrees"
    (v,) = verdicts.compare(summary(4.8), model, list(TALK_TASKS))
    assert v.outcome == "inconclusive" and "did not realize 4" in v.reason
    (v,) = verdicts.compare(summary(4.2), {"name": "smollm2-135m"}, ["skipbench_choice"])
    assert v.outcome == "inconclusive" and "not comparable" in v.reason
