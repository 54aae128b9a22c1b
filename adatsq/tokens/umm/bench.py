"""Token-reduction benchmark on the reference UMM: accuracy, prefill FLOPs, KV bytes, latency, generation.

Every method runs at every keep ratio on the same held-out canvases (test digits, fixed seed). Costs are
per single-question sequence, averaged over the four question types:
* LM prefill FLOPs from `lm_prefill_flops` with per-layer sequence lengths (in-LM methods run their
  early layers on all tokens) plus `reducer_overhead_flops`; G2TR's overhead includes the VAE encoder,
  counted with torch's FlopCounterMode on this model, and the vae2llm anchor projection;
* KV-cache bytes after prefill (fp16/bf16 cache, per-layer lengths);
* latency: image -> answer wall-clock (vision tower + reducer + LM prefill), median per image.
Generation is measured unreduced, checked to be refused without `reduce_generation=True`, and forced at
keep 0.5 for the reducers that can run on latent tokens, to show what reducing it would cost.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from adatsq.core.plots import new_figure, save_figure
from adatsq.errors import TokenReductionError
from adatsq.models.umm.data import CANVAS, QUESTION_TYPES, Canvas, qa_batch, question, tokenize
from adatsq.models.umm.model import MiniUMM
from adatsq.models.umm.weights import load_umm
from adatsq.tokens import g2tr
from adatsq.tokens.base import REDUCERS, TokenReducer, get_reducer
from adatsq.tokens.flops import kv_cache_bytes, lm_prefill_flops, measure_latency
from adatsq.tokens.umm.evaluate import generation_prompts, generation_quality, qa_accuracy
from adatsq.tokens.umm.reduction import UMMReduction

log = logging.getLogger(__name__)
METHODS = ("g2tr", "fastv", "pdrop", "vnorm", "visionzip", "tome", "random", "grid")  # report order
KEEPS = (0.25, 0.5, 0.75)


def question_lengths() -> dict[str, int]:
    """Tokens of each question type (each template has a fixed length)."""
    rng = np.random.default_rng(0)
    canvas = Canvas(np.zeros((CANVAS, CANVAS), np.float32), ((3, 0, 0),))
    return {k: len(tokenize(question(canvas, k, rng)[0])) for k in QUESTION_TYPES}


@torch.no_grad()
def vae_encode_flops(model: MiniUMM) -> int:
    with FlopCounterMode(display=False) as counter:
        model.vae.encode(torch.zeros(1, 1, model.config.canvas, model.config.canvas))
    return int(counter.get_total_flops())


def overhead_inputs(adapter: UMMReduction, reducer: TokenReducer) -> dict[str, int]:
    """The measurements of this model that `reducer.overhead_flops` asks for (`overhead_inputs`)."""
    c = adapter.model.config
    measure = {
        "vae_flops": lambda: vae_encode_flops(adapter.model),  # generation encoder on one image
        "m": lambda: math.ceil(c.gen_grid / adapter.anchor_pool) ** 2,  # G2TR anchors
        "latent_dim": lambda: c.gen_token_dim,  # channels the anchor projection reads
        "dv": lambda: c.lm_kv_heads * (c.lm_hidden // c.lm_heads),  # value channels (V-norm)
    }
    unknown = sorted(set(reducer.overhead_inputs) - set(measure))
    if unknown:
        raise TokenReductionError(f"the UMM benchmark cannot measure {unknown} for {reducer.name!r}")
    return {name: measure[name]() for name in sorted(reducer.overhead_inputs)}


def prefill_cost(adapter: UMMReduction, method: str | None, keep: float) -> dict:
    """LM prefill + reducer FLOPs and KV bytes per single-question sequence (mean over question types)."""
    c = adapter.model.config
    n, head_dim = adapter.n, c.lm_hidden // c.lm_heads
    reducer = None if method is None else get_reducer(method)
    counts = adapter.image_token_counts(reducer, keep)
    overhead = (
        0
        if reducer is None
        else reducer.overhead_flops(n, c.lm_hidden, counts[-1], **overhead_inputs(adapter, reducer))
    )
    lm, kv = [], []
    for length in question_lengths().values():
        lens = [length + k for k in counts]
        lm.append(
            lm_prefill_flops(
                c.lm_layers, c.lm_hidden, c.lm_ffn, c.lm_heads, c.lm_kv_heads, lens, len(c.vocab)
            )
        )
        kv.append(kv_cache_bytes(c.lm_layers, c.lm_kv_heads, head_dim, lens))
    lm_flops = float(np.mean(lm))
    return {
        "layer_image_tokens": counts,
        "lm_flops": lm_flops,
        "overhead_flops": float(overhead),
        "prefill_flops": lm_flops + overhead,
        "kv_bytes": float(np.mean(kv)),
    }


def _answer_fn(adapter: UMMReduction, method: str | None, keep: float, seed: int):
    reducer = None if method is None else get_reducer(method)
    generator = torch.Generator().manual_seed(seed)

    def answer(images, questions):
        return adapter.answer(images, questions, reducer, keep, generator).logits

    return answer


@torch.no_grad()
def digit_coverage(adapter: UMMReduction, method: str, keep: float, samples: int, seed: int) -> dict:
    """Where a method spends its budget: share of kept tokens on digits, share of digits left with one.

    Read from the tokens kept for the counting question (in-LM methods: at their last pruning layer);
    merged tokens are not counted, so this explains a selection, it does not score it.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    shares, hit, digits, done = [], 0, 0, 0
    while done < samples:
        b = qa_batch(
            rng, min(64, samples - done), split="test", kinds=("count",), patch=adapter.model.config.vit_patch
        )
        kept = adapter.answer(b.images, b.questions, method, keep, generator).kept["count"]
        labels = b.token_labels.gather(1, kept)
        shares.extend((labels < 10).float().mean(1).tolist())
        for canvas, kept_labels in zip(b.canvases, labels, strict=True):
            present = {d[0] for d in canvas.digits}
            hit += len(present & set(kept_labels.tolist()))
            digits += len(present)
        done += b.images.shape[0]
    return {"digit_token_share": float(np.mean(shares)), "digits_kept": hit / digits}


