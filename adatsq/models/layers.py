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
    r"^adaln_single\.emb\..+$",  # PixArt timestep embedder
    r"^transformer_blocks\.\d+\.norm1\.emb\..+$",  # DiT: per-block timestep / class embedders
    r"^(proj_out(_1|_2)?|norm_out\.linear|all_final_layer\..+)$",  # final adaLN + output projection
)

# adaLN / modulation layers: they produce per-timestep scales and shifts, and 4-bit noise in them grows
# with the number of steps (FACTS.md); keep them at 8 bits or more.
_SENSITIVE = (
    r"^transformer_blocks\.\d+\.norm1(_context)?\.linear$",  # Flux / SD3 / DiT double blocks
    r"^single_transformer_blocks\.\d+\.norm\.linear$",  # Flux single blocks
    r"^norm_out\.linear$",
    r"^adaln_single\.linear$",  # PixArt: one shared table feeding every block's scale_shift_table
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
