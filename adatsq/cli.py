"""`adatsq` command line: quantize | plan | eval | inspect | upgrade | export | estimate | tokens | env.

User errors (AdatsqError) and bad arguments print one line on stderr and exit with code 2 (`--verbose`:
the traceback of the error and of the library error it wraps, before the line); nothing else is caught.
`--quiet` draws no progress bar and logs warnings only; bars are also off when stderr is not a terminal
or TQDM_DISABLE is set. Other libraries' log records and Python warnings show with `--verbose` only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from adatsq.core.registry import Registry
from adatsq.errors import AdatsqError

log = logging.getLogger("adatsq")

# Subcommand builders: each adds its parser (named as registered) and sets `handler`.
COMMANDS: Registry[Callable[[argparse._SubParsersAction], None]] = Registry("command")


SEED_LIMIT = 2**63  # torch seeds are signed 64-bit
GEOMETRY_LIMIT = 2**16  # pixels / frames / tokens per call beyond this are typos, not sampling settings


class OneLineParser(argparse.ArgumentParser):
    """argparse, with bad arguments reported like every other user error: one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"adatsq: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int in [low, high)."""

    def parse(text: str) -> int:
        digits = text.strip().lstrip("+-")
        if digits.isascii() and digits.isdigit() and len(digits) > 24:  # int() refuses > 4300 digits
            raise argparse.ArgumentTypeError(
                f"{text[:20]}... ({len(digits)} digits) is outside {low}..{high - 1}"
            )
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_short(text)} is not an integer") from None
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high - 1}")
        return value

    return parse


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


seed_type = bounded_int(0, SEED_LIMIT)


def progress_file(out: Path) -> Path:
    """Where interrupted calibration for `out` keeps its partial sums (rerun the command to resume)."""
    return out.parent / f".{out.name}.calibration.safetensors"


def forget_progress(resume: Path) -> None:
    """The output is written: remove the held partial sums and the solved shares kept for a resume."""
    from adatsq.engine.shares import clear_shares

    resume.unlink(missing_ok=True)
    clear_shares(resume)


def add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load the model in this dtype")
    p.add_argument("--device", help="run calibration and solves here, e.g. cuda (default: cpu)")


@COMMANDS.register("quantize")
def _quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a recipe and write a checkpoint folder")
    p.add_argument("model", help="'reference' (the shipped digits DiT) or a local diffusers pipeline folder")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/reference/gptq-w4a8.yaml")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint folder")
    p.add_argument("--calib", type=Path, help="calibration inputs, one prompt / class label per line")
    p.add_argument("--seed", type=seed_type, help="calibration seed (overrides the recipe's)")
    p.add_argument(
        "--plan", type=Path, help="plan.json from `adatsq plan` (bits per layer × timestep segment)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--link-components",
        action="store_true",
        help="hard-link the pipeline's text encoders, VAE, tokenizers and scheduler from MODEL's folder "
        "instead of writing them again (symlinks on another filesystem; the checkpoint then needs them)",
    )
    p.add_argument(
        "--max-memory",
        help="memory for calibration statistics + solves, e.g. 40GiB (overrides calibration.max_memory); "
        "over it calibration runs in passes over groups of layers, with the same result",
    )
    p.add_argument(
        "--max-shard-size", default="10GB", help="split model.safetensors into shards of this size (10GB)"
    )
    p.add_argument(
        "--devices",
        type=bounded_int(1, 2**16),
        help="expected number of processes (torchrun --nproc-per-node N); refused if it differs",
    )
    add_placement(p)
    p.set_defaults(handler=run_quantize)


def check_shard_size(text: str) -> int:
    from adatsq.core.sizes import parse_size
    from adatsq.errors import ConfigError

    size = parse_size(text)
    if size < 1:
        raise ConfigError(f"--max-shard-size {text!r} must be a positive size, e.g. 10GB or 500MB")
    return size


