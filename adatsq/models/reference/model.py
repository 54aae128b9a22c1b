"""The project's reference model: a class-conditional diffusers DiT on 16×16 digits, sampled by flow matching.

Every quantization benchmark runs on it, so it is built from the real `diffusers.DiTTransformer2DModel`
(the Linear layers, adaLN-Zero modulation and label embedding a quantizer meets in the wild) and sampled
with the real `FlowMatchEulerDiscreteScheduler`. Weights ship in `adatsq/assets/`, trained by
`tools/train_reference.py` on scikit-learn's digits (see reports/reference.md).

Conventions (rectified flow, as in SD3 / Flux): x_sigma = (1 - sigma) · x0 + sigma · noise, the
transformer predicts the velocity noise - x0 at timestep sigma · 1000, and the Euler scheduler steps
sigma from 1 to 0. Class id `NULL_CLASS` (= `num_embeds_ada_norm`, the extra row the DiT label
embedding reserves for its dropout) is the unconditional class of classifier-free guidance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from safetensors.torch import load_file

from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.base import StepCallback
from adatsq.models.reference.digits import IMAGE_SIZE, NUM_CLASSES

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WEIGHTS_FILE = ASSETS / "reference_dit.safetensors"
META_FILE = ASSETS / "reference_dit.json"

NULL_CLASS = NUM_CLASSES  # LabelEmbedding maps dropped labels to id num_classes (its table has one extra row)
TIMESTEP_SCALE = 1000.0  # the scheduler's num_train_timesteps: transformer timestep = sigma * 1000

# 6 blocks × (adaLN, q, k, v, out, 2 FFN, 2 timestep-MLP) + 2 output linears = 56 nn.Linear, 2.12M params.
REFERENCE_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,  # velocity only: no learned sigma channel (DiTPipeline's 2× convention does not apply)
    "num_layers": 6,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,  # 8×8 = 64 tokens
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
    "dropout": 0.0,
}
_FIXED = {
    "in_channels": 1,
    "out_channels": 1,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}


@dataclass(frozen=True)
class ReferenceSampling:
    """Default sampler settings. Guidance 1.5 is the measured best at 20 steps: every sample is classified
    as its class (0.98 at 1.0) while the feature FD stays near the real-data floor (it doubles at 2.0)."""

    num_steps: int = 20
    guidance_scale: float = 1.5

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"num_steps={self.num_steps} must be >= 1; use e.g. 20")
        if self.guidance_scale < 1.0:
            raise ConfigError(
                f"guidance_scale={self.guidance_scale} must be >= 1 (1 disables classifier-free guidance)"
            )


def build_transformer(config: dict[str, Any] | None = None) -> DiTTransformer2DModel:
    """A randomly initialised reference DiT; `config` overrides keys of `REFERENCE_CONFIG` (tiny tests)."""
    merged = dict(REFERENCE_CONFIG)
    for key, value in (config or {}).items():
        if key not in REFERENCE_CONFIG:
            raise ConfigError(
                f"unknown reference DiT key {key!r}; allowed: {', '.join(sorted(REFERENCE_CONFIG))}"
            )
        if key in _FIXED and value != _FIXED[key]:
            raise ConfigError(f"reference DiT key {key!r} must stay {_FIXED[key]!r} (got {value!r})")
        merged[key] = value
    _check_size(merged)
    return DiTTransformer2DModel(**merged)


MAX_PARAMS = 10**8  # the reference DiT has 1.2M; a config far beyond it is damage, not a model to build
_SIZES = ("num_attention_heads", "attention_head_dim", "num_layers", "sample_size", "patch_size")


def _check_size(config: dict[str, Any]) -> None:
    """Positive int sizes and a model that fits (before anything is allocated: a corrupt config must not
    exhaust memory)."""
    for key in _SIZES:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"reference DiT key {key!r} must be a positive int, got {value!r}")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    params = 12 * config["num_layers"] * width * width  # attention + MLP + adaLN per block, roughly
    if params > MAX_PARAMS:
        raise ConfigError(
            f"reference DiT config {_short(config)} would build about {params:.3g} parameters "
            f"(the reference model has 1.2M; limit {MAX_PARAMS:.0e}); fix num_layers / num_attention_heads "
            "/ attention_head_dim"
        )


def _short(config: dict[str, Any]) -> str:
    text = repr({k: config[k] for k in _SIZES})
    return text if len(text) <= 160 else text[:157] + "..."


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The Euler flow-matching scheduler with the training convention (1000 train steps, no shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(TIMESTEP_SCALE), shift=1.0)


def reference_metadata() -> dict[str, Any]:
    """The shipped JSON: {"config", "training", "sampling", ...} written by tools/train_reference.py."""
    if not META_FILE.is_file():
        raise CheckpointError(f"missing {META_FILE}; regenerate it with `python tools/train_reference.py`")
    return json.loads(META_FILE.read_text())


def load_reference_transformer() -> DiTTransformer2DModel:
    """The shipped trained reference DiT (EMA weights), in eval mode."""
    meta = reference_metadata()
    if not WEIGHTS_FILE.is_file():
        raise CheckpointError(f"missing {WEIGHTS_FILE}; regenerate it with `python tools/train_reference.py`")
    model = build_transformer(meta["config"])
    missing, unexpected = model.load_state_dict(load_file(str(WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{WEIGHTS_FILE} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "regenerate both files with `python tools/train_reference.py`"
        )
    return model.eval()


def initial_noise(batch: int, seed: int) -> torch.Tensor:
    """Deterministic starting noise [batch, 1, 16, 16] (CPU generator, so equal on every machine)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def _labels_tensor(class_labels: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > NULL_CLASS):
        raise ConfigError(
            f"class labels must lie in 0..{NUM_CLASSES - 1} (or {NULL_CLASS} = unconditional); got "
            f"{labels.tolist()}"
        )
    return labels


