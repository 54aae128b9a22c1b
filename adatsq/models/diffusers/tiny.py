"""Tiny random diffusers pipelines built offline, for tests, docs and smoke benchmarks.

Each family uses the real pipeline and model classes at toy sizes (a few thousand to a few hundred
thousand parameters), with tokenizers built in memory, so the whole adatsq flow runs without the hub.
The weights are random: outputs are meaningless, but shapes, module names and sampler logic are real.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from pathlib import Path

import diffusers
import tokenizers
import torch
import transformers

from adatsq.core.registry import Registry
from adatsq.models.diffusers.config import DiffusersSampling, write_settings

# family -> builder of (pipeline at toy sizes, sampling settings that fit them)
TINY_PIPELINES: Registry[Callable[[], tuple[diffusers.DiffusionPipeline, DiffusersSampling]]] = Registry(
    "tiny family"
)
_CHARS = string.ascii_letters + string.digits + ",.'!?-"


def _clip_tokenizer(max_length: int) -> transformers.CLIPTokenizer:
    """Character-level BPE (no merges): every prompt tokenizes, with CLIP's start/end tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS.lower():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int) -> transformers.T5Tokenizer:
    """Character-level unigram model with T5's <pad>=0, </s>=1, <unk>=2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("▁" + c, -2.5) for c in _CHARS]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _qwen_tokenizer(max_length: int) -> transformers.Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols plus Qwen's chat tokens, with a minimal chat template."""
    byte_symbols = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *byte_symbols])}
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return transformers.Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=max_length,
        additional_special_tokens=specials[1:],
        chat_template=template,
    )


def _clip_text(projection: bool, vocab: int, eos: int) -> transformers.PreTrainedModel:
    config = transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def _t5_encoder(d_model: int, vocab: int, umt5: bool = False) -> transformers.PreTrainedModel:
    sizes = {"d_model": d_model, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2}
    if umt5:
        return transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=vocab, **sizes))
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, **sizes))


def _vae(latent_channels: int) -> diffusers.AutoencoderKL:
    """Two blocks: vae_scale_factor 2. shift_factor 0.0 because Flux / Z-Image subtract it on decode."""
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        shift_factor=0.0,
    )


# Flux and QwenImage share their double-stream block: 2 heads of 16 (= sum of the rope axes), 16 input
# channels (4 latent channels packed 2x2), text features of 32
_TINY_MMDIT = {
    "in_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


@TINY_PIPELINES.register("flux")
def _flux() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    clip_tok, t5_tok = _clip_tokenizer(16), _t5_tokenizer(16)
    pipe = diffusers.FluxPipeline(
        transformer=diffusers.FluxTransformer2DModel(
            patch_size=1,
            num_single_layers=2,
            pooled_projection_dim=32,
            guidance_embeds=True,
            **_TINY_MMDIT,
        ),
        # Flux-dev's scheduler: the shift depends on the image token count, which the adapter must see.
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
        ),
        vae=_vae(4),
        text_encoder=_clip_text(False, len(clip_tok), clip_tok.eos_token_id),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(32, len(t5_tok)),
        tokenizer_2=t5_tok,
    )
    return pipe, DiffusersSampling(height=16, width=16, max_sequence_length=8)


@TINY_PIPELINES.register("sd3")
def _sd3() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    clip_tok, t5_tok = _clip_tokenizer(16), _t5_tokenizer(16)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=64,  # T5 width; the two CLIP widths (2 x 32) are padded up to it
            caption_projection_dim=64,
            pooled_projection_dim=64,  # two pooled CLIP projections of 32
            out_channels=4,
            pos_embed_max_size=16,
        ),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4),
        text_encoder=_clip_text(True, len(clip_tok), clip_tok.eos_token_id),
        tokenizer=clip_tok,
        text_encoder_2=_clip_text(True, len(clip_tok), clip_tok.eos_token_id),
        tokenizer_2=_clip_tokenizer(16),
        text_encoder_3=_t5_encoder(64, len(t5_tok)),
        tokenizer_3=t5_tok,
    )
    return pipe, DiffusersSampling(height=16, width=16, max_sequence_length=8)


def _pixart(pipeline_cls: type) -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    t5_tok = _t5_tokenizer(16)
    pipe = pipeline_cls(
        transformer=diffusers.PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=4,
            out_channels=8,  # learned sigma
            num_layers=2,
            cross_attention_dim=64,
            sample_size=8,
            patch_size=2,
            caption_channels=32,
            use_additional_conditions=False,
        ),
        scheduler=diffusers.DPMSolverMultistepScheduler(),
        vae=_vae(4),
        text_encoder=_t5_encoder(32, len(t5_tok)),
        tokenizer=t5_tok,
    )
    # Resolution binning only knows PixArt's real sample sizes (32..256 latents).
    extra = {"use_resolution_binning": False, "clean_caption": False}
    return pipe, DiffusersSampling(height=16, width=16, max_sequence_length=8, extra=extra)


