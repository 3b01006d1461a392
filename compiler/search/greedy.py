"""``--search greedy``: IMPQ's iterative reduction (research/seeds.md §1.3), as an alternative to the ILP.

IMPQ starts every group at its highest precision and, each iteration, pools a metric M over all groups and
takes one bit off every group whose M is at or below the N-th smallest (groups already at the lowest width
stay there); it fine-tunes between iterations and leaves the choice of iteration to the user. Here:

- groups are the weight groups (a layer, or an output channel / cluster at channel granularity) and the
  activation units (a shared tensor, or a layer's input in consumer mode); "one bit off" is one step down
  the group's candidate widths;
- M is the group's sensitivity score at its current width (``metric="impq"``: IMPQ ranks by the metric at the
  current precision, E·|w|/2^b in its code, which a sensitivity table stands in for), or the score increase
  of the step per unit of budget it frees (``metric="ratio"``);
- N is ``step`` × the number of groups that can still go down (IMPQ: 4000 of ~12k MobileNet groups early,
  then 2000); there is no fine-tuning between iterations (the lead wires QAT in later), and the loop stops
  at the first iteration whose plan meets every budget.

The result is a feasible assignment (status FEASIBLE: a heuristic proves nothing) or an InfeasibleError when
even the lowest widths miss a budget.
"""

from __future__ import annotations

import time

import numpy as np

from mpqc.errors import InfeasibleError

from .problem import SearchProblem, Solution, SolveStatus


def _desc(values) -> list:
    return sorted(set(values), key=lambda b: -1 if b is None else b, reverse=True)


class _Vars:
    """The decision variables of the greedy: weight widths per layer/channel group, act widths per unit."""

    def __init__(self, sp: SearchProblem):
        self.sp = sp
        self.names: list[tuple[str, str]] = []  # ("w", layer) | ("wc", group index) | ("a", act unit)
        self.options: list[list] = []
        index: dict[tuple, int] = {}
        for g, u in enumerate(sp.units):
            if u.kind == "layers":
                for k, m in enumerate(u.members):
                    if sp.graph.ops[m].kind.value == "matmul":  # both operands follow the activation width
                        continue
                    ws = _desc(combo[k][0] for combo in u.options)
                    if ws != [None]:
                        index[("w", m)] = len(self.names)
                        self.names.append(("w", m))
                        self.options.append(ws)
            elif u.kind == "channel":
                index[("wc", g)] = len(self.names)
                self.names.append(("wc", g))
                self.options.append(list(u.options))
        for name, info in sp.act_units.items():
            bits = _desc(b for c in info["consumers"] for b in self._a_options(c))
            index[("a", name)] = len(self.names)
            self.names.append(("a", name))
            self.options.append(bits)
        self.index = index
        self.lookup = []  # per layers-unit: combo key -> option index
        for u in sp.units:
            self.lookup.append({tuple((o[0], o[1]) for o in combo): k for k, combo in enumerate(u.options)}
                               if u.kind == "layers" else None)

    def _a_options(self, layer: str) -> list:
        for u in self.sp.units:
            if u.kind == "layers" and layer in u.members:
                k = u.members.index(layer)
                return [combo[k][1] for combo in u.options]
        unit = self.sp.layer_unit.get(layer)
        for u in self.sp.units:
            if u.kind == "act" and u.name == unit:
                return list(u.options)
        return []

    def choice(self, state: np.ndarray) -> np.ndarray | None:
        """The problem's choice for a state (an index per variable); None when a combination is not allowed."""
        sp = self.sp
        ch = np.zeros(sp.problem.n_groups, dtype=np.int64)
        for g, u in enumerate(sp.units):
            if u.kind == "layers":
                key = []
                for m in u.members:
                    vi = self.index.get(("w", m))
                    w = None if vi is None else self.options[vi][state[vi]]
                    unit = sp.layer_unit.get(m)
                    ai = self.index.get(("a", unit)) if unit is not None else None
                    a = None if ai is None else self.options[ai][state[ai]]
                    if sp.graph.ops[m].kind.value == "matmul":
                        w = a
                    key.append((w, a))
                k = self.lookup[g].get(tuple(key))
                if k is None:
                    return None
                ch[g] = k
            elif u.kind == "channel":
                ch[g] = u.options.index(self.options[self.index[("wc", g)]][state[self.index[("wc", g)]]])
            else:
                vi = self.index[("a", u.name)]
                ch[g] = u.options.index(self.options[vi][state[vi]])
        return ch


