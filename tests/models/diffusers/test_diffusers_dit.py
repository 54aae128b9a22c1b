"""The diffusers adapter on tiny offline pipelines of every supported family (real classes, toy sizes)."""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adatsq.errors import AdatsqError, ConfigError
from adatsq.models.base import ADAPTERS
from adatsq.models.diffusers.adapter import (
    DiffusersPipelineAdapter,
    default_ignore,
    linear_names,
    sensitive_layers,
)
from adatsq.models.diffusers.config import SETTINGS_FILE, DiffusersSampling
from adatsq.models.diffusers.tiny import TINY_FAMILIES, build_tiny_pipeline

STEPS = 3


@pytest.fixture
def adapter(request: pytest.FixtureRequest, tiny_pipeline_dir) -> DiffusersPipelineAdapter:
    return DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir(request.param))


def each_family(test):
    return pytest.mark.parametrize("adapter", TINY_FAMILIES, indirect=True)(test)


def _expected_schedule(adapter: DiffusersPipelineAdapter, latents: torch.Tensor) -> list[float]:
    """What each pipeline feeds its transformer, recomputed from a scheduler copy the way its code does."""
    pipe, n = adapter.pipe, STEPS
    scheduler = copy.deepcopy(pipe.scheduler)
    name = type(pipe).__name__
    if name in ("FluxPipeline", "QwenImagePipeline", "ZImagePipeline"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        seq_len = (
            latents.shape[1] if name != "ZImagePipeline" else latents.shape[2] // 2 * latents.shape[3] // 2
        )
        c = scheduler.config
        mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        t = scheduler.timesteps
        return ((1000 - t) / 1000 if name == "ZImagePipeline" else t / 1000).tolist()
    scheduler.set_timesteps(n)
    return scheduler.timesteps.float().tolist()


@each_family
def test_step_timesteps_are_what_the_transformer_receives(adapter: DiffusersPipelineAdapter) -> None:
    schedule = adapter.step_timesteps(STEPS)
    assert len(schedule) == STEPS and len(set(schedule)) == STEPS

    denoiser = adapter.denoiser()
    seen: list[float] = []

    def spy(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        value = bound["timestep"] if "timestep" in bound else bound["t"]
        seen.append(float(value.flatten()[0]))

    handle = denoiser.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        latents = adapter.generate(adapter.default_inputs(2, seed=3), seed=1, num_steps=STEPS)
    finally:
        handle.remove()
    per_step = [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]]  # true CFG calls twice
    assert per_step == schedule
    assert schedule == pytest.approx(_expected_schedule(adapter, latents), rel=1e-5, abs=1e-6)


@each_family
def test_generate_is_deterministic_per_seed(adapter: DiffusersPipelineAdapter) -> None:
    inputs = adapter.default_inputs(2, seed=0)
    first = adapter.generate(inputs, seed=5, num_steps=2)
    assert first.dtype == torch.float32 and first.shape[0] == 2 and torch.isfinite(first).all()
    assert torch.equal(first, adapter.generate(inputs, seed=5, num_steps=2))
    assert not torch.allclose(first, adapter.generate(inputs, seed=6, num_steps=2))


@each_family
def test_step_callback_sees_each_step_and_can_replace_latents(adapter: DiffusersPipelineAdapter) -> None:
    inputs = adapter.default_inputs(2, seed=1)
    seen: list[tuple[int, torch.Tensor]] = []
    baseline = adapter.generate(inputs, 0, STEPS, lambda i, x: seen.append((i, x.clone())))
    assert [i for i, _ in seen] == list(range(STEPS))
    assert all(x.shape[0] == len(inputs) for _, x in seen)  # DiT's CFG-doubled batch is not exposed
    assert torch.equal(seen[-1][1].float().cpu(), baseline)

    same = adapter.generate(inputs, 0, STEPS, lambda i, x: x.clone())
    assert torch.equal(same, baseline)
    pushed = adapter.generate(inputs, 0, STEPS, lambda i, x: x * 0.5 if i == 0 else None)
    assert not torch.allclose(pushed, baseline)
    zeroed = adapter.generate(inputs, 0, STEPS, lambda i, x: torch.zeros_like(x) if i == STEPS - 1 else None)
    assert torch.count_nonzero(zeroed) == 0


@pytest.mark.parametrize("adapter", ["sd3"], indirect=True)
def test_step_callback_must_keep_the_shape(adapter: DiffusersPipelineAdapter) -> None:
    with pytest.raises(AdatsqError, match="shape"):
        adapter.generate(["a cat"], 0, 2, lambda i, x: x[:, :1])


# Layers that must be flagged as modulation in each family, and one bulk layer that must stay quantizable.
_SENSITIVE_EXAMPLE = {
    "flux": ("single_transformer_blocks.0.norm.linear", "single_transformer_blocks.0.proj_out"),
    "sd3": ("transformer_blocks.0.norm1_context.linear", "transformer_blocks.0.attn.add_q_proj"),
    "pixart-sigma": ("adaln_single.linear", "transformer_blocks.0.attn2.to_k"),
    "pixart-alpha": ("adaln_single.linear", "transformer_blocks.0.ff.net.2"),
    "dit": ("transformer_blocks.1.norm1.linear", "transformer_blocks.1.attn1.to_q"),
    "wan": ("condition_embedder.time_proj", "blocks.0.ffn.net.0.proj"),
    "z-image": ("layers.0.adaLN_modulation.0", "layers.0.feed_forward.w2"),
    "qwen-image": ("transformer_blocks.0.txt_mod.1", "transformer_blocks.0.img_mlp.net.2"),
    "sana": ("time_embed.linear", "transformer_blocks.0.attn2.to_k"),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_linear_names_and_layer_patterns(family: str, tiny_pipeline_dir) -> None:
    denoiser = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir(family)).denoiser()
    names = linear_names(denoiser)
    linears = [m for m in denoiser.modules() if isinstance(m, nn.Linear)]
    assert len(names) == len(linears) > 0
    assert all(denoiser.get_submodule(n) is dict(denoiser.named_modules())[n] for n in names)

    ignore, sensitive = default_ignore(denoiser), sensitive_layers(denoiser)
    assert ignore and sensitive
    for pattern in ignore + sensitive:  # every returned rule matches something
        assert any(re.fullmatch(pattern, n) for n in names), pattern
    modulation, bulk = _SENSITIVE_EXAMPLE[family]
    assert any(re.fullmatch(p, modulation) for p in sensitive)
    assert not any(re.fullmatch(p, bulk) for p in ignore + sensitive)


@each_family
def test_save_base_load_base_round_trip(adapter: DiffusersPipelineAdapter, tmp_path: Path) -> None:
    adapter.save_base(tmp_path / "base")
    assert not list((tmp_path / "base" / "transformer").glob("*.safetensors"))  # the checkpoint holds those
    loaded = DiffusersPipelineAdapter.load_base(tmp_path / "base")
    assert loaded.sampling == adapter.sampling
    loaded.denoiser().load_state_dict(adapter.denoiser().state_dict())
    inputs = adapter.default_inputs(2, seed=4)
    assert torch.equal(loaded.generate(inputs, 2, 2), adapter.generate(inputs, 2, 2))


def test_base_keeps_the_dtype(tiny_pipeline_dir, tmp_path: Path) -> None:
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("dit"), dtype=torch.bfloat16)
    adapter.save_base(tmp_path)
    loaded = DiffusersPipelineAdapter.load_base(tmp_path)
    assert loaded.denoiser().dtype == torch.bfloat16 and loaded.pipe.vae.dtype == torch.bfloat16


