"""Streaming capture of per-layer, per-segment activation statistics during calibration sampling.

The hooks only call pure accumulators: activations are folded into float32 XᵀX sums in place as they
pass (one `addmm_`, no [in, in] temporary) and never stored, so memory is 4 · in² bytes per accumulator
slot whatever the number of samples. Means and Fisher-weighted sums are formed in float64 per layer, at
solve time (`LayerStats.hessian`). Layers that read one input share one accumulator; an input with the
same values at every step (cross-attention text: models.layers.is_time_invariant) has a single slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adatsq.calibrate.distributed import reduce_
from adatsq.errors import CalibrationError
from adatsq.models.layers import is_time_invariant, shared_input_groups


def accumulate_hessian(H: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add the rows of `x` (any leading shape, last dim = in_features) to the float32 XᵀX sum `H`.

    XᵀX is a sum of positive semi-definite terms (no cancellation), so float32 keeps ~6 significant
    digits over millions of rows, far below GPTQ's 1 % damping; llm-compressor accumulates in float32 too.
    """
    rows = x.reshape(-1, x.shape[-1]).to(H.dtype)
    return H.addmm_(rows.T, rows), n + rows.shape[0]


def accumulate_absmax(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-input-channel running max of |x| (what channel smoothing needs)."""
    return torch.maximum(m, x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(m.dtype))


@dataclass
class LayerStats:
    """Statistics of one Linear layer's inputs, one slot per timestep segment."""

    xtx: torch.Tensor  # [G, in, in] float32 sums of XᵀX, or [1, in, in] for a time-invariant input
    tokens: torch.Tensor  # [G] int64 rows accumulated per segment
    absmax: torch.Tensor  # [G, in] float32 max |x| per channel

    @property
    def time_invariant(self) -> bool:
        """One slot for every segment: the input's values do not depend on the step."""
        return self.xtx.shape[0] != self.tokens.shape[0]

    def hessian(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_s w_s · XᵀX_s / n_s in float64: per-segment means, weighted (Fisher) or averaged (weights=None).

        Weights sum to 1, so a time-invariant input (every segment's mean the same) gives its one mean.
        """
        filled = self.tokens > 0
        if weights is None:
            weights = filled.to(torch.float64) / filled.sum()
        weights = weights.to(torch.float64)
        if bool((weights[~filled] > 0).any()):
            raise CalibrationError("a timestep segment with weight > 0 received no calibration tokens")
        if self.time_invariant:
            return self.segment_hessian(0)
        H = torch.zeros(self.xtx.shape[1:], dtype=torch.float64, device=self.xtx.device)
        for s in torch.nonzero(filled & (weights > 0)).flatten().tolist():
            H.add_(self.xtx[s], alpha=float(weights[s]) / int(self.tokens[s]))  # no float64 copy of a slot
        return H

    def segment_hessian(self, segment: int) -> torch.Tensor:
        """Mean XᵀX of one segment, float64 (a time-invariant input: its one mean)."""
        slot, count = (0, self.tokens.sum()) if self.time_invariant else (segment, self.tokens[segment])
        return self.xtx[slot].to(torch.float64, copy=True).div_(max(int(count), 1))  # one [in, in] copy


def distinct(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """One entry per accumulator: layers that share an input share their LayerStats (first name kept)."""
    seen: dict[int, str] = {}
    return {seen.setdefault(id(st), name): st for name, st in stats.items() if id(st) not in seen}


class _SharedInput:
    """Layers that read one input tensor (q/k/v, ...): one accumulator, filled by whichever runs first."""

    def __init__(self, members: tuple[str, ...], stats: LayerStats) -> None:
        self.members, self.stats = members, stats
        self.slots = stats.xtx.shape[0]
        self.call = -1  # the denoiser call whose input was last accumulated
        self.input: torch.Tensor | None = None


class StatsCapture:
    """Forward pre-hooks on the given layers; `set_position` is called once per denoiser call.

    Layers that read the same input tensor (models.layers.shared_input_groups) share one LayerStats:
    its XᵀX is computed once per call, and every other member checks it really got that very tensor.
    A time-invariant group (models.layers.is_time_invariant) gets one slot for all segments.
    """

    def __init__(self, layers: dict[str, nn.Linear], segments: int) -> None:
        if not layers:
            raise CalibrationError("no Linear layer was selected for calibration; check the recipe's targets")
        self.layers = layers
        self.segment = 0
        self.step = 0
        self.call = 0
        self.groups: dict[str, _SharedInput] = {}
        for members in shared_input_groups(list(layers)):
            m = layers[members[0]]
            slots = 1 if is_time_invariant(members) else segments
            stats = LayerStats(  # on the layer's device: activations never leave the accelerator
                xtx=torch.zeros(slots, m.in_features, m.in_features, device=m.weight.device),
                tokens=torch.zeros(segments, dtype=torch.int64, device=m.weight.device),
                absmax=torch.zeros(segments, m.in_features, device=m.weight.device),
            )
            group = _SharedInput(members, stats)
            self.groups.update(dict.fromkeys(members, group))
        self.stats = {name: self.groups[name].stats for name in layers}
        self._handles: list = []

    def set_position(self, segment: int, step: int) -> None:
        self.segment, self.step = segment, step
        self.call += 1

    def __enter__(self) -> StatsCapture:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for group in self.groups.values():
            group.input = None

    def _hook_for(self, name: str):
        group = self.groups[name]

        def hook(module: nn.Module, args: tuple) -> None:
            if len(group.members) > 1:
                if group.call == self.call:  # a sibling already accumulated this call's input
                    if not _same_tensor(args[0], group.input):
                        raise CalibrationError(
                            f"layers {list(group.members)} were expected to read one input tensor, but "
                            f"{name!r} got another; this model needs its own sharing rule "
                            "(adatsq.models.layers.shared_input_groups)"
                        )
                    return
                group.call, group.input = self.call, args[0]
            x = args[0].detach()
            if not bool(torch.isfinite(x).all()):
                raise CalibrationError(
                    f"non-finite (NaN/inf) activations enter layer {name!r} at sampler step {self.step}; "
                    "check the model's dtype / calibration inputs"
                )
            stats, s = group.stats, self.segment
            _, n = accumulate_hessian(stats.xtx[min(s, group.slots - 1)], 0, x)
            stats.tokens[s] += n
            stats.absmax[s] = accumulate_absmax(stats.absmax[s], x)

        return hook

    def finish(self, *, summed_over_ranks: bool) -> dict[str, LayerStats]:
        """The statistics, checked to be filled; data-parallel runs first sum them over every process.

        Owner-rank passes (engine/passes.py) pass False: each rank holds its own layers' sums whole.
        """
        if summed_over_ranks:
            for stats in distinct(self.stats).values():
                reduce_(stats.xtx)
                reduce_(stats.tokens)
                reduce_(stats.absmax, op="max")
        self.check_filled()
        return self.stats

    def check_filled(self) -> None:
        """A phase that did nothing fails loudly: every layer must have seen tokens."""
        empty = [name for name, st in self.stats.items() if int(st.tokens.sum()) == 0]
        if empty:
            raise CalibrationError(
                f"{len(empty)} layer(s) never ran during calibration (e.g. {empty[0]!r}); "
                "they are not on the sampling path: add them to the recipe's ignore list"
            )


def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """The very same data (same storage, shape and strides), so the shared XᵀX is exact for both."""
    return (
        b is not None
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )
