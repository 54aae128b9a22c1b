"""Visual-token reduction for unified multimodal models: G2TR, baselines, FLOPs accounting, adapters.

`get_reducer(name, **options).reduce(tokens, ReductionContext(...))` is the one verb; `g2tr` holds the
method's plain functions, `bagel` the packed-sequence API, `janus` the transformers Janus adapter,
`inlm` the in-LM pruning hooks and `flops` the cost model.

Importing this package registers the built-in reducers in `REDUCERS`: each is a class decorated with
`@REDUCERS.register(name)` in `g2tr` or `baselines`, both imported here (and Python imports this package
before any of its modules, so `adatsq.tokens.base.get_reducer` always sees them).
"""

from adatsq.tokens import bagel, baselines, flops, g2tr, inlm, janus
from adatsq.tokens.base import (
    IN_LM,
    POST_CONNECTOR,
    REDUCERS,
    InLMReducer,
    Reduced,
    ReductionContext,
    TokenReducer,
    get_reducer,
    grid_positions,
    keep_count,
    reduced_from_kept,
    reducer_names,
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
    "IN_LM",
    "POST_CONNECTOR",
    "REDUCERS",
    "FastV",
    "GridPool",
    "InLMPruner",
    "InLMReducer",
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
    "baselines",
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
    "reducer_names",
    "reducer_overhead_flops",
]
