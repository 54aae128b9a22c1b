"""Which Linear layers a recipe quantizes, and the quantized module that replaces each one."""

from __future__ import annotations

import difflib
import re

from torch import nn

from adatsq.checkpoint.format import LayerSpec
from adatsq.engine.solve import Variant
from adatsq.errors import CalibrationError, ConfigError
from adatsq.models.base import ModelAdapter
from adatsq.quant.linear import TimestepQuantLinear
from adatsq.quant.scheme import ActScheme
from adatsq.recipe import Recipe


def effective_ignore(adapter: ModelAdapter, recipe: Recipe) -> tuple[str, ...]:
    """The recipe's ignore patterns, or the family's defaults when the recipe gives none."""
    return tuple(adapter.default_ignore()) if recipe.ignore is None else recipe.ignore


def check_patterns(
    kind: str, patterns: tuple[str, ...], names: list[str], among: str = "Linear layer of the denoiser"
) -> None:
    """Nothing fails open: every pattern a user wrote must match at least one layer name."""
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
            close = difflib.get_close_matches(
                re.sub(r"[\\^$.*+?()\[\]{}|]", "", pattern), names, n=3, cutoff=0
            )
            raise ConfigError(
                f"{kind} pattern '{pattern}' matches no {among} (regexes, searched in "
                f"module names; closest: {', '.join(close)}); fix it or run `adatsq inspect MODEL`"
            )


def select_layers(adapter: ModelAdapter, recipe: Recipe) -> dict[str, nn.Linear]:
    """Linear layers the recipe targets; a pattern or a selection that matches nothing is an error."""
    ignore = effective_ignore(adapter, recipe)
    linears = {n: m for n, m in adapter.denoiser().named_modules() if isinstance(m, nn.Linear)}
    check_patterns("targets", recipe.targets, list(linears))
    if recipe.ignore is not None:  # the family's defaults cover several families: only the user's are checked
        check_patterns("ignore", recipe.ignore, list(linears))
    layers = {n: m for n, m in linears.items() if recipe.selects(n, ignore)}
    if not layers:
        raise CalibrationError(
            f"no Linear layer matches targets {list(recipe.targets)} minus ignore {list(ignore)}; "
            "run `adatsq inspect MODEL` to list layer names"
        )
    # a pin on layers that are not quantized (untargeted or ignored) would do nothing
    check_patterns("planner.pin", recipe.planner.pin, list(layers), "quantized layer (targets minus ignore)")
    return layers


def build_layer(
    linear: nn.Linear, spec: LayerSpec, variants: dict[int, Variant], act: ActScheme
) -> nn.Module:
    """QuantLinear for a single bit-width, TimestepQuantLinear when the row switches bits."""
    bias = None if linear.bias is None else linear.bias.detach()
    device = linear.weight.device
    modules = [variant.to(device).module(bias, act) for variant in variants.values()]
    return modules[0] if len(modules) == 1 else TimestepQuantLinear(modules, spec.bits)
