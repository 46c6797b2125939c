"""Keyed random draws: the one place skipbench turns a key into random numbers (statistics' own resampling and
synthetic benchmark instances aside).

Every random choice (a sequence's random layers, a token's Gumbel noise, a training example's layer dropout) is
drawn from numpy's generator seeded with a key such as (seed, row key, position) or (seed, step, example). A draw
then depends on what it is for, never on its batch, its rank or the order of the work, so batch sizes, micro-
batches and data-parallel ranks give the same choices, and a cached decode equals a recomputation.
"""

from __future__ import annotations

import numpy as np


def rng(*key) -> np.random.Generator:
    """A generator for this key (integers; negatives and large values folded into numpy's range)."""
    return np.random.default_rng([int(k) % 2**63 for k in key])


def uniform(keys: list, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform draws in (0, 1) of `shape` per key, stacked: [len(keys), *shape]. numpy fills an array in order,
    so a key's first T rows of a [T, ...] draw are the same whatever T is (padded widths do not matter)."""
    return np.clip(np.stack([rng(*key).random(shape) for key in keys]), 1e-10, 1 - 1e-10)
