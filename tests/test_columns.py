"""The result tables' columns and types are what docs/COLUMNS.md says (a fixed schema): each table is written on a
tiny model and compared with the page, column by column."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app

PAGE = Path(__file__).resolve().parents[1] / "docs" / "COLUMNS.md"


def documented(section: str) -> dict[str, str]:
    """The column -> type table under the page's heading that starts with `## section`."""
    text = PAGE.read_text()
    body = text.split(f"\n## {section} ", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([A-Za-z_0-9]+) \| ([A-Za-z0-9]+) \|", body, re.M)
    return {c: t for c, t in rows if c != "column"}


def schema(path) -> dict[str, str]:
    return {c: str(t) for c, t in pd.read_parquet(path).dtypes.items()}


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_evaluate_and_cosine_tables_are_as_documented(tiny_dirs, tmp_path):
    model = tiny_dirs["llama"]
    invoke("evaluate", "--model", model, "--dataset", "arith", "--split", "test", "--limit", 2, "--policy", "uniform:2",
           "--draft", "early-exit:2", "--max-new-tokens", 3, "--out", tmp_path / "ev.parquet")
    assert schema(tmp_path / "ev.parquet") == documented("evaluate")
    rows = pd.read_parquet(tmp_path / "ev.parquet")
    plain = rows[rows["policy"] != "speculative"]
    assert plain["speculation_k"].isna().all() and plain["drafted"].isna().all()  # only the speculative point's rows
    assert (rows["device"] == "cpu").all() and (rows["dtype"] == "float32").all()  # resolved, not `auto`
    invoke("cosine", "--model", model, "--dataset", "text", "--limit", 2, "--costs", 2, "--num-seeds", 1,
           "--max-new-tokens", 3, "--out", tmp_path / "cos.parquet")
    assert schema(tmp_path / "cos.parquet") == documented("cosine")


def test_lm_eval_and_compare_tables_are_as_documented(tiny_dirs, tmp_path):
    pytest.importorskip("lm_eval")
    model = tiny_dirs["llama"]
    invoke("lm-eval", "--model", model, "--tasks", "skipbench_choice", "--limit", 2, "--policy", "uniform:2",
           "--out", tmp_path / "lm.parquet")
    assert schema(tmp_path / "lm.parquet") == documented("lm-eval")
    docs = schema(tmp_path / "lm-docs.parquet")
    assert docs == {"run_id": "str", "task": "str", "of": "str", "filter": "str", "metric": "str", "doc_id": "int64",
                    "value": "float64", "policy_spec": "str"}
    invoke("compare", "--model", model, "--tasks", "skipbench_choice", "--limit", 4, "--policy", "uniform,early-exit",
           "--skip", 1, "--no-chat-template", "--out", tmp_path / "cmp.parquet")
    assert schema(tmp_path / "cmp.parquet") == documented("compare")


def test_bench_table_is_as_documented(tiny_dirs, tmp_path):
    invoke("bench", "--model", tiny_dirs["llama"], "--policy", "full,uniform:2", "--batch-sizes", 1,
           "--max-new-tokens", 3, "--repeats", 1, "--warmup", 0, "--out", tmp_path / "b.parquet")
    assert schema(tmp_path / "b.parquet") == documented("bench")
