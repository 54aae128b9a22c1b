"""Checkpoints on integer group scales: saved, validated, loaded and inspected, and a plan with 8-bit
variants (per channel) beside 4-bit ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import adatsq
from adatsq.checkpoint.inspect import group_text, inspect_checkpoint
from adatsq.checkpoint.load import load_checkpoint
from adatsq.errors import CheckpointError
from adatsq.plan.cost import variant_bytes
from adatsq.plan.schema import LayerInfo
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear

LAYER = "transformer_blocks.0.attn1.to_q"
CONFIG, WEIGHTS = "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"
INTEGER = {"bits": 4, "group_size": 32, "symmetric": False, "integer_group_scales": True}


@pytest.fixture(scope="module")
def saved(make_recipe, tmp_path_factory):
    qmodel = adatsq.quantize("reference", make_recipe("rtn", 4, weight=INTEGER), progress=False)
    directory = tmp_path_factory.mktemp("intgroups") / "ckpt"
    qmodel.save(directory)
    return qmodel, directory


def test_round_trip_samples_identically_on_the_int8_kernels(saved):
    qmodel, directory = saved
    layers = json.loads((directory / CONFIG).read_text())["quantization_config"]["layers"]
    assert all(layer["integer_group_scales"] is True for layer in layers.values())
    pipe = adatsq.load(directory)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    before = qmodel.model([1, 4], num_inference_steps=3, latents=noise.clone()).images
    after = pipe([1, 4], num_inference_steps=3, latents=noise.clone()).images
    torch.testing.assert_close(after, before)
    layer = pipe.transformer.get_submodule(LAYER)
    assert isinstance(layer, QuantLinear) and layer.channel_scales is not None
    assert layer.kernel == "int8-unpack-per-call"  # group 32 on the int8 path
    row = next(line for line in inspect_checkpoint(directory).splitlines() if line.startswith(LAYER))
    assert "32 int" in row and "int8-unpack-per-call" in row


def _broken(saved, tmp_path, edit_config=None, edit_tensors=None):
    target = shutil.copytree(saved[1], tmp_path / "broken")
    if edit_config:
        data = json.loads((target / CONFIG).read_text())
        edit_config(data["quantization_config"]["layers"][LAYER])
        (target / CONFIG).write_text(json.dumps(data))
    if edit_tensors:
        tensors = load_file(str(target / WEIGHTS))
        edit_tensors(tensors)
        save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(
    ("edit_config", "edit_tensors", "match"),
    [
        (lambda layer: layer.pop("integer_group_scales"), None, "channel_scales' is present"),
        (None, lambda t: t.pop(f"{LAYER}.w4.channel_scales"), "channel_scales' is missing"),
        (lambda layer: layer.update(integer_group_scales="yes"), None, "integer_group_scales is 'yes'"),
        (lambda layer: layer.update(group_size=None), None, "integer_group_scales is True"),
        (None, lambda t: t.update({f"{LAYER}.w4.channel_scales": torch.ones(3).half()}), r"F16 \[128\]"),
    ],
    ids=["key-missing", "tensor-missing", "not-a-bool", "per-channel", "wrong-shape"],
)
def test_a_broken_integer_grid_is_one_line(saved, tmp_path, edit_config, edit_tensors, match):
    broken = _broken(saved, tmp_path, edit_config, edit_tensors)
    for entry in (adatsq.load, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=match) as err:
            entry(broken, verify=False)
        assert "\n" not in str(err.value)


def test_channel_scales_that_break_the_grid_are_refused_at_load(saved, tmp_path):
    key = f"{LAYER}.w4.channel_scales"
    broken = _broken(saved, tmp_path, None, lambda t: t.update({key: t[key] * 0.75}))
    with pytest.raises(CheckpointError, match="damaged"):  # the recorded checksum notices first
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="integer multiples"):
        load_checkpoint(broken, verify=False)


def _variants_by_layer(pipe):
    out = {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, TimestepQuantLinear):
            out[name] = list(m.variants.values())
        elif isinstance(m, QuantLinear) and not any(name.startswith(f"{p}.") for p in out):
            out[name] = [m]
    return out


def test_a_plans_8_bit_variants_are_per_channel_and_every_variant_runs_int8(tiny_adapter, tmp_path):
    """Under integer group scales an 8-bit variant has one scale per row (s2 = 1): int8 kernels too."""
    recipe = {
        "method": "adatsq",
        "weight": INTEGER,
        "activation": {"bits": 8},
        "calibration": {"samples": 4, "steps": 4, "batch_size": 4, "segments": 2},
        "planner": {"candidates": [4, 8], "budget": "avg_bits=6", "fisher_samples": 2, "measure_samples": 2,
                    "beam_width": 2},
    }  # fmt: skip
    qmodel = adatsq.quantize(tiny_adapter(), adatsq.recipe.recipe_from_dict(recipe), progress=False)
    qmodel.save(tmp_path / "plan-ckpt")
    pipe = adatsq.load(tmp_path / "plan-ckpt")
    variants = [
        v
        for m in pipe.transformer.modules()
        if isinstance(m, (QuantLinear, TimestepQuantLinear))
        for v in (m.variants.values() if isinstance(m, TimestepQuantLinear) else [m])
    ]
    assert {v.bits for v in variants} == {4, 8}
    for v in variants:
        assert (v.channel_scales is not None, v.group_size) == ((True, 32) if v.bits == 4 else (False, None))
        assert v.kernel_for("cpu", torch.float32).startswith("int8-")
    table = inspect_checkpoint(tmp_path / "plan-ckpt")
    groups = {line.split("  ")[0]: line for line in table.splitlines()}
    for module_name, bits in ((n, {v.bits for v in vs}) for n, vs in _variants_by_layer(pipe).items()):
        expected = {
            frozenset({4}): "32 int",
            frozenset({8}): "channel",
            frozenset({4, 8}): "32 int, w8 channel",
        }
        assert f"  {expected[frozenset(bits)]}  " in groups[module_name], module_name
    assert "dequant" not in table  # no variant falls back to the float path


def test_the_planners_byte_count_is_the_stored_one(saved):
    """plan/cost.variant_bytes counts the per-row channel scale: what the planner budgets is what is saved."""
    _, directory = saved
    tensors = load_file(str(directory / WEIGHTS))
    layers = json.loads((directory / CONFIG).read_text())["quantization_config"]["layers"]
    for name, layer in layers.items():
        inp, out = layer["in_features"], layer["out_features"]
        info = LayerInfo(name, inp * out, inp, out, 1, layer["group_size"], integer_group_scales=True)
        buffers = ("qweight", "scales", "zeros", "channel_scales")
        stored = sum(
            tensors[f"{name}.w4.{b}"].numel() * tensors[f"{name}.w4.{b}"].element_size() for b in buffers
        )
        assert variant_bytes(info, 4) == stored, name
        assert variant_bytes(info, 8) == out * inp + out * 3  # an 8-bit variant: per channel, no s1


@pytest.mark.parametrize(
    ("bits", "integer", "text"),
    [
        ([4, 8], True, "64 int, w8 channel"),
        ([4, 4], True, "64 int"),
        ([8], True, "channel"),
        ([4, 8], False, "64"),
    ],
)
def test_the_group_column_names_each_variants_grid(bits, integer, text):
    assert group_text({"bits": bits, "group_size": 64, "integer_group_scales": integer}) == text
