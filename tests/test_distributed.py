"""Data parallelism under torchrun (2 ranks, gloo on CPU) against the single-process run on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from skipbench.cli import app
from skipbench.store.distributed import Dist

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on two cores
# columns that name the run (its output path) rather than what it computed
NAMING = {"run_id", "out"}


def torchrun(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "skipbench", *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out + err  # rich writes tables and notes to stderr


def single(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "skipbench", *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def same_rows(a: Path, b: Path) -> None:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    keep = [c for c in x.columns if c not in NAMING]
    pd.testing.assert_frame_equal(x[keep], y[keep], check_exact=False, rtol=1e-4, atol=1e-5)  # fp32 sums in other batch shapes


def test_shards_are_disjoint_balanced_and_cover_every_item():
    ids = [f"item-{i:03d}" for i in (7, 3, 11, 0, 5, 9, 1)]
    shares = [Dist(r, 3).shard(ids) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(len(ids)))
    assert {len(s) for s in shares} <= {2, 3}
    assert Dist().shard(ids) == list(range(len(ids)))  # one process: everything, in order
    assert Dist(1, 2).part(Path("x/p.parquet")) == Path("x/p.rank1-of-2.parquet")
    assert Dist().part(Path("x/p.parquet")) == Path("x/p.parquet")


EVAL = ["evaluate", "--dataset", "arith", "--limit", "10", "--policy", "random", "--per-token", "--costs", "2,4",
        "--max-new-tokens", "8", "--batch-size", "4"]


@pytest.mark.slow
def test_evaluate_and_cosine_match_one_process(tiny_dirs, tmp_path):
    model = str(tiny_dirs["llama"])
    torchrun(*EVAL, "--model", model, "--out", str(tmp_path / "two" / "eval.parquet"))
    single(*EVAL, "--model", model, "--out", str(tmp_path / "one" / "eval.parquet"))
    same_rows(tmp_path / "two" / "eval.parquet", tmp_path / "one" / "eval.parquet")
    assert not list((tmp_path / "two" / ".skipbench-parts").glob("*rank*"))  # shares merged, then removed

    cosine = ["cosine", "--model", model, "--dataset", "text", "--limit", "6", "--costs", "2,4", "--num-seeds", "2",
              "--max-new-tokens", "6", "--batch-size", "2"]
    torchrun(*cosine, "--out", str(tmp_path / "two" / "cos.parquet"))
    single(*cosine, "--out", str(tmp_path / "one" / "cos.parquet"))
    same_rows(tmp_path / "two" / "cos.parquet", tmp_path / "one" / "cos.parquet")
    same_rows(tmp_path / "two" / "cos-agg.parquet", tmp_path / "one" / "cos-agg.parquet")


@pytest.mark.slow
def test_data_parallel_training_matches_one_process(tiny_dirs, tmp_path):
    """2 ranks x 2 examples == 1 process x 4 examples, with gradient accumulation on the ranks."""
    args = ["controllers", "train", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8",
            "--steps", "3", "--batch-size", "4", "--max-new-tokens", "6", "--lr", "1e-2"]
    torchrun(*args, "--grad-accum", "2", "--out", str(tmp_path / "two"))
    single(*args, "--out", str(tmp_path / "one"))
    a, b = load_file(str(tmp_path / "two" / "weights.safetensors")), load_file(str(tmp_path / "one" / "weights.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    logs = [torch.load(tmp_path / n / "trainer.pt", weights_only=False)["log"] for n in ("two", "one")]
    for x, y in zip(*logs):  # the logged loss is the whole batch's, not one rank's
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["layers"] == pytest.approx(y["layers"])


@pytest.mark.slow
def test_data_parallel_finetuning_matches_one_process(tiny_dirs, tmp_path):
    """2 ranks (DistributedDataParallel over the whole model, validation shared) == 1 process."""
    args = ["finetune", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8", "--val-limit", "3",
            "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--lr", "1e-2", "--max-new-tokens", "4",
            "--layer-dropout", "0.3"]
    torchrun(*args, "--out", str(tmp_path / "two"))
    single(*args, "--out", str(tmp_path / "one"))
    a, b = (load_file(str(tmp_path / n / "last" / "model.safetensors")) for n in ("two", "one"))
    for k in b:  # AdamW divides by sqrt(v): a weight whose gradient is near eps turns float rounding of the
        # ranks' gradient sum into up to ~1% of one step (lr 1e-2), hence atol 1e-4 on the weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    evals = [json.loads((tmp_path / n / "config.json").read_text())["evals"] for n in ("two", "one")]
    assert [e["step"] for e in evals[0]] == [0, 3]
    assert [e["rougeL"] for e in evals[0]] == pytest.approx([e["rougeL"] for e in evals[1]])


def _rank_pid(rank: int, marker: str) -> int | None:
    for d in Path("/proc").iterdir():
        try:
            if f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0") and marker.encode() in (d / "cmdline").read_bytes():
                return int(d.name)
        except (OSError, ValueError):
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
@pytest.mark.slow
def test_a_killed_rank_leaves_no_result_and_a_rerun_completes_it(tiny_dirs, tmp_path):
    model, out = str(tiny_dirs["llama"]), tmp_path / "two" / "eval.parquet"
    args = [*EVAL[:-6], "--costs", "1,2,3,4,5", "--max-new-tokens", "16", "--batch-size", "4", "--model", model, "--out", str(out)]
    proc = torchrun(*args, wait=False)
    parts = out.parent / ".skipbench-parts"
    deadline = time.time() + 300
    while not list(parts.glob("*.rank1-of-2.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    pid = _rank_pid(1, str(out))
    assert pid is not None, "rank 1 finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0 and not out.exists() and not out.with_suffix(".json").exists()
    finished = list(parts.glob("*.rank1-of-2.parquet"))
    assert finished and len(finished) < 6  # some of rank 1's work survived, not all of it

    assert "rank share(s) of a failed run reused" in torchrun(*args)
    assert not list(parts.glob("*rank*"))
    rows = pd.read_parquet(out)
    assert not rows.duplicated(["policy", "cost", "item_id"]).any() and len(rows) == 10 * 6
    single(*args[:-1], str(tmp_path / "one" / "eval.parquet"))
    same_rows(out, tmp_path / "one" / "eval.parquet")


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = CliRunner().invoke(app, ["bench", "--model", "tiny-random"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        "rank 0: error: 'bench' runs in one process; under torchrun: evaluate, cosine, controllers train, "
        "flexidepth train, mindskip train, finetune, lm-eval"]


@pytest.mark.slow
def test_lm_eval_matches_one_process(tiny_dirs, tmp_path):
    """lm-eval shards each task's requests over the ranks through the backend's rank, gathers and barrier; the
    metrics and the layers counted equal one process's (3 and 2 documents of 5: lm-eval pads the second rank's
    requests with copies, which are not counted)."""
    pytest.importorskip("lm_eval")
    args = ["lm-eval", "--model", str(tiny_dirs["llama"]), "--tasks", "skipbench_choice,skipbench_arith", "--limit", "5",
            "--policy", "random-token:3", "--batch-size", "2"]
    single(*args, "--out", str(tmp_path / "one" / "lm.parquet"))
    torchrun(*args, "--out", str(tmp_path / "two" / "lm.parquet"))
    same_rows(tmp_path / "one" / "lm.parquet", tmp_path / "two" / "lm.parquet")
    rows = pd.read_parquet(tmp_path / "two" / "lm.parquet")
    assert (rows["requests"] == rows["task"].map({"skipbench_choice": 20, "skipbench_arith": 5})).all()
