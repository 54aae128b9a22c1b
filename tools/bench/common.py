"""One copy of what every benchmark under tools/ needs: where it ran (machine, load, library versions),
one thread policy, the float model and its samples, Markdown cells, tables and the pass/fail marker,
and the JSON + Markdown report files (written atomically).

Thread policy, the same for every benchmark: `--threads N` when given; otherwise ONE thread, because
the machine is shared with other developers, unless its 1-minute load average is below 0.5 (idle):
then every core. The report records the count and the reason.

The scripts run as `python tools/bench_<name>.py`, which puts tools/ first on sys.path, so they import
this module as `bench.common`.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import adatsq
from adatsq.checkpoint.load import load_checkpoint
from adatsq.core.io import atomic_write_text
from adatsq.eval.run import compare_samples, timed_samples
from adatsq.models.base import ModelAdapter
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import META_FILE, DigitsPipeline, build_scheduler, build_transformer
from adatsq.models.resolve import adapter_for

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"
IDLE_LOAD = 0.5  # 1-minute load average below which the machine counts as idle
TINY_DIT = {"num_layers": 1, "num_attention_heads": 2}  # `--model tiny`: a seconds-long smoke run


# ----------------------------------------------------------------------------------------- environment
def machine_info(threads: int, reason: str | None = None) -> dict[str, Any]:
    """CPU, Python, torch threads (and why that many) and the load average when the run started."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
        info["cpu_model"] = fields.get("Model name")
        info["cpus"] = int(fields.get("CPU(s)", os.cpu_count() or 0))
        info["cores_per_socket"] = fields.get("Core(s) per socket")
        info["threads_per_core"] = fields.get("Thread(s) per core")
    except (OSError, subprocess.CalledProcessError, ValueError):
        info["cpu_model"], info["cpus"] = platform.processor() or platform.machine(), os.cpu_count()
        info["cores_per_socket"] = info["threads_per_core"] = None
    info["torch_threads"] = threads
    if reason is not None:
        info["threads_reason"] = reason
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def machine_line(info: dict[str, Any]) -> str:
    """The machine in one line: `<cpu>, torch threads=<n>, Python <version>`."""
    return f"{info['cpu_model']}, torch threads={info['torch_threads']}, Python {info['python']}"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip()


def versions() -> dict[str, Any]:
    """Library versions and the git commit; `library_tree_dirty` when adatsq/ has uncommitted edits."""
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "adatsq": adatsq.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "library_tree_dirty": bool(_git("status", "--porcelain", "adatsq")),
    }


def pick_threads(requested: int | None) -> tuple[int, str]:
    """The thread policy of the module docstring: (thread count, reason)."""
    if requested is not None:
        return requested, "--threads"
    load = os.getloadavg()[0]
    if load < IDLE_LOAD:
        return os.cpu_count() or 1, f"machine idle (load {load:.2f})"
    return 1, f"machine shared (load {load:.2f})"


