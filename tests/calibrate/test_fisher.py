"""Temporal Fisher weights (calibrate/fisher.py) on a tiny random reference DiT."""

import torch

from adatsq.calibrate.fisher import fisher_weights
from adatsq.models.reference.adapter import ReferenceAdapter


def test_fisher_weights_sum_to_one_and_estimators_agree(tiny_adapter):
    adapter = tiny_adapter()
    grad, method = fisher_weights(adapter, [1, 2], 4, progress=False)
    assert method == "gradient" and abs(float(grad.sum()) - 1) < 1e-5 and bool((grad > 0).all())

    class NoGrad(ReferenceAdapter):
        def generate(self, inputs, seed, num_steps, step_callback=None):
            with torch.no_grad():
                return super().generate(inputs, seed, num_steps, step_callback)

    fd, method = fisher_weights(NoGrad(adapter.pipeline), [1, 2], 4, epsilon=1e-3, progress=False)
    assert method == "perturbation"
    assert torch.allclose(fd, grad, atol=0.08), (fd, grad)
