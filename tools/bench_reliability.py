"""Reliability: the bad-input corpus per kind, determinism of `adatsq quantize`, and corruption detection.

    python tools/bench_reliability.py            # writes reports/reliability.json and reports/reliability.md
    python tools/bench_reliability.py --quick    # tiny recipes, one determinism recipe (the test's run)
    python tools/bench_reliability.py --kill     # adds the kill -9 matrix (a few minutes more)

* Corpus: every case of tests/bad_inputs/cases.py, run as the test runs it (`adatsq.cli.main` in this
  process; a fresh interpreter for the cases that need one). Per kind: total, one-line exit 2 (the
  contract: exit code 2, exactly one stderr line, no file created or changed), traceback (an exception
  escaped), accepted-wrong (exit 0 on bad input), messy (exit 2 but several lines or files changed).
* Determinism: three fresh `adatsq quantize reference --recipe R --out DIR` processes per recipe with the
  recipe's seed; the sha256 of the denoiser's safetensors (and plan.json for AdaTSQ) must be identical.
* Corruption: one bit flipped in one float16 scale of a saved checkpoint; `adatsq.load` must refuse it
  with one line naming that tensor. Cost of the sha256 verification: `load_checkpoint` with and without
  `verify`, median of interleaved repeats.
* Kill -9 (`--kill`): a quantize process killed at points through its run (calibration, solves, the final
  write); afterwards the output is absent or complete and valid, and a rerun is byte-identical to an
  uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars on stderr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bad_inputs"))

import cases  # noqa: E402

from tools.bench.common import (  # noqa: E402
    add_common_arguments,
    fmt,
    machine_info,
    machine_line,
    pin_threads,
    read_report,
    table,
    targets_table,
    versions,
    write_markdown,
    write_report,
)

NAME = "reliability"
VERDICTS = ("one-line", "traceback", "accepted-wrong", "messy")
DETERMINISM = ("rtn-w4a8.yaml", "adatsq-tiny")  # shipped recipe; the corpus's tiny AdaTSQ recipe
RUNS = 3
VERIFY_REPEATS = 7
KILL_FRACTIONS = (0.15, 0.5, 0.8)  # of an uninterrupted run's wall time


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adatsq_process(*args: Any) -> list[str]:
    return [sys.executable, "-m", "adatsq.cli", *map(str, args)]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


# ------------------------------------------------------------------------------------------- corpus
def run_corpus(work: Path, assets: cases.Assets) -> dict[str, Any]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures, seconds = [], 0.0
    for i, case in enumerate(cases.CASES):
        try:
            outcome = cases.run_case(case, work / f"case-{i}", assets)
        except cases.Skip:
            counts[case.kind]["skipped"] += 1
            continue
        seconds += outcome.seconds
        counts[case.kind][outcome.verdict] += 1
        if outcome.verdict != "one-line":
            escaped = (outcome.escaped or "").strip().splitlines()[-1:] or [""]
            failures.append(
                {
                    "case": case.id,
                    "verdict": outcome.verdict,
                    "rc": outcome.rc,
                    "stderr": outcome.stderr[-500:],
                    "escaped": escaped[0],
                    "changed": outcome.changed[:5],
                }
            )
    kinds = {
        kind: {"total": sum(c.values()), **{v: c.get(v, 0) for v in (*VERDICTS, "skipped")}}
        for kind, c in sorted(counts.items())
    }
    return {"kinds": kinds, "failures": failures, "command_seconds": seconds}


# -------------------------------------------------------------------------------------- determinism
def recipe_file(name: str, folder: Path, quick: bool) -> Path:
    """A shipped recipe (quick: its calibration cut to 4 samples × 2 steps) or the corpus's AdaTSQ one."""
    import yaml

    if name == "adatsq-tiny":
        path = folder / "adatsq-tiny.yaml"
        path.write_text(cases.edited(cases.ADATSQ, **{"planner.budget": "avg_bits=6"}))
        return path
    path = ROOT / "recipes" / "reference" / name
    if not quick:
        return path
    data = yaml.safe_load(path.read_text())
    data["calibration"] = {**data.get("calibration", {}), "samples": 4, "steps": 2, "batch_size": 4}
    quick_path = folder / f"quick-{name}"
    quick_path.write_text(yaml.safe_dump(data))
    return quick_path


