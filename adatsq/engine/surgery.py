"""Which Linear layers a recipe quantizes, and the quantized module that replaces each one."""

from __future__ import annotations

from torch import nn

from adatsq.checkpoint.format import LayerSpec
from adatsq.engine.solve import Variant
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter
from adatsq.quant.linear import TimestepQuantLinear
from adatsq.quant.scheme import ActScheme
from adatsq.recipe import Recipe


def effective_ignore(adapter: ModelAdapter, recipe: Recipe) -> tuple[str, ...]:
    """The recipe's ignore patterns, or the family's defaults when the recipe gives none."""
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


def build_layer(
    linear: nn.Linear, spec: LayerSpec, variants: dict[int, Variant], act: ActScheme
) -> nn.Module:
    """QuantLinear for a single bit-width, TimestepQuantLinear when the row switches bits."""
    bias = None if linear.bias is None else linear.bias.detach()
    modules = [variant.module(bias, act) for variant in variants.values()]
    return modules[0] if len(modules) == 1 else TimestepQuantLinear(modules, spec.bits)
