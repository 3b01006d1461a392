"""The coupled kernel-wise search (per-channel weight widths, searched activation widths) on real CIFAR-10
ResNet-20 sensitivity tables: the default path against the one it replaced, on the same problems in the same run.

- default: the Lagrangian decomposition's tries, then a local search over activation widths
  (``mckp._local_search``, session 16), then a branch-and-bound over them that raises the bound
  (``mckp._branch_and_bound``, session 17); a plan still unproved comes back as it is (a warning beyond 1 %);
- before (until session 15): the decomposition's tries only, then, when they did not prove the gap, HiGHS' MIP
  from that incumbent for 60 s (``--mip-seconds``), the plan paired with the tighter of the two bounds.

Problems: every table x the BitOPs of uniform W2A2, W2A3, W3A3 and W4A4 with conv1 and fc at 8 bits (bench_cifar's
mixed rows: every layer free) x weight-alpha 0.4, 0.151, 0.05 (the values bench/RESULTS.md measured) x with and
without Uhlich et al.'s 70.1 KB weight cap; gap target 0.1 %. Rows are printed for the problems the tries leave
unproved (on the others both paths run the same code), with a summary line.

    mpqc sensitivity FP.pt --arch mpqc.compiler.zoo:resnet20 --data cifar10:DIR --method M --granularity channel \\
        -o M.json                                              # for each method M
    python bench/bench_coupled.py --model FP.pt --tables impq.json fisher.json hutchinson.json > coupled.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_cifar  # noqa: E402 - needs the bench folder on sys.path


def previous_path(graph, target, budgets, table, options, gap: float, mip_seconds: float):
    """The search as it was before the local search: the decomposition's tries, then HiGHS' MIP from their
    incumbent for ``mip_seconds`` without the early stop at the decomposition's bound."""
    from mpqc.compiler.search import mckp, solve_highs
    from mpqc.compiler.search.solve import search

    keep = mckp.LOCAL_SEARCH_LIMIT, mckp.BRANCH_NODES, solve_highs._stop_within
    mckp.LOCAL_SEARCH_LIMIT, mckp.BRANCH_NODES, solve_highs._stop_within = 0.0, 0, lambda *args: None
    try:
        return search(graph, target, budgets, table, options, gap=gap, time_limit=mip_seconds)
    finally:
        mckp.LOCAL_SEARCH_LIMIT, mckp.BRANCH_NODES, solve_highs._stop_within = keep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="ResNet-20 state dict the tables were computed on")
    p.add_argument("--tables", nargs="+", required=True, help="kernel-wise sensitivity tables (mpqc sensitivity)")
    p.add_argument("--plans", default="W2A2,W2A3,W3A3,W4A4", help="BitOPs of these uniform plans (ends at 8)")
    p.add_argument("--alphas", default="0.4,0.151,0.05", help="weight-alpha values")
    p.add_argument("--size-kb", type=float, default=70.1, help="each case also with this weight-size cap (0: not)")
    p.add_argument("--mip-seconds", type=float, default=60.0, help="the previous path's MIP time (its default)")
    p.add_argument("--gap", type=float, default=1e-3)
    a = p.parse_args(argv)

    from mpqc.compiler.capture import capture
    from mpqc.compiler.search.budgets import parse_avg_bits, parse_budgets
    from mpqc.compiler.search.problem import SearchOptions, read_sensitivity
    from mpqc.compiler.search.solve import search
    from mpqc.compiler.zoo import resnet20
    from mpqc.errors import UserError
    from mpqc.targets import load_target

    # every input checked before any work: one line and exit 2 (bench_cifar._bad), no traceback
    try:
        plans = [parse_avg_bits(v.strip()) for v in a.plans.split(",") if v.strip()]
    except UserError as e:
        bench_cifar._bad(str(e).replace("--avg-bits", "--plans:", 1))
    try:
        tables = {path: read_sensitivity(path, monotone=True) for path in a.tables}
    except (UserError, OSError, ValueError) as e:
        bench_cifar._bad(f"--tables: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        alphas = [float(v) for v in a.alphas.split(",") if v.strip()]
    except ValueError:
        bench_cifar._bad(f"--alphas {a.alphas!r}: not comma-separated numbers; write e.g. 0.4,0.151")
    for bad, msg in ((not plans, "--plans names no plan; write e.g. W2A2,W3A3"),
                     (not alphas or min(alphas) <= 0, f"--alphas {a.alphas!r}: each must be > 0"),
                     (a.size_kb < 0, f"--size-kb {a.size_kb:g} must be >= 0 (0: no weight cap)"),
                     (not a.mip_seconds > 0, f"--mip-seconds {a.mip_seconds:g} must be > 0"),
                     (not 0 <= a.gap < 1, f"--gap {a.gap:g} must be in [0, 1)")):
        if bad:
            bench_cifar._bad(msg)
    model = resnet20()
    try:
        model.load_state_dict(torch.load(a.model, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - a missing file, not a state dict, or another architecture's
        bench_cifar._bad(f"--model {a.model}: not a ResNet-20 state dict ({type(e).__name__}); pass the float "
                         "model the tables were computed on")
    graph = capture(model.eval(), (torch.zeros(1, 3, 32, 32),), fold_bn=True).graph
    target = load_target("generic")
    bitops = {wa: f"{bench_cifar.uniform_bitops(resnet20, *wa) / 1e9:.9f}" for wa in plans}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}; model {a.model}; gap target {100 * a.gap:g} %")
    print("| table | budget | weight-alpha | default: status, gap | s | local moves, knapsacks | B&B nodes, root gap | "
          "previous: solver, gap | s | objective default / previous |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    caps = [{}] + ([{"size": f"{a.size_kb / 1024:.8f}"}] if a.size_kb > 0 else [])
    n = proved_by_tries = 0
    t_new_all = t_old_all = 0.0
    for path, table in tables.items():
        for w, bits_a in plans:
            for alpha in alphas:
                for cap in caps:
                    budgets = parse_budgets(bitops=bitops[(w, bits_a)], **cap)
                    options = SearchOptions(granularity="channel", weight_alpha=alpha)
                    n += 1
                    t0 = time.perf_counter()
                    _sp, old = previous_path(graph, target, budgets, table, options, a.gap, a.mip_seconds)
                    t_old = time.perf_counter() - t0
                    if old.solver == "mckp-coupled":  # the tries proved it: both paths are the same code
                        proved_by_tries += 1
                        continue
                    t0 = time.perf_counter()
                    sp, new = search(graph, target, budgets, table, options, gap=a.gap)
                    t_new = time.perf_counter() - t0
                    t_new_all, t_old_all = t_new_all + t_new, t_old_all + t_old
                    c = sp.problem.obj_const
                    root = new.info.get("root_bound")
                    root_gap = "-" if root is None else f"{100 * (new.objective - root) / abs(new.objective - c):.3f} %"
                    label = f"W{w}A{bits_a} BitOPs" + (f" + {a.size_kb:g} KB" if cap else "")
                    print(f"| {Path(path).stem} | {label} | {alpha:g} | {new.status.value}, {100 * new.gap:.3f} % | "
                          f"{t_new:.2f} | {new.info.get('local_moves', '-')}, {new.info.get('local_knapsacks', '-')}"
                          f" | {new.info.get('branch_nodes', '-')}, {root_gap} | {old.solver} {old.status.value}, "
                          f"{100 * old.gap:.3f} % | {t_old:.1f} | {(new.objective - c) / (old.objective - c):.5f} |",
                          flush=True)
    print(f"\n{n} problems; {proved_by_tries} proved by the decomposition's tries (the same on both paths); the "
          f"other {n - proved_by_tries}: {t_new_all:.1f} s on the default path against {t_old_all:.1f} s before.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
