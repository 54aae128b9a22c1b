"""Tiny quantized checkpoints to export: a one-block random reference DiT, GPTQ, 8 samples × 4 steps.

Its Linear layers have in_features 64 (six of them) and 256 (ff.net.2); `rows` gives a bit-width per
timestep segment per layer, so one checkpoint can hold several variants of each layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from adatsq.engine.surgery import select_layers
from adatsq.engine.uniform import quantize
from adatsq.recipe import recipe_from_dict

# bits per segment, cycled over the layers in name order: every width 2..8 appears at both segments
MIXED_ROWS = ((4, 8), (8, 3), (2, 6), (6, 4), (3, 2))


@pytest.fixture(scope="session")
def make_checkpoint(tiny_adapter, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(method="gptq", group=32, sym=False, act=None, mixed=False, bits=4, **extra)`:
    saved once per session for each distinct set of arguments (treat the folder as read-only)."""
    built: dict[tuple, Path] = {}

    def get(
        method: str = "gptq",
        group: int | None = 32,
        sym: bool = False,
        act: int | None = None,
        mixed: bool = False,
        bits: int = 4,
        **extra,
    ) -> Path:
        key = (method, group, sym, act, mixed, bits, repr(sorted(extra.items())))
        if key not in built:
            recipe = recipe_from_dict(
                {
                    "method": method,
                    "weight": {"bits": bits, "group_size": group, "symmetric": sym},
                    "activation": {"bits": act},
                    "calibration": {"samples": 8, "steps": 4, "batch_size": 8, "seed": 0, "segments": 2},
                    **extra,
                }
            )
            adapter = tiny_adapter()
            rows = None
            if mixed:
                names = sorted(select_layers(adapter, recipe))
                rows = {name: MIXED_ROWS[i % len(MIXED_ROWS)] for i, name in enumerate(names)}
            qmodel = quantize(adapter, recipe, layer_bits=rows, progress=False)
            directory = tmp_path_factory.mktemp("export-src") / "ckpt"
            qmodel.save(directory)
            built[key] = directory
        return built[key]

    return get


@pytest.fixture
def plan_file(tmp_path: Path) -> Callable[..., Path]:
    """`plan_file(rows, act_bits=16)`: a plan.json over two timestep segments of a 4-step sampler."""
    from adatsq.plan.schema import Plan, save_plan

    def write(rows: dict[str, tuple[int, ...]], act_bits: int | dict[str, int] = 16) -> Path:
        plan = Plan(
            layers=rows, segments=[(0, 2), (2, 4)], num_steps=4, act_bits=act_bits,
            candidates=(2, 3, 4, 6, 8), fisher_weights=[0.5, 0.5],
            model={"family": "reference", "fingerprint": "test"},
        )  # fmt: skip
        return save_plan(plan, tmp_path / "plan.json")

    return write
