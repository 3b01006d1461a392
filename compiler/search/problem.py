"""The search problem as arrays: a multiple-choice knapsack with budget rows, and its solution type.

Every solver in this package reads an :class:`MCKProblem` and returns a :class:`Solution`; the arrays know
nothing about layers or bit-widths. The second half of this file is the glue: the sensitivity-table reader
(:func:`read_sensitivity`, monotone repair, a data-free proxy) and :func:`build_problem`, which maps a Graph +
table + target + budgets onto the arrays and a solution back onto a Plan (:class:`SearchProblem`). The layout:

- ``n`` binaries ``x``, grouped contiguously: group ``g`` owns ``x[group_ptr[g]:group_ptr[g+1]]`` and exactly
  one of them is 1 (the one-hot row of a multiple-choice knapsack);
- ``k`` auxiliary continuous variables ``z`` (bounded; used for exact linearisations: precision-boundary
  edges, a bilinear BitOPs term at channel granularity);
- budget rows ``A_b [x; z] + const_b <= limit_b`` (named, reported with use/slack/binding);
- side rows ``lo <= A_s [x; z] <= hi`` (structural: shared activation groups, linearisations).

A problem with no auxiliaries and no side rows is *pure*; the structure-exploiting path (:mod:`.mckp`)
needs that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from mpqc.compiler.sensitivity.table import SensitivityTable


class SolveStatus(str, enum.Enum):
    """How a solve ended."""

    OPTIMAL = "optimal"  # proved optimal (within the requested gap)
    FEASIBLE = "feasible"  # a feasible solution, optimality not proved (time limit, gap target not met)
    INFEASIBLE = "infeasible"  # no assignment satisfies the rows
    NO_SOLUTION = "no_solution"  # stopped (time limit) before any feasible solution was found


@dataclass
class Solution:
    """A solver's answer: one chosen index per group, auxiliaries, and what is known about optimality.

    ``objective`` and ``bound`` include the problem's constant; ``gap`` is ``(objective - bound) /
    max(|objective|, 1e-12)`` over the variable part (the constant excluded), 0 when proved optimal.
    """

    choice: np.ndarray  # (G,) index of the chosen candidate inside each group
    aux: np.ndarray  # (k,)
    status: SolveStatus
    objective: float
    bound: float
    gap: float
    time_s: float
    solver: str
    budget_values: np.ndarray  # (m,) value of each budget row, constants included
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


@dataclass
class MCKProblem:
    """Minimise ``obj·x + aux_obj·z + obj_const`` over one-hot groups, budget rows and side rows."""

    group_ptr: np.ndarray  # (G+1,) int64, group g owns binaries group_ptr[g]:group_ptr[g+1]
    obj: np.ndarray  # (n,)
    budget_A: sp.csr_matrix  # (m, n + k)
    budget_limit: np.ndarray  # (m,)
    budget_names: list[str] = field(default_factory=list)
    budget_const: np.ndarray | None = None  # (m,) constant part of each row (fixed layers)
    side_A: sp.csr_matrix | None = None  # (p, n + k)
    side_lo: np.ndarray | None = None
    side_hi: np.ndarray | None = None
    aux_obj: np.ndarray | None = None  # (k,)
    aux_lo: np.ndarray | None = None
    aux_hi: np.ndarray | None = None
    obj_const: float = 0.0

    def __post_init__(self):
        self.group_ptr = np.asarray(self.group_ptr, dtype=np.int64)
        self.obj = np.asarray(self.obj, dtype=np.float64)
        n = self.n
        if self.group_ptr[0] != 0 or self.group_ptr[-1] != n or np.any(np.diff(self.group_ptr) <= 0):
            raise ValueError("group_ptr must start at 0, end at len(obj) and give every group >= 1 candidate")
        if self.aux_obj is None:
            self.aux_obj = np.zeros(0)
        self.aux_obj = np.asarray(self.aux_obj, dtype=np.float64)
        k = self.aux_obj.size
        self.aux_lo = np.zeros(k) if self.aux_lo is None else np.asarray(self.aux_lo, dtype=np.float64)
        self.aux_hi = np.full(k, np.inf) if self.aux_hi is None else np.asarray(self.aux_hi, dtype=np.float64)
        self.budget_A = sp.csr_matrix(self.budget_A, dtype=np.float64)
        if self.budget_A.shape[1] != n + k:
            if self.budget_A.shape[0] == 0:
                self.budget_A = sp.csr_matrix((0, n + k))
            else:
                raise ValueError(f"budget_A has {self.budget_A.shape[1]} columns, expected {n + k}")
        m = self.budget_A.shape[0]
        self.budget_limit = np.asarray(self.budget_limit, dtype=np.float64).reshape(m)
        self.budget_const = np.zeros(m) if self.budget_const is None else \
            np.asarray(self.budget_const, dtype=np.float64).reshape(m)
        if not self.budget_names:
            self.budget_names = [f"row{i}" for i in range(m)]
        if len(self.budget_names) != m:
            raise ValueError("one budget name per budget row")
        if self.side_A is None or self.side_A.shape[0] == 0:
            self.side_A = sp.csr_matrix((0, n + k))
            self.side_lo = np.zeros(0)
            self.side_hi = np.zeros(0)
        else:
            self.side_A = sp.csr_matrix(self.side_A, dtype=np.float64)
            if self.side_A.shape[1] != n + k:
                raise ValueError(f"side_A has {self.side_A.shape[1]} columns, expected {n + k}")
            p = self.side_A.shape[0]
            self.side_lo = np.full(p, -np.inf) if self.side_lo is None else np.asarray(self.side_lo, float)
            self.side_hi = np.full(p, np.inf) if self.side_hi is None else np.asarray(self.side_hi, float)

    # -- sizes -------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.obj.size)

    @property
    def n_groups(self) -> int:
        return int(self.group_ptr.size - 1)

    @property
    def n_aux(self) -> int:
        return int(self.aux_obj.size)

    @property
    def n_budgets(self) -> int:
        return int(self.budget_A.shape[0])

    @property
    def pure(self) -> bool:
        """No auxiliaries and no side rows: a plain multiple-choice knapsack."""
        return self.n_aux == 0 and self.side_A.shape[0] == 0

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.group_ptr)

    @property
    def group_of(self) -> np.ndarray:
        """(n,) the group of every binary."""
        return np.repeat(np.arange(self.n_groups), self.sizes)

    @property
    def rhs(self) -> np.ndarray:
        """Budget limits with the constant parts moved over: ``A_b [x; z] <= rhs``."""
        return self.budget_limit - self.budget_const

    # -- evaluation --------------------------------------------------------------------------------------
    def x_of(self, choice: np.ndarray) -> np.ndarray:
        """The 0/1 vector of a choice (one index per group)."""
        x = np.zeros(self.n)
        x[self.group_ptr[:-1] + np.asarray(choice, dtype=np.int64)] = 1.0
        return x

    def choice_of(self, x: np.ndarray) -> np.ndarray:
        """Round a (near-)integral x to one index per group (the largest entry of each group)."""
        x = np.asarray(x, dtype=np.float64)[: self.n]
        gof = self.group_of
        # largest entry per group, first on ties: sort by (group, -x) and take each group's first
        order = np.lexsort((-x, gof))
        first = order[self.group_ptr[:-1]]
        return (first - self.group_ptr[:-1]).astype(np.int64)

    def objective_of(self, choice: np.ndarray, aux: np.ndarray | None = None) -> float:
        v = float(self.obj[self.group_ptr[:-1] + np.asarray(choice, dtype=np.int64)].sum()) + self.obj_const
        if self.n_aux and aux is not None:
            v += float(self.aux_obj @ aux)
        return v

    def budget_values(self, choice: np.ndarray, aux: np.ndarray | None = None) -> np.ndarray:
        """Value of each budget row (constants included)."""
        xz = np.concatenate([self.x_of(choice), np.zeros(self.n_aux) if aux is None else aux])
        return self.budget_A @ xz + self.budget_const

    def feasible(self, choice: np.ndarray, aux: np.ndarray | None = None, tol: float = 1e-7) -> bool:
        """True when ``choice`` (and ``aux``) satisfies every budget and side row, to a relative tolerance."""
        aux = np.zeros(self.n_aux) if aux is None else np.asarray(aux, dtype=np.float64)
        xz = np.concatenate([self.x_of(choice), aux])
        bv = self.budget_A @ xz
        rhs = self.rhs
        if np.any(bv > rhs + tol * np.maximum(1.0, np.abs(self.budget_limit))):
            return False
        if self.side_A.shape[0]:
            sv = self.side_A @ xz
            scale = tol * np.maximum(1.0, np.abs(self.side_A).max(axis=1).toarray().ravel())
            if np.any(sv < self.side_lo - scale) or np.any(sv > self.side_hi + scale):
                return False
        if self.n_aux and (np.any(aux < self.aux_lo - tol) or np.any(aux > self.aux_hi + tol)):
            return False
        return True

    def best_aux(self, choice: np.ndarray) -> np.ndarray:
        """The cheapest auxiliaries for a fixed choice (an LP in z only; empty when there are none)."""
        if not self.n_aux:
            return np.zeros(0)
        from .solve_highs import solve_aux_lp

        return solve_aux_lp(self, choice)

    def with_objective(self, obj: np.ndarray, aux_obj: np.ndarray | None = None, obj_const: float = 0.0) \
            -> MCKProblem:
        """The same feasible set under another objective."""
        return MCKProblem(self.group_ptr, obj, self.budget_A, self.budget_limit, list(self.budget_names),
                          self.budget_const, self.side_A, self.side_lo, self.side_hi,
                          np.zeros(self.n_aux) if aux_obj is None else aux_obj, self.aux_lo, self.aux_hi, obj_const)

    def without_budgets(self, keep: np.ndarray | list[bool]) -> MCKProblem:
        """The same problem keeping only the budget rows where ``keep`` is true."""
        keep = np.asarray(keep, dtype=bool)
        idx = np.flatnonzero(keep)
        return MCKProblem(self.group_ptr, self.obj, self.budget_A[idx], self.budget_limit[idx],
                          [self.budget_names[i] for i in idx], self.budget_const[idx], self.side_A, self.side_lo,
                          self.side_hi, self.aux_obj, self.aux_lo, self.aux_hi, self.obj_const)

    def finish(self, choice: np.ndarray, aux: np.ndarray | None, status: SolveStatus, bound: float,
               time_s: float, solver: str, info: dict | None = None) -> Solution:
        """Wrap a choice into a :class:`Solution` (objective, gap and budget values computed here)."""
        choice = np.asarray(choice, dtype=np.int64)
        aux = np.zeros(self.n_aux) if aux is None else np.asarray(aux, dtype=np.float64)
        obj = self.objective_of(choice, aux)
        var = obj - self.obj_const
        bound = min(bound, obj) if np.isfinite(bound) else bound
        gap = 0.0 if status == SolveStatus.OPTIMAL and not np.isfinite(bound) else \
            max(0.0, (obj - bound) / max(abs(var), 1e-12)) if np.isfinite(bound) else float("inf")
        return Solution(choice, aux, status, obj, float(bound), float(gap), float(time_s), solver,
                        self.budget_values(choice, aux), dict(info or {}))


def infeasible_solution(problem: MCKProblem, time_s: float, solver: str, status=SolveStatus.INFEASIBLE,
                        info: dict | None = None) -> Solution:
    """A Solution object for a solve that found nothing."""
    return Solution(np.zeros(problem.n_groups, dtype=np.int64), np.zeros(problem.n_aux), status, float("inf"),
                    float("inf") if status == SolveStatus.INFEASIBLE else -float("inf"), float("inf"),
                    float(time_s), solver, np.full(problem.n_budgets, np.nan), dict(info or {}))


def padded(problem: MCKProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ``(G, K)`` views of a pure problem: objective (+inf padding), budget rows ``(m, G, K)``, mask."""
    sizes = problem.sizes
    G, K, m = problem.n_groups, int(sizes.max()), problem.n_budgets
    mask = np.arange(K)[None, :] < sizes[:, None]
    C = np.full((G, K), np.inf)
    C[mask] = problem.obj
    A = np.zeros((m, G, K))
    if m:
        dense_rows = problem.budget_A[:, : problem.n].toarray()
        for i in range(m):
            A[i][mask] = dense_rows[i]
    return C, A, mask


