"""Which loaders and export targets take an adatsq checkpoint of each tiny diffusers family, checked for real.

    python tools/bench_ecosystem.py            # writes reports/ecosystem.json and reports/ecosystem.md
    python tools/bench_ecosystem.py --quick    # flux and dit only (tests/tools/test_bench_ecosystem.py)

Every family registered in adatsq.models.diffusers.tiny.TINY_PIPELINES is built (seeded random weights at
toy sizes), quantized with a tiny GPTQ recipe and a tiny AdaTSQ recipe (candidates 3 / 4 / 8 bits over 2
timestep segments, so rows may switch bits) and saved. Then, for each checkpoint:

- `adatsq.load` samples (4 steps, one prompt or class label, fixed noise, the checkpoint's sampling
  settings): the reference of every other loader;
- `DiffusionPipeline.from_pretrained(dir)` after `adatsq.register_with_diffusers()`, and the component
  class's own `from_pretrained(dir / "transformer")` put into the pipeline (`transformer=`): "works"
  only when the samples are torch.equal to adatsq.load's;
- transformers' `from_pretrained` applies to none of these (every denoiser is a diffusers model); it is
  checked on the reference UMM's Qwen2 language model written with `save_component`, whose logits must
  equal the in-memory quantized model's;
- `adatsq export --to T` for each target (the CLI's `main` in this process; AdaTSQ checkpoints with
  `--max`): "works" when it exits 0 and its output validates — compressed-tensors: its own dequantizer
  gives adatsq's weights bit for bit; gptqmodel: every layer resolves, by GPTQModel's `dynamic` rule, to
  the bits and group size exported (GPTQModel does not install here: its documented 7.7 schema);
  torchao / quanto: the config is applied with the library when it is importable, else the cell says
  the library is not installed here.
A cell is "works" or the one line of why not.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from bench.common import (
    add_common_arguments,
    machine_info,
    machine_line,
    pin_threads,
    read_report,
    table,
    versions,
    write_markdown,
    write_report,
)
from safetensors.torch import load_file

import adatsq
from adatsq.checkpoint.format import read_checkpoint_config
from adatsq.checkpoint.save import save_component
from adatsq.checkpoint.shards import TensorFiles
from adatsq.cli import main as cli
from adatsq.models.diffusers.config import read_settings
from adatsq.models.diffusers.tiny import TINY_FAMILIES, build_tiny_pipeline
from adatsq.quant.linear import TimestepQuantLinear
from adatsq.quant.pack import unpack
from adatsq.quant.scheme import dequantize_codes
from adatsq.recipe import recipe_from_dict

NAME = "ecosystem"
QUICK_FAMILIES = ("flux", "dit")
STEPS = 4
WEIGHT = {"bits": 4, "group_size": 16, "symmetric": False}
RECIPES = {
    "gptq": {"method": "gptq", "weight": WEIGHT, "activation": {"bits": 8},
             "calibration": {"samples": 2, "steps": STEPS, "batch_size": 2, "segments": 1}},
    "adatsq": {"method": "adatsq", "weight": WEIGHT, "activation": {"bits": 8},
               "calibration": {"samples": 2, "steps": STEPS, "batch_size": 2, "segments": 2},
               "planner": {"candidates": [3, 4, 8], "fisher_samples": 1, "measure_samples": 1,
                           "beam_width": 1}},
}  # fmt: skip
UMM_WEIGHT = {"bits": 4, "group_size": 32, "symmetric": False}  # the UMM's widths are multiples of 32
TARGETS = ("compressed-tensors", "gptqmodel", "torchao", "quanto")
LOADERS = ("diffusers DiffusionPipeline.from_pretrained", "component class from_pretrained", "adatsq.load",
           "transformers from_pretrained")  # fmt: skip
COLUMNS = (*LOADERS, *(f"adatsq export --to {t}" for t in TARGETS))


def works(detail: str = "") -> dict[str, Any]:
    return {"works": True, "detail": detail}


def unchecked(detail: str) -> dict[str, Any]:
    """The command ran, but what it wrote could not be checked here (the peer library is missing)."""
    return {"works": None, "detail": detail}


def fails(reason: str) -> dict[str, Any]:
    return {"works": False, "detail": " ".join(reason.split())}


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def checked(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn()'s cell, or the one line of the exception it raised (a cell, never a crash of the report)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (any failure of a peer library is the cell's content)
        return fails(one_line(err))


# --------------------------------------------------------------------------------------------- sampling
def sample(pipe: diffusers.DiffusionPipeline, folder: Path, seed: int = 3) -> torch.Tensor:
    """The pipeline's own __call__ with the checkpoint's sampling settings (latents; DiT: images)."""
    sampling, _ = read_settings(folder)
    kwargs = sampling.call_kwargs()
    if isinstance(pipe, diffusers.DiTPipeline):
        kwargs |= {"class_labels": [1], "output_type": "np"}
    else:
        kwargs |= {"prompt": ["a red fox"], "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def same_samples(pipe: diffusers.DiffusionPipeline, folder: Path, reference: torch.Tensor) -> dict[str, Any]:
    images = sample(pipe, folder)
    if images.shape != reference.shape:
        return fails(f"samples of shape {tuple(images.shape)}, adatsq.load's {tuple(reference.shape)}")
    if not torch.equal(images, reference):
        return fails(f"samples differ from adatsq.load's (max |Δ| {(images - reference).abs().max():.3g})")
    return works("samples torch.equal to adatsq.load's")


# --------------------------------------------------------------------------------------------- exports
def run_export(checkpoint: Path, target: str, out: Path, switching: bool) -> tuple[int, str, str]:
    """`adatsq export` through the CLI's main in this process: (exit code, stdout, stderr)."""
    args = ["export", str(checkpoint), "--to", target, "--out", str(out), *(["--max"] if switching else [])]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli(["--quiet", *args])
    return code, stdout.getvalue(), stderr.getvalue()


