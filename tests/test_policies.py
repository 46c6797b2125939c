"""Invariants 4 and 5: U(l,c) is Eq. 2 of Glavas et al.; random skipping runs exactly c layers, reproducibly."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from skipbench.errors import SkipbenchError
from skipbench.policies import make_policy, parse_policies
from skipbench.policies.static import uniform_plan


def eq2_reference(L: int, c: int) -> list[int]:
    """Eq. 2 written with exact fractions, 1-based as in the paper."""
    u = {1: 1}
    for l in range(2, L + 1):
        u[l] = int(sum(u[k] for k in range(1, l)) <= Fraction((l - 1) * c, L))
    return [l - 1 for l in range(1, L + 1) if u[l]]


def test_uniform_matches_eq2_and_runs_exactly_c():
    for L in range(1, 49):
        for c in range(1, L + 1):
            plan = uniform_plan(L, c)
            assert plan == eq2_reference(L, c), (L, c)
            assert len(plan) == c, (L, c)


def test_uniform_24_12_is_every_other_layer():
    assert uniform_plan(24, 12) == list(range(0, 24, 2))


@pytest.mark.parametrize("per_token", [False, True])
def test_random_exactly_c_first_layer_and_seeded(per_token):
    L, c = 30, 11
    pos = torch.arange(6)[None].repeat(4, 1)

    def draw(seed):
        pol = make_policy(f"random{'-token' if per_token else ''}:{c}", L, seed=seed)
        pol.begin(4)
        pol.new_step(pos)
        gates = [pol.gate(i, None) for i in range(L)]
        return torch.stack([torch.as_tensor(g).expand(4, 6) for g in gates], -1)  # [B, T, L]

    a, b, other = draw(1), draw(1), draw(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert (a.sum(-1) == c).all()
    assert a[..., 0].all()
    if not per_token:
        assert (a == a[:, :1]).all()  # one draw per sequence


def test_random_without_first_layer():
    pol = make_policy("random:3", 10, seed=0, first_layer=False)
    firsts = []
    for key in range(40):
        pol.begin(1, row_keys=[key])
        firsts.append(0 in pol.executed_layers())
        assert len(pol.executed_layers()) == 3
    assert not all(firsts)


@pytest.mark.parametrize("cost", [0, -1, 31])
def test_invalid_costs(cost):
    with pytest.raises(SkipbenchError, match="between 1 and 30"):
        make_policy(f"uniform:{cost}", 30)


def test_unknown_policy_lists_known():
    with pytest.raises(SkipbenchError, match="known: full, early-exit, reverse, uniform, random, random-token, random-attention, skipdecode, layers, controller, flexidepth"):
        make_policy("nope", 10)


def test_spec_parsing():
    assert make_policy("uniform:15", 30).executed_layers() == uniform_plan(30, 15)
    assert make_policy("early-exit:4", 30).executed_layers() == [0, 1, 2, 3]
    assert make_policy("random-token:22", 30).per_token
    with pytest.raises(SkipbenchError):
        make_policy("uniform:x", 30)


def test_one_grammar_for_points_sweeps_and_sets():
    specs = parse_policies("full,uniform:8,15,22,layers:0,3,5,random-token:22,flexidepth", seed=3)
    assert [s.label for s in specs] == ["full", "uniform:8", "uniform:15", "uniform:22", "layers:0,3,5",
                                        "random-token:22", "flexidepth:runs/flexidepth"]
    assert all(s.seed == 3 for s in specs)
    assert [s.cost(30) for s in specs] == [30.0, 8.0, 15.0, 22.0, 3.0, 22.0, None]  # learned: measured, not nominal
    assert [s.label for s in parse_policies("layers:0;3;5")] == ["layers:0,3,5"]  # bench's older form
    assert parse_policies(["uniform:4", "early-exit:2"])[1].plan(6) == [0, 1]
    for bad, msg in (("8,15", "follows no NAME:ARG"), ("uniform:31", "between 1 and 30"), ("layers:0,40", "0..29"),
                     ("full:3", "takes no argument"), ("nope:3", "unknown policy 'nope'")):
        with pytest.raises(SkipbenchError, match=msg):
            [s.checked(30) for s in parse_policies(bad)]
