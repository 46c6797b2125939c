"""When gathering pays: the engine's choice, per layer and decode step, between running a layer densely (every row,
then keep the running rows' outputs: `--impl mask`) and gathered (only the rows that run it: `--impl gather`).

Why measured and not a rule: at a decode step a layer's matmuls have one row per sequence, and on a CPU (or a GPU
at a small batch) they cost what reading the weights costs, however many rows there are. Gathering 6 of 8 rows
then saves nothing and adds index work and a separate K/V pass for the rows that skip (`fill`); gathering 1 of 8
can still pay. Where that crosses over depends on the machine, the model's width, the KV mode and the batch, so
`--impl auto` times one layer of this shape once per (CPU model or GPU, threads, dtype, KV mode, batch) at each
number of running rows, both ways, over a cache of CONTEXT positions (the choice does not follow the context
length), keeps the table in the cache (`<cache>/layer-costs/`), and takes the cheaper path at every partial layer
of every decode step. The two paths compute the same function; their floats may differ in the last bits (their
matmuls have other row counts), and the tests find the same tokens (tests/test_engine.py).

Only one-token steps (decode, drafts) are chosen this way; a step of many tokens (a prompt, a verify pass) gathers:
its matmuls are large enough that their cost follows the rows and tokens they get.

The same table holds the parts of a dense layer (attention, MLP, and the K/V every row writes at a layer none runs),
which `bench` uses for its ideal of what a batch can actually skip.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from skipbench.store import readers
from skipbench.store.distributed import tensor_parallel
from skipbench.errors import note
from skipbench.models.loading import sync

VERSION = 2  # bump when what is timed changes: tables of an older version are not reused (2: a routed layer's
# gathered path computes only the K/V of its skipped tokens, and is timed in the engine's KV mode)
CONTEXT = 128  # cache positions a calibration step attends over
WARMUP, REPEATS = 3, 15


@dataclass(frozen=True)
class LayerCosts:
    """Median seconds of one decoder layer at a one-token step of `batch` rows, timed at `rows` running rows (every
    count up to 16 rows, a geometric grid above: between two, the times are interpolated)."""

    batch: int
    rows: tuple[int, ...]  # running-row counts timed, increasing, ending at `batch`
    dense: tuple[float, ...]  # per count in `rows`: the layer computed for every row, then selected
    gathered: tuple[float, ...]  # the same, gathered (at `batch` rows: every row, the plain layer)
    routed_dense: tuple[float, ...]  # a routed layer (FlexiDepth), that many rows routed: attention, MLP for every row
    routed_gathered: tuple[float, ...]  # the same, queries, attention, its output and the MLP for those rows only (the
    # other rows: their K/V in `fill` mode)
    attention: float  # the parts of a layer every row runs: attention (norm, q/k/v, cache write, attention, output)
    mlp: float  # norm and MLP
    kv: float  # K/V of all `batch` rows without attention (`fill` mode's write at a layer no row runs)
    seconds: float = 0.0  # what the calibration took

    def _at(self, series: tuple[float, ...], rows: int) -> float:
        return float(np.interp(rows, self.rows, series))

    def gather_pays(self, rows: int) -> bool:
        return self._at(self.gathered, rows) < self._at(self.dense, rows)

    def routed_gather_pays(self, rows: int) -> bool:
        return self._at(self.routed_gathered, rows) < self._at(self.routed_dense, rows)

    def crossover(self) -> str:
        """Which running-row counts gather, in words (bench's manifest)."""
        if self.batch == 1:
            return "batch 1 has no partial layers"
        rows = [r for r in range(1, self.batch) if self.gather_pays(r)]
        return f"gathers at {rows} running rows of {self.batch}" if rows else f"never gathers at batch {self.batch}"

    def check(self, batch: int) -> None:
        """Raises ValueError unless this is a well-formed table for `batch` (a cache file may be anything)."""
        series = (self.dense, self.gathered, self.routed_dense, self.routed_gathered)
        ok = (self.batch == batch and len(self.rows) >= 1 and list(self.rows) == sorted(set(self.rows))
              and all(isinstance(r, int) and 1 <= r <= batch for r in self.rows) and self.rows[-1] == batch
              and all(len(x) == len(self.rows) for x in series)
              and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                      for v in (*sum(series, ()), self.attention, self.mlp, self.kv)))
        if not ok:
            raise ValueError("not a cost table for this batch")


def measured_rows(batch: int) -> tuple[int, ...]:
    """Running-row counts a calibration times: all up to 16 rows; above, 1-4 and a grid of factor sqrt(2), plus
    batch - 1 and batch (so a large batch costs seconds, not minutes)."""
    if batch <= 16:
        return tuple(range(1, batch + 1))
    grid = {1, 2, 3, 4, batch - 1, batch} | {round(2 ** (k / 2)) for k in range(4, int(2 * math.log2(batch)) + 1)}
    return tuple(sorted(r for r in grid if 1 <= r <= batch))


