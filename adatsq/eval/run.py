"""`adatsq eval`: sample the quantized and the float model from the same noise and compare.

Both models run in the same process on the same inputs and seeds, batch by batch, so the wall times
are comparable and the per-sample metrics (PSNR, SSIM) compare like with like.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adatsq.calibrate.record import batches
from adatsq.checkpoint.format import locate
from adatsq.checkpoint.load import cast_for_inference, load_checkpoint
from adatsq.checkpoint.shards import TensorFiles
from adatsq.core.progress import tqdm_disable
from adatsq.errors import CheckpointError
from adatsq.eval.metrics import accuracy, frechet_distance, psnr, ssim
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_for
from adatsq.quant.kernels import KernelPolicy

EVAL_KEYS = (
    "psnr_db", "ssim", "accuracy", "fp_accuracy", "fid", "avg_bits", "checkpoint_bytes", "fp_seconds",
    "quant_seconds",
)  # fmt: skip


def average_bits(config: dict[str, Any]) -> float:
    """Parameter-weighted mean weight bits over quantized layers × timestep segments."""
    total = weighted = 0.0
    for layer in config["layers"].values():
        params = layer["in_features"] * layer["out_features"]
        total += params
        weighted += params * sum(layer["bits"]) / len(layer["bits"])
    return weighted / total


def timed_samples(
    adapter: ModelAdapter,
    inputs: Sequence[Any],
    seed: int,
    num_steps: int,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """Samples of `inputs` (batch i from seed + i, as calibration does) and the sampling wall time."""
    outputs, seconds = [], 0.0
    bar = tqdm(
        batches(inputs, batch_size), desc=desc, unit="batch", leave=False, disable=tqdm_disable(progress)
    )
    with torch.no_grad():
        for i, chunk in enumerate(bar):
            start = time.perf_counter()
            outputs.append(adapter.generate(chunk, seed=seed + i, num_steps=num_steps))
            seconds += time.perf_counter() - start
    return torch.cat(outputs), seconds


def compare_samples(
    samples: torch.Tensor, reference: torch.Tensor, labels: Sequence[Any], family: str
) -> dict[str, float | None]:
    """PSNR/SSIM against the float samples; digit accuracy and feature FID for the reference family."""
    if family == "reference":
        samples, reference = samples.clamp(-1, 1), reference.clamp(-1, 1)
        data_range = 2.0
    else:
        data_range = float(reference.max() - reference.min()) or 1.0
    spatial = samples.dim() == 4  # packed latents (Flux: [B, tokens, C]) have no image layout for SSIM
    flat = (
        (samples, reference)
        if spatial
        else (samples.reshape(len(samples), 1, 1, -1), reference.reshape(len(samples), 1, 1, -1))
    )
    out: dict[str, float | None] = {
        "psnr_db": psnr(*flat, data_range=data_range),
        "ssim": ssim(samples, reference, data_range=data_range) if spatial else None,
        "accuracy": None,
        "fp_accuracy": None,
        "fid": None,
    }
    if family == "reference":
        from adatsq.models.reference.classifier import load_classifier

        classifier = load_classifier()
        target = torch.as_tensor(list(labels))
        with torch.no_grad():
            out["accuracy"] = accuracy(classifier(samples), target)
            out["fp_accuracy"] = accuracy(classifier(reference), target)
            out["fid"] = frechet_distance(classifier.features(samples), classifier.features(reference))
    return out


def evaluate_checkpoint(
    directory: str | Path,
    samples: int = 100,
    seed: int = 1234,
    batch_size: int = 50,
    dtype: str | None = None,
    verify: bool = True,
    progress: bool = True,
    kernel_policy: KernelPolicy | None = None,
) -> dict[str, Any]:
    """The metrics of `adatsq eval` (EVAL_KEYS) for one checkpoint folder.

    Kernel layouts are derived at load (as `adatsq.load` does), not inside the timed sampling. With
    `dtype` ("bfloat16", ...) both models run in it, and two keys follow EVAL_KEYS: `dtype` and
    `bf16_seconds`, the float model's sampling time in bfloat16 (the speed a quantized model should
    beat; fp_seconds itself when dtype is bfloat16). `verify=False` skips the tensors' sha256;
    `progress=False` draws no bar; `kernel_policy` replaces the quantized layers' kernel choices (e.g.
    KernelPolicy(compiled=True), compiled before the timed sampling).
    """
    directory = Path(directory)
    quant, config = load_checkpoint(directory, verify)
    source = config["model"].get("source")
    if not source:
        raise CheckpointError(f"{directory} does not record its float model; re-quantize with this version")
    cast_for_inference(quant, dtype, kernel_policy)
    fp = adapter_for(source, dtype=dtype)
    inputs = fp.default_inputs(samples, seed)
    num_steps = config["num_steps"]
    reference, fp_seconds = timed_samples(fp, inputs, seed, num_steps, batch_size, "float samples", progress)
    quantized, quant_seconds = timed_samples(
        quant, inputs, seed, num_steps, batch_size, "quantized samples", progress
    )
    metrics = compare_samples(quantized.float(), reference.float(), inputs, quant.family)
    out: dict[str, Any] = {
        **metrics,
        "avg_bits": average_bits(config),
        "checkpoint_bytes": TensorFiles(locate(directory).tensors, verify=False).nbytes(),
        "fp_seconds": fp_seconds,
        "quant_seconds": quant_seconds,
    }
    if dtype is not None:
        out["dtype"] = dtype
        if dtype == "bfloat16":
            out["bf16_seconds"] = fp_seconds
        else:
            bf16 = adapter_for(source, dtype="bfloat16")
            out["bf16_seconds"] = timed_samples(
                bf16, inputs, seed, num_steps, batch_size, "bf16 samples", progress
            )[1]
    return out
