"""``--search greedy``: IMPQ's iterative reduction (research/seeds.md §1.3), as an alternative to the ILP.

IMPQ starts every group at its highest precision and, each iteration, pools a metric M over all groups and
takes one bit off every group whose M is at or below the N-th smallest (groups already at the lowest width
stay there); it fine-tunes between iterations and leaves the choice of iteration to the user. Here:

- groups are the weight groups (a layer, or an output channel / cluster at channel granularity) and the
  activation units (a shared tensor, or a layer's input in consumer mode); "one bit off" is one step down
  the group's candidate widths (a move; where the target runs a step only together with others, e.g. a
  weight-only int4 layer whose input goes to float, the activation and its consumers' weights step as one);
- only moves that lower the budget rows the current plan violates are candidates: IMPQ has one cost (the
  model's size or its BitOPs), so every step helps; with several rows, a step that lowers only a row that
  already holds (a weight width under an activation-memory budget) costs accuracy and buys nothing;
- M is the group's sensitivity score at its current width (``metric="impq"``: IMPQ ranks by the metric at the
  current precision, E·|w|/2^b in its code, which a sensitivity table stands in for), or the objective increase
  of the step (``metric="ratio"``), either one per unit of violated budget the step frees (each row relative
  to its limit): with groups of equal cost, as IMPQ's channels roughly are, this is IMPQ's ranking;
- N is ``step`` × the number of groups that can still go down (IMPQ: 4000 of ~12k MobileNet groups early,
  then 2000), fewer when the best moves already cover every violated row's excess; there is no fine-tuning
  between iterations (the lead wires QAT in later), and the reduction stops at the first iteration whose plan
  meets every budget;
- the last iteration's steps overshoot the budgets (N steps at once, each of a whole width step), so a final
  pass gives bits back: it raises, one step at a time, the move with the largest objective decrease per unit
  of budget it takes that keeps every row met, until no such move is left (no single step up fits).

The result is a feasible assignment (status FEASIBLE: a heuristic proves nothing) or an InfeasibleError when
even the lowest widths miss a budget.
"""

from __future__ import annotations

