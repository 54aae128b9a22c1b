"""Scale, measured: `adatsq quantize` of a full-width Wan2.1-1.3B-shaped transformer under memory budgets.

    python tools/bench_scale_run.py            # writes reports/scale_run.json and reports/scale_run.md
    python tools/bench_scale_run.py --quick    # a narrow model, seconds (what the test runs)

The denoiser is diffusers' real WanTransformer3DModel at Wan2.1-1.3B's published width (dim 1536 = 12
heads × 128, ffn 8960, freq_dim 256) with 1 or 2 blocks; its text encoder, VAE and tokenizer are the
tiny offline ones (adatsq.models.diffusers.tiny), so text_dim is 32 and only the embedder that reads it
is narrower than the real model's. Each run is a fresh `adatsq quantize` process measured by the OS
(`/usr/bin/time -v`, maximum resident set size), beside what `adatsq estimate` predicts for it:

    predicted RSS = process baseline (python + torch + diffusers + the tiny pipeline's other components,
                    measured once: `adatsq inspect`-like import and load) + estimate.peak_device_bytes
                    (weights + the largest pass's accumulators + its solve) + estimate.peak_host_bytes
                    (recorded denoiser inputs + the checkpoint)

(on a CPU the device is the host, so both peaks add). Runs: unbounded (one live pass), two budgets that
split calibration into passes, the same at two depths, and `torchrun --nproc-per-node 2` with gloo. Every
checkpoint of one depth must be byte-identical. Finally the peak RSS of `adatsq.load` on the checkpoint
against the float denoiser's size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench.common import machine_info, versions, write_report  # noqa: E402

DENOISER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"  # in a (format 2) pipeline checkpoint
WIDE = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "freq_dim": 256}
NARROW = {"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 256, "freq_dim": 32}
RECIPE = """\
# GPTQ W4A16 g64, family default ignore list, 2 timestep segments (so every accumulator has 2 slots)
method: gptq
weight: {bits: 4, group_size: 64, symmetric: false}
targets: ['.*']
calibration: {samples: 2, steps: 4, batch_size: 1, seed: 0, segments: 2}
gptq: {damping: 0.01, act_order: true, block_size: 128}
"""
GEOMETRY = ["--height", "32", "--width", "32", "--frames", "5", "--text-tokens", "8"]  # the tiny sampling
BUDGET_FRACTIONS = (0.5, 0.05)  # between the smallest feasible budget (0) and the unbounded peak (1)
MiB = 2**20
ESTIMATE_KEYS = ("accumulator_bytes", "peak_device_bytes", "peak_host_bytes", "recorded_bytes")


def build_pipeline(directory: Path, blocks: int, width: dict[str, int]) -> Path:
    """The tiny offline Wan pipeline with its transformer replaced by one of `width` and `blocks` blocks."""
    import diffusers
    import torch

    from adatsq.models.diffusers.config import write_settings
    from adatsq.models.diffusers.tiny import TINY_PIPELINES

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe, sampling = TINY_PIPELINES.get("wan")()
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            in_channels=16,
            out_channels=16,
            text_dim=32,
            num_layers=blocks,
            rope_max_seq_len=32,
            qk_norm="rms_norm_across_heads",
            cross_attn_norm=True,
            **width,
        )
    pipe.register_modules(transformer=transformer)
    pipe.save_pretrained(directory, safe_serialization=True)
    write_settings(directory, sampling, torch.float32)
    return directory


def adatsq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "adatsq.cli", *args]


def measured(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `command` under /usr/bin/time -v: exit code, wall seconds, maximum RSS of the largest process."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    if run.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(command)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return {"seconds": time.perf_counter() - start, "rss_bytes": int(match[1]) * 1024, "stdout": run.stdout}


def estimate(folder: Path, recipe: Path, budget: str, env: dict[str, str]) -> dict[str, Any]:
    args = ["estimate", str(folder), "--recipe", str(recipe), "--max-memory", budget, "--dtype", "float32"]
    args += GEOMETRY
    out = subprocess.run(adatsq_command(*args, "--json"), capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def baseline(folder: Path, env: dict[str, str]) -> int:
    """RSS of a process that imports adatsq and loads the pipeline's non-denoiser components."""
    code = (
        "import sys, diffusers, adatsq.cli, adatsq.models.resolve\n"
        "from adatsq.models.diffusers.config import read_settings\n"
        f"p = diffusers.DiffusionPipeline.from_pretrained({str(folder)!r}, transformer=None)\n"
    )
    return measured([sys.executable, "-c", code], env)["rss_bytes"]


