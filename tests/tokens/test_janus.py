"""Token reduction on a tiny random `JanusForConditionalGeneration` built offline."""

import pytest
import torch
from transformers import JanusConfig, JanusForConditionalGeneration

from adatsq.errors import TokenReductionError
from adatsq.tokens import g2tr, janus
from adatsq.tokens.base import get_reducer
from adatsq.tokens.inlm import InLMPruner

IMAGE_ID, N, PREFIX, SUFFIX = 3, 64, [1, 5], [7, 8, 9]


def _config():
    return JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.2,  # large random weights, so dropping tokens visibly moves the logits
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            projection_dim=64,
            num_image_tokens=N,
            mlp_ratio=2.0,
        ),
        # base/latent channels: multiples of 32 (GroupNorm); 3 downsamples: 64 px -> 8x8 codes = ViT grid
        vq_config=dict(
            embed_dim=8,
            num_embeddings=64,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            projection_dim=64,
            image_token_embed_dim=64,
        ),
        image_token_id=IMAGE_ID,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return JanusForConditionalGeneration._from_config(_config(), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([PREFIX + [IMAGE_ID] * N + SUFFIX] * 2)
    return ids, torch.randn(2, 3, 64, 64, generator=g)


def test_full_keep_reproduces_the_model(model, batch):
    ids, px = batch
    embeds, mask, info = janus.reduced_inputs_embeds(model, ids, px, get_reducer("g2tr"), keep=1.0)
    assert info["seq_len"] == (69, 69) and mask.shape == ids.shape
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        out = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.allclose(out, ref, atol=1e-5)


def test_reduced_prompt_bookkeeping(model, batch):
    ids, px = batch
    embeds, mask, info = janus.reduced_inputs_embeds(model, ids, px, get_reducer("g2tr"), keep=0.25)
    assert embeds.shape == (2, 2 + 16 + 3, 64) and mask.shape == (2, 21) and info["k_image"] == 16
    for b, r in enumerate(info["reduced"]):
        assert torch.allclose(embeds[b, 2:18], r.tokens)
        assert info["position_ids"][b].tolist() == [0, 1, *(2 + r.kept_index).tolist(), 66, 67, 68]
        text = model.get_input_embeddings()(ids[b])
        assert torch.equal(embeds[b, :2], text[:2]) and torch.equal(embeds[b, 18:], text[66:])
    assert not torch.equal(info["reduced"][0].kept_index, info["reduced"][1].kept_index)  # per-image choice


def test_placeholder_errors(model, batch):
    ids, px = batch
    short = ids[:, 1:].clone()
    short[:, 1] = 4  # 63 placeholders
    with pytest.raises(TokenReductionError, match="exactly 64 image placeholder tokens"):
        janus.reduced_inputs_embeds(model, short, px, get_reducer("random"), keep=0.5)
    split = torch.tensor([PREFIX + [IMAGE_ID] * 32 + [9] + [IMAGE_ID] * 32 + SUFFIX] * 2)
    with pytest.raises(TokenReductionError, match="one contiguous span"):
        janus.reduced_inputs_embeds(model, split, px, get_reducer("random"), keep=0.5)
    with pytest.raises(TokenReductionError, match="use JanusTokenReduction"):
        janus.reduced_inputs_embeds(model, ids, px, get_reducer("fastv"), keep=0.5)


def test_anchors_come_from_the_vq_generation_path(model, batch):
    _, px = batch
    with torch.no_grad():
        anchors, grid = janus.generation_anchors(model, px)
        codes = model.model.vqmodel.encode(px).image_tokens.view(2, 8, 8)
        emb = model.model.generation_embeddings(codes[1])  # [8, 8, 8]
        cell = emb[2:4, 4:6].reshape(4, -1).mean(0)  # pooled cell (1, 2)
        expected = model.model.generation_aligner(cell)
    assert grid == (4, 4) and anchors.shape == (2, 16, 64)
    assert torch.allclose(anchors[1, 1 * 4 + 2], expected, atol=1e-5)
    feats = janus.image_features(model, px)
    assert feats.shape == (2, N, 64)
    assert g2tr.scores(feats[0], anchors[0], (8, 8), grid).shape == (N,)


def test_prefill_flops_and_kv_shrink(model, batch):
    ids, px = batch
    full = janus.JanusTokenReduction(model, get_reducer("g2tr"), keep=1.0).generate(ids, px, 2)[1]
    half = janus.JanusTokenReduction(model, get_reducer("g2tr"), keep=0.5).generate(ids, px, 2)[1]
    fastv = janus.JanusTokenReduction(model, get_reducer("fastv"), keep=0.5).generate(ids, px, 2)[1]
    assert half["layer_lens"] == [37] * 4 and fastv["layer_lens"] == [69, 69, 37, 37]
    assert half["prefill_flops"] < fastv["prefill_flops"] < full["prefill_flops"]
    assert half["kv_bytes"] * 69 == full["kv_bytes"] * 37
    assert fastv["kv_bytes"] == (full["kv_bytes"] + half["kv_bytes"]) // 2


@pytest.mark.parametrize("name", ["g2tr", "visionzip", "tome", "random", "grid", "fastv", "pdrop", "vnorm"])
def test_greedy_generation_smoke(model, batch, name):
    ids, px = batch
    tokens, info = janus.JanusTokenReduction(model, get_reducer(name), keep=0.5).generate(ids, px, 3)
    assert tokens.shape == (2, 3) and tokens.dtype == torch.long
    assert info["layer_lens"][-1] < 69


def test_greedy_matches_transformers_generate(model, batch):
    ids, px = batch
    embeds, mask, _ = janus.reduced_inputs_embeds(model, ids, px, get_reducer("g2tr"), keep=1.0)
    ours = janus.greedy_generate(model, embeds, mask, max_new_tokens=4)
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids,
            pixel_values=px,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
        )
    assert torch.equal(ours, ref[:, ids.shape[1] :])