def test_registered_and_timestep_read_from_kwargs_or_position(tiny_pipeline_dir) -> None:
    assert ADAPTERS.get("diffusers") is DiffusersPipelineAdapter
    flux = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("flux"))
    assert DiffusersPipelineAdapter(flux.pipe).denoiser() is flux.pipe.transformer  # a pipeline object
    with pytest.raises(ConfigError, match="diffusers pipeline or transformer"):
        DiffusersPipelineAdapter(nn.Linear(2, 2))
    assert flux.timestep_of((), {"timestep": torch.tensor([0.25, 0.25])}) == 0.25
    assert flux.timestep_of((None, None, None, torch.tensor([0.5])), {}) == 0.5
    z_image = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("z-image"))
    assert z_image.timestep_of(([], torch.tensor([0.75])), {}) == 0.75  # forward(x, t, cap_feats)


def test_default_inputs(tiny_pipeline_dir) -> None:
    sd3 = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("sd3"))
    prompts = sd3.default_inputs(10, seed=0)
    assert len(set(prompts)) == 10 and all(isinstance(p, str) for p in prompts)
    assert prompts == sd3.default_inputs(10, seed=0) != sd3.default_inputs(10, seed=1)
    assert len(sd3.default_inputs(60, seed=0)) == 60
    assert sd3.parse_inputs(["a cat", "a dog"]) == ["a cat", "a dog"]

    dit = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("dit"))
    labels = dit.default_inputs(20, seed=0)
    assert len(set(labels)) == 20 and all(isinstance(x, int) and 0 <= x < 1000 for x in labels)
    assert dit.parse_inputs(["3", "999"]) == [3, 999]
    with pytest.raises(ConfigError, match="line 2"):
        dit.parse_inputs(["3", "tench"])
    with pytest.raises(ConfigError, match="class labels"):
        dit.generate([1000], 0, 2)
    with pytest.raises(ConfigError, match="prompts"):
        sd3.generate([3], 0, 2)
    with pytest.raises(ConfigError, match="num_steps"):
        sd3.generate(["a cat"], 0, 0)