# =========================================================================================================
# Sensitivity tables
# =========================================================================================================
def read_sensitivity(source, *, monotone: bool = False) -> SensitivityTable:
    """The search's sensitivity table, from a path (mpqc's JSON or LIMPQ's indicator pickle), a dict in either
    format, or a table already read.

    One reader for everyone: this is :mod:`mpqc.compiler.sensitivity.table` (its checks, its one-line errors).
    With ``monotone`` the scores are repaired (:func:`monotone_repair`).
    """
    from mpqc.compiler.sensitivity.table import SensitivityTable as Table
    from mpqc.compiler.sensitivity.table import load_table, table_from_limpq

    if isinstance(source, Table):
        table = source
    elif isinstance(source, dict):
        limpq = "weight" in source and "act" in source and "layers" not in source
        table = table_from_limpq(source) if limpq else Table.from_dict(source, "<table>")
    else:
        table = load_table(source)
    return monotone_repair(table) if monotone else table


def monotone_repair(table: SensitivityTable) -> SensitivityTable:
    """Make every score non-increasing in bits (and in energy): a running max from the highest bit down.

    ``s'(b) = max_{b' >= b} s(b')``, so a lower precision never scores better than a higher one. LIMPQ's
    "erase wired points" (which forbids the lower width outright) is not applied: it removes a cheaper choice
    on the strength of one noisy score. Without repair (``--no-monotone``) the scores are used as given.
    """
    return table.monotone()


def proxy_sensitivity(graph, weights: dict[str, np.ndarray], w_bits, a_bits, *, e_grid=None, analog=None,
                      per_channel: bool = False) -> SensitivityTable:
    """A data-free proxy table (used when no ``--sensitivity`` is given).

    - weights: the relative quantization noise of symmetric per-output-channel rounding at b bits,
      ``||W - Q_b(W)||^2 / ||W||^2`` (per channel: that channel's share, so the channels sum to the layer);
    - activations: the noise of a uniform quantizer relative to the input variance, ``r^2 4^-b / 12`` with
      a clipping range of r = 8 standard deviations for signed and 4 for non-negative inputs (no data, so the
      same for every layer);
    - analog energy: the noise-to-signal ratio of the target's noise model at energy E, ``c/E`` with
      c = 144·sigma_t^2 (thermal), 1 (shot) or 12·weight_noise^2 (weight).

    It ranks layers by how badly rounding hurts their weights and knows nothing of the loss: a stand-in
    until a data-driven table (``mpqc sensitivity``) is available.
    """
    from mpqc.compiler.sensitivity.table import LayerScores
    from mpqc.compiler.sensitivity.table import SensitivityTable as Table

    layers: dict[str, LayerScores] = {}
    signed = {}
    for g in graph.act_groups():
        for c in g.consumers:
            signed[c] = signed.get(c, False) or g.signed
    for op in graph.layers():
        ls = LayerScores()
        W = weights.get(op.name)
        if W is not None and op.weight_shape:
            per_c = {b: weight_noise(W, b) for b in w_bits}
            ls.w = {b: float(v.sum()) for b, v in per_c.items()}
            if per_channel:
                ls.w_channel = {b: v.tolist() for b, v in per_c.items()}
        if op.act_inputs:
            r = 8.0 if signed.get(op.name, True) else 4.0
            ls.a = {b: r * r * 4.0 ** (-b) / 12.0 for b in a_bits}
        if e_grid is not None and analog is not None:
            c = {"thermal": 144.0 * analog.sigma_t ** 2, "shot": 1.0,
                 "weight": 12.0 * analog.weight_noise ** 2}[analog.noise]
            ls.e = {float(e): c / float(e) for e in e_grid}
        layers[op.name] = ls
    return Table("proxy", "", "", {}, layers, source="<data-free proxy>")


def weight_noise(W: np.ndarray, bits: int) -> np.ndarray:
    """Per output channel ``||W_c - Q_b(W_c)||^2 / ||W||^2`` for symmetric per-channel rounding at ``bits``."""
    rows = np.asarray(W, dtype=np.float64).reshape(np.shape(W)[0], -1)
    qmax = max(2 ** (bits - 1) - 1, 1)
    scale = np.abs(rows).max(axis=1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(rows / scale), -qmax - 1, qmax) * scale
    return ((rows - q) ** 2).sum(axis=1) / max(float((rows ** 2).sum()), 1e-30)


# =========================================================================================================
# Builder: Graph + table + target + budgets -> MCKProblem, and back to a Plan
# =========================================================================================================
def parse_weight_alpha(value, *, allow_auto: bool) -> float | str:
    """``--weight-alpha``: a finite number >= 0 (as float), or ``"auto"`` where ``allow_auto`` (the compile measures
    it by probe fine-tunings; the search alone cannot); one-line UserError otherwise."""
    import math

    from mpqc.errors import UserError

    hint = "a finite number >= 0" + (" or auto" if allow_auto else "")
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            if not allow_auto:
                raise UserError("--weight-alpha auto is measured by fine-tuning probes, which only mpqc compile "
                                "runs; give a number")
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"--weight-alpha {value!r}: give {hint}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise UserError(f"--weight-alpha {value!r} must be {hint}")
    return float(value)


