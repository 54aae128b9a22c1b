"""G2TR on BAGEL-shaped packed sequences: per-image selection, rebuilt layout and index maps."""

import pytest
import torch

from adatsq.errors import TokenReductionError
from adatsq.tokens import bagel, g2tr


def _images(d, sizes=((518, 518), (364, 476)), seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = bagel.vit_grids(sizes)
    images = bagel.PackedImages.pack([torch.randn(h * w, d, generator=g) for h, w in grids], grids)
    # VAE stride 8 on images resized to multiples of 16 (BAGEL's VAE transform)
    latents = [torch.randn(16, h // 16 * 2, w // 16 * 2, generator=g) for h, w in sizes]
    return images, latents


def test_bagel_7b_shapes_hidden_3584():
    torch.manual_seed(0)
    images, latents = _images(3584)
    assert images.grids == ((37, 37), (26, 34)) and images.cu_seqlens.tolist() == [0, 1369, 2253]
    vae2llm = torch.nn.Linear(64, 3584)  # 16 latent channels x patch 2 x 2
    with torch.no_grad():
        anchors = bagel.packed_anchors(latents, patch=2, pool=2, project=vae2llm, hidden=3584)
    assert anchors.grids == ((16, 16), (11, 15)) and anchors.tokens.shape == (256 + 165, 3584)
    layout = bagel.reduce_packed(images, anchors, keep=0.5, min_keep=32)
    assert layout.cu_seqlens.tolist() == [0, 685, 685 + 442] and layout.tokens.shape == (1127, 3584)
    kept_a = g2tr.select(images.image(0), anchors.image(0), (37, 37), (16, 16), 0.5, 32)
    assert torch.equal(layout.kept[:685], kept_a)
    assert torch.allclose(layout.tokens[:685], g2tr.merge(images.image(0), kept_a))


def test_packed_matches_per_image_and_positions_are_kept():
    images, latents = _images(16)
    anchors = bagel.packed_anchors(latents, hidden=16)
    kept = bagel.select(images, anchors, keep=0.3)
    layout = bagel.rebuild_layout(images, kept, bagel.merge(images, kept))
    for i in range(2):
        local = g2tr.select(images.image(i), anchors.image(i), images.grids[i], anchors.grids[i], 0.3, 32)
        assert torch.equal(kept[i], local)
    second = layout.kept[layout.cu_seqlens[1] :] - 1369
    assert torch.equal(layout.positions[layout.cu_seqlens[1] :, 0], second // 34)
    assert torch.equal(layout.position_ids, layout.positions[:, 0] * 70 + layout.positions[:, 1])
    scores = bagel.score(images, anchors)
    assert scores.shape == (2253,)
    assert torch.allclose(scores[:1369], g2tr.scores(images.image(0), anchors.image(0), (37, 37), (16, 16)))


def test_sequence_index_map_shrinks_the_lm_layout():
    sizes = ((56, 56), (42, 70))  # grids 4x4 and 3x5
    images, latents = _images(8, sizes)
    anchors = bagel.packed_anchors(latents, patch=1, hidden=8)
    # sequence: 3 text, <img> 16 tokens </img>, 2 text, <img> 15 tokens </img>, 1 text
    text_a, img_a = list(range(3)), list(range(4, 20))
    img_b = list(range(23, 38))
    seq_len, image_idx = 40, torch.tensor(img_a + img_b)
    split_lens = [3, 18, 2, 17]
    layout = bagel.reduce_packed(
        images, anchors, keep=0.5, min_keep=2, image_token_indexes=image_idx, seq_len=seq_len
    )
    assert layout.cu_seqlens.tolist() == [0, 8, 16]
    assert int(layout.seq_keep.sum()) == seq_len - 31 + 16
    assert torch.equal(layout.old_to_new[torch.tensor(text_a)], torch.tensor(text_a))
    assert layout.old_to_new[39] == seq_len - 31 + 16 - 1
    assert torch.all(layout.image_token_indexes.diff() > 0)
    assert torch.equal(layout.image_token_indexes, layout.old_to_new[image_idx[layout.kept]])
    assert bagel.shrink_split_lens(split_lens, layout.seq_keep) == [3, 10, 2, 10]


def test_bad_packed_inputs_fail_clearly():
    images, latents = _images(8, ((56, 56), (42, 70)))
    with pytest.raises(TokenReductionError, match="do not match the grids"):
        bagel.PackedImages(images.tokens, torch.tensor([0, 16, 30], dtype=torch.int32), images.grids)
    anchors = bagel.packed_anchors(latents[:1], patch=1, hidden=8)
    with pytest.raises(TokenReductionError, match="2 images but anchors for 1"):
        bagel.select(images, anchors)
    anchors = bagel.packed_anchors(latents, patch=1, hidden=8)
    with pytest.raises(TokenReductionError, match=r"image 1 \(grid \(3, 5\)\): min_keep=16 exceeds"):
        bagel.select(images, anchors, keep=0.5, min_keep=16)
