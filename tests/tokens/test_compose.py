"""Quantized generation and reduced understanding in one UMM, loaded with one call."""

import pytest
import torch

import adatsq
from adatsq.errors import TokenReductionError
from adatsq.models.umm.data import qa_batch
from adatsq.quant.linear import QuantLinear
from adatsq.recipe import recipe_from_dict

FAST = {"samples": 2, "steps": 4, "batch_size": 2, "segments": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    recipe = recipe_from_dict(
        {
            "method": "gptq",
            "weight": {"bits": 4, "group_size": 32},
            "activation": {"bits": 8},
            "calibration": FAST,
        }
    )
    qmodel = adatsq.quantize("umm", recipe, progress=False)
    assert all(name.startswith("model.lm.model.layers.") for name in qmodel.layers)
    out = tmp_path_factory.mktemp("umm") / "w4a8"
    qmodel.save(out)
    return out


def test_load_with_token_reduction_answers_and_generates(checkpoint):
    import numpy as np

    model = adatsq.load(checkpoint, token_reduction="g2tr", keep=0.5)
    assert sum(isinstance(m, QuantLinear) for m in model.adapter.model.lm.modules()) > 0
    batch = qa_batch(np.random.default_rng(0), 3, split="test")
    answer = model.answer(batch.images, batch.questions)
    n = model.reduction.n
    assert all(k.shape == (3, round(n * 0.5)) for k in answer.kept.values())
    assert set(answer.logits) == set(batch.questions)
    images = model.generate(["draw 3 top-left"], seed=0, steps=2)
    assert images.shape[-2:] == batch.images.shape[-2:]


def test_generation_tokens_are_not_reduced_unless_forced(checkpoint):
    model = adatsq.load(checkpoint, token_reduction="g2tr", keep=0.5)
    prompts = torch.tensor([[0, 0, 0]])
    with pytest.raises(TokenReductionError, match="never reduced by default"):
        model.reduction.generate(prompts, prompts, steps=1, reducer="g2tr", keep=0.5)


def test_token_reduction_on_a_dit_is_refused(tmp_path):
    recipe = recipe_from_dict({"method": "rtn", "weight": {"bits": 8}, "calibration": FAST})
    adatsq.quantize("reference", recipe, progress=False).save(tmp_path / "dit")
    with pytest.raises(TokenReductionError, match="no understanding tokens"):
        adatsq.load(tmp_path / "dit", token_reduction="g2tr")
