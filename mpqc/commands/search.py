"""Choose the precision of every layer (or output channel) under the target's budgets, and write plan.json.

The search is one multiple-choice knapsack: a one-hot choice per layer (or channel) over the target's
candidate precisions, minimising the summed sensitivity (activation scores + A x weight scores) under every
budget given, each a ``<=`` row. Infeasible budgets exit with code 2 and name, for each budget, the smallest
value that is feasible with the others held.
"""

from __future__ import annotations

import argparse
import logging
import os

from ._common import add_model_arguments, load_and_capture

HELP = "choose precisions under budgets (multiple-choice ILP) and write plan.json"
log = logging.getLogger("mpqc.search")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--target", required=True, help="built-in target name (generic, bitserial, analog, ...) or a .toml")
    p.add_argument("--sensitivity", metavar="FILE",
                   help="sensitivity table (mpqc sensitivity JSON, or LIMPQ's indicator pickle); default: a "
                        "data-free proxy (relative weight rounding noise, uniform activation noise)")
    p.add_argument("-o", "--output", default="plan.json", help="plan file to write (default: plan.json)")
    add_budget_arguments(p)
    add_search_options(p)
    add_search_extras(p)


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The budget options (shared with `mpqc compile`)."""
    b = p.add_argument_group("budgets (any combination; each is one <= row)")
    b.add_argument("--bitops", metavar="GBOPS", help="BitOPs per forward pass, in 10^9")
    b.add_argument("--avg-bits", metavar="WxAy", help="BitOPs of the uniform network at these widths, e.g. W4A8")
    b.add_argument("--size", metavar="MIB", help="weight storage in MiB")
    b.add_argument("--compression", metavar="X", help="weight storage = fp32 weights / X")
    b.add_argument("--act-mem", metavar="KIB", help="activation memory (sum over tensors, per sample) in KiB")
    b.add_argument("--act-mem-max", metavar="KIB", help="largest activation tensor (per sample) in KiB")
    b.add_argument("--latency", metavar="MS", help="summed measured layer latency in ms (needs --lut)")
    b.add_argument("--lut", metavar="FILE", help="latency table written by `mpqc profile`")
    b.add_argument("--energy", metavar="E", help="energy per forward pass in the target's unit (or with a unit, 3mJ)")
    b.add_argument("--emac", metavar="E", help="analog: MAC-weighted mean energy per MAC")


def weight_alpha_arg(text: str) -> float | str:
    """``--weight-alpha``: a finite number >= 0, or ``auto`` (compile only: :func:`search_run` refuses it)."""
    from mpqc.compiler.search.problem import parse_weight_alpha
    from mpqc.errors import UserError

    try:
        return parse_weight_alpha(text, allow_auto=True)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--weight-alpha ")) from None


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The search options shared with `mpqc compile`."""
    s = p.add_argument_group("search")
    s.add_argument("--granularity", choices=("layer", "channel"), default="layer",
                   help="bits per layer, or per output channel of each conv/linear (kernel-wise)")
    s.add_argument("--clusters", type=int, metavar="K", help="channel granularity: cluster each layer's channels "
                   "into K groups of similar sensitivity")
    s.add_argument("--candidates", metavar="LIST", help="allowed widths, e.g. 8,6,5,4,3,2 (default: the target's)")
    s.add_argument("--fix", action="append", default=[], metavar="NAME=BITS",
                   help="fix a layer (or glob): NAME=8, NAME=W8A8, NAME=W4, NAME=A8, NAME=E100 (analog); repeatable")
    s.add_argument("--weight-alpha", type=weight_alpha_arg, default=1.0, metavar="A",
                   help="objective = sum of activation scores + A x sum of weight scores (default 1); compile "
                        "also takes auto: A measured by three short probe fine-tunings (see --probe-steps)")
    s.add_argument("--monotone", action=argparse.BooleanOptionalAction, default=True,
                   help="repair scores that are not non-increasing in bits (running max from the top; default on)")
    s.add_argument("--act-groups", choices=("tensor", "consumer"), default="tensor",
                   help="one width per activation tensor (shared by its consumers), or one per consuming layer")
    s.add_argument("--solver", choices=("highs", "highs-mip", "cbc"), default="highs",
                   help="highs: the structure-exploiting path (HiGHS LP bound + exact search) where the problem is "
                        "a pure knapsack, HiGHS' MIP otherwise; highs-mip: always the MIP; cbc: CBC via PuLP")
    s.add_argument("--time-limit", type=float, metavar="S",
                   help="solver time limit in seconds; kernel-wise with searched activation widths it is shared "
                        "by the decomposition's local search and branch-and-bound (default 30 s and 20 s at most), "
                        "and lets HiGHS' MIP go on from a plan they could not prove (default: no MIP)")
    s.add_argument("--search", choices=("ilp", "greedy", "learned"), default="ilp",
                   help="ilp (exact), greedy (IMPQ's iterative reduction) or learned (analog, Garg et al.)")
    s.add_argument("--pareto", type=int, metavar="N",
                   help="also sweep N values of the first budget, and its own limit (the point marked chosen); writes "
                        "PLAN.pareto.csv and PLAN.pareto.png")


