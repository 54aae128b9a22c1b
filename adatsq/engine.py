"""`adatsq.quantize`: calibrate, solve every selected layer, and swap in quantized layers.

The only module that changes a model: the solvers are pure, calibration hooks only accumulate, and the
checkpoint writer only reads what this produces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.runner import collect_stats
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_for
from adatsq.quant.gptq import gptq
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import ActScheme, QuantizedWeight, WeightScheme
from adatsq.quant.transforms import InputTransform, build_transform, transform_hessian
from adatsq.recipe import Recipe
from adatsq.timesteps import SegmentMap, install_segment_hook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is stored: a weight scheme per timestep segment (one variant per distinct bits)."""

    bits: tuple[int, ...]  # weight bits at each segment
    group_size: int | None
    symmetric: bool

    def scheme(self, bits: int) -> WeightScheme:
        return WeightScheme(bits=bits, group_size=self.group_size, symmetric=self.symmetric)


@dataclass
class QuantizedModel:
    """A model whose selected Linear layers were replaced; `save` writes the checkpoint."""

    adapter: ModelAdapter
    recipe: Recipe
    segments: SegmentMap
    layers: dict[str, LayerSpec]
    activation: ActScheme
    report: dict[str, Any] = field(default_factory=dict)
    plan: Any = None  # the adatsq.plan Plan it was quantized with, written beside the checkpoint

    @property
    def model(self) -> Any:
        return self.adapter.user_model()

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        from adatsq.checkpoint import save_checkpoint

        return save_checkpoint(self, Path(directory), overwrite=overwrite)


def effective_ignore(adapter: ModelAdapter, recipe: Recipe) -> tuple[str, ...]:
    return tuple(adapter.default_ignore()) if recipe.ignore is None else recipe.ignore


def select_layers(adapter: ModelAdapter, recipe: Recipe) -> dict[str, nn.Linear]:
    """Linear layers the recipe targets; none matching is an error (a phase that did nothing)."""
    ignore = effective_ignore(adapter, recipe)
    layers = {
        n: m
        for n, m in adapter.denoiser().named_modules()
        if isinstance(m, nn.Linear) and recipe.selects(n, ignore)
    }
    if not layers:
        raise CalibrationError(
            f"no Linear layer matches targets {list(recipe.targets)} minus ignore {list(ignore)}; "
            "run `adatsq inspect MODEL` to list layer names"
        )
    return layers


@dataclass
class Variant:
    """One solved bit-width of one layer: codes, the input transform it was solved in, solver info."""

    weight: QuantizedWeight
    transform: InputTransform
    info: dict[str, float]

    def module(self, bias: torch.Tensor | None, act: ActScheme) -> QuantLinear:
        return QuantLinear.from_quantized(self.weight, bias, act, transform=self.transform)


def solve_variant(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    act_absmax: torch.Tensor | None,
    scheme: WeightScheme,
    recipe: Recipe,
) -> Variant:
    """One variant: outlier transforms first, then GPTQ on the transformed Hessian (RTN without one)."""
    target, transform = build_transform(weight, recipe.outliers, act_absmax)
    if hessian is None:
        return Variant(rtn(target, scheme), transform, {})
    result = gptq(
        target,
        transform_hessian(hessian, transform),
        scheme,
        damp=recipe.gptq.damping,
        act_order=recipe.gptq.act_order,
        block_size=recipe.gptq.block_size,
    )
    info = {"loss": result.loss, "damp": result.damp, "damp_escalations": result.damp_escalations}
    return Variant(result.weight, transform, info)


def build_layer(
    linear: nn.Linear, spec: LayerSpec, variants: dict[int, Variant], act: ActScheme
) -> nn.Module:
    """QuantLinear for a single bit-width, TimestepQuantLinear when the row switches bits."""
    bias = None if linear.bias is None else linear.bias.detach()
    modules = [variant.module(bias, act) for variant in variants.values()]
    return modules[0] if len(modules) == 1 else TimestepQuantLinear(modules, spec.bits)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def attach_segment_switching(adapter: ModelAdapter, segments: SegmentMap) -> None:
    """One pre-hook on the denoiser points every switching layer at the current segment's variant."""
    switching = [m for m in adapter.denoiser().modules() if isinstance(m, TimestepQuantLinear)]
    if not switching:
        return
    current = [-1]

    def on_call(segment: int, step: int) -> None:
        if segment != current[0]:
            for layer in switching:
                layer.set_segment(segment)
            current[0] = segment

    install_segment_hook(adapter, segments, on_call)


def segment_mask(spec: LayerSpec, bits: int) -> torch.Tensor:
    return torch.tensor([b == bits for b in spec.bits])


def variant_statistics(
    stats: LayerStats, mask: torch.Tensor, segment_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, channel absmax) of the segments in `mask`: H = Σ w_s · XᵀX_s / n_s, weights renormalised."""
    weights = mask.to(torch.float64)
    if segment_weights is not None and float((segment_weights * mask).sum()) > 0:
        weights = weights * segment_weights.to(torch.float64)
    return stats.hessian(weights / weights.sum()), stats.absmax[mask].amax(dim=0)


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
    needs_stats = recipe.method != "rtn" or recipe.outliers.smooth_alpha is not None
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
            if recipe.method == "rtn":
                hessian = None
            variants[bits] = solve_variant(
                linear.weight.detach().float(), hessian, absmax, spec.scheme(bits), recipe
            )
        set_module(denoiser, name, build_layer(linear, spec, variants, recipe.activation))
        layer_reports[name] = {f"w{bits}": variant.info for bits, variant in variants.items()}
    timings["quantize_seconds"] = time.perf_counter() - start
    attach_segment_switching(adapter, segments)
    log.info("quantized %d layers (%s)", len(layers), recipe.method)
    report = {"method": recipe.method, **timings, "layers": layer_reports}
    return QuantizedModel(adapter, recipe, segments, specs, recipe.activation, report)
