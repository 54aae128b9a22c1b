"""The reducer interface: keep counts, context validation, registry lookups, clear errors."""

import pytest
import torch

from adatsq.errors import ConfigError, TokenReductionError
from adatsq.tokens.base import REDUCERS, ReductionContext, get_reducer, grid_positions, keep_count


@pytest.mark.parametrize(
    ("n", "keep", "min_keep", "expected"),
    [
        (100, 0.5, 1, 50),
        (1369, 0.5, 32, 685),
        (884, 0.5, 32, 442),
        (100, 0.01, 32, 32),
        (10, 1.0, 1, 10),
        (3, 0.1, 1, 1),
    ],
)
def test_keep_count(n, keep, min_keep, expected):
    assert keep_count(n, keep, min_keep) == expected


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_keep_outside_unit_interval_fails(keep):
    with pytest.raises(TokenReductionError, match="keep ratio must be in"):
        keep_count(10, keep, 1)
    with pytest.raises(TokenReductionError, match="keep ratio must be in"):
        ReductionContext(grid=(2, 5), keep=keep)


def test_min_keep_above_token_count_fails():
    with pytest.raises(TokenReductionError, match="min_keep=32 exceeds the 16 image tokens"):
        get_reducer("random").reduce(torch.randn(16, 4), ReductionContext(grid=(4, 4), keep=0.5, min_keep=32))


def test_grid_must_match_token_count():
    with pytest.raises(TokenReductionError, match="do not fill grid 3x5"):
        get_reducer("random").reduce(torch.randn(16, 4), ReductionContext(grid=(3, 5), keep=0.5))
    with pytest.raises(TokenReductionError, match="grid must be two positive integers"):
        ReductionContext(grid=(0, 4), keep=0.5)


@pytest.mark.parametrize(
    ("name", "field"), [("g2tr", "anchors"), ("fastv", "attention"), ("vnorm", "values")]
)
def test_missing_context_field_names_it(name, field):
    with pytest.raises(TokenReductionError, match=f"needs context.{field}.*attention backend/adapter"):
        get_reducer(name).reduce(torch.randn(16, 4), ReductionContext(grid=(4, 4), keep=0.5))


def test_registry_lists_every_reducer_and_rejects_unknown():
    get_reducer("grid")  # imports the built-ins
    assert REDUCERS.names() == ["fastv", "g2tr", "grid", "pdrop", "random", "tome", "visionzip", "vnorm"]
    with pytest.raises(ConfigError, match="supported: fastv, g2tr"):
        get_reducer("nope")
    with pytest.raises(TokenReductionError, match="bad options"):
        get_reducer("random", colour=1)


def test_grid_positions_row_major():
    assert grid_positions(torch.tensor([0, 4, 5, 11]), (3, 4)).tolist() == [[0, 0], [1, 0], [1, 1], [2, 3]]
