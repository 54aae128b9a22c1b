"""Scale, measured: `adatsq quantize` of a full-width Wan2.1-1.3B-shaped transformer under memory budgets.

    python tools/bench_scale_run.py            # writes reports/scale_run.json and reports/scale_run.md
    python tools/bench_scale_run.py --quick    # a narrow model, about a minute a run (what the test runs)

The denoiser is diffusers' real WanTransformer3DModel at Wan2.1-1.3B's published width (dim 1536 = 12
heads × 128, ffn 8960, freq_dim 256) with 1 or 2 blocks; its text encoder, VAE and tokenizer are the
tiny offline ones (adatsq.models.diffusers.tiny), so text_dim is 32 and only the embedder that reads it
is narrower than the real model's. Two methods, the same calibration (2 prompts × 4 steps, 2 segments):
GPTQ W4A16 and AdaTSQ (candidates 4 / 8 bits under avg_bits=6, a small beam). Each run is a fresh
`adatsq quantize` process measured by the OS (`/usr/bin/time -v`, maximum resident set size), beside
what `adatsq estimate` predicts for it:

    predicted RSS = process baseline (python + torch + diffusers + the tiny pipeline's other components,
                    measured once: `adatsq inspect`-like import and load) + estimate.peak_device_bytes
                    (weights + the largest pass's accumulators + its solve) + estimate.peak_host_bytes
                    (recorded denoiser inputs + the checkpoint, at most every layer's min(G, |candidates|)
                    largest variants for AdaTSQ, + AdaTSQ's candidates_bytes: every layer at every
                    candidate bit-width, packed, held from the error table to the final solves)

(on a CPU the device is the host, so both peaks add). Runs per method: unbounded (one live pass), two
budgets that split calibration into passes (`--budgets 1`: one), the same at two depths, and `torchrun
--nproc-per-node 2` with gloo (predicted with `estimate --devices 2`). Every checkpoint of one method
and depth must be byte-identical (the denoiser safetensors, and AdaTSQ's plan.json). Finally the peak RSS of
`adatsq.load` on the checkpoint against the float denoiser's size, with and without the kernel layouts it
derives at load (cached dequantized weights of A16 layers: reports/kernels.md). The report is
rewritten after every depth, so a run cut short leaves the rows it measured; `--merge A.json B.json`
combines reports of methods run side by side.
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

from tools.bench.common import fmt, machine_info, versions, write_report  # noqa: E402

WIDE = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "freq_dim": 256}
NARROW = {"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 256, "freq_dim": 32}
RECIPES = {
    "gptq": """\
# GPTQ W4A16 g64, family default ignore list, 2 timestep segments (so every accumulator has 2 slots)
method: gptq
weight: {bits: 4, group_size: 64, symmetric: false}
targets: ['.*']
calibration: {samples: 2, steps: 4, batch_size: 1, seed: 0, segments: 2}
gptq: {damping: 0.01, act_order: true, block_size: 128}
""",
    "adatsq": """\
# AdaTSQ W{4,8}A16 g64 under avg_bits=6, the same calibration; a small beam (2 x 2 proposals) and one
# Fisher / one measured sample, so the run stays minutes on two cores
method: adatsq
weight: {bits: 4, group_size: 64, symmetric: false}
targets: ['.*']
calibration: {samples: 2, steps: 4, batch_size: 1, seed: 0, segments: 2}
gptq: {damping: 0.01, act_order: true, block_size: 128}
planner:
  candidates: [4, 8]
  budget: avg_bits=6
  search: beam
  beam_width: 2
  proposals_per_stage: 2
  fisher: true
  fisher_samples: 1
  measure: true
  measure_samples: 1