def add_search_extras(p: argparse.ArgumentParser) -> None:
    """Options only `mpqc search` takes (not yet passed through `mpqc compile`)."""
    s = p.add_argument_group("search (more)")
    s.add_argument("--gap", type=float, metavar="G",
                   help="relative optimality gap to stop at (default 0 for layers, 1e-3 for channels)")
    s.add_argument("--greedy-step", type=float, default=0.05, metavar="F",
                   help="greedy: fraction of the groups reduced per iteration (default 0.05)")
    s.add_argument("--boundary-cost", nargs="?", const="auto", default=None, metavar="W",
                   help="model precision changes between adjacent layers (edge variables); W is the objective "
                        "penalty per change (default: 1%% of the median per-layer score range); the target's "
                        "boundary cost, if any, is added to the row it applies to")


def _validate(args) -> None:
    from mpqc.atomic import check_output_file
    from mpqc.errors import UserError

    check_output_file(args.output, "plan.json")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit {args.time_limit} must be positive (seconds)")
    if args.weight_alpha == "auto":
        raise UserError("--weight-alpha auto fine-tunes three probes, which mpqc search does not do: use mpqc compile "
                        "--weight-alpha auto, or pass the alpha of a compile's recovery.json")
    if args.gap is not None and not 0 <= args.gap < 1:
        raise UserError(f"--gap {args.gap} must be in [0, 1)")
    if args.pareto is not None and not 2 <= args.pareto <= 1000:
        raise UserError(f"--pareto {args.pareto} must be between 2 and 1000 points")
    if args.clusters is not None and args.clusters < 1:
        raise UserError(f"--clusters {args.clusters} must be >= 1")
    if not 0 < args.greedy_step <= 1:
        raise UserError(f"--greedy-step {args.greedy_step} must be in (0, 1]")
    if args.boundary_cost not in (None, "auto"):
        try:
            v = float(args.boundary_cost)
        except ValueError:
            raise UserError(f"--boundary-cost {args.boundary_cost!r} is not a number") from None
        if not v >= 0:
            raise UserError(f"--boundary-cost {args.boundary_cost} must be >= 0")
        args.boundary_cost = v


def _measured_on_other_weights(table, loaded, cap) -> str | None:
    """A warning when the table's scores were measured on other weights than MODEL's (the same architecture
    trained again, say): the names match, so nothing else would notice."""
    import copy

    from mpqc.compiler.passes import fold_batchnorm
    from mpqc.compiler.sensitivity._common import state_hash

    if not table.model_hash or table.method == "synthetic":
        return None
    folded = copy.deepcopy(cap.gm)  # sensitivity hashes the BN-folded graph's weights
    fold_batchnorm(folded)
    if state_hash(folded.state_dict()) == table.model_hash:
        return None
    return (f"the sensitivity table ({table.method}) was measured on other weights than {loaded.source}'s; its "
            "scores may not hold for this model: run mpqc sensitivity on it")


