"""Datasets from files: Alpaca-format JSON/JSONL, and any JSONL/CSV/parquet with named columns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from skipbench.data.items import Item, make_item
from skipbench.errors import SkipbenchError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def looks_like_file(name: str) -> bool:
    return Path(name).suffix.lower() in SUFFIXES or "/" in name or Path(name).exists()


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SkipbenchError(f"dataset file not found: {path}")
    if path.stat().st_size == 0:
        raise SkipbenchError(f"dataset file is empty: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise SkipbenchError(f"{path}: expected a JSON list of records")
            df = pd.DataFrame.from_records(data)
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise SkipbenchError(f"unsupported dataset file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    except (ValueError, json.JSONDecodeError) as exc:
        raise SkipbenchError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if df.empty:
        raise SkipbenchError(f"dataset file has no records: {path}")
    return df


def load_file(path: str, prompt_field: str | None = None, reference_field: str | None = None) -> list[Item]:
    """Alpaca format (instruction, optional input, output) unless fields are named."""
    df = read_table(Path(path))
    cols = list(df.columns)
    alpaca = prompt_field is None and reference_field is None and {"instruction", "output"} <= set(cols)
    if alpaca:
        items = []
        for rec in df.to_dict("records"):
            extra = str(rec.get("input") or "").strip()
            prompt = str(rec["instruction"]).strip() + (f"\n\n{extra}" if extra else "")
            items.append(make_item(prompt, str(rec["output"]), str(rec.get("subtask", "") or "")))
        return items
    prompt_field = prompt_field or "prompt"
    reference_field = reference_field or "reference"
    missing = [f for f in (prompt_field, reference_field) if f not in cols]
    if missing:
        raise SkipbenchError(
            f"{path}: missing field(s) {', '.join(missing)}; fields found: {', '.join(map(str, cols))} "
            f"(use --prompt-field / --reference-field, or Alpaca's instruction/input/output)"
        )
    subtask = df["subtask"].astype(str) if "subtask" in cols else [""] * len(df)
    return [make_item(str(p), str(r), s) for p, r, s in zip(df[prompt_field], df[reference_field], subtask)]
