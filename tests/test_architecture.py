"""The package's layering, read from its source: imports only point down, never in a cycle; and the promise of
the design, that a strategy is one file plus a registry entry, holds for a third-party plugin."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skipbench"

# lowest first; a module may import its own layer or any below it (docs/ARCHITECTURE.md draws this)
LAYERS = [
    {"skipbench", "errors", "readers", "keyed", "stats", "metrics", "oracle"},
    {"distributed", "results", "checkpoints", "plots"},
    {"models"},
    {"data", "tasks"},
    {"engine"},
    {"policies"},
    {"training", "scores", "verdicts", "evaluation", "fidelity", "draft_search", "lmeval", "lmeval_sweep"},
    {"experiments"},
    {"report"},
    {"cli", "__main__"},
]
RANK = {unit: r for r, units in enumerate(LAYERS) for unit in units}

RECIPE_DEBT: set = set()  # recipe-to-recipe imports still to remove (none: shared machinery is a library)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "skipbench"


def imports(path: Path) -> set[str]:
    """Every skipbench module this file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("skipbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skipbench"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()}
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_imports_only_point_down():
    g = graph()
    outside = sorted({unit(x) for m, ts in g.items() for x in (m, *ts)} - set(RANK))
    assert not outside, f"modules outside the layer map: {outside}"
    upward = sorted(f"{m} -> {t}" for m, targets in g.items() for t in targets if RANK[unit(t)] > RANK[unit(m)])
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in g.get(m, ()):
            if t not in g or t == m:
                continue
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]) if t in path else f"{m} -> {t}")
            if state.get(t) is None:
                visit(t, path + [t])
        state[m] = 2

    for m in g:
        if state.get(m) is None:
            visit(m, [m])


def test_recipes_do_not_import_each_other():
    g = graph()
    edges = {(m.removeprefix("skipbench."), t.removeprefix("skipbench.")) for m, targets in g.items() for t in targets
             if unit(m) == unit(t) == "experiments" and m != t and t != "skipbench.experiments"}
    assert edges <= RECIPE_DEBT, f"new recipe-to-recipe imports: {sorted(edges - RECIPE_DEBT)}"


@pytest.mark.parametrize("module, function", [
    ("skipbench.evaluation", "run"), ("skipbench.experiments.cosine", "run"), ("skipbench.experiments.bench", "run"),
    ("skipbench.experiments.oracle", "run"), ("skipbench.experiments.controllers", "run_sweep"),
    ("skipbench.experiments.flexidepth", "run_usage")])
def test_every_table_writing_recipe_returns_the_shared_result(module, function):
    """One kind of result (rows, path, the companion tables and files by name), whatever the recipe adds to it."""
    import importlib
    import typing

    from skipbench.results import Written

    returned = typing.get_type_hints(getattr(importlib.import_module(module), function))["return"]
    assert issubclass(returned, Written)


def test_engine_imports_no_policy():
    g = graph()
    assert not [t for m, ts in g.items() if unit(m) == "engine" for t in ts if unit(t) == "policies"]


def test_plan_oracle_and_help_need_no_torch(tmp_path):
    code = textwrap.dedent("""
        import sys
        from skipbench.cli import app
        import pandas as pd
        pd.DataFrame({"item_id": [0, 1, 0, 1], "policy": ["full", "full", "uniform", "uniform"], "cost": [4, 4, 2, 2],
                      "rougeL": [0.5, 0.4, 0.3, 0.6]}).to_parquet(sys.argv[1])
        codes = []
        for argv in (["--help"], ["plan", "--layers", "24", "--policy", "uniform:12"], ["policies"],
                     ["oracle", "--runs", sys.argv[1], "--budget", "3", "--out", sys.argv[2]]):
            codes.append(app(argv, standalone_mode=False))
        print(codes, "TORCH" if "torch" in sys.modules else "NO-TORCH")
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs.parquet"), str(tmp_path / "o.parquet")],
                         capture_output=True, text=True, check=True, cwd=PACKAGE.parent).stdout
    assert out.strip().endswith("[0, 0, 0, 0] NO-TORCH"), out
    assert (tmp_path / "o.parquet").exists()


PLUGIN = '''
from skipbench.engine.protocol import Policy
from skipbench.policies import Strategy


class LastLayers(Policy):
    """Runs only the last C layers: a toy strategy living outside skipbench."""

    def __init__(self, num_layers, cost):
        super().__init__(num_layers)
        self.layers = list(range(num_layers - cost, num_layers))
        self.name = f"last:{cost}"

    def gate(self, layer, hidden):
        return layer in self.layers

    def executed_layers(self):
        return self.layers


def build(spec, ctx):
    return LastLayers(ctx.num_layers, spec.int_arg())


def plan(spec, ctx):
    return list(range(ctx.num_layers - spec.int_arg(), ctx.num_layers))


STRATEGY = Strategy(name="last", build=build, plan=plan, kind="static", arg="cost", help="the last C layers (a plugin)")
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A tiny installed distribution that registers a strategy through the `skipbench.policies` entry points."""
    (tmp_path / "skipbench_last.py").write_text(PLUGIN)
    info = tmp_path / "skipbench_last-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: skipbench-last\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[skipbench.policies]\nlast = skipbench_last:STRATEGY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from skipbench.policies import STRATEGIES

    STRATEGIES.reload_plugins()
    yield
    STRATEGIES._entries.pop("last", None)


def test_a_plugin_strategy_works_in_every_command(plugin, tiny_dirs, tmp_path):
    """plan, generate, evaluate, cosine, bench and the oracle, with no edit to skipbench."""
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from skipbench.cli import app

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    model = tiny_dirs["llama"]
    res = run("plan", "--layers", 6, "--policy", "last:2")
    assert res.exit_code == 0 and res.stdout.split() == ["4", "5"]
    res = run("generate", "--model", model, "--policy", "last:3", "--prompt", "hi", "--max-new-tokens", 4, "--json")
    assert res.exit_code == 0, res.output
    used = {tuple(r) for r in json.loads(res.stdout)["layers_per_token"]}
    assert used == {(3, 4, 5)}
    ev = tmp_path / "ev.parquet"
    res = run("evaluate", "--model", model, "--dataset", "text", "--limit", 3, "--policy", "last:2,4",
              "--max-new-tokens", 4, "--out", ev)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(ev)
    assert set(df["policy_spec"]) == {"full", "last:2", "last:4"} and set(df["cost"]) == {2, 4, 6}
    res = run("oracle", "--runs", ev, "--policy", "last", "--budget", 6, "--out", tmp_path / "o.parquet")
    assert res.exit_code == 0, res.output
    assert {"share:last:2", "share:last:4"} <= set(pd.read_parquet(tmp_path / "o.parquet").columns)
    res = run("policies")
    assert res.exit_code == 0 and "last" in res.stdout and "plugin" in res.stdout
    res = run("cosine", "--model", model, "--dataset", "text", "--limit", 2, "--policy", "last,uniform",
              "--costs", 2, "--max-new-tokens", 3, "--out", tmp_path / "cos.parquet")
    assert res.exit_code == 0, res.output
    assert "last" in set(pd.read_parquet(tmp_path / "cos.parquet")["strategy"])
    res = run("bench", "--model", model, "--policy", "full,last:3", "--batch-sizes", 1, "--max-new-tokens", 3,
              "--repeats", 1, "--warmup", 0, "--out", tmp_path / "b.parquet")
    assert res.exit_code == 0, res.output
    variants = set(pd.read_parquet(tmp_path / "b.parquet")["variant"])
    assert {"last:3", "removed:last:3"} <= variants
