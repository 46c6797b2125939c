"""Confidence intervals and the three-valued verdict rule every published finding goes through.

A finding is never "reproduced" from a p-value. It is compared with a claim through a 95% confidence
interval and a stated margin, the smallest difference that matters:

* a directional claim ("A is above B"), for the effect d = A - B with interval [lo, hi]: A is above B by a
  difference that matters. **agrees** when lo >= margin (the whole interval lies at or beyond the margin);
  **disagrees** when hi < margin (the effect is certainly smaller than what matters: the reverse holds, no
  difference, or a significant but negligible one); **inconclusive** otherwise.
* an equivalence claim ("A and B do not differ"): **agrees** when [lo, hi] lies inside [-margin, +margin];
  **disagrees** when it lies wholly beyond the margin on one side; **inconclusive** otherwise. "No
  significant difference" with an interval wider than the margin is therefore inconclusive.
* a value claim ("x is about p"): the same as equivalence, for x - p.

The intervals come from scipy (Student t, Welch) and statsmodels (OLS); bootstrap intervals are
percentile intervals over resampled items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95
OUTCOMES = ("agrees", "disagrees", "inconclusive")


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval over independent units (NaN bounds for fewer than 2)."""
    from scipy.stats import ttest_1samp

    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    if np.ptp(values) == 0:  # no spread: scipy returns NaN; the interval is the point
        return mean, mean, mean
    ci = ttest_1samp(values, 0.0).confidence_interval(level)
    return mean, float(ci.low), float(ci.high)


def proportion_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """A Wilson score interval for a proportion (statsmodels): sensible at 0 and 1, where mean +- z * stderr is not."""
    from statsmodels.stats.proportion import proportion_confint

    if n < 1:
        return math.nan, math.nan
    lo, hi = proportion_confint(successes, n, alpha=1 - level, method="wilson")
    return float(lo), float(hi)