def _where() -> str:
    """The machine, as far as timings go: the CPU's model name and torch's threads."""
    import os

    from skipbench.store.results import cpu_model

    return f"{cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


def _shape_key(adapter, kv_mode: str, batch: int, device: torch.device, dtype: torch.dtype) -> str:
    cfg = adapter.model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "intermediate_size", "ffn_dim",
                                               "num_attention_heads", "num_key_value_heads", "head_dim")}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _where()
    return json.dumps({"shape": shape, "kv_mode": kv_mode, "batch": batch, "device": where, "dtype": str(dtype),
                       "torch": torch.__version__, **({"tp": adapter.tp} if adapter.tp > 1 else {}),
                       "context": CONTEXT, "version": VERSION}, sort_keys=True)


def table_path(adapter, kv_mode: str, batch: int):
    """Where the table of this layer shape, machine, KV mode and batch is kept, and its key."""
    from skipbench.models.loading import cache_dir

    param = next(adapter.model.parameters())
    key = _shape_key(adapter, kv_mode, batch, adapter.devices[adapter.num_layers // 2], param.dtype)
    return cache_dir() / "layer-costs" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json", key


def save(path, costs: LayerCosts, key: str) -> None:
    from skipbench.store.results import write_text_atomic

    write_text_atomic(path, json.dumps({"costs": asdict(costs), "key": json.loads(key)}))


_READ: dict = {}  # tables and read rates read or measured in this process (an engine per decoding reads none again)


def layer_costs(engine, batch: int, fresh: bool = False) -> LayerCosts:
    """The table for an engine's layer shape and KV mode, this machine and `batch`: read from the cache, or measured
    (about a second on the embedded model at batch 8 on two CPU cores) and written there; `fresh` measures it again
    (`bench --recalibrate`: a table measured on a busy machine is otherwise kept)."""
    path, key = table_path(engine.ad, engine.kv_mode, batch)
    if not fresh and str(path) in _READ:
        return _READ[str(path)]
    if not fresh and path.exists() and not tensor_parallel():  # under --tp every rank times, its collectives in step
        try:
            saved = readers.json_file(path, "layer cost table")
            if saved.get("key") != json.loads(key):
                raise ValueError("its key is another table's")
            table = LayerCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["costs"].items()})
            table.check(batch)
            _READ[str(path)] = table
            return table
        except (readers.Unreadable, KeyError, TypeError, ValueError, AttributeError) as exc:  # measured again
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'layer cost table {str(path)!r} is damaged ({exc})'}"
                 ": measuring it again")
    note(f"--impl auto: timing one layer at batch {batch}, dense and gathered (once per model shape and machine)")
    table = calibrate(engine, batch)
    try:
        save(path, table, key)
    except OSError as exc:  # the run goes on with the table in memory
        note(f"cannot keep the layer cost table in {str(path.parent)!r} ({readers.why(exc)}): measured again next time")
    _READ[str(path)] = table
    return table


def median_times(cases: dict, device: torch.device) -> dict:
    """Each case's median seconds over REPEATS calls after WARMUP, round-robin so drift hits all alike."""
    times: dict = {name: [] for name in cases}
    for rep in range(WARMUP + REPEATS):
        for name, fn in cases.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if rep >= WARMUP:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def calibrate(engine, batch: int) -> LayerCosts:
    """Time one layer (the middle one; every layer has the same shape) at a one-token step over a cache of CONTEXT
    positions, for every number of running rows, densely and gathered, round-robin so drift hits all alike."""
    from skipbench.engine.protocol import Route, moved

    began = time.perf_counter()
    adapter = engine.ad
    i = adapter.num_layers // 2
    param, device = next(adapter.model.parameters()), adapter.devices[i]  # the timed layer's device (a placed model)
    engines = {impl: type(engine)(adapter, engine.kv_mode, impl) for impl in ("gather", "mask")}  # the engine's class
    cache = engines["gather"].new_cache(batch, CONTEXT + 1, device, param.dtype)
    cache.mark(range(adapter.num_layers), True, CONTEXT)
    cache.length = CONTEXT
    noise = torch.Generator(device=device).manual_seed(0)  # leaves the global random state alone
    h = torch.randn(batch, 1, adapter.model.config.hidden_size, device=device, dtype=param.dtype, generator=noise)
    pos = moved(adapter.position_embeddings(h, cache.positions(1)), device)
    ones = torch.ones(batch, 1, device=device, dtype=param.dtype)
    rows = measured_rows(batch)

    def running(r: int):
        gate = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        gate[:r] = True
        return True if r == batch else gate

    def route(r: int) -> Route:  # skipped rows write their K/V as a router of this KV mode has them do
        g = running(r)
        return Route(run=torch.ones_like(ones, dtype=torch.bool) if g is True else g, scale=ones,
                     kv_for_skipped=engine.kv_mode == "fill")

    cases = {}
    for r in rows:
        for impl, eng in engines.items():
            cases[("layer", impl, r)] = (lambda e=eng, g=running(r): e.layer(i, h, pos, cache, g, True))
            cases[("routed", impl, r)] = (lambda e=eng, rt=route(r): e.routed(i, h, pos, cache, rt))
    eng = engines["gather"]
    x = adapter.attn_norm(i, h)
    cases["attention"] = lambda: eng.attend(i, h, pos, cache)
    cases["mlp"] = lambda: adapter.mlp_block(i, h)
    cases["kv"] = lambda: cache.write(i, *adapter.kv(i, x, pos))
    med = median_times(cases, device)

    def series(kind: str, impl: str) -> tuple[float, ...]:
        return tuple(med[(kind, impl, r)] for r in rows)

    return LayerCosts(batch=batch, rows=rows, dense=series("layer", "mask"), gathered=series("layer", "gather"),
                      routed_dense=series("routed", "mask"), routed_gathered=series("routed", "gather"),
                      attention=med["attention"], mlp=med["mlp"], kv=med["kv"], seconds=time.perf_counter() - began)


