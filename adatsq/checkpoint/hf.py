"""Load adatsq checkpoints with diffusers' / transformers' own `from_pretrained`.

A format-2 checkpoint's denoiser is a normal component folder: config.json carries
`quantization_config: {"quant_method": "adatsq", "format_version": 2, ...}` beside its safetensors.
diffusers picks a quantizer from a fixed table (diffusers/quantizers/auto.py, no plug-in API), so
`register_with_diffusers()` adds "adatsq" to that table, once, for the diffusers versions it was tested
with; transformers has a plug-in API (`register_quantization_config` / `register_quantizer`), which
`register_with_transformers()` uses. Both quantizers run the same two hooks:

- before the weights load (model on the meta device): the folder is validated as `adatsq.load` validates
  it, and every quantized Linear becomes a stateless placeholder, so no float weight of it is allocated
  and the library loads only the float tensors;
- after: each placeholder is replaced by its quantized layer (its variants read from the component's
  safetensors), float buffers follow the load dtype, kernels are prepared and timestep switching is
  attached to the model.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin as DiffusersConfigMixin
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from transformers.quantizers import auto as transformers_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin as TransformersConfigMixin

from adatsq.calibrate.segments import attach_segment_switching
from adatsq.checkpoint.format import FORMAT_VERSION, MODEL_CONFIG, QUANT_METHOD
from adatsq.checkpoint.load import fill_quantized_layers, segment_map
from adatsq.checkpoint.shards import TensorFiles
from adatsq.checkpoint.validate import (
    check_checksums,
    check_config,
    check_model_tensors,
    check_quantized_tensors,
    split_keys,
)
from adatsq.core.modules import set_module
from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.diffusers.adapter import DiffusersPipelineAdapter
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear, prepare_kernels

# The versions whose loaders call the hooks used here the way they were tested (diffusers 0.42.1;
# transformers 5.24.0 and 5.25.0). Older diffusers (0.35) do not tell a quantizer where the checkpoint
# files are (maybe_update_loaded_keys).
SUPPORTED_DIFFUSERS = ">=0.42,<0.43"
SUPPORTED_TRANSFORMERS = ">=5.24,<5.26"


class AdatsqMethod(str, Enum):
    """quant_method as the libraries expect it (a str enum: they read `.value`)."""

    ADATSQ = QUANT_METHOD


class _Pending(nn.Module):
    """Stands in for a quantized layer while the library loads the float tensors (it has no state)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckpointError("this adatsq layer was never loaded: load the model with from_pretrained")


class _Loader:
    """What both quantizers do: validate, put placeholders in, fill them from the component's files."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = {k: v for k, v in config.items() if k != "quant_method"}
        self.folder: Path | None = None
        self.dtype: torch.dtype | None = None

    def quantized_key(self, key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in self.config["layers"])

    def before(self, model: nn.Module, files: list[str] | None) -> None:
        if not files:
            raise ConfigError("the loader gave the adatsq quantizer no checkpoint files: load a local folder")
        self.folder = Path(files[0]).parent
        path = self.folder / MODEL_CONFIG
        if self.config.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: quantization_config.format_version {self.config.get('format_version')!r} is not "
                f"supported (this adatsq writes {FORMAT_VERSION}); run `adatsq upgrade` or upgrade adatsq"
            )
        check_config(path, self.config)
        self.files = TensorFiles(self.folder)
        specs = self.files.specs()
        self.variants, rest = split_keys(self.config, list(specs))
        check_quantized_tensors(self.config, self.variants, self.files, specs, path)
        check_model_tensors(self.config, model, rest, self.files, specs, path)
        check_checksums(self.config, self.files, specs, True, path)
        for name in self.config["layers"]:
            set_module(model, name, _Pending())  # the meta float layer is dropped before any weight loads

    def after(self, model: nn.Module) -> list[nn.Module]:
        """Fill the placeholders; the quantized layers, on the device of the model's float tensors."""
        # The library left the float tensors in the memory-mapped file, at offsets CPU matmuls round
        # differently from (not 64-byte aligned): own copies, as adatsq.load makes, give the same samples.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()
        fill_quantized_layers(model, self.config, self.variants, self.files)
        layers = [m for m in model.modules() if isinstance(m, (QuantLinear, TimestepQuantLinear))]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for layer in layers:
            nn.Module.to(layer, device=device, dtype=self.dtype)  # not ModelMixin.to: it refuses a dtype
        prepare_kernels(model, self.dtype or torch.float32)
        model.eval()
        return layers