@contextlib.contextmanager
def dropped_on_error(progress: Path) -> Iterator[None]:
    """Remove the calibration progress file a run created when it stops on a user error (bad plan,
    infeasible budget): a rerun with other inputs starts afresh. An interrupted run (Ctrl-C, kill) keeps
    it, to resume."""
    existed = progress.exists()
    try:
        yield
    except AdatsqError:
        if not existed:
            progress.unlink(missing_ok=True)
        raise


def check_plan_schedule(path: Path, recipe: Any) -> None:
    """The plan's file and schedule against the recipe, before the model is loaded."""
    from adatsq.engine.adaptive import plan_calibration
    from adatsq.plan.schema import load_plan

    plan_calibration(recipe, load_plan(path))


def join_processes(device: str | None, expected: int | None) -> str | None:
    """Under torchrun: join the process group (owner ranks split the passes); this rank's device."""
    from adatsq.calibrate.distributed import init_from_environment, launched_size
    from adatsq.errors import ConfigError

    size = launched_size()
    if expected is not None and expected != size:
        raise ConfigError(
            f"--devices {expected} does not match the {size} process(es) launched; "
            f"run `torchrun --nproc-per-node {expected} $(which adatsq) ...` or drop --devices"
        )
    return init_from_environment(device)


def run_quantize(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from adatsq import quantize
    from adatsq.calibrate.distributed import is_writer
    from adatsq.calibrate.inputs import read_calibration
    from adatsq.checkpoint.save import check_destination
    from adatsq.models.resolve import adapter_for
    from adatsq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe = replace(recipe, calibration=replace(recipe.calibration, seed=args.seed))
    if args.max_memory is not None:
        recipe = replace(recipe, calibration=replace(recipe.calibration, max_memory=args.max_memory))
    check_shard_size(args.max_shard_size)
    if args.plan is not None:
        check_plan_schedule(args.plan, recipe)
    check_destination(args.out, args.overwrite)  # fail before any long work
    device = join_processes(args.device, args.devices)
    adapter = adapter_for(args.model, dtype=args.dtype, device=device)
    if args.link_components:
        adapter.check_linkable()
    calibration = read_calibration(args.calib, adapter) if args.calib else None
    resume = progress_file(args.out)
    with dropped_on_error(resume):
        qmodel = quantize(adapter, recipe, calibration, plan=args.plan, progress=args.progress, resume=resume)
    if not is_writer():  # every rank holds the same result; rank 0 writes it
        return 0
    qmodel.save(
        args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
        link_components=args.link_components,
    )  # fmt: skip
    forget_progress(resume)
    report = json.loads((args.out / "report.json").read_text())
    print(f"wrote {args.out}: {len(qmodel.layers)} layers quantized, {report['checkpoint_bytes']} bytes")
    return 0


@COMMANDS.register("plan")
def _plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search bit-widths per layer × timestep segment under a budget (AdaTSQ)")
    p.add_argument("model", help="'reference' or a local diffusers pipeline folder")
    p.add_argument("--recipe", required=True, help="YAML recipe with a planner section")
    p.add_argument("--budget", help="KIND=VALUE, KIND in avg_bits | bops | bytes (default: the recipe's)")
    p.add_argument(
        "--out", required=True, type=Path, help="plan.json to write (plus .png heat map, Fisher plot)"
    )
    p.add_argument("--frontier", type=Path, help="also sweep budgets and write the Pareto frontier here")
    p.add_argument("--sweep", help="comma-separated budget values of the same kind for --frontier")
    p.add_argument("--plot", type=Path, help="frontier plot (PNG) for --frontier")
    p.add_argument("--calib", type=Path, help="calibration inputs, one per line")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_placement(p)
    p.set_defaults(handler=run_plan)


def check_budget(text: str) -> None:
    """--budget KIND=VALUE, checked like the recipe's planner.budget before the model is loaded."""
    from adatsq.errors import ConfigError
    from adatsq.plan.schema import BUDGET_KINDS, Budget
    from adatsq.recipe import parse_budget

    kind, value = parse_budget(text)
    if "=" not in text or kind not in BUDGET_KINDS:
        raise ConfigError(
            f"--budget {_short(text)}: kind {kind!r} is unknown; write KIND=VALUE with KIND in "
            f"{', '.join(BUDGET_KINDS)}, e.g. avg_bits=4.0"
        )
    Budget(kind, value)  # a positive, finite value


def run_plan(args: argparse.Namespace) -> int:
    from adatsq.calibrate.inputs import read_calibration
    from adatsq.core.io import check_output
    from adatsq.engine.adaptive import parse_sweep, plan_command
    from adatsq.errors import ConfigError
    from adatsq.models.resolve import adapter_for
    from adatsq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if (args.sweep is not None or args.plot) and not args.frontier:
        raise ConfigError("--sweep and --plot describe the frontier: add --frontier frontier.json")
    if args.budget is not None:
        check_budget(args.budget)
    if args.sweep is not None:
        if not args.sweep.strip():
            raise ConfigError("--sweep '' is empty; give comma-separated budget values, e.g. 3.5,4,4.5,5,6")
        parse_sweep(args.sweep)  # the whole list, before anything is written
    plots = (args.out.with_suffix(".png"), args.out.with_suffix(".fisher.png"))
    for path in (args.out, *plots, args.frontier, args.plot):
        if path is not None:
            check_output(path, args.overwrite)
    adapter = adapter_for(args.model, dtype=args.dtype, device=args.device)
    calibration = read_calibration(args.calib, adapter) if args.calib else None
    resume = progress_file(args.out)
    with dropped_on_error(resume):
        summary = plan_command(
            adapter, recipe, args.budget, args.out, calibration, args.frontier, args.sweep, args.plot, resume,
            progress=args.progress,
        )  # fmt: skip
    forget_progress(resume)
    print(summary)
    return 0


@COMMANDS.register("eval")
def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="compare a quantized checkpoint with its float model")
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--samples", type=bounded_int(1, 10**7), default=100, help="samples from each model (default 100)"
    )
    p.add_argument("--seed", type=seed_type, default=1234)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="run both models in this dtype; adds the keys dtype and bf16_seconds (float model in bf16)",
    )
    p.add_argument(
        "--compiled-kernels",
        action="store_true",
        help="quantize activations in a torch.compile'd loop (needs a C++ compiler; compiled before timing)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 of every checkpoint tensor")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from adatsq.eval.run import evaluate_checkpoint
    from adatsq.quant.kernels import KernelPolicy

    metrics = evaluate_checkpoint(
        args.checkpoint, samples=args.samples, seed=args.seed, dtype=args.dtype, verify=not args.no_verify,
        progress=args.progress, kernel_policy=KernelPolicy(compiled=True) if args.compiled_kernels else None,
    )  # fmt: skip
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>16}  {value:.4g}" if isinstance(value, float) else f"{key:>16}  {value}")
    return 0


