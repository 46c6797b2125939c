"""Tidy parquet with a JSON manifest beside it, written atomically (temporary name, then rename).

Every command's rows carry `run_id` and every config field as columns; the manifest holds the config,
git sha, package versions, device and seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from skipbench.errors import SkipbenchError

PACKAGES = ("skipbench", "torch", "transformers", "numpy", "pandas", "pyarrow", "scipy", "rouge-score")


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# the data spec's name and split are the `dataset` and `split` columns of every table (docs/COLUMNS.md)
FLAT_NAMES = {"data_name": "dataset", "data_split": "split"}


def flat_config(cfg: Any, prefix: str = "") -> dict:
    """Config fields as scalar columns (nested configs joined with '_', lists as strings; FLAT_NAMES renamed)."""
    out = {}
    for key, value in config_dict(cfg).items():
        name = prefix + key
        if isinstance(value, dict):
            for k, v in value.items():
                flat = FLAT_NAMES.get(f"{name}_{k}", f"{name}_{k}")
                out[flat] = v if isinstance(v, (int, float, str, bool, type(None))) else json.dumps(v)
        elif isinstance(value, list):  # a list of policy specs is written as their labels
            out[name] = ",".join(_spec_text(v) if isinstance(v, dict) and {"name", "arg"} <= set(v) else str(v) for v in value)
        else:
            out[name] = value
    return out


def _spec_text(spec: dict) -> str:
    return f"{spec['name']}:{spec['arg']}" if spec.get("arg") else spec["name"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to: renamed onto `path` when the block succeeds, removed when it
    fails, so a killed or failed write never leaves a half-written file under the real name (or a stray temp).
    A process that does not write (`writes`) gets a private temporary, then discarded."""
    path = Path(path)
    if not writes():
        with _discarded() as folder:
            yield folder / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path.parent, f".{path.name}.tmp-*")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to fill: it takes the place of `path` (a folder there is replaced) when the
    block succeeds and is removed when it fails, so a model folder is never half-written under its real name. The
    folder that was there is put back if the swap itself fails; temporaries a killed run left are removed first."""
    import shutil

    path = Path(path)
    if not writes():  # tensor parallelism's other ranks: rank 0 writes the folder
        with _discarded() as folder:
            (folder / path.name).mkdir()
            yield folder / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path.parent, f".{path.name}.tmp-*", f".{path.name}.old-*")
    tmp, old = (path.with_name(f".{path.name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    remove(tmp)  # left by a killed process of the same pid (containers reuse pids)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            path.replace(old)
        try:
            tmp.replace(path)
        except OSError:
            if old.exists():
                old.replace(path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


WRITING = [True]  # False on tensor parallelism's ranks other than 0 (models/loading.placing sets it): they compute
# one result with rank 0, which writes it; their copies would race rank 0's for the same paths


def writes() -> bool:
    return WRITING[0]


@contextlib.contextmanager
def _discarded() -> Iterator[Path]:
    """A private folder whose contents are thrown away: where a process that does not write puts what it would."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="skipbench-unwritten-") as folder:
        yield Path(folder)


def clear_leftovers(folder: Path, *patterns: str) -> None:
    """What killed writers left in `folder` (SIGKILL runs no cleanup), named `.NAME.tmp-PID[...]` or `.NAME.old-PID`:
    a live writer's are kept; a folder moved aside while nothing took its place is put back (the only copy); the
    rest is removed."""
    for stale in [p for pattern in patterns for p in folder.glob(pattern)]:
        if _alive(stale.name.rpartition("-")[2].split(".")[0]):
            continue
        home = folder / stale.name[1:].rpartition(".old-")[0]
        if ".old-" in stale.name and not home.exists():
            stale.replace(home)
        else:
            remove(stale)


def remove(path: Path) -> None:
    """A file or a folder, if there."""
    import shutil

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


JOURNAL = ".commit.json"  # the files of one save that move together (`write_together`)


def write_together(folder: Path, writers: dict[str, Any]) -> None:
    """Files (or folders) of one save that must change together, e.g. a checkpoint's weights, config and optimiser
    state: each is written by `writers[name](temporary)` beside its place, then a journal naming them all is written,
    then each is moved into place and the journal removed. A process killed before the journal is complete leaves
    the previous save as it was; one killed after it is rolled forward by the next `finish_together`."""
    folder.mkdir(parents=True, exist_ok=True)
    finish_together(folder)
    tmps = {name: folder / f".{name}.tmp-{os.getpid()}" for name in writers}
    for tmp in tmps.values():  # left by a killed process of the same pid (containers reuse pids)
        remove(tmp)
    try:
        for name, write in writers.items():
            write(tmps[name])
        write_text_atomic(folder / JOURNAL, json.dumps({name: tmp.name for name, tmp in tmps.items()}))
    except BaseException:
        for tmp in tmps.values():
            remove(tmp)
        raise
    finish_together(folder)


