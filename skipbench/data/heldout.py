"""Learned policies are evaluated on items they were not trained on: the check every command runs before it scores a
checkpoint (evaluate, flexidepth usage, lm-eval and compare on the shipped tasks)."""

from __future__ import annotations

from skipbench.data import DataSpec, load_items
from skipbench.errors import SkipbenchError
from skipbench.store.checkpoints import training_record


def check_held_out(items, path: str) -> None:
    """Learned policies are evaluated on items they were not trained on: the checkpoint's training items
    (rebuilt from its recorded data spec) must not overlap the items to evaluate."""
    train_cfg = training_record(path)
    if not isinstance(train_cfg, dict) or not train_cfg.get("data"):
        return  # no training record (a hand-made checkpoint): nothing to check against
    try:
        spec = DataSpec(**train_cfg["data"])
    except TypeError as exc:
        raise SkipbenchError(f"'{path}/config.json' records a training dataset skipbench cannot rebuild ({exc}); "
                             "train it again, or point to another folder") from None
    trained = {it.item_id for it in load_items(spec)}
    seen = sum(it.item_id in trained for it in items)
    if seen:
        raise SkipbenchError(f"{seen} of the {len(items)} items to evaluate were used to train '{path}' (dataset "
                             f"{spec.name}, split {spec.split}, seed {spec.seed}); evaluate a learned policy on "
                             "held-out items, e.g. --split test")
