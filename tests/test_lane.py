"""The device lane's training and GPU-only tests (issue 39). `pytest --device cuda -m lane` runs every test marked
`lane` on that device: the engine's equivalences (tests/test_engine.py), speculative greedy == full
(tests/test_speculative.py), the lm-eval model's scores (tests/test_lmeval.py), and here one optimiser step of each
trainer through its command. On the CPU (the default `--device cpu`) they run as part of the suite. The tests below
the trainers' need CUDA itself and skip on the CPU with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from skipbench.cli import app

def CUDA(test):
    """A lane test only CUDA can run: skipped on the CPU with the reason."""
    return pytest.mark.lane(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device (runs in a GPU session's lane)")(test))


@pytest.mark.lane
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_step_of_each_trainer_on_the_device(tiny_dirs, tmp_path, device, dtype):
    """controllers, FlexiDepth, MindSkip and the LayerSkip fine-tuning each take one optimiser step on the lane's
    device in the dtype, and save their weights and a config that records the dtype."""
    model = str(tiny_dirs["llama"])
    common = ["--model", model, "--dataset", "arith", "--limit", "4", "--steps", "1", "--batch-size", "2",
              "--max-new-tokens", "2", "--device", device.type, "--dtype", dtype]
    runs = {"controllers": ["controllers", "train", *common], "flexidepth": ["flexidepth", "train", *common],
            "mindskip": ["mindskip", "train", *common],
            "finetune": ["finetune", *common, "--val-limit", "2", "--early-exit-loss", "1.0"]}
    for name, args in runs.items():
        res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, (name, res.output)
        assert list((tmp_path / name).rglob("*.safetensors")), name  # the step's weights were saved
        config = json.loads((tmp_path / name / "config.json").read_text())
        recorded = config["dtype"] if name == "finetune" else config["train"]["dtype"]
        assert recorded == dtype, (name, recorded)  # the run records the dtype it trained in


@CUDA
def test_compiled_full_depth_equals_eager_on_cuda(tokenizer):
    """`--compile` on CUDA: the whole static pass compiled gives the eager engine's greedy tokens."""
    from conftest import prompts
    from skipbench.engine import generate
    from skipbench.engine.forward import enable_compile
    from skipbench.models import wrap_model
    from skipbench.policies import make_policy

    ps = prompts(tokenizer, 3)
    eager = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama", "cuda")
    compiled = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama", "cuda")
    enable_compile(compiled.adapter)
    for spec in ("full", "uniform:3"):
        want = generate(eager, ps, make_policy(spec, 6), 16).tokens
        assert generate(compiled, ps, make_policy(spec, 6), 16).tokens == want, spec


@CUDA
def test_bench_reports_cuda_peak_memory(tiny_dirs, tmp_path):
    """On CUDA, bench's peak memory is torch.cuda.max_memory_allocated per variant: more than the weights."""
    out = tmp_path / "bench.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["llama"]), "--device", "cuda", "--policy",
                                   "full,uniform:3", "--batch-sizes", "1", "--max-new-tokens", "8", "--repeats", "1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out)
    weights_mb = sum(p.numel() * p.element_size() for p in tiny_model("llama", 300).parameters()) / 2**20
    assert (rows["peak_memory_mb"].dropna() > weights_mb * 0.5).all()


@CUDA
def test_one_rank_under_torchrun_joins_nccl_and_matches_one_process(tiny_dirs, tmp_path):
    """torchrun with one rank on CUDA joins an nccl group (gloo for CPU tensors) and writes what one process does."""
    model = str(tiny_dirs["llama"])
    args = ["evaluate", "--model", model, "--dataset", "arith", "--limit", "4", "--policy", "uniform:3",
            "--max-new-tokens", "8", "--device", "cuda"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                          "skipbench", *args, "--out", str(tmp_path / "ranked.parquet")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    alone = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "alone.parquet")])
    assert alone.exit_code == 0, alone.output
    a, b = pd.read_parquet(tmp_path / "ranked.parquet"), pd.read_parquet(tmp_path / "alone.parquet")
    assert a["output"].tolist() == b["output"].tolist()