def run_determinism(work: Path, names: tuple[str, ...], quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        recipe = recipe_file(name, work, quick)
        runs = []
        for i in range(RUNS):
            out = work / f"{Path(name).stem}-{i}"
            start = time.perf_counter()
            subprocess.run(
                adatsq_process("quantize", "reference", "--recipe", recipe, "--out", out),
                check=True,
                capture_output=True,
                env=environment(),
            )
            plan = out / "plan.json"
            runs.append(
                {
                    "seconds": time.perf_counter() - start,
                    "model": sha256(out / cases.WEIGHTS),
                    "plan": sha256(plan) if plan.is_file() else None,
                }
            )
        rows.append(
            {
                "recipe": name
                if quick is False or name == "adatsq-tiny"
                else f"{name} (4 samples × 2 steps)",
                "runs": runs,
                "identical": len({(r["model"], r["plan"]) for r in runs}) == 1,
            }
        )
    return rows


# --------------------------------------------------------------------------------------- corruption
def run_corruption(work: Path, assets: cases.Assets) -> dict[str, Any]:
    import adatsq
    from adatsq.checkpoint.load import load_checkpoint
    from adatsq.errors import CheckpointError

    key = f"{cases.LAYER}.w4.scales"
    broken = shutil.copytree(assets.checkpoint, work / "flipped")
    cases.flip_bit(key, 1, 6)(broken)  # bit 14 of scale [0, 0]: its exponent
    try:
        adatsq.load(broken)
        message, refused = None, False
    except CheckpointError as err:
        message, refused = str(err), True
    verified, unverified = [], []
    for _ in range(VERIFY_REPEATS):  # interleaved, so load changes hit both alike
        for verify, times in ((True, verified), (False, unverified)):
            start = time.perf_counter()
            load_checkpoint(assets.checkpoint, verify=verify)
            times.append(time.perf_counter() - start)
    size = sum(p.stat().st_size for p in assets.checkpoint.rglob("*.safetensors"))
    verify_s, no_verify_s = statistics.median(verified), statistics.median(unverified)
    return {
        "tensor": key,
        "refused": refused,
        "names_tensor": bool(message) and key in message and "\n" not in message,
        "message": message,
        "checkpoint_bytes": size,
        "load_verify_s": verify_s,
        "load_no_verify_s": no_verify_s,
        "verify_cost_s": verify_s - no_verify_s,
        "verify_ms_per_mb": (verify_s - no_verify_s) * 1e3 / (size / 1e6),
    }


# ------------------------------------------------------------------------------------------ kill -9
def run_kill(work: Path, quick: bool) -> dict[str, Any]:
    """Kill -9 at fractions of a run, then check what is on disk and that a rerun is byte-identical."""
    from adatsq.checkpoint.load import load_checkpoint

    recipe = work / "kill.yaml"
    gptq = cases.edited(cases.FAST, method="gptq") if quick else None
    longer = {"calibration.samples": 32, "calibration.steps": 8}
    recipe.write_text(gptq or cases.edited(cases.FAST, method="gptq", **longer))
    reference = work / "uninterrupted"
    start = time.perf_counter()
    subprocess.run(
        adatsq_process("quantize", "reference", "--recipe", recipe, "--out", reference),
        check=True,
        capture_output=True,
        env=environment(),
    )
    total = time.perf_counter() - start
    expected = {p.name: sha256(p) for p in sorted(reference.rglob("*.safetensors"))}
    rows = []
    points = [("fraction", f) for f in KILL_FRACTIONS] + [("final write", None)]
    for label, fraction in points:
        out = work / f"killed-{len(rows)}"
        command = adatsq_process("quantize", "reference", "--recipe", recipe, "--out", out)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        proc = subprocess.Popen(command, env=environment(), **quiet)
        seen = _wait_and_kill(proc, out, total * fraction if fraction is not None else None)
        state = _state(out, load_checkpoint)
        rerun = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, env=environment())
        identical = (
            rerun.returncode == 0
            and {p.name: sha256(p) for p in sorted(out.rglob("*.safetensors"))} == expected
        )
        leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(f".{out.name}."))
        rows.append(
            {
                "point": label if fraction is None else f"{fraction:.0%} of the run",
                "killed_at_s": seen["at"],
                "phase": seen["phase"],
                "output": state,
                "rerun_identical": identical,
                "leftovers_after_rerun": leftovers,
            }
        )
    return {"uninterrupted_s": total, "rows": rows}


