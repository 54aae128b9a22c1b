"""Measured end-to-end error of partial plans: real quantized layers run along the sampler's trajectory.

Three things keep a measurement cheap without changing its value:
- variants wait packed on the host; a measurement builds only the quantized layers its partial plan
  uses (TimestepQuantLinear of the rows' distinct bit-widths) on the layers' device and drops them
  afterwards;
- the measure inputs run in batches of `calibration.batch_size` (batch i seeded seed + i, as in
  calibration), so the meter's activations are those of a calibration batch, not of all inputs at once;
- restarts: every measured run keeps the denoiser's outputs. A partial plan whose first j segments
  equal those of a measured one (in a beam, every child of a path) hands the sampler those outputs for
  the steps of segments 0..j-1 instead of running the denoiser, so the sampler reaches the very same
  latents bit for bit and the denoiser only runs from segment j on. The sampler's own arithmetic, noise
  and callbacks still run, which is what keeps this exact for any sampler, stochastic ones included.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from adatsq.calibrate.record import batches
from adatsq.calibrate.segments import install_segment_hook
from adatsq.core.modules import set_module
from adatsq.engine.calibration import Calibration
from adatsq.engine.solve import Variant
from adatsq.errors import CalibrationError
from adatsq.plan.schema import PartialPlan
from adatsq.quant.linear import TimestepQuantLinear
from adatsq.recipe import Recipe

# One denoiser call of one batch: its sampler step and its output (a host-side detached copy).
Outputs = list[tuple[int, Any]]


class _StopSampling(Exception):
    """Raised from the step callback once the segments a partial plan covers have run."""


def _detached(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class TrajectoryMeter:
    """Measures partial plans by running the real quantized layers against the float trajectory."""

    def __init__(
        self,
        calibration: Calibration,
        variants: dict[str, dict[int, Variant]],
        recipe: Recipe,
        inputs: Sequence[Any],
        seed: int,
        cache_bytes: int = 4 * 2**30,
    ) -> None:
        self.adapter, self.segments, self.seed = calibration.adapter, calibration.segments, seed
        self.batches = batches(list(inputs), recipe.calibration.batch_size)
        self.num_steps = len(self.segments.timesteps)
        self.variants, self.act = variants, recipe.activation
        self.biases = {
            name: None if linear.bias is None else linear.bias.detach().clone()
            for name, linear in calibration.layers.items()
        }
        self.devices = {name: linear.weight.device for name, linear in calibration.layers.items()}
        self.cache_bytes = cache_bytes
        self.cache: OrderedDict[bytes, list[Outputs]] = OrderedDict()  # prefix key → outputs per batch
        self.reference = [self._run(i, None, 0, None)[0] for i in range(len(self.batches))]
        self.calls = 0
        self.denoiser_calls = 0  # denoiser calls measurements really ran (restarted steps not counted)

    def _run(
        self, batch: int, replayed: Outputs | None, start_step: int, stop_after: int | None
    ) -> tuple[dict[int, torch.Tensor], Outputs]:
        """Sample one batch; denoiser calls before `start_step` return `replayed` outputs instead.

        A measurement (`stop_after` given) keeps the latents of its last step and every call's output;
        the reference run keeps the latents of every step and no outputs.
        """
        measuring = stop_after is not None
        latents: dict[int, torch.Tensor] = {}
        outputs: Outputs = []
        pending: Iterator[tuple[int, Any]] = iter(replayed or [])
        denoiser = self.adapter.denoiser()
        forward = denoiser.forward
        own = denoiser.__dict__.get("forward")  # an instance-level forward (e.g. offload hooks) stays

        def call(*args: Any, **kwargs: Any) -> Any:
            step = self.segments.step_of(self.adapter.timestep_of(args, kwargs))
            if step < start_step:
                recorded_step, output = next(pending, (None, None))
                if recorded_step != step:
                    raise CalibrationError(
                        f"the sampler called the denoiser at step {step} where the measured run it "
                        f"restarts from was at step {recorded_step}; restarts need a sampler that calls "
                        "the denoiser in the same order for the same inputs and seed"
                    )
                outputs.append((step, output))  # shared with the parent's entry, never handed out
                return _detached(output)
            result = forward(*args, **kwargs)
            if measuring:
                self.denoiser_calls += 1
                outputs.append((step, _detached(result)))
            return result

        def record(step: int, x: torch.Tensor) -> None:
            if not measuring or step + 1 == stop_after:
                latents[step] = x.detach().clone()
            if measuring and step + 1 >= stop_after:
                raise _StopSampling

        denoiser.forward = call
        try:
            with torch.no_grad():
                self.adapter.generate(
                    self.batches[batch],
                    seed=self.seed + batch,
                    num_steps=self.num_steps,
                    step_callback=record,
                )
        except _StopSampling:
            pass
        finally:
            if own is None:
                del denoiser.forward
            else:
                denoiser.forward = own
        return latents, outputs

    @staticmethod
    def _key(partial: PartialPlan, segments: int) -> bytes:
        """The plan's columns of its first `segments` segments (bits fit a byte)."""
        return b"".join(bytes(row[s] for row in partial.bits.values()) for s in range(segments))

    def _restart(self, partial: PartialPlan) -> tuple[int, list[Outputs] | None]:
        """The most segments this plan shares with a measured one, and that run's outputs."""
        for shared in range(partial.last_segment + 1, 0, -1):
            outputs = self.cache.get(self._key(partial, shared))
            if outputs is not None:
                self.cache.move_to_end(self._key(partial, shared))
                return shared, outputs
        return 0, None

    def _keep(self, key: bytes, outputs: list[Outputs]) -> None:
        self.cache[key] = outputs
        self.cache.move_to_end(key)
        total = sum(_nbytes(o) for entry in self.cache.values() for o in entry)  # shared tensors count twice
        while total > self.cache_bytes and len(self.cache) > 1:
            _, dropped = self.cache.popitem(last=False)
            total -= sum(_nbytes(o) for o in dropped)

    def _swap_in(self, partial: PartialPlan) -> dict[str, TimestepQuantLinear]:
        """Quantized layers of the plan's rows, built from the packed variants they use."""
        denoiser = self.adapter.denoiser()
        tail = self.segments.count - partial.last_segment - 1
        modules = {}
        for name, row in partial.bits.items():
            full_row = tuple(row) + (row[-1],) * tail
            variants = {b: self.variants[name][b] for b in sorted(set(full_row))}
            device = self.devices[name]
            quantized = [v.to(device).module(self.biases[name], self.act) for v in variants.values()]
            modules[name] = TimestepQuantLinear(quantized, full_row)
            set_module(denoiser, name, modules[name])
        return modules

    def __call__(self, partial: PartialPlan) -> float:
        denoiser = self.adapter.denoiser()
        previous = {name: denoiser.get_submodule(name) for name in partial.bits}  # restored afterwards
        modules = self._swap_in(partial)

        def on_call(segment: int, step: int) -> None:
            for module in modules.values():
                module.set_segment(segment)

        shared, cached = self._restart(partial)
        end = partial.end_step
        start_step = end if shared > partial.last_segment else self.segments.step_ranges[shared][0]
        handle = install_segment_hook(self.adapter, self.segments, on_call)
        squared, count, runs = 0.0, 0, []
        try:
            for i in range(len(self.batches)):
                replayed = cached[i] if cached is not None else None
                latents, outputs = self._run(i, replayed, start_step if cached is not None else 0, end)
                diff = (latents[end - 1] - self.reference[i][end - 1]).double()
                squared, count = squared + float(diff.pow(2).sum()), count + diff.numel()
                runs.append(outputs)
        finally:
            handle.remove()
            for name, module in previous.items():  # a model quantized meanwhile stays quantized
                set_module(denoiser, name, module)
        self._keep(self._key(partial, partial.last_segment + 1), runs)
        self.calls += 1
        return squared / count
