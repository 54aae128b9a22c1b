import dataclasses
import itertools

import numpy as np
import pytest

from adatsq.errors import ConfigError, PlanError
from adatsq.plan.beam import METHODS, beam_search, greedy_plan, static_plan, uniform_plan
from adatsq.plan.cost import plan_costs
from adatsq.plan.problem import SearchConfig
from adatsq.plan.schema import Budget, PartialPlan


def brute_force_optimum(problem, kind, value, candidates):
    """Exhaustive min of the table error over every plan within budget (tiny problems only)."""
    n_layers, n_seg, _ = problem.error_table.shape
    options = [i for i, b in enumerate(problem.table_bits) if b in candidates]
    plans = np.array(list(itertools.product(options, repeat=n_layers * n_seg))).reshape(-1, n_layers, n_seg)
    bits = np.array(problem.table_bits)[plans]
    n = np.array([layer.n_params for layer in problem.layers], dtype=float)
    assert kind == "avg_bits"
    costs = (n[None, :, None] * bits).sum(axis=(1, 2)) / (n_seg * n.sum())
    layer_pos, seg_pos = np.meshgrid(range(n_layers), range(n_seg), indexing="ij")
    errors = problem.error_table[layer_pos[None], seg_pos[None], plans].sum(axis=(1, 2))
    return errors[costs <= value + 1e-9].min()


def table_measure(problem, table):
    """A separable 'end-to-end' error: the sum of `table` over the covered segments; counts its calls."""
    names, bits = problem.names, list(problem.table_bits)

    def measure(partial: PartialPlan) -> float:
        measure.calls += 1
        idx = np.array([[bits.index(b) for b in partial.bits[n]] for n in names])
        return float(table[np.arange(len(names))[:, None], np.arange(idx.shape[1])[None, :], idx].sum())

    measure.calls = 0
    return measure


@pytest.mark.parametrize("kind", ["avg_bits", "bops", "bytes"])
@pytest.mark.parametrize("method", ["beam", "greedy", "static"])
def test_every_search_returns_a_valid_plan_within_budget(make_problem, kind, method):
    problem = make_problem(n_layers=10, n_segments=4, seed=1)
    uniform4 = uniform_plan(problem, 4).metrics[kind]
    for value in (uniform4 * 0.9, uniform4 * 1.2):
        result = METHODS.get(method)(problem, Budget(kind, value), SearchConfig())
        bits = result.plan.bits_array(problem.names)
        assert set(np.unique(bits)) <= {3, 4, 6, 8}
        assert result.metrics[kind] <= value * (1 + 1e-9)
        assert result.metrics == {**plan_costs(bits, problem.layers, 8), **_errors(result)}
        assert result.metrics["proxy_error"] == pytest.approx(
            problem.proxy_error(np.searchsorted(problem.table_bits, bits))
        )
        assert result.search_seconds > 0 and result.measure_calls == 0
        if method == "static":
            assert (bits == bits[:, :1]).all()


def _errors(result):
    return {"proxy_error": result.metrics["proxy_error"], "measured_error": None}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("value", [2.5, 3.0, 3.4])
def test_beam_finds_the_exact_optimum_of_a_separable_table(make_problem, seed, value):
    # 3 layers x 3 segments x bits {2,3,4}: 19683 plans; errors ~4^-bits are convex in unit bit steps
    problem = make_problem(
        n_layers=3, n_segments=3, bits=(2, 3, 4), seed=seed, equal_layers=True, num_steps=9
    )
    config = SearchConfig(candidates=(2, 3, 4))
    optimum = brute_force_optimum(problem, "avg_bits", value, (2, 3, 4))
    result = beam_search(problem, Budget("avg_bits", value), config)
    assert result.metrics["proxy_error"] == pytest.approx(optimum, rel=1e-12)
    # the same optimum when the errors come from a (separable) measure callback instead of the table
    measure = table_measure(problem, problem.error_table)
    measured = beam_search(problem, Budget("avg_bits", value), config, measure)
    assert measured.metrics["measured_error"] == pytest.approx(optimum, rel=1e-12)
    assert measured.measure_calls == measure.calls > 0


def test_beam_counts_and_follows_the_measured_error(make_problem):
    problem = make_problem(n_layers=8, n_segments=4, seed=3)
    # the table badly underrates segment 0 (think: wrong Fisher weights); the measure knows better
    truth = problem.error_table * np.array([40.0, 1.0, 1.0, 1.0])[None, :, None]
    budget, config = Budget("avg_bits", 4.0), SearchConfig()
    table_only = beam_search(problem, budget, config)
    measure = table_measure(problem, truth)
    guided = beam_search(problem, budget, config, measure)
    assert guided.measure_calls == measure.calls
    assert guided.measure_calls == sum(stage.measure_calls for stage in guided.stages)
    bound = config.beam_width * config.proposals_per_stage * problem.num_segments
    assert problem.num_segments <= guided.measure_calls <= bound
    truth_of_table_plan = table_measure(problem, truth)(
        PartialPlan(table_only.plan.layers, 8, problem.segments)
    )
    assert guided.metrics["measured_error"] < 0.95 * truth_of_table_plan
    assert guided.plan.bits_array()[:, 0].mean() > table_only.plan.bits_array()[:, 0].mean()
    assert guided.metrics["avg_bits"] <= 4.0 + 1e-9