def run(args):
    import time

    import numpy as np

    from mpqc.compiler.plan import plan_costs, uniform_plan
    from mpqc.compiler.search import budgets as B
    from mpqc.compiler.search.problem import (
        SearchOptions,
        build_problem,
        parse_candidates,
        parse_fix,
        proxy_sensitivity,
        read_sensitivity,
        score_plan,
    )
    from mpqc.errors import UserError
    from mpqc.targets import load_target

    t_start = time.perf_counter()
    _validate(args)
    budgets = B.budgets_from_args(args)
    if not budgets:
        raise UserError("give at least one budget (--bitops, --avg-bits, --size, --compression, --act-mem, "
                        "--act-mem-max, --latency, --energy, --emac); without one every layer takes its widest width")
    target = load_target(args.target)
    cands = parse_candidates(args.candidates)
    fix = parse_fix(args.fix)
    if args.search == "learned":
        if target.kind != "analog":
            raise UserError("--search learned trains the energy per MAC of an analog target; use --target analog")
        raise UserError("--search learned needs training data and the analog noise injection, which `mpqc search` "
                        "does not take; use `mpqc compile --search learned --data ...`, or --search ilp here")
    lut = None
    if args.lut:
        from mpqc.cost_models.latency import LatencyTable

        lut = LatencyTable.load(args.lut)
    loaded, cap = load_and_capture(args)
    graph = cap.graph
    warnings: list[str] = []
    if args.sensitivity:
        table = read_sensitivity(args.sensitivity, monotone=args.monotone)
        other = _measured_on_other_weights(table, loaded, cap)
        if other:
            warnings.append(other)
            log.warning(other)
    else:
        state = loaded.module.state_dict()
        weights = {op.name: state[op.weight_fqn].detach().cpu().numpy() for op in graph.weighted_layers()
                   if op.weight_fqn in state}
        wb = sorted(set(cands or target.weight_bits) | set(target.weight_bits))
        ab = sorted(set(cands or target.act_bits) | set(target.act_bits))
        table = proxy_sensitivity(graph, weights, [b for b in wb if b <= 16], [b for b in ab if b <= 16],
                                  e_grid=target.analog.e_grid() if target.analog else None, analog=target.analog,
                                  per_channel=args.granularity == "channel")
        warnings.append("no --sensitivity: scores come from a data-free proxy (relative weight rounding noise "
                        "||W-Q(W)||^2/||W||^2, activations r^2 4^-b/12); run `mpqc sensitivity` for data-driven scores")
        log.warning(warnings[-1])
    options = SearchOptions(granularity=args.granularity, clusters=args.clusters, w_candidates=cands,
                            a_candidates=cands, fix=fix, weight_alpha=args.weight_alpha, monotone=args.monotone,
                            act_groups=args.act_groups, boundary_cost=args.boundary_cost)
    solver = {"highs": "auto", "highs-mip": "highs", "cbc": "cbc"}[args.solver]
    if args.search == "greedy":
        from mpqc.compiler.search.greedy import greedy_search

        sp = build_problem(graph, target, budgets, table, options, lut=lut)
        sol = greedy_search(sp, table, step=args.greedy_step)
    else:
        from mpqc.compiler.search.solve import search

        sp, sol = search(graph, target, budgets, table, options, solver=solver, time_limit=args.time_limit,
                         gap=args.gap, lut=lut)
    warnings += sp.warnings
    for w in sp.warnings:
        log.warning(w)
    plan = sp.to_plan(sol, sensitivity=args.sensitivity, lut=lut,
                      meta={"model": loaded.source, "search": args.search, "weight_alpha": args.weight_alpha,
                            "candidates": list(cands) if cands else None, "fix": args.fix,
                            "monotone": args.monotone, "table_method": table.method})
    # uniform baselines next to the plan
    widest = (max(b for b in target.weight_bits if b <= 8 or b == 16), max(target.act_bits))
    pairs = {f"W{widest[0]}A{widest[1]}": widest}
    for b in budgets:
        if b.avg_bits is not None:
            pairs[f"W{b.avg_bits[0]}A{b.avg_bits[1]}"] = b.avg_bits
    baselines = {}
    if target.kind == "analog":  # the allocation against one E for every analog layer at the same mean
        baselines = _uniform_energy_baseline(plan, graph, target, table)
    for name, (w, a) in ({} if target.kind == "analog" else pairs).items():
        up = uniform_plan(graph, w, a, target.name, act_groups_mode=args.act_groups)
        costs = plan_costs(up, graph, target, lut=lut)
        baselines[name] = {"objective": score_plan(up, graph, table, args.weight_alpha,
                                                   channels=args.granularity == "channel"),
                           **{k: v["value"] for k, v in costs.items()}}
    plan.meta["baselines"] = baselines
    plan.meta["time_total_s"] = time.perf_counter() - t_start
    plan.save(args.output)
    summary = _summary(plan, args.output, warnings)
    if args.pareto:
        from mpqc.compiler.search.pareto import pareto_sweep, write_pareto

        stem = os.path.splitext(args.output)[0]
        csv_path, png_path = stem + ".pareto.csv", stem + ".pareto.png"
        points = pareto_sweep(sp, args.pareto, row=0, solver=solver, time_limit=args.time_limit, gap=args.gap)
        from mpqc.compiler.search.pareto import _div

        r = sp.rows[0]
        write_pareto(points, sp, 0, csv_path, png_path,
                     chosen=(float(np.asarray(sol.budget_values)[0]) / _div(r), float(sol.objective)))
        summary["pareto"] = {"csv": csv_path, "png": png_path, "points": len(points)}
    if not args.json:
        _print(plan, summary, baselines)
    return summary


