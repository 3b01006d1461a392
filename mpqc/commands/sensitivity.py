"""Score how much the loss grows when each layer's weights or inputs are quantized at each candidate precision.

Writes a sensitivity table (JSON; DESIGN.md, file formats) for `mpqc search`. Methods: fisher (default; one
pass), hutchinson (Hessian trace, HAWQ), impq (margin noise gain, per channel), eval (measured KL), limpq
(learned step sizes), dual (PD-QAT dual variables), analog (noise per energy per MAC; needs --target).
Results are cached by model, data, method and options (~/.cache/mpqc/sensitivity unless --cache-dir).
"""

from __future__ import annotations

import argparse

from mpqc.errors import UserError

from ._common import add_model_arguments

HELP = "score each layer's sensitivity to quantization per candidate precision"

# kept here as data so that `mpqc --help` does not import torch; a test checks it against METHODS
METHOD_NAMES = ("fisher", "hutchinson", "impq", "eval", "limpq", "dual", "analog")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="data: digits, cifar10:DIR, imagefolder:DIR or npz:FILE")
    p.add_argument("--method", default="fisher", choices=METHOD_NAMES, help="scoring method (default: fisher)")
    p.add_argument("--candidates", default="8,6,5,4,3,2", help="candidate bit-widths (default: 8,6,5,4,3,2)")
    p.add_argument("--granularity", default="layer", choices=("layer", "channel"),
                   help="score whole layers, or also each output channel (fisher, hutchinson, impq)")
    p.add_argument("--samples", type=int, default=512, metavar="N", help="samples a method reads (default: 512)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="batch size (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--target", metavar="T", help="target with an analog noise model (for --method analog)")
    p.add_argument("--act-groups", default="tensor", choices=("tensor", "consumer"),
                   help="one precision per activation tensor, or one per consuming layer (default: tensor)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option probes=128 (hutchinson); repeatable")
    p.add_argument("--device", help="torch device to run on, e.g. cuda (default: where the model is, cpu)")
    p.add_argument("--cache-dir", metavar="D", help="cache directory (default: ~/.cache/mpqc/sensitivity)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--monotone", action="store_true", help="repair scores so they never grow with bits")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the table (JSON)")


def parse_candidates(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise UserError(f"--candidates {text!r}: give comma-separated bit-widths, e.g. 8,6,4,2") from None
    if not bits:
        raise UserError("--candidates: give at least one bit-width, e.g. 8,6,4,2")
    return bits


def parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {item!r}: use KEY=VALUE, e.g. --option probes=128")
        out[key.strip()] = value.strip()
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v else "0"


def print_table(table, candidates: tuple[int, ...]) -> None:
    """A short table: each layer's weight and input score at every candidate (or at a few energies)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sensitivity ({table.method}; larger = more sensitive)")
    t.add_column("layer")
    energies = []
    if any(ls.e for ls in table.layers.values()):
        energies = sorted({e for ls in table.layers.values() if ls.e for e in ls.e})
        energies = [energies[0], energies[len(energies) // 2], energies[-1]]
        for e in energies:
            t.add_column(f"E={e:g}", justify="right")
    else:
        for b in candidates:
            t.add_column(f"w{b}", justify="right")
        for b in candidates:
            t.add_column(f"a{b}", justify="right")
    for name, ls in table.layers.items():
        if energies:
            t.add_row(name, *[_fmt(ls.e[e]) if ls.e and e in ls.e else "-" for e in energies])
        else:
            t.add_row(name, *[_fmt(ls.w[b]) if b in ls.w else "-" for b in candidates],
                      *[_fmt(ls.a[b]) if b in ls.a else "-" for b in candidates])
    Console().print(t)


def run(args):
    from mpqc.atomic import check_output_file
    from mpqc.compiler.capture import capture
    from mpqc.compiler.data import load_data
    from mpqc.compiler.loading import fit_to_data, image_size, load_model
    from mpqc.compiler.sensitivity import SensitivityCache, SensitivityOptions, run_sensitivity

    check_output_file(args.output, "sensitivity.json")
    candidates = parse_candidates(args.candidates)
    extra = parse_options(args.option)
    opts = SensitivityOptions(candidates=candidates, granularity=args.granularity, samples=args.samples,
                              batch_size=args.batch_size, seed=args.seed, act_groups=args.act_groups,
                              target=args.target, device=args.device, extra=extra)
    if args.method == "analog" and not args.target:
        raise UserError("--method analog needs --target (a target with an [analog] section, e.g. analog)")
    loaded = load_model(args.model, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle,
                        input_shape=args.input_shape)
    data = load_data(args.data, image_size=image_size(loaded.input_shape), input_rank=len(loaded.input_shape))
    fit_to_data(loaded, data, args.data, shape_given=args.input_shape is not None)
    captured = capture(loaded.module, loaded.example_inputs, fold_bn=True)
    cache = None if args.no_cache else SensitivityCache(args.cache_dir)
    from mpqc.compiler.progress import StageBars

    with StageBars() as progress:
        table = run_sensitivity(args.method, captured, data, opts, progress=progress, cache=cache)
    if args.monotone:
        table = table.monotone()
    try:
        table.save(args.output)
    except OSError as e:
        raise UserError(f"cannot write {args.output} ({e.strerror})") from None
    if not args.json:
        print_table(table, opts.candidates)
    low = min(opts.candidates)
    ranked = sorted(table.layers, key=lambda n: -(table.layers[n].w.get(low, 0.0) + table.layers[n].a.get(low, 0.0)))
    return {"output": args.output, "method": table.method, "model_hash": table.model_hash,
            "data_hash": table.data_hash, "layers": len(table.layers), "candidates": list(opts.candidates),
            "granularity": opts.granularity, "cached": bool(table.meta.get("cached", False)),
            "time_s": table.meta.get("time_s"), "monotone_repairs": table.meta.get("monotone_repairs"),
            "most_sensitive": ranked[:5]}
