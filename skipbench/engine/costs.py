"""When gathering pays: the engine's choice, per layer and decode step, between running a layer densely (every row,
then keep the running rows' outputs: `--impl mask`) and gathered (only the rows that run it: `--impl gather`).

Why measured and not a rule: at a decode step a layer's matmuls have one row per sequence, and on a CPU (or a GPU
at a small batch) they cost what reading the weights costs, however many rows there are. Gathering 6 of 8 rows
then saves nothing and adds index work and a separate K/V pass for the rows that skip (`fill`); gathering 1 of 8
can still pay. Where that crosses over depends on the machine, the model's width, the KV mode and the batch, so
`--impl auto` times one layer of this shape once per (machine, threads, dtype, KV mode, batch) at each number of
running rows, both ways, keeps the table in the cache (`<cache>/layer-costs/`), and takes the cheaper path at
every partial layer of every decode step. Both paths give the same tokens (tests/test_engine.py).

Only one-token steps (decode, drafts) are chosen this way; a step of many tokens (a prompt, a verify pass) gathers:
its matmuls are large enough that their cost follows the rows and tokens they get.

The same table holds the parts of a dense layer (attention, MLP, the K/V a skipping row writes), which `bench`
uses for its ideal of what a batch can actually skip.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from skipbench import readers
from skipbench.errors import note

VERSION = 1  # bump when what is timed changes: tables of an older version are not reused
CONTEXT = 128  # cache positions a calibration step attends over
WARMUP, REPEATS = 3, 15


@dataclass(frozen=True)
class LayerCosts:
    """Median seconds of one decoder layer at a one-token step of `batch` rows."""

    batch: int
    dense: tuple[float, ...]  # [r - 1]: r of the rows run it (r = 1 .. batch), computed for every row, then selected
    gathered: tuple[float, ...]  # [r - 1]: r rows run it, gathered (r = batch: every row, the plain layer)
    routed_dense: tuple[float, ...]  # a routed layer (FlexiDepth), r rows taking the MLP: the MLP for every row
    routed_gathered: tuple[float, ...]  # the same, the MLP for the r rows only
    attention: float  # the parts of a layer every row runs: attention (norm, q/k/v, cache write, attention, output)
    mlp: float  # norm and MLP
    kv: float  # K/V of every row without attention (`fill` mode's write for a layer no row runs)
    seconds: float = 0.0  # what the calibration took

    def gather_pays(self, rows: int) -> bool:
        return self.gathered[rows - 1] < self.dense[rows - 1]

    def routed_gather_pays(self, rows: int) -> bool:
        return self.routed_gathered[rows - 1] < self.routed_dense[rows - 1]

    def crossover(self) -> str:
        """Which running-row counts gather, in words (bench's manifest and notes)."""
        rows = [r for r in range(1, self.batch) if self.gather_pays(r)]
        return f"gathers at {rows} of {self.batch} rows" if rows else f"never gathers at {self.batch} rows"


def _shape_key(adapter, kv_mode: str, batch: int, device: torch.device, dtype: torch.dtype) -> str:
    cfg = adapter.model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "intermediate_size", "ffn_dim",
                                               "num_attention_heads", "num_key_value_heads", "head_dim")}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    return json.dumps({"shape": shape, "kv_mode": kv_mode, "batch": batch, "device": where, "dtype": str(dtype),
                       "torch": torch.__version__, "compiled": bool(getattr(adapter, "compiled", False)),
                       "context": CONTEXT, "version": VERSION}, sort_keys=True)


def table_path(adapter, kv_mode: str, batch: int):
    """Where the table of this layer shape, machine, KV mode and batch is kept, and its key."""
    from skipbench.models.loading import cache_dir

    param = next(adapter.model.parameters())
    key = _shape_key(adapter, kv_mode, batch, param.device, param.dtype)
    return cache_dir() / "layer-costs" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json", key


def save(path, costs: LayerCosts, key: str) -> None:
    from skipbench.results import write_text_atomic

    write_text_atomic(path, json.dumps({"costs": asdict(costs), "key": json.loads(key)}))


def layer_costs(engine, batch: int) -> LayerCosts:
    """The table for an engine's layer shape and KV mode, this machine and `batch`: read from the cache, or measured
    (about a second on the embedded model on two CPU cores) and written there."""
    path, key = table_path(engine.ad, engine.kv_mode, batch)
    if path.exists():
        try:
            saved = readers.json_file(path, "layer cost table")
            return LayerCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["costs"].items()})
        except (readers.Unreadable, KeyError, TypeError) as exc:  # measured again, the cache rewritten
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'layer cost table {str(path)!r} is incomplete'}"
                 ": measuring it again")
    note(f"--impl auto: timing one layer at batch {batch}, dense and gathered (once per model shape and machine)")
    costs = calibrate(engine, batch)
    save(path, costs, key)
    return costs


@torch.no_grad()
def calibrate(engine, batch: int) -> LayerCosts:
    """Time one layer (the middle one; every layer has the same shape) at a one-token step over a cache of CONTEXT
    positions, for every number of running rows, densely and gathered, round-robin so drift hits all alike."""
    from skipbench.engine.protocol import Route

    began = time.perf_counter()
    adapter = engine.ad
    param = next(adapter.model.parameters())
    engines = {impl: type(engine)(adapter, engine.kv_mode, impl) for impl in ("gather", "mask")}  # the engine's class
    cache = engines["gather"].new_cache(batch, CONTEXT + 1, param.device, param.dtype)
    cache.mark(range(adapter.num_layers), True, CONTEXT)
    cache.length = CONTEXT
    i = adapter.num_layers // 2
    h = torch.randn(batch, 1, adapter.model.config.hidden_size, device=param.device, dtype=param.dtype)
    pos = adapter.position_embeddings(h, cache.positions(1))
    ones = torch.ones(batch, 1, device=param.device)

    def running(r: int):
        gate = torch.zeros(batch, 1, dtype=torch.bool, device=param.device)
        gate[:r] = True
        return True if r == batch else gate

    def route(r: int) -> Route:
        g = running(r)
        return Route(run=torch.ones_like(ones, dtype=torch.bool) if g is True else g, scale=ones)

    cases = {}
    for r in range(1, batch + 1):
        for impl, eng in engines.items():
            cases[("layer", impl, r)] = (lambda e=eng, g=running(r): e.layer(i, h, pos, cache, g, True))
            cases[("routed", impl, r)] = (lambda e=eng, rt=route(r): e.routed(i, h, pos, cache, rt))
    eng = engines["gather"]
    x = adapter.attn_norm(i, h)
    cases["attention"] = lambda: eng.attend(i, h, pos, cache)
    cases["mlp"] = lambda: adapter.mlp_block(i, h)
    cases["kv"] = lambda: cache.write(i, *adapter.kv(i, x, pos))
    times: dict = {name: [] for name in cases}
    for rep in range(WARMUP + REPEATS):
        for name, fn in cases.items():
            _sync(param.device)
            t = time.perf_counter()
            fn()
            _sync(param.device)
            if rep >= WARMUP:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def series(kind: str, impl: str) -> tuple[float, ...]:
        return tuple(med[(kind, impl, r)] for r in range(1, batch + 1))

    return LayerCosts(batch=batch, dense=series("layer", "mask"), gathered=series("layer", "gather"),
                      routed_dense=series("routed", "mask"), routed_gathered=series("routed", "gather"),
                      attention=med["attention"], mlp=med["mlp"], kv=med["kv"], seconds=time.perf_counter() - began)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