def welch_interval(a, b, level: float = LEVEL) -> tuple[float, float, float]:
    """Difference of means mean(a) - mean(b) of two independent samples, with Welch's interval."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return diff, diff, diff
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return diff, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Verdict:
    """One finding set against one claim: the outcome, the interval it was decided from and why."""

    claim: str  # the paper's claim in words
    outcome: str  # agrees | disagrees | inconclusive
    estimate: float
    lo: float
    hi: float
    margin: float
    unit: str  # what estimate, interval and margin measure
    reason: str
    parts: tuple = field(default_factory=tuple)  # the verdicts this one combines, if any
    preface: str = ""  # why the outcome is not what the intervals alone say (a setup that does not allow judging)

    def interval(self, digits: int = 3) -> str:
        if math.isnan(self.lo):
            return f"{self.estimate:.{digits}f} (no interval)"
        return f"{self.estimate:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def directional(claim: str, estimate: float, lo: float, hi: float, margin: float, unit: str) -> Verdict:
    """The claim: the effect is above zero by a difference that matters (at least `margin`). Agrees when the whole
    interval lies at or above the margin; disagrees when the whole interval lies below it (a tiny but significant
    effect, no effect, or the reverse); inconclusive when the interval straddles the margin."""
    if math.isnan(lo) or math.isnan(hi):
        outcome, why = "inconclusive", "too few units for an interval"
    elif lo >= margin:
        outcome, why = "agrees", f"the interval lies at or above +{margin:g}"
    elif hi < 0:
        outcome, why = "disagrees", "the interval lies below 0: the reverse holds"
    elif hi < margin:
        outcome, why = "disagrees", f"the interval lies below +{margin:g}: no difference that matters"
    else:
        outcome, why = "inconclusive", f"the interval reaches both sides of +{margin:g}"
    return Verdict(claim, outcome, estimate, lo, hi, margin, unit, why)


def equivalent(claim: str, estimate: float, lo: float, hi: float, margin: float, unit: str, target: float = 0.0) -> Verdict:
    """The claim: the effect is `target` (0: no difference), within ±margin."""
    low, high = target - margin, target + margin
    if math.isnan(lo) or math.isnan(hi):
        outcome, why = "inconclusive", "too few units for an interval"
    elif low <= lo and hi <= high:
        outcome, why = "agrees", f"the interval lies inside {target:g} ± {margin:g}"
    elif hi < low or lo > high:
        outcome, why = "disagrees", f"the interval lies wholly outside {target:g} ± {margin:g}"
    else:
        outcome, why = "inconclusive", f"the interval is not inside {target:g} ± {margin:g} and not wholly outside it"
    return Verdict(claim, outcome, estimate, lo, hi, margin, unit, why)


def at_least(claim: str, estimate: float, lo: float, hi: float, bound: float, unit: str, margin: float) -> Verdict:
    """The claim: the value is at least `bound` (a non-inferiority claim, `bound` = the reference minus the margin).
    Agrees when the whole interval lies at or above it, disagrees when the whole interval lies below it."""
    if math.isnan(lo) or math.isnan(hi):
        outcome, why = "inconclusive", "too few units for an interval"
    elif lo >= bound:
        outcome, why = "agrees", f"the interval lies at or above {bound:g}"
    elif hi < bound:
        outcome, why = "disagrees", f"the interval lies below {bound:g}"
    else:
        outcome, why = "inconclusive", f"the interval reaches both sides of {bound:g}"
    return Verdict(claim, outcome, estimate, lo, hi, margin, unit, why)


def combine(claim: str, parts: list[Verdict]) -> Verdict:
    """A claim made at several points holds when it holds at each: any disagreement disagrees, all agreeing agrees."""
    if not parts:
        return Verdict(claim, "inconclusive", math.nan, math.nan, math.nan, math.nan, "", "nothing to compare", ())
    outcomes = [p.outcome for p in parts]
    outcome = "disagrees" if "disagrees" in outcomes else "agrees" if all(o == "agrees" for o in outcomes) else "inconclusive"
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in OUTCOMES if o in outcomes)
    shown = next(p for p in parts if p.outcome == outcome)  # the interval printed: one that decided the outcome
    return Verdict(claim, outcome, shown.estimate, shown.lo, shown.hi, shown.margin, shown.unit,
                   f"{len(parts)} comparison(s): {counts}", tuple(parts))


def ols_effect(y, X, column: int, level: float = LEVEL) -> dict:
    """The coefficient of X[:, column] in an OLS of y on X (X holds the intercept), its interval and dof."""
    import statsmodels.api as sm

    fit = sm.OLS(np.asarray(y, dtype=float), np.asarray(X, dtype=float)).fit()
    dof = int(fit.df_resid)
    coef = float(fit.params[column])
    if dof < 1:
        return {"effect": coef, "lo": math.nan, "hi": math.nan, "std_error": math.nan, "dof": dof,
                "residual_sd": math.nan}
    lo, hi = fit.conf_int(1 - level)[column]
    return {"effect": coef, "lo": float(lo), "hi": float(hi), "std_error": float(fit.bse[column]), "dof": dof,
            "p_value": float(fit.pvalues[column]), "residual_sd": float(np.sqrt(fit.scale))}


def runs_to_resolve(std_error: float, runs: int, estimate: float, margin: float, level: float = LEVEL,
                    params: int = 3) -> int | None:
    """Runs per group (of two) for an equivalence verdict to be reachable: the smallest n for which the effect's
    interval, if the estimate stayed where it is, would fit inside ±margin, i.e.
    t(2n - params) SE sqrt(runs / 2n) <= margin - |estimate|, the standard error shrinking as 1/sqrt(runs) from
    the fitted one (so the covariate's share of it is carried over). A guide, not a power calculation: the estimate
    moves with new runs, so this many runs resolve the question only about half the time. None when the estimate
    is already beyond the margin (more runs would more likely show a difference than rule one out) or no standard
    error could be estimated."""
    from scipy.stats import t

    room = margin - abs(estimate)
    if not std_error == std_error or runs < 1 or room <= 0:
        return None
    for n in range(2, 100_000):
        dof = 2 * n - params
        if dof >= 1 and t.ppf(0.5 + level / 2, dof) * std_error * math.sqrt(runs / (2 * n)) <= room:
            return n
    return None


def bootstrap_interval(statistic, n_items: int, resamples: int = 200, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of statistic(indices) over item resamples with replacement (values that are None skipped)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = statistic(rng.integers(0, n_items, n_items))
        if v is not None:
            values.append(v)
    if len(values) < 2:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def stratified_means(strata: list, resamples: int = 2000, seed: int = 0, weighting: str = "size",
                     chunk: int = 250) -> np.ndarray:
    """Bootstrap replicates of a mean over documents, paired across columns: `strata` holds one array [n_s, P] per
    stratum (a task, or a group's subtask), row = a document, column = its score under each of P points. Each
    replicate resamples every stratum's documents with replacement (the same documents for every column: paired),
    and takes the mean over all documents (`size`: strata weighted by their sizes, a pooled mean) or the mean of
    the strata's means (`equal`). Returns [resamples, P]. numpy draws the multiplicities: a replicate's sums are one
    matrix product per stratum."""
    rng = np.random.default_rng(seed)
    strata = [np.asarray(s, dtype=float) for s in strata]
    out = np.zeros((resamples, strata[0].shape[1]))
    total = sum(len(s) for s in strata)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        acc = np.zeros((b, out.shape[1]))
        for s in strata:
            n = len(s)
            counts = rng.multinomial(n, np.full(n, 1 / n), size=b).astype(float)  # [b, n] multiplicities
            sums = counts @ s
            acc += sums / total if weighting == "size" else sums / n / len(strata)
        out[start : start + b] = acc
    return out


def group_weighting(strata: list, reported: float) -> str:
    """How a result over several strata is averaged, read off the value lm-eval reported for it: `size` (a pooled
    mean over documents, as MMLU's) or `equal` (the mean of the strata's means)."""
    pooled = sum(np.sum(s) for s in strata) / sum(len(s) for s in strata)
    equal = float(np.mean([np.mean(s) for s in strata]))
    return "size" if abs(pooled - reported) <= abs(equal - reported) else "equal"


def paired_test(a, b) -> tuple[str, float]:
    """A paired test of two scores of the same documents: McNemar's exact test when every score is 0 or 1 (the
    discordant pairs), else the Wilcoxon signed-rank test; (name, p). p is 1 when the two agree on every document."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        from statsmodels.stats.contingency_tables import mcnemar

        only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        if only_a + only_b == 0:
            return "McNemar exact", 1.0
        table = [[int(((a == 1) & (b == 1)).sum()), only_a], [only_b, int(((a == 0) & (b == 0)).sum())]]
        return "McNemar exact", float(mcnemar(table, exact=True).pvalue)
    from scipy.stats import wilcoxon

    if np.allclose(a, b):
        return "Wilcoxon signed-rank", 1.0
    return "Wilcoxon signed-rank", float(wilcoxon(a, b).pvalue)


SPARSE_EXPECTED, SPARSE_SHARE = 5, 0.2  # Cochran's rule: chi-square wants at most 20% of cells expecting < 5


def contingency_test(table, resamples: int = 100_000, seed: int = 0) -> dict:
    """Independence of the rows and columns of an r x c table of counts (no empty row or column): Pearson's
    chi-square (scipy: Yates-corrected when 2 x 2). Where more than 20% of cells expect fewer than 5 counts the
    chi-square's p is a poor approximation, and the p reported is an exact conditional one, given both margins:
    Fisher's exact test for a 2 x 2 table, else a Monte-Carlo permutation p of the chi-square statistic (scipy draws
    `resamples` tables with the observed margins, the tables that permuting one margin's labels across the items
    gives, from a generator seeded with `seed`; the p's standard error is at most 0.5 / sqrt(resamples), and it is
    never below 1 / (resamples + 1)). Returns test, statistic, dof, p_value (the test's), p_chi2 (the chi-square
    approximation's) and sparse_cells (the share of cells expecting fewer than 5), plus resamples and seed."""
    from scipy.stats import MonteCarloMethod, chi2_contingency, fisher_exact

    table = np.asarray(table, dtype=np.int64)
    chi2 = chi2_contingency(table)
    sparse = float((chi2.expected_freq < SPARSE_EXPECTED).mean())
    out = {"test": "chi-square", "statistic": float(chi2.statistic), "dof": int(chi2.dof), "p_value": float(chi2.pvalue),
           "p_chi2": float(chi2.pvalue), "sparse_cells": sparse}
    if sparse <= SPARSE_SHARE:
        return out
    if table.shape == (2, 2):  # the statistic shown beside Fisher's p is the Yates-corrected chi-square's
        return out | {"test": "Fisher exact (chi2 with Yates' correction)", "p_value": float(fisher_exact(table).pvalue)}
    # random_table draws (scipy's MonteCarloMethod) sample the permutation distribution directly: cheaper than
    # PermutationMethod's crosstab of every permuted item list, and the same null
    method = MonteCarloMethod(n_resamples=resamples, rng=np.random.default_rng(seed))
    p = float(chi2_contingency(table, correction=False, method=method).pvalue)
    return out | {"test": f"permutation ({resamples:,} resamples, seed {seed})", "p_value": p, "resamples": resamples,
                  "seed": seed}
