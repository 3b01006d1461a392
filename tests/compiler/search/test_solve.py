"""The solvers agree with brute force; shared activations, fixed layers, infeasibility, channels, the MCKP path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mpqc.compiler.search.budgets import parse_budgets
from mpqc.compiler.search.mckp import solve_mckp
from mpqc.compiler.search.problem import (
    MCKProblem,
    SearchOptions,
    SolveStatus,
    build_problem,
    monotone_repair,
    read_sensitivity,
)
from mpqc.compiler.search.solve import minimum_budgets, run_solver, search, solve
from mpqc.errors import InfeasibleError
from mpqc.targets import load_target
from tests.compiler.search.helpers import branchy_graph, brute_force, random_problem, synthetic_table


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


@pytest.mark.parametrize("seed", range(24))
def test_highs_and_mckp_equal_brute_force_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, groups=int(rng.integers(3, 9)), k=4, m=int(rng.integers(2, 4)),
                       tight=float(rng.uniform(0.05, 0.9)))
    best, _ = brute_force(p)
    for solver in ("highs", "mckp"):
        sol = run_solver(p, solver=solver, gap=0.0)
        if best is None:
            assert sol.status == SolveStatus.INFEASIBLE, solver
            continue
        assert sol.status == SolveStatus.OPTIMAL, solver
        assert p.feasible(sol.choice), solver
        assert _close(sol.objective, best), (solver, sol.objective, best)


@pytest.mark.parametrize("seed", range(6))
def test_cbc_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    p = random_problem(rng, groups=int(rng.integers(3, 9)), k=4, m=int(rng.integers(2, 4)),
                       tight=float(rng.uniform(0.2, 0.9)))
    best, _ = brute_force(p)
    sol = run_solver(p, solver="cbc", gap=0.0)
    if best is None:
        assert sol.status == SolveStatus.INFEASIBLE
    else:
        assert sol.status == SolveStatus.OPTIMAL and p.feasible(sol.choice)
        assert _close(sol.objective, best)


@pytest.mark.parametrize("seed", range(2))
def test_twelve_groups_of_four_three_budgets(seed):
    rng = np.random.default_rng(200 + seed)
    p = random_problem(rng, groups=12, k=4, m=3, tight=0.4)
    p = MCKProblem(np.arange(13) * 4, rng.random(48), p.budget_A[:, :48] if p.n >= 48 else
                   sp.csr_matrix(rng.random((3, 48))), p.budget_limit)
    best, _ = brute_force(p)
    assert best is not None
    for solver in ("highs", "mckp", "cbc"):
        sol = run_solver(p, solver=solver, gap=0.0)
        assert sol.status == SolveStatus.OPTIMAL and p.feasible(sol.choice), solver
        assert _close(sol.objective, best), (solver, sol.objective, best)


@pytest.mark.parametrize("seed", range(8))
def test_infeasible_budgets_report_the_brute_force_minimum(seed):
    rng = np.random.default_rng(300 + seed)
    p = random_problem(rng, groups=6, k=4, m=3, tight=0.0)
    p.budget_limit = p.budget_limit * 0.97  # below the smallest achievable use of every row
    assert brute_force(p)[0] is None
    with pytest.raises(InfeasibleError) as e:
        solve(p)
    mins = e.value.minimums
    for i in range(p.n_budgets):
        row = p.budget_A.getrow(i).toarray().ravel()
        want, _ = brute_force(p, objective=row, skip_row=i)
        if want is None:
            assert mins[i] is None
        else:
            assert mins[i] is not None and abs(mins[i] - want) <= 1e-7 * max(1.0, abs(want))
    assert "smallest feasible" in str(e.value)


def test_minimum_budgets_match_brute_force_when_feasible():
    rng = np.random.default_rng(7)
    p = random_problem(rng, groups=7, k=4, m=2, tight=0.5)
    mins = minimum_budgets(p)
    for i in range(2):
        want, _ = brute_force(p, objective=p.budget_A.getrow(i).toarray().ravel(), skip_row=i)
        assert abs(mins[i] - want) <= 1e-7 * max(1.0, abs(want))


def test_mckp_path_on_a_large_instance_meets_its_gap_and_is_feasible():
    rng = np.random.default_rng(11)
    G, K = 4000, 7
    bits = np.arange(8, 1, -1)
    macs = rng.integers(10**4, 10**6, G).astype(float)
    params = rng.integers(100, 5000, G).astype(float)
    sens = rng.lognormal(0, 2, G)
    obj = (sens[:, None] * 4.0 ** (-bits[None, :])).ravel()
    A = np.vstack([(macs[:, None] * bits * 8).ravel(), (params[:, None] * bits).ravel()])
    p = MCKProblem(np.arange(G + 1) * K, obj, sp.csr_matrix(A), [macs.sum() * 8 * 4.2, params.sum() * 4.5])
    sol = solve_mckp(p, gap=1e-3)
    assert sol.status == SolveStatus.OPTIMAL and sol.gap <= 1e-3
    assert p.feasible(sol.choice)
    from mpqc.compiler.search.solve_highs import solve_lp

    _, lp, _, _ = solve_lp(p)
    assert sol.bound <= lp * (1 + 1e-9) + 1e-12  # the reported bound is a valid lower bound
    assert (sol.objective - lp) / sol.objective <= 1e-3  # and the solution is within the gap of the LP bound


# ---------------------------------------------------------------------------------------------------------
# builder-level checks on a small captured graph with a tensor read by two convs
@pytest.fixture(scope="module")
def graph():
    return branchy_graph()


def _brute_layers(graph, table, target, budgets, options):
    """Brute force over per-layer joint candidates with the tensor-sharing rule applied by hand."""
    sp_ = build_problem(graph, target, budgets, table, options)
    return sp_, brute_force(sp_.problem)


@pytest.mark.parametrize("mode", ["tensor", "consumer"])
def test_shared_activation_groups_are_respected(graph, mode):
    rng = np.random.default_rng(1)
    table = read_sensitivity(synthetic_table(graph, range(2, 9), rng))
    target = load_target("generic")
    budgets = parse_budgets(avg_bits="W3A3", compression=9)
    options = SearchOptions(act_groups=mode, w_candidates=(8, 4, 2), a_candidates=(8, 4, 2))
    sp_, sol = search(graph, target, budgets, table, options)
    plan = sp_.to_plan(sol)
    shared = [g for g in graph.act_groups() if len(g.consumers) > 1]
    assert shared and set(shared[0].consumers) == {"conv_b", "conv_c"}
    if mode == "tensor":
        assert plan.a_bits("conv_b") == plan.a_bits("conv_c") == plan.act_groups[shared[0].name]
    # brute force over the raw product of per-layer candidates, applying the rule by hand
    import itertools

    layers = [op.name for op in graph.layers()]
    opts = {n: [(w, a) for w in (8, 4, 2) for a in (8, 4, 2)] for n in layers}
    limits = {r.name: r.limit for r in sp_.rows}
    best = np.inf
    from mpqc.cost_models import digital

    for combo in itertools.product(*[opts[n] for n in layers]):
        asg = dict(zip(layers, combo))
        if mode == "tensor" and asg["conv_b"][1] != asg["conv_c"][1]:
            continue
        bitops = sum(digital.bitops(graph.ops[n], w, a) for n, (w, a) in asg.items())
        size = sum(digital.weight_bits_total(graph.ops[n], w) for n, (w, a) in asg.items())
        if bitops > limits["avg-bits"] * (1 + 1e-12) or size > limits["compression"] * (1 + 1e-12):
            continue
        obj = sum(table.w(n)[w] + table.a(n)[a] for n, (w, a) in asg.items())
        best = min(best, obj)
    assert _close(sol.objective, best)


def test_fixed_layers_are_respected(graph):
    rng = np.random.default_rng(2)
    table = read_sensitivity(synthetic_table(graph, range(2, 9), rng))
    options = SearchOptions(fix={"conv_a": {"w": 8, "a": 8}, "fc": {"w": 6, "a": None}}, w_candidates=(4, 3, 2),
                            a_candidates=(4, 3, 2))
    sp_, sol = search(graph, load_target("generic"), parse_budgets(avg_bits="W3A4"), table, options)
    plan = sp_.to_plan(sol)
    assert (plan.w_bits("conv_a"), plan.a_bits("conv_a")) == (8, 8)  # fixed outside --candidates is honoured
    assert plan.w_bits("fc") == 6 and plan.a_bits("fc") in (4, 3, 2)
    for name in ("conv_b", "conv_c"):
        assert plan.w_bits(name) in (4, 3, 2)


def test_fix_to_a_width_the_target_cannot_run_is_a_user_error(graph):
    from mpqc.errors import UserError

    table = read_sensitivity(synthetic_table(graph, range(2, 9), np.random.default_rng(0)))
    with pytest.raises(UserError, match="does not run"):
        build_problem(graph, load_target("bitserial"), parse_budgets(avg_bits="W4A4"), table,
                      SearchOptions(fix={"conv_a": {"w": 3, "a": 3}}))


def test_monotone_repair_changes_the_choice_and_no_monotone_keeps_the_table(graph):
    rng = np.random.default_rng(3)
    raw = synthetic_table(graph, (8, 4, 2), rng)
    # "wired" points: conv_b's 2-bit weight score below its 4- and 8-bit ones
    raw["layers"]["conv_b"]["w"] = {"8": 0.02, "4": 0.5, "2": 0.01}
    plain = read_sensitivity(raw)
    fixed = read_sensitivity(raw, monotone=True)
    assert plain.w("conv_b")[2] == 0.01
    assert fixed.w("conv_b") == {8: 0.02, 4: 0.5, 2: 0.5}
    assert monotone_repair(plain).w("conv_b")[2] == 0.5
    target = load_target("generic")
    budgets = parse_budgets(avg_bits="W8A8")
    opts = dict(w_candidates=(8, 4, 2), a_candidates=(8,), fix={"conv_a": {"w": 8, "a": 8}})
    sp1, s1 = search(graph, target, budgets, plain, SearchOptions(**opts))
    sp2, s2 = search(graph, target, budgets, fixed, SearchOptions(**opts))
    assert sp1.to_plan(s1).w_bits("conv_b") == 2  # the table as given: 2 bits looks best and is cheapest
    assert sp2.to_plan(s2).w_bits("conv_b") == 8  # repaired: 2 bits scores as badly as 4, and 8 is affordable


def test_per_channel_granularity_equals_brute_force(graph):
    rng = np.random.default_rng(5)
    table = read_sensitivity(synthetic_table(graph, (8, 4, 2), rng, channels=True))
    target = load_target("generic")
    fix = {"conv_a": {"w": 8, "a": 8}, "fc": {"w": 8, "a": 8}, "conv_b": {"a": 8}, "conv_c": {"a": 8}}
    options = SearchOptions(granularity="channel", w_candidates=(8, 4, 2), a_candidates=(8, 4, 2), fix=fix)
    budgets = parse_budgets(avg_bits="W4A8", compression=6)
    sp_, sol = search(graph, target, budgets, table, options, gap=0.0)
    assert sp_.problem.pure
    plan = sp_.to_plan(sol)
    assert isinstance(plan.w_bits("conv_b"), list) and len(plan.w_bits("conv_b")) == 2
    best, _ = brute_force(sp_.problem)
    assert _close(sol.objective, best)
    # and the per-channel costs the plan reports equal the rows the solver saw
    assert abs(plan.costs["budget:avg-bits"]["value"] * 1e9 - sol.budget_values[0]) <= 1e-6 * sol.budget_values[0]


def test_per_channel_with_activation_search_is_exact_on_a_tiny_model(graph):
    rng = np.random.default_rng(6)
    table = read_sensitivity(synthetic_table(graph, (8, 4, 2), rng, channels=True))
    fix = {"conv_a": {"w": 8, "a": 8}, "fc": {"w": 8, "a": 8}}
    options = SearchOptions(granularity="channel", w_candidates=(8, 4, 2), a_candidates=(8, 4, 2), fix=fix,
                            act_groups="consumer")
    sp_, sol = search(graph, load_target("generic"), parse_budgets(avg_bits="W4A4"), table, options, gap=0.0)
    assert not sp_.problem.pure  # linearised products
    # brute force: every channel width x every activation width of conv_b and conv_c
    import itertools

    from mpqc.cost_models import digital

    ops = graph.ops
    limit = sp_.rows[0].limit
    best = np.inf
    for ab, ac in itertools.product((8, 4, 2), repeat=2):
        for wb in itertools.product((8, 4, 2), repeat=ops["conv_b"].out_channels):
            for wc in itertools.product((8, 4, 2), repeat=ops["conv_c"].out_channels):
                bitops = (digital.bitops(ops["conv_a"], 8, 8) + digital.bitops(ops["fc"], 8, 8) +
                          digital.bitops(ops["conv_b"], list(wb), ab) + digital.bitops(ops["conv_c"], list(wc), ac))
                if bitops > limit * (1 + 1e-12):
                    continue
                obj = table.a("conv_b")[ab] + table.a("conv_c")[ac] + table.w("conv_a")[8] + table.a("conv_a")[8] + \
                    table.w("fc")[8] + table.a("fc")[8] + \
                    sum(table.w_channel("conv_b")[b][i] for i, b in enumerate(wb)) + \
                    sum(table.w_channel("conv_c")[b][i] for i, b in enumerate(wc))
                best = min(best, obj)
    assert _close(sol.objective, best)


def test_channel_clusters_group_channels(graph):
    from mpqc.compiler.search.problem import cluster_channels

    scores = np.array([[1.0, 2.0], [1.1, 2.1], [100.0, 200.0], [90.0, 210.0]])
    lab = cluster_channels(scores, 2)
    assert lab[0] == lab[1] != lab[2] == lab[3]
    rng = np.random.default_rng(8)
    table = read_sensitivity(synthetic_table(graph, (8, 4, 2), rng, channels=True))
    options = SearchOptions(granularity="channel", clusters=1, w_candidates=(8, 4, 2), a_candidates=(8,))
    sp_, sol = search(graph, load_target("generic"), parse_budgets(avg_bits="W4A8"), table, options)
    plan = sp_.to_plan(sol)
    for name in ("conv_a", "conv_b", "conv_c"):
        assert len(set(plan.w_bits(name))) == 1  # one cluster: every channel shares a width


def test_coupled_path_bound_and_solution_bracket_the_optimum(graph):
    from mpqc.compiler.search.mckp import solve_coupled
    from mpqc.compiler.search.solve_highs import solve_highs

    rng = np.random.default_rng(12)
    table = read_sensitivity(synthetic_table(graph, (8, 6, 4, 2), rng, channels=True))
    options = SearchOptions(granularity="channel", w_candidates=(8, 6, 4, 2), a_candidates=(8, 6, 4, 2))
    sp_ = build_problem(graph, load_target("generic"), parse_budgets(avg_bits="W4A5", compression=6), table, options)
    assert sp_.coupling and not sp_.problem.pure
    exact = solve_highs(sp_.problem, gap=0.0)
    sol = solve_coupled(sp_, gap=1e-9)
    assert sol is not None and sp_.problem.feasible(sol.choice, sol.aux)
    assert sol.bound <= exact.objective + 1e-12 <= sol.objective + 2e-12
    sp_.to_plan(sol)


def test_boundary_cost_removes_precision_changes_between_adjacent_layers(graph):
    from mpqc.compiler.plan import layer_edges

    rng = np.random.default_rng(13)
    raw = synthetic_table(graph, (8, 4, 2), rng)
    # make the layers disagree: conv_b's input loves 8 bits, fc's input does not care
    raw["layers"]["conv_b"]["a"] = {"8": 0.0, "4": 5.0, "2": 9.0}
    raw["layers"]["fc"]["a"] = {"8": 0.0, "4": 0.0, "2": 0.0}
    table = read_sensitivity(raw)
    budgets = parse_budgets(avg_bits="W4A4")
    edges = [(u, v) for u, v, _, _ in layer_edges(graph)]

    def changes(w):
        opts = SearchOptions(w_candidates=(8, 4, 2), a_candidates=(8, 4, 2), boundary_cost=w)
        sp_, sol = search(graph, load_target("generic"), budgets, table, opts)
        plan = sp_.to_plan(sol)
        return sum(plan.a_bits(u) != plan.a_bits(v) for u, v in edges), sp_

    n0, sp0 = changes(None)
    n1, sp1 = changes(100.0)
    assert sp0.problem.pure and not sp1.problem.pure and sp1.boundary_edges > 0
    assert n0 > 0 and n1 == 0


def test_public_api_names_resolve():
    import mpqc.compiler.search as search_pkg

    assert sorted(search_pkg.__all__) == sorted(set(search_pkg.__all__))
    for name in search_pkg.__all__:
        assert getattr(search_pkg, name) is not None, name
    import importlib

    assert callable(importlib.import_module("mpqc.compiler.search.solve_highs").solve_highs)


def test_the_decompositions_bound_replaces_a_weaker_mip_bound_and_an_unproved_plan_warns(graph):
    """The MIP's LP bound on the linearised products can be far below the Lagrangian one (ResNet-20, impq scores,
    W2A2: 29 % against 0.3 %); the plan's status and gap take the tighter, and a plan not proved says so."""
    from mpqc.compiler.search.solve import _noted, _with_bound
    from mpqc.compiler.search.solve_highs import solve_highs

    rng = np.random.default_rng(12)
    table = read_sensitivity(synthetic_table(graph, (8, 6, 4, 2), rng, channels=True))
    options = SearchOptions(granularity="channel", w_candidates=(8, 6, 4, 2), a_candidates=(8, 6, 4, 2))
    sp_ = build_problem(graph, load_target("generic"), parse_budgets(avg_bits="W4A5", compression=6), table, options)
    P = sp_.problem
    exact = solve_highs(P, gap=0.0)
    var = exact.objective - P.obj_const
    mip = P.finish(exact.choice, exact.aux, SolveStatus.FEASIBLE, exact.objective - 0.5 * var, 2.0, "highs")
    assert mip.gap == pytest.approx(0.5)

    tight = P.finish(exact.choice, exact.aux, SolveStatus.FEASIBLE, exact.objective - 1e-4 * var, 0.1, "mckp-coupled")
    got = _with_bound(P, mip, tight, 1e-3)
    assert got.status == SolveStatus.OPTIMAL and got.gap == pytest.approx(1e-4)
    assert got.bound == tight.bound and got.time_s == pytest.approx(2.1)
    assert _noted(sp_, got, 1e-3) is got and not any("stopped" in w for w in sp_.warnings)

    loose = P.finish(exact.choice, exact.aux, SolveStatus.FEASIBLE, exact.objective - 0.02 * var, 0.1, "mckp-coupled")
    got = _with_bound(P, mip, loose, 1e-3)
    assert got.status == SolveStatus.FEASIBLE and got.gap == pytest.approx(0.02)
    _noted(sp_, got, 1e-3)
    assert any("within 2 % of the best possible" in w for w in sp_.warnings), sp_.warnings

    assert _with_bound(P, mip, None, 1e-3) is mip  # no decomposition: the MIP's answer as it is


