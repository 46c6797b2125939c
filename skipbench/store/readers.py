"""One checked reader per kind of file skipbench reads back: tables (parquet results and cached parts), JSON
(manifests, configs, caches) and safetensors (checkpoints).

A file that is missing, empty, truncated or not what its name says raises `Unreadable`, a `SkipbenchError`: a
command shows it as one line naming the file, what is wrong and what to do. A cache catches it instead, says so
(`errors.note`) and computes the file again (`reusable`), so a damaged cache is never silently reused and never
fatal. Tables written by `results.write_atomic` with a manifest carry their row count and checksum there;
`table(..., checked=True)` compares them, so a short file is caught even when it parses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from skipbench.errors import SkipbenchError, note


class Unreadable(SkipbenchError):
    """A file skipbench needs that cannot be read or parsed."""

    def __init__(self, what: str, path: str | os.PathLike, problem: str, advice: str = ""):
        self.path = Path(path)
        super().__init__(f"{what} '{path}' {problem}" + (f"; {advice}" if advice else ""))


def why(exc: BaseException) -> str:
    """The first line of a parser's message, kept short (pyarrow and safetensors write paragraphs)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def present(path: Path, what: str, advice: str) -> None:
    if not path.exists():
        raise Unreadable(what, path, "does not exist", advice)
    if not path.is_file():
        raise Unreadable(what, path, "is not a file", advice)
    if path.stat().st_size == 0:
        raise Unreadable(what, path, "is empty", advice)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_file(path: str | os.PathLike, what: str = "JSON file", advice: str = "", expect: type = dict) -> Any:
    return json_bytes(file_bytes(path, what, advice), path, what, advice, expect)


def file_bytes(path: str | os.PathLike, what: str, advice: str = "") -> bytes:
    path = Path(path)
    present(path, what, advice)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Unreadable(what, path, f"cannot be read ({exc.strerror or why(exc)})", advice) from None


def json_bytes(raw: bytes, path: str | os.PathLike, what: str = "JSON file", advice: str = "", expect: type = dict) -> Any:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unreadable(what, path, f"is not valid JSON ({why(exc)})", advice) from None
    if not isinstance(data, expect):
        raise Unreadable(what, path, f"holds a JSON {type(data).__name__}, not a {expect.__name__}", advice)
    return data


def table(path: str | os.PathLike, what: str = "results file", advice: str = "", columns: list[str] | None = None,
          checked: bool = False):
    """A parquet table; `checked`: also its row count and checksum against the manifest beside it."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    present(path, what, advice)
    if checked:
        _verify(path, what, advice)
    try:
        if columns:
            missing = [c for c in columns if c not in pq.read_schema(path).names]
            if missing:
                raise Unreadable(what, path, f"lacks the column(s) {', '.join(missing)}", advice)
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise Unreadable(what, path, f"is not a readable parquet table ({why(exc)})", advice) from None


def _verify(path: Path, what: str, advice: str) -> None:
    import pyarrow.parquet as pq

    manifest = path.with_suffix(".json")
    if not manifest.exists():
        raise Unreadable(what, path, f"has no manifest ({manifest.name}) recording its row count and checksum", advice)
    try:
        meta = json_file(manifest, "manifest", advice)
    except Unreadable:
        raise Unreadable(what, path, f"has a damaged manifest ({manifest.name})", advice) from None
    if "sha256" not in meta or "rows" not in meta:
        raise Unreadable(what, path, "has no recorded row count and checksum (written by an older skipbench?)", advice)
    if sha256(path) != meta["sha256"]:
        raise Unreadable(what, path, "does not match the checksum recorded when it was written (damaged or "
                         "replaced since)", advice)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged footer
        raise Unreadable(what, path, f"is not a readable parquet table ({why(exc)})", advice) from None
    if rows != meta["rows"]:
        raise Unreadable(what, path, f"has {rows} rows; {meta['rows']} were written", advice)


def reusable(path: str | os.PathLike, what: str = "cached part") -> bool:
    """Whether a cached table can be reused: it exists and passes `table(checked=True)`. One that fails is reported
    in one line and left to be computed again (its writer replaces it)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        table(path, what, checked=True)
    except Unreadable as exc:
        note(f"{exc}: computing it again")
        return False
    return True


def npz_file(path: str | os.PathLike, what: str = "array file", advice: str = "") -> dict:
    """The arrays of a .npz file written by numpy (no pickled objects are read)."""
    import zipfile

    import numpy as np

    path = Path(path)
    present(path, what, advice)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise Unreadable(what, path, f"is not a readable .npz file ({why(exc)})", advice) from None
