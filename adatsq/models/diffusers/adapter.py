"""Adapter for real diffusers pipelines (Flux, SD3, PixArt, DiT, Wan, Z-Image, QwenImage, Sana) in local
folders.

The pipeline runs as its authors wrote it; adatsq only watches it. The timesteps the transformer
receives are recorded from an actual run (a forward pre-hook), because every pipeline maps its
scheduler's schedule differently (Flux and QwenImage divide by 1000, Z-Image feeds (1000 - t) / 1000,
Flux shifts sigmas by resolution) and copying those rules would drift with each diffusers release.

Only `pipe.transformer` is quantized: two-expert pipelines (Wan 2.2 A14B's transformer_2) are refused.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from torch import nn

from adatsq.core.io import link_tree
from adatsq.errors import AdatsqError, ConfigError
from adatsq.models.base import ADAPTERS, ModelAdapter, StepCallback, parse_class_labels
from adatsq.models.diffusers.config import (
    DEFAULT_PROMPTS,
    RESERVED_CALL_KWARGS,
    DiffusersSampling,
    raised_by_pipeline,
    read_json,
    read_settings,
    sampling_refused,
    write_settings,
)
from adatsq.models.diffusers.prompts import PromptSession
from adatsq.models.diffusers.steps import StepWatcher
from adatsq.models.layers import default_ignore, linear_names, sensitive_layers
from adatsq.models.meta import WEIGHT_SUFFIXES

__all__ = [
    "DiffusersPipelineAdapter",
    "DiffusersSampling",
    "default_ignore",
    "linear_names",
    "sensitive_layers",
]

logger = logging.getLogger(__name__)

_NO_TRANSFORMER = (
    " (UNet pipelines are not supported); pass a DiT pipeline: Flux, SD3, PixArt, DiT, Wan, Z-Image, "
    "QwenImage"
)


def _from_pretrained(cls: Any, folder: Path, kwargs: dict[str, Any]) -> Any:
    """`from_pretrained` with `torch_dtype`: newer diffusers prefer `dtype` (and warn), older know only it.

    What diffusers / transformers / safetensors raise on a folder they cannot load (missing or damaged
    files, configs that do not build) becomes one ConfigError naming the folder, the original chained
    (`adatsq --verbose` shows it); their own log lines about it are kept quiet unless adatsq logs INFO.
    """
    from safetensors import SafetensorError

    with warnings.catch_warnings(), _quiet_libraries():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            return cls.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, SafetensorError) as err:
            detail = " ".join(f"{type(err).__name__}: {err}".split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise ConfigError(
                f"diffusers cannot load the {cls.__name__} in {folder} ({detail}); check the folder is "
                "complete (pipe.save_pretrained(folder) writes one) or pass another"
            ) from err


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' warnings at ERROR only, unless adatsq itself logs INFO (--verbose)."""
    if logging.getLogger("adatsq").isEnabledFor(logging.INFO):
        yield
        return
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging)
    levels = [library.get_verbosity() for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, level in zip(libraries, levels, strict=True):
            library.set_verbosity(level)


def _check_weights(folder: Path, index: dict[str, Any]) -> None:
    """A config-only folder (configs/, or a copy of only the JSON files) has no weights to calibrate."""
    transformer = folder / "transformer"
    if transformer.is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in transformer.rglob("*")):
        raise ConfigError(
            f"{folder} is a config-only folder (transformer/ holds no weights): `adatsq estimate` reads it, "
            "but quantize and plan need the pipeline with its weights (download it or pipe.save_pretrained)"
        )


def _diffusers_class(name: Any, path: Path) -> type:
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type):
        raise ConfigError(
            f"{path} names class {name!r}, which diffusers {diffusers.__version__} does not have; "
            "upgrade diffusers or pass a folder saved by it"
        )
    return cls


def _transformer_class(folder: Path) -> type:
    cls = _diffusers_class(read_json(folder / "config.json").get("_class_name"), folder / "config.json")
    if not (issubclass(cls, diffusers.ModelMixin) and "Transformer" in cls.__name__):
        raise ConfigError(
            f"{folder} holds a {cls.__name__}, not a diffusion transformer; pass the pipeline folder "
            "or its transformer/ subfolder"
        )
    return cls


