"""The bad-input corpus: every way a user can hand the CLI something wrong, one case per way.

Each case builds its bad input in a fresh folder (`Work`) and returns the `adatsq` arguments; `run_case`
runs the CLI in this process (`adatsq.cli.main`, or a fresh interpreter for the few cases that need one)
and says what happened. The contract every case must meet (issue 13):

* exit code 2 and exactly one non-empty line on stderr, no traceback;
* nothing half-written and no existing file touched: the case's folder is byte for byte what it was
  before the command ran (outputs absent, existing outputs unchanged, no temporaries left).

Verdicts: `one-line` (the contract holds), `traceback` (an exception escaped main), `accepted-wrong` (the
command succeeded on bad input), `messy` (exit 2 but several lines, or files changed).

Shared inputs (`Assets`) are built once: a small RTN checkpoint of the shipped reference DiT (one file and
sharded), a plan and a frontier of it, and tiny recipes (4 samples × 2 steps), so a case that is wrongly
accepted costs seconds, not minutes. `tests/bad_inputs/test_corpus.py` runs every case;
`tools/bench_reliability.py` counts them per kind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# ------------------------------------------------------------------------------------- shared inputs

FAST: dict[str, Any] = {  # RTN: no solves, a wrongly accepted case finishes in seconds
    "method": "rtn",
    "weight": {"bits": 4, "group_size": 32, "symmetric": False},
    "activation": {"bits": 8},
    "calibration": {"samples": 4, "steps": 2, "batch_size": 4, "seed": 0},
}
ADATSQ: dict[str, Any] = {  # a planner that calibrates and searches in a second or two
    "method": "adatsq",
    "weight": {"bits": 4, "group_size": 32, "symmetric": False},
    "activation": {"bits": 8},
    "calibration": {"samples": 4, "steps": 4, "batch_size": 4, "seed": 0, "segments": 2},
    "planner": {"candidates": [4, 8], "fisher": False, "measure": False, "search": "greedy"},
}
LAYER = "transformer_blocks.0.attn1.to_q"  # quantized: 128 -> 128, group 32, 4 bits
OTHER = "transformer_blocks.0.attn1.to_k"
FLOAT = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"  # kept in float
BASE_JSON = "reference_base.json"  # format 2: the pipeline folder's own files, the denoiser in transformer/
CONFIG = "transformer/config.json"  # its quantization_config holds adatsq's fields
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
DROP = object()  # `edited(..., key=DROP)` removes the key


def edited(base: dict[str, Any], **changes: Any) -> str:
    """YAML of `base` with dotted keys changed (`edited(FAST, **{"weight.bits": 5})`)."""
    data = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is DROP:
            node.pop(last)
        else:
            node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


@dataclass
class Assets:
    """What many cases start from, built once (read-only: cases copy before they change anything)."""

    root: Path
    checkpoint: Path
    sharded: Path
    plan: Path
    frontier: Path

    @classmethod
    def build(cls, root: Path, qmodel: Any = None, checkpoint: Path | None = None) -> Assets:
        """`qmodel` / `checkpoint`: an RTN W4 reference checkpoint already made (the tests' session one)."""
        import adatsq
        from adatsq.cli import main
        from adatsq.recipe import recipe_from_dict

        root.mkdir(parents=True, exist_ok=True)
        if qmodel is None:
            qmodel = adatsq.quantize("reference", recipe_from_dict(FAST), progress=False)
        if checkpoint is None:
            checkpoint = root / "ckpt"
            qmodel.save(checkpoint)
        sharded = root / "sharded"
        qmodel.save(sharded, max_shard_size="200KB")
        recipe = root / "adatsq.yaml"
        recipe.write_text(edited(ADATSQ))
        plan, frontier = root / "plan.json", root / "frontier.json"
        args = ["plan", "reference", "--recipe", recipe, "--budget", "avg_bits=6", "--out", plan]
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in (*args, "--frontier", frontier, "--sweep", "5,6")])
        if rc != 0:
            raise RuntimeError("building the corpus plan failed")
        return cls(root, checkpoint, sharded, plan, frontier)


class Skip(Exception):
    """The case cannot be built on this machine (e.g. no way to make a read-only folder)."""


