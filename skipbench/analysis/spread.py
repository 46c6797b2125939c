"""How much a calibrated plan's score depends on its calibration sample (issue 41; "calibration matters more than
search", arXiv 2604.24938).

`evaluate --calibration-seeds 0,1,2` runs every calibrated point (block influence, angular, LaCo; a router's
threshold chosen with -o skip) once per calibration sample of the same size (`-o calibration-seed`). Here: per point,
its mean score on each sample, and over the samples their number, mean, standard deviation and range; and, between
two calibrated points at the same cost, whether their ranking survives that spread: it does when every sample of
one scores above every sample of the other (their ranges are disjoint), else the ranking depends on the sample.
A range over a few samples is a description of these samples, not an interval for the population of samples.

`compare --calibration-seeds` reads the same spread off Retain % (`retain_spread`, `retain_rankings`): per method and
K, over its samples, ranked against the other methods at the same realized skip. There is no per-item lead there
(Retain % is a mean of ratios over tasks, not of items), so a ranking that survives the spread may still be document
noise: compare's pairs table gives the first samples' paired bootstrap interval.
"""

from __future__ import annotations

import itertools

import pandas as pd

KEYS = ["dataset", "split", "policy", "calibration_point"]


def calibration_spread(rows: pd.DataFrame, metric: str = "full_rougeL") -> pd.DataFrame:
    """One row per calibrated point run on at least 2 calibration samples: its cost (the mean over the samples: a
    router whose threshold each sample chooses realizes its own), and samples, mean, sd, lo, hi of the per-sample
    mean `metric` (every sample's items are the same run's items)."""
    columns = [*KEYS, "cost", "samples", "mean", "sd", "lo", "hi"]
    if "calibration_seed" not in rows or metric not in rows:
        return pd.DataFrame(columns=columns)
    sampled = rows[rows["calibration_seed"].notna()]
    keys = [k for k in KEYS if k in sampled]
    per_sample = (sampled.groupby([*keys, "calibration_seed"])
                  .agg(cost=("cost", "mean"), value=(metric, "mean")).reset_index())
    out = (per_sample.groupby(keys)
           .agg(cost=("cost", "mean"), samples=("value", "count"), mean=("value", "mean"), sd=("value", "std"),
                lo=("value", "min"), hi=("value", "max")).reset_index())
    return out[out["samples"] >= 2].reset_index(drop=True)


def references(rows: pd.DataFrame, spread: pd.DataFrame, metric: str = "full_rougeL") -> pd.DataFrame:
    """The points drawn from no calibration sample (uniform, early exit, ...) at the costs of `spread`, in its
    columns with one "sample": what a calibrated point's ranking is also read against."""
    if spread.empty or "calibration_seed" not in rows:
        return spread.iloc[0:0]
    plain = rows[rows["calibration_seed"].isna() & ~rows["policy"].isin(["full", "speculative"])]
    keys = [k for k in KEYS if k in plain]
    out = (plain.groupby(keys).agg(cost=("cost", "mean"), mean=(metric, "mean")).reset_index()
           .assign(samples=1, sd=float("nan")))
    out["lo"] = out["hi"] = out["mean"]
    costs = set(spread["cost"].round())
    return out[out["cost"].round().isin(costs)][spread.columns].reset_index(drop=True)


