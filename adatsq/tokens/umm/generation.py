"""The reference UMM as a quantization target: its generation path is the denoiser AdaTSQ quantizes.

The UMM has one decoder for understanding and generation (no separate generation experts), so the
quantized decoder layers serve both; `adatsq.load(DIR, token_reduction="g2tr", keep=0.5)` then gives a
`UnifiedModel` whose understanding path reduces visual tokens while generation keeps every latent token.
Understanding runs the decoder variants of the last (clean-image) timestep segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adatsq.errors import ConfigError
from adatsq.models.base import ADAPTERS, ModelAdapter, StepCallback, read_base_json, write_base_json
from adatsq.quant.linear import TimestepQuantLinear
from adatsq.tokens.umm.adapter import Answer, UMMReduction
from adatsq.tokens.umm.data import QUADRANTS, VOCAB, gen_prompt, tokenize
from adatsq.tokens.umm.model import MiniUMM, UMMConfig
from adatsq.tokens.umm.weights import load_umm

BASE_FILE = "umm_base.json"
NULL_PROMPT = gen_prompt(None, None)


class FlowDenoiser(nn.Module):
    """One call per sampler step: velocity of every latent token given the prompt and the timestep."""

    def __init__(self, model: MiniUMM) -> None:
        super().__init__()
        self.model = model

    def forward(self, prompt_ids: Tensor, latents: Tensor, timestep: Tensor) -> Tensor:
        return self.model.predict_velocity(prompt_ids, self.model.latent_tokens(latents, timestep))


@ADAPTERS.register("umm")
class UMMGenerationAdapter(ModelAdapter):
    """Text-to-image sampling of the reference UMM (Euler rectified flow with classifier-free guidance)."""

    family = "umm"

    def __init__(self, model: MiniUMM | None = None, steps: int = 25, guidance: float = 3.0) -> None:
        self.flow = FlowDenoiser((model or load_umm()).eval())
        self.steps, self.guidance = steps, guidance

    @property
    def model(self) -> MiniUMM:
        return self.flow.model

    def denoiser(self) -> nn.Module:
        return self.flow

    def default_ignore(self) -> list[str]:
        """Only the decoder's Linear layers run the denoising loop: everything else stays float."""
        return [r"^model\.(?!lm\.model\.layers\.)"]

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[2]
        return float(timestep.reshape(-1)[0])

    def step_timesteps(self, num_steps: int) -> list[float]:
        return [1 - i / num_steps for i in range(num_steps)]

    def default_inputs(self, count: int, seed: int) -> list[str]:
        """Balanced 'draw <digit> <quadrant>' prompts, shuffled by `seed`."""
        prompts = [gen_prompt(i % 10, QUADRANTS[(i // 10 + i) % 4]) for i in range(count)]
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        return [prompts[i] for i in order]

    def parse_inputs(self, lines: list[str]) -> list[str]:
        for i, line in enumerate(lines, 1):
            unknown = [w for w in line.split() if w not in VOCAB]
            if unknown or len(line.split()) != 3:
                raise ConfigError(
                    f"calibration line {i}: {line!r} is not a UMM prompt; write 'draw <digit> <quadrant>' "
                    f"with a quadrant from {', '.join(QUADRANTS)} or 'anywhere'"
                )
        return lines

    def generate(
        self,
        inputs: Sequence[str],
        seed: int,
        num_steps: int,
        step_callback: StepCallback | None = None,
    ) -> Tensor:
        """Images [B, 1, H, W] in [-1, 1]; gradients flow when enabled (Fisher weights use them)."""
        model = self.model
        c = model.config
        prompts = torch.tensor([tokenize(text) for text in inputs])
        both = torch.cat([prompts, torch.tensor([tokenize(NULL_PROMPT)] * len(inputs))])
        x = torch.randn(
            len(inputs), c.gen_grid**2, c.gen_token_dim, generator=torch.Generator().manual_seed(seed)
        )
        for i, t0 in enumerate(self.step_timesteps(num_steps)):
            t1 = 1 - (i + 1) / num_steps
            v_cond, v_null = self.flow(both, torch.cat([x, x]), torch.full((2 * len(inputs),), t0)).chunk(2)
            x = x + (t1 - t0) * (v_null + self.guidance * (v_cond - v_null))
            if step_callback is not None:
                replaced = step_callback(i, x)
                x = x if replaced is None else replaced
        return model.decode_latents(model.unpatchify(x))

    def save_base(self, directory: Path) -> None:
        base = {"config": self.model.config.to_dict(), "steps": self.steps, "guidance": self.guidance}
        write_base_json(directory, BASE_FILE, base)

    @classmethod
    def load_base(cls, directory: Path) -> UMMGenerationAdapter:
        base = read_base_json(directory, BASE_FILE)
        return cls(MiniUMM(UMMConfig.from_dict(base["config"])), base["steps"], base["guidance"])

    def user_model(self) -> UnifiedModel:
        return UnifiedModel(self)

    def with_token_reduction(self, method: str, keep: float) -> UnifiedModel:
        return UnifiedModel(self, method, keep)


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
