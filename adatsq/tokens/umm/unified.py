"""A loaded (quantized) reference UMM as one model: understanding with visual-token reduction + generation.

Understanding runs the decoder variants of the last (clean-image) timestep segment; generation samples
with the timestep-switching layers as calibrated and never reduces generation tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adatsq.errors import TokenReductionError
from adatsq.models.base import ModelAdapter
from adatsq.models.umm.adapter import UMMGenerationAdapter
from adatsq.quant.linear import TimestepQuantLinear
from adatsq.tokens.umm.reduction import Answer, UMMReduction


def with_token_reduction(adapter: ModelAdapter, method: str | None, keep: float) -> UnifiedModel:
    """`adatsq.load(DIR, token_reduction=...)`: only unified models have understanding tokens to reduce."""
    if not isinstance(adapter, UMMGenerationAdapter):
        raise TokenReductionError(
            f"token_reduction={method!r}: {adapter.family!r} models have no understanding tokens to reduce; "
            "it applies to unified multimodal models (family 'umm')"
        )
    return UnifiedModel(adapter, method, keep)


class UnifiedModel:
    """Understanding (optionally with visual-token reduction) and generation of one (quantized) UMM."""

    def __init__(self, adapter: UMMGenerationAdapter, token_reduction: str | None = None, keep: float = 1.0):
        self.adapter = adapter
        self.reduction = UMMReduction(adapter.model)
        self.token_reduction, self.keep = token_reduction, keep
        self._switching = [m for m in adapter.flow.modules() if isinstance(m, TimestepQuantLinear)]

    def answer(
        self, images: Tensor, questions: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> Answer:
        """Answer logits per question type, with the configured reducer on the understanding tokens."""
        for layer in self._switching:
            layer.set_segment(len(layer.segment_bits) - 1)
        return self.reduction.answer(images, questions, self.token_reduction, self.keep, generator)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seed: int = 0, steps: int | None = None) -> Tensor:
        """Images for 'draw <digit> <quadrant>' prompts; generation tokens are never reduced."""
        return self.adapter.generate(list(prompts), seed, steps or self.adapter.steps)
