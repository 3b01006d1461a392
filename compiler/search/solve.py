"""One entry point over the solvers, and the minimum feasible value of each budget on infeasibility."""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from mpqc.errors import InfeasibleError, UserError

from .problem import MCKProblem, Solution, SolveStatus

log = logging.getLogger(__name__)

SOLVERS = ("auto", "highs", "cbc", "mckp")
WARN_GAP = 0.01  # a plan further than this from its bound (and the gap target) gets a warning
COUPLED_MIP_LIMIT = 60.0  # seconds of MIP from the layer-wise start (solver="highs") when no --time-limit is given


def run_solver(problem: MCKProblem, *, solver: str = "auto", time_limit: float | None = None,
               gap: float = 0.0) -> Solution:
    """Solve without raising: the Solution's status says what happened.

    ``auto`` takes the structure-exploiting path for pure problems (:mod:`.mckp`) and HiGHS otherwise.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
    if solver == "auto":
        solver = "mckp" if problem.pure else "highs"
    if solver == "mckp":
        if not problem.pure:
            raise ValueError("the mckp solver needs a pure problem (no auxiliaries or side rows)")
        from .mckp import solve_mckp

        return solve_mckp(problem, gap=gap, time_limit=time_limit)
    if solver == "cbc":
        from .solve_cbc import solve_cbc

        return solve_cbc(problem, time_limit=time_limit, gap=gap)
    from .solve_highs import solve_highs

    return solve_highs(problem, time_limit=time_limit, gap=gap)


def solve(problem: MCKProblem, *, solver: str = "auto", time_limit: float | None = None, gap: float = 0.0,
          describe: Callable[[int, float | None], str] | None = None) -> Solution:
    """Solve, raising :class:`InfeasibleError` (with each budget's minimum feasible value) when infeasible.

    Args:
        problem: the arrays.
        solver: ``auto`` | ``highs`` | ``cbc`` | ``mckp``.
        time_limit: seconds for the solve (the best solution found is returned, status FEASIBLE).
        gap: relative optimality gap at which to stop (0: prove optimality).
        describe: ``describe(i, minimum)`` renders budget ``i``'s minimum feasible value (None: no value of
            it is feasible while the other budgets hold) for the error message.
    """
    sol = run_solver(problem, solver=solver, time_limit=time_limit, gap=gap)
    if sol.status == SolveStatus.INFEASIBLE:
        mins = minimum_budgets(problem, time_limit=time_limit)
        err = InfeasibleError(infeasible_message(problem, mins, describe))
        err.minimums = mins  # type: ignore[attr-defined]
        raise err
    if sol.status == SolveStatus.NO_SOLUTION:
        raise UserError(f"no feasible assignment found within the time limit ({time_limit} s); raise "
                        "--time-limit or relax the budgets")
    return sol


def minimum_budgets(problem: MCKProblem, *, time_limit: float | None = None) -> list[float | None]:
    """For each budget row, its smallest achievable value while every other budget holds (None: none)."""
    out: list[float | None] = []
    m = problem.n_budgets
    for i in range(m):
        keep = np.ones(m, dtype=bool)
        keep[i] = False
        row = problem.budget_A.getrow(i).toarray().ravel()
        sub = problem.without_budgets(keep).with_objective(row[: problem.n], row[problem.n:],
                                                           float(problem.budget_const[i]))
        sol = run_solver(sub, solver="auto", time_limit=time_limit, gap=0.0)
        out.append(float(sol.objective) if sol.ok else None)
    return out


def infeasible_message(problem: MCKProblem, mins: list[float | None],
                       describe: Callable[[int, float | None], str] | None = None) -> str:
    """One line naming, for each budget, the smallest value that is feasible with the others held."""
    parts = []
    for i, v in enumerate(mins):
        if describe is not None:
            parts.append(describe(i, v))
        elif v is None:
            parts.append(f"{problem.budget_names[i]}: no value works while the other budgets hold")
        else:
            parts.append(f"{problem.budget_names[i]} >= {v:.6g} (given {problem.budget_limit[i]:.6g})")
    if not parts:
        return "no assignment satisfies the fixed layers and shared-precision constraints"
    return "the budgets cannot all be met; smallest feasible values (each with the others held): " + \
        "; ".join(parts)


def start_choice(sp, layers: dict) -> np.ndarray | None:
    """A choice for ``sp`` (a SearchProblem) that gives every layer the widths in ``layers`` (layer ->
    {"w", "a", ...}, per-layer ints); None when some unit has no such option."""
    choice = np.zeros(sp.problem.n_groups, dtype=np.int64)
    acts = {}
    for name, info in sp.act_units.items():
        for c in info["consumers"]:
            if c in layers:
                acts[name] = layers[c]["a"]
                break
    for g, u in enumerate(sp.units):
        if u.kind == "layers":
            want = tuple((layers[m]["w"], layers[m]["a"]) for m in u.members)
            idx = [k for k, combo in enumerate(u.options) if tuple((o[0], o[1]) for o in combo) == want]
        elif u.kind == "channel":
            w = layers[u.name]["w"]
            idx = [k for k, b in enumerate(u.options) if b == w]
        elif u.kind == "energy":
            e = layers[u.name]["e"]
            idx = [k for k, o in enumerate(u.options) if o[3] == e]
        else:
            idx = [k for k, b in enumerate(u.options) if b == acts.get(u.name)]
        if not idx:
            return None
        choice[g] = idx[0]
    return choice


def search(graph, target, budgets: list, table, options=None, *, solver: str = "auto",
           time_limit: float | None = None, gap: float | None = None, lut=None):
    """Build and solve: returns ``(SearchProblem, Solution)``; raises ``InfeasibleError`` with the minimums.

    ``gap`` defaults to 0 (prove optimality) at layer granularity and 1e-3 at channel granularity. With
    per-channel weights *and* more than one activation width, the costs couple the two: the default path is a
    Lagrangian decomposition over the activation widths (:func:`.mckp.solve_coupled`, seeded with the
    layer-granularity optimum, then a local search over the activation widths, then a branch-and-bound over
    them that raises the bound; these two take at most 30 s and 20 s, or share the ``time_limit``). When that
    cannot prove the gap, its plan is returned as it is (a warning beyond :data:`WARN_GAP`), or, given a
    ``time_limit`` with time left, HiGHS' MIP (linearised products) goes on from it and stops once its incumbent
    is within the gap of the decomposition's bound.
    ``solver="highs"`` skips the decomposition: the MIP starts from the layer-granularity optimum and runs for
    ``time_limit`` or :data:`COUPLED_MIP_LIMIT` seconds.
    """
    from dataclasses import replace

    from .problem import SearchOptions, build_problem

    options = options or SearchOptions()
    sp = build_problem(graph, target, budgets, table, options, lut=lut)
    if gap is None:
        gap = 0.0 if options.granularity == "layer" else 1e-3
    problem = sp.problem
    if options.granularity == "channel" and not problem.pure and solver in ("auto", "highs"):
        layer_sp = build_problem(graph, target, budgets, table, replace(options, granularity="layer", clusters=None),
                                 lut=lut)
        first = run_solver(layer_sp.problem, solver="auto", time_limit=time_limit, gap=gap)
        start, coupled = None, None
        if first.ok:
            asg = layer_sp.assignment(first.choice)["layers"]
            start = start_choice(sp, asg)
        if solver == "auto" and sp.coupling:
            from .mckp import solve_coupled

            acts = None
            if start is not None:
                acts = {u: int(start[g]) for u, g in sp.coupling["y_group"].items()}
            t0 = time.perf_counter()
            sol = solve_coupled(sp, gap=gap, time_limit=time_limit, starts=[acts] if acts else None)
            if sol is not None and (sol.status == SolveStatus.OPTIMAL or time_limit is None):
                # not proved and no time limit: the MIP's bound on the linearised products is weak, and 60 s of
                # it from the tries' incumbent changed 1 of 11 real plans, by 0.013 % (bench/RESULTS.md, search 4)
                return sp, _noted(sp, sol, gap)
            if sol is not None:  # gap target not proved: the MIP goes on from this incumbent for the time left
                start, coupled = sol.choice, sol
                time_limit = max(time_limit - (time.perf_counter() - t0), 1.0)
        from .solve_highs import solve_highs

        limit = time_limit if time_limit is not None else (COUPLED_MIP_LIMIT if start is not None else None)
        sol = solve_highs(problem, time_limit=limit, gap=gap, start=start,
                          bound=None if coupled is None else coupled.bound)
        if sol.status == SolveStatus.INFEASIBLE:
            sol = solve(problem, solver="highs", time_limit=time_limit, gap=gap, describe=sp.describe)
        elif sol.status == SolveStatus.NO_SOLUTION:
            raise UserError(f"no feasible assignment found within the time limit ({time_limit} s)")
        return sp, _noted(sp, _with_bound(problem, sol, coupled, gap), gap)
    sol = solve(problem, solver=solver, time_limit=time_limit, gap=gap, describe=sp.describe)
    return sp, _noted(sp, sol, gap)


def _with_bound(problem, sol: Solution, coupled: Solution | None, gap: float) -> Solution:
    """The MIP's answer with the decomposition's Lagrangian bound when that is the tighter one.

    The MIP's own bound comes from the LP relaxation of the linearised weight x activation products, which is
    far weaker: on a kernel-wise ResNet-20 (impq scores, W2A2 BitOPs) the decomposition proved its incumbent
    within 0.3 % in 0.3 s, HiGHS then ran its 60 s from it without improving and reported a 29 % gap."""
    if coupled is None or not sol.ok or not np.isfinite(coupled.bound) or coupled.bound <= sol.bound:
        return sol
    best = sol if sol.objective <= coupled.objective else coupled
    var = best.objective - problem.obj_const
    proved = (best.objective - coupled.bound) <= gap * max(abs(var), 1e-12)
    info = {**best.info, "bound_from": "lagrangian (coupled decomposition)", "mip_bound": sol.bound}
    return problem.finish(best.choice, best.aux, SolveStatus.OPTIMAL if proved else SolveStatus.FEASIBLE,
                          coupled.bound, sol.time_s + coupled.time_s, best.solver, info)


def _noted(sp, sol: Solution, gap: float) -> Solution:
    """A plan that may be more than :data:`WARN_GAP` (or the gap target) from optimal says so, with how far.

    Closer than that it goes without a warning (plan.json still has the status and gap): the scores behind the
    objective are estimates, far noisier than 1 %. On real ResNet-20 tables the decomposition's tries left 11
    of 72 kernel-wise plans 0.11-1.1 % from the root bound; the branch-and-bound proved all 11 within 0.1 %
    (bench/RESULTS.md, search section 4)."""
    if sol.status == SolveStatus.FEASIBLE and np.isfinite(sol.gap) and sol.gap > max(gap, WARN_GAP):
        msg = (f"the search stopped before proving its plan optimal: the plan's objective is within "
               f"{100 * sol.gap:.2g} % of the best possible; --time-limit S lets the search go on for a tighter plan")
        if msg not in sp.warnings:
            sp.warnings.append(msg)
    return sol
