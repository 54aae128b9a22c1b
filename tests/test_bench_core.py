"""tools/bench_core.py: size-bound terms against a real checkpoint of a tiny model; full run is slow."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adatsq.checkpoint.format import WEIGHTS
from adatsq.engine.uniform import quantize
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import DigitsPipeline, build_scheduler, build_transformer
from adatsq.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("bench_core", ROOT / "tools" / "bench_core.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def tiny_adapter() -> ReferenceAdapter:
    torch.manual_seed(0)
    transformer = build_transformer({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8})
    return ReferenceAdapter(DigitsPipeline(transformer.eval(), build_scheduler()))


@pytest.mark.parametrize(("bits", "group_size"), [(4, 8), (8, None), (3, 16)])
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
    parts = bench.checkpoint_breakdown(tmp_path / "ckpt" / WEIGHTS, set(qmodel.layers))

    linears = [m for n, m in float_denoiser.named_modules() if n in qmodel.layers]
    assert size["quantized_layers"] == len(linears) > 0
    assert size["quantized_params"] == sum(m.weight.numel() for m in linears)
    # every in_features of the tiny model is a multiple of 8 / bits, so packing adds no padding
    assert parts["qweight"] == size["packed_weight_bytes"] == size["quantized_params"] * bits / 8
    assert parts["scales"] + parts["zeros"] == size["scales_zeros_bytes"]
    assert parts["other"] + parts["quantized_layer_bias"] == size["unquantized_bytes"]
    assert 0 < parts["header"] < 64 * 1024
    assert size["fp32_bytes"] == 4 * sum(p.numel() for p in float_denoiser.parameters())
    expected = 1.05 * (size["packed_weight_bytes"] + size["scales_zeros_bytes"]) + size["unquantized_bytes"]
    assert size["bound_bytes"] == pytest.approx(expected)


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