def adatsq_weights(checkpoint: Path, exported: Path) -> dict[str, torch.Tensor]:
    """layer -> adatsq's weight of the exported variant in float16 (the exported scales' dtype)."""
    config, layout = read_checkpoint_config(checkpoint)
    record = json.loads((exported / "adatsq_export.json").read_text())
    files = TensorFiles(layout.tensors)
    weights = {}
    for name, layer in config["layers"].items():
        bits = record["layers"][name]["bits"]
        prefix = f"{name}.w{bits}."
        codes = unpack(files.get(prefix + "qweight"), bits, layer["in_features"])
        scales, zeros = files.get(prefix + "scales"), files.get(prefix + "zeros")
        weights[name] = dequantize_codes(codes, scales, zeros, layer["group_size"], torch.float16)
    return weights


def validate_compressed_tensors(checkpoint: Path, out: Path) -> dict[str, Any]:
    if importlib.util.find_spec("compressed_tensors") is None:
        return unchecked("export exits 0; not validated: compressed-tensors not installed here")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )

    theirs = CompressedTensorsDequantizer(out, dtype=torch.float16).validate(
        load_file(out / "model.safetensors")
    )
    ours = adatsq_weights(checkpoint, out)
    differ = [name for name, weight in ours.items() if not torch.equal(theirs[f"{name}.weight"], weight)]
    if differ:
        return fails(f"{len(differ)} of {len(ours)} dequantized weights differ, e.g. {differ[0]}")
    return works(f"{len(ours)} layers dequantized by compressed-tensors bit-identical to adatsq's")


def gptqmodel_resolve(config: dict[str, Any], module: str) -> dict[str, Any] | None:
    """GPTQModel's rule: the first `dynamic` pattern that matches decides; '-:' skips, '+:' overrides."""
    for pattern, override in (config.get("dynamic") or {}).items():
        raw = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
        if re.match(raw, module):
            return None if pattern.startswith("-:") else {**config, **override}
    return config


