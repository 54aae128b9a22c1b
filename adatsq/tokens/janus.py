"""Token reduction on transformers' `JanusForConditionalGeneration` (separate understanding and
generation encoders).

Understanding tokens come from `vision_model` + `aligner`; G2TR's anchors come from the generation
path: the image's VQ codes (`vqmodel.encode`) looked up in `generation_embeddings`, average-pooled
(pool 2) and passed through `generation_aligner` into the LM space. Janus's two grids coincide
(24×24 at 384 px), so a pooled anchor covers 2×2 understanding tokens.

Post-connector reducers (G2TR, VisionZip, ToMe, random, grid) replace the N-token image
placeholder span with K tokens and hand the LM `inputs_embeds` (Janus checks placeholder counts
against image features, so input_ids cannot be used after reduction). In-LM reducers (FastV,
PDrop, V-norm) keep the full span and prune inside the LM with `InLMPruner`. Positions: kept
tokens keep their original 1-D position ids (as FastV does), returned in `info["position_ids"]`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from adatsq.errors import TokenReductionError
from adatsq.tokens import g2tr
from adatsq.tokens.base import IN_LM, POST_CONNECTOR, Reduced, ReductionContext, TokenReducer
from adatsq.tokens.flops import kv_cache_bytes, lm_prefill_flops
from adatsq.tokens.inlm import InLMPruner

__all__ = [
    "JanusTokenReduction",
    "generation_anchors",
    "greedy_generate",
    "image_features",
    "placeholder_positions",
    "reduced_inputs_embeds",
    "vision_attention",
    "vision_grid",
]


def _janus(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    if not all(hasattr(inner, a) for a in ("vision_model", "aligner", "vqmodel", "language_model")):
        raise TokenReductionError(
            f"{type(model).__name__} is not a Janus model (needs vision_model, aligner, vqmodel, "
            f"language_model); pass a transformers JanusForConditionalGeneration"
        )
    return inner


def vision_grid(model: nn.Module) -> tuple[int, int]:
    """(h, w) of the understanding token grid: image_size // patch_size."""
    cfg = _janus(model).vision_model.config
    side = cfg.image_size // cfg.patch_size
    return side, side


def image_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Understanding tokens [B, N, D_lm]: vision_model last hidden state through the aligner."""
    inner = _janus(model)
    return inner.aligner(inner.vision_model(pixel_values).last_hidden_state)


def generation_anchors(
    model: nn.Module, pixel_values: Tensor, pool: int = 2
) -> tuple[Tensor, tuple[int, int]]:
    """G2TR anchors [B, M, D_lm] from the VQ generation path and their (pooled) latent grid."""
    inner = _janus(model)
    codes = inner.vqmodel.encode(pixel_values).image_tokens.view(pixel_values.shape[0], -1)
    side = math.isqrt(codes.shape[1])
    embeds = inner.generation_embeddings(codes).view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)
    hidden = inner.language_model.config.hidden_size
    out = [
        g2tr.anchors_from_latent(e, patch=1, pool=pool, project=inner.generation_aligner, hidden=hidden)
        for e in embeds
    ]
    return torch.stack([a for a, _ in out]), out[0][1]


def vision_attention(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Attention each understanding token receives in the vision encoder's last layer (mean over
    queries and heads) [B, N], VisionZip's dominance score; needs eager vision attention."""
    vision = _janus(model).vision_model
    out = vision(pixel_values, output_attentions=True)
    if not out.attentions or out.attentions[-1] is None:
        raise TokenReductionError(
            "the vision attention backend does not expose attention weights (VisionZip needs them); "
            "load the model with attn_implementation='eager'"
        )
    return out.attentions[-1].float().mean(dim=(1, 2))


def placeholder_positions(model: nn.Module, input_ids: Tensor, n: int) -> Tensor:
    """[B, N] positions of the image placeholder span in each row; one contiguous span of n per row."""
    image_id = model.config.image_token_id
    is_image = input_ids == image_id
    counts = is_image.sum(1)
    if not bool((counts == n).all()):
        raise TokenReductionError(
            f"each row needs exactly {n} image placeholder tokens (id {image_id}) for a {n}-token image, "
            f"got {counts.tolist()}; build the prompt with the Janus processor"
        )
    pos = is_image.nonzero()[:, 1].view(input_ids.shape[0], n)
    if bool((pos[:, -1] - pos[:, 0] != n - 1).any()):
        raise TokenReductionError("the image placeholder tokens must form one contiguous span per row")
    return pos


def _context(
    model: nn.Module,
    reducer: TokenReducer,
    pixel_values: Tensor,
    b: int,
    keep: float,
    min_keep: int,
    cache: dict,
) -> ReductionContext:
    """What reducer needs for row b, computing model signals once per batch (anchors, attention)."""
    ctx = ReductionContext(grid=vision_grid(model), keep=keep, min_keep=min_keep)
    if "anchors" in reducer.needs:
        if "anchors" not in cache:
            cache["anchors"] = generation_anchors(model, pixel_values)
        anchors, latent_grid = cache["anchors"]
        ctx.anchors, ctx.latent_grid = anchors[b], latent_grid
    if "attention" in reducer.needs:
        if "attention" not in cache:
            cache["attention"] = vision_attention(model, pixel_values)
        ctx.attention = cache["attention"][b]
    if "values" in reducer.needs:
        raise TokenReductionError(
            f"reducer {reducer.name!r} needs LM values; use JanusTokenReduction (in-LM)"
        )
    return ctx