""",
}
RECIPE_LINES = {
    "gptq": "GPTQ W4A16 g64, act-order",
    "adatsq": "AdaTSQ candidates {4, 8} under avg_bits=6, beam 2 × 2 proposals, 1 Fisher / 1 measured sample",
}
GEOMETRY = ["--height", "32", "--width", "32", "--frames", "5", "--text-tokens", "8"]  # the tiny sampling
BUDGET_FRACTIONS = (0.5, 0.05)  # between the smallest feasible budget (0) and the unbounded peak (1)
MiB = 2**20
DENOISER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"  # in a (format 2) pipeline checkpoint
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


def estimate(
    folder: Path, recipe: Path, budget: str, env: dict[str, str], devices: int = 1
) -> dict[str, Any]:
    args = ["estimate", str(folder), "--recipe", str(recipe), "--max-memory", budget, "--dtype", "float32"]
    args += [*GEOMETRY, "--devices", str(devices)]
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


def predicted_rss(base: int, est: dict[str, Any]) -> int:
    """The module docstring's prediction: baseline + the estimate's device peak + its host peak."""
    return base + est["peak_device_bytes"] + est["peak_host_bytes"]


def checkpoint_hashes(out: Path) -> dict[str, str]:
    """sha256 of the denoiser's safetensors and, for AdaTSQ, of the plan it was quantized with."""
    files = (out / DENOISER_WEIGHTS, out / "plan.json")
    return {f.name: sha256(f) for f in files if f.is_file()}


