"""Every tiny pipeline family, quantized with GPTQ and with AdaTSQ, saved, then loaded twice: by
`DiffusionPipeline.from_pretrained` after `adatsq.register_with_diffusers()` and by `adatsq.load`; both
pipelines sample the same prompt from the same noise, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

import adatsq
from adatsq.models.diffusers.config import read_settings
from adatsq.models.diffusers.tiny import TINY_FAMILIES
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.recipe import recipe_from_dict

WEIGHT = {"bits": 4, "group_size": 16, "symmetric": False}
RECIPES = {
    "gptq": {"method": "gptq", "weight": WEIGHT, "activation": {"bits": 8},
             "calibration": {"samples": 2, "steps": 4, "batch_size": 2, "segments": 1}},
    "adatsq": {"method": "adatsq", "weight": WEIGHT, "activation": {"bits": 8},
               "calibration": {"samples": 2, "steps": 4, "batch_size": 2, "segments": 2},
               "planner": {"candidates": [3, 4, 8], "fisher_samples": 1, "measure_samples": 1,
                           "beam_width": 1}},
}  # fmt: skip
STEPS = 4


def sample(pipe: diffusers.DiffusionPipeline, folder: Path, seed: int = 3) -> torch.Tensor:
    """The pipeline's own __call__ with the checkpoint's sampling settings (latents; DiT: images)."""
    sampling, _ = read_settings(folder)
    kwargs = sampling.call_kwargs()
    if isinstance(pipe, diffusers.DiTPipeline):
        kwargs |= {"class_labels": [1], "output_type": "np"}
    else:
        kwargs |= {"prompt": ["a red fox"], "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed))
    images = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(images)


@pytest.fixture(scope="module")
def checkpoint(tiny_pipeline_dir, tmp_path_factory):
    """(family, method) -> the tiny pipeline quantized with that recipe and saved (once per module)."""
    built: dict[tuple[str, str], tuple[Path, adatsq.checkpoint.save.QuantizedModel]] = {}

    def get(family: str, method: str):
        if (family, method) not in built:
            qmodel = adatsq.quantize(str(tiny_pipeline_dir(family)), recipe_from_dict(RECIPES[method]),
                                     progress=False)  # fmt: skip
            built[family, method] = (qmodel.save(tmp_path_factory.mktemp(family) / method), qmodel)
        return built[family, method]

    return get


@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_from_pretrained_and_adatsq_load_sample_alike(checkpoint, family, method):
    directory, qmodel = checkpoint(family, method)
    adatsq.register_with_diffusers()
    pipe = diffusers.DiffusionPipeline.from_pretrained(directory)
    ours = adatsq.load(directory)
    assert type(pipe) is type(ours)
    layers = json.loads((directory / "transformer" / "config.json").read_text())["quantization_config"][
        "layers"
    ]
    switching = {name for name, layer in layers.items() if len(set(layer["bits"])) > 1}
    for name in layers:
        kind = TimestepQuantLinear if name in switching else QuantLinear
        assert (
            type(pipe.transformer.get_submodule(name)) is kind is type(ours.transformer.get_submodule(name))
        )
    if method == "adatsq":
        assert qmodel.plan is not None and len(qmodel.plan.segments) == 2
    images = sample(pipe, directory)
    assert torch.isfinite(images).all()
    assert torch.equal(images, sample(ours, directory))
