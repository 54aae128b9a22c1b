"""Quantized generation and reduced understanding in one UMM, loaded with one call.

The shipped reference UMM's generation path is quantized with the shipped GPTQ W4A8 recipe (a small
calibration, to stay fast); loaded with G2TR at keep 0.5 it must answer held-out questions about as well
as the float model with G2TR, and still draw digits the classifier recognises.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import adatsq
from adatsq.errors import TokenReductionError
from adatsq.models.reference.classifier import load_classifier
from adatsq.models.umm.data import QUESTION_TYPES, gen_prompt, qa_batch
from adatsq.models.umm.weights import load_umm
from adatsq.quant.linear import QuantLinear
from adatsq.recipe import recipe_from_dict
from adatsq.tokens.umm.evaluate import generation_prompts, generation_quality, qa_accuracy
from adatsq.tokens.umm.reduction import UMMReduction

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "umm" / "gptq-w4a8.yaml"
SMALL_CALIBRATION = {"samples": 8, "steps": 8, "batch_size": 8, "seed": 0, "segments": 1}
FAST = {"samples": 2, "steps": 4, "batch_size": 2, "segments": 2}
CANVASES = 128  # held-out canvases, each asked all five question types
SEED = 7
MARGIN = 0.03  # quantized + G2TR may lose at most 3 points of overall accuracy to float + G2TR
TYPE_MARGIN = 0.05  # and at most 5 points on any one question type (about 6 of 128 canvases)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    data = yaml.safe_load(RECIPE.read_text())
    data["calibration"] = SMALL_CALIBRATION
    qmodel = adatsq.quantize("umm", recipe_from_dict(data), progress=False)
    assert qmodel.layers and all(name.startswith("model.lm.model.layers.") for name in qmodel.layers)
    out = tmp_path_factory.mktemp("umm") / "w4a8"
    qmodel.save(out)
    return out


@pytest.fixture(scope="module")
def quantized(checkpoint):
    model = adatsq.load(checkpoint, token_reduction="g2tr", keep=0.5)
    assert sum(isinstance(m, QuantLinear) for m in model.adapter.model.lm.modules()) > 0
    return model


def test_quantized_g2tr_answers_as_well_as_float_g2tr(quantized):
    reference = UMMReduction(load_umm())
    float_acc = qa_accuracy(
        lambda images, questions: reference.answer(images, questions, "g2tr", 0.5).logits, CANVASES, SEED
    )
    quant_acc = qa_accuracy(
        lambda images, questions: quantized.answer(images, questions).logits, CANVASES, SEED
    )
    assert float_acc["overall"] >= 0.9, float_acc  # the comparison is between two working models
    assert quant_acc["overall"] >= float_acc["overall"] - MARGIN, (quant_acc, float_acc)
    for kind in QUESTION_TYPES:
        assert quant_acc[kind] >= float_acc[kind] - TYPE_MARGIN, (kind, quant_acc, float_acc)


def test_quantized_model_still_draws_recognisable_digits(quantized):
    _, _, labels, quads = generation_prompts(20)
    prompts = [gen_prompt(label, quad) for label, quad in zip(labels, quads, strict=True)]
    quality = generation_quality(quantized.generate(prompts, seed=0), labels, quads, load_classifier())
    # float: 0.925 / 0.991, GPTQ W4A8 (full calibration): 0.875 / 0.991 on 40 prompts (reports/compose.md)
    assert quality["classifier_accuracy"] >= 0.7, quality
    assert quality["ink_in_quadrant"] >= 0.9, quality


def test_answers_keep_half_the_tokens_for_every_question(quantized):
    batch = qa_batch(np.random.default_rng(0), 3, split="test")
    answer = quantized.answer(batch.images, batch.questions)
    n = quantized.reduction.n
    assert set(answer.logits) == set(batch.questions)
    assert all(k.shape == (3, round(n * 0.5)) for k in answer.kept.values())


def test_generation_tokens_are_not_reduced_unless_forced(quantized):
    prompts = torch.tensor([[0, 0, 0]])
    with pytest.raises(TokenReductionError, match="never reduced by default"):
        quantized.reduction.generate(prompts, prompts, steps=1, reducer="g2tr", keep=0.5)


def test_token_reduction_on_a_dit_is_refused(tmp_path):
    recipe = recipe_from_dict({"method": "rtn", "weight": {"bits": 8}, "calibration": FAST})
    adatsq.quantize("reference", recipe, progress=False).save(tmp_path / "dit")
    with pytest.raises(TokenReductionError, match="no understanding tokens"):
        adatsq.load(tmp_path / "dit", token_reduction="g2tr")
