"""The reference unified multimodal model (a miniature BAGEL) and where token reducers run in it."""

from adatsq.tokens.umm.adapter import Answer, UMMReduction
from adatsq.tokens.umm.bench import bench, token_map
from adatsq.tokens.umm.model import MiniUMM, UMMConfig
from adatsq.tokens.umm.weights import load_umm, save_umm

__all__ = ["Answer", "MiniUMM", "UMMConfig", "UMMReduction", "bench", "load_umm", "save_umm", "token_map"]
