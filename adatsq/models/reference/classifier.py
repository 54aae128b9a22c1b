"""A small CNN digit classifier on 16×16 [-1, 1] images: class accuracy and FID features of samples.

Trained by `tools/train_classifier.py` on the train split of `load_digits_16`; weights ship in
`adatsq/assets/digit_classifier.{safetensors,json}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from adatsq.errors import CheckpointError
from adatsq.models.reference.digits import IMAGE_SIZE, NUM_CLASSES

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WEIGHTS_FILE = ASSETS / "digit_classifier.safetensors"
META_FILE = ASSETS / "digit_classifier.json"


class DigitClassifier(nn.Module):
    """conv-pool ×2 → linear features (`features`, the FID embedding) → linear logits."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"channels": list(channels), "feature_dim": feature_dim}
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 → 8
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 → 4
        )
        self.fc = nn.Linear(c2 * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim] (after ReLU) of images [B, 1, 16, 16]."""
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier() -> DigitClassifier:
    """The shipped trained classifier, in eval mode."""
    if not (WEIGHTS_FILE.is_file() and META_FILE.is_file()):
        raise CheckpointError(f"missing {WEIGHTS_FILE} or its .json; run `python tools/train_classifier.py`")
    config = json.loads(META_FILE.read_text())["config"]
    model = DigitClassifier(tuple(config["channels"]), config["feature_dim"])
    try:
        model.load_state_dict(load_file(str(WEIGHTS_FILE)))
    except RuntimeError as err:
        raise CheckpointError(
            f"{WEIGHTS_FILE} does not match its config ({err}); rerun train_classifier.py"
        ) from err
    return model.eval()
