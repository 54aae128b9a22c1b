"""`adatsq tokens bench | show`: token reducers on the reference UMM (or a quantized checkpoint of it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from adatsq.errors import ConfigError, TokenReductionError
from adatsq.models.umm.data import CANVAS, sample_canvas
from adatsq.models.umm.model import MiniUMM


def parse_keeps(text: str) -> list[float]:
    try:
        keeps = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--keep {text!r} must be comma-separated ratios, e.g. 0.25,0.5,0.75") from None
    bad = [k for k in keeps if not 0 < k <= 1]
    if bad:
        raise TokenReductionError(f"keep ratios {bad} are outside (0, 1]; use e.g. 0.25,0.5,0.75")
    return keeps


def umm_model(name: str) -> MiniUMM:
    """'umm' (the shipped float model) or a checkpoint folder quantized from it."""
    if name == "umm":
        from adatsq.models.umm.weights import load_umm

        return load_umm()
    from adatsq.checkpoint.load import load_checkpoint

    adapter, config = load_checkpoint(Path(name))
    if config["model"]["family"] != "umm":
        raise TokenReductionError(
            f"{name} holds a {config['model']['family']!r} model; token benchmarks need the unified model "
            "('umm') or a checkpoint quantized from it"
        )
    return adapter.model


def read_image(spec: str) -> torch.Tensor:
    """A [48, 48] canvas in [-1, 1] from 'canvas:SEED' (held-out synthetic), a PNG or a .npy file."""
    if spec.startswith("canvas:"):
        seed = spec.partition(":")[2]
        if not seed.isdigit():
            raise ConfigError(f"{spec!r}: write canvas:SEED with an integer seed, e.g. canvas:3")
        return torch.from_numpy(sample_canvas(np.random.default_rng(int(seed)), "test").image)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"image {spec!r} not found; pass a {CANVAS}x{CANVAS} PNG / .npy or canvas:SEED")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    from PIL import Image

    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(gray * 2 - 1)


def run_bench(model: str, methods: str, keeps: str, samples: int, seed: int, out: Path | None) -> str:
    from adatsq.tokens.umm.bench import bench

    result = bench(methods.split(","), parse_keeps(keeps), samples, seed, model=umm_model(model))
    text = json.dumps(result, indent=2)
    if out is not None:
        from adatsq.core.io import atomic_write_text

        atomic_write_text(out, text + "\n")
    return text


def run_show(image: str, method: str, keep: float, out: Path, model: str) -> str:
    from adatsq.tokens.umm.bench import token_map

    parse_keeps(str(keep))
    token_map(read_image(image), method, keep, out, model=umm_model(model))
    return f"wrote {out}"
