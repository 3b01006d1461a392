"""Analog targets at channel granularity: one energy per MAC per output channel (array column)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mpqc.compiler.search.budgets import parse_budgets
from mpqc.compiler.search.problem import SearchOptions, build_problem, read_sensitivity, score_plan
from mpqc.compiler.search.solve import search, solve
from mpqc.targets import load_target
from tests.compiler.search.helpers import branchy_graph, brute_force

CHANNEL = SearchOptions(granularity="channel")


@pytest.fixture(scope="module")
def graph():
    return branchy_graph()


def _target(points: int = 25, lo: float = 1.0, hi: float = 1e4):
    t = load_target("analog")
    return replace(t, analog=replace(t.analog, e_min=lo, e_max=hi, points=points))


def _table(graph, target, rng, *, channels: bool = True) -> dict:
    """Thermal-like scores s_c / E with very unequal channels (what makes a per-channel E pay)."""
    grid = [float(e) for e in target.analog.e_grid()]
    layers = {}
    for op in graph.layers():
        s = rng.lognormal(0.0, 1.5, op.out_channels)
        d = {"e": {repr(e): float(s.sum() / e) for e in grid}}
        if channels:
            d["e_channel"] = {repr(e): [float(v / e) for v in s] for e in grid}
        layers[op.name] = d
    return {"version": 1, "method": "analog", "model_hash": "test", "layers": layers}


def _analog(graph):
    return [op for op in graph.layers() if op.name not in ("conv_a", "fc")]  # first/last stay digital


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channel_energies_equal_brute_force(graph, seed):
    target = _target(points=9, lo=1.0, hi=256.0)
    table = read_sensitivity(_table(graph, target, np.random.default_rng(seed)))
    sp = build_problem(graph, target, parse_budgets(emac="20"), table, CHANNEL)
    assert sum(1 for u in sp.units if u.kind == "energy") == sum(op.out_channels for op in _analog(graph))
    sol = solve(sp.problem)
    best, _ = brute_force(sp.problem)
    assert sol.objective == pytest.approx(best, rel=1e-9)
    plan = sp.to_plan(sol)
    for op in _analog(graph):
        e = plan.emac(op.name)
        assert isinstance(e, list) and len(e) == op.out_channels
    assert plan.emac("conv_a") is None and plan.emac("fc") is None
    assert plan.costs["emac"]["value"] <= 20 * (1 + 1e-9)
    # the plan's own score under the table (per channel) is the solver's objective
    assert score_plan(plan, graph, table) == pytest.approx(sol.objective, rel=1e-9)


def test_channel_allocation_follows_the_closed_form(graph):
    """min sum s_c/E_c subject to sum m_c E_c <= B has E_c ∝ sqrt(s_c/m_c): the ILP on a fine grid lands within
    a few grid steps of it (a knapsack of four items cannot always spend the budget exactly), and beats the
    best per-layer allocation under the same budget."""
    target = _target(points=241, lo=0.01, hi=1e4)  # ratio 1.059 per step
    rng = np.random.default_rng(5)
    raw = _table(graph, target, rng)
    table = read_sensitivity(raw)
    sp, sol = search(graph, target, parse_budgets(emac="30"), table, CHANNEL, gap=0.0)
    plan = sp.to_plan(sol)
    got, want = [], []
    for op in _analog(graph):
        s1 = np.array(raw["layers"][op.name]["e_channel"][repr(1.0)])
        got += plan.emac(op.name)
        want += list(np.sqrt(s1 / (op.macs / op.out_channels)))
    ratio = np.array(got) / np.array(want)
    assert ratio.max() / ratio.min() < 1.059 ** 3
    assert max(got) / min(got) > 1.5  # the channels really differ
    lsp, lsol = search(graph, target, parse_budgets(emac="30"), table, SearchOptions(granularity="layer"), gap=0.0)
    assert sol.objective < lsol.objective * 0.99


def test_one_cluster_per_layer_is_the_layer_optimum(graph):
    target = _target()
    table = read_sensitivity(_table(graph, target, np.random.default_rng(3)))
    _, csol = search(graph, target, parse_budgets(emac="40"), table, SearchOptions(granularity="channel", clusters=1))
    _, lsol = search(graph, target, parse_budgets(emac="40"), table, SearchOptions(granularity="layer"))
    assert csol.objective == pytest.approx(lsol.objective, rel=1e-9)


def test_without_channel_scores_the_layer_score_is_split_and_a_warning_says_so(graph):
    target = _target()
    table = read_sensitivity(_table(graph, target, np.random.default_rng(4), channels=False))
    sp, sol = search(graph, target, parse_budgets(emac="40"), table, CHANNEL)
    assert any("no per-channel energy scores" in w for w in sp.warnings)
    plan = sp.to_plan(sol)
    for op in _analog(graph):  # equal channels: the layer's E, whichever channel
        assert len(set(plan.emac(op.name))) <= 2


def test_channel_energy_scores_are_repaired_and_checked(graph):
    from mpqc.errors import UserError

    target = _target(points=3, lo=1.0, hi=100.0)
    raw = _table(graph, target, np.random.default_rng(6))
    layer = _analog(graph)[0].name
    keys = list(raw["layers"][layer]["e_channel"])
    raw["layers"][layer]["e_channel"][keys[-1]][0] = 1e9  # more energy scoring worse: noise in an estimate
    t = read_sensitivity(raw, monotone=True)
    assert t.e_channel(layer)[float(keys[0])][0] >= 1e9
    raw["layers"][layer]["e_channel"][keys[0]] = [1.0]  # wrong channel count
    with pytest.raises(UserError, match="e_channel: the lists have different lengths"):
        read_sensitivity(raw)
    raw["layers"][layer]["e_channel"] = {"-1": [1.0]}
    with pytest.raises(UserError, match="must be a positive energy"):
        read_sensitivity(raw)


def test_greedy_refuses_analog_targets(graph):
    from mpqc.compiler.search.greedy import greedy_search
    from mpqc.errors import UserError

    target = _target()
    table = read_sensitivity(_table(graph, target, np.random.default_rng(7)))
    sp = build_problem(graph, target, parse_budgets(emac="40"), table)
    with pytest.raises(UserError, match="--search ilp"):
        greedy_search(sp, table)


def test_plans_off_the_grid_are_scored_by_log_log_interpolation(graph):
    """A uniform E between grid points (the search CLI's baseline, a learned plan) scores s/E exactly for
    thermal-like tables, per layer and per channel, instead of the nearest grid point's score."""
    from mpqc.compiler.plan import LayerPlan, Plan

    target = _target(points=5, lo=1.0, hi=1e4)  # keys 1, 10, 100, 1000, 10000
    raw = _table(graph, target, np.random.default_rng(8))
    table = read_sensitivity(raw)
    layers = {op.name: LayerPlan(8, 8, 37.0) for op in _analog(graph)}
    want = sum(raw["layers"][n]["e"][repr(1.0)] / 37.0 for n in layers)
    assert score_plan(Plan("analog", layers=layers), graph, table) == pytest.approx(want, rel=1e-9)
    per = {op.name: LayerPlan(8, 8, [37.0, 370.0]) for op in _analog(graph)}
    want = sum(raw["layers"][n]["e_channel"][repr(1.0)][0] / 37.0 + raw["layers"][n]["e_channel"][repr(1.0)][1] / 370.0
               for n in per)
    assert score_plan(Plan("analog", granularity="channel", layers=per), graph, table) == pytest.approx(want, rel=1e-9)
