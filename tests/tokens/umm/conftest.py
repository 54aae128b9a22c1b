"""A tiny reference-UMM configuration shared by the UMM tests (random weights, fast to build)."""

import pytest

from adatsq.models.umm.model import UMMConfig


@pytest.fixture(scope="session")
def tiny_config() -> UMMConfig:
    return UMMConfig(
        stem_channels=8,
        vit_hidden=32,
        vit_layers=1,
        vit_heads=2,
        vit_ffn=64,
        lm_hidden=32,
        lm_layers=4,
        lm_heads=2,
        lm_kv_heads=1,
        lm_ffn=64,
    )