@torch.no_grad()
def g2tr_score_split(adapter: UMMReduction, samples: int, seed: int) -> dict:
    """Mean G2TR score (cosine with the cell's anchor) of digit tokens and of background tokens.

    G2TR keeps the highest scores, so this says which kind of token it favours on this model.
    """
    b = qa_batch(
        np.random.default_rng(seed), samples, split="test", kinds=(), patch=adapter.model.config.vit_patch
    )
    tokens = adapter.model.connect(b.images)
    anchors, latent_grid = adapter.anchors(b.images)
    grid = (adapter.model.config.grid,) * 2
    score = torch.stack([g2tr.scores(t, a, grid, latent_grid) for t, a in zip(tokens, anchors, strict=True)])
    digit = b.token_labels < 10
    return {"digit": float(score[digit].mean()), "background": float(score[~digit].mean())}


def latency(adapter: UMMReduction, method: str | None, keep: float, repeats: int, seed: int) -> float:
    """Median seconds per image of image -> answer (one question, batch 16)."""
    batch = qa_batch(np.random.default_rng(seed), 16, split="test", kinds=("leftmost",))
    fn = _answer_fn(adapter, method, keep, seed)
    stats = measure_latency(lambda: fn(batch.images, batch.questions), repeats=repeats, warmup=1)
    return stats["median_s"] / 16


@torch.no_grad()
def generation(
    adapter: UMMReduction, methods: list[str], count: int, seed: int, classifier: torch.nn.Module | None
) -> dict:
    from adatsq.models.reference.classifier import load_classifier

    classifier = classifier or load_classifier()
    prompts, null, labels, quads = generation_prompts(count)
    out: dict = {"count": count, "steps": 25, "guidance": 3.0}
    images = adapter.generate(prompts, null, seed=seed)
    out["unreduced"] = generation_quality(images, labels, quads, classifier)
    refused, forced = {}, {}
    for method in methods:
        try:
            adapter.generate(prompts[:1], null[:1], steps=1, reducer=method, keep=0.5)
            refused[method] = False
        except TokenReductionError:
            refused[method] = True
        if get_reducer(method).supports_generation:
            forced_images = adapter.generate(
                prompts, null, seed=seed, reducer=method, keep=0.5, reduce_generation=True
            )
            forced[method] = generation_quality(forced_images, labels, quads, classifier)
    out["refused_without_force"] = refused
    out["forced_keep_0.5"] = forced
    return out