def _uniform_energy_baseline(plan, graph, target, table) -> dict:
    """``{"E=Ē": {...}}``: the plan with every analog layer (and channel) at its MAC-weighted mean E, scored by
    the same table (each layer's nearest tabulated energy), so the objective column shows what the allocation
    gains over a uniform E of the same energy."""
    from dataclasses import replace

    from mpqc.compiler.plan import plan_costs
    from mpqc.compiler.search.problem import score_plan

    e_bar = plan.costs["emac"]["value"]
    layers = {n: (replace(lp, emac=float(e_bar)) if lp.emac is not None else lp) for n, lp in plan.layers.items()}
    up = replace(plan, layers=layers, granularity="layer")
    costs = plan_costs(up, graph, target)
    return {f"E={e_bar:.4g}": {"objective": score_plan(up, graph, table), **{k: v["value"] for k, v in costs.items()}}}


def _summary(plan, path: str, warnings: list[str]) -> dict:
    from collections import Counter

    hist_w: Counter = Counter()
    hist_a: Counter = Counter()
    energies = [e for lp in plan.layers.values() if lp.emac is not None
                for e in (lp.emac if isinstance(lp.emac, list) else [lp.emac])]
    for lp in plan.layers.values():
        if isinstance(lp.w_bits, list):
            hist_w.update(str(b) for b in lp.w_bits)
        elif lp.w_bits is not None:
            hist_w[str(lp.w_bits)] += 1
        hist_a[str(lp.a_bits)] += 1
    budgets = {k.split(":", 1)[1]: v for k, v in plan.costs.items() if k.startswith("budget:")}
    return {"plan": path, "target": plan.target, "status": plan.solver["status"], "solver": plan.solver["name"],
            "objective": plan.objective, "gap": plan.solver["gap"], "bound": plan.solver["bound"],
            "time_s": plan.solver["time_s"], "binaries": plan.solver["binaries"], "budgets": budgets,
            "costs": {k: v for k, v in plan.costs.items() if not k.startswith("budget:")},
            "w_bits_histogram": dict(sorted(hist_w.items())), "a_bits_histogram": dict(sorted(hist_a.items())),
            "emac_range": [min(energies), max(energies), len(energies)] if energies else None,
            "warnings": warnings}


def _print(plan, summary: dict, baselines: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    s = summary
    con.print(f"[bold]mpqc search[/bold] → {s['plan']}  target [cyan]{s['target']}[/cyan]  "
              f"solver {s['solver']}: [bold]{s['status']}[/bold], objective {s['objective']:.6g}, "
              f"gap {s['gap']:.2e}, {s['time_s'] * 1e3:.1f} ms, {s['binaries']} binaries")
    t = Table(title="budgets")
    for c in ("budget", "use", "limit", "slack", "binding"):
        t.add_column(c, justify="left" if c == "budget" else "right")
    for b in s["budgets"].values():
        t.add_row(b["option"], f"{b['value']:.6g} {b['unit']}", f"{b['budget']:.6g} {b['unit']}",
                  f"{b['slack']:.4g}", "[bold red]yes[/bold red]" if b["binding"] else "no")
    con.print(t)
    t2 = Table(title="plan vs uniform baselines")
    t2.add_column("")
    t2.add_column("objective", justify="right")
    t2.add_column("GBOPs", justify="right")
    t2.add_column("size MiB", justify="right")
    t2.add_row("plan", f"{plan.objective:.6g}", f"{s['costs']['bitops']['value'] / 1e9:.4g}",
               f"{s['costs']['size']['value'] / 2**20:.4g}")
    for name, b in baselines.items():
        t2.add_row(f"uniform {name}", f"{b['objective']:.6g}", f"{b['bitops'] / 1e9:.4g}", f"{b['size'] / 2**20:.4g}")
    con.print(t2)
    con.print(f"weight widths {s['w_bits_histogram']}   activation widths {s['a_bits_histogram']}")
    if s.get("emac_range"):
        lo, hi, n = s["emac_range"]
        unit = "channels" if plan.granularity == "channel" else "layers"
        con.print(f"energy per MAC: {lo:.4g} .. {hi:.4g} over {n} analog {unit}")
    if "pareto" in s:
        con.print(f"Pareto sweep: {s['pareto']['points']} points → {s['pareto']['csv']}, {s['pareto']['png']}")
