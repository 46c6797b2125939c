"""Datasets: embedded generators, files, and Hugging Face datasets, behind one `load_dataset`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from skipbench.data import spec_bench, synthetic
from skipbench.data.files import load_file, looks_like_file
from skipbench.data.hub import HUB, HUB_FIELDS, load_hub
from skipbench.data.items import SPLITS, Item, split_items
from skipbench.errors import SkipbenchError

EMBEDDED = {
    "arith": (synthetic.arith, "prompt -> reference; exact answers (repeat, sum, product)"),
    "text": (synthetic.text, "prompt -> reference from templates (copy, summarize, continue, qa)"),
}


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    name: str
    split: str = "all"
    limit: int | None = None
    seed: int = 0
    prompt_field: str | None = None
    reference_field: str | None = None


def load_items(spec: DataSpec) -> list[Item]:
    """Items of one or more datasets (comma-separated names, interleaved round-robin so that `limit`
    takes from each), split, then cut to `limit`."""
    sources = [split_items(_load_one(n.strip(), spec), spec.split, spec.seed) for n in spec.name.split(",") if n.strip()]
    items = [it for group in itertools.zip_longest(*sources) for it in group if it is not None]
    if spec.limit is not None:
        if spec.limit < 1:
            raise SkipbenchError(f"--limit must be >= 1, got {spec.limit}")
        items = items[: spec.limit]
    if not items:
        raise SkipbenchError(f"dataset '{spec.name}' (split {spec.split}) has no items")
    return items


def _load_one(name: str, spec: DataSpec) -> list[Item]:
    if name in EMBEDDED:
        return EMBEDDED[name][0](seed=spec.seed)
    if spec_bench.names(name):
        return spec_bench.load(name)
    if name in HUB:
        return load_hub(name)
    if looks_like_file(name):
        return load_file(name, spec.prompt_field, spec.reference_field)
    known = ", ".join([*EMBEDDED, "spec-bench[/CATEGORY]", *HUB])
    raise SkipbenchError(f"unknown dataset '{name}'; known: {known}, or a .json/.jsonl/.csv/.parquet file")


def catalogue() -> list[dict]:
    rows = []
    for name, (fn, fields) in EMBEDDED.items():
        items = fn()
        rows.append({"name": name, "source": "embedded", "items": len(items),
                     "subtasks": ", ".join(sorted({i.subtask for i in items})), "fields": fields})
    prompts = spec_bench.load(spec_bench.NAME)
    rows.append({"name": "spec-bench[/CATEGORY]", "source": "embedded: Spec-Bench's prompts (Apache-2.0)",
                 "items": len(prompts), "subtasks": ", ".join(spec_bench.CATEGORIES),
                 "fields": "first turn -> no reference"})
    for name, (hub_id, config, split) in HUB.items():
        rows.append({"name": name, "source": f"hub: {hub_id}", "items": None, "subtasks": "", "fields": HUB_FIELDS[name]})
    return rows


__all__ = ["DataSpec", "Item", "SPLITS", "load_items", "catalogue"]
