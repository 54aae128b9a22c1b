"""Prompt encodings computed once per run, and the components sampling stops needing moved off the device.

Calibration, the Fisher estimate and the planner's trajectory meter sample the same prompt batches many
times, and every pipeline call runs the text encoders again (T5-XXL + CLIP for Flux: ~9.5 GB on the
device; on a CPU most of a tiny model's planning time). Inside a `PromptSession` every transformers model
among the pipeline's components answers a forward it has already run (same tensors: bytes, shape and
dtype; same other arguments) from a host copy of that first output. The pipeline gets the very same
values, so latents do not change, and no family's `encode_prompt` is copied: whatever a pipeline reads
(Flux's `pooler_output`, SD3's `hidden_states[-2]`) is in the copy. Non-data objects in an output (a
decoder's KV cache, which no pipeline reads) come back as None rather than pinning device memory. Host
cost: every output tensor of each distinct batch (hidden states where a pipeline asks for them).

With the denoiser on an accelerator, the first sampling in the session is watched; after it, the cached
encoders and every module component that sampling never called (the VAE under `output_type="latent"`;
DiT decodes, so its VAE stays) move to the CPU. An encoder asked for a batch it has not seen goes back to
its device for that one forward, so its numbers are the device's and the peak never exceeds a run
without offloading. On exit every component returns to where it was and each encoder's forward is its
own again: nothing reaches a saved checkpoint or the user's pipeline. On a CPU-only run nothing moves;
only the cache works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import diffusers
import torch
import transformers
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

_HOST = torch.device("cpu")
_SCALARS = (bool, int, float, str)


def _input_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The exact identity of a forward's inputs; None when one is not plain data (nothing is cached)."""
    parts: list[tuple[Any, ...]] = []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            data = value.detach().to(_HOST).contiguous().reshape(-1).view(torch.uint8)
            parts.append((name, str(value.dtype), tuple(value.shape), data.numpy().tobytes()))
        elif value is None or isinstance(value, _SCALARS):
            parts.append((name, type(value).__name__, value))  # the type too: True == 1 as dict keys
        else:
            return None
    return tuple(parts)


def _copied(value: Any, device: torch.device) -> Any:
    """Fresh tensors on `device` (the pipeline may write into them); objects that are not data become None."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):  # ModelOutput too: rebuilt from its fields
        return type(value)(**{k: _copied(v, device) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v, device) for v in value)
    return value if value is None or isinstance(value, _SCALARS) else None


def _module_device(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return None if tensor is None else tensor.device


def _placed_by_hooks(module: nn.Module) -> bool:
    """accelerate's or diffusers' offloading (enable_model_cpu_offload, group offloading) places it."""
    return any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in module.modules())


class CachedEncoder:
    """One encoder whose forward returns host copies of the outputs it gave for the same inputs."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.own = module.__dict__.get("forward")  # an instance-level forward stays (accelerate hooks)
        self.forward = module.forward
        self.outputs: dict[tuple[Any, ...], Any] = {}
        self.home: torch.device | None = None  # where it encodes while it waits on the CPU
        module.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _input_key(args, kwargs)
        output = self.outputs.get(key) if key is not None else None
        if output is None:
            output = _copied(self._encode(args, kwargs), _HOST)
            if key is not None:
                self.outputs[key] = output
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        return _copied(output, tensors[0].device if tensors else _module_device(self.module) or _HOST)

    def _encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.home is None:
            return self.forward(*args, **kwargs)
        home = self.home
        self.module.to(home)
        try:
            on_home = tree_map(lambda t: t.to(home) if isinstance(t, torch.Tensor) else t, (args, kwargs))
            return self.forward(*on_home[0], **on_home[1])
        finally:
            self.module.to(_HOST)

    def remove(self) -> None:
        if self.own is None:
            del self.module.forward
        else:
            self.module.forward = self.own


def components_to_offload(
    devices: Mapping[str, torch.device],
    denoiser_device: torch.device,
    called: Collection[str],
    cached: Collection[str],
) -> list[str]:
    """Components (name → device, the denoiser left out) to move to the CPU once sampling was watched.

    Cached encoders go (a miss brings one back), and so does whatever the watched sampling did not
    call; nothing moves when the denoiser itself runs on the CPU or a component is there already.
    """
    if denoiser_device.type == "cpu":
        return []
    return [
        name
        for name, device in devices.items()
        if device.type not in ("cpu", "meta") and (name in cached or name not in called)
    ]


class PromptSession:
    """The pipeline's encoders cached, and the unused components on the CPU, until `close`."""

    def __init__(self, pipe: diffusers.DiffusionPipeline, denoiser: nn.Module) -> None:
        self.pipe = pipe
        self.denoiser_device = _module_device(denoiser) or _HOST
        self.movable = {
            name: module
            for name, module in pipe.components.items()
            if isinstance(module, nn.Module) and module is not denoiser and not _placed_by_hooks(module)
        }
        self.encoders = {
            name: CachedEncoder(module)
            for name, module in self.movable.items()
            if isinstance(module, transformers.PreTrainedModel) and not module.training  # dropout: random
        }
        self.offloaded: dict[str, torch.device] = {}  # name → the device it came from
        self.watch = self.denoiser_device.type != "cpu"  # on a CPU run nothing will move: nothing to learn
        self.called: set[str] | None = None  # components the watched sampling called (encoders aside)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Around one pipeline call; the first one is watched, then what it did not need is offloaded."""
        if not self.watch or self.called is not None:
            yield
            return
        called: set[str] = set()
        handles = [
            sub.register_forward_pre_hook(lambda *_, name=name: called.add(name))
            for name, module in self.movable.items()
            if name not in self.encoders
            for sub in module.modules()  # a VAE runs through decode(), never its own forward
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.called = called
        devices = {name: d for name, m in self.movable.items() if (d := _module_device(m)) is not None}
        for name in components_to_offload(devices, self.denoiser_device, called, self.encoders):
            self.offloaded[name] = devices[name]
            self.movable[name].to(_HOST)
            if name in self.encoders:
                self.encoders[name].home = devices[name]
        if self.offloaded and self.pipe._execution_device != self.denoiser_device:
            self._restore()  # an older diffusers takes its execution device from the first component

    def _restore(self) -> None:
        for name, device in self.offloaded.items():
            self.movable[name].to(device)
            if name in self.encoders:
                self.encoders[name].home = None
        self.offloaded = {}

    def close(self) -> None:
        self._restore()
        for encoder in reversed(self.encoders.values()):  # last wrapped first: one module under two names
            encoder.remove()
