"""Reference UMM: build, sequence shapes with and without reduction, generation guard, shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adatsq.errors import ConfigError, TokenReductionError
from adatsq.models.reference.classifier import load_classifier
from adatsq.models.umm.data import (
    CANVAS,
    DIGIT,
    GEN_JITTER,
    QUADRANTS,
    QUESTION_TYPES,
    TOKEN_ID,
    box_near_centre,
    gen_batch,
    qa_batch,
    quadrant_of,
    question,
    sample_canvas,
    tokenize,
)
from adatsq.models.umm.model import MiniUMM, UMMConfig, segment_mask
from adatsq.models.umm.weights import load_umm, save_umm
from adatsq.tokens.base import REDUCERS, InLMReducer, TokenReducer, reduced_from_kept
from adatsq.tokens.flops import reducer_overhead_flops
from adatsq.tokens.umm.bench import prefill_cost
from adatsq.tokens.umm.evaluate import (
    crop_digit,
    full_answers,
    generation_accuracy,
    generation_prompts,
    qa_accuracy,
    quadrant_mask,
)
from adatsq.tokens.umm.reduction import UMMReduction


@pytest.fixture(scope="module")
def tiny(tiny_config: UMMConfig) -> MiniUMM:
    torch.manual_seed(0)
    return MiniUMM(tiny_config).eval()


@pytest.fixture(scope="module")
def batch():
    return qa_batch(np.random.default_rng(0), 3, split="test")


def _lm_lengths(model: MiniUMM):
    """Forward hooks recording the sequence length entering each decoder layer."""
    lengths: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: lengths.append(out.shape[1]))
        for layer in model.lm.model.layers
    ]
    return lengths, hooks


def test_config_validation(tiny_config: UMMConfig) -> None:
    with pytest.raises(ConfigError, match="vit_patch"):
        UMMConfig(vit_patch=5)
    with pytest.raises(ConfigError, match="unknown UMM config keys"):
        UMMConfig.from_dict({"bogus": 1})
    assert UMMConfig.from_dict(tiny_config.to_dict()) == tiny_config


def test_data_is_consistent() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        canvas = sample_canvas(rng, "train")
        labels = [d[0] for d in canvas.digits]
        assert len(set(labels)) == len(labels) and 1 <= len(labels) <= 3
        quads = [quadrant_of(t, left) for _, t, left in canvas.digits]
        assert len(set(quads)) == len(quads)  # digits off the midlines never share a quadrant
        assert canvas.image.shape == (CANVAS, CANVAS) and canvas.image.min() >= -1
        for _, top, left in canvas.digits:
            assert 0 <= top <= CANVAS - DIGIT and 0 <= left <= CANVAS - DIGIT
    with pytest.raises(ConfigError, match="vocabulary"):
        tokenize("what is this")


def test_present_question_asks_both_ways() -> None:
    rng = np.random.default_rng(4)
    answers = []
    for _ in range(200):
        canvas = sample_canvas(rng, "train")
        text, answer = question(canvas, "present", rng)
        label = int(text.split()[-2])
        assert answer == ("yes" if label in [d[0] for d in canvas.digits] else "no")
        answers.append(answer)
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_generation_targets_sit_at_their_quadrant_centre() -> None:
    rng = np.random.default_rng(2)
    for quadrant in QUADRANTS:
        row = CANVAS // 4 if quadrant.startswith("top") else 3 * CANVAS // 4
        col = CANVAS // 4 if quadrant.endswith("left") else 3 * CANVAS // 4
        boxes = np.array([box_near_centre(rng, quadrant) for _ in range(100)]) + DIGIT // 2
        assert np.abs(boxes - [row, col]).max() == GEN_JITTER  # every offset within +-2 px is drawn
        assert {quadrant_of(t - DIGIT // 2, lf - DIGIT // 2) for t, lf in boxes} == {quadrant}
    g = gen_batch(np.random.default_rng(2), 8, p_anywhere=0.0, p_null=0.0)
    for image, quadrant in zip(g.images, g.quadrants, strict=True):
        ink = (image[0] + 1) / 2
        assert float((ink * quadrant_mask(quadrant)).sum()) > 0.95 * float(ink.sum())


def test_understanding_shapes_full(tiny: MiniUMM, batch) -> None:
    lengths, hooks = _lm_lengths(tiny)
    logits = tiny.understand(batch.images, [batch.questions[k] for k in QUESTION_TYPES])
    for h in hooks:
        h.remove()
    q_len = sum(batch.questions[k].shape[1] for k in QUESTION_TYPES)
    assert lengths == [144 + q_len] * tiny.config.lm_layers
    assert [tuple(x.shape) for x in logits] == [(3, len(tiny.config.vocab))] * len(QUESTION_TYPES)


def test_packed_questions_equal_separate_sequences(tiny: MiniUMM, batch) -> None:
    packed = tiny.understand(batch.images, [batch.questions[k] for k in QUESTION_TYPES])
    for kind, got in zip(QUESTION_TYPES, packed, strict=True):
        alone = tiny.understand(batch.images, [batch.questions[kind]])[0]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


def test_segment_mask_rules() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 2]])
    allowed = segment_mask(seg)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # image tokens see the image only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # question 1 is causal and sees the image
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],  # question 2 never sees question 1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("method", ["g2tr", "random", "grid", "tome", "visionzip"])
def test_post_connector_reduction_shrinks_lm_sequence(tiny: MiniUMM, batch, method: str) -> None:
    adapter = UMMReduction(tiny)
    lengths, hooks = _lm_lengths(tiny)
    answer = adapter.answer(batch.images, batch.questions, method, 0.25, torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    q_len = sum(batch.questions[k].shape[1] for k in QUESTION_TYPES)
    assert lengths == [36 + q_len] * tiny.config.lm_layers  # K = 144 * 0.25 image tokens, questions packed
    assert answer.layer_image_tokens == [36] * tiny.config.lm_layers
    for kept in answer.kept.values():
        assert kept.shape == (3, 36) and bool((kept.diff(dim=1) > 0).all())


@pytest.mark.parametrize(("method", "counts"), [("fastv", [144, 144, 72, 72]), ("vnorm", [144, 144, 72, 72])])
def test_in_lm_reduction_drops_tokens_at_its_layer(tiny: MiniUMM, batch, method: str, counts) -> None:
    adapter = UMMReduction(tiny)
    lengths, hooks = _lm_lengths(tiny)
    questions = {"leftmost": batch.questions["leftmost"]}
    answer = adapter.answer(batch.images, questions, method, 0.5)
    for h in hooks:
        h.remove()
    q_len = questions["leftmost"].shape[1]
    assert lengths == [c + q_len for c in counts]
    assert answer.layer_image_tokens == counts
    assert answer.kept["leftmost"].shape == (3, 72)


def test_keep_one_reproduces_full_tokens(tiny: MiniUMM, batch) -> None:
    adapter = UMMReduction(tiny)
    full = adapter.answer(batch.images, batch.questions)
    for method in ("random", "fastv", "g2tr"):
        same = adapter.answer(batch.images, batch.questions, method, 1.0, torch.Generator().manual_seed(0))
        for kind in QUESTION_TYPES:
            torch.testing.assert_close(same.logits[kind], full.logits[kind], atol=1e-5, rtol=1e-4)


def test_generation_refuses_reduction_unless_forced(tiny: MiniUMM) -> None:
    adapter = UMMReduction(tiny)
    prompts, null, _, _ = generation_prompts(2)
    with pytest.raises(TokenReductionError, match="reduce_generation=True"):
        adapter.generate(prompts, null, steps=2, reducer="g2tr", keep=0.5)
    with pytest.raises(TokenReductionError, match="forced generation reduction supports"):
        adapter.generate(prompts, null, steps=2, reducer="fastv", keep=0.5, reduce_generation=True)
    plain = adapter.generate(prompts, null, steps=2)
    forced = adapter.generate(prompts, null, steps=2, reducer="g2tr", keep=0.5, reduce_generation=True)
    assert plain.shape == forced.shape == (2, 1, CANVAS, CANVAS)
    assert not torch.allclose(plain, forced)


def test_generation_training_shapes(tiny: MiniUMM) -> None:
    g = gen_batch(np.random.default_rng(0), 2)
    tokens = tiny.patchify(tiny.encode_latents(g.images))
    assert tokens.shape == (2, tiny.config.gen_grid**2, tiny.config.gen_token_dim)
    assert torch.equal(tiny.unpatchify(tokens), tiny.encode_latents(g.images))
    v = tiny.predict_velocity(g.prompts, tiny.latent_tokens(tokens, torch.rand(2)))
    assert v.shape == tokens.shape


def test_crop_finds_the_digit() -> None:
    canvas = sample_canvas(np.random.default_rng(1), "test", 1)
    _, top, left = canvas.digits[0]
    image = torch.from_numpy(canvas.image)[None]
    crop = crop_digit(image, quadrant_of(top, left))
    assert crop.shape == (1, DIGIT, DIGIT)
    assert float(((crop + 1) / 2).sum()) >= 0.95 * float(((image + 1) / 2).sum())


def test_save_load_round_trip(tiny: MiniUMM, tmp_path, batch) -> None:
    save_umm(tiny, tmp_path, dtype=torch.float32)
    loaded = load_umm(tmp_path)
    assert loaded.config == tiny.config
    a = tiny.understand(batch.images, [batch.questions["count"]])[0]
    b = loaded.understand(batch.images, [batch.questions["count"]])[0]
    torch.testing.assert_close(a, b)


def test_shipped_weights_answer_every_question_type() -> None:
    model = load_umm()
    acc = qa_accuracy(full_answers(model), samples=64, seed=99)
    for kind in QUESTION_TYPES:  # >= 90% on 1000 held-out canvases (reports/umm_training.md)
        assert acc[kind] >= 0.85, (kind, acc)


def test_present_answer_follows_the_image_not_a_prior() -> None:
    """'is there a d?' is answered yes when d is on the canvas and no when it is not, on both halves."""
    model = load_umm()
    batch = qa_batch(np.random.default_rng(5), 96, split="test", kinds=("present",))
    said = model.understand(batch.images, [batch.questions["present"]])[0].argmax(-1)
    truth = batch.answers["present"]
    for word in ("yes", "no"):
        asked = truth == TOKEN_ID[word]
        assert int(asked.sum()) >= 20, word  # both answers are asked often enough to be measured
        assert float((said[asked] == truth[asked]).float().mean()) >= 0.85, word
    # the same questions about blank canvases: no digit is ever present
    blank = torch.full_like(batch.images, -1.0)
    said_blank = model.understand(blank, [batch.questions["present"]])[0].argmax(-1)
    assert float((said_blank == TOKEN_ID["no"]).float().mean()) >= 0.9


def test_shipped_weights_draw_the_asked_digit() -> None:
    quality = generation_accuracy(load_umm(), load_classifier(), count=20, steps=25, seed=3)
    assert quality["classifier_accuracy"] >= 0.7, quality  # 94% on 200 prompts (reports/umm_training.md)
    assert quality["ink_in_quadrant"] >= 0.9, quality


def test_anchor_pool_sets_the_number_of_g2tr_cells(tiny: MiniUMM, batch) -> None:
    anchors, latent_grid = UMMReduction(tiny).anchors(batch.images)
    assert latent_grid == (3, 3) and anchors[0].shape == (9, tiny.config.lm_hidden)  # BAGEL's pool 2
    anchors, latent_grid = UMMReduction(tiny, anchor_pool=1).anchors(batch.images)
    assert latent_grid == (tiny.config.gen_grid, tiny.config.gen_grid) and anchors[0].shape == (
        36,
        tiny.config.lm_hidden,
    )


@pytest.fixture
def register():
    """Registers reducers for one test and takes them out again (the registry is process-wide)."""
    names: list[str] = []

    def add(cls: type[TokenReducer]) -> type[TokenReducer]:
        names.append(cls.name)
        return REDUCERS.register(cls.name)(cls)

    yield add
    for name in names:
        REDUCERS._items.pop(name)  # no public way to unregister a test-only plug-in


def test_a_new_reducer_is_one_registered_class(tiny: MiniUMM, batch, register) -> None:
    """Stage, pruning plan, generation support and cost come from the class: no list to extend."""

    class Tail(InLMReducer):  # keeps the last K image tokens (raster order) from layer 1 on
        name, layer, overhead_inputs = "test-tail", 1, frozenset({"dv"})

        def _reduce(self, tokens, context, k):
            return reduced_from_kept(tokens, torch.arange(tokens.shape[0] - k, tokens.shape[0]), context.grid)

        def overhead_flops(self, n, d, k, **inputs):
            return 7 * inputs["dv"]

    class Head(TokenReducer):  # keeps the first K tokens; runs on generation tokens too
        name, stage, supports_generation = "test-head", "post_connector", True

        def _reduce(self, tokens, context, k):
            return reduced_from_kept(tokens, torch.arange(k), context.grid)

    register(Tail)
    register(Head)
    adapter = UMMReduction(tiny)
    answer = adapter.answer(batch.images, {"count": batch.questions["count"]}, "test-tail", 0.5)
    assert answer.layer_image_tokens == [144, 72, 72, 72]
    assert torch.equal(answer.kept["count"], torch.arange(72, 144).expand(3, -1))
    cost = prefill_cost(adapter, "test-tail", 0.5)
    assert cost["layer_image_tokens"] == [144, 72, 72, 72]
    assert (
        cost["overhead_flops"] == 7 * tiny.config.lm_kv_heads * tiny.config.lm_hidden // tiny.config.lm_heads
    )
    assert reducer_overhead_flops("test-head", 144, 32, 72) == 0
    answer = adapter.answer(batch.images, batch.questions, "test-head", 0.25)
    assert torch.equal(answer.kept["where"], torch.arange(36).expand(3, -1))
    prompts, null, _, _ = generation_prompts(1)
    forced = adapter.generate(prompts, null, steps=2, reducer="test-head", keep=0.5, reduce_generation=True)
    assert forced.shape == (1, 1, CANVAS, CANVAS)
    with pytest.raises(TokenReductionError, match="forced generation reduction supports"):
        adapter.generate(prompts, null, steps=2, reducer="test-tail", keep=0.5, reduce_generation=True)
