"""Record every denoiser call of the calibration sampling once, then replay it for any group of layers.

Recording runs the family's own sampler and keeps a host copy of each call's inputs (latents, timestep,
text embeddings, ...) with its sampler step and timestep segment. Replaying feeds those inputs to the
denoiser again in the same order, so a pass that needs only some layers stops right after the last of
them, and the sampler, text encoders and VAE never run again. Replayed activations are the recorded
run's own, so statistics gathered over any split into passes equal one pass over everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from adatsq.calibrate.distributed import gather, shard
from adatsq.calibrate.segments import SegmentMap
from adatsq.core.progress import tqdm_disable
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter


def batches(inputs: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]


@dataclass(frozen=True)
class RecordedCall:
    """One denoiser call: where it ran in the sampler, and a host copy of what it was given."""

    batch: int  # global calibration batch index (its seed is seed + batch)
    step: int
    segment: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Recording:
    calls: list[RecordedCall] = field(default_factory=list)
    linear_order: list[str] = field(default_factory=list)  # Linear layers in the order they first ran
    first_call: list[str] = field(default_factory=list)  # every Linear run of the first call, repeats too

    def stop_point(self, needs: Mapping[str, bool]) -> tuple[str, int] | None:
        """(layer, n): a replay may stop each call after the n-th run of that layer; None when a needed
        layer is not seen in the first call (then every call runs whole).

        `needs` maps each layer whose input is accumulated to whether every run of it in a call counts
        (a layer of its own) or only its first (a shared input: siblings skip the repeats). A layer can
        run more than once per call (DiT reuses block 0's timestep embedder for its output layer): its
        statistics are complete only after its last run.
        """
        runs: dict[str, list[int]] = {}
        for i, name in enumerate(self.first_call):
            runs.setdefault(name, []).append(i)
        if any(name not in runs for name in needs):
            return None
        end = max(runs[name][-1 if every else 0] for name, every in needs.items())
        layer = self.first_call[end]
        return layer, runs[layer].index(end) + 1

    def nbytes(self) -> int:
        """Host bytes of the recorded tensors."""
        leaves = [leaf for call in self.calls for leaf in tree_flatten((call.args, call.kwargs))[0]]
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _host_copy(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t, tree)


def _device_copy(tree: Any, device: torch.device) -> Any:
    """Fresh tensors on `device` for every replay: a denoiser that writes into its inputs cannot leak."""
    return tree_map(lambda t: t.to(device, copy=True) if isinstance(t, torch.Tensor) else t, tree)


def record_calls(
    adapter: ModelAdapter,
    segments: SegmentMap,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> Recording:
    """Sample `inputs` (batch i from seed + i) and keep every denoiser call.

    With several processes each samples its share of the batches, and every process then holds the
    whole recording, ordered as one process would have recorded it.
    """
    if not inputs:
        raise CalibrationError("the calibration set is empty; give at least one prompt/label (--calib FILE)")
    recording = Recording()
    denoiser = adapter.denoiser()
    position = {"batch": 0}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = adapter.timestep_of(args, kwargs)
        step, segment = segments.step_of(t), segments.segment_of(t)
        call = RecordedCall(position["batch"], step, segment, _host_copy(args), _host_copy(kwargs))
        recording.calls.append(call)

    def first_run(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if len(recording.calls) == 1:
                recording.first_call.append(name)
            if name not in seen:
                seen.add(name)
                recording.linear_order.append(name)

        return hook

    seen: set[str] = set()
    handles = [denoiser.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [
        module.register_forward_pre_hook(first_run(name))
        for name, module in denoiser.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            for i, chunk in tqdm(
                shard(batches(inputs, batch_size)),
                desc="recording",
                unit="batch",
                disable=tqdm_disable(progress),
            ):
                position["batch"] = i
                adapter.generate(chunk, seed=seed + i, num_steps=len(segments.timesteps))
    finally:
        for handle in handles:
            handle.remove()
    return _whole(recording)


def _whole(recording: Recording) -> Recording:
    """Every process's calls in global batch order (a stable sort keeps each batch's own call order)."""
    parts = gather(recording)
    if len(parts) == 1:
        return recording
    calls = sorted((call for part in parts for call in part.calls), key=lambda call: call.batch)
    first = next((part for part in parts if part.linear_order), parts[0])
    return Recording(calls, first.linear_order, first.first_call)


class _StopReplay(Exception):
    """Raised after the last module a pass needs, so the rest of the denoiser is skipped."""


def replay(
    denoiser: nn.Module,
    recording: Recording,
    on_call: Callable[[RecordedCall], None],
    stop_after: nn.Module | None = None,
    *,
    runs: int = 1,
    progress: bool = True,
    desc: str = "replaying",
) -> None:
    """Run every recorded call through `denoiser` in recorded order; `on_call` sees each call first.

    With `stop_after`, each call ends after that module's `runs`-th run (Recording.stop_point).
    """
    device = next(denoiser.parameters()).device
    seen = {"runs": 0}

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        seen["runs"] += 1
        if seen["runs"] == runs:
            raise _StopReplay

    handle = stop_after.register_forward_hook(stop) if stop_after is not None else None
    try:
        with torch.no_grad():
            for call in tqdm(
                recording.calls, desc=desc, unit="call", disable=tqdm_disable(progress), leave=False
            ):
                on_call(call)
                seen["runs"] = 0
                with contextlib.suppress(_StopReplay):
                    denoiser(*_device_copy(call.args, device), **_device_copy(call.kwargs, device))
    finally:
        if handle is not None:
            handle.remove()
