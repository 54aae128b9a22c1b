"""The one [in, in] float64 buffer of a GPTQ solve: first the Hessian, then the factor of its damped inverse.

After `damped_inverse_factor_` succeeds the buffer A holds, in processing order (permuted under act-order):

* upper triangle, diagonal included: U, the upper Cholesky factor of (H + λI)⁻¹ = UᵀU, whose rows the
  column loop reads;
* strict lower triangle: H's own off-diagonal entries, never written. With the undamped diagonal kept
  aside (in values) that is all of H, so the exact objective tr(E H Eᵀ) needs no second [in, in] matrix
  (`objective`).

U comes from one Cholesky and one triangular inverse. With J the reversal permutation, J (H + λI) J = L Lᵀ
(L lower) gives (H + λI)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular with a positive
diagonal, so U = J L⁻¹ J: n³/3 + n³/3 flops where the reference's Cholesky, cholesky_inverse and second
Cholesky take n³/3 + 2n³/3 + n³/3. On CPU, LAPACK's potrf and trtri (scipy's bindings) work in place on
the buffer, reversed in place around them; they touch only one triangle, so a failed factorisation is
undone from the other (`mirror_lower_`). On other devices torch's cholesky_ex and solve_triangular
allocate two more [in, in] matrices.
"""

from __future__ import annotations

import torch
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits
from torch import Tensor

ROWS = 16  # rows of A per step of the in-place passes (their temporaries: O(in) floats)
LOSS_ROWS = 256  # output rows of E per pass over the triangle in `objective`
LOSS_BLOCK = 256  # rows of H per matmul in `objective`


def permute_rows_(X: Tensor, perm: Tensor) -> Tensor:
    """X[i] <- X[perm[i]] in place, cycle by cycle, with one row of temporary."""
    order = perm.tolist()
    done = bytearray(len(order))
    for start, first in enumerate(order):
        if done[start] or first == start:
            continue
        saved, row = X[start].clone(), start
        while True:
            done[row], source = 1, order[row]
            if source == start:
                X[row] = saved
                break
            X[row] = X[source]
            row = source
    return X


def permute_symmetric_(A: Tensor, perm: Tensor) -> Tensor:
    """A <- A[perm][:, perm] in place: rows by cycles, then columns a few rows at a time."""
    permute_rows_(A, perm)
    for r0 in range(0, A.shape[0], ROWS):
        A[r0 : r0 + ROWS] = A[r0 : r0 + ROWS].index_select(1, perm)
    return A


def reverse_(A: Tensor) -> Tensor:
    """A[i, j] <- A[n-1-i, n-1-j] in place (J A J): the flat storage reversed, a chunk from each end."""
    flat = A.view(-1)
    total, step = flat.numel(), ROWS * A.shape[0]
    for lo in range(0, total // 2, step):
        hi = min(lo + step, total // 2)
        head = flat[lo:hi].clone()
        flat[lo:hi] = flat[total - hi : total - lo].flip(0)
        flat[total - hi : total - lo] = head.flip(0)
    return A


def mirror_lower_(A: Tensor) -> Tensor:
    """Upper triangle <- transpose of the strict lower one (the diagonal becomes 0), in place."""
    n = A.shape[0]
    for r0 in range(0, n, ROWS):
        r1 = min(r0 + ROWS, n)
        A[r0:r1, r1:] = A[r1:, r0:r1].t()
        block = A[r0:r1, r0:r1]
        lower = block.tril(-1)
        block.copy_(lower + lower.t())
    return A


def damped_inverse_factor_(
    A: Tensor, diagonal: Tensor, damping: float, use_lapack: bool | None = None
) -> bool:
    """Diagonal of A <- diagonal + damping, then the layout of the module docstring; False (and A's
    strict lower triangle intact, its upper triangle restored from it) when H + damping·I is not
    positive definite. A: contiguous float64 [n, n], symmetric on entry."""
    A.diagonal().copy_(diagonal).add_(damping)
    if not (A.device.type == "cpu" if use_lapack is None else use_lapack):
        L, info = torch.linalg.cholesky_ex(A.flip((0, 1)))
        if int(info) != 0:
            return False
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        A.tril_(-1).add_(torch.linalg.solve_triangular(L, eye, upper=False).flip((0, 1)))
        return True
    reverse_(A)
    # A.numpy().T is the same memory in Fortran order: LAPACK's upper triangle is A's lower one
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        f, info = lapack.dpotrf(A.numpy().T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            f, info = lapack.dtrtri(f, lower=0, overwrite_c=1)
    assert info >= 0 and f.ctypes.data == A.data_ptr(), "LAPACK must work in place on A"
    reverse_(A)
    if info != 0:
        mirror_lower_(A)
    return info == 0


def objective(A: Tensor, diagonal: Tensor, W: Tensor, Wq_t: Tensor, perm: Tensor | None) -> float:
    """tr((W − Wq) H (W − Wq)ᵀ) in float64, H read from A's strict lower triangle and `diagonal`.

    W [out, in] in the caller's column order, Wq_t [in, out] in processing order (`perm`). E = W − Wq is
    formed LOSS_ROWS output rows at a time; each row block of H's lower triangle multiplies it once
    (out · in² flops, half of E @ H), its diagonal block carrying diagonal / 2.
    """
    n = A.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for r0 in range(0, W.shape[0], LOSS_ROWS):
        rows = W[r0 : r0 + LOSS_ROWS]
        E = rows.to(torch.float64, copy=True) if perm is None else rows.index_select(1, perm).double()
        E.sub_(Wq_t[:, r0 : r0 + LOSS_ROWS].t())  # [rows, in], exact: both are float32 values
        for k0 in range(0, n, LOSS_BLOCK):
            k1 = min(k0 + LOSS_BLOCK, n)
            T = A[k0:k1, k0:k1].tril(-1)
            T.diagonal().copy_(diagonal[k0:k1]).mul_(0.5)
            P = E[:, k0:k1] @ T.t()
            if k0:
                P.addmm_(E[:, :k0], A[k0:k1, :k0].t())
            total += P.mul_(E[:, k0:k1]).sum()
            del T, P  # before the next block's are made
        del E
    return 2.0 * float(total)
