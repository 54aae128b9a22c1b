"""The pass schedule on small synthetic shapes, against a brute-force search over all splits."""

from __future__ import annotations

import itertools
import random

import pytest

from adatsq.core.sizes import format_size, parse_size
from adatsq.engine.schedule import LayerShape, build_schedule
from adatsq.errors import ConfigError


def solve(i: int, o: int) -> int:
    return 10 * i  # a simple solver need, so the arithmetic below is checkable by hand


def model(blocks: int = 3, width: int = 4):
    """Per block: q/k/v sharing one input (width), an output layer (width), an MLP down layer (2·width)."""
    layers, groups, where = [], [], {}
    for b in range(blocks):
        block = f"blocks.{b}"
        qkv = tuple(f"{block}.{n}" for n in ("q", "k", "v"))
        for name in qkv:
            layers.append(LayerShape(name, width, width))
        layers += [LayerShape(f"{block}.o", width, width), LayerShape(f"{block}.down", 2 * width, width)]
        groups += [qkv, (f"{block}.o",), (f"{block}.down",)]
        where.update({layer.name: block for layer in layers[-5:]})
    return layers, groups, [f"blocks.{b}" for b in range(blocks)], where


def test_one_accumulator_per_distinct_input_and_time_invariant_once():
    layers, groups, blocks, where = model()
    s = build_schedule(layers, groups, blocks, where, segments=4, budget_bytes=10**9, solve_bytes=solve)
    assert len(s.accumulators) == 9 and len(s.passes) == 1
    assert s.accumulator_bytes == 3 * 4 * 4 * (16 + 16 + 64)  # float32, 4 slots, per block
    fixed = build_schedule(
        layers, groups, blocks, where, 4, 10**9, solve_bytes=solve, time_invariant=[groups[1]]
    )
    assert fixed.accumulator_bytes == s.accumulator_bytes - 3 * 4 * 16  # one slot instead of four


def test_passes_grow_as_the_budget_shrinks_and_cover_every_layer_once():
    layers, groups, blocks, where = model(blocks=4)
    counts = []
    for budget in (10**6, 3000, 2000, 1200, 800, 600):
        s = build_schedule(layers, groups, blocks, where, 2, budget, solve_bytes=solve)
        counts.append(len(s.passes))
        solved = [n for p in s.passes for n in p.layers]
        assert sorted(solved) == sorted(layer.name for layer in layers)
        assert all(p.peak_device_bytes <= budget for p in s.passes)
        for p in s.passes:
            assert p.run_to == p.blocks[-1] and list(p.blocks) == sorted(p.blocks)
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > counts[1]


def test_too_small_a_budget_names_the_layer_and_the_minimum():
    layers, groups, blocks, where = model()
    need = 4 * 8 * 8 * 2 + solve(8, 4)  # the 2-slot accumulator of a 'down' layer and its solve
    build_schedule(layers, groups, blocks, where, 2, need, solve_bytes=solve)  # exactly enough
    with pytest.raises(
        ConfigError, match=rf"'blocks.0.down' needs {need} B .*smallest feasible budget is {need} B"
    ):
        build_schedule(layers, groups, blocks, where, 2, need - 1, solve_bytes=solve)
    with pytest.raises(ConfigError, match="reserved"):
        build_schedule(layers, groups, blocks, where, 2, need, solve_bytes=solve, reserved_bytes=1)


def _fewest_runs(costs, fits) -> int:
    """Brute force: the fewest consecutive runs (over every way to cut the sequence) that all fit."""
    n = len(costs)
    for k in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            edges = [0, *cuts, n]
            if all(fits(costs[a:b]) for a, b in itertools.pairwise(edges)):
                return k
    raise AssertionError("no split fits")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("devices", [1, 2])
def test_greedy_matches_brute_force(seed, devices):
    rng = random.Random(seed)
    layers, groups, where = [], [], {}
    for i in range(7):
        width = rng.choice([2, 3, 4, 6])
        layers.append(LayerShape(f"b.{i}.x", width, rng.choice([1, 5])))
        groups.append((f"b.{i}.x",))
        where[f"b.{i}.x"] = f"b.{i}"
    blocks = [f"b.{i}" for i in range(7)]
    budget = rng.choice([500, 900, 1400])
    solve_of = {layer.name: solve(layer.in_features, layer.out_features) for layer in layers}
    items = [(4 * layer.in_features**2 * 3, solve_of[layer.name]) for layer in layers]

    def fits(run) -> bool:
        return sum(a for a, _ in run) + max(s for _, s in run) <= budget

    s = build_schedule(layers, groups, blocks, where, 3, budget, solve_bytes=solve, devices=devices)
    runs = _fewest_runs(items, fits)
    assert len(s.passes) == -(-runs // devices)
    shares = sum(len(p.shares) for p in s.passes)
    assert shares == runs or (runs < devices and runs < shares <= devices)  # spread over the devices
    assert all(len(p.shares) <= devices for p in s.passes)


def test_devices_split_a_pass_into_owner_shares():
    layers, groups, blocks, where = model(blocks=4)
    one = build_schedule(layers, groups, blocks, where, 2, 1200, solve_bytes=solve)
    two = build_schedule(layers, groups, blocks, where, 2, 1200, solve_bytes=solve, devices=2)
    assert len(two.passes) == -(-len(one.passes) // 2)
    assert [s.rank for s in two.passes[0].shares] == [0, 1]
    assert two.peak_device_bytes <= 1200


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("768MiB", 768 * 2**20),
        ("40GiB", 40 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("123456", 123456),
        ("2 gib", 2 * 2**30),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["40GX", "GiB", "-1GiB", "1.2.3MB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match=r"is not a size.*e\.g\. 768MiB"):
        parse_size(text)


def test_format_size_rounds_up():
    assert format_size(62.81 * 2**30, up=True) == "62.9 GiB" and format_size(62.81 * 2**30) == "62.8 GiB"
    assert format_size(512) == "512 B"


def test_schedule_for_a_meta_denoiser_uses_the_family_rules():
    from pathlib import Path

    from adatsq.engine.schedule import schedule_for
    from adatsq.models.meta import meta_denoiser

    wan = meta_denoiser(Path(__file__).resolve().parents[2] / "configs" / "wan2.1-t2v-1.3b").module
    names = [n for n, _ in wan.named_modules() if n.startswith("blocks.")]
    names = [n for n in names if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    s = schedule_for(wan, names, segments=4, budget_bytes=2**40)
    fixed = [a for a in s.accumulators if a.time_invariant]
    assert len(fixed) == 1 and len(fixed[0].layers) == 60 and fixed[0].slots == 1
    assert fixed[0].block == "blocks.0" and len(s.accumulators) == 30 * 4 + 1
    with pytest.raises(ConfigError, match="not Linear layers"):
        schedule_for(wan, ["blocks.0.norm2"], 4, 2**40)
