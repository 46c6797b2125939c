"""`skipbench route`: a prompt-level router against the oracle (Glavas et al.'s open question, Sec. 3.3).

`train` reads `evaluate` runs that score the same items under K static configurations (run with `--split all`, or
one file per split), takes the dataset's seeded 70/15/15 split of those items, and fits one regressor per
configuration from the prompt's features on the train items, tuned on the validation items
(policies/router.py). `curve` scores routers on the test items only: at each budget, the true mean metric of the
configurations the router assigned with the oracle's knapsack (predicted scores instead of true ones), beside the
exact and the greedy oracle, each single configuration and a random assignment at the same budget, and the share
of the oracle's gain over the best single configuration the router captures, with 95% bootstrap intervals over
items at the reported budgets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.analysis import scores
from skipbench.data import DataSpec
from skipbench.errors import SkipbenchError
from skipbench.analysis.knapsack import Instance, greedy, solve
from skipbench.policies import parse_policies
from skipbench.policies.spec import static_names
from skipbench.policies import router as routing
from skipbench.store.results import Shown, Written, check_out_dir, check_out_path, manifest, tidy, write_tables

MIN_TRAIN, MIN_VALIDATION = 8, 2


@dataclass(frozen=True, kw_only=True)
class RouteTrainConfig:
    runs: tuple[str, ...]
    features: str = "hidden"  # hidden | tfidf | length
    states: tuple[int, ...] = ()  # hidden: residual-stream states read (default: the middle and after the last)
    metric: str = "rougeL"
    policies: tuple[str, ...] = ()  # keep only these policies (full always stays)
    costs: tuple[int, ...] = ()  # keep only these costs (full always stays)
    out: str = "runs/route"
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True, kw_only=True)
class RouteCurveConfig:
    routers: tuple[str, ...]
    runs: tuple[str, ...]
    budgets: tuple[float, ...] = ()  # reported with intervals (default: 1/3, 1/2 and 2/3 of the layers)
    bootstrap: int = 1000  # item resamples for the intervals
    random_draws: int = 5  # random assignments averaged at each budget (and in each resample)
    seed: int = 0
    out: str = ""  # default: results/route-<dataset>.parquet
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class Scores:
    """Items x configurations of the metric, from evaluate runs of one model and dataset."""

    wide: pd.DataFrame  # index item_id, one column per configuration (its spec label)
    costs: list[float]
    model: str
    data: DataSpec  # split "all"
    max_prompt_tokens: int
    notes: list[str]

    @property
    def specs(self) -> list[str]:
        return list(self.wide.columns)


def _one(df: pd.DataFrame, column: str):
    values = df[column].dropna().unique() if column in df.columns else []
    if len(values) > 1:
        raise SkipbenchError(f"--runs mix {column} values ({', '.join(map(str, values))}); pass the runs of one")
    return values[0] if len(values) else None


def read_scores(runs: tuple[str, ...], metric: str, policies: tuple[str, ...] = (), costs: tuple[int, ...] = ()) -> Scores:
    if not runs:
        raise SkipbenchError("--runs: name the evaluate parquet file(s) that score the configurations")
    df = scores.read_runs(list(runs), metric)
    if "data_name" in df.columns and "dataset" not in df.columns:  # files written before `dataset` named the data
        df = df.rename(columns={"data_name": "dataset"})
    missing = [c for c in ("model", "dataset", "data_seed", "policy_spec") if c not in df.columns or df[c].isna().all()]
    if missing:
        raise SkipbenchError(f"--runs lacks column(s) {', '.join(missing)}; pass parquet files written by skipbench evaluate")
    # a router's items span the splits: `--split all`, or one file per split
    rows, notes = scores.load_scores(df.drop(columns=["split", "data_split", "data_limit", "run_id"], errors="ignore"),
                                     metric, (), policies, costs, static_names())
    wide, configs, config_costs, more, _ = scores.pivot(rows, metric)
    spec_of = rows.groupby("config")["policy_spec"].first()
    for c in configs:
        spec = parse_policies(spec_of[c])[0]
        if spec.strategy.kind != "static" or spec.strategy.own_model:
            what = "runs a model of its own" if spec.strategy.own_model else f"is {spec.strategy.kind}"
            raise SkipbenchError(f"a router chooses among static configurations (one plan per sequence of one "
                                 f"model); '{spec_of[c]}' {what}: leave it out with --policy/--costs")
    wide = wide.set_axis([spec_of[c] for c in configs], axis=1)
    field_of = {"prompt_field": _one(df, "data_prompt_field"), "reference_field": _one(df, "data_reference_field")}
    data = DataSpec(name=str(_one(df, "dataset")), split="all", seed=int(_one(df, "data_seed")), **field_of)
    cut = _one(df, "max_prompt_tokens")
    return Scores(wide=wide, costs=[float(c) for c in config_costs], model=str(_one(df, "model")), data=data,
                  max_prompt_tokens=int(cut) if cut is not None else 1024, notes=notes + more)


def split_scored(sc: Scores) -> dict[str, list]:
    """The scored items of each split (Item objects, in the split's order), the splits disjoint (split_items_of)."""
    splits = routing.split_items_of(sc.data)
    scored = set(sc.wide.index)
    unknown = scored - {it.item_id for items in splits.values() for it in items}
    if unknown:
        raise SkipbenchError(f"{len(unknown)} item(s) of --runs are not in dataset '{sc.data.name}' (seed "
                             f"{sc.data.seed}), e.g. {sorted(unknown)[0]}")
    return {s: [it for it in items if it.item_id in scored] for s, items in splits.items()}


# ---- train --------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RouteTrainResult(Written):
    router: routing.Router
    counts: dict[str, int]  # scored items per split
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:  # what a person sees
        self.shown = [Shown(f"router · {self.router.features.kind} · {self.counts['train']} train, "
                            f"{self.counts['validation']} validation items (squared error on validation)", self.validation)]
        self.said = [f"wrote {self.path}"]

    @property
    def validation(self) -> pd.DataFrame:
        r = self.router
        return pd.DataFrame({"configuration": r.configs, "cost": r.costs, "ridge_penalty": r.alphas,
                             "validation_mse": [r.meta["validation_mse"][c] for c in r.configs],
                             "constant_mse": [r.meta["validation_mse_constant"][c] for c in r.configs]})


def train(cfg: RouteTrainConfig, lm=None) -> RouteTrainResult:
    """`lm`: the runs' model already loaded (else it is loaded here)."""
    from skipbench.models import load_model

    check_out_dir(cfg.out)
    sc = read_scores(cfg.runs, cfg.metric, cfg.policies, cfg.costs)
    if len(sc.specs) < 2:
        raise SkipbenchError(f"--runs score one configuration ({sc.specs[0]}): a router needs two or more to choose from")
    by_split = split_scored(sc)
    n_tr, n_val = len(by_split["train"]), len(by_split["validation"])
    if n_tr < MIN_TRAIN or n_val < MIN_VALIDATION:
        raise SkipbenchError(f"--runs score {n_tr} train and {n_val} validation item(s) of '{sc.data.name}'; a router "
                             f"needs at least {MIN_TRAIN} and {MIN_VALIDATION}: run evaluate with --split all (it trains "
                             "on the train split, tunes on the validation split and is scored on the test split)")
    lm = lm or load_model(sc.model, cfg.device, cfg.dtype)
    if "full" not in sc.specs:
        sc.notes.append(f"no full-depth configuration among {', '.join(sc.specs)}")
    if cfg.states and cfg.features != "hidden":
        raise SkipbenchError("--states is for --features hidden")
    states = cfg.states or (routing.default_states(lm.num_layers) if cfg.features == "hidden" else ())
    feats = routing.Features(cfg.features, tuple(states), sc.max_prompt_tokens).check(lm.num_layers)
    y = {s: sc.wide.loc[[it.item_id for it in by_split[s]]].to_numpy() for s in ("train", "validation")}  # never test
    train_data = replace(sc.data, split="train")
    meta = {"num_layers": lm.num_layers, "model": sc.model, "metric": cfg.metric, "dataset": sc.data.__dict__,
            "train": {"data": train_data.__dict__},  # what evaluate's held-out check of learned policies reads
            "train_ids": [it.item_id for it in by_split["train"]],
            "validation_ids": [it.item_id for it in by_split["validation"]],
            "counts": {s: len(v) for s, v in by_split.items()}, "runs": list(cfg.runs),
            "manifest": manifest(cfg, lm=lm)}
    router = routing.fit(feats, lm, by_split["train"], by_split["validation"], y["train"], y["validation"], sc.specs,
                         sc.costs, sc.data.name, meta)
    path = routing.save(router, cfg.out)
    return RouteTrainResult(rows=pd.DataFrame(), path=path, router=router, counts=meta["counts"], notes=sc.notes)


# ---- curve --------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RouteCurveResult(Written):
    reported: list[float]
    test_items: int
    notes: list[str] = field(default_factory=list)

    def showing(self) -> "RouteCurveResult":
        """The result with what a person sees: the reported budgets' rows, the paired differences, the file."""
        return replace(self, shown=[Shown(f"route curve · {self.test_items} test items", self.summary),
                                    Shown("paired differences (95% bootstrap intervals over the same resamples)",
                                          self.differences.rename(columns={"method": "difference"}))],
                       said=[f"wrote {self.path}"] if self.path else [])

    @property
    def summary(self) -> pd.DataFrame:
        """The reported budgets' rows of the routers and the baselines, with their intervals."""
        t = self.rows
        keep = t["reported"] & ~t["method"].str.startswith("single:") & t["kind"].isna()
        columns = ["budget", "method", "value", "value_lo", "value_hi", "mean_cost", "share", "share_lo", "share_hi",
                   "share_over_blind", "share_over_blind_lo", "share_over_blind_hi"]
        return t.loc[keep, [c for c in columns if c in t]]  # no intervals with --bootstrap 0

    @property
    def differences(self) -> pd.DataFrame:
        """Paired differences of mean metric at the reported budgets: router against router, router against blind."""
        t = self.rows
        return t.loc[t["kind"] == "difference", [c for c in ("budget", "method", "value", "value_lo", "value_hi") if c in t]]


def default_budgets(num_layers: int) -> tuple[float, ...]:
    """1/3, 1/2 and 2/3 of the layers (rounded to whole layers)."""
    return tuple(float(round(num_layers * f)) for f in (1 / 3, 1 / 2, 2 / 3))


def router_names(folders: tuple[str, ...], routers: list[routing.Router]) -> list[str]:
    """router:<features> where one router has them, else router:<folder name>, else router:<folder path>."""
    kinds = [r.features.kind for r in routers]
    base = [Path(f).name for f in folders]
    return [f"router:{kinds[k]}" if kinds.count(kinds[k]) == 1 else f"router:{base[k]}" if base.count(base[k]) == 1
            else f"router:{folders[k]}" for k in range(len(folders))]


def curve(cfg: RouteCurveConfig, lm=None) -> RouteCurveResult:
    """`lm`: the runs' model already loaded (else it is loaded here)."""
    from skipbench.models import load_model

    if not cfg.routers:
        raise SkipbenchError("--router: name at least one folder written by skipbench route train")
    if cfg.bootstrap < 0 or cfg.random_draws < 1:
        raise SkipbenchError("--bootstrap must be >= 0 and --random-draws >= 1")
    routers = [routing.load(r) for r in cfg.routers]
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(routers[0].meta["dataset"].get("name", "runs")))
    out = check_out_path(cfg.out or f"results/route-{dataset}.parquet")
    first = routers[0]
    if len({Path(f).resolve() for f in cfg.routers}) < len(cfg.routers):
        raise SkipbenchError(f"--router names one folder twice ({', '.join(cfg.routers)})")
    names = router_names(cfg.routers, routers)
    for folder, r in zip(cfg.routers[1:], routers[1:]):
        if (r.configs, r.costs, r.meta.get("metric"), r.meta.get("dataset")) != (
                first.configs, first.costs, first.meta.get("metric"), first.meta.get("dataset")):
            raise SkipbenchError(f"'{folder}' was trained on other configurations, metric or dataset than "
                                 f"'{cfg.routers[0]}'; compare routers of one set of runs")
    metric = first.meta["metric"]
    sc = read_scores(cfg.runs, metric, tuple(first.configs))
    absent = [c for c in first.configs if c not in sc.specs]
    if absent:
        raise SkipbenchError(f"--runs do not score the routers' configuration(s) {', '.join(absent)}")
    if sc.data.__dict__ != first.meta["dataset"] or sc.model != first.meta["model"]:
        raise SkipbenchError(f"--runs are of {sc.model} on {sc.data.name} (seed {sc.data.seed}); the routers were "
                             f"trained on {first.meta['model']} on {first.meta['dataset'].get('name')} (seed "
                             f"{first.meta['dataset'].get('seed')})")
    by_split = split_scored(replace(sc, wide=sc.wide[first.configs]))
    test = by_split["test"]
    if len(test) < 2:
        raise SkipbenchError(f"--runs score {len(test)} test item(s); the curve is measured on the test split (run "
                             "evaluate with --split all or --split test)")
    for r in routers:
        routing.assert_disjoint({"train/validation": r.meta["train_ids"] + r.meta["validation_ids"],
                                 "test": [it.item_id for it in test]})
    lm = lm or load_model(sc.model, cfg.device, cfg.dtype)
    for folder, r in zip(cfg.routers, routers):
        r.check_model(lm, folder)
    V = sc.wide.loc[[it.item_id for it in test], first.configs].to_numpy()
    costs = np.array(first.costs)
    preds = {n: r.predict(lm, test, sc.data.name) for n, r in zip(names, routers)}
    blind = first.blind  # the configurations' train means: what a router that reads no prompt predicts
    noise = np.random.default_rng(cfg.seed).random((cfg.random_draws, len(test), len(costs)))
    reported = list(cfg.budgets or [b for b in default_budgets(first.num_layers) if b >= costs.min()])
    if not reported:
        raise SkipbenchError(f"1/3, 1/2 and 2/3 of the layers are all below the cheapest configuration "
                             f"({costs.min():g} layers): name the budgets with --budgets")
    for b in reported:
        routing.check_budget(b, costs, "--budgets" if cfg.budgets else "the default budgets (1/3, 1/2, 2/3 of the layers)")
    grid = sorted(set(range(math.ceil(costs.min()), int(costs.max()) + 1)) | set(reported))
    rows, assign = [], []
    for b in grid:
        point = _point(V, costs, b, preds, blind, noise)
        ci = _intervals(V, costs, b, preds, blind, noise, cfg.bootstrap, cfg.seed) if b in reported and cfg.bootstrap else {}
        for method, (value, mean_cost) in point.items():
            row = {"budget": float(b), "method": method, "value": value, "mean_cost": mean_cost, "reported": b in reported}
            row["gain"] = value - point["best-single"][0]
            gain = point["oracle"][0] - point["best-single"][0]
            row["share"] = row["gain"] / gain if gain > 1e-12 else math.nan
            over = point["oracle"][0] - point["blind"][0]
            row["share_over_blind"] = (value - point["blind"][0]) / over if over > 1e-12 else math.nan
            row |= ci.get(method, {})
            rows.append(row)
        if b in reported:  # paired differences, as their own rows (kind "difference")
            rows += [{"budget": float(b), "method": f"{x} - {y}", "kind": "difference", "value": point[x][0] - point[y][0],
                      "reported": True, **ci.get(f"{x} - {y}", {})} for x, y in _pairs(list(preds))]
        for k, spec in enumerate(first.configs):
            if costs[k] <= b + 1e-9:
                rows.append({"budget": float(b), "method": f"single:{spec}", "value": float(V[:, k].mean()),
                             "mean_cost": float(costs[k]), "reported": b in reported})
        if b in reported:
            for method, choice in [("oracle", routing.assign(V, costs, b)),
                                   *[(n, routing.assign(p, costs, b)) for n, p in preds.items()]]:
                assign.append(pd.DataFrame({"budget": float(b), "method": method, "item_id": [it.item_id for it in test],
                                            "config": [first.configs[k] for k in choice],
                                            "value": V[np.arange(len(test)), choice]}))
    table = pd.DataFrame(rows)
    if "kind" not in table:
        table["kind"] = None
    thin = table[table["reported"] & (table.get("share_resamples", 0) < cfg.bootstrap)] if cfg.bootstrap else table.iloc[:0]
    notes = sc.notes + ([f"at budget(s) {', '.join(f'{b:g}' for b in sorted(thin['budget'].unique()))} some resamples "
                         "had no oracle gain over the best single configuration: their share intervals use the others "
                         "(share_resamples)"] if len(thin) else [])
    notes = notes + [f"{n}: {r.features.kind} features" + (f" at states {list(r.features.states)}" if r.features.states else "")
                        + f", trained on {r.meta['counts']['train']} items, tuned on {r.meta['counts']['validation']}"
                        for n, r in zip(names, routers)]
    result = RouteCurveResult(rows=table, tables={"assign": pd.concat(assign, ignore_index=True)}, reported=reported,
                              test_items=len(test), notes=notes)
    return _write(cfg, out, result, routers, names, metric, len(test), lm)


