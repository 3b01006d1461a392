"""compiler/search/problem.py: the one check of --weight-alpha, shared by compile, search and SearchOptions."""

from __future__ import annotations

import pytest

from mpqc.compiler.search.problem import parse_weight_alpha
from mpqc.errors import UserError


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