def pin_threads(requested: int | None) -> tuple[int, str]:
    """Apply the thread policy to torch; returns (thread count, reason) for the report."""
    threads, reason = pick_threads(requested)
    torch.set_num_threads(threads)
    return threads, reason


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- models
class ModelSource:
    """Fresh float adapters of the reference DiT (quantize and the meters swap layers in place, so every
    run needs its own copy). `auto` is the shipped model when its weights exist, else `random`; `random`
    and `tiny` (1 block) are seeded random initialisations."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        if kind == "auto":
            kind = "reference" if META_FILE.is_file() else "random"
        self.kind = kind
        self.config = TINY_DIT if kind == "tiny" else None
        self._state = None
        if kind in ("random", "tiny"):
            torch.manual_seed(seed)
            self._state = build_transformer(self.config).state_dict()

    def adapter(self) -> ReferenceAdapter:
        if self.kind == "reference":
            return adapter_for("reference")  # sets adapter.source = "reference"
        transformer = build_transformer(self.config)
        transformer.load_state_dict(self._state)
        return ReferenceAdapter(DigitsPipeline(transformer.eval(), build_scheduler()))


def fp32_checkpoint_bytes(denoiser: torch.nn.Module, directory: Path) -> int:
    """Size of the float denoiser saved as safetensors (what a quantized checkpoint is compared with)."""
    path = directory / "fp32.safetensors"
    save_file({k: v.contiguous().clone() for k, v in denoiser.state_dict().items()}, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


# ------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Float samples once; every quantized model is then sampled from the same noise and compared.

    Same inputs (default_inputs(samples, seed)), same batching (batch i from seed + i) and the same
    compare_samples as `adatsq eval`. The benchmarks add what their reports record around `compare`.
    """

    def __init__(self, source: ModelSource, samples: int, seed: int, num_steps: int, batch_size: int):
        self.seed, self.num_steps, self.batch_size = seed, num_steps, batch_size
        self.float = source.adapter()
        self.inputs = self.float.default_inputs(samples, seed)
        self.reference, self.fp_seconds = timed_samples(
            self.float, self.inputs, seed, num_steps, batch_size, "float samples"
        )

    def prefix(self, count: int) -> Evaluator:
        """The same evaluation on the first `count` inputs (whole batches, so the noise is the same)."""
        if count % self.batch_size or not 0 < count <= len(self.inputs):
            raise ValueError(
                f"prefix {count} must be a multiple of {self.batch_size} and <= {len(self.inputs)}"
            )
        sub = copy.copy(self)
        sub.inputs, sub.reference = self.inputs[:count], self.reference[:count]
        sub.fp_seconds = None
        return sub

    def compare(self, adapter: ModelAdapter, label: str = "quantized samples") -> tuple[dict, float]:
        """(compare_samples metrics against the float samples, sampling seconds) of `adapter`."""
        samples, seconds = timed_samples(
            adapter, self.inputs, self.seed, self.num_steps, self.batch_size, label
        )
        return compare_samples(samples, self.reference, self.inputs, adapter.family), seconds

    def load(self, directory: Path) -> tuple[ModelAdapter, dict[str, Any]]:
        """A saved checkpoint, refused when it was calibrated for another number of steps."""
        adapter, config = load_checkpoint(directory)
        if config["num_steps"] != self.num_steps:
            raise ValueError(
                f"{directory} was calibrated for {config['num_steps']} steps, not {self.num_steps}"
            )
        return adapter, config


# ------------------------------------------------------------------------------------------- markdown
def fmt(x: Any, spec: str = ".2f") -> str:
    """A table cell: – for None, yes / **no** for a fact, floats by `spec` (inf stays inf)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def verdict(passed: bool) -> str:
    """The pass/fail marker of every benchmark's targets."""
    return "pass" if passed else "**FAIL**"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines; cells that are not strings go through `fmt`."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]


def targets_table(targets: Sequence[dict[str, Any]]) -> list[str]:
    """The targets of a report ({target, measured, pass}) as a table with the pass/fail marker."""
    rows = [[t["target"], t["measured"], verdict(t["pass"])] for t in targets]
    return table(["target", "measured", "result"], rows)


# --------------------------------------------------------------------------------------------- reports
def write_report(out: Path, name: str, report: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """`<out>/<name>.json` and `<out>/<name>.md`, each written atomically (never half a report)."""
    json_path = atomic_write_text(out / f"{name}.json", json.dumps(report, indent=1, default=float) + "\n")
    return json_path, atomic_write_text(out / f"{name}.md", markdown)


def write_markdown(out: Path, name: str, markdown: str) -> Path:
    """Only `<out>/<name>.md` (re-rendering an earlier report's JSON)."""
    return atomic_write_text(out / f"{name}.md", markdown)


def read_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def add_common_arguments(parser: Any, name: str) -> None:
    """--threads (the policy above), --out (report folder) and --from-json (re-render the Markdown)."""
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: 1, or every core when the machine is idle)"
    )
    parser.add_argument("--out", type=Path, default=REPORTS, help=f"folder for {name}.json / {name}.md")
    parser.add_argument(
        "--from-json", type=Path, help=f"only re-render {name}.md from an earlier {name}.json (seconds)"
    )
