"""Shared helpers for the search tests: random knapsacks, brute force, tiny graphs and tables."""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mpqc.compiler.search.problem import MCKProblem


def random_problem(rng: np.random.Generator, groups: int, k: int, m: int, tight: float) -> MCKProblem:
    """``groups`` groups of 1..k candidates, ``m`` budget rows whose limit sits ``tight`` of the way from the
    smallest to the largest achievable use."""
    sizes = rng.integers(1, k + 1, groups)
    sizes[0] = k
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    n = int(ptr[-1])
    obj = rng.random(n)
    A = rng.random((m, n)) * rng.choice([1.0, 1e3, 1e9], m)[:, None]  # rows on very different scales
    lo = np.array([sum(A[i, ptr[g]:ptr[g + 1]].min() for g in range(groups)) for i in range(m)])
    hi = np.array([sum(A[i, ptr[g]:ptr[g + 1]].max() for g in range(groups)) for i in range(m)])
    return MCKProblem(ptr, obj, sp.csr_matrix(A), lo + tight * (hi - lo), [f"b{i}" for i in range(m)])


def _enumerate(p: MCKProblem):
    """All assignments as (objective, row values) arrays, built in two halves (meet in the middle)."""
    sizes = p.sizes
    A = p.budget_A.toarray()
    G = p.n_groups
    half = G // 2

    def part(groups):
        if not groups:
            return np.zeros(1), np.zeros((p.n_budgets, 1)), np.zeros((1, 0), dtype=np.int64)
        combos = np.array(list(itertools.product(*[range(sizes[g]) for g in groups])), dtype=np.int64)
        cols = p.group_ptr[np.array(groups)][None, :] + combos
        return p.obj[cols].sum(axis=1), A[:, cols].sum(axis=2), combos

    return part(list(range(half))), part(list(range(half, G)))


def brute_force(p: MCKProblem, objective: np.ndarray | None = None, skip_row: int | None = None):
    """(best objective, choice) over every assignment meeting the rows (None, None when there is none).

    ``objective`` replaces the objective (a vector over binaries); ``skip_row`` ignores one budget row.
    """
    q = p if objective is None else p.with_objective(objective)
    (oa, ua, ca), (ob, ub, cb) = _enumerate(q)
    rows = [i for i in range(p.n_budgets) if i != skip_row]
    rhs = p.rhs
    best, arg = np.inf, None
    for s in range(0, oa.size, 256):
        tot = oa[s:s + 256, None] + ob[None, :]
        ok = np.ones_like(tot, dtype=bool)
        for i in rows:
            ok &= ua[i, s:s + 256, None] + ub[i, None, :] <= rhs[i] + 1e-9 * max(1.0, abs(rhs[i]))
        tot = np.where(ok, tot, np.inf)
        k = int(np.argmin(tot))
        if tot.flat[k] < best:
            best = float(tot.flat[k])
            i, j = np.unravel_index(k, tot.shape)
            arg = np.concatenate([ca[s + i], cb[j]])
    if arg is None:
        return None, None
    return best + q.obj_const, arg


class Branchy(nn.Module):
    """conv_a -> relu -> (conv_b, conv_c: two consumers of one tensor) -> add -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 2, 3, padding=1)
        self.conv_c = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        t = torch.relu(self.conv_a(x))
        y = torch.relu(self.conv_b(t) + self.conv_c(t))
        return self.fc(y.mean(dim=(2, 3)))


def branchy_graph():
    from mpqc.compiler.capture import capture

    torch.manual_seed(0)
    return capture(Branchy().eval(), (torch.randn(1, 1, 6, 6),)).graph


def synthetic_table(graph, bits, rng: np.random.Generator, *, channels: bool = False, energies=None) -> dict:
    """A plausible table: scores falling roughly 4x per bit, a random scale per layer (a JSON-style dict)."""
    layers = {}
    for op in graph.layers():
        d = {}
        base_w, base_a = rng.lognormal(-2, 1), rng.lognormal(-2, 1)
        if op.weight_shape:
            d["w"] = {str(b): base_w * 4.0 ** (-b) * rng.uniform(0.7, 1.3) for b in bits}
            if channels:
                share = rng.dirichlet(np.ones(op.out_channels) * 2)
                d["w_channel"] = {str(b): list(float(d["w"][str(b)]) * share * rng.uniform(0.5, 1.5, share.size))
                                  for b in bits}
        if op.act_inputs:
            d["a"] = {str(b): base_a * 4.0 ** (-b) * rng.uniform(0.7, 1.3) for b in bits}
        if energies is not None:
            d["e"] = {f"{e!r}": float(base_w / e) for e in energies}
        layers[op.name] = d
    return {"version": 1, "method": "synthetic", "model_hash": "test", "layers": layers}
