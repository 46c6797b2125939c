"""Commands on written evaluate results: the sequence-level oracle, and prompt-level routers against it (route)."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display
from skipbench.cli.group import group
from skipbench.cli.options import Device, DeviceOpt, Dtype, DtypeOpt, Runs, floats, ints, names
from skipbench.policies.spec import STRATEGIES

route = group("A prompt-level router against the oracle: which configuration to run, decided from the prompt alone.")
Keep = typer.Option(None, "--policy", help="keep only these policies (full always stays), comma-separated or repeated")
KeepCosts = typer.Option("", help="keep only configurations of these costs (full always stays), comma-separated")


def oracle(
    runs: Optional[list[str]] = typer.Option(None, "--runs", help="evaluate parquet file(s); default: "
                                             "results/evaluate-*.parquet, the paper's configurations, one oracle per "
                                             "model/dataset/split"),
    budget: Optional[float] = typer.Option(None, help="mean executed layers per token allowed"),
    curve: bool = typer.Option(False, "--curve", help="every budget from the cheapest to the dearest configuration"),
    budgets: str = typer.Option("", help="the curve's budgets, comma-separated (default: every integer)"),
    metric: str = typer.Option("rougeL", help="rougeL | full_rougeL | exact_match | any numeric column"),
    policy: Optional[list[str]] = Keep,
    costs: str = KeepCosts,
    length_budgets: str = typer.Option("", help="budgets for the label-length test besides the star and --budget "
                                       "(default with --curve: the paper's 6 and 24 of 24 layers, scaled)"),
    bootstrap: int = typer.Option(2000, help="item resamples for the star budget's 95% interval (0: none)"),
    out: Optional[str] = typer.Option(None, help="parquet of (budget, method) rows; -assign, -length parquet and PNGs beside it"),
) -> None:
    """The exact sequence-level knapsack oracle and the greedy oracle (Glavas et al. Sec. 3.3).

    With no --runs: every results/evaluate-*.parquet, one oracle per (model, dataset, split), among the paper's
    configurations (uniform skipping at 1/6, 1/3 and 1/2 of the layers, and full depth) unless --policy or
    --costs name others.

    Example: skipbench oracle --budget 6
             skipbench oracle --runs results/eval-alpaca.parquet --curve --length-budgets 6,24 --out results/oracle.parquet
    """
    from skipbench.experiments.oracle import OracleConfig, run_groups

    results, notes = run_groups(OracleConfig(
        runs=tuple(runs or ()), metric=metric, budget=budget, curve=curve, budgets=floats(budgets, "--budgets"),
        policies=names(policy), costs=ints(costs, "--costs"), length_budgets=floats(length_budgets, "--length-budgets"),
        bootstrap=bootstrap, out=out))
    for message in notes:
        display.note(message)
    for res in results:
        display.result(res)


@route.command("train")
def route_train(
    runs: list[str] = Runs,
    features: str = typer.Option("hidden", help="hidden (the prompt's residual stream) | tfidf (its words) | length"),
    states: str = typer.Option("", help="hidden: residual-stream states to read, 0..L (default: L/2 and L)"),
    metric: str = typer.Option("rougeL", help="the per-item score the router predicts"),
    policy: Optional[list[str]] = Keep,
    costs: str = KeepCosts,
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: str = typer.Option(STRATEGIES.get("route").default_arg, help="router folder (replaced)"),
) -> None:
    """Fit a router: one ridge regressor per configuration from the prompt's features, on the train split's items,
    its penalty tuned on the validation split's; the test split is not read.

    Example: skipbench route train --runs results/evaluate-text.parquet --features hidden --out runs/route-text
    """
    from skipbench.experiments.route import RouteTrainConfig, train

    display.result(train(RouteTrainConfig(runs=tuple(runs), features=features, states=ints(states, "--states"),
                                          metric=metric, policies=names(policy), costs=ints(costs, "--costs"),
                                          device=device, dtype=dtype, out=out)))


@route.command("curve")
def route_curve(
    router: list[str] = typer.Option(..., "--router", help="router folder(s) written by 'route train'"),
    runs: list[str] = Runs,
    budgets: str = typer.Option("", help="budgets reported with intervals (default: 1/3, 1/2 and 2/3 of the layers)"),
    bootstrap: int = typer.Option(1000, help="item resamples for the 95% intervals (0: none)"),
    random_draws: int = typer.Option(5, help="random assignments averaged per budget (and per resample)"),
    seed: int = typer.Option(0, help="seed of the resamples and the random assignments"),
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
    out: str = typer.Option("", help="parquet of (budget, method) rows, -assign parquet and PNG beside it (default "
                            "results/route-<dataset>.parquet)"),
) -> None:
    """The routers on the test items, beside the exact and greedy oracle, the single configurations and a random
    assignment at each budget; the share of the oracle's gain each captures, with 95% bootstrap intervals.

    Example: skipbench route curve --router runs/route-text --runs results/evaluate-text.parquet --out results/route-text.parquet
    """
    from skipbench.experiments.route import RouteCurveConfig, curve

    display.result(curve(RouteCurveConfig(routers=tuple(router), runs=tuple(runs), budgets=floats(budgets, "--budgets"),
                                          bootstrap=bootstrap, random_draws=random_draws, seed=seed, device=device,
                                          dtype=dtype, out=out)))


COMMANDS = {"oracle": oracle}
GROUPS = {"route": route}
