"""Synthetic planning problems: error tables with the structure real ones have (error ~ 4^-bits,
per-layer and per-segment sensitivities), small enough for brute force."""

from __future__ import annotations

import numpy as np
import pytest

from adatsq.calibrate.segments import split_steps
from adatsq.plan.problem import PlanProblem
from adatsq.plan.schema import LayerInfo


def synthetic_problem(
    n_layers: int = 8,
    n_segments: int = 4,
    bits: tuple[int, ...] = (2, 3, 4, 6, 8),
    seed: int = 0,
    equal_layers: bool = False,
    num_steps: int = 20,
    **kwargs,
) -> PlanProblem:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n_layers):
        fan_in, fan_out = (
            (64, 64) if equal_layers else (int(rng.choice([32, 64, 128])), int(rng.choice([32, 64])))
        )
        layers.append(
            LayerInfo(f"blocks.{i}.linear", fan_in * fan_out, fan_in, fan_out, fan_in * fan_out * 16, 32)
        )
    sensitivity = (
        rng.lognormal(0, 1, (n_layers, 1, 1))
        * rng.lognormal(0, 1, (1, n_segments, 1))
        * rng.lognormal(0, 0.5, (n_layers, n_segments, 1))
    )
    table = sensitivity * 4.0 ** -np.array(bits, dtype=np.float64)
    weights = rng.dirichlet(np.ones(n_segments)).tolist()
    return PlanProblem(
        layers=layers,
        error_table=table,
        table_bits=bits,
        segments=split_steps(num_steps, n_segments),
        fisher_weights=weights,
        model={"family": "synthetic", "fingerprint": f"seed{seed}"},
        **kwargs,
    )


@pytest.fixture
def make_problem():
    return synthetic_problem
