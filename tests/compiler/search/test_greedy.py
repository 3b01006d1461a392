"""IMPQ's greedy reduction: feasible, never better than the ILP optimum, and reduces the least sensitive first."""

from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.search.budgets import parse_budgets
from mpqc.compiler.search.greedy import greedy_search
from mpqc.compiler.search.problem import SearchOptions, SolveStatus, build_problem, read_sensitivity
from mpqc.compiler.search.solve import solve
from mpqc.errors import InfeasibleError
from mpqc.targets import load_target
from tests.compiler.search.helpers import branchy_graph, synthetic_table


@pytest.fixture(scope="module")
def graph():
    return branchy_graph()


@pytest.mark.parametrize("metric", ["impq", "ratio"])
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_greedy_is_feasible_and_no_better_than_the_ilp(graph, metric, granularity):
    table = read_sensitivity(synthetic_table(graph, range(2, 9), np.random.default_rng(9), channels=True))
    sp = build_problem(graph, load_target("generic"), parse_budgets(avg_bits="W4A5", compression=7), table,
                       SearchOptions(granularity=granularity))
    g = greedy_search(sp, table, step=0.2, metric=metric)
    assert g.status == SolveStatus.FEASIBLE and sp.problem.feasible(g.choice, g.aux)
    exact = solve(sp.problem, gap=0.0 if granularity == "layer" else 1e-9)
    assert g.objective >= exact.objective - 1e-12
    sp.to_plan(g)  # decodes into a plan


def test_greedy_reduces_the_least_sensitive_layer_first(graph):
    raw = synthetic_table(graph, (8, 6, 4), np.random.default_rng(1))
    for name in raw["layers"]:
        raw["layers"][name]["w"] = {"8": 1.0, "6": 2.0, "4": 3.0}
    raw["layers"]["conv_b"]["w"] = {"8": 0.001, "6": 0.002, "4": 0.003}
    table = read_sensitivity(raw)
    sp = build_problem(graph, load_target("generic"), parse_budgets(compression="4.1"), table,
                       SearchOptions(w_candidates=(8, 6, 4), a_candidates=(8,)))
    plan = sp.to_plan(greedy_search(sp, table, step=0.01))
    assert plan.w_bits("conv_b") < 8 and plan.w_bits("conv_a") == 8


def test_greedy_raises_when_even_the_lowest_widths_miss(graph):
    table = read_sensitivity(synthetic_table(graph, (8, 4), np.random.default_rng(2)))
    sp = build_problem(graph, load_target("generic"), parse_budgets(compression=40), table,
                       SearchOptions(w_candidates=(8, 4), a_candidates=(8, 4)))
    with pytest.raises(InfeasibleError, match="lowest widths"):
        greedy_search(sp, table)


def _dominating_options_that_fit(sp, choice) -> list:
    """(group, option) pairs whose widths are all >= the chosen ones, whose objective is lower, and that meet every
    row when only that group changes: a plan with none leaves no single step up unused."""
    P = sp.problem
    assert P.pure  # one group changed alone is a valid plan
    found = []
    for g, u in enumerate(sp.units):
        cur = u.options[choice[g]]
        for k, opt in enumerate(u.options):
            if u.kind == "layers":
                up = all((w is None or w >= cw) and (a is None or a >= ca)
                         for (w, a, *_), (cw, ca, *_) in zip(opt, cur))
            else:
                up = opt >= cur
            trial = choice.copy()
            trial[g] = k
            if k != choice[g] and up and P.objective_of(trial) < P.objective_of(choice) - 1e-15 and \
                    P.feasible(trial):
                found.append((u.name, opt))
    return found


@pytest.mark.parametrize("target", ["generic", "bitserial"])
@pytest.mark.parametrize("metric", ["impq", "ratio"])
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_greedy_under_an_activation_memory_budget_keeps_every_weight_width(graph, target, metric, granularity):
    # the bug hunt's case: weight steps free no activation memory, so they cost accuracy and buy nothing
    table = read_sensitivity(synthetic_table(graph, range(2, 9), np.random.default_rng(0), channels=True))
    sp = build_problem(graph, load_target(target), parse_budgets(act_mem="0.05"), table,
                       SearchOptions(granularity=granularity))
    g = greedy_search(sp, table, metric=metric)
    assert g.status == SolveStatus.FEASIBLE and sp.problem.feasible(g.choice, g.aux)
    plan = sp.to_plan(g)
    wmax = max(load_target(target).weight_bits)
    for op in graph.layers():
        if op.weight_shape:
            assert np.all(np.asarray(plan.w_bits(op.name)) == wmax), op.name
    assert any(plan.a_bits(op.name) < wmax for op in graph.layers() if op.act_inputs)  # the budget did bite
    exact = solve(sp.problem, gap=0.0 if granularity == "layer" else 1e-9)
    assert g.objective <= 1.5 * exact.objective


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", ["generic", "bitserial"])
@pytest.mark.parametrize("metric", ["impq", "ratio"])
def test_greedy_under_a_bitops_budget_is_near_the_ilp_and_uses_the_budget(graph, seed, target, metric):
    table = read_sensitivity(synthetic_table(graph, range(2, 9), np.random.default_rng(seed)))
    sp = build_problem(graph, load_target(target), parse_budgets(avg_bits="W3A3"), table, SearchOptions())
    g = greedy_search(sp, table, metric=metric)
    P = sp.problem
    assert g.status == SolveStatus.FEASIBLE and P.feasible(g.choice, g.aux)
    assert np.all(g.budget_values <= P.budget_limit * (1 + 1e-9))
    exact = solve(P, gap=0.0)
    assert exact.objective - 1e-12 <= g.objective <= 1.5 * exact.objective
    # the budget is used to within one step: no group can move up to a better option and still fit
    assert _dominating_options_that_fit(sp, g.choice) == []
    assert g.info["given_back"] >= 0


@pytest.mark.parametrize("metric", ["impq", "ratio"])
def test_greedy_with_several_budgets_meets_every_row_and_leaves_no_step_unused(graph, metric):
    table = read_sensitivity(synthetic_table(graph, range(2, 9), np.random.default_rng(3)))
    sp = build_problem(graph, load_target("generic"), parse_budgets(avg_bits="W4A5", compression=7, act_mem="0.06"),
                       table, SearchOptions())
    g = greedy_search(sp, table, metric=metric, step=0.3)  # large steps overshoot: the give-back must return them
    P = sp.problem
    assert P.n_budgets == 3 and P.feasible(g.choice, g.aux)
    assert _dominating_options_that_fit(sp, g.choice) == []
    assert g.objective <= 1.5 * solve(P, gap=0.0).objective


def test_greedy_prices_the_channel_by_activation_bitops_products(graph):
    # channel granularity with searched activations: the BitOPs row holds w x a products through auxiliaries; the
    # greedy's own row values must match the exact ones (the LP's cheapest auxiliaries) at its answer
    table = read_sensitivity(synthetic_table(graph, range(2, 9), np.random.default_rng(4), channels=True))
    sp = build_problem(graph, load_target("bitserial"), parse_budgets(avg_bits="W3A3", compression=6), table,
                       SearchOptions(granularity="channel"))
    P = sp.problem
    assert P.n_aux > 0
    g = greedy_search(sp, table, metric="ratio")
    z = P.best_aux(g.choice)
    assert P.feasible(g.choice, g.aux)
    assert g.objective == pytest.approx(P.objective_of(g.choice, z))
    assert np.allclose(g.budget_values, P.budget_values(g.choice, z))
    exact = solve(P, gap=1e-9)
    assert g.objective <= 1.5 * exact.objective
