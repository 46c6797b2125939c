"""Trained checkpoints on disk: a folder with `config.json` (what was trained, how) and `weights.safetensors`.

Below the policies (which load them) and the trainers (which write them); it imports neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from skipbench.errors import SkipbenchError

CHECKPOINT_FILES = ("config.json", "weights.safetensors")
BACKBONE = "backbone"  # <out>/backbone: a jointly trained model, a plain model folder for `--model`


def load_checkpoint(path: str, kind: str) -> tuple[dict, dict]:
    """(config, weights) of a saved method; a clear error when the folder is not one. The files are read once:
    their fingerprint (the cache keys' part) is taken from the same bytes."""
    from safetensors.torch import load

    folder = Path(path)
    cfg_file, weights = folder / "config.json", folder / "weights.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise SkipbenchError(f"'{path}' is not a trained {kind} folder (needs config.json and weights.safetensors)")
    stamp = _stamp(path)
    raw = [cfg_file.read_bytes(), weights.read_bytes()]
    _FINGERPRINTS[(str(path), stamp)] = _digest(raw)
    meta = json.loads(raw[0])
    if meta.get("kind") != kind:
        raise SkipbenchError(f"'{path}' holds a '{meta.get('kind')}' checkpoint, not '{kind}'")
    return meta, load(raw[1])


def checked_module(path: str, num_layers: int, load: Callable):
    """A learned policy's trained module (`controller:DIR`, `flexidepth:DIR`), checked against the model's depth."""
    module, meta = load(path)
    if module.num_layers != num_layers:
        raise SkipbenchError(f"'{path}' was trained for {module.num_layers} layers; this model has {num_layers}")
    return module, meta


_FINGERPRINTS: dict[tuple[str, tuple], str] = {}  # (path, files' sizes and times) -> fingerprint


def _stamp(path: str) -> tuple:
    files = [Path(path) / name for name in CHECKPOINT_FILES]
    return tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in files)


def _digest(raw: list[bytes]) -> str:
    import hashlib

    h = hashlib.sha1()
    for data in raw:
        h.update(data)
    return h.hexdigest()[:12]


def checkpoint_fingerprint(path: str) -> str:
    """A hash of a checkpoint's config and weights: results cached for a path are stale once it is retrained.
    Memoised by the files' sizes and modification times, so asking again (every cache key of a run does), or after
    `load_checkpoint` read the files, reads nothing."""
    key = (str(path), _stamp(path))
    if key not in _FINGERPRINTS:
        files = [Path(path) / name for name in CHECKPOINT_FILES]
        _FINGERPRINTS[key] = _digest([f.read_bytes() if f.exists() else b"" for f in files])
    return _FINGERPRINTS[key]


def training_record(path: str) -> dict | None:
    """The `train` section a trainer recorded in a checkpoint (its data spec, among others), or None."""
    cfg_file = Path(path) / "config.json"
    return json.loads(cfg_file.read_text()).get("train") if cfg_file.exists() else None
