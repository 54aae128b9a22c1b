"""`adatsq estimate`: what calibrating and quantizing a model will cost, without running (or loading) it.

The denoiser is built on the meta device from its config (a config-only folder such as configs/flux.1-dev
is enough); the recipe selects the layers; `adatsq.engine.schedule` groups their accumulators into passes
under the memory budget. Every number is a formula of shapes, stated where it is computed:

* accumulators: one float32 XᵀX per distinct input per segment (time-invariant inputs once), on device;
* device peak per pass: the denoiser's weights at `dtype` (`weights="device"`: all kept on every device
  for the replay; `"stream"`: the layers outside blocks plus the largest block, blocks moved in one at a
  time) + the pass's accumulators + its largest GPTQ solve (`adatsq.quant.workspace`); activations of the
  replay are not counted (tens of MB at 1024² for Flux);
* host peak: the recorded denoiser-call inputs (text embeddings once per prompt and CFG branch, latents
  and timestep per step) + the packed checkpoint, which grows on the host until it is written (the
  statistics are solved where they were accumulated and never copied to the host);
* AdaTSQ search, in full denoiser runs of `planner.measure_samples` inputs: the beam measures at most
  P trajectories at segment 0 and B·P at each later segment s; each restarts from its parent's recorded
  denoiser outputs (engine.meter) and runs the denoiser for segment s only, 1/G of a run:
  (P + B·P·(G − 1))/G runs (B beam width, P proposals per stage, G segments), plus one float reference
  run (without restarts it would be P/G + B·P·(G(G + 1)/2 − 1)/G);
* AdaTSQ host memory adds the packed candidates (every layer at every candidate bit-width), held from
  the error table until the final solves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adatsq.core.sizes import format_size, parse_size
from adatsq.engine.schedule import LayerShape, Schedule, schedule_for
from adatsq.errors import ConfigError
from adatsq.models.layers import (
    AFTER,
    BEFORE,
    block_order,
    default_ignore,
)
from adatsq.models.meta import CallAssumptions, MetaDenoiser, call_inputs, meta_denoiser, parameter_count
from adatsq.plan.cost import variant_bytes
from adatsq.plan.schema import LayerInfo
from adatsq.quant.methods import QUANT_METHODS
from adatsq.recipe import Recipe

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Estimate:
    """The numbers `adatsq estimate` prints; `to_dict` is its --json object."""

    model: str
    transformer_class: str
    dtype: str
    params: int
    layers: int  # targeted Linear layers (recipe targets minus ignore)
    segments: int
    devices: int
    budget_bytes: int
    weights: str  # "device" (the whole denoiser stays on every device) or "stream" (one block at a time)
    weights_bytes: int  # the denoiser's weights on each device at `dtype` (reserved in every pass)
    accumulator_bytes: int  # all layers × segments, float32, one XᵀX per distinct input
    float64_per_layer_bytes: int  # the same with one float64 XᵀX per layer per segment (today's runner)
    one_block_bytes: int  # float32 accumulators of the largest block
    smallest_budget_bytes: int  # the least --max-memory that runs at all (more passes, same result)
    passes: int
    peak_device_bytes: int
    per_device_peak_bytes: tuple[int, ...]  # by rank, the max over passes
    recorded_bytes: int  # host: recorded denoiser-call inputs
    candidates_bytes: int  # adatsq: packed candidates on the host (0 for fixed-bit methods)
    peak_host_bytes: int  # recorded + candidates + checkpoint_max bytes (statistics never leave the device)
    checkpoint_bytes: int  # every layer one variant at weight.bits
    checkpoint_max_bytes: int  # adatsq: every layer min(G, |candidates|) variants of the largest candidates
    assumptions: dict[str, Any]
    schedule: tuple[dict[str, Any], ...] = ()  # per pass: run_to, layers, accumulator and peak bytes
    search: dict[str, Any] | None = None  # adatsq only
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(model: str | Path) -> tuple[MetaDenoiser | None, nn.Module, str]:
    """(meta build or None, the denoiser, its class name) of 'reference' or a diffusers folder."""
    if str(model) == "reference":
        from adatsq.models.resolve import adapter_for

        denoiser = adapter_for("reference").denoiser()
        return None, denoiser, type(denoiser).__name__
    if not Path(model).exists():
        raise ConfigError(
            f"model {str(model)!r} is neither 'reference' nor an existing folder; pass a diffusers "
            "pipeline folder or a config-only one such as configs/flux.1-dev"
        )
    meta = meta_denoiser(model)
    return meta, meta.module, meta.class_name


def _resident_params(denoiser: nn.Module, names: list[str], weights: str) -> int:
    """Parameters on each device during a pass: all of them, or the non-block ones + the largest block."""
    total = parameter_count(denoiser)
    if weights == "device":
        return total
    if weights != "stream":
        raise ConfigError(f"weights={weights!r} is not supported; use 'device' or 'stream'")
    blocks = [b for b in block_order(names) if b not in (BEFORE, AFTER)]
    sizes = [parameter_count(denoiser.get_submodule(b)) for b in blocks] or [0]
    return total - sum(sizes) + max(sizes)


def _targeted(denoiser: nn.Module, recipe: Recipe) -> list[LayerShape]:
    ignore = tuple(default_ignore(denoiser))
    layers = [
        LayerShape(n, m.in_features, m.out_features)
        for n, m in denoiser.named_modules()
        if isinstance(m, nn.Linear) and recipe.selects(n, ignore)
    ]
    if not layers:
        raise ConfigError(
            f"no Linear layer matches targets {list(recipe.targets)} minus ignore; run `adatsq inspect` "
            "on the model to list layer names"
        )
    return layers


def search_runs(beam_width: int, proposals: int, segments: int) -> float:
    """Full-denoiser-run units of AdaTSQ's measured search (module docstring), reference run excluded."""
    return (proposals + beam_width * proposals * (segments - 1)) / segments


