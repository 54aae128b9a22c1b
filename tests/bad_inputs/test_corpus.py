"""Every bad input of the corpus (cases.py): exit code 2, one line on stderr, nothing written or changed."""

from __future__ import annotations

import pytest
from cases import CASES, KINDS, Assets, Skip, run_case


@pytest.fixture(scope="session")
def assets(quantized_reference, tmp_path_factory):
    qmodel, checkpoint = quantized_reference("rtn", 4)  # the session's shared RTN W4 checkpoint
    return Assets.build(tmp_path_factory.mktemp("corpus"), qmodel, checkpoint)


def test_the_corpus_covers_every_kind():
    assert len(CASES) >= 150 and len({c.id for c in CASES}) == len(CASES)
    assert set(KINDS) >= {"recipe", "model", "checkpoint", "plan", "frontier", "budget", "calibration",
                          "output", "args", "tokens"}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, assets, tmp_path):
    try:
        outcome = run_case(case, tmp_path / "case", assets)
    except Skip as why:
        pytest.skip(str(why))
    assert outcome.verdict == "one-line", outcome.describe()
