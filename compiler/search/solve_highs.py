"""HiGHS in-process (highspy): the model is passed as CSC arrays in one call, no Python loop per variable.

Row layout handed to HiGHS: budget rows, then one-hot rows (``sum_{j in g} x_j = 1``), then side rows.
Columns: the ``n`` binaries, then the ``k`` continuous auxiliaries.
"""

from __future__ import annotations

import logging
import time

import highspy
import numpy as np
import scipy.sparse as sp

from .problem import MCKProblem, Solution, SolveStatus, infeasible_solution

log = logging.getLogger(__name__)


class _Scaled:
    """The problem with every row scaled to a largest coefficient of 1, auxiliaries scaled by their bound, and
    the objective scaled to a largest cost of 1.

    Budget rows hold BitOPs (1e10) next to one-hot rows (1) and big-M rows; unscaled, HiGHS' tolerances cut
    off feasible solutions (seen on a per-channel ResNet-18: "optimal" 0.0522 while 0.0412 was feasible).
    """

    def __init__(self, problem: MCKProblem, obj: np.ndarray | None = None):
        n, k, G = problem.n, problem.n_aux, problem.n_groups
        onehot = sp.csr_matrix((np.ones(n), np.arange(n), problem.group_ptr), shape=(G, n + k))
        A = sp.vstack([problem.budget_A, onehot, problem.side_A], format="csr")
        lo = np.concatenate([np.full(problem.n_budgets, -np.inf), np.ones(G), problem.side_lo])
        hi = np.concatenate([problem.rhs, np.ones(G), problem.side_hi])
        # auxiliaries: z = col_scale * z'
        col_scale = np.ones(n + k)
        if k:
            absA = abs(A[:, n:]).max(axis=0).toarray().ravel()
            bound = np.where(np.isfinite(problem.aux_hi), np.abs(problem.aux_hi), absA)
            col_scale[n:] = np.where(bound > 0, bound, 1.0)
            A = A @ sp.diags(col_scale)
        rmax = abs(A).max(axis=1).toarray().ravel()
        row_scale = np.where(rmax > 0, 1.0 / np.where(rmax > 0, rmax, 1.0), 1.0)
        self.A = sp.csc_matrix(sp.diags(row_scale) @ A)
        self.lo, self.hi = lo * row_scale, hi * row_scale
        cost = np.concatenate([problem.obj if obj is None else obj, problem.aux_obj]) * col_scale
        cmax = float(np.abs(cost).max()) if cost.size else 0.0
        self.obj_scale = cmax if cmax > 0 else 1.0
        self.cost = cost / self.obj_scale
        self.col_lo = np.concatenate([np.zeros(n), problem.aux_lo / col_scale[n:]])
        self.col_hi = np.concatenate([np.ones(n), problem.aux_hi / col_scale[n:]])
        self.col_scale, self.row_scale = col_scale, row_scale
        self.n, self.k, self.m = n, k, problem.n_budgets

    def lp(self, integer: bool) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_ = self.n + self.k
        lp.num_row_ = self.A.shape[0]
        lp.col_cost_ = self.cost
        lp.col_lower_ = self.col_lo
        lp.col_upper_ = self.col_hi
        lp.row_lower_ = self.lo
        lp.row_upper_ = self.hi
        lp.offset_ = 0.0
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = self.A.indptr.astype(np.int32)
        lp.a_matrix_.index_ = self.A.indices.astype(np.int32)
        lp.a_matrix_.value_ = self.A.data.astype(np.float64)
        if integer:
            lp.integrality_ = [highspy.HighsVarType.kInteger] * self.n + [highspy.HighsVarType.kContinuous] * self.k
        return lp

    def unscale_x(self, xs: np.ndarray) -> np.ndarray:
        return np.asarray(xs) * self.col_scale

    def scale_x(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x) / self.col_scale


def _model(problem: MCKProblem, *, integer: bool = True, obj: np.ndarray | None = None) -> highspy.HighsLp:
    return _Scaled(problem, obj).lp(integer)


def _highs(time_limit: float | None, gap: float, threads: int | None = None) -> highspy.Highs:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(max(time_limit, 1e-3)))
    h.setOptionValue("mip_rel_gap", float(gap))
    h.setOptionValue("mip_abs_gap", 1e-12)
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    if threads:
        h.setOptionValue("threads", int(threads))
    return h


