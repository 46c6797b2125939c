"""Trained checkpoints on disk: a folder with `config.json` (what was trained, how) and `weights.safetensors`.

Below the policies (which load them) and the trainers (which write them); it imports neither.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

from skipbench.errors import SkipbenchError

BACKBONE = "backbone"  # <out>/backbone: a jointly trained model, a plain model folder for `--model`


def load_checkpoint(path: str, kind: str) -> tuple[dict, dict]:
    """(config, weights) of a saved method; a clear error when the folder is not one."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_file, weights = folder / "config.json", folder / "weights.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise SkipbenchError(f"'{path}' is not a trained {kind} folder (needs config.json and weights.safetensors)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("kind") != kind:
        raise SkipbenchError(f"'{path}' holds a '{meta.get('kind')}' checkpoint, not '{kind}'")
    return meta, load_file(str(weights))


def checked_module(path: str, num_layers: int, load: Callable):
    """A learned policy's trained module (`controller:DIR`, `flexidepth:DIR`), checked against the model's depth."""
    module, meta = load(path)
    if module.num_layers != num_layers:
        raise SkipbenchError(f"'{path}' was trained for {module.num_layers} layers; this model has {num_layers}")
    return module, meta


def checkpoint_fingerprint(path: str) -> str:
    """A hash of a checkpoint's config and weights: results cached for a path are stale once it is retrained.
    Memoised by the files' sizes and modification times, so asking again (every cache key of a run does) reads
    nothing."""
    files = [Path(path) / name for name in ("config.json", "weights.safetensors")]
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in files)
    return _fingerprint(str(path), stamp)


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, stamp: tuple) -> str:
    import hashlib

    h = hashlib.sha1()
    for name in ("config.json", "weights.safetensors"):
        f = Path(path) / name
        h.update(f.read_bytes() if f.exists() else b"")
    return h.hexdigest()[:12]


def training_record(path: str) -> dict | None:
    """The `train` section a trainer recorded in a checkpoint (its data spec, among others), or None."""
    cfg_file = Path(path) / "config.json"
    return json.loads(cfg_file.read_text()).get("train") if cfg_file.exists() else None
