"""Quantize with fixed bit-widths: the recipe's everywhere, or a plan's per layer × timestep segment.

Calibrate (unless statistics are given), solve every selected layer's distinct bit-widths, and swap in
the quantized layers. The solvers are pure, calibration hooks only accumulate, and the checkpoint
writer only reads what this produces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.distributed import merge_owned
from adatsq.calibrate.segments import SegmentMap, attach_segment_switching
from adatsq.checkpoint.format import LayerSpec
from adatsq.checkpoint.save import QuantizedModel
from adatsq.core.modules import set_module
from adatsq.engine.passes import layer_statistics
from adatsq.engine.shares import LayerResult, ShareResult, share_store, solved_shares
from adatsq.engine.solve import Variant, segment_mask, solve_variant, variant_statistics
from adatsq.engine.surgery import build_layer, effective_ignore, select_layers
from adatsq.models.resolve import adapter_for
from adatsq.quant.methods import QUANT_METHODS
from adatsq.recipe import Recipe

log = logging.getLogger(__name__)


def quantize(
    model: Any,
    recipe: Recipe,
    calibration: Sequence[Any] | None = None,
    *,
    layer_bits: dict[str, tuple[int, ...]] | None = None,
    segment_weights: torch.Tensor | None = None,
    statistics: Iterable[dict[str, LayerStats]] | None = None,
    progress: bool = True,
    resume: Path | None = None,
) -> QuantizedModel:
    """Quantize `model` ("reference", a pipeline folder, a pipeline or an adapter) with `recipe`.

    `layer_bits` (from a plan) gives a bit-width per timestep segment per layer; without it every selected
    layer uses `recipe.weight.bits` throughout. `segment_weights` (Fisher) weight the per-segment Hessians.
    Given `statistics` (the planner's calibration: groups of layers' statistics) skip calibrating again;
    `resume` keeps calibration progress.
    """
    method = QUANT_METHODS.get(recipe.method)
    needs_stats = method.uses_hessian or recipe.outliers.smooth_alpha is not None
    adapter = adapter_for(model)
    adapter.denoiser().eval()  # calibration and solves see inference behaviour (no label dropout)
    layers = select_layers(adapter, recipe)
    groups = len(next(iter(layer_bits.values()))) if layer_bits else recipe.calibration.segments
    segments = SegmentMap.from_schedule(adapter.step_timesteps(recipe.calibration.steps), groups)
    specs = {
        name: LayerSpec(
            bits=tuple(layer_bits[name]) if layer_bits else (recipe.weight.bits,) * groups,
            group_size=recipe.weight.group_size,
            symmetric=recipe.weight.symmetric,
            integer_group_scales=recipe.weight.integer_group_scales,
        )
        for name in layers
    }
    timings: dict[str, float] = {"calibration_seconds": 0.0, "quantize_seconds": 0.0}
    variants: dict[str, dict[int, Variant]] = {}
    layer_reports: dict[str, dict[str, dict[str, float]]] = {}
    bar = tqdm(total=len(layers), desc="quantizing", unit="layer", disable=None if progress else True)
    clock = time.perf_counter()
    given = statistics is not None
    if not needs_stats:
        statistics = [dict.fromkeys(layers)]  # round-to-nearest without smoothing: no calibration at all
    elif statistics is None:
        cal = recipe.calibration
        inputs = adapter.default_inputs(cal.samples, cal.seed) if calibration is None else list(calibration)
        statistics = layer_statistics(
            adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=cal.seed,
            budget=cal.max_memory_bytes, progress=progress, resume=resume,
        )  # fmt: skip

    def solve(group: dict[str, LayerStats | None]) -> ShareResult:
        start = time.perf_counter()
        solved = {
            name: LayerResult(_solve_layer(layers[name], specs[name], st, segment_weights, recipe))
            for name, st in group.items()
        }
        timings["quantize_seconds"] += time.perf_counter() - start
        return solved

    weights = None if segment_weights is None else segment_weights.tolist()
    store = share_store(resume, statistics, "solve", recipe, [specs[n].bits for n in layers], weights)
    for result in solved_shares(statistics, solve, store):
        for name, layer in result.items():
            variants[name] = layer.variants
            layer_reports[name] = {f"w{bits}": v.info for bits, v in layer.variants.items()}
            bar.update()
    timings["calibration_seconds"] = time.perf_counter() - clock - timings["quantize_seconds"]
    bar.close()
    variants, layer_reports = merge_owned(variants, layer_reports)  # every owner rank's solves
    denoiser = adapter.denoiser()
    names = list(layers)
    for name in names:  # assembled only now (every pass saw the float model), releasing as it goes
        linear, solved = layers.pop(name), variants.pop(name)
        set_module(denoiser, name, build_layer(linear, specs[name], solved, recipe.activation))
    attach_segment_switching(adapter, segments)
    log.info("quantized %d layers (%s)", len(names), recipe.method)
    if not needs_stats or given:
        del timings["calibration_seconds"]
    report = {"method": recipe.method, **timings, "layers": {n: layer_reports[n] for n in names}}
    ignore = effective_ignore(adapter, recipe)
    return QuantizedModel(adapter, recipe, segments, specs, recipe.activation, ignore, report)


def _solve_layer(
    linear: nn.Linear,
    spec: LayerSpec,
    stats: LayerStats | None,
    segment_weights: torch.Tensor | None,
    recipe: Recipe,
) -> dict[int, Variant]:
    """Every distinct bit-width of one layer, each from the statistics of the segments that use it."""
    uses_hessian = QUANT_METHODS.get(recipe.method).uses_hessian
    variants = {}
    for bits in sorted(set(spec.bits)):
        hessian = absmax = None
        if stats is not None:
            hessian, absmax = variant_statistics(stats, segment_mask(spec, bits), segment_weights)
        variants[bits] = solve_variant(
            linear.weight.detach().float(),
            hessian if uses_hessian else None,
            absmax,
            spec.scheme(bits),
            recipe,
            consume_hessian=True,  # computed for this variant alone
        )
    return variants
