"""Quality checks of the reference UMM: held-out question accuracy and classifier-judged generations.

Generated canvases are judged by the project's digit classifier (16x16 in [-1, 1]): inside the quadrant
the prompt asked for, the 16x16 window with the most ink (sum of (x+1)/2) is cropped (digits are
pasted as 16x16 boxes, so no resize is needed) and classified; a generation counts as correct when the
class matches the prompt. `in_quadrant` reports how much of the canvas ink lies in that quadrant.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adatsq.models.umm.data import CANVAS, DIGIT, QUADRANTS, QUESTION_TYPES, gen_prompt, qa_batch, tokenize
from adatsq.models.umm.model import MiniUMM

# (images [B,1,H,W], questions [type -> ids]) -> answer logits per type; lets adapters plug reducers in
AnswerFn = Callable[[Tensor, dict[str, Tensor]], dict[str, Tensor]]


def full_answers(model: MiniUMM) -> AnswerFn:
    def answer(images: Tensor, questions: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = model.understand(images, list(questions.values()))
        return dict(zip(questions, logits, strict=True))

    return answer


@torch.no_grad()
def qa_accuracy(answer: AnswerFn, samples: int = 256, seed: int = 1234, batch: int = 64) -> dict[str, float]:
    """Accuracy per question type (and 'overall') on held-out canvases (test digits, fixed seed)."""
    rng = np.random.default_rng(seed)
    correct = dict.fromkeys(QUESTION_TYPES, 0)
    done = 0
    while done < samples:
        b = qa_batch(rng, min(batch, samples - done), split="test")
        logits = answer(b.images, b.questions)
        for kind in QUESTION_TYPES:
            correct[kind] += int((logits[kind].argmax(-1) == b.answers[kind]).sum())
        done += b.images.shape[0]
    acc = {k: v / samples for k, v in correct.items()}
    acc["overall"] = sum(acc.values()) / len(QUESTION_TYPES)
    return acc


def quadrant_mask(quadrant: str) -> Tensor:
    """Boolean [H, W] of the canvas quadrant."""
    half = CANVAS // 2
    mask = torch.zeros(CANVAS, CANVAS, dtype=torch.bool)
    rows = slice(0, half) if quadrant.startswith("top") else slice(half, CANVAS)
    cols = slice(0, half) if quadrant.endswith("left") else slice(half, CANVAS)
    mask[rows, cols] = True
    return mask


def crop_digit(image: Tensor, quadrant: str) -> Tensor:
    """The 16x16 window (centre inside `quadrant`) holding the most ink of a [1, H, W] canvas."""
    ink = (image[0] + 1) / 2
    window = F.avg_pool2d(ink[None, None], DIGIT, stride=1)[0, 0]  # [H-15, W-15], top-left indexed
    half, off = CANVAS // 2, DIGIT // 2
    tops = torch.arange(window.shape[0]) + off
    lefts = torch.arange(window.shape[1]) + off
    ok_rows = tops < half if quadrant.startswith("top") else tops >= half
    ok_cols = lefts < half if quadrant.endswith("left") else lefts >= half
    window = window.masked_fill(~(ok_rows[:, None] & ok_cols[None, :]), -1.0)
    top, left = divmod(int(window.argmax()), window.shape[1])
    return image[:, top : top + DIGIT, left : left + DIGIT]


def generation_prompts(count: int) -> tuple[Tensor, Tensor, list[int], list[str]]:
    """Balanced prompts 'draw d q' (d cycles 0-9, q cycles the quadrants) and their null prompts."""
    labels = [i % 10 for i in range(count)]
    quads = [QUADRANTS[(i // 10 + i) % 4] for i in range(count)]
    prompts = torch.tensor([tokenize(gen_prompt(d, q)) for d, q in zip(labels, quads, strict=True)])
    null = torch.tensor([tokenize(gen_prompt(None, None))] * count)
    return prompts, null, labels, quads


@torch.no_grad()
def generation_quality(
    images: Tensor, labels: list[int], quads: list[str], classifier: torch.nn.Module
) -> dict[str, float]:
    """Classifier accuracy of the cropped digits and the share of ink inside the requested quadrant."""
    crops = torch.stack([crop_digit(img, q) for img, q in zip(images, quads, strict=True)])
    pred = classifier(crops).argmax(-1)
    ink = (images[:, 0] + 1) / 2
    inside = torch.stack([(ink[i] * quadrant_mask(q)).sum() for i, q in enumerate(quads)])
    return {
        "classifier_accuracy": float((pred == torch.tensor(labels)).float().mean()),
        "ink_in_quadrant": float((inside / ink.flatten(1).sum(1).clamp_min(1e-6)).mean()),
    }


@torch.no_grad()
def generation_accuracy(
    model: MiniUMM, classifier: torch.nn.Module, count: int = 40, steps: int = 25, seed: int = 0
) -> dict[str, float]:
    prompts, null, labels, quads = generation_prompts(count)
    images = model.sample(prompts, null, steps=steps, seed=seed)
    return generation_quality(images, labels, quads, classifier)