def solve_highs(problem: MCKProblem, *, time_limit: float | None = None, gap: float = 0.0,
                start: np.ndarray | None = None, bound: float | None = None) -> Solution:
    """Solve the problem as a MIP with HiGHS.

    Args:
        problem: the arrays.
        time_limit: seconds; on expiry the best solution found is returned with status FEASIBLE.
        gap: relative MIP gap at which HiGHS stops (0 = prove optimality).
        start: an optional starting choice (one index per group) handed to HiGHS as an incumbent.
        bound: a lower bound on the objective proved elsewhere (the coupled decomposition's Lagrangian one):
            HiGHS is interrupted as soon as its incumbent is within ``gap`` of it, since its own bound may
            never get there. The returned status stays FEASIBLE; the caller pairs the plan with that bound.
    """
    t0 = time.perf_counter()
    h = _highs(time_limit, gap)
    S = _Scaled(problem)
    h.passModel(S.lp(True))
    if bound is not None and np.isfinite(bound):
        _stop_within(h, (bound - problem.obj_const) / S.obj_scale, gap)
    if start is not None:
        aux = problem.best_aux(start)
        sol = highspy.HighsSolution()
        sol.col_value = list(S.scale_x(np.concatenate([problem.x_of(start), aux])))
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    dt = time.perf_counter() - t0
    status = h.getModelStatus()
    info = h.getInfo()
    has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
    M = highspy.HighsModelStatus
    if status in (M.kInfeasible, M.kUnboundedOrInfeasible) and not has_sol:
        return infeasible_solution(problem, dt, "highs")
    if not has_sol:
        return infeasible_solution(problem, dt, "highs", SolveStatus.NO_SOLUTION,
                                   {"highs_status": h.modelStatusToString(status)})
    xz = S.unscale_x(np.asarray(h.getSolution().col_value))
    choice = problem.choice_of(xz[: problem.n])
    aux = problem.best_aux(choice) if problem.n_aux else None  # exact auxiliaries for the rounded choice
    st = SolveStatus.OPTIMAL if status == M.kOptimal else SolveStatus.FEASIBLE
    if not problem.feasible(choice, aux, tol=1e-6):
        log.warning("HiGHS returned an assignment that violates a row beyond tolerance; reported as feasible only")
        st = SolveStatus.FEASIBLE
    bound = float(info.mip_dual_bound) * S.obj_scale + problem.obj_const
    return problem.finish(choice, aux, st, bound, dt, "highs",
                          {"highs_status": h.modelStatusToString(status), "nodes": int(info.mip_node_count)})


def _stop_within(h: highspy.Highs, bound: float, gap: float) -> None:
    """Interrupt the MIP once its incumbent (scaled objective, no constant) is within ``gap`` of ``bound``."""

    def check(e) -> None:
        inc = e.data_out.mip_primal_bound
        if np.isfinite(inc) and inc - max(bound, e.data_out.mip_dual_bound) <= gap * max(abs(inc), 1e-12):
            e.interrupt()

    h.cbMipInterrupt.subscribe(check)


def solve_lp(problem: MCKProblem, *, time_limit: float | None = None, obj: np.ndarray | None = None) \
        -> tuple[str, float, np.ndarray, np.ndarray]:
    """The LP relaxation: (status, objective without constant, x, budget-row duals as lambda >= 0)."""
    h = _highs(time_limit, 0.0)
    # presolve finds nothing to remove in a knapsack LP and costs 4x the solve (7.6 vs 1.8 ms at 1.3k columns)
    h.setOptionValue("presolve", "off")
    S = _Scaled(problem, obj)
    h.passModel(S.lp(False))
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return status, float("inf"), np.zeros(problem.n), np.zeros(problem.n_budgets)
    sol = h.getSolution()
    x = S.unscale_x(np.asarray(sol.col_value))
    # row i was multiplied by row_scale[i] and the objective divided by obj_scale
    duals = np.asarray(sol.row_dual)[: problem.n_budgets] * S.row_scale[: problem.n_budgets] * S.obj_scale
    return status, float(h.getInfo().objective_function_value) * S.obj_scale, x[: problem.n], np.maximum(-duals, 0.0)


def solve_aux_lp(problem: MCKProblem, choice: np.ndarray) -> np.ndarray:
    """The cheapest feasible auxiliaries for a fixed choice (least objective, then least budget use)."""
    n, k = problem.n, problem.n_aux
    x = problem.x_of(choice)
    rows = sp.vstack([problem.budget_A, problem.side_A], format="csr")
    lo = np.concatenate([np.full(problem.n_budgets, -np.inf), problem.side_lo])
    hi = np.concatenate([problem.rhs, problem.side_hi])
    fixed = rows[:, :n] @ x
    Z = rows[:, n:].tocsc()
    # a tiny pull on budget use breaks ties towards the least budget use (the exact value of e.g. u = y*W)
    pull = np.asarray(abs(problem.budget_A[:, n:]).sum(axis=0)).ravel()
    pull = pull / max(pull.max(), 1.0) * 1e-9
    lp = highspy.HighsLp()
    lp.num_col_ = k
    lp.num_row_ = Z.shape[0]
    lp.col_cost_ = problem.aux_obj + pull
    lp.col_lower_ = problem.aux_lo
    lp.col_upper_ = problem.aux_hi
    lp.row_lower_ = lo - fixed
    lp.row_upper_ = hi - fixed
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = Z.indptr.astype(np.int32)
    lp.a_matrix_.index_ = Z.indices.astype(np.int32)
    lp.a_matrix_.value_ = Z.data.astype(np.float64)
    h = _highs(None, 0.0)
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        # no feasible z: return the lower bounds (the caller's feasibility check will reject the choice)
        return np.where(np.isfinite(problem.aux_lo), problem.aux_lo, 0.0)
    return np.asarray(h.getSolution().col_value)
