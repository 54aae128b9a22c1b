"""scikit-learn's bundled 8×8 digits as 16×16 images in [-1, 1]: the data of the reference DiT.

The digits ship with scikit-learn, so the reference model and its classifier train offline. 8×8 gives a
DiT only 16 tokens; bilinear upsampling to 16×16 gives 64 tokens at patch 2, closer to real DiT shapes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adatsq.errors import ConfigError

IMAGE_SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2  # held-out share per class; the classifier's accuracy is measured on it
_SPLITS = ("train", "test", "all")


def load_digits_16(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 16, 16] float32 in [-1, 1] and labels [N] int64 of one deterministic split.

    The split is stratified: each class keeps `TEST_FRACTION` of its images (chosen by `seed`) for "test".
    """
    if split not in _SPLITS:
        raise ConfigError(f"unknown digits split {split!r}; allowed: {', '.join(_SPLITS)}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # [N, 1, 8, 8]
    labels = torch.from_numpy(data.target.astype(np.int64))
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(-1.0, 1.0)
    if split == "all":
        return images, labels

    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(data.target == digit)
        chosen = rng.permutation(members)[: round(len(members) * TEST_FRACTION)]
        is_test[chosen] = True
    keep = torch.from_numpy(is_test if split == "test" else ~is_test)
    return images[keep].contiguous(), labels[keep].contiguous()


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to `max_shift` pixels, filling with background (-1).

    Light on purpose: digits are small and centred, larger shifts would teach the model off-centre digits.
    """
    batch = images.shape[0]
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    out = torch.empty_like(images)
    size = images.shape[-1]
    for i in range(batch):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = pad[i, :, dy : dy + size, dx : dx + size]
    return out