def rankings(spread: pd.DataFrame, metric: str = "full_rougeL", reference: pd.DataFrame | None = None,
             rows: pd.DataFrame | None = None) -> list[str]:
    """For each pair of points of different strategies at the same cost (rounded; and dataset and split), at least
    one of them calibrated: which ranks first, and whether that survives the calibration spread (module docstring);
    `reference`: points of no calibration sample compared with the calibrated ones (one score each). With the run's
    `rows`, each line also gives the first's lead over the items (each item's score averaged over the point's
    samples; a paired t interval), and says when the items do not order the two: a ranking can survive the
    calibration spread (samples that all choose one plan have none) and still be item noise."""
    both = pd.concat([spread, reference], ignore_index=True) if reference is not None and len(reference) else spread
    if both.empty:
        return []
    both = both.assign(at=both["cost"].round().astype(int))
    lines = []
    where = [k for k in ("dataset", "split") if k in both] + ["at"]
    for key, g in both.groupby(where, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        at = ", ".join(f"{k if k != 'at' else 'cost'} {v}" for k, v in zip(where, key))
        for (_, a), (_, b) in itertools.combinations(g.sort_values("mean", ascending=False).iterrows(), 2):
            if a["policy"] == b["policy"] or (a["samples"] < 2 and b["samples"] < 2):
                continue
            survives = a["lo"] > b["hi"]

            def shown(p) -> str:
                return (f"{p['mean']:.3f}, {p['lo']:.3f}-{p['hi']:.3f} over {p['samples']} samples"
                        if p["samples"] >= 2 else f"{p['mean']:.3f}, no calibration sample")

            lines.append(
                f"{at}: {a['calibration_point']} ({metric} {shown(a)}) above {b['calibration_point']} ({shown(b)}): "
                + ("the ranking survives the calibration spread (every sample of the first scores above every sample "
                   "of the second)" if survives else
                   "the ranking does not survive the calibration spread (their ranges over samples overlap)")
                + ("" if rows is None else _over_items(rows, a, b, metric)))
    return lines


def _over_items(rows: pd.DataFrame, a, b, metric: str) -> str:
    """The first point's lead over the second across their common items (each item's score averaged over the
    point's calibration samples), with a paired t interval."""
    from skipbench.analysis.stats import t_interval

    def per_item(p) -> pd.Series:
        mine = rows[rows["calibration_point"] == p["calibration_point"]]
        for k in ("dataset", "split"):
            if k in mine and k in p:
                mine = mine[mine[k] == p[k]]
        return mine.groupby("item_id")[metric].mean()

    pair = pd.concat([per_item(a), per_item(b)], axis=1, join="inner").dropna()
    if len(pair) < 2:
        return ""
    lead, lo, hi = t_interval(pair.iloc[:, 0] - pair.iloc[:, 1])
    verdict = "the items order them too" if lo > 0 else "the items do not order them (the interval reaches 0)"
    return f"; over their {len(pair)} items the first leads by {lead:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired t): {verdict}"


def first_sample(table: pd.DataFrame) -> pd.DataFrame:
    """compare's rows of methods drawn from no calibration sample or from the first seed given (what its figure,
    pairs and the talk's verdict read, so that no sample is picked with hindsight)."""
    if "calibration_of" not in table:
        return table
    return table[(table["calibration_of"].fillna("") == "") | (table["method"] == table["calibration_of"])]


def retain_spread(summary: pd.DataFrame, num_layers: int) -> pd.DataFrame:
    """compare's summary (-agg) as `calibration_spread`'s table: per calibrated method and K, its Retain % over the
    calibration samples, and one row per method drawn from no sample (samples 1). `cost` is what a token ran,
    realized (L minus the realized skip, its mean over the samples: a router's threshold realizes its own), `split`
    its unit (layers, or attention sub-layers for MindSkip), so that rankings compare like with like;
    `calibration_point` is "METHOD (K=k)"."""
    s = summary[summary["skip"] > 0]
    if "calibration_of" not in s or not (s["calibration_of"].fillna("") != "").any():
        return pd.DataFrame()
    named = s["calibration_of"].fillna("")
    base = named.where(named != "", s["method"])
    rows = pd.DataFrame({"split": s["skipped_unit"], "policy": base,
                         "calibration_point": base + " (K=" + s["skip"].astype(str) + ")",
                         "cost": num_layers - s["skipped"], "calibration_seed": s["calibration_seed"],
                         "retain_pct": s["retain_pct"]})
    sampled = calibration_spread(rows, "retain_pct")
    return pd.concat([sampled, references(rows, sampled, "retain_pct")], ignore_index=True)


def retain_rankings(table: pd.DataFrame) -> list[str]:
    """`rankings` over `retain_spread`'s table, its methods of no sample as references."""
    if table.empty:
        return []
    return rankings(table[table["samples"] >= 2], "Retain %", reference=table[table["samples"] < 2])
