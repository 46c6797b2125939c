"""Bad inputs, command by command: missing, empty, truncated and garbage files of every kind a command reads; values
out of range; outputs that cannot be written; checkpoints of the wrong kind, model or depth. Each must end in exit
code 1, exactly one line on stderr, no traceback, and no new or changed file where results go."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tiny_dirs, tmp_path_factory):
    """A tiny model, trained controllers and FlexiDepth folders, and one evaluate result, to damage copies of."""
    root = tmp_path_factory.mktemp("world")
    model = str(tiny_dirs["llama"])
    common = ["--model", model, "--dataset", "arith", "--limit", "4", "--steps", "1", "--batch-size", "2",
              "--max-new-tokens", "2"]
    for args in (["controllers", "train", *common, "--out", root / "ctrl"],
                 ["flexidepth", "train", *common, "--out", root / "flexi"],
                 ["evaluate", "--model", model, "--dataset", "arith", "--split", "test", "--limit", "2", "--policy",
                  "uniform:3", "--max-new-tokens", "2", "--out", root / "results" / "evaluate-uniform-arith.parquet"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    (root / "a-file").write_text("not a folder")
    return {"root": root, "model": model}


def _copy(world, name: str, tmp: Path) -> Path:
    return Path(shutil.copytree(world["root"] / name, tmp / name))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not what the name says {[")


def _edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    (folder / "config.json").write_text(json.dumps(meta))


def _weights_of_another_depth(folder: Path, kind: str, layers: int = 8, hidden: int = 64) -> None:
    """Tensors and config of a module trained for another model (another depth or width)."""
    from safetensors.torch import save_file

    if kind == "controllers":
        from skipbench.policies.controller import Controllers

        module = Controllers(hidden, layers, "hidden")
        extra = {"hidden_size": hidden, "num_layers": layers, "input": "hidden"}
    else:
        from skipbench.policies.flexidepth import FlexiDepth

        module = FlexiDepth(hidden, layers, reduction=4)
        extra = module.config()
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "weights.safetensors"))
    _edit_config(folder, **extra)


def _tensor_of_another_shape(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "weights.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name][..., :1].contiguous()
    save_file(weights, str(folder / "weights.safetensors"))


def _model_folder(world, tmp: Path, damage) -> Path:
    folder = Path(shutil.copytree(world["model"], tmp / "model"))
    damage(folder)
    return folder


def _evaluate(world, out, *more):
    """evaluate with these options; an option given in `more` replaces the base one (a repeat is refused)."""
    args = ["evaluate", "--model", world["model"], "--dataset", "arith", "--split", "test", "--limit", "2",
            "--max-new-tokens", "2", "--out", out]
    more = list(more)
    while more:
        flag = more.pop(0)
        value = more.pop(0) if more and not str(more[0]).startswith("--") else None
        if flag in args and value is not None and flag not in ("--policy", "-o", "--policy-option"):
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    return args


def _policy(world, out, flag, folder):
    return _evaluate(world, out, "--policy", "controller" if flag == "--controller" else "flexidepth", flag, folder)


# (name, prepare(world, tmp) -> argv, the message's telling part). `out` (tmp/out) is where results would go.
CASES = [
    # datasets
    ("dataset not JSON", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--dataset", _write(t / "d.json", "{oops")),
     "is not valid JSON"),
    ("dataset JSON not a list", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--dataset", _write(t / "d.json", '{"a": 1}')),
     "holds a JSON dict, not a list"),
    ("dataset empty", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--dataset", _write(t / "d.json", "")), "is empty"),
    ("dataset truncated parquet", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--dataset", _cut_parquet(t / "d.parquet")),
     "is not a readable parquet table"),
    ("dataset missing", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--dataset", t / "none.jsonl"), "not found"),
    # values out of range
    ("evaluate batch size negative", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--batch-size", "-1"),
     "greater than or equal to 0"),
    ("cosine batch size negative", lambda w, t: ["cosine", "--model", w["model"], "--batch-size", "-2", "--out",
                                                t / "out" / "c.parquet"], "greater than or equal to 0"),
    ("usage batch size 0", lambda w, t: ["flexidepth", "usage", "--model", w["model"], "--router", w["root"] / "flexi",
                                        "--batch-size", "0", "--out", t / "out" / "u.parquet"], "greater than or equal to 1"),
    ("train batch size 0", lambda w, t: ["controllers", "train", "--model", w["model"], "--batch-size", "0", "--out",
                                        t / "out" / "run"], "greater than or equal to 1"),
    ("bench batch size 0", lambda w, t: ["bench", "--model", w["model"], "--batch-sizes", "0", "--out",
                                        t / "out" / "b.parquet"], "batch sizes >= 1"),
    # outputs that cannot be written (a file where a folder must be)
    ("evaluate out under a file", lambda w, t: _evaluate(w, w["root"] / "a-file" / "e.parquet"), "cannot be written"),
    ("cosine out under a file", lambda w, t: ["cosine", "--model", w["model"], "--out", w["root"] / "a-file" / "c.parquet"],
     "cannot be written"),
    ("bench out under a file", lambda w, t: ["bench", "--model", w["model"], "--out", w["root"] / "a-file" / "b.parquet"],
     "cannot be written"),
    ("oracle out under a file", lambda w, t: ["oracle", "--runs", w["root"] / "results" / "evaluate-uniform-arith.parquet",
                                             "--budget", "3", "--out", w["root"] / "a-file" / "o.parquet"], "cannot be written"),
    ("report out under a file", lambda w, t: ["report", "--results", w["root"] / "results", "--out",
                                             w["root"] / "a-file" / "R.md"], "cannot be written"),
    ("controllers train out under a file", lambda w, t: ["controllers", "train", "--model", w["model"], "--out",
                                                        w["root"] / "a-file" / "run"], "cannot be written"),
    ("flexidepth train out is a file", lambda w, t: ["flexidepth", "train", "--model", w["model"], "--out",
                                                    w["root"] / "a-file"], "cannot be written"),
    ("finetune out under a file", lambda w, t: ["finetune", "--model", w["model"], "--out", w["root"] / "a-file" / "ft"],
     "cannot be written"),
    ("depthmap out under a file", lambda w, t: ["flexidepth", "depthmap", "--model", w["model"], "--router",
                                               w["root"] / "flexi", "--prompt", "hi", "--out", w["root"] / "a-file" / "m.html"],
     "cannot be written"),
    # result files read back
    ("oracle runs not parquet", lambda w, t: ["oracle", "--runs", _write(t / "r.parquet", "a,b\n1,2\n"), "--budget", "3"],
     "is not a readable parquet table"),
    ("oracle runs truncated", lambda w, t: ["oracle", "--runs", _cut_parquet(t / "r.parquet"), "--budget", "3"],
     "is not a readable parquet table"),
    ("oracle runs missing", lambda w, t: ["oracle", "--runs", t / "none.parquet", "--budget", "3"], "does not exist"),
    ("report result garbage", lambda w, t: ["report", "--results", _results_with(w, t, _garbage), "--out", t / "out" / "R.md"],
     "is not a readable parquet table"),
    ("report result lacking a column", lambda w, t: ["report", "--results", _results_with(
        w, t, lambda f: pd.read_parquet(f).drop(columns=["full_rougeL"]).to_parquet(f)), "--out", t / "out" / "R.md"],
     "lacks a column the report's evaluate section reads (Label(s) ['full_rougeL']"),
    ("controllers with an unknown training record", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller", _damaged(
        w, t, "ctrl", lambda f: _edit_config(f, train={"data": {"name": "arith", "colour": "red"}}))), "cannot rebuild"),
    ("report preset record garbage", lambda w, t: ["report", "--results", _results_with(
        w, t, lambda f: _garbage(_made(f.parent / ".reproduce" / "preset.json"))), "--out", t / "out" / "R.md"],
     "is not valid JSON"),
    # trained folders used as policies
    ("controllers config not JSON", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller",
                                                         _damaged(w, t, "ctrl", lambda f: _garbage(f / "config.json"))),
     "is not valid JSON"),
    ("controllers weights truncated", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller",
                                                           _damaged(w, t, "ctrl", lambda f: _truncate(f / "weights.safetensors"))),
     "is not a readable safetensors file"),
    ("controllers weights empty", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller",
                                                       _damaged(w, t, "ctrl", lambda f: _write(f / "weights.safetensors", ""))),
     "is empty"),
    ("controllers folder of another kind", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller", w["root"] / "flexi"),
     "holds a 'flexidepth' checkpoint, not 'controllers'"),
    ("controllers of another depth", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller", _damaged(
        w, t, "ctrl", lambda f: _weights_of_another_depth(f, "controllers"))), "(8 layers, hidden size 64); this model has 6"),
    ("controllers of another width", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller", _damaged(
        w, t, "ctrl", lambda f: _weights_of_another_depth(f, "controllers", 6, 32))), "hidden size 32); this model has 6 layers, hidden size 64"),
    ("controllers config lacks a field", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller", _damaged(
        w, t, "ctrl", lambda f: _edit_config(f, input=None))), "lacks the field 'input'"),
    ("controllers tensor of another shape", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller", _damaged(
        w, t, "ctrl", _tensor_of_another_shape)), "its config describes"),
    ("flexidepth weights garbage", lambda w, t: ["flexidepth", "usage", "--model", w["model"], "--router", _damaged(
        w, t, "flexi", lambda f: _garbage(f / "weights.safetensors")), "--out", t / "out" / "u.parquet"],
     "is not a readable safetensors file"),
    ("flexidepth of another depth", lambda w, t: _policy(w, t / "out" / "e.parquet", "--router", _damaged(
        w, t, "flexi", lambda f: _weights_of_another_depth(f, "flexidepth"))), "this model has 6"),
    ("flexidepth config not JSON", lambda w, t: ["flexidepth", "depthmap", "--model", w["model"], "--router", _damaged(
        w, t, "flexi", lambda f: _truncate(f / "config.json")), "--prompt", "hi", "--out", t / "out" / "m.html"],
     "is not valid JSON"),
    # checkpoints resumed by training
    ("resume with config not JSON", lambda w, t: ["controllers", "train", "--model", w["model"], "--dataset", "arith",
                                                 "--limit", "4", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "2",
                                                 "--out", _damaged(w, t, "ctrl", lambda f: _garbage(f / "config.json"))],
     "is not valid JSON"),
    ("resume with trainer state damaged", lambda w, t: ["controllers", "train", "--model", w["model"], "--dataset", "arith",
                                                       "--limit", "4", "--steps", "2", "--batch-size", "2", "--max-new-tokens",
                                                       "2", "--out", _damaged(w, t, "ctrl", lambda f: _truncate(f / "trainer.pt"))],
     "cannot be loaded"),
    ("resume a torn checkpoint", lambda w, t: ["controllers", "train", "--model", w["model"], "--dataset", "arith",
                                              "--limit", "4", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "2",
                                              "--out", _damaged(w, t, "ctrl", lambda f: _edit_config(f, step=7))],
     "a save was cut short"),
    # model folders
    ("model config not JSON", lambda w, t: ["generate", "--prompt", "hi", "--model", _model_folder(
        w, t, lambda f: _garbage(f / "config.json"))], "cannot be loaded"),
    ("model weights truncated", lambda w, t: ["generate", "--prompt", "hi", "--model", _model_folder(
        w, t, lambda f: _truncate(f / "model.safetensors"))], "cannot be loaded"),
    ("model tokenizer damaged", lambda w, t: ["generate", "--prompt", "hi", "--model", _model_folder(
        w, t, lambda f: _garbage(f / "tokenizer.json"))], "cannot be loaded"),
    ("controllers config empty", lambda w, t: _policy(w, t / "out" / "e.parquet", "--controller",
                                                      _damaged(w, t, "ctrl", lambda f: _write(f / "config.json", ""))),
     "is empty"),
    # other commands
    ("dataset JSON of values", lambda w, t: _evaluate(w, t / "out" / "e.parquet", "--dataset", _write(t / "d.json", "[1, 2]")),
     "holds a list of values, not of records"),
    ("plan calibrated on a garbage dataset", lambda w, t: ["plan", "--policy", "block-influence", "--costs", "3", "--model",
                                                          w["model"], "--dataset", _write(t / "d.json", "{oops")],
     "is not valid JSON"),
    ("sweep batch size 0", lambda w, t: ["controllers", "sweep", "--model", w["model"], "--batch-size", "0", "--out",
                                        t / "out" / "s.parquet"], "greater than or equal to 1"),
    ("sweep eval limit negative", lambda w, t: ["controllers", "sweep", "--model", w["model"], "--eval-limit", "-1",
                                               "--out", t / "out" / "s.parquet"], "--eval-limit must be >= 0"),
    ("sweep train limit negative", lambda w, t: ["controllers", "sweep", "--model", w["model"], "--train-limit", "-2",
                                                "--out", t / "out" / "s.parquet"], "--train-limit must be >= 0"),
    ("bench-oracle items negative", lambda w, t: ["bench-oracle", "--items", "-1"], "greater than or equal to 1"),
    ("report out is a folder", lambda w, t: ["report", "--results", w["root"] / "results", "--out", w["root"] / "results"],
     "is a folder"),
    # presets
    ("preset not TOML", lambda w, t: ["reproduce", "--preset", _write(t / "p.toml", "[evaluate\nx = "), "--results",
                                     t / "out"], "p.toml"),
    ("preset without a model", lambda w, t: ["reproduce", "--preset", _write(t / "p.toml", '[evaluate]\ndatasets = ["arith"]'),
                                            "--results", t / "out"], "lacks or misstates 'model'"),
    ("reproduce results under a file", lambda w, t: ["reproduce", "--preset", "smoke", "--results", w["root"] / "a-file" / "r"],
     "cannot be written"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _cut_parquet(path: Path) -> Path:
    pd.DataFrame({"prompt": ["a", "b"], "reference": ["c", "d"], "item_id": ["1", "2"], "cost": [1, 2],
                  "rougeL": [0.1, 0.2]}).to_parquet(path)
    _truncate(path)
    return path


def _damaged(world, tmp: Path, name: str, damage) -> Path:
    folder = _copy(world, name, tmp)
    damage(folder)
    return folder


def _results_with(world, tmp: Path, damage) -> Path:
    folder = _copy(world, "results", tmp)
    damage(folder / "evaluate-uniform-arith.parquet")
    return folder


def _made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name, prepare, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, name, prepare, message):
    argv = prepare(world, tmp_path)
    before, world_before = _files(tmp_path), _files(world["root"])
    res = invoke(*argv)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and isinstance(res.exception, (SystemExit, type(None))), (res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert _files(tmp_path) == before and _files(world["root"]) == world_before
