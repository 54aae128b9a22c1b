"""Quantized generation + reduced understanding in one unified model (issue: composition).

For the reference UMM: float, GPTQ W4A8 and AdaTSQ W4A8 (generation path quantized), each evaluated
with full understanding tokens and with G2TR at keep 0.5 — understanding accuracy per question type and
generation quality (digit classifier accuracy, ink inside the requested quadrant) — in one run, same
held-out canvases and seeds. Writes reports/compose.json and reports/compose.md.

    python tools/bench_compose.py [--samples 256] [--generations 40]
    python tools/bench_compose.py --from-json reports/compose.json   # only re-render reports/compose.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import (
    ROOT,
    add_common_arguments,
    machine_info,
    pin_threads,
    read_report,
    versions,
    write_markdown,
    write_report,
)

import adatsq
from adatsq.checkpoint.load import load_checkpoint
from adatsq.checkpoint.shards import tensor_files
from adatsq.models.reference.classifier import load_classifier
from adatsq.models.umm.adapter import UMMGenerationAdapter
from adatsq.models.umm.data import QUADRANTS, QUESTION_TYPES, gen_prompt
from adatsq.tokens.umm.evaluate import generation_quality, qa_accuracy
from adatsq.tokens.umm.unified import UnifiedModel

RECIPES = ROOT / "recipes" / "umm"
KEEP = 0.5


def evaluate(adapter: UMMGenerationAdapter, samples: int, generations: int, classifier) -> dict:
    labels = [i % 10 for i in range(generations)]
    quads = [QUADRANTS[(i // 10 + i) % 4] for i in range(generations)]
    prompts = [gen_prompt(d, q) for d, q in zip(labels, quads, strict=True)]
    out = {}
    for name, reduction, keep in (("full", None, 1.0), ("g2tr_0.5", "g2tr", KEEP)):
        model = UnifiedModel(adapter, reduction, keep)
        out[f"qa_{name}"] = qa_accuracy(lambda im, qs, m=model: m.answer(im, qs).logits, samples=samples)
    start = time.perf_counter()
    images = UnifiedModel(adapter).generate(prompts, seed=0)
    out["generation"] = generation_quality(images, labels, quads, classifier)
    out["generation_seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--generations", type=int, default=40)
    add_common_arguments(p, "compose")
    args = p.parse_args()
    if args.from_json:
        write_markdown(args.out, "compose", markdown(read_report(args.from_json)))
        return
    threads, reason = pin_threads(args.threads)
    machine, library = machine_info(threads, reason), versions()
    classifier = load_classifier()
    rows = {"float": evaluate(UMMGenerationAdapter(), args.samples, args.generations, classifier)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gptq-w4a8", "adatsq-w4a8"):
            start = time.perf_counter()
            qmodel = adatsq.quantize("umm", RECIPES / f"{name}.yaml", progress=False)
            seconds = time.perf_counter() - start
            qmodel.save(Path(tmp) / name)
            loaded = load_checkpoint(Path(tmp) / name)[0]  # evaluate what was saved
            rows[name] = {
                **evaluate(loaded, args.samples, args.generations, classifier),
                "quantize_seconds": seconds,
                "checkpoint_bytes": sum(p.stat().st_size for p in tensor_files(Path(tmp) / name)),
                "avg_bits": qmodel.plan.metrics["avg_bits"] if qmodel.plan else 4.0,
            }
    result = {
        "machine": machine,
        "versions": library,
        "samples": args.samples,
        "generations": args.generations,
        "keep": KEEP,
        "rows": rows,
    }
    write_report(args.out, "compose", result, markdown(result))


def markdown(result: dict) -> str:
    machine = result["machine"]
    threads = machine.get("torch_threads", machine.get("threads"))  # "threads" in reports before bench.common
    lines = [
        "# Quantized generation + reduced understanding in one model",
        "",
        "The reference UMM (`umm`) has one decoder for understanding and generation. Its generation path",
        "is quantized (the decoder's Linear layers, calibrated on the flow-matching sampling loop), then the",
        "same model answers questions with all 144 understanding tokens or with G2TR keeping 50%, and",
        "generates digits (never with reduced tokens). Understanding runs the decoder variants of the last",
        f"(clean) timestep segment. {result['samples']} held-out canvases, "
        f"{result['generations']} generations, same seeds for every row. "
        f"torch {result['versions']['torch']}, {threads} thread(s).",
        "Reproduce: `python tools/bench_compose.py`.",
        "",
        f"| model | avg bits | QA full tokens | QA G2TR keep 0.5 | {' / '.join(QUESTION_TYPES)} (G2TR) "
        "| generation accuracy | ink in quadrant |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        g = row["qa_g2tr_0.5"]
        per_type = " / ".join(f"{g[k]:.3f}" for k in QUESTION_TYPES)
        gen = row["generation"]
        lines.append(
            f"| {name} | {row.get('avg_bits', 32):.2f} | {row['qa_full']['overall']:.3f} | "
            f"{g['overall']:.3f} | {per_type} | {gen['classifier_accuracy']:.3f} | "
            f"{gen['ink_in_quadrant']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
