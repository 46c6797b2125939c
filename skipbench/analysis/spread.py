"""How much a calibrated plan's score depends on its calibration sample (issue 41; "calibration matters more than
search", arXiv 2604.24938).

`evaluate --calibration-seeds 0,1,2` runs every calibrated point (block influence, angular, LaCo; a router's
threshold chosen with -o skip) once per calibration sample of the same size (`-o calibration-seed`). Here: per point,
its mean score on each sample, and over the samples their number, mean, standard deviation and range; and, between
two calibrated points at the same cost, whether their ranking survives that spread: it does when every sample of
one scores above every sample of the other (their ranges are disjoint), else the ranking depends on the sample.
A range over a few samples is a description of these samples, not an interval for the population of samples.
"""

from __future__ import annotations

import itertools

import pandas as pd

KEYS = ["dataset", "split", "policy", "cost", "calibration_point"]


def calibration_spread(rows: pd.DataFrame, metric: str = "full_rougeL") -> pd.DataFrame:
    """One row per calibrated point run on at least 2 calibration samples: samples, mean, sd, lo, hi of the per-sample
    mean `metric` (every sample's items are the same run's items)."""
    columns = [*KEYS, "samples", "mean", "sd", "lo", "hi"]
    if "calibration_seed" not in rows or metric not in rows:
        return pd.DataFrame(columns=columns)
    sampled = rows[rows["calibration_seed"].notna()]
    keys = [k for k in KEYS if k in sampled]
    per_sample = sampled.groupby([*keys, "calibration_seed"])[metric].mean().reset_index()
    out = (per_sample.groupby(keys)[metric]
           .agg(samples="count", mean="mean", sd="std", lo="min", hi="max").reset_index())
    return out[out["samples"] >= 2].reset_index(drop=True)


def rankings(spread: pd.DataFrame, metric: str = "full_rougeL") -> list[str]:
    """For each pair of calibrated points of different strategies at the same cost (and dataset and split): which
    ranks first, and whether that survives the calibration spread (module docstring)."""
    lines = []
    where = [k for k in ("dataset", "split", "cost") if k in spread]
    for key, g in spread.groupby(where, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        at = ", ".join(f"{k} {v}" for k, v in zip(where, key))
        for (_, a), (_, b) in itertools.combinations(g.sort_values("mean", ascending=False).iterrows(), 2):
            if a["policy"] == b["policy"]:
                continue
            survives = a["lo"] > b["hi"]
            lines.append(
                f"{at}: {a['calibration_point']} ({metric} {a['mean']:.3f}, {a['lo']:.3f}-{a['hi']:.3f} over "
                f"{a['samples']} samples) above {b['calibration_point']} ({b['mean']:.3f}, {b['lo']:.3f}-{b['hi']:.3f} "
                f"over {b['samples']}): " + ("the ranking survives the calibration spread (every sample of the first "
                                              "scores above every sample of the second)" if survives else
                                              "the ranking does not survive the calibration spread (their ranges "
                                              "over samples overlap)"))
    return lines
