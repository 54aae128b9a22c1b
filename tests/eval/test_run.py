"""eval/run.py: `adatsq eval` metrics of tiny quantized (RTN) reference checkpoints."""

import math

import pytest

import adatsq
from adatsq.checkpoint.shards import tensor_files
from adatsq.errors import CheckpointError
from adatsq.eval.run import EVAL_KEYS, evaluate_checkpoint
from adatsq.quant.kernels import KernelPolicy, compiled

KEYS = {"psnr_db", "ssim", "accuracy", "fp_accuracy", "fid", "avg_bits", "checkpoint_bytes", "fp_seconds",
        "quant_seconds"}  # fmt: skip


@pytest.fixture(scope="module")
def metrics(quantized_reference):
    return {
        bits: evaluate_checkpoint(quantized_reference("rtn", bits)[1], samples=8, seed=5, batch_size=8)
        for bits in (3, 8)
    }


def test_returns_exactly_the_nine_keys(metrics):
    assert set(EVAL_KEYS) == KEYS
    for result in metrics.values():
        assert set(result) == KEYS
        assert all(
            isinstance(result[k], float) and math.isfinite(result[k]) for k in KEYS - {"checkpoint_bytes"}
        )


def test_more_bits_are_closer_to_float(metrics, quantized_reference):
    w3, w8 = metrics[3], metrics[8]
    assert w8["psnr_db"] > w3["psnr_db"] + 3, (w8["psnr_db"], w3["psnr_db"])
    assert w8["psnr_db"] > 25 and w8["ssim"] > w3["ssim"] and w8["ssim"] > 0.9
    assert (w3["avg_bits"], w8["avg_bits"]) == (3.0, 8.0)
    assert w8["fid"] < w3["fid"]
    assert w3["fp_accuracy"] == w8["fp_accuracy"]  # the same float samples are the reference of both
    for bits in (3, 8):
        assert metrics[bits]["checkpoint_bytes"] == sum(
            p.stat().st_size for p in tensor_files(quantized_reference("rtn", bits)[1])
        )
    assert w3["checkpoint_bytes"] < w8["checkpoint_bytes"]


def test_dtype_adds_the_dtype_and_bf16_seconds(quantized_reference):
    directory = quantized_reference("rtn", 8)[1]
    bf16 = evaluate_checkpoint(directory, samples=4, seed=5, batch_size=4, dtype="bfloat16")
    assert set(bf16) == KEYS | {"dtype", "bf16_seconds"}
    assert bf16["dtype"] == "bfloat16" and bf16["bf16_seconds"] == bf16["fp_seconds"] > 0
    assert bf16["psnr_db"] > 20  # W8 against the float model, both in bf16
    fp32 = evaluate_checkpoint(directory, samples=4, seed=5, batch_size=4, dtype="float32")
    assert fp32["dtype"] == "float32" and fp32["bf16_seconds"] > 0
    assert fp32["bf16_seconds"] != fp32["fp_seconds"]  # a separate run of the float model in bf16


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not an adatsq checkpoint"):
        evaluate_checkpoint(tmp_path, samples=2)


@pytest.mark.skipif(not compiled.available(), reason="torch.compile needs a C++ compiler")
def test_compiled_kernels_sample_what_the_eager_kernels_sample(make_recipe, tmp_path):
    """W8A8 per channel runs the integer path; compiling its activation quantization changes no sample."""
    recipe = make_recipe("rtn", 8, weight={"bits": 8, "group_size": None, "symmetric": True})
    adatsq.quantize("reference", recipe, progress=False).save(tmp_path / "w8a8")
    runs = [
        evaluate_checkpoint(tmp_path / "w8a8", samples=4, seed=5, batch_size=4, kernel_policy=policy)
        for policy in (None, KernelPolicy(compiled=True))
    ]
    assert runs[0]["psnr_db"] == runs[1]["psnr_db"] and runs[0]["ssim"] == runs[1]["ssim"]
    assert runs[0]["psnr_db"] > 30
