"""Datasets from files: Alpaca-format JSON/JSONL, and any JSONL/CSV/parquet with named columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from skipbench.store import readers
from skipbench.data.items import Item, make_item
from skipbench.errors import SkipbenchError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def looks_like_file(name: str) -> bool:
    return Path(name).suffix.lower() in SUFFIXES or "/" in name or Path(name).exists()


ADVICE = "give a JSON list of records, JSONL, CSV or parquet (see README, Datasets)"


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".json":  # JSON and parquet through the checked readers; JSONL and CSV through pandas
        return _records(readers.json_file(path, "dataset file", ADVICE, expect=list), path)
    if suffix == ".parquet":
        return _records(readers.table(path, "dataset file", ADVICE), path)
    if not path.is_file():
        raise SkipbenchError(f"dataset file not found: {path}; give an existing file or a built-in dataset "
                             "(skipbench datasets lists them)")
    if path.stat().st_size == 0:
        raise SkipbenchError(f"dataset file is empty: {path}")
    try:
        if suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise SkipbenchError(f"unsupported dataset file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    except (OSError, ValueError) as exc:
        raise SkipbenchError(f"dataset file '{path}' cannot be read ({readers.why(exc)}); {ADVICE}") from None
    return _records(df, path)


def _records(data, path: Path) -> pd.DataFrame:
    if not isinstance(data, pd.DataFrame) and not all(isinstance(r, dict) for r in data):
        raise SkipbenchError(f"dataset file '{path}' holds a list of values, not of records; {ADVICE}")
    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame.from_records(data)
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
