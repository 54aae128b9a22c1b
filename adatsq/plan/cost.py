"""What a plan costs: average bits per step, bit-operations per step, and stored bytes.

Plans here are int arrays `bits[L, S]` (layer × segment) aligned with a `layers` list. Only the layers
in that list are counted: layers kept in full precision outside the plan add a constant the caller
can add (their BOPs are macs · 16 · 16). `act_bits = 16` means activations are not quantized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from adatsq.errors import PlanError
from adatsq.plan.schema import ACT_BITS, BUDGET_KINDS, SUPPORTED_BITS, Budget, LayerInfo
from adatsq.quant.scheme import n_groups, variant_grid

SCALE_BYTES = 2  # one fp16 scale per (group, output channel)
ZERO_BYTES = 1  # one uint8 zero point per (group, output channel)

ActBits = int | Sequence[int] | Mapping[str, int] | np.ndarray


def variant_bytes(layer: LayerInfo, bits: int) -> int:
    """Bytes of ONE quantized copy of `layer` in a checkpoint: packed weights + scales + zeros.

    The single place the stored-size formula lives. Rows pack separately (quant/pack.py layout
    uint8 [out, ceil(in·bits/8)]), scales are fp16 and zeros uint8 [out, n_groups], plus the fp16
    per-row scale of integer group scales (whose 8-bit variants are per channel); bias is not counted.
    """
    packed = layer.out_features * -(-layer.in_features * int(bits) // 8)
    group, integer = variant_grid(layer.group_size, layer.integer_group_scales, int(bits))
    overhead = n_groups(layer.in_features, group) * layer.out_features * (SCALE_BYTES + ZERO_BYTES)
    if integer:
        overhead += layer.out_features * SCALE_BYTES
    return packed + overhead


def act_bits_array(act_bits: ActBits, layers: Sequence[LayerInfo]) -> np.ndarray:
    """Activation bits per layer as an int array [L] from one value, a sequence or a {name: bits} map."""
    if isinstance(act_bits, Mapping):
        missing = [layer.name for layer in layers if layer.name not in act_bits]
        if missing:
            raise PlanError(f"act_bits has no entry for layers {missing[:10]}; give one per layer")
        out = np.array([act_bits[layer.name] for layer in layers], dtype=np.int64)
    else:
        out = np.broadcast_to(np.asarray(act_bits, dtype=np.int64), (len(layers),)).copy()
    bad = sorted(set(out.tolist()) - set(ACT_BITS))
    if bad:
        raise PlanError(f"activation bits {bad} are not supported; allowed: {list(ACT_BITS)}")
    return out


def _check_bits(bits: np.ndarray, layers: Sequence[LayerInfo]) -> np.ndarray:
    bits = np.asarray(bits)
    if bits.ndim != 2 or bits.shape[0] != len(layers) or bits.shape[1] < 1:
        raise PlanError(f"plan bits must have shape [L={len(layers)}, S], got {bits.shape}")
    bad = sorted(set(np.unique(bits).tolist()) - set(SUPPORTED_BITS))
    if bad:
        raise PlanError(f"plan bits {bad} are not supported; allowed: {list(SUPPORTED_BITS)}")
    return bits.astype(np.int64)


def avg_bits(bits: np.ndarray, layers: Sequence[LayerInfo]) -> float:
    """Σ_l Σ_s n_l · bits[l, s] / (S · Σ_l n_l): the weight bits that run per step, params-weighted."""
    bits = _check_bits(bits, layers)
    n = np.array([layer.n_params for layer in layers], dtype=np.float64)
    return float((n[:, None] * bits).sum() / (bits.shape[1] * n.sum()))


def bops(bits: np.ndarray, layers: Sequence[LayerInfo], act_bits: ActBits) -> float:
    """Bit-operations per denoising step: mean over segments of Σ_l macs_l · w_bits[l, s] · a_bits_l."""
    bits = _check_bits(bits, layers)
    macs = np.array([layer.macs_per_step for layer in layers], dtype=np.float64)
    act = act_bits_array(act_bits, layers).astype(np.float64)
    return float((macs[:, None] * bits * act[:, None]).sum() / bits.shape[1])


def stored_bytes(bits: np.ndarray, layers: Sequence[LayerInfo]) -> int:
    """Checkpoint bytes of the quantized layers: every distinct bit-width of a row is one stored variant."""
    bits = _check_bits(bits, layers)
    rows = zip(layers, bits.tolist(), strict=True)
    return sum(variant_bytes(layer, b) for layer, row in rows for b in set(row))


def plan_costs(bits: np.ndarray, layers: Sequence[LayerInfo], act_bits: ActBits) -> dict[str, float]:
    """All three costs of a plan, keyed by budget kind (what `metrics` reports)."""
    return {
        "avg_bits": avg_bits(bits, layers),
        "bops": bops(bits, layers, act_bits),
        "bytes": stored_bytes(bits, layers),
    }


def budget_cost(bits: np.ndarray, layers: Sequence[LayerInfo], kind: str, act_bits: ActBits) -> float:
    if kind not in BUDGET_KINDS:
        raise PlanError(f"budget kind {kind!r} is unknown; allowed: {list(BUDGET_KINDS)}")
    return float(plan_costs(bits, layers, act_bits)[kind])


def fits(cost: float, budget: Budget) -> bool:
    """Budget test with a relative tolerance, so float summation order never flips a verdict."""
    return cost <= budget.value * (1 + 1e-9)


def cheapest_bits(
    layers: Sequence[LayerInfo],
    candidates: Sequence[int],
    num_segments: int,
    pinned: Mapping[str, int] | None = None,
) -> np.ndarray:
    """The plan with every free layer at its smallest candidate and pinned layers at their pin.

    It minimises all three costs at once (each grows with bits, one variant per layer).
    """
    pinned = dict(pinned or {})
    unknown = sorted(set(pinned) - {layer.name for layer in layers})
    if unknown:
        raise PlanError(f"pinned layers {unknown[:10]} are not among the planned layers; check the names")
    low = min(candidates)
    row = [pinned.get(layer.name, low) for layer in layers]
    return np.repeat(np.array(row, dtype=np.int64)[:, None], num_segments, axis=1)


def cheapest_plan_cost(
    layers: Sequence[LayerInfo],
    kind: str,
    candidates: Sequence[int],
    num_segments: int,
    act_bits: ActBits = 8,
    pinned: Mapping[str, int] | None = None,
) -> float:
    """The smallest value of budget `kind` any plan over `candidates` (with `pinned`) can reach."""
    return budget_cost(cheapest_bits(layers, candidates, num_segments, pinned), layers, kind, act_bits)


def check_budget_feasible(
    layers: Sequence[LayerInfo],
    budget: Budget,
    candidates: Sequence[int],
    num_segments: int,
    act_bits: ActBits = 8,
    pinned: Mapping[str, int] | None = None,
) -> None:
    """Raise a PlanError that states the minimum reachable value when `budget` cannot be met."""
    low = cheapest_plan_cost(layers, budget.kind, candidates, num_segments, act_bits, pinned)
    if not fits(low, budget):
        shown = f"{int(low)}" if budget.kind == "bytes" else f"{low:.6g}"
        raise PlanError(
            f"{budget.kind} budget {budget.value:.6g} is infeasible: the minimum reachable value is "
            f"{shown} (every free layer at {min(candidates)} bits, {len(pinned or {})} pinned layers); "
            "raise the budget, add a lower candidate bit-width or pin fewer layers"
        )
