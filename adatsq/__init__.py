"""adatsq: timestep-adaptive quantization for diffusion transformers, token reduction for UMMs."""

from adatsq.errors import AdatsqError

__version__ = "0.1.0"

__all__ = ["AdatsqError", "__version__"]