def test_folder_errors(tiny_pipeline_dir, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        DiffusersPipelineAdapter.from_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"model_index\.json or config\.json"):
        DiffusersPipelineAdapter.from_folder(tmp_path)
    with pytest.raises(ConfigError, match="not a diffusion transformer"):
        DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("dit") / "vae")

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(ConfigError, match="NoSuchPipeline"):
        DiffusersPipelineAdapter.from_folder(tmp_path)
    unet = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(unet))
    with pytest.raises(ConfigError, match="UNet"):
        DiffusersPipelineAdapter.from_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        DiffusersPipelineAdapter.from_folder(tmp_path)


def test_bare_transformer_folder_loads_but_cannot_sample(tiny_pipeline_dir) -> None:
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("pixart-sigma") / "transformer")
    assert adapter.pipe is None and adapter.user_model() is adapter.denoiser()
    assert len(adapter.default_inputs(3, seed=0)) == 3
    for call in (lambda: adapter.generate(["a cat"], 0, 2), lambda: adapter.step_timesteps(2)):
        with pytest.raises(AdatsqError, match="save_pretrained"):
            call()


def test_sampling_validation(tiny_pipeline_dir, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guidance_scale"):
        DiffusersSampling(guidance_scale=-1.0)
    with pytest.raises(ConfigError, match="height"):
        DiffusersSampling(height=0)
    with pytest.raises(ConfigError, match="set by adatsq"):
        DiffusersSampling(extra={"num_inference_steps": 4})
    with pytest.raises(ConfigError, match="JSON"):
        DiffusersSampling(extra={"latents_hint": torch.zeros(1)})
    with pytest.raises(ConfigError, match="unknown sampling keys"):
        DiffusersSampling.from_dict({"steps": 4})
    with pytest.raises(ConfigError, match=r"takes no sampling options \['height'\]"):
        DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("dit"), sampling=DiffusersSampling(height=16))

    folder = build_tiny_pipeline("dit", tmp_path / "dit")
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    (folder / SETTINGS_FILE).write_text(json.dumps({**settings, "format_version": 99}))
    with pytest.raises(ConfigError, match="format_version"):
        DiffusersPipelineAdapter.from_folder(folder)
    with pytest.raises(ConfigError, match="unknown tiny family"):
        build_tiny_pipeline("sdxl", tmp_path / "x")
