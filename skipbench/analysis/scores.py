"""Per-item scores of configurations from `evaluate` runs: what the oracle and the router choose between.

A configuration is a (policy, cost) pair (or a spec label where two specs share one); runs of several models,
datasets or splits form groups, each solved apart. A library: the `oracle` and `route` recipes read runs with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from skipbench.store import readers
from skipbench.errors import SkipbenchError
from skipbench.analysis.knapsack import Instance

GROUP_BY = ("model", "dataset", "split")  # the runs of one oracle share these (when the runs record them)
SETTINGS = ("max_new_tokens", "kv_mode", "prompt_depth", "max_prompt_tokens")  # should agree within a group


def _settings(df: pd.DataFrame, column: str, mode_free: tuple[str, ...] = ()) -> pd.Series:
    """A setting's values where it can change a row's result: the KV mode does not for the policies in `mode_free`
    (static plans and full depth, whose tokens are the same in either mode: DESIGN.md; `auto` runs the plans that
    skip layers `none` and full depth `fill`)."""
    if column != "kv_mode" or "policy" not in df.columns or not mode_free:
        return df[column]
    return df.loc[~df["policy"].astype(str).isin(mode_free), column]


def read_runs(paths: list[str], metric: str) -> pd.DataFrame:
    """The evaluate rows of `paths`, checked: item ids, a numeric cost, and the metric's column."""
    if not paths:
        raise SkipbenchError("no evaluate results under results/; produce them with: "
                             "skipbench evaluate --policy uniform --costs 8,15,22")
    df = pd.concat([readers.table(p, "--runs file", "pass parquet files written by skipbench evaluate") for p in paths],
                   ignore_index=True)
    missing = [c for c in ("item_id", "cost", metric) if c not in df.columns]
    if missing:
        raise SkipbenchError(f"--runs lacks column(s) {', '.join(missing)}; columns found: {', '.join(df.columns)}")
    cost = pd.to_numeric(df["cost"], errors="coerce")
    if cost.isna().any():
        raise SkipbenchError(f"--runs has {int(cost.isna().sum())} row(s) without a numeric cost; pass parquet files "
                             "written by skipbench evaluate")
    return df.assign(cost=cost)


def group_keys(df: pd.DataFrame) -> list[str]:
    return [c for c in GROUP_BY if c in df.columns]