@pytest.fixture(scope="module")
def resnet20_graph():
    import torch

    from mpqc.compiler.capture import capture
    from mpqc.compiler.zoo import resnet20

    return capture(resnet20().eval(), (torch.randn(1, 3, 32, 32),)).graph


def _coupled_resnet20(graph, seed: int, bits: tuple, **budgets):
    """Kernel-wise ResNet-20 with searched activation widths (the coupled problem), synthetic scores."""
    table = read_sensitivity(synthetic_table(graph, bits, np.random.default_rng(seed), channels=True))
    options = SearchOptions(granularity="channel", w_candidates=bits, a_candidates=bits)
    return table, options, build_problem(graph, load_target("generic"), parse_budgets(**budgets), table, options)


def test_the_mip_stops_once_its_incumbent_is_within_the_gap_of_a_bound_proved_elsewhere(resnet20_graph):
    """The MIP's LP bound on the linearised products stays far off (77 % after 30 s), so from the
    decomposition's incumbent it would run its whole time; handed the Lagrangian bound, it stops at once and the
    plan keeps that bound."""
    from mpqc.compiler.search.mckp import solve_coupled
    from mpqc.compiler.search.solve import _with_bound
    from mpqc.compiler.search.solve_highs import solve_highs

    _t, _o, sp_ = _coupled_resnet20(resnet20_graph, 0, (8, 6, 4, 2), avg_bits="W3A3")
    P = sp_.problem
    coupled = solve_coupled(sp_, gap=1e-3)
    assert coupled.gap <= 1e-3

    alone = solve_highs(P, time_limit=2.0, gap=1e-3, start=coupled.choice)
    assert alone.info["highs_status"] == "Time limit reached" and alone.gap > 0.1

    told = solve_highs(P, time_limit=60.0, gap=1e-3, start=coupled.choice, bound=coupled.bound)
    assert told.info["highs_status"] == "Interrupted by user"
    assert told.objective <= coupled.objective * (1 + 1e-9)
    got = _with_bound(P, told, coupled, 1e-3)
    assert got.status == SolveStatus.OPTIMAL and got.gap <= 1e-3


