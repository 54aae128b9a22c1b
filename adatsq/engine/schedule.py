"""The calibration pass schedule: which XᵀX accumulators live together so that they fit a memory budget.

Pure planning, no model is run (`schedule_for` reads a denoiser's names and shapes, meta device is fine).
Inputs: the targeted layers' shapes, the groups of layers that read one
input tensor (`adatsq.models.layers.shared_input_groups`), the block each layer belongs to and the
blocks' execution order, the number of timestep segments, a device budget and the solver's need.

* One accumulator per distinct input: a group of layers reading one tensor shares one XᵀX, with one slot
  per segment, float32 on the device (4·in² bytes a slot; calibrate/capture.py). It stays there until the
  pass's solves are done and is then freed: nothing is folded to the host (a float64 copy would add no
  precision to a sum that is already complete). A time-invariant input (the same values at every step,
  e.g. Wan's cross-attention text) has one slot.
* Accumulators are ordered by the block that first reads their input (execution order), then by module
  order. A pass is a run of consecutive accumulators whose bytes, plus the largest solve among their
  layers, plus the `reserved` bytes (weights kept on the device) fit the budget. A replay for the pass runs
  the recorded denoiser calls up to the pass's deepest block (`run_to`) and stops.
* With N devices, each pass is split into N consecutive shares, one per owner rank; each share must fit
  the budget on its own device. Greedy filling is optimal here: every sub-run of a run that fits also fits,
  so packing each share as full as possible never needs more shares than any other split. When everything
  fits in fewer than N shares, the accumulators are spread over N so that every rank replays and solves
  a part (engine/passes.py runs the shares; the result does not depend on the split).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from adatsq.core.sizes import exact_size, format_size
from adatsq.errors import ConfigError
from adatsq.models.layers import block_of, block_order, is_time_invariant, shared_input_groups
from adatsq.quant.workspace import gptq_workspace_bytes

ACCUMULATOR_DEVICE_BYTES = 4  # float32 XᵀX while a pass accumulates and solves


@dataclass(frozen=True)
class LayerShape:
    """A targeted Linear layer: its name and weight shape [out_features, in_features]."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AccumulatorSpec:
    """One XᵀX accumulator: the input tensor that `layers` all read, with one slot per segment."""

    key: str  # the first layer's name: a stable id of the accumulator
    layers: tuple[str, ...]  # targeted layers solved from it (module order)
    in_features: int
    slots: int  # segments, or 1 for a time-invariant input
    time_invariant: bool
    block: str  # the block whose replay fills it (the first block that reads the input); a cross-block
    # input (Wan's attn2 k/v, Z-Image's adaLN) lists layers of later blocks too: they are solved from it,
    # and the replay need not reach their blocks

    @property
    def device_bytes(self) -> int:
        """float32 on the device while the pass accumulates: 4·in² per slot."""
        return ACCUMULATOR_DEVICE_BYTES * self.in_features**2 * self.slots


@dataclass(frozen=True)
class Share:
    """What one owner rank holds and solves in one pass."""

    rank: int
    accumulators: tuple[AccumulatorSpec, ...]
    layers: tuple[str, ...]  # layers this rank solves in this pass
    blocks: tuple[str, ...]  # blocks whose accumulators it holds, in execution order
    run_to: str  # deepest block its replay must reach
    accumulator_bytes: int  # device bytes of its accumulators
    solve_bytes: int  # the largest solve among its layers
    peak_device_bytes: int  # reserved + accumulator_bytes + solve_bytes


@dataclass(frozen=True)
class Pass:
    """One replay of the recorded calls: every rank fills its share, solves it and frees it."""

    index: int
    shares: tuple[Share, ...]  # one per rank that holds something (rank order)
    blocks: tuple[str, ...]  # union over shares, in execution order
    layers: tuple[str, ...]
    run_to: str  # deepest block any rank needs: the replay stops after it

    @property
    def peak_device_bytes(self) -> int:
        return max(s.peak_device_bytes for s in self.shares)


@dataclass(frozen=True)
class Schedule:
    """Every accumulator, the passes that fill them, and what they cost."""

    accumulators: tuple[AccumulatorSpec, ...]  # in fill order
    passes: tuple[Pass, ...]
    segments: int
    devices: int
    budget_bytes: int | None  # per device; None: unbounded
    reserved_bytes: int  # per device, outside accumulators and solves (e.g. the denoiser's weights)
    smallest_budget_bytes: int  # the largest accumulator with its own solve, plus the reserved bytes

    @property
    def accumulator_bytes(self) -> int:
        """float32 bytes of every accumulator (all layers × segments), as a pass-scheduled run stores them."""
        return sum(a.device_bytes for a in self.accumulators)

    @property
    def peak_device_bytes(self) -> int:
        return max(p.peak_device_bytes for p in self.passes)

    def pass_of(self, layer: str) -> Pass:
        for p in self.passes:
            if layer in p.layers:
                return p
        raise ConfigError(f"layer {layer!r} is not in the schedule; it is not a targeted layer")