@COMMANDS.register("inspect")
def _inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="per-layer table of a checkpoint, a plan.json / frontier.json, or a float model"
    )
    p.add_argument("path", type=Path)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 of every checkpoint tensor")
    p.set_defaults(handler=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from adatsq.checkpoint.inspect import inspect_path

    print(inspect_path(args.path, verify=not args.no_verify))
    return 0


@COMMANDS.register("upgrade")
def _upgrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upgrade", help="rewrite an older checkpoint folder in the current format, in place")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 of every checkpoint tensor")
    p.set_defaults(handler=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    from adatsq.checkpoint.upgrade import upgrade_checkpoint

    print(upgrade_checkpoint(args.checkpoint, verify=not args.no_verify))
    return 0


@COMMANDS.register("export")
def _export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint (or a plan) for compressed-tensors, gptqmodel, torchao or quanto"
    )
    p.add_argument(
        "source", type=Path, help="checkpoint folder; or a plan.json for gptqmodel / torchao / quanto"
    )
    p.add_argument(
        "--to", required=True, metavar="TARGET", help="compressed-tensors | gptqmodel | torchao | quanto"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--segment",
        type=int,
        metavar="K",
        help="export the variant each layer runs at timestep segment K (0-based)",
    )
    which.add_argument("--max", action="store_true", help="export each layer's widest variant")
    p.add_argument(
        "--scale-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="compressed-tensors weight_scale dtype (float16: the stored scales; float32: exact fp32)",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        help="plan.json only: the recipe giving group size / symmetry (default 128, sym)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 of every checkpoint tensor")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from adatsq.export.base import ExportOptions, Selection
    from adatsq.export.convert import export
    from adatsq.recipe import load_recipe

    selection = Selection(args.segment) if args.segment is not None else Selection() if args.max else None
    weight = load_recipe(args.recipe).weight if args.recipe else None
    options = ExportOptions(scale_dtype=args.scale_dtype)
    summary = export(
        args.source, args.to, args.out, selection, overwrite=args.overwrite, options=options,
        verify=not args.no_verify, weight=weight,
    )  # fmt: skip
    print(summary)
    return 0


@COMMANDS.register("tokens")
def _tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="visual-token reduction in the reference unified model")
    tokens = p.add_subparsers(dest="tokens_command", required=True)
    bench = tokens.add_parser("bench", help="accuracy / FLOPs / KV / latency of reducers × keep ratios")
    bench.add_argument("model", nargs="?", default="umm", help="'umm' or a checkpoint quantized from it")
    bench.add_argument("--methods", default="g2tr,vnorm,fastv,pdrop,visionzip,tome,random,grid")
    bench.add_argument("--keep", default="0.25,0.5,0.75", help="comma-separated keep ratios in (0, 1]")
    bench.add_argument(
        "--samples", type=bounded_int(1, 10**6), default=256, help="held-out canvases (default 256)"
    )
    bench.add_argument("--seed", type=seed_type, default=1234)
    bench.add_argument("--out", type=Path, help="also write the JSON result here")
    bench.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    bench.set_defaults(handler=run_tokens_bench)
    show = tokens.add_parser("show", help="draw which understanding tokens a reducer keeps")
    show.add_argument("image", help="48x48 PNG / .npy canvas, or canvas:SEED for a held-out one")
    show.add_argument("--method", default="g2tr")
    show.add_argument("--keep", type=float, default=0.5)
    show.add_argument("--out", type=Path, required=True, help="PNG to write")
    show.add_argument("--model", default="umm", help="'umm' or a checkpoint quantized from it")
    show.add_argument("--overwrite", action="store_true")
    show.set_defaults(handler=run_tokens_show)


