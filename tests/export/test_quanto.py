"""optimum-quanto qmap: its shape here, and with quanto installed (the bench venv), that quantize +
freeze with it reproduces the same quantization_map and requantize accepts it."""

import json

import pytest
import torch

from adatsq.checkpoint.validate import open_checkpoint
from adatsq.errors import ExportError
from adatsq.export.base import Selection
from adatsq.export.convert import export


def test_qmap_and_what_quanto_cannot_hold(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint(act=8)
    summary = export(checkpoint, "quanto", tmp_path / "q")
    qmap = json.loads((tmp_path / "q" / "quanto_qmap.json").read_text())
    assert qmap and all(entry == {"weights": "qint4", "activations": "none"} for entry in qmap.values())
    record = json.loads((tmp_path / "q" / "adatsq_export.json").read_text())
    assert any(line.startswith("activation quantization") for line in record["loses"])
    assert "quanto qmap" in summary
    with pytest.raises(ExportError, match="exports 3-bit weights; quanto has qint2"):
        export(make_checkpoint(mixed=True), "quanto", tmp_path / "q2", Selection(1))


def test_quanto_applies_the_qmap(make_checkpoint, tmp_path):
    quanto = pytest.importorskip("optimum.quanto")
    checkpoint = make_checkpoint()
    export(checkpoint, "quanto", tmp_path / "q")
    qmap = json.loads((tmp_path / "q" / "quanto_qmap.json").read_text())
    model = open_checkpoint(checkpoint).adapter.denoiser()
    for qtype in {entry["weights"] for entry in qmap.values()}:
        quanto.quantize(model, weights=qtype, include=[n for n, e in qmap.items() if e["weights"] == qtype])
    quanto.freeze(model)
    assert quanto.quantization_map(model) == qmap
    reloaded = open_checkpoint(checkpoint).adapter.denoiser()
    quanto.requantize(reloaded, model.state_dict(), qmap)
    inputs = (torch.randn(2, 1, 16, 16), torch.tensor([500.0, 20.0]), torch.tensor([3, 7]))
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample, reloaded(*inputs).sample)