def validate_gptqmodel(checkpoint: Path, out: Path) -> dict[str, Any]:
    config = json.loads((out / "quantize_config.json").read_text())
    record = json.loads((out / "adatsq_export.json").read_text())
    layers = json.loads((checkpoint / "transformer" / "config.json").read_text())["quantization_config"]
    for name, info in record["layers"].items():
        scheme = gptqmodel_resolve(config, name)
        group = layers["layers"][name]["group_size"] or -1
        if scheme is None or (scheme["bits"], scheme["group_size"]) != (info["bits"], group):
            return fails(f"layer {name} resolves to {scheme and (scheme['bits'], scheme['group_size'])}")
    note = "gptqmodel importable" if importlib.util.find_spec("gptqmodel") else "GPTQModel not installed here"
    return works(f"every layer resolves to its bits / group size ({note}: checked on its documented schema)")


def validate_torchao(checkpoint: Path, out: Path) -> dict[str, Any]:
    if importlib.util.find_spec("torchao") is None:
        return unchecked("export exits 0; not validated: torchao not installed here")
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    from adatsq.checkpoint.validate import open_checkpoint

    model = open_checkpoint(checkpoint).adapter.denoiser()
    quantize_(model, config_from_dict(json.loads((out / "torchao_config.json").read_text())))
    return works("config_from_dict + quantize_ applied to the float transformer")


def validate_quanto(checkpoint: Path, out: Path) -> dict[str, Any]:
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        return unchecked("export exits 0; not validated: optimum-quanto not installed here")
    from optimum import quanto

    from adatsq.checkpoint.validate import open_checkpoint

    model = open_checkpoint(checkpoint).adapter.denoiser()
    qmap = json.loads((out / "quanto_qmap.json").read_text())
    for name, spec in qmap.items():
        quanto.quantize(model, weights=getattr(quanto, spec["weights"]), include=[name])
    quanto.freeze(model)
    return works("quantize + freeze applied to the float transformer")


VALIDATORS = {"compressed-tensors": validate_compressed_tensors, "gptqmodel": validate_gptqmodel,
              "torchao": validate_torchao, "quanto": validate_quanto}  # fmt: skip


def export_cell(checkpoint: Path, target: str, work: Path, switching: bool) -> dict[str, Any]:
    out = work / f"export-{target}"
    code, _, stderr = run_export(checkpoint, target, out, switching)
    if code != 0:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("adatsq: error:")]
        return fails(f"exit {code}: {(lines or stderr.strip().splitlines() or ['no message'])[-1]}")
    return checked(lambda: VALIDATORS[target](checkpoint, out))


# ------------------------------------------------------------------------------------------ a checkpoint
def checkpoint_cells(family: str, method: str, source: Path, work: Path) -> dict[str, Any]:
    start = time.perf_counter()
    qmodel = adatsq.quantize(str(source), recipe_from_dict(RECIPES[method]), progress=False)
    seconds = time.perf_counter() - start
    directory = qmodel.save(work / "ckpt")
    layers = json.loads((directory / "transformer" / "config.json").read_text())["quantization_config"]
    switching = sum(len(set(layer["bits"])) > 1 for layer in layers["layers"].values())
    row: dict[str, Any] = {"quantize_seconds": round(seconds, 2), "layers": len(layers["layers"]),
                           "switching_layers": switching, "cells": {}}  # fmt: skip
    cells = row["cells"]
    try:
        reference = sample(adatsq.load(directory), directory)
    except Exception as err:  # noqa: BLE001
        cells["adatsq.load"] = fails(one_line(err))
        reference = None
    else:
        in_memory = sample(qmodel.adapter.user_model(), directory)
        same = torch.equal(in_memory, reference)
        cells["adatsq.load"] = works(
            "samples" + (", torch.equal to the in-memory quantized model" if same else "")
        )
    adatsq.register_with_diffusers()
    if reference is None:
        cells[LOADERS[0]] = cells[LOADERS[1]] = fails("no adatsq.load samples to compare with")
    else:
        cells[LOADERS[0]] = checked(
            lambda: same_samples(diffusers.DiffusionPipeline.from_pretrained(directory), directory, reference)
        )

        def component() -> dict[str, Any]:
            cls = type(qmodel.adapter.denoiser())
            transformer = cls.from_pretrained(directory / "transformer")
            if switching and not any(isinstance(m, TimestepQuantLinear) for m in transformer.modules()):
                return fails(f"{cls.__name__}.from_pretrained built no timestep-switching layer")
            pipe = diffusers.DiffusionPipeline.from_pretrained(directory, transformer=transformer)
            cell = same_samples(pipe, directory, reference)
            cell["detail"] = f"{cls.__name__}.from_pretrained: {cell['detail']}"
            return cell

        cells[LOADERS[1]] = checked(component)
    cells[LOADERS[3]] = fails(
        f"does not apply: the denoiser is a diffusers {type(qmodel.adapter.denoiser()).__name__}"
    )
    for target in TARGETS:
        cells[f"adatsq export --to {target}"] = checked(
            lambda t=target: export_cell(directory, t, work, switching > 0)
        )
    return row


