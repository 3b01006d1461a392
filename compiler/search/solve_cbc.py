"""CBC through PuLP (the solver LIMPQ uses), as an option and a cross-check of the HiGHS path.

PuLP builds one Python object per variable and per row, so this path is for layer-wise problems (10^3 to
10^4 binaries); per-channel problems go to HiGHS or the structure-exploiting path. The CBC binary bundled
with PuLP 3.x is called through ``COIN_CMD`` (``PULP_CBC_CMD`` is deprecated); a ``cbc`` on PATH is used
when the bundled one is missing (PuLP 4 no longer bundles it).
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pulp
from pulp.apis import coin_api

from mpqc.errors import UserError

from .problem import MCKProblem, Solution, SolveStatus, infeasible_solution


def _cbc_path() -> str:
    bundled = getattr(coin_api, "pulp_cbc_path", None)
    if bundled and os.path.exists(bundled):
        return bundled
    found = shutil.which("cbc")
    if found:
        return found
    raise UserError("--solver cbc: no CBC binary found (PuLP's bundled one is missing and `cbc` is not on "
                    "PATH); install it with `pip install 'pulp[cbc]'` or use --solver highs")


def _expr(vars_: list, row) -> pulp.LpAffineExpression:
    return pulp.LpAffineExpression([(vars_[j], float(v)) for j, v in zip(row.indices, row.data)])


def build_pulp(problem: MCKProblem, name: str = "mpqc_search") -> tuple[pulp.LpProblem, list]:
    """The problem as a PuLP model (binaries ``x0..``, continuous ``z0..``), rows in the HiGHS order."""
    prob = pulp.LpProblem(name, pulp.LpMinimize)
    xs = [prob.add_variable(f"x{j}", 0, 1, cat="Binary") for j in range(problem.n)]
    zs = [prob.add_variable(f"z{j}", float(lo) if np.isfinite(lo) else None, float(hi) if np.isfinite(hi) else None)
          for j, (lo, hi) in enumerate(zip(problem.aux_lo, problem.aux_hi))]
    vars_ = xs + zs
    obj = np.concatenate([problem.obj, problem.aux_obj])
    prob.setObjective(pulp.LpAffineExpression([(v, float(c)) for v, c in zip(vars_, obj) if c != 0.0]))
    A = problem.budget_A.tocsr()
    for i, rhs in enumerate(problem.rhs):
        prob.addConstraint(pulp.LpConstraint(_expr(vars_, A.getrow(i)), sense=pulp.LpConstraintLE, rhs=float(rhs)),
                           name=f"budget{i}")
    for g in range(problem.n_groups):
        a, b = problem.group_ptr[g], problem.group_ptr[g + 1]
        prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(xs[j], 1.0) for j in range(a, b)]),
                                             sense=pulp.LpConstraintEQ, rhs=1.0), name=f"onehot{g}")
    S = problem.side_A.tocsr()
    for i in range(S.shape[0]):
        lo, hi = problem.side_lo[i], problem.side_hi[i]
        e = _expr(vars_, S.getrow(i))
        if np.isfinite(lo) and np.isfinite(hi) and lo == hi:
            prob.addConstraint(pulp.LpConstraint(e, sense=pulp.LpConstraintEQ, rhs=float(lo)), name=f"side{i}")
            continue
        if np.isfinite(lo):
            prob.addConstraint(pulp.LpConstraint(e, sense=pulp.LpConstraintGE, rhs=float(lo)), name=f"side{i}lo")
        if np.isfinite(hi):
            prob.addConstraint(pulp.LpConstraint(e, sense=pulp.LpConstraintLE, rhs=float(hi)), name=f"side{i}hi")
    return prob, vars_


def solve_cbc(problem: MCKProblem, *, time_limit: float | None = None, gap: float = 0.0, threads: int = 1) \
        -> Solution:
    """Solve the problem with CBC through PuLP (model building included in the time)."""
    t0 = time.perf_counter()
    prob, vars_ = build_pulp(problem)
    kwargs = {"msg": False, "gapRel": float(gap), "threads": threads}
    if time_limit is not None:
        kwargs["timeLimit"] = float(max(time_limit, 1.0))
    solver = pulp.COIN_CMD(path=_cbc_path(), keepFiles=False, **kwargs)
    prob.solve(solver)
    dt = time.perf_counter() - t0
    # sol_status: 1 optimal, 2 a solution found (stopped early), 0 none found, -1 infeasible
    if prob.sol_status == pulp.LpSolutionInfeasible or prob.status == pulp.LpStatusInfeasible:
        return infeasible_solution(problem, dt, "cbc")
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return infeasible_solution(problem, dt, "cbc", SolveStatus.NO_SOLUTION,
                                   {"cbc_status": pulp.LpStatus.get(prob.status, str(prob.status))})
    values = np.array([v.value() or 0.0 for v in vars_])
    choice = problem.choice_of(values[: problem.n])
    aux = problem.best_aux(choice) if problem.n_aux else None
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    st = SolveStatus.OPTIMAL if optimal else SolveStatus.FEASIBLE
    bound = problem.objective_of(choice, aux) if optimal else -float("inf")
    return problem.finish(choice, aux, st, bound, dt, "cbc",
                          {"cbc_status": pulp.LpStatus.get(prob.status, str(prob.status))})
