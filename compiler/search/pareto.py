"""Pareto sweeps: re-solve the built problem over N values of one budget, then a CSV and a PNG.

The problem is built once (scores and costs cached in its arrays); each point only changes one row's limit,
from the smallest feasible value of that budget (the others held) up to the value at which it stops binding
(its use at the optimum without it). The plot shows the objective (and, when given, accuracy) against the
budget with the user's own point marked.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .problem import MCKProblem, SearchProblem, SolveStatus
from .solve import run_solver

log = logging.getLogger(__name__)


@dataclass
class ParetoPoint:
    """One solve of the sweep: the budget value (user unit), objective, status and every row's value."""

    budget: float
    objective: float
    status: str
    gap: float
    time_s: float
    rows: dict[str, float] = field(default_factory=dict)  # row name -> value (user unit)
    accuracy: float | None = None
    chosen: bool = False
    choice: np.ndarray | None = None
    solver: str = ""


def _with_limit(problem: MCKProblem, row: int, limit: float) -> MCKProblem:
    lim = problem.budget_limit.copy()
    lim[row] = limit
    return MCKProblem(problem.group_ptr, problem.obj, problem.budget_A, lim, list(problem.budget_names),
                      problem.budget_const, problem.side_A, problem.side_lo, problem.side_hi, problem.aux_obj,
                      problem.aux_lo, problem.aux_hi, problem.obj_const)


def sweep_range(sp: SearchProblem, row: int, *, solver: str = "auto", time_limit: float | None = None) \
        -> tuple[float, float]:
    """(smallest feasible limit of ``row`` with the others held, its value at the optimum without it)."""
    P = sp.problem
    keep = np.ones(P.n_budgets, dtype=bool)
    keep[row] = False
    vec = P.budget_A.getrow(row).toarray().ravel()
    lo_sol = run_solver(P.without_budgets(keep).with_objective(vec[: P.n], vec[P.n:], float(P.budget_const[row])),
                        solver=solver, time_limit=time_limit, gap=0.0)
    cap = _row_cap(P, row) if (solver == "auto" and sp.coupling) else float("inf")
    if np.isfinite(cap):  # coupled: the row made slack in place (the decomposition keys its rows by index)
        free = _solve_point(sp, _with_limit(P, row, cap + 1e-9 * max(abs(cap), 1.0)), solver, time_limit, 1e-3)
    else:
        free = run_solver(P.without_budgets(keep), solver=solver, time_limit=time_limit, gap=0.0)
    if not lo_sol.ok or not free.ok:
        return float("nan"), float("nan")
    hi = float(P.budget_values(free.choice, free.aux)[row])
    return float(lo_sol.objective), max(hi, float(lo_sol.objective))


def pareto_sweep(sp: SearchProblem, n: int, *, row: int = 0, solver: str = "auto", gap: float | None = None,
                 time_limit: float | None = None, values: list[float] | None = None,
                 accuracy_fn: Callable[[np.ndarray], float] | None = None) -> list[ParetoPoint]:
    """Solve for ``n`` limits of budget ``row`` (raw units), evenly spaced over :func:`sweep_range`.

    ``values`` overrides the limits; ``accuracy_fn(choice)`` (optional) measures each point's accuracy. The
    problem's own limit is added to the evenly spaced points (when inside the range), and that point is marked
    ``chosen``; with ``values`` given, the nearest one within the limit is.
    """
    P = sp.problem
    if P.n_budgets == 0:
        raise ValueError("a Pareto sweep needs at least one budget")
    if not 0 <= row < P.n_budgets:
        raise ValueError(f"row {row} out of range 0..{P.n_budgets - 1}")
    if gap is None:
        gap = 0.0 if sp.options.granularity == "layer" else 1e-3
    if values is None:
        lo, hi = sweep_range(sp, row, solver=solver, time_limit=time_limit)
        if not np.isfinite(lo):
            raise ValueError("the other budgets leave no feasible point; nothing to sweep")
        values = list(np.linspace(lo, hi, n)) if n > 1 else [hi]
        own = float(P.budget_limit[row])
        if lo <= own <= hi and not any(abs(v - own) <= 1e-9 * max(abs(own), 1.0) for v in values):
            values = sorted(values + [own])  # the user's own limit is a point too, so the marked one is their plan
    r = sp.rows[row]
    own = float(P.budget_limit[row])
    points: list[ParetoPoint] = []
    for v in values:
        sol = _solve_point(sp, _with_limit(P, row, float(v)), solver, time_limit, gap)
        rows = {}
        if sol.ok:
            for i, rr in enumerate(sp.rows):
                rows[rr.name] = float(sol.budget_values[i]) / _div(rr)
        acc = accuracy_fn(sol.choice) if (accuracy_fn is not None and sol.ok) else None
        points.append(ParetoPoint(float(v) / _div(r), float(sol.objective) if sol.ok else float("nan"),
                                  sol.status.value, float(sol.gap), float(sol.time_s), rows, acc,
                                  choice=sol.choice if sol.ok else None, solver=sol.solver))
    if points:  # the user's own limit, else the nearest within it (a point above it breaks their budget)
        within = [i for i, v in enumerate(values) if v <= own * (1 + 1e-12)] or range(len(points))
        k = min(within, key=lambda i: abs(float(values[i]) - own))
        points[k].chosen = True
    return points


