"""The checkpoint folder: file names, where its parts live, the adatsq config and what the engine hands over.

Format 2 (written now) is a normal diffusers / transformers folder. The denoiser is a component folder
(`transformer/` of a pipeline; the folder itself for a bare model; `denoiser/` for models without a
diffusers class): its `config.json` is the model's own config plus `quantization_config`
(`quant_method: "adatsq"`, `format_version`, then the fields below), beside model.safetensors (or
shards). Everything else (model_index.json, the other components, adatsq_pipeline.json, report.json,
plan.json) sits in the top folder as diffusers saves it.

Format 1 (still read; `adatsq upgrade` rewrites it): adatsq_config.json + model.safetensors + report.json
(+ plan.json) in the folder and what rebuilds the rest of the model in base/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from adatsq.errors import CheckpointError
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.scheme import WeightScheme, variant_grid, variant_scheme

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
QUANT_METHOD = "adatsq"  # quantization_config.quant_method: what diffusers / transformers dispatch on
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"  # format 2: the denoiser's config.json, holding quantization_config
QUANTIZATION_CONFIG = "quantization_config"
CONFIG = "adatsq_config.json"  # format 1
REPORT = "report.json"
PLAN = "plan.json"
BASE = "base"  # format 1
CONFIG_KEYS = {
    "format_version", "adatsq_version", "method", "model", "activation", "num_steps", "timesteps",
    "segments", "segment_steps", "layers", "ignore", "recipe",
}  # fmt: skip
OPTIONAL_KEYS = {"checksums"}  # sha256 of every tensor's bytes (absent in checkpoints written before 0.x)
# what safetensors raises for a truncated or damaged file
SAFETENSORS_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, KeyError)


@dataclass(frozen=True)
class Layout:
    """Where the parts of one checkpoint folder are (they differ between format versions)."""

    version: int
    root: Path
    config_path: Path  # the file holding the adatsq config (format 2: inside quantization_config)
    tensors: Path  # the folder of model.safetensors or its shards
    base: Path  # what the adapter's load_base reads

    @property
    def component(self) -> str:
        """The denoiser's folder relative to the root ("" when it is the root itself)."""
        return self.tensors.relative_to(self.root).as_posix() if self.tensors != self.root else ""


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is stored: a weight scheme per timestep segment (one variant per distinct bits)."""

    bits: tuple[int, ...]  # weight bits at each segment
    group_size: int | None
    symmetric: bool
    integer_group_scales: bool = False

    def scheme(self, bits: int) -> WeightScheme:
        """The scheme of the `bits` variant (`variant_scheme`: 8-bit per channel under integer scales)."""
        return variant_scheme(bits, self.group_size, self.symmetric, self.integer_group_scales)


def config_variant_grid(layer: dict[str, Any], bits: int) -> tuple[int | None, bool]:
    """(group size, integer group scales) of the `bits` variant of a config's layer entry (`variant_grid`)."""
    return variant_grid(layer["group_size"], layer.get("integer_group_scales", False), bits)


def variant_prefix(name: str, bits: int) -> str:
    return f"{name}.w{bits}."


def layer_variants(module: nn.Module) -> dict[int, QuantLinear]:
    """bits -> QuantLinear of a quantized layer (one entry unless it switches with the timestep)."""
    if isinstance(module, TimestepQuantLinear):
        return {int(key[1:]): variant for key, variant in module.variants.items()}
    return {module.bits: module}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a checkpoint; bad JSON / not UTF-8 / not an object is a CheckpointError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise CheckpointError(f"{path} is corrupted (invalid JSON: {detail}); re-run quantize") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def is_adatsq_component(config: dict[str, Any]) -> bool:
    quantization = config.get(QUANTIZATION_CONFIG)
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def locate(directory: Path) -> Layout:
    """The layout of a checkpoint folder: format 1 (adatsq_config.json) or 2 (a component's config.json)."""
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(directory)!r} not found; create it with `adatsq quantize`"
        )
    if (directory / CONFIG).is_file():
        return Layout(1, directory, directory / CONFIG, directory, directory / BASE)
    candidates = [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]
    found = [
        folder
        for folder in candidates
        if (folder / MODEL_CONFIG).is_file() and is_adatsq_component(read_json_object(folder / MODEL_CONFIG))
    ]
    if not found:
        raise CheckpointError(
            f"{str(directory)!r} is not an adatsq checkpoint: neither {CONFIG} (format 1) nor a component "
            f"{MODEL_CONFIG} with {QUANTIZATION_CONFIG}.quant_method {QUANT_METHOD!r} (format 2) is there"
        )
    if len(found) > 1:
        names = [str(f.relative_to(directory)) for f in found]
        raise CheckpointError(
            f"{str(directory)!r} holds {len(found)} adatsq components {names}; adatsq quantizes one "
            "denoiser per checkpoint: keep one"
        )
    component = found[0]
    version = read_json_object(component / MODEL_CONFIG)[QUANTIZATION_CONFIG].get("format_version")
    return Layout(version if isinstance(version, int) else -1, directory, component / MODEL_CONFIG,
                  component, directory)  # fmt: skip


def is_checkpoint(directory: Path) -> bool:
    """A folder this program wrote, in any format (the only kind of folder --overwrite replaces)."""
    try:
        locate(directory)
    except CheckpointError:
        return False
    return True


def read_checkpoint_config(directory: Path) -> tuple[dict[str, Any], Layout]:
    """The adatsq config of a checkpoint folder (either format), its version and keys checked.

    Format 2's quantization_config is returned without `quant_method`: the same keys as format 1.
    """
    layout = locate(directory)
    path = layout.config_path
    config, where = read_json_object(path), f"{path}: format_version"
    legacy = path.name == CONFIG
    if not legacy:
        config = {k: v for k, v in config[QUANTIZATION_CONFIG].items() if k != "quant_method"}
        where = f"{path}: {QUANTIZATION_CONFIG}.format_version"
    version = config.get("format_version")
    if version not in READ_VERSIONS or version != (1 if legacy else FORMAT_VERSION):
        newer = isinstance(version, int) and version > FORMAT_VERSION
        fix = "upgrade adatsq" if newer else "re-quantize with this version"
        raise CheckpointError(
            f"{where} {version!r} is not supported in {path.name} (this adatsq reads "
            f"{', '.join(map(str, READ_VERSIONS))}: 1 in {CONFIG}, {FORMAT_VERSION} in {MODEL_CONFIG}); {fix}"
        )
    missing, unknown = CONFIG_KEYS - set(config), set(config) - CONFIG_KEYS - OPTIONAL_KEYS
    if missing or unknown:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return config, layout
