"""Temporal Fisher weights: how strongly an error in the denoiser's output at step t moves the final sample.

For a Gaussian likelihood on the final sample x₀, the Fisher information of an additive perturbation δ_t
of the denoiser output at step t is J_tᵀJ_t (J_t = ∂x₀/∂δ_t); its trace is estimated without bias from
squared gradients of ⟨v, x₀⟩ with random probes v ~ N(0, I) (Hutchinson), averaged over calibration
inputs: w_t ∝ E_v ‖J_tᵀ v‖². When the sampler cannot backpropagate (diffusers pipelines run under
no_grad) the same quantity is estimated by finite differences: w_t ∝ E ‖x₀(δ_t = εz) − x₀‖² / ε².
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.distributed import merge_owned, shard
from adatsq.calibrate.record import batches
from adatsq.core.plots import new_figure, save_figure
from adatsq.core.progress import tqdm_disable
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter


def _map_output(output: Any, fn: Any) -> Any:
    """Apply `fn` to the predicted sample(s) of a denoiser output (tensor, tuple, list or .sample)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (_map_output(output[0], fn), *output[1:])
    if isinstance(output, list):  # Z-Image: one tensor per sample
        return [fn(t) for t in output]
    output.sample = fn(output.sample)
    return output


class _OutputProbe:
    """Adds an offset to the denoiser output of every call, tagged with the sampler step it belongs to.

    Steps are counted by the sampler's step callback, not by calls: pipelines that call the denoiser
    twice per step (true CFG) or return one tensor per sample are handled alike.
    """

    def __init__(self, denoiser: nn.Module, push: tuple[int, float] | None = None, seed: int = 0) -> None:
        self.push = push  # (step, epsilon): finite-difference mode; None: zero offsets that track grads
        self.step = 0
        self.deltas: list[tuple[int, torch.Tensor]] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.handle = denoiser.register_forward_hook(
            lambda module, args, output: _map_output(output, self._shift)
        )

    def after_step(self, step_index: int, latents: torch.Tensor) -> None:
        self.step = step_index + 1

    def _shift(self, sample: torch.Tensor) -> torch.Tensor:
        if self.push is None:
            delta = torch.zeros_like(sample, requires_grad=torch.is_grad_enabled())
            self.deltas.append((self.step, delta))
            return sample + delta
        step, epsilon = self.push
        if step != self.step:
            return sample
        return sample + epsilon * torch.randn(sample.shape, generator=self.generator).to(sample)


def _gradient_sensitivity(
    adapter: ModelAdapter, chunk: Sequence[Any], seed: int, num_steps: int
) -> torch.Tensor | None:
    """Squared probe gradients summed per sampler step; None when the sampler does not track gradients."""
    probe = _OutputProbe(adapter.denoiser())
    try:
        with torch.enable_grad():
            final = adapter.generate(chunk, seed=seed, num_steps=num_steps, step_callback=probe.after_step)
            if not final.requires_grad:
                return None
            v = torch.randn(final.shape, generator=torch.Generator().manual_seed(seed + 7919))
            grads = torch.autograd.grad((final * v).sum(), [d for _, d in probe.deltas], allow_unused=True)
    finally:
        probe.handle.remove()
    out = torch.zeros(num_steps, dtype=torch.float64)
    for (step, _), g in zip(probe.deltas, grads, strict=True):
        if g is not None:
            out[step] += float(g.double().pow(2).sum())
    return out


def _perturbation_sensitivity(
    adapter: ModelAdapter, chunk: Sequence[Any], seed: int, num_steps: int, epsilon: float
) -> torch.Tensor:
    """‖x₀(pushed at step t) − x₀‖² / ε² for each step t: one extra sampling run per step."""
    with torch.no_grad():
        clean = adapter.generate(chunk, seed=seed, num_steps=num_steps)
        out = torch.zeros(num_steps, dtype=torch.float64)
        for step in range(num_steps):
            probe = _OutputProbe(adapter.denoiser(), (step, epsilon), seed=seed + step)
            try:
                pushed = adapter.generate(
                    chunk, seed=seed, num_steps=num_steps, step_callback=probe.after_step
                )
            finally:
                probe.handle.remove()
            out[step] = float((pushed - clean).double().pow(2).sum()) / epsilon**2
    return out


def fisher_weights(
    adapter: ModelAdapter,
    inputs: Sequence[Any],
    num_steps: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    epsilon: float = 1e-2,
    progress: bool = True,
    method: str = "auto",
) -> tuple[torch.Tensor, str]:
    """Per-step weights [num_steps] summing to 1, and the estimator used ("gradient" or "perturbation").

    `method` "auto" picks gradient when the adapter's sampler is differentiable, else perturbation;
    "gradient" on a sampler that drops the graph is an error (never a silent second run).
    """
    if not inputs:
        raise CalibrationError("the calibration set is empty; Fisher weights need at least one input")
    if method not in ("auto", "gradient", "perturbation"):
        raise CalibrationError(f"Fisher method {method!r}: use auto, gradient or perturbation")
    requested = method
    if method == "auto":
        method = "gradient" if adapter.differentiable else "perturbation"
    per_batch: dict[int, torch.Tensor] = {}
    for i, chunk in tqdm(
        shard(batches(inputs, batch_size)), desc="fisher", unit="batch", disable=tqdm_disable(progress)
    ):
        if method == "gradient":
            per_step = _gradient_sensitivity(adapter, chunk, seed + i, num_steps)
            if per_step is None:
                raise CalibrationError(
                    f"planner.fisher_method {requested!r}: the {adapter.family} sampler did not keep "
                    "gradients; set planner.fisher_method to perturbation"
                )
        else:
            per_step = _perturbation_sensitivity(adapter, chunk, seed + i, num_steps, epsilon)
        per_batch[i] = per_step.double()
    (per_batch,) = merge_owned(per_batch)
    total = torch.zeros(num_steps, dtype=torch.float64)
    for i in sorted(per_batch):  # global batch order whatever the number of processes: the same sum
        total += per_batch[i]
    if not bool(torch.isfinite(total).all()) or float(total.sum()) <= 0:
        raise CalibrationError("Fisher sensitivities are zero or non-finite; check the sampler and inputs")
    return (total / total.sum()).float(), method


def segment_weights(step_weights: torch.Tensor, step_ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Sum of the per-step weights inside each segment (still sums to 1)."""
    return torch.stack([step_weights[start:end].sum() for start, end in step_ranges])


def plot_fisher(step_weights: torch.Tensor, timesteps: Sequence[float], path: Any, title: str = "") -> None:
    """Sensitivity vs timestep, as users read it (noisy steps on the left)."""
    fig = new_figure(6, 3.2)
    ax = fig.subplots()
    ax.bar(range(len(step_weights)), step_weights.tolist(), color="#3a6ea5")
    ax.set_xticks(range(len(timesteps)), [f"{t:.0f}" for t in timesteps], rotation=90, fontsize=7)
    ax.set_xlabel("timestep (sampler order)")
    ax.set_ylabel("Fisher weight")
    ax.set_title(title or "Temporal Fisher weights")
    save_figure(fig, path)
