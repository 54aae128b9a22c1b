"""The scripts under tools/ import as modules (`import bench_core`), and they import `bench.common`,
as they do when run as `python tools/<script>.py` (which puts tools/ first on sys.path)."""

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
