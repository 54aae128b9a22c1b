import pytest
import torch
from diffusers import DiTTransformer2DModel

from adatsq.errors import ConfigError
from adatsq.eval.metrics import accuracy
from adatsq.models.reference.classifier import load_classifier
from adatsq.models.reference.digits import augment, load_digits_16
from adatsq.models.reference.model import (
    NULL_CLASS,
    DigitsPipeline,
    ReferenceSampling,
    build_scheduler,
    build_transformer,
    initial_noise,
    reference_metadata,
    reference_pipeline,
    sample,
)

TINY = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    return reference_pipeline()


def test_digits_splits_are_deterministic_disjoint_and_in_range():
    train_x, train_y = load_digits_16("train")
    test_x, test_y = load_digits_16("test")
    assert train_x.shape[1:] == (1, 16, 16) and train_x.dtype == torch.float32
    assert len(train_y) + len(test_y) == 1797
    assert 0.19 < len(test_y) / 1797 < 0.21
    assert train_x.min() >= -1.0 and train_x.max() <= 1.0 and train_x.min() < -0.99
    assert sorted(test_y.unique().tolist()) == list(range(10))
    again_x, again_y = load_digits_16("test")
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)
    flat_train = {tuple(r) for r in train_x.flatten(1).tolist()}
    shared = sum(tuple(r) in flat_train for r in test_x.flatten(1).tolist())
    assert shared <= 2  # sklearn's digits hold a few duplicate images
    with pytest.raises(ConfigError, match="split"):
        load_digits_16("validation")


def _shift(image, dy, dx):
    """`image` [C, H, W] moved down by dy and right by dx pixels, uncovered pixels set to -1."""
    out = torch.full_like(image, -1.0)
    h, w = image.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_augment_only_translates():
    x, _ = load_digits_16("test")
    images = x[:32]
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    offsets = set()
    for original, moved in zip(images, out, strict=True):
        # exactly one shift of at most one pixel reproduces the augmented image pixel for pixel
        matches = [
            (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(moved, _shift(original, dy, dx))
        ]
        assert len(matches) == 1, matches
        offsets.add(matches[0])
    assert len(offsets) >= 5  # the shifts are random, not one fixed offset
    assert torch.equal(augment(images, torch.Generator().manual_seed(0)), out)
    assert not torch.equal(augment(images, torch.Generator().manual_seed(1)), out)


def test_reference_architecture_is_a_real_dit_with_enough_linears():
    model = build_transformer()
    assert isinstance(model, DiTTransformer2DModel)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) >= 40
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    # the label table's extra row is the dropout (null) class used for guidance
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NULL_CLASS + 1


def test_tiny_config_builds_and_runs():
    model = build_transformer(TINY).eval()
    x = torch.randn(3, 1, 16, 16)
    out = model(x, timestep=torch.full((3,), 500.0), class_labels=torch.tensor([0, 9, NULL_CLASS])).sample
    assert out.shape == x.shape


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="out_channels"):
        build_transformer({"out_channels": 2})
    with pytest.raises(ConfigError, match="unknown reference DiT key"):
        build_transformer({"hidden": 3})
    with pytest.raises(ConfigError, match="guidance_scale"):
        ReferenceSampling(guidance_scale=0.5)


def test_shipped_weights_sample_right_shape_range_and_deterministically(pipe):
    labels = [0, 3, 7, 9]
    a = pipe(labels, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    b = pipe(labels, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    c = pipe(labels, num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images
    assert a.shape == (4, 1, 16, 16)
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.3
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(initial_noise(4, 5), initial_noise(4, 5))


def test_shipped_model_draws_the_requested_digits(pipe):
    labels = list(range(10))
    sampling = ReferenceSampling()
    images = pipe(labels, sampling.num_steps, sampling.guidance_scale, latents=initial_noise(10, 0)).images
    assert accuracy(load_classifier()(images), torch.tensor(labels)) >= 0.8


def test_default_sampling_matches_shipped_metadata():
    meta = reference_metadata()
    assert meta["config"]["num_embeds_ada_norm"] == NULL_CLASS
    assert meta["sampling"] == {
        "num_steps": ReferenceSampling().num_steps,
        "guidance_scale": ReferenceSampling().guidance_scale,
    }


def test_each_step_calls_the_transformer_once_on_the_cfg_batch(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0].shape[0], kwargs["class_labels"].tolist())),
        with_kwargs=True,
    )
    try:
        pipe([1, 2], num_inference_steps=3, guidance_scale=3.0, latents=initial_noise(2, 0))
        pipe([1, 2], num_inference_steps=2, guidance_scale=1.0, latents=initial_noise(2, 0))
    finally:
        handle.remove()
    assert calls[:3] == [(4, [1, 2, NULL_CLASS, NULL_CLASS])] * 3
    assert calls[3:] == [(2, [1, 2])] * 2


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def callback(p, step_index, timestep, kwargs):
        seen.append((step_index, float(timestep)))
        if step_index == 2:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    images = pipe(
        [4], num_inference_steps=3, latents=initial_noise(1, 0), callback_on_step_end=callback
    ).images
    assert [s for s, _ in seen] == [0, 1, 2]
    assert seen[0][1] == pytest.approx(1000.0)
    assert torch.equal(images, torch.zeros_like(images))


def test_sample_keeps_gradients():
    model = build_transformer(TINY).eval()
    latents = initial_noise(2, 0).requires_grad_(True)
    out = sample(model, build_scheduler(), [1, 5], latents, num_steps=2, guidance_scale=2.0)
    out.square().sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert model.proj_out_2.weight.grad is not None


def test_sample_step_callback_replaces_latents():
    model = build_transformer(TINY).eval()
    marker = torch.full((1, 1, 16, 16), 0.5)
    out = sample(
        model, build_scheduler(), [0], initial_noise(1, 0), 2, 1.0, lambda i, x: marker if i == 1 else None
    )
    assert torch.equal(out, marker)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DigitsPipeline.from_folder(tmp_path)
    assert isinstance(loaded, DigitsPipeline)
    noise = initial_noise(2, 3)
    a = pipe([2, 8], num_inference_steps=3, latents=noise).images
    b = loaded([2, 8], num_inference_steps=3, latents=noise).images
    assert torch.equal(a, b)


def test_bad_labels_are_config_errors(pipe):
    with pytest.raises(ConfigError, match="class labels"):
        pipe([11], num_inference_steps=1)
    with pytest.raises(ConfigError, match="batch"):
        sample(pipe.transformer, pipe.scheduler, [1, 2], initial_noise(3, 0), 1, 1.0)


def test_classifier_is_accurate_on_held_out_digits():
    x, y = load_digits_16("test")
    clf = load_classifier()
    with torch.no_grad():
        assert accuracy(clf(x), y) >= 0.95
        assert clf.features(x[:5]).shape == (5, 128)