@dataclass
class Work:
    """A case's own folder and its helpers; `cleanups` run after the command (e.g. clear chattr +i)."""

    root: Path
    assets: Assets
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # subprocess cases: extra environment

    def path(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    def recipe(self, text: str | bytes | None = None, name: str = "recipe.yaml") -> Path:
        return self.file(name, edited(FAST) if text is None else text)

    def adatsq_recipe(self, **changes: Any) -> Path:
        return self.file("adatsq.yaml", edited(ADATSQ, **changes))

    def checkpoint(self, mutate: Callable[[Path], None] | None = None, sharded: bool = False) -> Path:
        source = self.assets.sharded if sharded else self.assets.checkpoint
        target = shutil.copytree(source, self.root / "ckpt")
        if mutate is not None:
            mutate(target)
        return target

    def plan(self, edit: Callable[[dict], None] | None = None, name: str = "plan.json") -> Path:
        data = json.loads(self.assets.plan.read_text())
        if edit is not None:
            edit(data)
        return self.file(name, json.dumps(data))

    def frontier(self, edit: Callable[[dict], None]) -> Path:
        data = json.loads(self.assets.frontier.read_text())
        edit(data)
        return self.file("frontier.json", json.dumps(data))

    def read_only_folder(self, name: str = "read-only") -> Path:
        """A folder nothing can be created in: mode 555, or for root the immutable flag."""
        folder = self.root / name
        folder.mkdir(mode=0o555)
        self.cleanups.append(lambda: folder.chmod(0o755))  # cleanups run last first: after chattr -i
        root_user = os.access(folder, os.W_OK) and shutil.which("chattr")
        if root_user and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            self.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
        if os.access(folder, os.W_OK):
            raise Skip("cannot make a folder read-only here")
        return folder


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    build: Callable[[Work], list[Any]]  # prepares the inputs, returns the CLI arguments
    fresh_process: bool = False  # run `python -m adatsq.cli` instead of main() in this process
    slow: bool = False  # seconds of real work happen before the refusal (model load + calibration)


CASES: list[Case] = []


def case(kind: str, id: str, fresh_process: bool = False, slow: bool = False):
    def register(build: Callable[[Work], list[Any]]) -> Callable[[Work], list[Any]]:
        CASES.append(Case(f"{kind}/{id}", kind, build, fresh_process, slow))
        return build

    return register


def quantize(w: Work, recipe: Path | None = None, *extra: Any, model: Any = "reference") -> list[Any]:
    return ["quantize", model, "--recipe", recipe or w.recipe(), "--out", w.path("out"), *extra]


def plan(w: Work, *extra: Any, recipe: Path | None = None) -> list[Any]:
    recipe = recipe or w.adatsq_recipe()
    return ["plan", "reference", "--recipe", recipe, "--out", w.path("plan.json"), *extra]


# -------------------------------------------------------------------------------------------- recipes
# Every recipe case runs `adatsq quantize reference --recipe <it> --out <new folder>`.

RAW_RECIPES: dict[str, bytes] = {
    "not-utf8": b"method: rtn\nweight: {bits: 4}\n# \xff\xfe\n",
    "latin1": "# réglages (Latin-1)\nmethod: rtn\nweight: {bits: 4}\n".encode("latin-1"),
    "binary": bytes(range(256)) * 4,
    "png-bytes": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    "utf16-bom": "method: rtn\nweight: {bits: 4}\n".encode("utf-16"),
    "nul-byte": b"method: rtn\x00\nweight: {bits: 4}\n",
    "empty": b"",
    "only-comments": b"# nothing here\n# at all\n",
    "only-whitespace": b"   \n\n\t\n",
    "yaml-unclosed-flow": b"method: rtn\nweight: {bits: 4\n",
    "yaml-tab-indent": b"method: rtn\nweight:\n\tbits: 4\n",
    "yaml-bad-indent": b"method: rtn\nweight:\n  bits: 4\n group_size: 32\n",
    "yaml-two-documents": b"method: rtn\nweight: {bits: 4}\n---\nmethod: gptq\n",
    "yaml-python-tag": b"method: !!python/object/apply:os.system ['true']\nweight: {bits: 4}\n",
    "yaml-duplicate-key": b"method: rtn\nweight: {bits: 4}\nweight: {bits: 8}\n",
    "yaml-duplicate-nested-key": b"method: rtn\nweight: {bits: 4, bits: 8}\n",
    "yaml-undefined-alias": b"method: rtn\nweight: *w\n",
    "yaml-deep-nesting": b"method: rtn\nweight: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "top-level-list": b"- method: rtn\n- weight: {bits: 4}\n",
    "top-level-scalar": b"rtn\n",
    "top-level-number": b"42\n",
    "json-not-yaml-mapping": b'["method", "rtn"]',
}
for _name, _data in RAW_RECIPES.items():
    case("recipe", _name)(lambda w, data=_data: quantize(w, w.recipe(data)))

EDITED_RECIPES: dict[str, dict[str, Any]] = {
    "unknown-top-key": {"colour": "blue"},
    "unknown-weight-key": {"weight.colour": 1},
    "unknown-calibration-key": {"calibration.sample": 8},
    "missing-method": {"method": DROP},
    "missing-weight": {"weight": DROP},
    "method-unknown": {"method": "awq"},
    "method-number": {"method": 3},
    "method-null": {"method": None},
    "weight-not-mapping": {"weight": 4},
    "weight-bits-string": {"weight.bits": "four"},
    "weight-bits-5": {"weight.bits": 5},
    "weight-bits-0": {"weight.bits": 0},
    "weight-bits-negative": {"weight.bits": -4},
    "weight-bits-float": {"weight.bits": 4.5},
    "weight-bits-bool": {"weight.bits": True},
    "weight-bits-huge": {"weight.bits": 10**30},
    "weight-bits-null": {"weight.bits": None},
    "weight-group-zero": {"weight.group_size": 0},
    "weight-group-negative": {"weight.group_size": -32},
    "weight-group-string": {"weight.group_size": "32"},
    "weight-group-huge": {"weight.group_size": 2**70},
    "weight-symmetric-string": {"weight.symmetric": "yes"},
    "weight-integer-scales-string": {"weight.integer_group_scales": "yes"},
    "weight-integer-scales-per-channel": {"weight.integer_group_scales": True, "weight.group_size": None},
    "weight-integer-scales-8-bit": {"weight.integer_group_scales": True, "weight.bits": 8},
    "activation-bits-16": {"activation.bits": 16},
    "activation-bits-string": {"activation.bits": "8"},
    "activation-list": {"activation": [8]},
    "targets-string": {"targets": ".*"},
    "targets-bad-regex": {"targets": ["("]},
    "targets-not-strings": {"targets": [1, 2]},
    "ignore-bad-regex": {"ignore": ["[a-"]},
    "ignore-mapping": {"ignore": {"a": 1}},
    "samples-zero": {"calibration.samples": 0},
    "samples-negative": {"calibration.samples": -1},
    "samples-huge": {"calibration.samples": 10**30},
    "samples-string": {"calibration.samples": "8"},
    "samples-float": {"calibration.samples": 1.5},
    "steps-zero": {"calibration.steps": 0},
    "batch-size-zero": {"calibration.batch_size": 0},
    "segments-over-steps": {"calibration.segments": 3},
    "seed-negative": {"calibration.seed": -1},
    "seed-beyond-64-bits": {"calibration.seed": 2**64},
    "seed-string": {"calibration.seed": "x"},
    "max-memory-bad-unit": {"calibration.max_memory": "12XB"},
    "max-memory-empty": {"calibration.max_memory": ""},
    "max-memory-negative": {"calibration.max_memory": "-5GiB"},
    "max-memory-inf": {"calibration.max_memory": "1e999GiB"},
    "max-memory-overflow": {"calibration.max_memory": "9" * 400 + "GiB"},
    "max-memory-list": {"calibration.max_memory": [1]},
    "gptq-damping-zero": {"gptq": {"damping": 0}},
    "gptq-damping-nan": {"gptq": {"damping": float("nan")}},
    "gptq-damping-inf": {"gptq": {"damping": float("inf")}},
    "gptq-damping-string": {"gptq": {"damping": "small"}},
    "gptq-block-zero": {"gptq": {"block_size": 0}},
    "gptq-act-order-string": {"gptq": {"act_order": "yes"}},
    "planner-candidates-5": {"planner": {"candidates": [5]}},
    "planner-candidates-empty": {"planner": {"candidates": []}},
    "planner-budget-no-value": {"planner": {"budget": "avg_bits"}},
    "planner-budget-unknown-kind": {"planner": {"budget": "flops=3"}},
    "planner-budget-negative": {"planner": {"budget": "avg_bits=-1"}},
    "planner-budget-nan": {"planner": {"budget": "avg_bits=nan"}},
    "planner-search-unknown": {"planner": {"search": "dfs"}},
    "planner-beam-zero": {"planner": {"beam_width": 0}},
    "planner-pin-bad-regex": {"planner": {"pin": ["(("]}},
    "planner-pin-bits-5": {"planner": {"pin_bits": 5}},
    "outliers-alpha-2": {"outliers": {"smooth_alpha": 2.0}},
    "outliers-rotate-string": {"outliers": {"rotate": "yes"}},
    "outliers-rank-negative": {"outliers": {"lowrank_rank": -1}},
    "outliers-unknown-key": {"outliers": {"clip": 1}},
}
for _name, _changes in EDITED_RECIPES.items():
    case("recipe", _name)(lambda w, changes=_changes: quantize(w, w.recipe(edited(FAST, **changes))))


@case("recipe", "path-missing")
def _(w: Work) -> list[Any]:
    return quantize(w, w.path("nowhere.yaml"))


@case("recipe", "path-is-folder")
def _(w: Work) -> list[Any]:
    (w.path("recipes.yaml")).mkdir()
    return quantize(w, w.path("recipes.yaml"))


@case("recipe", "targets-match-nothing", slow=True)
def _(w: Work) -> list[Any]:
    return quantize(w, w.recipe(edited(FAST, targets=["^no-such-layer$"])))


@case("recipe", "unreadable")
def _(w: Work) -> list[Any]:
    path = w.recipe()
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make it a dangling symlink instead
        path.unlink()
        path.symlink_to(w.path("gone.yaml"))
    else:
        w.cleanups.append(lambda: path.chmod(0o644))
    return quantize(w, path)


@case("recipe", "not-utf8-fresh-process", fresh_process=True)
def _(w: Work) -> list[Any]:
    return quantize(w, w.recipe(RAW_RECIPES["not-utf8"]))


# -------------------------------------------------------------------------------------- model folders


def pipeline_folder(w: Work, edit: Callable[[Path], None] | None = None, name: str = "flux") -> Path:
    """A copy of the config-only FLUX.1-dev folder (no weights), edited."""
    folder = shutil.copytree(CONFIGS / "flux.1-dev", w.path(name))
    if edit is not None:
        edit(folder)
    return folder


def json_edit(relative: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        path = folder / relative
        data = edit(json.loads(path.read_text()))
        if data is not None:
            path.write_text(json.dumps(data))

    return mutate


def write(relative: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / relative).write_bytes(data)


def estimate(folder: Path, w: Work, *extra: Any) -> list[Any]:
    return ["estimate", folder, "--recipe", w.recipe(), *extra]


MODEL_FOLDERS: dict[str, Callable[[Path], None]] = {
    "index-invalid-json": write("model_index.json", b"{not json"),
    "index-not-utf8": write("model_index.json", b'{"_class_name": "\xff"}'),
    "index-list": write("model_index.json", b"[]"),
    "index-no-transformer": json_edit("model_index.json", lambda d: d.pop("transformer") and d),
    "index-unknown-pipeline-class": json_edit("model_index.json", lambda d: {**d, "_class_name": "NoPipe"}),
    "index-class-not-string": json_edit("model_index.json", lambda d: {**d, "_class_name": 7}),
    "transformer-config-garbage": write("transformer/config.json", b"\x00\x01garbage"),
    "transformer-config-list": write("transformer/config.json", b"[1, 2]"),
    "transformer-config-unknown-class": json_edit(
        "transformer/config.json", lambda d: {**d, "_class_name": "NoSuchTransformer"}
    ),
    "transformer-config-wrong-type": json_edit(
        "transformer/config.json", lambda d: {**d, "num_layers": "nineteen"}
    ),
    "transformer-config-negative": json_edit("transformer/config.json", lambda d: {**d, "num_layers": -1}),
    "transformer-config-missing": lambda f: (f / "transformer" / "config.json").unlink(),
    "settings-garbage": write("adatsq_pipeline.json", b"{"),
    "settings-unknown-key": write("adatsq_pipeline.json", b'{"format_version": 1, "colour": 1}'),
}
for _name, _edit in MODEL_FOLDERS.items():
    case("model", f"estimate-{_name}")(lambda w, edit=_edit: estimate(pipeline_folder(w, edit), w))


@case("model", "config-only-folder-to-quantize")
def _(w: Work) -> list[Any]:
    return quantize(w, model=pipeline_folder(w))


@case("model", "config-only-folder-to-plan")
def _(w: Work) -> list[Any]:
    return ["plan", pipeline_folder(w), "--recipe", w.adatsq_recipe(), "--out", w.path("plan.json")]


@case("model", "garbage-index-to-quantize")
def _(w: Work) -> list[Any]:
    return quantize(w, model=pipeline_folder(w, MODEL_FOLDERS["index-invalid-json"]))


@case("model", "empty-folder-to-quantize")
def _(w: Work) -> list[Any]:
    w.path("empty").mkdir()
    return quantize(w, model=w.path("empty"))


@case("model", "a-file-to-quantize")
def _(w: Work) -> list[Any]:
    return quantize(w, model=w.file("model.bin", b"\x00" * 10))


@case("model", "unknown-name")
def _(w: Work) -> list[Any]:
    return quantize(w, model="flux-dev")


@case("model", "inspect-garbage-transformer-config")
def _(w: Work) -> list[Any]:
    return ["inspect", pipeline_folder(w, MODEL_FOLDERS["transformer-config-garbage"]) / "transformer"]


@case("model", "estimate-missing-folder")
def _(w: Work) -> list[Any]:
    return estimate(w.path("nowhere"), w)


# ---------------------------------------------------------------------------------------- checkpoints


def config(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Edit the denoiser config's quantization_config."""
    return json_edit(CONFIG, lambda c: (edit(c["quantization_config"]), c)[1])


def base(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    return json_edit(BASE_JSON, lambda b: (edit(b), b)[1])


def tensors(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Rewrite the denoiser's safetensors with `edit` applied to its tensors (checksums left as saved)."""

    def mutate(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        data = load_file(str(d / WEIGHTS))
        edit(data)
        save_file(data, str(d / WEIGHTS))

    return mutate


def retype(key: str, dtype: str) -> Callable[[Path], None]:
    import torch

    return tensors(lambda t: t.update({key: t[key].to(getattr(torch, dtype))}))


def header(d: Path, name: str = WEIGHTS) -> tuple[dict, bytes]:
    raw = (d / name).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(d: Path, head: dict, body: bytes) -> None:
    text = json.dumps(head).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + body)


def swap_offsets(a: str, b: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        head, body = header(d)
        head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
        write_header(d, head, body)

    return mutate


def flip_bit(key: str, byte: int, bit: int) -> Callable[[Path], None]:
    """Flip one bit of a tensor's stored bytes (header untouched)."""

    def mutate(d: Path) -> None:
        head, body = header(d)
        raw = bytearray((d / WEIGHTS).read_bytes())
        raw[len(raw) - len(body) + head[key]["data_offsets"][0] + byte] ^= 1 << bit
        (d / WEIGHTS).write_bytes(bytes(raw))

    return mutate


def shard(i: int, d: Path) -> Path:
    return sorted(d.glob("transformer/diffusion_pytorch_model-*.safetensors"))[i]


def layer(**fields: Any) -> Callable[[Path], None]:
    return config(lambda c: c["layers"][LAYER].update(fields))


CHECKPOINTS: dict[str, tuple[Callable[[Path], None], bool]] = {  # name -> (mutation, sharded?)
    "base-invalid-json": (write(BASE_JSON, b"{not json"), False),
    "base-not-utf8": (write(BASE_JSON, b'{"a": "\xff"}'), False),
    "base-missing-key": (base(lambda b: b.pop("num_steps")), False),
    "base-missing-transformer": (base(lambda b: b.pop("transformer")), False),
    "base-wrong-type": (base(lambda b: b["transformer"].update(num_layers="six")), False),
    "base-huge-int": (base(lambda b: b["transformer"].update(num_layers=10**30)), False),
    "base-missing": (lambda d: (d / BASE_JSON).unlink(), False),
    "config-invalid-json": (write(CONFIG, b'{"format_version": 1,'), False),
    "config-missing-keys": (config(lambda c: c.pop("layers")), False),
    "config-layers-list": (config(lambda c: c.update(layers=[])), False),
    "config-bits-empty": (layer(bits=[]), False),
    "config-bits-longer-than-segments": (layer(bits=[4, 4, 4]), False),
    "config-bits-huge": (layer(bits=[10**30]), False),
    "config-num-steps-huge": (config(lambda c: c.update(num_steps=10**30)), False),
    "config-format-version-99": (config(lambda c: c.update(format_version=99)), False),
    "config-empty-file": (write(CONFIG, b""), False),
    "qweight-int32": (retype(f"{LAYER}.w4.qweight", "int32"), False),
    "scales-float32": (retype(f"{LAYER}.w4.scales", "float32"), False),
    "qweight-wrong-shape": (
        tensors(lambda t: t.update({f"{LAYER}.w4.qweight": t[f"{LAYER}.w4.qweight"][:, 1:].contiguous()})),
        False,
    ),
    "float-tensor-wrong-shape": (tensors(lambda t: t.update({FLOAT: t[FLOAT][:, 1:].contiguous()})), False),
    "swapped-header-offsets": (swap_offsets(f"{LAYER}.w4.scales", f"{OTHER}.w4.scales"), False),
    "swapped-offsets-other-size": (swap_offsets(f"{LAYER}.w4.qweight", f"{LAYER}.w4.bias"), False),
    "flipped-scale-byte": (flip_bit(f"{LAYER}.w4.scales", 1, 6), False),
    "flipped-qweight-byte": (flip_bit(f"{LAYER}.w4.qweight", 10, 0), False),
    "flipped-float-byte": (flip_bit(FLOAT, 5, 2), False),
    "truncated-weights": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:5000]), False),
    "weights-missing": (lambda d: (d / WEIGHTS).unlink(), False),
    "weights-header-garbage": (lambda d: (d / WEIGHTS).write_bytes(b"\xff" * 64), False),
    "missing-tensor": (tensors(lambda t: t.pop(f"{LAYER}.w4.zeros")), False),
    "missing-shard": (lambda d: shard(1, d).unlink(), True),
    "shard-from-another-run": (lambda d: shutil.copy(shard(2, d), shard(1, d)), True),
    "index-garbage": (lambda d: (d / INDEX).write_text("}{"), True),
    "index-missing": (lambda d: (d / INDEX).unlink(), True),
}
for _name, (_mutate, _sharded) in CHECKPOINTS.items():
    case("checkpoint", f"inspect-{_name}")(lambda w, m=_mutate, s=_sharded: ["inspect", w.checkpoint(m, s)])

SMALL_BENCH = ["--methods", "random", "--keep", "0.5", "--samples", "1"]
CHECKPOINT_COMMANDS: dict[str, Callable[[Work, Path], list[Any]]] = {
    "eval": lambda w, c: ["eval", c, "--samples", "1"],
    "export": lambda w, c: ["export", c, "--to", "compressed-tensors", "--out", w.path("out")],
    "tokens-bench": lambda w, c: ["tokens", "bench", c, *SMALL_BENCH, "--out", w.path("bench.json")],
}
for _command, _args in CHECKPOINT_COMMANDS.items():
    for _name in ("flipped-scale-byte", "qweight-int32", "base-missing-key", "missing-shard"):
        _mutate, _sharded = CHECKPOINTS[_name]
        case("checkpoint", f"{_command}-{_name}")(
            lambda w, a=_args, m=_mutate, s=_sharded: a(w, w.checkpoint(m, s))
        )


@case("checkpoint", "inspect-missing-folder")
def _(w: Work) -> list[Any]:
    return ["inspect", w.path("nowhere")]


@case("checkpoint", "eval-empty-folder")
def _(w: Work) -> list[Any]:
    w.path("empty").mkdir()
    return ["eval", w.path("empty"), "--samples", "1"]


@case("checkpoint", "tokens-bench-reference-checkpoint")
def _(w: Work) -> list[Any]:
    return ["tokens", "bench", w.checkpoint(), *SMALL_BENCH]


# --------------------------------------------------------------------------------- plans and frontiers


def plan_edit(key: str, value: Any) -> Callable[[dict], None]:
    return lambda p: p.update({key: value})


def first_row(value: Any) -> Callable[[dict], None]:
    return lambda p: p["layers"].update({next(iter(p["layers"])): value})


PLANS: dict[str, Callable[[Work], Path]] = {
    "garbage-json": lambda w: w.file("plan.json", "{layers: ["),
    "not-utf8": lambda w: w.file("plan.json", b'{"a": "\xff"}'),
    "empty-file": lambda w: w.file("plan.json", ""),
    "json-list": lambda w: w.file("plan.json", "[]"),
    "wrong-model": lambda w: w.plan(lambda p: p["layers"].update({"umm.blocks.0.attn": [4, 4]})),
    "layer-missing": lambda w: w.plan(lambda p: p["layers"].pop(LAYER)),
    "wrong-segments": lambda w: w.plan(plan_edit("segments", [[0, 1], [1, 4]])),
    "segments-gap": lambda w: w.plan(plan_edit("segments", [[0, 1], [2, 4]])),
    "segments-not-pairs": lambda w: w.plan(plan_edit("segments", [0, 4])),
    "wrong-num-steps": lambda w: w.plan(plan_edit("num_steps", 8)),
    "num-steps-huge": lambda w: w.plan(plan_edit("num_steps", 10**30)),
    "bits-5": lambda w: w.plan(first_row([5, 4])),
    "row-too-long": lambda w: w.plan(first_row([4, 4, 4])),
    "row-strings": lambda w: w.plan(first_row(["4", "4"])),
    "unknown-key": lambda w: w.plan(plan_edit("colour", 1)),
    "format-version-2": lambda w: w.plan(plan_edit("format_version", 2)),
    "fisher-weights-nan": lambda w: w.file(
        "plan.json", w.assets.plan.read_text().replace('"fisher_weights": [', '"fisher_weights": [NaN, ', 1)
    ),
    "act-bits-3": lambda w: w.plan(plan_edit("act_bits", 3)),
}
for _name, _make in PLANS.items():
    case("plan", f"quantize-{_name}", slow=True)(
        lambda w, make=_make: quantize(w, w.adatsq_recipe(), "--plan", make(w))
    )
for _name in ("garbage-json", "bits-5", "segments-gap", "unknown-key"):
    case("plan", f"inspect-{_name}")(lambda w, make=PLANS[_name]: ["inspect", make(w)])
    case("plan", f"export-{_name}")(
        lambda w, make=PLANS[_name]: [
            "export",
            make(w),
            "--to",
            "torchao",
            "--segment",
            "0",
            "--out",
            w.path("o"),
        ]
    )


@case("plan", "quantize-plan-missing")
def _(w: Work) -> list[Any]:
    return quantize(w, w.adatsq_recipe(), "--plan", w.path("nowhere.json"))


@case("plan", "quantize-recipe-other-segments", slow=True)
def _(w: Work) -> list[Any]:
    recipe = w.adatsq_recipe(**{"calibration.segments": 4})
    return quantize(w, recipe, "--plan", w.plan())


@case("plan", "quantize-frontier-as-plan")
def _(w: Work) -> list[Any]:
    return quantize(w, w.adatsq_recipe(), "--plan", w.assets.frontier)


FRONTIERS: dict[str, Callable[[dict], None]] = {
    "points-not-list": lambda f: f.update(points={}),
    "point-bad-plan": lambda f: f["points"][0]["plan"].update(num_steps=-1),
    "unknown-key": lambda f: f.update(colour=1),
    "unsorted": lambda f: f.update(points=f["points"][::-1]),
    "kind-unknown": lambda f: f.update(kind="flops"),
}
for _name, _edit in FRONTIERS.items():
    case("frontier", f"inspect-{_name}")(lambda w, edit=_edit: ["inspect", w.frontier(edit)])


@case("frontier", "inspect-garbage")
def _(w: Work) -> list[Any]:
    return ["inspect", w.file("frontier.json", "\x00\x01\x02")]


# -------------------------------------------------------------------------------------------- budgets

BUDGETS = {
    "empty": "",
    "no-value": "avg_bits",
    "value-not-number": "avg_bits=four",
    "unknown-kind": "flops=3",
    "negative": "avg_bits=-1",
    "zero": "bytes=0",
    "nan": "avg_bits=nan",
    "inf": "bops=inf",
    "two-equals": "avg_bits=4=5",
}
for _name, _text in BUDGETS.items():
    case("budget", f"plan-{_name}")(lambda w, text=_text: plan(w, "--budget", text))


@case("budget", "plan-below-smallest-feasible", slow=True)
def _(w: Work) -> list[Any]:
    return plan(w, "--budget", "avg_bits=3")


@case("budget", "plan-bytes-below-smallest-feasible", slow=True)
def _(w: Work) -> list[Any]:
    return plan(w, "--budget", "bytes=1000")


@case("budget", "plan-sweep-garbage")
def _(w: Work) -> list[Any]:
    return plan(w, "--budget", "avg_bits=6", "--frontier", w.path("f.json"), "--sweep", "5,abc")


@case("budget", "plan-sweep-empty")
def _(w: Work) -> list[Any]:
    return plan(w, "--budget", "avg_bits=6", "--frontier", w.path("f.json"), "--sweep", "")


SIZES = {"bad-unit": "12XB", "empty": "", "negative": "-1GiB", "words": "lots", "inf": "1e999GiB",
         "overflow": "9" * 400 + "GiB", "nan": "nanGiB"}  # fmt: skip
for _name, _text in SIZES.items():
    case("budget", f"quantize-max-memory-{_name}")(
        lambda w, text=_text: quantize(w, None, "--max-memory", text)
    )
for _name in ("bad-unit", "inf"):
    case("budget", f"estimate-max-memory-{_name}")(
        lambda w, text=SIZES[_name]: estimate(CONFIGS / "flux.1-dev", w, "--max-memory", text)
    )
for _name, _text in {"bad-unit": "10XB", "zero": "0", "empty": ""}.items():
    case("budget", f"quantize-max-shard-size-{_name}")(
        lambda w, text=_text: quantize(w, None, "--max-shard-size", text)
    )


@case("budget", "quantize-max-memory-below-smallest-feasible", slow=True)
def _(w: Work) -> list[Any]:  # GPTQ: RTN keeps no statistics, so any budget fits it
    return quantize(w, w.recipe(edited(FAST, method="gptq")), "--max-memory", "1KiB")


@case("budget", "estimate-max-memory-below-smallest-feasible")
def _(w: Work) -> list[Any]:
    return estimate(CONFIGS / "flux.1-dev", w, "--max-memory", "1KiB")


# -------------------------------------------------------------------------------- calibration files

BIG_LINE = b"7" * (50 * 2**20)  # a 50 MB line: the error must not echo it
CALIBRATION = {
    "not-utf8": b"1\n2\n\xff\xfe\n",
    "latin1": "1\n2\ncinq é\n".encode("latin-1"),
    "binary": bytes(range(256)),
    "superscript-digits": "1\n²\n3\n".encode(),
    "fullwidth-digits": "1\n３\n".encode(),
    "arabic-indic-digits": "1\n٣\n".encode(),
    "label-10": b"1\n10\n",
    "label-negative": b"-1\n",
    "label-float": b"3.0\n",
    "label-huge": b"9" * 5000 + b"\n",
    "label-with-text": b"3 four\n",
    "empty": b"",
    "only-comments": b"# labels\n# none\n",
    "nul-bytes": b"1\n\x00\x00\n",
    "50mb-line": BIG_LINE,
}
for _name, _data in CALIBRATION.items():
    case("calibration", _name)(lambda w, data=_data: quantize(w, None, "--calib", w.file("calib.txt", data)))


@case("calibration", "path-missing")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--calib", w.path("nowhere.txt"))


@case("calibration", "path-is-folder")
def _(w: Work) -> list[Any]:
    w.path("calib").mkdir()
    return quantize(w, None, "--calib", w.path("calib"))


@case("calibration", "plan-not-utf8")
def _(w: Work) -> list[Any]:
    return plan(w, "--calib", w.file("calib.txt", CALIBRATION["not-utf8"]))


# ------------------------------------------------------------------------------------- output paths


@case("output", "quantize-existing-file")
def _(w: Work) -> list[Any]:
    w.file("out", "keep")
    return quantize(w)


@case("output", "quantize-existing-file-overwrite")
def _(w: Work) -> list[Any]:
    w.file("out", "keep")
    return quantize(w, None, "--overwrite")


@case("output", "quantize-existing-checkpoint")
def _(w: Work) -> list[Any]:
    shutil.copytree(w.assets.checkpoint, w.path("out"))
    return quantize(w)


@case("output", "quantize-foreign-folder-overwrite")
def _(w: Work) -> list[Any]:
    w.file("out/notes.txt", "keep")
    return quantize(w, None, "--overwrite")


@case("output", "quantize-file-as-parent")
def _(w: Work) -> list[Any]:
    w.file("parent", "keep")
    return ["quantize", "reference", "--recipe", w.recipe(), "--out", w.path("parent") / "ckpt"]


@case("output", "quantize-read-only-parent")
def _(w: Work) -> list[Any]:
    return ["quantize", "reference", "--recipe", w.recipe(), "--out", w.read_only_folder() / "ckpt"]


@case("output", "plan-existing-file")
def _(w: Work) -> list[Any]:
    w.file("plan.json", "keep")
    return plan(w)


@case("output", "plan-out-is-folder")
def _(w: Work) -> list[Any]:
    w.path("plan.json").mkdir()
    return plan(w, "--overwrite")


@case("output", "plan-file-as-parent")
def _(w: Work) -> list[Any]:
    w.file("parent", "keep")
    return ["plan", "reference", "--recipe", w.adatsq_recipe(), "--out", w.path("parent") / "plan.json"]


@case("output", "plan-read-only-parent")
def _(w: Work) -> list[Any]:
    out = w.read_only_folder() / "plan.json"
    return ["plan", "reference", "--recipe", w.adatsq_recipe(), "--out", out]


@case("output", "plan-existing-frontier")
def _(w: Work) -> list[Any]:
    w.file("f.json", "keep")
    return plan(w, "--frontier", w.path("f.json"))


@case("output", "export-existing-file")
def _(w: Work) -> list[Any]:
    w.file("out", "keep")
    return ["export", w.checkpoint(), "--to", "quanto", "--out", w.path("out"), "--overwrite"]


@case("output", "export-file-as-parent")
def _(w: Work) -> list[Any]:
    w.file("parent", "keep")
    return ["export", w.checkpoint(), "--to", "quanto", "--out", w.path("parent") / "x"]


@case("output", "export-onto-its-source")
def _(w: Work) -> list[Any]:
    ckpt = w.checkpoint()
    return ["export", ckpt, "--to", "quanto", "--out", ckpt, "--overwrite"]


@case("output", "tokens-show-existing-file")
def _(w: Work) -> list[Any]:
    w.file("map.png", "keep")
    return ["tokens", "show", "canvas:3", "--out", w.path("map.png")]


@case("output", "tokens-show-read-only-parent")
def _(w: Work) -> list[Any]:
    return ["tokens", "show", "canvas:3", "--out", w.read_only_folder() / "map.png"]


@case("output", "tokens-bench-existing-file")
def _(w: Work) -> list[Any]:
    w.file("bench.json", "keep")
    return ["tokens", "bench", "--samples", "1", "--out", w.path("bench.json")]


# ---------------------------------------------------------------------------------------- CLI args


@case("args", "seed-beyond-64-bits")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--seed", str(2**64))


@case("args", "seed-negative")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--seed", "-3")


@case("args", "seed-not-int")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--seed", "abc")


@case("args", "device-tpu")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--device", "tpu")


@case("args", "device-garbage")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--device", "cuda:x")


@case("args", "device-empty")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--device", "")


@case("args", "device-cuda-without-cuda", fresh_process=True)
def _(w: Work) -> list[Any]:
    w.env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU visible, whatever the machine has
    return quantize(w, None, "--device", "cuda")


@case("args", "device-cuda-index-out-of-range")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--device", "cuda:99")


@case("args", "dtype-int8")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--dtype", "int8")


@case("args", "devices-mismatch")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--devices", "2")


@case("args", "devices-zero")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--devices", "0")


@case("args", "missing-recipe")
def _(w: Work) -> list[Any]:
    return ["quantize", "reference", "--out", w.path("out")]


@case("args", "unknown-option")
def _(w: Work) -> list[Any]:
    return quantize(w, None, "--colour", "blue")


@case("args", "unknown-command")
def _(w: Work) -> list[Any]:
    return ["quantise", "reference"]


@case("args", "no-command")
def _(w: Work) -> list[Any]:
    return []


@case("args", "plot-without-frontier")
def _(w: Work) -> list[Any]:
    return plan(w, "--plot", w.path("f.png"))


@case("args", "eval-samples-zero")
def _(w: Work) -> list[Any]:
    return ["eval", w.checkpoint(), "--samples", "0"]


@case("args", "eval-samples-not-int")
def _(w: Work) -> list[Any]:
    return ["eval", w.checkpoint(), "--samples", "many"]


@case("args", "eval-seed-beyond-64-bits")
def _(w: Work) -> list[Any]:
    return ["eval", w.checkpoint(), "--samples", "1", "--seed", str(2**64)]


@case("args", "export-segment-negative")
def _(w: Work) -> list[Any]:
    return ["export", w.checkpoint(), "--to", "quanto", "--segment", "-1", "--out", w.path("out")]


@case("args", "export-unknown-target")
def _(w: Work) -> list[Any]:
    return ["export", w.checkpoint(), "--to", "onnx", "--out", w.path("out")]


ESTIMATE_ARGS = {
    "devices-zero": ["--devices", "0"],
    "height-zero": ["--height", "0"],
    "height-negative": ["--height", "-64"],
    "width-huge": ["--width", str(10**30)],
    "segments-zero": ["--segments", "0"],
    "text-tokens-negative": ["--text-tokens", "-1"],
    "cfg-calls-zero": ["--cfg-calls", "0"],
    "frames-zero": ["--frames", "0"],
}
for _name, _extra in ESTIMATE_ARGS.items():
    case("args", f"estimate-{_name}")(lambda w, extra=_extra: estimate(CONFIGS / "flux.1-dev", w, *extra))


# -------------------------------------------------------------------------------------------- tokens


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES: dict[str, tuple[str, bytes]] = {
    "text-named-png": ("img.png", b"this is not an image\n"),
    "truncated-png": ("img.png", png((48, 48))[:40]),
    "png-wrong-size": ("img.png", png((10, 10))),
    "npy-wrong-shape": ("img.npy", npy(np.zeros((10, 10), np.float32))),
    "npy-3d": ("img.npy", npy(np.zeros((1, 48, 48), np.float32))),
    "npy-scalar": ("img.npy", npy(np.float32(1.0))),
    "npy-object": ("img.npy", npy(np.array([[{"a": 1}] * 48] * 48, dtype=object))),
    "npy-strings": ("img.npy", npy(np.full((48, 48), "x"))),
    "npy-complex": ("img.npy", npy(np.zeros((48, 48), np.complex64))),
    "npy-nan": ("img.npy", npy(np.full((48, 48), np.nan, np.float32))),
    "npy-garbage": ("img.npy", b"\x93NUMPY garbage"),
    "npy-empty-file": ("img.npy", b""),
}
for _name, (_file, _data) in IMAGES.items():
    case("tokens", f"show-{_name}")(
        lambda w, f=_file, d=_data: ["tokens", "show", w.file(f, d), "--out", w.path("map.png")]
    )

SHOW_ARGS = {
    "canvas-seed-text": ["canvas:abc"],
    "canvas-seed-negative": ["canvas:-1"],
    "canvas-seed-superscript": ["canvas:²"],
    "image-missing": ["nowhere.png"],
    "method-unknown": ["canvas:3", "--method", "nope"],
    "keep-zero": ["canvas:3", "--keep", "0"],
    "keep-above-one": ["canvas:3", "--keep", "1.5"],
    "keep-nan": ["canvas:3", "--keep", "nan"],
    "model-unknown": ["canvas:3", "--model", "no-such-model"],
}
for _name, _args in SHOW_ARGS.items():
    case("tokens", f"show-{_name}")(lambda w, a=_args: ["tokens", "show", *a, "--out", w.path("map.png")])

BENCH_ARGS = {
    "samples-zero": ["--samples", "0"],
    "samples-negative": ["--samples", "-5"],
    "keep-zero": ["--keep", "0"],
    "keep-garbage": ["--keep", "half"],
    "keep-empty": ["--keep", ""],
    "methods-unknown": ["--methods", "nope"],
    "methods-empty": ["--methods", ""],
}
for _name, _args in BENCH_ARGS.items():
    case("tokens", f"bench-{_name}")(
        lambda w, a=_args: ["tokens", "bench", *SMALL_BENCH, *a, "--out", w.path("bench.json")]
    )


# ---------------------------------------------------------------------------------------------- running

KINDS = sorted({c.kind for c in CASES})
MAX_LINE = 1100  # characters: a clear line, never a whole input echoed back


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden ones too) -> its bytes (None for folders and links)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        regular = path.is_file() and not path.is_symlink()
        out[str(path.relative_to(root))] = path.read_bytes() if regular else None
    return out


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    escaped: str | None  # the traceback of an exception that left main(), if any
    changed: list[str]  # paths under the case folder created, removed or modified
    seconds: float = 0.0

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()

    @property
    def verdict(self) -> str:
        if self.escaped is not None or "Traceback" in self.stderr:
            return "traceback"
        if self.rc == 0:
            return "accepted-wrong"
        one = len(self.lines) == 1 and 0 < len(self.lines[0].strip()) <= MAX_LINE
        if self.rc == 2 and one and not self.changed:
            return "one-line"
        return "messy"

    def describe(self) -> str:
        return (
            f"verdict={self.verdict} rc={self.rc} changed={self.changed[:5]}\n"
            f"stderr ({len(self.lines)} lines): {self.stderr[-3000:]}\n{self.escaped or ''}"
        )


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]  # fmt: skip
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


def _in_process(argv: list[str]) -> tuple[int | None, str, str, str | None]:
    from adatsq.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # what the CLI's logging.basicConfig would print
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    # libraries' own handlers (transformers, diffusers) print on the process's stderr: send them here too
    streams = {h: h.setStream(err) for h in _stream_handlers()}
    escaped, rc = None, None
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", DeprecationWarning)
            with contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except SystemExit as exit_:
                    rc = exit_.code if isinstance(exit_.code, int) else 1
                except BaseException:  # a crash is what the corpus looks for  # noqa: BLE001
                    escaped = traceback.format_exc()
        for w in caught:  # a real process prints each warning on stderr
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    finally:
        root.removeHandler(handler)
        for h, stream in streams.items():
            h.setStream(stream)
    return rc, out.getvalue(), err.getvalue(), escaped


def _fresh_process(argv: list[str], env: dict[str, str]) -> tuple[int | None, str, str, str | None]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **env}
    run = subprocess.run([sys.executable, "-m", "adatsq.cli", *argv], capture_output=True, text=True,
                         env=environment, timeout=600)  # fmt: skip
    return run.returncode, run.stdout, run.stderr, None


def run_case(c: Case, root: Path, assets: Assets) -> Outcome:
    """Build `c` in the empty folder `root`, run it, and compare the folder before and after."""
    import time

    work = Work(root, assets)
    root.mkdir(parents=True, exist_ok=True)
    try:
        argv = [str(a) for a in c.build(work)]
        before = snapshot(root)
        start = time.perf_counter()
        if c.fresh_process:
            rc, out, err, escaped = _fresh_process(argv, work.env)
        else:
            rc, out, err, escaped = _in_process(argv)
        seconds = time.perf_counter() - start
        after = snapshot(root)
    finally:
        for cleanup in reversed(work.cleanups):
            cleanup()
    changed = sorted(k for k in set(before) | set(after) if before.get(k, b"") != after.get(k, b""))
    changed += sorted(k for k in set(before) ^ set(after) if k not in changed)
    return Outcome(rc, out, err, escaped, sorted(set(changed)), seconds)