def _empty_transformer(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The transformer of `folder`'s config with uninitialised weights, which a checkpoint then fills.

    Parameters come from torch.empty (no random init: a 12B model is built in seconds and its untouched
    pages cost no memory); buffers are computed as usual. Modules diffusers keeps in float32 stay so.
    """
    cls = _transformer_class(folder)
    config = read_json(folder / "config.json")
    config.pop("quantization_config", None)  # an adatsq checkpoint's: its loader fills the layers
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    keep_fp32 = getattr(cls, "_keep_in_fp32_modules", None) or []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            parts = f"{module_name}.{name}".split(".")
            wanted = torch.float32 if any(k in parts for k in keep_fp32) else (dtype or param.dtype)
            module.register_parameter(
                name, nn.Parameter(torch.empty(param.shape, dtype=wanted), requires_grad=param.requires_grad)
            )
    return model.eval()


def _timestep_parameter(denoiser: nn.Module) -> tuple[str, int]:
    """Name and position of the timestep argument of the denoiser's forward ('timestep', Z-Image's 't')."""
    params = [p for p in inspect.signature(type(denoiser).forward).parameters if p != "self"]
    for name in ("timestep", "t"):
        if name in params:
            return name, params.index(name)
    raise ConfigError(f"{type(denoiser).__name__}.forward takes no 'timestep' argument; it is not a denoiser")


def _shuffled_cycle(items: Sequence[Any], count: int, seed: int) -> list[Any]:
    """`count` items without repeats until the pool is used up, then the pool again in a new order."""
    rng = random.Random(seed)
    out: list[Any] = []
    while len(out) < count:
        pool = list(items)
        rng.shuffle(pool)
        out.extend(pool)
    return out[:count]


@ADAPTERS.register("diffusers")
class DiffusersPipelineAdapter(ModelAdapter):
    """A diffusers pipeline whose `transformer` is quantized (or a bare transformer, without sampling)."""

    family = "diffusers"
    differentiable = False  # pipelines sample under @torch.no_grad

    def __init__(
        self, model: diffusers.DiffusionPipeline | nn.Module, sampling: DiffusersSampling | None = None
    ) -> None:
        if isinstance(model, diffusers.DiffusionPipeline):
            transformer = getattr(model, "transformer", None)
            if not isinstance(transformer, nn.Module):
                raise ConfigError(f"{type(model).__name__} has no transformer{_NO_TRANSFORMER}")
            self.pipe: diffusers.DiffusionPipeline | None = model
        elif isinstance(model, diffusers.ModelMixin):
            self.pipe, transformer = None, model
        else:
            raise ConfigError(f"expected a diffusers pipeline or transformer, got {type(model).__name__}")
        self.transformer = transformer
        self.sampling = sampling or DiffusersSampling()
        self.dtype = transformer.dtype  # recorded now: quantized layers hide it later
        self._timestep_name, self._timestep_pos = _timestep_parameter(transformer)
        self._recorded: dict[int, list[float]] = {}
        self._prompts: PromptSession | None = None  # inside repeated_sampling
        if self.pipe is not None:
            self.pipe.set_progress_bar_config(disable=True)
            self._call_params = inspect.signature(type(self.pipe).__call__).parameters
            unknown = sorted(set(self.sampling.call_kwargs()) - set(self._call_params))
            if unknown:
                allowed = sorted(set(self._call_params) - RESERVED_CALL_KWARGS - {"self", "kwargs"})
                raise ConfigError(
                    f"{type(self.pipe).__name__} takes no sampling options {unknown}; allowed: {allowed}"
                )

    # ---------------------------------------------------------------- loading / saving

    @classmethod
    def open(
        cls, model: Any, dtype: torch.dtype | None, device: str | None
    ) -> DiffusersPipelineAdapter | None:
        """A DiffusionPipeline object, or an existing local folder (pipeline or bare transformer)."""
        if isinstance(model, diffusers.DiffusionPipeline):
            return cls(model)
        if isinstance(model, (str, Path)) and Path(model).exists():
            adapter = cls.from_folder(model, dtype=dtype, device=device)
            adapter.source = str(Path(model).resolve())
            return adapter
        return None

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike[str],
        *,
        sampling: DiffusersSampling | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> DiffusersPipelineAdapter:
        """Load a local pipeline folder (model_index.json) or a bare transformer folder (config.json).

        Sampling settings and dtype default to those in the folder's adatsq_pipeline.json, if any.
        """
        return cls._load(Path(path), sampling, dtype, device, with_weights=True)

    @classmethod
    def _load(
        cls,
        folder: Path,
        sampling: DiffusersSampling | None,
        dtype: torch.dtype | None,
        device: str | torch.device | None,
        with_weights: bool,
    ) -> DiffusersPipelineAdapter:
        if not folder.is_dir():
            raise ConfigError(f"model folder {str(folder)!r} does not exist; pass a local diffusers folder")
        stored_sampling, stored_dtype = read_settings(folder)
        sampling = stored_sampling if sampling is None else sampling
        dtype = stored_dtype if dtype is None else dtype
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype  # every supported diffusers takes it (newer ones warn: see below)

        if (folder / "model_index.json").is_file():
            index = read_json(folder / "model_index.json")
            if with_weights:
                _check_weights(folder, index)
            with _quiet_libraries():  # importing the class imports its components' libraries
                pipe_cls = _diffusers_class(index.get("_class_name"), folder / "model_index.json")
            if "transformer" not in index:
                raise ConfigError(f"{pipe_cls.__name__} in {folder} has no transformer{_NO_TRANSFORMER}")
            if not with_weights:
                kwargs["transformer"] = _empty_transformer(folder / "transformer", dtype)
            model: Any = _from_pretrained(pipe_cls, folder, kwargs)
        elif (folder / "config.json").is_file():
            if with_weights:
                model = _from_pretrained(_transformer_class(folder), folder, kwargs)
            else:
                model = _empty_transformer(folder, dtype)
            if (folder.parent / "model_index.json").is_file():
                logger.warning(
                    "%s is the transformer of the pipeline in %s; pass that folder to sample for calibration",
                    folder,
                    folder.parent,
                )
        else:
            raise ConfigError(
                f"{folder} is not a diffusers folder (no model_index.json or config.json); save the pipeline "
                "with pipe.save_pretrained(folder) or pass its transformer/ subfolder"
            )
        if device is not None:
            model.to(device)
        return cls(model, sampling)

    def save_base(self, directory: Path, link_components: bool = False) -> None:
        """Write every component but the transformer's weights (the checkpoint holds those) to `directory`;
        with `link_components`, link each component folder's files from the source pipeline folder."""
        if link_components:
            self.check_linkable()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.pipe is None:
            self.transformer.save_config(directory)
        else:
            self.pipe.save_config(directory)  # model_index.json
            for name, component in self.pipe.components.items():
                if component is self.transformer:
                    component.save_config(directory / name)
                elif link_components and hasattr(component, "save_pretrained"):
                    link_tree(Path(self.source) / name, directory / name)
                elif hasattr(component, "save_pretrained"):  # skips None and plain config values
                    component.save_pretrained(directory / name)
        write_settings(directory, self.sampling, self.dtype)

    @property
    def links_components(self) -> bool:
        """Loaded from a local pipeline folder that holds a folder for every component but the transformer."""
        if self.pipe is None or self.source is None or not (Path(self.source) / "model_index.json").is_file():
            return False
        others = [n for n, c in self.pipe.components.items() if c is not self.transformer and c is not None]
        return all((Path(self.source) / name).is_dir() for name in others)

    @classmethod
    def load_base(cls, directory: Path) -> DiffusersPipelineAdapter:
        """Rebuild the pipeline from `save_base`'s folder; the transformer's weights are uninitialised."""
        return cls._load(Path(directory), None, None, None, with_weights=False)

    # ---------------------------------------------------------------- the adapter protocol

    @property
    def denoiser_folder(self) -> str:  # type: ignore[override]
        """The pipeline's transformer/ component, or the folder itself for a bare transformer."""
        return "transformer" if self.pipe is not None else ""

    def denoiser(self) -> nn.Module:
        return self.transformer

    def user_model(self) -> Any:
        return self.transformer if self.pipe is None else self.pipe

    @contextlib.contextmanager
    def repeated_sampling(self) -> Iterator[None]:
        """Each prompt batch encoded once, encoders and unused components off the device (prompts.py)."""
        if self.pipe is None or self._prompts is not None:  # nothing to sample, or an outer run holds it
            yield
            return
        self._prompts = PromptSession(self.pipe, self.transformer)
        try:
            yield
        finally:
            self._prompts.close()
            self._prompts = None

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        value = kwargs.get(self._timestep_name)
        if value is None and len(args) > self._timestep_pos:
            value = args[self._timestep_pos]
        if value is None:
            raise AdatsqError(f"{type(self.transformer).__name__} was called without a timestep")
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0])
        return float(value)

    def step_timesteps(self, num_steps: int) -> list[float]:
        """The transformer's timestep at each step, recorded from one real run (one input), then cached."""
        if num_steps not in self._recorded:
            self.generate(self.default_inputs(1, seed=0), seed=0, num_steps=num_steps)
        return list(self._recorded[num_steps])

    def default_inputs(self, count: int, seed: int) -> list[Any]:
        """Class labels for class-conditional pipelines (DiT), else built-in varied prompts."""
        if self._num_classes() is not None:
            return _shuffled_cycle(range(self._num_classes()), count, seed)
        return _shuffled_cycle(DEFAULT_PROMPTS, count, seed)

    def parse_inputs(self, lines: list[str]) -> list[Any]:
        classes = self._num_classes()
        if classes is None:
            return lines
        return parse_class_labels(lines, classes, type(self.transformer).__name__)

    def generate(
        self,
        inputs: Sequence[Any],
        seed: int,
        num_steps: int,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Sample latents (no VAE decode where the pipeline allows it); returns float32 CPU latents."""
        if self.pipe is None:
            raise AdatsqError(
                f"{type(self.transformer).__name__} was loaded without its pipeline, so it cannot sample for "
                "calibration; save the whole pipeline with pipe.save_pretrained(folder) and pass that folder"
            )
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ConfigError(f"num_steps must be a positive int, got {num_steps!r}")
        kwargs = {
            **self.sampling.call_kwargs(),
            **self._input_kwargs(inputs),
            "num_inference_steps": num_steps,
        }
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)  # same noise on every device
        kwargs["output_type"] = "latent"  # DiT ignores it and decodes; its latents are taken per step
        watcher = StepWatcher(self.timestep_of, len(inputs), step_callback)
        prompts = contextlib.nullcontext() if self._prompts is None else self._prompts.sampling()
        with self._watching(watcher, kwargs), prompts:
            try:
                self.pipe(**kwargs)
            except (ValueError, TypeError) as err:  # the pipeline's checks of its arguments, made one line
                if not raised_by_pipeline(err):
                    raise
                raise sampling_refused(
                    type(self.pipe).__name__, self.sampling.call_kwargs(), self._call_params,
                    self.transformer.config.get("sample_size"), self.source, err,
                ) from err  # fmt: skip
        if watcher.latents is None:
            raise AdatsqError(f"{type(self.pipe).__name__} ran no denoising step for num_steps={num_steps}")
        if len(watcher.timesteps) != watcher.step:
            raise AdatsqError(
                f"{type(self.pipe).__name__} called its transformer in {len(watcher.timesteps)} of "
                f"{watcher.step} steps; pipelines with a second expert for late steps (Wan 2.2 A14B's "
                "transformer_2) are not supported: set boundary_ratio to None or use a single-expert model"
            )
        self._recorded.setdefault(num_steps, watcher.timesteps)
        return watcher.latents.detach().float().cpu()

    # ---------------------------------------------------------------- helpers

    def _num_classes(self) -> int | None:
        """Class count of a class-conditional denoiser (DiT), None for text-conditioned ones."""
        if isinstance(self.transformer, diffusers.DiTTransformer2DModel):
            return int(self.transformer.config.num_embeds_ada_norm)
        return None

    def _input_kwargs(self, inputs: Sequence[Any]) -> dict[str, Any]:
        if isinstance(inputs, str) or len(inputs) == 0:
            raise ConfigError(f"inputs must be a non-empty list of prompts or class labels, got {inputs!r}")
        classes = self._num_classes()
        if classes is not None:
            bad = [x for x in inputs if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < classes]
            if bad:
                raise ConfigError(f"class labels must be ints in [0, {classes}), got {bad[:5]}")
            return {"class_labels": list(inputs)}
        bad = [x for x in inputs if not isinstance(x, str)]
        if bad:
            raise ConfigError(f"{type(self.pipe).__name__} takes text prompts, got {bad[:5]}")
        return {"prompt": list(inputs)}

    @contextlib.contextmanager
    def _watching(self, watcher: StepWatcher, kwargs: dict[str, Any]) -> Iterator[None]:
        """Install the timestep hook and the per-step bridge for one pipeline call."""
        handle = self.transformer.register_forward_pre_hook(watcher.pre_hook, with_kwargs=True)
        scheduler = self.pipe.scheduler
        patched = "callback_on_step_end" not in self._call_params
        if patched:
            scheduler.step = watcher.wrap_scheduler_step(scheduler.step)
        else:
            kwargs["callback_on_step_end"] = watcher.on_step_end
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        try:
            yield
        finally:
            handle.remove()
            if patched:
                del scheduler.step  # drop the instance attribute: the class's method shows again