def _score(sp: SearchProblem, table, name: tuple, b) -> float:
    """A variable's sensitivity at width ``b`` (weights scaled by the weight alpha)."""
    alpha = sp.options.weight_alpha
    kind, key = name
    if b is None:
        return 0.0
    if kind == "w":
        return alpha * table.w(key).get(b, 0.0)
    if kind == "wc":
        u = sp.units[key]
        wc = table.w_channel(u.name)
        if b in wc:
            return alpha * float(wc[b][u.channels].sum())
        C = sp.graph.ops[u.name].out_channels
        return alpha * table.w(u.name).get(b, 0.0) * len(u.channels) / C
    return sum(table.a(c).get(b, 0.0) for c in sp.act_units[key]["consumers"])


def greedy_search(sp: SearchProblem, table, *, step: float = 0.05, metric: str = "impq",
                  max_iter: int = 10_000) -> Solution:
    """Reduce the least sensitive groups one step at a time until every budget holds (see the module doc)."""
    if metric not in ("impq", "ratio"):
        raise ValueError(f"metric must be 'impq' or 'ratio', not {metric!r}")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], not {step}")
    if sp.target.kind == "analog":
        from mpqc.errors import UserError

        raise UserError("--search greedy reduces bit-widths; on an analog target (energies per MAC) use --search ilp")
    t0 = time.perf_counter()
    V = _Vars(sp)
    P = sp.problem
    nv = len(V.names)
    state = np.zeros(nv, dtype=np.int64)
    top = np.array([len(o) - 1 for o in V.options])
    scale = np.where(np.abs(P.budget_limit) > 0, np.abs(P.budget_limit), 1.0)
    cur = V.choice(state)
    iters = 0
    stuck = np.zeros(nv, dtype=bool)  # variables whose next step is a combination the target does not run
    while True:
        if cur is not None:
            aux = P.best_aux(cur) if P.n_aux else None
            if P.feasible(cur, aux):
                return P.finish(cur, aux, SolveStatus.FEASIBLE, -np.inf, time.perf_counter() - t0, "greedy",
                                {"iterations": iters, "metric": metric, "step": step})
        movable = np.flatnonzero((state < top) & ~stuck)
        if movable.size == 0 or iters >= max_iter:
            break
        iters += 1
        m = np.empty(movable.size)
        for k, vi in enumerate(movable):
            b_now, b_next = V.options[vi][state[vi]], V.options[vi][state[vi] + 1]
            s_now = _score(sp, table, V.names[vi], b_now)
            if metric == "impq":
                m[k] = s_now
            else:
                trial = state.copy()
                trial[vi] += 1
                ch_a, ch_b = V.choice(state), V.choice(trial)
                if ch_a is None or ch_b is None:
                    m[k] = np.inf
                    continue
                freed = float(np.sum(np.maximum(P.budget_values(ch_a) - P.budget_values(ch_b), 0.0) / scale))
                m[k] = (_score(sp, table, V.names[vi], b_next) - s_now) / max(freed, 1e-300)
        n = max(1, int(round(step * movable.size)))
        tau = np.sort(m)[min(n, m.size) - 1]
        chosen = movable[m <= tau]
        new = state.copy()
        new[chosen] += 1
        ch = V.choice(new)
        if ch is None:  # a combination the target does not run: move the chosen variables one at a time
            new = state.copy()
            for vi in chosen:
                trial = new.copy()
                trial[vi] += 1
                if V.choice(trial) is not None:
                    new = trial
                else:
                    stuck[vi] = True
            ch = V.choice(new)
            if ch is None or np.array_equal(new, state):
                if stuck.all() or not np.any((state < top) & ~stuck):
                    break
                continue
        stuck[:] = False  # others moved: a step that was not allowed before may be now
        state, cur = new, ch
    from .solve import infeasible_message, minimum_budgets

    mins = minimum_budgets(P)
    err = InfeasibleError("greedy reduction reached the lowest widths without meeting the budgets; " +
                          infeasible_message(P, mins, sp.describe))
    err.minimums = mins  # type: ignore[attr-defined]
    raise err
