"""Peak memory of one GPTQ solve (`adatsq.quant.gptq.gptq`), as a function of the layer's shape.

Read from the code and checked by measurement (tests/quant/test_workspace.py counts the bytes of every
tensor alive during a real solve). The solver works in float64 and its peak is one of two moments:

* the factorisation: the float64 Hessian handed in (the engine's weighted mean of the segment sums), its
  working copy, the damping identity, the Cholesky factor L, cholesky_inverse(L) and the upper factor of
  H⁻¹ (6 × 8 · in²), beside the float64 working weight (8 · out·in);
* the final loss tr((W−Q) H (W−Q)ᵀ): five [in, in] matrices (the factorisation's temporaries are gone,
  L and H⁻¹'s factor are not) and seven float64-sized [out, in] ones: the working weight, the codes in
  float64, float64 copies of W and of the dequantized weight, their difference, the float32 dequantized
  weight, the uint8 codes and, with act-order groups, the un-permuted weight (5 · 8 · in² + 7 · 8 · out·in);

plus the lazy block (columns [i1, i2) of W and their errors, 2 × 8 · out · min(block, in)) at both.
The issue's "≈ 6.5 × in² float64" is the factorisation moment with a float32 Hessian handed in.
Measured peaks are 0.87–1.0 × this bound (tests/quant/test_workspace.py).
"""

from __future__ import annotations


def gptq_workspace_bytes(in_features: int, out_features: int, block_size: int = 128) -> int:
    """Peak bytes of one GPTQ solve of a [out, in] weight, its float64 Hessian included.

    8 · (max(6 · in² + out · in, 5 · in² + 7 · out · in) + 2 · out · min(block_size, in)).
    """
    i, o = in_features, out_features
    factorisation = 6 * i * i + o * i
    loss = 5 * i * i + 7 * o * i
    return 8 * (max(factorisation, loss) + 2 * o * min(block_size, i))