RATE_VERSION = 1  # bump when how the rate is measured changes
RATE_BYTES = 256 * 2**20  # the matrix read: far larger than a CPU's last-level cache, so it streams from memory


@dataclass(frozen=True)
class ReadRate:
    """The machine's weight-read rate: bytes per second of a matrix-vector product over a RATE_BYTES matrix in the
    run's dtype and thread count (median of REPEATS after WARMUP). A decode step at batch 1 reads every weight it
    uses once, so weight bytes x steps/s over this rate is the share of the memory bound a decode reaches."""

    bytes_per_s: float
    matrix: tuple[int, int]
    dtype: str
    seconds: float = 0.0  # what the measurement took


@torch.no_grad()
def measure_read_rate(device: torch.device, dtype: torch.dtype) -> ReadRate:
    began = time.perf_counter()
    cols = 4096
    rows = RATE_BYTES // (cols * torch.tensor([], dtype=dtype).element_size())
    w = torch.empty(rows, cols, device=device, dtype=dtype).uniform_(-1, 1)  # written: pages are real, not zero-mapped
    x = torch.randn(1, cols, device=device, dtype=dtype)
    times = []
    for rep in range(WARMUP + REPEATS):
        sync(device)
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        sync(device)
        if rep >= WARMUP:
            times.append(time.perf_counter() - t)
    return ReadRate(bytes_per_s=w.numel() * w.element_size() / statistics.median(times), matrix=(rows, cols),
                    dtype=str(dtype).removeprefix("torch."), seconds=time.perf_counter() - began)


def read_rate(device: torch.device, dtype: torch.dtype, fresh: bool = False) -> ReadRate:
    """The rate for this machine (GPU name, or CPU model and threads), dtype and torch: read from the cache
    (`<cache>/read-rate/`), or measured (about a second) and kept there, like the layer cost tables; `fresh`
    measures it again (`bench --recalibrate`)."""
    from skipbench.models.loading import cache_dir

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _where()
    key = json.dumps({"device": where, "dtype": str(dtype), "torch": torch.__version__, "bytes": RATE_BYTES,
                      "version": RATE_VERSION}, sort_keys=True)
    path = cache_dir() / "read-rate" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if not fresh and str(path) in _READ:
        return _READ[str(path)]
    if not fresh and path.exists():
        try:
            saved = readers.json_file(path, "read-rate record")
            rate = ReadRate(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["rate"].items()})
            if saved.get("key") != json.loads(key) or not (math.isfinite(rate.bytes_per_s) and rate.bytes_per_s > 0):
                raise ValueError("it is another machine's, or not a rate")
            _READ[str(path)] = rate
            return rate
        except (readers.Unreadable, KeyError, TypeError, ValueError) as exc:  # measured again
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'read-rate record {str(path)!r} is damaged ({exc})'}"
                 ": measuring it again")
    rate = measure_read_rate(device, dtype)
    try:
        from skipbench.store.results import write_text_atomic

        write_text_atomic(path, json.dumps({"rate": asdict(rate), "key": json.loads(key)}))
    except OSError as exc:
        note(f"cannot keep the read-rate record in {str(path.parent)!r} ({readers.why(exc)}): measured again next time")
    _READ[str(path)] = rate
    return rate