def finish_together(folder: Path, roll_forward: bool = True) -> None:
    """Completes a save `write_together` journaled but did not finish moving (a killed process), or with
    `roll_forward=False` (a restart) drops it; then removes what a killed save left behind: temporaries of dead
    writers, and folders moved aside (put back when nothing took their place)."""
    from skipbench.errors import note
    from skipbench.store.readers import Unreadable, json_file

    journal = folder / JOURNAL
    if journal.exists() and roll_forward:
        try:
            moves = json_file(journal, "save journal")
            if not all(isinstance(v, str) and "/" not in v for v in moves.values()):
                raise Unreadable("save journal", journal, "does not name temporaries beside it")
        except Unreadable as exc:  # written atomically, so only a hand edit or a bad disk gets here
            note(f"{exc}: the save it journaled is dropped")
            moves = {}
        for name, tmp in moves.items():
            if (folder / tmp).exists():
                _move(folder / tmp, folder / name)
    journal.unlink(missing_ok=True)
    clear_leftovers(folder, ".*.tmp-*", ".*.old-*")


def _move(src: Path, dest: Path) -> None:
    """`src` takes `dest`'s place: a file by one rename; a folder by moving the old one aside first."""
    if src.is_dir() and dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        remove(old)  # one a killed process of the same pid left (containers reuse pids)
        dest.replace(old)
        src.replace(dest)
        remove(old)
    else:
        src.replace(dest)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def run_id(cfg: Any) -> str:
    return hashlib.sha1(json.dumps(config_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo; None elsewhere): timings are only comparable on one."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def device_info(device: str | None = None) -> dict:
    """The machine; torch's threads and GPU only when the command loaded torch (the oracle does not need it)."""
    import sys

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "device": device}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def manifest(cfg: Any, device: str | None = None, lm: Any = None, **extra: Any) -> dict:
    """The run's manifest; with `lm` (a loaded model) its device and its model record (name, family, depth)."""
    if lm is not None:
        device, extra = str(lm.device), {"model": lm.record(), **extra}
    return {"run_id": run_id(cfg), "config": config_dict(cfg), "git_sha": git_sha(), "versions": versions(),
            "device": device_info(device), "seed": getattr(cfg, "seed", None), **extra}