def test_measure_must_return_a_finite_error(make_problem):
    problem = make_problem(n_layers=4, n_segments=2)
    with pytest.raises(PlanError, match="finite"):
        beam_search(problem, Budget("avg_bits", 4.0), measure=lambda partial: float("nan"))


def test_infeasible_budget_reports_the_minimum(make_problem):
    problem = make_problem(n_layers=4, n_segments=2, pinned={"blocks.0.linear": 8})
    minimum = uniform_plan(problem, 3).metrics["avg_bits"]
    assert minimum > 3
    for search in (beam_search, greedy_plan, static_plan):
        with pytest.raises(PlanError, match=f"minimum reachable value is {minimum:.6g}"):
            search(problem, Budget("avg_bits", 3.0))


@pytest.mark.parametrize("method", ["beam", "greedy", "static"])
def test_pinned_layers_keep_their_bits_and_count_in_the_budget(make_problem, method):
    pinned = {"blocks.0.linear": 8, "blocks.5.linear": 6}
    problem = make_problem(n_layers=8, n_segments=4, seed=2, pinned=pinned)
    free = make_problem(n_layers=8, n_segments=4, seed=2)
    budget = Budget("avg_bits", 5.0)
    result = METHODS.get(method)(problem, budget, SearchConfig())
    for name, bits in pinned.items():
        assert result.plan.layers[name] == (bits,) * 4
    assert result.metrics["avg_bits"] <= 5.0 + 1e-9
    assert result.metrics["proxy_error"] >= METHODS.get(method)(free, budget).metrics["proxy_error"]


def test_uniform_plan_and_pins(make_problem):
    problem = make_problem(n_layers=4, n_segments=2, pinned={"blocks.1.linear": 8})
    plan = uniform_plan(problem, 3).plan
    assert plan.layers["blocks.1.linear"] == (8, 8)
    assert {row for name, row in plan.layers.items() if name != "blocks.1.linear"} == {(3, 3)}
    assert plan.budget is None and plan.candidates == (3,)
    with pytest.raises(PlanError, match="no column in the error table"):
        uniform_plan(make_problem(bits=(3, 4, 8)), 6)


def test_under_a_bytes_budget_extra_variants_never_pay(make_problem):
    # one variant at a row's highest bits stores less than several and errs less in every segment,
    # so a bytes-only budget makes timestep-agnostic plans optimal: the beam must find one
    problem = make_problem(n_layers=8, n_segments=4, seed=4)
    one_variant = uniform_plan(problem, 4).metrics["bytes"]
    for factor in (0.9, 1.3):
        budget = Budget("bytes", factor * one_variant)
        result = beam_search(problem, budget)
        assert result.metrics["bytes"] <= budget.value
        assert all(len(set(row)) == 1 for row in result.plan.layers.values())
        assert result.metrics["proxy_error"] == pytest.approx(
            static_plan(problem, budget).metrics["proxy_error"]
        )


def test_per_layer_activation_bits_enter_bops(make_problem):
    names = [f"blocks.{i}.linear" for i in range(4)]
    problem = make_problem(
        n_layers=4, n_segments=2, act_bits={n: 4 if i else 16 for i, n in enumerate(names)}
    )
    result = beam_search(problem, Budget("bops", uniform_plan(problem, 4).metrics["bops"]))
    assert result.plan.act_bits == {n: 4 if i else 16 for i, n in enumerate(names)}
    assert (
        result.metrics["bops"] == plan_costs(result.plan.bits_array(), problem.layers, [16, 4, 4, 4])["bops"]
    )


def test_lookahead_ablation_and_greedy_share_the_search(make_problem):
    problem = make_problem(n_layers=10, n_segments=4, seed=5)
    budget = Budget("avg_bits", 4.0)
    beam = beam_search(problem, budget)
    greedy = greedy_plan(problem, budget)
    myopic = beam_search(problem, budget, SearchConfig(lookahead=False))
    static = static_plan(problem, budget)
    assert greedy.method == "greedy" and all(stage.kept == 1 for stage in greedy.stages)
    assert beam.metrics["proxy_error"] <= min(myopic.metrics["proxy_error"], static.metrics["proxy_error"])
    assert [stage.segment for stage in beam.stages] == [0, 1, 2, 3]


def test_search_config_is_validated():
    with pytest.raises(ConfigError, match="beam_width"):
        SearchConfig(beam_width=0)
    with pytest.raises(ConfigError, match="candidates"):
        SearchConfig(candidates=(4, 5))
    with pytest.raises(ConfigError, match="target_spread"):
        SearchConfig(target_spread=0.5)
    assert dataclasses.replace(SearchConfig(), candidates=[4, 8]).candidates == (4, 8)
