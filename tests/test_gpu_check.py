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
def test_gpu_check_runs_every_part_on_the_cpu_and_writes_its_summary(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "cpu", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:] + (out / "gpu-check.log").read_text()[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-compile.parquet", "bench.parquet", "gpu-check.log", "lane.txt", "summary.md"]  # <= 8
    summary = (out / "summary.md").read_text()
    assert "failed parts: none" in summary and " passed" in summary and "random:llama-small" in summary
    bench = pd.read_parquet(out / "bench.parquet")
    assert {"full", "hf-generate", "uniform:4", "removed:uniform:4", "random-token:6"} <= set(bench["variant"])
    assert any(v.startswith("spec ") for v in bench["variant"]) and (bench["dtype"] == "bfloat16").all()
    assert bool(pd.read_parquet(out / "bench-compile.parquet")["compile"].all())
    decode = bench[(bench["phase"] == "decode") & (bench["variant"] == "full")]
    assert (decode["bound_fraction"] > 0).all()


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
