"""The structure-exploiting path for pure multiple-choice knapsacks (10^5 binaries and more).

A multiple-choice knapsack with m budget rows has an LP relaxation whose optimum has at most m fractional
groups, and its Lagrangian dual over the m budget multipliers equals that LP bound (the one-hot polytope is
integral). So:

1. **bound**: maximise ``L(lam) = sum_g min_j (c_gj + lam . a_gj) - lam . rhs`` over ``lam >= 0``. Each
   evaluation is one vectorised argmin over a dense ``(G, K)`` array. Small problems take the multipliers
   from HiGHS' LP duals (a few ms); big ones use a box-step cutting-plane method whose master LP has m+1
   columns. Either way the bound reported is ``L(lam)`` evaluated here, valid for any ``lam >= 0``.
2. **primal**: the argmin at the best multipliers, repaired to feasibility (cheapest violation reduction per
   objective increase, in batches) and then improved greedily within the remaining slack.
3. **closing the gap**: reduced-cost fixing removes every candidate whose reduced cost exceeds UB - LB (it
   cannot appear in a better solution); the few groups left are handed to HiGHS as a small MIP with the
   incumbent as a start and the remaining time. Status OPTIMAL when the gap target is met.
"""

from __future__ import annotations

import logging
import time

import highspy
import numpy as np
import scipy.sparse as sp

from .problem import MCKProblem, Solution, SolveStatus, infeasible_solution, padded

log = logging.getLogger(__name__)

LOCAL_SEARCH_LIMIT = 30.0  # seconds of activation-width local search in solve_coupled without a time limit
BRANCH_LIMIT = 20.0  # seconds of branch-and-bound on the activation widths after it, without a time limit
BRANCH_NODES = 200  # nodes it expands at most
LP_DUAL_MAX_VARS = 4_000  # HiGHS LP (presolve off) up to here: 2 ms at 1.3k binaries, but 0.4 s at 35k where
# the cutting planes take 0.05 s
RESIDUAL_MAX_VARS = 60_000
RESIDUAL_DEFAULT_LIMIT = 60.0  # seconds for the residual MIP when the caller gives no time limit
DP_MAX_VARS = 3_000  # the exact dominance search is tried on residuals up to this many binaries
DP_MAX_STATES = 3_000  # and gives up past this many partial assignments in one step (O(S^2) filter)
RESIDUAL_PAIR_MOVES = 1500  # 2-exchange search over at most this many moves (a 1500^2 array)