def accumulator_specs(
    layers: Sequence[LayerShape],
    groups: Sequence[tuple[str, ...]],
    blocks: Sequence[str],
    block_of: Mapping[str, str] | Callable[[str], str],
    segments: int,
    time_invariant: Collection[tuple[str, ...]] = (),
) -> list[AccumulatorSpec]:
    """One spec per group with a targeted layer, in fill order (block order, then module order)."""
    if segments < 1:
        raise ConfigError(f"segments must be >= 1, got {segments}")
    where = block_of.__getitem__ if isinstance(block_of, Mapping) else block_of
    shape = {layer.name: layer for layer in layers}
    position = {b: i for i, b in enumerate(blocks)}
    grouped = [n for g in groups for n in g]
    missing = sorted(set(shape) - set(grouped))
    if missing or len(grouped) != len(set(grouped)):
        raise ConfigError(
            f"shared-input groups must hold every targeted layer exactly once; missing {missing[:5]}"
        )
    invariant = {tuple(g) for g in time_invariant}
    specs = []
    for order, group in enumerate(groups):
        members = tuple(n for n in group if n in shape)
        if not members:
            continue
        widths = {shape[n].in_features for n in members}
        if len(widths) != 1:
            raise ConfigError(f"layers {list(members)} share an input but have in_features {sorted(widths)}")
        unknown = [where(n) for n in members if where(n) not in position]
        if unknown:
            raise ConfigError(f"block {unknown[0]!r} of layer {members[0]!r} is not in the block order")
        first = min((where(n) for n in members), key=position.__getitem__)
        fixed = tuple(group) in invariant
        spec = AccumulatorSpec(members[0], members, widths.pop(), 1 if fixed else segments, fixed, first)
        specs.append((position[first], order, spec))
    return [spec for *_, spec in sorted(specs, key=lambda t: t[:2])]


def _share(
    rank: int,
    accs: Sequence[AccumulatorSpec],
    shapes: Mapping[str, LayerShape],
    solve: Callable[[int, int], int],
    reserved: int,
    position: Mapping[str, int],
) -> Share:
    layers = tuple(n for a in accs for n in a.layers)
    blocks = tuple(sorted({a.block for a in accs}, key=position.__getitem__))
    acc_bytes = sum(a.device_bytes for a in accs)
    solve_bytes = max(solve(shapes[n].in_features, shapes[n].out_features) for n in layers)
    return Share(
        rank=rank,
        accumulators=tuple(accs),
        layers=layers,
        blocks=blocks,
        run_to=blocks[-1],
        accumulator_bytes=acc_bytes,
        solve_bytes=solve_bytes,
        peak_device_bytes=reserved + acc_bytes + solve_bytes,
    )


def _check_single(
    specs: Sequence[AccumulatorSpec], solve: Mapping[str, int], budget: int, reserved: int
) -> None:
    """The budget must hold the largest accumulator with its own solve; else name it and the minimum."""
    need = {s.key: reserved + s.device_bytes + solve[s.key] for s in specs}
    worst = max(specs, key=lambda s: need[s.key])
    if need[worst.key] > budget:
        raise ConfigError(
            f"memory budget {exact_size(budget)} is too small: layer {worst.key!r} needs "
            f"{exact_size(need[worst.key])} (its {worst.slots}-slot float32 XᵀX of "
            f"in_features={worst.in_features}, its GPTQ solve and the reserved bytes); the smallest feasible "
            f"budget is {format_size(need[worst.key], up=True)}: raise --max-memory, use fewer segments"
            + (" or stream the weights (--weights stream)" if reserved else "")
        )


def _greedy_runs(
    specs: Sequence[AccumulatorSpec], solve: Mapping[str, int], reserved: int, limit: int | None
) -> list[list[AccumulatorSpec]]:
    """Consecutive runs of accumulators, each extended while reserved + its bytes + its largest solve
    (`solve[key]`, per accumulator) stays within `limit`; one accumulator alone always makes a run."""
    runs: list[list[AccumulatorSpec]] = [[]]
    held = largest = 0
    for spec in specs:
        grown = reserved + held + spec.device_bytes + max(largest, solve[spec.key])
        if runs[-1] and limit is not None and grown > limit:
            runs.append([])
            held = largest = 0
        runs[-1].append(spec)
        held, largest = held + spec.device_bytes, max(largest, solve[spec.key])
    return runs