def quantize_runs(work: Path, blocks: int, width: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
    folder = build_pipeline(work / f"wan-{blocks}", blocks, width)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE)
    base = baseline(folder, env)
    unbounded = estimate(folder, recipe, "1000GiB", env)
    low, high = unbounded["smallest_budget_bytes"], unbounded["peak_device_bytes"]
    budgets = [str(int(low + f * (high - low))) for f in BUDGET_FRACTIONS]
    float_bytes = sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors"))
    runs = []
    for budget in [None, *budgets]:
        out = work / f"q-{blocks}-{budget or 'unbounded'}"
        cmd = ["quantize", str(folder), "--recipe", str(recipe), "--out", str(out)]
        cmd += [] if budget is None else ["--max-memory", budget]
        result = measured(adatsq_command(*cmd), env)
        est = estimate(folder, recipe, budget or "1000GiB", env)
        predicted = base + est["peak_device_bytes"] + est["peak_host_bytes"]
        runs.append(
            {
                "budget_bytes": None if budget is None else int(budget),
                "passes": est["passes"] if budget is not None else 1,
                "seconds": result["seconds"],
                "rss_bytes": result["rss_bytes"],
                "predicted_rss_bytes": predicted,
                "ratio": result["rss_bytes"] / predicted,
                "estimate": {
                    k: est[k] for k in ("accumulator_bytes", "peak_device_bytes", "peak_host_bytes")
                },
                "sha256": sha256(out / DENOISER_WEIGHTS),
            }
        )
    return {
        "blocks": blocks,
        "float_denoiser_bytes": float_bytes,
        "baseline_rss_bytes": base,
        "runs": runs,
        "folder": folder,
        "recipe": recipe,
        "budgets": budgets,
    }


