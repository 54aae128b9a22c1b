"""core/allocator.py: freed tensor memory stays in the process, so the next call does not fault it in."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, resource
import torch
from adatsq.core.allocator import retain_freed_memory
tuned = retain_freed_memory()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(3 << 20) for _ in range(8)]  # 8 x 12 MiB freed together, as a layer's temporaries
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _probe(**env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_freed_tensors_are_reused_without_page_faults():
    tuned, system = _probe(), _probe(ADATSQ_ALLOCATOR="system")
    assert tuned["tuned"] is True and system["tuned"] is False
    pages = 8 * (12 << 20) // 4096  # what one round touches
    # The first round faults its pages in; after it the freed heap is reused. Once in a while (about 1
    # run in 6 here) a small allocation lands in a freed block and the second round carves one block
    # from fresh memory: the heap then holds nine blocks, and every round after that faults none.
    assert sum(tuned["faults"][1:]) < pages / 8 + pages / 100
    assert max(tuned["faults"][2:]) < pages / 100
    # glibc's defaults trim the freed heap top: the second round faults every page in again (later
    # rounds depend on how its thresholds adapted)
    assert system["faults"][1] > pages / 2
