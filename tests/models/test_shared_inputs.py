"""The static shared-input rules and block order of models/layers.py, checked against real forwards.

A forward pre-hook on every Linear of each tiny pipeline keeps a reference to its input (so storage
cannot be reused within a call): layers of one group must read one tensor in every denoiser call, and
no two groups may read the same one (a missed sharing would cost an accumulator). Time-invariant groups
must see the same values at every step.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from adatsq.models.diffusers.adapter import DiffusersPipelineAdapter
from adatsq.models.layers import (
    AFTER,
    BEFORE,
    block_of,
    block_order,
    is_time_invariant,
    linear_names,
    shared_input_groups,
)

FAMILIES = ("flux", "sd3", "pixart-sigma", "dit", "wan", "z-image", "qwen-image")
STEPS = 2


def _record(adapter: DiffusersPipelineAdapter) -> list[dict[str, torch.Tensor]]:
    """Per denoiser call: {layer name: the input tensor itself} for every Linear of the denoiser."""
    denoiser = adapter.denoiser()
    calls: list[dict[str, torch.Tensor]] = []
    handles = [denoiser.register_forward_pre_hook(lambda m, a: calls.append({}))]
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(
                module.register_forward_pre_hook(lambda m, a, name=name: calls[-1].setdefault(name, a[0]))
            )
    try:
        adapter.generate(adapter.default_inputs(1, seed=0), seed=0, num_steps=STEPS)
    finally:
        for h in handles:
            h.remove()
    return calls


def _storage(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride())


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_read_one_tensor_and_no_two_groups_share(family, tiny_pipeline_dir):
    adapter = DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir(family))
    groups = shared_input_groups(adapter.denoiser())
    names = linear_names(adapter.denoiser())
    assert sorted(n for g in groups for n in g) == sorted(names)  # every Linear exactly once
    calls = _record(adapter)
    assert len(calls) >= STEPS
    for call in calls:
        owners: dict[tuple, set[int]] = defaultdict(set)
        for i, group in enumerate(groups):
            seen = {_storage(call[n]) for n in group if n in call}
            assert len(seen) <= 1, f"{family}: group {group[:3]}... reads {len(seen)} different tensors"
            for key in seen:
                owners[key].add(i)
        shared = [sorted(groups[i][0] for i in ids) for ids in owners.values() if len(ids) > 1]
        assert shared == [], f"{family}: these groups read one tensor and should be merged: {shared}"
    per_step = len(calls) // STEPS  # CFG pipelines call the denoiser more than once per step
    for group in filter(is_time_invariant, groups):
        for first, later in zip(calls, calls[per_step:], strict=False):
            assert torch.equal(first[group[0]], later[group[0]]), f"{family}: {group[0]} varies with t"


def test_rules_the_brief_names(tiny_pipeline_dir):
    """The shared groups the issue lists, by name (the forward test above makes them honest)."""
    flux = {
        g
        for g in shared_input_groups(
            DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("flux")).denoiser()
        )
    }
    assert (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
    ) in flux
    single = "single_transformer_blocks.1"
    assert any(
        set(g) == {f"{single}.attn.to_q", f"{single}.attn.to_k", f"{single}.attn.to_v", f"{single}.proj_mlp"}
        for g in flux
    )
    wan = shared_input_groups(DiffusersPipelineAdapter.from_folder(tiny_pipeline_dir("wan")).denoiser())
    kv = [g for g in wan if is_time_invariant(g)]
    assert kv == [
        ("blocks.0.attn2.to_k", "blocks.0.attn2.to_v", "blocks.1.attn2.to_k", "blocks.1.attn2.to_v")
    ]


def test_block_order():
    names = [
        "proj_out",
        "single_transformer_blocks.0.proj_mlp",
        "transformer_blocks.10.attn.to_q",
        "transformer_blocks.2.attn.to_q",
        "x_embedder",
        "norm_out.linear",
    ]
    assert block_order(names) == [
        BEFORE,
        "transformer_blocks.2",
        "transformer_blocks.10",
        "single_transformer_blocks.0",
        AFTER,
    ]
    assert block_of("layers.3.feed_forward.w1") == "layers.3"
    assert block_order(
        ["layers.0.attention.to_q", "context_refiner.1.attention.to_q", "noise_refiner.0.x"]
    ) == [
        "noise_refiner.0",
        "context_refiner.1",
        "layers.0",
    ]
    assert block_of("all_final_layer.2-1.linear") == AFTER and block_of("t_embedder.mlp.0") == BEFORE
