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