@dataclass
class SearchOptions:
    """How to search (the ``mpqc search`` options that are not budgets)."""

    granularity: str = "layer"  # "layer" | "channel"
    clusters: int | None = None  # channel granularity: k groups of channels per layer
    w_candidates: tuple[int, ...] | None = None  # None: the target's widths
    a_candidates: tuple[int, ...] | None = None
    fix: dict = field(default_factory=dict)  # layer (or glob, "first", "last") -> {"w", "a", "e"}
    weight_alpha: float = 1.0
    monotone: bool = True
    act_groups: str = "tensor"  # "tensor" | "consumer"
    boundary_cost: float | None = None  # objective weight per precision change; None: edges only when priced


@dataclass
class BudgetRow:
    """A budget resolved against a graph and target: the row's internal limit and how to print values."""

    budget: object  # budgets.Budget
    kind: str
    limit: float
    display_div: float = 1.0
    energy_unit: str = ""

    @property
    def name(self) -> str:
        return self.budget.name

    def describe(self, raw: float | None) -> str:
        from .budgets import format_value

        return "n/a" if raw is None else format_value(self.kind, raw / self.display_div, self.energy_unit)


@dataclass
class Unit:
    """One group of the problem.

    ``layers``: one or more layers chosen jointly; each option is a tuple with one ``(w, a, format, e)`` per
    member (the consumers of one shared activation tensor take one option with a common ``a``);
    ``channel``: a channel (or cluster of channels) of a layer, options are weight widths;
    ``energy``: a channel (or cluster) of an analog layer, options are ``(w, a, format, e)`` over its energies;
    ``act``: an activation unit's one-hot over widths (when its consumers are not merged into one group).
    """

    kind: str  # "layers" | "channel" | "energy" | "act"
    name: str  # unit name (a layer, or an activation unit)
    options: list
    members: tuple[str, ...] = ()
    channels: np.ndarray | None = None  # channel units: the output channels it covers


@dataclass
class SearchProblem:
    """An :class:`MCKProblem` plus what is needed to turn its solution into a :class:`Plan`."""

    problem: MCKProblem
    units: list[Unit]
    rows: list[BudgetRow]
    graph: object
    target: object
    options: SearchOptions
    act_units: dict  # act unit name -> {"tensors": [...], "consumers": [...], "group": index or None}
    layer_unit: dict  # layer name -> act unit name
    channel_groups: dict  # layer -> list of group indices (channel granularity)
    warnings: list = field(default_factory=list)
    boundary_edges: int = 0
    # channel granularity with searched activation widths: what couples the groups (see mckp.solve_coupled)
    coupling: dict = field(default_factory=dict)
    energy_groups: dict = field(default_factory=dict)  # analog layer -> group indices of its channel E units
    filters: list = field(default_factory=list)  # budgets met by leaving options out, not by a row (act-mem-max)

    def describe(self, i: int, value: float | None) -> str:
        """Infeasibility message part for budget row ``i``."""
        r = self.rows[i]
        if value is None:
            return f"{r.budget.label}: no value works while the other budgets hold"
        b = r.budget
        if b.compression is not None and value > 0:  # a ratio: the largest one that works
            most = b.compression * r.limit / value
            return (f"{b.label} needs <= {most:.4g}x (weights of at least {r.describe(value)}; {b.text}x gives "
                    f"{r.describe(r.limit)})")
        if b.avg_bits is not None and r.limit > 0:  # W·A of the uniform network: the smallest product that works
            w, a = b.avg_bits
            least = value / r.limit * w * a
            return (f"{b.label} needs W·A >= {least:.3g} (given {w * a}: {r.describe(r.limit)}, where the smallest "
                    f"plan takes {r.describe(value)}); e.g. --bitops {value / 1e9 * 1.000001:.6g}")
        return f"{b.label} needs >= {r.describe(value)} (given {r.describe(r.limit)})"

    def assignment(self, choice: np.ndarray) -> dict:
        """Layer -> {"w", "a", "format", "e"} and act unit -> bits for a choice (one index per group)."""
        layers: dict = {}
        acts: dict = {}
        for g, u in enumerate(self.units):
            opt = u.options[int(choice[g])]
            if u.kind == "layers":
                for member, (w, a, fmt, e) in zip(u.members, opt):
                    layers[member] = {"w": w, "a": a, "format": fmt, "e": e}
            elif u.kind == "act":
                acts[u.name] = opt
        for layer, groups in self.channel_groups.items():
            op = self.graph.ops[layer]
            bits = [0] * op.out_channels
            for g in groups:
                u = self.units[g]
                for c in u.channels:
                    bits[int(c)] = int(u.options[int(choice[g])])
            unit = self.layer_unit.get(layer)
            layers[layer] = {"w": bits, "a": acts.get(unit), "format": "int", "e": None}
        for layer, groups in self.energy_groups.items():
            es = [0.0] * self.graph.ops[layer].out_channels
            for g in groups:
                u = self.units[g]
                w, a, fmt, e = u.options[int(choice[g])]
                for c in u.channels:
                    es[int(c)] = float(e)
            layers[layer] = {"w": w, "a": a, "format": fmt, "e": es}
        for name, info in self.act_units.items():
            if name not in acts:
                cons = [layers[c]["a"] for c in info["consumers"] if c in layers]
                acts[name] = cons[0] if cons else None
        return {"layers": layers, "acts": acts}

    def to_plan(self, sol: Solution, *, sensitivity: str | None = None, lut=None, meta: dict | None = None):
        """The Plan of a solution, with costs under every model of the target and the solver report."""
        from mpqc.compiler.ir import OpKind
        from mpqc.compiler.plan import LayerPlan, Plan, plan_costs

        asg = self.assignment(sol.choice)
        layers = {}
        for op in self.graph.layers():
            d = asg["layers"].get(op.name)
            if d is None:
                continue
            w = None if op.kind == OpKind.MATMUL else d["w"]
            e = d["e"]
            e = None if e is None else (list(e) if isinstance(e, list) else float(e))
            layers[op.name] = LayerPlan(w, d["a"], e, d["format"] or "int")
        acts: dict = {}
        if self.options.act_groups == "tensor":
            for name, info in self.act_units.items():
                for t in info["tensors"]:
                    acts[t] = asg["acts"].get(name)
        plan = Plan(target=self.target.name, granularity=self.options.granularity,
                    act_groups_mode=self.options.act_groups, layers=layers, act_groups=acts,
                    objective=float(sol.objective), sensitivity=sensitivity, meta=dict(meta or {}))
        costs = plan_costs(plan, self.graph, self.target, lut=lut)
        values = sol.budget_values
        for i, r in enumerate(self.rows):
            v = float(values[i]) if values is not None and i < len(values) else float("nan")
            slack = r.limit - v
            tol = 1e-4 * max(abs(r.limit), 1.0)  # within 0.01 %: at the budget (a solver stops near it)
            entry = {"value": v / r.display_div if r.kind == "emac" else _user_unit(r.kind, v),
                     "budget": r.limit / r.display_div if r.kind == "emac" else _user_unit(r.kind, r.limit),
                     "slack": slack / r.display_div if r.kind == "emac" else _user_unit(r.kind, slack),
                     "binding": bool(slack <= tol), "unit": _unit_name(r), "option": r.budget.label}
            costs[f"budget:{r.name}"] = entry
        from .budgets import raw_limit

        for b in self.filters:  # every tensor was held under it when the options were built; say how close
            v, limit = costs["act_mem_max"]["value"] * 8, raw_limit(b)
            costs[f"budget:{b.name}"] = {"value": _user_unit(b.kind, v), "budget": _user_unit(b.kind, limit),
                                         "slack": _user_unit(b.kind, limit - v),
                                         "binding": bool(limit - v <= 1e-6 * max(limit, 1.0)), "unit": "KiB",
                                         "option": b.label}
        for name, c in costs.items():
            if not name.startswith("budget:"):
                c.setdefault("budget", None)
                c.setdefault("slack", None)
                c.setdefault("binding", False)
        plan.costs = costs
        plan.solver = {"name": sol.solver, "status": sol.status.value, "objective": float(sol.objective),
                       "gap": float(sol.gap), "time_s": float(sol.time_s), "bound": float(sol.bound),
                       "binaries": self.problem.n, "groups": self.problem.n_groups}
        proof = {k: sol.info[k] for k in ("tried_act_choices", "local_moves", "branch_nodes", "bound_from")
                 if k in (sol.info or {})}
        if "root_bound" in (sol.info or {}):  # the gap the Lagrangian bound left before branching
            var = max(abs(float(sol.objective) - self.problem.obj_const), 1e-12)
            proof["root_gap"] = max(0.0, (float(sol.objective) - float(sol.info["root_bound"])) / var)
        if proof:  # how the coupled search got its plan and bound (the report says it in words)
            plan.solver["proof"] = proof
        if self.warnings:
            plan.meta.setdefault("warnings", list(self.warnings))
        return plan


