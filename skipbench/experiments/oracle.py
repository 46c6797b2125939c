"""`skipbench oracle`: the exact knapsack oracle and the greedy oracle over per-item scores of K configurations.

Reads `evaluate` parquet (one or several files); a configuration is a (policy, cost) pair, its cost the
nominal layer count. Budgets below the cheapest configuration are an error; budgets above the dearest
give the per-item best assignment (the constraint no longer binds), with a note. Runs of several models,
datasets or splits are solved apart, one oracle per group (`run_groups`); with no files named, every
`results/evaluate-*.parquet` is read and, as in the paper, only uniform skipping and full depth compete.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.store import readers
from skipbench.analysis import scores
from skipbench.errors import SkipbenchError
from skipbench.analysis.knapsack import Instance, greedy, smallest_budget_reaching, solve
from skipbench.store.results import Shown, Written, check_out_path, manifest, tidy, write_tables
from skipbench.analysis.scores import chosen_rows, group_name, groups_of, in_group, pivot
from skipbench.policies.spec import static_names

# App. A.5.2's bins of label length: 1-15, 16-30, ..., 136-150 and >150 (index (length - 1) // 15, capped)
LENGTH_BIN, LENGTH_BINS = 15, 11
LENGTH_LABELS = [f"{LENGTH_BIN * k + 1}-{LENGTH_BIN * (k + 1)}" for k in range(LENGTH_BINS - 1)] + [f">{LENGTH_BIN * (LENGTH_BINS - 1)}"]


@dataclass(frozen=True, kw_only=True)
class OracleConfig:
    runs: tuple[str, ...] = ()  # empty: every results/evaluate-*.parquet
    metric: str = "rougeL"
    budget: float | None = None
    curve: bool = False
    budgets: tuple[float, ...] = ()  # the curve's grid (default: every integer from cheapest to dearest)
    policies: tuple[str, ...] = ()  # keep only these policies (default: all)
    # the length test also runs here (always at the star and at `budget`); with `curve` and none named, at the
    # paper's 6 and 24 of 24 layers scaled to the depth (PAPER_LENGTH_LAYERS)
    length_budgets: tuple[float, ...] = ()
    bootstrap: int = 2000  # item resamples for the star budget's interval (0: none)
    out: str | None = None
    max_cells: float = 2e8
    costs: tuple[int, ...] = ()  # keep only configurations of these nominal costs (full depth always stays)
    group: tuple[tuple[str, str], ...] = ()  # (column, value) pairs: only these runs (one group of `run_groups`)


# Glavas et al.'s oracle chooses among uniformly skipped models at 4, 8 and 12 of 24 layers and full depth
PAPER_POLICIES, PAPER_FRACTIONS = ("uniform",), (1 / 6, 1 / 3, 1 / 2)
# ... and tests the label-length dependence of its choice at 6 and 24 of those 24 layers (App. A.5.2): with --curve
# and no --length-budgets these budgets, scaled, are tested besides the star, which is full depth itself (every item
# at full, nothing to test) whenever full depth scores best on every item
PAPER_LENGTH_LAYERS = (6, 24)


def paper_costs(num_layers: int) -> tuple[int, ...]:
    """The paper's configuration set scaled to a model's depth: 1/6, 1/3 and 1/2 of its layers (30 -> 5, 10, 15)."""
    return tuple(sorted({max(1, math.floor(f * num_layers + 0.5)) for f in PAPER_FRACTIONS}))


@dataclass(kw_only=True)
class OracleResult(Written):
    """rows: one per (budget, method); tables["assign"]: one per (budget, item), the oracle's and greedy's
    configuration; tables["length"]: the length tests' count tables (written as -assign and -length files)."""

    configs: list[str]
    costs: list[int]
    full: str
    star: float | None
    star_interval: tuple[float, float] | None  # 95% bootstrap interval over items
    config_means: dict[str, float]  # each configuration's mean metric over the items
    length_tests: list[dict]  # one per tested budget: statistic, dof, p_value, counts
    notes: list[str] = field(default_factory=list)
    group: tuple[tuple[str, str], ...] = ()  # the (column, value) pairs shared by the runs solved

    @property
    def table(self) -> pd.DataFrame:
        return self.rows

    @property
    def assignment(self) -> pd.DataFrame:
        return self.tables["assign"]