def test_a_local_search_over_activation_widths_proves_what_the_decompositions_tries_could_not(resnet20_graph,
                                                                                              monkeypatch):
    """The knapsacks of the few activation choices the prices suggest leave this plan 0.16 % above the Lagrangian
    bound; moving one unit's width (the cheapest move at the final prices first) closes it to under 0.1 %."""
    from mpqc.compiler.search import mckp

    _t, _o, sp_ = _coupled_resnet20(resnet20_graph, 7, (4, 3, 2), avg_bits="W3A3", compression=12)
    searched = mckp.solve_coupled(sp_, gap=1e-3)
    assert searched.status == SolveStatus.OPTIMAL and searched.gap <= 1e-3
    assert searched.info["local_moves"] >= 1
    assert sp_.problem.feasible(searched.choice, searched.aux, tol=1e-6)

    monkeypatch.setattr(mckp, "LOCAL_SEARCH_LIMIT", 0.0)
    monkeypatch.setattr(mckp, "BRANCH_NODES", 0)
    tries_only = mckp.solve_coupled(sp_, gap=1e-3)
    assert tries_only.status == SolveStatus.FEASIBLE and tries_only.gap > 1e-3
    assert searched.objective < tries_only.objective


def test_an_unproved_coupled_plan_skips_the_mip_unless_a_time_limit_asks_for_it(resnet20_graph, monkeypatch):
    """Here no activation choice reaches the root bound (the local search finds no better move) and the
    branch-and-bound is switched off, so the plan comes back at once, feasible at its 0.11 % gap (under 1 %: no
    warning); with --time-limit the MIP goes on from it and the plan keeps the tighter Lagrangian bound."""
    from mpqc.compiler.search import mckp

    monkeypatch.setattr(mckp, "BRANCH_NODES", 0)
    table, options, _sp = _coupled_resnet20(resnet20_graph, 5, (8, 6, 4, 2), avg_bits="W2A4")
    budgets = parse_budgets(avg_bits="W2A4")
    sp_, sol = search(resnet20_graph, load_target("generic"), budgets, table, options)
    assert sol.solver == "mckp-coupled" and sol.status == SolveStatus.FEASIBLE and 1e-3 < sol.gap < 1e-2
    assert not any("stopped before proving" in w for w in sp_.warnings), sp_.warnings

    sp2, timed = search(resnet20_graph, load_target("generic"), budgets, table, options, time_limit=2.0)
    assert timed.solver == "highs" and timed.info["bound_from"].startswith("lagrangian")
    assert timed.objective <= sol.objective * (1 + 1e-9) and timed.bound == pytest.approx(sol.bound)


