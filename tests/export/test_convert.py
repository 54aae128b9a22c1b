"""`export`: checks in order (target, output, source, target's limits), atomic output, the record."""

import json

import pytest

from adatsq.errors import ConfigError, ExportError
from adatsq.export.base import EXPORTERS, Selection
from adatsq.export.convert import export


def test_every_target_is_registered():
    assert EXPORTERS.names() == ["compressed-tensors", "gptqmodel", "quanto", "torchao"]


def test_unknown_target_and_existing_output_fail_before_reading(tmp_path):
    with pytest.raises(
        ConfigError, match="unknown export target 'onnx'; supported: compressed-tensors, gptqmodel"
    ):
        export(tmp_path / "missing", "onnx", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export(tmp_path / "missing", "quanto", tmp_path / "out")


def test_record_and_overwrite(make_checkpoint, tmp_path):
    checkpoint, out = make_checkpoint(mixed=True), tmp_path / "out"
    summary = export(checkpoint, "compressed-tensors", out, Selection(1))
    assert summary.startswith(f"wrote {out}: compressed-tensors pack-quantized, 5 config group(s)")
    assert summary.endswith(
        "7 layers (w2 ×1, w3 ×2, w4 ×1, w6 ×1, w8 ×2), the variant of timestep segment 1 (of 0..1)"
    )
    record = json.loads((out / "adatsq_export.json").read_text())
    assert record["target"] == "compressed-tensors" and record["selection"]["segment"] == 1
    assert record["selection"]["segment_steps"] == [[0, 2], [2, 4]]
    assert all(info["bits"] == info["row"][1] for info in record["layers"].values())
    assert any("timestep axis" in line for line in record["loses"])
    export(checkpoint, "compressed-tensors", out, Selection(), overwrite=True)
    assert json.loads((out / "adatsq_export.json").read_text())["selection"]["widest"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folders left


def test_plans_go_only_to_config_targets(plan_file, tmp_path):
    path = plan_file({"a": (4, 4), "b": (2, 8)})
    with pytest.raises(ConfigError, match=r"a plan does not have: .* one of gptqmodel, quanto, torchao"):
        export(path, "compressed-tensors", tmp_path / "ct", Selection(0))
    for target in ("torchao", "quanto"):
        assert "2 layers" in export(path, target, tmp_path / target, Selection(1))
    qmap = json.loads((tmp_path / "quanto" / "quanto_qmap.json").read_text())
    assert qmap == {
        "a": {"weights": "qint4", "activations": "none"},
        "b": {"weights": "qint8", "activations": "none"},
    }


def test_a_failed_export_writes_nothing(make_checkpoint, tmp_path):
    with pytest.raises(ExportError):
        export(make_checkpoint(mixed=True), "quanto", tmp_path / "q", Selection(0))  # a 6-bit layer
    assert list(tmp_path.iterdir()) == []