def umm_cells(method: str, work: Path) -> dict[str, Any]:
    """transformers' from_pretrained on the reference UMM's quantized language model (save_component)."""
    recipe = {**RECIPES[method], "weight": UMM_WEIGHT}
    start = time.perf_counter()
    qmodel = adatsq.quantize("umm", recipe_from_dict(recipe), progress=False)
    row: dict[str, Any] = {"quantize_seconds": round(time.perf_counter() - start, 2), "cells": {}}
    switching = sum(len(set(spec.bits)) > 1 for spec in qmodel.layers.values())
    row["switching_layers"], row["layers"] = switching, len(qmodel.layers)

    def load() -> dict[str, Any]:
        save_component(qmodel, "model.lm", work / "lm")
        adatsq.register_with_transformers()
        model = transformers.AutoModelForCausalLM.from_pretrained(work / "lm")
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.equal(model(input_ids=ids).logits, qmodel.adapter.model.lm(input_ids=ids).logits)
        if not same:
            return fails("logits differ from the in-memory quantized language model")
        return works(
            f"{type(model).__name__} via AutoModelForCausalLM: logits torch.equal to the in-memory model"
        )

    row["cells"][LOADERS[3]] = checked(load)
    return row


# ------------------------------------------------------------------------------------------------ report
def run(families: tuple[str, ...], work: Path, with_umm: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"families": {}, "umm": {}}
    for family in families:
        source = build_tiny_pipeline(family, work / family / "source")
        index = json.loads((source / "model_index.json").read_text())
        entry = {"pipeline": index["_class_name"], "transformer": index["transformer"][1], "methods": {}}
        for method in RECIPES:
            folder = work / family / method
            folder.mkdir(parents=True, exist_ok=True)
            try:
                entry["methods"][method] = checkpoint_cells(family, method, source, folder)
            except Exception as err:  # noqa: BLE001  (quantizing itself failed: every cell says so)
                reason = fails(f"quantize failed: {one_line(err)}")
                entry["methods"][method] = {"cells": dict.fromkeys(COLUMNS, reason)}
            shutil.rmtree(folder, ignore_errors=True)
        report["families"][family] = entry
    if with_umm:
        for method in RECIPES:
            folder = work / "umm" / method
            folder.mkdir(parents=True, exist_ok=True)
            report["umm"][method] = umm_cells(method, folder)
    return report


def cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    return "works" if cell["works"] is True else cell["detail"].replace("|", "\\|")


