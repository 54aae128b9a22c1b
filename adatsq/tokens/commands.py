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
        if not (seed.isascii() and seed.isdigit() and len(seed) <= 19):
            raise ConfigError(
                f"{spec[:40]!r}: write canvas:SEED with a non-negative integer seed (at most 19 digits), "
                "e.g. canvas:3"
            )
        return torch.from_numpy(sample_canvas(np.random.default_rng(int(seed)), "test").image)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"image {spec!r} not found; pass a {CANVAS}x{CANVAS} PNG / .npy or canvas:SEED")
    if path.suffix == ".npy":
        return torch.from_numpy(_npy_canvas(path))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ConfigError(
            f"image {spec!r} is not a readable image ({type(err).__name__}: {str(err)[:120]}); pass a "
            f"{CANVAS}x{CANVAS} PNG, a .npy array or canvas:SEED"
        ) from err
    return torch.from_numpy(_checked(path, gray * 2 - 1))


def _npy_canvas(path: Path) -> np.ndarray:
    """A [48, 48] real array in [-1, 1] from a .npy file (never unpickled)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # object arrays, bad headers, truncated files
        raise ConfigError(
            f"{path} is not a numeric .npy array ({str(err)[:120]}); save a float [{CANVAS}, {CANVAS}] "
            "array in [-1, 1] with np.save"
        ) from err
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise ConfigError(
            f"{path} holds a {getattr(array, 'dtype', type(array).__name__)} array; allowed: real numbers "
            f"(float / int / bool), [{CANVAS}, {CANVAS}] in [-1, 1]"
        )
    return _checked(path, array.astype(np.float32))


def _checked(path: Path, image: np.ndarray) -> np.ndarray:
    if image.shape != (CANVAS, CANVAS):
        raise ConfigError(
            f"{path} is {'x'.join(map(str, image.shape)) or 'a scalar'}; allowed: a {CANVAS}x{CANVAS} "
            "gray canvas (resize it, or pass canvas:SEED)"
        )
    if not np.isfinite(image).all():
        raise ConfigError(f"{path} holds NaN or infinite values; a canvas is finite, in [-1, 1]")
    return image


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
