import numpy as np
import pytest

from adatsq.errors import PlanError
from adatsq.plan.cost import (
    avg_bits,
    bops,
    cheapest_plan_cost,
    check_budget_feasible,
    plan_costs,
    stored_bytes,
    variant_bytes,
)
from adatsq.plan.schema import Budget, LayerInfo

LAYERS = [
    LayerInfo("a", 100, 10, 10, macs_per_step=1000, group_size=None),
    LayerInfo("b", 300, 10, 30, macs_per_step=500, group_size=5),
]
BITS = np.array([[8, 4], [4, 4]])


def test_avg_bits_is_params_weighted_over_layers_and_segments():
    assert avg_bits(BITS, LAYERS) == pytest.approx((100 * 12 + 300 * 8) / (2 * 400)) == 4.5


def test_bops_per_step_with_one_or_per_layer_activation_bits():
    # segment 0: 1000*8*8 + 500*4*8 = 80000; segment 1: 1000*4*8 + 500*4*8 = 48000
    assert bops(BITS, LAYERS, 8) == 64000
    # a runs with unquantized (16-bit) activations, b with 4-bit ones
    assert bops(BITS, LAYERS, {"a": 16, "b": 4}) == ((128000 + 8000) + (64000 + 8000)) / 2


def test_bytes_count_every_distinct_variant_with_scales_and_zeros():
    # a: 8-bit rows 10 B + 4-bit rows 5 B (x10 rows) + per-channel fp16 scale and uint8 zero for each variant
    a = 10 * 10 + 10 * 5 + 2 * (1 * 10 * 3)
    # b: one 4-bit variant, 30 rows of 5 B, 2 groups of 5 columns
    b = 30 * 5 + 2 * 30 * 3
    assert stored_bytes(BITS, LAYERS) == a + b == 540
    assert plan_costs(BITS, LAYERS, 8) == {"avg_bits": 4.5, "bops": 64000, "bytes": 540}


def test_variant_bytes_packs_rows_separately_and_counts_group_grids():
    # 3 columns of 3 bits need 2 bytes per row (not 9/8 of a byte): 2 rows -> 4 bytes
    assert variant_bytes(LayerInfo("c", 6, 3, 2, 6), 3) == 4 + 2 * 3
    grouped = LayerInfo("d", 64 * 32, 64, 32, 1, group_size=32)
    assert variant_bytes(grouped, 4) == 32 * 32 + 2 * 32 * 3


def test_cheapest_cost_puts_free_layers_at_the_lowest_candidate_and_keeps_pins():
    assert cheapest_plan_cost(LAYERS, "avg_bits", (3, 4, 8), 2) == 3
    assert cheapest_plan_cost(LAYERS, "avg_bits", (3, 4, 8), 2, pinned={"a": 8}) == (100 * 8 + 300 * 3) / 400
    with pytest.raises(PlanError, match="not among the planned layers"):
        cheapest_plan_cost(LAYERS, "avg_bits", (3, 4), 2, pinned={"nope": 8})


def test_infeasible_budget_names_the_minimum_reachable_value():
    with pytest.raises(PlanError, match=r"minimum reachable value is 4\.25"):
        check_budget_feasible(LAYERS, Budget("avg_bits", 4.0), (3, 4), 2, pinned={"a": 8})
    check_budget_feasible(LAYERS, Budget("avg_bits", 4.25), (3, 4), 2, pinned={"a": 8})


@pytest.mark.parametrize(
    ("bits", "match"),
    [
        (np.array([[8, 5], [4, 4]]), "not supported"),
        (np.array([[8, 4]]), "shape"),
        (np.array([8, 4]), "shape"),
    ],
)
def test_bad_plans_are_rejected(bits, match):
    with pytest.raises(PlanError, match=match):
        avg_bits(bits, LAYERS)


def test_bad_activation_bits_and_layer_sizes_are_rejected():
    with pytest.raises(PlanError, match="activation bits"):
        bops(BITS, LAYERS, 5)
    with pytest.raises(PlanError, match="n_params"):
        LayerInfo("x", 99, 10, 10, 1)
    with pytest.raises(PlanError, match="budget kind"):
        Budget("flops", 1.0)


def test_infeasible_bytes_budget_shows_the_exact_minimum():
    minimum = cheapest_plan_cost(LAYERS, "bytes", (3, 4), 2)
    with pytest.raises(PlanError, match=f"minimum reachable value is {int(minimum)} "):
        check_budget_feasible(LAYERS, Budget("bytes", minimum - 1), (3, 4), 2)
