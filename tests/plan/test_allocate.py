import itertools

import numpy as np
import pytest

from adatsq.plan.allocate import allocate, pareto_mask


def brute_force(err, cost, allowed, cap):
    best = (np.inf, None)
    for combo in itertools.product(range(err.shape[1]), repeat=err.shape[0]):
        rows = np.arange(err.shape[0])
        if allowed[rows, combo].all() and cost[rows, combo].sum() <= cap + 1e-12:
            best = min(best, (err[rows, combo].sum(), combo), key=lambda x: x[0])
    return best[0]


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_exact_for_convex_unit_steps(seed):
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5])
    err = rng.lognormal(0, 1, (5, 1)) * 4.0**-bits  # convex decreasing, every upgrade costs 1
    cost = np.tile(bits, (5, 1)).astype(float)
    allowed = np.ones_like(err, dtype=bool)
    for cap in range(10, 26):
        choice = allocate(err, cost, allowed, cap)
        assert cost[np.arange(5), choice].sum() <= cap
        assert err[np.arange(5), choice].sum() == pytest.approx(brute_force(err, cost, allowed, cap))


@pytest.mark.parametrize("seed", range(5))
def test_allocation_respects_cap_and_mask_and_is_close_to_optimal(seed):
    rng = np.random.default_rng(seed)
    err = rng.random((5, 4))
    cost = rng.integers(1, 6, (5, 4)).astype(float)
    allowed = rng.random((5, 4)) < 0.7
    allowed[:, 0] = True
    cheapest = np.where(allowed, cost, np.inf).min(axis=1).sum()
    assert allocate(err, cost, allowed, cheapest - 0.5) is None
    for cap in np.linspace(cheapest, cost.sum(), 6):
        choice = allocate(err, cost, allowed, cap)
        rows = np.arange(5)
        assert allowed[rows, choice].all() and cost[rows, choice].sum() <= cap + 1e-9
        assert err[rows, choice].sum() <= 1.25 * brute_force(err, cost, allowed, cap) + 1e-12


def test_pareto_mask_drops_dominated_points_and_duplicates():
    costs = [1, 2, 2, 3, 4, 1]
    errors = [5, 3, 4, 3, 1, 5]
    assert pareto_mask(costs, errors).tolist() == [True, True, False, False, True, False]
