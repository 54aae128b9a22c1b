"""What a bug report needs to know about this machine (`adatsq env`, like `diffusers-cli env`)."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from adatsq.core.version import __version__

_PACKAGES = ("diffusers", "transformers", "safetensors", "accelerate", "numpy", "torchao", "optimum-quanto")


def environment() -> dict[str, str]:
    """Versions of adatsq and its main libraries, the torch threads and the devices torch sees."""
    info = {
        "adatsq": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    info["cpu cores"] = str(os.cpu_count())
    info["torch threads"] = str(torch.get_num_threads())
    info["cuda"] = (
        f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else "not available"
    )
    return info
