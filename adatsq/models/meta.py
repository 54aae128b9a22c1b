"""Build a diffusers denoiser on the meta device from a folder's config alone: no weight is read.

A *config-only* folder (the published `model_index.json` + `transformer/config.json`, as in the repo's
`configs/`) is enough to count parameters, list Linear layers and their shapes, and plan memory for a
12B model in well under a second. Normal pipeline folders work too: their weight files are never opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
from accelerate import init_empty_weights
from torch import nn

from adatsq.errors import ConfigError
from adatsq.models.diffusers.config import read_settings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass(frozen=True)
class MetaDenoiser:
    """A denoiser built on the meta device and where its config came from."""

    module: nn.Module  # every parameter and buffer on the meta device: shapes only, it cannot run
    config: dict[str, Any]  # the transformer's config.json as read
    class_name: str  # e.g. FluxTransformer2DModel
    pipeline_class: str | None  # the pipeline's _class_name when the folder has a model_index.json
    config_only: bool  # no weight file beside the transformer's config


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"cannot read {path}: {err}; restore the file from the model's Hub page") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def transformer_config_path(folder: str | Path) -> tuple[Path, str | None]:
    """(the transformer's config.json, the pipeline class or None) of a pipeline or transformer folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model folder {str(folder)!r} does not exist; pass a local diffusers folder")
    if (folder / "model_index.json").is_file():
        index = _read(folder / "model_index.json")
        if "transformer" not in index:
            raise ConfigError(
                f"{folder}/model_index.json lists no transformer; pass a DiT pipeline (Flux, SD3, PixArt, "
                "DiT, Wan, Z-Image, QwenImage)"
            )
        path = folder / "transformer" / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing; a config-only pipeline folder needs model_index.json and "
                "transformer/config.json (copy it from the model's Hub page)"
            )
        name = index.get("_class_name")
        # by name: importing a pipeline class imports its text encoders' libraries (seconds, and warnings)
        if not (isinstance(name, str) and name.endswith("Pipeline") and name in dir(diffusers)):
            raise ConfigError(
                f"{folder}/model_index.json names pipeline class {name!r}, which is not a diffusers "
                f"{diffusers.__version__} pipeline; fix _class_name (e.g. FluxPipeline) or upgrade diffusers"
            )
        read_settings(folder)  # adatsq_pipeline.json, if any, is read by quantize: refuse a bad one now
        return path, name
    if (folder / "config.json").is_file():
        return folder / "config.json", None
    raise ConfigError(
        f"{folder} is not a diffusers folder (no model_index.json or config.json); pass a pipeline folder "
        "or its transformer/ subfolder, e.g. configs/flux.1-dev"
    )


def _check_sizes(path: Path, config: dict[str, Any]) -> None:
    """Counts and widths (num_*, *_dim, *_size, *_channels, *_layers) are ints >= 0: diffusers builds a
    model with `num_layers: -1` without complaint (no blocks), and every estimate of it is wrong."""
    for key, value in config.items():
        sized = key.startswith("num_") or key.endswith(("_dim", "_size", "_channels", "_layers"))
        if sized and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{path}: {key} is {value}; a count or width must be >= 0; fix the config")


def meta_denoiser(folder: str | Path) -> MetaDenoiser:
    """The transformer of `folder` on the meta device (parameters shaped, never allocated or read)."""
    path, pipeline_class = transformer_config_path(folder)
    config = _read(path)
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and "Transformer" in name):
        raise ConfigError(
            f"{path} names class {name!r}, which is not a diffusers {diffusers.__version__} transformer; "
            "pass a DiT pipeline's config (upgrade diffusers for newer classes)"
        )
    _check_sizes(path, config)
    try:
        with init_empty_weights(include_buffers=True):  # SD3's sin-cos table alone takes 10 s
            module = cls.from_config(config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path} does not build a {name}: {err}; fix the config") from None
    weights = any(p.suffix in WEIGHT_SUFFIXES for p in path.parent.iterdir())
    # diffusers builds a legacy `Transformer2DModel` config as the class its norm_type names (PixArt-Σ's
    # published config: PixArtTransformer2DModel), as from_pretrained does: report the class that was built
    built = type(module).__name__
    return MetaDenoiser(module.eval(), config, built, pipeline_class, config_only=not weights)


