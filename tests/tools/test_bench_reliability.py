"""tools/bench_reliability.py --quick --kill: the corpus, determinism, corruption and kill -9 sections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_report_meets_every_target(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench_reliability.py"),
        "--quick",
        "--kill",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    report = json.loads((tmp_path / "reliability.json").read_text())
    kinds = report["corpus"]["kinds"]
    assert sum(k["total"] for k in kinds.values()) >= 150 and len(kinds) >= 10
    assert [t["target"] for t in report["targets"] if not t["pass"]] == []
    assert all(len({r["model"] for r in d["runs"]}) == 1 for d in report["determinism"])
    assert report["corruption"]["tensor"] in report["corruption"]["message"]
    assert {r["output"] for r in report["kill"]["rows"]} <= {"absent", "complete, loads"}
    assert (tmp_path / "reliability.md").read_text().startswith("# Reliability")
