"""The embedded default: train a small CNN on the digits data, compile it for two targets, write both reports.

Needs no inputs and no downloads (the digits data ships with scikit-learn): `analog --emac 100` (energy per
MAC allocated per layer on an analog in-memory array) and `bitserial --avg-bits W3A4` (a bit-flexible
digital accelerator at the BitOPs of a uniform 3-bit-weight, 4-bit-activation network).
"""

from __future__ import annotations

HELP = "train a small CNN on the digits data and compile it for two targets (no inputs needed)"


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", default="mpqc-demo", help="directory for the demo (default: mpqc-demo)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per compile (default 3)")
    p.add_argument("--seed", type=int, default=0)


def run(args):
    import os

    from mpqc.compiler.demo import run_demo

    summary = run_demo(os.path.abspath(args.output), epochs=args.epochs, seed=args.seed, quiet=args.json)
    return summary