def _candidates(layers: list[LayerShape], recipe: Recipe) -> int:
    """AdaTSQ's packed candidates: every layer at every candidate bit-width (0 for fixed-bit methods)."""
    if not QUANT_METHODS.get(recipe.method).plans:
        return 0
    gs, bits = recipe.weight.group_size, set(recipe.planner.candidates) | {recipe.planner.pin_bits}
    integer = recipe.weight.integer_group_scales
    return sum(
        variant_bytes(
            LayerInfo(
                la.name, la.in_features * la.out_features, la.in_features, la.out_features, 1, gs, integer
            ),
            b,
        )
        for la in layers
        for b in bits
    )


def _checkpoint(layers: list[LayerShape], recipe: Recipe, params: int, dtype_bytes: int) -> tuple[int, int]:
    gs, integer = recipe.weight.group_size, recipe.weight.integer_group_scales
    infos = [
        LayerInfo(la.name, la.in_features * la.out_features, la.in_features, la.out_features, 1, gs, integer)
        for la in layers
    ]
    kept = (params - sum(i.n_params for i in infos)) * dtype_bytes  # float tensors (biases included)
    one = sum(variant_bytes(i, recipe.weight.bits) for i in infos)
    if not QUANT_METHODS.get(recipe.method).plans:
        return kept + one, kept + one
    top = sorted(recipe.planner.candidates, reverse=True)[: recipe.calibration.segments]
    return kept + one, kept + sum(variant_bytes(i, b) for i in infos for b in top)


