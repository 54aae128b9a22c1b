"""Bad-input corpus: a valid reference checkpoint, mutated one way per case, is refused with one line.

Every case raises CheckpointError from `adatsq.load`, `load_checkpoint` and `inspect_checkpoint` (one
shared validation), naming what is wrong; a handful also go through `adatsq inspect` (exit 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adatsq
from adatsq.checkpoint.inspect import inspect_checkpoint
from adatsq.checkpoint.load import load_checkpoint
from adatsq.errors import CheckpointError

LAYER = "transformer_blocks.0.attn1.to_q"  # a quantized layer: 128 -> 128, group 32, 4 bits
FLOAT = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"  # kept in float: [128, 256]
# format 2: the reference DiT is the transformer/ component (config.json with quantization_config)
BASE_JSON = "reference_base.json"
CONFIG = "transformer/config.json"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def valid(quantized_reference, tmp_path_factory):
    """(one-file checkpoint, the same model in shards): RTN, so they are built in seconds."""
    qmodel, one = quantized_reference("rtn", 4)
    many = tmp_path_factory.mktemp("bad") / "many"
    qmodel.save(many, max_shard_size="200KB")
    return one, many


# ------------------------------------------------------------------------------------------ mutations


def config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        data = json.loads((d / CONFIG).read_text())
        edit(data["quantization_config"])
        (d / CONFIG).write_text(json.dumps(data))

    return mutate


def layer(**fields) -> Callable[[Path], None]:
    return config(lambda c: c["layers"][LAYER].update(fields))


def tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite model.safetensors with `edit` applied (checksums are left as saved)."""

    def mutate(d: Path) -> None:
        data = load_file(str(d / WEIGHTS))
        edit(data)
        save_file(data, str(d / WEIGHTS))

    return mutate


def retype(key: str, dtype: torch.dtype) -> Callable[[Path], None]:
    return tensors(lambda t: t.update({key: t[key].to(dtype)}))


def reshape(key: str, cut: int = 1) -> Callable[[Path], None]:
    return tensors(lambda t: t.update({key: t[key][..., cut:].contiguous()}))


def header(d: Path) -> tuple[bytes, dict, bytes]:
    raw = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[:8], json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(d: Path, head: dict, body: bytes) -> None:
    text = json.dumps(head).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + body)


def swap_offsets(a: str, b: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        _, head, body = header(d)
        head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
        write_header(d, head, body)

    return mutate


def flip_bit(key: str, byte: int, bit: int) -> Callable[[Path], None]:
    """Flip one bit of a tensor's stored bytes in place (header untouched)."""

    def mutate(d: Path) -> None:
        _, head, body = header(d)
        raw = bytearray((d / WEIGHTS).read_bytes())
        raw[len(raw) - len(body) + head[key]["data_offsets"][0] + byte] ^= 1 << bit
        (d / WEIGHTS).write_bytes(bytes(raw))

    return mutate


def raw_bytes(edit: Callable[[bytes], bytes], name: str = WEIGHTS) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / name).write_bytes(edit((d / name).read_bytes()))

    return mutate