def _user_unit(kind: str, raw: float) -> float:
    from .budgets import BITS_PER_KIB, BITS_PER_MIB

    if kind == "bitops":
        return raw / 1e9
    if kind == "size":
        return raw / BITS_PER_MIB
    if kind in ("act_mem", "act_mem_max"):
        return raw / BITS_PER_KIB
    return raw


def _unit_name(r: BudgetRow) -> str:
    return {"bitops": "GBOPs", "size": "MiB", "act_mem": "KiB", "act_mem_max": "KiB", "latency": "ms",
            "energy": r.energy_unit, "emac": f"{r.energy_unit}/MAC"}[r.kind]


class _Assembler:
    """Collects groups (as (U, K) blocks), auxiliaries and side rows, then emits an MCKProblem."""

    def __init__(self, n_rows: int):
        self.m = n_rows
        self.n = 0
        self.sizes: list[np.ndarray] = []
        self.obj: list[np.ndarray] = []
        self.rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_rows)]  # (cols, vals)
        self.aux_obj: list[float] = []
        self.aux_hi: list[float] = []
        self.aux_rows: list[list[tuple[int, float]]] = [[] for _ in range(n_rows)]
        self.side: list[tuple[np.ndarray, np.ndarray, float, float]] = []  # cols (aux as -1-j), vals, lo, hi

    def add_block(self, obj: np.ndarray, costs: list[np.ndarray | None]) -> np.ndarray:
        """``obj`` (U, K) for U groups of K candidates; ``costs[i]`` (U, K) row coefficients. Returns indices."""
        U, K = obj.shape
        idx = self.n + np.arange(U * K).reshape(U, K)
        self.n += U * K
        self.sizes.append(np.full(U, K))
        self.obj.append(obj.ravel())
        for i, c in enumerate(costs):
            if c is not None:
                c = np.broadcast_to(c, (U, K)).ravel()
                nz = c != 0
                self.rows[i].append((idx.ravel()[nz], c[nz]))
        return idx

    def add_aux(self, obj: float, hi: float, row_coefs: dict[int, float]) -> int:
        j = len(self.aux_obj)
        self.aux_obj.append(float(obj))
        self.aux_hi.append(float(hi))
        for i, v in row_coefs.items():
            self.aux_rows[i].append((j, float(v)))
        return -1 - j

    def add_side(self, cols, vals, lo: float, hi: float) -> None:
        self.side.append((np.asarray(cols, dtype=np.int64), np.asarray(vals, dtype=np.float64), lo, hi))

    def build(self, limits: np.ndarray, names: list[str]) -> MCKProblem:
        n, k = self.n, len(self.aux_obj)

        def col(c):
            c = np.asarray(c, dtype=np.int64)
            return np.where(c < 0, n + (-1 - c), c)

        r_idx, c_idx, vals = [], [], []
        for i in range(self.m):
            for cols, v in self.rows[i]:
                r_idx.append(np.full(cols.size, i))
                c_idx.append(cols)
                vals.append(v)
            for j, v in self.aux_rows[i]:
                r_idx.append(np.array([i]))
                c_idx.append(np.array([n + j]))
                vals.append(np.array([v]))
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        A = sp.csr_matrix((cat(vals, float), (cat(r_idx, np.int64), cat(c_idx, np.int64))), shape=(self.m, n + k))
        side_A = side_lo = side_hi = None
        if self.side:
            rr = np.concatenate([np.full(len(c), i) for i, (c, _, _, _) in enumerate(self.side)])
            cc = col(np.concatenate([c for c, _, _, _ in self.side]))
            vv = np.concatenate([v for _, v, _, _ in self.side])
            side_A = sp.csr_matrix((vv, (rr, cc)), shape=(len(self.side), n + k))
            side_lo = np.array([lo for _, _, lo, _ in self.side])
            side_hi = np.array([hi for _, _, _, hi in self.side])
        ptr = np.concatenate([[0], np.cumsum(np.concatenate(self.sizes))])
        return MCKProblem(ptr, np.concatenate(self.obj), A, limits, names, None, side_A, side_lo, side_hi,
                          np.array(self.aux_obj), np.zeros(k), np.array(self.aux_hi))


def parse_fix(items) -> dict:
    """``["conv1=8", "fc=W8A8", "layer4.*=W4", "x=A8", "conv2=E100"]`` -> {pattern: {"w", "a", "e"}}."""
    import re

    from mpqc.errors import UserError

    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"--fix {item!r} is not NAME=BITS; write e.g. --fix conv1=8 or --fix fc=W8A8")
        name, spec = item.rsplit("=", 1)
        name, spec = name.strip(), spec.strip()
        d = {"w": None, "a": None, "e": None}
        m = re.fullmatch(r"(\d+)", spec)
        mw = re.fullmatch(r"[wW](\d+)(?:[aA](\d+))?", spec)
        ma = re.fullmatch(r"[aA](\d+)", spec)
        me = re.fullmatch(r"[eE]([0-9.eE+-]+)", spec)
        if m:
            d["w"] = d["a"] = int(m.group(1))
        elif mw:
            d["w"] = int(mw.group(1))
            d["a"] = int(mw.group(2)) if mw.group(2) else None
        elif ma:
            d["a"] = int(ma.group(1))
        elif me:
            try:
                d["e"] = float(me.group(1))
            except ValueError:
                raise UserError(f"--fix {item!r}: {spec!r} is not an energy per MAC; write e.g. E100") from None
            if not np.isfinite(d["e"]) or d["e"] <= 0:
                raise UserError(f"--fix {item!r}: the energy per MAC must be positive")
        else:
            raise UserError(f"--fix {item!r}: {spec!r} is not BITS, WxAy, Wx, Ay or E<energy>; write e.g. conv1=8")
        for k in ("w", "a"):
            if d[k] is not None and not 1 <= d[k] <= 32:
                raise UserError(f"--fix {item!r}: {d[k]} bits is out of range 1..32")
        if not name:
            raise UserError(f"--fix {item!r}: the layer name is empty")
        out[name] = d
    return out


def parse_candidates(text: str | None) -> tuple[int, ...] | None:
    """``"8,6,5,4,3,2"`` -> (8, 6, 5, 4, 3, 2), highest first."""
    from mpqc.errors import UserError

    if text is None:
        return None
    try:
        vals = sorted({int(t) for t in str(text).replace(" ", "").split(",") if t}, reverse=True)
    except ValueError:
        raise UserError(f"--candidates {text!r} is not a comma-separated list of bit-widths, e.g. 8,6,4") from None
    if not vals or any(not 1 <= v <= 32 for v in vals):
        raise UserError(f"--candidates {text!r} must list bit-widths in 1..32, e.g. 8,6,5,4,3,2")
    return tuple(vals)


def _numel(shape) -> int:
    import math

    return int(math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape))