def test_the_local_searchs_cut_is_a_true_bound_on_every_move(resnet20_graph, monkeypatch):
    """Fixing the activation widths raises the Lagrangian value by the sum of their regrets at the same prices,
    and that is what lets a fruitless pass stop at its first move whose bound reaches the incumbent: checked
    here against each move's knapsack solved to optimality, and on the unproved W2A4 case, whose pass now
    solves one knapsack of its 60 moves and whose tries skip two of their five."""
    from mpqc.compiler.search import mckp

    _t, _o, sp_ = _coupled_resnet20(resnet20_graph, 5, (8, 6, 4, 2), avg_bits="W2A4")
    P = sp_.problem
    oracle = mckp._CoupledOracle(sp_)
    lb, lam = mckp.dual_cutting_plane(oracle)
    regret = oracle.regrets(lam)
    acts = oracle.evaluate(lam)[1]
    assert all(regret[u][acts[u]] == 0 for u in oracle.units)
    tight = 0
    for u in oracle.units[::3]:
        for k in range(len(oracle.bits[u])):
            cand = {**acts, u: k}
            floor = lb + P.obj_const + sum(float(regret[v][cand[v]]) for v in oracle.units)
            r = oracle.restricted(cand)
            if r is None:
                continue
            sol = solve_mckp(r[0], gap=1e-9)
            assert sol.status == SolveStatus.OPTIMAL
            assert floor <= sol.objective + 1e-9 * abs(sol.objective), (u, k)
            tight += floor >= sol.objective - 0.02 * abs(sol.objective)
    assert tight > 0  # the bound is near, not just below

    monkeypatch.setattr(mckp, "BRANCH_NODES", 0)  # what comes after the pass: the plan stays unproved
    searched = mckp.solve_coupled(sp_, gap=1e-3)
    n_moves = sum(len(oracle.bits[u]) - 1 for u in oracle.units)
    assert searched.status == SolveStatus.FEASIBLE and searched.info["local_moves"] == 0
    assert 1 <= searched.info["local_knapsacks"] < n_moves / 10
    assert searched.info["tries_cut"] >= 1  # the same bound skips the decomposition's hopeless tries


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budgets, act_groups", [({"avg_bits": "W3A3"}, "tensor"), ({"avg_bits": "W2A4"}, "tensor"),
                                                 ({"avg_bits": "W2A4", "compression": 10}, "consumer")])
