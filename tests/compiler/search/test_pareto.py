"""Pareto sweeps re-solve one built problem over a budget range; CSV and PNG come out with the chosen point."""

from __future__ import annotations

import csv

import numpy as np

from mpqc.compiler.search.budgets import parse_budgets
from mpqc.compiler.search.pareto import pareto_sweep, sweep_range, write_pareto
from mpqc.compiler.search.problem import SearchOptions, build_problem, read_sensitivity
from mpqc.compiler.search.solve import run_solver
from mpqc.targets import load_target
from tests.compiler.search.helpers import branchy_graph, synthetic_table


def _sp():
    g = branchy_graph()
    table = read_sensitivity(synthetic_table(g, range(2, 9), np.random.default_rng(4)))
    return build_problem(g, load_target("generic"), parse_budgets(avg_bits="W4A6", compression=10), table,
                         SearchOptions())


def test_sweep_is_monotone_and_spans_the_feasible_range(tmp_path):
    sp = _sp()
    lo, hi = sweep_range(sp, 0)
    assert lo < hi
    pts = pareto_sweep(sp, 6, row=0)
    assert len(pts) in (6, 7) and all(p.status == "optimal" for p in pts)  # 6, and the user's own limit
    obj = [p.objective for p in pts]
    assert all(a >= b - 1e-12 for a, b in zip(obj, obj[1:]))  # more budget never hurts
    assert abs(pts[0].budget * 1e9 - lo) <= 1e-6 * lo and abs(pts[-1].budget * 1e9 - hi) <= 1e-6 * hi
    assert sum(p.chosen for p in pts) == 1
    # each point is the optimum at its limit
    for p in pts[:2]:
        q = sp.problem.budget_limit.copy()
        q[0] = p.budget * 1e9
        from mpqc.compiler.search.pareto import _with_limit

        assert abs(run_solver(_with_limit(sp.problem, 0, q[0])).objective - p.objective) <= 1e-9


def test_the_chosen_point_is_the_plan_at_the_users_own_limit():
    """The chosen mark went to the nearest grid point, which could lie above the user's limit (a plan that
    breaks their budget) or far below it (--emac 50 on a 1..1000 sweep of three points marked E = 1)."""
    sp = _sp()
    own = float(sp.problem.budget_limit[0])
    for n in (2, 3, 6):
        pts = pareto_sweep(sp, n, row=0)
        assert len(pts) == n + 1  # the user's limit is inside the range and not on the grid
        chosen = [p for p in pts if p.chosen]
        assert len(chosen) == 1 and abs(chosen[0].budget * 1e9 - own) <= 1e-9 * own
        assert abs(chosen[0].objective - run_solver(sp.problem).objective) <= 1e-9
    lo, hi = sweep_range(sp, 0)
    given = [lo, (own + hi) / 2, hi]  # explicit limits: the nearest one within the user's
    pts = pareto_sweep(sp, 3, row=0, values=given)
    assert [p.chosen for p in pts] == [True, False, False]


def test_csv_and_png_are_written_with_accuracy(tmp_path):
    sp = _sp()
    pts = pareto_sweep(sp, 4, row=1, accuracy_fn=lambda choice: float(np.sum(choice)))
    assert all(p.accuracy is not None for p in pts)
    c, png = str(tmp_path / "p.csv"), str(tmp_path / "p.png")
    write_pareto(pts, sp, 1, c, png, chosen=(pts[0].budget, pts[0].objective))
    rows = list(csv.reader(open(c)))
    assert rows[0][0].startswith("compression") and len(rows) == 1 + len(pts) >= 5
    assert rows[0][-2:] == ["accuracy", "chosen"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_kernel_wise_sweep_with_searched_activation_widths_goes_through_the_decomposition():
    """Channel widths with searched activation widths: each point is solved the way `search` solves it (the
    Lagrangian decomposition, not the MIP on the linearised products, which spent 230 s on one ResNet-20 point),
    and still lands on the exact optimum of its limit within the 0.1 % gap target."""
    from mpqc.compiler.search.pareto import _with_limit
    from mpqc.compiler.search.solve_highs import solve_highs

    g = branchy_graph()
    bits = (8, 6, 4, 2)
    table = read_sensitivity(synthetic_table(g, bits, np.random.default_rng(3), channels=True))
    sp = build_problem(g, load_target("generic"), parse_budgets(avg_bits="W3A3"), table,
                       SearchOptions(granularity="channel", w_candidates=bits, a_candidates=bits))
    assert sp.coupling
    pts = pareto_sweep(sp, 4, row=0)
    assert len(pts) in (4, 5) and {p.solver for p in pts} == {"mckp-coupled"}
    for p in pts:
        exact = solve_highs(_with_limit(sp.problem, 0, p.budget * 1e9), gap=0.0)
        assert p.status == "optimal" and exact.objective <= p.objective <= exact.objective + 1e-3 * abs(
            exact.objective - sp.problem.obj_const) + 1e-12
    obj = [p.objective for p in pts]
    assert all(a >= b - 1e-3 * abs(a) for a, b in zip(obj, obj[1:]))  # more budget never hurts (within the gap)


def test_the_sweep_range_of_a_coupled_problem_ends_where_the_budget_stops_binding():
    """With a second budget the range's upper end is the optimum without the swept one; for the coupled problem
    that solve is the decomposition with the row made slack in place (the MIP at gap 0 took 109 s on a ResNet-20
    case). At that end the row no longer costs objective: the exact optimum there equals the one with no limit."""
    from mpqc.compiler.search.pareto import _row_cap, _with_limit
    from mpqc.compiler.search.solve_highs import solve_highs

    g = branchy_graph()
    bits = (8, 6, 4, 2)
    table = read_sensitivity(synthetic_table(g, bits, np.random.default_rng(6), channels=True))
    sp = build_problem(g, load_target("generic"), parse_budgets(avg_bits="W3A3", compression=9), table,
                       SearchOptions(granularity="channel", w_candidates=bits, a_candidates=bits))
    P = sp.problem
    assert sp.coupling and P.n_budgets == 2
    for row in (0, 1):
        lo, hi = sweep_range(sp, row)
        assert lo < hi
        unlimited = solve_highs(_with_limit(P, row, _row_cap(P, row) + 1.0), gap=0.0)
        at_hi = solve_highs(_with_limit(P, row, hi), gap=0.0)
        below = solve_highs(_with_limit(P, row, lo + 0.5 * (hi - lo)), gap=0.0)
        scale = abs(unlimited.objective - P.obj_const)
        assert at_hi.objective <= unlimited.objective + 2e-3 * scale  # slack at the top of the range
        assert below.objective > unlimited.objective  # and binding inside it
        a = P.budget_A.getrow(row).toarray().ravel()[: P.n]  # the plan that uses the most of this row
        most = np.array([int(np.argmax(a[s:e])) for s, e in zip(P.group_ptr[:-1], P.group_ptr[1:])])
        assert P.budget_values(most, P.best_aux(most))[row] <= _row_cap(P, row) + 1e-9
