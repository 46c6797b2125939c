"""The sequence-level oracle of Glavas et al. (Sec. 3.3, App. A.5): an exact multiple-choice knapsack.

Each item i takes exactly one configuration k (value V[i, k], cost c[k]) to maximise the mean value
subject to mean cost <= budget (Eq. 3). The greedy oracle (Eq. 4) lets each item take its best
configuration with cost <= budget, with no budget trading.

Why not a plain dynamic programme over (item, total cost): for n = 7,800 items and costs 4..24 it needs
n x 46,800 cells of back-pointers (365 MB) per budget, and n = 10^6 is out of reach. Instead (standard
integer-programming reductions, written here because no maintained library solves MCKP exactly):

1. Lagrangian relaxation. For a price lambda per cost unit every item independently takes
   argmax_k V[i,k] - lambda c[k]. The dual D(lambda) = sum_i max_k (...) + lambda C is an upper bound;
   its minimiser lambda* is found by bisection over the sorted breakpoints.
2. A feasible solution (lower bound LB): the cheaper tie-break at lambda*, then greedy upgrades.
3. Reduced-cost fixing. For any feasible x, value(x) = D(lambda*) - sum_i r_i(x_i) - lambda* slack(x),
   with reduced costs r >= 0. A solution at least as good as LB therefore only uses pairs with
   r_ik <= gap = D(lambda*) - LB. Items with one such pair are fixed; the rest form a small core.
4. An exact DP over the core, on the range of costs the core can span (not the whole capacity).

The result is exact. Memory is bounded by the core: `max_cells` back-pointer bytes (default 2e8); past
that the solver returns the LB solution with its certified gap (D(lambda*) - LB) instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from skipbench.errors import SkipbenchError

TOL = 1e-9


@dataclass
class Solution:
    value: float  # mean value of the assignment
    choice: np.ndarray  # [n] configuration index per item
    mean_cost: float
    exact: bool
    gap: float  # certified bound on (optimum - value), in mean value; 0 when exact
    core: int = 0  # items left to the DP after fixing


class Instance:
    """Values V [n, K] and costs: one per configuration [K] (any order, ties allowed), or one per item and
    configuration [n, K] (a dynamic policy's realized mean layers of each item). Integer costs are used as they are;
    fractional ones are rounded up to 1/RESOLUTION of a layer: the solution is exact for the rounded costs and
    within the budget in the true ones."""

    RESOLUTION = 100

    def __init__(self, values: np.ndarray, costs) -> None:
        self.V = np.asarray(values, dtype=np.float64)
        costs = np.asarray(costs, dtype=np.float64)
        if self.V.ndim != 2 or self.V.shape[0] == 0 or costs.shape not in ((self.V.shape[1],), self.V.shape):
            raise SkipbenchError("oracle: values must be [items, configurations] with one cost per configuration "
                                 "(or per item and configuration)")
        if not np.all(np.isfinite(self.V)):
            raise SkipbenchError("oracle: the metric has missing or infinite values")
        if not np.all(np.isfinite(costs)) or np.any(costs < 0):
            raise SkipbenchError("oracle: configuration costs must be finite and non-negative")
        self.n, self.K = self.V.shape
        self.C = np.broadcast_to(costs, self.V.shape)  # [n, K] costs in layers
        self.scale = 1 if np.all(costs == np.round(costs)) else self.RESOLUTION
        # rounded up: a solution within the budget in these units is within it in the true costs too
        units = np.ceil(self.C * self.scale - 1e-9).astype(np.int64)
        self.g = int(np.gcd.reduce(units.ravel())) or 1
        self.U = units // self.g  # [n, K] cost units
        self._breaks = None

    def capacity(self, budget: float) -> int:
        """Total cost units allowed by a mean-cost budget (integer, floor)."""
        return int(math.floor(self.n * budget * self.scale / self.g + 1e-9))

    def to_budget(self, units: int) -> float:
        return units * self.g / (self.n * self.scale)

    def cheapest(self) -> float:
        """The smallest mean cost any assignment has."""
        return self.to_budget(int(self.U.min(1).sum()))

    # ---- Lagrangian pieces ------------------------------------------------------------------
    def _choose(self, lam: float) -> np.ndarray:
        """argmax_k V - lam u, ties to the cheaper configuration."""
        score = self.V - lam * self.U
        best = score.max(1, keepdims=True)
        tied = score >= best - TOL
        cheapest = np.where(tied, self.U, np.iinfo(np.int64).max)
        return cheapest.argmin(1)

    def _cost(self, choice: np.ndarray) -> int:
        return int(self.U[np.arange(self.n), choice].sum())

    def breakpoints(self) -> np.ndarray:
        if self._breaks is None:
            out = [np.zeros(1)]
            for a in range(self.K):
                for b in range(self.K):
                    du = self.U[:, b] - self.U[:, a]
                    up = du > 0
                    lam = (self.V[up, b] - self.V[up, a]) / du[up]
                    out.append(lam[lam > 0])
            self._breaks = np.unique(np.concatenate(out))
        return self._breaks

    def dual(self, lam: float, cap: int) -> float:
        return float((self.V - lam * self.U).max(1).sum() + lam * cap)


def solve(inst: Instance, budget: float, max_cells: float = 2e8) -> Solution:
    cap = inst.capacity(budget)
    if cap < int(inst.U.min(1).sum()):
        raise SkipbenchError(f"budget {budget} is below the cheapest assignment's mean cost ({inst.cheapest():g})")
    return solve_units(inst, cap, max_cells)


def price(inst: Instance, cap: int) -> float:
    """lambda*: the smallest breakpoint price per cost unit at which every item's own choice, argmax_k V - lambda u
    (cheaper on ties), fits `cap` (0 if the budget does not bind)."""
    breaks = inst.breakpoints()
    lo, hi = 0, len(breaks) - 1  # the cheapest choice everywhere fits at the largest breakpoint (checked by callers)
    while lo < hi:
        mid = (lo + hi) // 2
        if inst._cost(inst._choose(breaks[mid])) <= cap:
            hi = mid
        else:
            lo = mid + 1
    return float(breaks[lo])


def choose_at_price(inst: Instance, lam: float) -> np.ndarray:
    """Each item's configuration at a price per cost unit, alone: argmax_k V - lambda u, cheaper on ties."""
    return inst._choose(lam)


def solve_units(inst: Instance, cap: int, max_cells: float = 2e8) -> Solution:
    """The exact optimum for total cost units <= cap."""
    lam = price(inst, cap)
    start = inst._choose(lam)
    lb_choice = _greedy_fill(inst, start, cap - inst._cost(start))
    lb = float(inst.V[np.arange(inst.n), lb_choice].sum())
    ub = inst.dual(lam, cap)
    gap = max(ub - lb, 0.0)
    if gap <= TOL * max(1.0, abs(ub)):
        return _solution(inst, lb_choice, exact=True, gap=0.0)

    # reduced costs against any maximiser at lambda*
    score = inst.V - lam * inst.U
    r = score.max(1, keepdims=True) - score
    eligible = r <= gap + 1e-9 * max(1.0, abs(ub))
    n_elig = eligible.sum(1)
    core = np.nonzero(n_elig > 1)[0]
    fixed = np.nonzero(n_elig == 1)[0]
    choice = lb_choice.copy()
    choice[fixed] = eligible[fixed].argmax(1)
    cap_core = cap - int(inst.U[fixed, choice[fixed]].sum())

    u_el = np.where(eligible[core], inst.U[core], 0)
    umin = np.where(eligible[core], inst.U[core], np.iinfo(np.int64).max).min(1)
    span = int(min(cap_core - umin.sum(), (u_el.max(1) - umin).sum()))
    if span < 0 or len(core) * (span + 1) > max_cells:
        return _solution(inst, lb_choice, exact=False, gap=gap / inst.n, core=len(core))
    choice[core] = _core_dp(inst, core, eligible[core], umin, span)
    sol = _solution(inst, choice, exact=True, gap=0.0, core=len(core))
    if sol.value * inst.n < lb - 1e-7 or inst._cost(choice) > cap:  # cannot happen; guards the proof's code
        raise RuntimeError("oracle DP returned a worse or infeasible solution than its lower bound")
    return sol


def _greedy_fill(inst: Instance, choice: np.ndarray, slack: int) -> np.ndarray:
    """Spend leftover budget on the upgrades with the best value per cost unit (one per item)."""
    choice = choice.copy()
    if slack <= 0:
        return choice
    rows = np.arange(inst.n)
    du = inst.U - inst.U[rows, choice][:, None]
    dv = inst.V - inst.V[rows, choice][:, None]
    ok = (du > 0) & (dv > 0)
    if not ok.any():
        return choice
    ii, kk = np.nonzero(ok)
    ratio = dv[ii, kk] / du[ii, kk]
    used = np.zeros(inst.n, dtype=bool)
    for j in np.argsort(-ratio, kind="stable"):
        i, k = ii[j], kk[j]
        step = int(du[i, k])
        if not used[i] and step <= slack:
            choice[i], used[i], slack = k, True, slack - step
            if slack == 0:
                break
    return choice


def _core_dp(inst: Instance, core, eligible, umin, span: int) -> np.ndarray:
    """Exact DP over core items on costs above their minimum: best[c] = max value with extra cost <= c."""
    m = len(core)
    best = np.zeros(span + 1)
    back = np.zeros((m, span + 1), dtype=np.int8)
    neg = -np.inf
    for j, i in enumerate(core):
        new = np.full(span + 1, neg)
        arg = np.zeros(span + 1, dtype=np.int8)
        for k in np.nonzero(eligible[j])[0]:
            d = int(inst.U[i, k] - umin[j])
            if d > span:
                continue
            cand = np.full(span + 1, neg)
            cand[d:] = best[: span + 1 - d] + inst.V[i, k]
            better = cand > new + 1e-12
            new = np.where(better, cand, new)
            arg = np.where(better, k, arg)
        best, back[j] = new, arg
    out = np.zeros(m, dtype=np.int64)
    c = span
    for j in range(m - 1, -1, -1):
        k = int(back[j, c])
        out[j] = k
        c -= int(inst.U[core[j], k] - umin[j])
    return out


def _solution(inst: Instance, choice: np.ndarray, exact: bool, gap: float, core: int = 0) -> Solution:
    rows = np.arange(inst.n)
    return Solution(float(inst.V[rows, choice].mean()), choice, float(inst.C[rows, choice].mean()), exact, gap, core)


def greedy(inst: Instance, budget: float) -> Solution:
    """Eq. 4: each item its best configuration with cost <= budget (cheaper on ties; with per-item costs, an item
    with no configuration that cheap takes its cheapest)."""
    allowed = inst.U * inst.g <= budget * inst.scale + 1e-9  # [n, K], on the rounded costs the oracle uses
    if not allowed.any():
        raise SkipbenchError(f"budget {budget} is below the cheapest configuration's cost ({inst.C.min():g})")
    # per-item costs: an item none of whose configurations fits takes its cheapest one
    allowed |= ~allowed.any(1, keepdims=True) & (inst.U == inst.U.min(1, keepdims=True))
    score = np.where(allowed, inst.V, -np.inf)
    best = score.max(1, keepdims=True)
    tied = score >= best - TOL
    choice = np.where(tied, inst.U, np.iinfo(np.int64).max).argmin(1)
    return _solution(inst, choice, exact=True, gap=0.0)


def smallest_budget_reaching(inst: Instance, target_mean: float) -> float | None:
    """The smallest mean-cost budget at which the oracle's mean value reaches `target_mean` (the paper's star)."""
    lo, hi = int(inst.U.min(1).sum()), int(inst.U.max(1).sum())
    goal = target_mean - 1e-12
    if solve_units(inst, hi).value < goal:
        return None
    while lo < hi:  # the oracle's value is non-decreasing in the capacity
        mid = (lo + hi) // 2
        if solve_units(inst, mid).value >= goal:
            hi = mid
        else:
            lo = mid + 1
    return inst.to_budget(lo)