def test_branch_and_bound_over_activation_widths_proves_the_exact_optimum(seed, budgets, act_groups, monkeypatch):
    """A small coupled problem (three or four activation units, ten weight channels) that HiGHS solves exactly:
    the decomposition alone stops 1-30 % above its root bound; branching on the widths reaches HiGHS' optimum
    and proves it, with a bound that never passes the optimum."""
    from mpqc.compiler.search import mckp
    from mpqc.compiler.search.solve_highs import solve_highs

    graph = branchy_graph()
    bits = (8, 6, 4, 2)
    table = read_sensitivity(synthetic_table(graph, bits, np.random.default_rng(seed), channels=True))
    options = SearchOptions(granularity="channel", w_candidates=bits, a_candidates=bits, act_groups=act_groups)
    sp_ = build_problem(graph, load_target("generic"), parse_budgets(**budgets), table, options)
    exact = solve_highs(sp_.problem, gap=0.0)
    assert exact.status == SolveStatus.OPTIMAL

    got = mckp.solve_coupled(sp_, gap=1e-9)
    assert got.status == SolveStatus.OPTIMAL and got.info["branch_nodes"] >= 1
    assert got.objective == pytest.approx(exact.objective, rel=1e-9)
    assert got.bound <= exact.objective + 1e-9 * abs(exact.objective)
    assert got.info["root_bound"] < got.bound  # the branching raised it

    monkeypatch.setattr(mckp, "BRANCH_NODES", 0)
    root_only = mckp.solve_coupled(sp_, gap=1e-9)
    assert root_only.status == SolveStatus.FEASIBLE and root_only.gap > 1e-3


