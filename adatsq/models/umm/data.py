"""Synthetic "digits on a canvas" for the reference UMM: canvases, one-token questions, generation prompts.

1-3 distinct scikit-learn digits (8x8, upsampled to 16x16) sit at random places on a 48x48 canvas, so most
understanding tokens are background and where a reducer spends its budget matters. Digit centres avoid
a band around the canvas midlines, which keeps every spatial answer (left/right, quadrant) unambiguous;
the left-most digit is always at least `LEFT_MARGIN` px left of the next one. Held-out canvases use digit
images the training canvases never show (the digit classifier's stratified 80/20 split).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from adatsq.errors import ConfigError
from adatsq.models.reference.digits import load_digits_16

CANVAS = 48  # canvas side in pixels
DIGIT = 16  # side of one pasted digit (8x8 scikit-learn digit upsampled 2x, the classifier's input size)
MID_BAND = 6  # digit centres stay more than this many px from the midlines: a box crosses one by <= 2 px
LEFT_MARGIN = 4  # px between the left-most digit centre and the next one
GEN_JITTER = 2  # generation targets sit at their quadrant's centre +- this many px (see gen_batch)
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
QUESTION_TYPES = ("count", "leftmost", "present", "where", "quadrant")
SPLITS = ("train", "test")

SPECIALS = ("<pad>", "<null>")
WORDS = [
    "how",
    "many",
    "digits",
    "which",
    "digit",
    "is",
    "left-most",
    "where",
    "the",
    "there",
    "a",
    "in",
    "draw",
    "anywhere",
    "left",
    "right",
    "yes",
    "no",
    "?",
]
VOCAB: tuple[str, ...] = SPECIALS + tuple(WORDS) + tuple(str(d) for d in range(10)) + QUADRANTS
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenize(text: str) -> list[int]:
    """Whitespace tokenizer over the closed vocabulary; unknown words name the vocabulary."""
    try:
        return [TOKEN_ID[w] for w in text.split()]
    except KeyError as err:
        raise ConfigError(f"word {err.args[0]!r} is not in the UMM vocabulary {list(VOCAB)}") from err


@dataclass(frozen=True)
class Canvas:
    """One canvas: pixels in [-1, 1] and, per digit, (label, top, left) of its 16x16 box."""

    image: np.ndarray  # [CANVAS, CANVAS] float32
    digits: tuple[tuple[int, int, int], ...]

    def centre(self, i: int) -> tuple[float, float]:
        _, top, left = self.digits[i]
        return top + DIGIT / 2, left + DIGIT / 2


@lru_cache(maxsize=2)
def digit_bank(split: str) -> tuple[np.ndarray, np.ndarray]:
    """16x16 digit images in [0, 1] and labels of one split (the digit classifier's stratified split)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = load_digits_16(split)
    return ((images[:, 0].numpy() + 1) / 2).clip(0, 1), labels.numpy()


def _centre_ok(c: float) -> bool:
    return abs(c - CANVAS / 2) > MID_BAND


def sample_layout(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """(top, left) of n non-overlapping digit boxes, off the midline bands, with a unique left-most."""
    span = CANVAS - DIGIT
    while True:
        boxes: list[tuple[int, int]] = []
        for _ in range(200):
            top, left = (int(v) for v in rng.integers(0, span + 1, size=2))
            if not (_centre_ok(top + DIGIT / 2) and _centre_ok(left + DIGIT / 2)):
                continue
            if all(abs(top - t) >= DIGIT or abs(left - lf) >= DIGIT for t, lf in boxes):
                boxes.append((top, left))
                if len(boxes) == n:
                    break
        if len(boxes) < n:
            continue
        xs = sorted(left for _, left in boxes)
        if n == 1 or xs[1] - xs[0] >= LEFT_MARGIN:
            return boxes


def quadrant_of(top: int, left: int) -> str:
    row = "top" if top + DIGIT / 2 < CANVAS / 2 else "bottom"
    col = "left" if left + DIGIT / 2 < CANVAS / 2 else "right"
    return f"{row}-{col}"


def box_near_centre(rng: np.random.Generator, quadrant: str) -> tuple[int, int]:
    """(top, left) of a box centred on the quadrant's centre, shifted by up to GEN_JITTER px each way."""
    row = CANVAS // 4 if quadrant.startswith("top") else 3 * CANVAS // 4
    col = CANVAS // 4 if quadrant.endswith("left") else 3 * CANVAS // 4
    top, left = (int(v) for v in rng.integers(-GEN_JITTER, GEN_JITTER + 1, size=2))
    return row - DIGIT // 2 + top, col - DIGIT // 2 + left


def render(digits: list[tuple[np.ndarray, int, int, int]]) -> Canvas:
    """Paste (image16, label, top, left) digits onto a black canvas; returns pixels in [-1, 1]."""
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    for img, _, top, left in digits:
        region = canvas[top : top + DIGIT, left : left + DIGIT]
        np.maximum(region, img, out=region)
    return Canvas(canvas * 2 - 1, tuple((label, top, left) for _, label, top, left in digits))


def sample_canvas(rng: np.random.Generator, split: str, n: int | None = None) -> Canvas:
    """A canvas with n (default: uniform 1-3) distinct digit classes at random non-overlapping places."""
    images, labels = digit_bank(split)
    n = int(rng.integers(1, 4)) if n is None else n
    classes = rng.choice(10, size=n, replace=False)
    placed = []
    for cls, (top, left) in zip(classes, sample_layout(rng, n), strict=True):
        pool = np.flatnonzero(labels == cls)
        placed.append((images[rng.choice(pool)], int(cls), top, left))
    return render(placed)


def question(canvas: Canvas, kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, one-word answer) of the given type about the canvas."""
    if kind == "count":
        return "how many digits ?", str(len(canvas.digits))
    if kind == "leftmost":
        label = min(canvas.digits, key=lambda d: d[2])[0]
        return "which digit is left-most ?", str(label)
    if kind == "present":  # half the time a digit of the canvas, else one it lacks
        shown = [label for label, _, _ in canvas.digits]
        pool = shown if rng.random() < 0.5 else [d for d in range(10) if d not in shown]
        label = int(pool[int(rng.integers(len(pool)))])
        return f"is there a digit {label} ?", "yes" if label in shown else "no"
    if kind == "where":
        label, _, left = canvas.digits[int(rng.integers(len(canvas.digits)))]
        side = "left" if left + DIGIT / 2 < CANVAS / 2 else "right"
        return f"where is the digit {label} ?", side
    if kind == "quadrant":
        quadrant = QUADRANTS[int(rng.integers(4))]
        present = any(quadrant_of(top, left) == quadrant for _, top, left in canvas.digits)
        return f"is there a digit in the {quadrant} ?", "yes" if present else "no"
    raise ConfigError(f"question type must be one of {QUESTION_TYPES}, got {kind!r}")


@dataclass(frozen=True)
class QABatch:
    """Canvases with one question of each listed type per canvas (each type has a fixed length)."""

    images: torch.Tensor  # [B, 1, CANVAS, CANVAS] in [-1, 1]
    questions: dict[str, torch.Tensor]  # type -> LongTensor [B, L_type]
    answers: dict[str, torch.Tensor]  # type -> LongTensor [B]
    token_labels: torch.Tensor  # LongTensor [B, grid*grid]: digit class under each patch centre, 10 = none
    canvases: tuple[Canvas, ...]


def patch_labels(canvas: Canvas, patch: int) -> np.ndarray:
    """Digit class whose box holds each patch centre (10 = background), row-major over the patch grid."""
    g = CANVAS // patch
    centres = np.arange(g) * patch + patch / 2
    out = np.full((g, g), 10, np.int64)
    for label, top, left in canvas.digits:
        rows = (centres >= top) & (centres < top + DIGIT)
        cols = (centres >= left) & (centres < left + DIGIT)
        out[np.ix_(rows, cols)] = label
    return out.reshape(-1)


def qa_batch(
    rng: np.random.Generator,
    size: int,
    split: str = "train",
    kinds: tuple[str, ...] = QUESTION_TYPES,
    patch: int = 4,
) -> QABatch:
    canvases = tuple(sample_canvas(rng, split) for _ in range(size))
    questions: dict[str, list[list[int]]] = {k: [] for k in kinds}
    answers: dict[str, list[int]] = {k: [] for k in kinds}
    for canvas in canvases:
        for kind in kinds:
            q, a = question(canvas, kind, rng)
            questions[kind].append(tokenize(q))
            answers[kind].append(TOKEN_ID[a])
    return QABatch(
        images=torch.from_numpy(np.stack([c.image for c in canvases]))[:, None],
        questions={k: torch.tensor(v) for k, v in questions.items()},
        answers={k: torch.tensor(v) for k, v in answers.items()},
        token_labels=torch.from_numpy(np.stack([patch_labels(c, patch) for c in canvases])),
        canvases=canvases,
    )


def gen_prompt(label: int | None, quadrant: str | None) -> str:
    """'draw <digit> <quadrant>'; None becomes <null> (guidance) or 'anywhere' (free position)."""
    return f"draw {'<null>' if label is None else label} {quadrant or 'anywhere'}"


@dataclass(frozen=True)
class GenBatch:
    images: torch.Tensor  # [B, 1, CANVAS, CANVAS]: one digit, at the prompt's quadrant
    prompts: torch.Tensor  # LongTensor [B, 3]
    labels: torch.Tensor  # LongTensor [B]
    quadrants: tuple[str, ...]


def gen_batch(
    rng: np.random.Generator, size: int, split: str = "train", p_anywhere: float = 0.25, p_null: float = 0.1
) -> GenBatch:
    """Single-digit canvases with their prompts; some prompts drop the position or (for CFG) everything.

    The digit sits near its quadrant's centre (`box_near_centre`): with fully random places inside the
    quadrant the flow head learned where to put ink but not which digit to draw (classifier accuracy
    10-15 %, reports/umm_training.md history).
    """
    images, labels = digit_bank(split)
    pics, prompts, labs, quads = [], [], [], []
    for _ in range(size):
        i = int(rng.integers(len(images)))
        quadrant = QUADRANTS[int(rng.integers(4))]
        top, left = box_near_centre(rng, quadrant)
        pics.append(render([(images[i], int(labels[i]), top, left)]).image)
        if rng.random() < p_null:
            text = gen_prompt(None, None)
        else:
            text = gen_prompt(int(labels[i]), None if rng.random() < p_anywhere else quadrant)
        prompts.append(tokenize(text))
        labs.append(int(labels[i]))
        quads.append(quadrant)
    return GenBatch(
        torch.from_numpy(np.stack(pics))[:, None], torch.tensor(prompts), torch.tensor(labs), tuple(quads)
    )
