"""Save / load the reference UMM: `model.safetensors` (fp16 by default) + `config.json`, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adatsq.core.io import atomic_write, write_json
from adatsq.errors import CheckpointError
from adatsq.models.umm.model import MiniUMM, UMMConfig

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "umm"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_umm(
    model: MiniUMM, directory: Path, dtype: torch.dtype = torch.float16, extra: dict | None = None
) -> None:
    """Weights (cast to `dtype`) + config (+ `extra` metadata such as training metrics) into `directory`."""
    directory = Path(directory)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    meta = {"config": model.config.to_dict(), **(extra or {})}
    write_json(directory / CONFIG, meta)


def load_umm(directory: Path | None = None) -> MiniUMM:
    """The trained reference UMM (shipped under adatsq/assets/umm by default), float32, eval mode."""
    directory = ASSET_DIR if directory is None else Path(directory)
    weights, config = directory / WEIGHTS, directory / CONFIG
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(
            f"no reference UMM in {directory} (need {WEIGHTS} and {CONFIG}); train one with "
            f"`python tools/train_umm.py`"
        )
    try:
        meta = json.loads(config.read_text())
        model = MiniUMM(UMMConfig.from_dict(meta["config"]))
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read reference UMM from {directory}: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"UMM weights in {weights} do not match its config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; retrain with `python tools/train_umm.py`"
        )
    return model.eval()
