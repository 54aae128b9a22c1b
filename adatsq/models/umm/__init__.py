"""The reference unified multimodal model (a miniature BAGEL): model, data, shipped weights, adapter."""

from adatsq.models.umm.model import MiniUMM, UMMConfig
from adatsq.models.umm.weights import load_umm, save_umm

__all__ = ["MiniUMM", "UMMConfig", "load_umm", "save_umm"]