def method_header(method: str, row: dict[str, Any]) -> str:
    if "layers" not in row:
        return method
    return (
        f"{method} ({row['layers']} layers, {row['switching_layers']} switching, {row['quantize_seconds']} s)"
    )


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Ecosystem: loaders and export targets per tiny pipeline family",
        "",
        f"Generated by `python tools/bench_ecosystem.py{' --quick' if report['quick'] else ''}` on "
        f"{machine_line(report['machine'])}; torch {report['versions']['torch']}, diffusers "
        f"{report['versions']['diffusers']}, transformers {report['versions']['transformers']}, "
        f"compressed-tensors {report['versions'].get('compressed_tensors') or 'not installed'}, torchao "
        f"{report['versions'].get('torchao') or 'not installed'}, optimum-quanto "
        f"{report['versions'].get('optimum_quanto') or 'not installed'}; adatsq "
        f"{report['versions']['adatsq']} ({report['versions']['git_commit']}). "
        f"{report['seconds']:.0f} s in all.",
        "",
        "Every family of `TINY_PIPELINES` (seeded random weights at toy sizes) quantized with a tiny GPTQ "
        "recipe (W4A8, group 16, 2 samples × 4 steps) and a tiny AdaTSQ recipe (candidates 3 / 4 / 8 bits, "
        "2 timestep segments, beam 1), saved, then loaded and exported. A loader works when its pipeline "
        "samples (4 steps, fixed noise) torch.equal to `adatsq.load`'s; an export works when `adatsq export` "
        "exits 0 and its output validates (compressed-tensors: its own dequantizer gives adatsq's weights "
        "bit for bit; gptqmodel: every layer resolves to its bits and group size under GPTQModel's "
        "`dynamic` rule; torchao / quanto: applied with the library where it is installed). AdaTSQ "
        "checkpoints export with `--max`. Otherwise the cell is the one line of why not.",
        "",
    ]
    for family, entry in report["families"].items():
        methods = entry["methods"]
        lines += [f"## {family} (`{entry['pipeline']}`, `{entry['transformer']}`)", ""]
        header = ["", *(method_header(m, methods[m]) for m in methods)]
        rows = [[col, *(cell_text(methods[m]["cells"].get(col)) for m in methods)] for col in COLUMNS]
        lines += [*table(header, rows), ""]
    if report["umm"]:
        lines += [
            "## reference UMM language model (`Qwen2ForCausalLM`, written alone with "
            '`save_component(qmodel, "model.lm", dir)`)',
            "",
        ]
        umm = report["umm"]
        header = [
            "",
            *(f"{m} ({umm[m]['layers']} layers, {umm[m]['switching_layers']} switching)" for m in umm),
        ]
        lines += [*table(header, [[LOADERS[3], *(cell_text(umm[m]["cells"][LOADERS[3]]) for m in umm)]]), ""]
    cells = [(f"{family} / {method} / {column}", cell) for family, entry in report["families"].items()
             for method, row in entry["methods"].items()
             for column, cell in row["cells"].items()]  # fmt: skip
    cells += [(f"umm / {method} / {column}", cell) for method, row in report["umm"].items()
              for column, cell in row["cells"].items()]  # fmt: skip
    broken = [
        (where, c["detail"])
        for where, c in cells
        if c["works"] is False and "does not apply" not in c["detail"]
    ]
    unknown = [(where, c["detail"]) for where, c in cells if c["works"] is None]
    lines += ["## What does not work, and why", ""]
    lines += [f"- {where}: {detail}" for where, detail in broken] or ["- nothing"]
    lines += ["", "## Ran, not checked here", ""]
    lines += [f"- {where}: {detail}" for where, detail in unknown] or ["- nothing"]
    return "\n".join(lines) + "\n"


def peer_versions() -> dict[str, Any]:
    out = versions()
    for module, key in (("compressed_tensors", "compressed_tensors"), ("torchao", "torchao"),
                        ("optimum.quanto", "optimum_quanto")):  # fmt: skip
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        out[key] = getattr(importlib.import_module(module), "__version__", "?") if spec else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, NAME)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_FAMILIES)}, no UMM")
    parser.add_argument("--families", help=f"comma-separated subset of {', '.join(TINY_FAMILIES)}")
    parser.add_argument(
        "--work", type=Path, help="folder for the pipelines and checkpoints (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        write_markdown(args.out, NAME, render(read_report(args.from_json)))
        return 0
    threads, reason = pin_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()  # the loaders' own bars: noise in a report run
    transformers.utils.logging.disable_progress_bar()
    families = (
        tuple(args.families.split(",")) if args.families else QUICK_FAMILIES if args.quick else TINY_FAMILIES
    )
    unknown = sorted(set(families) - set(TINY_FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(TINY_FAMILIES)}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ecosystem-")))
        result = run(families, work, with_umm=not args.quick)
    report = {"quick": args.quick, "machine": machine_info(threads, reason), "versions": peer_versions(),
              "recipes": RECIPES, "steps": STEPS, **result}  # fmt: skip
    report["seconds"] = time.perf_counter() - start
    paths = write_report(args.out, NAME, report, render(report))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