def _position_ids(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def reduced_inputs_embeds(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor,
    reducer: TokenReducer,
    keep: float,
    min_keep: int = 1,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Prompt embeddings [B, L-N+K, D] with each image span replaced by its K reduced tokens.

    Returns (inputs_embeds, attention_mask, info); info holds `reduced` (one `Reduced` per row),
    `position_ids` (original positions of the kept sequence), `n_image`, `k_image`, `seq_len`
    (before, after). Only post-connector reducers; in-LM ones go through `JanusTokenReduction`.
    """
    if reducer.stage != POST_CONNECTOR:
        raise TokenReductionError(
            f"reducer {reducer.name!r} prunes inside the LM; use JanusTokenReduction(model, reducer, keep)"
        )
    features = image_features(model, pixel_values)  # [B, N, D]
    b_size, n = features.shape[:2]
    span = placeholder_positions(model, input_ids, n)
    text = model.get_input_embeddings()(input_ids)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = _position_ids(input_ids, attention_mask)
    cache: dict = {}
    rows, masks, pos, reduced = [], [], [], []
    for b in range(b_size):
        ctx = _context(model, reducer, pixel_values, b, keep, min_keep, cache)
        ctx.generator = generator
        r: Reduced = reducer.reduce(features[b], ctx)
        start, end = int(span[b, 0]), int(span[b, -1]) + 1
        rows.append(torch.cat([text[b, :start], r.tokens.to(text.dtype), text[b, end:]]))
        masks.append(torch.cat([mask[b, :start], mask[b, start + r.kept_index], mask[b, end:]]))
        pos.append(torch.cat([positions[b, :start], positions[b, start + r.kept_index], positions[b, end:]]))
        reduced.append(r)
    k = reduced[0].k
    info = {
        "reduced": reduced,
        "position_ids": torch.stack(pos),
        "n_image": n,
        "k_image": k,
        "seq_len": (input_ids.shape[1], input_ids.shape[1] - n + k),
    }
    return torch.stack(rows), torch.stack(masks), info


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
) -> Tensor:
    """Greedy decoding from prompt embeddings with a KV cache; returns new token ids [B, T].

    Decoding positions continue after each row's last prompt position, so gapped (original)
    positions of a reduced prompt are respected.
    """
    b_size, length = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    mask = (
        attention_mask
        if attention_mask is not None
        else torch.ones(b_size, length, dtype=torch.long, device=device)
    )
    pos = position_ids if position_ids is not None else torch.arange(length, device=device).expand(b_size, -1)
    out = model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, tokens = out.past_key_values, []
    finished = torch.zeros(b_size, dtype=torch.bool, device=device)
    embed = model.get_input_embeddings()
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        tokens.append(nxt)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out = model(
            inputs_embeds=embed(nxt[:, None]),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
    return torch.stack(tokens, 1)


class JanusTokenReduction:
    """One object for any reducer on Janus: `inputs()` then `generate()`, with prefill FLOPs/KV bytes.

    Post-connector reducers shorten the prompt; in-LM reducers (FastV, PDrop, V-norm) keep it and
    prune inside the LM while `generate` runs (FastV/PDrop need attn_implementation="eager").
    """

    def __init__(self, model: nn.Module, reducer: TokenReducer, keep: float, min_keep: int = 1) -> None:
        self.inner = _janus(model)
        self.model, self.reducer, self.keep, self.min_keep = model, reducer, keep, min_keep
        impl = getattr(self.inner.language_model.config, "_attn_implementation", None)
        if reducer.stage == IN_LM and "attention" in reducer.needs and impl != "eager":
            raise TokenReductionError(
                f"{reducer.name} needs the LM's attention weights, which the {impl!r} attention backend "
                f"does not expose; load the model with attn_implementation='eager'"
            )

    def inputs(
        self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if self.reducer.stage == POST_CONNECTOR:
            return reduced_inputs_embeds(
                self.model, input_ids, pixel_values, self.reducer, self.keep, self.min_keep, attention_mask
            )
        with torch.no_grad():
            features = image_features(self.model, pixel_values)
            span = placeholder_positions(self.model, input_ids, features.shape[1])
            text = self.model.get_input_embeddings()(input_ids)
            is_image = (input_ids == self.model.config.image_token_id)[..., None]
            embeds = text.masked_scatter(is_image, features.to(text.dtype))
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        info = {
            "span": span,
            "position_ids": _position_ids(input_ids, attention_mask),
            "n_image": span.shape[1],
        }
        return embeds, mask, info

    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        max_new_tokens: int = 8,
        eos_token_id: int | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Greedy answer tokens [B, T] and info with `layer_lens`, `prefill_flops`, `kv_bytes`."""
        embeds, mask, info = self.inputs(input_ids, pixel_values)
        layers = self.inner.language_model.layers
        if self.reducer.stage == IN_LM:
            pruner = InLMPruner(layers, self.reducer, self.keep, self.min_keep)
            pruner.arm(info["span"], vision_grid(self.model), embeds.shape[1])
            with pruner:
                tokens = greedy_generate(
                    self.model, embeds, mask, info["position_ids"], max_new_tokens, eos_token_id
                )
            info["layer_lens"], info["kept_image"] = pruner.layer_lens, pruner.kept_image
        else:
            tokens = greedy_generate(
                self.model, embeds, mask, info["position_ids"], max_new_tokens, eos_token_id
            )
            info["layer_lens"] = [embeds.shape[1]] * len(layers)
        cfg = self.inner.language_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        info["prefill_flops"] = lm_prefill_flops(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            info["layer_lens"],
            head_dim=head_dim,
        )
        dtype_bytes = torch.finfo(embeds.dtype).bits // 8
        info["kv_bytes"] = kv_cache_bytes(
            cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, info["layer_lens"], dtype_bytes
        )
        return tokens, info
