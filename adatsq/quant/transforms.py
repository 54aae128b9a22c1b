"""Input transforms that tame activation outliers before 4-bit activation quantization.

A layer y = x W^T is rewritten exactly (before quantization) as
    x'' = (x / s) R,      W'' = (W * s) R,      W'' = L_b L_a + residual,
    y   = x'' residual^T + (x'' L_a^T) L_b^T
* SmoothQuant smoothing (`s`, per input channel) moves outlier magnitude from activations into weights.
* A Hadamard rotation R = diag(signs) kron(I_m, H_b) spreads what is left over all channels; b is the
  largest power of two dividing in_features (b = in_features when that is a power of two). It runs as
  Kronecker factors of small Sylvester matmuls (a fast Walsh-Hadamard transform), so no [n, n] matrix
  is ever stored.
* An SVDQuant-style low-rank branch keeps the top singular directions of W'' in full precision; only
  the residual is quantized (and only x'' feeding it is fake-quantized).
Since R is orthonormal, x'' W''^T = x W^T exactly; GPTQ on the residual must see the Hessian of x''
(`transform_hessian`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import ConfigError

_EPS = 1e-5


def smooth_scales(act_absmax: Tensor, W: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant scales s[in] = max|x_j|^alpha / max|W_:,j|^(1-alpha); x' = x / s, W' = W * s.

    Channels that never fire (act absmax 0) or have all-zero weights keep s = 1, and s is clamped to
    [1e-5, 1e5], so the result is always finite and positive.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha={alpha} must lie in [0, 1] (0.5 is the SmoothQuant default)")
    a = act_absmax.detach().to(device=W.device, dtype=torch.float64).abs()
    w = W.detach().to(torch.float64).abs().amax(dim=0)
    if a.shape != w.shape:
        raise ConfigError(f"act_absmax has shape {tuple(a.shape)}; expected [{w.shape[0]}] (in_features)")
    s = a.clamp(min=_EPS) ** alpha / w.clamp(min=_EPS) ** (1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(_EPS, 1.0 / _EPS).to(torch.float32)


def hadamard_block_size(n: int) -> int:
    """Largest power of two dividing n: the size of the Hadamard blocks used for n channels."""
    if n <= 0:
        raise ConfigError(f"cannot rotate {n} channels; need a positive channel count")
    return n & -n


def random_signs(n: int, seed: int) -> Tensor:
    """Seeded +-1 vector: randomises the rotation so no fixed direction lines up with an outlier."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


# Measured on 1024 x 3072 bf16 (2 threads): a right multiply [.., c] @ H_c costs about one pass over the
# input for c <= 128 (1.3-1.6 ms), a broadcast left multiply H_f @ [.., f, inner] is cheap over long
# inner runs (H_8 over runs of 384: 1.8 ms) and slow over short ones (H_64 over runs of 16: ~7 ms, H_128
# over runs of 8: ~50 ms). So the biggest factor goes right, and the rest are few and small.
_WHT_RIGHT = 128  # Sylvester block applied as one right multiply on the contiguous channels
_WHT_LEFT = 64  # largest further Kronecker factor, one left multiply each


