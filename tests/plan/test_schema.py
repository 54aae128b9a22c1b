import json

import pytest

from adatsq.calibrate.segments import split_steps
from adatsq.errors import PlanError
from adatsq.plan.schema import (
    Budget,
    PartialPlan,
    Plan,
    check_plan_matches,
    load_plan,
    save_plan,
)


def make_plan(**overrides) -> Plan:
    fields = dict(
        layers={"blocks.0.attn.to_q": (8, 4, 4, 3), "blocks.0.ff.net.2": (4, 4, 6, 6)},
        segments=split_steps(10, 4),
        num_steps=10,
        act_bits={"blocks.0.attn.to_q": 8, "blocks.0.ff.net.2": 16},
        candidates=(3, 4, 6, 8),
        fisher_weights=[0.1 + 0.2, 0.2, 0.25, 0.25 - 1e-17],
        model={"family": "reference-dit", "fingerprint": "0123abcd"},
        budget=Budget("avg_bits", 4.5),
        metrics={"avg_bits": 4.75, "bytes": 1234, "proxy_error": 1 / 3, "measured_error": None},
    )
    return Plan(**{**fields, **overrides})


def test_act_bits_follow_the_quantizer():
    """Plans accept exactly the activation bits ActScheme runs, plus 16 for float activations."""
    with pytest.raises(PlanError, match="act_bits"):
        make_plan(act_bits=6)
    assert make_plan(act_bits=4).act_bits == 4


@pytest.mark.parametrize("overrides", [{}, {"budget": None, "act_bits": 8, "metrics": {}}])
def test_plan_json_round_trips_exactly(tmp_path, overrides):
    plan = make_plan(**overrides)
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.fisher_weights == plan.fisher_weights  # floats bit-exact
    assert save_plan(loaded, tmp_path / "again.json").read_text() == path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp files left


def test_construction_canonicalises_to_what_loading_gives():
    import numpy as np

    plan = make_plan(layers={"a": np.array([8, 4, 4, 3]), "b": [np.int64(4)] * 4}, act_bits=np.int64(8))
    assert plan.layers == {"a": (8, 4, 4, 3), "b": (4, 4, 4, 4)} and type(plan.layers["b"][0]) is int
    assert plan.bits_array().tolist() == [[8, 4, 4, 3], [4, 4, 4, 4]]
    assert plan.variants("a") == (3, 4, 8) and plan.act_bits_of("b") == 8


def write(tmp_path, data) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def edit(data, key, value):
    data = json.loads(json.dumps(data))
    data[key] = value
    return data


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("colour", "blue", r"unknown keys \['colour'\]"),
        ("format_version", 2, "format_version 2 is not supported"),
        ("layers", {"blocks.0.attn.to_q": [8, 4, 4]}, "must list 4 bit-widths"),
        ("layers", {"blocks.0.attn.to_q": [8, 4, 4, 5]}, r"= 5 is not supported; allowed: \[2, 3, 4, 6, 8\]"),
        ("layers", {"blocks.0.attn.to_q": ["8", 4, 4, 4]}, "must be an integer"),
        ("segments", [[0, 3], [4, 6], [6, 8], [8, 10]], "contiguous"),
        ("segments", [[0, 3], [3, 6], [6, 8], [8, 9]], "end at step 9 but num_steps is 10"),
        ("fisher_weights", [0.5, 0.5], "must list 4 numbers"),
        ("fisher_weights", [0.5, 0.5, 0.5, 0.5], "sum to 1"),
        ("act_bits", 5, r"act_bits = 5 is not supported; allowed: \[4, 8, 16\]"),
        ("act_bits", {"blocks.0.attn.to_q": 8}, "must name every layer"),
        ("model", {"family": "x"}, "fingerprint"),
        ("budget", {"kind": "flops", "value": 3}, "budget kind 'flops' is unknown"),
        ("metrics", {"avg_bits": "high"}, "must be a number"),
        ("candidates", [8, 4], "ascending"),
    ],
)
def test_load_names_each_problem(tmp_path, key, value, match):
    data = make_plan().to_dict()
    with pytest.raises(PlanError, match=match):
        load_plan(write(tmp_path, edit(data, key, value)))


def test_load_rejects_missing_keys_bad_json_and_missing_files(tmp_path):
    data = make_plan().to_dict()
    del data["segments"]
    with pytest.raises(PlanError, match=r"missing keys \['segments'\]"):
        load_plan(write(tmp_path, data))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "none.json")


def test_check_plan_matches_names_mismatched_layers_and_steps():
    plan = make_plan()
    check_plan_matches(plan, ["blocks.0.ff.net.2", "blocks.0.attn.to_q"], 10)
    with pytest.raises(
        PlanError, match=r"1 missing \['blocks.1.attn.to_q'\], 1 extra \['blocks.0.ff.net.2'\]"
    ):
        check_plan_matches(plan, ["blocks.0.attn.to_q", "blocks.1.attn.to_q"], 10)
    with pytest.raises(PlanError, match="10-step sampler but it runs 50 steps"):
        check_plan_matches(plan, plan.layer_names, 50)


def test_partial_plan_knows_where_it_ends():
    partial = PartialPlan({"a": (8, 4)}, 8, tuple(split_steps(10, 4)))
    assert partial.last_segment == 1 and partial.end_step == 6 and not partial.is_complete


def test_fisher_method_is_recorded_and_older_plans_still_load(tmp_path):
    plan = make_plan(fisher_method="perturbation")
    assert load_plan(save_plan(plan, tmp_path / "p.json")).fisher_method == "perturbation"
    data = json.loads((tmp_path / "p.json").read_text())
    del data["fisher_method"]  # a plan written before the method was recorded
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_plan(tmp_path / "old.json").fisher_method == "unrecorded"
    with pytest.raises(PlanError, match="fisher_method"):
        make_plan(fisher_method="guess")
