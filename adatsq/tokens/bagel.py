"""G2TR on packed (NaViT) sequences, as BAGEL and InternVL-U feed images to their LM.

Several images of different sizes are concatenated into one tensor [ΣN_i, D] delimited by
`cu_seqlens` (int32, [B+1]). Each image is reduced on its own (scores, balanced selection, merge),
then `rebuild_layout` packs the survivors back and gives what the LM needs: new `cu_seqlens`, the
flattened 2-D position ids of the kept tokens (row · max_patches_per_side + col, BAGEL's
`vit_position_ids`, so `vit_pos_embed` still sees each token's original place), and, when the caller
passes where the image tokens sit in the full LM sequence, the keep-mask / index map to shrink the
LM's packed layout (text indexes, position ids, split lengths of the attention mask).

Example (BAGEL-7B shapes: ViT patch 14, VAE stride 8, latent patch 2, pool 2, hidden 3584)::

    grids = vit_grids([(518, 518), (364, 476)])            # [(37, 37), (26, 34)] -> 1369 + 884 tokens
    images = PackedImages.pack([vit_a, vit_b], grids)       # connector outputs [N_i, 3584]
    anchors = packed_anchors([lat_a, lat_b], patch=2, pool=2,
                             project=model.vae2llm, hidden=3584)   # latents [16, H/8, W/8]
    layout = reduce_packed(images, anchors, keep=0.5, min_keep=32,
                           image_token_indexes=packed_vit_token_indexes, seq_len=len(sequence))
    vit_embeds = layout.tokens + model.vit_pos_embed(layout.position_ids)
    packed_vit_token_indexes = layout.image_token_indexes    # in the shrunk sequence
    packed_text_indexes = layout.old_to_new[packed_text_indexes]
    packed_position_ids = packed_position_ids[layout.seq_keep]
    split_lens = shrink_split_lens(split_lens, layout.seq_keep)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import TokenReductionError
from adatsq.tokens import g2tr
from adatsq.tokens.base import grid_positions

__all__ = [
    "PackedImages",
    "PackedLayout",
    "merge",
    "packed_anchors",
    "rebuild_layout",
    "reduce_packed",
    "score",
    "select",
    "shrink_split_lens",
    "vit_grids",
]


def vit_grids(sizes: Sequence[tuple[int, int]], patch: int = 14) -> list[tuple[int, int]]:
    """Token grids (h, w) of images of `sizes` (height, width) in pixels for a NaViT patch size."""
    grids = [(h // patch, w // patch) for h, w in sizes]
    if any(h < 1 or w < 1 for h, w in grids):
        raise TokenReductionError(f"image sizes {list(sizes)} give an empty token grid at patch {patch}")
    return grids


@dataclass(frozen=True)
class PackedImages:
    """Tokens of several images packed as [ΣN_i, D] with cu_seqlens [B+1] and each image's grid."""

    tokens: Tensor
    cu_seqlens: Tensor
    grids: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        cu = self.cu_seqlens
        lens = [h * w for h, w in self.grids]
        if self.tokens.dim() != 2 or cu.dim() != 1 or cu.numel() != len(lens) + 1 or int(cu[0]) != 0:
            raise TokenReductionError(
                f"packed tokens must be [ΣN, D] with cu_seqlens [B+1] starting at 0 for B={len(lens)} "
                f"grids; got tokens {tuple(self.tokens.shape)}, cu_seqlens {cu.tolist()}"
            )
        if cu.diff().tolist() != lens or int(cu[-1]) != self.tokens.shape[0]:
            raise TokenReductionError(
                f"cu_seqlens {cu.tolist()} do not match the grids {list(self.grids)} (tokens per image "
                f"{lens}) and {self.tokens.shape[0]} packed tokens; pass the grid of every image"
            )

    @classmethod
    def pack(cls, tokens: Sequence[Tensor], grids: Sequence[tuple[int, int]]) -> PackedImages:
        lens = torch.tensor([0] + [t.shape[0] for t in tokens])
        cu = torch.cumsum(lens, 0).to(torch.int32)
        return cls(torch.cat(list(tokens)), cu, tuple(tuple(g) for g in grids))

    def __len__(self) -> int:
        return len(self.grids)

    def image(self, i: int) -> Tensor:
        return self.tokens[int(self.cu_seqlens[i]) : int(self.cu_seqlens[i + 1])]


def packed_anchors(
    latents: Sequence[Tensor],
    patch: int = 2,
    pool: int = 2,
    project: Callable[[Tensor], Tensor] | None = None,
    hidden: int = 3584,
) -> PackedImages:
    """Anchors of every image ([C, H, W] generation latents), packed like the images over latent grids."""
    anchors, grids = zip(
        *(g2tr.anchors_from_latent(lat, patch, pool, project, hidden) for lat in latents), strict=True
    )
    return PackedImages.pack(anchors, grids)


def _check_pair(images: PackedImages, anchors: PackedImages) -> None:
    if len(images) != len(anchors):
        raise TokenReductionError(
            f"{len(images)} images but anchors for {len(anchors)}; pass one latent per packed image"
        )


def score(images: PackedImages, anchors: PackedImages) -> Tensor:
    """G2TR score [ΣN] of every packed token (cosine with the anchor of its latent cell)."""
    _check_pair(images, anchors)
    return torch.cat(
        [
            g2tr.scores(images.image(i), anchors.image(i), images.grids[i], anchors.grids[i])
            for i in range(len(images))
        ]
    )


