"""Token reduction in the reference unified model (a miniature BAGEL): where reducers run, benchmarks."""

from adatsq.tokens.umm.bench import bench, token_map
from adatsq.tokens.umm.reduction import Answer, UMMReduction
from adatsq.tokens.umm.unified import UnifiedModel, with_token_reduction

__all__ = ["Answer", "UMMReduction", "UnifiedModel", "bench", "token_map", "with_token_reduction"]
