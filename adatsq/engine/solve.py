"""One quantized variant of one layer: outlier transform, then GPTQ (or RTN) on the segments' statistics."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from adatsq.calibrate.capture import LayerStats
from adatsq.checkpoint.format import LayerSpec
from adatsq.quant.gptq import gptq
from adatsq.quant.linear import QuantLinear
from adatsq.quant.pack import PackedWeight
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import ActScheme, QuantizedWeight, WeightScheme
from adatsq.quant.transforms import TRANSFORM_FIELDS, InputTransform, build_transform, transform_hessian
from adatsq.recipe import Recipe


@dataclass
class Variant:
    """One solved bit-width of one layer: codes, the input transform it was solved in, solver info.

    The codes are kept packed: variants wait for assembly (or the planner's search) by the thousand.
    """

    weight: PackedWeight
    transform: InputTransform
    info: dict[str, float]

    def __post_init__(self) -> None:
        if isinstance(self.weight, QuantizedWeight):
            self.weight = PackedWeight.of(self.weight)

    def to(self, device: torch.device | str) -> Variant:
        """The same variant with every tensor on `device` (variants wait on the host, layers run on the
        denoiser's device)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        w, t = self.weight, self.transform
        weight = replace(w, qweight=move(w.qweight), scales=move(w.scales), zeros=move(w.zeros))
        transform = InputTransform(*(move(getattr(t, f)) for f in TRANSFORM_FIELDS))
        return Variant(weight, transform, self.info)

    def module(self, bias: torch.Tensor | None, act: ActScheme) -> QuantLinear:
        return QuantLinear.from_quantized(self.weight, bias, act, transform=self.transform)


def solve_variant(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    act_absmax: torch.Tensor | None,
    scheme: WeightScheme,
    recipe: Recipe,
    *,
    consume_hessian: bool = False,
) -> Variant:
    """One variant: outlier transforms first, then GPTQ on the transformed Hessian (RTN without one).

    `consume_hessian`: the caller will not read `hessian` again, so GPTQ may factor it in place (one
    [in, in] float64 matrix less at the solve's peak; the result is the same).
    """
    target, transform = build_transform(weight, recipe.outliers, act_absmax)
    if hessian is None:
        return Variant(rtn(target, scheme), transform, {}).to("cpu")
    result = gptq(
        target,
        transform_hessian(hessian, transform),
        scheme,
        damp=recipe.gptq.damping,
        act_order=recipe.gptq.act_order,
        block_size=recipe.gptq.block_size,
        overwrite_h=consume_hessian,
    )
    info = {"loss": result.loss, "damp": result.damp, "damp_escalations": result.damp_escalations}
    return Variant(result.weight, transform, info).to("cpu")  # packed on the host until assembled


def segment_mask(spec: LayerSpec, bits: int) -> torch.Tensor:
    """Which timestep segments of a layer's row use the `bits` variant."""
    return torch.tensor([b == bits for b in spec.bits])


def variant_statistics(
    stats: LayerStats, mask: torch.Tensor, segment_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, channel absmax) of the segments in `mask`: H = Σ w_s · XᵀX_s / n_s, weights renormalised."""
    weights = mask.to(torch.float64)
    if segment_weights is not None and float((segment_weights * mask).sum()) > 0:
        weights = weights * segment_weights.to(torch.float64)
    return stats.hessian(weights / weights.sum()), stats.absmax[mask].amax(dim=0)
