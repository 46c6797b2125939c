"""The item every dataset yields, and the seeded train/validation/test split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from skipbench.errors import SkipbenchError

SPLITS = ("all", "train", "validation", "test")


@dataclass(frozen=True)
class Item:
    item_id: str  # a hash of the prompt: stable across runs and machines
    prompt: str
    reference: str
    subtask: str = ""
    answer: str | None = None  # what exact match checks, when the dataset defines one

    @property
    def key(self) -> int:
        """An integer from the item id (seeds per-item random draws)."""
        return int(self.item_id[:15], 16)


def item_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def make_item(prompt: str, reference: str, subtask: str = "", answer: str | None = None) -> Item:
    return Item(item_id(prompt), prompt, reference, subtask, answer)


def split_items(items: list[Item], split: str, seed: int = 0, fractions=(0.70, 0.15, 0.15)) -> list[Item]:
    """A seeded 70/15/15 split: items ordered by a hash of (seed, item id), so it never depends on file order."""
    if split not in SPLITS:
        raise SkipbenchError(f"--split must be one of {', '.join(SPLITS)}; got '{split}'")
    if split == "all":
        return list(items)
    ranked = sorted(items, key=lambda it: hashlib.sha1(f"{seed}:{it.item_id}".encode()).hexdigest())
    n_train = round(len(ranked) * fractions[0])
    n_val = round(len(ranked) * fractions[1])
    chosen = {"train": ranked[:n_train], "validation": ranked[n_train : n_train + n_val], "test": ranked[n_train + n_val :]}[split]
    ids = {it.item_id for it in chosen}
    return [it for it in items if it.item_id in ids]  # keep the dataset's own order