def test_branch_and_bound_proves_the_resnet20_plan_the_root_bound_could_not(resnet20_graph):
    """The W2A4 case above: 0.11 % from the root bound, proved within the 0.1 % target after branching, so a
    --time-limit no longer hands it to the MIP."""
    table, options, _sp = _coupled_resnet20(resnet20_graph, 5, (8, 6, 4, 2), avg_bits="W2A4")
    budgets = parse_budgets(avg_bits="W2A4")
    for limit in (None, 5.0):
        sp_, sol = search(resnet20_graph, load_target("generic"), budgets, table, options, time_limit=limit)
        assert sol.solver == "mckp-coupled" and sol.status == SolveStatus.OPTIMAL and sol.gap <= 1e-3
        root_gap = (sol.objective - sol.info["root_bound"]) / abs(sol.objective - sp_.problem.obj_const)
        assert root_gap > 1e-3 and sol.info["branch_nodes"] >= 1
        assert sp_.problem.feasible(sol.choice, sol.aux, tol=1e-6)
    proof = sp_.to_plan(sol).to_dict()["solver"]["proof"]  # what plan.json and the report carry
    assert proof["branch_nodes"] == sol.info["branch_nodes"] and proof["root_gap"] == pytest.approx(root_gap)
    assert proof["tried_act_choices"] >= 1 and "local_moves" in proof


def test_a_kernel_wise_plans_uniform_baseline_is_scored_by_the_same_channel_scores(resnet20_graph):
    """At the W2A2 BitOPs with widths 8..2 the only kernel-wise plan is uniform W2A2, so the baseline row beside
    it must show the same objective: scored by its channel scores summed, not by the table's layer scores (which
    are not their sum; here the two differ)."""
    from mpqc.compiler.plan import uniform_plan
    from mpqc.compiler.search.problem import score_plan

    table, options, _sp = _coupled_resnet20(resnet20_graph, 5, (8, 6, 4, 2), avg_bits="W2A2")
    sp_, sol = search(resnet20_graph, load_target("generic"), parse_budgets(avg_bits="W2A2"), table, options)
    plan = sp_.to_plan(sol)
    assert {b for lp in plan.layers.values() for b in np.atleast_1d(lp.w_bits) if b is not None} == {2}
    up = uniform_plan(resnet20_graph, 2, 2, "generic")
    assert score_plan(up, resnet20_graph, table, channels=True) == pytest.approx(plan.objective, rel=1e-9)
    assert score_plan(up, resnet20_graph, table) != pytest.approx(plan.objective, rel=1e-3)
