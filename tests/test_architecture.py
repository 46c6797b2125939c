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

# lowest first; a module may import its own layer or any below it (docs/ARCHITECTURE.md draws this). The units are
# the package's folders (and the few modules left at its top): the layer map is the folder list.
LAYERS = [
    {"skipbench", "errors", "keyed"},
    {"store"},
    {"analysis"},
    {"models"},
    {"data", "tasks"},
    {"engine"},
    {"policies"},
    {"evaluation", "training"},
    {"experiments", "lmeval"},
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
            subs = {f"{node.module}.{a.name}" for a in node.names
                    if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()}
            found |= subs
            if len(subs) < len(node.names):  # a name of the module itself, not only its submodules
                found.add(node.module)
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
    ("skipbench.evaluation.quality", "run"), ("skipbench.experiments.cosine", "run"), ("skipbench.experiments.bench", "run"),
    ("skipbench.experiments.oracle", "run"), ("skipbench.experiments.controllers", "run_sweep"),
    ("skipbench.experiments.flexidepth", "run_usage")])
def test_every_table_writing_recipe_returns_the_shared_result(module, function):
    """One kind of result (rows, path, the companion tables and files by name), whatever the recipe adds to it."""
    import importlib
    import typing

    from skipbench.store.results import Written

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


NO_MODEL = {"models", "engine", "policies", "evaluation", "training"}


def parents(module: str) -> list[str]:
    """The packages importing `module` runs first: skipbench.data.heldout runs skipbench.data's __init__."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def closure(g: dict[str, set[str]], start: str) -> set[str]:
    """Every skipbench module `start` imports, directly or through others, at the top or inside a function, with
    the packages above each (their __init__ runs too)."""
    seen, todo = set(), [start, *parents(start)]
    while todo:
        m = todo.pop()
        for t in [*g.get(m, ()), *parents(m)]:
            if t in g and t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


# libraries that import torch themselves
TORCH_LIKE = ("torch", "safetensors.torch", "transformers", "accelerate", "lm_eval", "peft")


def imports_torch(module: str) -> bool:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    names = [a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]
    return any(name == lib or name.startswith(lib + ".") for name in names for lib in TORCH_LIKE)


def test_the_torch_check_sees_every_spelling():
    """imports_torch is what the no-torch test below leans on: it must see a library that imports torch itself."""
    assert imports_torch("skipbench.store.checkpoints")  # safetensors.torch, inside a function
    assert imports_torch("skipbench.models.loading") and not imports_torch("skipbench.store.readers")
    assert "skipbench.data" in closure({"skipbench.data.heldout": set(), "skipbench.data": set()}, "skipbench.data.heldout")


def test_analysis_and_the_report_run_no_model_and_no_torch():
    """Numbers from written results need no model: no analysis module, and not the report recipe, imports a model,
    engine, policy, evaluation or training module, or torch, however indirectly (function-level imports included)."""
    g = graph()
    for m in sorted(x for x in g if unit(x) == "analysis" or x == "skipbench.experiments.report"):
        reached = closure(g, m) | {m}
        assert not {unit(t) for t in reached} & NO_MODEL, (m, sorted(t for t in reached if unit(t) in NO_MODEL))
        assert not [t for t in reached if imports_torch(t)], (m, [t for t in reached if imports_torch(t)])
    code = "import sys; import skipbench.experiments.report, skipbench.analysis.verdicts; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


CLI_SUPPORT = {"__init__", "group", "options", "display"}


def test_cli_command_bodies_are_short_and_only_display_builds_tables():
    """A command body builds a config, runs the recipe under a progress bar and shows its result: at most about 15
    statements (docstring and imports excluded). Only cli/display.py builds a table."""
    long = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        builds = [n for n in ast.walk(tree) if (isinstance(n, ast.ImportFrom) and (n.module == "rich.table" or (
            n.module == "rich" and any(a.name == "table" for a in n.names)))) or (isinstance(n, ast.Import) and any(
            a.name == "rich.table" for a in n.names))]
        assert not builds or path.stem == "display", f"cli/{path.name} builds a table; only cli/display.py does"
        if path.stem in CLI_SUPPORT:
            continue
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.args.args):
            body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                    and not isinstance(s, (ast.Import, ast.ImportFrom))]
            if len(body) > 15:
                long.append(f"{path.stem}.{fn.name}: {len(body)}")
    assert not long, long
    sizes = {p.stem: len(p.read_text().splitlines()) for p in (PACKAGE / "cli").glob("*.py")}
    assert sizes["__init__"] <= 80 and max(sizes.values()) <= 250, sizes


def test_the_top_of_the_package_holds_only_the_few_shared_modules():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "errors.py", "keyed.py", "lmeval.py"]


@pytest.mark.slow
def test_the_wheel_ships_the_presets_and_reproduce_finds_them(tmp_path):
    """Presets are package data: a wheel built from the repository holds them, and the installed package (not this
    checkout) finds the smoke preset."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools leaves a build/ folder beside the sources it builds
    shutil.copytree(PACKAGE, source / "skipbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PACKAGE.parent / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("skipbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"skipbench/experiments/presets/{p}.toml" for p in ("smoke", "quick", "paper")} <= set(names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "import skipbench; print(skipbench.__file__); from skipbench.cli import app; app(['reproduce', '--preset', 'smoke', '--dry-run'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(target)})
    assert res.stdout.startswith(str(target)), res.stdout + res.stderr  # the installed copy, not the checkout
    assert "skipbench evaluate" in res.stderr and "skipbench report" in res.stderr, res.stderr
