"""Recipes: declarative YAML describing how to quantize a model, mapped onto frozen dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from adatsq.core.config import from_mapping, to_mapping
from adatsq.core.sizes import parse_size
from adatsq.errors import ConfigError
from adatsq.plan.schema import BUDGET_KINDS
from adatsq.quant.methods import QUANT_METHODS
from adatsq.quant.scheme import WEIGHT_BITS, ActScheme, WeightScheme
from adatsq.quant.transforms import TransformScheme

MAX_COUNT = 10**7  # samples / steps / batch size beyond this are typos, not calibration runs


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration runs the sampler: statistics are gathered through the whole denoising loop."""

    samples: int = 64  # calibration inputs (class labels or prompts), each sampled from its own noise
    steps: int = 20  # sampler steps during calibration: the schedule the checkpoint is tuned for
    batch_size: int = 16
    seed: int = 0
    segments: int = 1  # contiguous timestep segments; 1 pools every step (plain GPTQ)
    # memory for calibration statistics + solves, e.g. "40GiB": over it, calibration records the sampler
    # once and runs several passes over groups of layers; None = one live pass. Results do not depend on it.
    max_memory: str | None = None

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    def __post_init__(self) -> None:
        if self.max_memory is not None:
            parse_size(self.max_memory)  # a malformed size is an error at construction
        for name in ("samples", "steps", "batch_size", "segments"):
            if not 1 <= getattr(self, name) <= MAX_COUNT:
                raise ConfigError(f"calibration.{name} must be in 1..{MAX_COUNT}, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"calibration.seed must be in 0..2**63-1 (a torch seed), got {self.seed}")
        if self.segments > self.steps:
            raise ConfigError(
                f"calibration.segments ({self.segments}) cannot exceed calibration.steps ({self.steps})"
            )


@dataclass(frozen=True)
class GPTQConfig:
    """Solver knobs; defaults are the GPTQ reference implementation's."""

    damping: float = 0.01  # fraction of mean(diag H) added to the diagonal; escalated on Cholesky failure
    act_order: bool = True  # quantize columns by descending Hessian diagonal
    block_size: int = 128  # lazy-update block width

    def __post_init__(self) -> None:
        if not 0 < self.damping < 1:
            raise ConfigError(f"gptq.damping must be in (0, 1), got {self.damping}")
        if self.block_size < 1:
            raise ConfigError(f"gptq.block_size must be >= 1, got {self.block_size}")


def parse_budget(text: str) -> tuple[str, float]:
    """'avg_bits=4.0' → ('avg_bits', 4.0); the kinds are checked by the planner's Budget."""
    kind, sep, value = text.partition("=")
    try:
        return kind.strip(), float(value) if sep else float("nan")
    except ValueError:
        raise ConfigError(
            f"budget {text!r} must look like KIND=VALUE, e.g. avg_bits=4.0 or bytes=2e6"
        ) from None


@dataclass(frozen=True)
class PlannerConfig:
    """AdaTSQ bit allocation over layers × timestep segments (used when method is 'adatsq')."""

    candidates: tuple[int, ...] = (3, 4, 6, 8)  # weight bits a layer may take at a segment
    budget: str = "avg_bits=4.0"  # avg_bits | bops | bytes, as KIND=VALUE
    search: Literal["beam", "greedy", "static"] = "beam"
    beam_width: int = 4
    proposals_per_stage: int = 6
    fisher: bool = True  # weight segments (Hessians and error table) by temporal Fisher information
    fisher_samples: int = 16
    # how Fisher sensitivities are estimated: "gradient" (backprop through the sampler; an error where the
    # sampler does not keep gradients, as diffusers pipelines), "perturbation" (one extra sampling run
    # per step), "auto" (gradient where the adapter's sampler is differentiable, else perturbation,
    # decided before any run); the method used is recorded in report.json and plan.json
    fisher_method: Literal["auto", "gradient", "perturbation"] = "auto"
    measure: bool = True  # rank partial plans by the measured trajectory error, not only the table
    measure_samples: int = 8
    pin: tuple[str, ...] = ()  # regexes of layers held at pin_bits (adaLN / modulation, embedders, output)
    pin_bits: int = 8

    def __post_init__(self) -> None:
        if not self.candidates or any(b not in WEIGHT_BITS for b in self.candidates):
            raise ConfigError(
                f"planner.candidates {list(self.candidates)} must be drawn from {list(WEIGHT_BITS)}"
            )
        if self.pin_bits not in WEIGHT_BITS:
            raise ConfigError(
                f"planner.pin_bits={self.pin_bits} is not supported; allowed: {list(WEIGHT_BITS)}"
            )
        kind, value = parse_budget(self.budget)
        if kind not in BUDGET_KINDS or not value > 0:
            raise ConfigError(
                f"planner.budget {self.budget!r}: use KIND=VALUE with KIND in {', '.join(BUDGET_KINDS)} "
                "and a positive value"
            )
        for name in ("beam_width", "proposals_per_stage", "fisher_samples", "measure_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"planner.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "pin", _normalise(self.pin))
        for pattern in self.pin:
            _check_regex(pattern)

    def pins(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.pin)


def _normalise(patterns: tuple[str, ...], targets: bool = False) -> tuple[str, ...]:
    """Our regexes (re.search) as given; llm-compressor's `re:X` (its `re.match`: anchored at the start of
    the name) becomes `^(?:X)`; a target `Linear` (its class-name target) means every Linear layer."""
    out = []
    for p in patterns:
        if targets and p == "Linear":
            out.append(".*")
        elif p.startswith("re:"):
            out.append(f"^(?:{p[3:]})")
        else:
            out.append(p)
    return tuple(out)


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"invalid regex {pattern!r}: {err}") from None