def resolve_fixed(names: list[str], target_fixed: dict, cli_fixed: dict,
                  ends: tuple[list[str], list[str]] | None = None) -> dict[str, dict]:
    """Layer -> {"w", "a", "e"} from the target's [fixed] table and --fix (which wins); names may be globs.
    ``first``/``last`` name ``ends`` (:meth:`Graph.end_layers`: every stem, every head), else the first and
    last of ``names``."""
    import difflib
    import fnmatch

    from mpqc.errors import UserError

    out: dict[str, dict] = {}
    ordered = []  # (source, pattern, spec): the target's entries, then --fix; within each, globs before names
    for source, entries in (("target", target_fixed or {}), ("--fix", cli_fixed or {})):
        items = list(entries.items())
        ordered += [(source, p, e) for p, e in items if p not in names and p not in ("first", "last")]
        ordered += [(source, p, e) for p, e in items if p in names or p in ("first", "last")]
    for source, pat, spec in ordered:
        if True:
            spec = {"w": spec.get("w"), "a": spec.get("a"), "e": spec.get("e")}
            if pat == "first":
                hits = [n for n in ends[0] if n in names] if ends else names[:1]
            elif pat == "last":
                hits = [n for n in ends[1] if n in names] if ends else names[-1:]
            elif pat in names:
                hits = [pat]
            else:
                hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits and source == "target" and any(c in pat for c in "*?["):
                continue  # a target's glob is a rule for the models it fits (a file reused across models)
            if not hits:
                close = difflib.get_close_matches(pat, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see `mpqc inspect MODEL`"
                raise UserError(f"{source} {pat}: no quantizable layer matches{hint}")
            for n in hits:  # a later, more specific entry overrides only the widths it names
                merged = dict(out.get(n, {"w": None, "a": None, "e": None}))
                merged.update({k: v for k, v in spec.items() if v is not None})
                out[n] = merged
    return out


# Widths at or above this (bf16, fp16, int16) are taken as lossless: score 0 where the table has none. The
# sensitivity pass measures the integer and fp8 widths up to 8 bits, against which a 16-bit layer's error is
# negligible; without this a target's 16-bit candidates (cuda's bf16) were dropped for want of a score.
LOSSLESS_BITS = 16

PRODUCT_MAX = 4096  # a shared tensor's consumers become one group when their agreeing combinations are this few


def build_problem(graph, target, budgets: list, table: SensitivityTable, options: SearchOptions | None = None, *,
                  lut=None) -> SearchProblem:
    """Map the search onto an :class:`MCKProblem`.

    Layer granularity: one group per quantizable layer over its joint ``(w, a)`` candidates (the target's
    capability filter, ``--candidates``, ``--fix``, the table's coverage, ``--act-mem-max`` and the latency
    table's support applied), so BitOPs = MACs·b_w·b_a is linear. Activation tensors read by several layers
    ("tensor" mode) get a one-hot ``y[unit, b]`` and rows ``sum_{c: a(c)=b} x[l, c] = y[unit, b]`` for every
    consumer; a matmul ties the tensors it reads. Channel granularity: per-output-channel (or per-cluster)
    weight groups and one activation group per unit; costs that couple b_w and b_a are linearised exactly
    (``u >= W(b) - M(1 - y_b)``, ``u >= 0``) unless the activation width is fixed. Analog targets: each
    layer's candidates are the energies per MAC of the grid.
    """
    import itertools
    import math

    from mpqc.compiler.ir import OpKind
    from mpqc.compiler.plan import layer_edges
    from mpqc.cost_models import digital
    from mpqc.cost_models.boundary import target_boundary
    from mpqc.errors import UserError

    from .budgets import energy_in_unit, raw_limit

    opt = options or SearchOptions()
    if opt.granularity not in ("layer", "channel"):
        raise UserError(f"--granularity {opt.granularity!r}: use layer or channel")
    if opt.act_groups not in ("tensor", "consumer"):
        raise UserError(f"--act-groups {opt.act_groups!r}: use tensor or consumer")
    parse_weight_alpha(opt.weight_alpha, allow_auto=False)
    layers = graph.layers()
    if not layers:
        raise UserError("the model has no quantizable layers (conv, linear, matmul, embedding); nothing to search")
    names = [op.name for op in layers]
    fb = int(target.float_bits)
    analog = target.kind == "analog"
    channel = opt.granularity == "channel"
    if channel and "channel" not in target.granularities:
        raise UserError(f"target {target.name} sets bits per layer only; use --granularity layer")
    if opt.clusters is not None and (not channel or opt.clusters < 1):
        raise UserError("--clusters K needs --granularity channel and K >= 1")
    warnings: list[str] = []
    offered = set(target.weight_bits) | set(target.act_bits)
    foreign = sorted((set(opt.w_candidates or ()) | set(opt.a_candidates or ())) - offered)
    if foreign:
        warnings.append(f"--candidates: target {target.name} runs no layer at {', '.join(map(str, foreign))} bits "
                        f"(it offers {', '.join(map(str, sorted(offered)))}); those widths are left out")
    ends = graph.end_layers()
    fixed = resolve_fixed(names, target.fixed, opt.fix, ends)
    alpha = float(opt.weight_alpha)
    numel = {t: _numel(graph.tensors[t].shape) for op in layers for t in op.act_inputs}
    bits_of = lambda b: fb if b is None else b
    amax = next((raw_limit(b) for b in budgets if b.kind == "act_mem_max"), None)
    kinds = {b.kind for b in budgets}
    if "latency" in kinds and lut is None:
        raise UserError("--latency needs --lut FILE (a table written by `mpqc profile`)")
    if "emac" in kinds and not analog:
        raise UserError(f"--emac applies to analog targets; target {target.name} is {target.kind}")

    # ---- candidates per layer ---------------------------------------------------------------------------
    cands: dict[str, list[tuple]] = {}
    missing: list[str] = []
    dropped: dict[str, set] = {}
    flat: list[str] = []
    digital_layers: set[str] = set()
    uncovered: dict[str, str] = {}  # layers no analog array runs: digital, and the search says so
    if analog:
        for pat in target.analog.digital_layers:
            digital_layers.update(resolve_fixed(names, {pat: {}}, {}, ends).keys())
        grid = [float(e) for e in target.analog.e_grid()]
        skipped = (getattr(table, "meta", None) or {}).get("skipped") or {}
        for op in layers:
            if op.kind == OpKind.MATMUL:
                uncovered[op.name] = "an activation x activation product; an analog array holds weights"
            elif op.name in skipped and not table.e(op.name):
                uncovered[op.name] = str(skipped[op.name])
        digital_layers.update(uncovered)
    for op in layers:
        fx = fixed.get(op.name)
        mm = op.kind == OpKind.MATMUL
        if analog:
            wb, ab = max(target.weight_bits), max(target.act_bits)
            w = None if mm else (wb if op.weight_shape else None)
            if op.name in uncovered and fx is not None and fx.get("e") is not None:
                raise UserError(f"--fix {op.name}=E{fx['e']:g}: {op.name} is {uncovered[op.name]}, which runs "
                                "digitally on an analog target; drop that --fix")
            if op.name in digital_layers:
                opts = [(w, ab if op.act_inputs else None, "int", None)]
            elif fx is not None and fx.get("e") is not None:
                opts = [(w, ab if op.act_inputs else None, "int", float(fx["e"]))]
            elif fx is not None and (fx.get("w") not in (None, wb) or fx.get("a") not in (None, ab)):
                raise UserError(f"--fix {op.name}: target {target.name} runs its analog layers at W{wb}A{ab}; fix "
                                f"the energy per MAC instead, e.g. --fix {op.name}=E100")
            else:
                es = grid
                have = table.e(op.name)
                if have:
                    keys = np.array(sorted(have))
                    es = [e for e in grid if np.any(np.isclose(keys, e, rtol=1e-6))]
                    if not es:
                        raise UserError(f"{table.source}: layer {op.name} has energy scores at {keys.tolist()}, none "
                                        f"on the target's grid {grid[0]:g}..{grid[-1]:g} ({len(grid)} points)")
                else:
                    missing.append(op.name)
                opts = [(w, ab if op.act_inputs else None, "int", e) for e in es]
            if amax is not None and op.act_inputs and max(numel[t] for t in op.act_inputs) * ab > amax * (1 + 1e-12):
                raise _act_mem_max_error(amax, op.name, max(numel[t] for t in op.act_inputs) * ab)  # A is fixed
            cands[op.name] = opts
            continue
        if fx is not None and fx.get("e") is not None:
            raise UserError(f"--fix {op.name}=E{fx['e']:g}: an energy per MAC applies to analog targets; target "
                            f"{target.name} is {target.kind}: fix bits instead, e.g. --fix {op.name}=W8A8")
        full = [(c.w_bits, c.a_bits, c.format, None) for c in target.candidate_specs(op.kind)]
        if mm:
            full = [o for o in full if o[0] == o[1]]
        opts = list(full)
        if opt.w_candidates and not mm:
            opts = [o for o in opts if o[0] is None or o[0] in opt.w_candidates]
        if opt.a_candidates:
            opts = [o for o in opts if o[1] is None or o[1] in opt.a_candidates]
        if fx is not None:
            fw, fa = fx.get("w"), fx.get("a")
            if mm:
                fw, fa = None, fa if fa is not None else fw

            def match(o, fw=fw, fa=fa, no_act=not op.act_inputs):
                return (fw is None or o[0] == fw) and (fa is None or o[1] == fa or (o[1] is None and no_act))

            sel = [o for o in opts if match(o)] or [o for o in full if match(o)]
            if not sel:
                allowed = ", ".join(sorted({_label(o) for o in full}))
                asked = "".join(f"{k}{v}" for k, v in (("W", fw), ("A", fa)) if v is not None)
                raise UserError(f"--fix {op.name}: target {target.name} does not run a {op.kind.value} layer at "
                                f"{asked}; it allows {allowed}")
            opts = sel
        fw = fx.get("w") if fx else None
        fa = fx.get("a") if fx else None
        if mm and fw is not None:
            fa = fa if fa is not None else fw
        w_free = fw is None and not mm and bool(op.weight_shape)
        a_free = fa is None and bool(op.act_inputs)
        if w_free or a_free:
            if op.name not in table.layers:
                missing.append(op.name)
                continue
            sw, sa = table.w(op.name), table.a(op.name)
            for kind, sc, free in (("weights", sw, w_free), ("inputs", sa, a_free)):
                if free and len(sc) > 1 and max(sc.values()) <= 0:
                    flat.append(f"{op.name} {kind}")
            keep = [o for o in opts if (not w_free or o[0] is None or o[0] in sw or o[0] >= LOSSLESS_BITS)
                    and (not a_free or o[1] is None or o[1] in sa or o[1] >= LOSSLESS_BITS)]
            if len(keep) < len(opts):
                dropped[op.name] = {_label(o) for o in opts if o not in keep}
            opts = keep
        if lut is not None and "latency" in kinds:
            sup = []
            for o in opts:
                est = lut.lookup(op, o[1] if mm else o[0], o[1], fmt=None if o[2] == "int" else o[2])
                if math.isfinite(est.ms):
                    sup.append(o)
            opts = sup
        if amax is not None and op.act_inputs:
            opts = [o for o in opts if max(numel[t] for t in op.act_inputs) * bits_of(o[1]) <= amax * (1 + 1e-12)]
        if not opts:
            why = "the candidates left by --candidates, the sensitivity table, --act-mem-max and the latency table"
            if amax is not None and op.act_inputs:
                raise _act_mem_max_error(amax, op.name, max(numel[t] for t in op.act_inputs) *
                                         min(bits_of(o[1]) for o in full))
            raise UserError(f"layer {op.name} has no candidate precision left ({why})")
        cands[op.name] = opts
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{table.source}: no scores for searchable layer(s) {', '.join(missing[:3])}{more}; re-run "
                        "mpqc sensitivity on this model, or fix them with --fix NAME=BITS")
    if flat:  # a zero at every width makes the cheapest one free: usually an estimator that did not resolve
        warnings.append(f"{table.source}: zero score at every candidate for {', '.join(flat[:3])}"
                        + (f" and {len(flat) - 3} more" if len(flat) > 3 else "")
                        + "; the search will give them the cheapest precision. Check the sensitivity table "
                          "(more samples or probes), or fix them with --fix NAME=BITS")
    if graph.unquantized_note():
        warnings.append(graph.unquantized_note())
    if uncovered:
        some = "; ".join(f"{k} ({v})" for k, v in list(uncovered.items())[:3])
        warnings.append(f"running {len(uncovered)} layer(s) digitally at W{max(target.weight_bits)}"
                        f"A{max(target.act_bits)}: {some}" + (" ..." if len(uncovered) > 3 else ""))
    if dropped:
        some = ", ".join(f"{k} ({', '.join(sorted(v))})" for k, v in list(dropped.items())[:3])
        warnings.append(f"candidates without a score in the sensitivity table were dropped: {some}"
                        + (f" and {len(dropped) - 3} more layers" if len(dropped) > 3 else ""))

    # ---- activation units ---------------------------------------------------------------------------------
    act_units: dict[str, dict] = {}
    layer_unit: dict[str, str] = {}
    if opt.act_groups == "tensor":
        parent: dict[str, str] = {}

        def find(t):
            while parent.setdefault(t, t) != t:
                parent[t] = parent[parent[t]]
                t = parent[t]
            return t

        for op in layers:
            for t in op.act_inputs[1:]:
                parent[find(t)] = find(op.act_inputs[0])
            for t in op.act_inputs[:1]:
                find(t)
        comps: dict[str, dict] = {}
        for op in layers:
            if not op.act_inputs:
                continue
            root = find(op.act_inputs[0])
            c = comps.setdefault(root, {"tensors": [], "consumers": []})
            for t in op.act_inputs:
                if t not in c["tensors"]:
                    c["tensors"].append(t)
            c["consumers"].append(op.name)
        for c in comps.values():
            name = "+".join(c["tensors"])
            act_units[name] = c
            for lname in c["consumers"]:
                layer_unit[lname] = name
    else:
        for op in layers:
            if op.act_inputs:
                act_units[op.name] = {"tensors": list(op.act_inputs), "consumers": [op.name]}
                layer_unit[op.name] = op.name
    for info in act_units.values():
        sets = [{o[1] for o in cands[c]} for c in info["consumers"]]
        common = set.intersection(*sets)
        info["bits"] = sorted(common, key=lambda b: -1 if b is None else b, reverse=True)
        info["numel"] = sum(numel[t] for t in info["tensors"])
        if not common:
            cs = info["consumers"]
            raise UserError(f"layers {', '.join(cs[:3])} read the same activation tensor {info['tensors'][0]} but "
                            "share no activation width under the target, --candidates and --fix; use "
                            "--act-groups consumer or relax --fix")
        for c in info["consumers"]:
            cands[c] = [o for o in cands[c] if o[1] in common]
        size = sum(math.prod(sum(1 for o in cands[c] if o[1] == b) for c in info["consumers"]) for b in common)
        info["explicit"] = channel or (len(info["consumers"]) > 1 and size > PRODUCT_MAX)

    # ---- budget rows --------------------------------------------------------------------------------------
    rows: list[BudgetRow] = []
    energy_unit = target.analog.unit if analog else (target.costs.energy.unit if target.costs.energy else "")
    analog_macs = float(sum(op.macs for op in layers if cands[op.name][0][3] is not None)) if analog else 0.0
    for b in budgets:
        if b.kind == "act_mem_max":
            continue
        if b.kind == "bitops" and b.avg_bits is not None:
            x, y = b.avg_bits
            lim = 0.0
            for op in layers:
                mm = op.kind == OpKind.MATMUL
                fx = fixed.get(op.name) or {}
                wu = fx.get("w") if fx.get("w") is not None else x
                au = fx.get("a") if fx.get("a") is not None else (fx.get("w") if mm and fx.get("w") else y)
                if mm:
                    wu = au
                lim += digital.bitops(op, wu if (mm or op.weight_shape) else None, au if op.act_inputs else None,
                                      float_bits=fb)
            rows.append(BudgetRow(b, "bitops", lim))
        elif b.kind == "size" and b.compression is not None:
            total = sum(op.weight_numel for op in layers if op.weight_shape and op.kind != OpKind.MATMUL)
            rows.append(BudgetRow(b, "size", 32.0 * total / b.compression))
        elif b.kind == "energy":
            if not analog and (target.costs.energy is None or "energy" not in target.cost_models):
                raise UserError(f"--energy: target {target.name} has no energy model; use a target with [costs.energy]")
            rows.append(BudgetRow(b, "energy", energy_in_unit(b, energy_unit), energy_unit=energy_unit))
        elif b.kind == "emac":
            if analog_macs <= 0:
                raise UserError("--emac: every layer of this model stays digital on this target; nothing to budget")
            rows.append(BudgetRow(b, "emac", b.value * analog_macs, display_div=analog_macs, energy_unit=energy_unit))
        else:
            rows.append(BudgetRow(b, b.kind, raw_limit(b), energy_unit=energy_unit))
    R = len(rows)

    def layer_cost(op, o, kind: str, channel_idx: int | None = None) -> float:
        mm = op.kind == OpKind.MATMUL
        w = o[1] if mm else o[0]
        if kind == "bitops":
            return digital.bitops(op, w, o[1], float_bits=fb, channel=channel_idx)
        if kind == "size":
            return 0.0 if mm else digital.weight_bits_total(op, o[0], float_bits=fb, channel=channel_idx)
        if kind == "latency":
            ms = lut.lookup(op, w, o[1], fmt=None if o[2] == "int" else o[2]).ms
            return ms / (op.out_channels or 1) if channel_idx is not None else ms
        if kind in ("energy", "emac"):
            if analog:
                return 0.0 if o[3] is None else op.macs * o[3]
            return digital.digital_energy(op, w, o[1], target.costs.energy, float_bits=fb, channel=channel_idx)
        raise AssertionError(kind)

    def layer_score(op, o) -> float:
        if analog:
            if o[3] is None:
                return 0.0
            es = table.e(op.name)
            keys = np.array(sorted(es))
            if not keys.size:
                return 0.0
            k = keys[int(np.argmin(np.abs(keys - o[3])))]
            return float(es[float(k)])
        s = 0.0
        if o[0] is not None and op.kind != OpKind.MATMUL and op.weight_shape:
            s += alpha * table.w(op.name).get(o[0], 0.0)
        if o[1] is not None and op.act_inputs:
            s += table.a(op.name).get(o[1], 0.0)
        return s

    # ---- assemble -------------------------------------------------------------------------------------------
    asm = _Assembler(R)
    units: list[Unit] = []
    y_idx: dict[str, np.ndarray] = {}
    coupling: dict = {"y_group": {}, "ties": [], "coupled": []}
    channel_groups: dict[str, list[int]] = {}
    energy_groups: dict[str, list[int]] = {}
    channel_layers = set()
    # analog at channel granularity: every output channel (array column) of a layer with a choice of E gets its
    # own E; the widths stay the target's
    energy_layers = {op.name for op in layers if len(cands[op.name]) > 1 and cands[op.name][0][3] is not None} \
        if channel and analog else set()
    if channel and not analog:
        for op in layers:
            if op.kind in (OpKind.CONV, OpKind.LINEAR) and op.weight_shape and \
                    (fixed.get(op.name) or {}).get("w") is None:
                ws = sorted({o[0] for o in cands[op.name]}, key=lambda b: -1 if b is None else b, reverse=True)
                as_ = sorted({o[1] for o in cands[op.name]}, key=lambda b: -1 if b is None else b, reverse=True)
                pairs = {(o[0], o[1]) for o in cands[op.name]}
                if None in ws:
                    raise UserError(f"--granularity channel: target {target.name} may keep {op.name}'s weights in "
                                    "float, and a float layer has no per-channel widths; use --granularity layer, "
                                    f"or --fix {op.name}=W<bits> to keep it integer")
                if len(pairs) != len(ws) * len(as_):
                    raise UserError(f"--granularity channel: target {target.name} does not combine every weight "
                                    f"width with every activation width for {op.name}; use --granularity layer")
                channel_layers.add(op.name)
    # act units first (their y indices are needed by ties and linearisations)
    for name, info in act_units.items():
        if not info["explicit"]:
            continue
        bits = info["bits"]
        obj = np.zeros((1, len(bits)))
        for c in info["consumers"]:
            if c in channel_layers:
                obj[0] += [table.a(c).get(b, 0.0) if b is not None else 0.0 for b in bits]
        costs = [None] * R
        for i, r in enumerate(rows):
            if r.kind == "act_mem":
                per = info["numel"] if opt.act_groups == "tensor" else sum(numel[t] for t in info["tensors"])
                costs[i] = np.array([[per * bits_of(b) for b in bits]], dtype=float)
        y_idx[name] = asm.add_block(obj, costs)[0]
        units.append(Unit("act", name, list(bits)))
        coupling["y_group"][name] = len(units) - 1
    # layer-level units: a shared activation tensor's consumers form one group over the combinations that
    # agree on its width (a pure knapsack again) when there are few enough; otherwise ties to a one-hot y
    member_cols: dict[str, tuple[np.ndarray, list]] = {}  # layer -> (columns of its group, its option per col)
    done: set[str] = set()
    for op in layers:
        if op.name in channel_layers or op.name in energy_layers or op.name in done:
            continue
        uname = layer_unit.get(op.name)
        unit = act_units.get(uname) if uname else None
        members = [op.name]
        if unit is not None and not unit["explicit"] and len(unit["consumers"]) > 1:
            members = list(unit["consumers"])
        combos = []
        if len(members) == 1:
            combos = [(o,) for o in cands[op.name]]
        else:
            for b in unit["bits"]:
                per = [[o for o in cands[mb] if o[1] == b] for mb in members]
                combos.extend(itertools.product(*per))
        done.update(members)
        ops = [graph.ops[mb] for mb in members]
        obj = np.array([[sum(layer_score(o_op, o) for o_op, o in zip(ops, combo)) for combo in combos]])
        costs = [None] * R
        for i, r in enumerate(rows):
            if r.kind == "act_mem":
                if unit is None or unit["explicit"]:
                    continue
                costs[i] = np.array([[unit["numel"] * bits_of(combo[0][1]) for combo in combos]], dtype=float)
            else:
                per_member = [{o: layer_cost(o_op, o, r.kind) for o in cands[o_op.name]} for o_op in ops]
                costs[i] = np.array([[sum(pm[o] for pm, o in zip(per_member, combo)) for combo in combos]],
                                    dtype=float)
        cols = asm.add_block(obj, costs)[0]
        units.append(Unit("layers", uname if len(members) > 1 else op.name, combos, tuple(members)))
        for k, mb in enumerate(members):
            member_cols[mb] = (cols, [combo[k] for combo in combos])
        if unit is not None and unit["explicit"] and len(unit["bits"]) > 1:
            coupling["ties"].append((len(units) - 1, uname, [combo[0][1] for combo in combos]))
            for k, b in enumerate(unit["bits"]):
                sel = [int(c) for c, combo in zip(cols, combos) if combo[0][1] == b]
                asm.add_side(sel + [int(y_idx[uname][k])], [1.0] * len(sel) + [-1.0], 0.0, 0.0)
    # channel-level units
    for op in layers:
        if op.name not in channel_layers:
            continue
        _add_channel_layer(op, cands[op.name], table, alpha, rows, asm, units, channel_groups, y_idx, act_units,
                           layer_unit, layer_cost, opt, warnings, coupling)
    for op in layers:
        if op.name in energy_layers:
            _add_energy_channel_layer(op, cands[op.name], table, rows, asm, units, energy_groups, layer_cost,
                                      layer_score, opt, warnings)
    # precision-boundary edges (layer granularity)
    priced = target_boundary(target)
    boundary_w = opt.boundary_cost
    n_edges = 0
    row_of = {r.kind: i for i, r in enumerate(rows)}
    use_row = priced is not None and priced[1] in row_of
    if channel and (boundary_w is not None or use_row):
        if boundary_w is not None:
            raise UserError("--boundary-cost applies to --granularity layer")
        # the row would leave the boundary out while the plan's costs add it: a budget met on paper only
        raise UserError(f"target {target.name} prices precision changes between layers in its {priced[1]} "
                        f"budget, which --granularity channel does not model; use --granularity layer, or "
                        f"budget another cost")
    elif not analog and (boundary_w is not None or use_row):
        if boundary_w == "auto":
            spreads = [float(np.ptp([layer_score(op, o) for o in cands[op.name]])) for op in layers]
            boundary_w = 0.01 * float(np.median(spreads)) if spreads else 0.0
        boundary_w = float(boundary_w or 0.0)

        def indicator(layer: str, b):
            unit = layer_unit.get(layer)
            if unit is not None and act_units[unit]["explicit"]:
                bits = act_units[unit]["bits"]
                return [int(y_idx[unit][bits.index(b)])] if b in bits else []
            cols, opts = member_cols[layer]
            return [int(c) for c, o in zip(cols, opts) if o[1] == b]

        seen = set()
        for u, v, _t, n_el in layer_edges(graph):
            if u not in cands or v not in cands or not graph.ops[u].act_inputs:
                continue
            key = (u, layer_unit.get(v)) if opt.act_groups == "tensor" else (u, v)
            if key in seen:
                continue
            seen.add(key)
            coef = {row_of[priced[1]]: priced[0] * n_el} if use_row else {}
            d = asm.add_aux(boundary_w, 1.0, coef)
            bits = {o[1] for o in cands[u]} | {o[1] for o in cands[v]}
            for b in bits:
                pu, pv = indicator(u, b), indicator(v, b)
                if not pu:
                    continue
                asm.add_side(pu + pv + [d], [1.0] * len(pu) + [-1.0] * len(pv) + [-1.0], -np.inf, 0.0)
            n_edges += 1
    problem = asm.build(np.array([r.limit for r in rows], dtype=float), [r.name for r in rows])
    if not (coupling["ties"] or coupling["coupled"]) or n_edges:
        coupling = {}
    return SearchProblem(problem, units, rows, graph, target, opt, act_units, layer_unit, channel_groups, warnings,
                         n_edges, coupling, energy_groups, [b for b in budgets if b.kind == "act_mem_max"])


