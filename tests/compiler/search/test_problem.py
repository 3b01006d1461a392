"""compiler/search/problem.py: the one check of --weight-alpha (shared by compile, search and SearchOptions), and
the warnings a sensitivity table can raise."""

from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.search.budgets import parse_budgets
from mpqc.compiler.search.problem import build_problem, parse_weight_alpha, read_sensitivity
from mpqc.errors import UserError
from mpqc.targets import load_target
from tests.compiler.search.helpers import branchy_graph, synthetic_table


@pytest.mark.parametrize("value,expected", [("0.02", 0.02), (0, 0.0), (1, 1.0), (" AUTO ", "auto"), ("auto", "auto")])
def test_weight_alpha_takes_numbers_and_auto_where_allowed(value, expected):
    assert parse_weight_alpha(value, allow_auto=True) == expected


@pytest.mark.parametrize("value", ["half", -1.0, float("nan"), float("inf"), True, None])
def test_bad_weight_alpha_is_one_line_naming_the_option(value):
    with pytest.raises(UserError) as e:
        parse_weight_alpha(value, allow_auto=True)
    assert str(e.value).startswith("--weight-alpha") and "\n" not in str(e.value)


def test_auto_is_refused_where_nothing_can_measure_it():
    with pytest.raises(UserError, match="mpqc compile"):
        parse_weight_alpha("auto", allow_auto=False)
    assert parse_weight_alpha(0.5, allow_auto=False) == 0.5


def test_a_layer_scored_zero_at_every_width_is_named_in_a_warning():
    """A zero everywhere makes the cheapest width free: the search must say so, not pass it on silently."""
    graph = branchy_graph()
    raw = synthetic_table(graph, (8, 4, 2), np.random.default_rng(0))
    target = load_target("generic")
    sp = build_problem(graph, target, parse_budgets(avg_bits="W4A4"), read_sensitivity(raw))
    assert not any("zero score" in w for w in sp.warnings)
    raw["layers"]["fc"]["a"] = {b: 0.0 for b in raw["layers"]["fc"]["a"]}
    sp = build_problem(graph, target, parse_budgets(avg_bits="W4A4"), read_sensitivity(raw))
    flat = [w for w in sp.warnings if "zero score" in w]
    assert len(flat) == 1 and "fc inputs" in flat[0] and "conv_b" not in flat[0]


def test_a_targets_16_bit_candidates_count_as_lossless_not_unscored():
    """The sensitivity pass scores widths up to 8; cuda's bf16 (16-bit) candidates had no score and were all
    dropped with a warning, so a compile for cuda could never keep a layer in bf16."""
    from mpqc.compiler.search import score_plan, solve

    g = branchy_graph()
    table = read_sensitivity(synthetic_table(g, (8, 4), np.random.default_rng(0)))
    target = load_target("cuda")
    tight = build_problem(g, target, parse_budgets(avg_bits="W8A8"), table)
    assert not any("dropped" in w for w in tight.warnings), tight.warnings
    roomy = build_problem(g, target, parse_budgets(avg_bits="W16A16"), table)
    plan = roomy.to_plan(solve(roomy.problem))
    assert {lp.w_bits for lp in plan.layers.values() if lp.w_bits is not None} == {16}  # free of loss, and affordable
    assert score_plan(plan, g, table) == 0.0
    plan8 = tight.to_plan(solve(tight.problem))
    assert 0 < score_plan(plan8, g, table) < float("inf")


def test_search_messages_name_the_real_cause(tmp_path):
    """A float option at channel granularity was reported as a missing width combination, --fix NAME=W3 as
    'W3ANone', and a target's [fixed] glob written for other models stopped the search."""
    from mpqc.compiler.search.problem import SearchOptions, parse_fix
    from mpqc.targets import load_target

    g = branchy_graph()
    table = read_sensitivity(synthetic_table(g, (8, 4, 2), np.random.default_rng(0)))
    with pytest.raises(UserError, match="W3; it allows"):
        build_problem(g, load_target("bitserial"), parse_budgets(avg_bits="W4A4"), table,
                      SearchOptions(fix=parse_fix(["conv_a=W3"])))
    text = open(load_target("generic").source).read()
    assert "[fixed]" not in text
    (tmp_path / "t.toml").write_text(text + '\n[fixed]\n"se.*" = 8\n')  # a rule for models with an SE block
    build_problem(g, load_target(str(tmp_path / "t.toml")), parse_budgets(avg_bits="W4A4"), table)  # no match: fine
    with pytest.raises(UserError, match="se.fc: no quantizable layer"):
        build_problem(g, load_target("generic"), parse_budgets(avg_bits="W4A4"), table,
                      SearchOptions(fix=parse_fix(["se.fc=8"])))
    ort = open(load_target("ort-cpu").source).read()
    assert 'granularity = ["layer"]' in ort
    (tmp_path / "o.toml").write_text(ort.replace('granularity = ["layer"]', 'granularity = ["layer", "channel"]', 1))
    with pytest.raises(UserError, match="float, and a float layer has no per-channel widths"):
        build_problem(g, load_target(str(tmp_path / "o.toml")), parse_budgets(compression="3"), table,
                      SearchOptions(granularity="channel"))


def test_a_budget_that_prices_precision_boundaries_is_refused_at_channel_granularity(tmp_path):
    """The channel-granularity problem leaves the boundary out of its rows while the plan's costs add it, so an
    --energy budget on a target whose boundary applies to energy was 'met' at 59,999.68 of 60,000 pJ with the
    plan's own energy at 80,880 (35 % over)."""
    from mpqc.compiler.search.problem import SearchOptions
    from mpqc.targets import load_target

    text = open(load_target("bitserial").source).read()
    assert 'applies_to = "cycles"' in text
    (tmp_path / "t.toml").write_text(text.replace('applies_to = "cycles"', 'applies_to = "energy"'))
    target = load_target(str(tmp_path / "t.toml"))
    g = branchy_graph()
    table = read_sensitivity(synthetic_table(g, (8, 4, 2), np.random.default_rng(0), channels=True))
    build_problem(g, target, parse_budgets(energy="1e9"), table, SearchOptions(granularity="layer"))
    with pytest.raises(UserError, match="precision changes between layers in its energy budget"):
        build_problem(g, target, parse_budgets(energy="1e9"), table, SearchOptions(granularity="channel"))
    build_problem(g, target, parse_budgets(avg_bits="W4A4"), table, SearchOptions(granularity="channel"))