def _point(V, costs, budget, preds, blind, noise) -> dict[str, tuple[float, float]]:
    """(true mean metric, mean cost) of each method at one budget, on the items of V. `blind`: the scores a router
    that reads no prompt predicts for every item; its knapsack picks a mixture of configurations, valued here as the
    mean over which items get which (the solver would otherwise hand full depth to the first items in order)."""
    rows = np.arange(len(V))

    def of(choice):
        return float(V[rows, choice].mean()), float(costs[choice].mean())

    fits = np.nonzero(costs <= budget + 1e-9)[0]
    best = fits[np.argmax(V[:, fits].mean(0))]  # the best single configuration within the budget, in hindsight
    truth = Instance(V, costs)
    g = greedy(truth, budget)
    out = {"oracle": of(solve(truth, budget).choice), "greedy": (g.value, g.mean_cost),  # = routing.assign(V, ...)
           "best-single": (float(V[:, best].mean()), float(costs[best]))}
    for name, p in preds.items():
        out[name] = of(routing.assign(p, costs, budget))
    mix = np.bincount(routing.assign(np.tile(blind, (len(V), 1)), costs, budget), minlength=len(costs)) / len(V)
    out["blind"] = (float(mix @ V.mean(0)), float(mix @ costs))
    # random scores: no information at all; the knapsack may leave budget unspent (their mean_cost says how much)
    draws = [of(routing.assign(u, costs, budget)) for u in noise]
    out["random"] = (float(np.mean([d[0] for d in draws])), float(np.mean([d[1] for d in draws])))
    return out


