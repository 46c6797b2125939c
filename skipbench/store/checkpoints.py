"""Trained checkpoints on disk: a folder with `config.json` (what was trained, how) and `weights.safetensors`.

Below the policies (which load them) and the trainers (which write them); it imports neither.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from skipbench.errors import SkipbenchError
from skipbench.store.results import JOURNAL

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILES = ("config.json", "weights.safetensors")
BACKBONE = "backbone"  # <out>/backbone: a jointly trained model, a plain model folder for `--model`


ADVICE = "train it again, or point to another folder"


def load_checkpoint(path: str, kind: str) -> tuple[dict, dict]:
    """(config, weights) of a saved method; a clear error when the folder is not one or a file is damaged. The
    files are read once: their fingerprint (the cache keys' part) is taken from the same bytes."""
    from skipbench.store import readers

    folder = Path(path)
    cfg_file, weights = folder / "config.json", folder / "weights.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise SkipbenchError(f"'{path}' is not a trained {kind} folder (needs config.json and weights.safetensors)")
    if (folder / JOURNAL).exists():
        raise SkipbenchError(f"'{path}' holds a save that was cut short; run the training command again to complete "
                             "it (or --restart)")
    stamp = _stamp(path)
    raw = [readers.file_bytes(cfg_file, f"{kind} checkpoint config", ADVICE),
           readers.file_bytes(weights, f"{kind} checkpoint weights", ADVICE)]
    _FINGERPRINTS[(str(path), stamp)] = _digest(raw)
    meta = readers.json_bytes(raw[0], cfg_file, f"{kind} checkpoint config", ADVICE)
    if meta.get("kind") != kind:
        raise SkipbenchError(f"'{path}' holds a '{meta.get('kind')}' checkpoint, not '{kind}'")
    return meta, safetensors_bytes(raw[1], weights, f"{kind} checkpoint weights", ADVICE)


def load_module(path: str, kind: str, build: Callable[[dict], "torch.nn.Module"],
                model: dict | None = None) -> tuple["torch.nn.Module", dict]:
    """A saved method's module: built from its config by `build(meta)`, its tensors checked by name and shape
    against what that module holds before they are loaded. `model` ({"num_layers": L, "hidden_size": H}, what
    is known of the model it will run on) is compared with the config first, before anything is built."""
    meta, weights = load_checkpoint(path, kind)
    differ = {k: v for k, v in (model or {}).items() if v is not None and meta.get(k) != v}
    if differ:
        trained_on = (meta.get("train") or {}).get("model", "?") if isinstance(meta.get("train"), dict) else "?"
        raise SkipbenchError(f"'{path}' was trained on {trained_on} ({meta.get('num_layers')} layers, hidden size "
                             f"{meta.get('hidden_size')}); this model has {model.get('num_layers')} layers"
                             + (f", hidden size {model['hidden_size']}" if model.get("hidden_size") else ""))
    try:
        module = build(meta)
    except KeyError as exc:
        raise SkipbenchError(f"'{path}/config.json' lacks the field {exc} a {kind} checkpoint needs; {ADVICE}") from None
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
        raise SkipbenchError(f"'{path}/config.json' has invalid {kind} settings ({exc}); {ADVICE}") from None
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise SkipbenchError(f"'{path}/weights.safetensors' does not hold the tensors its config describes "
                             f"({len(missing)} missing, {len(unexpected)} unexpected; {first}); {ADVICE}")
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise SkipbenchError(f"'{path}/weights.safetensors': tensor {name} has shape {tuple(weights[name].shape)}, "
                                 f"its config describes {tuple(tensor.shape)}; {ADVICE}")
    module.load_state_dict(weights)
    return module, meta


def checked_module(path: str, ctx, load: Callable):
    """A learned policy's trained module (`controller:DIR`, `flexidepth:DIR`) for the model of `ctx` (the policy's
    Context): one trained for another depth or width is refused with what it was trained for, before it is built."""
    config = getattr(getattr(getattr(ctx, "lm", None), "model", None), "config", None)
    return load(path, {"num_layers": ctx.num_layers, "hidden_size": getattr(config, "hidden_size", None)})


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
    from skipbench.store import readers

    cfg_file = Path(path) / "config.json"
    return readers.json_file(cfg_file, "checkpoint config", ADVICE).get("train") if cfg_file.exists() else None


# the tensor readers live here, not in store/readers.py, so reading tables and manifests never reaches torch
def safetensors_bytes(data: bytes, path: str | os.PathLike, what: str = "weights file", advice: str = "") -> dict:
    """Tensors from the bytes of a safetensors file (read once by the caller, who also fingerprints them)."""
    from safetensors import SafetensorError

    from skipbench.store.readers import Unreadable, why
    from safetensors.torch import load

    if not data:
        raise Unreadable(what, path, "is empty", advice)
    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise Unreadable(what, path, f"is not a readable safetensors file ({why(exc)})", advice) from None


def safetensors_file(path: str | os.PathLike, what: str = "weights file", advice: str = "") -> dict:
    """Tensors of a safetensors file, memory-mapped (a model's weights are not copied into memory first)."""
    from safetensors import SafetensorError

    from skipbench.store.readers import Unreadable, present, why
    from safetensors.torch import load_file

    path = Path(path)
    present(path, what, advice)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise Unreadable(what, path, f"is not a readable safetensors file ({why(exc)})", advice) from None
