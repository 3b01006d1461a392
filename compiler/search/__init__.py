"""compiler/search: turn sensitivity tables and cost models into a Plan.

The problem is a multiple-choice knapsack (one-hot per layer or channel, each budget a ``<=`` row), held as
arrays (:class:`MCKProblem`) and solved by HiGHS in-process, CBC through PuLP, or a structure-exploiting
path (Lagrangian bound, repair, reduced-cost fixing and an exact dominance search) for pure knapsacks.
Alternatives: IMPQ's greedy reduction and Garg et al.'s learned energy allocation (analog).
"""

from __future__ import annotations

from .budgets import Budget, budgets_from_args, parse_avg_bits, parse_budgets
from .greedy import greedy_search
from .learned import LearnedAllocation, learned_energy_allocation, mac_weighted_mean
from .mckp import solve_mckp
from .pareto import ParetoPoint, pareto_sweep, write_pareto
from .problem import (
    BudgetRow,
    MCKProblem,
    SearchOptions,
    SearchProblem,
    Solution,
    SolveStatus,
    Unit,
    build_problem,
    cluster_channels,
    monotone_repair,
    parse_candidates,
    parse_fix,
    proxy_sensitivity,
    read_sensitivity,
    score_plan,
)
from .solve import minimum_budgets, run_solver, search, solve

# solve_highs / solve_cbc are modules of this package: their functions are imported from them
# (``from mpqc.compiler.search.solve_highs import solve_highs``), not re-exported here under the same name

__all__ = [
    "Budget", "BudgetRow", "LearnedAllocation", "MCKProblem", "ParetoPoint", "SearchOptions", "SearchProblem",
    "Solution", "SolveStatus", "Unit", "budgets_from_args", "build_problem", "cluster_channels",
    "greedy_search", "learned_energy_allocation", "mac_weighted_mean", "minimum_budgets", "monotone_repair",
    "parse_avg_bits", "parse_budgets", "parse_candidates", "parse_fix", "pareto_sweep", "proxy_sensitivity",
    "read_sensitivity", "run_solver", "score_plan", "search", "solve", "solve_mckp", "write_pareto",
]
