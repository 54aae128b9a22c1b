"""checkpoint/inspect.py: `adatsq inspect` on a checkpoint, a plan.json and a float model."""

import json
import re
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adatsq.calibrate.segments import split_steps
from adatsq.checkpoint.inspect import inspect_path, layer_kernel
from adatsq.errors import CheckpointError
from adatsq.models.reference.model import load_reference_transformer
from adatsq.plan.schema import Budget, Plan, save_plan
from adatsq.quant.kernels import onednn


def rows_of(text):
    """Table rows (split on 2+ spaces) between the dashed rule and the summary line."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    return [re.split(r"\s{2,}", line.strip()) for line in lines[rule + 1 : -1]], lines[-1]


# format 2: the reference DiT is the checkpoint's transformer/ component
CONFIG, WEIGHTS = "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"


def test_checkpoint_table_bytes_add_up_to_the_file(quantized_reference):
    _, directory = quantized_reference("gptq", 4)
    config = json.loads((directory / CONFIG).read_text())["quantization_config"]
    rows, summary = rows_of(inspect_path(directory))
    assert [r[0] for r in rows] == list(config["layers"])
    data = (directory / WEIGHTS).read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    file_tensor_bytes = len(data) - 8 - header  # safetensors: u64 header length, JSON header, raw tensors
    tensors = load_file(str(directory / WEIGHTS))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == file_tensor_bytes
    for name, bits, group, scheme, kernel, nbytes in rows:
        layer = config["layers"][name]
        out, inp = layer["out_features"], layer["in_features"]
        groups = -(-inp // 32)
        # packed 4-bit codes + float16 scales + uint8 zeros + float32 bias
        assert int(nbytes) == out * (-(-inp * 4 // 8)) + out * groups * 2 + out * groups + out * 4, name
        assert (bits, group, scheme) == ("4", "32", "asym W4 A8")
        assert kernel == "dequant-cached+fake-a8"  # group-wise A8: no per-group int8 matmul
    quantized = sum(int(r[5]) for r in rows)
    rest = file_tensor_bytes - quantized
    assert summary.startswith("gptq checkpoint of 'reference': 42 quantized layers, 1 timestep segment(s)")
    assert f"{quantized} bytes in quantized layers, {rest} in the rest, {file_tensor_bytes} total" in summary
    assert rest > 0  # the default ignore keeps embedders and the output projection in float


def test_kernel_column_per_variant_and_a4_simulated():
    per_channel = {"bits": [8, 4, 4], "group_size": None, "in_features": 64}
    cached = "int8-onednn" if onednn.available() else "int8-cached"  # what this CPU runs
    assert layer_kernel(per_channel, 8) == f"w4: int8-unpack-per-call, w8: {cached}"
    assert layer_kernel({**per_channel, "bits": [8]}, 8) == cached
    grouped = {"bits": [4], "group_size": 32, "in_features": 64}
    assert layer_kernel(grouped, None) == "dequant-cached"
    assert layer_kernel(grouped, 4) == "dequant-cached+fake-a4 (A4 simulated)"
    assert layer_kernel(per_channel, 4).endswith("(A4 simulated)")


def test_plan_file(tmp_path):
    plan = Plan(
        layers={"blocks.0.attn.to_q": (8, 4, 3), "blocks.0.ff.net.2": (4, 4, 4)},
        segments=split_steps(6, 3),
        num_steps=6,
        act_bits=8,
        candidates=(3, 4, 8),
        fisher_weights=[0.5, 0.3, 0.2],
        model={"family": "reference", "fingerprint": "feedbeef"},
        budget=Budget("avg_bits", 4.5),
        metrics={"avg_bits": 4.25},
    )
    text = inspect_path(save_plan(plan, tmp_path / "plan.json"))
    rows, _ = rows_of(text.rsplit("\n", 1)[0])  # the plan summary spans two lines
    assert rows == [["blocks.0.attn.to_q", "8 4 3", "3,4,8"], ["blocks.0.ff.net.2", "4 4 4", "4"]]
    assert "3 segments" in text and "over 6 steps" in text and "avg_bits <= 4.5" in text
    assert "avg_bits=4.25" in text and "(feedbeef)" in text


def test_float_reference_model_lists_every_linear():
    text = inspect_path(Path("reference"))
    rows, summary = rows_of(text)
    model = load_reference_transformer()
    linears = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear"}
    assert [r[0] for r in rows] == list(linears)
    for row in rows:
        m = linears[row[0]]
        assert row[1:3] == [f"{m.out_features}x{m.in_features}", str(m.in_features * m.out_features)]
    total = sum(m.in_features * m.out_features for m in linears.values())
    assert summary == f"{len(linears)} Linear layers, {total} weights (reference)"
    assert any(len(r) == 4 and r[3] == "default ignore" for r in rows)


def test_anything_else_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        inspect_path(tmp_path / "notes.txt")