@dataclass(frozen=True)
class Recipe:
    """Everything `adatsq quantize` needs besides the model and the calibration inputs."""

    method: str  # a registered quantization method: rtn | gptq | adatsq (adatsq.quant.methods)
    weight: WeightScheme
    activation: ActScheme = field(default_factory=ActScheme)
    targets: tuple[str, ...] = (".*",)  # regexes (re.search) on module names of the denoiser's Linear layers
    # regexes of layers kept in full precision, applied after targets; None = the model family's defaults
    # (embedders, final projection), [] = quantize every targeted layer
    ignore: tuple[str, ...] | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    # outlier handling for low-bit activations: smoothing (smooth_alpha), Hadamard rotation, low-rank branch
    outliers: TransformScheme = field(default_factory=TransformScheme)

    def __post_init__(self) -> None:
        QUANT_METHODS.get(self.method)  # an unknown method is a ConfigError naming the registered ones
        # llm-compressor's 're:' regexes and 'Linear' target, in our terms (see `_normalise`)
        object.__setattr__(self, "targets", _normalise(self.targets, targets=True))
        if self.ignore is not None:
            object.__setattr__(self, "ignore", _normalise(self.ignore))
        for pattern in (*self.targets, *(self.ignore or ())):
            _check_regex(pattern)

    def selects(self, name: str, default_ignore: tuple[str, ...] = ()) -> bool:
        """Whether a Linear layer called `name` is quantized (`default_ignore` stands in for ignore=None)."""
        ignore = default_ignore if self.ignore is None else self.ignore
        return any(re.search(p, name) for p in self.targets) and not any(re.search(p, name) for p in ignore)

    def to_dict(self) -> dict:
        return to_mapping(self)


# ---------------------------------------------------------------- llm-compressor's vocabulary


def _int_preset(bits: int, act: int | None, group: int | None = 128, symmetric: bool = True) -> dict:
    return {
        "weight": {"bits": bits, "group_size": group, "symmetric": symmetric},
        "activation": {"bits": act},
    }


# compressed-tensors 0.20 presets (llm-compressor's `scheme:`) with the very grid they name there: integer
# weights, symmetric, groups of 128 along the input (W8A8: per output channel), static; activations
# integer, per token, dynamic, symmetric (adatsq's only activation scheme). Weight bits <= activation bits,
# as compressed-tensors requires; only widths adatsq packs (2, 3, 4, 6, 8).
SCHEME_PRESETS: dict[str, dict] = {
    **{
        f"W{w}A{a}": _int_preset(w, None if a == 16 else a)
        for w in WEIGHT_BITS
        for a in (4, 8, 16)
        if w <= a and (w, a) != (8, 8)
    },
    "W4A16_ASYM": _int_preset(4, None, symmetric=False),
    "W8A8": _int_preset(8, 8, group=None),
    "INT8": _int_preset(8, 8, group=None),  # compressed-tensors' alias of W8A8
}

