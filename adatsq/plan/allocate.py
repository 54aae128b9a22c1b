"""Choose one option per item (a bit-width per layer, or per layer × segment) under a cost cap.

A multiple-choice knapsack, solved the way HAWQ/MixDQ-style allocators do: the Lagrangian relaxation
min Σ err + λ·cost gives the lower convex hull of (cost, error) exactly, the largest hull point under
the cap is found by bisection over the hull's breakpoints, and a greedy marginal-gain pass spends the
slack that remains. Exact whenever every hull step has the same cost (e.g. 2/3/4 bits, equal layers);
otherwise a near-optimal heuristic. Pure numpy, so the beam can call it hundreds of times.
"""

from __future__ import annotations

import numpy as np

from adatsq.errors import PlanError


def _choose(err: np.ndarray, cost: np.ndarray, allowed: np.ndarray, lam: float) -> np.ndarray:
    """argmin of err + lam·cost per row (lam = inf: cheapest), ties broken towards the lower cost."""
    primary = cost if np.isinf(lam) else err + lam * cost
    secondary = err if np.isinf(lam) else cost
    primary = np.where(allowed, primary, np.inf)
    ties = primary <= primary.min(axis=1, keepdims=True)
    return np.where(ties, secondary, np.inf).argmin(axis=1)


def _lambda_grid(err: np.ndarray, cost: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One λ inside every interval between hull breakpoints, from 0 (least error) to inf (cheapest)."""
    e_i, e_j = err[:, :, None], err[:, None, :]
    c_i, c_j = cost[:, :, None], cost[:, None, :]
    pair = allowed[:, :, None] & allowed[:, None, :] & (c_j > c_i) & (e_j < e_i)
    with np.errstate(divide="ignore", invalid="ignore"):
        breaks = np.unique(((e_i - e_j) / np.where(pair, c_j - c_i, 1.0))[pair])
    return np.concatenate([[0.0], (breaks[:-1] + breaks[1:]) / 2, [np.inf]])


def allocate(err: np.ndarray, cost: np.ndarray, allowed: np.ndarray, cap: float) -> np.ndarray | None:
    """Option index per item [M] minimising Σ err with Σ cost ≤ cap, or None if even the cheapest exceeds cap.

    err, cost: [M, B] floats; allowed: [M, B] bools with at least one True per row.
    """
    err, cost = np.asarray(err, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    allowed = np.asarray(allowed, dtype=bool)
    if not err.shape == cost.shape == allowed.shape or err.ndim != 2:
        raise PlanError(
            f"allocate needs err, cost and allowed of one [items, options] shape; got {err.shape}, "
            f"{cost.shape}, {allowed.shape}"
        )
    if not allowed.any(axis=1).all():
        raise PlanError(f"items {np.flatnonzero(~allowed.any(axis=1)).tolist()} allow no option")
    rows = np.arange(err.shape[0])
    tol = 1e-12 * max(abs(cap), 1.0)
    grid = _lambda_grid(err, cost, allowed)
    lo, hi = 0, len(grid) - 1  # total cost is non-increasing along the grid; find the first that fits
    if cost[rows, _choose(err, cost, allowed, grid[hi])].sum() > cap + tol:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if cost[rows, _choose(err, cost, allowed, grid[mid])].sum() <= cap + tol:
            hi = mid
        else:
            lo = mid + 1
    best = _choose(err, cost, allowed, grid[hi])
    return _fill(err, cost, allowed, best, cap - cost[rows, best].sum(), tol)


def _fill(
    err: np.ndarray, cost: np.ndarray, allowed: np.ndarray, choice: np.ndarray, slack: float, tol: float
) -> np.ndarray:
    """Greedy marginal gain: apply the single change with the best error drop per cost while it fits."""
    choice = choice.copy()
    rows = np.arange(err.shape[0])
    while True:
        gain = err[rows, choice][:, None] - err
        extra = cost - cost[rows, choice][:, None]
        ok = allowed & (gain > 0) & (extra <= slack + tol)
        if not ok.any():
            return choice
        free = ok & (extra <= 0)
        if free.any():
            score = np.where(free, gain, -np.inf)
        else:
            score = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
        row, col = np.unravel_index(int(score.argmax()), score.shape)
        slack -= extra[row, col]
        choice[row] = col


def pareto_mask(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """True for points no other point beats on both cost and error (first of exact duplicates kept)."""
    costs, errors = np.asarray(costs, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    order = np.lexsort((np.arange(len(costs)), errors, costs))
    keep = np.zeros(len(costs), dtype=bool)
    best = np.inf
    for i in order:
        if errors[i] < best:
            keep[i], best = True, errors[i]
    return keep
