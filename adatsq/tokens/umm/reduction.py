"""Where each token reducer runs in the reference UMM, and what it costs.

* post-connector reducers (`stage == POST_CONNECTOR`: g2tr, tome, random, grid, visionzip) reduce the
  connector output of each image before the learned 2-D position embedding; kept / merged tokens are
  placed at their original grid positions and the LM's image span (and its mask) shrinks to K.
  Questions are then packed.
* in-LM reducers (`InLMReducer`: fastv, pdrop, vnorm) run inside the decoder, which is driven layer by
  layer: at each boundary of the reducer's `stage_plan`, what it `needs` is captured at the layer
  before (the attention of the last question token, or the value vectors entering it) and its `prune`
  picks the survivors: fastv and vnorm drop tokens once, at layer `layer`; pdrop repeats FastV's ranking
  at its stage boundaries with the per-stage ratio that matches the requested average keep
  (`pdrop_stage_ratio`). They depend on the question, so each question runs as its own sequence.
* G2TR's anchors are the image's own VAE latent (scaled, as the generation path sees it), patchified,
  average-pooled 2x2 and projected by the model's `vae2llm`.
* Generation tokens are never reduced unless `reduce_generation=True` is passed explicitly (and then
  only by reducers with `supports_generation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import TokenReductionError
from adatsq.models.umm.model import MiniUMM, segment_mask
from adatsq.tokens.base import (
    IN_LM,
    POST_CONNECTOR,
    InLMReducer,
    Reduced,
    ReductionContext,
    TokenReducer,
    get_reducer,
    keep_count,
    reducer_names,
)
from adatsq.tokens.g2tr import anchors_from_latent

ANCHOR_POOL = 2


@dataclass(frozen=True)
class Answer:
    """Answer logits per question type, kept grid indices [B, K] per type, image tokens per LM layer."""

    logits: dict[str, Tensor]
    kept: dict[str, Tensor]
    layer_image_tokens: list[int]


def as_reducer(reducer: TokenReducer | str | None) -> TokenReducer | None:
    return get_reducer(reducer) if isinstance(reducer, str) else reducer


class UMMReduction:
    """Runs the reference UMM with a token reducer at the place where that reducer belongs."""

    def __init__(self, model: MiniUMM, anchor_pool: int = ANCHOR_POOL) -> None:
        """`anchor_pool`: latent patches averaged per G2TR anchor side (2 as in BAGEL; 1 = one per token)."""
        self.model = model.eval()
        self.anchor_pool = anchor_pool
        c = model.config
        self.grid = (c.grid, c.grid)
        self.n = c.grid**2
        self.n_layers = c.lm_layers

    # ---- contexts --------------------------------------------------------------------------------
    @torch.no_grad()
    def anchors(self, images: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
        """G2TR anchors per image from the VAE latent, through the model's own vae2llm."""
        latents = self.model.encode_latents(images)
        out = [
            anchors_from_latent(
                lat, self.model.config.gen_patch, self.anchor_pool, project=self.model.vae2llm
            )
            for lat in latents
        ]
        return [a for a, _ in out], out[0][1]

    @torch.no_grad()
    def vision_attention(self, images: Tensor) -> Tensor:
        """[B, N] mean attention each token receives in SigLIP's last layer (VisionZip's score)."""
        vision = self.model.vision
        hidden = vision(pixel_values=self.model.stem(images), output_hidden_states=True).hidden_states[-2]
        layer = vision.encoder.layers[-1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [B, heads, N, N]
        return probs.mean(dim=(1, 2))

    def contexts(
        self, reducer: TokenReducer, images: Tensor, keep: float, generator: torch.Generator | None
    ) -> list[ReductionContext]:
        b = images.shape[0]
        anchors, latent_grid = self.anchors(images) if "anchors" in reducer.needs else ([None] * b, None)
        attention = self.vision_attention(images) if "attention" in reducer.needs else [None] * b
        return [
            ReductionContext(
                grid=self.grid,
                keep=keep,
                anchors=anchors[i],
                latent_grid=latent_grid,
                attention=attention[i],
                generator=generator,
            )
            for i in range(b)
        ]

    # ---- understanding ---------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_post_connector(
        self,
        images: Tensor,
        tokens: Tensor,
        reducer: TokenReducer,
        keep: float,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, list[Reduced]]:
        """Reduced connector tokens [B, K, D], their grid indices [B, K] and the per-image results."""
        if reducer.stage != POST_CONNECTOR:
            raise TokenReductionError(
                f"reducer {reducer.name!r} runs {reducer.stage!r}, not after the connector; "
                f"in-LM reducers are {reducer_names(stage=IN_LM)}"
            )
        contexts = self.contexts(reducer, images, keep, generator)
        results = [reducer.reduce(tok, ctx) for tok, ctx in zip(tokens, contexts, strict=True)]
        return torch.stack([r.tokens for r in results]), torch.stack([r.kept_index for r in results]), results

    @torch.no_grad()
    def answer(
        self,
        images: Tensor,
        questions: dict[str, Tensor],
        reducer: TokenReducer | str | None = None,
        keep: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Answer:
        """Answer every question type about `images`, with `reducer` keeping `keep` of the image tokens."""
        reducer = as_reducer(reducer)
        m = self.model
        tokens = m.connect(images)
        b = tokens.shape[0]
        if reducer is None or reducer.stage == POST_CONNECTOR:
            kept = torch.arange(self.n).expand(b, self.n)
            if reducer is not None:
                tokens, kept, _ = self.reduce_post_connector(images, tokens, reducer, keep, generator)
            logits = m.understand_tokens(tokens, kept, list(questions.values()))
            return Answer(
                dict(zip(questions, logits, strict=True)),
                dict.fromkeys(questions, kept),
                [kept.shape[1]] * self.n_layers,
            )
        if not isinstance(reducer, InLMReducer):
            raise TokenReductionError(
                f"reducer {reducer.name!r} runs {reducer.stage!r} but is no InLMReducer (it has no "
                f"pruning plan); in-LM reducers are {reducer_names(stage=IN_LM)}"
            )
        schedule = self.schedule(reducer, keep)
        logits, kept_all = {}, {}
        for kind, ids in questions.items():
            logits[kind], kept_all[kind] = self._answer_in_lm(tokens, ids, reducer, keep, schedule)
        return Answer(logits, kept_all, self.layer_image_tokens(schedule))

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Tensor,
        null_prompts: Tensor,
        steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        reducer: TokenReducer | str | None = None,
        keep: float = 1.0,
        reduce_generation: bool = False,
    ) -> Tensor:
        """Images from prompts; a reducer touches the generation tokens only with reduce_generation=True."""
        reducer = as_reducer(reducer)
        if reducer is None:
            return self.model.sample(prompts, null_prompts, steps, guidance, seed)
        if not reduce_generation:
            raise TokenReductionError(
                f"generation tokens are never reduced by default (reducer {reducer.name!r}, "
                f"keep={keep}): every latent token must be denoised. Reducers apply to understanding "
                f"tokens; pass reduce_generation=True only to force it for an experiment, or "
                f"reducer=None to generate"
            )
        if not reducer.supports_generation:
            raise TokenReductionError(
                f"forced generation reduction supports {reducer_names(supports_generation=True)}, not "
                f"{reducer.name!r} (it needs "
                f"question attention or ViT attention, which generation tokens do not have)"
            )
        generator = torch.Generator().manual_seed(seed)
        return self.model.sample(
            prompts,
            null_prompts,
            steps,
            guidance,
            seed,
            velocity=lambda ids, x, t: self._reduced_velocity(ids, x, t, reducer, keep, generator),
        )

    def _reduced_velocity(
        self,
        ids: Tensor,
        x: Tensor,
        t: Tensor,
        reducer: TokenReducer,
        keep: float,
        generator: torch.Generator,
    ) -> Tensor:
        """Velocity of every latent token when only K reduced tokens enter the LM: a token takes its
        slot's prediction (merged) or zero (pruned)."""
        m, c = self.model, self.model.config
        embeds = m.latent_tokens(x, t)
        grid = (c.gen_grid, c.gen_grid)
        if "anchors" in reducer.needs:
            pairs = [
                anchors_from_latent(lat, c.gen_patch, self.anchor_pool, project=m.vae2llm)
                for lat in m.unpatchify(x)
            ]
        else:
            pairs = [(None, None)] * x.shape[0]
        results = [
            reducer.reduce(
                e, ReductionContext(grid=grid, keep=keep, anchors=a, latent_grid=g, generator=generator)
            )
            for e, (a, g) in zip(embeds, pairs, strict=True)
        ]
        v = m.predict_velocity(
            ids, torch.stack([r.tokens for r in results]), torch.stack([r.kept_index for r in results])
        )
        slot = torch.stack([r.assignment for r in results])  # [B, M], -1 = dropped
        full = _take(v, slot.clamp_min(0))
        return full * (slot >= 0)[..., None]

    def schedule(self, reducer: InLMReducer, keep: float) -> dict[int, int]:
        """{first layer: image tokens from then on} of an in-LM reducer at average keep ratio `keep`."""
        return dict(reducer.stage_plan(self.n, self.n_layers, keep))

    def image_token_counts(self, reducer: TokenReducer | str | None, keep: float) -> list[int]:
        """Image tokens each LM layer runs on with `reducer` at `keep` (all of them without one)."""
        reducer = as_reducer(reducer)
        if reducer is None:
            return [self.n] * self.n_layers
        if isinstance(reducer, InLMReducer):
            return self.layer_image_tokens(self.schedule(reducer, keep))
        return [keep_count(self.n, keep)] * self.n_layers

    def layer_image_tokens(self, schedule: dict[int, int]) -> list[int]:
        counts, current = [], self.n
        for layer in range(self.n_layers):
            current = min(current, schedule.get(layer, current))
            counts.append(current)
        return counts

    def _answer_in_lm(
        self, tokens: Tensor, ids: Tensor, reducer: InLMReducer, keep: float, schedule: dict[int, int]
    ) -> tuple[Tensor, Tensor]:
        m = self.model
        b = tokens.shape[0]
        index = torch.arange(self.n).expand(b, self.n)
        hidden, positions, segments, _ = m.assemble(m.place_image_tokens(tokens, index), [ids])
        cos, sin = m.rope(hidden, positions)
        mask = segment_mask(segments, hidden.dtype)
        current = self.n
        layers = m.lm.model.layers
        prev = hidden
        for li, layer in enumerate(layers):
            if li in schedule and schedule[li] < current:
                keep_rows = self._select(
                    layers[li - 1], prev, (cos, sin), mask, reducer, keep, schedule[li], current
                )
                rows = torch.cat([keep_rows, torch.arange(current, hidden.shape[1]).expand(b, -1)], 1)
                hidden, segments, cos, sin = (_take(x, rows) for x in (hidden, segments, cos, sin))
                index = index.gather(1, keep_rows)
                mask = segment_mask(segments, hidden.dtype)
                current = keep_rows.shape[1]
            prev = hidden
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        return m.answer_logits(hidden[:, -1]), index

    def _select(
        self,
        layer,
        hidden: Tensor,
        rope,
        mask: Tensor,
        reducer: InLMReducer,
        keep: float,
        count: int,
        current: int,
    ) -> Tensor:
        """Rows [B, count] (ascending, among the `current` image tokens) that survive this boundary:
        what the reducer `needs`, captured at `layer` (the one before the boundary), then its `prune`."""
        b = hidden.shape[0]
        values = attention = [None] * b
        if "values" in reducer.needs:  # the value vectors of the hidden states entering the boundary
            values = layer.self_attn.v_proj(layer.input_layernorm(hidden))[:, :current]
        if "attention" in reducer.needs:
            attention = last_token_attention(layer, hidden, rope, mask)[:, :current]
        contexts = [
            ReductionContext(grid=self.grid, keep=keep, attention=attention[i], values=values[i])
            for i in range(b)
        ]
        return torch.stack([reducer.prune(hidden[i, :current], ctx, count) for i, ctx in enumerate(contexts)])


def last_token_attention(layer, hidden: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
    """[B, L] attention of the last position over all positions in a Qwen2 layer, averaged over heads."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = q[:, :, -1:] @ k.transpose(-1, -2) * attn.scaling + mask[:, :, -1:]
    return torch.softmax(scores.float(), dim=-1)[:, :, 0].mean(1)


def _take(x: Tensor, rows: Tensor) -> Tensor:
    """Gather rows [B, R] along dim 1 of x [B, L, ...]."""
    shape = rows.shape + x.shape[2:]
    return x.gather(1, rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(shape))