def _wait_and_kill(proc: subprocess.Popen, out: Path, after: float | None) -> dict[str, Any]:
    """Kill -9 after `after` seconds, or (None) as soon as the output's temporary folder appears."""
    start = time.perf_counter()
    while proc.poll() is None:
        elapsed = time.perf_counter() - start
        partial = any(
            p.name.startswith(f".{out.name}.") and p.name.endswith(".partial") for p in out.parent.iterdir()
        )
        if (after is not None and elapsed >= after) or (after is None and partial):
            progress = (out.parent / f".{out.name}.calibration.safetensors").exists()
            phase = (
                "final write (temporary folder on disk)"
                if partial
                else "calibration done (progress file on disk)"
                if progress
                else "start-up / calibration / solves (nothing on disk yet)"
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {"at": elapsed, "phase": phase}
        time.sleep(0.005)
    return {"at": time.perf_counter() - start, "phase": "finished before the kill"}


def _state(out: Path, load) -> str:
    if not out.exists():
        return "absent"
    try:
        load(out)
    except Exception as err:  # noqa: BLE001 (what a half-written output would raise is what we look for)
        return f"INVALID: {type(err).__name__}: {str(err)[:200]}"
    return "complete, loads"


# ------------------------------------------------------------------------------------------- report
def _cell(text: str) -> str:
    return " ".join(text.split())[:160].replace("|", "/")


def render(report: dict[str, Any]) -> str:
    corpus = report["corpus"]
    total = {v: sum(k[v] for k in corpus["kinds"].values()) for v in ("total", *VERDICTS, "skipped")}
    rows = [
        [kind, c["total"], c["one-line"], c["traceback"], c["accepted-wrong"], c["messy"], c["skipped"]]
        for kind, c in corpus["kinds"].items()
    ]
    rows.append(["**all**", *(total[v] for v in ("total", *VERDICTS, "skipped"))])
    lines = [
        "# Reliability: bad inputs, determinism, corruption",
        "",
        f"Machine: {machine_line(report['machine'])}; adatsq {report['versions']['adatsq']} "
        f"({report['versions']['git_commit']}){' (quick run)' if report['quick'] else ''}.",
        "",
        "## Bad-input corpus (tests/bad_inputs/cases.py)",
        "",
        "Each case builds one bad input in a fresh folder and runs the CLI. **one-line**: exit code 2,",
        "exactly one line on stderr, no traceback, and the folder byte for byte as before (no output, no",
        "temporary, an existing output untouched).",
        "",
        *table(["kind", "cases", "one-line exit 2", "traceback", "accepted-wrong", "messy", "skipped"], rows),
        "",
        f"Commands took {corpus['command_seconds']:.1f} s in all.",
    ]
    if corpus["failures"]:
        lines += ["", "Cases that break the contract:", ""]
        lines += table(
            ["case", "verdict", "rc", "stderr / exception"],
            [
                [f["case"], f["verdict"], f["rc"], _cell(f["escaped"] or f["stderr"])]
                for f in corpus["failures"]
            ],
        )
    intro = f"{RUNS} fresh `adatsq quantize reference --recipe R` processes, one seed: sha256 of outputs."
    lines += ["", "## Determinism", "", intro, ""]
    det_rows = [
        [
            d["recipe"],
            " / ".join(f"{r['seconds']:.1f}" for r in d["runs"]),
            d["runs"][0]["model"][:16],
            (d["runs"][0]["plan"] or "–")[:16],
            d["identical"],
        ]
        for d in report["determinism"]
    ]
    lines += table(["recipe", "seconds per run", "weights sha256", "plan.json sha256", "identical"], det_rows)
    c = report["corruption"]
    lines += [
        "",
        "## Corruption",
        "",
        f"One bit (the exponent's, bit 14) of the first float16 scale of `{c['tensor']}` flipped: "
        f"refused {fmt(c['refused'])}, naming the tensor on one line {fmt(c['names_tensor'])}.",
        "",
        f"> {c['message']}",
        "",
        f"Verification cost on this {c['checkpoint_bytes'] / 1e6:.2f} MB checkpoint (median of "
        f"{VERIFY_REPEATS}): load {c['load_verify_s']:.3f} s with the sha256 check, "
        f"{c['load_no_verify_s']:.3f} s with `--no-verify` / `verify=False`: "
        f"{c['verify_cost_s'] * 1e3:.1f} ms ({c['verify_ms_per_mb']:.2f} ms per MB).",
    ]
    if report.get("kill"):
        k = report["kill"]
        intro = (
            f"An uninterrupted GPTQ run took {k['uninterrupted_s']:.1f} s; each row kills a fresh run "
            "(SIGKILL), inspects the output, then reruns with --overwrite (resuming its calibration)."
        )
        lines += ["", "## kill -9", "", intro, ""]
        header = ["kill point", "killed at (s)", "phase", "output after the kill", "rerun identical", "left"]
        lines += table(
            header,
            [
                [
                    r["point"],
                    f"{r['killed_at_s']:.1f}",
                    r["phase"],
                    r["output"],
                    r["rerun_identical"],
                    ", ".join(r["leftovers_after_rerun"]) or "none",
                ]
                for r in k["rows"]
            ],
        )
    lines += ["", "## Targets", "", *targets_table(report["targets"]), ""]
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    kinds = report["corpus"]["kinds"]
    ran = sum(k["total"] - k["skipped"] for k in kinds.values())
    good = sum(k["one-line"] for k in kinds.values())
    out = [
        {
            "target": "corpus >= 150 cases, every one a one-line exit 2",
            "measured": f"{good} of {ran}",
            "pass": ran >= 150 and good == ran,
        },
        {
            "target": "same seed → identical denoiser safetensors / plan.json in 3 processes",
            "measured": ", ".join(f"{d['recipe']}: {fmt(d['identical'])}" for d in report["determinism"]),
            "pass": all(d["identical"] for d in report["determinism"]),
        },
        {
            "target": "a flipped fp16 scale bit is refused, naming the tensor",
            "measured": fmt(report["corruption"]["names_tensor"]),
            "pass": report["corruption"]["names_tensor"],
        },
    ]
    if report.get("kill"):
        rows = report["kill"]["rows"]
        ok = [r["output"] in ("absent", "complete, loads") and r["rerun_identical"] for r in rows]
        out.append(
            {
                "target": "kill -9: no output or a complete one; rerun byte-identical",
                "measured": f"{sum(ok)} of {len(rows)}",
                "pass": all(ok),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, NAME)
    parser.add_argument("--quick", action="store_true", help="tiny recipes (seconds per quantize run)")
    parser.add_argument("--kill", action="store_true", help="add the kill -9 matrix")
    args = parser.parse_args()
    if args.from_json:
        write_markdown(args.out, NAME, render(read_report(args.from_json)))
        return
    threads, reason = pin_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        assets = cases.Assets.build(work / "assets")
        (work / "corpus").mkdir()
        (work / "determinism").mkdir()
        report: dict[str, Any] = {
            "machine": machine_info(threads, reason),
            "versions": versions(),
            "quick": args.quick,
            "corpus": run_corpus(work / "corpus", assets),
            "determinism": run_determinism(work / "determinism", DETERMINISM, args.quick),
            "corruption": run_corruption(work, assets),
        }
        if args.kill:
            (work / "kill").mkdir()
            report["kill"] = run_kill(work / "kill", args.quick)
    report["targets"] = targets(report)
    paths = write_report(args.out, NAME, report, render(report))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
