"""recipes/models/: one AdaTSQ recipe per real model, checked against the real module names.

Each full-size transformer is built on the meta device from its published config (configs/), so every
target / ignore / pin pattern is matched against the names the real checkpoint has; `adatsq estimate`
runs each recipe on its config; and a pattern that matches nothing is an error at run time.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
from torch import nn

from adatsq.cli import main
from adatsq.engine.surgery import select_layers
from adatsq.errors import ConfigError
from adatsq.models.base import ModelAdapter
from adatsq.models.layers import default_ignore, linear_names, sensitive_layers
from adatsq.models.meta import meta_denoiser
from adatsq.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "models"
README = (ROOT / "README.md").read_text()

# recipe -> (config folder, the model's published number of sampling steps)
MODELS = {
    "flux-dev-w4a4.yaml": ("flux.1-dev", 50),
    "flux-dev-w4a8.yaml": ("flux.1-dev", 50),
    "flux-schnell-w4a4.yaml": ("flux.1-schnell", 4),
    "z-image-turbo-w4a4.yaml": ("z-image-turbo", 9),  # model card: 9 steps (8 DiT forwards)
    "wan2.1-1.3b-w4a4.yaml": ("wan2.1-t2v-1.3b", 50),
    "wan2.1-14b-w4a4.yaml": ("wan2.1-t2v-14b", 50),
    "sd3.5-large-w4a8.yaml": ("sd3.5-large", 28),
    "pixart-sigma-w4a8.yaml": ("pixart-sigma", 20),
    "qwen-image-w4a4.yaml": ("qwen-image", 50),
}


class MetaAdapter(ModelAdapter):
    """Just enough adapter for `select_layers`: the meta-device denoiser of a config folder."""

    family = "meta-test"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def denoiser(self) -> nn.Module:
        return self.module

    def _no(self, *args, **kwargs):
        raise NotImplementedError("a meta-device denoiser cannot run")

    timestep_of = step_timesteps = default_inputs = generate = save_base = _no

    @classmethod
    def load_base(cls, directory):
        raise NotImplementedError


@cache
def _denoiser(config: str) -> nn.Module:
    return meta_denoiser(ROOT / "configs" / config).module


def _matches(pattern: str, names: list[str]) -> list[str]:
    return [n for n in names if re.search(pattern, n)]


def test_one_recipe_per_model():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_pattern_matches_real_layer_names(name):
    recipe = load_recipe(RECIPES / name)
    module = _denoiser(MODELS[name][0])
    names = linear_names(module)
    targeted = [n for n in names if any(re.search(p, n) for p in recipe.targets)]
    assert recipe.ignore is not None, "model recipes spell their ignore list out"
    selected = [n for n in names if recipe.selects(n)]
    for pattern in recipe.targets:
        assert _matches(pattern, names), f"target {pattern!r} matches no layer"
    for pattern in recipe.ignore:  # and none is a no-op: each removes a layer the targets picked
        assert _matches(pattern, targeted), f"ignore {pattern!r} matches no targeted layer"
    for pattern in recipe.planner.pin:
        assert _matches(pattern, selected), f"pin {pattern!r} matches no quantized layer"
    # the run-time selection is the same one, and raises on none of these patterns
    assert list(select_layers(MetaAdapter(module), recipe)) == selected
    # embedders and the final projection (the family defaults) stay in float ...
    defaults = default_ignore(module)
    assert defaults and not [n for n in selected if any(re.fullmatch(p, n) for p in defaults)]
    # ... and every adaLN / modulation layer is either kept in float or pinned at >= 8 bits
    modulation = sensitive_layers(module)
    sensitive = [n for n in names if any(re.fullmatch(p, n) for p in modulation)]
    assert sensitive
    loose = [n for n in sensitive if n in selected and not recipe.planner.pins(n)]
    assert not loose, f"modulation layers quantized like the rest: {loose[:3]}"
    assert recipe.planner.pin_bits >= 8


def _budget_parts(recipe: Recipe, module: nn.Module) -> tuple[float, float]:
    """avg_bits with the pins at pin_bits and every other quantized layer at 4 / at the lowest candidate."""
    sizes = {n: m.in_features * m.out_features for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    sizes = {n: s for n, s in sizes.items() if recipe.selects(n)}
    pinned = sum(s for n, s in sizes.items() if recipe.planner.pins(n)) / sum(sizes.values())
    pin = recipe.planner.pin_bits * pinned
    return pin + 4 * (1 - pinned), pin + min(recipe.planner.candidates) * (1 - pinned)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recipe_settings(name):
    recipe = load_recipe(RECIPES / name)
    config, steps = MODELS[name]
    text = (RECIPES / name).read_text()
    assert recipe.method == "adatsq" and recipe.calibration.steps == steps
    w_bits, a_bits = (int(b) for b in re.fullmatch(r".*-w(\d)a(\d)\.yaml", name).groups())
    assert (recipe.weight.bits, recipe.activation.bits) == (w_bits, a_bits)
    if a_bits == 4:
        assert recipe.outliers.rotate and recipe.outliers.smooth_alpha is not None
    # the calibration prompts: a calib/ file with its provenance stated, one sample per prompt
    calib = re.findall(r"--calib (calib/\S+)", text)
    assert len(set(calib)) == 1, "the recipe names its calibration file once"
    prompts = [ln for ln in (ROOT / calib[0]).read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert len(prompts) == recipe.calibration.samples
    readme = (ROOT / "calib" / "README.md").read_text()
    assert f"`{Path(calib[0]).name}`" in readme and "Licence" in readme
    assert "Higher precision" in text and f"configs/{config}" in text
    # the budget is what the comment says: pins at 8 bits, the other layers averaging 4, and feasible
    kind, value = recipe.planner.budget.split("=")
    at_four, cheapest = _budget_parts(recipe, _denoiser(config))
    assert kind == "avg_bits" and cheapest < at_four <= float(value) < at_four + 0.01


@pytest.mark.parametrize("name", sorted(MODELS))
def test_estimate_runs_each_recipe(name, capsys):
    config, steps = MODELS[name]
    recipe = load_recipe(RECIPES / name)
    rc = main(["estimate", str(ROOT / "configs" / config), "--recipe", str(RECIPES / name), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["layers"] == len([n for n in linear_names(_denoiser(config)) if recipe.selects(n)])
    assert out["segments"] == recipe.calibration.segments and out["assumptions"]["steps"] == steps
    assert out["search"] is not None  # the AdaTSQ search is costed
    # the README's table states the same steps / segments and layer count
    row = next(r for r in README.splitlines() if r.startswith(f"| `{name}` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"`{config}`" and cells[2] == f"{steps} / {recipe.calibration.segments}"
    assert int(cells[-1]) == out["layers"]


# ---------------------------------------------------------------- a pattern that matches nothing


@pytest.fixture(scope="module")
def flux():
    return MetaAdapter(_denoiser("flux.1-dev")), load_recipe(RECIPES / "flux-dev-w4a8.yaml")


@pytest.mark.parametrize(
    "field, pattern, closest",
    [
        ("targets", r"^transformer_block\.\d+\.attn\.to_q$", "transformer_blocks."),
        ("ignore", r"^time_text_embedder\.", "time_text_embed."),
        ("ignore", r"^norm_out\.lin$", "norm_out.linear"),
    ],
)
def test_a_typo_on_real_names_is_an_error_naming_close_ones(flux, field, pattern, closest):
    adapter, recipe = flux
    bad = replace(recipe, **{field: (*getattr(recipe, field), pattern)})
    with pytest.raises(
        ConfigError, match=rf"{field} pattern '{re.escape(pattern)}' matches no Linear"
    ) as err:
        select_layers(adapter, bad)
    assert f"closest: {closest}" in str(err.value) or closest in str(err.value).split("closest:")[1]


def test_a_pin_on_nothing_or_on_an_ignored_layer_is_an_error(flux):
    adapter, recipe = flux
    for pin in (r"^transformer_blocks\.\d+\.norm2\.linear$", r"^norm_out\.linear$"):  # absent; ignored
        bad = replace(recipe, planner=replace(recipe.planner, pin=(*recipe.planner.pin, pin)))
        with pytest.raises(ConfigError, match=r"planner.pin pattern .* matches no quantized layer"):
            select_layers(adapter, bad)