def group_labels(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The grouping columns as text, a missing value as '?' (runs from files without that column)."""
    return df[keys].astype(object).where(df[keys].notna(), "?").astype(str)


def groups_of(df: pd.DataFrame) -> list[tuple[tuple[str, str], ...]]:
    keys = group_keys(df)
    if not keys:
        return [()]
    return [tuple(zip(keys, values)) for values in group_labels(df, keys).drop_duplicates().itertuples(index=False)]


def in_group(df: pd.DataFrame, group: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    if not group:
        return df
    labels = group_labels(df, [c for c, _ in group])
    return df[(labels == pd.Series(dict(group))).all(axis=1)]


def chosen_rows(df: pd.DataFrame, policies: tuple[str, ...], costs: tuple[int, ...] = ()) -> pd.DataFrame:
    """The rows of the named policies (strategy names such as uniform, or spec labels such as layers:0,3,5) at the
    named costs, and full depth; every row when neither is named."""
    if "policy" not in df.columns:
        df = df.assign(policy="config")
    df = df[df["policy"] != "speculative"]  # full depth's output computed another way (evaluate --draft), not a choice
    keep = pd.Series(True, index=df.index)
    if policies:
        named = df["policy"].isin(policies)
        if "policy_spec" in df.columns:
            named |= df["policy_spec"].isin(policies)
        keep &= named
    if costs:
        keep &= df["cost"].isin(costs)
    return df[keep | (df["policy"] == "full")]


def group_name(group: tuple[tuple[str, str], ...]) -> str:
    return "/".join(v for _, v in group)


def load_scores(df: pd.DataFrame, metric: str, group: tuple[tuple[str, str], ...] = (), policies: tuple[str, ...] = (),
                costs: tuple[int, ...] = (), mode_free: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The rows of one (model, dataset, split) group, of the chosen policies and costs and full depth, each with
    its configuration name (`config`: policy:cost, or the spec label where two specs share one), and notes.
    `mode_free`: the policies whose tokens the KV mode cannot change (no note when they differ in it)."""
    df = in_group(df, group)
    if len(groups := groups_of(df)) > 1:
        raise SkipbenchError(f"--runs mixes models/datasets/splits ({', '.join(map(group_name, groups))}); "
                             "pass the files of one with --runs")
    df = chosen_rows(df, policies, costs).dropna(subset=[metric])
    if df.empty:
        raise SkipbenchError(f"no rows with a value for metric '{metric}'")
    df["config"] = df["policy"].astype(str) + ":" + df["cost"].astype(int).astype(str)
    if "policy_spec" in df.columns:  # two specs with one (policy, cost), e.g. two layer sets of 3: keep them apart
        clash = df.groupby("config")["policy_spec"].transform("nunique") > 1
        df.loc[clash, "config"] = df.loc[clash, "policy_spec"].astype(str) + " (" + df.loc[clash, "cost"].astype(int).astype(str) + ")"
    notes = [f"the runs differ in {c} ({', '.join(map(str, sorted(_settings(df, c, mode_free).dropna().unique())))}): "
             "they are compared as if alike" for c in SETTINGS if c in df.columns and _settings(df, c, mode_free).nunique() > 1]
    copies = (df["policy"] == "full") & df.duplicated(["config", "item_id", metric])
    df = df[~copies]  # every evaluate file carries the full-depth rows of its items: one run read several times
    dup = df.duplicated(["config", "item_id"]).sum()
    if dup:
        notes.append(f"{dup} repeated (configuration, item) rows with different scores were averaged")
    return df, notes


def pivot(df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str], list[int], list[str], np.ndarray]:
    """Items x configurations of the metric; each configuration's nominal cost (its `cost` column: for a dynamic
    policy, its measured mean rounded); and the cost of each (item, configuration): a configuration whose realized
    mean layers (`layers_mean`) vary by item is costed per item, the others at their nominal cost."""
    wide = df.pivot_table(index="item_id", columns="config", values=metric, aggfunc="mean")
    costs_of = df.groupby("config")["cost"].first().astype(int)
    configs = sorted(wide.columns, key=lambda c: (costs_of[c], c))
    wide = wide[configs]
    notes = []
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        notes.append(f"{int(incomplete.sum())} item(s) not scored under every configuration were dropped (e.g. full "
                     "depth from a run with more items)")
        wide = wide[~incomplete]
    if wide.empty:
        raise SkipbenchError("no item is scored under every configuration")
    per_item = np.tile(np.array([float(costs_of[c]) for c in configs]), (len(wide), 1))
    if "layers_mean" in df.columns:
        realized = df.pivot_table(index="item_id", columns="config", values="layers_mean", aggfunc="mean")
        realized = realized.reindex(index=wide.index, columns=configs)
        dynamic = [k for k, c in enumerate(configs)  # realized costs that vary, or differ from the nominal
                   if realized[c].max() - realized[c].min() > 1e-9 or abs(realized[c].mean() - costs_of[c]) > 1e-9]
        for k in dynamic:  # an item without a generated token that ran the model keeps the nominal cost
            per_item[:, k] = realized[configs[k]].fillna(costs_of[configs[k]]).to_numpy()
        if dynamic:
            notes.append(f"costed per item by their realized mean layers: {', '.join(configs[k] for k in dynamic)} "
                         f"(rounded up to 1/{Instance.RESOLUTION} layer)")
    return wide, configs, [int(costs_of[c]) for c in configs], notes, per_item
