"""Pareto sweeps of the coupled kernel-wise problem (per-channel weight widths, searched activation widths) on
ResNet-20: the default path (each point and the range's top through the Lagrangian decomposition) against the
one it replaced (HiGHS' MIP on the linearised products, ``solver="highs"``), in the same run.

Scores: the synthetic kernel-wise tables of tests/compiler/search/helpers.py (the ones the search tests use),
two cases: widths 8/6/4/2 at the W2A4 BitOPs swept over BitOPs (seed 5), and widths 4/3/2 at the W3A3 BitOPs
with 12x compression held, swept over the weight size (seed 7).

    python bench/bench_pareto_coupled.py [--points 3] [--old-limit 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.compiler.search.helpers: the search tests' synthetic tables

CASES = [  # (label, seed, widths, budgets, swept row)
    ("W2A4 BitOPs, sweep BitOPs", 5, (8, 6, 4, 2), {"avg_bits": "W2A4"}, 0),
    ("W3A3 BitOPs + 12x compression, sweep size", 7, (4, 3, 2), {"avg_bits": "W3A3", "compression": 12}, 1),
]


def _bad(msg: str):
    print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def run_path(sp, row: int, points: int, solver: str, limit: float | None) -> dict:
    from mpqc.compiler.search.pareto import pareto_sweep, sweep_range

    t = time.perf_counter()
    lo, hi = sweep_range(sp, row, solver=solver, time_limit=limit)
    t_range = time.perf_counter() - t
    pts = pareto_sweep(sp, points, row=row, solver=solver, time_limit=limit, values=list(np.linspace(lo, hi, points)))
    return {"range_s": t_range, "points_s": time.perf_counter() - t - t_range, "points": pts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=3, help="points per sweep")
    p.add_argument("--old-limit", type=float, default=300.0,
                   help="seconds per MIP solve on the previous path (it had none; this keeps the bench bounded)")
    a = p.parse_args(argv)
    if a.points < 2:
        _bad(f"--points {a.points} must be >= 2")
    if not a.old_limit > 0:
        _bad(f"--old-limit {a.old_limit} must be > 0 (seconds)")

    from mpqc.compiler.capture import capture
    from mpqc.compiler.search.budgets import parse_budgets
    from mpqc.compiler.search.problem import SearchOptions, build_problem, read_sensitivity
    from mpqc.compiler.zoo import resnet20
    from mpqc.targets import load_target
    from tests.compiler.search.helpers import synthetic_table

    torch.manual_seed(0)
    graph = capture(resnet20().eval(), (torch.randn(1, 3, 32, 32),)).graph
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}; {a.points} points per sweep; previous path's MIP limit {a.old_limit:g} s")
    print("| case | path | range s | points s | statuses (gap %) | objectives |")
    print("|---|---|---|---|---|---|")
    for label, seed, bits, budgets, row in CASES:
        table = read_sensitivity(synthetic_table(graph, bits, np.random.default_rng(seed), channels=True))
        sp = build_problem(graph, load_target("generic"), parse_budgets(**budgets), table,
                           SearchOptions(granularity="channel", w_candidates=bits, a_candidates=bits))
        for name, solver, limit in (("default", "auto", None), ("previous (MIP)", "highs", a.old_limit)):
            r = run_path(sp, row, a.points, solver, limit)
            pts = r["points"]
            st = ", ".join(f"{pt.status} ({100 * pt.gap:.3f})" for pt in pts)
            obj = ", ".join(f"{pt.objective:.6g}" for pt in pts)
            print(f"| {label} | {name} | {r['range_s']:.1f} | {r['points_s']:.1f} | {st} | {obj} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