def _check_version(library: str, version: str, supported: str) -> None:
    if Version(version) not in SpecifierSet(supported):
        raise ConfigError(
            f"adatsq.register_with_{library}() supports {library} {supported}, this is {library} {version}: "
            f"pip install '{library}{supported}', or load the folder with adatsq.load"
        )


class AdatsqFields:
    """The quantization_config of an adatsq component (its fields as in the checkpoint), shared by the
    diffusers and transformers config classes (each library wants its own base class)."""

    def __init__(self, **fields: Any) -> None:
        self.quant_method = AdatsqMethod.ADATSQ
        self.fields = {k: v for k, v in fields.items() if k != "quant_method"}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self.fields}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


# ------------------------------------------------------------------------------------------ diffusers


class AdatsqDiffusersConfig(AdatsqFields, DiffusersConfigMixin):
    """diffusers' face of an adatsq quantization_config."""


class AdatsqDiffusersQuantizer(DiffusersQuantizer):
    """Loads a pre-quantized adatsq component; it cannot quantize a float model (`adatsq quantize` does)."""

    requires_calibration = True
    use_keep_in_fp32_modules = True  # the float tensors load as they would without a quantizer

    def __init__(self, quantization_config: AdatsqDiffusersConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.loader = _Loader(quantization_config.fields)

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        self.loader.dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self.checkpoint_files = checkpoint_files  # the only hook that is told where the files are
        return [k for k in loaded_keys if not self.loader.quantized_key(k)]

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self.loader.before(model, getattr(self, "checkpoint_files", None))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self.loader.after(model)
        attach_segment_switching(DiffusersPipelineAdapter(model), segment_map(self.loader.config))
        return model

    @property
    def is_serializable(self) -> bool:
        return False  # a checkpoint is written by QuantizedModel.save, not by save_pretrained

    @property
    def is_trainable(self) -> bool:
        return False


def _already_registered(mapping: dict[str, Any], library: str) -> bool:
    """Whether adatsq's quantizer is in `library`'s table; another one under our name is an error."""
    registered = mapping.get(QUANT_METHOD)
    if registered is not None and getattr(registered, "__module__", "") != __name__:
        raise ConfigError(f"{library} already maps quant_method {QUANT_METHOD!r} to {registered!r}")
    return registered is not None


def register_with_diffusers() -> None:
    """Let diffusers' `from_pretrained` (models and `DiffusionPipeline`) load adatsq components.

    Idempotent; refused, with the supported range, on a diffusers it was not tested with.
    """
    _check_version("diffusers", diffusers.__version__, SUPPORTED_DIFFUSERS)
    if _already_registered(diffusers_auto.AUTO_QUANTIZER_MAPPING, "diffusers"):
        return
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = AdatsqDiffusersConfig
    diffusers_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = AdatsqDiffusersQuantizer


# ------------------------------------------------------------------------------------------ transformers


class AdatsqTransformersConfig(AdatsqFields, TransformersConfigMixin):
    """transformers' face of an adatsq quantization_config."""


class AdatsqTransformersQuantizer(HfQuantizer):
    """Loads a pre-quantized adatsq component; it cannot quantize a float model."""

    requires_calibration = True

    def __init__(self, quantization_config: AdatsqTransformersConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.loader = _Loader(quantization_config.fields)

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        self.loader.dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self.loader.before(model, kwargs.get("checkpoint_files"))
        # the variants' keys are not the model's: they are read after loading, not reported as unused
        model._keys_to_ignore_on_load_unexpected = {  # a set: transformers unions it with its own
            *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
            *(rf"^{re.escape(name)}\.w\d+\." for name in self.loader.config["layers"]),
        }
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        layers = self.loader.after(model)
        if any(isinstance(layer, TimestepQuantLinear) for layer in layers):
            raise CheckpointError(
                f"{self.loader.folder}: a transformers component has no timestep to switch bit-widths "
                "with; load it with adatsq.load"
            )
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Let transformers' `from_pretrained` (AutoModel and the model classes) load adatsq components.

    Idempotent; refused, with the supported range, on a transformers it was not tested with.
    """
    _check_version("transformers", transformers.__version__, SUPPORTED_TRANSFORMERS)
    if _already_registered(transformers_auto.AUTO_QUANTIZER_MAPPING, "transformers"):
        return
    transformers_auto.register_quantization_config(QUANT_METHOD)(AdatsqTransformersConfig)
    transformers_auto.register_quantizer(QUANT_METHOD)(AdatsqTransformersQuantizer)
