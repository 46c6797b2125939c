"""Output names: light (no pandas), so the CLI can name a command's output before it loads anything."""

from __future__ import annotations

import re
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of a model or dataset name (a path's stem for files)."""
    name = Path(text).stem if ("/" in text and Path(text).exists()) or text.endswith((".json", ".jsonl", ".csv", ".parquet", ".gguf")) else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "_")).strip("_") or "x"


def default_out(command: str, model: str, dataset: str) -> str:
    """Where a command writes when --out is not given: results/<command>-<model>-<dataset>.parquet."""
    return f"results/{command}-{slug(model)}-{slug(dataset)}.parquet"
