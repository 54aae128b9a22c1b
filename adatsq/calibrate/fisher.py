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

from adatsq.calibrate.distributed import reduce_, shard
from adatsq.calibrate.runner import batches
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter
from adatsq.plots import new_figure, save_figure


class _OutputProbe:
    """Forward hook adding a per-call offset to the denoiser output (zero, or a finite-difference push)."""

    def __init__(self, denoiser: nn.Module, offsets: dict[int, float] | None = None, seed: int = 0) -> None:
        self.offsets = offsets or {}
        self.deltas: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.handle = denoiser.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        step = len(self.deltas)
        if step in self.offsets:
            noise = torch.randn(sample.shape, generator=self.generator).to(sample)
            delta = noise * self.offsets[step]
        else:
            delta = torch.zeros_like(sample, requires_grad=torch.is_grad_enabled())
        self.deltas.append(delta)
        shifted = sample + delta
        if isinstance(output, tuple):
            return (shifted, *output[1:])
        if hasattr(output, "sample"):
            output.sample = shifted
            return output
        return shifted


def _gradient_sensitivity(
    adapter: ModelAdapter, chunk: Sequence[Any], seed: int, num_steps: int
) -> torch.Tensor | None:
    """Squared probe gradients per denoiser call; None when the sampler does not track gradients."""
    probe = _OutputProbe(adapter.denoiser())
    try:
        with torch.enable_grad():
            final = adapter.generate(chunk, seed=seed, num_steps=num_steps)
            if not final.requires_grad:
                return None
            v = torch.randn(final.shape, generator=torch.Generator().manual_seed(seed + 7919))
            grads = torch.autograd.grad((final * v).sum(), probe.deltas, allow_unused=True)
    finally:
        probe.handle.remove()
    return torch.tensor([0.0 if g is None else float(g.double().pow(2).sum()) for g in grads])


def _perturbation_sensitivity(
    adapter: ModelAdapter, chunk: Sequence[Any], seed: int, num_steps: int, epsilon: float
) -> torch.Tensor:
    with torch.no_grad():
        clean = adapter.generate(chunk, seed=seed, num_steps=num_steps)
        out = torch.zeros(num_steps)
        for step in range(num_steps):
            probe = _OutputProbe(adapter.denoiser(), {step: epsilon}, seed=seed + step)
            try:
                pushed = adapter.generate(chunk, seed=seed, num_steps=num_steps)
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
) -> tuple[torch.Tensor, str]:
    """Per-step weights [num_steps] summing to 1, and the estimator used ("gradient" or "perturbation")."""
    if not inputs:
        raise CalibrationError("the calibration set is empty; Fisher weights need at least one input")
    total, method = torch.zeros(num_steps, dtype=torch.float64), "gradient"
    for i, chunk in tqdm(
        shard(batches(inputs, batch_size)), desc="fisher", unit="batch", disable=not progress
    ):
        per_step = (
            _gradient_sensitivity(adapter, chunk, seed + i, num_steps) if method == "gradient" else None
        )
        if per_step is None:
            method = "perturbation"
            per_step = _perturbation_sensitivity(adapter, chunk, seed + i, num_steps, epsilon)
        if per_step.numel() != num_steps:
            raise CalibrationError(
                f"the denoiser ran {per_step.numel()} times for {num_steps} sampler steps; Fisher weights "
                "need exactly one denoiser call per step (batch classifier-free guidance into one call)"
            )
        total += per_step.double()
    reduce_(total)
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
