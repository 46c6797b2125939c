"""Data parallelism under PyTorch's own launcher (`torchrun ... -m skipbench ...`).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; skipbench then joins a process group (nccl on CUDA, gloo
on CPU), gives each rank a deterministic share of the items (by item id), lets each rank write its own
parquet part, and has rank 0 merge the parts once every rank is done. Without torchrun (WORLD_SIZE
unset or 1) nothing here does anything: no process group, no extra files, no extra cost (torch is imported only
when a process group is joined, so the command line can ask `world_size()` and `rank()` cheaply).

A rank that dies makes torchrun stop the others before rank 0 merges, so no merged file is written; the
parts already finished stay on disk and a rerun with the same number of ranks reuses them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from skipbench.errors import SkipbenchError

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0  # this process's share of the items, of `world`
    world: int = 1
    local_rank: int = 0
    tp_rank: int = 0  # tensor parallelism: the processes that hold one model between them (one share of the items)
    tp_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0 and self.tp_rank == 0

    def shard(self, ids: list[str]) -> list[int]:
        """Indices of this rank's items: every world-th item in item-id order (balanced, deterministic)."""
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        return sorted(order[self.rank :: self.world])

    def part(self, path: Path) -> Path:
        """This rank's part of `path` (the path itself in a single process)."""
        if not self.enabled:
            return path
        return path.with_name(f"{path.stem}.rank{self.rank}-of-{self.world}{path.suffix}")

    def parts(self, path: Path) -> list[Path]:
        return [Dist(r, self.world).part(path) for r in range(self.world)]

    def read_parts(self, path: Path):
        """The ranks' parts of `path` as one frame (rank 0, after a barrier)."""
        import pandas as pd

        from skipbench.store.readers import table

        return pd.concat([table(f, "a rank's share", "rerun the same command to compute it again", checked=True)
                          for f in self.parts(path)], ignore_index=True)

    def remove_parts(self, path: Path) -> None:
        """Once merged: the ranks' parts with their manifests, and temporaries a rank killed mid-write left
        (results.write_atomic)."""
        for part in self.parts(path):
            part.unlink(missing_ok=True)
            part.with_suffix(".json").unlink(missing_ok=True)
            for tmp in part.parent.glob(f".{part.name}.tmp-*"):
                tmp.unlink(missing_ok=True)

    def share(self, whole: Path, compute: Callable[[], "pd.DataFrame"]) -> "pd.DataFrame | None":
        """This rank's rows of `whole`: computed and, under torchrun, written as its share (a share an earlier,
        failed run finished is reused instead of computed). `whole` itself is never written here; after `on_main`'s
        barrier, rank 0 reads every share with `joined`."""
        from skipbench.store.readers import reusable
        from skipbench.store.results import write_atomic

        share = self.part(whole)
        if self.enabled and reusable(share, "cached share"):
            return None
        df = compute()
        if self.enabled:
            write_atomic(df, share, {})
        return df

    def joined(self, whole: Path, mine: "pd.DataFrame") -> "pd.DataFrame":
        """Every rank's rows of `whole` as one frame (rank 0, inside `on_main`); `mine` in a single process."""
        return self.read_parts(whole) if self.enabled else mine

    def on_main(self, write: Callable[[], T], read: Callable[[], T]) -> T:
        """The merge step: rank 0 runs `write` (joins the shares, writes the result) while the others wait, then
        they `read` what it wrote. In a single process: `write()`."""
        self.barrier()
        if not self.main:
            self.barrier()
            return read()
        result = write()
        self.barrier()
        return result

    def barrier(self) -> None:
        import torch

        if self.enabled or self.tp_world > 1:
            with _peers_alive():
                torch.distributed.barrier()

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        import torch

        out = [None] * self.world
        with _peers_alive():
            torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64)
        with _peers_alive():
            torch.distributed.all_reduce(t)  # a CPU tensor: reduced by gloo (also when CUDA tensors use nccl)
        return t.tolist()


@contextmanager
def _peers_alive():
    """A collective that fails because another rank died becomes one clear line instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistBackendError and friends
        raise SkipbenchError(f"another rank stopped ({type(exc).__name__}); nothing was merged. "
                             "Rerun the same command with the same number of ranks to resume from the finished parts") from None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if world_size() > 1 else 0


GPUS_PER_RANK = [1]  # a placed model's GPUs per rank (--gpus-per-rank; models/loading.placing sets it)
TP = [1]  # the tensor-parallel degree (--tp; models/loading.placing sets it): the ranks hold one model between them


def tensor_parallel() -> bool:
    return TP[0] > 1


def first_gpu() -> int:
    """This rank's first GPU: its own, or the first of its `--gpus-per-rank` (a model placed across several)."""
    return local_rank() * GPUS_PER_RANK[0]


def current() -> Dist:
    """This process's place under torchrun; joins the process group on first use."""
    world = world_size()
    if world <= 1:
        return Dist()
    import torch

    if tensor_parallel():  # the ranks share one model, not the items: one share of the data; rank 0 writes, the
        # others wait for it at `on_main` and read what it wrote
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        return Dist(local_rank=_env_int("LOCAL_RANK", 0), tp_rank=rank(), tp_world=world)

    d = Dist(rank(), world, _env_int("LOCAL_RANK", 0))
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(first_gpu())
        # gloo carries the CPU-side collectives (objects, counts) on CUDA too
        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return d


def rank() -> int:
    return _env_int("RANK", 0) if world_size() > 1 else 0


def shutdown() -> None:
    torch = sys.modules.get("torch")  # nothing to shut down in a process that never loaded torch
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
