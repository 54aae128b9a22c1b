"""One measurement of tools/bench_gptq.py in a fresh process: load (W, H), solve once, print a JSON line.

    python -m bench.gptq_solve '{"dir": ..., "method": "adatsq", "bits": 4, "group_size": 64, ...}'

Memory is the largest resident size seen during the solve (/proc/self/statm, sampled every millisecond
by a thread) minus the resident size once W and H are loaded: the solver's own peak beyond its inputs.
ru_maxrss cannot show it: loading and importing already peaked higher than the baseline plus a solve
that needs less than its inputs (it read 0 for most cases). The solver's buffers live for seconds, far
longer than the sampling interval. A fresh process per measurement; it imports no more than the solve
needs (bench.common pulls in diffusers). The objective is computed afterwards, on
the float64 H, outside the measurement.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adatsq.quant.gptq import gptq
from adatsq.quant.scheme import WeightScheme, quant_error
from bench.gptq_reference import reference_gptq

# adatsq_overwrite_h: the solver may use the caller's H as its workspace; reference_fp32: the published
# precision (float32 W and H, H handed in as float32); reference_fp64: the float64 transcription
METHODS = ("adatsq", "adatsq_overwrite_h", "reference_fp32", "reference_fp64")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int:
    """Resident bytes now (/proc/self/statm): at the baseline it shows whether ru_maxrss is inflated."""
    resident = int(Path("/proc/self/statm").read_text().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The largest resident size seen while the block runs, polled from a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak = interval, rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))


def solve(spec: dict[str, Any]) -> dict[str, Any]:
    folder, method = Path(spec["dir"]), spec["method"]
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    torch.set_num_threads(spec["threads"])
    scheme = WeightScheme(spec["bits"], spec["group_size"], spec["symmetric"])
    W = load(folder / "W.npy")
    H = load(folder / ("H32.npy" if method == "reference_fp32" else "H.npy"))
    gc.collect()
    base, base_now, load_average = max_rss_bytes(), rss_bytes(), os.getloadavg()[0]
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if method.startswith("adatsq"):
            result = gptq(W, H, scheme, overwrite_h=method == "adatsq_overwrite_h")
        else:
            dtype = torch.float32 if method == "reference_fp32" else torch.float64
            Wq = reference_gptq(W, H, scheme, act_order=False, dtype=dtype)
    seconds = time.perf_counter() - start
    out = {
        "seconds": seconds,
        "peak_rss_bytes": max(0, sampler.peak - base_now),
        "max_rss_growth_bytes": max_rss_bytes() - base,
        "baseline_max_rss_bytes": base,
        "baseline_rss_bytes": base_now,
        "load_average": load_average,
    }
    if spec["objective"]:
        if method.startswith("adatsq"):
            Wq, out["loss"] = result.weight.dequantize(), result.loss
            del result
        if method in ("reference_fp32", "adatsq_overwrite_h"):  # H is float32, or the solver's garbage
            H = load(folder / "H.npy")
        out["objective"] = quant_error(W, Wq, H)
    return out


if __name__ == "__main__":
    print(json.dumps(solve(json.loads(sys.argv[1]))))
