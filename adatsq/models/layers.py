"""Which Linear layers of a diffusers DiT to keep in high precision, by name.

Names follow diffusers' module trees (Flux, SD3, PixArt, DiT, Wan, Z-Image, QwenImage). Every pattern is
anchored (`^...$`), so `re.search` and `re.fullmatch` agree. Only patterns that match at least one Linear
of the given model are returned, so a recipe never carries a rule that silently does nothing.
"""

from __future__ import annotations

import re

from torch import nn

# Embedders and the final projection: few parameters, but their errors reach every token of every step.
_IGNORE = (
    r"^(x_embedder|context_embedder|img_in|txt_in|patch_embedding|pos_embed(\..+)?)$",  # input projections
    r"^(time_text_embed|condition_embedder|t_embedder|cap_embedder|caption_projection|all_x_embedder)\..+$",
    r"^(adaln_single|time_embed)\.emb\..+$",  # PixArt / Sana timestep embedder
    r"^transformer_blocks\.\d+\.norm1\.emb\..+$",  # DiT: per-block timestep / class embedders
    r"^(proj_out(_1|_2)?|norm_out\.linear|all_final_layer\..+)$",  # final adaLN + output projection
)

# adaLN / modulation layers: they produce per-timestep scales and shifts, and 4-bit noise in them grows
# with the number of steps (FACTS.md); keep them at 8 bits or more.
_SENSITIVE = (
    r"^transformer_blocks\.\d+\.norm1(_context)?\.linear$",  # Flux / SD3 / DiT double blocks
    r"^single_transformer_blocks\.\d+\.norm\.linear$",  # Flux single blocks
    r"^norm_out\.linear$",
    r"^(adaln_single|time_embed)\.linear$",  # PixArt / Sana: one table feeding every block's scale_shift
    r"^condition_embedder\.time_proj$",  # Wan: the same idea
    r"^(.+\.)?adaLN_modulation\.\d+$",  # Z-Image
    r"^transformer_blocks\.\d+\.(img|txt)_mod\.\d+$",  # QwenImage
)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear in `model`, as `named_modules` spells them."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _matching(patterns: tuple[str, ...], model: nn.Module) -> list[str]:
    names = linear_names(model)
    return [p for p in patterns if any(re.fullmatch(p, n) for n in names)]


def default_ignore(model: nn.Module) -> list[str]:
    """Regexes of layers best left unquantized (embedders, final layer); ignore wins over sensitive."""
    return _matching(_IGNORE, model)


def sensitive_layers(model: nn.Module) -> list[str]:
    """Regexes of adaLN / modulation layers that recipes should keep at 8 bits or more."""
    return _matching(_SENSITIVE, model)


# ---------------------------------------------------------------- shared inputs and block order
#
# Linear layers that read the very same input tensor need ONE XᵀX accumulator between them. The rules are
# static (module names only) and tests/models/test_shared_inputs.py checks them against a real forward of
# every tiny family: grouped layers must see one tensor, and no two groups may.

# Within one module: projections of one input, keyed by the part of the name that identifies the input.
# The first pattern that matches wins.
_SHARED_LOCAL = (
    r"^(?P<key>single_transformer_blocks\.\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)$",  # Flux single
    r"^(?P<key>.+\.attn1?)\.(to_q|to_k|to_v)$",  # self-attention q/k/v (Flux, SD3, PixArt, DiT, Wan, Qwen)
    r"^(?P<key>.+\.attn)\.(add_q_proj|add_k_proj|add_v_proj)$",  # MMDiT context stream q/k/v
    r"^(?P<key>.+\.attention)\.(to_q|to_k|to_v)$",  # Z-Image
    r"^(?P<key>.+\.feed_forward)\.(w1|w3)$",  # Z-Image SwiGLU: w2(silu(w1 x) * w3 x)
)

# Across blocks: one tensor handed to every block. Time-invariant ones carry the same values at every
# step (per call of a step: conditional / unconditional), so one step's XᵀX stands for all segments.
_SHARED_GLOBAL = (
    # cross-attention keys / values: the projected text, computed once per denoiser call
    (r"^(blocks|transformer_blocks)\.\d+\.attn2\.(to_k|to_v)$", "cross-attention text", True),
    # Z-Image: every modulated block's adaLN reads the same timestep embedding (no SiLU of its own)
    (r"^(noise_refiner|layers)\.\d+\.adaLN_modulation\.0$", "timestep embedding", False),
)

# Block containers, in the order the denoiser runs them (Z-Image: both refiners before the main stack).
BLOCK_CONTAINERS = (
    "noise_refiner",
    "context_refiner",
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
    "layers",
)
BEFORE = "<before>"  # pseudo-block: layers that run before the first block (embedders)
AFTER = "<after>"  # pseudo-block: layers that run after the last block (final adaLN, output projection)
_AFTER = r"^(proj_out(_1|_2)?|norm_out(\..+)?|all_final_layer\..+)$"
_BLOCK = re.compile(rf"^(?P<block>({'|'.join(BLOCK_CONTAINERS)})\.\d+)\.")


def block_of(name: str) -> str:
    """The block a Linear layer belongs to ('transformer_blocks.3'), else BEFORE or AFTER."""
    match = _BLOCK.match(name)
    if match:
        return match["block"]
    return AFTER if re.fullmatch(_AFTER, name) else BEFORE


def _block_key(block: str) -> tuple[int, int]:
    if block == BEFORE:
        return (-1, 0)
    if block == AFTER:
        return (len(BLOCK_CONTAINERS), 0)
    container, index = block.rsplit(".", 1)
    return (BLOCK_CONTAINERS.index(container), int(index))


def block_order(names: list[str] | nn.Module) -> list[str]:
    """Blocks in execution order, BEFORE first and AFTER last (each only if some layer is in it)."""
    if isinstance(names, nn.Module):
        names = linear_names(names)
    return sorted({block_of(n) for n in names}, key=_block_key)


def _group_key(name: str) -> tuple[str, ...]:
    for pattern, label, _ in _SHARED_GLOBAL:
        if re.fullmatch(pattern, name):
            return ("global", label)
    for pattern in _SHARED_LOCAL:
        match = re.fullmatch(pattern, name)
        if match:
            return ("local", pattern, match["key"])
    return ("layer", name)


def shared_input_groups(denoiser: nn.Module | list[str]) -> list[tuple[str, ...]]:
    """Linear layers grouped by the input tensor they read; every Linear is in exactly one group.

    Groups are ordered by their first member in module order; singletons for layers that share nothing.
    """
    names = linear_names(denoiser) if isinstance(denoiser, nn.Module) else list(denoiser)
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        groups.setdefault(_group_key(name), []).append(name)
    return [tuple(members) for members in groups.values()]


def is_time_invariant(group: tuple[str, ...]) -> bool:
    """Whether a group's input has the same values at every step (e.g. Wan / PixArt attn2 to_k, to_v)."""
    return any(re.fullmatch(p, group[0]) for p, _, invariant in _SHARED_GLOBAL if invariant)