def _intervals(V, costs, budget, preds, blind, noise, resamples: int, seed: int) -> dict[str, dict]:
    """95% percentile intervals of each method's value, gain over the best single configuration and share of the
    oracle's gain, from one set of item resamples shared by every method (so their differences stay paired).
    Written here rather than with stats.bootstrap_interval, which resamples once per statistic: every statistic of a
    resample comes from the same knapsack solutions. A resample where the oracle gains nothing has no share."""
    rng = np.random.default_rng(seed)
    got: dict[str, dict[str, list]] = {}
    for _ in range(resamples):
        idx = rng.integers(0, len(V), len(V))
        point = _point(V[idx], costs, budget, {n: p[idx] for n, p in preds.items()}, blind, noise[:, idx])
        base, top, none = point["best-single"][0], point["oracle"][0], point["blind"][0]
        for method, (value, _) in point.items():
            g = got.setdefault(method, {"value": [], "gain": [], "share": [], "share_over_blind": []})
            g["value"].append(value)
            g["gain"].append(value - base)
            if top - base > 1e-12:
                g["share"].append((value - base) / (top - base))
            if top - none > 1e-12:
                g["share_over_blind"].append((value - none) / (top - none))
    out = {}
    for method, g in got.items():
        out[method] = {}
        for stat, values in g.items():
            lo, hi = np.quantile(values, [0.025, 0.975]) if len(values) >= 2 else (math.nan, math.nan)
            out[method] |= {f"{stat}_lo": float(lo), f"{stat}_hi": float(hi)}
        out[method]["share_resamples"] = len(g["share"])
    for a, b in _pairs(list(preds)):  # paired differences: what one router's features add over another's
        lo, hi = np.quantile(np.subtract(got[a]["value"], got[b]["value"]), [0.025, 0.975])
        out[f"{a} - {b}"] = {"value_lo": float(lo), "value_hi": float(hi)}
    return out


