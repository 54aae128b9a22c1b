"""Reading what is exported: the segment selection, plans, and sources that are not there."""

import pytest

from adatsq.errors import CheckpointError, ConfigError, PlanError
from adatsq.export.base import Selection
from adatsq.export.source import read_source
from adatsq.quant.scheme import WeightScheme


def test_each_selection_picks_its_variant(make_checkpoint):
    checkpoint = make_checkpoint(mixed=True)
    for selection, pick in (
        (Selection(0), lambda r: r[0]),
        (Selection(1), lambda r: r[1]),
        (Selection(), max),
    ):
        source = read_source(checkpoint, selection)
        assert all(layer.bits == pick(layer.row) for layer in source.layers.values())
        assert source.num_segments == 2 and source.kind == "checkpoint"
    assert "timestep segment 1 (of 0..1)" in read_source(checkpoint, Selection(1)).selection_text
    assert "widest" in read_source(checkpoint, Selection()).selection_text


def test_a_switching_checkpoint_needs_an_explicit_selection(make_checkpoint):
    with pytest.raises(
        ConfigError, match=r"pass --segment K \(0\.\.1: the variant used at that segment\) or --max"
    ):
        read_source(make_checkpoint(mixed=True), None)
    source = read_source(make_checkpoint(), None)  # no layer switches: nothing to choose
    assert source.selection_text.startswith("each layer's only variant")
    assert source.float_linears and "proj_out_1" in source.float_linears


@pytest.mark.parametrize("segment", [2, -1])
def test_segment_out_of_range(make_checkpoint, segment):
    with pytest.raises(
        ConfigError,
        match=rf"--segment {segment} is out of range: .* 2 timestep segment\(s\), so K must be in 0\.\.1",
    ):
        read_source(make_checkpoint(), Selection(segment))


def test_missing_sources(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a plan"):
        read_source(tmp_path / "nothing", None)
    with pytest.raises(PlanError, match="does not exist"):
        read_source(tmp_path / "plan.json", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"is not an adatsq checkpoint: neither adatsq_config\.json"):
        read_source(tmp_path / "empty", None)


def test_plans_take_their_scheme_from_the_recipe(plan_file, make_checkpoint):
    path = plan_file({"a": (4, 8), "b": (3, 3)}, act_bits={"a": 8, "b": 16})
    source = read_source(path, Selection(), weight=WeightScheme(4, 64, False))
    assert {n: (x.bits, x.group_size, x.symmetric, x.act_bits) for n, x in source.layers.items()} == {
        "a": (8, 64, False, 8), "b": (3, 64, False, None),
    }  # fmt: skip
    default = read_source(path, Selection(0)).layers["a"]
    assert (default.bits, default.group_size, default.symmetric) == (4, 128, True)
    with pytest.raises(ConfigError, match="--recipe only applies to a plan"):
        read_source(make_checkpoint(), None, weight=WeightScheme())
