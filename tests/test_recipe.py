from pathlib import Path

import pytest

from adatsq.errors import ConfigError
from adatsq.recipe import load_recipe, recipe_from_dict

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_minimal_recipe_gets_defaults():
    recipe = recipe_from_dict({"method": "gptq", "weight": {"bits": 3}})
    assert recipe.weight.bits == 3 and recipe.gptq.damping == 0.01 and recipe.calibration.segments == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({"method": "gptq", "weight": {"bits": 4}, "wieght": {}}, "unknown key(s) 'wieght'"),
        ({"method": "gptq", "weight": {"bits": 4, "grop_size": 64}}, "unknown key(s) 'grop_size'"),
        ({"method": "gptq", "weight": {"bits": "four"}}, "expected int"),
        ({"method": "gptq", "weight": {"bits": 5}}, "allowed values"),
        ({"method": "awq", "weight": {"bits": 4}}, "unknown quantization method 'awq'"),
        ({"method": "gptq", "weight": {"bits": 4}, "activation": {"bits": 6}}, "activation bits=6"),
        ({"method": "gptq", "weight": {"bits": 4}, "gptq": {"act_order": "yes"}}, "expected bool"),
        ({"method": "gptq", "weight": {"bits": 4}, "targets": ["("]}, "invalid regex"),
        (
            {"method": "gptq", "weight": {"bits": 4}, "calibration": {"steps": 4, "segments": 8}},
            "cannot exceed",
        ),
        ({"weight": {"bits": 4}}, "method"),
        (["not", "a", "mapping"], "expected a mapping"),
    ],
)
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_dict(data)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [gptq\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_targets_and_ignore_select_layers():
    recipe = recipe_from_dict(
        {"method": "rtn", "weight": {"bits": 4}, "targets": ["attn"], "ignore": [r"to_out\.0"]}
    )
    assert recipe.selects("transformer_blocks.0.attn1.to_q")
    assert not recipe.selects("transformer_blocks.0.attn1.to_out.0")
    assert not recipe.selects("transformer_blocks.0.ff.net.2")


def test_llm_compressor_vocabulary_that_means_the_same():
    recipe = recipe_from_dict(
        {
            "method": "gptq",
            "weight": {"bits": 4},
            "activation": None,
            "targets": ["re:.*attn.*"],
            "ignore": ["re:proj_out"],
            "planner": {"pin": ["re:norm1"]},
        }
    )
    assert recipe.activation.bits is None  # `activation: null` = float activations, as the README says
    assert (recipe.targets, recipe.ignore, recipe.planner.pin) == ((".*attn.*",), ("proj_out",), ("norm1",))
    assert recipe.selects("blocks.0.attn.to_q") and not recipe.selects("blocks.0.ff.net.2")


@pytest.mark.parametrize(
    "content, message",
    [
        ("méthode: gptq\n".encode("latin-1"), "not UTF-8 text"),
        (
            b"method: gptq\nweight: {bits: 4}\ncalibration: {samples: 99999999999999999999}\n",
            "samples must be",
        ),
        (b"method: gptq\nweight: {bits: 4}\ncalibration: {seed: 18446744073709551616}\n", "seed must be"),
    ],
)
def test_unreadable_or_absurd_recipes_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)
