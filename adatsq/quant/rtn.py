"""Round-to-nearest: the baseline every GPTQ result is compared against, and the planner's cheap probe."""

from __future__ import annotations

import torch
from torch import Tensor

from adatsq.errors import ConfigError
from adatsq.quant.scheme import QuantizedWeight, WeightScheme, channel_scales, compute_qparams, quantize_codes


def rtn(W: Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Min-max quantize `W` [out, in] group by group along the input dim (a partial last group is allowed)."""
    if W.ndim != 2:
        raise ConfigError(f"rtn expects a 2-D weight [out, in]; got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float64)
    cols = W.shape[1]
    gs = scheme.group_size or cols
    channel = channel_scales(W, scheme) if scheme.integer_group_scales else None
    codes, scales, zeros = [], [], []
    for g0 in range(0, cols, gs):
        Wg = W[:, g0 : g0 + gs]
        scale, zero = compute_qparams(Wg, scheme, channel)
        codes.append(quantize_codes(Wg, scale[:, None], zero[:, None], scheme.bits))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.uint8),
        scales=torch.stack(scales, dim=1),
        zeros=torch.stack(zeros, dim=1).to(torch.uint8),
        bits=scheme.bits,
        group_size=scheme.group_size,
        channel_scales=channel,
    )