class _Dense:
    """Padded dense arrays of a pure problem and the Lagrangian oracle on them."""

    def __init__(self, problem: MCKProblem):
        self.C, self.A, self.mask = padded(problem)
        self.rhs = problem.rhs.copy()
        self.G, self.K = self.C.shape
        self.m = self.A.shape[0]
        self.rows = np.arange(self.G)
        finite = np.where(self.mask, self.C, np.nan)
        self.c_spread = float(np.nansum(np.nanmax(finite, 1) - np.nanmin(finite, 1)))
        a = np.where(self.mask[None], self.A, np.nan)
        spread = np.nansum(np.nanmax(a, 2) - np.nanmin(a, 2), axis=1) if self.m else np.zeros(0)
        self.a_scale = np.where(spread > 0, spread, 1.0)

    def reduced(self, lam: np.ndarray) -> np.ndarray:
        """(G, K) Lagrangian costs c + lam . a (padding stays +inf)."""
        return self.C + np.tensordot(lam, self.A, axes=1) if self.m else self.C.copy()

    def evaluate(self, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """L(lam), the argmin choice, and the row use of that choice."""
        M = self.reduced(lam)
        choice = np.argmin(M, axis=1)
        val = float(M[self.rows, choice].sum() - lam @ self.rhs)
        return val, choice, self.use(choice)

    def use(self, choice: np.ndarray) -> np.ndarray:
        return self.A[:, self.rows, choice].sum(axis=1) if self.m else np.zeros(0)

    def cost(self, choice: np.ndarray) -> float:
        return float(self.C[self.rows, choice].sum())

    def feasible(self, use: np.ndarray, tol: float = 1e-9) -> bool:
        return bool(np.all(use <= self.rhs + tol * np.maximum(np.abs(self.rhs), self.a_scale)))


# ---------------------------------------------------------------------------------------------------------
# dual
def _master(cuts_v: np.ndarray, cuts_g: np.ndarray, cuts_l: np.ndarray, lo: np.ndarray, hi: np.ndarray) \
        -> tuple[float, np.ndarray]:
    """max theta s.t. theta <= v_k + g_k.(lam - lam_k), lo <= lam <= hi (a tiny LP, m+1 columns)."""
    K, m = cuts_g.shape
    # theta - g_k.lam <= v_k - g_k.lam_k ; columns: theta, lam_1..m
    rows = np.hstack([np.ones((K, 1)), -cuts_g])
    A = sp.csc_matrix(rows)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = m + 1, K
    lp.col_cost_ = np.concatenate([[-1.0], np.zeros(m)])
    lp.col_lower_ = np.concatenate([[-highspy.kHighsInf], lo])
    lp.col_upper_ = np.concatenate([[highspy.kHighsInf], hi])
    lp.row_lower_ = np.full(K, -highspy.kHighsInf)
    lp.row_upper_ = cuts_v - np.einsum("km,km->k", cuts_g, cuts_l)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return float("inf"), (lo + hi) / 2
    x = np.asarray(h.getSolution().col_value)
    return float(x[0]), x[1:]


def dual_cutting_plane(D: _Dense, *, tol: float = 1e-9, max_iter: int = 400, deadline: float | None = None,
                       visit=None, start: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Maximise L over lam >= 0 with a box-step cutting-plane method; returns (best L, best lam).

    Multipliers are scaled by each row's spread (so all are O(objective spread)); the box around the best
    point doubles when the model's maximiser sits on it and halves after a null step. ``visit(val, choice,
    use)`` sees every evaluated point (for primal candidates). ``start``: the first multipliers (default 0).
    """
    m = D.m
    scale = D.a_scale  # lam_scaled = lam * scale
    lam_s = np.zeros(m) if start is None else np.asarray(start, dtype=float) * scale
    val, choice, use = D.evaluate(lam_s / scale)
    if visit:
        visit(val, choice, use)
    best_v, best_l = val, lam_s.copy()
    cuts_v, cuts_g, cuts_l = [val], [(use - D.rhs) / scale], [lam_s.copy()]
    radius = max(D.c_spread, 1e-12)
    for _ in range(max_iter):
        lo = np.maximum(best_l - radius, 0.0)
        hi = best_l + radius
        theta, cand = _master(np.array(cuts_v), np.array(cuts_g), np.array(cuts_l), lo, hi)
        pred = theta - best_v
        if pred <= tol * max(abs(best_v), D.c_spread, 1e-12):
            break
        val, choice, use = D.evaluate(cand / scale)
        if visit:
            visit(val, choice, use)
        cuts_v.append(val)
        cuts_g.append((use - D.rhs) / scale)
        cuts_l.append(cand.copy())
        on_box = np.any(np.isclose(cand, hi) | (np.isclose(cand, lo) & (lo > 0)))
        if val - best_v >= 0.1 * pred:
            best_v, best_l = val, cand.copy()
            if on_box:
                radius *= 2.0
        else:
            radius = max(radius * 0.5, 1e-12 * max(D.c_spread, 1.0))
        if deadline is not None and time.perf_counter() > deadline:
            break
        if radius > 1e12 * max(D.c_spread, 1.0):  # L unbounded above: the rows cannot be met
            return float("inf"), best_l / scale
    return best_v, best_l / scale


# ---------------------------------------------------------------------------------------------------------
# primal
def repair(D: _Dense, choice: np.ndarray, max_rounds: int = 200) -> np.ndarray | None:
    """Move groups to cheaper-in-budget candidates until every row holds; None when that fails."""
    choice = choice.copy()
    for _ in range(max_rounds):
        use = D.use(choice)
        viol = use - D.rhs
        if D.feasible(use):
            return choice
        w = np.where(viol > 0, 1.0 / np.maximum(viol, 1e-300), 0.0)
        cur_a = D.A[:, D.rows, choice]  # (m, G)
        dA = D.A - cur_a[:, :, None]  # (m, G, K)
        dC = D.C - D.C[D.rows, choice][:, None]
        red = -np.tensordot(w, dA, axes=1)  # weighted violation reduction, > 0 helps
        # do not trade one violation for another: penalise growth on rows without slack
        slack = np.maximum(D.rhs - use, 0.0)
        over = np.any((dA > slack[:, None, None] + 1e-12) & (viol[:, None, None] <= 0), axis=0)
        ok = np.isfinite(dC) & (red > 1e-15) & ~over
        if not ok.any():
            ok = np.isfinite(dC) & (red > 1e-15)
            if not ok.any():
                return None
        ratio = np.where(ok, np.maximum(dC, 0.0) / np.where(ok, red, 1.0) + np.minimum(dC, 0.0) * 1e6, np.inf)
        j = np.argmin(ratio, axis=1)
        r = ratio[D.rows, j]
        cand = np.flatnonzero(np.isfinite(r))
        order = cand[np.argsort(r[cand], kind="stable")]
        gain = -dA[:, order, j[order]]  # (m, len) reduction of each row
        need = np.maximum(viol, 0.0)
        covered = np.cumsum(gain, axis=1) >= need[:, None] - 1e-12
        stop = int(np.argmax(np.all(covered, axis=0))) + 1 if np.all(covered, axis=0).any() else len(order)
        take = order[:max(stop, 1)]
        choice[take] = j[take]
    use = D.use(choice)
    return choice if D.feasible(use) else None


def improve(D: _Dense, choice: np.ndarray, lam: np.ndarray, max_rounds: int = 50) -> np.ndarray:
    """Greedy fill: take objective-decreasing moves that fit in the slack, best value per slack used first."""
    choice = choice.copy()
    for _ in range(max_rounds):
        use = D.use(choice)
        slack = np.maximum(D.rhs - use, 0.0)
        dC = D.C - D.C[D.rows, choice][:, None]
        cur_a = D.A[:, D.rows, choice]
        dA = D.A - cur_a[:, :, None]
        fits = np.all(dA <= slack[:, None, None] + 1e-12 * D.a_scale[:, None, None], axis=0) if D.m else \
            np.ones_like(dC, dtype=bool)
        ok = np.isfinite(dC) & (dC < -1e-15) & fits
        if not ok.any():
            break
        # resource price: the share of the remaining slack a move uses (free moves go first)
        used = np.tensordot(1.0 / np.maximum(slack, 1e-300), np.maximum(dA, 0.0), axes=1) if D.m else \
            np.zeros_like(dC)
        score = np.where(ok, -dC / np.maximum(used, 1e-300), -np.inf)
        j = np.argmax(score, axis=1)
        s = score[D.rows, j]
        cand = np.flatnonzero(np.isfinite(s))
        order = cand[np.argsort(-s[cand], kind="stable")]
        moved = 0
        left = slack.copy()
        for g in order:
            d = dA[:, g, j[g]]
            if np.all(d <= left + 1e-12 * D.a_scale):
                left -= d
                choice[g] = j[g]
                moved += 1
        if not moved:
            break
    return choice


def improve_pairs(D: _Dense, choice: np.ndarray, allowed: np.ndarray, max_moves: int = 1500,
                  max_rounds: int = 50) -> np.ndarray:
    """2-exchange local search: change two groups at once (one up, one down) when that fits and improves.

    Only candidates in ``allowed`` (G, K) are tried (the reduced-cost survivors: nothing else can improve).
    """
    choice = choice.copy()
    for _ in range(max_rounds):
        choice = improve(D, choice, np.zeros(D.m))
        use = D.use(choice)
        slack = D.rhs - use
        cur = np.zeros_like(allowed)
        cur[D.rows, choice] = True
        g, j = np.nonzero(allowed & D.mask & ~cur)
        if g.size < 2:
            break
        dc = D.C[g, j] - D.C[g, choice[g]]
        if g.size > max_moves:  # keep the moves that change the objective least in the bad direction
            keep = np.argsort(dc, kind="stable")[:max_moves]
            g, j, dc = g[keep], j[keep], dc[keep]
        da = D.A[:, g, j] - D.A[:, g, choice[g]]  # (m, M)
        tot = dc[:, None] + dc[None, :]
        ok = (tot < -1e-12 * max(abs(D.cost(choice)), 1.0)) & (g[:, None] != g[None, :])
        for i in range(D.m):
            ok &= da[i][:, None] + da[i][None, :] <= slack[i] + 1e-12 * D.a_scale[i]
        if not ok.any():
            break
        a, b = np.unravel_index(np.argmin(np.where(ok, tot, np.inf)), tot.shape)
        choice[g[a]], choice[g[b]] = j[a], j[b]
    return choice


def _pareto_filter(cost: np.ndarray, use: np.ndarray, safe: np.ndarray | None = None, block: int = 512) \
        -> np.ndarray:
    """Indices of the states no other state dominates.

    State j dominates state i when it costs no more and, on every row, uses no more than i or is *safe*
    there (``safe[r, j]``: even the largest completion keeps row r within its limit), so every completion
    that fits i fits j and costs less or the same. Ties keep the first in (cost, use) order.
    """
    order = np.lexsort(tuple(use[::-1]) + (cost,))
    c, u = cost[order], use[:, order]
    ud = u if safe is None else np.where(safe[:, order], -np.inf, u)  # the dominator's side
    S = c.size
    if u.shape[0] == 1:
        prev = np.concatenate([[np.inf], np.minimum.accumulate(ud[0])[:-1]])
        return order[u[0] < prev]
    keep = np.ones(S, dtype=bool)
    for a in range(0, S, block):
        b = min(a + block, S)
        # dominated by an earlier (cheaper or equal-cost) state that uses no more of any row
        dom = np.ones((b - a, b), dtype=bool)
        for i in range(u.shape[0]):
            dom &= ud[i, None, :b] <= u[i, a:b, None]
        dom &= np.arange(b)[None, :] < np.arange(a, b)[:, None]
        dom &= keep[None, :b]
        keep[a:b] &= ~dom.any(axis=1)
    return order[keep]


def _price_grid(lam: np.ndarray, points: int = 3, spread: float = 4.0) -> np.ndarray:
    """Price vectors around ``lam``: each component scaled over a geometric grid (and 0), all combinations."""
    m = lam.size
    if m == 0:
        return np.zeros((1, 0))
    if m > 3:
        points = 3
    f = np.concatenate([[0.0], np.geomspace(1 / spread, spread, points)])
    grids = np.meshgrid(*[f * max(v, 0.0) for v in lam], indexing="ij")
    out = np.stack([g.ravel() for g in grids], axis=1)
    return np.unique(np.vstack([lam[None], out]), axis=0)


def exact_dp(D: _Dense, keep: np.ndarray, lam: np.ndarray, ub: float, max_states: int = DP_MAX_STATES,
             beam: int | None = None) -> tuple[np.ndarray | None, bool]:
    """Exact search over the surviving candidates by a dominance-pruned dynamic programme.

    Groups are taken one at a time; a partial assignment is dropped when its Lagrangian bound (its cost
    and prices so far plus the cheapest priced completion) exceeds ``ub``, when no completion fits the
    rows, or when another partial assignment is no more expensive and uses no more of any row. Returns
    (the best choice strictly better than ``ub`` or None, finished) — finished is False when the state
    count passed ``max_states`` (then nothing is proved). With ``beam``, only that many states with the
    lowest bounds are kept per step: a heuristic that finds good incumbents fast (nothing is proved).
    """
    C = np.where(keep, D.C, np.inf)
    # several price vectors: each state is bounded by the best of them (its own optimal prices depend on
    # how much budget it has used; a grid around lam approximates them)
    lams = _price_grid(lam)  # (P, m)
    M = C[None] + np.einsum("pm,mgk->pgk", lams, D.A)
    min_priced = M.min(axis=2)  # (P, G)
    amin = np.where(keep[None], D.A, np.inf).min(axis=2)  # (m, G)
    amax = np.where(keep[None], D.A, -np.inf).max(axis=2)
    # groups with one candidate first, then the ones whose choice moves the budgets most: deciding the big
    # layers early lets the bounds prune (on ResNet-18, 375 states at most instead of 11k)
    spread = np.where(np.isfinite(amax - amin), amax - amin, 0.0)
    weight = (spread / D.a_scale[:, None]).sum(axis=0) if D.m else np.zeros(D.G)
    order = np.lexsort((-weight, keep.sum(axis=1) > 1))
    suffix_priced = np.concatenate([np.cumsum(min_priced[:, order][:, ::-1], axis=1)[:, ::-1],
                                    np.zeros((lams.shape[0], 1))], axis=1)  # (P, G+1)
    lam_rhs = lams @ D.rhs
    suffix_amin = np.concatenate([np.cumsum(amin[:, order][:, ::-1], axis=1)[:, ::-1], np.zeros((D.m, 1))], 1)
    suffix_amax = np.concatenate([np.cumsum(amax[:, order][:, ::-1], axis=1)[:, ::-1], np.zeros((D.m, 1))], 1)
    tol_c = 1e-12 * max(abs(ub), 1.0)
    tol_a = 1e-12 * D.a_scale
    # groups with a single candidate are constants: add them all at once
    single = keep.sum(axis=1) == 1
    n_single = int(single.sum())
    fixed_j = np.argmax(keep, axis=1)
    cost = np.array([float(D.C[D.rows[single], fixed_j[single]].sum())])
    use = D.A[:, D.rows[single], fixed_j[single]].sum(axis=1, keepdims=True) if D.m else np.zeros((0, 1))
    parents, opts = [], []
    for pos, g in enumerate(order):
        if pos < n_single:
            continue
        js = np.flatnonzero(keep[g])
        k = js.size
        nc = (cost[:, None] + D.C[g, js][None, :]).ravel()
        nu = (use[:, :, None] + D.A[:, g, js][:, None, :]).reshape(D.m, -1)
        par = np.repeat(np.arange(cost.size), k)
        opt = np.broadcast_to(js, (cost.size, k)).ravel()
        bound = nc + (lams @ nu + (suffix_priced[:, pos + 1] - lam_rhs)[:, None]).max(axis=0)
        ok = bound <= ub + tol_c
        ok &= np.all(nu + suffix_amin[:, pos + 1, None] <= D.rhs[:, None] + tol_a[:, None], axis=0)
        idx = np.flatnonzero(ok)
        if k > 1 and idx.size > 1 and (beam is None or idx.size > beam):
            safe = nu[:, idx] + suffix_amax[:, pos + 1, None] <= D.rhs[:, None] - tol_a[:, None]
            idx = idx[_pareto_filter(nc[idx], nu[:, idx], safe)]
        if idx.size == 0:
            return None, beam is None
        if beam is not None and idx.size > beam:
            idx = idx[np.argsort(bound[idx], kind="stable")[:beam]]
        if idx.size > max_states:
            return None, False
        cost, use = nc[idx], nu[:, idx]
        parents.append(par[idx])
        opts.append(opt[idx])
    best = int(np.argmin(cost))
    if cost[best] >= ub - tol_c:
        return None, beam is None
    choice = fixed_j.astype(np.int64)
    s = best
    for k in range(len(parents) - 1, -1, -1):
        choice[order[n_single + k]] = opts[k][s]
        s = parents[k][s]
    return choice, beam is None


# ---------------------------------------------------------------------------------------------------------
def solve_mckp(problem: MCKProblem, *, gap: float = 1e-3, time_limit: float | None = None,
               lp_dual_max_vars: int = LP_DUAL_MAX_VARS) -> Solution:
    """Solve a pure multiple-choice knapsack to the relative ``gap`` (see the module docstring)."""
    if not problem.pure:
        raise ValueError("the MCKP path needs a pure problem (no auxiliaries, no side rows)")
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    D = _Dense(problem)
    info: dict = {"groups": D.G, "binaries": problem.n}
    best: dict = {"ub": np.inf, "choice": None}

    def visit(val, choice, use):
        if D.feasible(use):
            c = D.cost(choice)
            if c < best["ub"]:
                best["ub"], best["choice"] = c, choice.copy()

    if D.m == 0:
        _, choice, _ = D.evaluate(np.zeros(0))
        return problem.finish(choice, None, SolveStatus.OPTIMAL, problem.objective_of(choice),
                              time.perf_counter() - t0, "mckp", info)
    starts: list[np.ndarray] = []
    # 1. bound
    if problem.n <= lp_dual_max_vars:
        from .solve_highs import solve_lp

        status, _, x_lp, lam = solve_lp(problem, time_limit=time_limit)
        if status == "Infeasible":
            return infeasible_solution(problem, time.perf_counter() - t0, "mckp")
        info["dual"] = "highs-lp"
        starts.append(problem.choice_of(x_lp))
    else:
        lb, lam = dual_cutting_plane(D, deadline=deadline, visit=visit)
        info["dual"] = "cutting-plane"
        if not np.isfinite(lb):
            return infeasible_solution(problem, time.perf_counter() - t0, "mckp")
    lb, choice0, use0 = D.evaluate(lam)
    visit(lb, choice0, use0)
    info["lagrange"] = [float(v) for v in lam]
    info["t_bound"] = time.perf_counter() - t0
    # 2. primal: the argmin at slightly raised prices is usually feasible; repair what is not
    for bump in (1.0, 1.0 + 1e-6, 1.0 + 1e-3):
        starts.append(D.evaluate(lam * bump + 1e-12 * D.c_spread / D.a_scale * (bump > 1.0))[1])
    for ch in starts:
        use = D.use(ch)
        fixed = ch if D.feasible(use) else repair(D, ch)
        if fixed is not None:
            fixed = improve(D, fixed, lam)
            visit(0.0, fixed, D.use(fixed))
    if best["choice"] is None:
        # the LP said feasible but no repair worked: let the MIP decide
        from .solve_highs import solve_highs

        sol = solve_highs(problem, time_limit=None if deadline is None else max(deadline - time.perf_counter(), 1),
                          gap=gap)
        sol.solver, sol.time_s = "mckp>highs", time.perf_counter() - t0
        return sol
    ub = best["ub"]
    info["t_primal"] = time.perf_counter() - t0
    cur_gap = (ub - lb) / max(abs(ub), 1e-12)
    info["heuristic_gap"] = float(max(cur_gap, 0.0))
    if cur_gap <= gap:
        return problem.finish(best["choice"], None, SolveStatus.OPTIMAL, lb + problem.obj_const,
                              time.perf_counter() - t0, "mckp", info)
    # 3. reduced-cost fixing, then a small MIP over what is left
    M = D.reduced(lam)
    r = M - M.min(axis=1, keepdims=True)

    def survivors(ub):
        slack = (ub - lb) * (1 + 1e-9) + 1e-12 * max(abs(ub), 1.0)
        return (r <= slack) & D.mask

    keep = survivors(ub)
    if keep.sum() <= 4 * RESIDUAL_PAIR_MOVES:
        ch = improve_pairs(D, best["choice"], keep, max_moves=RESIDUAL_PAIR_MOVES)
        visit(0.0, ch, D.use(ch))
        ub = best["ub"]
        keep = survivors(ub)
    info["t_local"] = time.perf_counter() - t0
    cur_gap = (ub - lb) / max(abs(ub), 1e-12)
    if cur_gap <= gap:
        return problem.finish(best["choice"], None, SolveStatus.OPTIMAL, lb + problem.obj_const,
                              time.perf_counter() - t0, "mckp", info)
    keep[D.rows, best["choice"]] = True
    n_keep = keep.sum(axis=1)
    free = np.flatnonzero(n_keep > 1)
    info["residual_groups"] = int(free.size)
    info["residual_binaries"] = int(n_keep[free].sum())
    status = SolveStatus.FEASIBLE
    bound = lb
    choice = best["choice"].copy()
    finished = False
    if free.size and n_keep[free].sum() <= DP_MAX_VARS:
        # a beam first: a better incumbent shrinks the exact search a lot
        for width in (64,):
            ch, _ = exact_dp(D, keep, lam, ub, beam=width)
            if ch is not None and D.cost(ch) < ub:
                visit(0.0, ch, D.use(ch))
                ub = best["ub"]
                keep = survivors(ub)
        choice = best["choice"].copy()
        info["t_beam"] = time.perf_counter() - t0
        # look only for solutions better than the incumbent by more than the gap target
        target = ub - gap * abs(ub)
        ch, finished = exact_dp(D, keep, lam, target)
        info["residual_method"] = "dp" if finished else "dp (state limit)"
        if finished:
            if ch is not None and D.cost(ch) < ub:
                choice, ub = ch, D.cost(ch)
            bound = min(max(lb, target), ub)
            info["t_dp"] = time.perf_counter() - t0
    if not finished and free.size and n_keep[free].sum() <= RESIDUAL_MAX_VARS:
        info["residual_method"] = "highs"
        sub, cols = _residual(D, keep, free, choice)
        from .solve_highs import solve_highs

        remaining = RESIDUAL_DEFAULT_LIMIT if deadline is None else max(deadline - time.perf_counter(), 0.05)
        start = np.array([int(np.flatnonzero(cols[i] == choice[g])[0]) for i, g in enumerate(free)])
        # the residual's gap is measured against the whole objective: allow the same absolute slack
        abs_gap = gap * abs(ub)
        sol = solve_highs(sub, time_limit=remaining, gap=0.0 if gap == 0 else min(1.0, abs_gap / max(
            abs(sub.objective_of(start)), 1e-12)), start=start)
        if sol.ok:
            ub_inc = ub
            ch = choice.copy()
            ch[free] = np.array([cols[i][c] for i, c in enumerate(sol.choice)])
            if D.cost(ch) <= ub:
                choice, ub = ch, D.cost(ch)
            # candidates fixed out cannot beat the incumbent, so min(incumbent, residual bound) bounds the optimum
            bound = max(lb, min(ub_inc, sol.bound))
        info["residual_status"] = sol.status.value
    elif not free.size:
        bound = ub  # every group is fixed: the incumbent is optimal
    final_gap = (ub - bound) / max(abs(ub), 1e-12)
    if final_gap <= gap + 1e-12:
        status = SolveStatus.OPTIMAL
    return problem.finish(choice, None, status, bound + problem.obj_const, time.perf_counter() - t0, "mckp", info)


def _residual(D: _Dense, keep: np.ndarray, free: np.ndarray, choice: np.ndarray) -> tuple[MCKProblem, list]:
    """The MCKP over the groups with several surviving candidates; the others are fixed at ``choice``."""
    fixed_mask = np.ones(D.G, dtype=bool)
    fixed_mask[free] = False
    fixed_use = D.A[:, D.rows[fixed_mask], choice[fixed_mask]].sum(axis=1)
    fixed_cost = float(D.C[D.rows[fixed_mask], choice[fixed_mask]].sum())
    cols = [np.flatnonzero(keep[g]) for g in free]
    sizes = np.array([c.size for c in cols])
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    gg = np.repeat(free, sizes)
    jj = np.concatenate(cols)
    obj = D.C[gg, jj]
    A = D.A[:, gg, jj]
    sub = MCKProblem(ptr, obj, sp.csr_matrix(A), D.rhs - fixed_use, obj_const=fixed_cost)
    return sub, cols


# ---------------------------------------------------------------------------------------------------------
# channel granularity with searched activation widths: Lagrangian decomposition over the activation choice
class _CoupledOracle:
    """``L(lam)`` of a channel-granularity problem whose costs couple channel widths and activation widths.

    For fixed prices each activation unit picks the width minimising its own one-hot cost plus, for every
    channel group of its layers, the cheapest priced width *at that activation width* (the coupled BitOPs-like
    costs are exact per pair), plus its tied layer groups restricted to that width. Groups outside any unit
    take their cheapest priced candidate. This is the Lagrangian of the exact problem (no big-M), so its bound
    is at least the MIP's LP bound.
    """

    def __init__(self, sp):
        P = sp.problem
        cpl = sp.coupling
        self.P, self.sp = P, sp
        n = P.n
        self.n = n
        self.m = P.n_budgets
        self.rhs = P.rhs.copy()
        self.A = P.budget_A[:, :n].tocsc()
        self.gof = P.group_of
        self.units = list(cpl["y_group"])
        self.y_group = cpl["y_group"]
        self.bits = {u: list(sp.units[g].options) for u, g in self.y_group.items()}
        self.ties: dict[str, list] = {u: [] for u in self.units}
        for g, u, avals in cpl["ties"]:
            self.ties[u].append((g, np.asarray([self.bits[u].index(a) for a in avals])))
        # coupled channel columns per unit: (cols, group starts, {row: coef (ncols, A)})
        blocks: dict[str, dict[bytes, tuple]] = {}
        for u, cols, i, coef in cpl["coupled"]:
            b = blocks.setdefault(u, {}).setdefault(cols.tobytes(), (cols, {}))
            b[1][i] = b[1].get(i, 0) + coef
        self.coupled: dict[str, tuple] = {}
        for u, bl in blocks.items():
            parts = list(bl.values())
            cols = np.concatenate([c for c, _ in parts])
            rows: dict[int, np.ndarray] = {}
            off = 0
            for c, br in parts:
                for i, coef in br.items():
                    rows.setdefault(i, np.zeros((cols.size, len(self.bits[u]))))[off:off + c.size] += coef
                off += c.size
            order = np.argsort(cols, kind="stable")
            cols = cols[order]
            rows = {i: r[order] for i, r in rows.items()}
            g = self.gof[cols]
            starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
            self.coupled[u] = (cols, starts, rows)
        coupled_groups = {int(x) for u in self.coupled for x in np.unique(self.gof[self.coupled[u][0]])}
        special = set(self.y_group.values()) | {g for u in self.ties for g, _ in self.ties[u]} | coupled_groups
        self.free = np.array(sorted(set(range(P.n_groups)) - special), dtype=np.int64)
        self.free_mask = np.isin(self.gof, self.free)
        obj = P.obj
        self.c_spread = float(np.sum(np.maximum.reduceat(obj, P.group_ptr[:-1]) -
                                     np.minimum.reduceat(obj, P.group_ptr[:-1])))
        dense = self.A.toarray() if self.m else np.zeros((0, n))
        spread = np.array([np.sum(np.maximum.reduceat(dense[i], P.group_ptr[:-1]) -
                                  np.minimum.reduceat(dense[i], P.group_ptr[:-1])) for i in range(self.m)])
        for _u, (_cols, _s, rows) in self.coupled.items():
            for i, r in rows.items():
                spread[i] += float(r.max(axis=1).sum() - r.min(axis=1).sum()) + float(np.abs(r).max())
        self.a_scale = np.where(spread > 0, spread, 1.0)

    def _argmin(self, values: np.ndarray, groups: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Positions (into ``values``) of each group's smallest value; groups are contiguous runs."""
        order = np.lexsort((values, groups))
        return order[starts]

    def _col_use(self, cols: np.ndarray) -> np.ndarray:
        return np.asarray(self.A[:, cols].sum(axis=1)).ravel() if (self.m and cols.size) else np.zeros(self.m)

    def _unit_values(self, u: str, r: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Unit ``u``'s priced cost at each of its activation widths (``r``: the priced column costs)."""
        ptr = self.P.group_ptr
        A_u = len(self.bits[u])
        gy = self.y_group[u]
        val = r[ptr[gy]:ptr[gy + 1]].copy()  # (A_u,)
        if u in self.coupled:
            cols, starts, rows = self.coupled[u]
            E = r[cols][:, None] + sum(lam[i] * coef for i, coef in rows.items()) if rows else \
                np.repeat(r[cols][:, None], A_u, 1)
            val += np.minimum.reduceat(E, starts, axis=0).sum(axis=0)
        for g, ak in self.ties[u]:
            seg = r[ptr[g]:ptr[g + 1]]
            val += np.array([seg[ak == k].min() if np.any(ak == k) else np.inf for k in range(A_u)])
        return val

    def regrets(self, lam: np.ndarray) -> dict[str, np.ndarray]:
        """Per unit, how much more each activation width costs than the unit's best at prices ``lam``."""
        r = self.P.obj + (self.A.T @ lam if self.m else 0.0)
        out = {}
        for u in self.units:
            val = self._unit_values(u, r, lam)
            out[u] = val - val.min()
        return out

    def evaluate(self, lam: np.ndarray, fixed: dict[str, int] | None = None):
        """(L(lam), activation choice per unit, row use of the argmin assignment); the units in ``fixed`` take
        the width index given there instead of their best (L of that branch)."""
        P = self.P
        ptr = P.group_ptr
        r = P.obj + (self.A.T @ lam if self.m else 0.0)
        total = 0.0
        picked = []
        if self.free.size:
            fcols = np.flatnonzero(self.free_mask)
            fg = self.gof[fcols]
            fstarts = np.flatnonzero(np.concatenate([[True], fg[1:] != fg[:-1]]))
            j = fcols[self._argmin(r[fcols], fg, fstarts)]
            total += float(r[j].sum())
            picked.append(j)
        use = np.zeros(self.m)
        acts: dict[str, int] = {}
        for u in self.units:
            val = self._unit_values(u, r, lam)
            k = int(np.argmin(val)) if not fixed or u not in fixed else fixed[u]
            acts[u] = k
            total += float(val[k])
            picked.append(np.array([ptr[self.y_group[u]] + k]))
            if u in self.coupled:
                cols, starts, rows = self.coupled[u]
                Ek = r[cols] + sum(lam[i] * coef[:, k] for i, coef in rows.items()) if rows else r[cols]
                pos = self._argmin(Ek, self.gof[cols], starts)
                picked.append(cols[pos])
                for i, coef in rows.items():
                    use[i] += float(coef[pos, k].sum())
            for g, ak in self.ties[u]:
                seg = np.where(ak == k, r[ptr[g]:ptr[g + 1]], np.inf)
                picked.append(np.array([ptr[g] + int(np.argmin(seg))]))
        use += self._col_use(np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64))
        return total - float(lam @ self.rhs), acts, use

    def restricted(self, acts: dict[str, int]) -> tuple[MCKProblem, np.ndarray] | None:
        """The pure knapsack left when every unit's activation width is fixed (None if some group empties)."""
        P = self.P
        keep = np.ones(self.n, dtype=bool)
        ptr = P.group_ptr
        for u, k in acts.items():
            gy = self.y_group[u]
            keep[ptr[gy]:ptr[gy + 1]] = False
            keep[ptr[gy] + k] = True
            for g, ak in self.ties[u]:
                keep[ptr[g]:ptr[g + 1]] = ak == k
        A = self.A.tocsr().astype(float)
        if self.coupled:
            rr, cc, vv = [], [], []
            for u, (cols, _s, rows) in self.coupled.items():
                for i, coef in rows.items():
                    rr.append(np.full(cols.size, i))
                    cc.append(cols)
                    vv.append(coef[:, acts[u]])
            A = A + sp.csr_matrix((np.concatenate(vv), (np.concatenate(rr), np.concatenate(cc))), shape=A.shape)
        cols = np.flatnonzero(keep)
        sizes = np.bincount(self.gof[cols], minlength=P.n_groups)
        if np.any(sizes == 0):
            return None
        sub = MCKProblem(np.concatenate([[0], np.cumsum(sizes)]), P.obj[cols], A[:, cols], P.budget_limit,
                         list(P.budget_names), P.budget_const, obj_const=P.obj_const)
        return sub, cols


def _local_search(oracle: _CoupledOracle, regret: dict, floor, acts: dict, tried: list, attempt, incumbent, done,
                  until: float) -> tuple[int, int]:
    """Move one unit's activation width at a time while that lowers the objective (first improvement), the moves
    the final prices make cheapest first; stops when a pass finds none, the plan is proved, or at ``until``.
    Returns the number of moves taken and the number of knapsacks solved.

    ``floor(acts)`` bounds the knapsack that ``acts`` leave (see :func:`solve_coupled`); a move changes it by the
    difference of one unit's ``regret``, so the moves come in increasing order of their bound, and the pass
    ends at the first whose bound reaches the ``incumbent()`` objective: neither it nor any later move can
    improve. On ResNet-50 kernel-wise a knapsack costs about 0.3 s and a pass has 300 moves, so without this
    cut a fruitless pass outlasts the 30 s cap.

    The decomposition solves the knapsack for a handful of activation choices only. When none meets its bound,
    this search costs seconds where 60 s of HiGHS' MIP from that incumbent changed one of 11 real ResNet-20
    plans, by 0.013 % (bench/RESULTS.md, search section 4). It closed a synthetic ResNet-20 case from 0.16 % to
    0.07 % in one move; on those 11 real plans it found no move."""
    moves = solved = 0
    while not done() and time.perf_counter() < until:
        base = floor(acts)
        order = sorted((regret[u][k] - regret[u][acts[u]], i, k) for i, u in enumerate(oracle.units)
                       for k in range(len(oracle.bits[u])) if k != acts[u] and np.isfinite(regret[u][k]))
        for d, i, k in order:
            if done() or time.perf_counter() >= until:
                return moves, solved
            best = incumbent()
            if base + d >= best - 1e-12 * max(abs(best), 1.0):
                return moves, solved
            cand = {**acts, oracle.units[i]: k}
            if cand in tried:
                continue
            solved += 1
            if attempt(cand, until):
                acts, moves = cand, moves + 1
                break
        else:
            return moves, solved
    return moves, solved


class _Branch:
    """The coupled oracle with some units' activation widths fixed: one node of :func:`_branch_and_bound`."""

    def __init__(self, oracle: _CoupledOracle, fixed: dict[str, int]):
        self.oracle, self.fixed = oracle, fixed
        self.m, self.rhs, self.a_scale, self.c_spread = oracle.m, oracle.rhs, oracle.a_scale, oracle.c_spread

    def evaluate(self, lam: np.ndarray):
        return self.oracle.evaluate(lam, self.fixed)


def _branch_and_bound(oracle: _CoupledOracle, lb: float, lam: np.ndarray, incumbent, attempt, hopeless, tried,
                      settled, proved_by, until: float, max_nodes: int) -> tuple[float, int]:
    """Raise the Lagrangian bound by branching on the activation widths; returns (bound, nodes expanded).

    A node fixes some units' widths; its bound is the Lagrangian dual of that branch, maximised from its
    parent's multipliers (so never below the parent's). Best-first: the node with the lowest bound is split on
    the free unit whose two best widths are closest in priced cost at the node's multipliers (the decision the
    dual leaves most open), one child per width; a child whose bound reaches the incumbent holds no better plan
    and is dropped, and each child's own argmin widths are tried as a plan. A node with every width fixed is one
    knapsack: ``settled(acts)`` gives the bound its solve proved (inf when infeasible, None when not solved).
    Stops once ``proved_by(bound)``, at ``until`` or after ``max_nodes`` expansions; the bound returned (without
    the objective's constant) is the lowest over the nodes left open, valid for the whole problem.

    The root dual alone leaves 0.1-1.1 % on real ResNet-20 kernel-wise tables where HiGHS' MIP proves the same
    plan within 0.1 % (bench/RESULTS.md, search section 4): the weak side there is the bound, not the plan."""
    import heapq

    const = oracle.P.obj_const
    heap = [(lb, 0, {}, lam)]
    count = 1
    leaves = float("inf")  # every width fixed: the knapsack's own bound, which this does not improve
    nodes = 0

    def open_bound() -> float:
        return min(heap[0][0] if heap else float("inf"), leaves)

    while heap and nodes < max_nodes and time.perf_counter() < until:
        best = incumbent() - const
        if proved_by(min(open_bound(), best) + const):
            break
        b, _, fixed, node_lam = heapq.heappop(heap)
        if b >= best - 1e-12 * max(abs(best), 1.0):
            continue
        free = [u for u in oracle.units if u not in fixed]
        if not free:
            if fixed not in tried:
                attempt(fixed, until)
            known = settled(fixed)
            b = b if known is None else max(b, known - const)
            if b < incumbent() - const - 1e-12 * max(abs(incumbent() - const), 1.0):
                leaves = min(leaves, b)
            continue
        nodes += 1
        regret = oracle.regrets(node_lam)
        u = min(free, key=lambda v: np.partition(regret[v], 1)[1] if regret[v].size > 1 else np.inf)
        for k in range(len(oracle.bits[u])):
            if not np.isfinite(regret[u][k]):
                continue  # a width no tie allows: infeasible whatever the prices
            child = {**fixed, u: k}
            cb, clam = dual_cutting_plane(_Branch(oracle, child), start=node_lam, deadline=until)
            acts = oracle.evaluate(clam, child)[1]
            if acts not in tried and not hopeless(acts):
                attempt(acts, until)
            if cb < incumbent() - const - 1e-12 * max(abs(incumbent() - const), 1.0):
                heapq.heappush(heap, (max(cb, b), count, child, clam))
                count += 1
        if not heap and leaves == float("inf"):
            return incumbent() - const, nodes  # every branch closed: the incumbent is optimal
    return min(open_bound(), incumbent() - const), nodes


def solve_coupled(sp, *, gap: float = 1e-3, time_limit: float | None = None, starts: list | None = None) \
        -> Solution | None:
    """Channel widths with searched activation widths, without big-M: a Lagrangian bound over the budget rows
    (each activation unit chooses its width exactly given the prices), then the pure knapsack left by the
    activation widths of the best price vectors (and of ``starts``: unit -> width index maps), solved by
    :func:`solve_mckp`. When those do not prove the gap: :func:`_local_search` over the activation widths, then
    :func:`_branch_and_bound` over them, which raises the bound (``info`` records the moves, the nodes and the
    root bound). Returns None when no candidate activation choice leaves a feasible knapsack."""
    t0 = time.perf_counter()
    oracle = _CoupledOracle(sp)
    P = sp.problem
    deadline = None if time_limit is None else t0 + time_limit
    seen: list[dict] = []

    def visit(_val, acts, _use):
        if acts not in seen:
            seen.append(dict(acts))

    lb, lam = dual_cutting_plane(oracle, deadline=deadline, visit=visit)
    if not np.isfinite(lb):
        return None
    info = {"dual": "coupled cutting-plane", "t_bound": time.perf_counter() - t0, "lagrange": [float(v) for v in lam]}
    tries = [oracle.evaluate(lam * f)[1] for f in (1.0, 1.0 + 1e-3, 1.02)] + list(starts or []) + seen[::-1][:4]
    best = None
    tried: list[dict] = []
    regret = oracle.regrets(lam)
    l_root = lb  # L at lam: what the regrets at lam add to

    def floor(acts: dict) -> float:
        """A lower bound on the knapsack ``acts`` leave: the Lagrangian at ``lam`` with those widths fixed, which
        is L(lam) plus each unit's regret (every unit's term is separate once the prices are given)."""
        return l_root + P.obj_const + sum(float(regret[u][acts[u]]) for u in oracle.units)

    def proved(obj: float) -> bool:
        return (obj - (lb + P.obj_const)) <= gap * abs(obj - P.obj_const)

    def hopeless(acts: dict) -> bool:
        return best is not None and floor(acts) >= best[0].objective - 1e-12 * max(abs(best[0].objective), 1.0)

    proofs: dict[tuple, float] = {}  # activation choice -> the bound its knapsack's solve proved

    def key(acts: dict) -> tuple:
        return tuple(acts[u] for u in oracle.units)

    def attempt(acts: dict, until: float | None) -> bool:
        """Solve the knapsack left by ``acts``; True when it beats the incumbent."""
        nonlocal best
        tried.append(acts)
        r = oracle.restricted(acts)
        if r is None:
            proofs[key(acts)] = float("inf")
            return False
        sub, cols = r
        remaining = None if until is None else max(until - time.perf_counter(), 0.1)
        sol = solve_mckp(sub, gap=gap / 2, time_limit=remaining)
        if sol.status == SolveStatus.INFEASIBLE:
            proofs[key(acts)] = float("inf")
        elif sol.ok and np.isfinite(sol.bound):
            proofs[key(acts)] = float(sol.bound)
        if not sol.ok or (best is not None and sol.objective >= best[0].objective):
            return False
        best = (sol, sub, cols, acts)
        return True

    skipped = 0
    for acts in tries:
        if acts not in tried:
            if hopeless(acts):
                skipped += 1
                continue
            attempt(acts, deadline)
            if best is not None and proved(best[0].objective):
                break
    if best is None:
        return None
    if not proved(best[0].objective):
        until = time.perf_counter() + LOCAL_SEARCH_LIMIT if deadline is None else deadline
        info["local_moves"], info["local_knapsacks"] = _local_search(
            oracle, regret, floor, best[3], tried, attempt, lambda: best[0].objective,
            lambda: proved(best[0].objective), until)
    if not proved(best[0].objective):
        until = time.perf_counter() + BRANCH_LIMIT if deadline is None else deadline
        branched, info["branch_nodes"] = _branch_and_bound(
            oracle, l_root, lam, lambda: best[0].objective, attempt, hopeless, tried, lambda a: proofs.get(key(a)),
            lambda b: (best[0].objective - b) <= gap * abs(best[0].objective - P.obj_const), until, BRANCH_NODES)
        lb = max(branched, l_root)
        info["root_bound"] = l_root + P.obj_const
    sol, sub, cols, _acts = best
    choice = cols[sub.group_ptr[:-1] + sol.choice] - P.group_ptr[:-1]
    aux = P.best_aux(choice)
    info.update({"tried_act_choices": len(tried), "tries_cut": skipped, "restricted_status": sol.status.value})
    bound = lb + P.obj_const
    obj = P.objective_of(choice, aux)
    st = SolveStatus.OPTIMAL if (obj - bound) <= gap * max(abs(obj - P.obj_const), 1e-12) else SolveStatus.FEASIBLE
    if not P.feasible(choice, aux, tol=1e-6):
        return None
    return P.finish(choice, aux, st, bound, time.perf_counter() - t0, "mckp-coupled", info)
