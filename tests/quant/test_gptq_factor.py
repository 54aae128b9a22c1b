"""The in-place [in, in] workspace of GPTQ: the factor of the damped inverse beside H's own triangle."""

import pytest
import torch

from adatsq.quant.gptq_factor import (
    damped_inverse_factor_,
    mirror_lower_,
    objective,
    permute_rows_,
    permute_symmetric_,
    reverse_,
)
from adatsq.quant.scheme import quant_error


def _hessian(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g) * 3
    return X.T @ X


@pytest.mark.parametrize("n", [1, 7, 33, 130])
def test_in_place_passes_match_torch(n):
    A = torch.randn(n, n, dtype=torch.float64)
    perm = torch.randperm(n)
    assert torch.equal(reverse_(A.clone()), A.flip((0, 1)))
    assert torch.equal(permute_rows_(A.clone(), perm), A[perm])
    S = A + A.T
    assert torch.equal(permute_symmetric_(S.clone(), perm), S[perm][:, perm])
    M = mirror_lower_(S.clone())
    assert torch.equal(M.tril(-1), S.tril(-1)) and torch.equal(M.triu(1), S.tril(-1).T)


@pytest.mark.parametrize("use_lapack", [True, False])
def test_factor_layout(use_lapack):
    H = _hessian(70)
    damping = 0.01 * float(H.diagonal().mean())
    A = H.clone()
    assert damped_inverse_factor_(A, H.diagonal().clone(), damping, use_lapack=use_lapack)
    damped = H + damping * torch.eye(70, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(A.triu(), U, rtol=1e-9, atol=1e-12)
    assert torch.equal(A.tril(-1), H.tril(-1))  # H's own entries, never written


@pytest.mark.parametrize("use_lapack", [True, False])
def test_a_failed_factorisation_leaves_h(use_lapack):
    H = _hessian(40)
    H.diagonal().sub_(float(torch.linalg.eigvalsh(H)[0]) + 1.0)  # smallest eigenvalue -1
    assert float(torch.linalg.eigvalsh(H)[0]) < 0
    A = H.clone()
    assert not damped_inverse_factor_(A, H.diagonal().clone(), 1e-3, use_lapack=use_lapack)
    assert torch.equal(A.tril(-1), H.tril(-1))
    torch.testing.assert_close(A.triu(1), H.triu(1), rtol=0, atol=1e-12)  # H again (X^T X: symmetric to ulps)
    big = 10 * float(H.diagonal().abs().max())
    assert damped_inverse_factor_(A, H.diagonal().clone(), big, use_lapack=use_lapack)  # retry works


@pytest.mark.parametrize("permuted", [False, True])
def test_objective_is_the_dense_one(permuted):
    n, m = 300, 600  # several row chunks and row blocks
    H = _hessian(n, seed=1)
    W, Wq = torch.randn(m, n), torch.randn(m, n)
    perm = torch.randperm(n) if permuted else None
    A = (H if perm is None else H[perm][:, perm]).clone()
    diagonal = A.diagonal().clone()
    A.tril_(-1).add_(torch.randn(n, n, dtype=torch.float64).triu())  # the upper triangle is not read
    Wq_t = (Wq if perm is None else Wq[:, perm]).t().contiguous()
    assert objective(A, diagonal, W, Wq_t, perm) == pytest.approx(quant_error(W, Wq, H), rel=1e-11)