@TINY_PIPELINES.register("dit")
def _dit() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    pipe = diffusers.DiTPipeline(
        transformer=diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=4,
            out_channels=8,  # learned sigma, as DiTPipeline expects
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,  # DiTPipeline hard-codes 1000 as the null class for guidance
        ),
        vae=_vae(4),
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
    return pipe, DiffusersSampling()


@TINY_PIPELINES.register("wan")
def _wan() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    t5_tok = _t5_tokenizer(16)
    pipe = diffusers.WanPipeline(
        transformer=diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            rope_max_seq_len=32,
        ),
        vae=diffusers.AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        # Wan 2.1's own scheduler: UniPC with flow sigmas.
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        text_encoder=_t5_encoder(32, len(t5_tok), umt5=True),
        tokenizer=t5_tok,
    )
    return pipe, DiffusersSampling(height=32, width=32, max_sequence_length=8, extra={"num_frames": 5})


@TINY_PIPELINES.register("z-image")
def _z_image() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    tok = _qwen_tokenizer(64)
    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[8, 12, 12],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fix them so runs are reproducible
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    text_config = transformers.Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    )
    pipe = diffusers.ZImagePipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4),
        text_encoder=transformers.Qwen3Model(text_config),
        tokenizer=tok,
    )
    return pipe, DiffusersSampling(height=16, width=16, max_sequence_length=64)


@TINY_PIPELINES.register("qwen-image")
def _qwen_image() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    tok = _qwen_tokenizer(64)
    eos = tok.eos_token_id
    text_config = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "rope_parameters": {"mrope_section": [2, 2, 4], "rope_type": "default", "rope_theta": 1e6},
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": 32,
    }
    # Text only: the vision token ids are never produced, any in-vocabulary id will do.
    vision_ids = {
        k: eos for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    }
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **vision_ids)
    )
    pipe = diffusers.QwenImagePipeline(
        transformer=diffusers.QwenImageTransformer2DModel(patch_size=2, out_channels=4, **_TINY_MMDIT),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=diffusers.AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        ),
        text_encoder=text_encoder,
        tokenizer=tok,
    )
    # A negative prompt switches on true CFG: two transformer calls per step, as in real use.
    return pipe, DiffusersSampling(
        height=16, width=16, max_sequence_length=16, extra={"negative_prompt": " "}
    )


@TINY_PIPELINES.register("pixart-sigma")
def _pixart_sigma() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    return _pixart(diffusers.PixArtSigmaPipeline)


@TINY_PIPELINES.register("pixart-alpha")
def _pixart_alpha() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    return _pixart(diffusers.PixArtAlphaPipeline)


@TINY_PIPELINES.register("sana")
def _sana() -> tuple[diffusers.DiffusionPipeline, DiffusersSampling]:
    """Linear attention; its GLUMBConv feed-forward is Conv2d (kept float), its attention Linears quantize."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *dict.fromkeys(_CHARS + "▁")])}
    tok = transformers.GemmaTokenizer(vocab=vocab, merges=[], model_max_length=64)  # characters, no merges
    text_config = transformers.Gemma2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    )
    blocks = {"block_types": ("ResBlock",) * 2, "block_out_channels": (8, 8), "layers_per_block": (1, 1)}
    vae = diffusers.AutoencoderDC(  # two blocks: vae_scale_factor 2
        in_channels=3,
        latent_channels=4,
        attention_head_dim=8,
        **{f"{side}_{key}": value for side in ("encoder", "decoder") for key, value in blocks.items()},
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
    )
    pipe = diffusers.SanaPipeline(
        tokenizer=tok,
        text_encoder=transformers.Gemma2Model(text_config),
        vae=vae,
        transformer=diffusers.SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=32,
            sample_size=8,
            patch_size=1,
        ),
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
    # Sana wants height / width divisible by 32; binning knows only the released sizes; the default
    # "complex human instruction" prepends a long system prompt to every prompt.
    extra = {"use_resolution_binning": False, "complex_human_instruction": None}
    return pipe, DiffusersSampling(height=32, width=32, max_sequence_length=16, extra=extra)


TINY_FAMILIES = tuple(TINY_PIPELINES.names())


def build_tiny_pipeline(family: str, directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` with seeded random weights and save it to `directory`.

    The folder also gets adatsq_pipeline.json with sampling settings that fit the toy sizes, so
    `DiffusersPipelineAdapter.from_folder(directory)` samples at a few pixels without more arguments.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe, sampling = TINY_PIPELINES.get(family)()
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    write_settings(directory, sampling, torch.float32)
    return directory
