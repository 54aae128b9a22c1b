import json

import numpy as np
import pytest

from adatsq.errors import PlanError
from adatsq.plan.beam import uniform_plan
from adatsq.plan.frontier import Frontier, FrontierPoint, build_frontier, load_frontier, save_frontier, sweep
from adatsq.plan.inspect import inspect_plan_file
from adatsq.plan.plots import plot_frontier, plot_plan
from adatsq.plan.problem import SearchConfig
from adatsq.plan.schema import Budget, save_plan

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def problem(make_problem):
    return make_problem(n_layers=10, n_segments=4, seed=7)


def budgets(kind, problem, factors=(0.8, 0.9, 1.0, 1.15, 1.3, 1.6)):
    base = uniform_plan(problem, 4).metrics[kind]
    return [Budget(kind, f * base) for f in factors]


def assert_monotone(frontier: Frontier):
    costs, errors = frontier.costs(), frontier.errors()
    assert all(np.diff(costs) > 0) and all(np.diff(errors) < 0)
    for i, (c, e) in enumerate(zip(costs, errors, strict=True)):
        others = [(c2, e2) for j, (c2, e2) in enumerate(zip(costs, errors, strict=True)) if j != i]
        assert not any(c2 <= c and e2 <= e for c2, e2 in others)


@pytest.mark.parametrize("kind", ["avg_bits", "bops"])
def test_sweep_gives_a_monotone_non_dominated_frontier(problem, kind):
    result = sweep(problem, budgets(kind, problem))
    assert result.kind == kind and result.method == "beam" and result.error_metric == "proxy_error"
    assert len(result.points) >= 5
    assert_monotone(result)
    for point in result.points:
        assert point.metrics[kind] <= point.budget.value * (1 + 1e-9)
        assert point.search_seconds > 0


def test_sweep_with_measure_ranks_by_measured_error(problem):
    calls = []

    def measure(partial):
        calls.append(partial.last_segment)
        idx = np.searchsorted(problem.table_bits, np.array([partial.bits[n] for n in problem.names]))
        return problem.proxy_error(idx) * 1.5

    result = sweep(
        problem, budgets("avg_bits", problem, (0.9, 1.0, 1.2)), SearchConfig(beam_width=2), measure
    )
    assert result.error_metric == "measured_error"
    assert sum(p.measure_calls for p in result.points) <= len(calls)
    assert_monotone(result)


def test_build_frontier_drops_dominated_plans(problem):
    results = [uniform_plan(problem, b) for b in (8, 3, 4, 6)] + [uniform_plan(problem, 4)]
    frontier = build_frontier(results, "avg_bits")
    assert [p.metrics["avg_bits"] for p in frontier.points] == [3, 4, 6, 8]
    with pytest.raises(PlanError, match="does not cost more and err less"):
        Frontier("avg_bits", "uniform", "proxy_error", tuple(reversed(frontier.points)))
    with pytest.raises(PlanError, match="one kind"):
        sweep(problem, [Budget("avg_bits", 4.0), Budget("bytes", 1e6)])


def test_frontier_json_round_trips_and_is_validated(problem, tmp_path):
    frontier = sweep(problem, budgets("avg_bits", problem, (0.9, 1.2)), method="static")
    path = save_frontier(frontier, tmp_path / "frontier.json")
    assert load_frontier(path) == frontier
    data = json.loads(path.read_text())
    data["points"][0]["metrics"]["avg_bits"] = 1.0
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="differ from its plan"):
        load_frontier(tmp_path / "edited.json")
    data = json.loads(path.read_text())
    data["format_version"] = 7
    (tmp_path / "future.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="format_version 7 is not supported"):
        load_frontier(tmp_path / "future.json")
    assert "static frontier, 2 non-dominated plans" in inspect_plan_file(path)


def test_plots_are_written(problem, tmp_path):
    frontier = sweep(problem, budgets("avg_bits", problem, (0.9, 1.0, 1.2)))
    uniform = build_frontier([uniform_plan(problem, b) for b in (3, 4, 6, 8)], "avg_bits")
    plot_frontier(frontier, tmp_path / "frontier.png", compare={"uniform": uniform})
    plot_plan(frontier.points[1].plan, tmp_path / "plan.png")
    for name in ("frontier.png", "plan.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.png", "plan.png"]
    point = FrontierPoint(frontier.points[0].plan, 0.1, 0)
    save_plan(point.plan, tmp_path / "plan.json")
    assert "blocks.0.linear" in inspect_plan_file(tmp_path / "plan.json")