def _paths(cfg: OracleConfig) -> list[str]:
    if cfg.runs:
        return list(cfg.runs)
    from skipbench.store.results import COMPANIONS

    return sorted(p for p in glob.glob("results/evaluate-*.parquet")
                  if not any(p.endswith(f"-{c}.parquet") for c in COMPANIONS))


def read_runs(cfg: OracleConfig) -> pd.DataFrame:
    return scores.read_runs(_paths(cfg), cfg.metric)


def load_scores(cfg: OracleConfig, df: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    return scores.load_scores(read_runs(cfg) if df is None else df, cfg.metric, cfg.group, cfg.policies, cfg.costs,
                              static_names())


def run_groups(cfg: OracleConfig) -> tuple[list[OracleResult], list[str]]:
    """One oracle per (model, dataset, split) in the runs, and the notes of the whole run. With no files, policies
    or costs named: the paper's configurations, uniform skipping at 1/6, 1/3 and 1/2 of each group's depth and full
    depth. A group that has nothing to choose from, or fails, is left out with a note when other groups remain.
    With several groups, `out` gets each group's name: results/oracle.parquet -> results/oracle-text.parquet."""
    _needs_a_budget(cfg)
    if cfg.bootstrap < 0:
        raise SkipbenchError(f"--bootstrap must be >= 0, got {cfg.bootstrap}")
    if cfg.out:
        check_out_path(cfg.out)
    paper = not (cfg.runs or cfg.costs)  # the paper's costs per group; its policy unless --policy names others
    if not (cfg.runs or cfg.policies):
        cfg = replace(cfg, policies=PAPER_POLICIES)
    df = read_runs(cfg)
    groups = groups_of(df)
    outs = {group: _group_out(cfg.out, group, groups) if cfg.out and len(groups) > 1 else cfg.out for group in groups}
    if cfg.out and len(set(outs.values())) < len(groups):
        raise SkipbenchError(f"the groups {', '.join(map(group_name, groups))} would share output files; "
                             "pass the files of one with --runs")
    results, notes = [], []
    for group in groups:
        rows = in_group(df, group)
        one = replace(cfg, group=group, out=outs[group])
        if paper:
            full = rows[rows["policy"] == "full"] if "policy" in rows.columns else rows.iloc[:0]
            depth = int(full["cost"].max()) if len(full) else 0
            one = replace(one, costs=paper_costs(depth)) if depth else one
        name = group_name(group) or "the runs"
        if paper and not depth:
            notes.append(f"{name}: no full-depth runs to scale the paper's costs to, so every cost is kept")
        if set(chosen_rows(rows, one.policies, one.costs)["policy"]) <= {"full"}:
            chosen = (f"{','.join(one.policies)} at the paper's costs {', '.join(map(str, one.costs))} of {depth}"
                      if paper else "the chosen policies and costs")
            notes.append(f"{name} left out: no configuration besides full depth among {chosen}")
            continue
        try:
            r = run(one, df)
            header = " · ".join(v for _, v in group) if len(groups) > 1 else ""
            r.shown, r.said = shown(r, one, header), [f"wrote {r.path}"] if r.path else []
            results.append(r)
        except SkipbenchError as exc:
            if len(groups) == 1:
                raise
            notes.append(f"{name} left out: {exc}")
    if not results:
        raise SkipbenchError(f"nothing to solve: {'; '.join(notes)}; name the configurations with --policy / --costs")
    if paper:
        notes.insert(0, f"the paper's configurations: {','.join(cfg.policies) or 'every policy'} at 1/6, 1/3 and 1/2 of "
                        "the layers, and full depth (--policy and --costs choose others)")
    return results, notes


def shown(result: OracleResult, cfg: OracleConfig, name: str = "") -> list[Shown]:
    """What a person sees of one group's oracle, in order: the group's name (with several), the budget's values and
    shares, the curve, where the oracle matches full depth, and each label-length test with its counts."""
    out = [Shown(f"\n== {name} ==")] if name else []  # plain: a long model path is neither wrapped nor cut
    t, metric, budget = result.table, cfg.metric, cfg.budget
    if budget is not None:
        at = t[t["budget"] == budget]
        shares = at[at["method"].isin(["oracle", "greedy"])].set_index("method").filter(like="share:")
        shares = shares.T.rename(index=lambda c: c.removeprefix("share:")).reset_index(names="configuration")
        out += [Shown(f"oracle · budget {budget:g} · {metric}", at[["method", "value", "mean_cost", "exact", "gap"]]),
                Shown("share of items per configuration", shares)]
    if cfg.curve:
        wide = t[t["method"].isin(["oracle", "greedy"])].pivot(index="budget", columns="method", values="value")
        out.append(Shown(f"oracle curve · {metric}", wide.reset_index()))
    L = max(result.costs)
    if result.star is not None:
        ci = (f", 95% bootstrap interval [{result.star_interval[0]:.2f}, {result.star_interval[1]:.2f}]"
              if result.star_interval else "")
        out.append(Shown(f"oracle matches {result.full} at budget {result.star:.3f} layers "
                         f"({100 * result.star / L:.1f}% of {L}{ci})"))
    else:
        out.append(Shown(f"oracle never reaches {result.full}'s mean {metric}"))
    for lt in result.length_tests:
        out += _length_shown(lt)
    return out


def _length_shown(lt: dict) -> list[Shown]:
    head = f"length test at budget {lt['budget']:g} ({lt['why']}), label length in {lt['unit']}, {lt['items']} items: "
    if lt["p_value"] is None:
        return [Shown(head + lt.get("note", "nothing to test"))]
    counts = pd.DataFrame(lt["counts"]).pivot(index="bin", columns="config", values="count")
    counts = counts.reindex([b for b in dict.fromkeys(c["bin"] for c in lt["counts"])]).reset_index()
    return [Shown(head + f"{lt.get('test') or 'chi-square'}, chi2 = {lt['statistic']:.2f}, dof = {lt['dof']}, "
                  f"p = {lt['p_value']:.3g}" + (f" ({lt['note']})" if lt.get("note") else "")),
            Shown(f"oracle's choice per label-length bin · budget {lt['budget']:g}", counts)]


def _group_out(out: str, group, groups) -> str:
    """The output of one group: the stem plus the group's values that vary between groups (a model path with its
    separators replaced)."""
    import re

    varying = [k for k in range(len(group)) if len({g[k][1] for g in groups}) > 1]
    name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", group[k][1]).strip("_") or "na" for k in varying)
    path = Path(out)
    return str(path.with_name(f"{path.stem}-{name}{path.suffix}"))


def _needs_a_budget(cfg: OracleConfig) -> None:
    if cfg.budget is None and not cfg.curve:
        raise SkipbenchError("give --budget B (mean layers per token) or --curve")


def run(cfg: OracleConfig, runs: pd.DataFrame | None = None) -> OracleResult:
    """The oracle over one group of runs (`runs`: the files already read, else they are read here)."""
    _needs_a_budget(cfg)
    df, notes = load_scores(cfg, runs)
    wide, configs, costs, more, per_item = pivot(df, cfg.metric)
    notes += more
    inst = Instance(wide.to_numpy(), per_item)
    full = next((c for c in configs if c.startswith("full:")), configs[-1])
    cheapest = inst.cheapest()
    grid = sorted(set(cfg.budgets or (range(math.ceil(cheapest - 1e-9), max(costs) + 1) if cfg.curve else ())) | (
        {cfg.budget} if cfg.budget is not None else set()))
    for b in (*grid, *cfg.length_budgets):
        if b < cheapest - 1e-9:
            raise SkipbenchError(f"budget {b} is below the cheapest configuration's cost ({cheapest:g})")
        if b > max(costs):
            notes.append(f"budget {b} is above the dearest configuration ({max(costs)}): every item takes its best")
    rows, assign = [], []
    singles = {c: float(wide[c].mean()) for c in configs}
    for b in grid:
        sols = {"oracle": solve(inst, b, cfg.max_cells), "greedy": greedy(inst, b)}
        for method, sol in sols.items():
            share = np.bincount(sol.choice, minlength=len(configs)) / inst.n
            rows.append({"budget": b, "method": method, "value": sol.value, "mean_cost": sol.mean_cost,
                         "exact": sol.exact, "gap": sol.gap, "core_items": sol.core,
                         **{f"share:{c}": s for c, s in zip(configs, share)}})
        for k, c in enumerate(configs):
            if inst.C[:, k].mean() <= b + 1e-9:
                rows.append({"budget": b, "method": f"single:{c}", "value": singles[c], "mean_cost": float(inst.C[:, k].mean()),
                             "exact": True, "gap": 0.0, "core_items": 0})
        assign.append(_assignment(b, wide.index, configs, sols["oracle"].choice, sols["greedy"].choice))
    table = pd.DataFrame(rows)
    star = smallest_budget_reaching(inst, singles[full])
    star_ci = star_interval(inst, configs.index(full), cfg.bootstrap) if star is not None and cfg.bootstrap else None
    lengths, unit = label_lengths(df)
    tests = []
    named = [("star", star)] if star is not None else []
    named += [("budget", cfg.budget)] if cfg.budget is not None else []
    named += [("length budget", b) for b in cfg.length_budgets]
    if cfg.curve and not cfg.length_budgets and lengths is not None:
        more, skipped = paper_length_budgets(costs[configs.index(full)], cheapest)
        named += more
        notes += skipped
    done: set[float] = set()
    for why, b in named:  # the star's assignment is computed here: the curve's grid holds integer budgets only
        if b in done:
            continue
        done.add(b)
        given = next((a for a in assign if a["budget"].iloc[0] == b), None)
        if given is None:
            given = _assignment(b, wide.index, configs, solve(inst, b, cfg.max_cells).choice, greedy(inst, b).choice)
            assign.append(given)
        if lengths is not None:
            test = length_test(lengths, given.set_index("item_id")["oracle"], configs, unit)
            if why == "star" and test["bins_used"] > 1 and set(given["oracle"]) == {full}:
                test["note"] += f" (the star is full depth itself: {full} scores best on every item)"
            tests.append({"budget": float(b), "why": why, **test})
    if lengths is None:
        notes.append("the runs have no reference lengths (reference_tokens or reference): no length test")
    assignment = pd.concat(assign, ignore_index=True).sort_values(["budget", "item_id"], kind="stable")
    counts = pd.DataFrame([{"budget": t["budget"], **c} for t in tests for c in t["counts"]],
                          columns=["budget", "bin", "config", "count"])
    result = OracleResult(rows=table, tables={"assign": assignment.reset_index(drop=True), "length": counts},
                          configs=configs, costs=costs, full=full, star=star, star_interval=star_ci, config_means=singles,
                          length_tests=tests, notes=notes, group=cfg.group)
    return write(cfg, result) if cfg.out else result


def paper_length_budgets(depth: int, cheapest: float) -> tuple[list[tuple[str, float]], list[str]]:
    """App. A.5.2 tests the oracle's choice at 6 and 24 of OPT's 24 layers: those budgets scaled to `depth` (30 ->
    7.5, 30), as (why, budget) pairs, and a note for each one below the cheapest configuration (left out)."""
    named, notes = [], []
    for layers in PAPER_LENGTH_LAYERS:
        b = depth * layers / 24
        if b < cheapest - 1e-9:
            notes.append(f"the paper's length-test budget {layers} of 24 layers ({b:g} of {depth}) is below the "
                         f"cheapest configuration ({cheapest:g}): not tested there")
        else:
            named.append((f"the paper's {layers} of 24, scaled", b))
    return named, notes


def _assignment(budget: float, items, configs: list[str], oracle_choice, greedy_choice) -> pd.DataFrame:
    return pd.DataFrame({"budget": float(budget), "item_id": items, "oracle": [configs[k] for k in oracle_choice],
                         "greedy": [configs[k] for k in greedy_choice]})


def star_interval(inst: Instance, full: int, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the star budget: items resampled with replacement, the target (the full
    configuration's mean) recomputed on each resample."""
    from skipbench.analysis.stats import bootstrap_interval

    def star_of(idx):
        sub = Instance(inst.V[idx], inst.C[idx])
        return smallest_budget_reaching(sub, float(sub.V[:, full].mean()))

    return bootstrap_interval(star_of, inst.n, resamples, seed)


def label_lengths(df: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """Reference (label) length per item: tokens when the runs recorded them, else words."""
    if "reference_tokens" in df.columns:
        return df.groupby("item_id")["reference_tokens"].first().astype(int), "tokens"
    if "reference" in df.columns:
        return df.groupby("item_id")["reference"].first().str.split().str.len().astype(int), "words"
    return None, ""


def length_bin(lengths) -> np.ndarray:
    """App. A.5.2's bins: 1-15 -> 0, 16-30 -> 1, ..., 136-150 -> 9, >150 -> 10 (an empty label counts in the first)."""
    return np.clip((np.asarray(lengths, dtype=np.int64) - 1) // LENGTH_BIN, 0, LENGTH_BINS - 1)


def length_test(lengths: pd.Series, picks: pd.Series, configs: list[str], unit: str = "tokens") -> dict:
    """App. A.5.2: a chi-square test of homogeneity of the oracle's choice of configuration across label-length
    bins (H0: the choice does not depend on the label's length). `lengths` and `picks` are indexed by item. A sparse
    table (over 20% of cells expecting fewer than 5 items) reports an exact conditional p instead: Fisher's exact
    test (2 x 2) or a permutation p (`stats.contingency_test`); `test` names it, `p_chi2` keeps the chi-square's."""
    from skipbench.analysis.stats import contingency_test

    bins = length_bin(lengths.reindex(picks.index).to_numpy())
    counts = pd.crosstab(pd.Categorical(bins, categories=range(LENGTH_BINS)),
                         pd.Categorical(picks.to_numpy(), categories=configs), dropna=False)
    used = counts.loc[counts.sum(axis=1) > 0, counts.sum(axis=0) > 0]
    tidy = [{"bin": LENGTH_LABELS[b], "config": c, "count": int(counts.loc[b, c])}
            for b in counts.index if counts.loc[b].sum() > 0 for c in configs]
    out = {"unit": unit, "items": int(len(picks)), "bins_used": int(used.shape[0]), "configs_used": int(used.shape[1]),
           "counts": tidy, "test": None, "statistic": None, "dof": 0, "p_value": None}
    if used.shape[0] < 2 or used.shape[1] < 2:
        what = ("every label falls in one length bin" if used.shape[0] < 2
                else f"the oracle picks {used.columns[0]} for every item")
        return out | {"note": f"{what}: nothing to test"}
    out |= contingency_test(used.to_numpy())
    if out["test"] != "chi-square":
        out["note"] = (f"{100 * out['sparse_cells']:.0f}% of cells expect fewer than 5 items, too few for the "
                       f"chi-square approximation, whose p is {out['p_chi2']:.3g}")
    return out


def _source(cfg: OracleConfig) -> dict:
    """The model record and dataset of the evaluate runs read (from their manifests; of this group's runs only),
    for verdicts and reports."""

    models, datasets = [], set()
    for p in _paths(cfg):
        m = Path(p).with_suffix(".json")
        meta = readers.json_file(m, "manifest", "rerun the evaluate that wrote it") if m.exists() else {}
        data = meta.get("config", {}).get("data", {})
        recorded = {"model": (meta.get("model") or {}).get("name"), "dataset": data.get("name"), "split": data.get("split")}
        if any(recorded[column] is not None and str(recorded[column]) != value for column, value in cfg.group):
            continue
        if meta.get("model"):
            models.append(meta["model"])
        if data.get("name"):
            datasets.add(data["name"])
    return {"model": models[0] if models else None, "datasets": sorted(datasets)}


def write(cfg: OracleConfig, result: OracleResult) -> OracleResult:
    out = Path(cfg.out)
    table = tidy(result.rows.copy(), cfg, skip=("out", "runs", "policies", "budgets", "length_budgets", "group"),
                 metric=cfg.metric, **dict(cfg.group))
    meta = manifest(cfg, None, configs=result.configs, costs=result.costs, full=result.full, config_means=result.config_means,
                    star_budget=result.star,
                    star_interval=result.star_interval, star_interval_method=f"95% percentile bootstrap, {cfg.bootstrap} item resamples",
                    length_tests=[{k: v for k, v in t.items() if k != "counts"} for t in result.length_tests],
                    length_bins=LENGTH_LABELS, notes=result.notes, source=_source(cfg),
                    solver="Lagrangian bound + reduced-cost fixing + exact DP over the core (skipbench.analysis.knapsack)")
    paths = write_tables(table, out, meta, **result.tables)
    if cfg.curve:
        from skipbench.analysis.plots import oracle_figures

        paths |= {f"figure{n}": f for n, f in enumerate(oracle_figures(result, cfg.metric, out.with_name(out.stem)) or ())}
    return replace(result, rows=table, path=paths.pop("rows"), files=paths)