def _pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The differences reported: each router against every later router and against the prompt-blind mixture."""
    routers = [m for m in methods if m.startswith("router:")]
    return [(a, b) for i, a in enumerate(routers) for b in routers[i + 1:]] + [(a, "blind") for a in routers]


def _write(cfg, out: Path, result: RouteCurveResult, routers, names, metric, n_test, lm) -> RouteCurveResult:
    table = tidy(result.rows, cfg, skip=("out", "routers", "runs", "budgets"), metric=metric,
                 model=routers[0].meta.get("model"), dataset=routers[0].meta.get("dataset", {}).get("name"))
    meta = manifest(cfg, lm=lm, metric=metric, test_items=n_test, reported_budgets=result.reported,
                    routers={n: {"folder": f, "features": r.features.kind, "states": list(r.features.states),
                                 "configs": r.configs, "costs": r.costs, "alphas": r.alphas, "counts": r.meta.get("counts"),
                                 "validation_mse": r.meta.get("validation_mse"),
                                 "validation_mse_constant": r.meta.get("validation_mse_constant")}
                             for n, f, r in zip(names, cfg.routers, routers)},
                    interval_method=f"95% percentile bootstrap over test items, {cfg.bootstrap} resamples, paired "
                                    "across methods", random=f"mean of {cfg.random_draws} uniformly random score draws "
                                                            "through the same knapsack", notes=result.notes)
    from skipbench.analysis.plots import route_figure

    figure = route_figure(table, out.with_name(out.stem + ".png"), metric, routers[0].num_layers)  # before the table
    paths = write_tables(table, out, meta, **result.tables)
    return replace(result, rows=table, path=paths.pop("rows"), files=paths | {"figure": figure}).showing()