def _masked_reference_hooks(model, layer_from, dropped):
    """Reference for in-LM pruning: keep every token but hide `dropped` columns from layer_from on."""

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        mask[:, :, :, dropped] = torch.finfo(mask.dtype).min
        return args, dict(kwargs, attention_mask=mask)

    layers = model.model.language_model.layers
    return [
        layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(layer_from, len(layers))
    ]


@torch.no_grad()
def _prefill_and_step(model, embeds, mask, pos, step_embeds):
    """The 69-token prefill with a cache, then one decoding step at position 69."""
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    step = model(
        inputs_embeds=step_embeds,
        attention_mask=torch.ones(1, 70, dtype=torch.long),
        position_ids=torch.tensor([[69]]),
        past_key_values=out.past_key_values,
        use_cache=True,
    )
    return out, step


@pytest.mark.parametrize("name", ["fastv", "vnorm"])
def test_in_lm_pruning_equals_masking_the_dropped_tokens(model, batch, name):
    ids, px = batch
    ids, px = ids[:1], px[:1]
    red = janus.JanusTokenReduction(model, get_reducer(name), keep=0.25)
    embeds, mask, info = red.inputs(ids, px)
    pos, nxt = info["position_ids"], torch.tensor([[11]])
    step_embeds = model.get_input_embeddings()(nxt)
    pruner = InLMPruner(model.model.language_model.layers, red.reducer, 0.25)
    pruner.arm(info["span"], (8, 8), 69)
    with pruner:
        out, step = _prefill_and_step(model, embeds, mask, pos, step_embeds)
    assert pruner.layer_lens == [69, 69, 21, 21] and pruner.kept_image.shape == (1, 16)
    dropped = sorted(set(range(N)) - set(pruner.kept_image[0].tolist()))
    handles = _masked_reference_hooks(model, 2, [2 + i for i in dropped])
    try:
        ref, ref_step = _prefill_and_step(model, embeds, mask, pos, step_embeds)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(out.logits[:, -1], ref.logits[:, -1], atol=1e-5)
    assert torch.allclose(step.logits[:, -1], ref_step.logits[:, -1], atol=1e-5)
    with torch.no_grad():
        full = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    assert (out.logits[:, -1] - full).abs().max() > 0.1  # pruning did change the answer


def test_fastv_keeps_the_most_attended_tokens(model, batch):
    ids, px = batch
    red = janus.JanusTokenReduction(model, get_reducer("fastv"), keep=0.25)
    embeds, mask, _ = red.inputs(ids[:1], px[:1])
    with torch.no_grad():
        att = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions[1]
    expected = torch.topk(att[0, :, -1, 2:66].float().mean(0), 16).indices.sort().values
    info = red.generate(ids[:1], px[:1], 1)[1]
    assert torch.equal(info["kept_image"][0], expected)


def test_pdrop_prunes_in_stages(model, batch):
    ids, px = batch
    info = janus.JanusTokenReduction(model, get_reducer("pdrop", stages=2), keep=0.75).generate(ids, px, 2)[1]
    assert info["layer_lens"] == [69, 69, 5 + 32, 5 + 32]  # lambda = 0.5 keeps the mean at 0.75
    with pytest.raises(TokenReductionError, match=r"needs keep in \[1/4, 1\]"):
        janus.JanusTokenReduction(model, get_reducer("pdrop"), keep=0.2).generate(ids, px, 1)
    info = janus.JanusTokenReduction(model, get_reducer("pdrop", stages=4), keep=0.25).generate(ids, px, 1)[1]
    assert info["layer_lens"] == [69, 6, 6, 6]  # the boundary: lambda = 0, later stages keep one token


def test_backend_without_attention_weights_is_refused(batch):
    ids, px = batch
    torch.manual_seed(0)
    sdpa = JanusForConditionalGeneration._from_config(_config(), attn_implementation="sdpa").eval()
    with pytest.raises(TokenReductionError, match="attn_implementation='eager'"):
        janus.JanusTokenReduction(sdpa, get_reducer("fastv"), keep=0.5)
    with pytest.raises(TokenReductionError, match="vision attention backend does not expose"):
        janus.reduced_inputs_embeds(sdpa, ids, px, get_reducer("visionzip"), keep=0.5)
    tokens, info = janus.JanusTokenReduction(sdpa, get_reducer("vnorm"), keep=0.5).generate(ids, px, 2)
    assert tokens.shape == (2, 2) and info["layer_lens"] == [69, 69, 37, 37]  # V-norm needs no weights