def _spread_runs(
    specs: Sequence[AccumulatorSpec], solve: Mapping[str, int], reserved: int, limit: int, parts: int
) -> list[list[AccumulatorSpec]]:
    """At most `parts` runs with the smallest largest cost (bisection: greedy run counts fall as the
    limit grows), so that every device owns a share of a run that would fit one alone."""
    low = reserved + max(s.device_bytes + solve[s.key] for s in specs)
    while low < limit:
        middle = (low + limit) // 2
        if len(_greedy_runs(specs, solve, reserved, middle)) <= parts:
            limit = middle
        else:
            low = middle + 1
    return _greedy_runs(specs, solve, reserved, limit)


def build_schedule(
    layers: Sequence[LayerShape],
    groups: Sequence[tuple[str, ...]],
    blocks: Sequence[str],
    block_of: Mapping[str, str] | Callable[[str], str],
    segments: int,
    budget_bytes: int | None,
    *,
    time_invariant: Collection[tuple[str, ...]] = (),
    solve_bytes: Callable[[int, int], int] = gptq_workspace_bytes,
    reserved_bytes: int = 0,
    devices: int = 1,
) -> Schedule:
    """Passes of consecutive accumulators that fit `budget_bytes` on each of `devices` devices.

    `groups` / `time_invariant` come from `shared_input_groups` / `is_time_invariant`, `blocks` from
    `block_order`, `block_of` maps each layer to its block; `solve_bytes(in, out)` is the solver's peak.
    """
    if not layers:
        raise ConfigError("no targeted layer to schedule; check the recipe's targets and ignore")
    if devices < 1:
        raise ConfigError(f"devices must be >= 1, got {devices}")
    specs = accumulator_specs(layers, groups, blocks, block_of, segments, time_invariant)
    shapes = {layer.name: layer for layer in layers}
    position = {b: i for i, b in enumerate(blocks)}

    solve = {  # each accumulator's largest solve
        a.key: max(solve_bytes(shapes[n].in_features, shapes[n].out_features) for n in a.layers)
        for a in specs
    }
    if budget_bytes is not None:
        _check_single(specs, solve, budget_bytes, reserved_bytes)
    runs = _greedy_runs(specs, solve, reserved_bytes, budget_bytes)
    if len(runs) < devices:  # room to spare: spread the accumulators so that every device owns a share
        whole = reserved_bytes + sum(a.device_bytes for a in specs) + max(solve.values())
        limit = whole if budget_bytes is None else min(whole, budget_bytes)
        runs = _spread_runs(specs, solve, reserved_bytes, limit, devices)
    passes = []
    for index, start in enumerate(range(0, len(runs), devices)):
        shares = tuple(
            _share(rank, run, shapes, solve_bytes, reserved_bytes, position)
            for rank, run in enumerate(runs[start : start + devices])
        )
        union = tuple(sorted({b for s in shares for b in s.blocks}, key=position.__getitem__))
        passes.append(
            Pass(index, shares, union, tuple(n for s in shares for n in s.layers), run_to=union[-1])
        )
    smallest = reserved_bytes + max(a.device_bytes + solve[a.key] for a in specs)
    return Schedule(tuple(specs), tuple(passes), segments, devices, budget_bytes, reserved_bytes, smallest)


def schedule_for(
    denoiser: nn.Module,
    layers: Collection[str],
    segments: int,
    budget_bytes: int | None,
    *,
    reserved_bytes: int = 0,
    devices: int = 1,
    solve_bytes: Callable[[int, int], int] = gptq_workspace_bytes,
) -> Schedule:
    """`build_schedule` for `layers` (names of the denoiser's targeted Linear, e.g. `select_layers`' keys)
    with the family rules of `adatsq.models.layers`: the one entry point the estimate and the runtime share.

    Only names and shapes are read (a meta-device denoiser works); nothing runs.
    """
    modules = dict(denoiser.named_modules())
    missing = sorted(n for n in layers if not isinstance(modules.get(n), nn.Linear))
    if missing:
        raise ConfigError(f"{missing[:5]} are not Linear layers of the denoiser; pass names it has")
    wanted = set(layers)
    shapes = [
        LayerShape(n, m.in_features, m.out_features)
        for n, m in modules.items()
        if n in wanted and isinstance(m, nn.Linear)
    ]
    groups = shared_input_groups(denoiser)
    return build_schedule(
        shapes,
        groups,
        block_order([s.name for s in shapes]),
        block_of,
        segments,
        budget_bytes,
        time_invariant=[g for g in groups if is_time_invariant(g)],
        solve_bytes=solve_bytes,
        reserved_bytes=reserved_bytes,
        devices=devices,
    )