def parameter_count(module: nn.Module) -> int:
    """Parameters of `module` (meta tensors count by shape)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- what one denoiser call reads


@dataclass(frozen=True)
class CallAssumptions:
    """Sampling geometry assumed when sizing recorded denoiser inputs (None = the family's default)."""

    height: int | None = None  # pixels
    width: int | None = None
    frames: int | None = None  # video families only (Wan)
    text_tokens: int | None = None  # text-encoder tokens per prompt (the pipeline's max_sequence_length)
    cfg_calls: int | None = None  # denoiser calls per step: 2 with classifier-free guidance, else 1


# class -> (height, width, frames, text tokens, calls per step): the pipelines' published defaults
# (Flux-dev 1024², T5 512; SD3 CLIP 77 + T5 256 with CFG; Wan 832×480×81 frames, UMT5 512 with CFG;
# Z-Image-Turbo 1024², no CFG; Qwen-Image 1024² with true CFG; PixArt-Σ 1024², 300 tokens; DiT 256²).
FAMILY_DEFAULTS: dict[str, tuple[int, int, int, int, int]] = {
    "FluxTransformer2DModel": (1024, 1024, 1, 512, 1),
    "SD3Transformer2DModel": (1024, 1024, 1, 333, 2),
    "WanTransformer3DModel": (480, 832, 81, 512, 2),
    "ZImageTransformer2DModel": (1024, 1024, 1, 512, 1),
    "QwenImageTransformer2DModel": (1024, 1024, 1, 512, 2),
    "PixArtTransformer2DModel": (1024, 1024, 1, 300, 2),
    "DiTTransformer2DModel": (256, 256, 1, 0, 2),
}
_TEXT_WIDTH_KEYS = ("joint_attention_dim", "text_dim", "cap_feat_dim", "caption_channels")
_POOLED = ("FluxTransformer2DModel", "SD3Transformer2DModel")  # they also read a pooled CLIP vector
_PACKED = ("FluxTransformer2DModel", "QwenImageTransformer2DModel")  # 2×2 latent patches packed into tokens


@dataclass(frozen=True)
class CallInputs:
    """Elements of the inputs a denoiser call reads, split by how often they change."""

    assumptions: CallAssumptions  # every field resolved
    latent_elements: int  # per call (latents, positional ids): new at every step
    text_elements: int  # per prompt and CFG branch (text embeddings, pooled projection): same every step


def call_inputs(meta: MetaDenoiser, assumptions: CallAssumptions | None = None) -> CallInputs:
    """Sizes of one denoiser call's inputs, from the config and the geometry (family defaults filled in)."""
    config, assumptions = meta.config, assumptions or CallAssumptions()
    default = FAMILY_DEFAULTS.get(meta.class_name, (1024, 1024, 1, 512, 2))
    given = (assumptions.height, assumptions.width, assumptions.frames, assumptions.text_tokens)
    height, width, frames, tokens = (g if g is not None else d for g, d in zip(given, default, strict=False))
    cfg = assumptions.cfg_calls if assumptions.cfg_calls is not None else default[4]
    pixels = (height // 8) * (width // 8)  # every family's VAE downsamples by 8
    channels = int(config.get("in_channels", 4))
    if meta.class_name in _PACKED:
        latent = (pixels // 4) * channels + (pixels // 4 + tokens) * 3  # packed latents + RoPE ids
    elif meta.class_name == "WanTransformer3DModel":
        latent = channels * ((frames - 1) // 4 + 1) * pixels  # 4× temporal compression
    else:
        latent = channels * pixels
    width_text = next((int(config[k]) for k in _TEXT_WIDTH_KEYS if config.get(k)), 0)
    pooled = int(config.get("pooled_projection_dim") or 0) if meta.class_name in _POOLED else 0
    text = tokens * width_text + pooled
    resolved = CallAssumptions(height, width, frames, tokens, cfg)
    return CallInputs(resolved, latent, text)
