"""Commands that say what there is: plan (a static plan's layers), policies, models, datasets."""

from __future__ import annotations

from typing import Optional

import typer

from skipbench.cli import display
from skipbench.cli.options import Device, DeviceOpt, Dtype, DtypeOpt, PolicyOptions, one_spec


def plan(
    layers: Optional[int] = typer.Option(None, help="number of decoder layers L (default: the model's, when --model "
                                                    "is given or the policy is computed from a model)"),
    cost: Optional[int] = typer.Option(None, "--costs", help="layers to execute c (a policy given without its argument)"),
    policy: str = typer.Option("uniform", help="a static or per-sequence policy: uniform:C | early-exit:E | random:C | "
                               "layers:0,3,5 | full | block-influence:C | angular:C | a plugin's"),
    exit_layer: Optional[int] = typer.Option(None, help="early-exit: number of layers run before the exit"),
    keep: Optional[str] = typer.Option(None, help="layers: comma-separated 0-based layer indices"),
    seed: int = typer.Option(0, help="random: the seed of the draw"),
    data_seed: int = typer.Option(0, help="calibrated plans: the seed of the dataset's 70/15/15 split"),
    first_layer: bool = typer.Option(True, help="random: always run layer 0"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a model (policies computed from its states need "
                                                                  "one; default then: the embedded model)"),
    dataset: str = typer.Option("text", "--dataset", "-d", help="calibration prompts: this dataset's train split"),
    policy_option: Optional[list[str]] = PolicyOptions,
    device: Device = DeviceOpt,
    dtype: Dtype = DtypeOpt,
) -> None:
    """Print the 0-based layer indices a static plan executes (and the table it was chosen from, if any).

    Example: skipbench plan --layers 24 --costs 12 --policy uniform   # 0 2 4 ... 22
    Example: skipbench plan --policy block-influence --costs 15 --dataset text
    """
    from skipbench.experiments.plan import PlanConfig, run

    spec = one_spec(policy, cost=cost, exit_layer=exit_layer, keep=keep, seed=seed, first_layer=first_layer,
                    policy_options=policy_option)
    display.result(run(PlanConfig(policy=spec, layers=layers, model=model, dataset=dataset, data_seed=data_seed,
                                  device=device, dtype=dtype)))


def policies() -> None:
    """List the skipping strategies (built-in and plugins): kind, argument, KV modes.

    Example: skipbench policies
    """
    import pandas as pd

    from skipbench.policies.spec import describe

    display.show(pd.DataFrame(describe()), "skipbench policies", width=160)
    typer.echo("Write NAME:ARG, several separated by commas; numbers after a comma continue the argument "
               "(uniform:8,15,22 is a sweep, layers:0,3,5 one set).")


def models() -> None:
    """List the known model aliases, their families, and which load offline.

    Example: skipbench models
    """
    import pandas as pd

    from skipbench.models.loading import ALIASES, available_offline

    display.show(pd.DataFrame([{"alias": alias, "hub id": hub_id, "family": family,
                                "offline": "yes" if available_offline(alias) else "no"}
                               for alias, (hub_id, family) in ALIASES.items()]), "skipbench models")
    typer.echo("Also accepted: any hub id (org/name), a local model directory, or a .gguf file.")


def datasets() -> None:
    """List the built-in and hub datasets with sizes and fields.

    Example: skipbench datasets
    """
    import pandas as pd

    from skipbench.data import catalogue

    df = pd.DataFrame(catalogue())
    df["items"] = ["(hub)" if pd.isna(x) else str(int(x)) for x in df["items"]]
    display.show(df.fillna(""), "skipbench datasets")
    typer.echo("Files: Alpaca JSON/JSONL (instruction, input, output), or JSONL/CSV/parquet with --prompt-field/--reference-field.")


COMMANDS = {"plan": plan, "policies": policies, "models": models, "datasets": datasets}