def torchrun_run(depth: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    out = work / "q-torchrun"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = ["quantize", str(depth["folder"]), "--recipe", str(depth["recipe"]), "--out", str(out)]
    args += ["--max-memory", depth["budgets"][0], "--devices", "2"]
    env = {**env, "OMP_NUM_THREADS": "1"}
    result = measured([torchrun, "--nproc-per-node", "2", "-m", "adatsq.cli", *args], env)
    return {
        "processes": 2,
        "budget_bytes": int(depth["budgets"][0]),
        "seconds": result["seconds"],
        "rss_bytes_largest_process": result["rss_bytes"],
        "sha256": sha256(out / DENOISER_WEIGHTS),
    }


def load_run(depth: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    checkpoint = work / f"q-{depth['blocks']}-unbounded"
    code = f"import adatsq\nm = adatsq.load({str(checkpoint)!r})\n"
    result = measured([sys.executable, "-c", code], env)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    return {
        "rss_bytes": result["rss_bytes"],
        "checkpoint_bytes": size,
        "float_denoiser_bytes": depth["float_denoiser_bytes"],
        "baseline_rss_bytes": depth["baseline_rss_bytes"],
        "seconds": result["seconds"],
    }


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Scale, measured: quantize a full-width Wan2.1-1.3B-shaped transformer within a budget",
        "",
        f"Generated by `python tools/bench_scale_run.py{' --quick' if report['quick'] else ''}` in "
        f"{report['seconds']:.0f} s on {m['cpu_model']} ({m['cpus']} CPUs, load at start "
        f"{m['load_average_at_start']}, at end {report['load_average_at_end']}), torch "
        f"{report['versions']['torch']}, diffusers {report['versions']['diffusers']}, commit "
        f"{report['versions']['git_commit']}. Each row is one fresh `adatsq quantize` process; RSS is the "
        "OS's maximum resident set size (`/usr/bin/time -v`). Predicted = process baseline + `adatsq "
        "estimate`'s peak device + peak host bytes (float32, same budget): on a CPU the device is the host.",
        "",
        f"Model: WanTransformer3DModel, {json.dumps(report['width'])}, tiny text encoder / VAE. Recipe: "
        "GPTQ W4A16 g64, act-order, 2 segments, default ignore list, 2 prompts × 4 steps.",
        "",
        "| blocks | float denoiser | budget | passes | peak RSS | predicted | RSS / predicted | RSS − float "
        "| wall | denoiser safetensors sha256 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for depth in report["depths"]:
        for r in depth["runs"]:
            budget = "unbounded" if r["budget_bytes"] is None else mib(r["budget_bytes"])
            lines.append(
                f"| {depth['blocks']} | {mib(depth['float_denoiser_bytes'])} | {budget} | {r['passes']} | "
                f"{mib(r['rss_bytes'])} | {mib(r['predicted_rss_bytes'])} | {r['ratio']:.2f} | "
                f"{mib(r['rss_bytes'] - depth['float_denoiser_bytes'])} | {r['seconds']:.0f} s | "
                f"`{r['sha256'][:12]}` |"
            )
    t, ld = report["torchrun"], report["load"]
    lines += [
        "",
        "Baseline RSS (imports + the non-denoiser components): "
        + ", ".join(f"{d['blocks']} block(s) {mib(d['baseline_rss_bytes'])}" for d in report["depths"])
        + ".",
        "",
        f"**Byte identity**: every budget of a depth gives the same denoiser safetensors: "
        f"{report['identical_across_budgets']}. `torchrun --nproc-per-node 2` (gloo, budget "
        f"{mib(t['budget_bytes'])}, owner ranks): sha256 `{t['sha256'][:12]}`, identical to one process: "
        f"{report['identical_across_processes']}; largest process {mib(t['rss_bytes_largest_process'])}, "
        f"{t['seconds']:.0f} s.",
        "",
        "**Flat with depth**: under the smaller budget, RSS minus the float denoiser is "
        + " vs ".join(
            f"{mib(d['runs'][-1]['rss_bytes'] - d['float_denoiser_bytes'])} at {d['blocks']} block(s)"
            for d in report["depths"]
        )
        + ".",
        "",
        f"**adatsq.load** of the {report['depths'][0]['blocks']}-block checkpoint "
        f"({mib(ld['checkpoint_bytes'])} on disk): peak RSS {mib(ld['rss_bytes'])} = baseline "
        f"{mib(ld['baseline_rss_bytes'])} + {mib(ld['rss_bytes'] - ld['baseline_rss_bytes'])}; the float "
        f"denoiser alone is {mib(ld['float_denoiser_bytes'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--quick", action="store_true", help="narrow model (seconds), for the test")
    parser.add_argument("--depths", default="1,2", help="block counts to run (default 1,2)")
    args = parser.parse_args()
    width = NARROW if args.quick else WIDE
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    info = machine_info(2)
    with tempfile.TemporaryDirectory(prefix="adatsq-scale-") as tmp:
        work = Path(tmp)
        depths = [quantize_runs(work, int(b), width, env) for b in args.depths.split(",")]
        torchrun = torchrun_run(depths[0], work, env)
        load = load_run(depths[0], work, env)
        for d in depths:
            del d["folder"], d["recipe"], d["budgets"]
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": info,
        "versions": versions(),
        "quick": args.quick,
        "width": width,
        "seconds": time.perf_counter() - start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "depths": depths,
        "torchrun": torchrun,
        "load": load,
        "identical_across_budgets": all(len({r["sha256"] for r in d["runs"]}) == 1 for d in depths),
        "identical_across_processes": torchrun["sha256"] == depths[0]["runs"][0]["sha256"],
    }
    write_report(args.out, "scale_run", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