def sample(
    transformer: DiTTransformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    class_labels: Sequence[int] | torch.Tensor,
    latents: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """The sampling loop, with autograd left as the caller has it (Fisher weights need its gradients).

    Each step calls the transformer once: on [cond; uncond] concatenated when guidance_scale > 1, else on
    the conditional batch only. `step_callback(step_index, latents)` runs after each scheduler step and may
    return replacement latents. Returns the final latents (not clamped).
    """
    ReferenceSampling(num_steps, guidance_scale)  # validates
    labels = _labels_tensor(class_labels, latents.device)
    if labels.shape[0] != latents.shape[0]:
        raise ConfigError(f"{labels.shape[0]} class labels for a batch of {latents.shape[0]} latents")
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    scheduler.set_timesteps(num_steps, device=latents.device)
    for step_index, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        timestep = t.to(latents.dtype).expand(model_input.shape[0])
        velocity = transformer(model_input, timestep=timestep, class_labels=labels, return_dict=False)[0]
        if use_cfg:
            cond, uncond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if step_callback is not None:
            replaced = step_callback(step_index, latents)
            if replaced is not None:
                latents = replaced
    return latents


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digit generation in diffusers' pipeline shape (save_pretrained / from_pretrained).

    Load a saved folder with `DigitsPipeline.from_pretrained(dir)` (or `from_folder`): called on this class,
    diffusers uses it directly instead of looking the class name up in its own registry.
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]  # noqa: RUF012 (diffusers' convention)

    def __init__(
        self, transformer: DiTTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @classmethod
    def from_folder(cls, directory: str | Path) -> DigitsPipeline:
        """Offline load of a folder written by `save_pretrained`."""
        return cls.from_pretrained(str(directory), local_files_only=True)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = ReferenceSampling.num_steps,
        guidance_scale: float = ReferenceSampling.guidance_scale,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[torch.Tensor]:
        """Images [B, 1, 16, 16] in [-1, 1] (output_type "pt") or [B, 16, 16, 1] in [0, 1] ("np")."""
        if output_type not in ("pt", "np"):
            raise ConfigError(f"output_type={output_type!r}; allowed: 'pt', 'np'")
        device = self._execution_device
        labels = _labels_tensor(class_labels, device)
        if latents is None:
            shape = (labels.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        latents = latents.to(device=device, dtype=self.transformer.dtype)

        step_callback = None
        if callback_on_step_end is not None:
            timesteps: list[torch.Tensor] = []

            def step_callback(step_index: int, current: torch.Tensor) -> torch.Tensor | None:
                if not timesteps:
                    timesteps.extend(self.scheduler.timesteps)
                out = callback_on_step_end(self, step_index, timesteps[step_index], {"latents": current})
                return (out or {}).get("latents")

        images = sample(
            self.transformer,
            self.scheduler,
            labels,
            latents,
            num_inference_steps,
            guidance_scale,
            step_callback,
        ).clamp(-1.0, 1.0)
        self.maybe_free_model_hooks()
        if output_type == "np":
            images = ((images + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def reference_pipeline() -> DigitsPipeline:
    """The shipped reference DiT with the default scheduler, ready to sample."""
    return DigitsPipeline(transformer=load_reference_transformer(), scheduler=build_scheduler())
