"""Adapter of the shipped reference DiT (`adatsq quantize reference ...`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adatsq.models.base import (
    ADAPTERS,
    ModelAdapter,
    StepCallback,
    parse_class_labels,
    read_base_json,
    write_base_json,
)
from adatsq.models.reference.digits import NUM_CLASSES
from adatsq.models.reference.model import (
    REFERENCE_CONFIG,
    DigitsPipeline,
    ReferenceSampling,
    build_scheduler,
    build_transformer,
    initial_noise,
    reference_pipeline,
    sample,
)

BASE_FILE = "reference_base.json"


@ADAPTERS.register("reference")
class ReferenceAdapter(ModelAdapter):
    """Class labels in, 16×16 digit images out; sampled by the project's own loop (gradients allowed)."""

    family = "reference"
    denoiser_folder = "transformer"  # a DiTTransformer2DModel: loadable with its from_pretrained

    def __init__(
        self, pipeline: DigitsPipeline | None = None, sampling: ReferenceSampling | None = None
    ) -> None:
        self.pipeline = pipeline if pipeline is not None else reference_pipeline()
        self.sampling = sampling or ReferenceSampling()

    @classmethod
    def open(cls, model: Any, dtype: torch.dtype | None, device: str | None) -> ReferenceAdapter | None:
        """'reference' (the shipped weights, placed on `device` in `dtype`) or a DigitsPipeline."""
        if isinstance(model, DigitsPipeline):
            return cls(model)
        if isinstance(model, (str, Path)) and str(model) == "reference":
            adapter = cls(reference_pipeline().to(device=device, dtype=dtype))
            adapter.source = "reference"
            return adapter
        return None

    def denoiser(self) -> nn.Module:
        return self.pipeline.transformer

    def user_model(self) -> DigitsPipeline:
        return self.pipeline

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        return float(torch.as_tensor(timestep).reshape(-1)[0])

    def step_timesteps(self, num_steps: int) -> list[float]:
        scheduler = build_scheduler()
        scheduler.set_timesteps(num_steps)
        return [float(t) for t in scheduler.timesteps]

    def default_inputs(self, count: int, seed: int) -> list[int]:
        """Balanced class labels (every digit equally often), shuffled by `seed`."""
        labels = torch.arange(count) % NUM_CLASSES
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        return labels[order].tolist()

    def parse_inputs(self, lines: list[str]) -> list[int]:
        return parse_class_labels(lines, NUM_CLASSES, "the reference model")

    def generate(
        self,
        inputs: Sequence[int],
        seed: int,
        num_steps: int,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        transformer = self.pipeline.transformer
        latents = initial_noise(len(inputs), seed).to(device=transformer.device, dtype=transformer.dtype)
        return sample(
            self.pipeline.transformer,
            build_scheduler(),
            list(inputs),
            latents,
            num_steps,
            self.sampling.guidance_scale,
            step_callback,
        )

    def save_base(self, directory: Path, link_components: bool = False) -> None:
        if link_components:
            self.check_linkable()  # nothing to link: refused
        transformer = {k: v for k, v in self.pipeline.transformer.config.items() if k in REFERENCE_CONFIG}
        config = {
            "transformer": transformer,
            "guidance_scale": self.sampling.guidance_scale,
            "num_steps": self.sampling.num_steps,
        }
        write_base_json(directory, BASE_FILE, config)

    @classmethod
    def load_base(cls, directory: Path) -> ReferenceAdapter:
        config = read_base_json(directory, BASE_FILE)
        transformer = build_transformer(config["transformer"])
        pipeline = DigitsPipeline(transformer=transformer.eval(), scheduler=build_scheduler())
        return cls(pipeline, ReferenceSampling(config["num_steps"], config["guidance_scale"]))
