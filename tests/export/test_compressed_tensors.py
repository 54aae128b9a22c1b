"""compressed-tensors export, checked against compressed-tensors itself (an optional dev dependency).

The layout claims are tested on random codes (every bit-width, rows that end mid-word), then whole
GPTQ checkpoints are exported and dequantized by compressed-tensors' own model-free dequantizer and by
its ModelCompressor, and compared with adatsq's weights bit for bit.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from adatsq.checkpoint.format import read_checkpoint_config
from adatsq.checkpoint.load import load_checkpoint
from adatsq.checkpoint.shards import TensorFiles
from adatsq.checkpoint.validate import open_checkpoint
from adatsq.errors import ExportError
from adatsq.export.base import ExportOptions, Selection
from adatsq.export.compressed_tensors import int32_words
from adatsq.export.convert import export
from adatsq.quant.pack import pack, unpack
from adatsq.quant.scheme import WEIGHT_BITS, QuantizedWeight, dequantize_codes

ct_pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
ct_dequantizer = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.ct_dequantizer")


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("cols", [1, 37, 64, 130])
def test_packed_rows_are_compressed_tensors_int32_words(bits, cols):
    """adatsq's packed row, padded to words and viewed as int32 == pack_to_int32(code - 2**(b-1))."""
    codes = torch.randint(0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(bits * cols))
    codes = codes.to(torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    ours = int32_words(pack(codes, bits))
    assert torch.equal(ours, ct_pack.pack_to_int32(signed, bits))
    assert torch.equal(ct_pack.unpack_from_int32(ours, bits, torch.Size([5, cols])), signed)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_zero_points_pack_along_the_output_dimension(bits):
    zeros = torch.randint(0, 2**bits, (37, 3), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    signed = (zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    ours = int32_words(pack(zeros.t().contiguous(), bits)).t().contiguous()
    assert torch.equal(ours, ct_pack.pack_to_int32(signed, bits, packed_dim=0))


def adatsq_weights(checkpoint, exported, dtype):
    """layer -> adatsq's dequantized weight of the exported variant (QuantizedWeight for float32)."""
    config, layout = read_checkpoint_config(checkpoint)
    record = json.loads((exported / "adatsq_export.json").read_text())
    files = TensorFiles(layout.tensors)
    weights = {}
    for name, layer in config["layers"].items():
        bits = record["layers"][name]["bits"]
        prefix = f"{name}.w{bits}."
        codes = unpack(files.get(prefix + "qweight"), bits, layer["in_features"])
        scales, zeros = files.get(prefix + "scales"), files.get(prefix + "zeros")
        if dtype == torch.float32:
            weight = QuantizedWeight(codes, scales.float(), zeros, bits, layer["group_size"]).dequantize()
        else:
            weight = dequantize_codes(codes, scales, zeros, layer["group_size"], dtype)
        weights[name] = weight
    return weights


def ct_dequantized(exported, dtype):
    """compressed-tensors' own model-free dequantization of the exported folder (in the scale dtype)."""
    dequantizer = ct_dequantizer.CompressedTensorsDequantizer(exported, dtype=dtype)
    return dequantizer.validate(load_file(exported / "model.safetensors"))  # also: no leftover qparams


CASES = {
    "group32-asym": {},
    "per-channel": {"group": None},
    "group128-sym": {"group": 128, "sym": True},  # one group (channel) for in=64, two groups for in=256
    "mixed-bits": {"mixed": True},
    "integer-group-scales": {
        "weight": {"bits": 4, "group_size": 32, "symmetric": False, "integer_group_scales": True}
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_export_dequantizes_bit_for_bit(make_checkpoint, tmp_path, case, scale_dtype):
    checkpoint = make_checkpoint(**CASES[case])
    selections = [Selection(0), Selection(1), Selection()] if CASES[case].get("mixed") else [None]
    dtype = getattr(torch, scale_dtype)
    for i, selection in enumerate(selections):
        out = tmp_path / f"ct{i}"
        export(checkpoint, "compressed-tensors", out, selection, options=ExportOptions(scale_dtype))
        ours, theirs = adatsq_weights(checkpoint, out, dtype), ct_dequantized(out, dtype)
        for name, weight in ours.items():
            assert theirs[f"{name}.weight"].dtype == dtype
            assert torch.equal(theirs[f"{name}.weight"], weight), name
        stored, kept = (
            load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"),
            json.loads((out / "adatsq_export.json").read_text()),
        )
        for key, value in theirs.items():  # biases and float tensors are copied as stored
            module, _, leaf = key.rpartition(".")
            if module in ours and leaf != "weight":
                key = f"{module}.w{kept['layers'][module]['bits']}.{leaf}"
            if module not in ours or leaf != "weight":
                assert torch.equal(value, stored[key]), key


def test_config_groups_follow_the_schema(make_checkpoint, tmp_path):
    quantization = pytest.importorskip("compressed_tensors.quantization")
    checkpoint = make_checkpoint(group=128, sym=True)
    export(checkpoint, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"  # the denoiser's own config is kept
    parsed = quantization.QuantizationConfig.model_validate(config["quantization_config"])
    strategies = {g.weights.strategy: g for g in parsed.config_groups.values()}
    assert set(strategies) == {"channel", "group"}
    assert strategies["group"].targets == ["transformer_blocks.0.ff.net.2"]  # the only 256-wide input
    assert strategies["group"].weights.group_size == 128 and strategies["group"].weights.symmetric
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert "proj_out_1" in parsed.ignore
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    assert not any(key.endswith("weight_zero_point") for key in tensors)  # symmetric: no zero points
    assert config["adatsq_export"]["selection"].startswith("each layer's only variant")


def test_model_compressor_decompresses_into_the_same_model(make_checkpoint, tmp_path):
    """The transformers loading path: apply the config to the float model, load, decompress, run."""
    ct_quantization = pytest.importorskip("compressed_tensors.quantization")
    compressors = pytest.importorskip("compressed_tensors.compressors")
    checkpoint = make_checkpoint()
    out = tmp_path / "ct"
    export(checkpoint, "compressed-tensors", out)
    qconfig = ct_quantization.QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    model = open_checkpoint(checkpoint).adapter.denoiser()
    ct_quantization.apply_quantization_config(model, qconfig, show_progress=False)
    compressor = compressors.ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    missing, unexpected = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    assert missing == [] and unexpected == []
    compressor.decompress_model(model)
    adapter, config = load_checkpoint(checkpoint)
    ours = adapter.denoiser()
    for name in config["layers"]:
        assert torch.equal(
            model.get_submodule(name).weight.data, ours.get_submodule(name).dequantized_weight()
        )
    inputs = (torch.randn(2, 1, 16, 16), torch.tensor([500.0, 20.0]), torch.tensor([3, 7]))
    with torch.no_grad():
        expected = ours(*inputs, return_dict=False)[0]
        got = model(*inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected)


def test_a8_is_int_quantized_with_dynamic_token_activations(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint(act=8)
    out = tmp_path / "ct"
    export(checkpoint, "compressed-tensors", out, options=ExportOptions("float32"))
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qconfig["config_groups"].values()
    assert group["format"] == qconfig["format"] == "int-quantized"
    assert group["input_activations"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
    }  # fmt: skip
    tensors = load_file(out / "model.safetensors")
    weight = tensors["transformer_blocks.0.attn1.to_q.weight"]
    assert weight.dtype == torch.int8 and weight.min() >= -8 and weight.max() <= 7  # 4-bit, unpacked
    ours, theirs = adatsq_weights(checkpoint, out, torch.float32), ct_dequantized(out, torch.float32)
    assert all(torch.equal(theirs[f"{name}.weight"], w) for name, w in ours.items())


def test_compressed_tensors_token_grid_is_not_adatsqs():
    """Why the README says compressed-tensors' own fake-quant rounds differently: absmax / 127.5."""
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    args = pytest.importorskip("compressed_tensors.quantization").QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
    )
    x = torch.tensor([[-3.0, 1.0, 2.0]])
    scale, _ = helpers.calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    assert torch.allclose(scale, torch.tensor([[3.0 / 127.5]]))  # adatsq (and vLLM's kernels): 3 / 127


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"act": 4}, "quantizes activations to 4 bits"),
        ({"group": 48}, "in_features 64 is not a multiple of group_size 48"),
        ({"act": 8, "outliers": {"smooth_alpha": 0.5}}, "stores input transforms (smooth)"),
    ],
)
def test_what_compressed_tensors_cannot_hold_is_refused(make_checkpoint, tmp_path, kwargs, message):
    checkpoint = make_checkpoint(method="rtn" if "outliers" not in kwargs else "gptq", **kwargs)
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(checkpoint, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []


def test_integer_group_scales_are_named_in_what_the_export_loses(make_checkpoint, tmp_path):
    """Their products export bit for bit (CASES above); the record says the two-level grid is gone."""
    checkpoint = make_checkpoint(**CASES["integer-group-scales"])
    export(checkpoint, "compressed-tensors", tmp_path / "ct", None)
    record = json.loads((tmp_path / "ct" / "adatsq_export.json").read_text())
    assert any(line.startswith("integer group scales: stored as their float16") for line in record["loses"])
    export(make_checkpoint(), "compressed-tensors", tmp_path / "plain", None)
    record = json.loads((tmp_path / "plain" / "adatsq_export.json").read_text())
    assert not any(line.startswith("integer group scales") for line in record["loses"])
