"""Keep glibc's malloc from handing freed tensor memory back to the OS between calls.

glibc returns the top of its heap to the OS once more than M_TRIM_THRESHOLD (128 KiB, raised only as
large blocks are freed) lies free there, and serves blocks above M_MMAP_THRESHOLD from fresh mmaps;
either way the next call's tensors of the same size fault their pages in again. A sampling loop frees
and re-allocates the same [tokens, features] tensors every layer and step, so on these CPUs that cost
more than the matmuls: 3040 page faults, 4.1 against 0.45 ms per call for 4096 tokens of a 128 -> 384
int8 layer, intermittently (as the heap top happened to be trimmed or not); `adatsq eval` of the
reference DiT in bf16, float model 3.5 -> 2.5 s and W4A8 5.8 -> 3.7 s (MALLOC_ environment variables,
same settings). What PyTorch's CPU guide gets from jemalloc / tcmalloc, without a preloaded library.

The price: freed memory stays in the process for reuse (resident size does not shrink back after a
peak). `ADATSQ_ALLOCATOR=system` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 2**31 - 1  # bytes (mallopt takes an int): trim only past 2 GiB free at the top
MMAP_THRESHOLD = 1 << 25  # 32 MiB: glibc's largest; blocks above it are still mmapped
ENV = "ADATSQ_ALLOCATOR"


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (once per process); False where it does not apply
    (not glibc, or ADATSQ_ALLOCATOR=system)."""
    if os.environ.get(ENV, "").strip().lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) & bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
