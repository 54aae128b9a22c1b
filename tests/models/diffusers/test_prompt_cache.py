"""Prompt encodings cached for a run (models/diffusers/prompts.py): the same latents, one real encoder
forward per distinct batch, new prompts still sample, the checkpoint unchanged, and the offload choice."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import nn

import adatsq
from adatsq.engine.adaptive import quantize_adaptive
from adatsq.models.diffusers.adapter import DiffusersPipelineAdapter
from adatsq.models.diffusers.prompts import PromptSession, components_to_offload
from adatsq.recipe import recipe_from_dict

FAMILIES = ("flux", "sd3", "wan", "qwen-image", "sana")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def encoders(adapter: DiffusersPipelineAdapter) -> dict[str, nn.Module]:
    return {
        n: m for n, m in adapter.pipe.components.items() if n.startswith("text_encoder") and m is not None
    }


def real_forwards(adapter: DiffusersPipelineAdapter) -> Callable[[], dict[str, int]]:
    """Encoder name -> forwards that really ran, counted by hooks on its embeddings (a cache hit runs none;
    one forward runs each embedding it uses once, so the busiest one counts the forwards)."""
    calls: Counter = Counter()
    for name, module in encoders(adapter).items():
        for i, embedding in enumerate(m for m in module.modules() if isinstance(m, nn.Embedding)):
            embedding.register_forward_pre_hook(lambda *_, key=(name, i): calls.update([key]))

    def read() -> dict[str, int]:
        out: dict[str, int] = {}
        for (name, _), n in calls.items():
            out[name] = max(out.get(name, 0), n)
        return out

    return read


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sampling_is_exact_and_encodes_each_batch_once(tiny_pipeline_dir, family):
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir(family))
    first, second = adapter.default_inputs(2, seed=0), adapter.default_inputs(2, seed=5)
    assert first != second
    plain = [adapter.generate(first, seed=0, num_steps=3), adapter.generate(second, seed=1, num_steps=3)]
    real = real_forwards(adapter)
    with adapter.repeated_sampling():
        once = [adapter.generate(first, seed=0, num_steps=3)]
        encoded = real()  # the prompt batch (and the negative one where the pipeline has CFG)
        assert sorted(encoded) == sorted(encoders(adapter))
        once += [adapter.generate(first, seed=0, num_steps=3), adapter.generate(first, seed=0, num_steps=3)]
        assert real() == encoded  # repeated batches never reach the encoders
        new = [adapter.generate(second, seed=1, num_steps=3)]  # an unseen batch is encoded, once
        assert all(real()[n] > encoded[n] for n in encoded)
        encoded = real()
        new.append(adapter.generate(second, seed=1, num_steps=3))
        assert real() == encoded
    for latents in once:
        assert torch.equal(latents, plain[0])
    for latents in new:
        assert torch.equal(latents, plain[1])
    assert all("forward" not in module.__dict__ for module in encoders(adapter).values())
    before = real()
    assert torch.equal(adapter.generate(first, seed=0, num_steps=3), plain[0])  # after the run: encodes
    assert all(real()[n] > before[n] for n in before)


def test_cpu_run_moves_nothing(tiny_pipeline_dir):
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("flux"))
    with adapter.repeated_sampling():
        adapter.generate(adapter.default_inputs(1, seed=0), seed=0, num_steps=2)
        assert adapter._prompts.offloaded == {}
        with adapter.repeated_sampling():  # nested (adatsq.quantize inside a plan run): the outer one serves
            inner = adapter._prompts
        assert inner is adapter._prompts
    assert adapter._prompts is None


def test_only_transformers_encoders_in_eval_mode_are_cached(tiny_pipeline_dir):
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("sd3"))
    adapter.pipe.text_encoder_3.train()  # dropout would make a cached output differ from a fresh one
    session = PromptSession(adapter.pipe, adapter.transformer)
    try:
        assert sorted(session.encoders) == ["text_encoder", "text_encoder_2"]
        assert "transformer" not in session.movable and "vae" in session.movable
    finally:
        session.close()
    assert all("forward" not in m.__dict__ for m in encoders(adapter).values())


@pytest.mark.parametrize(("family", "called"), [("flux", set()), ("dit", {"vae"}), ("wan", set())])
def test_the_first_sampling_shows_what_the_sampler_calls(tiny_pipeline_dir, family, called):
    """What the offload choice is given, watched here on the CPU (a CPU run skips it: nothing moves)."""
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir(family))
    with adapter.repeated_sampling():
        session = adapter._prompts
        assert not session.watch and session.called is None
        session.watch = True
        adapter.generate(adapter.default_inputs(1, seed=0), seed=0, num_steps=2)
        assert session.called == called and session.offloaded == {}  # components on the CPU stay
    assert all(not module._forward_pre_hooks for module in adapter.pipe.vae.modules())


def test_offload_choice():
    devices = {"text_encoder": CUDA, "text_encoder_2": CUDA, "vae": CUDA, "image_encoder": CPU}
    cached = ("text_encoder", "text_encoder_2")
    # Flux under output_type="latent": the encoders (cached) and the VAE (never called) leave
    assert components_to_offload(devices, CUDA, {"text_encoder", "text_encoder_2"}, cached) == [
        "text_encoder", "text_encoder_2", "vae"
    ]  # fmt: skip
    # DiT decodes every sample: its VAE stays
    assert components_to_offload({"vae": CUDA}, CUDA, {"vae"}, ()) == []
    # a component the user put on the host already stays there; nothing moves for a denoiser on the CPU
    assert components_to_offload(devices, CUDA, set(), ()) == ["text_encoder", "text_encoder_2", "vae"]
    assert components_to_offload(devices, CPU, set(), cached) == []
    assert components_to_offload({"vae": torch.device("meta")}, CUDA, set(), ()) == []


RECIPE = {
    "method": "adatsq",
    "weight": {"bits": 4, "group_size": 16, "symmetric": False},
    "activation": {"bits": 8},
    "calibration": {"samples": 2, "steps": 4, "batch_size": 1, "segments": 2},
    "planner": {"candidates": [3, 4, 8], "fisher_samples": 1, "measure_samples": 1, "beam_width": 1},
}


def test_checkpoint_is_identical_with_and_without_the_cache(tiny_pipeline_dir, tmp_path, tree):
    folder, recipe = tiny_pipeline_dir("flux"), recipe_from_dict(RECIPE)
    cached, bare = (DiffusersPipelineAdapter.from_folder(folder) for _ in range(2))
    counted = real_forwards(cached), real_forwards(bare)
    on = tree(adatsq.quantize(cached, recipe, progress=False).save(tmp_path / "on"))  # the engine: cached
    off = tree(quantize_adaptive(bare, recipe, progress=False).save(tmp_path / "off"))  # same flow, bare
    assert timeless(on.pop("report.json")) == timeless(off.pop("report.json"))
    assert on == off
    assert all("forward" not in module.__dict__ for module in encoders(cached).values())  # the user's pipe
    # distinct batches: the timestep probe's prompt, 2 calibration batches (Fisher reuses one), 1 measured
    assert max(counted[0]().values()) <= 4 < min(counted[1]().values())


def timeless(report: bytes) -> dict:
    return {k: v for k, v in json.loads(report).items() if not k.endswith("_seconds")}
