"""Quantize with fixed bit-widths: the recipe's everywhere, or a plan's per layer × timestep segment.

Calibrate (unless statistics are given), solve every selected layer's distinct bit-widths, and swap in
the quantized layers. The solvers are pure, calibration hooks only accumulate, and the checkpoint
writer only reads what this produces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.runner import collect_stats
from adatsq.calibrate.segments import SegmentMap, attach_segment_switching
from adatsq.checkpoint.format import LayerSpec
from adatsq.checkpoint.save import QuantizedModel
from adatsq.core.modules import set_module
from adatsq.engine.solve import segment_mask, solve_variant, variant_statistics
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
    stats: dict[str, LayerStats] | None = None,
    progress: bool = True,
    resume: Path | None = None,
) -> QuantizedModel:
    """Quantize `model` ("reference", a pipeline folder, a pipeline or an adapter) with `recipe`.

    `layer_bits` (from a plan) gives a bit-width per timestep segment per layer; without it every selected
    layer uses `recipe.weight.bits` throughout. `segment_weights` (Fisher) weight the per-segment Hessians.
    Precomputed `stats` skip calibration (the planner already ran it); `resume` keeps calibration progress.
    """
    method = QUANT_METHODS.get(recipe.method)
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
        )
        for name in layers
    }
    timings: dict[str, float] = {}
    needs_stats = method.uses_hessian or recipe.outliers.smooth_alpha is not None
    if needs_stats and stats is None:
        start = time.perf_counter()
        inputs = (
            list(calibration)
            if calibration is not None
            else adapter.default_inputs(recipe.calibration.samples, recipe.calibration.seed)
        )
        stats = collect_stats(
            adapter,
            layers,
            segments,
            inputs,
            batch_size=recipe.calibration.batch_size,
            seed=recipe.calibration.seed,
            progress=progress,
            resume=resume,
        )
        timings["calibration_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    layer_reports = {}
    denoiser = adapter.denoiser()
    for name, linear in tqdm(layers.items(), desc="quantizing", unit="layer", disable=not progress):
        spec = specs[name]
        variants = {}
        for bits in sorted(set(spec.bits)):
            hessian = absmax = None
            if stats is not None:
                hessian, absmax = variant_statistics(stats[name], segment_mask(spec, bits), segment_weights)
            variants[bits] = solve_variant(
                linear.weight.detach().float(),
                hessian if method.uses_hessian else None,
                absmax,
                spec.scheme(bits),
                recipe,
            )
        set_module(denoiser, name, build_layer(linear, spec, variants, recipe.activation))
        layer_reports[name] = {f"w{bits}": variant.info for bits, variant in variants.items()}
    timings["quantize_seconds"] = time.perf_counter() - start
    attach_segment_switching(adapter, segments)
    log.info("quantized %d layers (%s)", len(layers), recipe.method)
    report = {"method": recipe.method, **timings, "layers": layer_reports}
    ignore = effective_ignore(adapter, recipe)
    return QuantizedModel(adapter, recipe, segments, specs, recipe.activation, ignore, report)