@functools.lru_cache(maxsize=32)
def _sylvester(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The unnormalised [n, n] Sylvester Hadamard matrix of +-1 (exact in every float dtype)."""
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H


def rotate(x: Tensor, signs: Tensor | None = None) -> Tensor:
    """x R along the last dim, R = diag(signs) kron(I_m, H_b), H_b the orthonormal Sylvester Hadamard.

    Sylvester Hadamard matrices are symmetric, so the same call also computes W R for a weight W.
    float32 / float64 run the exact butterfly (the numerics checkpoints and reports were made with);
    half precisions run the matmul Walsh-Hadamard transform in their own dtype.
    """
    y = x if signs is None else x * signs.to(x.dtype)
    b = hadamard_block_size(x.shape[-1])
    wht = _matmul_wht if x.dtype in (torch.float16, torch.bfloat16) else _butterfly
    return (wht(y, b) / math.sqrt(b)).to(x.dtype)


def walsh_hadamard(x: Tensor) -> Tensor:
    """x kron(I_m, H_b) along the last dim, H_b unnormalised (+-1): the kernels' rotation, after
    `InputTransform.input_scale` (which carries the signs and 1/sqrt(b)), in any float dtype."""
    return _matmul_wht(x, hadamard_block_size(x.shape[-1]))


def scaled_walsh_hadamard(x: Tensor, scale: Tensor | None, rotate: bool) -> Tensor:
    """walsh_hadamard(x * scale) (either step optional): `InputTransform.apply` as two ops."""
    if scale is not None:
        x = x * scale.to(x.dtype)
    return walsh_hadamard(x) if rotate else x


def _butterfly(y: Tensor, b: int) -> Tensor:
    """Unnormalised WHT of every aligned run of `b` along the last dim, log2(b) add/subtract stages."""
    n, lead = y.shape[-1], y.shape[:-1]
    h = 1
    while h < b:  # butterfly stage: pairs (i, i + h) inside each aligned run of 2h
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(*lead, n)


def _matmul_wht(y: Tensor, b: int) -> Tensor:
    """The same transform as Kronecker factors of Sylvester blocks (H_b = H_f (x) ... (x) H_c), one
    small matmul each: a few passes over y instead of log2(b) stages."""
    n, lead = y.shape[-1], y.shape[:-1]
    inner = min(b, _WHT_RIGHT)  # the first factor acts on the fastest-moving index: a right multiply
    y = y.reshape(-1, inner) @ _sylvester(inner, y.dtype, y.device)
    while inner < b:  # each further factor acts on the next index up: a left multiply
        f = min(b // inner, _WHT_LEFT)
        y = torch.matmul(_sylvester(f, y.dtype, y.device), y.reshape(-1, f, inner))
        inner *= f
    return y.reshape(*lead, n)


def hadamard(n: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal [n, n] rotation `rotate` applies (kron(I, H_b), rows sign-flipped when seeded)."""
    b = hadamard_block_size(n)
    Hb = torch.ones(1, 1, dtype=torch.float64)
    while Hb.shape[0] < b:
        Hb = torch.cat((torch.cat((Hb, Hb), 1), torch.cat((Hb, -Hb), 1)), 0)
    R = torch.kron(torch.eye(n // b, dtype=torch.float64), Hb / math.sqrt(b))
    if seed is not None:
        R = random_signs(n, seed).double()[:, None] * R
    return R.to(dtype)


def lowrank_split(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` SVD branch of W [out, in] -> (L_a [rank, in], L_b [out, rank], W - L_b L_a).

    L_a has orthonormal rows (the input directions); L_b carries the singular values.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(W.shape):
        raise ConfigError(f"low-rank rank={rank!r} must be an int in [1, {min(W.shape)}] for this weight")
    W64 = W.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    L_a, L_b = Vh[:rank], U[:, :rank] * S[:rank]
    return L_a.to(W.dtype), L_b.to(W.dtype), (W64 - L_b @ L_a).to(W.dtype)


@dataclass(frozen=True)
class TransformScheme:
    """Which outlier transforms a layer gets (recipe-level choice).

    smooth_alpha: SmoothQuant migration strength, None = no smoothing (needs activation absmax).
    rotate: Hadamard-rotate the inputs; rotate_seed: seed of the random sign flips (None = no flips).
    lowrank_rank: rank of the full-precision branch, 0 = none (SVDQuant uses 32).
    """

    smooth_alpha: float | None = None
    rotate: bool = False
    rotate_seed: int | None = 0
    lowrank_rank: int = 0

    def __post_init__(self) -> None:
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha={self.smooth_alpha} must be None or in [0, 1] (try 0.5)")
        if not isinstance(self.rotate, bool):
            raise ConfigError(f"rotate={self.rotate!r} must be True or False")
        rank = self.lowrank_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"lowrank_rank={self.lowrank_rank!r} must be an int >= 0 (0 = no branch)")


TRANSFORM_FIELDS = ("smooth", "rotation_signs", "lowrank_a", "lowrank_b")  # InputTransform's, in order


@dataclass(frozen=True)
class InputTransform:
    """The tensors one layer stores for its transforms (QuantLinear keeps them as buffers).

    smooth [in]: x / smooth. rotation_signs [in] of +-1: x R (see `rotate`); None = no rotation.
    lowrank_a [rank, in], lowrank_b [out, rank]: full-precision branch on the transformed input.
    """

    smooth: Tensor | None = None
    rotation_signs: Tensor | None = None
    lowrank_a: Tensor | None = None
    lowrank_b: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.lowrank_a is None) != (self.lowrank_b is None):
            raise ConfigError("lowrank_a and lowrank_b must be given together")
        if self.lowrank_a is not None and self.lowrank_a.shape[0] != self.lowrank_b.shape[1]:
            raise ConfigError(
                f"low-rank factors disagree: L_a {list(self.lowrank_a.shape)}, "
                f"L_b {list(self.lowrank_b.shape)}"
            )

    def apply(self, x: Tensor) -> Tensor:
        """x'' = (x / smooth) R: what the quantized residual and the low-rank branch consume.

        Half precisions take the kernels' form (`scaled_walsh_hadamard`), so reference and kernels
        transform bit for bit alike and no 4-bit activation code flips between them; float32 / float64
        the exact division and butterfly.
        """
        if x.dtype in (torch.float16, torch.bfloat16):
            return scaled_walsh_hadamard(x, self.input_scale(), self.rotation_signs is not None)
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rotation_signs is not None:
            x = rotate(x, self.rotation_signs)
        return x

    def input_scale(self) -> Tensor | None:
        """d [in] (float64) with (x / smooth) R == walsh_hadamard(x * d): smoothing, sign flips and the
        rotation's 1/sqrt(b) as one multiply, the kernels' form (each elementwise pass measured ~1 ms
        at 1024 x 3072 bf16, against ~25 ms for the W8A8 layer). None: neither smoothing nor rotation."""
        if self.smooth is None and self.rotation_signs is None:
            return None
        d = 1.0 / self.smooth.double() if self.smooth is not None else 1.0
        if self.rotation_signs is not None:
            b = hadamard_block_size(self.rotation_signs.shape[0])
            d = self.rotation_signs.double() * d / math.sqrt(b)
        return d

    def fold(self, W: Tensor) -> Tensor:
        """W'' = (W * smooth) R, before the low-rank split: x'' W''^T equals x W^T."""
        if self.smooth is not None:
            W = W * self.smooth.to(W.dtype)
        if self.rotation_signs is not None:
            W = rotate(W, self.rotation_signs)
        return W


def build_transform(
    W: Tensor, scheme: TransformScheme, act_absmax: Tensor | None = None
) -> tuple[Tensor, InputTransform]:
    """-> (the matrix to quantize: residual of W'' after the low-rank branch, the transform to store)."""
    smooth = None
    if scheme.smooth_alpha is not None:
        if act_absmax is None:
            raise ConfigError("smoothing needs the per-channel activation absmax from calibration")
        smooth = smooth_scales(act_absmax, W, scheme.smooth_alpha)
    signs = None
    if scheme.rotate:
        n, seed = W.shape[1], scheme.rotate_seed
        signs = torch.ones(n) if seed is None else random_signs(n, seed)
        signs = signs.to(W.device)
    t = InputTransform(smooth=smooth, rotation_signs=signs)
    target = t.fold(W.detach().float())
    if scheme.lowrank_rank:
        L_a, L_b, target = lowrank_split(target, scheme.lowrank_rank)
        t = InputTransform(smooth=smooth, rotation_signs=signs, lowrank_a=L_a, lowrank_b=L_b)
    return target, t


def transform_hessian(H: Tensor, t: InputTransform) -> Tensor:
    """Hessian of x'' from the Hessian of x: R^T S^-1 H S^-1 R (float64), for GPTQ on the residual."""
    H = H.detach().to(torch.float64)
    if t.smooth is not None:
        s = t.smooth.to(torch.float64)
        H = H / s[:, None] / s[None, :]
    if t.rotation_signs is not None:
        signs = t.rotation_signs.to(torch.float64)
        H = rotate(rotate(H, signs).T, signs)  # (H R)^T R = R^T H R, as H is symmetric
    return H
