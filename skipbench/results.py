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
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from skipbench.errors import SkipbenchError

PACKAGES = ("skipbench", "torch", "transformers", "numpy", "pandas", "pyarrow", "scipy", "rouge-score")


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def flat_config(cfg: Any, prefix: str = "") -> dict:
    """Config fields as scalar columns (nested configs joined with '_', lists as strings)."""
    out = {}
    for key, value in config_dict(cfg).items():
        name = prefix + key
        if isinstance(value, dict):
            for k, v in value.items():
                out[f"{name}_{k}"] = v if isinstance(v, (int, float, str, bool, type(None))) else json.dumps(v)
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
    fails, so a killed or failed write never leaves a half-written file under the real name (or a stray temp)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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


def device_info(device: str | None = None) -> dict:
    """The machine; torch's threads and GPU only when the command loaded torch (the oracle does not need it)."""
    import sys

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device": device}
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


def check_out_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".parquet":
        raise SkipbenchError(f"--out must end in .parquet, got '{path}'")
    if path.exists() and path.is_dir():
        raise SkipbenchError(f"--out '{path}' is a directory")
    return path


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def write_atomic(df: pd.DataFrame, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write parquet (and its manifest) under a temporary name, then rename: never a half-written file."""
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_parquet(tmp, index=False)
        if meta is not None:
            mtmp = tmp.with_suffix(".json")
            mtmp.write_text(json.dumps(meta, indent=2, default=str))
            os.replace(mtmp, manifest_path(path))
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C mid-write leaves neither a result nor a temporary
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json").unlink(missing_ok=True)
        raise
    return path