import dataclasses
import heapq
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

    def group_choice(self, g: int, state: np.ndarray) -> int | None:
        """Group ``g``'s option index for a state; None when the combination is not allowed."""
        sp = self.sp
        u = sp.units[g]
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
            return self.lookup[g].get(tuple(key))
        if u.kind == "channel":
            vi = self.index[("wc", g)]
            return u.options.index(self.options[vi][state[vi]])
        vi = self.index[("a", u.name)]
        return u.options.index(self.options[vi][state[vi]])

    def choice(self, state: np.ndarray) -> np.ndarray | None:
        """The problem's choice for a state (an index per variable); None when a combination is not allowed."""
        ch = np.zeros(self.sp.problem.n_groups, dtype=np.int64)
        for g in range(len(self.sp.units)):
            k = self.group_choice(g, state)
            if k is None:
                return None
            ch[g] = k
        return ch

    def dependencies(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per variable: the groups whose option it takes part in, and (activation variables) the weight
        variables of its consumers (which may have to step with it)."""
        sp = self.sp
        deps: list[set] = [set() for _ in self.names]
        for g, u in enumerate(sp.units):
            if u.kind == "layers":
                for m in u.members:
                    vi = self.index.get(("w", m))
                    if vi is not None:
                        deps[vi].add(g)
                    unit = sp.layer_unit.get(m)
                    ai = self.index.get(("a", unit)) if unit is not None else None
                    if ai is not None:
                        deps[ai].add(g)
            elif u.kind == "channel":
                deps[self.index[("wc", g)]].add(g)
            else:
                deps[self.index[("a", u.name)]].add(g)
        partners: list[list[int]] = [[] for _ in self.names]
        for vi, (kind, key) in enumerate(self.names):
            if kind == "a":
                partners[vi] = [self.index[("w", c)] for c in self.sp.act_units[key]["consumers"]
                                if ("w", c) in self.index]
        return [sorted(d) for d in deps], partners


class _AuxRule:
    """The cheapest auxiliaries of a fixed choice in closed form, where each auxiliary z is only bounded below
    by side rows ``s·x - c·z <= hi`` (c > 0, one auxiliary per row) and neither the objective nor a budget row
    rewards a larger z (the precision-boundary indicators and the channel × activation BitOPs products):
    z = max(lo, max over its rows of (s·x - hi) / c). ``exact`` is False for any other shape (the LP is used)."""

    def __init__(self, P):
        n, k = P.n, P.n_aux
        self.k, self.exact = k, True
        if not k:
            return
        Z = P.side_A[:, n:].tocsr()
        Z.eliminate_zeros()
        count = np.diff(Z.indptr)
        rows = np.flatnonzero(count > 0)
        Zr = Z[rows]
        on_budget = P.budget_A[:, n:].tocsr()
        on_budget.eliminate_zeros()
        self.exact = bool(np.all(count[rows] == 1) and np.all(Zr.data < 0) and np.all(P.aux_obj >= 0)
                          and (on_budget.nnz == 0 or on_budget.data.min() >= 0)
                          and np.all(np.isneginf(P.side_lo[rows])) and np.all(np.isfinite(P.side_hi[rows]))
                          and np.all(np.isfinite(P.aux_lo)))
        if not self.exact:
            return
        self.S = P.side_A[rows, :n].tocsc()
        self.hi = P.side_hi[rows]
        self.c = -Zr.data
        self.aux_of = Zr.indices.astype(np.int64)
        self.lo = P.aux_lo.copy()
        order = np.argsort(self.aux_of, kind="stable")
        cuts = np.searchsorted(self.aux_of[order], np.arange(k + 1))
        self.rows_of = [order[cuts[j]:cuts[j + 1]] for j in range(k)]
        self.one_row = bool(np.all(np.diff(cuts) <= 1))
        self.row_of = np.where(np.diff(cuts) == 1, order[np.minimum(cuts[:-1], max(order.size - 1, 0))], -1) \
            if order.size else np.full(k, -1)

    def aux(self, sx: np.ndarray) -> np.ndarray:
        z = self.lo.copy()
        np.maximum.at(z, self.aux_of, (sx - self.hi) / self.c)
        return z

    def aux_at(self, j: np.ndarray, sx: np.ndarray) -> np.ndarray:
        """Auxiliaries ``j`` for side-row values ``sx``."""
        if self.one_row:  # the usual shape: one row bounds each auxiliary
            r = self.row_of[j]
            return np.where(r >= 0, np.maximum(self.lo[j], (sx[r] - self.hi[r]) / self.c[r]), self.lo[j])
        out = self.lo[j].copy()
        for k, i in enumerate(j):
            r = self.rows_of[i]
            if r.size:
                out[k] = max(out[k], float(np.max((sx[r] - self.hi[r]) / self.c[r])))
        return out


class _Trial:
    __slots__ = ("state", "groups", "options", "drows", "dobj", "sx", "aux_idx", "aux_val", "full")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


class _State:
    """The current assignment (an index per variable) with its choice, budget rows, auxiliaries and objective,
    and what a move (some variables stepped together) would change, computed from the groups it touches."""

    def __init__(self, sp: SearchProblem, V: _Vars):
        P = sp.problem
        self.P, self.V = P, V
        self.deps, self.partners = V.dependencies()
        # the groups a variable's move may touch (its own and, stepping with it, its partners')
        self.reach = [frozenset(self.deps[v]).union(*(self.deps[w] for w in self.partners[v]))
                      for v in range(len(V.names))]
        self.A = P.budget_A[:, :P.n].toarray()
        self.Az = P.budget_A[:, P.n:].toarray()
        self.limit = P.budget_limit
        self.tol = 1e-7 * np.maximum(1.0, np.abs(self.limit))
        self.scale = np.where(np.abs(self.limit) > 0, np.abs(self.limit), 1.0)
        self.rule = _AuxRule(P)
        self.sx = np.zeros(0)
        # the LP for other auxiliaries, with the budget rows lifted: an over-budget state still has its real
        # row values (the LP with the rows in place has no solution there and answers the lower bounds)
        self.relaxed = dataclasses.replace(P, budget_limit=np.full(P.n_budgets, np.inf)) \
            if self.rule.k and not self.rule.exact else None

    def load(self, state: np.ndarray) -> bool:
        """Evaluate ``state`` from scratch; False when the target does not run its combination."""
        P = self.P
        ch = self.V.choice(state)
        if ch is None:
            return False
        self.state, self.ch = state.copy(), ch
        if self.rule.k and self.rule.exact:
            self.sx = self.rule.S @ P.x_of(ch)
            self.aux = self.rule.aux(self.sx)
        else:
            self.aux = self.relaxed.best_aux(ch) if self.rule.k else np.zeros(0)
        self.rows = P.budget_values(ch, self.aux)
        self.obj = P.objective_of(ch, self.aux)
        return True

    def feasible(self) -> bool:
        return self.P.feasible(self.ch, self.aux)

    def violated(self) -> np.ndarray:
        return self.rows > self.limit + self.tol

    def trial(self, move: tuple, d: int) -> _Trial | None:
        """The change of stepping every variable of ``move`` by ``d`` (+1 down a width, -1 up); None when the
        target does not run the result."""
        P, V = self.P, self.V
        new = self.state.copy()
        new[list(move)] += d
        groups = sorted({g for v in move for g in self.deps[v]})
        gs, opts = [], []
        for g in groups:
            k = V.group_choice(g, new)
            if k is None:
                return None
            if k != self.ch[g]:
                gs.append(g)
                opts.append(k)
        gs, opts = np.array(gs, dtype=np.int64), np.array(opts, dtype=np.int64)
        c0, c1 = P.group_ptr[gs] + self.ch[gs], P.group_ptr[gs] + opts
        if self.rule.k and not self.rule.exact:  # general auxiliaries: the LP on the whole choice
            ch = self.ch.copy()
            ch[gs] = opts
            aux = self.relaxed.best_aux(ch)
            rows, obj = P.budget_values(ch, aux), P.objective_of(ch, aux)
            return _Trial(state=new, groups=gs, options=opts, drows=rows - self.rows, dobj=obj - self.obj,
                          full=aux)
        drows = self.A[:, c1].sum(axis=1) - self.A[:, c0].sum(axis=1)
        dobj = float(P.obj[c1].sum() - P.obj[c0].sum())
        sx, j, zj = None, None, None
        if self.rule.k and gs.size:
            S = self.rule.S
            spans = [(S.indptr[c], S.indptr[c + 1]) for c in np.concatenate([c1, c0])]
            idx = np.concatenate([S.indices[a:b] for a, b in spans])
            val = np.concatenate([S.data[a:b] * (1.0 if k < c1.size else -1.0) for k, (a, b) in enumerate(spans)])
            sx = self.sx.copy()
            np.add.at(sx, idx, val)
            touched = idx[sx[idx] != self.sx[idx]]
            if touched.size:
                j = np.unique(self.rule.aux_of[touched])
                zj = self.rule.aux_at(j, sx)
                dz = zj - self.aux[j]
                drows = drows + self.Az[:, j] @ dz
                dobj += float(P.aux_obj[j] @ dz)
            else:
                sx = None
        return _Trial(state=new, groups=gs, options=opts, drows=drows, dobj=dobj, sx=sx, aux_idx=j, aux_val=zj)

    def fits(self, t: _Trial) -> bool:
        """The state after ``t`` meets every budget row (and its auxiliaries their bounds)."""
        if np.any(self.rows + t.drows > self.limit + self.tol):
            return False
        if t.full is not None:
            return bool(np.all(t.full <= self.P.aux_hi + 1e-7))
        return t.aux_val is None or bool(np.all(t.aux_val <= self.P.aux_hi[t.aux_idx] + 1e-7))

    def apply(self, t: _Trial) -> None:
        self.state = t.state
        self.ch[t.groups] = t.options
        self.rows = self.rows + t.drows
        self.obj += t.dobj
        if t.full is not None:
            self.aux = t.full
        elif t.sx is not None:
            self.sx = t.sx
            self.aux = self.aux.copy()
            self.aux[t.aux_idx] = t.aux_val

    def move(self, v: int, d: int, top: np.ndarray) -> tuple[tuple, _Trial | None]:
        """Variable ``v`` stepped by ``d``, or, where the target does not run that alone, an activation
        variable together with its consumers' weights that can step the same way."""
        mv = (v,)
        t = self.trial(mv, d)
        if t is None and self.partners[v]:
            mv = (v,) + tuple(w for w in self.partners[v] if 0 <= self.state[w] + d <= top[w])
            t = self.trial(mv, d) if len(mv) > 1 else None
        return mv, t


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
    """Reduce the least sensitive groups one step at a time until every budget holds, then give back the steps
    that still fit (see the module doc)."""
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
    S = _State(sp, V)
    top = np.array([len(o) - 1 for o in V.options], dtype=np.int64)
    state = np.zeros(len(V.names), dtype=np.int64)
    iters = 0
    cache: dict = {}  # variable -> its down move and trial, while no group or auxiliary it touches changes
    if not S.load(state):
        state = _valid_start(S, top)
    while state is not None and not S.feasible():
        if iters >= max_iter:
            state = None
            break
        iters += 1
        chosen = _reduction_step(sp, table, S, top, step, metric, cache)
        if not chosen:
            state = None
            break
        before = (S.state, S.ch.copy(), S.aux, S.sx)
        for mv in chosen:  # one at a time: a step that the ones before it make unrunnable is left out
            t = S.trial(mv, +1)
            if t is not None:
                S.apply(t)
        state = S.state
        S.load(state)  # from scratch, so that no rounding accumulates across iterations
        _forget(S, cache, *before)
    if state is None:
        from .solve import infeasible_message, minimum_budgets

        mins = minimum_budgets(P)
        err = InfeasibleError("greedy reduction reached the lowest widths without meeting the budgets; " +
                              infeasible_message(P, mins, sp.describe))
        err.minimums = mins  # type: ignore[attr-defined]
        raise err
    reduced = S.state.copy()
    given = _give_back(S, top)
    S.load(S.state)
    if not S.feasible():  # the give-back's rows drifted past a limit by rounding: keep the reduction's plan
        S.load(reduced)
        given = 0
    return P.finish(S.ch, S.aux, SolveStatus.FEASIBLE, -np.inf, time.perf_counter() - t0, "greedy",
                    {"iterations": iters, "metric": metric, "step": step, "given_back": given})


def _valid_start(S: _State, top: np.ndarray) -> np.ndarray | None:
    """A runnable state near the highest widths when the highest widths themselves are not one (a variable or
    an activation with its consumers one step down); None when there is none."""
    for v in range(top.size):
        for d in range(1, int(top[v]) + 1):
            state = np.zeros(top.size, dtype=np.int64)
            state[v] += d
            if S.load(state):
                return state
            for w in S.partners[v]:
                state[w] = min(d, int(top[w]))
            if S.partners[v] and S.load(state):
                return state
    return None


def _forget(S: _State, cache: dict, state0, ch0, aux0, sx0) -> None:
    """Drop the cached moves that touch a group, a variable or an auxiliary the last iteration changed."""
    groups = set(np.flatnonzero(S.ch != ch0).tolist())
    for v in np.flatnonzero(S.state != state0):
        groups.update(S.deps[v])
    aux = set()
    if S.rule.k:
        aux.update(np.flatnonzero(S.aux != aux0).tolist())
        if S.rule.exact:
            aux.update(S.rule.aux_of[np.flatnonzero(S.sx != sx0)].tolist())
    for v in list(cache):
        _, t = cache[v]
        if not groups.isdisjoint(S.reach[v]) or (aux and t is not None and t.aux_idx is not None and
                                                 not aux.isdisjoint(t.aux_idx.tolist())) or \
                (S.rule.k and not S.rule.exact):  # the LP's auxiliaries may move anywhere
            del cache[v]


def _reduction_step(sp: SearchProblem, table, S: _State, top: np.ndarray, step: float, metric: str,
                    cache: dict) -> list:
    """The moves of one iteration: candidates lower at least one violated row; ranked by M per unit of the
    violated rows they free; the N best, stopping early once they cover every violated row's excess."""
    V = S.V
    viol = S.violated()
    if not viol.any():  # only an auxiliary's bound fails: any row that falls may help
        viol = np.ones_like(viol)
    scale = S.scale[viol]
    excess = (S.rows - S.limit)[viol] / scale
    movable = np.flatnonzero(S.state < top)
    cands = []
    for v in movable:
        v = int(v)
        if v not in cache:
            cache[v] = S.move(v, +1, top)
        mv, t = cache[v]
        if t is None:
            continue
        freed = -t.drows[viol] / scale
        total = float(freed.sum())
        if total <= 1e-12 * max(1.0, float(np.abs(excess).max(initial=0.0))):
            continue  # lowers no violated row: it would cost accuracy for nothing
        if metric == "impq":
            m = sum(_score(sp, table, V.names[w], V.options[w][S.state[w]]) for w in mv)
        else:
            m = t.dobj
        cands.append((m / total, len(cands), mv, freed))
    cands.sort(key=lambda c: (c[0], c[1]))
    n = max(1, int(round(step * movable.size)))
    chosen, used, covered = [], set(), np.zeros(excess.size)
    for _, _, mv, freed in cands:
        if len(chosen) >= n or np.all(covered >= excess):
            break
        if used.intersection(mv):
            continue
        chosen.append(mv)
        used.update(mv)
        covered += freed
    return chosen


def _give_back(S: _State, top: np.ndarray) -> int:
    """Raise, one step at a time, the move with the largest objective decrease per unit of budget it takes (each
    row relative to its limit) among those that keep every row met, until none is left; the number raised."""
    given = 0

    def up(v: int):
        if S.state[v] == 0:
            return None, None
        mv, t = S.move(v, -1, top)
        if t is None or t.dobj >= -1e-12 * max(1.0, abs(S.obj)) or not S.fits(t):
            return None, None
        cost = float(np.sum(np.maximum(t.drows, 0.0) / S.scale))
        return t, (-t.dobj / cost if cost > 0 else np.inf)

    while True:
        heap = []
        for v in np.flatnonzero(S.state > 0):
            _, key = up(int(v))
            if key is not None:
                heap.append((-key, int(v)))
        heapq.heapify(heap)
        applied = 0
        while heap:
            _, v = heapq.heappop(heap)
            t, key = up(v)
            if t is None:
                continue
            if heap and key < -heap[0][0]:  # stale: a better move may be waiting
                heapq.heappush(heap, (-key, v))
                continue
            S.apply(t)
            applied += 1
            _, key = up(v)
            if key is not None:
                heapq.heappush(heap, (-key, v))
        given += applied
        if not applied:
            return given
