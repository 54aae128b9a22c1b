from pathlib import Path

import pytest

from adatsq.errors import ConfigError
from adatsq.recipe import SCHEME_PRESETS, load_recipe, recipe_from_dict

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
    # `re:X` is llm-compressor's re.match(X, name): anchored at the start of the name
    assert recipe.targets == ("^(?:.*attn.*)",) and recipe.ignore == ("^(?:proj_out)",)
    assert recipe.planner.pin == ("^(?:norm1)",)
    assert recipe.selects("blocks.0.attn.to_q") and not recipe.selects("blocks.0.ff.net.2")
    assert not recipe.selects("proj_out") and recipe.selects("single_transformer_blocks.0.attn.proj_out")
    assert recipe_from_dict(recipe.to_dict()) == recipe
    # llm-compressor's class-name target: every Linear layer ('re:Linear' stays a regex)
    assert recipe_from_dict({"method": "rtn", "weight": {"bits": 4}, "targets": ["Linear"]}).targets == (
        ".*",
    )
    assert recipe_from_dict({"method": "rtn", "weight": {"bits": 4}, "targets": ["re:Linear"]}).targets == (
        "^(?:Linear)",
    )


def test_activation_null_in_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: gptq\nweight: {bits: 4}\nactivation: null\n")
    assert load_recipe(path).activation.bits is None
    path.write_text("method: gptq\nweight: {bits: 4}\nactivation:\n")  # an empty value is null too
    assert load_recipe(path).activation.bits is None


NAMES = [
    "proj_out",
    "proj_out_1",
    "single_transformer_blocks.0.proj_out",
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.10.norm1.linear",
    "x_embedder",
]


@pytest.mark.parametrize(
    "target",
    ["re:proj_out", "re:.*proj_out$", "re:transformer_blocks\\.\\d+\\.attn", "re:.*norm1", "re:x_emb"],
)
def test_re_patterns_select_what_compressed_tensors_selects(target):
    match = pytest.importorskip("compressed_tensors.utils.match")
    recipe = recipe_from_dict({"method": "rtn", "weight": {"bits": 4}, "targets": [target], "ignore": []})
    assert [n for n in NAMES if recipe.selects(n)] == [n for n in NAMES if match.match_name(n, target)]


def test_scheme_presets_are_compressed_tensors_grids():
    """A preset named like llm-compressor's means its grid: bits, group, symmetry, per-token dynamic A."""
    presets = pytest.importorskip("compressed_tensors.quantization.quant_scheme").PRESET_SCHEMES
    assert {"W4A16", "W4A8", "W8A8", "W4A4", "W8A16", "W4A16_ASYM"} <= set(SCHEME_PRESETS)
    for name in SCHEME_PRESETS:
        recipe = recipe_from_dict({"method": "gptq", "scheme": name.lower()})  # case-insensitive, as theirs
        theirs = presets[name]
        w = theirs["weights"]
        assert (w.type, w.num_bits, w.symmetric, w.dynamic) == (
            "int",
            recipe.weight.bits,
            recipe.weight.symmetric,
            False,
        )
        assert recipe.weight.group_size == (w.group_size if w.strategy == "group" else None)
        assert w.strategy == ("group" if recipe.weight.group_size else "channel")
        a = theirs.get("input_activations")
        if a is None:
            assert recipe.activation.bits is None
        else:
            assert (a.type, a.strategy, a.dynamic, a.symmetric) == ("int", "token", True, True)
            assert a.num_bits == recipe.activation.bits


def test_scheme_w4a16_is_symmetric_group_128():
    recipe = recipe_from_dict({"method": "gptq", "scheme": "W4A16"})
    assert (recipe.weight.bits, recipe.weight.group_size, recipe.weight.symmetric) == (4, 128, True)
    assert recipe.activation.bits is None
    w8a8 = recipe_from_dict({"method": "gptq", "scheme": "W8A8"})
    assert (w8a8.weight.bits, w8a8.weight.group_size, w8a8.activation.bits) == (8, None, 8)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"method": "gptq", "scheme": "FP8"}, "'FP8' is not a preset adatsq has a grid for; allowed: W2A4"),
        ({"method": "gptq", "scheme": "W5A16"}, "not a preset"),
        ({"method": "gptq", "scheme": 4}, "not a preset"),
        ({"method": "gptq", "scheme": "W4A16", "weight": {"bits": 4}}, "drop weight or drop scheme"),
        ({"method": "gptq", "scheme": "W4A8", "activation": None}, "drop activation or drop scheme"),
        ({"method": "gptq", "scheme": "W4A16", "config_groups": {}}, "'config_groups' is llm-compressor's"),
        ({"method": "gptq", "scheme": "W4A16", "dampening_frac": 0.01}, "use gptq.damping"),
        ({"method": "gptq", "scheme": "W4A16", "sequential_targets": []}, "calibration.max_memory"),
        ({"method": "gptq", "scheme": "W4A16", "offload_hessians": True}, "use calibration.max_memory"),
        (
            {"method": "gptq", "scheme": "W4A16", "gptq": {"dampening_frac": 0.1}},
            "recipe.gptq: 'dampening_frac'",
        ),
        ({"method": "gptq", "scheme": "W4A16", "actorder": "static"}, "use gptq.act_order"),
        ({"method": "gptq", "scheme": "W4A16", "block_size": 128}, "use gptq.block_size"),
        ({"quant_stage": {"quant_modifiers": {}}}, "adatsq recipes are flat|a flat recipe"),
        ({"method": "gptq", "scheme": "W4A16", "num_calibration_samples": 8}, "use calibration.samples"),
        ({"method": "gptq", "scheme": "W4A16", "kv_cache_schema": None}, "unknown key(s) 'kv_cache_schema'"),
    ],
)
def test_llm_compressor_only_keys_name_our_equivalent(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_dict(data)


def test_our_keys_that_llm_compressor_shares_stay_ours():
    recipe = recipe_from_dict({"method": "gptq", "scheme": "W4A16", "gptq": {"block_size": 64}})
    assert recipe.gptq.block_size == 64


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