def bench(
    methods: list[str],
    keeps: list[float],
    samples: int,
    seed: int,
    *,
    model: MiniUMM | None = None,
    generation_count: int = 40,
    latency_repeats: int = 5,
    classifier: torch.nn.Module | None = None,
) -> dict:
    """All methods x keep ratios (+ full tokens) on one model and one held-out set; see module docstring."""
    unknown = sorted(set(methods) - set(REDUCERS.names()))
    if unknown:
        raise TokenReductionError(f"unknown methods {unknown}; the UMM benchmark supports {REDUCERS.names()}")
    adapter = UMMReduction(model or load_umm())
    full_cost = prefill_cost(adapter, None, 1.0)
    rows = [
        {
            "method": "full",
            "keep": 1.0,
            "accuracy": qa_accuracy(_answer_fn(adapter, None, 1.0, seed), samples, seed),
            **full_cost,
            "latency_s": latency(adapter, None, 1.0, latency_repeats, seed),
            "coverage": digit_coverage(adapter, None, 1.0, samples, seed),
        }
    ]
    for method in methods:
        for keep in keeps:
            log.info("bench %s keep=%.2f", method, keep)
            row: dict = {"method": method, "keep": keep}
            try:
                row.update(prefill_cost(adapter, method, keep))
                row["accuracy"] = qa_accuracy(_answer_fn(adapter, method, keep, seed), samples, seed)
                row["latency_s"] = latency(adapter, method, keep, latency_repeats, seed)
                row["coverage"] = digit_coverage(adapter, method, keep, samples, seed)
            except TokenReductionError as err:  # e.g. PDrop cannot average below 1/stages
                row = {"method": method, "keep": keep, "infeasible": str(err)}
            else:
                row["flops_ratio"] = full_cost["prefill_flops"] / row["prefill_flops"]
                row["kv_ratio"] = full_cost["kv_bytes"] / row["kv_bytes"]
            rows.append(row)
    return {
        "samples": samples,
        "seed": seed,
        "question_lengths": question_lengths(),
        "model": {"config": adapter.model.config.to_dict(), "parameters": adapter.model.num_parameters()},
        "rows": rows,
        "generation": generation(adapter, methods, generation_count, seed, classifier),
        "g2tr_scores": g2tr_score_split(adapter, min(samples, 256), seed),
        "g2tr_anchor_pool_1": (
            anchor_pool_ablation(adapter.model, keeps, samples, seed, full_cost) if "g2tr" in methods else []
        ),
    }


def anchor_pool_ablation(
    model: MiniUMM, keeps: list[float], samples: int, seed: int, full_cost: dict
) -> list:
    """G2TR with one anchor per generation token (pool 1) instead of BAGEL's pool 2: the diagnostic
    for how much of G2TR's result here comes from its one-token-per-cell pass (9 vs 36 cells)."""
    adapter = UMMReduction(model, anchor_pool=1)
    rows = []
    for keep in keeps:
        cost = prefill_cost(adapter, "g2tr", keep)
        rows.append(
            {
                "keep": keep,
                "accuracy": qa_accuracy(_answer_fn(adapter, "g2tr", keep, seed), samples, seed),
                "coverage": digit_coverage(adapter, "g2tr", keep, samples, seed),
                "flops_ratio": full_cost["prefill_flops"] / cost["prefill_flops"],
            }
        )
    return rows


def _as_image(image_or_canvas) -> torch.Tensor:
    if isinstance(image_or_canvas, Canvas):
        image_or_canvas = image_or_canvas.image
    image = torch.as_tensor(np.asarray(image_or_canvas, dtype=np.float32))
    image = image.reshape(1, 1, *image.shape[-2:])
    if image.shape[-1] != CANVAS or image.shape[-2] != CANVAS:
        raise TokenReductionError(f"token_map needs a {CANVAS}x{CANVAS} canvas, got {tuple(image.shape)}")
    return image


def kept_tokens(
    image_or_canvas,
    method: str,
    keep: float,
    model: MiniUMM | None = None,
    kind: str = "leftmost",
    seed: int = 0,
) -> torch.Tensor:
    """Grid indices [K] a method keeps on one canvas (in-LM methods: for a question of type `kind`)."""
    adapter = UMMReduction(model or load_umm())
    image = _as_image(image_or_canvas)
    batch = qa_batch(np.random.default_rng(seed), 1, split="test", kinds=(kind,))
    answer = adapter.answer(image, batch.questions, method, keep, torch.Generator().manual_seed(seed))
    return answer.kept[kind][0]


def draw_token_map(ax, image: torch.Tensor, kept: torch.Tensor, grid: int, title: str) -> None:
    """Canvas in grey with kept tokens outlined in colour and dropped tokens dimmed."""
    from matplotlib.patches import Rectangle

    patch = CANVAS // grid
    ax.imshow(image.reshape(CANVAS, CANVAS).numpy(), cmap="gray", vmin=-1, vmax=1)
    keep = torch.zeros(grid * grid, dtype=torch.bool)
    keep[kept] = True
    for idx in range(grid * grid):
        row, col = divmod(idx, grid)
        xy = (col * patch - 0.5, row * patch - 0.5)
        if keep[idx]:
            ax.add_patch(Rectangle(xy, patch, patch, fill=False, edgecolor="tab:orange", linewidth=0.8))
        else:
            ax.add_patch(Rectangle(xy, patch, patch, color="black", alpha=0.55, linewidth=0))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def token_map(
    image_or_canvas, method: str, keep: float, out_png: str | Path, model: MiniUMM | None = None
) -> Path:
    """PNG of which understanding tokens `method` keeps at `keep` on one canvas (orange = kept)."""
    model = model or load_umm()
    image = _as_image(image_or_canvas)
    kept = kept_tokens(image, method, keep, model)
    fig = new_figure(3, 3)
    ax = fig.subplots()
    draw_token_map(ax, image, kept, model.config.grid, f"{method}, keep {keep:g} ({kept.numel()} tokens)")
    return save_figure(fig, out_png, dpi=150)