# llm-compressor keys with no key of that name here: the one-line answer names our equivalent
_FLAT = "a flat recipe: method, weight, activation, targets, ignore at the top (see recipes/)"
LLM_COMPRESSOR_KEYS = {
    "config_groups": "one scheme per recipe: weight + activation (or scheme), layers by targets / ignore",
    "dampening_frac": "gptq.damping (same meaning: fraction of mean diag(H))",
    "sequential_targets": "none needed: passes over groups of blocks are scheduled by calibration.max_memory",
    "offload_hessians": "calibration.max_memory (Hessians are accumulated in passes that fit the budget)",
    "actorder": "gptq.act_order (true/false)",
    "block_size": "gptq.block_size",
    "num_calibration_samples": "calibration.samples",
    "smoothing_strength": "outliers.smooth_alpha",
    "kv_cache_scheme": "none: adatsq quantizes Linear weights and their input activations only",
    "quant_stage": _FLAT,
    "quant_modifiers": _FLAT,
    "GPTQModifier": "`method: gptq`, " + _FLAT,
    "QuantizationModifier": "`method: rtn` (round to nearest), " + _FLAT,
    "SmoothQuantModifier": "outliers.smooth_alpha",
}


def _llm_compressor_hints(data: dict, where: str) -> None:
    """An llm-compressor key where we have no key of that name is an error that names our equivalent."""
    sections = [(where, data, Recipe)] + [
        (f"{where}.{k}", data[k], cls)
        for k, cls in (
            ("gptq", GPTQConfig),
            ("calibration", CalibrationConfig),
            ("outliers", TransformScheme),
        )
        if isinstance(data.get(k), dict)
    ]
    for place, section, cls in sections:
        ours = {f.name for f in fields(cls)}
        for key in section:
            if key in LLM_COMPRESSOR_KEYS and key not in ours:
                raise ConfigError(
                    f"{place}: {key!r} is llm-compressor's key, not adatsq's; use {LLM_COMPRESSOR_KEYS[key]}"
                )


def _expand_scheme(data: dict, where: str) -> dict:
    name = data["scheme"]
    if not isinstance(name, str) or name.upper() not in SCHEME_PRESETS:
        raise ConfigError(
            f"{where}.scheme: {name!r} is not a preset adatsq has a grid for; allowed: "
            f"{', '.join(SCHEME_PRESETS)} (float formats such as FP8 / NVFP4 / MXFP4 and 5- or 7-bit weights "
            "are not supported); or write weight: / activation: instead"
        )
    clash = [k for k in ("weight", "activation") if k in data]
    if clash:
        raise ConfigError(
            f"{where}: scheme {name!r} sets weight and activation ({SCHEME_PRESETS[name.upper()]}); "
            f"drop {' and '.join(clash)} or drop scheme"
        )
    rest = {k: v for k, v in data.items() if k != "scheme"}
    return {**rest, **SCHEME_PRESETS[name.upper()]}


def recipe_from_dict(data: object, where: str = "recipe") -> Recipe:
    """A recipe mapping → Recipe. Beside our keys, llm-compressor's vocabulary where it means the same:
    `scheme: W4A16` (its preset grid, `SCHEME_PRESETS`), `re:` patterns, the `Linear` target; its other
    keys are errors naming our equivalent. `activation: null` means activations stay float."""
    if isinstance(data, dict):
        _llm_compressor_hints(data, where)
        if "scheme" in data:
            data = _expand_scheme(data, where)
        if "activation" in data and data["activation"] is None:
            data = {**data, "activation": {}}
    return from_mapping(Recipe, data, where)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; every unknown key or wrong type is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} not found; shipped recipes live in recipes/")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"recipe {str(path)!r} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{where}: {problem}; fix the file") from err
    except RecursionError:
        raise ConfigError(
            f"recipe {str(path)!r} nests lists or mappings too deeply to read; a recipe is a few levels deep"
        ) from None
    if data is None:
        raise ConfigError(
            f"recipe {str(path)!r} is empty; write at least `method:` and `weight:`, e.g. "
            "recipes/reference/gptq-w4a8.yaml"
        )
    return recipe_from_dict(data, where=f"recipe {path.name}")


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (not: the last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"key {key!r} is given twice "
                    f"(lines {seen[key] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)
