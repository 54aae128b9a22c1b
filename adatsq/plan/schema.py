"""The plan's data types and its JSON file: what the search produces and the quantizer / loader consume.

A plan gives every quantizable Linear layer one weight bit-width per timestep segment. Files are
versioned and validated strictly on load, so a plan made for another model, sampler or format
fails with a message that says what to do instead of quantizing the wrong thing.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adatsq.core.io import atomic_write_text
from adatsq.errors import PlanError
from adatsq.quant.scheme import ACT_BITS as QUANT_ACT_BITS
from adatsq.quant.scheme import WEIGHT_BITS

FORMAT_VERSION = 1
SUPPORTED_BITS = WEIGHT_BITS  # weight bit-widths the packer and kernels handle
UNQUANTIZED_ACT_BITS = 16  # a plan's activation bits for layers whose activations stay float (bf16/fp16)
ACT_BITS = (*QUANT_ACT_BITS, UNQUANTIZED_ACT_BITS)
BUDGET_KINDS = ("avg_bits", "bops", "bytes")


def as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PlanError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def as_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PlanError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise PlanError(f"{what} must be finite, got {value!r}")
    return float(value)


def _bits(value: Any, what: str, allowed: Sequence[int] = SUPPORTED_BITS) -> int:
    bits = as_int(value, what)
    if bits not in allowed:
        raise PlanError(f"{what} = {bits} is not supported; allowed: {list(allowed)}")
    return bits


@dataclass(frozen=True)
class Budget:
    """What the search must not exceed. `avg_bits` and `bops` are per denoising step; `bytes` is stored."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise PlanError(f"budget kind {self.kind!r} is unknown; allowed: {list(BUDGET_KINDS)}")
        value = as_float(self.value, f"{self.kind} budget")
        if value <= 0:
            raise PlanError(f"{self.kind} budget must be positive, got {value}")
        object.__setattr__(self, "value", value)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def from_dict(cls, data: Any, where: str = "budget") -> Budget:
        check_keys(data, {"kind", "value"}, where)
        return cls(kind=data["kind"], value=data["value"])


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable Linear layer as the planner sees it (no weights, only sizes)."""

    name: str
    n_params: int  # weight elements = in_features * out_features (bias is never quantized)
    in_features: int
    out_features: int
    macs_per_step: int  # multiply-accumulates of this layer in one denoiser step (all tokens, CFG batch)
    group_size: int | None = None  # None = one scale per output channel
    integer_group_scales: bool = False  # its 2-6-bit variants store one more fp16 scale per row

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"layer name must be a non-empty string, got {self.name!r}")
        for attr in ("n_params", "in_features", "out_features", "macs_per_step"):
            value = as_int(getattr(self, attr), f"{self.name}.{attr}")
            if value <= 0:
                raise PlanError(f"{self.name}.{attr} must be positive, got {value}")
            object.__setattr__(self, attr, value)
        if self.n_params != self.in_features * self.out_features:
            raise PlanError(
                f"{self.name}: n_params {self.n_params} != in_features*out_features "
                f"{self.in_features}*{self.out_features}; pass the weight's element count"
            )
        if self.group_size is not None:
            group = as_int(self.group_size, f"{self.name}.group_size")
            if group <= 0:
                raise PlanError(f"{self.name}.group_size must be positive or None, got {group}")
            object.__setattr__(self, "group_size", group)

    @property
    def n_groups(self) -> int:
        """Scale groups along the input dimension (1 for per-channel scales)."""
        return 1 if self.group_size is None else -(-self.in_features // self.group_size)


def validate_segments(segments: Any, num_steps: int, what: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(segments, (list, tuple)) or not segments:
        raise PlanError(f"{what}.segments must be a non-empty list of [start, end) pairs, got {segments!r}")
    out: list[tuple[int, int]] = []
    expected_start = 0
    for i, pair in enumerate(segments):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise PlanError(f"{what}.segments[{i}] must be a [start, end) pair, got {pair!r}")
        start, end = as_int(pair[0], f"{what}.segments[{i}][0]"), as_int(pair[1], f"{what}.segments[{i}][1]")
        if start != expected_start or end <= start:
            raise PlanError(
                f"{what}.segments must be contiguous non-empty ranges from step 0: segment {i} is "
                f"[{start}, {end}) but should start at {expected_start}; re-run `adatsq plan`"
            )
        out.append((start, end))
        expected_start = end
    if expected_start != num_steps:
        raise PlanError(f"{what}.segments end at step {expected_start} but num_steps is {num_steps}")
    return tuple(out)


def check_keys(data: Any, allowed: set[str], where: str) -> None:
    """Exactly the `allowed` keys: unknown ones are typos or a newer format, missing ones a truncated file."""
    if not isinstance(data, Mapping):
        raise PlanError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PlanError(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(allowed - set(data))
    if missing:
        raise PlanError(f"{where} is missing keys {missing}")


def check_version(data: Any, where: str) -> None:
    """Checked before the keys, so a file from another format version says so instead of 'unknown key'."""
    if isinstance(data, Mapping) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise PlanError(
            f"{where}: format_version {data['format_version']!r} is not supported (this adatsq reads "
            f"{FORMAT_VERSION}); re-run the search with this version of adatsq"
        )


def _act_bits(value: Any, layer_names: Sequence[str], what: str) -> int | dict[str, int]:
    if isinstance(value, Mapping):
        if set(value) != set(layer_names):
            missing = sorted(set(layer_names) - set(value))[:5]
            extra = sorted(set(value) - set(layer_names))[:5]
            raise PlanError(f"{what}.act_bits must name every layer: missing {missing}, extra {extra}")
        return {name: _bits(value[name], f"{what}.act_bits[{name!r}]", ACT_BITS) for name in layer_names}
    return _bits(value, f"{what}.act_bits", ACT_BITS)


def _metrics(value: Any, what: str) -> dict[str, float | int | None]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{what}.metrics must be an object of numbers, got {type(value).__name__}")
    out: dict[str, float | int | None] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise PlanError(f"{what}.metrics keys must be strings, got {key!r}")
        if item is None:
            out[key] = None
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            out[key] = int(item)
        else:
            out[key] = as_float(item, f"{what}.metrics[{key!r}]")
    return out


@dataclass(frozen=True)
class PartialPlan:
    """Bits for segments 0..last_segment (later segments run at full precision): what `measure` scores."""

    bits: dict[str, tuple[int, ...]]
    act_bits: int | dict[str, int]
    segments: tuple[tuple[int, int], ...]  # all segments of the sampler, not only the covered ones

    @property
    def last_segment(self) -> int:
        return len(next(iter(self.bits.values()))) - 1

    @property
    def end_step(self) -> int:
        """First sampler step after the covered segments: compare trajectories at this point."""
        return self.segments[self.last_segment][1]

    @property
    def is_complete(self) -> bool:
        return self.last_segment == len(self.segments) - 1


def _plan_layers(value: Any, n_seg: int) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping) or not value:
        raise PlanError("plan.layers must be a non-empty object {layer name: [bits per segment]}")
    layers: dict[str, tuple[int, ...]] = {}
    for name, row in value.items():
        if not isinstance(name, str) or not name:
            raise PlanError(f"plan.layers keys must be layer names, got {name!r}")
        if not isinstance(row, (list, tuple, np.ndarray)) or len(row) != n_seg:
            raise PlanError(
                f"plan.layers[{name!r}] must list {n_seg} bit-widths (one per segment), got {row!r}"
            )
        layers[name] = tuple(_bits(b, f"plan.layers[{name!r}][{s}]") for s, b in enumerate(row))
    return layers


def _plan_candidates(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise PlanError(f"plan.candidates must be a non-empty list of bits, got {value!r}")
    candidates = tuple(_bits(b, "plan.candidates") for b in value)
    if list(candidates) != sorted(set(candidates)):
        raise PlanError(f"plan.candidates must be ascending and unique, got {list(candidates)}")
    return candidates


def _plan_fisher_weights(value: Any, n_seg: int) -> list[float]:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n_seg:
        raise PlanError(f"plan.fisher_weights must list {n_seg} numbers (one per segment)")
    weights = [as_float(w, f"plan.fisher_weights[{i}]") for i, w in enumerate(value)]
    if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-3:
        raise PlanError(f"plan.fisher_weights must be non-negative and sum to 1, got {weights}")
    return weights


def _plan_model(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not {"family", "fingerprint"} <= set(value):
        raise PlanError("plan.model must be an object with at least 'family' and 'fingerprint'")
    model = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise PlanError(f"plan.model must map strings to strings, got {key!r}: {item!r}")
        model[key] = item
    return model


FISHER_METHODS = ("gradient", "perturbation", "uniform", "plan", "unrecorded")  # how weights were made


@dataclass(frozen=True)
class Plan:
    """Weight bits per layer and segment, with everything needed to check it against a model and sampler.

    Construction validates and canonicalises (tuples of Python ints), so `load_plan(save_plan(p)) == p`.
    Treat the dicts as read-only.
    """

    layers: dict[str, tuple[int, ...]]  # layer name -> bits per segment
    segments: list[tuple[int, int]]  # sampler step ranges [start, end) per segment
    num_steps: int
    act_bits: int | dict[str, int]  # one value, or one per layer
    candidates: tuple[int, ...]  # bits the search could choose (pinned layers may sit outside)
    fisher_weights: list[float]  # per segment, normalised; already folded into the error table
    model: dict[str, str]  # at least "family" and "fingerprint"
    budget: Budget | None = None
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    fisher_method: str = "unrecorded"  # how fisher_weights were estimated (plans before 0.2 lack it)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        what = "plan"
        version = as_int(self.format_version, "plan.format_version")
        if version != FORMAT_VERSION:
            raise PlanError(
                f"plan format_version {version} is not supported (this adatsq reads {FORMAT_VERSION}); "
                "re-run the plan search with this version"
            )
        num_steps = as_int(self.num_steps, "plan.num_steps")
        segments = validate_segments(self.segments, num_steps, what)
        n_seg = len(segments)
        layers = _plan_layers(self.layers, n_seg)
        candidates = _plan_candidates(self.candidates)
        weights = _plan_fisher_weights(self.fisher_weights, n_seg)
        model = _plan_model(self.model)
        if self.fisher_method not in FISHER_METHODS:
            raise PlanError(
                f"plan.fisher_method {self.fisher_method!r} must be one of {list(FISHER_METHODS)}"
            )
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise PlanError(f"plan.budget must be a Budget or None, got {type(self.budget).__name__}")
        for attr, value in (
            ("format_version", version),
            ("num_steps", num_steps),
            ("segments", list(segments)),
            ("layers", layers),
            ("act_bits", _act_bits(self.act_bits, list(layers), what)),
            ("candidates", candidates),
            ("fisher_weights", weights),
            ("model", model),
            ("metrics", _metrics(self.metrics, what)),
        ):
            object.__setattr__(self, attr, value)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def bits_array(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Bits as an int array [L, S] in `names` order (default: the plan's order)."""
        names = self.layer_names if names is None else list(names)
        return np.array([self.layers[name] for name in names], dtype=np.int64).reshape(len(names), -1)

    def act_bits_of(self, name: str) -> int:
        return self.act_bits[name] if isinstance(self.act_bits, dict) else self.act_bits

    def variants(self, name: str) -> tuple[int, ...]:
        """Distinct bit-widths of one layer: the quantized copies its checkpoint stores."""
        return tuple(sorted(set(self.layers[name])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model": dict(self.model),
            "num_steps": self.num_steps,
            "segments": [list(pair) for pair in self.segments],
            "fisher_weights": list(self.fisher_weights),
            "candidates": list(self.candidates),
            "act_bits": dict(self.act_bits) if isinstance(self.act_bits, dict) else self.act_bits,
            "budget": None if self.budget is None else self.budget.to_dict(),
            "metrics": dict(self.metrics),
            "fisher_method": self.fisher_method,
            "layers": {name: list(row) for name, row in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        keys = {"format_version", "model", "num_steps", "segments", "fisher_weights", "candidates"}
        keys |= {"act_bits", "budget", "metrics", "layers", "fisher_method"}
        check_version(data, where)
        if isinstance(data, Mapping):
            data = {"fisher_method": "unrecorded", **data}  # optional: older plans do not record it
        check_keys(data, keys, where)
        budget = None if data["budget"] is None else Budget.from_dict(data["budget"], f"{where}.budget")
        return cls(**{**data, "budget": budget})


def dumps_json(data: Mapping[str, Any]) -> str:
    """JSON with short number lists on one line (plan rows stay readable); floats keep full precision."""
    text = json.dumps(data, indent=2, allow_nan=False)
    number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
    pattern = re.compile(rf"\[\s*({number}(?:,\s*{number})*)\s*\]")
    return pattern.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{what} file {str(path)!r} does not exist; run the plan search first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{what} file {str(path)!r} is not valid JSON ({exc}); regenerate it") from exc


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write plan.json atomically."""
    return atomic_write_text(path, dumps_json(plan.to_dict()))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate plan.json; every problem is a PlanError naming the key and the fix."""
    return Plan.from_dict(read_json(path, "plan"), where=str(path))


def check_plan_matches(plan: Plan, layer_names: Sequence[str], num_steps: int) -> None:
    """Fail unless `plan` covers exactly `layer_names` and was made for a `num_steps`-step sampler."""
    missing = [name for name in layer_names if name not in plan.layers]
    extra = [name for name in plan.layers if name not in set(layer_names)]
    if missing or extra:
        raise PlanError(
            f"plan does not match the model's quantizable layers: {len(missing)} missing "
            f"{missing[:10]}, {len(extra)} extra {extra[:10]}; re-run the plan search on this model "
            f"(plan model: {plan.model})"
        )
    num_steps = as_int(num_steps, "num_steps")
    if num_steps != plan.num_steps:
        raise PlanError(
            f"plan segments {plan.segments} were searched for a {plan.num_steps}-step sampler but it runs "
            f"{num_steps} steps; sample with {plan.num_steps} steps or re-run the plan search for {num_steps}"
        )