def run_tokens_bench(args: argparse.Namespace) -> int:
    from adatsq.core.io import check_output
    from adatsq.tokens.commands import run_bench

    if args.out is not None:
        check_output(args.out, args.overwrite)  # before the benchmark runs
    print(run_bench(args.model, args.methods, args.keep, args.samples, args.seed, args.out))
    return 0


def run_tokens_show(args: argparse.Namespace) -> int:
    from adatsq.core.io import check_output
    from adatsq.tokens.commands import run_show

    check_output(args.out, args.overwrite)
    print(run_show(args.image, args.method, args.keep, args.out, args.model))
    return 0


@COMMANDS.register("estimate")
def _estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate", help="memory, passes and checkpoint size of a quantization run, without running it"
    )
    p.add_argument(
        "model", help="a diffusers pipeline folder (config-only is enough, e.g. configs/flux.1-dev)"
    )
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/scale/adatsq-w4a8.yaml")
    p.add_argument(
        "--max-memory", default="80GiB", help="memory budget per device, e.g. 40GiB (default 80GiB)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument(
        "--devices", type=bounded_int(1, 2**16), default=1, help="owner ranks the blocks are split across"
    )
    p.add_argument(
        "--segments", type=bounded_int(1, 10**7), help="timestep segments (overrides the recipe's)"
    )
    p.add_argument(
        "--weights",
        choices=["device", "stream"],
        default="device",
        help="keep the whole denoiser on each device (default) or stream its blocks one at a time",
    )
    size = bounded_int(1, GEOMETRY_LIMIT + 1)
    p.add_argument("--height", type=size, help="pixels (default: the family's published default)")
    p.add_argument("--width", type=size)
    p.add_argument("--frames", type=size, help="video frames (Wan; default 81)")
    p.add_argument("--text-tokens", type=size, help="text tokens per prompt (default: max_sequence_length)")
    p.add_argument("--cfg-calls", type=bounded_int(1, 9), help="denoiser calls per step (2 with CFG)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(handler=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    from adatsq.engine.estimate import estimate_command, render

    result = estimate_command(args)
    print(json.dumps(result.to_dict()) if args.json else render(result))
    return 0


@COMMANDS.register("env")
def _env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions, threads and devices, to paste into a bug report")
    p.set_defaults(handler=run_env)


def run_env(args: argparse.Namespace) -> int:
    from adatsq.core.environment import environment

    for key, value in environment().items():
        print(f"- {key}: {value}")
    return 0


def add_output_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """-q / -v; on a subcommand (default SUPPRESS) they may follow it: `adatsq quantize ... -q`."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars; log warnings only"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log progress messages and other libraries' warnings; on an error, print its traceback "
        "(with its causes) before the line",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += [child, *_subparsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    from adatsq.core.version import __version__

    parser = OneLineParser(prog="adatsq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"adatsq {__version__}")
    add_output_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS.names():
        COMMANDS.get(name)(sub)
    for child in _subparsers(parser):
        add_output_flags(child, argparse.SUPPRESS)
    return parser


def one_line(message: str, limit: int = 1000) -> str:
    """A message on one line (a wrapped library error may hold newlines), at most about `limit` characters:
    the start (what is wrong) and the end (the fix) of a longer one."""
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} ...[{len(text) - limit} characters]... {text[-limit // 2 :]}"


class OwnRecords(logging.Filter):
    """adatsq's own log records only: other libraries' notes (torchao's import messages, Python warnings
    of torch / diffusers, ...) would break the one-line promise, so they show with --verbose only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "adatsq" or record.name.startswith("adatsq.")


@contextlib.contextmanager
def library_records(show: bool) -> Iterator[None]:
    """While a command runs, Python warnings become log records and every log handler passes only
    adatsq's records unless `show`: the root logger's and those torch, diffusers and transformers keep
    for themselves (with torchao installed, importing diffusers logs half a dozen notes through them)."""
    own = OwnRecords()
    handlers = [] if show else _log_handlers()
    logging.captureWarnings(True)
    for handler in handlers:
        handler.addFilter(own)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(own)
        logging.captureWarnings(False)


def _log_handlers() -> list[logging.Handler]:
    """Every handler once the libraries adatsq drives have set theirs up (they do so on import)."""
    import torch  # noqa: F401  its "torch" logger has a stderr handler of its own
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")  # installs the library's own handler
    transformers_logging.get_logger("transformers")
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found = {id(h): h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}
    return list(found.values())


@contextlib.contextmanager
def library_bars(show: bool) -> Iterator[None]:
    """diffusers' / transformers' own bars (loading components, weights, shards) follow adatsq's while a
    command runs: they draw even when stderr is not a terminal, so they are switched off unless shown."""
    if show:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose contradict each other: pass one of them")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from adatsq.core.progress import bars_wanted

    args.progress = bars_wanted(not args.quiet)
    from adatsq.core.allocator import retain_freed_memory

    retain_freed_memory()
    try:
        with library_bars(args.progress and sys.stderr.isatty()), library_records(args.verbose):
            return args.handler(args)
    except AdatsqError as err:
        if args.verbose:  # the whole chain: what the library error wraps (diffusers, safetensors, ...)
            traceback.print_exception(err, file=sys.stderr)
        print(f"adatsq: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    finally:
        from adatsq.calibrate.distributed import finish

        finish()


if __name__ == "__main__":
    sys.exit(main())