def check_out_path(path: str | os.PathLike, probe: bool = True) -> Path:
    """A result's path: a .parquet file name whose folder can be written (`probe`: tried now, so a run that could not
    write its result fails before its work, not after)."""
    path = Path(path)
    if path.suffix != ".parquet":
        raise SkipbenchError(f"--out must end in .parquet, got '{path}'")
    if path.exists() and path.is_dir():
        raise SkipbenchError(f"--out '{path}' is a directory")
    return check_writable(path) if probe else path


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` (a file to write later) can be: its folder exists or can be made, and a file can be created in it."""
    path = Path(path)
    if path.is_dir():
        raise SkipbenchError(f"{flag} '{path}' is a folder; give a file name")
    check_out_dir(path.parent, flag)
    return path


def check_out_dir(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder to write into: made now when absent, and tried with a probe file (removed at once)."""
    import tempfile

    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".skipbench-probe-"):
            pass
    except OSError as exc:
        blocker = next((p for p in [folder, *folder.parents] if p.exists()), folder)
        reason = exc.strerror or type(exc).__name__
        where = f" ('{blocker}' {'is a file' if blocker.is_file() else 'is not writable'})" if blocker != folder or folder.is_file() else ""
        raise SkipbenchError(f"{flag} folder '{folder}' cannot be written: {reason.lower()}{where}; "
                             "choose another path") from None
    return folder


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def tidy(df: pd.DataFrame, cfg: Any, skip: tuple[str, ...] = ("out",), lm: Any = None, **columns: Any) -> pd.DataFrame:
    """The table tail every recipe shares: `run_id` first, the run's own `columns`, then each config field that is
    not a column already (a row's own value wins: e.g. the KV mode a variant ran under, not the option given).
    With the loaded model `lm`, `device` and `dtype` are what the run resolved (cuda:0, float32), not what was asked
    for (auto). Score columns are float64 whatever their values (an all-zero column is not an integer one)."""
    if lm is not None:
        columns = {"device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."), **columns}
    df.insert(0, "run_id", run_id(cfg))
    for key, value in columns.items():
        df[key] = value
    nullable = _nullable_dtypes(cfg)
    for key, value in flat_config(cfg).items():
        if key not in df.columns and not any(key == s or key.startswith(s + "_") for s in skip):
            df[key] = value
            if key in nullable:  # a setting that may be left to None: one nullable type, given or not
                df[key] = df[key].astype(nullable[key])
    for col in SCORES:
        if col in df.columns and df[col].dtype.kind in "iub":
            df[col] = df[col].astype("float64")
    return df


_NULLABLE = {"int | None": "Int64", "float | None": "Float64", "str | None": "string", "bool | None": "boolean"}


def _nullable_dtypes(cfg: Any, prefix: str = "") -> dict[str, str]:
    """The pandas dtype of each config field that may be None, from its annotation (`int | None` -> Int64), under
    its flat column name, so that a column's type does not depend on whether a value was given."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out |= {FLAT_NAMES.get(k, k): v for k, v in _nullable_dtypes(value, f"{prefix}{f.name}_").items()}
        elif str(f.type) in _NULLABLE:
            out[prefix + f.name] = _NULLABLE[str(f.type)]
    return out


# per-item or per-token scores: float64 in every table (docs/COLUMNS.md)
SCORES = ("rougeL", "full_rougeL", "exact_match", "value", "full_value", "layers_mean", "attention_mean", "kl",
          "cos_final", "cos_final_normed", "cos_layerwise", "kl_next", "top1_agree", "layers")


COMPANIONS = ("agg", "assign", "layers", "length", "docs", "pairs", "spread", "controls")  # the tables written beside a result (not results themselves)


def companion(out: str | os.PathLike, name: str, suffix: str = ".parquet") -> Path:
    """A file beside the result: `results/x.parquet` → `results/x-agg.parquet`."""
    if suffix == ".parquet" and name not in COMPANIONS:
        raise ValueError(f"'{name}' is not one of results.COMPANIONS (readers tell results from companions by them)")
    out = Path(out)
    return out.with_name(f"{out.stem}-{name}{suffix}")


@dataclass(frozen=True)
class Shown:
    """A table a person sees after a run: its title, its rows (the columns the recipe chose) and a format string per
    column (floats default to 3 decimals); the CLI's display renders it (a terminal table, or plain text piped). A
    `Shown` without a frame is a line of the result's text, printed in its place among the tables."""

    title: str
    frame: pd.DataFrame | None = None
    formats: dict = field(default_factory=dict)
    width: int | None = None


@dataclass(kw_only=True)
class Written:
    """What every table-writing recipe returns: its rows, where they went, the tables written beside them (by
    name: "agg" went to `<out>-agg.parquet`) and any other files (figures, by name); and what a person is shown: the
    tables (`shown`) and the lines after them (`said`: what was written, notes). Recipes add their own fields."""

    rows: pd.DataFrame
    path: Path | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    shown: list[Shown] = field(default_factory=list)
    said: list[str] = field(default_factory=list)


def write_tables(rows: pd.DataFrame, out: str | os.PathLike, meta: dict, **tables: pd.DataFrame) -> dict[str, Path]:
    """The result and its companion tables, each with the run's manifest; the result itself last, so a run stopped
    midway leaves no result whose companions are missing. Returns every path by name ("rows" is the result)."""
    paths = {name: write_atomic(table, companion(out, name), meta) for name, table in tables.items()}
    return paths | {"rows": write_atomic(rows, out, meta)}


def write_atomic(df: pd.DataFrame, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write parquet (and its manifest) under a temporary name, then rename: never a half-written file. The
    manifest records the table's row count and checksum (`readers.table(checked=True)` compares them)."""
    from skipbench.store.readers import sha256

    path = check_out_path(path, probe=False)
    if not writes():  # tensor parallelism: rank 0 writes what the ranks computed together
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path.parent, f".{path.name}.tmp-*")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_parquet(tmp, index=False)
        if meta is not None:
            mtmp = tmp.with_name(tmp.name + ".json")
            mtmp.write_text(json.dumps({**meta, "rows": len(df), "sha256": sha256(tmp)}, indent=2, default=str))
            os.replace(mtmp, manifest_path(path))
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C mid-write leaves neither a result nor a temporary
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".json").unlink(missing_ok=True)
        raise
    return path