def select(
    images: PackedImages, anchors: PackedImages, keep: float = 0.5, min_keep: int = 32
) -> list[Tensor]:
    """Per image, ascending kept indices local to that image (G2TR balanced selection)."""
    _check_pair(images, anchors)
    kept = []
    for i in range(len(images)):
        grid, latent_grid = images.grids[i], anchors.grids[i]
        try:
            kept.append(g2tr.select(images.image(i), anchors.image(i), grid, latent_grid, keep, min_keep))
        except TokenReductionError as err:
            raise TokenReductionError(f"image {i} (grid {grid}): {err}") from err
    return kept


def merge(images: PackedImages, kept: Sequence[Tensor], weight: float = 1.0) -> list[Tensor]:
    """Per image, merged tokens [K_i, D] (each removed token joins its most similar kept token)."""
    if len(kept) != len(images):
        raise TokenReductionError(f"{len(kept)} kept-index lists for {len(images)} packed images")
    return [g2tr.merge(images.image(i), kept[i], weight) for i in range(len(images))]


@dataclass(frozen=True)
class PackedLayout:
    """The reduced packed images and the maps that shrink the LM's sequence layout."""

    tokens: Tensor  # [ΣK_i, D]
    cu_seqlens: Tensor  # int32 [B+1]
    position_ids: Tensor  # [ΣK_i] flattened 2-D ids: row · max_patches_per_side + col
    positions: Tensor  # [ΣK_i, 2] (row, col) in each image's original grid
    kept: Tensor  # [ΣK_i] indices of the kept tokens in the original packed [ΣN_i]
    seq_keep: Tensor | None = None  # [L] bool over the LM sequence: text and kept image tokens
    old_to_new: Tensor | None = None  # [L] new position of each old sequence position, -1 if removed
    image_token_indexes: Tensor | None = None  # [ΣK_i] where the kept image tokens sit in the new sequence


def rebuild_layout(
    images: PackedImages,
    kept: Sequence[Tensor],
    merged: Sequence[Tensor] | None = None,
    image_token_indexes: Tensor | None = None,
    seq_len: int | None = None,
    max_patches_per_side: int = 70,
) -> PackedLayout:
    """Pack the kept (or merged) tokens back, keeping every token's original 2-D position.

    With `image_token_indexes` ([ΣN_i] positions of the image tokens in the LM's packed sequence of
    length `seq_len`, BAGEL's packed_vit_token_indexes) it also returns the sequence keep-mask and the
    old -> new index map; image tokens keep their order, so the i-th kept token lands at the i-th
    entry of the new `image_token_indexes`.
    """
    if len(kept) != len(images) or (merged is not None and len(merged) != len(images)):
        raise TokenReductionError(f"need one kept (and merged) tensor per image, {len(images)} images")
    offsets = images.cu_seqlens[:-1].long().tolist()
    glob = torch.cat([k.long() + off for k, off in zip(kept, offsets, strict=True)])
    tokens = images.tokens[glob] if merged is None else torch.cat(list(merged))
    positions = torch.cat([grid_positions(k, g) for k, g in zip(kept, images.grids, strict=True)])
    counts = torch.tensor([0] + [k.numel() for k in kept])
    layout = {
        "tokens": tokens,
        "cu_seqlens": torch.cumsum(counts, 0).to(torch.int32).to(images.cu_seqlens.device),
        "position_ids": positions[:, 0] * max_patches_per_side + positions[:, 1],
        "positions": positions,
        "kept": glob,
    }
    if image_token_indexes is not None:
        if seq_len is None or image_token_indexes.numel() != images.tokens.shape[0]:
            raise TokenReductionError(
                f"image_token_indexes must list all {images.tokens.shape[0]} packed image tokens and "
                f"seq_len must be given; got {image_token_indexes.numel()} indexes, seq_len={seq_len}"
            )
        dev = image_token_indexes.device
        seq_keep = torch.ones(seq_len, dtype=torch.bool, device=dev)
        seq_keep[image_token_indexes.long()] = False
        seq_keep[image_token_indexes.long()[glob]] = True
        old_to_new = torch.full((seq_len,), -1, dtype=torch.long, device=dev)
        old_to_new[seq_keep] = torch.arange(int(seq_keep.sum()), device=dev)
        layout |= {
            "seq_keep": seq_keep,
            "old_to_new": old_to_new,
            "image_token_indexes": old_to_new[image_token_indexes.long()[glob]],
        }
    return PackedLayout(**layout)


def shrink_split_lens(split_lens: Sequence[int], seq_keep: Tensor) -> list[int]:
    """New lengths of the attention-mask splits (BAGEL's split_lens) after removing tokens."""
    if sum(split_lens) != seq_keep.numel():
        raise TokenReductionError(f"split_lens sum {sum(split_lens)} != sequence length {seq_keep.numel()}")
    return [int(part.sum()) for part in torch.split(seq_keep, list(split_lens))]


def reduce_packed(
    images: PackedImages,
    anchors: PackedImages,
    keep: float = 0.5,
    min_keep: int = 32,
    weight: float = 1.0,
    image_token_indexes: Tensor | None = None,
    seq_len: int | None = None,
    max_patches_per_side: int = 70,
) -> PackedLayout:
    """Score, select, merge and rebuild in one call (G2TR on every packed image)."""
    kept = select(images, anchors, keep, min_keep)
    return rebuild_layout(
        images, kept, merge(images, kept, weight), image_token_indexes, seq_len, max_patches_per_side
    )