def _row_cap(P: MCKProblem, row: int) -> float:
    """A value of budget row ``row`` that no assignment exceeds: each group at its largest coefficient, each
    auxiliary at its worse bound (inf when one is unbounded)."""
    a = P.budget_A.getrow(row).toarray().ravel()
    x = float(np.maximum.reduceat(a[: P.n], P.group_ptr[:-1]).sum())
    z = a[P.n:]
    nz = z != 0
    worst = np.where(z[nz] > 0, z[nz] * P.aux_hi[nz], z[nz] * P.aux_lo[nz])
    return float(P.budget_const[row]) + x + float(worst.sum())


def _solve_point(sp: SearchProblem, problem: MCKProblem, solver: str, time_limit: float | None, gap: float):
    """One point. Channel widths with searched activation widths go through the Lagrangian decomposition, as
    :func:`.solve.search` does (the MIP on the linearised products spent 230 s on one ResNet-20 point); the MIP
    solves it only when the decomposition finds no plan."""
    if solver == "auto" and sp.coupling:
        from dataclasses import replace

        from .mckp import solve_coupled

        sol = solve_coupled(replace(sp, problem=problem), gap=gap, time_limit=time_limit)
        if sol is not None:
            return sol
    return run_solver(problem, solver=solver, time_limit=time_limit, gap=gap)


def _div(r) -> float:
    """Raw row unit -> the user's unit."""
    from .budgets import BITS_PER_KIB, BITS_PER_MIB

    return {"bitops": 1e9, "size": BITS_PER_MIB, "act_mem": BITS_PER_KIB}.get(r.kind, r.display_div)


def write_pareto(points: list[ParetoPoint], sp: SearchProblem, row: int, csv_path: str, png_path: str | None,
                 *, chosen: tuple[float, float] | None = None) -> None:
    """The sweep as CSV (one line per point) and PNG (objective, and accuracy when measured, vs the budget).

    ``chosen`` = (budget, objective) of the user's own solution, marked on the plot.
    """
    from .problem import _unit_name

    r = sp.rows[row]
    names = [rr.name for rr in sp.rows]
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([f"{r.name} ({_unit_name(r)})", "objective", "status", "gap", "time_s"] +
                   [f"{n} value" for n in names] + ["accuracy", "chosen"])
        for p in points:
            w.writerow([f"{p.budget:.9g}", f"{p.objective:.9g}", p.status, f"{p.gap:.3g}", f"{p.time_s:.4f}"] +
                       [f"{p.rows.get(n, float('nan')):.9g}" for n in names] +
                       ["" if p.accuracy is None else f"{p.accuracy:.6g}", int(p.chosen)])
    os.replace(tmp, csv_path)
    if png_path is None:
        return
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [p for p in points if p.status in (SolveStatus.OPTIMAL.value, SolveStatus.FEASIBLE.value)]
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    # the chosen plan is a point of the same frontier: the line runs through it too, or a coarse sweep's straight
    # segments would pass far above it and make it look better than the frontier
    line = sorted([(p.budget, p.objective) for p in ok] + ([tuple(chosen)] if chosen is not None else []))
    ax.plot([b for b, _ in line], [o for _, o in line], "-", color="tab:blue", lw=1.2)
    ax.plot([p.budget for p in ok], [p.objective for p in ok], "o", color="tab:blue", ms=4, label="objective")
    if chosen is not None:
        ax.plot([chosen[0]], [chosen[1]], marker="*", color="tab:red", ms=14, ls="none", label="chosen plan")
    ax.set_xlabel(f"{r.budget.option} budget ({_unit_name(r)})")
    ax.set_ylabel("objective (sensitivity, lower is better)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    acc = [p for p in ok if p.accuracy is not None]
    if acc:
        ax2 = ax.twinx()
        ax2.plot([p.budget for p in acc], [p.accuracy for p in acc], "s--", color="tab:green", ms=4,
                 label="accuracy")
        ax2.set_ylabel("accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    ax.set_title(f"Pareto sweep over {r.budget.option} ({len(ok)} points)")
    fig.tight_layout()
    tmp_png = png_path + ".tmp.png"
    fig.savefig(tmp_png)
    os.replace(tmp_png, png_path)
