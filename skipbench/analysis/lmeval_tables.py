"""lm-eval results as tables, from written rows (no model): each task's main metric per policy point with its 95%
interval (`summarise`), and, from the per-document scores, each point against full depth on the same documents
(`with_paired_tests`: a paired bootstrap interval and McNemar's or Wilcoxon's test); `strata` pairs the documents
behind one result across points (compare's paired Retain % resamples them too)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from skipbench.analysis.stats import group_weighting, paired_test, proportion_interval, stratified_means

NOISY_CV = 0.2  # a ratio whose denominator (the full model's score) varies this much across replicates is noisy


MAIN_METRICS = ("acc", "exact_match", "rougeL", "acc_norm", "word_perplexity")  # the first a task has is its main one


# what a policy records of how it was built (Policy.point_record: LaCo's merges), carried from lm-eval's rows into
# every summary and comparison row (a policy that records another column registers it here; a test checks)
POINT_COLUMNS = ("laco_rdsc", "laco_below_threshold", "laco_forced_merges")
CONTROL = "random control of "  # compare --matched-random: a control's method name, this + the router's


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Each task's main metric per point (the first of MAIN_METRICS it reports, else its first metric; its `none` or
    `strict-match` filter, else its first), with a 95% interval."""
    if rows.empty:
        return rows
    keep = []
    for task, g in rows.groupby("task", sort=False):
        metrics = list(dict.fromkeys(g["metric"]))
        main = next((m for m in MAIN_METRICS if m in metrics), metrics[0])
        g = g[g["metric"] == main]
        filters = list(dict.fromkeys(g["filter"]))  # GSM8K: strict-match and flexible-extract; one is shown
        keep.append(g[g["filter"] == next((f for f in ("none", "strict-match") if f in filters), filters[0])])
    out = pd.concat(keep).reset_index(drop=True)
    bounds = [interval(r.metric, r.value, r.stderr, r.n, r.group) for r in out.itertuples()]
    out["lo"], out["hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    if "attention_mean" not in out:  # runs before it existed: unrecorded
        out["attention_mean"] = math.nan
    if "top" not in out:  # runs before it existed: every task as asked for
        out["top"] = True
    return out[["task", "metric", "filter", "policy_spec", "cost", "layers_mean", "attention_mean", "value", "stderr",
                "lo", "hi", "n", "top", *(c for c in POINT_COLUMNS if c in out)]]


def strata(docs: pd.DataFrame, task: str, metric: str, filt: str, points: list[str]) -> list[np.ndarray]:
    """The per-document scores behind one result, paired across points: one array [documents, points] per task it
    averages (a group: each of its tasks; a task: itself), over the documents every point scored."""
    d = docs[(docs["metric"] == metric) & (docs["filter"] == filt) & docs["policy_spec"].isin(points)]
    d = d[(d["of"] == task) & (d["task"] != task)] if ((d["of"] == task) & (d["task"] != task)).any() else d[d["task"] == task]
    wide = d.pivot_table(index=["task", "doc_id"], columns="policy_spec", values="value", aggfunc="first")
    wide = wide.reindex(columns=points).dropna()
    return [g.to_numpy() for _, g in wide.groupby(level="task", sort=True)]


RESAMPLES = 2000  # bootstrap replicates of the paired intervals


def with_paired_tests(summary: pd.DataFrame, docs: pd.DataFrame) -> pd.DataFrame:
    """Each point's result beside full depth's on the same documents: the paired difference with a 95% bootstrap
    interval (documents resampled within each task, `RESAMPLES` replicates) and a paired test's p (McNemar's exact
    test for 0/1 scores, else Wilcoxon's signed-rank test)."""
    if summary.empty:
        return summary
    full = summary[summary["policy_spec"] == "full"].set_index("task")
    extra = []
    for r in summary.itertuples():
        if r.policy_spec == "full" or r.task not in full.index:
            extra.append({})
            continue
        parts = strata(docs, r.task, r.metric, r.filter, [r.policy_spec, "full"])
        if not parts:
            extra.append({})
            continue
        weighting = group_weighting([p[:, 1] for p in parts], float(full.loc[r.task, "value"])) if len(parts) > 1 else "size"
        reps = stratified_means(parts, RESAMPLES, weighting=weighting)
        stacked = np.concatenate(parts)
        test, p = paired_test(stacked[:, 0], stacked[:, 1])
        lo, hi = np.quantile(reps[:, 0] - reps[:, 1], [0.025, 0.975])
        extra.append({"diff_vs_full": float(r.value - full.loc[r.task, "value"]), "diff_lo": float(lo),
                      "diff_hi": float(hi), "p_vs_full": p, "paired_test": test, "paired_docs": len(stacked)})
    return pd.concat([summary.reset_index(drop=True), pd.DataFrame(extra, index=range(len(summary)))], axis=1)


BINARY = ("acc", "acc_norm", "exact_match")  # a mean of 0/1 per document


def interval(metric: str, value: float, stderr: float, n: int, group: bool = False) -> tuple[float, float]:
    """A 95% interval: Wilson for a task's proportion of documents (binary metrics), else (other metrics, and a
    group's mean of its tasks' means) value +- 1.96 lm-eval's stderr."""
    if metric in BINARY and n and not group:
        return proportion_interval(round(value * n), int(n))
    return value - 1.96 * stderr, value + 1.96 * stderr
