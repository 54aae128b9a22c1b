"""Temporal Fisher weights (calibrate/fisher.py) on a tiny random reference DiT."""

import pytest
import torch

from adatsq.calibrate.fisher import fisher_weights
from adatsq.errors import CalibrationError
from adatsq.models.reference.adapter import ReferenceAdapter


class NoGrad(ReferenceAdapter):
    """A sampler that drops the autograd graph, as diffusers pipelines do (@torch.no_grad)."""

    def generate(self, inputs, seed, num_steps, step_callback=None):
        self.runs = getattr(self, "runs", 0) + 1
        with torch.no_grad():
            return super().generate(inputs, seed, num_steps, step_callback)


def test_fisher_weights_sum_to_one_and_estimators_agree(tiny_adapter):
    adapter = tiny_adapter()
    grad, method = fisher_weights(adapter, [1, 2], 4, progress=False)
    assert method == "gradient" and abs(float(grad.sum()) - 1) < 1e-5 and bool((grad > 0).all())
    fd, method = fisher_weights(adapter, [1, 2], 4, epsilon=1e-3, progress=False, method="perturbation")
    assert method == "perturbation"
    assert torch.allclose(fd, grad, atol=0.08), (fd, grad)


def test_a_gradient_estimate_the_sampler_cannot_give_is_an_error_not_a_silent_fallback(tiny_adapter):
    no_grad = NoGrad(tiny_adapter().pipeline)
    with pytest.raises(CalibrationError, match="fisher_method to perturbation"):
        fisher_weights(no_grad, [1, 2], 4, progress=False, method="gradient")


def test_auto_decides_before_any_run(tiny_adapter):
    no_grad = NoGrad(tiny_adapter().pipeline)
    no_grad.differentiable = False  # what the diffusers adapter declares
    _, method = fisher_weights(no_grad, [1, 2], 4, progress=False)
    assert method == "perturbation"
    assert no_grad.runs == 1 + 4  # the clean run + one pushed run per step: no wasted gradient attempt
