"""The reference unified multimodal model: a miniature BAGEL built from real library classes.

Understanding: conv stem -> transformers `SiglipVisionModel` -> MLP connector -> (reducers run here) ->
learned 2-D position embedding of each kept token -> Qwen2 decoder -> one-token answer.
Generation: diffusers `AutoencoderKL` latent, patchified -> `vae2llm` (+ 2-D position, timestep embedding)
-> the same Qwen2 decoder -> `llm2vae` velocity head (rectified flow, Transfusion/BAGEL style).

The decoder runs layer by layer with an explicit additive mask so adapters can drop tokens between
layers (FastV, PDrop) and packed sequences stay exact: image tokens attend to image tokens only,
every text segment attends to the image and causally to itself, latent tokens attend to their prompt
and to each other. All image tokens share one rotary position (BAGEL's convention); their place on the
grid is the learned 2-D position embedding, so a kept token sits where it sat whatever a reducer
drops. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from adatsq.errors import ConfigError
from adatsq.models.umm.data import CANVAS, VOCAB

FORMAT_VERSION = 1


@dataclass(frozen=True)
class UMMConfig:
    canvas: int = CANVAS
    stem_channels: int = 32  # 3x3 conv stem before SigLIP's patchify: digits learn much faster with it
    vit_patch: int = 4  # 48 / 4 -> 12 x 12 = 144 understanding tokens
    vit_hidden: int = 96
    vit_layers: int = 3
    vit_heads: int = 4
    vit_ffn: int = 256
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_ffn: int = 256
    # 3 levels -> latent 4x smaller (12 x 12). Narrow on purpose: its encoder costs ~5% of a full-token
    # LM prefill, about the share a real UMM's VAE has next to its LM (G2TR pays it as overhead)
    vae_channels: tuple[int, ...] = (8, 8, 16)
    latent_channels: int = 4
    gen_patch: int = 2  # latent patch per generation token: 6 x 6 = 36 tokens of 16 values
    latent_scale: float = 1.0  # multiplies VAE posterior means (set from data after VAE training)
    vocab: tuple[str, ...] = field(default=VOCAB)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_channels", tuple(self.vae_channels))
        object.__setattr__(self, "vocab", tuple(self.vocab))
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"UMM config format_version {self.format_version} unsupported; expected 1")
        if self.canvas % self.vit_patch:
            raise ConfigError(f"canvas {self.canvas} must be a multiple of vit_patch {self.vit_patch}")
        if self.latent_grid % self.gen_patch:
            raise ConfigError(
                f"latent side {self.latent_grid} must be a multiple of gen_patch {self.gen_patch}"
            )
        if self.lm_hidden % self.lm_heads or self.lm_heads % self.lm_kv_heads:
            raise ConfigError("lm_hidden must divide by lm_heads and lm_heads by lm_kv_heads")

    @property
    def grid(self) -> int:
        """Understanding tokens per side."""
        return self.canvas // self.vit_patch

    @property
    def latent_grid(self) -> int:
        return self.canvas // 2 ** (len(self.vae_channels) - 1)

    @property
    def gen_grid(self) -> int:
        """Generation tokens per side."""
        return self.latent_grid // self.gen_patch

    @property
    def gen_token_dim(self) -> int:
        return self.latent_channels * self.gen_patch**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UMMConfig:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"unknown UMM config keys {sorted(unknown)}")
        return cls(**data)


def segment_mask(segments: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive mask [B, 1, L, L] from segment ids [B, L].

    Segment 0 (the image / prompt context) attends to itself bidirectionally when `segments` marks it
    with 0 and to nothing else; segment s > 0 tokens attend to segment 0 and causally within s. Latent
    tokens use negative ids: they attend to segment 0 and to their whole own segment (bidirectional).
    """
    q, k = segments[:, :, None], segments[:, None, :]
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = q == k
    allowed = (k == 0) | (same & (causal | (q < 0)))
    allowed &= (q != 0) | (k == 0)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def sincos_2d(grid: int, dim: int) -> Tensor:
    """[grid*grid, dim] 2-D sine-cosine position table (rows in the first half, columns in the second).

    Used to initialise the learned 2-D position embeddings: with a small random start, questions about
    places ("top-left", "left-most") stayed near chance long after counting was learned.
    """
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)[:, None] * freqs[None]  # [grid, dim/4]
    axis = torch.cat([torch.sin(coords), torch.cos(coords)], dim=1)  # [grid, dim/2]
    rows = axis[:, None, :].expand(grid, grid, dim // 2)
    cols = axis[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).clone()


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MiniUMM(nn.Module):
    """Understanding + generation over one shared decoder; see the module docstring for the data flow."""

    def __init__(self, config: UMMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.stem = nn.Sequential(
            nn.Conv2d(1, c.stem_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c.stem_channels, c.stem_channels, 3, padding=1),
            nn.GELU(),
        )
        self.vision = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=c.vit_hidden,
                intermediate_size=c.vit_ffn,
                num_hidden_layers=c.vit_layers,
                num_attention_heads=c.vit_heads,
                num_channels=c.stem_channels,
                image_size=c.canvas,
                patch_size=c.vit_patch,
                vision_use_head=False,
                attn_implementation="sdpa",
            )
        )
        self.token_head = nn.Linear(c.vit_hidden, 11)  # dense warm-up / auxiliary: digit class per patch
        self.connector = nn.Sequential(
            nn.Linear(c.vit_hidden, c.lm_hidden), nn.GELU(), nn.Linear(c.lm_hidden, c.lm_hidden)
        )
        self.und_pos = nn.Parameter(sincos_2d(c.grid, c.lm_hidden))
        self.vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * len(c.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(c.vae_channels),
            block_out_channels=c.vae_channels,
            latent_channels=c.latent_channels,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=c.canvas,
            mid_block_add_attention=False,
            shift_factor=0.0,
        )
        self.vae2llm = nn.Linear(c.gen_token_dim, c.lm_hidden)
        self.gen_pos = nn.Parameter(sincos_2d(c.gen_grid, c.lm_hidden))
        self.time_embed = nn.Sequential(
            nn.Linear(c.lm_hidden, c.lm_hidden), nn.SiLU(), nn.Linear(c.lm_hidden, c.lm_hidden)
        )
        self.llm2vae = nn.Linear(c.lm_hidden, c.gen_token_dim)
        lm_config = Qwen2Config(
            vocab_size=len(c.vocab),
            hidden_size=c.lm_hidden,
            intermediate_size=c.lm_ffn,
            num_hidden_layers=c.lm_layers,
            num_attention_heads=c.lm_heads,
            num_key_value_heads=c.lm_kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        lm_config._attn_implementation = "sdpa"
        self.lm = Qwen2ForCausalLM(lm_config)

    # ---- understanding -------------------------------------------------------------------------
    def vision_features(self, images: Tensor) -> Tensor:
        """[B, 1, H, W] in [-1, 1] -> SigLIP tokens [B, N, vit_hidden]."""
        return self.vision(pixel_values=self.stem(images)).last_hidden_state

    def connect(self, images: Tensor) -> Tensor:
        """Connector output [B, N, lm_hidden]: where post-connector reducers run (no position yet)."""
        return self.connector(self.vision_features(images))

    def place_image_tokens(self, tokens: Tensor, kept_index: Tensor) -> Tensor:
        """Add the learned 2-D position of each (kept) token: [B, K, D] + und_pos[kept_index]."""
        return tokens + self.und_pos[kept_index]

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        """Scaled VAE posterior means [B, C, h, w] (the flow runs in this space)."""
        return self.vae.encode(images).latent_dist.mean * self.config.latent_scale

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.config.latent_scale).sample.clamp(-1, 1)

    def patchify(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, (h/p)(w/p), p p C], row-major; BAGEL's channel order (what G2TR's
        `anchors_from_latent` assumes, so anchors go through `vae2llm` exactly like generation tokens)."""
        b, ch, h, w = latents.shape
        p = self.config.gen_patch
        x = latents.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # b hp wp py px c
        return x.reshape(b, (h // p) * (w // p), p * p * ch)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        c = self.config
        b, g, p = tokens.shape[0], c.gen_grid, c.gen_patch
        x = tokens.reshape(b, g, g, p, p, c.latent_channels).permute(0, 5, 1, 3, 2, 4)  # b c hp py wp px
        return x.reshape(b, c.latent_channels, g * p, g * p)

    def latent_tokens(self, noisy: Tensor, t: Tensor) -> Tensor:
        """Embed noisy latent tokens [B, M, C p p] at time t [B]: vae2llm + time (position comes later)."""
        temb = self.time_embed(timestep_embedding(t, self.config.lm_hidden))
        return self.vae2llm(noisy) + temb[:, None]

    # ---- decoder ---------------------------------------------------------------------------------
    def embed_text(self, ids: Tensor) -> Tensor:
        return self.lm.model.embed_tokens(ids)

    def rope(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.lm.model.rotary_emb(hidden, positions)

    def run_layers(
        self,
        hidden: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        start: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        for layer in self.lm.model.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope)
        return hidden

    def answer_logits(self, hidden: Tensor) -> Tensor:
        return self.lm.lm_head(self.lm.model.norm(hidden))

    def velocity(self, hidden: Tensor) -> Tensor:
        return self.llm2vae(self.lm.model.norm(hidden))

    # ---- sequences -------------------------------------------------------------------------------
    def assemble(self, image_embeds: Tensor, texts: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Pack [image (K) | text_1 | ... | text_m] -> embeds, rope positions, segment ids, text ends.

        As in BAGEL, every image token has the same rotary position (0; where a token sits is its 2-D
        position embedding) and every text starts at position 1, so a question sees the same positions
        whatever a reducer kept. With row-major rotary positions instead, questions that look up a
        digit by its class ("is there a digit 3 ?") stayed at chance (reports/umm_training.md).
        """
        b, k, _ = image_embeds.shape
        parts = [image_embeds]
        positions = [torch.zeros(b, k, dtype=torch.long, device=image_embeds.device)]
        segments = [torch.zeros(b, k, dtype=torch.long, device=image_embeds.device)]
        ends, offset = [], k
        for j, ids in enumerate(texts):
            length = ids.shape[1]
            parts.append(self.embed_text(ids))
            positions.append((1 + torch.arange(length, device=ids.device)).expand(b, length))
            segments.append(torch.full((b, length), j + 1, dtype=torch.long, device=ids.device))
            offset += length
            ends.append(offset - 1)
        return torch.cat(parts, 1), torch.cat(positions, 1), torch.cat(segments, 1), ends

    def understand(self, images: Tensor, texts: list[Tensor]) -> list[Tensor]:
        """Answer logits [B, V] for each packed question, with the full image token set."""
        tokens = self.connect(images)
        b, n, _ = tokens.shape
        return self.understand_tokens(tokens, torch.arange(n, device=tokens.device).expand(b, n), texts)

    def understand_tokens(self, tokens: Tensor, kept_index: Tensor, texts: list[Tensor]) -> list[Tensor]:
        """Answer logits from (reduced) connector tokens [B, K, D] sitting at grid indices [B, K]."""
        embeds, positions, segments, ends = self.assemble(self.place_image_tokens(tokens, kept_index), texts)
        hidden = self.run_layers(embeds, self.rope(embeds, positions), segment_mask(segments, embeds.dtype))
        return [self.answer_logits(hidden[:, e]) for e in ends]

    def predict_velocity(
        self, prompts: Tensor, latent_embeds: Tensor, latent_index: Tensor | None = None
    ) -> Tensor:
        """Velocity [B, M', C p p] of (possibly reduced) latent tokens conditioned on prompt ids [B, P]."""
        b, m, _ = latent_embeds.shape
        p = prompts.shape[1]
        if latent_index is None:
            latent_index = torch.arange(m, device=latent_embeds.device).expand(b, m)
        embeds = torch.cat([self.embed_text(prompts), latent_embeds + self.gen_pos[latent_index]], 1)
        positions = torch.cat([torch.arange(p, device=prompts.device).expand(b, p), p + latent_index], 1)
        segments = torch.cat(
            [torch.zeros(b, p, dtype=torch.long), torch.full((b, m), -1, dtype=torch.long)], 1
        ).to(prompts.device)
        hidden = self.run_layers(embeds, self.rope(embeds, positions), segment_mask(segments, embeds.dtype))
        return self.velocity(hidden[:, p:])

    @torch.no_grad()
    def sample(
        self,
        prompts: Tensor,
        null_prompts: Tensor,
        steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        velocity: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Euler rectified-flow sampling (t: 1 -> 0) with classifier-free guidance; images [B, 1, H, W].

        `velocity(prompt_ids, x, t)` replaces the plain prediction (adapters force reductions this way).
        """
        return self.sample_flow(prompts, null_prompts, steps, guidance, seed, velocity)

    def sample_flow(
        self,
        prompts: Tensor,
        null_prompts: Tensor,
        steps: int,
        guidance: float,
        seed: int,
        velocity: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        step_callback: Callable[[int, Tensor], Tensor | None] | None = None,
    ) -> Tensor:
        """`sample` with gradients allowed and a per-step callback (quantization and Fisher weights use it).

        `step_callback(step, x)` sees the latents after every step and may return replacements.
        """
        c = self.config
        b = prompts.shape[0]
        x = torch.randn(b, c.gen_grid**2, c.gen_token_dim, generator=torch.Generator().manual_seed(seed))
        both = torch.cat([prompts, null_prompts])
        velocity = velocity or (lambda ids, xt, t: self.predict_velocity(ids, self.latent_tokens(xt, t)))
        for i in range(steps):
            t0, t1 = 1 - i / steps, 1 - (i + 1) / steps
            v_cond, v_null = velocity(both, torch.cat([x, x]), torch.full((2 * b,), t0)).chunk(2)
            x = x + (t1 - t0) * (v_null + guidance * (v_cond - v_null))
            if step_callback is not None:
                replaced = step_callback(i, x)
                x = x if replaced is None else replaced
        return self.decode_latents(self.unpatchify(x))

    def num_parameters(self) -> dict[str, int]:
        parts = {
            "vision": [self.stem, self.vision, self.connector],
            "vae": [self.vae],
            "lm": [self.lm],
            "gen_heads": [self.vae2llm, self.time_embed, self.llm2vae],
        }
        counts = {k: sum(p.numel() for m in v for p in m.parameters()) for k, v in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts
