"""Measure the latency of every layer of a model at every precision a target allows: a latency table.

The table (JSON, one row per op signature and precision, with median, spread, repeats and provenance) prices
``--latency MS --lut FILE`` budgets in ``mpqc search``. On ort-cpu the whole model is also timed in fp32 and as
an int8 QDQ graph, and the error of the sum-of-layers estimate against it is printed.
"""

from __future__ import annotations

import os
import sys
import tempfile

from mpqc.atomic import check_output_file
from mpqc.errors import UserError

from ._common import add_model_arguments, load_and_capture

HELP = "measure per-layer latency per precision (a latency table for --latency budgets)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--target", required=True, help="ort-cpu, cuda or tensorrt, or a target .toml with [costs.latency]")
    p.add_argument("-o", "--output", required=True, metavar="LUT.json", help="latency table to write (JSON)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per layer and precision (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs before timing (default 10)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's choice)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="ort-cpu: flush the CPU caches before each timed run (cold, default) or not (warm)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="ort-cpu: wall clock (default), or process CPU time (with --threads 1: robust on a "
                        "machine shared with other jobs)")
    p.add_argument("--strict", action="store_true",
                   help="fail if a precision the target allows cannot be measured, instead of an 'unsupported' row")
    p.add_argument("--append", action="store_true", help="add the rows to an existing table at -o")
    p.add_argument("--no-whole-model", action="store_true", help="skip timing the whole model")


def _check_args(args, target) -> str:
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} must be at least 1")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup} must be 0 or more")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be at least 1")
    if args.clock == "cpu" and args.threads != 1:
        raise UserError("--clock cpu measures latency only with one intra-op thread; add --threads 1")
    if "latency" not in target.cost_models or target.costs.latency is None:
        raise UserError(f"target {target.name} has no measured latency (no 'latency' cost model with [costs.latency] "
                        "runtime); profile ort-cpu, cuda or tensorrt")
    check_output_file(args.output, "lut.json")
    runtime = target.costs.latency.runtime
    if runtime == "torch-cuda":
        from mpqc.cost_models.profile_cuda import require_cuda

        require_cuda()
    elif runtime == "tensorrt":
        from mpqc.cost_models.profile_trt import require_tensorrt

        require_tensorrt()
    return runtime


def run(args):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mpqc.cost_models.latency import LatencyTable, plan_measurements
    from mpqc.targets import load_target

    target = load_target(args.target)
    runtime = _check_args(args, target)  # fail before the slow part
    loaded, cap = load_and_capture(args)
    layers = [ly for ly in cap.graph.layers() if target.candidate_specs(ly.kind)]
    if not layers:
        raise UserError(f"{args.model} has no conv, linear, matmul or embedding layers to profile")
    plan = plan_measurements(layers, target)
    err = Console(stderr=True)
    total = len(plan)
    if runtime == "onnxruntime-cpu":
        from mpqc.cost_models import profile_ort

        total += len(profile_ort.boundary_shapes(layers))
    with Progress(TextColumn("[bold]profile"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=True,
                  disable=not sys.stderr.isatty()) as bar:  # a bar only on a terminal: a log gets no stray line
        task = bar.add_task("", total=total)

        def tick(label: str) -> None:
            bar.update(task, advance=1, description=label)

        kw = dict(repeats=args.repeats, warmup=args.warmup, progress=tick)
        if runtime == "onnxruntime-cpu":
            table = profile_ort.profile_layers_ort(layers, target, threads=args.threads, cache=args.cache,
                                                   clock=args.clock, **kw)
        elif runtime == "torch-cuda":
            from mpqc.cost_models.profile_cuda import profile_layers_cuda

            table = profile_layers_cuda(layers, target, **kw)
        else:
            from mpqc.cost_models.profile_trt import profile_layers_trt

            table = profile_layers_trt(layers, target, **kw)
    unsupported = [r for r in table if r.status != "ok"]
    if args.strict and unsupported:
        r = unsupported[0]
        raise UserError(f"{len(unsupported)} layer precision(s) cannot be measured on {target.name}, e.g. {r.layer} "
                        f"at {r.label} ({r.note}); drop --strict to record them as unsupported")
    whole = {} if args.no_whole_model else _whole_model(runtime, loaded, target, args, err)
    summary = _summary(table, layers, target, whole)
    table.meta.update({"model": loaded.source, "input_shape": loaded.input_shape, "target": target.name,
                       "runtime": runtime, "whole_model": whole, "sum_of_layers": summary["sum_of_layers"],
                       "created_by": "mpqc profile"})
    if args.append and os.path.exists(args.output):
        table = LatencyTable.load(args.output).merge(table)
    table.save(args.output)
    summary.update(output=os.path.abspath(args.output), rows=len(table), unsupported=len(unsupported))
    if not args.json:
        _print(summary, Console())
    return summary


def _whole_model(runtime: str, loaded, target, args, err) -> dict:
    with err.status("timing the whole model"):
        if runtime == "onnxruntime-cpu":
            from mpqc.cost_models.profile_ort import profile_whole_model_ort

            with tempfile.TemporaryDirectory(prefix="mpqc-profile-") as tmp:
                return profile_whole_model_ort(loaded.module, loaded.example_inputs, tmp, repeats=args.repeats,
                                               warmup=args.warmup, threads=args.threads,
                                               symmetric_acts=target.symmetric_acts, cache=args.cache,
                                               clock=args.clock)
        if runtime == "torch-cuda":
            from mpqc.cost_models.profile_cuda import profile_whole_model_cuda

            return profile_whole_model_cuda(loaded.module, loaded.example_inputs, repeats=args.repeats,
                                            warmup=args.warmup)
    return {}  # TensorRT: whole-engine timing belongs to `mpqc export --format tensorrt`


_REFERENCE = {"fp32": (None, None, "float"), "bf16": (16, 16, "bf16"), "int8": (8, 8, "int")}


def _summary(table, layers, target, whole: dict) -> dict:
    """Per-layer times at the reference precisions, their sums, and the error against the whole model."""
    from mpqc.cost_models.latency import op_signature

    refs = {k: v for k, v in _REFERENCE.items() if any(r.w_bits == v[0] and r.a_bits == v[1] and r.format == v[2]
                                                       and r.status == "ok" for r in table)}
    per_layer = []
    for layer in layers:
        entry = {"layer": layer.name, "kind": str(getattr(layer.kind, "value", layer.kind)), "macs": layer.macs}
        for r in (table.find(op_signature(layer), c.w_bits, c.a_bits, fmt=c.format)
                  for c in target.candidate_specs(layer.kind)):
            if r is not None:
                entry[r.label] = r.median_ms if r.status == "ok" else None
        per_layer.append(entry)
    sums, errors = {}, {}
    for key, (w, a, fmt) in refs.items():
        total, fell_back = table.sum_over(layers, w, a, fmt=fmt,
                                          fallback=_REFERENCE["fp32"] if "fp32" in refs else None)
        sums[key] = {"ms": total, "layers_at_fallback": fell_back}
        if key in whole:
            errors[key] = 100.0 * (total - whole[key]["median_ms"]) / whole[key]["median_ms"]
    fused = _fused_int8(table, layers) if "int8" in refs else None
    if fused is not None:
        sums["int8_fused"] = {"ms": fused, "layers_at_fallback": [],
                              "how": "Σ (W8A8 layer − its input's QuantizeLinear→DequantizeLinear boundary row)"}
        if "int8" in whole:
            errors["int8_fused"] = 100.0 * (fused - whole["int8"]["median_ms"]) / whole["int8"]["median_ms"]
    speedups = []
    if "fp32" in refs and "int8" in refs:
        speedups = [e["float"] / e["W8A8"] for e in per_layer if e.get("float") and e.get("W8A8")]
    return {"target": target.name, "layers": len(layers), "per_layer": per_layer, "sum_of_layers": sums,
            "whole_model": whole, "error_pct": errors,
            "int8_speedup": {"min": min(speedups), "median": sorted(speedups)[len(speedups) // 2],
                             "max": max(speedups)} if speedups else {}}


def _fused_int8(table, layers) -> float | None:
    """The int8 sum without the per-layer Q/DQ a fused all-int8 graph does not run (None without boundary rows).

    A one-op W8A8 model quantizes its input and dequantizes its output; inside a uniform int8 graph neither
    happens, and one boundary row (a Q→DQ pair on the layer's input shape) measures about that overhead.
    """
    from mpqc.cost_models.latency import op_signature

    boundary = {r.signature.split("=", 1)[1]: r.median_ms for r in table if r.kind == "boundary" and r.status == "ok"}
    total = 0.0
    for layer in layers:
        row = table.find(op_signature(layer), 8, 8, fmt="int")
        q = boundary.get("x".join(map(str, layer.in_shapes[0])))
        if row is None or row.status != "ok" or q is None:
            return None
        total += max(row.median_ms - q, 0.0)
    return total


def _print(summary: dict, console) -> None:
    from rich.table import Table

    labels = list(dict.fromkeys(k for e in summary["per_layer"] for k in e if k not in ("layer", "kind", "macs")))
    t = Table(title=f"per-layer latency on {summary['target']} (ms, median)")
    for col in ["layer", "MMACs", *labels] + (["int8 speed-up"] if {"float", "W8A8"} <= set(labels) else []):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for e in summary["per_layer"]:
        cells = [e["layer"], f"{e['macs'] / 1e6:.1f}"]
        cells += ["-" if e.get(k) is None else f"{e[k]:.4f}" for k in labels]
        if {"float", "W8A8"} <= set(labels):
            cells.append(f"{e['float'] / e['W8A8']:.2f}x" if e.get("float") and e.get("W8A8") else "-")
        t.add_row(*cells)
    console.print(t)
    for key, s in summary["sum_of_layers"].items():
        whole_key = "int8" if key == "int8_fused" else key
        name = "int8 minus per-layer Q/DQ" if key == "int8_fused" else key
        line = f"{name}: sum of layers {s['ms']:.3f} ms"
        if whole_key in summary["whole_model"]:
            w = summary["whole_model"][whole_key]
            line += (f", whole model {w['median_ms']:.3f} ms (IQR {w['spread_ms']:.3f}), "
                     f"error {summary['error_pct'][key]:+.1f}%")
        if s["layers_at_fallback"]:
            line += f" ({len(s['layers_at_fallback'])} layer(s) counted at fp32)"
        console.print(line)
    if summary.get("int8_speedup"):
        sp = summary["int8_speedup"]
        console.print(f"int8 vs fp32 per layer: min {sp['min']:.2f}x, median {sp['median']:.2f}x, max {sp['max']:.2f}x")
    console.print(f"wrote {summary['rows']} rows ({summary['unsupported']} unsupported) to {summary['output']}")
