"""AdaTSQ against uniform and static baselines on the reference DiT, every method in one run.

    python tools/bench_adatsq.py            # writes reports/adatsq.{json,md} and reports/adatsq_*.png

What it measures (one process, the same calibration inputs and the same evaluation seeds for all):
1. per setting W4A8, W4A4, W3A4 and method FP, RTN, SmoothQuant (RTN + smoothing 0.5), uniform GPTQ
   (segments 1), static mixed precision (one bit-width per layer for every timestep, from the same error
   table and budget: MixDQ/HAWQ style), AdaTSQ (beam + Fisher + measured trajectory error) and two
   ablations (no Fisher weights, greedy instead of beam): PSNR / SSIM against FP samples from the same
   noise, digit accuracy, FID on classifier features, avg bits, BOPs, checkpoint bytes, and the seconds
   of calibration, table, search and final solves. At A4 GPTQ / static / AdaTSQ share the outlier
   handling of recipes/reference/adatsq-w4a4.yaml (smoothing 0.5 + rotation), so the comparison
   isolates the bit allocation; RTN and SmoothQuant run plain.
2. the AdaTSQ Pareto frontier at A8 (avg_bits budgets), checked for monotonicity and dominance, with the
   static and uniform plans of the same table on the same plot;
3. the temporal Fisher weights and the W4A8 AdaTSQ plan as pictures;
4. the cost of timestep switching: the same quantized layers sampled as TimestepQuantLinear behind the
   segment hook and as plain QuantLinear (identical arithmetic), interleaved repeats, medians.

Every planner shares ONE calibration pass (per-segment XᵀX + Fisher weights) and uniform methods share
one pooled (segments 1) pass over the same inputs. Until adatsq/assets/reference_dit.json exists,
`--model auto` falls back to a random-init reference DiT and the report says so.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench.common import (
    ROOT,
    Evaluator,
    ModelSource,
    add_common_arguments,
    fmt,
    fp32_checkpoint_bytes,
    machine_info,
    pin_threads,
    read_report,
    table,
    targets_table,
    timed,
    versions,
    write_markdown,
    write_report,
)

from adatsq.calibrate.fisher import fisher_weights, plot_fisher
from adatsq.calibrate.runner import collect_stats
from adatsq.calibrate.segments import SegmentMap, attach_segment_switching
from adatsq.checkpoint.load import load_checkpoint
from adatsq.checkpoint.shards import tensor_files
from adatsq.core.modules import set_module
from adatsq.engine.calibration import Calibration, calibrate
from adatsq.engine.planner import Planner
from adatsq.engine.surgery import select_layers
from adatsq.engine.uniform import quantize as engine_quantize
from adatsq.eval.run import average_bits, compare_samples
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.plan.beam import uniform_plan
from adatsq.plan.cost import plan_costs
from adatsq.plan.frontier import build_frontier, save_frontier
from adatsq.plan.plots import plot_frontier, plot_plan
from adatsq.plan.schema import Budget, Plan
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.scheme import ActScheme
from adatsq.quant.transforms import TransformScheme
from adatsq.recipe import Recipe, load_recipe

RECIPE_A8 = ROOT / "recipes/reference/adatsq-w4a8.yaml"
RECIPE_A4 = ROOT / "recipes/reference/adatsq-w4a4.yaml"
log = logging.getLogger("bench_adatsq")


@dataclass(frozen=True)
class Setting:
    """One row group of the table: weight bits (the avg_bits budget of mixed methods) and act bits."""

    name: str
    weight_bits: int
    act_bits: int
    candidates: tuple[int, ...]  # mixed-precision choices (the shipped recipe's, plus 2 for a 3-bit budget)


SETTINGS = (
    Setting("W4A8", 4, 8, (3, 4, 6, 8)),
    Setting("W4A4", 4, 4, (3, 4, 6, 8)),
    Setting("W3A4", 3, 4, (2, 3, 4, 6, 8)),
)
UNIFORM = ("rtn", "smoothquant", "gptq")
MIXED = ("static", "adatsq", "adatsq_no_fisher", "adatsq_greedy")
METHOD_LABELS = {
    "fp": "FP (fp32)",
    "rtn": "RTN",
    "smoothquant": "SmoothQuant (RTN + smooth 0.5)",
    "gptq": "GPTQ uniform (segments 1)",
    "static": "static mixed precision (MixDQ/HAWQ-style)",
    "adatsq": "AdaTSQ (beam + Fisher + measured)",
    "adatsq_no_fisher": "AdaTSQ w/o Fisher",
    "adatsq_greedy": "AdaTSQ greedy (beam 1)",
}
FRONTIER_BUDGETS = (3.25, 3.5, 4.0, 5.0, 6.0)  # avg_bits at A8, candidates {3, 4, 6, 8}
OVERHEAD_TARGET = 0.02
RESULT_COLUMNS = [
    "method",
    "PSNR dB",
    "SSIM",
    "acc",
    "FID",
    "avg bits",
    "GBOPs/step",
    "ckpt bytes",
    "calib s",
]
RESULT_COLUMNS += ["table s", "search s (measured)", "solve s", "sample s"]


# ----------------------------------------------------------------------------------------- environment
class Clock:
    """Named wall-clock sections (what the report's time budget is spent on)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sections: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.sections[name] = self.sections.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class Knobs:
    """Benchmark-wide settings (the same for every method)."""

    samples: int
    steps: int
    seed: int
    batch_size: int
    calib_samples: int
    segments: int
    fisher_samples: int
    measure_samples: int
    beam_width: int
    frontier_budgets: tuple[float, ...]
    overhead_samples: int
    overhead_repeats: int


def base_recipe(path: Path, knobs: Knobs) -> Recipe:
    """A shipped AdaTSQ recipe with the benchmark's sampler schedule and search knobs."""
    recipe = load_recipe(path)
    cal = replace(recipe.calibration, samples=knobs.calib_samples, steps=knobs.steps, segments=knobs.segments)
    planner = replace(
        recipe.planner,
        fisher_samples=knobs.fisher_samples,
        measure_samples=knobs.measure_samples,
        beam_width=knobs.beam_width,
    )
    return replace(recipe, calibration=cal, planner=planner)


def uniform_recipe(base: Recipe, method: str, setting: Setting, outliers: TransformScheme) -> Recipe:
    """rtn / smoothquant / gptq at the setting's bits, one pooled segment, the given outlier handling."""
    transforms = {"rtn": TransformScheme(), "smoothquant": TransformScheme(smooth_alpha=0.5)}
    return replace(
        base,
        method="gptq" if method == "gptq" else "rtn",
        weight=replace(base.weight, bits=setting.weight_bits),
        activation=ActScheme(bits=setting.act_bits),
        calibration=replace(base.calibration, segments=1),
        outliers=transforms.get(method, outliers),
    )


def with_candidates(planner: Planner, candidates: Sequence[int]) -> Planner:
    """The same table and meter, searched over a subset of its bit-widths."""
    recipe = planner.recipe
    return replace(
        planner, recipe=replace(recipe, planner=replace(recipe.planner, candidates=tuple(candidates)))
    )


# -------------------------------------------------------------------------------------------- calibration
def shared_calibration(source: ModelSource, recipe: Recipe) -> tuple[Calibration, Calibration, float]:
    """(Fisher-weighted, uniform) calibrations from one statistics pass, and the Fisher estimate's seconds.

    The statistics are what `engine.calibration.calibrate` collects with planner.fisher False; the
    Fisher weights are its planner.fisher True estimate (same inputs, seed and batch size), timed on
    their own so the no-Fisher ablation is charged only for what it needs.
    """
    uniform_recipe_ = replace(recipe, planner=replace(recipe.planner, fisher=False))
    uniform = calibrate(source.adapter(), uniform_recipe_, progress=False)
    cal = recipe.calibration
    inputs = uniform.adapter.default_inputs(cal.samples, cal.seed)
    (weights, method), seconds = timed(
        lambda: fisher_weights(
            uniform.adapter,
            inputs[: recipe.planner.fisher_samples],
            cal.steps,
            seed=cal.seed,
            batch_size=cal.batch_size,
            progress=False,
        )
    )
    fisher = replace(uniform, step_weights=weights, fisher_method=method, seconds=uniform.seconds + seconds)
    return fisher, uniform, seconds


def pooled_stats(source: ModelSource, recipe: Recipe) -> tuple[dict, float]:
    """XᵀX over every step (segments 1) of the same calibration inputs: what uniform GPTQ calibrates."""
    adapter = source.adapter()
    cal = recipe.calibration
    layers = select_layers(adapter, recipe)
    segments = SegmentMap.from_schedule(adapter.step_timesteps(cal.steps), 1)
    inputs = adapter.default_inputs(cal.samples, cal.seed)
    return timed(
        lambda: collect_stats(
            adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=cal.seed, progress=False
        )
    )


def prepare_planner(calibration: Calibration, recipe: Recipe) -> Planner:
    """A planner on the shared calibration: every planner of the benchmark sees the same statistics."""
    return Planner.from_calibration(calibration, recipe, progress=False)


def quantize_plan(planner: Planner, plan: Plan, source: ModelSource) -> Any:
    """Final Fisher-weighted GPTQ solves of `plan` on a fresh float copy.

    `Planner.quantize` swaps layers of its calibration's model in place, which would leave the planner
    unable to quantize a second plan (and its meter restoring float layers); a fresh adapter avoids that.
    """
    fresh = replace(planner.calibration, adapter=source.adapter())
    return replace(planner, calibration=fresh).quantize(plan, progress=False)


# ------------------------------------------------------------------------------------------- evaluation
class CheckpointEvaluator(Evaluator):
    """Float samples once; each checkpoint is saved, loaded back and sampled from the same noise."""

    def __init__(self, source: ModelSource, knobs: Knobs, work: Path) -> None:
        super().__init__(source, knobs.samples, knobs.seed, knobs.steps, knobs.batch_size)
        self.work = work
        self.guidance_scale = self.float.sampling.guidance_scale
        self.fp_bytes = fp32_checkpoint_bytes(self.float.denoiser(), work)
        self.fp_metrics = compare_samples(self.reference, self.reference, self.inputs, self.float.family)

    def sample(self, adapter: Any, name: str) -> dict[str, Any]:
        metrics, seconds = self.compare(adapter, name)
        return {**metrics, "sample_seconds": seconds}

    def __call__(self, qmodel: Any, name: str) -> dict[str, Any]:
        directory = qmodel.save(self.work / name, overwrite=True)
        adapter, config = self.load(directory)
        return {
            **self.sample(adapter, name),
            "checkpoint_avg_bits": average_bits(config),
            "checkpoint_bytes": sum(p.stat().st_size for p in tensor_files(directory)),
            "switching_layers": sum(isinstance(m, TimestepQuantLinear) for m in adapter.denoiser().modules()),
        }


def solve_report(qmodel: Any) -> dict[str, Any]:
    infos = [i for layer in qmodel.report.get("layers", {}).values() for i in layer.values() if i]
    return {
        "solve_seconds": qmodel.report.get("quantize_seconds"),
        "damp_escalations": sum(int(i.get("damp_escalations", 0)) for i in infos),
    }


# ------------------------------------------------------------------------------------------ main table
@dataclass
class Planners:
    """The four prepared planners: (A8 | A4) × (Fisher | uniform weights)."""

    by_key: dict[tuple[int, bool], Planner]
    seconds: dict[tuple[int, bool], float]

    def get(self, act_bits: int, fisher: bool = True) -> Planner:
        return self.by_key[(act_bits, fisher)]


def build_planners(
    calibrations: dict[bool, Calibration], recipes: dict[int, Recipe], table_bits: dict[int, tuple[int, ...]]
) -> Planners:
    by_key, seconds = {}, {}
    for act_bits, recipe in recipes.items():
        for fisher, calibration in calibrations.items():
            planner_cfg = replace(recipe.planner, fisher=fisher, candidates=table_bits[act_bits])
            variant = replace(recipe, planner=planner_cfg)
            planner, secs = timed(lambda c=calibration, r=variant: prepare_planner(c, r))
            by_key[(act_bits, fisher)], seconds[(act_bits, fisher)] = planner, secs
            log.info("planner A%d fisher=%s: table + meter %.1f s", act_bits, fisher, secs)
    return Planners(by_key, seconds)


def search_entry(result: Any) -> dict[str, Any]:
    return {
        "search_seconds": result.search_seconds,
        "measure_calls": result.measure_calls,
        "plan_metrics": dict(result.metrics),
        "bits_histogram": bits_histogram(result.plan),
        "switching_rows": sum(len(set(row)) > 1 for row in result.plan.layers.values()),
    }


def bits_histogram(plan: Plan) -> dict[str, float]:
    """Share of parameter-free (layer × segment) cells at each bit-width."""
    bits = plan.bits_array().ravel().tolist()
    return {str(b): bits.count(b) / len(bits) for b in sorted(set(bits))}


def run_setting(
    setting: Setting,
    source: ModelSource,
    recipes: dict[int, Recipe],
    planners: Planners,
    pooled: tuple[dict, float],
    calib_seconds: dict[str, float],
    evaluate: CheckpointEvaluator,
    methods: Sequence[str] = UNIFORM + MIXED,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The methods of one setting; returns the rows and the search results (plans) by method."""
    recipe = recipes[setting.act_bits]
    outliers = recipe.outliers
    stats, stats_seconds = pooled
    rows, results = {}, {}
    problem = planners.get(setting.act_bits).problem
    for method in (m for m in UNIFORM if m in methods):
        r = uniform_recipe(recipe, method, setting, outliers)
        qmodel, wall = timed(
            lambda r=r: engine_quantize(
                source.adapter(),
                r,
                stats=None if r.method == "rtn" and r.outliers.smooth_alpha is None else stats,
                progress=False,
            )
        )
        bits = np.full((len(problem.layers), problem.num_segments), setting.weight_bits)
        costs = plan_costs(bits, problem.layers, setting.act_bits)
        uses_stats = r.method != "rtn" or r.outliers.smooth_alpha is not None
        row = {
            "avg_bits": costs["avg_bits"],
            "bops": costs["bops"],
            "calibration_seconds": stats_seconds if uses_stats else 0.0,
            "search_seconds": 0.0,
            "quantize_wall_seconds": wall,
            **solve_report(qmodel),
            "outliers": dataclasses.asdict(r.outliers),
        }
        row.update(evaluate(qmodel, f"{setting.name}_{method}"))
        rows[method] = row
        log.info("%s %-18s PSNR %.2f dB", setting.name, method, row["psnr_db"])

    budget = Budget("avg_bits", float(setting.weight_bits))
    searches = {
        "static": (planners.get(setting.act_bits), "static"),
        "adatsq": (planners.get(setting.act_bits), "beam"),
        "adatsq_no_fisher": (planners.by_key.get((setting.act_bits, False)), "beam"),
        "adatsq_greedy": (planners.get(setting.act_bits), "greedy"),
    }
    for method, (planner, search) in ((m, v) for m, v in searches.items() if m in methods):
        planner = with_candidates(planner, setting.candidates)
        result = planner.search(budget, search)
        qmodel, wall = timed(lambda p=planner, res=result: quantize_plan(p, res.plan, source))
        fisher = planner.recipe.planner.fisher
        row = {
            "avg_bits": result.metrics["avg_bits"],
            "bops": result.metrics["bops"],
            "plan_bytes": result.metrics["bytes"],
            "calibration_seconds": calib_seconds["fisher" if fisher else "uniform"],
            "table_seconds": planners.seconds[(setting.act_bits, fisher)],
            "quantize_wall_seconds": wall,
            **solve_report(qmodel),
            **search_entry(result),
            "candidates": list(setting.candidates),
            "outliers": dataclasses.asdict(planner.recipe.outliers),
        }
        row.update(evaluate(qmodel, f"{setting.name}_{method}"))
        if method == "adatsq":  # the model the search scored, before the final per-segment re-solves
            measured = evaluate.sample(
                as_measured(planner, result.plan, source), f"{setting.name}_as_measured"
            )
            row["as_measured"] = {k: measured[k] for k in ("psnr_db", "ssim", "accuracy", "fid")}
        rows[method], results[method] = row, result
        log.info(
            "%s %-18s PSNR %.2f dB (search %.1f s, %d measured)",
            setting.name,
            method,
            row["psnr_db"],
            result.search_seconds,
            result.measure_calls,
        )
    return rows, results


def as_measured(planner: Planner, plan: Plan, source: ModelSource) -> ReferenceAdapter:
    """`plan` wired from the planner's candidate variants (each solved on every segment's statistics),
    i.e. the model its TrajectoryMeter measured; the shipped checkpoint re-solves each (layer, bits) on
    the segments that use it (and re-calibrates smoothing on them)."""
    adapter = source.adapter()
    for name, row in plan.layers.items():
        variants = planner.meter.switching[name]
        distinct = sorted(set(row))
        module = (
            variants[row[0]]
            if len(distinct) == 1
            else TimestepQuantLinear([variants[b] for b in distinct], row)
        )
        set_module(adapter.denoiser(), name, module)
    attach_segment_switching(adapter, planner.calibration.segments)
    return adapter


def run_ceiling(
    act_bits: int,
    source: ModelSource,
    recipes: dict[int, Recipe],
    pooled: tuple[dict, float],
    evaluate: CheckpointEvaluator,
) -> dict[str, Any]:
    """Uniform GPTQ W8 with the setting's activations and outlier handling: roughly the best any 3-8 bit
    weight allocation can reach, since what is left is the activation quantization error."""
    recipe = recipes[act_bits]
    setting = Setting(f"W8A{act_bits}", 8, act_bits, (8,))
    qmodel = engine_quantize(
        source.adapter(),
        uniform_recipe(recipe, "gptq", setting, recipe.outliers),
        stats=pooled[0],
        progress=False,
    )
    row = evaluate(qmodel, f"ceiling_w8a{act_bits}")
    log.info("ceiling W8A%d (GPTQ, same outliers) PSNR %.2f dB", act_bits, row["psnr_db"])
    return row


# --------------------------------------------------------------------------------------------- frontier
def run_frontier(
    planner: Planner, budgets: Sequence[float], reuse: dict[float, Any], out: Path
) -> dict[str, Any]:
    """Beam per budget (reusing the main table's result), static per budget, uniform per bit-width."""
    beam, static = [], []
    for value in budgets:
        budget = Budget("avg_bits", float(value))
        beam.append(reuse[value] if value in reuse else planner.search(budget, "beam"))
        static.append(planner.search(budget, "static"))
        log.info("frontier %.2f: beam measured %.3g", value, beam[-1].metrics["measured_error"])
    candidates = planner.recipe.planner.candidates
    uniform = [uniform_plan(planner.problem, b, planner.meter) for b in candidates]
    frontiers = {
        "adatsq": build_frontier(beam, "avg_bits", "AdaTSQ (beam)"),
        "static": build_frontier(static, "avg_bits", "static"),
        "uniform": build_frontier(uniform, "avg_bits", "uniform"),
    }
    save_frontier(frontiers["adatsq"], out.with_suffix(".json"))
    plot_frontier(
        frontiers["adatsq"],
        out.with_suffix(".png"),
        compare={"static": frontiers["static"], "uniform": frontiers["uniform"]},
        title="W·A8 measured trajectory error vs average weight bits",
    )
    return frontier_summary(budgets, beam, static, uniform, kept=len(frontiers["adatsq"].points))


def frontier_summary(
    budgets: Sequence[float], beam: Sequence[Any], static: Sequence[Any], uniform: Sequence[Any], kept: int
) -> dict[str, Any]:
    """The frontier section of the report from the search results (one beam and one static per budget,
    one uniform per bit-width) and how many beam points the Pareto filter `kept`.

    monotone: each budget's plan costs strictly more and errs strictly less than the previous one's;
    dominated_by_baselines: a static or uniform plan that costs no more and errs strictly less;
    non_dominated: every beam point kept and none dominated.
    """
    raw = [(r.metrics["avg_bits"], r.metrics["measured_error"]) for r in beam]
    monotone = all(a[0] < b[0] and a[1] > b[1] for a, b in itertools.pairwise(raw))
    others = [
        (r.metrics["avg_bits"], r.metrics["measured_error"], n)
        for n, rs in (("static", static), ("uniform", uniform))
        for r in rs
    ]
    dominated = [
        {"budget": value, "by": name, "cost": c, "error": e}
        for value, (cost, err) in zip(budgets, raw, strict=True)
        for c, e, name in others
        if c <= cost and e < err
    ]
    return {
        "budgets": list(budgets),
        "points": [
            {
                "budget": v,
                "avg_bits": c,
                "measured_error": e,
                "proxy_error": r.metrics["proxy_error"],
                "search_seconds": r.search_seconds,
                "measure_calls": r.measure_calls,
            }
            for v, (c, e), r in zip(budgets, raw, beam, strict=True)
        ],
        "static": [
            {"avg_bits": r.metrics["avg_bits"], "measured_error": r.metrics["measured_error"]} for r in static
        ],
        "uniform": [
            {"avg_bits": r.metrics["avg_bits"], "measured_error": r.metrics["measured_error"]}
            for r in uniform
        ],
        "kept_on_frontier": kept,
        "monotone": monotone,
        "dominated_by_baselines": dominated,
        "non_dominated": kept == len(beam) and not dominated,
    }


# ------------------------------------------------------------------------------------ switching overhead
def twin_models(source: ModelSource, checkpoint: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(switching, static) models running the same QuantLinear arithmetic.

    Every layer that switches in the checkpoint's plan is given ONE of its variants (the one used in
    the most segments). The switching twin wraps it in a TimestepQuantLinear with a per-segment table
    behind the segment pre-hook, exactly as a loaded checkpoint does; the static twin calls it directly.
    """
    loaded, config = load_checkpoint(checkpoint)
    denoiser = loaded.denoiser()
    static, switching = source.adapter(), source.adapter()
    wrapped = 0
    for name in config["layers"]:
        module = denoiser.get_submodule(name)
        if isinstance(module, TimestepQuantLinear):
            row = module.segment_bits
            bits = max(sorted(set(row)), key=row.count)
            variant = module.variants[f"w{bits}"]
            set_module(
                switching.denoiser(), name, TimestepQuantLinear([copy.deepcopy(variant)], (bits,) * len(row))
            )
            wrapped += 1
        else:
            variant = module
            set_module(switching.denoiser(), name, copy.deepcopy(variant))
        assert isinstance(variant, QuantLinear)
        set_module(static.denoiser(), name, copy.deepcopy(variant))
    segments = SegmentMap(tuple(tuple(r) for r in config["segment_steps"]), tuple(config["timesteps"]))
    attach_segment_switching(switching, segments)
    return switching, static, {"wrapped_layers": wrapped, "quantized_layers": len(config["layers"])}


def sample_once(adapter: Any, inputs: list[Any], knobs: Knobs) -> tuple[float, float]:
    """(wall, process CPU) seconds of sampling `inputs` in one batch. CPU time ignores the time other
    developers' processes hold the shared cores, which wall time on this machine does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        adapter.generate(inputs, seed=knobs.seed, num_steps=knobs.steps)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_overhead(source: ModelSource, checkpoints: dict[str, Path], knobs: Knobs) -> dict[str, Any]:
    switching, static, info = twin_models(source, checkpoints["adatsq"])
    models = {
        "switching_twin": switching,
        "static_twin": static,
        "adatsq_w4a8": load_checkpoint(checkpoints["adatsq"])[0],
        "gptq_w4a8": load_checkpoint(checkpoints["gptq"])[0],
    }
    inputs = static.default_inputs(knobs.overhead_samples, knobs.seed)
    with torch.no_grad():  # identical outputs: the twins differ only in dispatch
        a = switching.generate(inputs[:2], seed=knobs.seed, num_steps=knobs.steps)
        b = static.generate(inputs[:2], seed=knobs.seed, num_steps=knobs.steps)
    times: dict[str, dict[str, list[float]]] = {
        clock: {name: [] for name in models} for clock in ("wall", "cpu")
    }
    names = list(models)
    for rep in range(knobs.overhead_repeats):
        for name in names if rep % 2 == 0 else names[::-1]:  # ABBA order: drift in machine load cancels
            wall, cpu = sample_once(models[name], inputs, knobs)
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    out: dict[str, Any] = {
        **info,
        "samples": knobs.overhead_samples,
        "repeats": knobs.overhead_repeats,
        "twins_identical_output": bool(torch.equal(a, b)),
        "seconds": times,
    }
    for clock, by_model in times.items():
        medians = {name: statistics.median(v) for name, v in by_model.items()}
        paired = [s / t for s, t in zip(by_model["switching_twin"], by_model["static_twin"], strict=True)]
        out[clock] = {
            "median_seconds": medians,
            "overhead_of_medians": medians["switching_twin"] / medians["static_twin"] - 1,
            "median_paired_overhead": statistics.median(paired) - 1,
            "adatsq_vs_gptq_w4a8": medians["adatsq_w4a8"] / medians["gptq_w4a8"],
        }
    return out


# ------------------------------------------------------------------------------------------------ report
def targets(
    table: dict[str, dict[str, dict[str, Any]]],
    frontier: dict[str, Any] | None,
    overhead: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    out = []
    for name in ("W4A8", "W4A4"):
        if name not in table or not {"adatsq", "gptq", "static"} <= set(table[name]):
            continue
        rows = table[name]
        ada, gptq, static = rows["adatsq"]["psnr_db"], rows["gptq"]["psnr_db"], rows["static"]["psnr_db"]
        out.append(
            {
                "target": f"{name}: AdaTSQ PSNR ≥ uniform GPTQ + 1 dB",
                "measured": f"{ada:.2f} dB vs {gptq:.2f} dB ({ada - gptq:+.2f} dB)",
                "pass": ada >= gptq + 1.0,
            }
        )
        out.append(
            {
                "target": f"{name}: AdaTSQ PSNR > static mixed precision",
                "measured": f"{ada:.2f} dB vs {static:.2f} dB ({ada - static:+.2f} dB)",
                "pass": ada > static,
            }
        )
    if frontier is None or overhead is None:
        return out
    raw = ", ".join(f"{p['avg_bits']:.2f}→{p['measured_error']:.3g}" for p in frontier["points"])
    out.append(
        {
            "target": f"A8 frontier ({len(frontier['points'])} budgets) monotone",
            "measured": raw,
            "pass": frontier["monotone"],
        }
    )
    out.append(
        {
            "target": "A8 frontier non-dominated (all points kept, none beaten by a static/uniform plan)",
            "measured": f"{frontier['kept_on_frontier']}/{len(frontier['points'])} kept, "
            f"{len(frontier['dominated_by_baselines'])} dominated by baselines",
            "pass": frontier["non_dominated"],
        }
    )
    value = overhead["cpu"]["overhead_of_medians"]
    out.append(
        {
            "target": "timestep-switching overhead ≤ 2% (median CPU time of sampling, identical arithmetic)",
            "measured": f"{100 * value:+.2f}% CPU (paired "
            f"{100 * overhead['cpu']['median_paired_overhead']:+.2f}%; wall "
            f"{100 * overhead['wall']['overhead_of_medians']:+.2f}%)",
            "pass": value <= OVERHEAD_TARGET,
        }
    )
    return out


def _header(report: dict[str, Any]) -> list[str]:
    m, v, k = report["machine"], report["versions"], report["knobs"]
    lines = ["# AdaTSQ benchmark (reference DiT)", ""]
    if report["model"] != "reference":
        lines += [
            f"> **WARNING: {report['model']}-init model.** The shipped reference weights were missing when",
            "> this ran; the numbers only show that the benchmark runs end to end. Re-run once",
            "> adatsq/assets/reference_dit.json exists.",
            "",
        ]
    dirty = ", library files modified in the work tree" if v["library_tree_dirty"] else ""
    candidates = "; ".join(
        f"{x['name']} {{{','.join(map(str, x['candidates']))}}}" for x in report["settings"]
    )
    lines += [
        "Every method quantizes the same float model in one process, calibrated on the same "
        f"{k['calib_samples']} class labels (seed 0, {k['steps']} Euler steps) and evaluated on the same "
        f"{k['samples']} samples from the same noise (seed {k['seed']}, {k['steps']} steps, shipped "
        f"guidance {report['guidance_scale']}). PSNR / SSIM compare each quantized sample with the FP "
        "sample of the same noise; accuracy is the shipped digit classifier's; FID is the Fréchet distance "
        "of its features to the FP samples' features.",
        "",
        f"Reproduce: `{report['command']}` (this run: {report['total_seconds'] / 60:.1f} min).",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, load average at start "
        f"{m['load_average_at_start'][0]} (shared with other developers); torch threads "
        f"**{m['torch_threads']}** ({m['threads_reason']}). Versions: torch {v['torch']}, diffusers "
        f"{v['diffusers']}, numpy {v['numpy']}, adatsq {v['adatsq']} (git {v['git_commit']}{dirty}).",
        "",
        "## Setup",
        "",
        f"- Timestep segments: {k['segments']} of {k['steps']} steps. Planner calibration = per-segment "
        f"XᵀX of {k['calib_samples']} inputs + temporal Fisher weights from {k['fisher_samples']} inputs "
        f"({report['calibration']['fisher_method']}), shared by every planner; uniform methods use one "
        "pooled pass over the same inputs (segments 1).",
        "- Weights asymmetric, group 64, GPTQ with act-order (shipped recipes); activations per token.",
        f"- Mixed methods: avg_bits budget = the setting's W bits; candidates {candidates}. Beam width "
        f"{k['beam_width']}, 6 proposals per stage, measured trajectory error on {k['measure_samples']} "
        "samples (not the evaluation samples).",
        "- A4: GPTQ / static / AdaTSQ use smoothing 0.5 + rotation (recipes/reference/adatsq-w4a4.yaml); "
        "RTN and SmoothQuant run plain.",
        "- `static` = one bit-width per layer for all timesteps, chosen on the same (Fisher-weighted) error "
        "table under the same budget, solved by the same Fisher-weighted GPTQ.",
        "",
    ]
    return lines


def _results(report: dict[str, Any]) -> list[str]:
    fp, k = report["fp"], report["knobs"]
    lines = [
        "## Results",
        "",
        f"FP: digit accuracy {fmt(fp['accuracy'], '.3f')}, sampling {fp['sample_seconds']:.1f} s for "
        f"{k['samples']} samples, fp32 checkpoint {fp['checkpoint_bytes']:,} bytes, "
        f"{fp['bops'] / 1e9:.1f} GBOPs/step (32×32).",
        "",
    ]
    for name, rows in report["table"].items():
        lines += [f"### {name}", ""]
        cells = []
        for method, r in rows.items():
            search = "–" if method in UNIFORM else f"{r['search_seconds']:.1f} ({r['measure_calls']})"
            cells.append(
                [
                    METHOD_LABELS[method],
                    f"{r['psnr_db']:.2f}",
                    f"{r['ssim']:.4f}",
                    fmt(r["accuracy"], ".3f"),
                    fmt(r["fid"], ".3f"),
                    f"{r['avg_bits']:.3f}",
                    f"{r['bops'] / 1e9:.2f}",
                    f"{r['checkpoint_bytes']:,}",
                    f"{r['calibration_seconds']:.1f}",
                    fmt(r.get("table_seconds"), ".1f"),
                    search,
                    fmt(r["solve_seconds"], ".1f"),
                    f"{r['sample_seconds']:.1f}",
                ]
            )
        lines += table(RESULT_COLUMNS, cells)
        if "as_measured" in rows.get("adatsq", {}):
            m = rows["adatsq"]["as_measured"]
            lines += [
                "",
                "The AdaTSQ plan wired from the search's own candidate variants (what its meter scored, "
                f"before the final per-segment GPTQ re-solves): PSNR {m['psnr_db']:.2f} dB, SSIM "
                f"{m['ssim']:.4f}, FID {fmt(m['fid'], '.3f')}.",
            ]
        lines.append("")
    ceilings = ", ".join(f"{name} {row['psnr_db']:.2f} dB" for name, row in report["ceilings"].items())
    lines += [
        f"Weight-allocation ceilings (uniform GPTQ W8 with the same activations and outlier handling): "
        f"{ceilings}. No 3-8 bit weight allocation is expected to do better at that activation width.",
        "",
        "Calibration seconds of the planners include the Fisher estimate "
        f"({report['calibration']['fisher_seconds']:.1f} s, not paid by the no-Fisher ablation). Table "
        "seconds = solving every layer at every candidate bit-width + the error table + the meter's float "
        "trajectory (one table per activation setting and weighting, shared by the methods that use it). "
        "Checkpoint bytes = the denoiser's safetensors (mixed plans store every distinct bit-width of a "
        "layer).",
        "",
        "## Targets",
        "",
        *targets_table(report["targets"]),
        "",
    ]
    return lines


def _frontier(report: dict[str, Any]) -> list[str]:
    f = report["frontier"]
    lines = [
        "## Pareto frontier (A8)",
        "",
        "![frontier](adatsq_frontier.png)",
        "",
        "Measured trajectory error (MSE of the final latents against FP on the planner's measure samples)",
        "of the AdaTSQ plan at each avg_bits budget, beside static plans at the same budgets and uniform",
        "plans (same candidate variants). `reports/adatsq_frontier.json` holds the AdaTSQ frontier.",
        "",
    ]
    lines += table(
        ["budget", "avg bits", "measured error", "proxy error", "search s", "measured plans"],
        [
            [f"{p['budget']:.2f}", f"{p['avg_bits']:.3f}", f"{p['measured_error']:.4g}",
             f"{p['proxy_error']:.4g}", f"{p['search_seconds']:.1f}", str(p["measure_calls"])]
            for p in f["points"]
        ],
    )  # fmt: skip
    static = ", ".join(f"{s['avg_bits']:.2f}→{s['measured_error']:.4g}" for s in f["static"])
    uniform = ", ".join(f"{s['avg_bits']:.0f}→{s['measured_error']:.4g}" for s in f["uniform"])
    weights = ", ".join(f"{w:.3f}" for w in report["calibration"]["segment_weights"])
    lines += [
        "",
        f"Static at the same budgets: {static}; uniform: {uniform}.",
        "",
        "## Temporal Fisher weights and the W4A8 plan",
        "",
        "![fisher](adatsq_fisher.png) ![plan](adatsq_plan_w4a8.png)",
        "",
        f"Segment weights: {weights} ({report['calibration']['fisher_method']} estimator).",
        "",
    ]
    return lines


def _overhead(report: dict[str, Any]) -> list[str]:
    o, k = report["overhead"], report["knobs"]
    lines = [
        "## Timestep-switching overhead",
        "",
        f"{o['wrapped_layers']} of {o['quantized_layers']} layers switch bit-width in the W4A8 AdaTSQ plan. "
        "The switching twin holds, for each of them, one of its variants inside a TimestepQuantLinear "
        "behind the segment pre-hook (as a loaded checkpoint does); the static twin calls the same "
        f"QuantLinear directly (outputs identical: {o['twins_identical_output']}). {o['repeats']} "
        f"interleaved repeats (ABBA order) of sampling {o['samples']} images × {k['steps']} steps each:",
        "",
    ]
    lines += table(
        ["model", "median CPU s", "median wall s", "CPU s of every run"],
        [
            [name, f"{o['cpu']['median_seconds'][name]:.3f}", f"{o['wall']['median_seconds'][name]:.3f}",
             ", ".join(f"{x:.2f}" for x in runs)]
            for name, runs in o["seconds"]["cpu"].items()
        ],
    )  # fmt: skip
    lines += [
        "",
        f"Overhead, ratio of medians: CPU {100 * o['cpu']['overhead_of_medians']:+.2f}%, wall "
        f"{100 * o['wall']['overhead_of_medians']:+.2f}%; median of paired ratios: CPU "
        f"{100 * o['cpu']['median_paired_overhead']:+.2f}%, wall "
        f"{100 * o['wall']['median_paired_overhead']:+.2f}%."
        " CPU time (process_time) is the primary measure: wall time on this shared machine also counts the "
        "time other processes hold the cores. For information, the real AdaTSQ W4A8 checkpoint samples in "
        f"{o['cpu']['adatsq_vs_gptq_w4a8']:.3f}× the CPU time of the uniform GPTQ W4A8 one (fake-quant: "
        "weights are dequantized on every call, so neither is faster than FP here).",
        "",
    ]
    return lines


def _timing(report: dict[str, Any]) -> list[str]:
    return [
        "## Where the time went",
        "",
        *table(
            ["section", "seconds"], [[name, f"{secs:.1f}"] for name, secs in report["time_sections"].items()]
        ),
    ]


def markdown(report: dict[str, Any]) -> str:
    sections = [_header, _results]
    sections += [_frontier] if report["frontier"] is not None else []
    sections += [_overhead] if report["overhead"] is not None else []
    sections.append(_timing)
    return "\n".join(line for part in sections for line in part(report)) + "\n"


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("auto", "reference", "random", "tiny"), default="auto")
    p.add_argument("--samples", type=int, default=200, help="evaluation samples")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (calibration and evaluation)")
    p.add_argument("--seed", type=int, default=1234, help="evaluation seed (batch i from seed + i)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--measure-samples", type=int, default=8, help="planner trajectory samples")
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--frontier-budgets", default=",".join(map(str, FRONTIER_BUDGETS)))
    p.add_argument("--overhead-samples", type=int, default=16)
    p.add_argument("--overhead-repeats", type=int, default=7)
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/adatsq_bench"), help="checkpoints (deleted at the end)"
    )
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--settings", default=",".join(x.name for x in SETTINGS), help="subset, e.g. W4A4")
    p.add_argument("--methods", default=",".join(UNIFORM + MIXED), help="subset, e.g. gptq,static,adatsq")
    p.add_argument("--w4-candidates", default="3,4,6,8", help="mixed-precision choices at the 4-bit budget")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="skip frontier, plots and overhead (trials of search settings)",
    )
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on a 1-block random DiT")
    add_common_arguments(p, "adatsq")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
        for key, value in {
            "samples": 8,
            "steps": 4,
            "batch_size": 8,
            "calib_samples": 4,
            "segments": 2,
            "fisher_samples": 2,
            "measure_samples": 2,
            "beam_width": 2,
            "overhead_samples": 2,
            "overhead_repeats": 2,
        }.items():
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.from_json:
        report = read_report(args.from_json)
        write_markdown(args.out, "adatsq", markdown(report))
        return report
    threads, reason = pin_threads(args.threads)
    knobs = Knobs(
        args.samples,
        args.steps,
        args.seed,
        args.batch_size,
        args.calib_samples,
        args.segments,
        args.fisher_samples,
        args.measure_samples,
        args.beam_width,
        tuple(float(b) for b in args.frontier_budgets.split(",")),
        args.overhead_samples,
        args.overhead_repeats,
    )
    clock = Clock()
    machine, library = machine_info(threads, reason), versions()  # at start: the library may change meanwhile
    source = ModelSource(args.model)
    log.info("model %s, %d thread(s) (%s)", source.kind, threads, reason)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    w4 = tuple(int(b) for b in args.w4_candidates.split(","))
    chosen = args.settings.split(",")
    settings = [replace(x, candidates=w4) if x.weight_bits == 4 else x for x in SETTINGS if x.name in chosen]
    acts = sorted({x.act_bits for x in settings}, reverse=True)
    methods = tuple(args.methods.split(","))
    recipes = {a: base_recipe(RECIPE_A8 if a == 8 else RECIPE_A4, knobs) for a in acts}

    evaluate, secs = timed(lambda: CheckpointEvaluator(source, knobs, args.work))
    clock.add("float samples", secs)
    (fisher_cal, uniform_cal, fisher_secs), secs = timed(lambda: shared_calibration(source, recipes[acts[0]]))
    clock.add("planner calibration (segments + Fisher)", secs)
    pooled = pooled_stats(source, recipes[acts[0]])
    clock.add("uniform calibration (segments 1)", pooled[1])
    table_bits = {
        a: tuple(sorted({b for x in settings if x.act_bits == a for b in x.candidates})) for a in acts
    }
    calibrations = (
        {True: fisher_cal, False: uniform_cal} if "adatsq_no_fisher" in methods else {True: fisher_cal}
    )
    planners, secs = timed(lambda: build_planners(calibrations, recipes, table_bits))
    clock.add("candidate solves + error tables", secs)
    calib_seconds = {"fisher": fisher_cal.seconds, "uniform": uniform_cal.seconds}

    tables, results = {}, {}
    for setting in settings:
        (rows, res), secs = timed(
            lambda s=setting: run_setting(
                s, source, recipes, planners, pooled, calib_seconds, evaluate, methods
            )
        )
        tables[setting.name], results[setting.name] = rows, res
        clock.add(f"{setting.name}: quantize + search + evaluate", secs)
        (args.work / "partial.json").write_text(json.dumps(tables, indent=1, default=float))
    ceilings, secs = timed(
        lambda: {f"W8A{a}": run_ceiling(a, source, recipes, pooled, evaluate) for a in acts}
    )
    clock.add("W8 ceilings", secs)

    frontier = overhead = None
    if not args.table_only and {"adatsq", "gptq"} <= set(tables.get("W4A8", {})):  # they build on W4A8
        w4a8 = next(x for x in settings if x.name == "W4A8")
        frontier_planner = with_candidates(planners.get(8), w4a8.candidates)
        reuse = {float(w4a8.weight_bits): results["W4A8"]["adatsq"]}
        frontier, secs = timed(
            lambda: run_frontier(
                frontier_planner, knobs.frontier_budgets, reuse, args.out / "adatsq_frontier"
            )
        )
        clock.add("frontier (A8)", secs)
        plot_fisher(
            fisher_cal.step_weights,
            fisher_cal.segments.timesteps,
            args.out / "adatsq_fisher.png",
            title=f"Temporal Fisher weights ({fisher_cal.fisher_method}, {knobs.fisher_samples} inputs)",
        )
        plot_plan(results["W4A8"]["adatsq"].plan, args.out / "adatsq_plan_w4a8.png")
        checkpoints = {m: args.work / f"W4A8_{m}" for m in ("adatsq", "gptq")}
        overhead, secs = timed(lambda: run_overhead(source, checkpoints, knobs))
        clock.add("switching overhead", secs)

    layers = planners.get(acts[0]).problem.layers
    fp = {
        **evaluate.fp_metrics,
        "avg_bits": 32.0,
        "bops": plan_costs(np.full((len(layers), 1), 8), layers, 8)["bops"] * 16,  # macs·32·32 = macs·8·8·16
        "checkpoint_bytes": evaluate.fp_bytes,
        "sample_seconds": evaluate.fp_seconds,
    }
    report = {
        "model": source.kind,
        "machine": machine,
        "versions": library,
        "command": " ".join(["python tools/bench_adatsq.py", *(argv if argv is not None else sys.argv[1:])]),
        "knobs": dataclasses.asdict(knobs),
        "guidance_scale": evaluate.guidance_scale,
        "settings": [dataclasses.asdict(x) for x in settings],
        "calibration": {
            "fisher_method": fisher_cal.fisher_method,
            "step_weights": fisher_cal.step_weights.tolist(),
            "segment_weights": fisher_cal.weights.tolist(),
            "segment_steps": [list(r) for r in fisher_cal.segments.step_ranges],
            "planner_seconds": fisher_cal.seconds,
            "fisher_seconds": fisher_secs,
            "pooled_seconds": pooled[1],
            "table_seconds": {f"A{a}_fisher_{f}": s for (a, f), s in planners.seconds.items()},
        },
        "fp": fp,
        "table": tables,
        "ceilings": ceilings,
        "plans": {s: {m: r.plan.to_dict() for m, r in res.items()} for s, res in results.items()},
        "frontier": frontier,
        "overhead": overhead,
    }
    report["targets"] = targets(tables, frontier, overhead)
    report["time_sections"] = clock.sections
    report["total_seconds"] = clock.total()
    write_report(args.out, "adatsq", report, markdown(report))
    if not args.keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    for t in report["targets"]:
        log.info("%s %s: %s", "PASS" if t["pass"] else "FAIL", t["target"], t["measured"])
    log.info("total %.1f min", report["total_seconds"] / 60)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