def estimate(
    model: str | Path,
    recipe: Recipe,
    *,
    max_memory: str | int = "80GiB",
    dtype: str = "bfloat16",
    devices: int = 1,
    assumptions: CallAssumptions | None = None,
    weights: str = "device",
) -> Estimate:
    """Memory, passes and checkpoint size of quantizing `model` with `recipe` (nothing is run)."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
    budget = parse_size(max_memory)
    meta, denoiser, class_name = _open(model)
    layers = _targeted(denoiser, recipe)
    names = [la.name for la in layers]
    params = parameter_count(denoiser)
    reserved = _resident_params(denoiser, names, weights) * DTYPE_BYTES[dtype]
    segments = recipe.calibration.segments
    schedule = schedule_for(denoiser, names, segments, budget, reserved_bytes=reserved, devices=devices)
    recorded, resolved = _recorded_bytes(meta, recipe, DTYPE_BYTES[dtype], assumptions or CallAssumptions())
    checkpoint, checkpoint_max = _checkpoint(layers, recipe, params, DTYPE_BYTES[dtype])
    candidates = _candidates(layers, recipe)
    return Estimate(
        model=str(model),
        transformer_class=class_name,
        dtype=dtype,
        params=params,
        layers=len(layers),
        segments=segments,
        devices=devices,
        budget_bytes=budget,
        weights=weights,
        weights_bytes=reserved,
        accumulator_bytes=schedule.accumulator_bytes,
        float64_per_layer_bytes=sum(8 * la.in_features**2 * segments for la in layers),
        one_block_bytes=_largest_block(schedule),
        smallest_budget_bytes=schedule.smallest_budget_bytes,
        passes=len(schedule.passes),
        peak_device_bytes=schedule.peak_device_bytes,
        per_device_peak_bytes=_per_rank(schedule),
        recorded_bytes=recorded,
        candidates_bytes=candidates,
        peak_host_bytes=recorded + candidates + checkpoint_max,
        checkpoint_bytes=checkpoint,
        checkpoint_max_bytes=checkpoint_max,
        assumptions=resolved,
        schedule=tuple(
            {
                "run_to": p.run_to,
                "blocks": len(p.blocks),
                "layers": len(p.layers),
                "accumulator_bytes": sum(s.accumulator_bytes for s in p.shares),
                "peak_device_bytes": p.peak_device_bytes,
            }
            for p in schedule.passes
        ),
        search=_search(recipe),
        notes=_notes(schedule),
    )


def _recorded_bytes(
    meta: MetaDenoiser | None, recipe: Recipe, dtype_bytes: int, assumptions: CallAssumptions
) -> tuple[int, dict[str, Any]]:
    cal = recipe.calibration
    base = {"samples": cal.samples, "steps": cal.steps}
    if meta is None:  # the reference DiT: 16×16×4 latents and one class label per call, 2 calls per step
        calls = cal.samples * cal.steps
        return calls * (4 * 16 * 16 + 1 + 1) * dtype_bytes, {
            **base,
            "height": 16,
            "width": 16,
            "cfg_calls": 2,
        }
    inputs = call_inputs(meta, assumptions)
    a = inputs.assumptions
    text = cal.samples * a.cfg_calls * inputs.text_elements
    latents = cal.samples * cal.steps * (inputs.latent_elements + a.cfg_calls)  # + one timestep per call
    return (text + latents) * dtype_bytes, {**base, **asdict(a)}


def _largest_block(schedule: Schedule) -> int:
    per_block: dict[str, int] = {}
    for a in schedule.accumulators:
        per_block[a.block] = per_block.get(a.block, 0) + a.device_bytes
    return max(per_block.values())


def _per_rank(schedule: Schedule) -> tuple[int, ...]:
    peaks = [0] * schedule.devices
    for p in schedule.passes:
        for share in p.shares:
            peaks[share.rank] = max(peaks[share.rank], share.peak_device_bytes)
    return tuple(peaks)


def _search(recipe: Recipe) -> dict[str, Any] | None:
    if not QUANT_METHODS.get(recipe.method).plans or not recipe.planner.measure:
        return None
    p, g = recipe.planner, recipe.calibration.segments
    runs = search_runs(p.beam_width, p.proposals_per_stage, g)
    return {
        "trajectories": p.proposals_per_stage + p.beam_width * p.proposals_per_stage * (g - 1),
        "full_runs": round(runs + 1, 3),  # + the float reference trajectory
        "samples_per_run": p.measure_samples,
        "calibration_run_equivalents": round((runs + 1) * p.measure_samples / recipe.calibration.samples, 3),
        "formula": "(P + B*P*(G-1))/G denoiser runs (restarted trajectories) + 1 reference run",
    }


def _notes(schedule: Schedule) -> tuple[str, ...]:
    fixed = [a for a in schedule.accumulators if a.time_invariant]
    shared = [a for a in schedule.accumulators if len(a.layers) > 1]
    notes = [f"{len(schedule.accumulators)} accumulators for the targeted layers ({len(shared)} shared)"]
    if fixed:
        notes.append(
            f"{sum(len(a.layers) for a in fixed)} layers read a time-invariant input "
            f"(e.g. {fixed[0].key}): one slot, filled from one step"
        )
    return tuple(notes)


def render(est: Estimate) -> str:
    """The human-readable table `adatsq estimate` prints without --json."""
    a = est.assumptions
    rows = [
        ("model", f"{est.model} ({est.transformer_class}, {est.params / 1e9:.2f} B params, {est.dtype})"),
        ("targeted layers", f"{est.layers}"),
        ("segments / devices", f"{est.segments} / {est.devices}"),
        ("accumulators (float32)", format_size(est.accumulator_bytes)),
        ("  as float64 per layer", format_size(est.float64_per_layer_bytes)),
        ("  largest block", format_size(est.one_block_bytes)),
        (
            "budget per device",
            f"{format_size(est.budget_bytes)} (smallest feasible "
            f"{format_size(est.smallest_budget_bytes, up=True)})",
        ),
        ("passes", f"{est.passes}"),
        (
            "peak device",
            f"{format_size(est.peak_device_bytes)} (weights {format_size(est.weights_bytes)}, {est.weights})",
        ),
        ("recorded inputs (host)", format_size(est.recorded_bytes)),
        *([("candidates (host)", format_size(est.candidates_bytes))] if est.candidates_bytes else []),
        ("peak host", format_size(est.peak_host_bytes)),
        (
            "checkpoint",
            f"{format_size(est.checkpoint_bytes)} (up to {format_size(est.checkpoint_max_bytes)})",
        ),
        ("assumed", ", ".join(f"{k}={v}" for k, v in a.items())),
    ]
    if est.search:
        s = est.search
        rows.append(("AdaTSQ search", f"{s['trajectories']} trajectories ≈ {s['full_runs']} full runs"))
    rows += [("note", n) for n in est.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def estimate_command(args: Any) -> Estimate:
    """The CLI's arguments → Estimate (the recipe's calibration.segments may be overridden)."""
    from dataclasses import replace

    from adatsq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.segments is not None:
        recipe = replace(recipe, calibration=replace(recipe.calibration, segments=args.segments))
    if args.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    assumptions = CallAssumptions(args.height, args.width, args.frames, args.text_tokens, args.cfg_calls)
    return estimate(
        args.model,
        recipe,
        max_memory=args.max_memory,
        dtype=args.dtype,
        devices=args.devices,
        assumptions=assumptions,
        weights=args.weights,
    )


__all__ = ["Estimate", "estimate", "estimate_command", "render", "search_runs"]