def prepare_depth(work: Path, blocks: int, width: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
    """The pipeline folder of one depth, its float denoiser's size and the process baseline."""
    folder = build_pipeline(work / f"wan-{blocks}", blocks, width)
    return {
        "blocks": blocks,
        "folder": folder,
        "float_denoiser_bytes": sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors")),
        "baseline_rss_bytes": baseline(folder, env),
    }


def quantize_runs(
    work: Path, method: str, depth: dict[str, Any], env: dict[str, str], budgets: int = 2
) -> dict[str, Any]:
    """Unbounded and `budgets` budgets of one method at one depth, each a measured `adatsq quantize`."""
    blocks, folder, base = depth["blocks"], depth["folder"], depth["baseline_rss_bytes"]
    recipe = work / f"{method}.yaml"
    recipe.write_text(RECIPES[method])
    unbounded = estimate(folder, recipe, "1000GiB", env)
    low, high = unbounded["smallest_budget_bytes"], unbounded["peak_device_bytes"]
    budgets = [str(int(low + f * (high - low))) for f in BUDGET_FRACTIONS[:budgets]]
    runs = []
    for budget in [None, *budgets]:
        out = work / f"q-{method}-{blocks}-{budget or 'unbounded'}"
        cmd = ["quantize", str(folder), "--recipe", str(recipe), "--out", str(out)]
        cmd += [] if budget is None else ["--max-memory", budget]
        result = measured(adatsq_command(*cmd), env)
        est = estimate(folder, recipe, budget or "1000GiB", env)
        predicted = predicted_rss(base, est)
        runs.append(
            {
                "budget_bytes": None if budget is None else int(budget),
                "passes": est["passes"] if budget is not None else 1,
                "seconds": result["seconds"],
                "rss_bytes": result["rss_bytes"],
                "predicted_rss_bytes": predicted,
                "ratio": result["rss_bytes"] / predicted,
                "estimate": {k: est[k] for k in ESTIMATE_KEYS},
                "sha256": checkpoint_hashes(out),
            }
        )
    first = runs[0]["sha256"]
    for r in runs:
        r["identical"] = r["sha256"] == first
    return {
        "method": method,
        "blocks": blocks,
        "float_denoiser_bytes": depth["float_denoiser_bytes"],
        "baseline_rss_bytes": base,
        "runs": runs,
        "identical_across_budgets": all(r["identical"] for r in runs),
        "recipe": recipe,
        "budgets": budgets,
    }


def torchrun_run(
    method_depth: dict[str, Any], depth: dict[str, Any], work: Path, env: dict[str, str]
) -> dict[str, Any]:
    """`torchrun --nproc-per-node 2` (gloo) under the larger budget: largest process, checkpoint hash."""
    out = work / f"q-{method_depth['method']}-torchrun"
    recipe, budget = method_depth["recipe"], method_depth["budgets"][0]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = ["quantize", str(depth["folder"]), "--recipe", str(recipe), "--out", str(out)]
    args += ["--max-memory", budget, "--devices", "2"]
    # each process keeps the single-process run's threads: torch splits large reductions by thread count,
    # so AdaTSQ's reported errors (plan.json) would differ in their last bits under another count
    result = measured([torchrun, "--nproc-per-node", "2", "-m", "adatsq.cli", *args], env)
    est = estimate(depth["folder"], recipe, budget, env, devices=2)
    predicted = predicted_rss(depth["baseline_rss_bytes"], est)
    hashes = checkpoint_hashes(out)
    return {
        "processes": 2,
        "blocks": depth["blocks"],
        "budget_bytes": int(budget),
        "passes": est["passes"],
        "seconds": result["seconds"],
        "rss_bytes_largest_process": result["rss_bytes"],
        "predicted_rss_bytes": predicted,
        "ratio": result["rss_bytes"] / predicted,
        "estimate": {k: est[k] for k in ESTIMATE_KEYS},
        "sha256": hashes,
        "identical": hashes == method_depth["runs"][0]["sha256"],
    }


def load_run(method: str, depth: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Peak RSS of `adatsq.load` on the unbounded checkpoint of `depth`, beside the float denoiser."""
    checkpoint = work / f"q-{method}-{depth['blocks']}-unbounded"
    code = f"import adatsq\nm = adatsq.load({str(checkpoint)!r})\n"
    result = measured([sys.executable, "-c", code], env)
    tensors_only = "from adatsq.checkpoint.load import load_checkpoint\n"
    tensors_only += f"load_checkpoint({str(checkpoint)!r})\n"  # the same, before any kernel layout
    tensors = measured([sys.executable, "-c", tensors_only], env)
    size = sum(f.stat().st_size for f in checkpoint.rglob("*.safetensors"))
    return {
        "blocks": depth["blocks"],
        "rss_bytes": result["rss_bytes"],
        "tensors_rss_bytes": tensors["rss_bytes"],
        "checkpoint_bytes": size,
        "float_denoiser_bytes": depth["float_denoiser_bytes"],
        "baseline_rss_bytes": depth["baseline_rss_bytes"],
        "seconds": result["seconds"],
    }


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def short(hashes: dict[str, str]) -> str:
    return "`" + hashes[Path(DENOISER_WEIGHTS).name][:12] + "`"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Scale, measured: quantize a full-width Wan2.1-1.3B-shaped transformer within a budget",
        "",
        f"Generated by `python tools/bench_scale_run.py{' --quick' if report['quick'] else ''}` in "
        f"{report['seconds']:.0f} s on {m['cpu_model']} ({m['cpus']} CPUs, load at start "
        f"{m['load_average_at_start']}, at end {report['load_average_at_end']}), torch "
        f"{report['versions']['torch']}, diffusers {report['versions']['diffusers']}, commit "
        f"{report['versions']['git_commit']}"
        f"{' (adatsq/ with uncommitted edits)' if report['versions']['library_tree_dirty'] else ''}. "
        "Each row is one fresh `adatsq quantize` process; RSS is the OS's maximum resident set size "
        "(`/usr/bin/time -v`; for torchrun the largest process). Predicted = process baseline + `adatsq "
        "estimate`'s peak device + peak host bytes (float32, same budget and process count; peak host "
        "includes AdaTSQ's packed candidates): on a CPU the device is the host. Identical = "
        "the denoiser safetensors (and AdaTSQ's plan.json) byte-identical to the unbounded one-process "
        "run of the same method and depth.",
        "",
        f"Model: WanTransformer3DModel, {json.dumps(report['width'])}, tiny text encoder / VAE; float "
        "denoiser "
        + ", ".join(f"{mib(d['float_denoiser_bytes'])} at {d['blocks']} block(s)" for d in report["depths"])
        + "; baseline RSS (imports + the non-denoiser components) "
        + ", ".join(f"{mib(d['baseline_rss_bytes'])} at {d['blocks']} block(s)" for d in report["depths"])
        + ". Calibration: 2 prompts × 4 steps, batch 1, 2 timestep segments, default ignore list. Recipes: "
        + "; ".join(f"{k}: {RECIPE_LINES[k]}" for k in report["methods"])
        + ".",
        "",
        "| method | blocks | budget | passes | measured RSS | predicted | ratio | seconds | "
        "weights sha256 | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, res in report["methods"].items():
        for depth in res["depths"]:
            for r in depth["runs"]:
                budget = "unbounded" if r["budget_bytes"] is None else mib(r["budget_bytes"])
                lines.append(
                    f"| {method} | {depth['blocks']} | {budget} | {r['passes']} | {mib(r['rss_bytes'])} | "
                    f"{mib(r['predicted_rss_bytes'])} | {r['ratio']:.2f} | {r['seconds']:.0f} | "
                    f"{short(r['sha256'])} | {fmt(r['identical'])} |"
                )
        t = res.get("torchrun")
        if t is None:
            continue
        lines.append(
            f"| {method} | {t['blocks']} | {mib(t['budget_bytes'])}, torchrun × 2 (gloo) | {t['passes']} | "
            f"{mib(t['rss_bytes_largest_process'])} | {mib(t['predicted_rss_bytes'])} | {t['ratio']:.2f} | "
            f"{t['seconds']:.0f} | {short(t['sha256'])} | {fmt(t['identical'])} |"
        )
    ratios = [r["ratio"] for res in report["methods"].values() for d in res["depths"] for r in d["runs"]]
    ratios += [res["torchrun"]["ratio"] for res in report["methods"].values() if res.get("torchrun")]
    loads = [(k, v["load"]) for k, v in report["methods"].items() if v.get("load") is not None]
    lines += [
        "",
        f"**Prediction**: RSS / predicted from {min(ratios):.2f} to {max(ratios):.2f} "
        f"(within 25%: {fmt(all(0.75 <= x <= 1.25 for x in ratios))}).",
        "",
        "**Byte identity**: "
        + "; ".join(
            f"{method}: across budgets {fmt(res['identical_across_budgets'])}, 1 vs 2 gloo processes "
            f"{fmt(res.get('identical_across_processes'))}"
            for method, res in report["methods"].items()
        )
        + ".",
        "",
        "**Flat with depth** (RSS − float denoiser under the smaller budget): "
        + "; ".join(
            f"{method}: "
            + " vs ".join(
                f"{mib(d['runs'][-1]['rss_bytes'] - d['float_denoiser_bytes'])} at {d['blocks']} block(s)"
                for d in res["depths"]
            )
            for method, res in report["methods"].items()
        )
        + ".",
        "",
        "**adatsq.load** of the unbounded checkpoint: "
        + ("not measured (the run was cut short)" if not loads else "")
        + "; ".join(
            f"{method} ({ld['blocks']} block(s), {mib(ld['checkpoint_bytes'])} on disk): peak RSS "
            f"{mib(ld['rss_bytes'])} = baseline {mib(ld['baseline_rss_bytes'])} + "
            f"{mib(ld['rss_bytes'] - ld['baseline_rss_bytes'])}, float denoiser "
            f"{mib(ld['float_denoiser_bytes'])}"
            + (
                ""
                if "tensors_rss_bytes" not in ld
                else f" (the checkpoint's tensors alone, before the float32 kernel layouts adatsq.load "
                f"derives for speed: baseline + {mib(ld['tensors_rss_bytes'] - ld['baseline_rss_bytes'])})"
            )
            for method, ld in loads
        )
        + ".",
        "",
    ]
    for note in report.get("notes", []):
        lines += [note, ""]
    return "\n".join(lines)


def assemble(
    info: dict[str, Any], quick: bool, width: dict[str, int], seconds: float, depths: list, results: dict,
    notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The report of the runs done so far (written after each depth, so a cut-short run leaves one)."""
    return {
        "machine": info,
        "versions": versions(),
        "quick": quick,
        "width": width,
        "recipes": {m: RECIPES[m] for m in results},
        "seconds": seconds,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "depths": [{k: v for k, v in d.items() if k != "folder"} for d in depths],
        "methods": {
            m: {
                **r,
                "depths": [
                    {k: v for k, v in d.items() if k not in ("recipe", "budgets")} for d in r["depths"]
                ],
            }
            for m, r in results.items()
        },
        "identical_across_budgets": all(r["identical_across_budgets"] for r in results.values()),
        "identical_across_processes": across_processes(results),
        "notes": notes,
    }


def across_processes(results: dict[str, Any]) -> bool | None:
    """1 vs 2 processes identical for every method; None while a method has no torchrun run."""
    values = [r.get("identical_across_processes") for r in results.values()]
    return None if None in values else all(values)


def merged(paths: list[Path], notes: list[str]) -> dict[str, Any]:
    """One report from several (e.g. one process per method run side by side): methods side by side."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(reports[0])
    out["methods"] = {k: v for r in reports for k, v in r["methods"].items()}
    out["recipes"] = {k: v for r in reports for k, v in r["recipes"].items()}
    depths = {d["blocks"]: d for r in reports for d in r["depths"]}
    out["depths"] = [depths[b] for b in sorted(depths)]
    out["seconds"] = max(r["seconds"] for r in reports)
    out["load_average_at_end"] = reports[-1]["load_average_at_end"]
    out["identical_across_budgets"] = all(r["identical_across_budgets"] for r in out["methods"].values())
    out["identical_across_processes"] = across_processes(out["methods"])
    out["notes"] = notes or [n for r in reports for n in r.get("notes", [])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--quick", action="store_true", help="narrow model (seconds), for the test")
    parser.add_argument("--depths", default="1,2", help="block counts to run (default 1,2)")
    parser.add_argument("--methods", default="gptq,adatsq", help="recipes to run (default gptq,adatsq)")
    parser.add_argument("--budgets", type=int, default=2, help="budgets per depth (1 or 2, default 2)")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the 2-process run")
    parser.add_argument("--note", action="append", default=[], help="a paragraph added to the report")
    parser.add_argument("--merge", type=Path, nargs="+", help="only combine earlier scale_run.json files")
    args = parser.parse_args()
    if args.merge:
        report = merged(args.merge, args.note)
        write_report(args.out, "scale_run", report, markdown(report))
        print(markdown(report))
        return
    width = NARROW if args.quick else WIDE
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(RECIPES)}")
    if args.budgets not in (1, 2):
        parser.error("--budgets must be 1 or 2")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    info = machine_info(2)
    results: dict[str, Any] = {}

    def save() -> dict[str, Any]:
        report = assemble(info, args.quick, width, time.perf_counter() - start, depths, results, args.note)
        write_report(args.out, "scale_run", report, markdown(report))
        return report

    with tempfile.TemporaryDirectory(prefix="adatsq-scale-") as tmp:
        work = Path(tmp)
        depths = [prepare_depth(work, int(b), width, env) for b in args.depths.split(",")]
        for method in methods:
            results[method] = result = {"depths": [], "identical_across_budgets": True}
            for d in depths:
                runs = quantize_runs(work, method, d, env, args.budgets)
                result["depths"].append(runs)
                result["identical_across_budgets"] = all(
                    r["identical_across_budgets"] for r in result["depths"]
                )
                save()
            first = result["depths"][0]
            if not args.no_torchrun:
                result["torchrun"] = torchrun_run(first, depths[0], work, env)
                result["identical_across_processes"] = result["torchrun"]["identical"]
            result["load"] = load_run(method, depths[0], work, env)
            save()
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(save()))


if __name__ == "__main__":
    main()
