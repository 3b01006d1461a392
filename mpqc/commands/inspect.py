"""Show the IR of a model as a table: layers, shapes, MACs, params and activation groups."""

from __future__ import annotations

from ._common import add_model_arguments, load_and_capture

HELP = "show the graph IR: layers, shapes, MACs, params"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--all", action="store_true", help="list every op, not only the quantizable layers")


def run(args):
    from mpqc.compiler.inspect import inspect_summary, print_inspect_table

    _, cap = load_and_capture(args)
    summary = inspect_summary(cap.graph)
    if not args.json:
        print_inspect_table(cap.graph, all_ops=args.all)
    return summary
