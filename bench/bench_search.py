"""Benchmarks of the search (compiler/search) on torchvision ResNet-50; writes its section of bench/RESULTS.md.

1. LIMPQ's setting (research/seeds.md §3.3): candidates 6..2 as joint (w, a) pairs, BitOPs of uniform W3A4,
   size at 1/12.2 of fp32, alpha = 2, conv1 and fc fixed at W8A8, one activation width per consuming layer,
   the table as given (no monotone repair). Solved to proven optimality by the default path; side by side, the
   same arrays through HiGHS' MIP and CBC, and a LIMPQ-style PuLP/CBC build (one LpVariable per (layer, b_w,
   b_a), lpSum objective and rows, default ``solve()``) timed in the same run.
2. Kernel-wise: every output channel of every conv and the fc (27,560 groups) over widths 8..2 with activations
   at 8 bits, a BitOPs and a size budget, to a gap <= 0.1 %. Side by side: HiGHS' LP relaxation of the same
   arrays (and, with --reference-mip, HiGHS' MIP under a time limit).
3. A 20-point Pareto sweep of the BitOPs budget, ResNet-50 layer-wise (tensor mode, widths 8..2).

The sensitivity tables are synthetic (no ImageNet here), drawn to match the statistics of LIMPQ's published
ResNet-50 indicators (seeds.md §3.2): per layer, the 6-bit weight score log-uniform in [0.0019, 0.0224] and the
activation one in [0.0083, 0.0963]; from 6 down to 2 bits the scores grow by a per-layer factor of 4-9
(weights) and 3.5-6 (activations) spread geometrically over the steps with +-10 % noise; two weight scores
are made non-monotone at 5 bits, as in LIMPQ's file. Per-channel scores split a layer's score over its channels
with log-normal shares (sigma 1). Seeds are fixed, so every run solves the same problems.

    python bench/bench_search.py [--repeats 20] [--reference-mip] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_search:start -->", "<!-- bench_search:end -->"


def limpq_like_table(graph, bits=(6, 5, 4, 3, 2), seed=0, exclude=("conv1", "fc"), channels=False) -> dict:
    rng = np.random.default_rng(seed)
    layers = {}
    names = [op.name for op in graph.layers() if op.name not in exclude]
    wired = set(rng.choice(len(names), size=2, replace=False).tolist())
    for i, op in enumerate(graph.layers()):
        if op.name in exclude:
            continue
        w6 = float(np.exp(rng.uniform(np.log(0.0019), np.log(0.0224))))
        a6 = float(np.exp(rng.uniform(np.log(0.0083), np.log(0.0963))))
        gw, ga = rng.uniform(4, 9) ** (1 / 4), rng.uniform(3.5, 6) ** (1 / 4)
        w = {b: w6 * gw ** (6 - b) * rng.uniform(0.9, 1.1) for b in bits}
        a = {b: a6 * ga ** (6 - b) * rng.uniform(0.9, 1.1) for b in bits}
        if i in wired and 5 in w and 6 in w:
            w[5] = 0.4 * w[6]  # a "wired" point: 5 bits scores better than 6
        d = {"w": {str(b): v for b, v in w.items()}, "a": {str(b): v for b, v in a.items()}}
        if channels and op.weight_shape:
            share = rng.lognormal(0, 1, op.out_channels)
            share /= share.sum()
            d["w_channel"] = {str(b): (v * share).tolist() for b, v in w.items()}
        layers[op.name] = d
    return {"version": 1, "method": "synthetic-limpq-like", "model_hash": f"seed{seed}", "layers": layers}


def limpq_pulp(graph, table, alpha=2.0, bits=(6, 5, 4, 3, 2), wb=3, ab=4, cr=12.2):
    """LIMPQ's search.py formulation written plainly with PuLP (exact MACs), solved by CBC's default call."""
    import pulp

    t0 = time.perf_counter()
    layers = [op for op in graph.layers() if op.name not in ("conv1", "fc")]
    fixed = [op for op in graph.layers() if op.name in ("conv1", "fc")]
    prob = pulp.LpProblem("limpq", pulp.LpMinimize)
    x = {(op.name, i, j): prob.add_variable(f"x_{k}_{i}_{j}", 0, 1, cat="Binary")
         for k, op in enumerate(layers) for i in bits for j in bits}
    prob.setObjective(pulp.lpSum(x[op.name, i, j] * (table["layers"][op.name]["a"][str(j)] +
                                                     alpha * table["layers"][op.name]["w"][str(i)])
                                 for op in layers for i in bits for j in bits))
    for op in layers:
        prob.addConstraint(pulp.lpSum(x[op.name, i, j] for i in bits for j in bits) == 1)
    # LIMPQ sums BitOPs over the searchable layers on both sides (the fixed ones count the same on each)
    prob.addConstraint(pulp.lpSum(x[op.name, i, j] * op.macs * i * j for op in layers for i in bits for j in bits)
                       <= sum(op.macs for op in layers) * wb * ab)
    p_total = 32 * sum(op.weight_numel for op in graph.weighted_layers())
    prob.addConstraint(8 * sum(op.weight_numel for op in fixed) +
                       pulp.lpSum(x[op.name, i, j] * i * op.weight_numel for op in layers for i in bits for j in bits)
                       <= p_total / cr)
    t1 = time.perf_counter()
    from pulp.apis import coin_api

    prob.solve(pulp.COIN_CMD(path=coin_api.pulp_cbc_path, msg=False))
    t2 = time.perf_counter()
    return {"build_s": t1 - t0, "solve_s": t2 - t1, "total_s": t2 - t0, "objective": pulp.value(prob.objective),
            "status": pulp.LpStatus[prob.status]}


def timed(fn, repeats, cpu: list | None = None):
    """(last result, median wall s, min wall s); the process CPU times go into ``cpu`` when given."""
    times, out = [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
    return out, float(np.median(times)), float(np.min(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--reference-mip", action="store_true", help="also run HiGHS' MIP on the kernel-wise problem")
    ap.add_argument("--mip-limit", type=float, default=120.0)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    args = ap.parse_args()

    import torch

    from mpqc.compiler.capture import capture
    from mpqc.compiler.loading import load_model
    from mpqc.compiler.search.budgets import parse_budgets
    from mpqc.compiler.search.pareto import pareto_sweep
    from mpqc.compiler.search.problem import SearchOptions, build_problem, read_sensitivity
    from mpqc.compiler.search.solve import run_solver
    from mpqc.compiler.search.solve_cbc import solve_cbc
    from mpqc.compiler.search.solve_highs import solve_highs, solve_lp
    from mpqc.targets import load_target

    torch.manual_seed(0)
    lines: list[str] = []
    res: dict = {}
    loaded = load_model("torchvision:resnet50")
    graph = capture(loaded.module, loaded.example_inputs).graph
    target = load_target("generic")
    tmp = Path(tempfile.mkdtemp(prefix="mpqc_bench_search_"))

    # ---- 1. LIMPQ's setting --------------------------------------------------------------------------------
    raw = limpq_like_table(graph)
    sens = tmp / "sens_limpq.json"
    sens.write_text(json.dumps(raw))
    table = read_sensitivity(raw)  # --no-monotone: as given
    budgets = parse_budgets(avg_bits="W3A4", compression="12.2")
    opts = SearchOptions(w_candidates=(6, 5, 4, 3, 2), a_candidates=(6, 5, 4, 3, 2), weight_alpha=2.0,
                         fix={"conv1": {"w": 8, "a": 8}, "fc": {"w": 8, "a": 8}}, act_groups="consumer",
                         monotone=False)
    sp, t_build, _ = timed(lambda: build_problem(graph, target, budgets, table, opts), 5)
    P = sp.problem
    cpu: list[float] = []
    sol, t_med, t_min = timed(lambda: run_solver(P, gap=0.0), args.repeats, cpu)
    hi, h_med, _ = timed(lambda: solve_highs(P, gap=0.0), max(3, args.repeats // 4))
    cb, c_med, _ = timed(lambda: solve_cbc(P, gap=0.0), 3)
    refs = [limpq_pulp(graph, raw) for _ in range(3)]
    ref_total = float(np.median([r["total_s"] for r in refs]))
    ref_build = float(np.median([r["build_s"] for r in refs]))
    agree = abs(sol.objective - hi.objective) <= 1e-9 * abs(hi.objective) and \
        abs(sol.objective - cb.objective) <= 1e-9 * abs(cb.objective)
    res["limpq"] = {"binaries": P.n, "groups": P.n_groups, "status": sol.status.value, "objective": sol.objective,
                    "gap": sol.gap, "solve_median_s": t_med, "solve_min_s": t_min,
                    "cpu_median_s": float(np.median(cpu)), "build_s": t_build,
                    "highs_mip_s": h_med, "cbc_s": c_med, "limpq_pulp_s": ref_total,
                    "limpq_pulp_objective": refs[0]["objective"], "agree": agree, "info": sol.info}
    # the CLI command itself (capture included), once
    cmd = [sys.executable, "-m", "mpqc", "search", "torchvision:resnet50", "--target", "generic", "--sensitivity",
           str(sens), "--candidates", "6,5,4,3,2", "--avg-bits", "W3A4", "--compression", "12.2", "--weight-alpha",
           "2", "--fix", "conv1=8", "--fix", "fc=8", "--act-groups", "consumer", "--no-monotone", "-o",
           str(tmp / "plan.json"), "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    cli_wall = time.perf_counter() - t
    cli = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()}
    res["limpq"]["cli"] = {"wall_s": cli_wall, "status": cli.get("status"), "time_s": cli.get("time_s"),
                           "objective": cli.get("objective")}

    # ---- 2. kernel-wise ----------------------------------------------------------------------------------------
    kraw = limpq_like_table(graph, bits=(8, 7, 6, 5, 4, 3, 2), seed=1, exclude=(), channels=True)
    ktable = read_sensitivity(kraw, monotone=True)
    kbudgets = parse_budgets(avg_bits="W4A8", compression="8")
    kopts = SearchOptions(granularity="channel", fix={"*": {"a": 8}})
    ksp, kt_build, _ = timed(lambda: build_problem(graph, target, kbudgets, ktable, kopts), 1)
    K = ksp.problem
    ksol, kt_med, kt_min = timed(lambda: run_solver(K, gap=1e-3), 3)
    t = time.perf_counter()
    st, lp_val, _, _ = solve_lp(K)
    lp_s = time.perf_counter() - t
    res["kernel"] = {"binaries": K.n, "groups": K.n_groups, "pure": K.pure, "status": ksol.status.value,
                     "objective": ksol.objective, "bound": ksol.bound, "gap": ksol.gap, "solve_median_s": kt_med,
                     "solve_min_s": kt_min, "build_s": kt_build, "lp_s": lp_s, "lp_objective": lp_val,
                     "gap_vs_lp": (ksol.objective - lp_val) / ksol.objective, "info": ksol.info}
    # the same with the activation widths searched too (one per tensor): products linearised for the MIP,
    # a Lagrangian decomposition over the activation choice for the default path
    from mpqc.compiler.search.solve import search

    t = time.perf_counter()
    asp, asol = search(graph, target, kbudgets, ktable, SearchOptions(granularity="channel"))
    res["kernel_act"] = {"binaries": asp.problem.n, "aux": asp.problem.n_aux, "status": asol.status.value,
                         "objective": asol.objective, "gap": asol.gap, "solver": asol.solver,
                         "time_s": asol.time_s, "wall_s": time.perf_counter() - t}
    if args.reference_mip:
        t = time.perf_counter()
        m = solve_highs(K, gap=1e-3, time_limit=args.mip_limit)
        res["kernel"]["highs_mip"] = {"time_s": time.perf_counter() - t, "status": m.status.value,
                                      "objective": m.objective, "gap": m.gap, "limit_s": args.mip_limit}

    # ---- 3. Pareto sweep -------------------------------------------------------------------------------------
    praw = limpq_like_table(graph, bits=(8, 7, 6, 5, 4, 3, 2), seed=2, exclude=())
    ptable = read_sensitivity(praw, monotone=True)
    psp = build_problem(graph, target, parse_budgets(avg_bits="W4A8", compression="8"), ptable, SearchOptions())
    t = time.perf_counter()
    pts = pareto_sweep(psp, 20, row=0)
    p_s = time.perf_counter() - t
    res["pareto"] = {"points": len(pts), "time_s": p_s, "binaries": psp.problem.n,
                     "statuses": sorted({p.status for p in pts}),
                     "objective_range": [min(p.objective for p in pts), max(p.objective for p in pts)],
                     "per_point_s": [p.time_s for p in pts]}

    # ---- report ------------------------------------------------------------------------------------------------
    cpu = _cpu_model()
    load = os.getloadavg()[0]
    L, Kr, Pr = res["limpq"], res["kernel"], res["pareto"]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "## Search (compiler/search)", "",
        f"- Machine: {os.cpu_count()}-core VM, `lscpu` model name **{cpu}**, Python {platform.python_version()}, "
        f"highspy {_ver('highspy')}, PuLP {_ver('pulp')} (bundled CBC), numpy {np.__version__}. Date: {date}. "
        f"1-min load average at the end: {load:.1f} (the machine is shared with other engineers' jobs).",
        "- Command: `python bench/bench_search.py --write" + (" --reference-mip" if args.reference_mip else "") +
        "` (ResNet-50 captured once; tables synthetic, drawn like LIMPQ's ResNet-50 indicators: see the script's "
        "docstring). MACs are exact geometry (LIMPQ's stride-2 quirk, seeds.md §3.4, is not copied).",
        "- Times are the solver alone (arrays built; capture and table reading excluded) unless said otherwise. "
        "Wall times on a loaded 2-core box are inflated by the other jobs; the process CPU time is given where "
        "it matters (it excludes time spent waiting for a core).", "",
        "### 1. LIMPQ's setting",
        "`mpqc search torchvision:resnet50 --sensitivity S --candidates 6,5,4,3,2 --avg-bits W3A4 --compression 12.2 "
        "--weight-alpha 2 --fix conv1=8 --fix fc=8 --act-groups consumer --no-monotone -o plan.json`", "",
        "| solver | status | objective | time |", "|---|---|---|---|",
        f"| mpqc default (`mckp`: HiGHS LP bound, repair, reduced-cost fixing, exact dominance search) | "
        f"{L['status']} (gap {L['gap']:.1e}) | {L['objective']:.9g} | **{L['solve_median_s'] * 1e3:.1f} ms** "
        f"median of {args.repeats} (min {L['solve_min_s'] * 1e3:.1f} ms; CPU time median "
        f"{L['cpu_median_s'] * 1e3:.1f} ms) |",
        f"| HiGHS MIP, same arrays | optimal | {hi.objective:.9g} | {L['highs_mip_s'] * 1e3:.0f} ms |",
        f"| CBC via PuLP, same arrays | optimal | {cb.objective:.9g} | {L['cbc_s'] * 1e3:.0f} ms |",
        f"| LIMPQ-style PuLP/CBC build + solve (reference) | {refs[0]['status']} | "
        f"{refs[0]['objective']:.9g} | {ref_total * 1e3:.0f} ms (build {ref_build * 1e3:.0f} ms) |", "",
        f"{L['binaries']} binaries in {L['groups']} groups (52 searchable layers x 25 joint pairs, conv1/fc fixed); "
        f"building the arrays from the IR and table: {L['build_s'] * 1e3:.0f} ms. All four objectives agree: "
        f"{'yes' if L['agree'] and abs(refs[0]['objective'] - L['objective']) <= 1e-6 * L['objective'] else 'NO'}. "
        f"Path: LP bound {L['info'].get('t_bound', 0) * 1e3:.1f} ms, heuristic gap "
        f"{L['info'].get('heuristic_gap', 0):.2e}, {L['info'].get('residual_groups', 0)} groups / "
        f"{L['info'].get('residual_binaries', 0)} binaries left after reduced-cost fixing, closed by "
        f"{L['info'].get('residual_method', '-')}. Targets: <= 50 ms; LIMPQ reports 0.35 s on an i7-8700 and its "
        f"own PuLP/CBC code took 0.27 s on this machine when quiet (issue 5); in this run the LIMPQ-style reference "
        f"took {ref_total:.2f} s, i.e. the box ran {ref_total / 0.27:.1f}x slower than then, and mpqc's path was "
        f"{ref_total / L['solve_median_s']:.0f}x faster than the reference side by side. The whole CLI command "
        "(load, capture, table, "
        f"build, solve, plan costs, write) took {L['cli']['wall_s']:.1f} s wall, status {L['cli']['status']}.", "",
        "### 2. Kernel-wise ResNet-50",
        "Every output channel of every conv and the fc, widths 8..2, activations fixed at 8 bits "
        "(`--granularity channel --fix '*=A8' --avg-bits W4A8 --compression 8`).", "",
        "| solver | status | objective | gap | time |", "|---|---|---|---|---|",
        f"| mpqc default (`mckp`: cutting-plane Lagrangian bound + repair/fill) | {Kr['status']} | "
        f"{Kr['objective']:.9g} | {Kr['gap']:.1e} (bound {Kr['bound']:.9g}) | **{Kr['solve_median_s']:.2f} s** "
        f"median of 3 |",
        f"| HiGHS LP relaxation, same arrays | {st} | {Kr['lp_objective']:.9g} (a bound) | - | {Kr['lp_s']:.1f} s |",
    ]
    if "highs_mip" in Kr:
        m = Kr["highs_mip"]
        lines.append(f"| HiGHS MIP, same arrays (limit {m['limit_s']:.0f} s) | {m['status']} | {m['objective']:.9g}"
                     f" | {m['gap']:.1e} | {m['time_s']:.1f} s |")
    Ka = res["kernel_act"]
    lines += [
        "", f"{Kr['binaries']:,} binaries in {Kr['groups']:,} groups, pure knapsack: {Kr['pure']}; arrays built in "
        f"{Kr['build_s']:.1f} s. The solution is within {Kr['gap_vs_lp']:.1e} of the LP bound. Reference (issue 5, "
        "same machine): HiGHS as a plain MIP took 360 s to prove optimality, its LP relaxation 7 s. Target: "
        "<= 10 s to a gap <= 0.1 %.", "",
        f"With the activation widths searched as well (one per tensor, 8..2; `--granularity channel` alone): "
        f"{Ka['binaries']:,} binaries + {Ka['aux']} linearisation columns for the MIP form; the default path "
        f"(`{Ka['solver']}`: Lagrangian decomposition over each tensor's width, then the knapsack left by the best "
        f"widths) gives {Ka['status']} at gap {Ka['gap']:.1e} in **{Ka['time_s']:.2f} s** "
        f"({Ka['wall_s']:.1f} s including the layer-wise solve whose widths seed it).", "",
        "### 3. Pareto sweep, ResNet-50 layer-wise",
        f"20 limits of `--avg-bits` from the smallest feasible to the unconstrained use (tensor mode, widths 8..2, "
        f"`--compression 8` held), {Pr['binaries']} binaries: **{Pr['time_s']:.2f} s** for the range and all 20 "
        f"solves (statuses {', '.join(Pr['statuses'])}; per point median "
        f"{np.median(Pr['per_point_s']) * 1e3:.0f} ms). Target: <= 5 s.", "",
    ]
    text = "\n".join(lines)
    print(text)
    (tmp / "results.json").write_text(json.dumps(res, indent=1, default=str))
    if args.write:
        _write_section(ROOT / "bench" / "RESULTS.md", text)
    return 0


def _write_section(path: Path, text: str) -> None:
    body = path.read_text() if path.exists() else "# mpqc benchmark results\n"
    block = f"{START}\n{text}\n{END}"
    if START in body and END in body:
        body = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(body)
    os.replace(tmp, path)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ver(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