def base(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        data = json.loads((d / BASE_JSON).read_text())
        edit(data)
        (d / BASE_JSON).write_text(json.dumps(data))

    return mutate


def drop(key: str) -> Callable[[Path], None]:
    return tensors(lambda t: t.pop(key))


def index(edit: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        data = json.loads((d / INDEX).read_text())
        edit(data, d)
        (d / INDEX).write_text(json.dumps(data))

    return mutate


def shard(i: int, d: Path) -> Path:
    return sorted(d.glob("transformer/diffusion_pytorch_model-*.safetensors"))[i]


def _foreign_shard(d: Path) -> None:
    shutil.copy(shard(2, d), shard(1, d))


def _wrong_shard_for_key(data: dict, d: Path) -> None:
    key = next(k for k, v in data["weight_map"].items() if v == shard(0, d).name)
    data["weight_map"][key] = shard(1, d).name


# (id, mutation, what the message must name, sharded?)
CASES = [
    # damaged safetensors files
    ("truncated-half", raw_bytes(lambda b: b[: len(b) // 2]), "truncated or corrupted", False),
    ("truncated-in-header-length", raw_bytes(lambda b: b[:4]), "truncated or corrupted", False),
    ("empty-weights-file", raw_bytes(lambda b: b""), "truncated or corrupted", False),
    (
        "header-length-huge",
        raw_bytes(lambda b: struct.pack("<Q", 1 << 40) + b[8:]),
        "truncated or corrupted",
        False,
    ),
    ("header-json-garbage", raw_bytes(lambda b: b[:8] + b"{" * 64 + b[72:]), "truncated or corrupted", False),
    (
        "swapped-offsets-same-size",
        swap_offsets(f"{LAYER}.w4.scales", "transformer_blocks.0.attn1.to_k.w4.scales"),
        r"attn1\.to_[qk]\.w4\.scales' .*sha256",
        False,
    ),
    (
        "swapped-offsets-other-size",
        swap_offsets(f"{LAYER}.w4.qweight", f"{LAYER}.w4.bias"),
        "truncated or corrupted",
        False,
    ),
    (
        "flipped-fp16-exponent-bit",
        flip_bit(f"{LAYER}.w4.scales", 1, 6),
        f"{LAYER}.w4.scales' .*sha256",
        False,
    ),
    ("flipped-qweight-byte", flip_bit(f"{LAYER}.w4.qweight", 100, 0), f"{LAYER}.w4.qweight' .*sha256", False),
    ("flipped-float-tensor-byte", flip_bit(FLOAT, 7, 3), f"{FLOAT}' .*sha256", False),
    ("weights-file-missing", lambda d: (d / WEIGHTS).unlink(), "model.safetensors is missing", False),
    # wrong dtypes / shapes
    (
        "qweight-int32",
        retype(f"{LAYER}.w4.qweight", torch.int32),
        r"w4.qweight' is I32 \[128, 64\].*U8",
        False,
    ),
    (
        "scales-float32",
        retype(f"{LAYER}.w4.scales", torch.float32),
        r"w4.scales' is F32 \[128, 4\].*F16",
        False,
    ),
    ("zeros-float16", retype(f"{LAYER}.w4.zeros", torch.float16), r"w4.zeros' is F16", False),
    ("bias-int64", retype(f"{LAYER}.w4.bias", torch.int64), r"w4.bias' is I64", False),
    (
        "qweight-short-rows",
        reshape(f"{LAYER}.w4.qweight"),
        r"w4.qweight' is U8 \[128, 63\].*\[128, 64\]",
        False,
    ),
    ("scales-wrong-groups", reshape(f"{LAYER}.w4.scales"), r"w4.scales' is F16 \[128, 3\]", False),
    ("bias-wrong-length", reshape(f"{LAYER}.w4.bias"), r"w4.bias' is F32 \[127\]", False),
    ("float-tensor-wrong-shape", reshape(FLOAT), rf"{FLOAT}' is F32 \[128, 255\].*\[128, 256\]", False),
    ("float-tensor-int32", retype(FLOAT, torch.int32), rf"{FLOAT}' is I32", False),
    # missing / extra tensors
    ("missing-scales", drop(f"{LAYER}.w4.scales"), f"{LAYER}.w4.scales' is missing", False),
    ("missing-variant", drop(f"{LAYER}.w4.qweight"), f"{LAYER}.w4.qweight is missing", False),
    ("missing-float-tensor", drop(FLOAT), f"{FLOAT}' is missing", False),
    (
        "extra-unknown-tensor",
        tensors(lambda t: t.update(stray=torch.zeros(3))),
        "'stray' is not a tensor of the model",
        False,
    ),
    (
        "extra-variant-buffer",
        tensors(lambda t: t.update({f"{LAYER}.w4.extra": torch.zeros(3)})),
        "not a quantized-layer buffer",
        False,
    ),
    (
        "unused-8-bit-variant",
        tensors(lambda t: t.update({f"{LAYER}.w8.qweight": torch.zeros(128, 128, dtype=torch.uint8)})),
        "8-bit variant .* never uses",
        False,
    ),
    (
        "leftover-float-weight",
        tensors(lambda t: t.update({f"{LAYER}.weight": torch.zeros(128, 128)})),
        f"{LAYER}.weight' is not a tensor of the model",
        False,
    ),
    (
        "lowrank-a-without-b",
        tensors(lambda t: t.update({f"{LAYER}.w4.lowrank_a": torch.zeros(4, 128)})),
        "lowrank_b are not both present",
        False,
    ),
    # config edits, one per field kind
    ("config-invalid-json", raw_bytes(lambda b: b[:-10], CONFIG), "invalid JSON", False),
    ("config-not-utf8", raw_bytes(lambda b: b"\xff\xfe" + b, CONFIG), "not UTF-8", False),
    ("config-json-array", raw_bytes(lambda b: b"[1, 2]", CONFIG), "must hold a JSON object", False),
    ("config-format-version-1", config(lambda c: c.update(format_version=1)), "format_version 1 ", False),
    ("config-format-version-3", config(lambda c: c.update(format_version=3)), "3 .*upgrade adatsq", False),
    (
        "config-quant-method-other",
        config(lambda c: c.update(quant_method="gptq")),
        "is not an adatsq checkpoint",
        False,
    ),
    ("config-unknown-key", config(lambda c: c.update(colour="red")), "unknown keys \\['colour'\\]", False),
    (
        "config-missing-num-steps",
        config(lambda c: c.pop("num_steps")),
        "missing keys \\['num_steps'\\]",
        False,
    ),
    ("config-method-number", config(lambda c: c.update(method=3)), "method is 3", False),
    ("config-model-not-object", config(lambda c: c.update(model="reference")), "model is 'reference'", False),
    (
        "config-unknown-family",
        config(lambda c: c["model"].update(family="sd9")),
        "unknown model family 'sd9'",
        False,
    ),
    (
        "config-activation-bits-16",
        config(lambda c: c.update(activation={"bits": 16})),
        "activation.bits is 16",
        False,
    ),
    ("config-activation-list", config(lambda c: c.update(activation=[8])), "activation is \\[8\\]", False),
    ("config-num-steps-zero", config(lambda c: c.update(num_steps=0)), "num_steps is 0", False),
    ("config-num-steps-string", config(lambda c: c.update(num_steps="4")), "num_steps is '4'", False),
    ("config-timesteps-short", config(lambda c: c["timesteps"].pop()), "timesteps is .*num_steps=4", False),
    ("config-segments-empty", config(lambda c: c.update(segments=[])), "segments is \\[\\]", False),
    (
        "config-segments-off-schedule",
        config(lambda c: c.update(segments=[[999.0, 1.0]])),
        "segments\\[0\\]",
        False,
    ),
    (
        "config-segment-steps-gap",
        config(lambda c: c.update(segment_steps=[[0, 3]])),
        "segments\\[0\\].*its steps \\[1000.0, 334.0\\]",
        False,
    ),
    (
        "config-segment-steps-overrun",
        config(lambda c: c.update(segment_steps=[[0, 9]])),
        "segment_steps\\[0\\]",
        False,
    ),
    ("config-ignore-not-list", config(lambda c: c.update(ignore="x")), "ignore is 'x'", False),
    ("config-recipe-not-object", config(lambda c: c.update(recipe=None)), "recipe is None", False),
    ("config-layers-list", config(lambda c: c.update(layers=[])), "layers is \\[\\]", False),
    ("config-layer-unknown-key", layer(colour=1), "exactly the keys", False),
    ("config-bits-longer-than-segments", layer(bits=[4, 4]), r"\.bits is \[4, 4\].*1 ints", False),
    ("config-bits-empty", layer(bits=[]), r"\.bits is \[\]", False),
    ("config-bits-5", layer(bits=[5]), r"\.bits is \[5\].*\[2, 3, 4, 6, 8\]", False),
    ("config-bits-string", layer(bits=["4"]), r"\.bits is \['4'\]", False),
    ("config-bits-other-variant", layer(bits=[8]), f"{LAYER}.w8.qweight is missing", False),
    ("config-group-size-zero", layer(group_size=0), "group_size is 0", False),
    ("config-group-size-bool", layer(group_size=True), "group_size is True", False),
    ("config-group-size-other", layer(group_size=64), r"w4.scales' is F16 \[128, 4\].*\[128, 2\]", False),
    ("config-in-features-negative", layer(in_features=-128), "in_features is -128", False),
    (
        "config-out-features-other",
        layer(out_features=64),
        r"w4.qweight' is U8 \[128, 64\].*\[64, 64\]",
        False,
    ),
    ("config-symmetric-string", layer(symmetric="yes"), "symmetric is 'yes'", False),
    (
        "config-layer-not-in-model",
        config(lambda c: c["layers"].update({"nowhere": c["layers"][LAYER]})),
        "nowhere.w4.qweight is missing",
        False,
    ),
    (
        "config-checksum-garbage",
        config(lambda c: c["checksums"].update({FLOAT: "zz"})),
        "checksums is",
        False,
    ),
    (
        "config-checksum-missing",
        config(lambda c: c["checksums"].pop(FLOAT)),
        f"{FLOAT}' has no checksum",
        False,
    ),
    (
        "config-checksum-of-absent-tensor",
        config(lambda c: c["checksums"].update({"ghost": "0" * 64})),
        "checksums\\['ghost'\\]",
        False,
    ),
    # base/
    (
        "base-invalid-json",
        raw_bytes(lambda b: b"{not json", BASE_JSON),
        "reference_base.json is corrupted",
        False,
    ),
    (
        "base-missing-key",
        base(lambda b: b.pop("num_steps")),
        "reference_base.json: key 'num_steps' is missing",
        False,
    ),
    ("base-missing-nested-key", base(lambda b: b.pop("transformer")), "key 'transformer' is missing", False),
    ("base-json-array", raw_bytes(lambda b: b"[]", BASE_JSON), "must hold a JSON object", False),
    ("base-file-missing", lambda d: (d / BASE_JSON).unlink(), "reference_base.json is missing", False),
    (
        "base-other-model-size",
        base(lambda b: b["transformer"].update(num_layers=2)),
        "transformer_blocks.2.* is missing|not a tensor|Linear layers of the base model",
        False,
    ),
    ("base-wrong-type", base(lambda b: b["transformer"].update(num_layers="six")), "does not rebuild", False),
    # shards
    ("missing-shard", lambda d: shard(1, d).unlink(), "shard .* is missing", True),
    ("foreign-shard", _foreign_shard, "does not belong to this checkpoint", True),
    (
        "truncated-shard",
        lambda d: shard(0, d).write_bytes(shard(0, d).read_bytes()[:1000]),
        "does not belong",
        True,
    ),
    ("index-garbage", lambda d: (d / INDEX).write_text("}{"), "index.json is corrupted", True),
    ("index-no-sha256", index(lambda i, d: i["metadata"].pop("sha256")), "index.json is corrupted", True),
    ("index-weight-map-list", index(lambda i, d: i.update(weight_map=[])), "index.json is corrupted", True),
    (
        "index-path-traversal",
        index(lambda i, d: i["weight_map"].update({FLOAT: "../model.safetensors"})),
        "index.json is corrupted",
        True,
    ),
    ("index-key-in-wrong-shard", index(_wrong_shard_for_key), "does not hold tensor", True),
]


def broken_copy(valid, tmp_path: Path, mutate: Callable[[Path], None], sharded: bool) -> Path:
    target = shutil.copytree(valid[1] if sharded else valid[0], tmp_path / "broken")
    mutate(target)
    return target


def one_line(err: pytest.ExceptionInfo, match: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    assert re.search(match, text), f"{match!r} not in {text!r}"


def test_the_corpus_is_large():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("mutate", "match", "sharded"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_one_line_everywhere(valid, tmp_path, mutate, match, sharded):
    broken = broken_copy(valid, tmp_path, mutate, sharded)
    for entry in (adatsq.load, load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError) as err:
            entry(broken)
        one_line(err, match)


CLI_CASES = [  # each runs a fresh interpreter (seconds on a loaded machine)
    "qweight-int32",
    "base-missing-key",
    "flipped-fp16-exponent-bit",
]


def test_cli_inspect_exits_2_with_one_line(valid, tmp_path):
    cases = {c[0]: c for c in CASES}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    for i, name in enumerate(CLI_CASES):
        _, mutate, _, sharded = cases[name]
        broken = broken_copy(valid, tmp_path / str(i), mutate, sharded)
        run = subprocess.run([sys.executable, "-m", "adatsq.cli", "inspect", str(broken)],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert run.returncode == 2, (name, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("adatsq: error: "), (name, run.stderr)
        assert "Traceback" not in run.stderr and run.stdout == ""


def test_flipped_scale_bit_is_named_and_verify_false_loads(valid, tmp_path):
    key = f"{LAYER}.w4.scales"
    broken = broken_copy(valid, tmp_path, flip_bit(key, 1, 6), False)  # bit 14 of scale [0, 0]: its exponent
    with pytest.raises(CheckpointError, match=f"tensor '{key}' .* is damaged"):
        load_checkpoint(broken)
    adatsq.load(broken, verify=False)
    assert "42 quantized layers" in inspect_checkpoint(broken, verify=False)


def test_checkpoints_without_checksums_still_load(valid, tmp_path):
    old = broken_copy(valid, tmp_path, config(lambda c: c.pop("checksums")), False)
    _, config_ = load_checkpoint(old)
    assert "checksums" not in config_ and inspect_checkpoint(old)
    saved = json.loads((valid[0] / CONFIG).read_text())["quantization_config"]["checksums"]
    assert sorted(saved) == sorted(load_file(str(valid[0] / WEIGHTS)))
