"""`angular:C`: contiguous block removal after Gromov et al. (2024, "The Unreasonable Ineffectiveness of the
Deeper Layers").

Remove the n = L - C consecutive layers l..l+n-1 whose input h_l and output h_{l+n} are closest in angular
distance, d(l, n) = arccos(cos(h_l, h_{l+n})) / pi at the last token of each calibration sequence, averaged over
the sequences (policies/calibration.py). The last layer is never removed (l + n <= L - 1), as the paper keeps
it; ties go to the earlier block.
"""

from __future__ import annotations

import numpy as np

from skipbench.policies.calibration import similarities
from skipbench.policies.static import plan_policy


def distances(spec, ctx) -> tuple[int, np.ndarray]:
    """(n, d) with d[l] the angular distance of the block starting at layer l, for every l that keeps the last layer."""
    n = ctx.num_layers - spec.int_arg()
    if n == 0:
        return 0, np.zeros(0)
    sims = similarities(ctx, spec.opt("calibration"), spec.opt("calibration-tokens"), spec.opt("calibration-seed"))
    return n, np.array([sims.angle_last[l, l + n] for l in range(ctx.num_layers - n)])


def plan(spec, ctx) -> list[int]:
    n, d = distances(spec, ctx)
    start = int(np.argmin(d)) if n else ctx.num_layers
    return [i for i in range(ctx.num_layers) if not start <= i < start + n]


def explain(spec, ctx) -> list[dict]:
    n, d = distances(spec, ctx)
    best = int(np.argmin(d)) if n else -1
    return [{"start": l, "end": l + n - 1, "angular_distance": float(d[l]), "removed": l == best} for l in range(len(d))]


build = plan_policy(plan)