def _act_mem_max_error(amax: float, layer: str, need: float):
    """--act-mem-max below what ``layer``'s input needs (``need`` bits) at its lowest width."""
    from mpqc.errors import InfeasibleError

    from .budgets import BITS_PER_KIB

    err = InfeasibleError(f"--act-mem-max {amax / BITS_PER_KIB:g} KiB: layer {layer} reads a tensor of at least "
                          f"{need / BITS_PER_KIB:g} KiB at its lowest width; raise it")
    err.minimums = [need]  # type: ignore[attr-defined]
    return err


def _score(scores: dict, bits: int) -> float:
    """A table's score at ``bits``: 0 for a lossless width it does not list, NaN for another missing one."""
    return scores.get(bits, 0.0 if bits >= LOSSLESS_BITS else float("nan"))


def _label(o) -> str:
    w, a, fmt = o[0], o[1], o[2]
    if w is None and a is None:
        return "float"
    text = f"W{w}A{'float' if a is None else a}"
    return text if fmt in (None, "int") else f"{text}:{fmt}"


def cluster_channels(scores: np.ndarray, k: int, iters: int = 25) -> np.ndarray:
    """Cluster channels (rows of ``scores``: one score per candidate width) into at most ``k`` groups.

    1-D k-means on log(total score) started at quantiles: channels of similar sensitivity share a width.
    Returns a label per channel (0..k'-1, k' <= k, no empty cluster).
    """
    C = scores.shape[0]
    if k >= C:
        return np.arange(C)
    f = np.log(np.maximum(scores.sum(axis=1), 1e-300))
    centers = np.quantile(f, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        lab = np.argmin(np.abs(f[:, None] - centers[None, :]), axis=1)
        new = np.array([f[lab == j].mean() if np.any(lab == j) else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    lab = np.argmin(np.abs(f[:, None] - centers[None, :]), axis=1)
    _, lab = np.unique(lab, return_inverse=True)
    return lab


def _add_channel_layer(op, opts, table, alpha, rows, asm, units, channel_groups, y_idx, act_units, layer_unit,
                       layer_cost, opt, warnings, coupling) -> None:
    """Per-output-channel (or per-cluster) weight groups of one layer, tied to its activation unit."""
    C = op.out_channels
    ws = sorted({o[0] for o in opts}, reverse=True)
    unit_name = layer_unit.get(op.name)
    abits = act_units[unit_name]["bits"] if unit_name else [None]
    fmt_of = {(o[0], o[1]): o for o in opts}
    # per-channel weight scores (C, K)
    wc = table.w_channel(op.name)
    if wc and all(b in wc for b in ws) and all(wc[b].size == C for b in ws):
        S = np.stack([wc[b] for b in ws], axis=1)
    else:
        lw = table.w(op.name)
        S = np.stack([np.full(C, lw.get(b, 0.0) / C) for b in ws], axis=1)
        msg = "no per-channel scores in the sensitivity table: a layer's weight score is split evenly over its channels"
        if msg not in warnings:
            warnings.append(msg)
    if opt.clusters is not None and opt.clusters < C:
        lab = cluster_channels(S, opt.clusters)
    else:
        lab = np.arange(C)
    n_groups = int(lab.max()) + 1
    members = [np.flatnonzero(lab == j) for j in range(n_groups)]
    count = np.array([m.size for m in members], dtype=float)
    obj = alpha * np.stack([S[m].sum(axis=0) for m in members])  # (U, K)
    R = len(rows)
    # per-channel cost of width w at activation width a (the same for every channel of the layer)
    h = {}
    for i, r in enumerate(rows):
        if r.kind == "act_mem":
            continue
        h[i] = np.array([[layer_cost(op, fmt_of[(w, a)], r.kind, 0) for a in abits] for w in ws])  # (K, A)
    costs: list = [None] * R
    coupled = []
    for i, H in h.items():
        if H.shape[1] == 1:
            costs[i] = count[:, None] * H[None, :, 0]
            continue
        sep = H - H[:, :1] - H[:1, :] + H[0, 0]
        if np.allclose(sep, 0.0, atol=1e-9 * max(np.abs(H).max(), 1.0)):
            costs[i] = count[:, None] * H[None, :, 0]
            # the activation part, C·(h[w0][a] - h[w0][a0]), goes on the activation unit's one-hot
            extra = C * (H[0, :] - H[0, 0])
            if np.any(extra != 0):
                asm.rows[i].append((np.asarray(y_idx[unit_name], dtype=np.int64), extra.astype(float)))
        else:
            coupled.append(i)
    idx = asm.add_block(obj, costs)
    base = len(units)
    for m in members:
        units.append(Unit("channel", op.name, list(ws), channels=m))
    channel_groups[op.name] = list(range(base, base + n_groups))
    if not coupled:
        return
    cols = idx.ravel()
    for i in coupled:
        H = h[i]
        coupling["coupled"].append((unit_name, cols.copy(), i,
                                    np.stack([(count[:, None] * H[None, :, k]).ravel() for k in range(len(abits))], 1)))
        for k in range(len(abits)):
            coef = (count[:, None] * H[None, :, k]).ravel()
            M = float((count * H[:, k].max()).sum())
            u = asm.add_aux(0.0, M, {i: 1.0})
            yk = int(y_idx[unit_name][k])
            # sum_c h x - u + M y_a <= M  (u >= W(a) when y_a = 1; u >= 0 always)
            asm.add_side(np.concatenate([cols, [u, yk]]), np.concatenate([coef, [-1.0, M]]), -np.inf, M)


def _add_energy_channel_layer(op, opts, table, rows, asm, units, energy_groups, layer_cost, layer_score, opt,
                              warnings) -> None:
    """Per-output-channel (or per-cluster) energy groups of one analog layer.

    Each channel does 1/C_out of the layer's MACs, so its cost at E is the layer's cost at E over C_out; its
    score at E is its own term of the analog sensitivity (``e_channel``; without it, the layer's score split
    evenly, which leaves nothing to gain from going per channel: a warning says so).
    """
    C = op.out_channels
    S = _energy_channel_scores(table, op.name, [o[3] for o in opts], C)
    if S is None:
        S = np.stack([np.full(C, layer_score(op, o) / C) for o in opts], axis=1)
        msg = ("no per-channel energy scores in the sensitivity table (run `mpqc sensitivity --method analog "
               "--granularity channel`): a layer's score is split evenly over its channels")
        if msg not in warnings:
            warnings.append(msg)
    lab = cluster_channels(S, opt.clusters) if opt.clusters is not None and opt.clusters < C else np.arange(C)
    members = [np.flatnonzero(lab == j) for j in range(int(lab.max()) + 1)]
    count = np.array([m.size for m in members], dtype=float)
    obj = np.stack([S[m].sum(axis=0) for m in members])  # (U, K)
    costs: list = [None] * len(rows)
    for i, r in enumerate(rows):
        if r.kind == "act_mem":  # the activation units carry it
            continue
        per_channel = np.array([layer_cost(op, o, r.kind) / C for o in opts])
        costs[i] = count[:, None] * per_channel[None, :]
    asm.add_block(obj, costs)
    base = len(units)
    for m in members:
        units.append(Unit("energy", op.name, list(opts), channels=m))
    energy_groups[op.name] = list(range(base, base + len(members)))


def _energy_channel_scores(table, layer: str, energies: list, channels: int) -> np.ndarray | None:
    """(C, K) per-channel scores at ``energies`` (each from the table's nearest energy key), or None."""
    ec = table.e_channel(layer)
    if not ec or any(np.asarray(v).size != channels for v in ec.values()):
        return None
    return np.stack([_at_energy(ec, e) for e in energies], axis=1)


def _at_energy(scores: dict, e: float):
    """A score (or per-channel array) at energy ``e`` from ``{E: score}``: the tabulated value on a key,
    log-log interpolated between the two keys around ``e`` (scores fall as a power of E), the nearest key
    outside the table."""
    keys = np.array(sorted(scores), dtype=float)
    k = int(np.searchsorted(keys, e))
    if k < len(keys) and np.isclose(keys[k], e, rtol=1e-9):
        return np.asarray(scores[float(keys[k])], dtype=float)
    if k == 0 or k == len(keys):
        return np.asarray(scores[float(keys[min(k, len(keys) - 1)])], dtype=float)
    lo, hi = np.asarray(scores[float(keys[k - 1])], dtype=float), np.asarray(scores[float(keys[k])], dtype=float)
    t = (np.log(e) - np.log(keys[k - 1])) / (np.log(keys[k]) - np.log(keys[k - 1]))
    with np.errstate(divide="ignore"):
        out = np.exp((1 - t) * np.log(lo) + t * np.log(hi))
    return np.where((lo > 0) & (hi > 0), out, (1 - t) * lo + t * hi)


def score_plan(plan, graph, table: SensitivityTable, weight_alpha: float = 1.0, *, channels: bool = False) -> float:
    """The objective of any plan under a table: sum of activation scores + alpha · weight scores (analog: the
    energy scores, per channel where the plan and the table have them; digital layers add nothing, as in the
    search). A score the table lacks makes it NaN.

    ``channels``: score a layer at one weight width by its channel scores summed, as the search does at channel
    granularity. A table's layer score is not that sum (fisher's layer score squares the summed gradient
    product), so a uniform baseline scored by layer next to a kernel-wise plan would compare unlike numbers."""
    from mpqc.compiler.ir import OpKind

    total = 0.0
    analog = any(lp.emac is not None for lp in plan.layers.values())
    for op in graph.layers():
        lp = plan.layers.get(op.name)
        if lp is None or (analog and lp.emac is None):  # a digital layer of an analog plan: no energy score
            continue
        if lp.emac is not None:
            if isinstance(lp.emac, list):
                S = _energy_channel_scores(table, op.name, sorted(set(lp.emac)), len(lp.emac))
                if S is not None:
                    col = {e: k for k, e in enumerate(sorted(set(lp.emac)))}
                    total += float(sum(S[c, col[e]] for c, e in enumerate(lp.emac)))
                    continue
            es = table.e(op.name)
            e = float(np.mean(lp.emac)) if isinstance(lp.emac, list) else float(lp.emac)
            total += float(_at_energy(es, e)) if es else float("nan")
            continue
        w = lp.w_bits
        if w is not None and op.kind != OpKind.MATMUL and op.weight_shape:
            if isinstance(w, list):
                wc = table.w_channel(op.name)
                for b in set(w):
                    idx = np.array([i for i, x in enumerate(w) if x == b])
                    s = float(wc[b][idx].sum()) if b in wc and wc[b].size == len(w) else \
                        _score(table.w(op.name), b) * idx.size / len(w)
                    total += weight_alpha * s
            else:
                wc = table.w_channel(op.name) if channels else {}
                total += weight_alpha * (float(wc[w].sum()) if w in wc else _score(table.w(op.name), w))
        if lp.a_bits is not None and op.act_inputs:
            total += _score(table.a(op.name), lp.a_bits)
    return total
