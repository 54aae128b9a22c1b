"""models/resolve.py: every kind of model input resolves to its adapter; bad input names the options."""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.base import ADAPTERS
from adatsq.models.diffusers.adapter import DiffusersPipelineAdapter
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import reference_pipeline
from adatsq.models.resolve import adapter_class, adapter_for, parse_dtype
from adatsq.models.umm.adapter import UMMGenerationAdapter


def test_names_resolve_to_the_shipped_models():
    reference = adapter_for("reference")
    assert type(reference) is ReferenceAdapter and reference.source == "reference"
    assert any(isinstance(m, torch.nn.Linear) for m in reference.denoiser().modules())
    umm = adapter_for("umm")
    assert type(umm) is UMMGenerationAdapter and umm.source == "umm" and umm.family == "umm"


def test_objects_resolve_to_the_adapter_that_wraps_them(tiny_pipeline_dir):
    pipe = reference_pipeline()
    adapter = adapter_for(pipe)
    assert type(adapter) is ReferenceAdapter and adapter.user_model() is pipe
    assert adapter_for(adapter) is adapter  # an adapter is used as given
    diffusers_pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("flux"))
    wrapped = adapter_for(diffusers_pipe)
    assert type(wrapped) is DiffusersPipelineAdapter and wrapped.user_model() is diffusers_pipe


@pytest.mark.parametrize("as_path", [False, True])
def test_a_local_folder_resolves_to_the_diffusers_adapter(tiny_pipeline_dir, as_path):
    folder = tiny_pipeline_dir("flux")
    adapter = adapter_for(folder if as_path else str(folder))
    assert type(adapter) is DiffusersPipelineAdapter and adapter.family == "diffusers"
    assert adapter.source == str(Path(folder).resolve())


def test_dtype_places_a_named_model():
    assert {p.dtype for p in adapter_for("reference", dtype="bfloat16").denoiser().parameters()} == {
        torch.bfloat16
    }
    assert {p.dtype for p in adapter_for("reference").denoiser().parameters()} == {torch.float32}


def test_parse_dtype():
    assert parse_dtype(None) is None
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    with pytest.raises(
        ConfigError, match=r"dtype 'fp16' is not supported; use one of float32, bfloat16, float16"
    ):
        parse_dtype("fp16")
    with pytest.raises(ConfigError, match="fp16"):
        adapter_for("reference", dtype="fp16")


def test_unknown_strings_and_objects_name_the_options(tmp_path):
    missing = tmp_path / "no-such-model"
    for model in ("referenc", missing):
        with pytest.raises(ConfigError) as err:
            adapter_for(model)
        message = str(err.value)
        assert (
            str(model) in message and "'reference'" in message and "'umm'" in message and "folder" in message
        )
    with pytest.raises(ConfigError, match=r"cannot quantize a dict; pass 'reference', a diffusers pipeline"):
        adapter_for({"model": "reference"})
    with pytest.raises(ConfigError, match="cannot quantize a Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_adapter_class_of_a_checkpoint_family():
    assert adapter_class("reference") is ReferenceAdapter
    assert adapter_class("umm") is UMMGenerationAdapter
    assert adapter_class("diffusers") is DiffusersPipelineAdapter
    assert set(ADAPTERS.names()) == {"reference", "umm", "diffusers"}
    with pytest.raises(
        CheckpointError, match=r"unknown model family 'flux'.*supported: diffusers, reference, umm"
    ):
        adapter_class("flux")


@pytest.mark.parametrize(
    "device, message", [("tpu", "not a torch device|not supported"), ("cuda", "no CUDA GPU")]
)
def test_devices_this_machine_cannot_use_are_refused(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        adapter_for("reference", device=device)
