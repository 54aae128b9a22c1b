"""The reference UMM as a quantization target: its generation path is the denoiser AdaTSQ quantizes.

The UMM has one decoder for understanding and generation (no separate generation experts), so the
quantized decoder layers serve both; `adatsq.tokens.umm.unified` adds understanding with visual-token
reduction on top of a loaded adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adatsq.errors import ConfigError
from adatsq.models.base import ADAPTERS, ModelAdapter, StepCallback, read_base_json, write_base_json
from adatsq.models.umm.data import QUADRANTS, VOCAB, gen_prompt, tokenize
from adatsq.models.umm.model import MiniUMM, UMMConfig
from adatsq.models.umm.weights import load_umm

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

    @classmethod
    def open(cls, model: Any, dtype: torch.dtype | None, device: str | None) -> UMMGenerationAdapter | None:
        """'umm': the shipped reference unified model (float32 on the CPU)."""
        if isinstance(model, (str, Path)) and str(model) == "umm":
            adapter = cls()
            adapter.source = "umm"
            return adapter
        return None

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
        prompts = torch.tensor([tokenize(text) for text in inputs])
        null_prompts = torch.tensor([tokenize(NULL_PROMPT)] * len(inputs))
        return self.model.sample_flow(
            prompts, null_prompts, num_steps, self.guidance, seed, self.flow, step_callback
        )

    def save_base(self, directory: Path, link_components: bool = False) -> None:
        if link_components:
            self.check_linkable()  # nothing to link: refused
        base = {"config": self.model.config.to_dict(), "steps": self.steps, "guidance": self.guidance}
        write_base_json(directory, BASE_FILE, base)

    @classmethod
    def load_base(cls, directory: Path) -> UMMGenerationAdapter:
        base = read_base_json(directory, BASE_FILE)
        return cls(MiniUMM(UMMConfig.from_dict(base["config"])), base["steps"], base["guidance"])
