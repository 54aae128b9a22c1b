"""Visual-token reduction for unified multimodal models: G2TR, baselines, FLOPs accounting, adapters.

`get_reducer(name, **options).reduce(tokens, ReductionContext(...))` is the one verb; `g2tr` holds the
method's plain functions, `bagel` the packed-sequence API, `janus` the transformers Janus adapter,
`inlm` the in-LM pruning hooks and `flops` the cost model.
"""

from adatsq.tokens import bagel, flops, g2tr, inlm, janus
from adatsq.tokens.base import (
    REDUCERS,
    Reduced,
    ReductionContext,
    TokenReducer,
    get_reducer,
    grid_positions,
    keep_count,
    reduced_from_kept,
)
from adatsq.tokens.baselines import (
    FastV,
    GridPool,
    PDrop,
    RandomDrop,
    ToMe,
    VisionZip,
    VNorm,
    pdrop_schedule,
    pdrop_stage_ratio,
    prune_stage,
)
from adatsq.tokens.flops import (
    kv_cache_bytes,
    layer_seq_lens,
    lm_prefill_flops,
    measure_latency,
    reducer_overhead_flops,
)
from adatsq.tokens.g2tr import G2TR, anchors_from_latent
from adatsq.tokens.inlm import InLMPruner
from adatsq.tokens.janus import JanusTokenReduction, greedy_generate, reduced_inputs_embeds

__all__ = [
    "G2TR",
    "REDUCERS",
    "FastV",
    "GridPool",
    "InLMPruner",
    "JanusTokenReduction",
    "PDrop",
    "RandomDrop",
    "Reduced",
    "ReductionContext",
    "ToMe",
    "TokenReducer",
    "VNorm",
    "VisionZip",
    "anchors_from_latent",
    "bagel",
    "flops",
    "g2tr",
    "get_reducer",
    "greedy_generate",
    "grid_positions",
    "inlm",
    "janus",
    "keep_count",
    "kv_cache_bytes",
    "layer_seq_lens",
    "lm_prefill_flops",
    "measure_latency",
    "pdrop_schedule",
    "pdrop_stage_ratio",
    "prune_stage",
    "reduced_from_kept",
    "reduced_inputs_embeds",
    "reducer_overhead_flops",
]
