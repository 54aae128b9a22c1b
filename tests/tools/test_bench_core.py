"""tools/bench_core.py: size-bound terms against a real checkpoint of a tiny model; full run is slow."""

import json
import subprocess
import sys
from pathlib import Path

import bench_core as bench
import pytest
import torch

from adatsq.checkpoint.shards import tensor_files
from adatsq.engine.uniform import quantize
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import DigitsPipeline, build_scheduler, build_transformer
from adatsq.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]


def tiny_adapter() -> ReferenceAdapter:
    torch.manual_seed(0)
    transformer = build_transformer({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8})
    return ReferenceAdapter(DigitsPipeline(transformer.eval(), build_scheduler()))


# The tiny DiT's 9 quantized Linear layers (proj_out ignored), (in, out): (256, 16), (16, 16),
# (16, 96), 4 × (16, 16) in attention, (16, 64), (64, 16): 8,960 weights; 10,100 parameters in all, so
# 1,140 stay fp32 (4,560 bytes). Scales (fp16) + zeros (uint8) = 3 bytes per (out, group): groups of 8
# give 16·32 + 16·2 + 96·2 + 4·16·2 + 64·2 + 16·8 = 1,120 of them, groups of 16 give 560, per-channel
# 272 (the out_features). Bound = 1.05 × (packed + scales/zeros) + 4,560.
KNOWN = {  # (bits, group) -> (packed bytes, scales + zeros bytes, bound bytes)
    (4, 8): (4480, 3360, 1.05 * (4480 + 3360) + 4560),  # 12,792
    (8, None): (8960, 816, 1.05 * (8960 + 816) + 4560),  # 14,824.8
    (3, 16): (3360, 1680, 1.05 * (3360 + 1680) + 4560),  # 9,852
}


@pytest.mark.parametrize(("bits", "group_size"), list(KNOWN))
def test_bound_terms_match_the_stored_tensors(tmp_path, bits, group_size):
    adapter = tiny_adapter()
    float_adapter = tiny_adapter()
    float_denoiser = float_adapter.denoiser()
    recipe = recipe_from_dict(
        {
            "method": "rtn",
            "weight": {"bits": bits, "group_size": group_size, "symmetric": False},
            "ignore": ["proj_out"],
        }
    )
    qmodel = quantize(adapter, recipe, progress=False)
    qmodel.save(tmp_path / "ckpt")
    size = bench.size_bound(float_adapter, recipe)
    parts = bench.checkpoint_breakdown(tensor_files(tmp_path / "ckpt")[0], set(qmodel.layers))

    packed, scales_zeros, bound = KNOWN[(bits, group_size)]
    assert len(qmodel.layers) == size["quantized_layers"] == 9
    assert size["quantized_params"] == 8960
    assert size["params"] == 10100 == sum(p.numel() for p in float_denoiser.parameters())
    # every in_features of the tiny model is a multiple of 8 / bits, so packing adds no padding
    assert parts["qweight"] == size["packed_weight_bytes"] == packed
    assert parts["scales"] + parts["zeros"] == size["scales_zeros_bytes"] == scales_zeros
    assert parts["other"] + parts["quantized_layer_bias"] == size["unquantized_bytes"] == 4560
    assert 0 < parts["header"] < 64 * 1024
    assert size["fp32_bytes"] == 40400
    assert size["bound_bytes"] == pytest.approx(bound)


def test_reference_gptq_transcription_tracks_adatsq():
    W, H = bench.random_problem(seed=0, out=16, cols=64, tokens=256)
    scheme = bench.WeightScheme(bits=4, group_size=32, symmetric=False)
    ours = bench.gptq(W, H, scheme, act_order=True).loss
    theirs = bench.quant_error(W, bench.reference_gptq(W, H, scheme, act_order=True), H)
    rtn_loss = bench.quant_error(W, bench.rtn(W, scheme).dequantize(), H)
    assert ours < rtn_loss and theirs < rtn_loss
    assert ours == pytest.approx(theirs, rel=0.1)


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench_core.py"),
        "--out",
        str(tmp_path),
        "--work",
        str(tmp_path / "w"),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((tmp_path / "core.json").read_text())
    assert set(report["recipes"]) == set(bench.RECIPES)
    assert all(row["gptq_plain_deterministic"] and row["gptq_act_order_deterministic"]
               for row in report["gptq_random"]["rows"])  # fmt: skip
    assert (tmp_path / "core.md").read_text().startswith("# Quantization core benchmark")
